//! The hashes of a flow, each one implementation compiled into the XDP
//! program and into user space, so `lb explain` and the tests compute
//! exactly what the kernel does: [`bucket_hash`] (64-bit multiplications,
//! cheap in BPF) places a flow in the connection table and, through
//! [`flow_hash`], picks its Maglev slot; [`hash_bytes`] (MurmurHash3's
//! mixing) orders each backend's Maglev permutation in user space. Written
//! without loops or slices so the verifier sees straight-line code.

use crate::{
    limits::{SERVICE_INDEX_BITS, VIP_FILTER_BITS_LOG2},
    types::{Addr, FlowKey},
};

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

/// Which version of [`flow_hash`] and [`maglev_slot`] this is. Every node
/// of a fleet must pick a flow's Maglev slot the same way, so it goes into
/// each table's digest (which the fleet compares): a node that picks
/// differently shows as different tables. Raise it whenever either
/// changes. Version 1 was MurmurHash3 over the 5-tuple (or the client
/// address), its remainder by the table's size the slot; version 2 the
/// bucket hash as a chain of folds over the key's words.
pub const FLOW_HASH_VERSION: u64 = 3;

/// Hash that picks a flow's Maglev slot ([`maglev_slot`]):
/// of the client address alone when `client_affinity`, otherwise the
/// flow's [`bucket_hash`], which the data plane computes for every packet
/// anyway, so a new flow's pick costs no second hash of the 5-tuple.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, client_affinity: bool) -> u32 {
    flow_hash_of_bucket(bucket_hash(key), key, client_affinity)
}

/// [`flow_hash`] given the flow's [`bucket_hash`] `bucket`, as the data
/// plane has it.
#[inline(always)]
pub fn flow_hash_of_bucket(bucket: u32, key: &FlowKey, client_affinity: bool) -> u32 {
    if client_affinity {
        client_hash(&key.src)
    } else {
        bucket
    }
}

/// The slot of a flow whose [`flow_hash`] is `hash` in a Maglev table of
/// `size` slots: the hash scaled to the table (a multiplication and a
/// shift), not its remainder, a 64-bit division in the JIT's code that
/// was the hottest instruction of a TCP SYN. Rotated first: the
/// connection table scales the hash the same way
/// ([`flow_buckets`](crate::flow_buckets)), and without the rotation a
/// bucket's flows would all sit in a few neighbouring slots.
#[inline(always)]
pub fn maglev_slot(hash: u32, size: u32) -> u32 {
    ((u64::from(hash.rotate_left(16)) * u64::from(size)) >> 32) as u32
}

/// Seed of the client hash (arbitrary).
const CLIENT_SEED: u64 = 0x3c6e_f372_fe94_f82b;

/// Hash of a client address: the bucket hash's folding over its two
/// 8-byte halves.
#[inline(always)]
fn client_hash(src: &Addr) -> u32 {
    let (lo, hi) = halves(src);
    finish64(fold(fold(CLIENT_SEED, lo), hi))
}

/// An address's two little-endian 8-byte halves.
#[inline(always)]
fn halves(a: &Addr) -> (u64, u64) {
    (
        u64::from(word(a, 0)) | (u64::from(word(a, 1)) << 32),
        u64::from(word(a, 2)) | (u64::from(word(a, 3)) << 32),
    )
}

/// Odd 64-bit multipliers for words hashed side by side, each word by its
/// own (the golden ratio's, SplitMix64's first, xxHash64's primes 2, 3 and
/// 5): the bucket hash's, the service index's, the backend seal's, the
/// source hash's.
pub(crate) const WORD_MULTIPLIERS: [u64; 5] = [
    0x9e37_79b9_7f4a_7c15,
    0xbf58_476d_1ce4_e5b9,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x27d4_eb2f_1656_67c5,
];
/// The folds' multiplier, and the bucket hash's last: 2^64 / golden
/// ratio.
const BUCKET_MULTIPLIER: u64 = WORD_MULTIPLIERS[0];
/// The finaliser's multiplier (SplitMix64's second).
pub(crate) const BUCKET_FINISH: u64 = 0x94d0_49bb_1331_11eb;

