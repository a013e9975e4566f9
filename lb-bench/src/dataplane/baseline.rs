//! lb's XDP object at an earlier revision (`cargo xtask bench --baseline
//! REV`), loaded next to the current one with the same capacities and given
//! the same tables, so that every lb case runs on both, interleaved.
//!
//! The baseline is configured through the maps the benchmark writes
//! (services, VIPs, rings, backends, settings) with this tree's types, and
//! read through its counters. A revision whose layout of one of those maps
//! differs is refused with the map named, rather than given tables it would
//! misread; backends of a revision before their seal (or with its
//! earlier form, [`SEAL_OF_PRODUCTS`]), settings of one
//! before `gue`, and the services and tables of one before tables were
//! packed (two copies of one size per service, [`Tables::Copies`]) are
//! written in that layout, and per-service counters of one before
//! per-service drops are read in theirs. The VIP filter and the
//! service slots are kept too where the revision has them, and so is the
//! connection table's bucket count, which a revision with buckets in an
//! array reads from its settings (the rest of those settings stays at the
//! defaults, as in the current object), and so is the receiving interface,
//! which a revision with an interface table forwards only frames addressed
//! to. A revision that reads its settings and bucket count from a global
//! variable ([`Globals`]) gets them there as well as in their maps. Maps
//! added since (and the connection table, which only the programs touch)
//! are the baseline's own business.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, MapData, PerCpuArray},
    programs::{ProgramFd, Xdp},
};
use lb::dataplane::{Capacity, ServiceStats};
use lb_common::{
    AddrKey, BackendStats, BackendValue, ConntrackSettings, Counter, ForwardWay, Globals,
    Interface, RingChunk, ServiceKey, ServiceSlot, ServiceValue, Settings,
    hash::vip_filter_bit,
    interface_slot,
    limits::{DEFAULT_RING_SIZE, RING_CHUNK_SLOTS},
    maps as names, ring_position,
};
use lb_tests::{
    lab::{MTU, lab_interface},
    legacy,
};

use super::harness::take;

/// The baseline object, loaded and configured like the current one.
pub(crate) struct Baseline {
    ebpf: Ebpf,
    fd: ProgramFd,
    tables: Tables,
    vips: HashMap<MapData, AddrKey, u32>,
    /// The VIP filter, in revisions that have one.
    vip_filter: Option<Array<MapData, u64>>,
    backends: Prefixed<BackendValue, UNSEALED_BACKEND>,
    /// The revision seals backends as a chain of folds
    /// ([`legacy::chain_sealed`]), not as this tree does.
    chain_seal: bool,
    settings: BaselineSettings,
    /// The global variable the revision reads its settings and bucket
    /// count from, in revisions that have one, and what it holds.
    globals: Option<(Array<MapData, Globals>, Globals)>,
    counters: PerCpuArray<MapData, u64>,
    service_stats: ServiceCounters,
}

/// Bytes of a backend before the seal: this tree's [`BackendValue`] but its
/// last field.
const UNSEALED_BACKEND: usize = 28;

/// The commit from which backends are sealed as this tree seals them
/// (independent products); a revision with sealed backends that does not
/// contain it seals them as a chain of folds, which the map's layout does
/// not tell.
const SEAL_OF_PRODUCTS: &str = "5ede07ca3c3a5888af5cf7522a573cf99719425f";

/// Whether git revision `rev` contains commit `ancestor`.
fn contains(rev: &str, ancestor: &str) -> Result<bool> {
    let status = Command::new("git")
        .args(["merge-base", "--is-ancestor", ancestor, rev])
        .status()
        .context("running git merge-base")?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!(
            "git merge-base --is-ancestor {ancestor} {rev} failed ({status}): is {ancestor} in this repository?"
        ),
    }
}

