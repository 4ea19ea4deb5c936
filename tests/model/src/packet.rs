//! Section 1: what a frame is, read the way the datapath must read it.
//! Offsets are from the start of the Ethernet frame.

use lb_common::{is_v4_mapped, v4_mapped, PROTO_TCP, PROTO_UDP};

pub const ETH_LEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers the datapath skips, and the limit on them.
pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_AH: u8 = 51;
pub const EXT_DEST_OPTS: u8 = 60;
pub const MAX_EXT_HEADERS: usize = 6;

/// An IP header as parsed. Addresses are in the 16-byte form of the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ip {
    pub v6: bool,
    /// Offset of the IP header.
    pub off: usize,
    /// Bytes from the IP header to the transport header: IHL × 4, or 40
    /// plus the extension headers.
    pub hdr_len: usize,
    /// The IP packet's length by its header: IPv4 total length, IPv6 40 +
    /// payload length. Bytes past it (Ethernet padding) are not part of it.
    pub len: usize,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ttl: u8,
    /// The transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// IPv4 don't-fragment (always false for IPv6).
    pub df: bool,
}

impl Ip {
    pub fn l4_off(&self) -> usize {
        self.off + self.hdr_len
    }
    pub fn l4_len(&self) -> usize {
        self.len - self.hdr_len
    }
    pub fn end(&self) -> usize {
        self.off + self.len
    }
}

/// A TCP or UDP packet the datapath may balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    pub ip: Ip,
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP).
    pub flags: u8,
}

impl Transport {
    pub fn is_tcp(&self) -> bool {
        self.ip.proto == PROTO_TCP
    }
    pub fn has(&self, flag: u8) -> bool {
        self.is_tcp() && self.flags & flag != 0
    }
}

/// An ICMP error (section 5) with the packet it quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub ip: Ip,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// The quoted packet, if it is quoted far enough (its IP header and 8
    /// bytes of a TCP or UDP header); None for a truncated quote.
    pub quote: Option<Quote>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Offset of the quoted IP header.
    pub off: usize,
    pub hdr_len: usize,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// How many bytes of the quoted transport header are present (≥ 8).
    pub l4_avail: usize,
}

impl Quote {
    pub fn l4_off(&self) -> usize {
        self.off + self.hdr_len
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IP, or VLAN-tagged: not ours, not counted.
    NotIp,
    Malformed,
    Fragment,
    /// IP with a protocol (or ICMP message) the datapath leaves alone.
    Other,
    Transport(Transport),
    IcmpError(IcmpError),
}

fn be16(p: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([p[off], p[off + 1]])
}

pub fn ethertype(p: &[u8]) -> Option<u16> {
    (p.len() >= ETH_LEN).then(|| be16(p, 12))
}

pub fn parse(p: &[u8]) -> Parsed {
    let Some(ethertype) = ethertype(p) else {
        return Parsed::NotIp;
    };
    let ip = match ethertype {
        ETH_P_IP => parse_ipv4(p, ETH_LEN),
        ETH_P_IPV6 => parse_ipv6(p, ETH_LEN),
        _ => return Parsed::NotIp,
    };
    let ip = match ip {
        Ok(ip) => ip,
        Err(verdict) => return verdict.into(),
    };
    match ip.proto {
        PROTO_TCP | PROTO_UDP => parse_transport(p, ip),
        PROTO_ICMP if !ip.v6 => parse_icmp_error(p, ip),
        PROTO_ICMPV6 if ip.v6 => parse_icmp_error(p, ip),
        _ => Parsed::Other,
    }
}

/// Why an IP header is not usable: the two verdicts section 1 counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unusable {
    Malformed,
    Fragment,
}

impl From<Unusable> for Parsed {
    fn from(u: Unusable) -> Parsed {
        match u {
            Unusable::Malformed => Parsed::Malformed,
            Unusable::Fragment => Parsed::Fragment,
        }
    }
}

fn parse_ipv4(p: &[u8], off: usize) -> Result<Ip, Unusable> {
    if p.len() < off + 20 {
        return Err(Unusable::Malformed);
    }
    let vihl = p[off];
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(be16(p, off + 2));
    if vihl >> 4 != 4 || ihl < 20 || total < ihl || off + total > p.len() {
        return Err(Unusable::Malformed);
    }
    let frag = be16(p, off + 6);
    if frag & 0x2000 != 0 || frag & 0x1fff != 0 {
        return Err(Unusable::Fragment);
    }
    Ok(Ip {
        v6: false,
        off,
        hdr_len: ihl,
        len: total,
        src: v4_mapped(p[off + 12..off + 16].try_into().unwrap()),
        dst: v4_mapped(p[off + 16..off + 20].try_into().unwrap()),
        ttl: p[off + 8],
        proto: p[off + 9],
        df: frag & 0x4000 != 0,
    })
}

