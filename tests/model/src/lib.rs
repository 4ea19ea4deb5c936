//! A reference model of the datapath program `lb_tc_ingress`, written from
//! its contract (docs/datapath.md) and nothing else, and a seeded generator
//! of the packets that exercise it. The differential test in lb-tests runs
//! both the model and the real program on the same packets and compares
//! actions, output bytes, conntrack and counters.

pub mod checksum;
pub mod conntrack;
pub mod datapath;
pub mod fib;
pub mod forward;
pub mod gen;
pub mod hash;
pub mod icmp;
pub mod packet;
pub mod rng;
pub mod scenario;
pub mod state;

pub use datapath::step;
pub use fib::{Fib, Interface, Route, RouteKind};
pub use rng::Rng;
pub use state::{Ingress, ModelState, Outcome, Path, Table};
