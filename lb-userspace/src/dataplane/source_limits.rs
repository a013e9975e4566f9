//! The services' new-flow limits per source in the kernel: each limited
//! service's [`SourceLimit`] by id, the drops by source, and the sample of
//! limited source prefixes each CPU keeps (see `within_limit` in lb-ebpf).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use aya::maps::PerCpuValues;
use lb_common::{Addr, LimitedSource, SourceDrops, SourceLimit};

use super::Dataplane;

/// A source prefix the data plane limited, merged over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitedPrefix {
    /// The service's id.
    pub service: u32,
    /// The prefix, masked, in the service's family (network order).
    pub prefix: Addr,
    /// New flows limited since the prefix took its slots (a lower bound
    /// of all it had limited: a slot keeps one prefix at a time).
    pub drops: u64,
    /// The data plane's second of its last limited flow.
    pub last: u32,
}

impl Dataplane {
    /// Writes service `id`'s limit, or clears it. Written before the
    /// service's flags name it, as the controller orders it. A new prefix
    /// length forgets the service's sampled prefixes, which were masked
    /// with the old one and would be shown with the new.
    pub fn set_source_limit(&mut self, id: u32, limit: Option<&SourceLimit>) -> Result<()> {
        let limit = limit.copied().unwrap_or_default();
        let before = self
            .source_limits
            .get(&id, 0)
            .with_context(|| format!("reading the new-flow limit of service {id}"))?;
        self.source_limits
            .set(id, limit, 0)
            .with_context(|| format!("writing the new-flow limit of service {id}"))?;
        if before.mask != limit.mask {
            self.forget_limited_prefixes(id)?;
        }
        Ok(())
    }

    /// Packets of service `id` dropped by its source lists and its limit,
    /// summed over CPUs.
    pub fn source_drops(&self, id: u32) -> Result<SourceDrops> {
        Ok(self
            .source_drops
            .get(&id, 0)?
            .iter()
            .fold(SourceDrops::default(), |a, s| SourceDrops {
                denied: a.denied + s.denied,
                not_allowed: a.not_allowed + s.not_allowed,
                limited: a.limited + s.limited,
            }))
    }

    /// Forgets what released service `id` counted by source, its drops by
    /// reason and its sampled prefixes, so the next holder of the id
    /// starts from nothing instead of showing them as its own. A sample
    /// another service's packet writes into a slot between its read and
    /// its write here may be lost: samples are a bounded, best-effort view.
    pub(super) fn forget_source_counts(&mut self, id: u32) -> Result<()> {
        let cpus = self.source_drops.get(&id, 0)?.len();
        self.source_drops.set(
            id,
            PerCpuValues::try_from(vec![SourceDrops::default(); cpus])?,
            0,
        )?;
        self.forget_limited_prefixes(id)
    }

    /// Empties the sample's slots that hold prefixes of service `id`.
    fn forget_limited_prefixes(&mut self, id: u32) -> Result<()> {
        let holder = id + 1;
        for i in 0..self.limited_sources.len() {
            let slots = self.limited_sources.get(&i, 0)?;
            if slots.iter().any(|s| s.service == holder) {
                let kept: Vec<LimitedSource> = slots
                    .iter()
                    .map(|s| {
                        if s.service == holder {
                            LimitedSource::default()
                        } else {
                            *s
                        }
                    })
                    .collect();
                self.limited_sources
                    .set(i, PerCpuValues::try_from(kept)?, 0)?;
            }
        }
        Ok(())
    }

    /// The sampled limited prefixes, each merged over the CPUs that hold
    /// it (drops summed, the latest second kept), most drops first.
    pub fn limited_prefixes(&self) -> Result<Vec<LimitedPrefix>> {
        let mut merged: BTreeMap<(u32, Addr), LimitedPrefix> = BTreeMap::new();
        for slot in self.limited_sources.iter() {
            let slot = slot.context("reading the limited sources")?;
            for s in slot.iter().filter(|s: &&LimitedSource| s.service != 0) {
                let service = s.service - 1;
                let e = merged.entry((service, s.prefix)).or_insert(LimitedPrefix {
                    service,
                    prefix: s.prefix,
                    drops: 0,
                    last: 0,
                });
                e.drops += s.drops;
                e.last = e.last.max(s.last);
            }
        }
        let mut out: Vec<_> = merged.into_values().collect();
        out.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.service.cmp(&b.service)));
        Ok(out)
    }
}
