#![no_std]
// The datapath is the `lb-ebpf` binary (src/main.rs). This library target
// exists so that lb-userspace can name this crate as a build dependency and
// be rebuilt when it changes.
