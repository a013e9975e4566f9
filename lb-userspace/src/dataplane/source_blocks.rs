//! The source lists' directory of blocks (`LB_SOURCE_SHAPES`,
//! `LB_SOURCE_BLOCKS`): for each service with lists, the blocks its
//! prefixes fall in, each with its list when one prefix holds it whole, so
//! that the data plane answers most new flows with one array read where the
//! trie walks a node a level. Derived from the trie's entries, which stay
//! the truth: a service whose blocks are not all in place is answered by
//! the trie.
//!
//! A rebuild never lets the data plane read a wrong answer. A change of a
//! service's entries first marks its blocks not ready (the trie answers);
//! [`SourceBlocks::sweep_unready`] empties the ways of every service not
//! ready, which no packet reads; [`SourceBlocks::place`] then writes the
//! service's blocks under its next generation into empty ways, the shape
//! that names that generation follows, and [`SourceBlocks::sweep`] empties
//! what a failed placement left of other generations. The data plane reads
//! the shape before and after the bucket, so a packet that raced a rewrite
//! asks the trie.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    BLOCK_MIXED, FAMILY_V4, FAMILY_V6, SourceBlock, SourceBlockBucket, SourceShape, addr_bytes,
    hash::source_block_bucket,
    limits::{SOURCE_BLOCK_BUCKETS, SOURCE_BLOCK_MAX_BITS},
};

use super::{Prefix, SourceEntries, SourceList};

/// The families in the order of [`SourceShape::len`].
const FAMILIES: [u8; 2] = [FAMILY_V4, FAMILY_V6];

/// One service's blocks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Plan {
    /// Bits of a block, per family ([`SourceShape::len`]).
    len: [u8; 2],
    /// Each block: its family, the block ([`SourceBlock::block`]) and its
    /// list ([`lb_common::ACL_DENY`], [`lb_common::ACL_ALLOW`] or
    /// [`BLOCK_MIXED`]).
    blocks: Vec<(u8, u64, u8)>,
}

/// The blocks of a service whose lists hold `entries`, as the trie holds
/// them: per family, blocks as long as its shortest prefix (at most
/// [`SOURCE_BLOCK_MAX_BITS`]), so that every prefix lies inside one. A block
/// that one prefix of exactly that length holds, alone, takes its list;
/// any other block that holds a prefix is mixed. The longest match in the
/// trie then agrees with the directory for every source: a source whose
/// block is not listed is in no prefix.
fn plan<'a>(entries: impl IntoIterator<Item = (&'a Prefix, &'a SourceList)>) -> Plan {
    let mut plan = Plan::default();
    let entries: Vec<_> = entries
        .into_iter()
        .map(|(&(ip, len), &list)| (addr_bytes(ip), len, list))
        .collect();
    for (i, family) in FAMILIES.into_iter().enumerate() {
        let Some(shortest) = entries
            .iter()
            .filter(|((_, f), ..)| *f == family)
            .map(|(_, len, _)| *len)
            .min()
        else {
            continue;
        };
        let len = shortest.min(SOURCE_BLOCK_MAX_BITS);
        plan.len[i] = len;
        // Block → its list if one prefix holds it whole, else mixed.
        let mut blocks: BTreeMap<u64, u8> = BTreeMap::new();
        for ((addr, _), prefix_len, list) in entries.iter().filter(|((_, f), ..)| *f == family) {
            let whole = if *prefix_len == len {
                list.value() as u8
            } else {
                BLOCK_MIXED
            };
            blocks
                .entry(SourceBlock::of(addr, len))
                .and_modify(|l| *l = BLOCK_MIXED)
                .or_insert(whole);
        }
        plan.blocks.extend(
            blocks
                .into_iter()
                .map(|(block, list)| (family, block, list)),
        );
    }
    plan
}

/// The directory as written, and the entries it is built from.
#[derive(Debug)]
pub(super) struct SourceBlocks {
    /// The buckets as written.
    buckets: Vec<SourceBlockBucket>,
    /// Each service's shape as written (none: all zero).
    shapes: BTreeMap<u32, SourceShape>,
    /// The trie's entries.
    entries: SourceEntries,
    /// Services whose entries changed since their blocks were placed.
    stale: BTreeSet<u32>,
    /// The last generation [`SourceBlocks::place`] gave each service: a
    /// placement whose writes failed part way leaves ways of its own
    /// generation, which the next placement must not take for its own.
    generations: BTreeMap<u32, u8>,
}