/// One word into the client hash: a multiplication, which
/// carries each bit of `h ^ w` only upward, then a shift that brings the
/// upper half down.
#[inline(always)]
pub(crate) fn fold(h: u64, w: u64) -> u64 {
    let h = (h ^ w).wrapping_mul(BUCKET_MULTIPLIER);
    h ^ (h >> 32)
}

/// Hash of a flow's 5-tuple that places it in the connection table, seals
/// its entry ([`flow_buckets`](crate::flow_buckets)) and, without client
/// affinity, picks its Maglev slot ([`flow_hash`]). Each of the key's five
/// words multiplied by its own constant and the products XORed: the
/// multiplications are independent, so the CPU runs them side by side,
/// where a chain of folds (each word into the hash of the ones before, up
/// to [`FLOW_HASH_VERSION`] 2) waited for each in turn and held a quarter
/// of an established packet's time in the program. A product's bit
/// reaches only the bits above it, so the sum's upper half is folded down
/// and multiplied once more before the finaliser: every input bit then
/// flips each output bit about half the time (tested).
#[inline(always)]
pub fn bucket_hash(key: &FlowKey) -> u32 {
    let m = WORD_MULTIPLIERS;
    let h = key.word(0).wrapping_mul(m[0])
        ^ key.word(1).wrapping_mul(m[1])
        ^ key.word(2).wrapping_mul(m[2])
        ^ key.word(3).wrapping_mul(m[3])
        ^ key.word(4).wrapping_mul(m[4]);
    finish64((h ^ (h >> 32)).wrapping_mul(BUCKET_MULTIPLIER))
}

/// The bucket hash's finaliser, down to 32 bits.
#[inline(always)]
pub(crate) fn finish64(h: u64) -> u32 {
    finish_wide(h) as u32
}

/// The finaliser, all 64 bits.
#[inline(always)]
fn finish_wide(h: u64) -> u64 {
    let h = (h ^ (h >> 29)).wrapping_mul(BUCKET_FINISH);
    h ^ (h >> 32)
}

/// Hash of a source prefix of service `service_id`, built as the bucket
/// hash is (independent products, folded, multiplied, finalised), over the
/// service and the prefix's two halves: the low half places the prefix
/// (its bucket in the table of recent sources, its slot in the sample of
/// limited ones), the high half is its [`source_tag`]. A chain of folds
/// (before) left the prefix's last bits reaching the low output bits
/// unevenly (tested); it was no slower or faster.
#[inline(always)]
pub fn source_hash(service_id: u32, prefix: &Addr) -> u64 {
    let (lo, hi) = halves(prefix);
    let m = WORD_MULTIPLIERS;
    let h =
        u64::from(service_id).wrapping_mul(m[0]) ^ lo.wrapping_mul(m[1]) ^ hi.wrapping_mul(m[2]);
    finish_wide((h ^ (h >> 32)).wrapping_mul(BUCKET_MULTIPLIER))
}

/// The tag a [`source_hash`] leaves in its way of the table of recent
/// sources in place of the service and prefix: the hash's high half with
/// the low bit set, as 0 marks an empty way. Two sources share a way's
/// time only if they share a bucket and these 31 bits.
#[inline(always)]
pub fn source_tag(hash: u64) -> u32 {
    (hash >> 32) as u32 | 1
}

/// The bucket of the source lists' directory (`LB_SOURCE_BLOCKS`) of
/// block `block` under `head` ([`SourceBlock::head_of`](crate::SourceBlock::head_of)):
/// two independent products, folded, multiplied and finalised, as the
/// bucket hash is.
#[inline(always)]
pub fn source_block_bucket(head: u64, block: u64) -> u32 {
    let m = WORD_MULTIPLIERS;
    let h = head.wrapping_mul(m[3]) ^ block.wrapping_mul(m[4]);
    finish64((h ^ (h >> 32)).wrapping_mul(BUCKET_MULTIPLIER))
        & (crate::limits::SOURCE_BLOCK_BUCKETS - 1)
}

