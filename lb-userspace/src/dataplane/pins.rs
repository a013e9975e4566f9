//! Adopting the maps a previous daemon pinned. A pin is adopted only if it
//! has exactly the shape this version's programs were compiled against
//! (type, key and value sizes, flags, capacity): a program given a map of
//! another shape would misread it, or the kernel would refuse the program.
//!
//! What happens to a pin of another shape depends on what it holds. The
//! desired state (services, VIPs, tables, backends, source lists) is
//! refused, all of it checked before anything changes, with the way out in
//! the error; but the backends of a version before their seal
//! ([`LEGACY_BACKEND_BYTES`]) or with another seal are carried over
//! ([`Migration`]), so are the source lists of a trie of another capacity,
//! and so are the connection table's entries when the
//! table has another size or holds whole flows (the 64-byte entries of
//! versions before entries held the client's side only, sealed by this
//! version's hash or the one before): the flows' backends, which the
//! Maglev tables would not give them all again. Maps that only hold what
//! the programs or the daemon derive again (counters, settings, the VIP
//! filter, a connection table of
//! another layout) are replaced, with a warning that says what is lost: an
//! upgrade that changes their layout, or a new connection-table size,
//! needs no stop.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use lb_common::{AclKey, BackendValue, maps as names};

use super::{
    Capacity, EBPF_OBJECT, batch,
    conntrack_carry::{PinnedTable, ServiceKeys, WHOLE_FLOW_ENTRY_BYTES, service_keys_by_id},
};

/// What a map's contents are, for what adopting a pin of another shape means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holds {
    /// State the controller wrote: refused, never silently dropped.
    Desired,
    /// Rebuilt or re-counted from nothing: replaced, with this consequence.
    Derived(&'static str),
}

fn holds(name: &str) -> Holds {
    match name {
        names::SERVICES | names::VIPS | names::RINGS | names::BACKENDS | names::ACL => {
            Holds::Desired
        }
        names::CONNTRACK => Holds::Derived(
            "its entries are dropped: established flows follow the Maglev tables, \
             which send each to the backend it had unless a table changed since",
        ),
        names::COUNTERS
        | names::SERVICE_DROPS
        | names::BACKEND_STATS
        | names::SOURCE_DROPS
        | names::DECAP_COUNTERS => Holds::Derived("its counters start again from zero"),
        names::DECAP_ADDRS | names::DECAP_SOURCES | names::DECAP_VIPS => {
            Holds::Derived("lb decap writes it again from its file")
        }
        _ => Holds::Derived("the daemon writes it again"),
    }
}

/// A map's shape, as the kernel reports it and as the object declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    flags: u32,
    max_entries: u32,
}

impl Shape {
    /// What differs between `self` (pinned) and `want`, in words.
    fn differences(&self, want: &Shape) -> String {
        let mut out = Vec::new();
        let mut field = |what: &str, have: u32, want: u32| {
            if have != want {
                out.push(format!("{what}: pinned {have}, needed {want}"));
            }
        };
        field("map type", self.map_type, want.map_type);
        field("key bytes", self.key_size, want.key_size);
        field("value bytes", self.value_size, want.value_size);
        field("flags", self.flags, want.flags);
        field("entries", self.max_entries, want.max_entries);
        out.join("; ")
    }
}

