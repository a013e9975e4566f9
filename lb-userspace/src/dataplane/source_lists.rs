//! The services' source lists (`deny`, `allow`) in the kernel: one LPM trie
//! keyed by service id, then family and address, each prefix with the list
//! it is in, which the program consults for new flows of services whose
//! flags say they have a list (see `admits` in lb-ebpf).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use aya::maps::lpm_trie::Key;
use lb_common::{
    ACL_ALLOW, ACL_DENY, AclKey, SourceBlockBucket, SourceKey, SourceShape, addr_ip,
    limits::SOURCE_BLOCK_BUCKETS,
};
use serde::{Deserialize, Serialize};

use super::{Dataplane, Prefix, batch, source_blocks::SourceBlocks};

/// Which of a service's source lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceList {
    /// Packets from these sources are dropped; wins over `allow`.
    Deny,
    /// When not empty, the only sources whose packets are taken.
    Allow,
}

impl SourceList {
    /// The list's name, as the configuration spells it.
    pub fn name(self) -> &'static str {
        match self {
            SourceList::Deny => "deny",
            SourceList::Allow => "allow",
        }
    }

    /// The trie's value for a prefix of this list.
    pub(super) fn value(self) -> u32 {
        match self {
            SourceList::Deny => ACL_DENY,
            SourceList::Allow => ACL_ALLOW,
        }
    }
}

/// The trie's prefixes: (service id, prefix) → the list it stands for.
pub type SourceEntries = BTreeMap<(u32, Prefix), SourceList>;

/// `entries` in the order to add them to a trie that still answers for the
/// lists they replace: each prefix after every prefix inside it. Added the
/// other way, a wide new `allow` could be the longest match for a source
/// that a narrower new `deny` inside it, not written yet, and the old lists
/// both refuse. A prefix inside another starts at or after it and, at the
/// same address, is longer, so the map's order reversed is that order.
pub fn insertion_order(
    entries: &SourceEntries,
) -> impl Iterator<Item = (&(u32, Prefix), &SourceList)> {
    entries.iter().rev()
}

fn key(service_id: u32, (ip, len): Prefix) -> Key<AclKey> {
    Key::new(
        AclKey::prefix_len(u32::from(len)),
        AclKey {
            service: service_id.to_be_bytes(),
            source: SourceKey::new(ip),
        },
    )
}

impl Dataplane {
    /// Every prefix of the trie.
    pub fn source_entries(&self) -> Result<SourceEntries> {
        let mut out = BTreeMap::new();
        for entry in &self.acl {
            let (k, v) = entry.context("listing the source lists")?;
            let list = match v {
                ACL_DENY => SourceList::Deny,
                ACL_ALLOW => SourceList::Allow,
                other => bail!("a source-list entry holds {other}, neither deny nor allow"),
            };
            let data = k.data();
            let len = k.prefix_len().saturating_sub(AclKey::prefix_len(0)) as u8;
            let ip = addr_ip(&data.source.addr, data.source.family);
            out.insert((u32::from_be_bytes(data.service), (ip, len)), list);
        }
        Ok(out)
    }

    /// Every prefix of the trie as this data plane wrote it (or read it
    /// back when it loaded): [`Dataplane::source_entries`] without the
    /// walk of the trie.
    pub fn written_source_entries(&self) -> &SourceEntries {
        self.source_blocks.entries()
    }

    /// Puts `prefix` of service `service_id` in the trie as `list`'s. The
    /// trie answers for the service until
    /// [`Dataplane::settle_source_blocks`] places its blocks again.
    pub fn set_source_entry(
        &mut self,
        service_id: u32,
        prefix: Prefix,
        list: SourceList,
    ) -> Result<()> {
        self.retire_source_blocks(service_id)?;
        self.acl
            .insert(&key(service_id, prefix), list.value(), 0)
            .with_context(|| {
                format!(
                    "adding {}/{} to the {} list of service {service_id}",
                    prefix.0,
                    prefix.1,
                    list.name()
                )
            })?;
        self.source_blocks.note(service_id, prefix, Some(list));
        Ok(())
    }

    /// Takes `prefix` of service `service_id` out of the trie; as
    /// [`Dataplane::set_source_entry`] for the directory of blocks.
    pub fn remove_source_entry(&mut self, service_id: u32, prefix: Prefix) -> Result<()> {
        self.retire_source_blocks(service_id)?;
        self.acl.remove(&key(service_id, prefix)).with_context(|| {
            format!(
                "removing {}/{} from the source lists of service {service_id}",
                prefix.0, prefix.1
            )
        })?;
        self.source_blocks.note(service_id, prefix, None);
        Ok(())
    }

    /// Hands service `service_id`'s new flows to the trie, before its
    /// entries change.
    fn retire_source_blocks(&mut self, service_id: u32) -> Result<()> {
        if let Some(shape) = self.source_blocks.retire(service_id) {
            self.write_source_shape(service_id, shape)?;
        }
        Ok(())
    }

    fn write_source_shape(&mut self, service_id: u32, shape: SourceShape) -> Result<()> {
        self.source_shapes
            .set(service_id, shape, 0)
            .with_context(|| format!("writing the source blocks' shape of service {service_id}"))?;
        self.source_blocks.wrote_shape(service_id, shape);
        Ok(())
    }

