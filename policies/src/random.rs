//! Seeded, stateless randomness. Every draw is a hash of (policy seed, rule name, occurrence,
//! purpose), so a rule's choices never depend on how other rules' requests interleave with its own,
//! and adding or reordering rules leaves the other rules' draws unchanged.

/// What a draw is for, so the probability test and the delay of the same occurrence are independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Probability = 1,
    Delay = 2,
    Tear = 3,
    Corruption = 4,
}

/// The SplitMix64 finalizer: a bijective mix with good avalanche, enough for fault injection.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of a rule name (FNV-1a, then mixed): stable across builds and platforms,
/// unlike `std`'s `DefaultHasher`, so the same policy gives the same draws everywhere.
pub(crate) fn name_hash(name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    mix(hash)
}

/// The random value for one decision of one rule.
pub(crate) fn draw(seed: u64, rule: u64, occurrence: u64, purpose: Purpose) -> u64 {
    mix(seed ^ mix(rule ^ mix(occurrence.wrapping_mul(8).wrapping_add(purpose as u64))))
}

/// A uniform choice in `0..n` from a 64-bit random value (multiply-shift, no modulo bias worth
/// the name for the sizes used here). `n` must not be 0.
pub(crate) fn below(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

/// Corrupts `bytes` bytes of `buffer`, at positions and with values chosen from `seed`. The server
/// calls this for [`crate::Action::CorruptRead`]; the same seed always damages the same way.
/// Every chosen byte is changed (XOR with a non-zero value), so corruption is never a no-op.
pub fn corrupt(buffer: &mut [u8], seed: u64, bytes: u32) {
    if buffer.is_empty() {
        return;
    }
    let length = buffer.len() as u64;
    for index in 0..u64::from(bytes) {
        let random = mix(seed ^ mix(index));
        let position = below(random, length) as usize;
        let flip = (random >> 56) as u8 | 1;
        buffer[position] ^= flip;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_differ_by_seed_rule_occurrence_and_purpose() {
        let base = draw(42, name_hash("a"), 1, Purpose::Probability);
        assert_eq!(base, draw(42, name_hash("a"), 1, Purpose::Probability));
        assert_ne!(base, draw(43, name_hash("a"), 1, Purpose::Probability));
        assert_ne!(base, draw(42, name_hash("b"), 1, Purpose::Probability));
        assert_ne!(base, draw(42, name_hash("a"), 2, Purpose::Probability));
        assert_ne!(base, draw(42, name_hash("a"), 1, Purpose::Delay));
    }

    #[test]
    fn name_hash_is_stable_across_builds() {
        // A changed constant here would silently change every seeded policy's decisions.
        assert_eq!(name_hash(""), mix(0xcbf2_9ce4_8422_2325));
        assert_eq!(name_hash("flaky-flush"), name_hash("flaky-flush"));
        assert_ne!(name_hash("flaky-flush"), name_hash("flaky-flusi"));
    }

    #[test]
    fn below_stays_in_bounds() {
        assert_eq!(below(0, 10), 0);
        assert_eq!(below(u64::MAX, 10), 9);
        assert_eq!(below(u64::MAX, 1), 0);
    }

    #[test]
    fn corruption_changes_the_buffer_the_same_way_for_the_same_seed() {
        let original = vec![0u8; 4096];
        let mut first = original.clone();
        corrupt(&mut first, 7, 16);
        let mut second = original.clone();
        corrupt(&mut second, 7, 16);
        assert_eq!(first, second);
        let changed = first.iter().zip(&original).filter(|(a, b)| a != b).count();
        assert!((1..=16).contains(&changed), "{changed} bytes changed");
        let mut other = original.clone();
        corrupt(&mut other, 8, 16);
        assert_ne!(first, other);
        corrupt(&mut [], 7, 16);
    }
}
