//! Carrying a pinned connection table's entries into a new table, so that
//! established flows keep their backends across a restart with another
//! table size, or an upgrade that hashes flows another way (whose Maglev
//! slots differ too, so a dropped entry would move its flow). The pinned
//! table is read before this version's program is loaded, and its entries,
//! placed by this version's hash, are written into a new map that is pinned
//! in its place ([`super::Dataplane::load_pinned`]); the previous program
//! goes on using the old table until this one replaces it, and the entries
//! it wrote meanwhile are carried once it has
//! ([`super::Dataplane::conntrack_carry_late`]).

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{FlowEntry, FlowKey, flow_buckets, hash::bucket_hash, limits::CONNTRACK_WAYS};

use super::batch;

/// The ways of a flow's two buckets.
const WAYS: usize = 2 * CONNTRACK_WAYS as usize;

/// A pinned connection table whose entries are carried into a new one.
pub(super) struct PinnedTable {
    /// Held open past its pin's replacement, for the late entries.
    table: Array<MapData, FlowEntry>,
    /// Its elements when first read, by index.
    snapshot: Vec<(u32, FlowEntry)>,
}

impl PinnedTable {
    /// Opens the pinned table at `path` and reads every element.
    pub(super) fn open(path: &Path) -> Result<Self> {
        let map = MapData::from_pin(path).context("opening the pinned connection table")?;
        let table = Array::try_from(Map::Array(map))?;
        let snapshot = batch::array_all(&table, "the pinned connection table")?;
        Ok(PinnedTable { table, snapshot })
    }

    /// Whether an entry in use was placed by the previous version's hash:
    /// this version's program would not find it where it is.
    pub(super) fn placed_by_previous_hash(&self) -> bool {
        self.snapshot
            .iter()
            .any(|(_, e)| !e.is_free() && !e.is_readable() && of_previous_version(e))
    }

    /// The entries to carry, resealed ([`resealed`]).
    pub(super) fn entries(&self) -> Vec<FlowEntry> {
        self.snapshot
            .iter()
            .filter_map(|(_, e)| resealed(e))
            .collect()
    }

    /// The entries to carry that the previous program wrote or refreshed
    /// since the table was opened, resealed.
    pub(super) fn changed(&self) -> Result<Vec<FlowEntry>> {
        let now = batch::array_all(&self.table, "the previous connection table")?;
        // Both reads list every element, in order of index.
        Ok(now
            .iter()
            .zip(&self.snapshot)
            .filter(|(now, before)| now != before)
            .filter_map(|((_, e), _)| resealed(e))
            .collect())
    }
}

/// The bucket hash up to `FLOW_HASH_VERSION` 2, which placed and sealed
/// the entries of the version before this one: the key's five words
/// folded into a seed one after the other, then the finaliser.
fn previous_bucket_hash(key: &FlowKey) -> u32 {
    const SEED: u64 = 0x2545_f491_4f6c_dd1d;
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
    const FINISH: u64 = 0x94d0_49bb_1331_11eb;
    // SAFETY: a FlowKey is 40 bytes of plain integers, 8-aligned, with
    // explicit padding; the data plane reads it as these five words.
    let words = unsafe { std::mem::transmute::<FlowKey, [u64; 5]>(*key) };
    let h = words.iter().fold(SEED, |h, &w| {
        let h = (h ^ w).wrapping_mul(MULTIPLIER);
        h ^ (h >> 32)
    });
    let h = (h ^ (h >> 29)).wrapping_mul(FINISH);
    (h ^ (h >> 32)) as u32
}

/// `e` sealed by this version's hash, if it is an entry in use written
/// whole by this version or the previous one; `None` for a free entry, one
/// caught mid-write, or one of an older version (whose flow follows the
/// Maglev tables).
fn resealed(e: &FlowEntry) -> Option<FlowEntry> {
    let whole = e.is_readable() || of_previous_version(e);
    (!e.is_free() && whole).then(|| FlowEntry::new(e.key, e.value, bucket_hash(&e.key)))
}

/// Whether `e` was written whole by the previous version (sealed by its
/// hash).
fn of_previous_version(e: &FlowEntry) -> bool {
    FlowEntry::is_sealed(previous_bucket_hash(&e.key), &e.value, e.seal)
}

