//! The static TOML configuration.
//!
//! ```toml
//! [conntrack]                       # optional; these are the defaults
//! syn_timeout_secs = 60
//! tcp_timeout_secs = 21600
//! closing_timeout_secs = 30
//! udp_timeout_secs = 120
//! snat_ports = "1024-32767"         # default: outside ip_local_port_range
//!
//! [labels]                         # optional: what container labels may take
//! frontend_ranges = ["10.73.0.0/24", "fd00:73::/64"]   # default: none
//! allow_node_addresses = false      # default: never this node's addresses
//!
//! [[service]]
//! name = "web"
//! frontend = "10.73.0.10:80/tcp"
//! backends = ["10.72.1.2:8080", { addr = "10.72.3.2:8080", weight = 2 }]
//! ```
//!
//! Every error names the file and the line, because the person reading it
//! is usually looking at a config that was fine a minute ago.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::model::{
    BackendSpec, CheckKind, ConntrackSettings, Frontend, HealthCheck, OnDown, Proto, ServiceSpec,
};
use crate::sources::label_frontends::LabelPolicy;

/// What the config file says: its services, the node's conntrack settings
/// and what container labels may take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub services: Vec<ServiceSpec>,
    pub conntrack: ConntrackSettings,
    pub labels: LabelPolicy,
    /// Service name -> the etcd prefix its backends come from.
    pub etcd_backends: std::collections::BTreeMap<String, String>,
    /// `[maglev] table_size`: the Maglev table size of services that set
    /// none, and the largest any may set (it sizes the ring map).
    pub table_size: Option<u32>,
    /// The `[http]` section: lbrouter's routes.
    pub http: crate::router::config::HttpConfig,
}

/// The longest timeout accepted: a week.
const MAX_TIMEOUT_SECS: i64 = 7 * 86_400;

/// Largest accepted backend weight. Keeps weight arithmetic far from
/// overflow and is already far finer than a Maglev table can express.
pub use lb_api::control::MAX_WEIGHT;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    path: PathBuf,
    line: Option<usize>,
    reason: String,
}

impl ConfigError {
    pub(crate) fn new(path: &Path, line: Option<usize>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_path_buf(),
            line,
            reason: reason.into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// 1-based; `None` when the problem is not tied to a line (e.g. the file
    /// could not be read).
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.path.display(), line, self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    service: Vec<RawService>,
    conntrack: Option<RawConntrack>,
    labels: Option<RawLabels>,
    maglev: Option<RawMaglev>,
    /// lbrouter's routes (router/config.rs); lbd only checks them.
    http: Option<crate::router::config::RawHttp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaglev {
    table_size: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabels {
    #[serde(default)]
    frontend_ranges: Vec<Spanned<String>>,
    #[serde(default)]
    allow_node_addresses: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConntrack {
    syn_timeout_secs: Option<Spanned<i64>>,
    tcp_timeout_secs: Option<Spanned<i64>>,
    closing_timeout_secs: Option<Spanned<i64>>,
    udp_timeout_secs: Option<Spanned<i64>>,
    /// "first-last".
    snat_ports: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    frontend: Spanned<String>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    /// Full NAT: the address to translate the source to.
    snat: Option<Spanned<String>>,
    health: Option<Spanned<RawHealth>>,
    /// Session affinity, in seconds.
    affinity_secs: Option<Spanned<i64>>,
    maglev_table_size: Option<Spanned<i64>>,
    /// Backends from etcd: every key under this prefix holds one backend's
    /// `host:port` (the layout confd set-ups use).
    etcd_backends: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    /// "tcp" or "http".
    check: Spanned<String>,
    path: Option<Spanned<String>>,
    /// "200-399" or a single code.
    status: Option<Spanned<String>>,
    interval_ms: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    /// "keep" or "reset".
    on_down: Option<Spanned<String>>,
}

pub(crate) enum RawBackend {
    Short(String),
    Table {
        addr: Spanned<String>,
        weight: Option<Spanned<i64>>,
    },
}

// Hand-written rather than `#[serde(untagged)]`: an untagged enum reports
// every mistake as "did not match any variant", which hides the real one.
impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;

        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = RawBackend;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""ip:port" or { addr = "ip:port", weight = N }"#)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend::Short(v.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBackend, A::Error> {
                const FIELDS: &[&str] = &["addr", "weight"];
                let mut addr = None;
                let mut weight = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "addr" => addr = Some(map.next_value()?),
                        "weight" => weight = Some(map.next_value()?),
                        other => return Err(de::Error::unknown_field(other, FIELDS)),
                    }
                }
                let addr = addr.ok_or_else(|| de::Error::missing_field("addr"))?;
                Ok(RawBackend::Table { addr, weight })
            }
        }

        deserializer.deserialize_any(BackendVisitor)
    }
}

/// Where the lines of a text start, to tell the line of a byte offset
/// without counting from the start each time: a file of 10,000 services has
/// hundreds of thousands of spans, and counting took minutes.
pub(crate) struct Lines(Vec<usize>);

impl Lines {
    pub(crate) fn new(text: &str) -> Lines {
        Lines(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i)
                .collect(),
        )
    }

    /// 1-based line of a byte offset (any offset, on a character boundary
    /// or not).
    pub(crate) fn at(&self, offset: usize) -> usize {
        self.0.partition_point(|&newline| newline < offset) + 1
    }
}

/// One checked entry of a `backends` list.
pub(crate) struct ParsedBackend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// As written, for errors.
    pub text: String,
    pub span: Range<usize>,
}

