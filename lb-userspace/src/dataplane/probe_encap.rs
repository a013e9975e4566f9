//! The probe encapsulator's side of the kernel: the `lb_probe_encap` TC
//! program, attached at egress (TCX) of the interfaces lb probes backends
//! of `ipip` and `gue` services by, and its map of tunnels by probe mark.
//! Nothing is pinned: it lives as long as the daemon that loaded it, as the
//! probes it serves do.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use lb_common::{ProbeTunnel, maps as names};

use super::{EBPF_OBJECT, UNUSED_LB_CAPACITY, ifindex, load_program, take};

/// The encapsulator's maps (created afresh with it: nothing is adopted).
#[cfg(test)]
pub(super) const PROBE_ENCAP_MAPS: [&str; 1] = [names::PROBE_TUNNELS];

/// The loaded encapsulator: its program, verified, its map, and its links.
pub struct ProbeEncapsulator {
    ebpf: Ebpf,
    tunnels: HashMap<MapData, u32, ProbeTunnel>,
    /// Interfaces it is attached to: the index it was attached at (another
    /// means the interface was re-created, which took the link along) and
    /// the link, detached when dropped.
    links: BTreeMap<String, (u32, SchedClassifierLink)>,
}

impl ProbeEncapsulator {
    /// Loads the program with an empty map; nothing is attached.
    pub fn load() -> Result<Self> {
        let mut ebpf = UNUSED_LB_CAPACITY
            .loader()?
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (maps could not be created)")?;
        let prog = program(&mut ebpf)?;
        load_program(names::PROG_PROBE_ENCAP, || prog.load())?;
        let tunnels = take(&mut ebpf, names::PROBE_TUNNELS)?;
        Ok(ProbeEncapsulator {
            ebpf,
            tunnels,
            links: BTreeMap::new(),
        })
    }

    /// Makes the map hold `wanted`, by probe mark: new and changed entries
    /// first, then the stale ones removed.
    pub fn set_tunnels(&mut self, wanted: &BTreeMap<u32, ProbeTunnel>) -> Result<()> {
        for (mark, tunnel) in wanted {
            if self.tunnels.get(mark, 0).ok().as_ref() != Some(tunnel) {
                self.tunnels
                    .insert(mark, tunnel, 0)
                    .with_context(|| format!("writing the probe tunnel of mark {mark:#x}"))?;
            }
        }
        let stale: Vec<u32> = self
            .tunnels
            .keys()
            .filter_map(Result::ok)
            .filter(|m| !wanted.contains_key(m))
            .collect();
        for mark in stale {
            self.tunnels
                .remove(&mark)
                .with_context(|| format!("removing the probe tunnel of mark {mark:#x}"))?;
        }
        Ok(())
    }

    /// Attaches at the egress of every interface in `devs` not attached
    /// yet (or re-created since), and detaches from every other.
    pub fn attach(&mut self, devs: &BTreeSet<&str>) -> Result<()> {
        self.links
            .retain(|dev, (index, _)| devs.contains(dev.as_str()) && ifindex(dev) == *index);
        for dev in devs {
            if self.links.contains_key(*dev) {
                continue;
            }
            let prog = program(&mut self.ebpf)?;
            let id = prog
                .attach_with_options(
                    dev,
                    TcAttachType::Egress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| {
                    format!("attaching the probe encapsulator at {dev}'s egress (TCX, Linux 6.6+)")
                })?;
            let link = prog.take_link(id)?;
            self.links.insert(dev.to_string(), (ifindex(dev), link));
        }
        Ok(())
    }
}

/// The program `lb_probe_encap` of the object.
fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(names::PROG_PROBE_ENCAP)
        .with_context(|| format!("program {} missing", names::PROG_PROBE_ENCAP))?
        .try_into()
        .with_context(|| format!("program {} is not a TC classifier", names::PROG_PROBE_ENCAP))
}
