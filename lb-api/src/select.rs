//! How an operator names a service or a backend on the command line, and
//! how lbd finds what was meant. Addresses are compared as addresses, so
//! `[fd00:0::1]:80` and `[fd00::1]:80` name the same backend.

use std::net::SocketAddr;

/// A frontend as typed: `ip:port/proto`, or `ip:port` for any protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendPattern {
    pub addr: SocketAddr,
    /// "tcp" or "udp"; None matches either.
    pub proto: Option<&'static str>,
}

impl FrontendPattern {
    /// None when `s` is not a frontend (then it is a name).
    pub fn parse(s: &str) -> Option<FrontendPattern> {
        let (addr, proto) = match s.rsplit_once('/') {
            Some((addr, "tcp")) => (addr, Some("tcp")),
            Some((addr, "udp")) => (addr, Some("udp")),
            Some(_) => return None,
            None => (s, None),
        };
        Some(FrontendPattern {
            addr: parse_addr(addr).ok()?,
            proto,
        })
    }

    fn matches(&self, frontend: &str) -> bool {
        FrontendPattern::parse(frontend)
            .is_some_and(|f| f.addr == self.addr && (self.proto.is_none() || self.proto == f.proto))
    }
}

/// Parses `ip:port` or `[ipv6]:port`. IPv4-mapped IPv6 is folded to IPv4,
/// as lbd does with every address it is given.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let sa: SocketAddr = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address (ip:port or [ipv6]:port)"))?;
    Ok(SocketAddr::new(sa.ip().to_canonical(), sa.port()))
}

/// Finds the one service that `wanted` names among `services`, given each
/// one's name and frontend (as lbd prints it, `ip:port/proto`). A frontend
/// is tried first, then a name; naming several services is an error that
/// lists them, as is naming none.
pub fn service<'a, T>(
    services: impl IntoIterator<Item = &'a T>,
    wanted: &str,
    name_and_frontend: impl Fn(&T) -> (String, String),
) -> Result<&'a T, String>
where
    T: 'a,
{
    let all: Vec<(&T, String, String)> = services
        .into_iter()
        .map(|s| {
            let (name, frontend) = name_and_frontend(s);
            (s, name, frontend)
        })
        .collect();
    let by_frontend: Vec<&(&T, String, String)> = match FrontendPattern::parse(wanted) {
        Some(p) => all.iter().filter(|(_, _, f)| p.matches(f)).collect(),
        None => Vec::new(),
    };
    let found = if by_frontend.is_empty() {
        all.iter().filter(|(_, n, _)| n == wanted).collect()
    } else {
        by_frontend
    };
    match found.as_slice() {
        [(one, _, _)] => Ok(one),
        [] => Err(format!("no service named {wanted:?} or with that frontend")),
        several => Err(format!(
            "{wanted:?} names several services; give one frontend as ip:port/proto: {}",
            several
                .iter()
                .map(|(_, n, f)| format!("{f} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICES: [(&str, &str); 4] = [
        ("web", "10.73.0.10:80/tcp"),
        ("dns", "10.73.0.10:53/udp"),
        ("dns-tcp", "10.73.0.10:53/tcp"),
        ("web6", "[fd00:73::10]:80/tcp"),
    ];

    fn pick(wanted: &str) -> Result<&'static str, String> {
        service(SERVICES.iter(), wanted, |(n, f)| {
            (n.to_string(), f.to_string())
        })
        .map(|s| s.0)
    }

    #[test]
    fn a_service_by_name_or_by_frontend() {
        assert_eq!(pick("web"), Ok("web"));
        assert_eq!(pick("10.73.0.10:80/tcp"), Ok("web"));
        assert_eq!(pick("10.73.0.10:80"), Ok("web"));
        assert_eq!(pick("10.73.0.10:53/udp"), Ok("dns"));
        // IPv6 written another way, and IPv4 in mapped form.
        assert_eq!(pick("[fd00:73:0::10]:80"), Ok("web6"));
        assert_eq!(pick("[::ffff:10.73.0.10]:80/tcp"), Ok("web"));
    }

    #[test]
    fn ambiguous_or_unknown_names_are_errors() {
        let err = pick("10.73.0.10:53").unwrap_err();
        assert!(err.contains("several services"), "{err}");
        assert!(err.contains("10.73.0.10:53/udp (dns)"), "{err}");
        assert!(pick("nothing").unwrap_err().contains("no service"));
        assert!(pick("10.73.0.10:81").is_err());
        assert!(pick("10.73.0.10:80/sctp").is_err());
    }

    #[test]
    fn backends_compare_as_addresses() {
        assert_eq!(parse_addr("[fd00:0::1]:80"), parse_addr("[fd00::1]:80"));
        assert_eq!(
            parse_addr("[::ffff:10.0.0.1]:80").unwrap(),
            "10.0.0.1:80".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_addr("10.0.0.1").is_err());
        assert!(parse_addr("web").is_err());
    }
}
