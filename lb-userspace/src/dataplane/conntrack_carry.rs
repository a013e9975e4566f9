//! Carrying a pinned connection table's entries into a new table, so that
//! established flows keep their backends across a restart with another
//! table size, or an upgrade that hashes flows another way (whose Maglev
//! slots differ too, so a dropped entry would move its flow) or lays the
//! entries out another way. The pinned table is read before this version's
//! program is loaded, and its flows, placed by this version's hash, are
//! written into a new map that is pinned in its place
//! ([`super::Dataplane::load_pinned`]); the previous program goes on using
//! the old table until this one replaces it, and the entries it wrote
//! meanwhile are carried once it has
//! ([`super::Dataplane::conntrack_carry_late`]).

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{
    FlowEntry, FlowKey, FlowValue, ServiceKey, ServiceValue, flow_buckets, hash::bucket_hash,
    limits::CONNTRACK_WAYS,
};

use super::batch;

/// The ways of a flow's two buckets.
const WAYS: usize = 2 * CONNTRACK_WAYS as usize;

/// A flow carried over: its key, and its value as its entry held it.
pub(super) type Carried = (FlowKey, FlowValue);

/// The services' keys by id, which complete a [`FlowEntry`]'s flow.
pub(super) type ServiceKeys = HashMap<u32, ServiceKey>;

/// The keys of the services in `services` (the services hash), by id.
pub(super) fn service_keys_by_id(
    services: &aya::maps::HashMap<MapData, ServiceKey, ServiceValue>,
) -> Result<ServiceKeys> {
    services
        .iter()
        .map(|kv| {
            let (key, value) = kv.context("reading the services")?;
            Ok((value.id, key))
        })
        .collect()
}

/// The flow of `e`, an entry of this version's layout, if it is in use,
/// its service is in `services` and it is sealed for the flow that
/// service completes: what the data plane would find.
pub(super) fn carried(e: &FlowEntry, services: &ServiceKeys) -> Option<Carried> {
    if e.is_free() {
        return None;
    }
    let key = e.key(services.get(&e.value().service)?);
    Some((key, e.sealed_value(bucket_hash(&key))?))
}

/// The entry of versions whose entries held the whole flow (64 bytes):
/// read from their pinned tables, to carry.
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub(super) struct WholeFlowEntry {
    key: FlowKey,
    value: FlowValue,
    seal: u32,
}

// SAFETY: plain #[repr(C)] integers with no padding (the assert).
unsafe impl aya::Pod for WholeFlowEntry {}

/// Bytes of a [`WholeFlowEntry`]: a pinned table of them is carried.
pub(super) const WHOLE_FLOW_ENTRY_BYTES: u32 = 64;
const _: () = assert!(size_of::<WholeFlowEntry>() == WHOLE_FLOW_ENTRY_BYTES as usize);

impl WholeFlowEntry {
    /// The seal of such an entry of a flow hashing to `hash`: over the
    /// whole generation.
    fn seal(hash: u32, v: &FlowValue) -> u32 {
        FlowEntry::seal_fields(hash, v.backend, v.generation, v.service)
    }

    /// Its flow, if written whole by a version that sealed with this
    /// version's hash or the one before; `None` for a free entry or one
    /// caught mid-write.
    fn carried(&self) -> Option<Carried> {
        let sealed = |hash| Self::seal(hash, &self.value) == self.seal;
        let whole = sealed(bucket_hash(&self.key)) || sealed(previous_bucket_hash(&self.key));
        (self.key.family != 0 && whole).then_some((self.key, self.value))
    }
}

/// A pinned table held open past its pin's replacement, for the late
/// entries, with its elements when first read, by index.
pub(super) struct Snapshot<T: aya::Pod> {
    table: Array<MapData, T>,
    first: Vec<(u32, T)>,
}

impl<T: aya::Pod + PartialEq> Snapshot<T> {
    fn open(map: MapData) -> Result<Self> {
        let table = Array::try_from(Map::Array(map))?;
        let first = batch::array_all(&table, "the pinned connection table")?;
        Ok(Snapshot { table, first })
    }

    /// The flows `carry` finds in the elements as first read.
    fn entries(&self, carry: impl Fn(&T) -> Option<Carried>) -> Vec<Carried> {
        self.first.iter().filter_map(|(_, e)| carry(e)).collect()
    }

    /// The flows `carry` finds in the elements changed since.
    fn changed(&self, carry: impl Fn(&T) -> Option<Carried>) -> Result<Vec<Carried>> {
        let now = batch::array_all(&self.table, "the previous connection table")?;
        // Both reads list every element, in order of index.
        Ok(now
            .iter()
            .zip(&self.first)
            .filter(|(now, before)| now != before)
            .filter_map(|((_, e), _)| carry(e))
            .collect())
    }
}

