//! The hasher of the SA tables on the event path (callbacks by SA, the
//! registry's tracked SAs): one multiply per field written, a per-process
//! random seed, and a folded 128-bit multiply at the end for hashbrown's
//! top bits. SipHash (std's default) costs several times as much on an
//! `SaId`; an unseeded hash would let peers that choose SPIs aim at one
//! bucket.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

const K: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xd6e8_feb8_6659_fd93;

fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    // std's RandomState is seeded from the OS once per thread and varies
    // per instance: hashing a constant with a fresh one gives a random word.
    *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0x5a5a_u64) | 1)
}

#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let m = u128::from(a).wrapping_mul(u128::from(b));
    (m as u64) ^ ((m >> 64) as u64)
}

#[derive(Clone, Copy)]
pub(crate) struct SaHasher {
    state: u64,
    seed: u64,
}

impl Default for SaHasher {
    #[inline]
    fn default() -> Self {
        let seed = seed();
        SaHasher { state: seed, seed }
    }
}

impl SaHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.state = (self.state.rotate_left(5) ^ word).wrapping_mul(K);
    }
}

impl Hasher for SaHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_ne_bytes(last) ^ ((rest.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn write_isize(&mut self, i: isize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // Two folds: every input bit reaches the low bits (the probe
        // position) as well as the top 7 (the tag).
        fold(fold(self.state, K ^ self.seed), K2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sa::SaId;
    use std::collections::HashSet;
    use std::hash::{BuildHasherDefault, Hash};

    #[test]
    fn sequential_spis_spread_over_the_top_bits() {
        let build = BuildHasherDefault::<SaHasher>::default();
        let mut top = HashSet::new();
        let mut low = HashSet::new();
        for spi in 0..4096u32 {
            let h = build.hash_one(SaId::esp("10.0.0.1".parse().unwrap(), spi));
            top.insert(h >> 57);
            low.insert(h & 0xfff);
        }
        assert_eq!(top.len(), 128, "all 7-bit tags used");
        // 4096 random values in 4096 buckets fill about 2589 (sd ~20).
        assert!(low.len() > 2450, "low 12 bits: {} distinct of 4096", low.len());
        let mut a = SaHasher::default();
        SaId::esp("10.0.0.1".parse().unwrap(), 1).hash(&mut a);
        let mut b = SaHasher::default();
        SaId::esp("10.0.0.1".parse().unwrap(), 1).with_mark(0, 0).hash(&mut b);
        assert_eq!(a.finish(), b.finish());
    }
}
