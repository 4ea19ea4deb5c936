//! Header parsing and validation (docs/datapath.md, section 1). Everything
//! is read with `pkt::read`: directly from the linear buffer, or with
//! bpf_skb_load_bytes for bytes beyond it, which fails cleanly on a
//! truncated packet.

use lb_common::{PROTO_TCP, PROTO_UDP};

use crate::pkt::{read, set_v4_mapped, Frame};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up; real traffic carries one or two.
const MAX_EXT_HEADERS: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the datapath needs to know about a packet it may translate. For an
/// ICMP error, `src`/`dst`/`proto` are the outer header's and `inner`
/// describes the quoted packet.
#[repr(C)]
pub struct Packet {
    pub l3_off: u32,
    pub l4_off: u32,
    /// End of the IP packet (trailing padding excluded).
    pub ip_end: u32,
    pub v6: u8,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// IPv4 "don't fragment" (always set for IPv6, which routers never fragment).
    pub df: u8,
    pub _pad: [u8; 3],
    /// Both addresses in the 16-byte (IPv4-mapped for v4) form.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order, as on the wire.
    pub sport: u16,
    pub dport: u16,
    pub inner: Inner,
}

/// The packet quoted by an ICMP error.
#[repr(C)]
pub struct Inner {
    pub l3_off: u32,
    pub l4_off: u32,
    /// The quoted L4 checksum lies within the packet.
    pub has_l4_csum: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

impl Packet {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn csum_off(&self) -> usize {
        self.l4_off as usize + if self.proto == PROTO_TCP { 16 } else { 6 }
    }

