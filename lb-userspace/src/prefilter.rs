//! PREFILTER's contents: a bit for every frontend and every backend the
//! reconciler has written (docs/datapath.md, section 2), so that the
//! datapath passes other packets without a conntrack or service lookup.
//! False positives only cost a lookup; a missing bit would make a service
//! unreachable, or lose a removed backend's replies still on their way, so
//! bits are set before what they stand for is written and only a restart
//! clears them.

use lb_common::prefilter_bit;

/// The prefilter of `bits` bits (2^bits / 32 words) with the bits of
/// `entries`: (address in 16-byte form, port as stored on the wire).
pub fn words(bits: u32, entries: impl IntoIterator<Item = ([u8; 16], u16)>) -> Vec<u32> {
    let mut words = vec![0u32; (1usize << bits) / 32];
    add(&mut words, bits, entries);
    words
}

/// Sets the bits of `entries` in `words`.
pub fn add(words: &mut [u32], bits: u32, entries: impl IntoIterator<Item = ([u8; 16], u16)>) {
    for (addr, port) in entries {
        let bit = prefilter_bit(&addr, port, bits) as usize;
        words[bit / 32] |= 1 << (bit % 32);
    }
}

/// Whether `words` holds the bit of (`addr`, `port`).
pub fn holds(words: &[u32], bits: u32, addr: &[u8; 16], port: u16) -> bool {
    let bit = prefilter_bit(addr, port, bits) as usize;
    words[bit / 32] & (1 << (bit % 32)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::v4_mapped;

    #[test]
    fn every_entry_is_held_and_few_others_are() {
        let bits = 16;
        let entries: Vec<([u8; 16], u16)> = (0..4096u32)
            .map(|i| {
                let [_, _, a, b] = i.to_be_bytes();
                (v4_mapped([10, 90, a, b]), 8080u16.to_be())
            })
            .collect();
        let words = words(bits, entries.iter().copied());
        assert!(entries.iter().all(|(a, p)| holds(&words, bits, a, *p)));
        // 4,096 entries in 65,536 bits: about one address in sixteen shares
        // a bit with one of them.
        let others = (0..10_000u32)
            .filter(|i| {
                let [_, _, a, b] = i.to_be_bytes();
                holds(&words, bits, &v4_mapped([10, 99, a, b]), 80u16.to_be())
            })
            .count();
        assert!(others < 1_000, "{others} of 10,000 other addresses held");
    }
}