impl SourceBlocks {
    /// An empty directory (every bucket and shape zero) for the trie's
    /// `entries`, every service with entries stale.
    pub(super) fn new(entries: SourceEntries) -> Self {
        SourceBlocks {
            buckets: vec![SourceBlockBucket::default(); SOURCE_BLOCK_BUCKETS as usize],
            shapes: BTreeMap::new(),
            stale: entries.keys().map(|(id, _)| *id).collect(),
            entries,
            generations: BTreeMap::new(),
        }
    }

    /// Service `id`'s shape as written.
    pub(super) fn shape(&self, id: u32) -> SourceShape {
        self.shapes.get(&id).copied().unwrap_or_default()
    }

    /// Service `id`'s entries are about to change: it is stale (even if
    /// the change fails part way), and if its blocks are ready, the shape
    /// to write first: the same, not ready.
    pub(super) fn retire(&mut self, id: u32) -> Option<SourceShape> {
        self.stale.insert(id);
        let shape = self.shape(id);
        (shape.ready != 0).then_some(SourceShape { ready: 0, ..shape })
    }

    /// Service `id`'s `prefix` is now in `list` (`None`: in none), after
    /// [`SourceBlocks::retire`].
    pub(super) fn note(&mut self, id: u32, prefix: Prefix, list: Option<SourceList>) {
        match list {
            Some(l) => self.entries.insert((id, prefix), l),
            None => self.entries.remove(&(id, prefix)),
        };
    }

    /// The trie's entries, as written.
    pub(super) fn entries(&self) -> &SourceEntries {
        &self.entries
    }

    /// Whether service `id` has entries.
    pub(super) fn has_entries(&self, id: u32) -> bool {
        self.of(id).next().is_some()
    }

    /// Service `id`'s entries.
    fn of(&self, id: u32) -> impl Iterator<Item = (&Prefix, &SourceList)> {
        self.entries
            .range((id, MIN_PREFIX)..)
            .take_while(move |((i, _), _)| *i == id)
            .map(|((_, p), l)| (p, l))
    }

    /// Services whose blocks are to be placed again.
    pub(super) fn stale(&self) -> Vec<u32> {
        self.stale.iter().copied().collect()
    }

    /// Service `id`'s blocks under its next generation, in the first empty
    /// way of each block's bucket: the buckets to write, then the shape
    /// that names them. Not ready, and no bucket, when the service has no
    /// entries or a block finds no empty way.
    pub(super) fn place(&mut self, id: u32) -> (Vec<(u32, SourceBlockBucket)>, SourceShape) {
        let last = self.generations.get(&id).copied().unwrap_or_default();
        let generation = last.wrapping_add(1);
        self.generations.insert(id, generation);
        let plan = plan(self.of(id));
        let not_ready = SourceShape {
            generation,
            ready: 0,
            len: [0; 2],
        };
        if plan.blocks.is_empty() {
            return (Vec::new(), not_ready);
        }
        let shape = SourceShape {
            generation,
            ready: 1,
            len: plan.len,
        };
        let mut touched: BTreeMap<u32, SourceBlockBucket> = BTreeMap::new();
        for (family, block, list) in plan.blocks {
            let head = SourceBlock::head_of(id, generation, family, shape.len_of(family));
            let at = source_block_bucket(head, block);
            let bucket = touched
                .entry(at)
                .or_insert_with(|| self.buckets[at as usize]);
            let Some(way) = bucket.ways.iter_mut().find(|w| w.head == 0) else {
                return (Vec::new(), not_ready);
            };
            *way = SourceBlock::new(head, block, list);
        }
        (touched.into_iter().collect(), shape)
    }

    /// The buckets to write to empty service `id`'s ways of any generation
    /// but the one its ready shape names.
    pub(super) fn sweep(&self, id: u32) -> Vec<(u32, SourceBlockBucket)> {
        let shape = self.shape(id);
        let keep = |w: &SourceBlock| shape.ready != 0 && w.generation() == shape.generation;
        (0..)
            .zip(&self.buckets)
            .filter_map(|(i, b)| {
                let mut swept = *b;
                for w in &mut swept.ways {
                    if w.service() == Some(id) && !keep(w) {
                        *w = SourceBlock::default();
                    }
                }
                (swept != *b).then_some((i, swept))
            })
            .collect()
    }

