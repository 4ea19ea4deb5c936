//! lbd's building blocks: sources of desired state (config), the reconciler
//! that writes the datapath's maps, and the daemon that ties them together;
//! and lbrouter's (router/), which shares only the sources of desired state.

pub mod census;
pub mod cgroup;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod datapath_log;
pub mod drains;
pub mod failures;
#[cfg(test)]
pub mod fake_maps;
pub mod health;
pub mod instance;
pub mod interfaces;
pub mod layout;
pub mod logging;
pub mod maglev;
pub mod map_batch;
pub mod mapset;
pub mod model;
pub mod notify;
pub mod overrides;
pub mod pins;
pub mod prefilter;
pub mod reconciler;
pub mod reload;
pub mod router;
pub mod sources;
pub mod status;
pub mod supervisor;
pub mod swarm_status;
pub mod version;
pub mod vips;
pub mod web;