/// The services map, service slots and rings map of the baseline.
enum Tables {
    /// This tree's layout: a table per service, packed, where its value says.
    Current {
        services: HashMap<MapData, ServiceKey, ServiceValue>,
        /// In revisions that have them.
        slots: Option<Array<MapData, ServiceSlot>>,
        rings: Array<MapData, RingChunk>,
    },
    /// Before tables were packed: two copies of the settings' size per
    /// service, one u32 slot per element, the live copy named by the value.
    Copies {
        services: HashMap<MapData, ServiceKey, CopiesValue>,
        slots: Option<Array<MapData, CopiesSlot>>,
        rings: Array<MapData, u32>,
    },
}

/// A service's value before tables were packed.
#[repr(C)]
#[derive(Clone, Copy)]
struct CopiesValue {
    id: u32,
    flags: u32,
    active_ring: u32,
    idle_timeout: u32,
}

/// A service slot before tables were packed.
#[repr(C)]
#[derive(Clone, Copy)]
struct CopiesSlot {
    key: ServiceKey,
    value: CopiesValue,
}

// SAFETY: plain integers with no padding (20 + 16 bytes, 4-aligned).
unsafe impl aya::Pod for CopiesValue {}
// SAFETY: as above.
unsafe impl aya::Pod for CopiesSlot {}

/// Copies of a table per service before tables were packed.
const TABLE_COPIES: u32 = 2;

/// The baseline's settings: this tree's, or before tables were packed the
/// table size first and then this tree's fields, all (`Copies`) or but
/// the last two (`BeforeGue`, a revision from before `gue_port`).
enum BaselineSettings {
    Current(Array<MapData, Settings>),
    Copies(Array<MapData, [u8; 4 + size_of::<Settings>()]>),
    BeforeGue(Array<MapData, [u8; size_of::<Settings>()]>),
}

/// An array of the baseline whose values are this tree's `V`, or, in a
/// revision from before fields were appended to `V`, its first `N` bytes.
/// (Settings have a type of their own, [`BaselineSettings`].)
enum Prefixed<V: aya::Pod, const N: usize> {
    /// This tree's layout.
    Current(Array<MapData, V>),
    /// The earlier one.
    Earlier(Array<MapData, [u8; N]>),
}

impl<V: aya::Pod, const N: usize> Prefixed<V, N> {
    fn take(ebpf: &mut Ebpf, name: &str) -> Result<Self> {
        let (map, value_size) = take_sized(ebpf, name)?;
        let layout = || format!("map {name} of {OBJECT} has another layout");
        Ok(if value_size == N {
            Prefixed::Earlier(Array::try_from(map).with_context(layout)?)
        } else {
            Prefixed::Current(Array::try_from(map).with_context(layout)?)
        })
    }

    fn set(&mut self, index: u32, value: V) -> Result<()> {
        match self {
            Prefixed::Current(a) => a.set(index, value, 0)?,
            Prefixed::Earlier(a) => {
                // SAFETY: `V` is plain integers (aya::Pod), read as bytes.
                let bytes = unsafe {
                    std::slice::from_raw_parts((&raw const value).cast::<u8>(), size_of::<V>())
                };
                let mut old = [0; N];
                old.copy_from_slice(&bytes[..N]);
                a.set(index, old, 0)?;
            }
        }
        Ok(())
    }
}

/// The baseline's forward counters: per service (packets, bytes, new flows
/// and drops, or before per-service drops the first three), or, from the
/// revision that counts a forward once, per backend as this tree does.
enum ServiceCounters {
    WithDrops(PerCpuArray<MapData, [u64; 4]>),
    BeforeDrops(PerCpuArray<MapData, [u64; 3]>),
    PerBackend(PerCpuArray<MapData, BackendStats>),
}

impl ServiceCounters {
    fn take(ebpf: &mut Ebpf) -> Result<Self> {
        if ebpf.map(names::FORMER_SERVICE_STATS).is_none() {
            return Ok(ServiceCounters::PerBackend(take(
                ebpf,
                OBJECT,
                names::BACKEND_STATS,
            )?));
        }
        let name = names::FORMER_SERVICE_STATS;
        let (map, value_size) = take_sized(ebpf, name)?;
        let layout = || format!("map {name} of {OBJECT} has another layout");
        Ok(if value_size == size_of::<[u64; 3]>() {
            ServiceCounters::BeforeDrops(PerCpuArray::try_from(map).with_context(layout)?)
        } else {
            ServiceCounters::WithDrops(PerCpuArray::try_from(map).with_context(layout)?)
        })
    }

