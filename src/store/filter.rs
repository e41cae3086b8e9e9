//! The per-user filter of recently used client_msg_ids, which lets a send that is new (nearly
//! every one) skip the store read that confirms a duplicate. A standalone data structure: it
//! knows keyed 64-bit hashes, not users, sends or the store.

use std::collections::HashSet;

use crate::store::DEDUPE_KEEP;

/// Which client_msg_ids a user may have used lately: two generations of blocked Bloom filters
/// over a keyed 64-bit hash of the id, so that the user's newest [`DEDUPE_KEEP`] ids are
/// always covered. A miss is certain; a hit (a retry, or fewer than one in 1,000 new ids) is
/// confirmed exactly against the pending sends and the store.
///
/// Sized by use: 32 bits per key, from one block for a user with a few sends up to 4 KiB per
/// generation for one with `DEDUPE_KEEP` (a map of the ids would take several times that, and
/// miss the cache on every send). A filter smaller than that is rebuilt twice as large, from
/// the store, when it fills up; a full-size one starts a new generation instead.
///
/// A key's bits fall in one 64-byte block per generation, and the two generations' blocks
/// for it are neighbours, so a lookup costs about one cache miss.
#[derive(Debug)]
pub(crate) struct SendFilter {
    /// Pairs of blocks: for block `i`, generation `g`'s words are at
    /// `(2 * i + g) * BLOCK_WORDS`.
    words: Box<[u64]>,
    /// The generation that takes new keys (0 or 1).
    current: usize,
    /// Keys in the current generation, and how many one is sized for.
    count: usize,
    capacity: usize,
}

/// A key's bits all fall in one block of 8 words (a cache line) per generation.
const BLOCK_WORDS: usize = 8;
const BLOCK_BITS: u64 = 64 * BLOCK_WORDS as u64;
const FILTER_PROBES: u64 = 8;
const FILTER_BITS_PER_KEY: usize = 32;
/// The smallest filter's capacity: one block.
const FILTER_MIN_KEYS: usize = BLOCK_WORDS * 64 / FILTER_BITS_PER_KEY;

impl SendFilter {
    /// A filter holding the newest [`DEDUPE_KEEP`] of `hashes` (oldest first), sized for
    /// twice as many (at most `DEDUPE_KEEP`).
    pub(crate) fn with(hashes: Vec<u64>) -> SendFilter {
        // Each key once (the same key twice would count twice towards the next generation),
        // the newest ones, still oldest first: all of them fit in one generation.
        let mut seen = HashSet::with_capacity(hashes.len());
        let mut hashes: Vec<u64> = hashes
            .into_iter()
            .rev()
            .filter(|h| seen.insert(*h))
            .collect();
        hashes.truncate(DEDUPE_KEEP);
        hashes.reverse();
        let capacity = (2 * hashes.len())
            .next_power_of_two()
            .clamp(FILTER_MIN_KEYS, DEDUPE_KEEP);
        let blocks = (capacity * FILTER_BITS_PER_KEY / 64 / BLOCK_WORDS).next_power_of_two();
        let mut f = SendFilter {
            words: vec![0; 2 * blocks * BLOCK_WORDS].into_boxed_slice(),
            current: 0,
            count: 0,
            capacity,
        };
        for h in hashes {
            f.insert(h);
        }
        f
    }

    /// Whether it must be rebuilt larger before it takes another key.
    pub(crate) fn must_grow(&self) -> bool {
        self.count >= self.capacity && self.capacity < DEDUPE_KEEP
    }

    /// Where `hash` falls: its block pair's first word, then its bits (double hashing).
    fn place(&self, hash: u64) -> (usize, impl Iterator<Item = (usize, u64)>) {
        let blocks = (self.words.len() / (2 * BLOCK_WORDS)) as u64;
        let pair = (hash % blocks) as usize * 2 * BLOCK_WORDS;
        let mixed = (hash / blocks).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let (first, step) = (mixed >> 32, (mixed & 0xFFFF_FFFF) | 1);
        let bits = (0..FILTER_PROBES).map(move |i| {
            let bit = first.wrapping_add(i.wrapping_mul(step)) % BLOCK_BITS;
            ((bit / 64) as usize, 1 << (bit % 64))
        });
        (pair, bits)
    }

    pub(crate) fn may_contain(&self, hash: u64) -> bool {
        (0..2).any(|g| {
            let (pair, bits) = self.place(hash);
            let block = &self.words[pair + g * BLOCK_WORDS..][..BLOCK_WORDS];
            { bits }.all(|(w, m)| block[w] & m != 0)
        })
    }

    pub(crate) fn insert(&mut self, hash: u64) {
        if self.count >= self.capacity {
            // Full size: the current generation becomes the previous one, and the previous
            // one's bits are cleared for the new current one.
            self.current ^= 1;
            let g = self.current;
            for pair in self.words.chunks_mut(2 * BLOCK_WORDS) {
                pair[g * BLOCK_WORDS..][..BLOCK_WORDS].fill(0);
            }
            self.count = 0;
        }
        let (pair, bits) = self.place(hash);
        let block = &mut self.words[pair + self.current * BLOCK_WORDS..][..BLOCK_WORDS];
        for (w, m) in bits {
            block[w] |= m;
        }
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, RandomState};

    use super::*;

    #[test]
    fn the_send_filter_covers_the_newest_keys_and_rarely_more() {
        let keys = RandomState::new();
        let mut f = SendFilter::with(Vec::new());
        assert_eq!(
            f.words.len() * 8,
            128,
            "one block per generation to start with"
        );
        assert_eq!(f.capacity, 16, "a block holds 16 keys at 32 bits each");
        for i in 0..16u64 {
            assert!(!f.must_grow(), "grows with {i} of 16 keys");
            f.insert(keys.hash_one(u64::MAX - i));
        }
        assert!(f.must_grow(), "a full small filter must grow");
        let mut f = SendFilter::with(Vec::new());
        for i in 0..5_000u64 {
            if f.must_grow() {
                f = SendFilter::with((0..i).map(|k| keys.hash_one(k)).collect());
            }
            f.insert(keys.hash_one(i));
            if i % 250 == 0 || i == 4_999 {
                let newest = i.saturating_sub(DEDUPE_KEEP as u64 - 1)..=i;
                assert!(newest.into_iter().all(|k| f.may_contain(keys.hash_one(k))));
            }
        }
        let false_hits = (1_000_000..1_100_000u64)
            .filter(|k| f.may_contain(keys.hash_one(k)))
            .count();
        assert!(
            false_hits < 100,
            "{false_hits} of 100,000 new ids looked used"
        );
    }

    #[test]
    fn a_filter_is_sized_for_twice_its_keys_and_at_full_size_starts_a_generation_instead_of_growing(
    ) {
        let keys = RandomState::new();
        let mut f = SendFilter::with((0..20u64).map(|k| keys.hash_one(k)).collect());
        for i in 20..64u64 {
            assert!(!f.must_grow(), "built from 20 keys, grows with {i} of 64");
            f.insert(keys.hash_one(i));
        }
        assert!(f.must_grow());
        let full = DEDUPE_KEEP as u64;
        let mut f = SendFilter::with((0..full).map(|k| keys.hash_one(k)).collect());
        for i in full..3 * full {
            assert!(!f.must_grow(), "a full-size filter grows with {i} keys");
            f.insert(keys.hash_one(i));
        }
        assert!((2 * full..3 * full).all(|k| f.may_contain(keys.hash_one(k))));
    }
}
