//! Sticky sessions: a route with `sticky_cookie` pins each client to the
//! backend that first answered it, by a cookie naming that backend.
//!
//! The cookie's value is a token, not the address: the first 64 bits of
//! SHA-256 over the route's name and the backend's address. It is the
//! same on every lbrouter and across restarts and reloads, so a client
//! stays pinned whichever router behind the L4 balancer it reaches. A
//! token that names none of the route's backends (forged, stale, of
//! another route) counts as no cookie.
//!
//! A pinned backend keeps its clients while it takes connections, also
//! when drained (weight 0), so that sessions end there on their own; once
//! it refuses connections (quarantine) or leaves the route, its clients
//! are moved and given a new cookie.

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderValue};

/// What a route remembers to pin clients: its cookie's name and the token
/// of each backend.
pub struct Sticky {
    pub cookie: String,
    tokens: Vec<(SocketAddr, String)>,
}

impl Sticky {
    pub fn new(cookie: &str, route: &str, backends: impl IntoIterator<Item = SocketAddr>) -> Self {
        Sticky {
            cookie: cookie.to_string(),
            tokens: backends
                .into_iter()
                .map(|addr| (addr, token(route, addr)))
                .collect(),
        }
    }

    /// The backend the request's cookie names, when it is one of the
    /// route's.
    pub fn pinned(&self, headers: &HeaderMap) -> Option<SocketAddr> {
        let value = cookie_value(headers, &self.cookie)?;
        self.tokens
            .iter()
            .find(|(_, t)| t == value)
            .map(|(addr, _)| *addr)
    }

    /// `Set-Cookie` pinning the client to `addr`; `Secure` when the client
    /// came over TLS (a plain-HTTP client would never send it back).
    pub fn set_cookie(&self, addr: SocketAddr, secure: bool) -> Option<HeaderValue> {
        let (_, token) = self.tokens.iter().find(|(a, _)| *a == addr)?;
        let secure = if secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}={token}; Path=/; HttpOnly{secure}; SameSite=Lax",
            self.cookie
        ))
        .ok()
    }
}

/// 16 hex digits standing for `addr` within `route`.
fn token(route: &str, addr: SocketAddr) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(route.as_bytes());
    // The name cannot hold a NUL: route and address stay apart.
    ctx.update(b"\0");
    ctx.update(addr.to_string().as_bytes());
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value of cookie `name` among the request's `Cookie` headers (HTTP/2
/// may send one header per cookie).
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8080))
    }

    #[test]
    fn tokens_are_stable_opaque_and_per_route() {
        let a = Sticky::new("s", "web", [addr(1), addr(2)]);
        let again = Sticky::new("s", "web", [addr(2), addr(1)]);
        let other = Sticky::new("s", "api", [addr(1)]);
        let t1 = &a.tokens[0].1;
        assert_eq!(t1.len(), 16);
        assert!(!t1.contains("10.0.0.1"));
        assert_eq!(t1, &again.tokens[1].1, "same route and backend, same token");
        assert_ne!(t1, &a.tokens[1].1);
        assert_ne!(t1, &other.tokens[0].1, "another route, another token");
    }

    #[test]
    fn cookie_names_a_backend_or_nothing() {
        let s = Sticky::new("lbsticky", "web", [addr(1), addr(2)]);
        let set = s.set_cookie(addr(2), false).unwrap();
        let set = set.to_str().unwrap();
        assert!(set.ends_with("; Path=/; HttpOnly; SameSite=Lax"), "{set}");
        let pair = set.split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        assert_eq!(s.pinned(&h), None);
        h.append(header::COOKIE, HeaderValue::from_str(pair).unwrap());
        assert_eq!(s.pinned(&h), Some(addr(2)));
        let mut bad = HeaderMap::new();
        bad.insert(
            header::COOKIE,
            HeaderValue::from_static("lbsticky=0123456789abcdef"),
        );
        assert_eq!(s.pinned(&bad), None);
        let secure = s.set_cookie(addr(1), true).unwrap();
        assert!(secure
            .to_str()
            .unwrap()
            .contains("; HttpOnly; Secure; SameSite=Lax"));
        assert!(s.set_cookie(addr(3), true).is_none());
    }
}
