//! What earlier versions of lb wrote into pinned maps, for the tests of
//! their upgrade paths and for the benchmark's baseline objects: computed
//! here as those versions did, since this version's code no longer does.

use lb_common::{BackendValue, FlowKey, FlowValue, hash::hash_bytes};

/// The Maglev slot's hash up to `FLOW_HASH_VERSION` 1, which those versions
/// also sealed connection-table entries with: MurmurHash3 (x86_32) of the
/// 5-tuple's words (the addresses, then the ports, then the family and
/// protocol), seeded 0x5bd1e995.
pub fn murmur_flow_hash(key: &FlowKey) -> u32 {
    const SEED: u32 = 0x5bd1_e995;
    let ports = (u32::from(key.sport) << 16) | u32::from(key.dport);
    let kind = (u32::from(key.family) << 8) | u32::from(key.proto);
    let mut bytes = Vec::with_capacity(40);
    bytes.extend_from_slice(&key.src);
    bytes.extend_from_slice(&key.dst);
    bytes.extend_from_slice(&ports.to_le_bytes());
    bytes.extend_from_slice(&kind.to_le_bytes());
    hash_bytes(SEED, &bytes)
}

/// The chain of folds lb hashed with up to `FLOW_HASH_VERSION` 2: each
/// word into the hash of the ones before from `seed`, then a finaliser.
fn chain(seed: u64, words: &[u64]) -> u32 {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
    const FINISH: u64 = 0x94d0_49bb_1331_11eb;
    let h = words.iter().fold(seed, |h, &w| {
        let h = (h ^ w).wrapping_mul(MULTIPLIER);
        h ^ (h >> 32)
    });
    let h = (h ^ (h >> 29)).wrapping_mul(FINISH);
    (h ^ (h >> 32)) as u32
}

/// The bucket hash of `FLOW_HASH_VERSION` 2, which placed and sealed
/// connection-table entries: the chain over the key's five words.
pub fn chain_bucket_hash(key: &FlowKey) -> u32 {
    // SAFETY: a FlowKey is 40 bytes of plain integers, 8-aligned.
    let words = unsafe { std::mem::transmute::<FlowKey, [u64; 5]>(*key) };
    chain(0x2545_f491_4f6c_dd1d, &words)
}

/// `b` sealed as lb sealed backends from their seal's introduction
/// (843bb42) until the seal became independent products: the chain over
/// the first 28 bytes as four words.
pub fn chain_sealed(b: &BackendValue) -> BackendValue {
    // SAFETY: a BackendValue is 32 bytes of plain integers, 8-aligned.
    let w = unsafe { std::mem::transmute::<BackendValue, [u64; 4]>(*b) };
    let generation = u64::from_le(w[3]) & u64::from(u32::MAX);
    BackendValue {
        seal: chain(0x6a09_e667_f3bc_c909, &[w[0], w[1], w[2], generation]),
        ..*b
    }
}

/// A connection-table entry as versions before 32-byte entries wrote it
/// (64 bytes: the whole flow, its value, a seal over the flow's `hash`, the
/// backend, the whole generation and the service), sealed by `hash`.
pub fn whole_flow_entry(key: &FlowKey, value: &FlowValue, hash: u32) -> [u8; 64] {
    let seal = hash
        ^ value.backend.wrapping_mul(0x9e37_79b1)
        ^ value.generation.wrapping_mul(0x85eb_ca6b)
        ^ value.service.wrapping_mul(0xc2b2_ae35);
    // SAFETY: a FlowKey is 40 bytes of plain integers with explicit padding.
    let key: [u8; 40] = unsafe { std::mem::transmute(*key) };
    let mut out = [0u8; 64];
    out[..40].copy_from_slice(&key);
    let words = [
        value.backend,
        value.generation,
        value.last_seen,
        value.flags,
        value.service,
        seal,
    ];
    for (chunk, w) in out[40..].chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    out
}