/// Checks a `backends` list (of a service or an HTTP route): addresses,
/// weights and duplicates. `owner` names the list in errors.
pub(crate) fn parse_backends(
    path: &Path,
    lines: &Lines,
    entries: Vec<Spanned<RawBackend>>,
    owner: &str,
) -> Result<Vec<ParsedBackend>, ConfigError> {
    let fail = |span: Range<usize>, reason: String| {
        ConfigError::new(path, Some(lines.at(span.start)), reason)
    };
    let mut out = Vec::with_capacity(entries.len());
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    for entry in entries {
        let entry_span = entry.span();
        let (addr_text, addr_span, weight) = match entry.into_inner() {
            RawBackend::Short(addr) => (addr, entry_span, None),
            RawBackend::Table { addr, weight } => {
                let span = addr.span();
                (addr.into_inner(), span, weight)
            }
        };
        let (addr, port) = parse_socket(&addr_text).map_err(|reason| {
            fail(
                addr_span.clone(),
                format!("backend {addr_text:?}: {reason}"),
            )
        })?;
        let weight = match weight {
            None => 1,
            Some(w) => {
                let value = *w.get_ref();
                u32::try_from(value)
                    .ok()
                    .filter(|&v| v <= MAX_WEIGHT)
                    .ok_or_else(|| {
                        fail(
                            w.span(),
                            format!(
                                "backend {addr_text:?}: weight {value} is out of range (0 to {MAX_WEIGHT})"
                            ),
                        )
                    })?
            }
        };
        let socket = SocketAddr::new(addr, port);
        let line = lines.at(addr_span.start);
        if let Some(first) = seen.insert(socket, line) {
            return Err(ConfigError::new(
                path,
                Some(line),
                format!("backend {socket} is listed twice in {owner} (first on line {first})"),
            ));
        }
        out.push(ParsedBackend {
            addr: socket,
            weight,
            text: addr_text,
            span: addr_span,
        });
    }
    Ok(out)
}

/// Modification time and size: either changing means the file changed.
/// Both lbd and lbrouter poll it to reload the file.
pub fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads and parses the config file at `path`.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
    parse(path, &text)
}

/// Parses config `text`; `path` is only used in errors and in each service's
/// `source`.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| Lines::new(text).at(s.start));
        // One line, so that logs and `lbctl status` show the whole reason.
        let reason: Vec<&str> = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        ConfigError::new(path, line, reason.join(": "))
    })?;

    let lines = Lines::new(text);
    let fail = |span: Range<usize>, reason: String| {
        ConfigError::new(path, Some(lines.at(span.start)), reason)
    };
    let source = format!("config:{}", path.display());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut frontends: HashMap<Frontend, (String, usize)> = HashMap::new();
    let mut services = Vec::with_capacity(raw.service.len());
    let mut etcd_backends = std::collections::BTreeMap::new();
    let table_size = raw
        .maglev
        .and_then(|m| m.table_size)
        .map(|t| spanned_table_size(t, "maglev.table_size", &fail))
        .transpose()?;
    let largest = table_size.unwrap_or(lb_common::MAGLEV_M);

    for svc in raw.service {
        let name_line = lines.at(svc.name.span().start);
        let name = svc.name.into_inner();
        if name.trim().is_empty() {
            return Err(ConfigError::new(
                path,
                Some(name_line),
                "service name is empty",
            ));
        }
        if let Some(first) = names.insert(name.clone(), name_line) {
            return Err(ConfigError::new(
                path,
                Some(name_line),
                format!("duplicate service name {name:?} (first defined on line {first})"),
            ));
        }

        let frontend_span = svc.frontend.span();
        let frontend_line = lines.at(frontend_span.start);
        let frontend_text = svc.frontend.get_ref();
        let frontend = parse_frontend(frontend_text).map_err(|reason| {
            fail(
                frontend_span.clone(),
                format!("frontend {frontend_text:?}: {reason}"),
            )
        })?;
        if let Some((other, line)) = frontends.get(&frontend) {
            return Err(ConfigError::new(
                path,
                Some(frontend_line),
                format!("frontend {frontend} is already used by service {other:?} (line {line})"),
            ));
        }
        frontends.insert(frontend, (name.clone(), frontend_line));

        if let Some(prefix) = &svc.etcd_backends {
            let text = prefix.get_ref();
            if !text.starts_with('/') || text.trim_end_matches('/').is_empty() {
                return Err(fail(
                    prefix.span(),
                    format!(
                        "etcd_backends {text:?}: expected a key prefix such as \"/app/servers\""
                    ),
                ));
            }
            if !svc.backends.is_empty() {
                return Err(fail(
                    prefix.span(),
                    "a service takes its backends from `backends` or from `etcd_backends`, not both"
                        .into(),
                ));
            }
            etcd_backends.insert(name.clone(), text.clone());
        }
        let mut backends: Vec<BackendSpec> = Vec::with_capacity(svc.backends.len());
        for b in parse_backends(path, &lines, svc.backends, &format!("service {name:?}"))? {
            if b.addr.is_ipv4() != frontend.addr.is_ipv4() {
                let (fam_b, fam_f) = if b.addr.is_ipv4() {
                    ("IPv4", "IPv6")
                } else {
                    ("IPv6", "IPv4")
                };
                return Err(fail(
                    b.span,
                    format!(
                        "backend {:?}: {fam_b} backend behind {fam_f} frontend {frontend} is not supported (address families must match)",
                        b.text
                    ),
                ));
            }
            backends.push(BackendSpec {
                addr: b.addr.ip(),
                port: b.addr.port(),
                weight: b.weight,
            });
        }

        let snat = match svc.snat {
            None => None,
            Some(s) => {
                let text = s.get_ref();
                let addr = text
                    .parse::<IpAddr>()
                    .map(|a| a.to_canonical())
                    .map_err(|_| fail(s.span(), format!("snat {text:?}: not an IP address")))?;
                if addr.is_ipv4() != frontend.addr.is_ipv4()
                    || addr.is_unspecified()
                    || addr.is_multicast()
                {
                    return Err(fail(
                        s.span(),
                        format!(
                            "snat {text:?}: must be a unicast address of the frontend's family"
                        ),
                    ));
                }
                Some(addr)
            }
        };
        let health = match svc.health {
            None => None,
            Some(h) => Some(parse_health(h.into_inner(), &fail)?),
        };
        let affinity_secs = match &svc.affinity_secs {
            None => 0,
            Some(a) => u32::try_from(*a.get_ref())
                .ok()
                .filter(|s| *s <= 86_400)
                .ok_or_else(|| {
                    fail(
                        a.span(),
                        format!("affinity_secs {} is out of range (0 to 86400)", a.get_ref()),
                    )
                })?,
        };
        let service_table_size = match svc.maglev_table_size {
            None => None,
            Some(t) => {
                let span = t.span();
                let size = spanned_table_size(t, "maglev_table_size", &fail)?;
                if size > largest {
                    return Err(fail(
                        span,
                        format!(
                            "maglev_table_size {size} is larger than the global \
                             maglev.table_size ({largest}), the most a service may have"
                        ),
                    ));
                }
                Some(size)
            }
        };
        services.push(ServiceSpec {
            name,
            frontend,
            backends,
            snat,
            health,
            affinity_secs,
            table_size: service_table_size,
            network: None,
            local_frontend: false,
            source: source.clone(),
        });
    }

    let conntrack = match raw.conntrack {
        Some(ct) => parse_conntrack(ct, &fail)?,
        None => ConntrackSettings::default(),
    };
    let mut labels = LabelPolicy::default();
    if let Some(raw) = raw.labels {
        labels.allow_node_addresses = raw.allow_node_addresses;
        for r in raw.frontend_ranges {
            let range = parse_cidr(r.get_ref())
                .map_err(|reason| fail(r.span(), format!("frontend_ranges: {reason}")))?;
            labels.frontend_ranges.push(range);
        }
    }
    let http = match raw.http {
        Some(h) => crate::router::config::parse(path, &lines, h)?,
        None => Default::default(),
    };
    Ok(FileConfig {
        services,
        conntrack,
        labels,
        etcd_backends,
        table_size,
        http,
    })
}

