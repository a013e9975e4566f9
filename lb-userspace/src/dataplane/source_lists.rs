//! The services' source lists (`deny`, `allow`) in the kernel: one LPM trie
//! keyed by service id, then family and address, each prefix with the list
//! it is in, which the program consults for new flows of services whose
//! flags say they have a list (see `admits` in lb-ebpf).

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use aya::maps::lpm_trie::Key;
use lb_common::{ACL_ALLOW, ACL_DENY, AclKey, SourceKey, addr_ip};
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

    /// The trie's value for a prefix of this list.
    fn value(self) -> u32 {
        match self {
            SourceList::Deny => ACL_DENY,
            SourceList::Allow => ACL_ALLOW,
        }
    }
}

/// The trie's prefixes: (service id, prefix) → the list it stands for.
pub type SourceEntries = BTreeMap<(u32, Prefix), SourceList>;

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

    /// Puts `prefix` of service `service_id` in the trie as `list`'s.
    pub fn set_source_entry(
        &mut self,
        service_id: u32,
        prefix: Prefix,
        list: SourceList,
    ) -> Result<()> {
        self.acl
            .insert(&key(service_id, prefix), list.value(), 0)
            .with_context(|| {
                format!(
                    "adding {}/{} to the {} list of service {service_id}",
                    prefix.0,
                    prefix.1,
                    list.name()
                )
            })
    }

    /// Takes `prefix` of service `service_id` out of the trie.
    pub fn remove_source_entry(&mut self, service_id: u32, prefix: Prefix) -> Result<()> {
        self.acl.remove(&key(service_id, prefix)).with_context(|| {
            format!(
                "removing {}/{} from the source lists of service {service_id}",
                prefix.0, prefix.1
            )
        })
    }
}