    /// Service `id`'s forwards (its backends are `members`); drops only
    /// where the revision counts them per service.
    fn total(&self, id: u32, members: &[u32]) -> Result<ServiceStats> {
        let mut sum = ServiceStats::default();
        let mut add = |[packets, bytes, new_flows, drops]: [u64; 4]| {
            sum.packets += packets;
            sum.bytes += bytes;
            sum.new_flows += new_flows;
            sum.drops += drops;
        };
        match self {
            ServiceCounters::WithDrops(a) => a.get(&id, 0)?.iter().for_each(|&v| add(v)),
            ServiceCounters::BeforeDrops(a) => a
                .get(&id, 0)?
                .iter()
                .for_each(|&[p, b, n]| add([p, b, n, 0])),
            ServiceCounters::PerBackend(a) => {
                for b in members {
                    for s in a.get(b, 0)?.iter() {
                        add([s.packets(), s.bytes, s.new_flows, 0]);
                    }
                }
            }
        }
        Ok(sum)
    }

    /// Packets forwarded to `backends` by each way, in revisions that
    /// count forwards per backend only (else none: `LB_COUNTERS` has them).
    fn forwarded(&self, backends: &[u32]) -> Result<[u64; ForwardWay::COUNT]> {
        let mut sum = BackendStats::default();
        if let ServiceCounters::PerBackend(a) = self {
            for b in backends {
                for s in a.get(b, 0)?.iter() {
                    sum.add(s);
                }
            }
        }
        Ok(sum.forwarded)
    }
}

fn take_sized(ebpf: &mut Ebpf, name: &str) -> Result<(aya::maps::Map, usize)> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from {OBJECT}"))?;
    let value_size = match &map {
        aya::maps::Map::Array(data) | aya::maps::Map::PerCpuArray(data) => {
            data.info()?.value_size() as usize
        }
        _ => 0,
    };
    Ok((map, value_size))
}

/// Map `name` of the baseline, if the revision has it.
fn take_if_any<V: aya::Pod>(ebpf: &mut Ebpf, name: &str) -> Result<Option<Array<MapData, V>>> {
    ebpf.take_map(name)
        .map(Array::try_from)
        .transpose()
        .with_context(|| format!("map {name} of {OBJECT} is not the layout this tree has"))
}

/// The baseline object, as error messages name it.
const OBJECT: &str = "the baseline object";

