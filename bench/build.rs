use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Builds bench-ebpf for the BPF target and puts the object in OUT_DIR, where
/// `xdp.rs` embeds it.
fn main() -> anyhow::Result<()> {
    let ebpf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("bench-ebpf");
    let root_dir = ebpf.to_str().context("non-UTF-8 path")?;
    let package = Package {
        name: "bench-ebpf",
        root_dir,
        ..Default::default()
    };
    // The same toolchain switch as lb-userspace's build script, so one
    // setup serves both.
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain))
}
