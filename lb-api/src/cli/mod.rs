//! The command lines of lbctl (and, for man pages and completions, lbd),
//! defined here so that they can be read without building the datapath.

pub mod lbctl;
pub mod lbd;
pub mod lbrouter;
