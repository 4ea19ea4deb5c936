//! The flow hash of section 3.3: murmur3's block mixing over the forward
//! tuple, without murmur3's length step. It picks the Maglev slot and the
//! full NAT source port, so the model must reproduce it bit for bit.

use lb_common::FlowKey;

const SEED: u32 = 0x9747_b28c;

fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The hash of a forward tuple. `key.sport` and `key.dport` are as stored
/// in a `FlowKey`: the u16 read natively from the network-order bytes.
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    for i in [0, 4, 8, 12] {
        h = mix(h, u32_le(&key.src[i..i + 4]));
        h = mix(h, u32_le(&key.dst[i..i + 4]));
    }
    h = mix(h, (u32::from(key.sport) << 16) | u32::from(key.dport));
    h = mix(h, u32::from(key.proto));
    finish(h)
}

/// The prefilter's bit (section 2) for an address in 16-byte form and a
/// port as stored in a key, in a prefilter of 2^bits bits: the three high
/// words folded and spread, the low word and the port mixed in, murmur3's
/// finalizer, and the top `bits` bits.
pub fn prefilter_bit(addr: &[u8; 16], port: u16, bits: u32) -> u32 {
    let high = u32_le(&addr[0..4]) ^ u32_le(&addr[4..8]) ^ u32_le(&addr[8..12]);
    let h = high.wrapping_mul(0x9e37_79b1) ^ u32_le(&addr[12..16]);
    let h = h.wrapping_mul(0x85eb_ca6b) ^ u32::from(port);
    let h = finish(h);
    h >> (32 - bits)
}

/// The Maglev slot of a flow hash in a table of `size` entries; None for
/// an empty table.
pub fn maglev_slot(hash: u32, size: u32) -> Option<u32> {
    hash.checked_rem(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference murmur3_32 (x86_32), from its published description.
    fn murmur3_32(data: &[u8], seed: u32) -> u32 {
        let mut h = seed;
        let mut blocks = data.chunks_exact(4);
        for b in &mut blocks {
            h = mix(h, u32_le(b));
        }
        let tail = blocks.remainder();
        if !tail.is_empty() {
            let mut k = 0u32;
            for (i, b) in tail.iter().enumerate() {
                k |= u32::from(*b) << (8 * i);
            }
            h ^= k
                .wrapping_mul(0xcc9e_2d51)
                .rotate_left(15)
                .wrapping_mul(0x1b87_3593);
        }
        finish(h ^ data.len() as u32)
    }

    #[test]
    fn mixing_is_murmur3() {
        // Published test vectors of murmur3_32.
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"test", 0x9747_b28c), 0x704b_81dc);
        assert_eq!(murmur3_32(b"Hello, world!", 0x9747_b28c), 0x2488_4cba);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    #[test]
    fn flow_hash_is_murmur3_body_of_interleaved_words() {
        let key = FlowKey {
            src: lb_common::v4_mapped([10, 71, 0, 2]),
            dst: lb_common::v4_mapped([10, 73, 0, 10]),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        // The same words in the order of section 3.3, as one byte string:
        // murmur3 over it differs from flow_hash only by the length step.
        let mut bytes = Vec::new();
        for i in [0, 4, 8, 12] {
            bytes.extend_from_slice(&key.src[i..i + 4]);
            bytes.extend_from_slice(&key.dst[i..i + 4]);
        }
        let ports = (u32::from(key.sport) << 16) | u32::from(key.dport);
        bytes.extend_from_slice(&ports.to_le_bytes());
        bytes.extend_from_slice(&6u32.to_le_bytes());
        let mut h = SEED;
        for b in bytes.chunks_exact(4) {
            h = mix(h, u32_le(b));
        }
        assert_eq!(flow_hash(&key), finish(h));
        // sport is the high half: swapping the ports changes the hash.
        let swapped = FlowKey {
            sport: key.dport,
            dport: key.sport,
            ..key
        };
        assert_ne!(flow_hash(&key), flow_hash(&swapped));
        // 40000 is 0x9c40, stored natively as 0x409c on a little-endian host.
        assert_eq!(key.sport, 0x409c);
    }
}
