//! The `[http]` section of the config file: lbrouter's routes.
//!
//! ```toml
//! [http]
//! max_body_bytes = 10485760          # optional default for every route
//!
//! [[http.route]]
//! name = "api"
//! host = "*.example.com"             # optional: exact or *.suffix; none = any host
//! path = "/api"                      # prefix, on segment boundaries; default "/"
//! strip_prefix = true                # /api/users reaches the backend as /users
//! max_body_bytes = 1048576           # 413 past this many request body bytes
//! sticky_cookie = "lbsticky"         # optional: pin each client to one backend
//! backends = ["10.0.0.5:8080", { addr = "10.0.0.6:8080", weight = 2 }]
//!
//! # The certificates of lbrouter's --listen-tls listeners. A handshake gets
//! # the certificate that names the server name it asks for; the first is
//! # the default. Relative paths are taken from the config file's directory.
//! [[http.tls.certificate]]
//! cert = "tls/example.pem"           # PEM: the certificate, then its chain
//! key = "tls/example.key"            # PEM: its private key
//! ```
//!
//! Parsed and checked by the same parser as the rest of the file
//! (`config::parse`), so lbd and lbrouter agree on what a valid file is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::config::{parse_backends, ConfigError, Lines, RawBackend};

/// Upper bound of `max_body_bytes`: 1 TiB.
const MAX_BODY_LIMIT: i64 = 1 << 40;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpConfig {
    pub routes: Vec<RouteSpec>,
    /// `[[http.tls.certificate]]`, in the file's order: the first is the
    /// default. Only lbrouter reads the files they name.
    pub certificates: Vec<CertSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSpec {
    /// As written when absolute; a relative path is taken from the config
    /// file's directory.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Unique; names the route in metrics and the access log.
    pub name: String,
    pub host: HostMatch,
    /// Starts with `/`; no trailing `/` except for the root itself.
    pub path: String,
    pub strip_prefix: bool,
    /// Request body bytes allowed; `None`: no limit.
    pub max_body_bytes: Option<u64>,
    /// The cookie that pins a client to a backend; `None`: not sticky.
    pub sticky_cookie: Option<String>,
    pub backends: Vec<HttpBackend>,
    /// Where the route is defined, for messages.
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostMatch {
    Any,
    /// Lower case, without a trailing dot.
    Exact(String),
    /// `*.example.com` kept as `.example.com`: any name ending in it.
    Suffix(String),
}

impl std::fmt::Display for HostMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMatch::Any => f.write_str("any host"),
            HostMatch::Exact(h) => f.write_str(h),
            HostMatch::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpBackend {
    pub addr: SocketAddr,
    /// 0 drains the backend: it gets no new requests.
    pub weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttp {
    max_body_bytes: Option<Spanned<i64>>,
    #[serde(default)]
    route: Vec<RawRoute>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    /// Required: a `[http.tls]` without one is an error at its line.
    certificate: Spanned<Vec<RawCert>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCert {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    host: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    #[serde(default)]
    strip_prefix: bool,
    max_body_bytes: Option<Spanned<i64>>,
    sticky_cookie: Option<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
}

pub(crate) fn parse(path: &Path, lines: &Lines, raw: RawHttp) -> Result<HttpConfig, ConfigError> {
    let fail = |span: std::ops::Range<usize>, reason: String| {
        ConfigError::new(path, Some(lines.at(span.start)), reason)
    };
    let body_limit =
        |v: &Spanned<i64>| check_body_limit(*v.get_ref()).map_err(|reason| fail(v.span(), reason));
    let default_limit = raw.max_body_bytes.as_ref().map(body_limit).transpose()?;
    let mut taken = Taken::default();
    let mut routes = Vec::with_capacity(raw.route.len());
    for r in raw.route {
        let line = lines.at(r.name.span().start);
        let name = r.name.get_ref().clone();
        check_route_name(&name).map_err(|reason| fail(r.name.span(), reason))?;
        let host = match &r.host {
            None => HostMatch::Any,
            Some(h) => parse_host(h.get_ref())
                .map_err(|reason| fail(h.span(), format!("host {:?}: {reason}", h.get_ref())))?,
        };
        let prefix = match &r.path {
            None => "/".to_string(),
            Some(p) => normalize_prefix(p.get_ref())
                .map_err(|reason| fail(p.span(), format!("path {:?}: {reason}", p.get_ref())))?,
        };
        if r.backends.is_empty() {
            return Err(fail(
                r.name.span(),
                format!("route {name:?} has no backends"),
            ));
        }
        let backends = parse_backends(path, lines, r.backends, &format!("route {name:?}"))?
            .into_iter()
            .map(|b| HttpBackend {
                addr: b.addr,
                weight: b.weight,
            })
            .collect();
        let max_body_bytes = match &r.max_body_bytes {
            Some(v) => Some(body_limit(v)?),
            None => default_limit,
        };
        let sticky_cookie = match &r.sticky_cookie {
            None => None,
            Some(c) => {
                let cookie = c.get_ref();
                check_cookie_name(cookie).map_err(|reason| {
                    fail(c.span(), format!("sticky_cookie {cookie:?}: {reason}"))
                })?;
                Some(cookie.clone())
            }
        };
        let route = RouteSpec {
            name,
            host,
            path: prefix,
            strip_prefix: r.strip_prefix,
            max_body_bytes,
            sticky_cookie,
            backends,
            line,
        };
        taken
            .admit(&route, format!("line {line}"))
            .map_err(|(field, reason)| match (field, &r.sticky_cookie) {
                (Clash::Cookie, Some(c)) => fail(c.span(), reason),
                _ => fail(r.name.span(), reason),
            })?;
        routes.push(route);
    }
    let certificates = match raw.tls {
        Some(tls) => parse_certificates(path, lines, tls)?,
        None => Vec::new(),
    };
    Ok(HttpConfig {
        routes,
        certificates,
    })
}

/// What makes a route clash with another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Clash {
    Name,
    Place,
    Cookie,
}

/// The names, places (host and path) and cookies of the routes admitted so
/// far, each with where it came from ("line 3", "container web"): the
/// file's routes and discovered ones (discovery.rs) clash by the same rules.
#[derive(Default)]
pub(crate) struct Taken {
    names: HashMap<String, String>,
    places: HashMap<(HostMatch, String), String>,
    // A browser sends a host's cookies to every route of that host: two
    // routes of one host with one cookie name would keep re-pinning it.
    cookies: HashMap<(HostMatch, String), (String, String)>,
}

impl Taken {
    /// Admits `route` unless it clashes with an admitted one; `from` says
    /// where it is defined, for later messages.
    pub(crate) fn admit(&mut self, route: &RouteSpec, from: String) -> Result<(), (Clash, String)> {
        let name = &route.name;
        let host = &route.host;
        let prefix = &route.path;
        if let Some(first) = self.names.get(name) {
            return Err((
                Clash::Name,
                format!("duplicate route name {name:?} (first defined on {first})"),
            ));
        }
        let place = (host.clone(), prefix.clone());
        if let Some(first) = self.places.get(&place) {
            return Err((
                Clash::Place,
                format!("route {name:?}: {host} with path {prefix} is already routed ({first})"),
            ));
        }
        if let Some(cookie) = &route.sticky_cookie {
            if let Some((other, first)) = self.cookies.get(&(host.clone(), cookie.clone())) {
                return Err((
                    Clash::Cookie,
                    format!(
                        "sticky_cookie {cookie:?} is already the cookie of route {other:?} \
                         ({first}) for {host}: each route of a host needs its own"
                    ),
                ));
            }
            self.cookies
                .insert((host.clone(), cookie.clone()), (name.clone(), from.clone()));
        }
        self.names.insert(name.clone(), from.clone());
        self.places.insert(place, from);
        Ok(())
    }
}

/// Letters, digits, '-', '_' and '.'.
pub(crate) fn check_route_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "route name {name:?}: use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

pub(crate) fn check_body_limit(n: i64) -> Result<u64, String> {
    u64::try_from(n)
        .ok()
        .filter(|v| *v as i64 <= MAX_BODY_LIMIT)
        .ok_or_else(|| format!("max_body_bytes {n} is out of range (0 to {MAX_BODY_LIMIT})"))
}

fn parse_certificates(
    path: &Path,
    lines: &Lines,
    tls: RawTls,
) -> Result<Vec<CertSpec>, ConfigError> {
    let fail = |span: std::ops::Range<usize>, reason: String| {
        ConfigError::new(path, Some(lines.at(span.start)), reason)
    };
    let span = tls.certificate.span();
    let certificates = tls.certificate.into_inner();
    if certificates.is_empty() {
        return Err(fail(
            span,
            "[http.tls] needs at least one [[http.tls.certificate]] with cert and key".into(),
        ));
    }
    let base = path.parent().unwrap_or(Path::new(""));
    let file = |field: &str, v: &Spanned<String>| {
        if v.get_ref().trim().is_empty() {
            return Err(fail(v.span(), format!("certificate {field} is empty")));
        }
        Ok(base.join(v.get_ref()))
    };
    let mut seen: HashMap<PathBuf, usize> = HashMap::new();
    let mut out = Vec::with_capacity(certificates.len());
    for c in certificates {
        let line = lines.at(c.cert.span().start);
        let cert = file("cert", &c.cert)?;
        let key = file("key", &c.key)?;
        if let Some(first) = seen.insert(cert.clone(), line) {
            return Err(fail(
                c.cert.span(),
                format!(
                    "certificate {} is listed twice (first on line {first})",
                    cert.display()
                ),
            ));
        }
        out.push(CertSpec { cert, key, line });
    }
    Ok(out)
}

/// A cookie name is an RFC 6265 token; this keeps to the characters every
/// client takes.
pub(crate) fn check_cookie_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("use 1 to 64 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
    {
        return Err("use letters, digits and !#$%&'*+-.^_`|~ (no spaces, '=' or ';')".into());
    }
    Ok(())
}

/// `example.com` or `*.example.com`, lower-cased.
pub(crate) fn parse_host(s: &str) -> Result<HostMatch, String> {
    let lower = s.trim_end_matches('.').to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(
            "expected a host name such as \"example.com\" or \"*.example.com\" (no port)".into(),
        );
    }
    Ok(if wild {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_string())
    })
}

/// A path prefix without its trailing `/`, so that "/api" and "/api/" are
/// the same route.
pub(crate) fn normalize_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err("must start with /".into());
    }
    if s.contains(['?', '#']) || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a path prefix has no query, fragment or spaces".into());
    }
    let trimmed = s.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".into()
    } else {
        trimmed.into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/lbd/lbd.toml";

    fn ok(text: &str) -> HttpConfig {
        crate::config::parse(Path::new(PATH), text)
            .unwrap_or_else(|e| panic!("unexpected error: {e}"))
            .http
    }

    #[track_caller]
    fn err(text: &str, line: usize, needle: &str) {
        let e = crate::config::parse(Path::new(PATH), text).expect_err("should be rejected");
        assert_eq!(e.line(), Some(line), "wrong line for: {e}");
        assert!(
            e.reason().contains(needle),
            "{e} does not mention {needle:?}"
        );
    }

    #[test]
    fn routes_are_parsed_with_defaults() {
        let http = ok(r#"
[http]
max_body_bytes = 1000

[[http.route]]
name = "api"
host = "API.Example.com."
path = "/api/"
strip_prefix = true
backends = ["10.0.0.1:80", { addr = "10.0.0.2:80", weight = 3 }]

[[http.route]]
name = "web"
host = "*.example.com"
max_body_bytes = 0
backends = ["[fd00::1]:8080"]
"#);
        assert_eq!(http.routes.len(), 2);
        let api = &http.routes[0];
        assert_eq!(api.host, HostMatch::Exact("api.example.com".into()));
        assert_eq!(api.path, "/api");
        assert!(api.strip_prefix);
        assert_eq!(api.max_body_bytes, Some(1000));
        assert_eq!(api.backends[1].weight, 3);
        assert_eq!(api.line, 6);
        let web = &http.routes[1];
        assert_eq!(web.host, HostMatch::Suffix(".example.com".into()));
        assert_eq!(web.path, "/");
        assert_eq!(web.max_body_bytes, Some(0));
        assert!(ok("").routes.is_empty());
    }

    #[test]
    fn certificates_and_sticky_cookies() {
        let http = ok(r#"
[[http.route]]
name = "shop"
sticky_cookie = "lb_sticky"
backends = ["10.0.0.1:80"]

[[http.tls.certificate]]
cert = "tls/a.pem"
key = "/keys/a.key"

[[http.tls.certificate]]
cert = "/certs/b.pem"
key = "b.key"
"#);
        assert_eq!(http.routes[0].sticky_cookie.as_deref(), Some("lb_sticky"));
        let c = &http.certificates;
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].cert, Path::new("/etc/lbd/tls/a.pem"));
        assert_eq!(c[0].key, Path::new("/keys/a.key"));
        assert_eq!(c[0].line, 8);
        assert_eq!(c[1].cert, Path::new("/certs/b.pem"));
        assert_eq!(c[1].key, Path::new("/etc/lbd/b.key"));
        assert_eq!(ok("").certificates, vec![]);
    }

    #[test]
    fn certificate_and_cookie_mistakes_name_their_line() {
        let cert = |body: &str| format!("[http]\n\n[[http.tls.certificate]]\n{body}\n");
        err(&cert("cert = \"a.pem\""), 3, "missing field `key`");
        err(
            &cert("cert = \"a.pem\"\nkey = \"\""),
            5,
            "certificate key is empty",
        );
        err(
            &cert("cert = \"a.pem\"\nkey = \"a.key\"\nsni = \"x\""),
            6,
            "unknown field",
        );
        err(
            &format!(
                "{}[[http.tls.certificate]]\ncert = \"/etc/lbd/a.pem\"\nkey = \"b.key\"\n",
                cert("cert = \"a.pem\"\nkey = \"a.key\"")
            ),
            7,
            "listed twice (first on line 4)",
        );
        err("[http.tls]\n", 1, "missing field `certificate`");
        err("[http.tls]\ncertificate = []\n", 2, "at least one");
        let route = |name: &str, host: &str, cookie: &str| {
            format!(
                "[[http.route]]\nname = \"{name}\"\nhost = \"{host}\"\npath = \"/{name}\"\n\
                 sticky_cookie = \"{cookie}\"\nbackends = [\"10.0.0.1:1\"]\n"
            )
        };
        err(&route("a", "x.com", "a b"), 5, "sticky_cookie \"a b\"");
        err(&route("a", "x.com", "s=1"), 5, "no spaces, '=' or ';'");
        err(&route("a", "x.com", ""), 5, "1 to 64");
        let same = [route("a", "x.com", "s"), route("b", "x.com", "s")].concat();
        err(&same, 11, "already the cookie of route \"a\" (line 2)");
        // Other hosts keep their cookies apart.
        let other = [route("a", "x.com", "s"), route("b", "y.com", "s")].concat();
        assert_eq!(ok(&other).routes.len(), 2);
    }

    #[test]
    fn mistakes_name_their_line() {
        let route = |body: &str| format!("[[http.route]]\nname = \"r\"\n{body}\n");
        err(
            &route("backends = [\"10.0.0.1:80\"]\npath = \"api\""),
            4,
            "must start with /",
        );
        err(
            &route("host = \"a b\"\nbackends = [\"10.0.0.1:80\"]"),
            3,
            "host name",
        );
        err(
            &route("host = \"a.com:80\"\nbackends = [\"10.0.0.1:80\"]"),
            3,
            "no port",
        );
        err(&route(""), 2, "has no backends");
        err(&route("backends = [\"10.0.0.1\"]"), 3, "missing port");
        err(
            &route("backends = [{ addr = \"10.0.0.1:1\", weight = -1 }]"),
            3,
            "out of range",
        );
        err(
            &route("backends = [\"10.0.0.1:1\", \"10.0.0.1:1\"]"),
            3,
            "listed twice in route",
        );
        err(&route("bogus = 1"), 3, "unknown field");
        err(
            &route("max_body_bytes = -5\nbackends = [\"10.0.0.1:1\"]"),
            3,
            "max_body_bytes",
        );
        err(
            "[[http.route]]\nname = \"a/b\"\nbackends = [\"10.0.0.1:1\"]",
            2,
            "route name",
        );
        let two = "[[http.route]]\nname = \"a\"\npath = \"/x\"\nbackends = [\"10.0.0.1:1\"]\n\
                   [[http.route]]\nname = \"b\"\npath = \"/x/\"\nbackends = [\"10.0.0.1:1\"]\n";
        err(two, 6, "already routed (line 2)");
        let dup = "[[http.route]]\nname = \"a\"\nbackends = [\"10.0.0.1:1\"]\n\
                   [[http.route]]\nname = \"a\"\npath = \"/y\"\nbackends = [\"10.0.0.1:1\"]\n";
        err(dup, 5, "duplicate route name");
    }
}
