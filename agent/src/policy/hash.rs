//! The stable hash of shard keys (shard routing) and session keys (consistent-hash
//! balancing): SipHash-1-3 of the key's bytes with fixed keys.
//!
//! Every agent must map a key to the same shard, across processes, restarts and versions,
//! so the hash never uses a randomised seed (Rust's `RandomState`). The keys below are part
//! of the wire contract: changing them re-shards every sharded service.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// First SipHash key: the bytes of `"bulwark\0"` read as a big-endian `u64`.
pub const SEED_K0: u64 = 0x6275_6c77_6172_6b00;
/// Second SipHash key: the bytes of `"shard\0\0\0"` read as a big-endian `u64`.
pub const SEED_K1: u64 = 0x7368_6172_6400_0000;

/// The stable 64-bit hash of `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hasher = SipHasher13::new_with_keys(SEED_K0, SEED_K1);
    hasher.write(bytes);
    hasher.finish()
}

/// The stable hash of an IP address's octets (no text form, so no allocation per request).
pub fn stable_hash_ip(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(v4) => stable_hash(&v4.octets()),
        std::net::IpAddr::V6(v6) => stable_hash(&v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fixed_across_builds_and_processes() {
        // A pinned value: if it changes, every agent's key -> shard mapping changes.
        assert_eq!(stable_hash(b"tenant-1"), PINNED_TENANT_1);
        assert_ne!(stable_hash(b"tenant-1"), stable_hash(b"tenant-2"));
    }

    /// `stable_hash(b"tenant-1")`, recorded once; guards the seed and the algorithm.
    const PINNED_TENANT_1: u64 = 14_256_986_571_154_466_167;
}
