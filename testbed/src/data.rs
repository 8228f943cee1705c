//! Payload helpers: cheap pseudo-random test payloads and SHA-256 digests so
//! tests can move large bodies through the mesh and compare them end to end
//! without keeping both copies around.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// `n` pseudo-random bytes from a freshly seeded fast PRNG.
///
/// Not cryptographic: the point is incompressible, non-repeating payloads
/// (so a bug that duplicates or reorders chunks changes the digest).
pub fn random_bytes(n: usize) -> Vec<u8> {
    seeded_bytes(rand::random(), n)
}

/// `n` deterministic pseudo-random bytes for `seed`; use when a failing test
/// should be reproducible from the seed it printed.
pub fn seeded_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_is_deterministic_and_random_differs() {
        assert_eq!(seeded_bytes(7, 64), seeded_bytes(7, 64));
        assert_ne!(seeded_bytes(7, 64), seeded_bytes(8, 64));
        assert_eq!(random_bytes(1000).len(), 1000);
        assert_ne!(random_bytes(32), random_bytes(32));
    }

    #[test]
    fn sha256_known_vector() {
        // FIPS 180-2 test vector for "abc".
        let d = sha256(b"abc");
        assert_eq!(d[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert_eq!(d[28..], [0xf2, 0x00, 0x15, 0xad]);
    }
}