/// The shape of map `name` this object needs with `capacity`.
fn wanted(object: &aya_obj::Object, name: &str, capacity: &Capacity) -> Result<Shape> {
    let map = object
        .maps
        .get(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    let overridden = capacity
        .map_entries()?
        .into_iter()
        .find_map(|(n, entries)| (n == name).then_some(entries));
    Ok(Shape {
        map_type: map.map_type(),
        key_size: map.key_size(),
        value_size: map.value_size(),
        flags: map.map_flags(),
        max_entries: overridden.unwrap_or(map.max_entries()),
    })
}

fn pinned(path: &Path, name: &str) -> Result<Shape> {
    let info = MapData::from_pin(path)
        .with_context(|| format!("opening pinned map {name}"))?
        .info()
        .with_context(|| format!("reading pinned map {name}"))?;
    Ok(Shape {
        map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        key_size: info.key_size(),
        value_size: info.value_size(),
        flags: info.map_flags(),
        max_entries: info.max_entries(),
    })
}

/// The size of a backend before the seal (address, MAC, family, flags and
/// generation, in [`BackendValue`]'s order): lb up to commit 843bb42.
const LEGACY_BACKEND_BYTES: u32 = 28;

/// State carried over from pins of an earlier layout or configuration,
/// into new maps that replace the old pins.
#[derive(Default)]
pub(super) struct Migration {
    /// Backends of a pinned map without seals or sealed another way, by id,
    /// to write sealed.
    pub backends: Option<Vec<(u32, BackendValue)>>,
    /// A pinned connection table of another size or of whole-flow entries,
    /// to carry into a new one.
    pub conntrack: Option<PinnedTable>,
    /// The source lists of a pinned trie of another capacity (the prefix
    /// length and key, the list), to write into a new one.
    pub source_lists: Option<Vec<(Key<AclKey>, u32)>>,
}

/// Every prefix of the pinned source-list trie at `path`.
fn pinned_source_lists(path: &Path) -> Result<Vec<(Key<AclKey>, u32)>> {
    let map = MapData::from_pin(path).context("opening the pinned source lists")?;
    let trie: LpmTrie<MapData, AclKey, u32> = LpmTrie::try_from(aya::maps::Map::LpmTrie(map))?;
    trie.iter()
        .map(|e| e.context("reading the pinned source lists"))
        .collect()
}

/// The backends of the pinned map at `path`, of this version's layout, if
/// any of them is not whole by this version's seal: sealed by another
/// version (no packet program writes backends, and no daemon runs while
/// this one starts, so none is caught mid-write), whose program, still
/// attached, reads them. This version's program gets them, sealed its way,
/// in a map of its own ([`Migration`]); `None` when the pin can be adopted
/// as it is.
fn resealed_backends(path: &Path) -> Result<Option<Vec<(u32, BackendValue)>>> {
    let map = MapData::from_pin(path).context("opening the pinned backends")?;
    let array: aya::maps::Array<MapData, BackendValue> =
        aya::maps::Array::try_from(aya::maps::Map::Array(map))?;
    let all = batch::array_all(&array, "the pinned backends")?;
    let written: Vec<(u32, BackendValue)> = all
        .into_iter()
        .filter(|(_, b)| *b != BackendValue::default())
        .collect();
    Ok(written
        .iter()
        .any(|(_, b)| !b.is_whole())
        .then_some(written))
}

/// The keys of the services pinned under `dir`, by id (none without a
/// pin): what completes a pinned connection table's flows. Read from the
/// services hash, which every version pinned (the slots came later), and
/// which is desired state, adopted as it is or refused.
fn pinned_service_keys(dir: &Path) -> Result<ServiceKeys> {
    let path = dir.join(names::SERVICES);
    if !path.exists() {
        return Ok(ServiceKeys::new());
    }
    let map = MapData::from_pin(&path).context("opening the pinned services")?;
    service_keys_by_id(&aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map))?)
}

/// Reads every backend of the pinned map at `path`, of the layout before
/// the seal.
fn legacy_backends(path: &Path) -> Result<Vec<(u32, BackendValue)>> {
    let map = MapData::from_pin(path).context("opening the pinned backends")?;
    let entries = map.info()?.max_entries();
    let array: aya::maps::Array<MapData, [u8; LEGACY_BACKEND_BYTES as usize]> =
        aya::maps::Array::try_from(aya::maps::Map::Array(map))?;
    let mut out = Vec::new();
    for id in 0..entries {
        let b = array.get(&id, 0).context("reading a pinned backend")?;
        if b.iter().all(|&x| x == 0) {
            continue;
        }
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&b[..16]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[16..22]);
        out.push((
            id,
            BackendValue {
                addr,
                mac,
                family: b[22],
                flags: b[23],
                generation: u32::from_ne_bytes([b[24], b[25], b[26], b[27]]),
                seal: 0,
            },
        ));
    }
    Ok(out)
}

