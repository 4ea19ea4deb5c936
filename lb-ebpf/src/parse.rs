//! Header parsing. Everything is read with bpf_skb_load_bytes, which works
//! for non-linear skbs too and fails cleanly on a truncated packet.

use aya_ebpf::programs::TcContext;
use lb_common::{PROTO_TCP, PROTO_UDP};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up; real traffic carries one or two.
const MAX_EXT_HEADERS: usize = 6;

/// What the datapath needs to know about a packet it may translate.
pub struct Packet {
    pub l3_off: usize,
    pub l4_off: usize,
    pub v6: bool,
    /// An in-band 802.1Q tag: translate, but let the stack forward it.
    pub vlan: bool,
    pub proto: u8,
    /// Both addresses in the 16-byte (IPv4-mapped for v4) form.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order, as on the wire.
    pub sport: u16,
    pub dport: u16,
    /// IPv4 total length or IPv6 payload length + 40, for the FIB's MTU check.
    pub tot_len: u16,
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

impl Packet {
    pub const fn zeroed() -> Packet {
        Packet {
            l3_off: 0,
            l4_off: 0,
            v6: false,
            vlan: false,
            proto: 0,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            tot_len: 0,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Parsed {
    /// TCP or UDP over IPv4/IPv6, not a fragment: the Packet is filled in.
    Candidate,
    /// Not something we translate (ARP, ICMP, other protocols...).
    Other,
    /// An IP fragment: a non-first fragment carries no ports, so no fragment
    /// is ever translated.
    Fragment,
    /// Truncated or inconsistent headers.
    Malformed,
}

#[inline(always)]
fn be16(ctx: &TcContext, off: usize) -> Result<u16, ()> {
    ctx.load::<u16>(off).map(u16::from_be).map_err(|_| ())
}

// A separate BPF function: its stack frame is not live while the
// caller's large locals are, which keeps the program within 512 bytes.
#[inline(never)]
pub fn parse(ctx: &TcContext, p: &mut Packet) -> Parsed {
    // The packet is filled in through a pointer rather than returned: a
    // large enum returned from a BPF subprogram lets LLVM store registers
    // that are undefined on some paths, which the verifier rejects.
    match try_parse(ctx, p) {
        Ok(p) => p,
        Err(()) => Parsed::Malformed,
    }
}

#[inline(always)]
fn try_parse(ctx: &TcContext, p: &mut Packet) -> Result<Parsed, ()> {
    let mut ethertype = be16(ctx, 12)?;
    let mut l3_off = ETH_HLEN;
    let mut vlan = false;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(ctx, 16)?;
        l3_off += 4;
        vlan = true;
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, p, l3_off, vlan),
        ETH_P_IPV6 => parse_v6(ctx, p, l3_off, vlan),
        _ => Ok(Parsed::Other),
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, p: &mut Packet, l3_off: usize, vlan: bool) -> Result<Parsed, ()> {
    let hdr: [u8; 20] = ctx.load(l3_off).map_err(|_| ())?;
    if hdr[0] >> 4 != 4 {
        return Err(());
    }
    let ihl = (hdr[0] & 0x0f) as usize * 4;
    if ihl < 20 {
        return Err(());
    }
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    // Shorter than its own header, or longer than what arrived.
    if (tot_len as usize) < ihl || l3_off + tot_len as usize > ctx.len() as usize {
        return Err(());
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    // MF set or a non-zero offset.
    if frag & 0x3fff != 0 {
        return Ok(Parsed::Fragment);
    }
    let proto = hdr[9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(Parsed::Other);
    }
    p.src = lb_common::v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    p.dst = lb_common::v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    p.l3_off = l3_off;
    p.l4_off = l3_off + ihl;
    p.v6 = false;
    p.vlan = vlan;
    p.proto = proto;
    p.tot_len = tot_len;
    finish(ctx, p, l3_off + tot_len as usize)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, p: &mut Packet, l3_off: usize, vlan: bool) -> Result<Parsed, ()> {
    let hdr: [u8; 40] = ctx.load(l3_off).map_err(|_| ())?;
    if hdr[0] >> 4 != 6 {
        return Err(());
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]);
    if l3_off + 40 + payload_len as usize > ctx.len() as usize {
        return Err(());
    }
    let mut next = hdr[6];
    let mut off = l3_off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: [u8; 2] = ctx.load(off).map_err(|_| ())?;
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let ext: [u8; 2] = ctx.load(off).map_err(|_| ())?;
                next = ext[0];
                off += (ext[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => return Ok(Parsed::Fragment),
            _ => break,
        }
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        return Ok(Parsed::Other);
    }
    p.src.copy_from_slice(&hdr[8..24]);
    p.dst.copy_from_slice(&hdr[24..40]);
    p.l3_off = l3_off;
    p.l4_off = off;
    p.v6 = true;
    p.vlan = vlan;
    p.proto = next;
    p.tot_len = payload_len.saturating_add(40);
    finish(ctx, p, l3_off + 40 + payload_len as usize)
}

#[inline(always)]
fn finish(ctx: &TcContext, p: &mut Packet, ip_end: usize) -> Result<Parsed, ()> {
    // The whole fixed L4 header must be present, not just the ports: the
    // checksum we rewrite lies past them.
    let l4_len = if p.proto == PROTO_TCP { 20 } else { 8 };
    if p.l4_off + l4_len > ip_end {
        return Err(());
    }
    let ports: [u16; 2] = ctx.load(p.l4_off).map_err(|_| ())?;
    p.sport = ports[0];
    p.dport = ports[1];
    Ok(Parsed::Candidate)
}