/// The indices of `flow`'s ways in a table of `buckets` buckets, in the
/// order the data plane reads them (its two buckets' ways alternating).
pub(super) fn ways_of(flow: &FlowKey, buckets: u32) -> [u32; WAYS] {
    let [a, b] = flow_buckets(bucket_hash(flow), buckets);
    std::array::from_fn(|i| if i % 2 == 0 { a } else { b } + (i / 2) as u32)
}

/// Which of `ways` (the elements at [`ways_of`]) an entry of `flow` is
/// written to, by the data plane's rule (`conntrack_lookup` in lb-ebpf's
/// maps): the flow's own entry; else the first free way of the bucket with
/// more free ways, the first bucket on a tie; else the least recently seen.
fn way_for(ways: &[FlowEntry; WAYS], flow: &FlowKey) -> usize {
    if let Some(own) = ways.iter().position(|e| e.key.same_flow(flow)) {
        return own;
    }
    let free = |bucket: usize| (bucket..WAYS).step_by(2).filter(|&i| ways[i].is_free());
    let (frees_a, frees_b) = (free(0).count(), free(1).count());
    let bucket = if frees_a >= frees_b { 0 } else { 1 };
    free(bucket).next().unwrap_or_else(|| {
        // No free way: the first least recently seen.
        (0..WAYS)
            .min_by_key(|&i| ways[i].value.last_seen)
            .unwrap_or(0)
    })
}

/// Places `entries` into an empty table of `buckets` buckets by the data
/// plane's rule, least recently seen first, so that where they do not all
/// fit the most recently seen stay: the elements to write, by index, and
/// how many entries were displaced.
pub(super) fn place_all(
    mut entries: Vec<FlowEntry>,
    buckets: u32,
) -> (Vec<(u32, FlowEntry)>, usize) {
    entries.sort_by_key(|e| e.value.last_seen);
    let mut table: HashMap<u32, FlowEntry> = HashMap::new();
    let mut displaced = 0;
    for e in entries {
        let at = ways_of(&e.key, buckets);
        let ways = at.map(|i| table.get(&i).copied().unwrap_or_default());
        let way = way_for(&ways, &e.key);
        if !ways[way].is_free() {
            displaced += 1;
        }
        table.insert(at[way], e);
    }
    let mut out: Vec<(u32, FlowEntry)> = table.into_iter().collect();
    out.sort_unstable_by_key(|&(i, _)| i);
    (out, displaced)
}

