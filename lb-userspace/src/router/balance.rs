//! Choosing a route's backend: power of two choices over the backends'
//! requests in flight, each choice drawn in proportion to the weights.
//!
//! Two draws by weight, then the one with fewer requests in flight per
//! unit of weight: with an idle pool this is plain weighted random, under
//! load it steers away from a slow backend without the herd effect of
//! always taking the least loaded one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use hyper::http::uri::Authority;

use super::table::{Route, RouteBackend};

/// How long a backend that refused a connection is left out.
pub const QUARANTINE: Duration = Duration::from_secs(2);

pub struct Backend {
    pub addr: SocketAddr,
    /// The backend's part of the URIs of the requests sent to it, and its
    /// name in metrics and logs (`label`).
    pub authority: Authority,
    in_flight: AtomicU64,
    /// Milliseconds since `epoch()` until which the backend is skipped.
    quarantined_until: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Backend {
    fn new(addr: SocketAddr) -> Backend {
        Backend {
            addr,
            authority: addr
                .to_string()
                .parse()
                .expect("a socket address is a URI authority"),
            in_flight: AtomicU64::new(0),
            quarantined_until: AtomicU64::new(0),
        }
    }

    /// `addr` as text: `10.0.0.1:80`, `[fd00::1]:80`.
    pub fn label(&self) -> &str {
        self.authority.as_str()
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// After a failed connect: no new requests for a while.
    pub fn quarantine(&self) {
        let until = now_ms() + QUARANTINE.as_millis() as u64;
        self.quarantined_until.store(until, Ordering::Relaxed);
    }

    /// Left out after a failed connect, for now.
    pub fn quarantined(&self) -> bool {
        !self.available(now_ms())
    }

    fn available(&self, now: u64) -> bool {
        self.quarantined_until.load(Ordering::Relaxed) <= now
    }
}

/// Counts a request against its backend until dropped (when the response
/// body is done or abandoned).
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn new(backend: Arc<Backend>) -> InFlight {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(backend)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every backend of the current tables by address, so that a reload keeps
/// their counts and quarantine.
#[derive(Default)]
pub struct Backends(HashMap<SocketAddr, Weak<Backend>>);

impl Backends {
    pub fn get(&mut self, addr: SocketAddr) -> Arc<Backend> {
        if let Some(b) = self.0.get(&addr).and_then(Weak::upgrade) {
            return b;
        }
        let b = Arc::new(Backend::new(addr));
        self.0.insert(addr, Arc::downgrade(&b));
        self.0.retain(|_, w| w.strong_count() > 0);
        b
    }
}

/// Backend `addr` of `route` if it takes requests: a client pinned to it
/// stays there at weight 0 too (see sticky.rs).
pub fn pinned(route: &Route, addr: SocketAddr) -> Option<&RouteBackend> {
    let now = now_ms();
    route
        .backends
        .iter()
        .find(|b| b.backend.addr == addr && b.backend.available(now))
}

/// A backend of `route` for a new request, other than `exclude`; `None`
/// when none can take it (all drained or quarantined).
pub fn pick(route: &Route, exclude: Option<SocketAddr>) -> Option<&RouteBackend> {
    pick_with(route, exclude, &mut || fastrand::u64(..))
}

fn pick_with<'r>(
    route: &'r Route,
    exclude: Option<SocketAddr>,
    random: &mut dyn FnMut() -> u64,
) -> Option<&'r RouteBackend> {
    let now = now_ms();
    let usable = |b: &&RouteBackend| {
        b.weight > 0 && b.backend.available(now) && Some(b.backend.addr) != exclude
    };
    let total: u64 = route
        .backends
        .iter()
        .filter(usable)
        .map(|b| u64::from(b.weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut draw = || {
        let mut point = random() % total;
        for entry in route.backends.iter().filter(usable) {
            let w = u64::from(entry.weight);
            if point < w {
                return entry;
            }
            point -= w;
        }
        unreachable!("the point is below the total weight")
    };
    let (a, b) = (draw(), draw());
    // a's load per weight <= b's, without division.
    let a_lighter = u128::from(a.backend.in_flight()) * u128::from(b.weight)
        <= u128::from(b.backend.in_flight()) * u128::from(a.weight);
    Some(if a_lighter { a } else { b })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(weights: &[u32]) -> Route {
        let mut backends = Backends::default();
        let metrics = crate::router::metrics::Metrics::default();
        Route {
            name: "r".into(),
            host: crate::router::config::HostMatch::Any,
            prefix: "/".into(),
            strip_prefix: false,
            max_body_bytes: None,
            sticky: None,
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let addr = SocketAddr::from(([10, 0, 0, i as u8 + 1], 80));
                    RouteBackend {
                        backend: backends.get(addr),
                        weight: *w,
                        metrics: metrics.backend("r", &addr.to_string()),
                    }
                })
                .collect(),
        }
    }

    fn share(r: &Route, n: usize) -> Vec<usize> {
        let mut counts = vec![0; r.backends.len()];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..n {
            let b = pick_with(r, None, &mut || rng.u64(..)).unwrap();
            counts[r.backends.iter().position(|x| std::ptr::eq(x, b)).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn idle_backends_share_by_weight() {
        let counts = share(&route(&[1, 3, 0]), 8000);
        assert_eq!(counts[2], 0, "weight 0 takes nothing");
        assert!((1700..2300).contains(&counts[0]), "{counts:?}");
        assert!((5700..6300).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn busy_backend_is_avoided() {
        let r = route(&[1, 1]);
        let _busy: Vec<InFlight> = (0..10)
            .map(|_| InFlight::new(r.backends[0].backend.clone()))
            .collect();
        let counts = share(&r, 1000);
        // Only when both draws land on the busy one (a quarter of the time).
        assert!(counts[0] < 350, "{counts:?}");
    }

    #[test]
    fn quarantined_and_excluded_backends_are_skipped() {
        let r = route(&[1, 1]);
        r.backends[0].backend.quarantine();
        for _ in 0..50 {
            assert_eq!(
                pick(&r, None).unwrap().backend.addr,
                r.backends[1].backend.addr
            );
        }
        assert!(pick(&r, Some(r.backends[1].backend.addr)).is_none());
        assert!(pick(&route(&[0, 0]), None).is_none());
    }

    #[test]
    fn pinned_backend_is_kept_while_it_takes_connections() {
        let r = route(&[1, 0]);
        let drained = r.backends[1].backend.addr;
        assert_eq!(
            pinned(&r, drained).unwrap().backend.addr,
            drained,
            "drained: kept"
        );
        r.backends[1].backend.quarantine();
        assert!(pinned(&r, drained).is_none(), "refusing: moved");
        assert!(pinned(&r, SocketAddr::from(([10, 9, 9, 9], 80))).is_none());
    }
}