/// Makes the pins of `maps` under `dir` adoptable by this object with `capacity`:
/// refuses (changing nothing) if a map of desired state has another shape,
/// else removes the pins of derived maps that do, so they are created anew.
/// Backends of the layout before the seal, or sealed by another version,
/// source lists in a trie of another capacity, and a connection table of
/// another size or of whole-flow entries, are
/// read for the caller to carry over; their pins stay
/// until the new maps replace them.
pub(super) fn reconcile(dir: &Path, maps: &[&str], capacity: &Capacity) -> Result<Migration> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")?;
    let mut refused = Vec::new();
    let mut replace = Vec::new();
    let mut migration = Migration::default();
    for &name in maps {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let (have, want) = (pinned(&path, name)?, wanted(&object, name, capacity)?);
        if have == want {
            if name == names::BACKENDS {
                migration.backends = resealed_backends(&path)?;
            }
            // Tables of this layout hold no entry of an earlier hash.
            continue;
        }
        let differences = have.differences(&want);
        // Another size, or whole-flow entries (then perhaps placed by the
        // hash before this one).
        if name == names::CONNTRACK
            && (Shape {
                max_entries: want.max_entries,
                value_size: want.value_size,
                ..have
            }) == want
            && (have.value_size == want.value_size || have.value_size == WHOLE_FLOW_ENTRY_BYTES)
        {
            migration.conntrack = Some(PinnedTable::open(&path, pinned_service_keys(dir)?)?);
            continue;
        }
        // Source lists of another capacity (the trie grew to hold old and
        // new lists side by side during a change): carried over.
        if name == names::ACL
            && (Shape {
                max_entries: want.max_entries,
                ..have
            }) == want
        {
            migration.source_lists = Some(pinned_source_lists(&path)?);
            continue;
        }
        if name == names::BACKENDS
            && have.value_size == LEGACY_BACKEND_BYTES
            && (Shape {
                value_size: want.value_size,
                ..have
            }) == want
        {
            migration.backends = Some(legacy_backends(&path)?);
            continue;
        }
        match holds(name) {
            Holds::Desired => refused.push(format!("{name} ({differences})")),
            Holds::Derived(consequence) => replace.push((name, path, differences, consequence)),
        }
    }
    if !refused.is_empty() {
        bail!(
            "pinned maps made by another version or configuration: {}. The table size, \
             capacities and layouts of the desired state cannot change under a running data \
             plane (stop lb, remove {}, start again; forwarding stops meanwhile)",
            refused.join(", "),
            dir.display()
        );
    }
    for (name, path, differences, consequence) in replace {
        std::fs::remove_file(&path)
            .with_context(|| format!("removing the pin {}", path.display()))?;
        tracing::warn!(
            map = name,
            "replacing the pinned map {name}, made by another version or configuration \
             ({differences}): {consequence}"
        );
    }
    Ok(migration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{ALL_MAPS, decap::DECAP_MAPS};

    #[test]
    fn every_map_of_the_object_is_classified_and_sized() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        let capacity = Capacity::default();
        for name in ALL_MAPS.iter().chain(&DECAP_MAPS) {
            let shape = wanted(&object, name, &capacity).unwrap();
            assert!(shape.key_size > 0 && shape.value_size > 0, "{name}");
        }
        for desired in [names::SERVICES, names::RINGS, names::BACKENDS] {
            assert_eq!(holds(desired), Holds::Desired);
        }
        assert!(matches!(holds(names::CONNTRACK), Holds::Derived(_)));
    }

    #[test]
    fn capacities_override_the_objects_sizes() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        // Rounded up to whole groups of buckets.
        let capacity = Capacity {
            conntrack_entries: 4000,
            ..Capacity::default()
        };
        let shape = wanted(&object, names::CONNTRACK, &capacity).unwrap();
        assert_eq!(shape.max_entries, 4032);
        assert_eq!(shape.value_size as usize, size_of::<lb_common::FlowEntry>());
    }

    #[test]
    fn differences_name_each_field() {
        let want = Shape {
            map_type: 9,
            key_size: 40,
            value_size: 16,
            flags: 0,
            max_entries: 100,
        };
        let have = Shape {
            value_size: 8,
            flags: 2,
            ..want
        };
        assert_eq!(
            have.differences(&want),
            "value bytes: pinned 8, needed 16; flags: pinned 2, needed 0"
        );
    }
}
