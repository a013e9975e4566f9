//! The rings map: every service's Maglev table, one each, in one array.
//!
//! [`RingMemory`] is the array mapped into this process: a change to a
//! table is a store per slot it moves, made in place, where the program
//! reads it (a 4-byte store is whole to every reader). [`RingSpace`] says
//! which slots hold which table: a service's table stays where it is for
//! its life, and moves only when its size changes, to a free range written
//! before the service entry names it.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::MapData;
use lb_common::{
    RingChunk, ServiceKey,
    limits::{RING_CHUNK_SLOTS, RING_RETIRE_GRACE_MS},
};
use memmap2::{MmapMut, MmapOptions};

/// Slots `offset..offset + len` of the rings map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First slot.
    pub offset: u32,
    /// Slots.
    pub len: u32,
}

impl Region {
    fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.len)
    }
}

/// A table replaced by one elsewhere: its slots stay as they are until
/// `until`, for packets that read the service just before.
#[derive(Debug)]
struct Retired {
    region: Region,
    /// The service whose table it was, while it still has one: a change
    /// undone in that time takes the region back, holding what it held.
    owner: Option<ServiceKey>,
    until: Instant,
}

/// Which slots of the rings map are free, in use, or held back.
#[derive(Debug)]
pub(super) struct RingSpace {
    slots: u32,
    /// Free ranges, start → length; neighbours are merged.
    free: BTreeMap<u32, u32>,
    retired: Vec<Retired>,
}

/// How long a replaced table's slots are held back.
const GRACE: Duration = Duration::from_millis(RING_RETIRE_GRACE_MS);

impl RingSpace {
    /// A rings map of `slots` slots, all free.
    pub(super) fn new(slots: u32) -> RingSpace {
        let free = (slots > 0).then_some((0, slots)).into_iter().collect();
        RingSpace {
            slots,
            free,
            retired: Vec::new(),
        }
    }

    /// Marks `region` in use: an adopted service's table. Fails if any of
    /// it is not free (beyond the map, or another table's).
    pub(super) fn reserve(&mut self, region: Region) -> Result<()> {
        let (start, len) = self
            .free
            .range(..=region.offset)
            .next_back()
            .map(|(&s, &l)| (s, l))
            .filter(|&(s, l)| region.len > 0 && u64::from(s) + u64::from(l) >= region.end())
            .with_context(|| {
                format!(
                    "slots {}..{} of the rings map are beyond its {} slots or another table's",
                    region.offset,
                    region.end(),
                    self.slots
                )
            })?;
        self.free.remove(&start);
        if region.offset > start {
            self.free.insert(start, region.offset - start);
        }
        let end = u64::from(start) + u64::from(len);
        if end > region.end() {
            // Below `end`, which is at most `slots`: fits in u32.
            self.free
                .insert(region.end() as u32, (end - region.end()) as u32);
        }
        Ok(())
    }

    /// A region of `len` slots for a table of `owner`: the one `owner`'s
    /// table of that size left within the grace time if any (it holds
    /// that table, so the change undoing it writes only what differs),
    /// else the first free range it fits. Regions past their grace time
    /// are free again first.
    pub(super) fn allocate(
        &mut self,
        len: u32,
        owner: &ServiceKey,
        now: Instant,
    ) -> Result<Region> {
        if let Some(i) = self
            .retired
            .iter()
            .rposition(|r| r.owner.as_ref() == Some(owner) && r.region.len == len)
        {
            return Ok(self.retired.swap_remove(i).region);
        }
        let (done, held): (Vec<Retired>, Vec<Retired>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|r| r.until <= now);
        self.retired = held;
        for r in done {
            self.release(r.region);
        }
        let start = self
            .free
            .iter()
            .find(|&(_, &l)| l >= len)
            .map(|(&s, _)| s)
            .with_context(|| {
                let held: u64 = self.retired.iter().map(|r| u64::from(r.region.len)).sum();
                format!(
                    "no room for a table of {len} slots in the rings map: {} of its {} slots \
                     free (largest range {}), {held} held for a second by tables just \
                     replaced; a larger max_services or max_backends makes it larger",
                    self.free_slots(),
                    self.slots,
                    self.free.values().max().unwrap_or(&0),
                )
            })?;
        let region = Region { offset: start, len };
        self.reserve(region)?;
        Ok(region)
    }