/// A Maglev table size, checked: a prime (so that every backend's
/// permutation visits every entry) from MAGLEV_M_MIN to MAGLEV_M_MAX. The
/// one check of the config file, labels and etcd keys.
pub fn table_size(n: i64) -> Result<u32, String> {
    use lb_common::{MAGLEV_M_MAX, MAGLEV_M_MIN};
    let in_bounds = u32::try_from(n)
        .ok()
        .filter(|n| (MAGLEV_M_MIN..=MAGLEV_M_MAX).contains(n));
    let Some(m) = in_bounds else {
        return Err(format!(
            "{n} is out of range ({MAGLEV_M_MIN} to {MAGLEV_M_MAX}, a prime)"
        ));
    };
    if (2..).take_while(|d| d * d <= m).any(|d| m % d == 0) {
        return Err(format!(
            "{m} is not a prime (a Maglev table needs a prime size; e.g. 251, 1021, 4093, \
             16381, 65521 or 65537)"
        ));
    }
    Ok(m)
}

fn spanned_table_size(
    t: Spanned<i64>,
    key: &str,
    fail: &dyn Fn(Range<usize>, String) -> ConfigError,
) -> Result<u32, ConfigError> {
    table_size(*t.get_ref()).map_err(|e| fail(t.span(), format!("{key}: {e}")))
}

/// An address range such as "10.73.0.0/24" or "fd00:73::/64", for the
/// frontends labels may take; `lbd --label-frontends` uses it too.
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    let net: ipnet::IpNet = s.trim().parse().map_err(|_| {
        format!("{s:?} is not an address range (expected e.g. 10.73.0.0/24 or fd00:73::/64)")
    })?;
    // A range with host bits set is most likely a typo for another one.
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has bits set past its prefix length (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_conntrack(
    raw: RawConntrack,
    fail: &dyn Fn(Range<usize>, String) -> ConfigError,
) -> Result<ConntrackSettings, ConfigError> {
    let mut out = ConntrackSettings::default();
    let timeouts = [
        (
            "syn_timeout_secs",
            raw.syn_timeout_secs,
            &mut out.syn_timeout_secs,
        ),
        (
            "tcp_timeout_secs",
            raw.tcp_timeout_secs,
            &mut out.tcp_timeout_secs,
        ),
        (
            "closing_timeout_secs",
            raw.closing_timeout_secs,
            &mut out.closing_timeout_secs,
        ),
        (
            "udp_timeout_secs",
            raw.udp_timeout_secs,
            &mut out.udp_timeout_secs,
        ),
    ];
    for (name, value, slot) in timeouts {
        let Some(v) = value else { continue };
        if !(1..=MAX_TIMEOUT_SECS).contains(v.get_ref()) {
            return Err(fail(
                v.span(),
                format!(
                    "{name} {} is out of range (1 to {MAX_TIMEOUT_SECS})",
                    v.get_ref()
                ),
            ));
        }
        *slot = *v.get_ref() as u64;
    }
    if let Some(ports) = raw.snat_ports {
        let range = parse_port_range(ports.get_ref()).ok_or_else(|| {
            fail(
                ports.span(),
                format!(
                    "snat_ports {:?}: expected \"first-last\" with 1 <= first <= last <= 65535",
                    ports.get_ref()
                ),
            )
        })?;
        out.snat_ports = Some(range);
    }
    Ok(out)
}

/// "first-last", both inclusive, 1 <= first <= last <= 65535.
pub fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let a: u16 = a.trim().parse().ok()?;
    let b: u16 = b.trim().parse().ok()?;
    (a >= 1 && a <= b).then_some((a, b))
}