/// A pinned connection table whose entries are carried into a new one, in
/// either layout.
pub(super) enum PinnedTable {
    /// This version's entries, completed by the services' keys.
    Client(Snapshot<FlowEntry>, ServiceKeys),
    /// Entries holding the whole flow.
    Whole(Snapshot<WholeFlowEntry>),
}

impl PinnedTable {
    /// Opens the pinned table at `path` and reads every element: entries
    /// of this version's layout, whose flows `services` completes, or of
    /// the whole-flow layout.
    pub(super) fn open(path: &Path, services: ServiceKeys) -> Result<Self> {
        let map = MapData::from_pin(path).context("opening the pinned connection table")?;
        Ok(if map.info()?.value_size() == WHOLE_FLOW_ENTRY_BYTES {
            PinnedTable::Whole(Snapshot::open(map)?)
        } else {
            PinnedTable::Client(Snapshot::open(map)?, services)
        })
    }

    /// The flows to carry.
    pub(super) fn entries(&self) -> Vec<Carried> {
        match self {
            PinnedTable::Client(t, services) => t.entries(|e| carried(e, services)),
            PinnedTable::Whole(t) => t.entries(WholeFlowEntry::carried),
        }
    }

    /// The flows to carry whose entries the previous program wrote or
    /// refreshed since the table was opened.
    pub(super) fn changed(&self) -> Result<Vec<Carried>> {
        match self {
            PinnedTable::Client(t, services) => t.changed(|e| carried(e, services)),
            PinnedTable::Whole(t) => t.changed(WholeFlowEntry::carried),
        }
    }
}

/// The bucket hash up to `FLOW_HASH_VERSION` 2, which placed and sealed
/// the entries of the version before the one before this: the key's five
/// words folded into a seed one after the other, then the finaliser.
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

/// The indices of `flow`'s ways in a table of `buckets` buckets, in the
/// order the data plane reads them (its two buckets' ways alternating).
pub(super) fn ways_of(flow: &FlowKey, buckets: u32) -> [u32; WAYS] {
    let [a, b] = flow_buckets(bucket_hash(flow), buckets);
    std::array::from_fn(|i| if i % 2 == 0 { a } else { b } + (i / 2) as u32)
}

/// Whether `e` is the entry of `flow`, whose bucket hash is `hash`.
pub(super) fn holds(e: &FlowEntry, flow: &FlowKey, hash: u32) -> bool {
    e.same_client(flow) && e.sealed_value(hash).is_some()
}

/// Which of `ways` (the elements at [`ways_of`]) an entry of `flow` is
/// written to, by the data plane's rule (`conntrack_lookup` in lb-ebpf's
/// maps): the flow's client's own entry (the data plane writes over it
/// whether or not it is sealed for the flow); else the first free way of
/// the bucket with more free ways, the first bucket on a tie; else the
/// least recently seen.
fn way_for(ways: &[FlowEntry; WAYS], flow: &FlowKey) -> usize {
    if let Some(own) = ways.iter().position(|e| e.same_client(flow)) {
        return own;
    }
    let free = |bucket: usize| (bucket..WAYS).step_by(2).filter(|&i| ways[i].is_free());
    let (frees_a, frees_b) = (free(0).count(), free(1).count());
    let bucket = if frees_a >= frees_b { 0 } else { 1 };
    free(bucket).next().unwrap_or_else(|| {
        // No free way: the first least recently seen.
        (0..WAYS)
            .min_by_key(|&i| ways[i].value().last_seen)
            .unwrap_or(0)
    })
}

/// Places `flows` into an empty table of `buckets` buckets by the data
/// plane's rule, least recently seen first, so that where they do not all
/// fit the most recently seen stay: the elements to write, by index, and
/// how many flows were displaced.
pub(super) fn place_all(mut flows: Vec<Carried>, buckets: u32) -> (Vec<(u32, FlowEntry)>, usize) {
    flows.sort_by_key(|(_, v)| v.last_seen);
    let mut table: HashMap<u32, FlowEntry> = HashMap::new();
    let mut displaced = 0;
    for (key, value) in flows {
        let at = ways_of(&key, buckets);
        let ways = at.map(|i| table.get(&i).copied().unwrap_or_default());
        let way = way_for(&ways, &key);
        if !ways[way].is_free() {
            displaced += 1;
        }
        table.insert(at[way], FlowEntry::new(&key, &value, bucket_hash(&key)));
    }
    let mut out: Vec<(u32, FlowEntry)> = table.into_iter().collect();
    out.sort_unstable_by_key(|&(i, _)| i);
    (out, displaced)
}