fn parse_ipv6(p: &[u8], off: usize) -> Result<Ip, Unusable> {
    if p.len() < off + 40 || p[off] >> 4 != 6 {
        return Err(Unusable::Malformed);
    }
    let len = 40 + usize::from(be16(p, off + 4));
    if off + len > p.len() {
        return Err(Unusable::Malformed);
    }
    let mut next = p[off + 6];
    let mut hdr_len = 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            EXT_FRAGMENT => return Err(Unusable::Fragment),
            EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS | EXT_AH => {
                if hdr_len + 2 > len {
                    return Err(Unusable::Malformed);
                }
                let h = off + hdr_len;
                let ext_len = if next == EXT_AH {
                    (usize::from(p[h + 1]) + 2) * 4
                } else {
                    (usize::from(p[h + 1]) + 1) * 8
                };
                if hdr_len + ext_len > len {
                    return Err(Unusable::Malformed);
                }
                next = p[h];
                hdr_len += ext_len;
            }
            _ => break,
        }
    }
    if next == EXT_FRAGMENT {
        return Err(Unusable::Fragment);
    }
    let src: [u8; 16] = p[off + 8..off + 24].try_into().unwrap();
    let dst: [u8; 16] = p[off + 24..off + 40].try_into().unwrap();
    if is_v4_mapped(&src) || is_v4_mapped(&dst) {
        return Err(Unusable::Malformed);
    }
    Ok(Ip {
        v6: true,
        off,
        hdr_len,
        len,
        src,
        dst,
        ttl: p[off + 7],
        proto: next,
        df: false,
    })
}

fn parse_transport(p: &[u8], ip: Ip) -> Parsed {
    let l4 = ip.l4_off();
    let avail = ip.l4_len();
    if ip.proto == PROTO_TCP {
        if avail < 20 {
            return Parsed::Malformed;
        }
        let doff = usize::from(p[l4 + 12] >> 4) * 4;
        if doff < 20 || doff > avail {
            return Parsed::Malformed;
        }
    } else if avail < 8 || usize::from(be16(p, l4 + 4)) != avail {
        return Parsed::Malformed;
    } else if ip.v6 && be16(p, l4 + 6) == 0 {
        // IPv6 makes the UDP checksum mandatory.
        return Parsed::Malformed;
    }
    Parsed::Transport(Transport {
        ip,
        sport: be16(p, l4),
        dport: be16(p, l4 + 2),
        flags: if ip.proto == PROTO_TCP { p[l4 + 13] } else { 0 },
    })
}

/// ICMPv4 destination unreachable, time exceeded, parameter problem;
/// ICMPv6 destination unreachable, packet too big, time exceeded,
/// parameter problem.
pub fn is_error_type(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        matches!(icmp_type, 1..=4)
    } else {
        matches!(icmp_type, 3 | 11 | 12)
    }
}

fn parse_icmp_error(p: &[u8], ip: Ip) -> Parsed {
    let icmp_off = ip.l4_off();
    if ip.l4_len() < 8 {
        // Not even an ICMP header: truncated (the spec does not say; the
        // reading the datapath implements, see the report).
        return Parsed::Malformed;
    }
    if !is_error_type(ip.v6, p[icmp_off]) {
        return Parsed::Other;
    }
    Parsed::IcmpError(IcmpError {
        ip,
        icmp_off,
        quote: parse_quote(p, &ip, icmp_off + 8),
    })
}

fn parse_quote(p: &[u8], outer: &Ip, off: usize) -> Option<Quote> {
    let end = outer.end();
    let (hdr_len, src, dst, proto) = if outer.v6 {
        if off + 40 > end || p[off] >> 4 != 6 {
            return None;
        }
        let src: [u8; 16] = p[off + 8..off + 24].try_into().unwrap();
        let dst: [u8; 16] = p[off + 24..off + 40].try_into().unwrap();
        (40, src, dst, p[off + 6])
    } else {
        if off + 20 > end || p[off] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(p[off] & 0x0f) * 4;
        if ihl < 20 || off + ihl > end {
            return None;
        }
        let src = v4_mapped(p[off + 12..off + 16].try_into().unwrap());
        let dst = v4_mapped(p[off + 16..off + 20].try_into().unwrap());
        (ihl, src, dst, p[off + 9])
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let l4 = off + hdr_len;
    if l4 + 8 > end {
        return None;
    }
    Some(Quote {
        off,
        hdr_len,
        src,
        dst,
        sport: be16(p, l4),
        dport: be16(p, l4 + 2),
        proto,
        l4_avail: end - l4,
    })
}