/// Checks and fills in defaults for a `[service.health]` table.
fn parse_health(
    raw: RawHealth,
    fail: &dyn Fn(Range<usize>, String) -> ConfigError,
) -> Result<HealthCheck, ConfigError> {
    let mut check = HealthCheck::tcp();
    let number = |v: &Option<Spanned<i64>>, what: &str, min: i64, max: i64, default: i64| match v {
        None => Ok(default),
        Some(n) if (min..=max).contains(n.get_ref()) => Ok(*n.get_ref()),
        Some(n) => Err(fail(
            n.span(),
            format!(
                "health {what} {} is out of range ({min} to {max})",
                n.get_ref()
            ),
        )),
    };
    check.interval_ms = number(&raw.interval_ms, "interval_ms", 10, 3_600_000, 2000)? as u64;
    check.timeout_ms = number(&raw.timeout_ms, "timeout_ms", 10, 3_600_000, 1000)? as u64;
    check.rise = number(&raw.rise, "rise", 1, 100, 2)? as u32;
    check.fall = number(&raw.fall, "fall", 1, 100, 3)? as u32;
    if let Some(on_down) = &raw.on_down {
        check.on_down = match on_down.get_ref().as_str() {
            "keep" => OnDown::Keep,
            "reset" => OnDown::Reset,
            other => {
                return Err(fail(
                    on_down.span(),
                    format!("health on_down {other:?}: expected \"keep\" or \"reset\""),
                ))
            }
        };
    }
    check.kind = match raw.check.get_ref().as_str() {
        "tcp" => {
            if let Some(p) = raw.path.as_ref().or(raw.status.as_ref()) {
                return Err(fail(
                    p.span(),
                    "health path and status apply to http checks only".into(),
                ));
            }
            CheckKind::Tcp
        }
        "http" => {
            let path = raw
                .path
                .as_ref()
                .map_or("/".to_string(), |p| p.get_ref().clone());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                let span = raw.path.as_ref().map_or(raw.check.span(), |p| p.span());
                return Err(fail(
                    span,
                    format!("health path {path:?}: must start with / and have no spaces"),
                ));
            }
            let (status_min, status_max) = match &raw.status {
                None => (200, 399),
                Some(s) => parse_status_range(s.get_ref()).ok_or_else(|| {
                    fail(
                        s.span(),
                        format!(
                            "health status {:?}: expected a code or a range like \"200-399\"",
                            s.get_ref()
                        ),
                    )
                })?,
            };
            CheckKind::Http {
                path,
                status_min,
                status_max,
            }
        }
        other => {
            return Err(fail(
                raw.check.span(),
                format!("health check {other:?}: expected \"tcp\" or \"http\""),
            ))
        }
    };
    Ok(check)
}

pub fn parse_status_range(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let (lo, hi): (u16, u16) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
    ((100..=599).contains(&lo) && (lo..=599).contains(&hi)).then_some((lo, hi))
}

/// Parses "ip:port/proto" or "[ipv6]:port/proto" (also used for labels).
pub fn parse_frontend(s: &str) -> Result<Frontend, String> {
    let Some((addr, proto)) = s.rsplit_once('/') else {
        return Err("missing protocol suffix (/tcp or /udp)".into());
    };
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => return Err(format!("unknown protocol {other:?} (expected tcp or udp)")),
    };
    let (addr, port) = parse_socket(addr)?;
    Ok(Frontend { addr, port, proto })
}

/// Parses "ip:port" or "[ipv6]:port" into a usable unicast address and a
/// non-zero port.
///
/// IPv4-mapped IPv6 addresses are folded to IPv4: the datapath stores IPv4 in
/// mapped form, so `[::ffff:10.0.0.1]:80` and `10.0.0.1:80` are the same
/// frontend and must collide here rather than in the kernel map.
fn parse_socket(s: &str) -> Result<(IpAddr, u16), String> {
    let sa: SocketAddr = match s.parse() {
        Ok(sa) => sa,
        Err(_) => return Err(explain_bad_socket(s)),
    };
    let addr = sa.ip().to_canonical();
    if sa.port() == 0 {
        return Err("port 0 is not allowed".into());
    }
    if addr.is_unspecified() {
        return Err(format!("address {addr} is unspecified"));
    }
    if addr.is_multicast() {
        return Err(format!("address {addr} is multicast"));
    }
    Ok((addr, sa.port()))
}