    /// The buckets to write to empty the ways of every stale service whose
    /// shape is not ready, before any is placed: no packet reads them, and
    /// left until each service's own sweep they would take room its new
    /// blocks need (a service would need ways for its blocks twice over).
    pub(super) fn sweep_unready(&self) -> Vec<(u32, SourceBlockBucket)> {
        let unready: BTreeSet<u32> = self
            .stale
            .iter()
            .copied()
            .filter(|&id| self.shape(id).ready == 0)
            .collect();
        (0..)
            .zip(&self.buckets)
            .filter_map(|(i, b)| {
                let mut swept = *b;
                for w in &mut swept.ways {
                    if w.service().is_some_and(|id| unready.contains(&id)) {
                        *w = SourceBlock::default();
                    }
                }
                (swept != *b).then_some((i, swept))
            })
            .collect()
    }

    /// Bucket `at` now holds `bucket`. The record may run ahead of the
    /// kernel, never behind: ways a write fills are recorded before it, ways
    /// it empties after it, so every way the kernel may hold is known, kept
    /// from other blocks and swept in the end.
    pub(super) fn wrote_bucket(&mut self, at: u32, bucket: SourceBlockBucket) {
        self.buckets[at as usize] = bucket;
    }

    /// Service `id`'s shape is now `shape`.
    pub(super) fn wrote_shape(&mut self, id: u32, shape: SourceShape) {
        self.shapes.insert(id, shape);
    }

    /// Service `id`'s blocks are placed and swept.
    pub(super) fn settled(&mut self, id: u32) {
        self.stale.remove(&id);
    }

    /// What the data plane's directory says of `src` for service `id`, as
    /// `source_block` in lb-ebpf reads it: `Some` of its list (`None`: in
    /// no list), or `None` when the trie answers.
    #[cfg(test)]
    fn lookup(&self, id: u32, src: std::net::IpAddr) -> Option<Option<u32>> {
        let shape = self.shape(id);
        if shape.ready == 0 {
            return None;
        }
        let (addr, family) = addr_bytes(src);
        let len = shape.len_of(family);
        let head = SourceBlock::head_of(id, shape.generation, family, len);
        let block = SourceBlock::of(&addr, len);
        match self.buckets[source_block_bucket(head, block) as usize].find(head, block) {
            Some(BLOCK_MIXED) => None,
            found => Some(found.map(u32::from)),
        }
    }
}