impl Baseline {
    /// Loads the object at `path` with `capacity`.
    pub(crate) fn load(rev: &str, path: &Path, capacity: Capacity) -> Result<Baseline> {
        let object = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let rings_value = aya_obj::Object::parse(&object)
            .context("parsing the baseline object")?
            .maps
            .get(names::RINGS)
            .with_context(|| format!("map {} missing from {OBJECT}", names::RINGS))?
            .value_size() as usize;
        let copies = rings_value == size_of::<u32>();
        let mut loader = capacity.loader()?;
        if copies {
            loader.map_max_entries(
                names::RINGS,
                capacity.max_services * TABLE_COPIES * DEFAULT_RING_SIZE,
            );
        }
        let mut ebpf = loader
            .load(&object)
            .with_context(|| format!("loading the baseline object {}", path.display()))?;
        let prog: &mut Xdp = ebpf
            .program_mut(names::PROG_LB)
            .context("the baseline object has no load-balancer program")?
            .try_into()?;
        prog.load()
            .context("the kernel refused the baseline's program")?;
        let fd = prog.fd()?.try_clone()?;
        // Without its bucket count such a revision has no table, and every
        // packet would take the Maglev lookup.
        let conntrack = ConntrackSettings {
            buckets: capacity.conntrack_buckets(),
            ..ConntrackSettings::default()
        };
        if let Some(mut ct) = take_if_any(&mut ebpf, names::CONNTRACK_SETTINGS)? {
            ct.set(0, conntrack, 0)
                .context("writing the baseline's connection-table settings")?;
        }
        let globals = match take_if_any::<Globals>(&mut ebpf, names::GLOBALS)? {
            Some(mut map) => {
                let globals = Globals {
                    conntrack,
                    ..Globals::default()
                };
                map.set(0, globals, 0)
                    .context("writing the baseline's global settings")?;
                Some((map, globals))
            }
            None => None,
        };
        if let Some(mut interfaces) = take_if_any::<Interface>(&mut ebpf, names::INTERFACES)? {
            let iface = lab_interface(MTU);
            interfaces
                .set(interface_slot(iface.ifindex), iface, 0)
                .context("writing the baseline's interface")?;
        }
        let tables = if copies {
            Tables::Copies {
                services: take(&mut ebpf, OBJECT, names::SERVICES)?,
                slots: take_if_any(&mut ebpf, names::SERVICE_SLOTS)?,
                rings: take(&mut ebpf, OBJECT, names::RINGS)?,
            }
        } else {
            Tables::Current {
                services: take(&mut ebpf, OBJECT, names::SERVICES)?,
                slots: take_if_any(&mut ebpf, names::SERVICE_SLOTS)?,
                rings: take(&mut ebpf, OBJECT, names::RINGS)?,
            }
        };
        let settings = {
            let (map, value_size) = take_sized(&mut ebpf, names::SETTINGS)?;
            let layout = || format!("map {} of {OBJECT} has another layout", names::SETTINGS);
            if !copies {
                BaselineSettings::Current(Array::try_from(map).with_context(layout)?)
            } else if value_size == size_of::<Settings>() {
                BaselineSettings::BeforeGue(Array::try_from(map).with_context(layout)?)
            } else {
                BaselineSettings::Copies(Array::try_from(map).with_context(layout)?)
            }
        };
        let backends = Prefixed::take(&mut ebpf, names::BACKENDS)?;
        let chain_seal =
            matches!(backends, Prefixed::Current(_)) && !contains(rev, SEAL_OF_PRODUCTS)?;
        Ok(Baseline {
            fd,
            tables,
            vips: take(&mut ebpf, OBJECT, names::VIPS)?,
            vip_filter: take_if_any(&mut ebpf, names::VIP_FILTER)?,
            backends,
            chain_seal,
            settings,
            globals,
            counters: take(&mut ebpf, OBJECT, names::COUNTERS)?,
            service_stats: ServiceCounters::take(&mut ebpf)?,
            ebpf,
        })
    }

