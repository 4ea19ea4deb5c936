//! Programs that exist only to measure the load balancer against the
//! machine's own limits: a sink that counts and drops what reaches it (in
//! XDP, and in TC for what is handed to it as an skb), and the barest
//! forwarder XDP allows (rewrite the MACs, redirect).
//!
//! Built for the BPF target by lb-bench's build script; a host build only
//! checks that it compiles.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map, xdp},
    maps::{Array, DevMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;

/// [packets, bytes] of UDP over IPv4 dropped by `bench_sink` and
/// `bench_sink_tc`, per CPU.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Slot 0: the interface `bench_fwd` sends everything to.
#[map]
static FWD_PORT: DevMap = DevMap::with_max_entries(1, 0);

/// Slot 0: the 12 bytes of destination + source MAC `bench_fwd` writes, so
/// the frame is addressed as a router would address it.
#[map]
static FWD_MACS: Array<[u8; 12]> = Array::with_max_entries(1, 0);

/// Counts and drops UDP over IPv4. Everything else passes, so that ARP keeps
/// resolving the sink's address for whoever forwards to it.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN + 20 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: both reads are inside [data, end), checked above.
    let (ethertype, proto) = unsafe {
        (
            u16::from_be(*((data + 12) as *const u16)),
            *((data + ETH_HLEN + 9) as *const u8),
        )
    };
    if ethertype != ETH_P_IP || proto != IPPROTO_UDP {
        return xdp_action::XDP_PASS;
    }
    add(bench_ebpf::SINK_PACKETS, 1);
    add(bench_ebpf::SINK_BYTES, (end - data) as u64);
    xdp_action::XDP_DROP
}

/// `bench_sink` for packets that reach the sink's interface as an skb
/// without passing its XDP hook: those a load balancer hands straight to
/// the interface's ingress (`bpf_redirect_peer`).
#[classifier]
pub fn bench_sink_tc(ctx: TcContext) -> i32 {
    let (Ok(ethertype), Ok(proto)) = (ctx.load::<u16>(12), ctx.load::<u8>(ETH_HLEN + 9)) else {
        return TC_ACT_OK;
    };
    if u16::from_be(ethertype) != ETH_P_IP || proto != IPPROTO_UDP {
        return TC_ACT_OK;
    }
    add(bench_ebpf::SINK_PACKETS, 1);
    add(bench_ebpf::SINK_BYTES, ctx.len() as u64);
    TC_ACT_SHOT
}

#[inline(always)]
fn add(index: u32, n: u64) {
    if let Some(c) = SINK_COUNT.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, so no other program writes it concurrently.
        unsafe { *c += n };
    }
}

/// Forwards every IPv4 frame to the interface in `FWD_PORT`, with the MACs
/// from `FWD_MACS`. No lookup, no TTL, no checksum: the cheapest forwarding
/// there is, which makes it the ceiling the load balancer is compared with.
#[xdp]
pub fn bench_fwd(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data + ETH_HLEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet header is inside the packet, checked above.
    let ethertype = unsafe { u16::from_be(*((data + 12) as *const u16)) };
    if ethertype != ETH_P_IP {
        return xdp_action::XDP_PASS;
    }
    let Some(macs) = FWD_MACS.get(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: 12 bytes at the start of a packet of at least ETH_HLEN bytes.
    unsafe { *(data as *mut [u8; 12]) = *macs };
    FWD_PORT.redirect(0, 0).unwrap_or(xdp_action::XDP_ABORTED)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
