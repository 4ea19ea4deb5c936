//! What lbctl and lbd's other clients need, without the datapath: the
//! control protocol, the status report, how services and backends are named
//! on the command line, and the command-line definitions (for man pages and
//! completions). Building this crate needs no eBPF toolchain.

pub mod cli;
pub mod connections;
pub mod control;
pub mod select;
pub mod status;