    /// The load-balancer program.
    pub(crate) fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(names::PROG_LB)
            .context("the baseline's program is gone")?
            .try_into()?)
    }

    /// The program's fd, for the reset wrapper's tail call.
    pub(crate) fn fd(&self) -> Result<ProgramFd> {
        Ok(self.fd.try_clone()?)
    }

    /// Writes the settings the current object has.
    pub(crate) fn set_settings(&mut self, settings: Settings) -> Result<()> {
        // SAFETY: `Settings` is plain integers (aya::Pod), read as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const settings).cast::<u8>(), size_of::<Settings>())
        };
        // The table size first, then this tree's fields (truncated).
        let mut copies = [0; 4 + size_of::<Settings>()];
        copies[..4].copy_from_slice(&DEFAULT_RING_SIZE.to_ne_bytes());
        copies[4..].copy_from_slice(bytes);
        match &mut self.settings {
            BaselineSettings::Current(a) => a.set(0, settings, 0)?,
            BaselineSettings::Copies(a) => a.set(0, copies, 0)?,
            BaselineSettings::BeforeGue(a) => {
                let mut old = [0; size_of::<Settings>()];
                old.copy_from_slice(&copies[..size_of::<Settings>()]);
                a.set(0, old, 0)?;
            }
        }
        if let Some((map, globals)) = &mut self.globals {
            globals.settings = settings;
            map.set(0, *globals, 0)
                .context("writing the baseline's global settings")?;
        }
        Ok(())
    }

    /// Writes backend `id` as the current object has it, sealed the
    /// revision's way.
    pub(crate) fn set_backend(&mut self, id: u32, backend: BackendValue) -> Result<()> {
        let value = if self.chain_seal {
            legacy::chain_sealed(&backend)
        } else {
            backend.sealed()
        };
        self.backends.set(id, value)
    }

    /// Gives the service `key` the value and live table the current object
    /// has: the table first, where the value names it (the same capacities
    /// give the same places), or in a revision before tables were packed in
    /// the service's first copy (the baseline forwards nothing while it is
    /// being configured, so any copy will do).
    pub(crate) fn set_service(
        &mut self,
        key: &ServiceKey,
        value: ServiceValue,
        ring: &[u32],
    ) -> Result<()> {
        ensure!(
            ring.len() == value.ring_size as usize,
            "a table of {} slots for a service of {}",
            ring.len(),
            value.ring_size
        );
        match &mut self.tables {
            Tables::Current {
                services,
                slots,
                rings,
            } => {
                // Whole elements: a table may start or end mid-element.
                let (first, _) = ring_position(value.ring_offset, 0);
                let (last, _) = ring_position(value.ring_offset, value.ring_size - 1);
                for element in first..=last {
                    let mut chunk = rings.get(&element, 0).unwrap_or_default();
                    for (lane, slot) in chunk.iter_mut().enumerate() {
                        let index = element * RING_CHUNK_SLOTS + lane as u32;
                        if let Some(s) = index.checked_sub(value.ring_offset)
                            && let Some(&backend) = ring.get(s as usize)
                        {
                            *slot = backend;
                        }
                    }
                    rings
                        .set(element, chunk, 0)
                        .context("writing the baseline's table")?;
                }
                services.insert(key, value, 0)?;
                if let Some(slots) = slots {
                    slots.set(value.id, ServiceSlot { key: *key, value }, 0)?;
                }
            }
            Tables::Copies {
                services,
                slots,
                rings,
            } => {
                ensure!(
                    value.ring_size == DEFAULT_RING_SIZE,
                    "a revision before packed tables has tables of {DEFAULT_RING_SIZE} slots only"
                );
                let first = value.id * TABLE_COPIES * DEFAULT_RING_SIZE;
                let indexes: Vec<u32> = (first..first + DEFAULT_RING_SIZE).collect();
                lb::dataplane::update_array(rings.map(), &indexes, ring)
                    .context("writing the baseline's table")?;
                let old = CopiesValue {
                    id: value.id,
                    flags: value.flags,
                    active_ring: 0,
                    idle_timeout: value.idle_timeout,
                };
                services.insert(key, old, 0)?;
                if let Some(slots) = slots {
                    slots.set(
                        value.id,
                        CopiesSlot {
                            key: *key,
                            value: old,
                        },
                        0,
                    )?;
                }
            }
        }
        if let Some(filter) = &mut self.vip_filter {
            let (word, bit) = vip_filter_bit(&key.addr);
            let bits = filter.get(&word, 0)?;
            filter.set(word, bits | bit, 0)?;
        }
        Ok(self
            .vips
            .insert(AddrKey::from_bytes(key.addr, key.family), 1, 0)?)
    }

    /// Global counters summed over CPUs, in `Counter::ALL` order: those the
    /// baseline has (a counter added since reads as zero), the forward ones
    /// with those of `backends` where it counts them per backend.
    pub(crate) fn counters(&self, backends: &[u32]) -> Result<Vec<(Counter, u64)>> {
        let have = self.counters.map().info()?.max_entries();
        let forwarded = self.service_stats.forwarded(backends)?;
        Counter::ALL
            .iter()
            .map(|&c| {
                let n: u64 = if (c as u32) < have {
                    self.counters.get(&(c as u32), 0)?.iter().sum()
                } else {
                    0
                };
                Ok((c, n + c.forward_way().map_or(0, |w| forwarded[w as usize])))
            })
            .collect()
    }

    /// Counters of service `id`, whose backends are `members`, summed over
    /// CPUs.
    pub(crate) fn service_stats(&self, id: u32, members: &[u32]) -> Result<ServiceStats> {
        self.service_stats.total(id, members)
    }
}