fn explain_bad_socket(s: &str) -> String {
    const EXPECTED: &str = "expected ip:port or [ipv6]:port";
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return match ip {
            IpAddr::V6(_) if !s.starts_with('[') => {
                format!("missing port, or IPv6 address without brackets ({EXPECTED})")
            }
            _ => format!("missing port ({EXPECTED})"),
        };
    }
    if let Some((host, port)) = s.rsplit_once(':') {
        let host = host
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(host);
        if host.parse::<IpAddr>().is_ok() {
            return format!("invalid port {port:?} (expected 1 to 65535)");
        }
    }
    format!("invalid address ({EXPECTED})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const PATH: &str = "/etc/lbd.toml";

    fn ok(text: &str) -> FileConfig {
        parse(Path::new(PATH), text).unwrap_or_else(|e| panic!("unexpected error: {e}"))
    }

    /// Asserts the error's line and that its reason contains `needle`.
    #[track_caller]
    fn err(text: &str, line: usize, needle: &str) -> ConfigError {
        let e = parse(Path::new(PATH), text).expect_err("config should be rejected");
        assert_eq!(e.line(), Some(line), "wrong line for: {e}");
        assert!(
            e.reason().contains(needle),
            "{e:?} does not mention {needle:?}"
        );
        assert_eq!(e.path(), Path::new(PATH));
        assert_eq!(e.to_string(), format!("{PATH}:{line}: {}", e.reason()));
        e
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }

    #[test]
    fn empty_configs_are_valid() {
        assert_eq!(ok(""), FileConfig::default());
        assert_eq!(ok("# nothing yet\n\n"), FileConfig::default());
        assert_eq!(ok("service = []\n"), FileConfig::default());
    }

    #[test]
    fn ipv4_tcp_with_weights() {
        let state = ok(r#"
# the web tier
[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"
backends = ["10.72.1.2:8080", "10.72.2.2:8080", { addr = "10.72.3.2:8080", weight = 2 }]
"#);
        assert_eq!(state.services.len(), 1);
        let svc = &state.services[0];
        assert_eq!(svc.name, "web");
        assert_eq!(
            svc.frontend,
            Frontend {
                addr: v4("10.73.0.10"),
                port: 80,
                proto: Proto::Tcp
            }
        );
        assert_eq!(svc.source, "config:/etc/lbd.toml");
        let got: Vec<_> = svc
            .backends
            .iter()
            .map(|b| (b.socket_addr().to_string(), b.weight))
            .collect();
        assert_eq!(
            got,
            [
                ("10.72.1.2:8080".to_string(), 1),
                ("10.72.2.2:8080".to_string(), 1),
                ("10.72.3.2:8080".to_string(), 2)
            ]
        );
    }

    #[test]
    fn ipv6_udp_multiple_services() {
        let state = ok(r#"
[[service]]
name = "dns6"
frontend = "[fd00:73::10]:53/udp"
backends = [
  "[fd00:72:1::2]:5353",
  { addr = "[fd00:72:2::2]:5353", weight = 0 },
  { addr = "[fd00:72:3::2]:5353" },
]

[[service]]
name = "dns6-tcp"
frontend = "[fd00:73::10]:53/tcp"

[[service]]
name = "dns4"
frontend = "10.73.0.10:53/udp"
backends = []
"#);
        let [dns6, dns6_tcp, dns4] = &state.services[..] else {
            panic!("expected three services: {state:?}");
        };
        assert_eq!(dns6.frontend.addr, v6("fd00:73::10"));
        assert_eq!(dns6.frontend.proto, Proto::Udp);
        assert_eq!(dns6.frontend.port, 53);
        assert_eq!(
            dns6.backends,
            [
                BackendSpec {
                    addr: v6("fd00:72:1::2"),
                    port: 5353,
                    weight: 1
                },
                BackendSpec {
                    addr: v6("fd00:72:2::2"),
                    port: 5353,
                    weight: 0
                },
                BackendSpec {
                    addr: v6("fd00:72:3::2"),
                    port: 5353,
                    weight: 1
                },
            ]
        );
        assert_eq!(dns6_tcp.frontend.proto, Proto::Tcp);
        assert!(dns6_tcp.backends.is_empty());
        assert_eq!(dns4.frontend.addr, v4("10.73.0.10"));
        assert!(dns4.backends.is_empty());
    }

    #[test]
    fn backends_as_array_of_tables() {
        let state = ok(r#"
[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"

[[service.backends]]
addr = "10.72.1.2:8080"
weight = 65535
"#);
        assert_eq!(state.services[0].backends[0].weight, MAX_WEIGHT);

        // Errors inside such a table point at the offending key, not the header.
        err(
            r#"
[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"

[[service.backends]]
addr = "10.72.1.2:8080"
weight = 65536
"#,
            8,
            "weight 65536 is out of range",
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        let state = ok(r#"
[[service]]
name = "web"
frontend = "[::ffff:10.73.0.10]:80/tcp"
backends = ["10.72.1.2:8080"]
"#);
        assert_eq!(state.services[0].frontend.addr, v4("10.73.0.10"));

        err(
            r#"
[[service]]
name = "a"
frontend = "10.73.0.10:80/tcp"
[[service]]
name = "b"
frontend = "[::ffff:10.73.0.10]:80/tcp"
"#,
            7,
            r#"already used by service "a" (line 4)"#,
        );
    }

    #[test]
    fn source_names_the_path() {
        let state = parse(
            Path::new("/srv/lb/other.toml"),
            "[[service]]\nname = \"x\"\nfrontend = \"10.0.0.1:1/tcp\"\n",
        )
        .unwrap();
        assert_eq!(state.services[0].source, "config:/srv/lb/other.toml");
    }

    #[test]
    fn syntax_error_reports_line() {
        let e = err(
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\n",
            3,
            "string",
        );
        // Only the message: the file:line prefix already locates it.
        assert!(!e.reason().contains('\n'), "{:?}", e.reason());
        err("[[service]]\nname = \"web\"\n\nfrontend = = 1\n", 4, "");
    }

    #[test]
    fn unknown_keys() {
        err(
            "\n[[services]]\nname = \"web\"\n",
            2,
            "unknown field `services`",
        );
        err(
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\nport = 80\n",
            4,
            "unknown field `port`",
        );
        err(
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\n\nbackends = [\n  \"10.72.1.2:80\",\n  { addr = \"10.72.1.3:80\", wieght = 2 },\n]\n",
            7,
            "unknown field `wieght`",
        );
    }

    #[test]
    fn wrong_types() {
        err("[[service]]\nname = 7\n", 2, "expected a string");
        err(
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\nbackends = [42]\n",
            4,
            "ip:port",
        );
        err(
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\nbackends = [{ weight = 2 }]\n",
            4,
            "missing field `addr`",
        );
        err("\n\n[service]\nname = \"web\"\n", 3, "expected a sequence");
    }

    #[test]
    fn missing_name_or_frontend() {
        err(
            "\n[[service]]\nfrontend = \"10.73.0.10:80/tcp\"\n",
            2,
            "missing field `name`",
        );
        err(
            "[[service]]\nname = \"a\"\nfrontend = \"10.73.0.10:80/tcp\"\n\n[[service]]\nname = \"b\"\n",
            5,
            "missing field `frontend`",
        );
    }

    #[test]
    fn empty_name() {
        err(
            "[[service]]\n\nname = \"\"\nfrontend = \"10.73.0.10:80/tcp\"\n",
            3,
            "service name is empty",
        );
        err(
            "[[service]]\nname = \"  \"\nfrontend = \"10.73.0.10:80/tcp\"\n",
            2,
            "service name is empty",
        );
    }

    #[test]
    fn duplicate_service_name() {
        err(
            r#"[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"

[[service]]
name = "web"
frontend = "10.73.0.10:443/tcp"
"#,
            6,
            r#"duplicate service name "web" (first defined on line 2)"#,
        );
    }

    #[test]
    fn duplicate_frontend() {
        let text = r#"[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"

[[service]]
name = "web2"
frontend = "10.73.0.10:80/tcp"
"#;
        let e = err(
            text,
            7,
            "frontend 10.73.0.10:80/tcp is already used by service \"web\" (line 3)",
        );
        assert_eq!(
            e.to_string(),
            "/etc/lbd.toml:7: frontend 10.73.0.10:80/tcp is already used by service \"web\" (line 3)"
        );
        // Same address and port with another protocol is a different frontend.
        ok(&text.replace("80/tcp\"\n\n", "80/udp\"\n\n"));
        ok(&text.replace(":80/tcp\"\n\n", ":81/tcp\"\n\n"));
        err(
            "[[service]]\nname = \"a\"\nfrontend = \"[fd00:73::10]:80/tcp\"\n[[service]]\nname = \"b\"\nfrontend = \"[fd00:73:0::10]:80/tcp\"\n",
            6,
            "already used",
        );
    }

    #[test]
    fn bad_frontend() {
        let svc = |fe: &str| format!("[[service]]\nname = \"web\"\n\nfrontend = \"{fe}\"\n");
        let e = err(
            &svc("10.73.0.10:80"),
            4,
            "missing protocol suffix (/tcp or /udp)",
        );
        assert_eq!(
            e.to_string(),
            "/etc/lbd.toml:4: frontend \"10.73.0.10:80\": missing protocol suffix (/tcp or /udp)"
        );
        err(&svc("10.73.0.10:80/sctp"), 4, "unknown protocol \"sctp\"");
        err(&svc("10.73.0.10:80/"), 4, "unknown protocol \"\"");
        err(&svc("10.73.0.10:0/tcp"), 4, "port 0 is not allowed");
        err(&svc("10.73.0.10/tcp"), 4, "missing port");
        err(&svc("10.73.0.10:99999/tcp"), 4, "invalid port \"99999\"");
        err(&svc("10.73.0.10:http/tcp"), 4, "invalid port \"http\"");
        err(&svc("10.73.0.300:80/tcp"), 4, "invalid address");
        err(&svc("web.example:80/tcp"), 4, "invalid address");
        err(&svc("fd00:73::10:80/tcp"), 4, "without brackets");
        err(&svc("[fd00:73::10]/tcp"), 4, "missing port");
        err(&svc("[fd00:73::10]:0/udp"), 4, "port 0");
        err(&svc("0.0.0.0:80/tcp"), 4, "unspecified");
        err(&svc("[::]:80/tcp"), 4, "unspecified");
        err(&svc("239.1.1.1:80/udp"), 4, "multicast");
    }

    #[test]
    fn bad_backend_address() {
        let svc = |b: &str| {
            format!("[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\nbackends = [\n  \"10.72.1.2:80\",\n  {b},\n]\n")
        };
        err(
            &svc("\"10.72.1.3\""),
            6,
            "backend \"10.72.1.3\": missing port",
        );
        err(&svc("\"10.72.1.3:0\""), 6, "port 0 is not allowed");
        err(&svc("\"10.72.1.3:80/tcp\""), 6, "invalid port");
        err(&svc("\"backend-3:80\""), 6, "invalid address");
        err(&svc("{ addr = \"10.72.1.3:0\", weight = 1 }"), 6, "port 0");
        err(
            &svc("{ addr = \"10.72.1\", weight = 1 }"),
            6,
            "invalid address",
        );
    }

    #[test]
    fn backend_family_must_match_frontend() {
        let e = err(
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\nbackends = [\n  \"10.72.1.2:80\",\n  \"[fd00:72::2]:80\",\n]\n",
            6,
            "IPv6 backend behind IPv4 frontend 10.73.0.10:80/tcp is not supported",
        );
        assert!(e.reason().starts_with("backend \"[fd00:72::2]:80\""));
        err(
            "[[service]]\nname = \"web6\"\nfrontend = \"[fd00:73::10]:80/tcp\"\nbackends = [{ addr = \"10.72.1.2:80\", weight = 3 }]\n",
            4,
            "IPv4 backend behind IPv6 frontend [fd00:73::10]:80/tcp is not supported",
        );
    }

    #[test]
    fn duplicate_backend() {
        err(
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\nbackends = [\n  \"10.72.1.2:80\",\n  \"10.72.1.3:80\",\n  { addr = \"10.72.1.2:80\", weight = 5 },\n]\n",
            7,
            "backend 10.72.1.2:80 is listed twice in service \"web\" (first on line 5)",
        );
        err(
            "[[service]]\nname = \"web6\"\nfrontend = \"[fd00:73::10]:80/tcp\"\nbackends = [\"[fd00:72::2]:80\", \"[fd00:72:0::2]:80\"]\n",
            4,
            "listed twice",
        );
        // The same backend in two services is fine; so is another port.
        ok("[[service]]\nname = \"a\"\nfrontend = \"10.73.0.10:80/tcp\"\nbackends = [\"10.72.1.2:80\", \"10.72.1.2:81\"]\n[[service]]\nname = \"b\"\nfrontend = \"10.73.0.11:80/tcp\"\nbackends = [\"10.72.1.2:80\"]\n");
    }

    #[test]
    fn weight_limits() {
        let svc = |w: &str| {
            format!("[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\nbackends = [\n  {{ addr = \"10.72.1.2:80\", weight = {w} }},\n]\n")
        };
        assert_eq!(ok(&svc("0")).services[0].backends[0].weight, 0);
        assert_eq!(ok(&svc("65535")).services[0].backends[0].weight, 65535);
        let e = err(
            &svc("65536"),
            5,
            "weight 65536 is out of range (0 to 65535)",
        );
        assert!(e.reason().starts_with("backend \"10.72.1.2:80\""));
        err(&svc("-1"), 5, "weight -1 is out of range");
        err(&svc("1.5"), 5, "expected i64");
        err(&svc("\"2\""), 5, "expected i64");
    }

    #[test]
    fn load_reads_file_and_reports_io_errors() {
        let dir = std::env::temp_dir().join(format!("lbd-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lbd.toml");
        std::fs::write(
            &file,
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80/tcp\"\n",
        )
        .unwrap();
        let state = load(&file).unwrap();
        assert_eq!(
            state.services[0].source,
            format!("config:{}", file.display())
        );

        std::fs::write(
            &file,
            "[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80\"\n",
        )
        .unwrap();
        let e = load(&file).unwrap_err();
        assert_eq!(e.path(), file);
        assert_eq!(e.line(), Some(3));

        let missing = dir.join("absent.toml");
        let e = load(&missing).unwrap_err();
        assert_eq!(e.line(), None);
        assert_eq!(e.path(), missing);
        assert!(e
            .to_string()
            .starts_with(&format!("{}: cannot read: ", missing.display())));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn maglev_table_sizes_are_primes_within_bounds() {
        let svc = |extra: &str| {
            format!("[[service]]\nname = \"a\"\nfrontend = \"10.0.0.1:80/tcp\"\n{extra}")
        };
        let text = format!(
            "[maglev]\ntable_size = 65537\n{}",
            svc("maglev_table_size = 251\n")
        );
        let ok = parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(ok.table_size, Some(65537));
        assert_eq!(ok.services[0].table_size, Some(251));
        let cases = [
            (
                "[maglev]\ntable_size = 4096\n".to_string(),
                2,
                "maglev.table_size: 4096 is not a prime",
            ),
            (
                "[maglev]\ntable_size = 65539\n".to_string(),
                2,
                "maglev.table_size: 65539 is out of range (31 to 65537, a prime)",
            ),
            (
                svc("maglev_table_size = -7\n"),
                4,
                "maglev_table_size: -7 is out of range",
            ),
            (
                svc("maglev_table_size = 1001\n"),
                4,
                "maglev_table_size: 1001 is not a prime",
            ),
            (
                svc("maglev_table_size = 8191\n"),
                4,
                "maglev_table_size 8191 is larger than the global maglev.table_size (4093)",
            ),
        ];
        for (body, line, reason) in cases {
            let e = parse(Path::new("/etc/lbd.toml"), &body).unwrap_err();
            assert_eq!(e.line(), Some(line), "{body}: {e}");
            assert!(e.reason().starts_with(reason), "{body}: {e}");
            assert!(e
                .to_string()
                .starts_with(&format!("/etc/lbd.toml:{line}: ")));
        }
    }

    #[test]
    fn snat_address_for_full_nat() {
        let text =
            "[[service]]\nname = \"a\"\nfrontend = \"10.0.0.1:80/tcp\"\nsnat = \"10.9.0.1\"\n";
        let state = parse(Path::new("t.toml"), text).unwrap();
        assert_eq!(state.services[0].snat, Some("10.9.0.1".parse().unwrap()));
        let bad = "[[service]]\nname = \"a\"\nfrontend = \"10.0.0.1:80/tcp\"\nsnat = \"fd00::1\"\n";
        let err = parse(Path::new("t.toml"), bad).unwrap_err();
        assert_eq!(err.line(), Some(4));
        assert!(err.reason().contains("family"), "{err}");
    }

    #[test]
    fn health_checks_and_their_errors() {
        let base = "[[service]]\nname = \"a\"\nfrontend = \"10.0.0.1:80/tcp\"\n[service.health]\n";
        let state = parse(
            Path::new("t.toml"),
            &format!("{base}check = \"http\"\npath = \"/healthz\"\n"),
        )
        .unwrap();
        let h = state.services[0].health.clone().unwrap();
        assert_eq!(
            h.kind,
            CheckKind::Http {
                path: "/healthz".into(),
                status_min: 200,
                status_max: 399
            }
        );
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.rise, h.fall, h.on_down),
            (2000, 1000, 2, 3, OnDown::Keep)
        );
        let cases = [
            ("check = \"icmp\"\n", 5, "expected \"tcp\" or \"http\""),
            ("check = \"http\"\nstatus = \"600\"\n", 6, "status"),
            ("check = \"tcp\"\npath = \"/x\"\n", 6, "http checks only"),
            ("check = \"tcp\"\nfall = 0\n", 6, "out of range"),
            ("check = \"tcp\"\non_down = \"later\"\n", 6, "keep"),
            ("check = \"tcp\"\nretries = 3\n", 6, "unknown field"),
        ];
        for (body, line, reason) in cases {
            let err = parse(Path::new("t.toml"), &format!("{base}{body}")).unwrap_err();
            assert_eq!(err.line(), Some(line), "{body}: {err}");
            assert!(err.reason().contains(reason), "{body}: {err}");
        }
    }

    #[test]
    fn conntrack_settings_and_their_errors() {
        assert_eq!(ok("").conntrack, ConntrackSettings::default());
        let text = "[conntrack]\nsyn_timeout_secs = 5\ntcp_timeout_secs = 86400\n\
                    closing_timeout_secs = 7\nudp_timeout_secs = 30\nsnat_ports = \"40000-40999\"\n";
        let ct = ok(text).conntrack;
        assert_eq!(
            ct,
            ConntrackSettings {
                syn_timeout_secs: 5,
                tcp_timeout_secs: 86400,
                closing_timeout_secs: 7,
                udp_timeout_secs: 30,
                snat_ports: Some((40000, 40999)),
            }
        );
        let cases = [
            ("tcp_timeout_secs = 0\n", 2, "out of range"),
            ("udp_timeout_secs = 9999999\n", 2, "out of range"),
            ("snat_ports = \"2000\"\n", 2, "first-last"),
            ("snat_ports = \"3000-2000\"\n", 2, "first-last"),
            ("snat_ports = \"0-10\"\n", 2, "first-last"),
            ("fin_timeout = 3\n", 2, "unknown field"),
        ];
        for (body, line, reason) in cases {
            let err = parse(Path::new("t.toml"), &format!("[conntrack]\n{body}")).unwrap_err();
            assert_eq!(err.line(), Some(line), "{body}: {err}");
            assert!(err.reason().contains(reason), "{body}: {err}");
        }
    }

    #[test]
    fn label_frontend_ranges_and_their_errors() {
        assert_eq!(ok("").labels, LabelPolicy::default());
        let labels =
            ok("[labels]\nfrontend_ranges = [\"10.73.0.0/24\", \"fd00:73::/64\"]\n").labels;
        assert_eq!(
            labels.frontend_ranges,
            [
                "10.73.0.0/24".parse::<ipnet::IpNet>().unwrap(),
                "fd00:73::/64".parse().unwrap()
            ]
        );
        assert!(!labels.allow_node_addresses);
        assert!(
            ok("[labels]\nfrontend_ranges = [\"10.0.0.0/8\"]\nallow_node_addresses = true\n")
                .labels
                .allow_node_addresses
        );
        let cases = [
            (
                "frontend_ranges = [\"10.73.0.0\"]\n",
                2,
                "not an address range",
            ),
            (
                "frontend_ranges = [\"10.73.0.0/33\"]\n",
                2,
                "not an address range",
            ),
            (
                "frontend_ranges = [\"10.73.0.1/24\"]\n",
                2,
                "did you mean 10.73.0.0/24",
            ),
            (
                "\nfrontend_ranges = [\n  \"10.0.0.0/8\",\n  \"web\",\n]\n",
                5,
                "\"web\"",
            ),
            ("ranges = [\"10.0.0.0/8\"]\n", 2, "unknown field"),
            ("allow_node_addresses = \"yes\"\n", 2, "bool"),
        ];
        for (body, line, reason) in cases {
            let err = parse(Path::new("t.toml"), &format!("[labels]\n{body}")).unwrap_err();
            assert_eq!(err.line(), Some(line), "{body}: {err}");
            assert!(err.reason().contains(reason), "{body}: {err}");
        }
    }

    #[test]
    fn etcd_backends_name_a_prefix_instead_of_backends() {
        let cfg = ok(r#"
[[service]]
name = "app"
frontend = "10.73.0.20:80/tcp"
etcd_backends = "/app/servers"
"#);
        assert_eq!(cfg.etcd_backends["app"], "/app/servers");
        assert!(cfg.services[0].backends.is_empty());
        let e = parse(
            Path::new("t.toml"),
            r#"
[[service]]
name = "app"
frontend = "10.73.0.20:80/tcp"
backends = ["10.0.0.1:80"]
etcd_backends = "/app/servers"
"#,
        )
        .unwrap_err();
        assert_eq!(e.line(), Some(6));
        assert!(e.reason().contains("not both"), "{}", e.reason());
        let e = parse(
            Path::new("t.toml"),
            "[[service]]\nname = \"a\"\nfrontend = \"10.73.0.20:80/tcp\"\netcd_backends = \"app\"\n",
        )
        .unwrap_err();
        assert_eq!(e.line(), Some(4));
        assert!(e.reason().contains("key prefix"), "{}", e.reason());
    }
}