/// Writes `entries` into the live `table` of `buckets` buckets, each where
/// the data plane would: over its flow's own entry if it has one (this
/// version's program pinned the flow afresh when it missed, and the old
/// table has the backend the connection is on), else in a free or the
/// least recently seen way.
pub(super) fn place_live(
    table: &mut Array<MapData, FlowEntry>,
    buckets: u32,
    entries: &[FlowEntry],
) -> Result<()> {
    for e in entries {
        let at = ways_of(&e.key, buckets);
        let mut ways = [FlowEntry::default(); WAYS];
        for (way, &i) in ways.iter_mut().zip(&at) {
            *way = table.get(&i, 0).context("reading the connection table")?;
        }
        table
            .set(at[way_for(&ways, &e.key)], *e, 0)
            .context("writing the connection table")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lb_common::{FAMILY_V4, FAMILY_V6, FlowValue, addr_bytes};
    use proptest::prelude::*;

    use super::*;

    fn flow(src: std::net::IpAddr, sport: u16) -> FlowKey {
        let v6 = src.is_ipv6();
        let (src, family) = addr_bytes(src);
        let dst: std::net::IpAddr = if v6 {
            "2001:2:1::1".parse().unwrap()
        } else {
            "198.18.1.1".parse().unwrap()
        };
        FlowKey {
            src,
            dst: addr_bytes(dst).0,
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            family,
            _pad: [0; 2],
        }
    }

    fn value(backend: u32, last_seen: u32) -> FlowValue {
        FlowValue {
            backend,
            generation: 1,
            last_seen,
            flags: 0,
            service: 0,
        }
    }

    #[test]
    fn the_previous_hash_is_the_one_version_2_placed_entries_by() {
        // What version 2's `bucket_hash` gave these flows (computed with
        // it before it changed).
        let v4 = flow("198.18.2.9".parse().unwrap(), 40000);
        let udp = FlowKey {
            sport: 53u16.to_be(),
            dport: 53u16.to_be(),
            proto: 17,
            ..v4
        };
        let v6 = FlowKey {
            dport: 443u16.to_be(),
            ..flow("2001:2::9".parse().unwrap(), 40000)
        };
        assert_eq!((v4.family, v6.family), (FAMILY_V4, FAMILY_V6));
        assert_eq!(previous_bucket_hash(&v4), 0x93df_7b38);
        assert_eq!(previous_bucket_hash(&udp), 0xc565_1f43);
        assert_eq!(previous_bucket_hash(&v6), 0x4c27_36b9);
    }

    #[test]
    fn entries_of_this_and_the_previous_version_are_carried_resealed() {
        let f = flow("198.18.2.9".parse().unwrap(), 40000);
        let v = value(3, 10);
        let now = FlowEntry::new(f, v, bucket_hash(&f));
        let before = FlowEntry::new(f, v, previous_bucket_hash(&f));
        assert!(!before.is_readable());
        assert_eq!(resealed(&now), Some(now));
        assert_eq!(resealed(&before), Some(now));
        let torn = FlowEntry {
            seal: now.seal ^ 1,
            ..now
        };
        assert_eq!(resealed(&torn), None);
        assert_eq!(resealed(&FlowEntry::default()), None);
    }

    #[test]
    fn a_way_is_chosen_as_the_data_plane_chooses() {
        let f = flow("198.18.2.9".parse().unwrap(), 40000);
        let other = |i: u16, seen: u32| {
            let k = flow("198.18.3.3".parse().unwrap(), i);
            FlowEntry::new(k, value(1, seen), bucket_hash(&k))
        };
        let mut ways = [FlowEntry::default(); WAYS];
        // Empty: the first way of the first bucket.
        assert_eq!(way_for(&ways, &f), 0);
        // The first bucket fuller: the second bucket's first free way.
        ways[0] = other(1, 5);
        assert_eq!(way_for(&ways, &f), 1);
        ways[1] = other(2, 5);
        ways[3] = other(3, 5);
        assert_eq!(way_for(&ways, &f), 2);
        // Full: the least recently seen, the first of equals.
        for (i, w) in ways.iter_mut().enumerate() {
            *w = other(10 + i as u16, 9 - (i as u32 % 3));
        }
        assert_eq!(way_for(&ways, &f), 2);
        // The flow's own entry wins over everything.
        ways[6] = FlowEntry::new(f, value(2, 9), bucket_hash(&f));
        assert_eq!(way_for(&ways, &f), 6);
    }

    proptest! {
        #[test]
        fn every_carried_entry_is_where_a_lookup_finds_it(
            flows in proptest::collection::hash_set((any::<u32>(), any::<u16>()), 1..600),
            buckets_log2 in 4u32..8,
        ) {
            let buckets = 1 << buckets_log2;
            let entries: Vec<FlowEntry> = flows
                .iter()
                .enumerate()
                .map(|(n, &(src, sport))| {
                    let f = flow(std::net::Ipv4Addr::from(src).into(), sport);
                    FlowEntry::new(f, value(n as u32, n as u32 % 50), previous_bucket_hash(&f))
                })
                .collect();
            let carried: Vec<FlowEntry> = entries.iter().filter_map(resealed).collect();
            prop_assert_eq!(carried.len(), entries.len());
            let (placed, displaced) = place_all(carried, buckets);
            prop_assert_eq!(placed.len() + displaced, entries.len());
            prop_assert!(placed.iter().all(|&(i, _)| i < buckets * CONNTRACK_WAYS));
            let table: HashMap<u32, FlowEntry> = placed.iter().copied().collect();
            for (_, e) in &placed {
                // The data plane's lookup: the flow's ways, its entry
                // sealed by this version's hash.
                let found = ways_of(&e.key, buckets)
                    .iter()
                    .filter_map(|i| table.get(i))
                    .filter(|w| w.key.same_flow(&e.key) && w.is_readable())
                    .count();
                prop_assert_eq!(found, 1);
            }
        }
    }
}
