//! The flow hash: one implementation, compiled into the XDP program and into
//! user space, so `lb explain` and the tests compute exactly the backend the
//! kernel picks. MurmurHash3's 32-bit mixing over the key's words, written
//! without loops or slices so the verifier sees straight-line code.

use crate::{
    limits::VIP_FILTER_BITS_LOG2,
    types::{Addr, FlowKey},
};

/// Seed of the flow hash (arbitrary; changing it reshuffles every flow).
const FLOW_SEED: u32 = 0x5bd1_e995;
/// MurmurHash3 x86_32 block constants.
const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finaliser: every input bit affects every output bit.
#[inline(always)]
fn finish(h: u32, len_bytes: u32) -> u32 {
    let mut h = h ^ len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The `i`th 32-bit word of `a`, little-endian (`i < 4`). Read as one
/// word: assembled from four bytes, it made LLVM keep each address of the
/// data plane's packet path as sixteen separate bytes.
#[inline(always)]
pub(crate) fn word(a: &Addr, i: usize) -> u32 {
    // SAFETY: [u8; 16] and [u32; 4] have the same size and any bits are
    // valid for both.
    let words = unsafe { core::mem::transmute::<Addr, [u32; 4]>(*a) };
    u32::from_le(words[i])
}

#[inline(always)]
fn mix_addr(h: u32, a: &Addr) -> u32 {
    let h = mix(h, word(a, 0));
    let h = mix(h, word(a, 1));
    let h = mix(h, word(a, 2));
    mix(h, word(a, 3))
}

/// Hash of a flow: of the client address alone when `client_affinity`,
/// otherwise of the 5-tuple. Its remainder by the ring size is the Maglev slot.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, client_affinity: bool) -> u32 {
    let h = mix_addr(FLOW_SEED, &key.src);
    if client_affinity {
        return finish(h, 16);
    }
    let h = mix_addr(h, &key.dst);
    let h = mix(h, ((key.sport as u32) << 16) | key.dport as u32);
    let h = mix(h, ((key.family as u32) << 8) | key.proto as u32);
    finish(h, 40)
}

/// Multiplier of the VIP filter's Fibonacci hashing (2^32 / golden ratio).
const FILTER_MULTIPLIER: u32 = 0x9e37_79b1;

/// The VIP filter's bit for `addr`: (word index, bit mask). A clear bit
/// proves the address is no VIP, at the price of one array read; a set bit
/// sends the packet on to the service lookup. Deliberately cheaper than
/// [`flow_hash`]: the address's words folded, then one multiplication.
#[inline(always)]
pub fn vip_filter_bit(addr: &Addr) -> (u32, u64) {
    let folded = word(addr, 0) ^ word(addr, 1) ^ word(addr, 2) ^ word(addr, 3);
    let bit = folded.wrapping_mul(FILTER_MULTIPLIER) >> (32 - VIP_FILTER_BITS_LOG2);
    (bit >> 6, 1 << (bit & 63))
}

/// The same mixing over arbitrary bytes with a caller's seed, for user space
/// (the Maglev permutation of each backend). Not used on the packet path.
pub fn hash_bytes(seed: u32, bytes: &[u8]) -> u32 {
    let mut h = seed;
    let mut chunks = bytes.chunks_exact(4);
    for c in &mut chunks {
        h = mix(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    }
    let mut tail = 0u32;
    for (i, b) in chunks.remainder().iter().enumerate() {
        tail |= (*b as u32) << (8 * i);
    }
    if !chunks.remainder().is_empty() {
        h = mix(h, tail);
    }
    finish(h, bytes.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_ignores_ports_and_destination() {
        let mut a = FlowKey {
            src: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 1000,
            ..Default::default()
        };
        let b = FlowKey {
            sport: 2000,
            dport: 80,
            ..a
        };
        assert_eq!(flow_hash(&a, true), flow_hash(&b, true));
        assert_ne!(flow_hash(&a, false), flow_hash(&b, false));
        a.src[3] = 2;
        assert_ne!(flow_hash(&a, true), flow_hash(&b, true));
    }

    #[test]
    fn vip_filter_spreads_neighbouring_addresses() {
        // A /24 of VIPs lands on 256 different bits.
        let mut bits = [(0u32, 0u64); 256];
        for (i, bit) in bits.iter_mut().enumerate() {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[198, 18, 0, i as u8]);
            *bit = vip_filter_bit(&a);
            assert!(bit.0 < crate::limits::VIP_FILTER_WORDS);
            assert_eq!(bit.1.count_ones(), 1);
        }
        bits.sort_unstable();
        assert!(bits.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn hash_bytes_depends_on_every_byte_and_length() {
        let base = hash_bytes(1, b"198.18.0.10");
        assert_ne!(base, hash_bytes(1, b"198.18.0.11"));
        assert_ne!(base, hash_bytes(1, b"198.18.0.10\0"));
        assert_ne!(base, hash_bytes(2, b"198.18.0.10"));
    }
}