/// Writes `flows` into the live `table` of `buckets` buckets, each where
/// the data plane would: over its flow's own entry if it has one (this
/// version's program pinned the flow afresh when it missed, and the old
/// table has the backend the connection is on), else in a free or the
/// least recently seen way. The program runs meanwhile, and an array has
/// no compare-and-swap from user space: an entry it writes into the chosen
/// way between the reads and the write is lost, and that flow's next
/// packet makes it again (as after [`super::Dataplane::conntrack_remove`]).
pub(super) fn place_live(
    table: &mut Array<MapData, FlowEntry>,
    buckets: u32,
    flows: &[Carried],
) -> Result<()> {
    for (key, value) in flows {
        let at = ways_of(key, buckets);
        let mut ways = [FlowEntry::default(); WAYS];
        for (way, &i) in ways.iter_mut().zip(&at) {
            *way = table.get(&i, 0).context("reading the connection table")?;
        }
        let entry = FlowEntry::new(key, value, bucket_hash(key));
        table
            .set(at[way_for(&ways, key)], entry, 0)
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
    fn whole_flow_entries_of_this_and_the_previous_hash_are_carried() {
        let f = flow("198.18.2.9".parse().unwrap(), 40000);
        let v = value(3, 10);
        // A generation past the entry's 16 bits, which the seal of this
        // layout covered whole.
        let v = FlowValue {
            generation: 0x1_0002,
            ..v
        };
        let whole = |hash| WholeFlowEntry {
            key: f,
            value: v,
            seal: WholeFlowEntry::seal(hash, &v),
        };
        assert_eq!(whole(bucket_hash(&f)).carried(), Some((f, v)));
        assert_eq!(whole(previous_bucket_hash(&f)).carried(), Some((f, v)));
        let torn = WholeFlowEntry {
            seal: whole(bucket_hash(&f)).seal ^ 1,
            ..whole(bucket_hash(&f))
        };
        assert_eq!(torn.carried(), None);
        assert_eq!(WholeFlowEntry::default().carried(), None);
    }

    #[test]
    fn entries_are_carried_with_their_services_keys() {
        let f = flow("2001:2::9".parse().unwrap(), 40000);
        let v = FlowValue {
            service: 7,
            ..value(3, 10)
        };
        let e = FlowEntry::new(&f, &v, bucket_hash(&f));
        let services = HashMap::from([(7, f.service_key())]);
        assert_eq!(carried(&e, &services), Some((f, v)));
        // A service gone, or another's key: not carried.
        assert_eq!(carried(&e, &HashMap::new()), None);
        let other = FlowKey {
            dport: 8443u16.to_be(),
            ..f
        };
        assert_eq!(
            carried(&e, &HashMap::from([(7, other.service_key())])),
            None
        );
        assert_eq!(carried(&FlowEntry::default(), &services), None);
    }

    #[test]
    fn a_way_is_chosen_as_the_data_plane_chooses() {
        let f = flow("198.18.2.9".parse().unwrap(), 40000);
        let other = |i: u16, seen: u32| {
            let k = flow("198.18.3.3".parse().unwrap(), i);
            FlowEntry::new(&k, &value(1, seen), bucket_hash(&k))
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
        ways[6] = FlowEntry::new(&f, &value(2, 9), bucket_hash(&f));
        assert_eq!(way_for(&ways, &f), 6);
    }

    proptest! {
        #[test]
        fn every_carried_entry_is_where_a_lookup_finds_it(
            flows in proptest::collection::hash_set((any::<u32>(), any::<u16>()), 1..600),
            buckets_log2 in 4u32..8,
        ) {
            let buckets = 1 << buckets_log2;
            let entries: Vec<WholeFlowEntry> = flows
                .iter()
                .enumerate()
                .map(|(n, &(src, sport))| {
                    let key = flow(std::net::Ipv4Addr::from(src).into(), sport);
                    let value = value(n as u32, n as u32 % 50);
                    let seal = WholeFlowEntry::seal(previous_bucket_hash(&key), &value);
                    WholeFlowEntry { key, value, seal }
                })
                .collect();
            let carried: Vec<Carried> = entries.iter().filter_map(WholeFlowEntry::carried).collect();
            prop_assert_eq!(carried.len(), entries.len());
            let (placed, displaced) = place_all(carried.clone(), buckets);
            prop_assert_eq!(placed.len() + displaced, entries.len());
            prop_assert!(placed.iter().all(|&(i, _)| i < buckets * CONNTRACK_WAYS));
            let table: HashMap<u32, FlowEntry> = placed.iter().copied().collect();
            let mut found = 0;
            for (key, value) in &carried {
                // The data plane's lookup: the flow's ways, its entry
                // sealed by this version's hash.
                let hash = bucket_hash(key);
                let hits: Vec<FlowValue> = ways_of(key, buckets)
                    .iter()
                    .filter_map(|i| table.get(i))
                    .filter(|w| holds(w, key, hash))
                    .filter_map(|w| w.sealed_value(hash))
                    .collect();
                prop_assert!(hits.len() <= 1);
                if let Some(hit) = hits.first() {
                    prop_assert_eq!(hit.backend, value.backend);
                    found += 1;
                }
            }
            prop_assert_eq!(found, placed.len());
        }
    }
}