    /// Holds back `region`, a table no service entry names any more, for
    /// the grace time. `owner`: the service it was a table of, if that
    /// service still has one.
    pub(super) fn retire(&mut self, region: Region, owner: Option<ServiceKey>, now: Instant) {
        self.retired.push(Retired {
            region,
            owner,
            until: now + GRACE,
        });
    }

    /// Frees `region` at once: one nothing names, nor ever did.
    pub(super) fn release(&mut self, region: Region) {
        if region.len == 0 {
            return;
        }
        let (mut start, mut len) = (region.offset, region.len);
        if let Some((&s, &l)) = self.free.range(..start).next_back()
            && u64::from(s) + u64::from(l) == u64::from(start)
        {
            self.free.remove(&s);
            (start, len) = (s, l + len);
        }
        if let Some(&l) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += l;
        }
        self.free.insert(start, len);
    }

    /// Slots neither in use nor held back.
    pub(super) fn free_slots(&self) -> u64 {
        self.free.values().map(|&l| u64::from(l)).sum()
    }
}

/// The rings map, mapped into this process. Its fd stays open with the
/// mapping, so the map is the process's as other maps are (fdinfo, tools).
pub(super) struct RingMemory {
    map: MmapMut,
    slots: u32,
    _fd: MapData,
}

impl RingMemory {
    /// Maps `map`, an array of [`RingChunk`]s created memory-mappable.
    pub(super) fn open(map: MapData) -> Result<RingMemory> {
        let info = map.info().context("reading the rings map's shape")?;
        ensure!(
            info.value_size() as usize == size_of::<RingChunk>(),
            "the rings map has {}-byte elements, not {}",
            info.value_size(),
            size_of::<RingChunk>()
        );
        let slots = info
            .max_entries()
            .checked_mul(RING_CHUNK_SLOTS)
            .context("the rings map holds more than 2^32 slots")?;
        // SAFETY: the map's memory lives as long as the mapping; the
        // program reads it concurrently, which is why it is only ever
        // touched through atomics (`Self::slots`).
        let mapped = unsafe {
            MmapOptions::new()
                .len(slots as usize * size_of::<u32>())
                .map_mut(map.fd().as_fd().as_raw_fd())
        }
        .context("mapping the rings map (created without BPF_F_MMAPABLE?)")?;
        Ok(RingMemory {
            map: mapped,
            slots,
            _fd: map,
        })
    }

    /// Slots in the map.
    pub(super) fn len(&self) -> u32 {
        self.slots
    }

