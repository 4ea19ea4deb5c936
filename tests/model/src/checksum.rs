//! The Internet checksum (RFC 1071), computed from scratch over the bytes
//! it covers, and the one-field update of RFC 1624 for the single case where
//! the covered bytes are not all available (a TCP or UDP header quoted in an
//! ICMP error, whose payload was cut off).

/// A running one's-complement sum over a sequence of byte slices, as if they
/// were concatenated (an odd-length slice carries its last byte over).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sum {
    acc: u64,
    odd: Option<u8>,
}

impl Sum {
    pub fn new() -> Sum {
        Sum::default()
    }

    pub fn push(mut self, data: &[u8]) -> Sum {
        let mut data = data;
        if let Some(hi) = self.odd.take() {
            match data.split_first() {
                Some((lo, rest)) => {
                    self.acc += u64::from(u16::from_be_bytes([hi, *lo]));
                    data = rest;
                }
                None => {
                    self.odd = Some(hi);
                    return self;
                }
            }
        }
        let mut words = data.chunks_exact(2);
        for w in &mut words {
            self.acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            self.odd = Some(*last);
        }
        self
    }

    pub fn push_u16(self, v: u16) -> Sum {
        self.push(&v.to_be_bytes())
    }

    pub fn push_u32(self, v: u32) -> Sum {
        self.push(&v.to_be_bytes())
    }

    /// The folded 16-bit one's-complement sum (a trailing odd byte is
    /// padded with zero, as RFC 1071 says).
    pub fn folded(self) -> u16 {
        let mut acc = self.acc;
        if let Some(hi) = self.odd {
            acc += u64::from(u16::from_be_bytes([hi, 0]));
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    /// The checksum field value: the complement of the sum.
    pub fn checksum(self) -> u16 {
        !self.folded()
    }
}

/// The checksum of `data` alone (IPv4 header, ICMPv4 message).
pub fn checksum(data: &[u8]) -> u16 {
    Sum::new().push(data).checksum()
}

/// Whether `data`, checksum field included, sums to all ones.
pub fn verifies(data: &[u8]) -> bool {
    Sum::new().push(data).folded() == 0xffff
}

/// The pseudo-header sum of TCP, UDP and ICMPv6 for either family:
/// IPv4 (RFC 793) when both addresses are IPv4-mapped, IPv6 (RFC 8200) else.
pub fn pseudo_header(src: &[u8; 16], dst: &[u8; 16], proto: u8, len: u32) -> Sum {
    if lb_common::is_v4_mapped(src) && lb_common::is_v4_mapped(dst) {
        Sum::new()
            .push(&src[12..])
            .push(&dst[12..])
            .push(&[0, proto])
            .push_u16(len as u16)
    } else {
        Sum::new()
            .push(src)
            .push(dst)
            .push_u32(len)
            .push(&[0, 0, 0, proto])
    }
}

/// RFC 1624 equation 3: the checksum `old_sum` after the covered bytes
/// `old` became `new` (both of even, equal length):
/// HC' = ~(~HC + ~m + m').
pub fn update(old_sum: u16, old: &[u8], new: &[u8]) -> u16 {
    assert_eq!(old.len(), new.len());
    assert!(old.len().is_multiple_of(2));
    let mut acc = u64::from(!old_sum);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        acc += u64::from(!u16::from_be_bytes([o[0], o[1]]));
        acc += u64::from(u16::from_be_bytes([n[0], n[1]]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(Sum::new().push(&data).folded(), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn split_slices_sum_like_one() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        let whole = Sum::new().push(&data).folded();
        for cut in [0, 1, 2, 3, 500, 1000, 1001] {
            let (a, b) = data.split_at(cut);
            assert_eq!(Sum::new().push(a).push(b).folded(), whole, "cut {cut}");
        }
        let three = Sum::new()
            .push(&data[..7])
            .push(&data[7..8])
            .push(&data[8..]);
        assert_eq!(three.folded(), whole);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(Sum::new().push(&[0x12]).folded(), 0x1200);
        assert_eq!(Sum::new().push(&[0x12, 0x34, 0x56]).folded(), 0x6834);
    }

    #[test]
    fn known_ipv4_header() {
        // A textbook header (Wikipedia's IPv4 checksum example): b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verifies(&h));
    }

    #[test]
    fn update_matches_recomputation() {
        let mut data: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        data[10] = 0;
        data[11] = 0;
        let c = checksum(&data);
        data[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(verifies(&data));
        let old = data[20..26].to_vec();
        let new = [0xde, 0xad, 0xbe, 0xef, 0x00, 0x01];
        data[20..26].copy_from_slice(&new);
        let updated = update(c, &old, &new);
        data[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum(&data));
    }
}
