//! The forward counters. A forwarded packet costs the data plane one
//! counters update, its backend's [`BackendStats`]; a service's forwards
//! and the global forward counters are sums of those, added up here.
//!
//! Counts outlive their backend: when the controller releases a backend,
//! its counts move to its service's entry after the backends in the same
//! map, and a removed service's entry moves to the last one, so neither a
//! service's totals nor the global ones go back, and the next holder of an
//! id starts from zero. Those entries are pinned with the map, so they
//! survive a restart as the data plane's own counts do. A packet another
//! CPU is forwarding to the backend at the instant its counts move may be
//! left out of them.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues};
use lb_common::{BACKEND_F_UP, BackendStats, BackendValue, ForwardWay};

use super::{Capacity, batch};

/// A service's counters, summed over CPUs and over its backends.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded, as received (before encapsulation).
    pub bytes: u64,
    /// Flows that took a Maglev lookup (connection-table miss or TCP SYN).
    pub new_flows: u64,
    /// Packets matched to the service and then dropped: no backend in
    /// rotation, too big to encapsulate, or no way out to the backend. The
    /// reason is in the global counters; drops before a packet is matched
    /// (malformed headers, fragments) are there only.
    pub drops: u64,
}

/// The per-backend counters map and the per-service drops, with what user
/// space knows of which entries may hold counts.
pub(super) struct Stats {
    backends: PerCpuArray<MapData, BackendStats>,
    service_drops: PerCpuArray<MapData, u64>,
    max_backends: u32,
    max_services: u32,
    /// Entries that may hold counts (every one that does): what
    /// [`Stats::open`] found, backend ids written in this process, and
    /// entries counts were moved to.
    in_use: BTreeSet<u32>,
}

impl Stats {
    /// Opens the maps: fresh, or pinned ones adopted with `adopted`, the
    /// adopted backends. In use from then on: the entries holding counts,
    /// and the backends in service, whether or not they had counts yet.
    pub(super) fn open(
        backends: PerCpuArray<MapData, BackendStats>,
        service_drops: PerCpuArray<MapData, u64>,
        capacity: &Capacity,
        adopted: Option<&Array<MapData, BackendValue>>,
    ) -> Result<Stats> {
        let mut in_use = BTreeSet::new();
        // Fresh maps hold nothing.
        if let Some(adopted) = adopted {
            for i in 0..backends.len() {
                let per_cpu = backends
                    .get(&i, 0)
                    .context("reading the backend counters")?;
                if per_cpu.iter().any(|s| *s != BackendStats::default()) {
                    in_use.insert(i);
                }
            }
            for (id, b) in batch::array_all(adopted, "the adopted backends")? {
                if b.flags & BACKEND_F_UP != 0 {
                    in_use.insert(id);
                }
            }
        }
        Ok(Stats {
            backends,
            service_drops,
            max_backends: capacity.max_backends,
            max_services: capacity.max_services,
            in_use,
        })
    }

    /// The entry holding the counts of service `id`'s released backends.
    fn released_of(&self, service: u32) -> u32 {
        self.max_backends + service
    }

    /// The entry holding the counts of removed services.
    fn removed(&self) -> u32 {
        self.max_backends + self.max_services
    }

    /// Notes that the data plane may count packets to backend `id`.
    pub(super) fn note_backend(&mut self, id: u32) {
        self.in_use.insert(id);
    }

    /// The counts of entry `i`, summed over CPUs.
    fn entry(&self, i: u32) -> Result<BackendStats> {
        let per_cpu = self
            .backends
            .get(&i, 0)
            .with_context(|| format!("reading backend counters {i}"))?;
        Ok(BackendStats::total(per_cpu.iter()))
    }

    /// Counters of backend `id`, summed over CPUs.
    pub(super) fn backend(&self, id: u32) -> Result<BackendStats> {
        self.entry(id)
    }

    /// Counters of service `id`, whose backends are `backends`.
    pub(super) fn service(&self, id: u32, backends: &[u32]) -> Result<ServiceStats> {
        let mut sum = self.entry(self.released_of(id))?;
        for &b in backends {
            sum.add(&self.entry(b)?);
        }
        let drops = self
            .service_drops
            .get(&id, 0)
            .with_context(|| format!("reading service {id}'s drops"))?;
        Ok(ServiceStats {
            packets: sum.packets(),
            bytes: sum.bytes,
            new_flows: sum.new_flows,
            drops: drops.iter().sum(),
        })
    }

    /// Packets forwarded by each way, summed over every entry.
    pub(super) fn forwarded(&self) -> Result<[u64; ForwardWay::COUNT]> {
        let mut sum = BackendStats::default();
        for &i in &self.in_use {
            sum.add(&self.entry(i)?);
        }
        Ok(sum.forwarded)
    }

    /// Moves the counts of entry `from` onto entry `to`, and zeroes `from`.
    fn fold(&mut self, from: u32, to: u32) -> Result<()> {
        if !self.in_use.contains(&from) {
            return Ok(());
        }
        let moved = self.backends.get(&from, 0)?;
        if moved.iter().all(|s| *s == BackendStats::default()) {
            return Ok(());
        }
        let onto = self.backends.get(&to, 0)?;
        let sum: Vec<BackendStats> = onto
            .iter()
            .zip(moved.iter())
            .map(|(a, b)| {
                let mut a = *a;
                a.add(b);
                a
            })
            .collect();
        let zero = vec![BackendStats::default(); sum.len()];
        // The sum first: a failure between the writes counts twice, never
        // loses.
        self.backends.set(to, PerCpuValues::try_from(sum)?, 0)?;
        self.in_use.insert(to);
        self.backends.set(from, PerCpuValues::try_from(zero)?, 0)?;
        Ok(())
    }

    /// Moves released backend `id`'s counts to its service's, or with no
    /// service to the removed services'.
    pub(super) fn release_backend(&mut self, id: u32, service: Option<u32>) -> Result<()> {
        let to = service.map_or(self.removed(), |s| self.released_of(s));
        self.fold(id, to)
            .with_context(|| format!("moving the counts of released backend {id}"))
    }

    /// Moves removed service `id`'s counts (of backends already released)
    /// to the removed services', and zeroes its drops.
    pub(super) fn release_service(&mut self, id: u32) -> Result<()> {
        self.fold(self.released_of(id), self.removed())
            .and_then(|()| {
                let cpus = self.service_drops.get(&id, 0)?.len();
                self.service_drops
                    .set(id, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
                Ok(())
            })
            .with_context(|| format!("moving the counts of removed service {id}"))
    }
}
