#![no_std]
// The programs are the `bench-ebpf` binary (src/main.rs). This library target
// exists so that lb-bench can name this crate as a build dependency and be
// rebuilt when it changes.

/// Index of the packet counter in `SINK_COUNT`; the byte counter follows it.
pub const SINK_PACKETS: u32 = 0;
pub const SINK_BYTES: u32 = 1;
