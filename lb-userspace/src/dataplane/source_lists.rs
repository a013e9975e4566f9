//! The services' source lists (`deny`, `allow`): LPM tries keyed by service
//! id, then family and address, which the program consults for services
//! whose flags say they have a list (see `admits` in lb-ebpf).

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::Key;
use lb_common::{AclKey, AclStats, SourceKey, addr_ip};
use serde::{Deserialize, Serialize};

use super::{Dataplane, Prefix};

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
}

/// One prefix of one service's list, as the maps hold it.
pub type SourceEntry = (SourceList, u32, Prefix);

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
    /// Every prefix of every service's lists.
    pub fn source_entries(&self) -> Result<BTreeSet<SourceEntry>> {
        let mut out = BTreeSet::new();
        for (list, trie) in [
            (SourceList::Deny, &self.acl_deny),
            (SourceList::Allow, &self.acl_allow),
        ] {
            for k in trie.keys() {
                let k = k.with_context(|| format!("listing the {} lists", list.name()))?;
                let data = k.data();
                let bits = AclKey::prefix_len(0);
                let len = k.prefix_len().saturating_sub(bits) as u8;
                let ip = addr_ip(&data.source.addr, data.source.family);
                out.insert((list, u32::from_be_bytes(data.service), (ip, len)));
            }
        }
        Ok(out)
    }

    /// Adds `prefix` to service `service_id`'s `list`.
    pub fn add_source_entry(&mut self, (list, service_id, prefix): &SourceEntry) -> Result<()> {
        let trie = match list {
            SourceList::Deny => &mut self.acl_deny,
            SourceList::Allow => &mut self.acl_allow,
        };
        trie.insert(&key(*service_id, *prefix), 1, 0)
            .with_context(|| {
                format!(
                    "adding {}/{} to the {} list of service {service_id}",
                    prefix.0,
                    prefix.1,
                    list.name()
                )
            })
    }

    /// Removes `prefix` from service `service_id`'s `list`.
    pub fn remove_source_entry(&mut self, (list, service_id, prefix): &SourceEntry) -> Result<()> {
        let trie = match list {
            SourceList::Deny => &mut self.acl_deny,
            SourceList::Allow => &mut self.acl_allow,
        };
        trie.remove(&key(*service_id, *prefix)).with_context(|| {
            format!(
                "removing {}/{} from the {} list of service {service_id}",
                prefix.0,
                prefix.1,
                list.name()
            )
        })
    }

    /// Packets of service `id` its source lists dropped, summed over CPUs.
    pub fn source_list_stats(&self, id: u32) -> Result<AclStats> {
        Ok(self
            .acl_stats
            .get(&id, 0)?
            .iter()
            .fold(AclStats::default(), |a, s| AclStats {
                denied: a.denied + s.denied,
                not_allowed: a.not_allowed + s.not_allowed,
            }))
    }
}