    fn slots(&self, region: Region) -> Result<&[AtomicU32]> {
        ensure!(
            region.end() <= u64::from(self.slots),
            "slots {}..{} beyond the rings map's {}",
            region.offset,
            region.end(),
            self.slots
        );
        // SAFETY: the mapping is page-aligned and `slots` u32s long (checked
        // above), and AtomicU32 has u32's layout; shared memory the kernel
        // reads as it changes is what atomics are for.
        let all = unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU32>(), self.slots as usize)
        };
        Ok(&all[region.offset as usize..region.end() as usize])
    }

    /// The table in `region`.
    pub(super) fn read(&self, region: Region) -> Result<Vec<u32>> {
        Ok(self
            .slots(region)?
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect())
    }

    /// Makes `region` hold `table`, storing only the slots that differ.
    /// Returns how many it stored.
    pub(super) fn write(&mut self, region: Region, table: &[u32]) -> Result<usize> {
        ensure!(
            table.len() == region.len as usize,
            "a table of {} slots for a region of {}",
            table.len(),
            region.len
        );
        let mut stored = 0;
        for (slot, &value) in self.slots(region)?.iter().zip(table) {
            if slot.load(Ordering::Relaxed) != value {
                slot.store(value, Ordering::Release);
                stored += 1;
            }
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use lb_common::FAMILY_V4;
    use proptest::prelude::*;

    use super::*;

    fn key(port: u16) -> ServiceKey {
        ServiceKey {
            addr: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port,
            proto: 6,
            family: FAMILY_V4,
        }
    }

    fn region(offset: u32, len: u32) -> Region {
        Region { offset, len }
    }

    #[test]
    fn allocations_are_first_fit_and_released_space_merges() {
        let now = Instant::now();
        let mut s = RingSpace::new(100);
        let a = s.allocate(30, &key(1), now).unwrap();
        let b = s.allocate(30, &key(2), now).unwrap();
        let c = s.allocate(30, &key(3), now).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 30, 60));
        assert!(s.allocate(11, &key(4), now).is_err());
        s.release(a);
        s.release(b);
        // a and b merged: 60 slots from 0.
        assert_eq!(s.allocate(60, &key(4), now).unwrap(), region(0, 60));
        assert_eq!(s.free_slots(), 10);
    }

    #[test]
    fn a_retired_region_is_held_for_the_grace_time() {
        let now = Instant::now();
        let mut s = RingSpace::new(100);
        let a = s.allocate(60, &key(1), now).unwrap();
        s.retire(a, None, now);
        let err = s.allocate(60, &key(2), now).unwrap_err().to_string();
        assert!(err.contains("60 held for a second"), "{err}");
        let later = now + GRACE;
        assert_eq!(s.allocate(60, &key(2), later).unwrap(), region(0, 60));
    }

    #[test]
    fn its_owner_takes_a_retired_region_of_the_same_size_back() {
        let now = Instant::now();
        let mut s = RingSpace::new(100);
        let a = s.allocate(40, &key(1), now).unwrap();
        let b = s.allocate(50, &key(1), now).unwrap();
        s.retire(a, Some(key(1)), now);
        // Another service, or another size, does not.
        assert!(s.allocate(40, &key(2), now).is_err());
        assert_eq!(s.allocate(40, &key(1), now).unwrap(), a);
        s.retire(b, None, now);
        assert!(s.allocate(50, &key(1), now).is_err(), "a removed service's");
    }

    #[test]
    fn reserving_takes_only_free_slots() {
        let mut s = RingSpace::new(100);
        s.reserve(region(10, 20)).unwrap();
        s.reserve(region(30, 70)).unwrap();
        assert!(s.reserve(region(25, 10)).is_err(), "overlaps");
        assert!(s.reserve(region(95, 10)).is_err(), "beyond the map");
        assert!(s.reserve(region(0, 0)).is_err(), "empty");
        assert_eq!(s.free_slots(), 10);
        s.reserve(region(0, 10)).unwrap();
        assert_eq!(s.free_slots(), 0);
    }

    proptest! {
        /// Whatever the sequence, regions in use never overlap, and
        /// releasing everything leaves the whole map free in one range.
        #[test]
        fn regions_never_overlap(ops in prop::collection::vec((1u32..40, any::<bool>()), 1..60)) {
            let now = Instant::now();
            let mut s = RingSpace::new(200);
            let mut used: Vec<Region> = Vec::new();
            for (i, (len, release)) in ops.into_iter().enumerate() {
                if release && !used.is_empty() {
                    s.release(used.swap_remove(i % used.len()));
                } else if let Ok(r) = s.allocate(len, &key(i as u16), now) {
                    prop_assert!(r.end() <= 200);
                    for u in &used {
                        prop_assert!(r.end() <= u64::from(u.offset) || u.end() <= u64::from(r.offset));
                    }
                    used.push(r);
                }
                let in_use: u64 = used.iter().map(|r| u64::from(r.len)).sum();
                prop_assert_eq!(s.free_slots() + in_use, 200);
            }
            for r in used {
                s.release(r);
            }
            prop_assert_eq!(s.free.len(), 1);
        }
    }
}