    /// Writes `buckets`, which fill ways (`fill`) or empty them, and records
    /// them as [`SourceBlocks::wrote_bucket`] asks: before a write that
    /// fills, after one that empties.
    fn write_source_buckets(
        &mut self,
        buckets: &[(u32, SourceBlockBucket)],
        fill: bool,
    ) -> Result<()> {
        let record = |blocks: &mut SourceBlocks| {
            for &(at, bucket) in buckets {
                blocks.wrote_bucket(at, bucket);
            }
        };
        if fill {
            record(&mut self.source_blocks);
        }
        batch::array_write(&mut self.source_blocks_map, buckets, "the source blocks")?;
        if !fill {
            record(&mut self.source_blocks);
        }
        Ok(())
    }

    /// Places the blocks of every service whose entries changed since
    /// theirs were placed (see `source_blocks`): its new blocks, then the
    /// shape that names them, then its old blocks out. Until then the trie
    /// answers for it; a service whose blocks do not fit stays with the
    /// trie.
    pub fn settle_source_blocks(&mut self) -> Result<()> {
        let swept = self.source_blocks.sweep_unready();
        self.write_source_buckets(&swept, false)?;
        for id in self.source_blocks.stale() {
            let (buckets, shape) = self.source_blocks.place(id);
            self.write_source_buckets(&buckets, true)?;
            self.write_source_shape(id, shape)?;
            let swept = self.source_blocks.sweep(id);
            self.write_source_buckets(&swept, false)?;
            self.source_blocks.settled(id);
            if shape.ready == 0 && self.source_blocks.has_entries(id) {
                tracing::warn!(
                    service = id,
                    "the source lists' directory has no room for this service's blocks: \
                     its new flows take the trie"
                );
            }
        }
        Ok(())
    }

    /// Whether the directory of blocks answers for service `service_id`
    /// (as the kernel's map says), rather than the trie alone.
    pub fn source_blocks_ready(&self, service_id: u32) -> Result<bool> {
        let shape = self
            .source_shapes
            .get(&service_id, 0)
            .with_context(|| format!("reading the source blocks' shape of service {service_id}"))?;
        Ok(shape.ready != 0)
    }

    /// Empties the directory of blocks (every service to the trie), then
    /// places every service's blocks from the trie's entries: what an
    /// adopted directory held is not trusted.
    pub(super) fn rebuild_source_blocks(&mut self) -> Result<()> {
        let shapes: Vec<(u32, SourceShape)> = (0..self.capacity.max_services)
            .map(|id| (id, SourceShape::default()))
            .collect();
        batch::array_write(
            &mut self.source_shapes,
            &shapes,
            "the source blocks' shapes",
        )?;
        let empty: Vec<(u32, SourceBlockBucket)> = (0..SOURCE_BLOCK_BUCKETS)
            .map(|at| (at, SourceBlockBucket::default()))
            .collect();
        batch::array_write(&mut self.source_blocks_map, &empty, "the source blocks")?;
        self.source_blocks = SourceBlocks::new(self.source_entries()?);
        self.settle_source_blocks()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    /// `outer` holds `inner` (a prefix of the same family, as long or
    /// shorter, whose bits `inner`'s address starts with).
    fn holds((outer, olen): Prefix, (inner, ilen): Prefix) -> bool {
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(a) => (u128::from(a.to_bits()), 32),
            IpAddr::V6(a) => (a.to_bits(), 128),
        };
        let ((o, of), (i, fi)) = (bits(outer), bits(inner));
        let mask = |len: u8| (!0u128).checked_shl(u32::from(of - len)).unwrap_or(0);
        of == fi && olen <= ilen && i & mask(olen) == o & mask(olen)
    }

    fn prefix() -> impl Strategy<Value = Prefix> {
        // Few distinct top bits, so that prefixes nest often.
        prop_oneof![
            (0u32..4, 0u8..=32).prop_map(|(top, len)| {
                let a = (0xc612_0000 | top << 8)
                    & (!0u32).checked_shl(32 - u32::from(len)).unwrap_or(0);
                (IpAddr::V4(Ipv4Addr::from_bits(a)), len)
            }),
            (0u128..4, 0u8..=128).prop_map(|(top, len)| {
                let a = (0x2001_0002_u128 << 96 | top << 64)
                    & (!0u128).checked_shl(128 - u32::from(len)).unwrap_or(0);
                (IpAddr::V6(Ipv6Addr::from_bits(a)), len)
            }),
        ]
    }

    proptest! {
        /// Every prefix is added after every other prefix of its service
        /// inside it.
        #[test]
        fn each_prefix_comes_after_the_prefixes_inside_it(
            entries in proptest::collection::vec((0u32..2, prefix()), 1..40),
        ) {
            let entries: SourceEntries =
                entries.into_iter().map(|k| (k, SourceList::Deny)).collect();
            let order: Vec<_> = insertion_order(&entries).map(|(k, _)| *k).collect();
            for (i, &(id, outer)) in order.iter().enumerate() {
                for &(later_id, later) in &order[i + 1..] {
                    prop_assert!(
                        !(id == later_id && holds(outer, later)),
                        "{outer:?} added before {later:?}, which it holds"
                    );
                }
            }
        }
    }
}
