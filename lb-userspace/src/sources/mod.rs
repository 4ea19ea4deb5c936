//! Sources of desired state. Each produces services; none touches a map.
//! `merge` combines them, deciding who owns a contested frontend.

pub mod backoff;
pub mod docker;
pub mod engine;
pub mod etcd;
pub mod etcd_layout;
pub mod label_frontends;
pub mod labels;
pub mod local_tasks;
pub mod merge;
pub mod netns_dir;
pub mod registrator;
pub mod service_vips;
pub mod swarm;