/// The element of the service index (`LB_SERVICE_INDEX`) of the service at
/// `addr` (16-byte form), `port` (network order) and `proto`: three
/// independent products XORed, folded and multiplied once more, the top
/// bits; where the services hash spends a jhash of the whole 20-byte key
/// before its bucket walk and key compare.
#[inline(always)]
pub fn service_index(addr: &Addr, port: u16, proto: u8) -> u32 {
    let (lo, hi) = halves(addr);
    let m = WORD_MULTIPLIERS;
    let h = lo.wrapping_mul(m[1])
        ^ hi.wrapping_mul(m[2])
        ^ (u64::from(port) | (u64::from(proto) << 16)).wrapping_mul(m[3]);
    let h = (h ^ (h >> 32)).wrapping_mul(BUCKET_MULTIPLIER);
    (h >> (64 - SERVICE_INDEX_BITS)) as u32
}

/// Multiplier of the VIP filter's Fibonacci hashing (2^32 / golden ratio).
const FILTER_MULTIPLIER: u32 = 0x9e37_79b1;

/// The VIP filter's bit for `addr`: (word index, bit mask). A clear bit
/// proves the address is no VIP, at the price of one array read; a set bit
/// sends the packet on to the service lookup. Deliberately cheaper than
/// [`bucket_hash`]: the address's words folded, then one multiplication.
#[inline(always)]
pub fn vip_filter_bit(addr: &Addr) -> (u32, u64) {
    let (lo, hi) = halves(addr);
    vip_filter_bit_of_fold(fold_halves(lo, hi))
}

/// [`vip_filter_bit`] from the XOR of the address's four 4-byte words,
/// each read little-endian ([`fold_halves`]; an IPv4 address is its one
/// word): what the data plane computes straight from the packet's bytes.
#[inline(always)]
pub fn vip_filter_bit_of_fold(folded: u32) -> (u32, u64) {
    let bit = folded.wrapping_mul(FILTER_MULTIPLIER) >> (32 - VIP_FILTER_BITS_LOG2);
    (bit >> 6, 1 << (bit & 63))
}