    #[inline(always)]
    pub fn is_v6(&self) -> bool {
        self.v6 != 0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Parsed {
    /// TCP or UDP over IPv4/IPv6, not a fragment.
    Candidate,
    /// An ICMP or ICMPv6 error quoting a TCP or UDP packet.
    IcmpError,
    /// Not something we translate (ARP, VLAN-tagged, other protocols...).
    Other,
    /// An IP fragment: a non-first fragment carries no ports, so no fragment
    /// is ever translated.
    Fragment,
    /// Truncated or inconsistent headers.
    Malformed,
}

#[inline(always)]
fn be16<C: Frame>(ctx: &C, off: usize) -> Result<u16, ()> {
    read::<u16, _>(ctx, off).map(u16::from_be)
}

// A separate BPF function: its stack frame is not live while the caller's
// locals are, which keeps the program within 512 bytes. The packet is
// filled in through a pointer: a large value returned from a BPF subprogram
// lets LLVM store registers that are undefined on some paths, which the
// verifier rejects.
#[inline(never)]
pub fn parse<C: Frame>(ctx: &C, p: &mut Packet) -> Parsed {
    match try_parse(ctx, p) {
        Ok(p) => p,
        Err(()) => Parsed::Malformed,
    }
}

#[inline(always)]
fn try_parse<C: Frame>(ctx: &C, p: &mut Packet) -> Result<Parsed, ()> {
    if ctx.vlan_offloaded() {
        return Ok(Parsed::Other);
    }
    match be16(ctx, 12)? {
        // The VLAN device above this one sees the packet untagged.
        ETH_P_8021Q | ETH_P_8021AD => Ok(Parsed::Other),
        ETH_P_IP => parse_v4(ctx, p),
        ETH_P_IPV6 => parse_v6(ctx, p),
        _ => Ok(Parsed::Other),
    }
}

#[inline(always)]
fn parse_v4<C: Frame>(ctx: &C, p: &mut Packet) -> Result<Parsed, ()> {
    let l3_off = ETH_HLEN;
    let hdr: [u8; 20] = read(ctx, l3_off)?;
    if hdr[0] >> 4 != 4 {
        return Err(());
    }
    let ihl = (hdr[0] & 0x0f) as usize * 4;
    if ihl < 20 {
        return Err(());
    }
    let tot_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if tot_len < ihl || l3_off + tot_len > ctx.len() as usize {
        return Err(());
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if frag & 0x3fff != 0 {
        return Ok(Parsed::Fragment);
    }
    p.l3_off = l3_off as u32;
    p.l4_off = (l3_off + ihl) as u32;
    p.ip_end = (l3_off + tot_len) as u32;
    p.v6 = 0;
    p.proto = hdr[9];
    p.ttl = hdr[8];
    p.df = ((frag & 0x4000) != 0) as u8;
    set_v4_mapped(&mut p.src, [hdr[12], hdr[13], hdr[14], hdr[15]]);
    set_v4_mapped(&mut p.dst, [hdr[16], hdr[17], hdr[18], hdr[19]]);
    match p.proto {
        PROTO_TCP | PROTO_UDP => transport(ctx, p),
        IPPROTO_ICMP => icmp_v4(ctx, p),
        _ => Ok(Parsed::Other),
    }
}

#[inline(always)]
fn parse_v6<C: Frame>(ctx: &C, p: &mut Packet) -> Result<Parsed, ()> {
    let l3_off = ETH_HLEN;
    let hdr: [u8; 40] = read(ctx, l3_off)?;
    if hdr[0] >> 4 != 6 {
        return Err(());
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    if l3_off + 40 + payload_len > ctx.len() as usize {
        return Err(());
    }
    p.src.copy_from_slice(&hdr[8..24]);
    p.dst.copy_from_slice(&hdr[24..40]);
    // Never on the wire (RFC 4291); above all, never an IPv4 service.
    if lb_common::is_v4_mapped(&p.src) || lb_common::is_v4_mapped(&p.dst) {
        return Err(());
    }
    let mut next = hdr[6];
    let mut off = l3_off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: [u8; 2] = read(ctx, off)?;
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let ext: [u8; 2] = read(ctx, off)?;
                next = ext[0];
                off += (ext[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => return Ok(Parsed::Fragment),
            _ => break,
        }
    }
    let ip_end = l3_off + 40 + payload_len;
    if off > ip_end {
        return Err(());
    }
    p.l3_off = l3_off as u32;
    p.l4_off = off as u32;
    p.ip_end = ip_end as u32;
    p.v6 = 1;
    p.proto = next;
    p.ttl = hdr[7];
    p.df = 1;
    match next {
        PROTO_TCP | PROTO_UDP => transport(ctx, p),
        IPPROTO_ICMPV6 => icmp_v6(ctx, p),
        _ => Ok(Parsed::Other),
    }
}

/// TCP and UDP headers must agree with the IP packet around them.
#[inline(always)]
fn transport<C: Frame>(ctx: &C, p: &mut Packet) -> Result<Parsed, ()> {
    let l4 = p.l4_off as usize;
    let end = p.ip_end as usize;
    let hdr: [u8; 14] = if p.proto == PROTO_TCP {
        if l4 + 20 > end {
            return Err(());
        }
        read(ctx, l4)?
    } else {
        if l4 + 8 > end {
            return Err(());
        }
        let udp: [u8; 8] = read(ctx, l4)?;
        let mut h = [0u8; 14];
        h[..8].copy_from_slice(&udp);
        h
    };
    if p.proto == PROTO_TCP {
        let doff = (hdr[12] >> 4) as usize * 4;
        if doff < 20 || l4 + doff > end {
            return Err(());
        }
        p.tcp_flags = hdr[13];
    } else {
        if u16::from_be_bytes([hdr[4], hdr[5]]) as usize != end - l4 {
            return Err(());
        }
        // IPv6 makes the UDP checksum mandatory (RFC 8200): 0 is invalid.
        if p.is_v6() && hdr[6] == 0 && hdr[7] == 0 {
            return Err(());
        }
        p.tcp_flags = 0;
    }
    p.sport = u16::from_ne_bytes([hdr[0], hdr[1]]);
    p.dport = u16::from_ne_bytes([hdr[2], hdr[3]]);
    Ok(Parsed::Candidate)
}

#[inline(always)]
fn icmp_v4<C: Frame>(ctx: &C, p: &mut Packet) -> Result<Parsed, ()> {
    let l4 = p.l4_off as usize;
    if l4 + 8 > p.ip_end as usize {
        return Err(());
    }
    let kind: u8 = read(ctx, l4)?;
    // Destination unreachable, time exceeded, parameter problem.
    if kind != 3 && kind != 11 && kind != 12 {
        return Ok(Parsed::Other);
    }
    clear_ports(p);
    let inner = l4 + 8;
    if inner + 20 > p.ip_end as usize {
        return Ok(Parsed::Other);
    }
    let hdr: [u8; 20] = match read(ctx, inner) {
        Ok(h) => h,
        Err(_) => return Ok(Parsed::Other),
    };
    let ihl = (hdr[0] & 0x0f) as usize * 4;
    let proto = hdr[9];
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    if hdr[0] >> 4 != 4 || ihl < 20 || frag & 0x1fff != 0 {
        return Ok(Parsed::Other);
    }
    p.inner.src = lb_common::v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    p.inner.dst = lb_common::v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    quoted_transport(ctx, p, inner, inner + ihl, proto)
}

#[inline(always)]
fn icmp_v6<C: Frame>(ctx: &C, p: &mut Packet) -> Result<Parsed, ()> {
    let l4 = p.l4_off as usize;
    if l4 + 8 > p.ip_end as usize {
        return Err(());
    }
    let kind: u8 = read(ctx, l4)?;
    // Destination unreachable, packet too big, time exceeded, parameter problem.
    if !(1..=4).contains(&kind) {
        return Ok(Parsed::Other);
    }
    clear_ports(p);
    let inner = l4 + 8;
    if inner + 40 > p.ip_end as usize {
        return Ok(Parsed::Other);
    }
    let hdr: [u8; 40] = match read(ctx, inner) {
        Ok(h) => h,
        Err(_) => return Ok(Parsed::Other),
    };
    if hdr[0] >> 4 != 6 {
        return Ok(Parsed::Other);
    }
    p.inner.src.copy_from_slice(&hdr[8..24]);
    p.inner.dst.copy_from_slice(&hdr[24..40]);
    if lb_common::is_v4_mapped(&p.inner.src) || lb_common::is_v4_mapped(&p.inner.dst) {
        return Ok(Parsed::Other);
    }
    quoted_transport(ctx, p, inner, inner + 40, hdr[6])
}

/// ICMP has no ports; the FIB lookup must not see a previous packet's.
#[inline(always)]
fn clear_ports(p: &mut Packet) {
    p.sport = 0;
    p.dport = 0;
    p.tcp_flags = 0;
}

/// The quoted packet's ports, which must lie within the ICMP message.
#[inline(always)]
fn quoted_transport<C: Frame>(
    ctx: &C,
    p: &mut Packet,
    l3: usize,
    l4: usize,
    proto: u8,
) -> Result<Parsed, ()> {
    let end = p.ip_end as usize;
    if (proto != PROTO_TCP && proto != PROTO_UDP) || l4 + 8 > end {
        return Ok(Parsed::Other);
    }
    let ports: [u16; 2] = read(ctx, l4)?;
    p.inner.l3_off = l3 as u32;
    p.inner.l4_off = l4 as u32;
    p.inner.proto = proto;
    p.inner.sport = ports[0];
    p.inner.dport = ports[1];
    p.inner.has_l4_csum = (proto == PROTO_UDP || l4 + 18 <= end) as u8;
    Ok(Parsed::IcmpError)
}
