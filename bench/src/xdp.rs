//! The benchmark-only programs (bench-ebpf): a sink that counts and drops,
//! and a bare XDP redirect forwarder.

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Array, DevMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::Ebpf;
use lb_tests::netns::Netns;

/// The object built by build.rs from the bench-ebpf crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-ebpf"));

/// `bench_sink` attached to one interface, with `bench_sink_tc` at its TC
/// ingress for what arrives there without passing XDP; detached on drop.
pub struct Sink {
    /// Holds the program and its attachment.
    _ebpf: Ebpf,
    count: PerCpuArray<MapData, u64>,
}

/// The interface index of `dev` as seen inside `ns`.
pub fn ifindex(ns: &Netns, dev: &str) -> Result<u32> {
    let dev = std::ffi::CString::new(dev)?;
    // SAFETY: a valid NUL-terminated string.
    let index = ns.run(|| unsafe { libc::if_nametoindex(dev.as_ptr()) });
    if index == 0 {
        return Err(anyhow!("no interface {dev:?} in {}", ns.name()));
    }
    Ok(index)
}

/// Loads the object and attaches program `name` to `dev` in `ns` in native
/// (driver) mode: veth runs XDP in its NAPI poll, as a NIC driver would.
fn attach(ns: &Netns, dev: &str, name: &str) -> Result<Ebpf> {
    let mut ebpf = Ebpf::load(OBJECT).context("loading bench-ebpf")?;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("{name} missing from bench-ebpf"))?
        .try_into()?;
    prog.load()?;
    // The kernel resolves the interface in the caller's namespace.
    ns.run(|| prog.attach(dev, XdpMode::Driver))
        .with_context(|| format!("attaching {name} to {dev} in {}", ns.name()))?;
    Ok(ebpf)
}

impl Sink {
    pub fn attach(ns: &Netns, dev: &str) -> Result<Sink> {
        let mut ebpf = attach(ns, dev, "bench_sink")?;
        ns.run(|| {
            // The device is fresh and has no clsact qdisc yet.
            aya::programs::tc::qdisc_add_clsact(dev)?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut("bench_sink_tc")
                .ok_or_else(|| anyhow!("bench_sink_tc missing from bench-ebpf"))?
                .try_into()?;
            prog.load()?;
            prog.attach(dev, TcAttachType::Ingress)?;
            anyhow::Ok(())
        })
        .with_context(|| format!("attaching bench_sink_tc to {dev} in {}", ns.name()))?;
        let count = PerCpuArray::try_from(
            ebpf.take_map("SINK_COUNT")
                .ok_or_else(|| anyhow!("SINK_COUNT missing"))?,
        )?;
        Ok(Sink { _ebpf: ebpf, count })
    }

    /// UDP packets dropped so far, over all CPUs.
    pub fn packets(&self) -> Result<u64> {
        let values = self.count.get(&bench_ebpf::SINK_PACKETS, 0)?;
        Ok(values.iter().sum())
    }
}

/// `bench_fwd` attached to `input`, sending everything out of `output` with
/// the given MACs; detached on drop.
pub struct Forwarder {
    _ebpf: Ebpf,
}

impl Forwarder {
    pub fn attach(
        ns: &Netns,
        input: &str,
        output: &str,
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
    ) -> Result<Forwarder> {
        let out_index = ifindex(ns, output)?;
        let mut ebpf = attach(ns, input, "bench_fwd")?;
        let mut port = DevMap::try_from(
            ebpf.map_mut("FWD_PORT")
                .ok_or_else(|| anyhow!("FWD_PORT missing"))?,
        )?;
        // The kernel resolves the index in the writer's namespace.
        ns.run(|| port.set(0, out_index, None, 0))?;
        let mut macs: Array<_, [u8; 12]> = Array::try_from(
            ebpf.map_mut("FWD_MACS")
                .ok_or_else(|| anyhow!("FWD_MACS missing"))?,
        )?;
        let mut both = [0u8; 12];
        both[..6].copy_from_slice(&dst_mac);
        both[6..].copy_from_slice(&src_mac);
        macs.set(0, both, 0)?;
        Ok(Forwarder { _ebpf: ebpf })
    }
}
