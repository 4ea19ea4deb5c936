use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Builds lb-ebpf for the BPF target and puts the object in OUT_DIR, where
/// `datapath.rs` embeds it.
fn main() -> anyhow::Result<()> {
    let ebpf = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("lb-ebpf");
    let root_dir = ebpf.to_str().context("non-UTF-8 path")?;
    let package = Package {
        name: "lb-ebpf",
        root_dir,
        ..Default::default()
    };
    // LB_EBPF_TOOLCHAIN lets a machine without a nightly build with
    // `stable` plus RUSTC_BOOTSTRAP=1.
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain))
}