/// The least prefix, where a service's entries start.
const MIN_PREFIX: Prefix = (std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use lb_common::{ACL_ALLOW, ACL_DENY};
    use proptest::prelude::*;

    use super::*;

    /// What the trie answers for `src` of service `id`: the list of the
    /// longest prefix holding it.
    fn longest_match(entries: &SourceEntries, id: u32, src: IpAddr) -> Option<u32> {
        entries
            .iter()
            .filter(|((i, (net, len)), _)| *i == id && holds(*net, *len, src))
            .max_by_key(|((_, (_, len)), _)| *len)
            .map(|(_, l)| l.value())
    }

    fn holds(net: IpAddr, len: u8, src: IpAddr) -> bool {
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 4),
            IpAddr::V6(a) => (u128::from(a), 6),
        };
        let ((n, fam_n), (s, fam_s)) = (bits(net), bits(src));
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        };
        fam_n == fam_s && n & mask == s & mask
    }

    /// Places and sweeps every stale service, as the data plane's writes do.
    fn settle(d: &mut SourceBlocks) {
        for (at, b) in d.sweep_unready() {
            d.wrote_bucket(at, b);
        }
        for id in d.stale() {
            let (buckets, shape) = d.place(id);
            for (at, b) in buckets {
                d.wrote_bucket(at, b);
            }
            d.wrote_shape(id, shape);
            for (at, b) in d.sweep(id) {
                d.wrote_bucket(at, b);
            }
            d.settled(id);
        }
    }

    fn v4(a: [u8; 4], len: u8) -> Prefix {
        (IpAddr::from(a), len)
    }

    #[test]
    fn blocks_are_as_long_as_the_shortest_prefix() {
        let entries: SourceEntries = [
            ((1, v4([198, 19, 0, 0], 16)), SourceList::Allow),
            ((1, v4([198, 18, 200, 1], 32)), SourceList::Deny),
            ((1, v4([198, 18, 204, 1], 32)), SourceList::Allow),
            (
                (
                    1,
                    (
                        IpAddr::from(Ipv6Addr::new(0x2001, 2, 0xc, 0, 0, 0, 0, 0)),
                        48,
                    ),
                ),
                SourceList::Allow,
            ),
            (
                (
                    1,
                    (
                        IpAddr::from(Ipv6Addr::new(0x2001, 2, 0xd, 0, 0, 0, 0, 5)),
                        128,
                    ),
                ),
                SourceList::Deny,
            ),
        ]
        .into();
        let p = plan(entries.iter().map(|((_, p), l)| (p, l)));
        assert_eq!(p.len, [16, 48]);
        let list_of = |family, block| {
            p.blocks
                .iter()
                .find(|(f, b, _)| *f == family && *b == block)
                .map(|(.., l)| *l)
        };
        let block = |a: IpAddr, len| SourceBlock::of(&addr_bytes(a).0, len);
        assert_eq!(
            list_of(FAMILY_V4, block(IpAddr::from([198, 19, 0, 0]), 16)),
            Some(ACL_ALLOW as u8)
        );
        assert_eq!(
            list_of(FAMILY_V4, block(IpAddr::from([198, 18, 0, 0]), 16)),
            Some(BLOCK_MIXED)
        );
        assert_eq!(
            list_of(
                FAMILY_V6,
                block(
                    IpAddr::from(Ipv6Addr::new(0x2001, 2, 0xd, 0, 0, 0, 0, 0)),
                    48
                )
            ),
            Some(BLOCK_MIXED)
        );
        assert_eq!(p.blocks.len(), 4);
        // IPv6 prefixes all past 64 bits: blocks of 64, all mixed.
        let long: SourceEntries = [(
            (1, (IpAddr::from(Ipv6Addr::LOCALHOST), 128)),
            SourceList::Deny,
        )]
        .into();
        let p = plan(long.iter().map(|((_, p), l)| (p, l)));
        assert_eq!(p.len, [0, 64]);
        assert_eq!(p.blocks, vec![(FAMILY_V6, 0, BLOCK_MIXED)]);
    }

    #[test]
    fn a_change_retires_the_blocks_until_they_are_placed_again() {
        let mut d = SourceBlocks::new([((3, v4([198, 18, 2, 0], 24)), SourceList::Deny)].into());
        assert_eq!(d.retire(3), None, "nothing placed yet");
        settle(&mut d);
        let src = IpAddr::from([198, 18, 2, 9]);
        assert_eq!(d.lookup(3, src), Some(Some(ACL_DENY)));
        assert_eq!(d.lookup(3, IpAddr::from([198, 18, 3, 9])), Some(None));
        let retired = d.retire(3).unwrap();
        assert_eq!(retired.ready, 0);
        d.wrote_shape(3, retired);
        d.note(3, v4([198, 18, 2, 0], 24), None);
        assert_eq!(d.lookup(3, src), None, "the trie answers meanwhile");
        settle(&mut d);
        // No entries left: not ready, and no way holds the service.
        assert_eq!(d.shape(3).ready, 0);
        assert!(d.buckets.iter().flat_map(|b| b.ways).all(|w| w.head == 0));
    }

    /// xorshift32's start for [`a_change_needs_room_for_the_service_s_blocks_once`].
    const SCATTER_SEED: u32 = 2;

    #[test]
    fn a_change_needs_room_for_the_service_s_blocks_once() {
        // Scattered blocks enough that a placement beside the old ones
        // overflows some bucket, where one alone fits (the seed is one
        // where it does).
        let mut x = SCATTER_SEED;
        let entries: SourceEntries = (0..2_450)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let [a, b, ..] = x.to_be_bytes();
                ((4, v4([10, a, b, 0], 24)), SourceList::Deny)
            })
            .collect();
        let mut d = SourceBlocks::new(entries);
        d.retire(4);
        settle(&mut d);
        assert_eq!(d.shape(4).ready, 1, "the first placement fits");
        let retired = d.retire(4).unwrap();
        d.wrote_shape(4, retired);
        d.note(4, v4([10, 200, 0, 0], 24), Some(SourceList::Allow));
        settle(&mut d);
        assert_eq!(d.shape(4).ready, 1, "the change's placement fits too");
        assert_eq!(
            d.lookup(4, IpAddr::from([10, 200, 0, 1])),
            Some(Some(ACL_ALLOW))
        );
    }

    #[test]
    fn a_service_whose_blocks_do_not_fit_is_left_to_the_trie() {
        let mut d = SourceBlocks::new(SourceEntries::new());
        // Fill every way of the bucket service 5's only block goes to.
        let block = SourceBlock::of(&addr_bytes(IpAddr::from([198, 18, 0, 0])).0, 16);
        let at = source_block_bucket(SourceBlock::head_of(5, 1, FAMILY_V4, 16), block);
        let full = SourceBlockBucket {
            ways: [SourceBlock::new(SourceBlock::head_of(9, 0, FAMILY_V6, 1), 1, 1); 4],
        };
        d.wrote_bucket(at, full);
        assert_eq!(d.retire(5), None, "nothing placed yet");
        d.note(5, v4([198, 18, 0, 0], 16), Some(SourceList::Allow));
        settle(&mut d);
        assert_eq!(d.shape(5).ready, 0);
        assert_eq!(d.lookup(5, IpAddr::from([198, 18, 1, 1])), None);
        assert_eq!(
            d.buckets[at as usize], full,
            "another service's ways untouched"
        );
    }

    #[test]
    fn a_placement_that_failed_leaves_nothing_the_next_one_answers_with() {
        let mut d = SourceBlocks::new([((2, v4([198, 18, 2, 0], 24)), SourceList::Deny)].into());
        // Placed and recorded, but the writes failed: no shape names it.
        let (buckets, failed) = d.place(2);
        for (at, b) in buckets {
            d.wrote_bucket(at, b);
        }
        // The lists change; the next placement succeeds.
        d.retire(2);
        d.note(2, v4([198, 18, 2, 0], 24), None);
        d.note(2, v4([198, 18, 3, 0], 24), Some(SourceList::Allow));
        settle(&mut d);
        assert_ne!(d.shape(2).generation, failed.generation);
        assert_eq!(d.lookup(2, IpAddr::from([198, 18, 2, 9])), Some(None));
        assert_eq!(
            d.lookup(2, IpAddr::from([198, 18, 3, 9])),
            Some(Some(ACL_ALLOW))
        );
        let left: Vec<_> = d
            .buckets
            .iter()
            .flat_map(|b| b.ways)
            .filter(|w| w.head != 0)
            .collect();
        assert_eq!(left.len(), 1, "only the placed block: {left:?}");
    }

    fn prefix() -> impl Strategy<Value = Prefix> {
        // A small space, so that prefixes nest and share blocks.
        prop_oneof![
            (0u8..4, 0u8..4, 0u8..=32).prop_map(|(c, d, len)| {
                let a = u32::from(Ipv4Addr::new(198, 18, c, d * 64));
                let mask = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len))
                };
                (IpAddr::from(Ipv4Addr::from(a & mask)), len)
            }),
            (0u16..4, 0u16..4, 0u8..=128).prop_map(|(c, d, len)| {
                let a = u128::from(Ipv6Addr::new(0x2001, 2, c, 0, d, 0, 0, 1));
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(len))
                };
                (IpAddr::from(Ipv6Addr::from(a & mask)), len)
            }),
        ]
    }

    fn source() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u8..5, any::<u8>()).prop_map(|(c, d)| IpAddr::from([198, 18, c, d])),
            (0u16..5, 0u16..5, any::<u16>())
                .prop_map(|(c, d, e)| IpAddr::from(Ipv6Addr::new(0x2001, 2, c, 0, d, 0, 0, e))),
        ]
    }

    fn list() -> impl Strategy<Value = SourceList> {
        prop_oneof![Just(SourceList::Deny), Just(SourceList::Allow)]
    }

    proptest! {
        /// Wherever the directory answers, it answers as the trie's longest
        /// match, through any sequence of changes to several services.
        #[test]
        fn the_directory_answers_as_the_longest_match(
            changes in proptest::collection::vec(
                (0u32..3, prefix(), proptest::option::of(list())), 1..40),
            sources in proptest::collection::vec(source(), 30),
        ) {
            let mut d = SourceBlocks::new(SourceEntries::new());
            for (i, (id, prefix, list)) in changes.into_iter().enumerate() {
                if let Some(shape) = d.retire(id) {
                    d.wrote_shape(id, shape);
                }
                d.note(id, prefix, list);
                if i % 3 == 0 {
                    settle(&mut d);
                }
                for &src in &sources {
                    for id in 0..3 {
                        if let Some(answer) = d.lookup(id, src) {
                            prop_assert_eq!(answer, longest_match(&d.entries, id, src));
                        }
                    }
                }
            }
            settle(&mut d);
            // Settled, every service with entries is ready and nothing
            // of an old generation is left.
            for id in 0..3 {
                let has = d.entries.keys().any(|(i, _)| *i == id);
                prop_assert_eq!(d.shape(id).ready != 0, has);
                prop_assert!(d.sweep(id).is_empty());
                for &src in &sources {
                    if let Some(answer) = d.lookup(id, src) {
                        prop_assert_eq!(answer, longest_match(&d.entries, id, src));
                    }
                }
            }
        }
    }
}