/// The XOR of an address's four little-endian 4-byte words, from its two
/// little-endian 8-byte halves.
#[inline(always)]
pub fn fold_halves(lo: u64, hi: u64) -> u32 {
    let x = lo ^ hi;
    x as u32 ^ (x >> 32) as u32
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
        tail |= u32::from(*b) << (8 * i);
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

    /// A deterministic stream of keys (xorshift), IPv4 and IPv6 alike.
    fn sample_keys(n: usize) -> impl Iterator<Item = FlowKey> {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..n).map(move |i| {
            let (a, b, c) = (next(), next(), next());
            let mut k = FlowKey {
                sport: a as u16,
                dport: (a >> 16) as u16,
                proto: if i % 2 == 0 { 6 } else { 17 },
                family: if i % 3 == 0 { 10 } else { 2 },
                ..Default::default()
            };
            k.src[..8].copy_from_slice(&b.to_le_bytes());
            k.dst[..8].copy_from_slice(&c.to_le_bytes());
            if k.family == 10 {
                k.src[8..].copy_from_slice(&a.to_le_bytes());
                k.dst[8..].copy_from_slice(&b.rotate_left(7).to_le_bytes());
            } else {
                k.src[4..].fill(0);
                k.dst[4..].fill(0);
            }
            k
        })
    }

    #[test]
    fn bucket_hash_flips_every_output_bit_about_half_the_time() {
        // Strict avalanche: flipping any one bit of a key (addresses,
        // ports, protocol) flips each output bit in 40 to 60 % of keys.
        let mut keys = [FlowKey::default(); 2000];
        for (slot, k) in keys.iter_mut().zip(sample_keys(2000)) {
            *slot = k;
        }
        let bits = 8 * 37;
        for bit in 0..bits {
            let mut flips = [0u32; 32];
            for k in &keys {
                let mut bytes = [0u8; 40];
                // SAFETY: FlowKey is 40 plain bytes (see its asserts).
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        k as *const _ as *const u8,
                        bytes.as_mut_ptr(),
                        40,
                    );
                };
                bytes[bit / 8] ^= 1 << (bit % 8);
                // SAFETY: any 40 bytes are a FlowKey.
                let other: FlowKey = unsafe { core::mem::transmute(bytes) };
                count_flips(&mut flips, u64::from(bucket_hash(k) ^ bucket_hash(&other)));
            }
            assert_avalanche(&flips, keys.len(), bit);
        }
    }

    /// Adds each bit of the difference `d` to its count in `flips`.
    fn count_flips(flips: &mut [u32], d: u64) {
        for (o, f) in flips.iter_mut().enumerate() {
            *f += ((d >> o) & 1) as u32;
        }
    }

    /// Strict avalanche: flipping input bit `bit` of each of `n` inputs
    /// flipped each output bit (`flips`) in 40 to 60 % of them.
    fn assert_avalanche(flips: &[u32], n: usize, bit: usize) {
        for (o, f) in flips.iter().enumerate() {
            let p = f64::from(*f) / n as f64;
            assert!(
                (0.4..0.6).contains(&p),
                "input bit {bit}, output bit {o}: {p}"
            );
        }
    }

    #[test]
    fn source_block_bucket_avalanches() {
        // Flipping any one bit of a block's head (service, generation,
        // family, length) or of the block flips each bit of its bucket in
        // 40 to 60 % of inputs.
        const BITS: usize = crate::limits::SOURCE_BLOCK_BUCKETS.trailing_zeros() as usize;
        let mut inputs = [(0u64, 0u64); 2000];
        for (slot, k) in inputs.iter_mut().zip(sample_keys(2000)) {
            let (lo, hi) = halves(&k.src);
            *slot = (lo & ((1 << 56) - 1), hi);
        }
        for bit in 0..56 + 64 {
            let mut flips = [0u32; BITS];
            for &(head, block) in &inputs {
                let (h, b) = if bit < 56 {
                    (head ^ 1 << bit, block)
                } else {
                    (head, block ^ 1 << (bit - 56))
                };
                let d = source_block_bucket(head, block) ^ source_block_bucket(h, b);
                count_flips(&mut flips, u64::from(d));
            }
            assert_avalanche(&flips, inputs.len(), bit);
        }
    }

    #[test]
    fn source_hash_avalanches() {
        // Flipping any one bit of the service id or the prefix flips each
        // of the 64 output bits (place and tag) in 40 to 60 % of inputs.
        let mut inputs = [(0u32, [0u8; 16]); 2000];
        for (slot, k) in inputs.iter_mut().zip(sample_keys(2000)) {
            *slot = (u32::from(k.sport) | u32::from(k.dport) << 16, k.src);
        }
        for bit in 0..32 + 128 {
            let mut flips = [0u32; 64];
            for (service, prefix) in &inputs {
                let (mut s, mut p) = (*service, *prefix);
                if bit < 32 {
                    s ^= 1 << bit;
                } else {
                    p[(bit - 32) / 8] ^= 1 << (bit % 8);
                }
                count_flips(
                    &mut flips,
                    source_hash(*service, prefix) ^ source_hash(s, &p),
                );
            }
            assert_avalanche(&flips, inputs.len(), bit);
        }
    }

    #[test]
    fn bucket_hash_spreads_neighbouring_flows() {
        // One client's consecutive ports over 4,096 buckets: about 16 each,
        // none far above (a Poisson(16) tail: 40 has odds below 1e-7).
        let base = sample_keys(1).next().unwrap();
        let mut load = [0u32; 4096];
        for port in 0..65536u32 {
            let k = FlowKey {
                sport: port as u16,
                ..base
            };
            load[((u64::from(bucket_hash(&k)) * 4096) >> 32) as usize] += 1;
        }
        let max = *load.iter().max().unwrap();
        assert!(max < 40, "a bucket got {max} of 65,536 flows");
    }

    #[test]
    fn maglev_slots_spread_flows_and_clients() {
        // One client's 65,536 ports over a table of 1,021 slots (a prime,
        // as the tables' sizes are): about 64 each; and 65,536 clients of
        // one /16 the same with client affinity. A uniform hash's least and
        // most loaded of 1,021 slots would hold about 40 and 90 (these
        // inputs: 40 to 94, and 39 to 89).
        const SLOTS: u32 = 1021;
        let base = sample_keys(1).next().unwrap();
        for affinity in [false, true] {
            let mut load = [0u32; SLOTS as usize];
            for i in 0..65536u32 {
                let mut k = base;
                if affinity {
                    k.src[2..4].copy_from_slice(&(i as u16).to_be_bytes());
                } else {
                    k.sport = i as u16;
                }
                load[maglev_slot(flow_hash(&k, affinity), SLOTS) as usize] += 1;
            }
            let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
            assert!(
                *min >= 30 && *max <= 100,
                "affinity {affinity}: slots got {min} to {max} flows"
            );
        }
    }

    #[test]
    fn a_connection_table_buckets_flows_spread_over_the_maglev_table() {
        // The flows that share a bucket (256 buckets here) take slots all
        // over a 65,537-slot table, not a run of 65,537 / 256 neighbours.
        const BUCKETS: u32 = 256;
        const SLOTS: u32 = 65_537;
        let base = sample_keys(1).next().unwrap();
        let mut span = [(u32::MAX, 0u32); BUCKETS as usize];
        for port in 0..65536u32 {
            let k = FlowKey {
                sport: port as u16,
                ..base
            };
            let first = crate::flow_buckets(bucket_hash(&k), BUCKETS)[0];
            let bucket = first / crate::limits::CONNTRACK_WAYS;
            let slot = maglev_slot(flow_hash(&k, false), SLOTS);
            let (lo, hi) = &mut span[bucket as usize];
            (*lo, *hi) = ((*lo).min(slot), (*hi).max(slot));
        }
        for (bucket, (lo, hi)) in span.iter().enumerate() {
            assert!(hi - lo > SLOTS / 2, "bucket {bucket}: slots {lo} to {hi}");
        }
    }

    #[test]
    fn the_service_index_spreads_a_block_of_vips_and_ports() {
        // 256 VIPs of a /24, each on ports 80 and 443, TCP and UDP: 1,024
        // keys over 4,096 elements of two ways. A uniform hash leaves about
        // 9 keys without a way (Poisson(0.25) beyond two); these leave 5,
        // and the products XORed without the last multiplication left 16.
        let mut load = [0u8; crate::limits::SERVICE_INDEX_ELEMENTS as usize];
        for i in 0..256u32 {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[198, 18, 0, i as u8]);
            for port in [80u16, 443] {
                for proto in [6, 17] {
                    load[service_index(&a, port.to_be(), proto) as usize] += 1;
                }
            }
        }
        let crowded: u32 = load.iter().map(|&n| u32::from(n.saturating_sub(2))).sum();
        assert!(crowded <= 12, "{crowded} keys without a way");
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
    fn the_filter_bit_folded_from_the_packet_is_the_addresses() {
        // What the data plane folds from the packet's bytes (two 8-byte
        // halves of an IPv6 address, the one word of an IPv4 address) picks
        // the bit user space set for the address.
        for k in sample_keys(4096) {
            let a = k.src;
            let half = |i: usize| u64::from_le_bytes(a[8 * i..8 * i + 8].try_into().unwrap());
            let folded = fold_halves(half(0), half(1));
            assert_eq!(vip_filter_bit_of_fold(folded), vip_filter_bit(&a));
            let mut v4 = [0u8; 16];
            v4[..4].copy_from_slice(&a[..4]);
            let word = u32::from_le_bytes(a[..4].try_into().unwrap());
            assert_eq!(vip_filter_bit_of_fold(word), vip_filter_bit(&v4));
        }
    }

    #[test]
    fn hash_bytes_depends_on_every_byte_and_length() {
        let base = hash_bytes(1, b"198.18.0.10");
        assert_ne!(base, hash_bytes(1, b"198.18.0.11"));
        assert_ne!(base, hash_bytes(1, b"198.18.0.10\0"));
        assert_ne!(base, hash_bytes(2, b"198.18.0.10"));
    }
}
