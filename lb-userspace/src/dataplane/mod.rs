//! The one owner of the eBPF object and its maps. Every write to the kernel
//! goes through here, in an order that keeps the data plane consistent: a
//! change to a Maglev table stores each slot it moves whole, in place,
//! after the backends it adds are written and before those it removes are
//! taken down; a table of a new size is written whole before the service
//! names it. No packet sees a backend that is not written yet or gone.

mod batch;
mod conntrack_carry;
mod decap;
mod link;
mod pins;
mod probe_encap;
mod rings;
mod service_index;
mod source_blocks;
mod source_limits;
mod source_lists;
mod stats;

pub use batch::update_array;
pub use decap::{
    DEFAULT_DECAP_PIN_DIR, DecapTables, Decapsulator, Prefix, detach, pinned_interfaces,
    read_pinned, remove_pinned,
};
pub use link::read as read_interface;
pub use probe_encap::ProbeEncapsulator;
pub use rings::Region;
pub use source_limits::LimitedPrefix;
pub use source_lists::{SourceEntries, SourceList, insertion_order};
pub use stats::ServiceStats;

use std::{
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMap, HashMap, IterableMap as _, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    AclKey, AddrKey, BackendStats, BackendValue, ConntrackSettings, ConntrackStats, Counter,
    FlowEntry, FlowKey, FlowValue, Globals, Interface, LimitedSource, SERVICE_F_ECHO,
    ServiceIndexEntry, ServiceKey, ServiceSlot, ServiceValue, Settings, SourceBlockBucket,
    SourceDrops, SourceLimit, SourceShape, VIP_ECHO_UNIT,
    hash::vip_filter_bit,
    interface_slot,
    limits::{
        self, CONNTRACK_BUCKET_GROUP, CONNTRACK_WAYS, DEFAULT_CONNTRACK_ENTRIES,
        DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, DEFAULT_RING_SIZE, DEFAULT_RING_SLOTS,
        MAX_PORTS, RING_CHUNK_SLOTS, SPARE_RING_SLOTS_PER_BACKEND, VIP_FILTER_WORDS,
    },
    maps as names,
};

/// `CLOCK_MONOTONIC` in whole seconds from the coarse clock: what the
/// daemon writes as the data plane's clock ([`ConntrackSettings::now`]).
pub fn monotonic_seconds() -> u32 {
    // SAFETY: clock_gettime writes the zeroed timespec we pass; it cannot
    // fail for this clock id with a valid pointer.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// The reader of the XDP program's aya-log ring buffer.
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// How much the XDP program reports through aya-log (its `AYA_LOG_LEVEL`,
/// fixed at load): nothing, or debug lines about dropped packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelLogLevel {
    /// No lines: the program skips its logging code.
    Off,
    /// Debug lines (aya-log's level 4) and above.
    Debug,
}

impl KernelLogLevel {
    /// The value of aya-log-ebpf's `AYA_LOG_LEVEL` global.
    fn value(self) -> u8 {
        match self {
            KernelLogLevel::Off => 0,
            KernelLogLevel::Debug => aya_log_common::Level::Debug as u8,
        }
    }
}

/// The compiled XDP object, embedded so `lb` ships as one file.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Map capacities, fixed when the object is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Service slots (ids `0..max_services`).
    pub max_services: u32,
    /// Backend slots (ids `0..max_backends`).
    pub max_backends: u32,
    /// Connection-table entries, rounded up to whole groups of buckets
    /// ([`Capacity::conntrack_buckets`]).
    pub conntrack_entries: u32,
    /// Slots of the rings map, where every service's Maglev table is
    /// ([`Capacity::ring_slots_for`]).
    pub ring_slots: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            ring_slots: DEFAULT_RING_SLOTS,
        }
    }
}

impl Capacity {
    /// Slots of the rings map for `max_services` services and
    /// `max_backends` backends: a table of the smallest size per service
    /// and one more (for a service replaced by another while the old one's
    /// slots are held back), and room per backend for larger tables and
    /// their replacements ([`SPARE_RING_SLOTS_PER_BACKEND`]). With every
    /// table fixed at `table_size` slots by the operator, at least a table
    /// of that size per service and one more. The smallest size, fixed or
    /// not, gives the same map: setting or unsetting it takes a restart,
    /// not new pins.
    pub fn ring_slots_for(
        max_services: u32,
        max_backends: u32,
        table_size: Option<u32>,
    ) -> Result<u32> {
        let tables = |size: u32| max_services.checked_add(1)?.checked_mul(size);
        let sized = tables(DEFAULT_RING_SIZE)
            .zip(SPARE_RING_SLOTS_PER_BACKEND.checked_mul(max_backends))
            .and_then(|(tables, spare)| tables.checked_add(spare));
        match table_size {
            Some(size) => sized.zip(tables(size)).map(|(a, b)| a.max(b)),
            None => sized,
        }
        .with_context(|| {
            format!(
                "the tables of {max_services} services and {max_backends} backends \
                 exceed the rings map's 2^32 slots"
            )
        })
    }

    /// Buckets of the connection table: `conntrack_entries` rounded up to
    /// whole groups of buckets (`CONNTRACK_BUCKET_GROUP`). At most 2^32 / 4,
    /// so the product cannot overflow; the entries can
    /// ([`Capacity::conntrack_table_entries`]).
    pub fn conntrack_buckets(&self) -> u32 {
        self.conntrack_entries
            .div_ceil(CONNTRACK_WAYS * CONNTRACK_BUCKET_GROUP)
            * CONNTRACK_BUCKET_GROUP
    }

    /// Entries of the connection table: whole buckets.
    pub fn conntrack_table_entries(&self) -> Result<u32> {
        self.conntrack_buckets()
            .checked_mul(CONNTRACK_WAYS)
            .with_context(|| {
                format!(
                    "{} connection-table entries exceed the table's u32 index",
                    self.conntrack_entries
                )
            })
    }

    /// The entries of every map whose size is a capacity, by map name: what
    /// the loader overrides in the object.
    pub fn map_entries(&self) -> Result<[(&'static str, u32); 10]> {
        // A connection-table entry names its service (by id + 1) and its
        // backend in 16 bits each; the configuration says so first.
        ensure!(
            self.max_services <= lb_common::MAX_FLOW_SERVICE_IDS
                && self.max_backends <= lb_common::MAX_FLOW_BACKEND_IDS,
            "{} services and {} backends: a connection-table entry names at most {} and {}",
            self.max_services,
            self.max_backends,
            lb_common::MAX_FLOW_SERVICE_IDS,
            lb_common::MAX_FLOW_BACKEND_IDS
        );
        Ok([
            (names::SERVICES, self.max_services),
            (names::SERVICE_SLOTS, self.max_services),
            (names::SERVICE_DROPS, self.max_services),
            (names::SOURCE_DROPS, self.max_services),
            (names::SOURCE_LIMITS, self.max_services),
            (names::SOURCE_SHAPES, self.max_services),
            (names::RINGS, self.ring_slots.div_ceil(RING_CHUNK_SLOTS)),
            (names::BACKENDS, self.max_backends),
            (
                names::BACKEND_STATS,
                limits::backend_stats_entries(self.max_backends, self.max_services),
            ),
            (names::CONNTRACK, self.conntrack_table_entries()?),
        ])
    }

    /// A loader for the object with these capacities.
    pub fn loader<'a>(&self) -> Result<EbpfLoader<'a>> {
        let mut loader = EbpfLoader::new();
        for (name, entries) in self.map_entries()? {
            loader.map_max_entries(name, entries);
        }
        Ok(loader)
    }
}

/// The loaded programs and typed handles on every map.
pub struct Dataplane {
    ebpf: Ebpf,
    capacity: Capacity,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    service_slots: Array<MapData, ServiceSlot>,
    service_index_map: Array<MapData, ServiceIndexEntry>,
    /// What `service_index_map` holds.
    service_index: service_index::ServiceIndex,
    vips: HashMap<MapData, AddrKey, u32>,
    vip_filter: Array<MapData, u64>,
    rings: rings::RingMemory,
    ring_space: rings::RingSpace,
    backends: Array<MapData, BackendValue>,
    conntrack: Array<MapData, FlowEntry>,
    conntrack_settings: Array<MapData, ConntrackSettings>,
    conntrack_stats: PerCpuArray<MapData, ConntrackStats>,
    settings: Array<MapData, Settings>,
    /// The program's global variable of singletons, and what it holds.
    globals_map: Array<MapData, Globals>,
    globals: Globals,
    interfaces: Array<MapData, Interface>,
    egress: DevMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
    stats: stats::Stats,
    acl: LpmTrie<MapData, AclKey, u32>,
    source_shapes: Array<MapData, SourceShape>,
    source_blocks_map: Array<MapData, SourceBlockBucket>,
    /// What `source_shapes` and `source_blocks_map` hold, and the trie's
    /// entries they are built from.
    source_blocks: source_blocks::SourceBlocks,
    source_drops: PerCpuArray<MapData, SourceDrops>,
    source_limits: Array<MapData, SourceLimit>,
    limited_sources: PerCpuArray<MapData, LimitedSource>,
    attachments: std::collections::BTreeMap<String, Attachment>,
    /// The previous connection table while its entries are carried over
    /// ([`Dataplane::conntrack_carry_late`]).
    carried_conntrack: Option<conntrack_carry::PinnedTable>,
}

/// Bytes of a map or program name the kernel keeps (BPF_OBJ_NAME_LEN - 1).
const KERNEL_NAME_LEN: usize = 15;

/// An interface the program is attached to.
struct Attachment {
    mode: XdpMode,
    pin: Option<PathBuf>,
    /// The interface as last written to the interface table. Another index
    /// now means the interface was removed and re-created, which detaches
    /// XDP; index 0 marks a link lost while re-pinning.
    written: Interface,
    /// The link, held open so that it survives its pin being removed.
    link: Option<FdLink>,
    /// Its disappearance has been reported.
    gone: bool,
}

/// What [`Dataplane::repair`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// The interface is gone; it is attached again when it returns.
    InterfaceGone(String),
    /// The interface came back (re-created) and the program is attached again.
    Reattached(String),
    /// The interface's link pin had been removed and is pinned again.
    LinkRepinned(String),
    /// The interface's MAC or MTU changed; the data plane now uses the new
    /// ones.
    InterfaceChanged(String, Interface),
    /// These map pins had been removed and are pinned again.
    MapsRepinned(Vec<&'static str>),
}

/// The index of interface `name`, 0 if there is none.
pub(crate) fn ifindex(name: &str) -> u32 {
    match std::ffi::CString::new(name) {
        // SAFETY: a valid NUL-terminated string; the call only reads it.
        Ok(c) => unsafe { libc::if_nametoindex(c.as_ptr()) },
        Err(_) => 0,
    }
}

/// The tables of a data plane pinned by another process (a running
/// daemon's), read where its program reads them.
pub struct PinnedTables {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    rings: rings::RingMemory,
}

impl PinnedTables {
    /// Opens the services and rings maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<PinnedTables> {
        let open = |name: &str| {
            let path = pin_dir.join(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        Ok(PinnedTables {
            services: HashMap::try_from(aya::maps::Map::HashMap(open(names::SERVICES)?))?,
            rings: rings::RingMemory::open(open(names::RINGS)?)?,
        })
    }

    /// The live table of service `key`.
    pub fn table(&self, key: &ServiceKey) -> Result<Vec<u32>> {
        let value = self.services.get(key, 0).context("no such service")?;
        self.rings.read(table_region(&value))
    }
}

/// The values a service slot takes, one write each, to go from `from` (as
/// the slot holds it) to `to`. A packet reads the slot's fields as
/// separate loads and may read some before a write and the rest after it.
/// Written at once, a new table's offset and size could be read one from
/// each value: one table indexed by the other's size, past its end into
/// another service's table. So a moving table first keeps the old offset
/// at the smaller size, then names the new table at that size, then takes
/// the new size; and a slot taken by another key (a new service, an empty
/// slot) has the old key's family cleared (no flow matches it), then
/// takes the new value under a cleared family, then the new key. Any mix
/// of two consecutive values that serves a flow names a part of one of its
/// service's tables, both live until the old one's hold ends.
fn slot_writes(from: ServiceSlot, to: ServiceSlot) -> Vec<ServiceSlot> {
    if from == to {
        return Vec::new();
    }
    if from.key != to.key || from.key.family == 0 {
        let (mut gone, mut hidden) = (from, to);
        gone.key.family = 0;
        hidden.key.family = 0;
        let steps = [gone, hidden, to];
        // The old key hidden first, unless it already is.
        let first = usize::from(from.key.family == 0);
        return steps[first..].to_vec();
    }
    let (cur, new) = (from.value, to.value);
    if cur.ring_offset == new.ring_offset {
        return vec![to];
    }
    let least = cur.ring_size.min(new.ring_size);
    let slot = |value| ServiceSlot { key: to.key, value };
    vec![
        slot(ServiceValue {
            ring_size: least,
            ..cur
        }),
        slot(ServiceValue {
            ring_size: least,
            ..new
        }),
        to,
    ]
}

/// The slots of the rings map a service's table takes.
fn table_region(value: &ServiceValue) -> Region {
    Region {
        offset: value.ring_offset,
        len: value.ring_size,
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// The load balancer's maps live in the same object as the decapsulator
/// and the probe encapsulator, and are created with each; those never use
/// them, so they get the smallest sizes.
const UNUSED_LB_CAPACITY: Capacity = Capacity {
    max_services: 1,
    max_backends: 1,
    conntrack_entries: 1,
    ring_slots: RING_CHUNK_SLOTS,
};

/// Every map of the load balancer (the decapsulator's are its own,
/// [`decap`]).
const ALL_MAPS: [&str; 25] = [
    names::SERVICES,
    names::SERVICE_SLOTS,
    names::SERVICE_INDEX,
    names::VIPS,
    names::VIP_FILTER,
    names::RINGS,
    names::BACKENDS,
    names::CONNTRACK,
    names::CONNTRACK_SETTINGS,
    names::CONNTRACK_STATS,
    names::SETTINGS,
    names::INTERFACES,
    names::EGRESS,
    names::ICMP_BUDGET,
    names::COUNTERS,
    names::SERVICE_DROPS,
    names::BACKEND_STATS,
    names::ACL,
    names::SOURCE_SHAPES,
    names::SOURCE_BLOCKS,
    names::SOURCE_DROPS,
    names::SOURCE_LIMITS,
    names::SOURCE_RATES,
    names::COARSE_CLOCK,
    names::LIMITED_SOURCES,
];

/// What a service with `flags` adds to its VIP's value in the VIP set:
/// one service, and the echo unit if it answers echo.
fn vip_share(flags: u32) -> i64 {
    let echo = if flags & SERVICE_F_ECHO != 0 {
        VIP_ECHO_UNIT
    } else {
        0
    };
    1 + i64::from(echo)
}

/// Where the daemon pins maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// The conventional bpffs mount point.
const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of a bpf filesystem (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` is on a bpf filesystem (statfs); an error when it cannot
/// be asked (no such path, a name with a NUL). `lb doctor` judges pin
/// directories with it, as the daemon makes them.
pub(crate) fn is_bpffs(path: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs writes into the zeroed struct we pass; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Creates the pin directory `dir` on a bpf filesystem ([`ensure_bpffs`]).
fn make_pin_dir(dir: &Path) -> Result<()> {
    ensure_bpffs(dir)?;
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "creating {} (is bpffs mounted on /sys/fs/bpf?)",
            dir.display()
        )
    })
}

/// Makes sure `dir` can be created on a bpf filesystem: mounts bpffs on
/// /sys/fs/bpf when nothing is mounted there (as systemd does at boot on
/// most distributions; some hosts, these test machines among them, lack it).
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new(BPFFS);
    if dir.starts_with(root) && !is_bpffs(root)? {
        let src = std::ffi::CString::new("bpf")?;
        let target = std::ffi::CString::new(BPFFS)?;
        // SAFETY: plain mount(2) with valid C strings and no data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("mounting bpffs on /sys/fs/bpf");
        }
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    let parent = dir.parent().unwrap_or(dir);
    if parent.exists() && !is_bpffs(parent)? && !dir.starts_with(root) {
        bail!(
            "{} is not on a bpf filesystem; pins must live on bpffs",
            dir.display()
        );
    }
    Ok(())
}

/// XDP program `name` of the object.
fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()
        .with_context(|| format!("program {name} is not XDP"))
}

/// Loads program `name` into the kernel with `load` (its `load`). Again
/// when the verifier gave up for a signal that came in meanwhile (EAGAIN:
/// it stops for any pending signal, and `lb_xdp` keeps it busy for
/// seconds, long enough for a child's exit or a reload signal to land), as
/// libbpf does.
pub(crate) fn load_program(
    name: &str,
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<()> {
    /// Loads tried before an EAGAIN is an error.
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            loaded => return loaded.with_context(|| format!("the kernel refused program {name}")),
        }
    }
}

/// Whether lb can attach to `iface` in `mode` (see [`Dataplane::attach`]):
/// an Ethernet interface of the caller's network namespace, not a bond in
/// driver mode. Checks, writes nothing.
pub fn check_interface(iface: &str, mode: XdpMode) -> Result<()> {
    link::read(iface)?;
    mode_on(iface, mode, link::is_bond(iface)).map(drop)
}

/// The mode lb attaches to `iface` in, asked for `mode`. In driver mode the
/// bond driver runs the program on each of its slaves, whose frames carry
/// the slave's index, and lb knows the bond's alone: every frame would pass
/// untouched. So on a bond "auto" (which the kernel makes driver mode there)
/// means generic mode, in which the program runs on the bond, and driver
/// mode is refused.
fn mode_on(iface: &str, mode: XdpMode, bond: bool) -> Result<XdpMode> {
    match (bond, mode) {
        (true, XdpMode::Default) => Ok(XdpMode::Skb),
        (true, XdpMode::Driver | XdpMode::Hardware) => bail!(
            "{iface} is a bond: in driver mode its slaves run the program, on frames lb does \
             not take for the bond's; use xdp_mode = \"generic\" (or \"auto\", which is generic \
             on a bond)"
        ),
        _ => Ok(mode),
    }
}

/// Attaches `prog` to `iface`, or switches the link pinned at `pin` to it
/// (atomically: no packet sees the interface without a program), and
/// returns the link, pinned at `pin` if given. A pinned link keeps the mode
/// it was made in: when `mode` names another (not `auto`, which takes what
/// is there), the link is removed and the program attached afresh, packets
/// of that moment passing to the kernel; if the new mode is refused, the
/// program goes back in the old one, said so, rather than leave the
/// interface without it.
fn attach_xdp(prog: &mut Xdp, iface: &str, mode: XdpMode, pin: Option<&Path>) -> Result<FdLink> {
    if let Some(path) = pin.filter(|p| p.exists())
        && mode != XdpMode::Default
        && let Some(old) = attached_mode(iface).filter(|old| *old != mode)
    {
        tracing::warn!(
            interface = iface,
            from = ?old,
            to = ?mode,
            "the XDP mode changed: attaching afresh (packets pass to the kernel for that moment)"
        );
        let link: FdLink = PinnedLink::from_pin(path)
            .with_context(|| format!("opening pinned link {}", path.display()))?
            .into();
        std::fs::remove_file(path)
            .with_context(|| format!("removing the pinned link {}", path.display()))?;
        // Its last reference: the program leaves the interface.
        drop(link);
        return attach_pinned(prog, iface, mode, path).or_else(|e| {
            tracing::error!(
                interface = iface,
                error = %format!("{e:#}"),
                "the new XDP mode is refused: attached in the old one ({old:?}) instead"
            );
            attach_pinned(prog, iface, old, path)
        });
    }
    match pin {
        Some(path) if path.exists() => {
            let link: FdLink = PinnedLink::from_pin(path)
                .with_context(|| format!("opening pinned link {}", path.display()))?
                .into();
            let link = XdpLink::try_from(link).context("pinned link is not an XDP link")?;
            let id = prog
                .attach_to_link(link)
                .with_context(|| format!("switching {iface}'s pinned link to the new program"))?;
            Ok(prog.take_link(id)?.try_into()?)
        }
        Some(path) => attach_pinned(prog, iface, mode, path),
        None => attach_fresh(prog, iface, mode),
    }
}

/// Attaches `prog` to `iface` in `mode`: a new link.
fn attach_fresh(prog: &mut Xdp, iface: &str, mode: XdpMode) -> Result<FdLink> {
    let id = prog
        .attach(iface, mode)
        .with_context(|| format!("attaching to {iface} ({mode:?})"))?;
    Ok(prog.take_link(id)?.try_into()?)
}

/// Attaches `prog` to `iface` in `mode`, the link pinned at `path`.
fn attach_pinned(prog: &mut Xdp, iface: &str, mode: XdpMode, path: &Path) -> Result<FdLink> {
    Ok(attach_fresh(prog, iface, mode)?
        .pin(path)
        .with_context(|| format!("pinning the link at {}", path.display()))?
        .into())
}

/// The mode of the program attached to `iface`; `None` for none, or when
/// it cannot be read (said so: the program is then switched in place).
pub(crate) fn attached_mode(iface: &str) -> Option<XdpMode> {
    match link::read(iface).and_then(|l| link::xdp_mode_attached(l.ifindex)) {
        Ok(mode) => mode,
        Err(e) => {
            tracing::warn!(interface = iface, error = %format!("{e:#}"), "reading the XDP mode; switching programs in place");
            None
        }
    }
}

/// Pins `map` at `dir`/`name` in place of the pin there, in one rename: a
/// crash before it leaves the old pin to migrate again.
fn repin(dir: &Path, name: &str, map: &MapData) -> Result<()> {
    // bpffs refuses names with dots.
    let fresh = dir.join(format!("{name}_MIGRATING"));
    let _ = std::fs::remove_file(&fresh);
    map.pin(&fresh)
        .with_context(|| format!("pinning the migrated {name}"))?;
    std::fs::rename(&fresh, dir.join(name)).with_context(|| format!("replacing the pin {name}"))
}

impl Dataplane {
    /// Loads the embedded object with `capacity` and verifies both programs
    /// in the kernel. Nothing is attached and nothing is pinned.
    pub fn load(capacity: Capacity) -> Result<Self> {
        Self::load_with(capacity, None, KernelLogLevel::Off, &Default::default())
    }

    /// Claims `dir` for this process until the returned file is dropped (or
    /// the process ends): one daemon per pin directory, refused before it
    /// touches the pins, the routes or the links of the one serving. The
    /// claim is an `flock` on the directory itself, so a daemon that died
    /// leaves none behind; it does not stop [`Dataplane::load_pinned`] by
    /// itself, which an upgrade test calls twice on one directory.
    pub fn claim_pin_dir(dir: &Path) -> Result<std::fs::File> {
        make_pin_dir(dir)?;
        let claim =
            std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(claim.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!("another lb daemon runs on the pins in {}", dir.display());
            }
            return Err(e).with_context(|| format!("locking {}", dir.display()));
        }
        Ok(claim)
    }

    /// Loads with every map pinned under `dir`: maps already pinned there
    /// (by a previous daemon) are adopted with their contents, the others
    /// are created and pinned. Returns whether state was adopted.
    pub fn load_pinned(
        capacity: Capacity,
        dir: &Path,
        log: KernelLogLevel,
    ) -> Result<(Self, bool)> {
        make_pin_dir(dir)?;
        let adopted = dir.join(names::SERVICES).exists();
        // Daemons before `lb decap` pinned the decapsulator's maps with
        // their own; they are `lb decap`'s now, under its directory. The
        // per-service counters of versions before per-backend forward
        // counts are gone: their counts start again, as any counters of
        // another layout do.
        if adopted {
            for name in [
                names::DECAP_ADDRS,
                names::DECAP_COUNTERS,
                names::FORMER_SERVICE_STATS,
            ] {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
        let mut migration = pins::reconcile(dir, &ALL_MAPS, &capacity)?;
        let mut dp = Self::load_with(capacity, Some(dir), log, &migration)?;
        if let Some(backends) = &migration.backends {
            dp.carry_backends(dir, backends)?;
        }
        if let Some(table) = migration.conntrack.take() {
            dp.carry_conntrack(dir, table)?;
        }
        if let Some(prefixes) = &migration.source_lists {
            dp.carry_source_lists(dir, prefixes)?;
        }
        Ok((dp, adopted))
    }

    /// Writes `prefixes`, read from a pinned trie of another capacity, into
    /// this object's new trie, pins it in the old one's place, and places
    /// their blocks again (the load placed them from the empty trie). The
    /// program that runs meanwhile reads the old trie.
    fn carry_source_lists(&mut self, dir: &Path, prefixes: &[(Key<AclKey>, u32)]) -> Result<()> {
        for (key, list) in prefixes {
            self.acl
                .insert(key, list, 0)
                .context("carrying a source-list prefix over")?;
        }
        repin(dir, names::ACL, self.acl.map())?;
        self.rebuild_source_blocks()?;
        tracing::info!(
            prefixes = prefixes.len(),
            "carried the pinned source lists over to this version's capacity"
        );
        Ok(())
    }

    /// Writes `backends`, read from the pin of an earlier layout, into this
    /// object's new map, and pins that map in the old one's place.
    fn carry_backends(&mut self, dir: &Path, backends: &[(u32, BackendValue)]) -> Result<()> {
        for (id, b) in backends {
            self.set_backend(*id, b)?;
        }
        repin(dir, names::BACKENDS, self.backends.map())?;
        tracing::info!(
            backends = backends.len(),
            "carried the pinned backends over to this version's layout and seal"
        );
        Ok(())
    }

    /// Writes the entries of the pinned connection table `old` into this
    /// object's new table, placed by this version's hash, and pins it in
    /// the old one's place. `old` stays open for
    /// [`Dataplane::conntrack_carry_late`].
    fn carry_conntrack(&mut self, dir: &Path, old: conntrack_carry::PinnedTable) -> Result<()> {
        let (placed, displaced) =
            conntrack_carry::place_all(old.entries(), self.capacity.conntrack_buckets());
        batch::array_write(&mut self.conntrack, &placed, "the new connection table")?;
        repin(dir, names::CONNTRACK, self.conntrack.map())?;
        tracing::info!(
            entries = placed.len(),
            displaced,
            "carried the pinned connection table over to this version's size and hash"
        );
        self.carried_conntrack = Some(old);
        Ok(())
    }

    /// Once this version's program runs in place of the previous one,
    /// carries the entries the previous program wrote or refreshed in its
    /// connection table since [`Dataplane::load_pinned`] read it, over this
    /// table's entries of the same flows (which this program made when
    /// their packets missed), and lets that table go. How many, or `None`
    /// when no table was carried over.
    pub fn conntrack_carry_late(&mut self) -> Result<Option<usize>> {
        let Some(old) = self.carried_conntrack.take() else {
            return Ok(None);
        };
        let late = old.changed()?;
        let buckets = self.capacity.conntrack_buckets();
        conntrack_carry::place_live(&mut self.conntrack, buckets, &late)?;
        Ok(Some(late.len()))
    }

    fn load_with(
        capacity: Capacity,
        pins: Option<&Path>,
        log: KernelLogLevel,
        migration: &pins::Migration,
    ) -> Result<Self> {
        // Maps being migrated get a new map, pinned once it is filled.
        let migrating = |name: &str| {
            (name == names::BACKENDS && migration.backends.is_some())
                || (name == names::CONNTRACK && migration.conntrack.is_some())
                || (name == names::ACL && migration.source_lists.is_some())
        };
        let pin_paths: Vec<(&str, PathBuf)> = pins
            .map(|dir| {
                ALL_MAPS
                    .iter()
                    .filter(|n| !migrating(n))
                    .map(|n| (*n, dir.join(n)))
                    .collect()
            })
            .unwrap_or_default();
        let level = log.value();
        let mut loader = capacity.loader()?;
        loader.override_global(aya_log::LEVEL, &level, true);
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (maps could not be created)")?;
        let prog = xdp_program(&mut ebpf, names::PROG_LB)?;
        load_program(names::PROG_LB, || prog.load())?;
        let backends = take(&mut ebpf, names::BACKENDS)?;
        let stats = stats::Stats::open(
            take(&mut ebpf, names::BACKEND_STATS)?,
            take(&mut ebpf, names::SERVICE_DROPS)?,
            &capacity,
            pins.map(|_| &backends),
        )?;
        let mut dp = Dataplane {
            services: take(&mut ebpf, names::SERVICES)?,
            service_slots: take(&mut ebpf, names::SERVICE_SLOTS)?,
            service_index_map: take(&mut ebpf, names::SERVICE_INDEX)?,
            service_index: Default::default(),
            vips: take(&mut ebpf, names::VIPS)?,
            vip_filter: take(&mut ebpf, names::VIP_FILTER)?,
            rings: rings::RingMemory::open(match ebpf.take_map(names::RINGS) {
                Some(aya::maps::Map::Array(data)) => data,
                _ => bail!(
                    "map {} missing from the eBPF object, or not an array",
                    names::RINGS
                ),
            })?,
            ring_space: rings::RingSpace::new(0),
            backends,
            conntrack: take(&mut ebpf, names::CONNTRACK)?,
            conntrack_settings: take(&mut ebpf, names::CONNTRACK_SETTINGS)?,
            conntrack_stats: take(&mut ebpf, names::CONNTRACK_STATS)?,
            settings: take(&mut ebpf, names::SETTINGS)?,
            globals_map: take(&mut ebpf, names::GLOBALS)?,
            globals: Globals::ZERO,
            interfaces: take(&mut ebpf, names::INTERFACES)?,
            egress: take(&mut ebpf, names::EGRESS)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            stats,
            acl: take(&mut ebpf, names::ACL)?,
            source_shapes: take(&mut ebpf, names::SOURCE_SHAPES)?,
            source_blocks_map: take(&mut ebpf, names::SOURCE_BLOCKS)?,
            source_blocks: source_blocks::SourceBlocks::new(Default::default()),
            source_drops: take(&mut ebpf, names::SOURCE_DROPS)?,
            source_limits: take(&mut ebpf, names::SOURCE_LIMITS)?,
            limited_sources: take(&mut ebpf, names::LIMITED_SOURCES)?,
            attachments: Default::default(),
            carried_conntrack: None,
            ebpf,
            capacity,
        };
        // The adopted settings (none on a fresh load) stand until the
        // controller writes its own: a program of a version before
        // 1042d79, still attached, reads them from the pinned record, and
        // the start may wait on etcd before the controller writes; zeroed,
        // it would send tunnelled packets from 0.0.0.0 meanwhile.
        let adopted = dp.settings.get(&0, 0).context("reading the settings")?;
        dp.set_settings(adopted)?;
        dp.ring_space = dp.adopted_ring_space()?;
        // Adopted connection-table settings keep their policy and clock; the
        // table's size is always this one's.
        let ct = dp
            .conntrack_settings
            .get(&0, 0)
            .context("reading the connection-table settings")?;
        dp.set_conntrack_settings(ct)?;
        // Adopted services and VIPs may come from a version without the
        // slots or the filter, whose pins lack them: derive both, always.
        dp.rebuild_service_slots()?;
        dp.rebuild_vip_filter()?;
        dp.rebuild_source_blocks()?;
        Ok(dp)
    }

    /// Starts reading what the XDP program logs (see [`KernelLogLevel`]);
    /// the reader forwards each line to the `log` facade. Call once.
    pub fn kernel_log(&mut self) -> Result<KernelLog> {
        aya_log::EbpfLogger::init(&mut self.ebpf).context("opening the XDP program's log buffer")
    }

    /// The capacities this data plane was loaded with.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// One of the XDP programs (`lb_common::maps::PROG_*`), to attach or test-run.
    pub fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        xdp_program(&mut self.ebpf, name)
    }

    /// Attaches the load balancer to `iface`, registered first in the
    /// interface table (its MAC and MTU) and the device map under `port`
    /// (1 to [`MAX_PORTS`], unique among the interfaces attached; what
    /// backends behind it name), so the program takes the frames sent to
    /// it, and can send frames out of it, from the first packet. With
    /// `pin`, the XDP link is
    /// pinned at that path so it outlives this process; an existing pinned
    /// link there is switched to this program atomically (no packet sees the
    /// interface without a program). The link stays open here too, so it
    /// survives its pin being removed (see [`Dataplane::repair`]).
    pub fn attach(
        &mut self,
        iface: &str,
        port: u8,
        mode: XdpMode,
        pin: Option<&Path>,
    ) -> Result<()> {
        ensure!(
            (1..=MAX_PORTS).contains(&u32::from(port)),
            "port {port} of {iface} is outside 1 to {MAX_PORTS}"
        );
        let mode = mode_on(iface, mode, link::is_bond(iface))?;
        let info = Interface {
            port,
            ..link::read(iface)?
        };
        if let Some((other, _)) = self
            .attachments
            .iter()
            .find(|(name, a)| name.as_str() != iface && !a.gone && a.written.port == port)
        {
            bail!("{iface} and {other} were both given port {port}");
        }
        if let Some((other, _)) = self.attachments.iter().find(|(name, a)| {
            name.as_str() != iface
                && !a.gone
                && a.written.ifindex != info.ifindex
                && interface_slot(a.written.ifindex) == interface_slot(info.ifindex)
        }) {
            bail!(
                "{iface} (index {}) and {other} share a slot of the interface table (indexes \
                 that differ by a multiple of {}); re-create one of them to give it another index",
                info.ifindex,
                lb_common::limits::INTERFACE_SLOTS
            );
        }
        self.set_interface(&info)?;
        let attached = attach_xdp(self.program(names::PROG_LB)?, iface, mode, pin);
        if attached.is_err() {
            // Nothing half-applied: the entry names an interface without us.
            let _ = self.clear_interface(info.ifindex);
        }
        let link = attached?;
        self.attachments.insert(
            iface.to_string(),
            Attachment {
                mode,
                pin: pin.map(Path::to_path_buf),
                written: info,
                link: Some(link),
                gone: false,
            },
        );
        Ok(())
    }

    /// Writes `iface` into the interface table, and under its port into
    /// the device map: the program takes frames that arrive on it sent to
    /// its MAC, and redirects frames to it for backends behind it.
    /// [`Dataplane::attach`] does this; tests that run the program on
    /// frames call it for the interfaces frames come in by and go out of.
    /// The device map resolves the index in the caller's network namespace.
    pub fn set_interface(&mut self, iface: &Interface) -> Result<()> {
        self.interfaces
            .set(interface_slot(iface.ifindex), iface, 0)
            .with_context(|| {
                format!("writing interface {} to the interface table", iface.ifindex)
            })?;
        if iface.port != 0 {
            let written = self
                .egress
                .set(u32::from(iface.port), iface.ifindex, None, 0);
            if let Err(e) = written {
                // Nothing half-applied.
                let _ = self.clear_interface(iface.ifindex);
                return Err(e).with_context(|| {
                    format!(
                        "writing interface {} to the device map as port {}",
                        iface.ifindex, iface.port
                    )
                });
            }
        }
        Ok(())
    }

    /// Clears interface `ifindex` from the interface table, if it is there.
    /// Its device-map entry may stay (the kernel clears those of removed
    /// devices): the program redirects only to a port whose device is in
    /// the interface table too.
    fn clear_interface(&mut self, ifindex: u32) -> Result<()> {
        let slot = interface_slot(ifindex);
        if self.interfaces.get(&slot, 0)?.ifindex == ifindex {
            self.interfaces.set(slot, Interface::default(), 0)?;
        }
        Ok(())
    }

    /// Whether `iface` has the program attached now: attached by this
    /// process, and neither removed nor re-created since.
    pub fn attached(&self, iface: &str) -> bool {
        self.attachments.get(iface).is_some_and(|a| {
            !a.gone && a.written.ifindex != 0 && a.written.ifindex == ifindex(iface)
        })
    }

    /// Each interface the program is attached to, with its port and MTU
    /// as last written to the interface table.
    pub fn interface_mtus(&self) -> Vec<(String, u8, u32)> {
        self.attachments
            .iter()
            .filter(|(_, a)| !a.gone && a.written.ifindex != 0)
            .map(|(name, a)| (name.clone(), a.written.port, a.written.mtu))
            .collect()
    }

    /// Repairs what happened to the data plane under the daemon, and says
    /// what it did: an interface removed and re-created (which detaches XDP)
    /// is attached again; a removed link pin is pinned again from the link
    /// this process holds open; removed map pins (under `pin_dir`) are pinned
    /// again, so a later daemon still adopts the state.
    pub fn repair(&mut self, pin_dir: Option<&Path>) -> Result<Vec<Repair>> {
        let mut done = Vec::new();
        let mut reattach = Vec::new();
        let mut gone = Vec::new();
        let mut changed = Vec::new();
        for (iface, a) in &mut self.attachments {
            let now = ifindex(iface);
            if now == 0 {
                if !a.gone {
                    a.gone = true;
                    gone.push(a.written.ifindex);
                    done.push(Repair::InterfaceGone(iface.clone()));
                }
            } else if now != a.written.ifindex {
                gone.push(a.written.ifindex);
                reattach.push((iface.clone(), a.written.port, a.mode, a.pin.clone()));
            } else if let Ok(info) = link::read(iface).map(|i| Interface {
                port: a.written.port,
                ..i
            }) && info != a.written
            {
                a.written = info;
                changed.push((iface.clone(), info));
            } else if let Some(path) = &a.pin
                && !path.exists()
                && let Some(link) = a.link.take()
            {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                // On failure the link closes with its fd: the interface is
                // then attached again below, on the next repair.
                match link.pin(path) {
                    Ok(pinned) => {
                        a.link = Some(pinned.into());
                        done.push(Repair::LinkRepinned(iface.clone()));
                    }
                    Err(e) => {
                        a.written.ifindex = 0;
                        bail!("re-pinning {iface}'s link at {}: {e}", path.display());
                    }
                }
            }
        }
        for ifindex in gone {
            self.clear_interface(ifindex)?;
        }
        for (iface, info) in changed {
            self.set_interface(&info)?;
            done.push(Repair::InterfaceChanged(iface, info));
        }
        for (iface, port, mode, pin) in reattach {
            // The old link died with the old interface; its pin is stale.
            self.attachments.remove(&iface);
            if let Some(path) = &pin {
                let _ = std::fs::remove_file(path);
            }
            self.attach(&iface, port, mode, pin.as_deref())?;
            done.push(Repair::Reattached(iface));
        }
        if let Some(dir) = pin_dir {
            let missing: Vec<&'static str> = ALL_MAPS
                .iter()
                .copied()
                .filter(|n| !dir.join(n).exists())
                .collect();
            if !missing.is_empty() {
                std::fs::create_dir_all(dir)?;
                self.pin_maps(dir, &missing)?;
                done.push(Repair::MapsRepinned(missing));
            }
        }
        Ok(done)
    }

    /// Pins the maps named in `which` under `dir`, found among the maps the
    /// loaded programs use (the kernel keeps only the first
    /// [`KERNEL_NAME_LEN`] bytes of a map's name), or among the records
    /// this data plane holds that no program reads.
    fn pin_maps(&mut self, dir: &Path, which: &[&str]) -> Result<()> {
        let ids = self
            .program(names::PROG_LB)?
            .info()?
            .map_ids()?
            .unwrap_or_default();
        for name in which {
            if let Some(record) = self.record(name) {
                record
                    .pin(dir.join(name))
                    .with_context(|| format!("pinning {name}"))?;
                continue;
            }
            let short = &name[..name.len().min(KERNEL_NAME_LEN)];
            let id = ids
                .iter()
                .copied()
                .find(|id| {
                    aya::maps::MapInfo::from_id(*id)
                        .is_ok_and(|info| info.name_as_str() == Some(short))
                })
                .with_context(|| format!("map {name} is not among the programs' maps"))?;
            MapData::from_id(id)?
                .pin(dir.join(name))
                .with_context(|| format!("pinning {name}"))?;
        }
        Ok(())
    }

    /// Map `name` if it is a record of what the program reads from
    /// [`Globals`]: the program does not use it, user space keeps it for
    /// a restarted daemon and for a program of an earlier version.
    fn record(&self, name: &str) -> Option<&MapData> {
        match name {
            names::SETTINGS => Some(self.settings.map()),
            names::CONNTRACK_SETTINGS => Some(self.conntrack_settings.map()),
            _ => None,
        }
    }

    /// The keys of every live service.
    pub fn service_keys(&self) -> Result<Vec<ServiceKey>> {
        self.services
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .context("listing services")
    }

    /// Writes the settings: the program's copy ([`Globals`]) and the pinned
    /// record.
    pub fn set_settings(&mut self, settings: Settings) -> Result<()> {
        self.settings
            .set(0, settings, 0)
            .context("writing settings")?;
        self.set_globals(Globals {
            settings,
            ..self.globals
        })
    }

    /// Writes the program's global variable of singletons.
    fn set_globals(&mut self, globals: Globals) -> Result<()> {
        self.globals_map
            .set(0, globals, 0)
            .context("writing the program's global settings")?;
        self.globals = globals;
        Ok(())
    }

    /// Writes the connection-table policy, the program's copy and the pinned
    /// record; the bucket count is always the loaded table's.
    pub fn set_conntrack_settings(&mut self, mut settings: ConntrackSettings) -> Result<()> {
        settings.buckets = self.capacity.conntrack_buckets();
        self.conntrack_settings
            .set(0, settings, 0)
            .context("writing the connection-table settings")?;
        self.set_globals(Globals {
            conntrack: settings,
            ..self.globals
        })
    }

    /// The connection table's accounting, per CPU.
    pub fn conntrack_stats(&self) -> Result<Vec<ConntrackStats>> {
        Ok(self
            .conntrack_stats
            .get(&0, 0)
            .context("reading the connection-table accounting")?
            .iter()
            .copied()
            .collect())
    }

    /// Writes backend `id`, sealed (see [`BackendValue`]): a packet that
    /// reads it while it is written tells the mix from a whole value.
    pub fn set_backend(&mut self, id: u32, backend: &BackendValue) -> Result<()> {
        ensure!(
            id < self.capacity.max_backends,
            "backend id {id} beyond capacity {}",
            self.capacity.max_backends
        );
        self.backends
            .set(id, backend.sealed(), 0)
            .with_context(|| format!("writing backend {id}"))?;
        self.stats.note_backend(id);
        Ok(())
    }

    /// Reads backend `id`, as it was given to [`Dataplane::set_backend`]
    /// (without the seal, which is the data plane's business).
    pub fn backend(&self, id: u32) -> Result<BackendValue> {
        let v = self.backends.get(&id, 0)?;
        Ok(BackendValue { seal: 0, ..v })
    }

    /// The service's entry, if it exists.
    pub fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>> {
        match self.services.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading a service"),
        }
    }

    /// Creates or updates a service and makes `ring` its live table;
    /// returns the slots it stored. `ring` holds backend ids (or
    /// `NO_BACKEND`); `idle_timeout` is [`ServiceValue::idle_timeout`].
    ///
    /// A table of the size the service's has is changed in place, one
    /// store per slot that differs: a packet reads each slot whole, old or
    /// new, and both name backends that are up (a change writes its new
    /// backends before the table and takes its old ones down after). A
    /// table of another size, or a new service's, is written whole into
    /// free slots, and the service entry then names it, in one map update;
    /// the old table's slots are held back for packets that read the entry
    /// just before ([`lb_common::limits::RING_RETIRE_GRACE_MS`]).
    pub fn publish_service(
        &mut self,
        key: &ServiceKey,
        id: u32,
        flags: u32,
        idle_timeout: u32,
        ring: &[u32],
    ) -> Result<usize> {
        ensure!(
            id < self.capacity.max_services,
            "service id {id} beyond capacity {}",
            self.capacity.max_services
        );
        let size = u32::try_from(ring.len())
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("a table of {} slots", ring.len()))?;
        let current = self.service(key)?;
        if let Some(cur) = current {
            ensure!(cur.id == id, "service id changed from {} to {id}", cur.id);
        }
        // As the slot holds it: after a change that failed part way, it
        // may be one of the steps of `slot_writes` rather than the entry.
        // Read before a region is taken, which a failure would not give back.
        let slot_now = self
            .service_slots
            .get(&id, 0)
            .with_context(|| format!("reading the slot of service {id}"))?;
        let now = Instant::now();
        let (region, moved) = match current.filter(|cur| cur.ring_size == size) {
            Some(cur) => (table_region(&cur), false),
            None => (self.ring_space.allocate(size, key, now)?, true),
        };
        // A region taken for this change goes back (held, as packets never
        // read it) if the change fails before the entry names it.
        let give_back = |space: &mut rings::RingSpace| {
            if moved {
                space.retire(region, Some(*key), now);
            }
        };
        let stored = self
            .rings
            .write(region, ring)
            .inspect_err(|_| give_back(&mut self.ring_space))
            .context("writing the table")?;
        let value = ServiceValue {
            id,
            flags,
            ring_offset: region.offset,
            ring_size: size,
            idle_timeout,
        };
        let slot = ServiceSlot { key: *key, value };
        if current == Some(value) && slot_now == slot {
            return Ok(stored);
        }
        self.services
            .insert(key, value, 0)
            .inspect_err(|_| give_back(&mut self.ring_space))
            .context("publishing the service")?;
        // The VIP set counts the entry's flags: at once, and the entry put
        // back if it cannot, so that the two never disagree whatever fails
        // next (an undo works its change out from the entry).
        let delta = match current {
            None => vip_share(flags),
            Some(cur) => vip_share(flags) - vip_share(cur.flags),
        };
        if delta != 0
            && let Err(e) = self.adjust_vip(key, delta)
        {
            let put_back = match current {
                Some(cur) => self.services.insert(key, cur, 0),
                None => self.services.remove(key),
            };
            if let Err(back) = put_back {
                tracing::warn!(error = %back, "putting a service's entry back after a failed change");
            }
            give_back(&mut self.ring_space);
            return Err(e);
        }
        // The entry names the new table: the old one's slots are held back
        // from here on, whatever fails next.
        if let Some(cur) = current.filter(|_| moved) {
            self.ring_space.retire(table_region(&cur), Some(*key), now);
        }
        // The slot after the entry: both only ever name the live table. A
        // packet reading the slot mid-write sees each field whole. The
        // index after the slot it leads to.
        for step in slot_writes(slot_now, slot) {
            self.set_service_slot(id, step)?;
        }
        self.index_service(id, Some(*key))?;
        Ok(stored)
    }

    /// The rings map's space, with the tables of the services the maps
    /// hold (adopted from pins) in use.
    fn adopted_ring_space(&self) -> Result<rings::RingSpace> {
        let mut space = rings::RingSpace::new(self.rings.len());
        for entry in &self.services {
            let (_, value) = entry.context("reading the services")?;
            if value.ring_size > 0 {
                space
                    .reserve(table_region(&value))
                    .with_context(|| format!("adopting the table of service {}", value.id))?;
            }
        }
        Ok(space)
    }

    /// Removes a service; its packets pass to the kernel from then on.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        let Some(value) = self.service(key)? else {
            bail!("no such service");
        };
        // The slot first, so no established flow finds the service after
        // it is gone: its family (a key byte no flow matches at 0) is
        // cleared alone before the rest, so a packet never reads this key
        // with a half-cleared value.
        let mut slot = self.service_slots.get(&value.id, 0)?;
        slot.key.family = 0;
        self.set_service_slot(value.id, slot)?;
        self.set_service_slot(value.id, ServiceSlot::default())?;
        self.index_service(value.id, None)?;
        self.services.remove(key).context("removing the service")?;
        self.ring_space
            .retire(table_region(&value), None, Instant::now());
        self.adjust_vip(key, -vip_share(value.flags))
    }

    fn set_service_slot(&mut self, id: u32, slot: ServiceSlot) -> Result<()> {
        self.service_slots
            .set(id, slot, 0)
            .with_context(|| format!("writing the slot of service {id}"))
    }

    /// Writes the elements of the service index that change now that
    /// service `id` has `key` (`None`: no service has it). A packet that
    /// reads an element mid-write checks each id it reads against the id's
    /// slot, and takes the services hash when none serves it.
    fn index_service(&mut self, id: u32, key: Option<ServiceKey>) -> Result<()> {
        for (i, e) in self.service_index.set(id, key) {
            self.service_index_map
                .set(i, e, 0)
                .context("writing the service index")?;
        }
        Ok(())
    }

    /// Writes every service slot, and the service index, from the services
    /// map: the live ones with their service, the others empty.
    fn rebuild_service_slots(&mut self) -> Result<()> {
        let mut slots = vec![ServiceSlot::default(); self.capacity.max_services as usize];
        for entry in &self.services {
            let (key, value) = entry.context("listing services")?;
            if let Some(slot) = slots.get_mut(value.id as usize) {
                *slot = ServiceSlot { key, value };
            }
        }
        let mut live = std::collections::BTreeMap::new();
        for (id, slot) in slots.into_iter().enumerate() {
            // From what the pinned slot holds, which packets read meanwhile.
            let now = self.service_slots.get(&(id as u32), 0)?;
            for step in slot_writes(now, slot) {
                self.set_service_slot(id as u32, step)?;
            }
            if slot.key.family != 0 {
                live.insert(id as u32, slot.key);
            }
        }
        let index = service_index::ServiceIndex::new(live);
        batch::array_write(
            &mut self.service_index_map,
            &index.elements(),
            "the service index",
        )?;
        self.service_index = index;
        if self.service_index.overflow() > 0 {
            tracing::debug!(
                services = self.service_index.overflow(),
                "services without a place in the service index take the services hash"
            );
        }
        Ok(())
    }

    /// Adds `delta` to the VIP set's value for the service's address (see
    /// [`VIP_ECHO_UNIT`]); the address leaves the set when no service is
    /// left on it.
    fn adjust_vip(&mut self, key: &ServiceKey, delta: i64) -> Result<()> {
        let vip = AddrKey::from_bytes(key.addr, key.family);
        let now = match self.vips.get(&vip, 0) {
            Ok(n) => i64::from(n),
            Err(aya::maps::MapError::KeyNotFound) => 0,
            Err(e) => return Err(e).context("reading the VIP set"),
        } + delta;
        if now % i64::from(VIP_ECHO_UNIT) <= 0 {
            match self.vips.remove(&vip) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("updating the VIP set"),
            }
        } else {
            self.vips
                .insert(vip, now as u32, 0)
                .context("updating the VIP set")?;
        }
        // The VIP's filter word, from every VIP that shares it: set before
        // a new VIP's packets could need it, cleared only when no VIP does.
        let (word, _) = vip_filter_bit(&vip.addr);
        let bits = self.vip_filter_words()?[word as usize];
        self.vip_filter
            .set(word, bits, 0)
            .context("updating the VIP filter")
    }

    /// The VIP filter as the VIP set implies it.
    fn vip_filter_words(&self) -> Result<Vec<u64>> {
        let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
        for vip in self.vips.keys() {
            let (word, mask) = vip_filter_bit(&vip.context("listing VIPs")?.addr);
            words[word as usize] |= mask;
        }
        Ok(words)
    }

    /// Writes the whole VIP filter from the VIP set.
    fn rebuild_vip_filter(&mut self) -> Result<()> {
        for (word, bits) in self.vip_filter_words()?.into_iter().enumerate() {
            self.vip_filter
                .set(word as u32, bits, 0)
                .context("writing the VIP filter")?;
        }
        Ok(())
    }

    /// The live table of a service, as the kernel reads it.
    pub fn live_ring(&self, key: &ServiceKey) -> Result<Vec<u32>> {
        let svc = self.service(key)?.context("no such service")?;
        self.rings
            .read(table_region(&svc))
            .context("reading the live table")
    }

    /// Slots of the rings map neither holding a live table nor held back.
    pub fn free_ring_slots(&self) -> u64 {
        self.ring_space.free_slots()
    }

    /// The connection-table entry of a flow.
    pub fn conntrack(&self, flow: &FlowKey) -> Result<Option<FlowValue>> {
        Ok(self.conntrack_find(flow)?.map(|(_, e)| e.value()))
    }

    /// Where `flow`'s entry is in the table, and the entry: one read for
    /// each entry of its two buckets at most.
    fn conntrack_find(&self, flow: &FlowKey) -> Result<Option<(u32, FlowEntry)>> {
        for index in conntrack_carry::ways_of(flow, self.capacity.conntrack_buckets()) {
            let e = self
                .conntrack
                .get(&index, 0)
                .context("reading the connection table")?;
            if conntrack_carry::holds(&e, flow, lb_common::hash::bucket_hash(flow)) {
                return Ok(Some((index, e)));
            }
        }
        Ok(None)
    }

    /// Clears the entries in use that this version cannot read (their seal
    /// does not match: placed by an earlier version, whose hash put them
    /// elsewhere); returns how many. Run after this
    /// version's program replaced the previous one, so that nothing writes
    /// such entries again. Their flows' next packets take the Maglev tables.
    pub fn conntrack_clear_unreadable(&mut self) -> Result<usize> {
        let services = conntrack_carry::service_keys_by_id(&self.services)?;
        self.conntrack_clear_in_use_if(|e| conntrack_carry::carried(e, &services).is_none())
    }

    /// Frees every entry in use that `clear` picks; returns how many. The
    /// data plane writes the table meanwhile, and a walk of a large one
    /// takes seconds: each picked entry is read again just before it is
    /// cleared, and kept if it no longer is picked (a flow placed there
    /// since, or an entry that was caught mid-write). What is left is a
    /// write between that read and the clearing one: that flow's next
    /// packet makes its entry again.
    fn conntrack_clear_in_use_if(&mut self, clear: impl Fn(&FlowEntry) -> bool) -> Result<usize> {
        let picked = |e: &FlowEntry| !e.is_free() && clear(e);
        let candidates: Vec<u32> = self
            .conntrack_all()?
            .into_iter()
            .filter(|(_, e)| picked(e))
            .map(|(i, _)| i)
            .collect();
        let mut cleared = 0;
        for index in candidates {
            let now = self
                .conntrack
                .get(&index, 0)
                .context("reading the connection table")?;
            if picked(&now) {
                self.conntrack_clear(index)?;
                cleared += 1;
            }
        }
        Ok(cleared)
    }

    /// Frees entry `index` in place.
    fn conntrack_clear(&mut self, index: u32) -> Result<()> {
        self.conntrack
            .set(index, FlowEntry::default(), 0)
            .context("clearing a connection-table entry")
    }

    /// Every element of the connection table, with its index: one batch
    /// walk over the whole array (its cost follows the capacity, not the
    /// entries in use), or one read per element on kernels without batches.
    fn conntrack_all(&self) -> Result<Vec<(u32, FlowEntry)>> {
        batch::array_all(&self.conntrack, "the connection table")
    }

    /// Every connection-table entry in use (see [`Self::conntrack_all`] for
    /// the cost), its flow completed by its service's key. An entry caught
    /// mid-write by the data plane, or of a service no longer there, is
    /// left out.
    pub fn conntrack_dump(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        Ok(self.conntrack_dump_counted()?.0)
    }

    /// [`Self::conntrack_dump`], and how many entries are in use, those it
    /// leaves out included: one read of the table.
    pub fn conntrack_dump_counted(&self) -> Result<(Vec<(FlowKey, FlowValue)>, usize)> {
        let services = conntrack_carry::service_keys_by_id(&self.services)?;
        let all = self.conntrack_all()?;
        let in_use = all.iter().filter(|(_, e)| !e.is_free()).count();
        let flows = all
            .iter()
            .filter_map(|(_, e)| conntrack_carry::carried(e, &services))
            .collect();
        Ok((flows, in_use))
    }

    /// Frees every entry in use; returns how many. Their flows' next
    /// packets take the Maglev table.
    pub fn conntrack_clear_in_use(&mut self) -> Result<usize> {
        self.conntrack_clear_in_use_if(|_| true)
    }

    /// Frees every readable entry of the service whose key is `service`;
    /// returns how many. Their flows' next packets take the Maglev table.
    pub fn conntrack_clear_service(&mut self, service: &ServiceKey) -> Result<usize> {
        let services = conntrack_carry::service_keys_by_id(&self.services)?;
        self.conntrack_clear_in_use_if(|e| {
            conntrack_carry::carried(e, &services).is_some_and(|(k, _)| k.service_key() == *service)
        })
    }

    /// Removes the entries of `flows` (those still there); returns how many
    /// it removed. The flows' next packets take the Maglev table. An entry
    /// the data plane replaces between the read and the clearing write (a
    /// new flow in the same place) is cleared too: that flow's next packet
    /// makes it again.
    pub fn conntrack_remove(&mut self, flows: &[FlowKey]) -> Result<usize> {
        let mut removed = 0;
        for flow in flows {
            if let Some((index, _)) = self.conntrack_find(flow)? {
                self.conntrack_clear(index)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Global counters summed over CPUs, in `Counter::ALL` order; the
    /// forward counters, which the data plane keeps per backend, summed
    /// over backends too.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let forwarded = self.stats.forwarded()?;
        Counter::ALL
            .iter()
            .map(|&c| {
                let per_cpu = self.counters.get(&(c as u32), 0)?;
                let backends = c.forward_way().map_or(0, |w| forwarded[w as usize]);
                Ok((c, per_cpu.iter().sum::<u64>() + backends))
            })
            .collect()
    }

    /// Counters of service `id`, whose backends are `backends`: its
    /// drops, and its backends' forwards with those of the backends it
    /// had ([`Dataplane::release_backend_stats`]).
    pub fn service_stats(&self, id: u32, backends: &[u32]) -> Result<ServiceStats> {
        self.stats.service(id, backends)
    }

    /// Counters of backend `id`, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats> {
        self.stats.backend(id)
    }

    /// Keeps the counts of backend `id`, released (its flags cleared) from
    /// service `service` (`None`: from none the caller knows), with that
    /// service's; the id's next holder starts from zero.
    pub fn release_backend_stats(&mut self, id: u32, service: Option<u32>) -> Result<()> {
        self.stats.release_backend(id, service)
    }

    /// Keeps the counts of service `id`, removed with its backends
    /// released, in the global counters only; the id's next holder starts
    /// from zero.
    pub fn release_service_stats(&mut self, id: u32) -> Result<()> {
        self.stats.release_service(id)?;
        self.forget_source_counts(id)
            .with_context(|| format!("forgetting the source counts of removed service {id}"))
    }
}

#[cfg(test)]
mod tests {
    /// Every slot a packet can read while a service is published, each
    /// field from one of two consecutive writes, either serves no flow or
    /// names a part of one of the service's tables.
    #[test]
    fn a_slot_read_mid_change_never_names_another_services_table() {
        let key = ServiceKey {
            family: lb_common::FAMILY_V4,
            ..ServiceKey::default()
        };
        let other = ServiceKey { port: 1, ..key };
        let slot = |key, ring_offset, ring_size| ServiceSlot {
            key,
            value: ServiceValue {
                id: 3,
                flags: 0,
                ring_offset,
                ring_size,
                idle_timeout: 0,
            },
        };
        for (from, to) in [
            (ServiceSlot::default(), slot(key, 70_000, 13)),
            (slot(key, 0, 65_537), slot(key, 200_000, 131_101)),
            (slot(key, 200_000, 131_101), slot(key, 0, 65_537)),
            (slot(key, 70_000, 13), slot(key, 70_000, 13)),
            (slot(other, 0, 65_537), slot(key, 70_000, 13)),
            // A change that failed part way: the slot at its first step.
            (slot(key, 0, 13), slot(key, 0, 65_537)),
        ] {
            let mut seen = vec![from];
            seen.extend(slot_writes(from, to));
            assert_eq!(seen.last(), Some(&to));
            // A packet serves the key it reads (the family from one write,
            // the rest from either) from a table that key has.
            let fits = |key: ServiceKey, offset, size| {
                [from, to]
                    .iter()
                    .filter(|t| t.key == key)
                    .any(|t| t.value.ring_offset == offset && size <= t.value.ring_size)
            };
            for pair in seen.windows(2) {
                for [f, k, o, z] in mixes(pair) {
                    let read = ServiceKey {
                        family: f.key.family,
                        ..k.key
                    };
                    assert!(
                        read.family == 0 || fits(read, o.value.ring_offset, z.value.ring_size),
                        "{from:?} to {to:?}: key {read:?}, offset {} with size {}",
                        o.value.ring_offset,
                        z.value.ring_size
                    );
                }
            }
        }
    }

    /// Each way of taking the family, the rest of the key, the offset
    /// and the size from either of two slots.
    fn mixes(pair: &[ServiceSlot]) -> Vec<[ServiceSlot; 4]> {
        let mut all = vec![[ServiceSlot::default(); 4]];
        for part in 0..4 {
            all = all
                .into_iter()
                .flat_map(|m| {
                    pair.iter().map(move |&s| {
                        let mut m = m;
                        m[part] = s;
                        m
                    })
                })
                .collect();
        }
        all
    }

    use super::*;

    #[test]
    fn a_bond_is_attached_in_generic_mode_and_driver_mode_on_it_is_refused() {
        assert_eq!(
            mode_on("bond0", XdpMode::Default, true).unwrap(),
            XdpMode::Skb
        );
        assert_eq!(mode_on("bond0", XdpMode::Skb, true).unwrap(), XdpMode::Skb);
        let e = mode_on("bond0", XdpMode::Driver, true).unwrap_err();
        assert!(format!("{e:#}").contains("bond0 is a bond"), "{e:#}");
        for mode in [XdpMode::Default, XdpMode::Skb, XdpMode::Driver] {
            assert_eq!(mode_on("eth0", mode, false).unwrap(), mode);
        }
        assert!(!link::is_bond("lo"));
    }

    /// Fewer instructions than this in `lb_xdp`'s own function, and the
    /// packet path lives behind a call. The path is some 4,800 today; the
    /// stub LLVM leaves when it outlines a grown body is 2.
    const PACKET_PATH_MIN_INSNS: usize = 1_000;

    /// LLVM moved the whole body of `lb_xdp` into a function of its own,
    /// called from a stub, once the body grew past its inlining budget:
    /// every packet then paid a BPF-to-BPF call (a quick benchmark A/B
    /// measured the non-service pass 12% slower). `lb_xdp` is now
    /// `#[inline(always)]`; this catches whatever undoes that. Rarely taken
    /// steps may be outlined (`log_drop` is); the path itself may not.
    #[test]
    fn the_packet_path_is_the_programs_own_function() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        let prog = &object.programs[names::PROG_LB];
        let body = &object.functions[&prog.function_key()];
        assert!(
            body.instructions.len() >= PACKET_PATH_MIN_INSNS,
            "{} has {} instructions of its own: its body was outlined",
            names::PROG_LB,
            body.instructions.len()
        );
    }

    #[test]
    fn the_default_rings_map_is_sized_by_the_rule_for_the_default_capacities() {
        assert_eq!(
            Capacity::ring_slots_for(DEFAULT_MAX_SERVICES, DEFAULT_MAX_BACKENDS, None).unwrap(),
            DEFAULT_RING_SLOTS
        );
        let sized = Capacity::ring_slots_for(3, 99, None).unwrap();
        assert_eq!(
            sized,
            4 * DEFAULT_RING_SIZE + 99 * SPARE_RING_SLOTS_PER_BACKEND
        );
        // Fixing the smallest size, or a smaller one, changes nothing.
        assert_eq!(
            Capacity::ring_slots_for(3, 99, Some(DEFAULT_RING_SIZE)).unwrap(),
            sized
        );
        assert_eq!(Capacity::ring_slots_for(3, 99, Some(7)).unwrap(), sized);
        assert_eq!(
            Capacity::ring_slots_for(3, 99, Some(1_048_583)).unwrap(),
            4 * 1_048_583
        );
        assert!(Capacity::ring_slots_for(u32::MAX, 1, None).is_err());
    }

    /// The kernel/user ABI, checked without root: every map the object
    /// defines has the key and value sizes of lb-common's types and its
    /// default capacity, and none goes unchecked (aya's own sections aside).
    #[test]
    fn the_objects_maps_are_the_shapes_lb_common_declares() {
        use lb_common::{
            CoarseClock, IcmpBudget, IcmpKind, ProbeTunnel, RingChunk, SourceBlockBucket,
            SourceKey, SourceRateBucket, SourceShape,
            counters::DecapCounter,
            limits::{
                INTERFACE_SLOTS, LIMITED_SOURCE_SLOTS, MAX_ACL_PREFIXES, MAX_ADDRESSES,
                MAX_DECAP_SOURCES, PROBE_MARKS, SOURCE_BLOCK_BUCKETS, SOURCE_RATE_BUCKETS,
                VIP_FILTER_WORDS,
            },
        };
        use std::mem::size_of;
        /// An LPM trie's key: the prefix length, then the data.
        const PREFIX_LEN: usize = size_of::<u32>();
        let u32s = size_of::<u32>();
        let want: [(&str, usize, usize, u32); 30] = [
            (
                names::SERVICES,
                size_of::<ServiceKey>(),
                size_of::<ServiceValue>(),
                DEFAULT_MAX_SERVICES,
            ),
            (
                names::SERVICE_SLOTS,
                u32s,
                size_of::<ServiceSlot>(),
                DEFAULT_MAX_SERVICES,
            ),
            (
                names::SERVICE_INDEX,
                u32s,
                size_of::<ServiceIndexEntry>(),
                lb_common::limits::SERVICE_INDEX_ELEMENTS,
            ),
            (names::VIPS, size_of::<AddrKey>(), u32s, MAX_ADDRESSES),
            (names::VIP_FILTER, u32s, size_of::<u64>(), VIP_FILTER_WORDS),
            (
                names::RINGS,
                u32s,
                size_of::<RingChunk>(),
                DEFAULT_RING_SLOTS.div_ceil(RING_CHUNK_SLOTS),
            ),
            (
                names::BACKENDS,
                u32s,
                size_of::<BackendValue>(),
                DEFAULT_MAX_BACKENDS,
            ),
            (
                names::CONNTRACK,
                u32s,
                size_of::<FlowEntry>(),
                DEFAULT_CONNTRACK_ENTRIES,
            ),
            (
                names::CONNTRACK_SETTINGS,
                u32s,
                size_of::<ConntrackSettings>(),
                1,
            ),
            (names::CONNTRACK_STATS, u32s, size_of::<ConntrackStats>(), 1),
            (names::SETTINGS, u32s, size_of::<Settings>(), 1),
            (
                names::INTERFACES,
                u32s,
                size_of::<Interface>(),
                INTERFACE_SLOTS,
            ),
            // A device map's value: the ifindex, and a program's id (unused).
            (names::EGRESS, u32s, 2 * u32s, MAX_PORTS + 1),
            (
                names::ICMP_BUDGET,
                u32s,
                size_of::<IcmpBudget>(),
                IcmpKind::COUNT,
            ),
            (names::COUNTERS, u32s, size_of::<u64>(), Counter::COUNT),
            (
                names::SERVICE_DROPS,
                u32s,
                size_of::<u64>(),
                DEFAULT_MAX_SERVICES,
            ),
            (
                names::BACKEND_STATS,
                u32s,
                size_of::<BackendStats>(),
                limits::backend_stats_entries(DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES),
            ),
            (
                names::DECAP_ADDRS,
                size_of::<AddrKey>(),
                u32s,
                MAX_ADDRESSES,
            ),
            (
                names::DECAP_SOURCES,
                PREFIX_LEN + size_of::<SourceKey>(),
                u32s,
                MAX_DECAP_SOURCES,
            ),
            (names::DECAP_VIPS, size_of::<AddrKey>(), u32s, MAX_ADDRESSES),
            (
                names::DECAP_COUNTERS,
                u32s,
                size_of::<u64>(),
                DecapCounter::COUNT,
            ),
            (
                names::ACL,
                PREFIX_LEN + size_of::<AclKey>(),
                u32s,
                MAX_ACL_PREFIXES,
            ),
            (
                names::SOURCE_SHAPES,
                u32s,
                size_of::<SourceShape>(),
                DEFAULT_MAX_SERVICES,
            ),
            (
                names::SOURCE_BLOCKS,
                u32s,
                size_of::<SourceBlockBucket>(),
                SOURCE_BLOCK_BUCKETS,
            ),
            (
                names::SOURCE_DROPS,
                u32s,
                size_of::<SourceDrops>(),
                DEFAULT_MAX_SERVICES,
            ),
            (
                names::SOURCE_LIMITS,
                u32s,
                size_of::<SourceLimit>(),
                DEFAULT_MAX_SERVICES,
            ),
            (
                names::SOURCE_RATES,
                u32s,
                size_of::<SourceRateBucket>(),
                SOURCE_RATE_BUCKETS,
            ),
            (names::COARSE_CLOCK, u32s, size_of::<CoarseClock>(), 1),
            (
                names::LIMITED_SOURCES,
                u32s,
                size_of::<LimitedSource>(),
                LIMITED_SOURCE_SLOTS,
            ),
            (
                names::PROBE_TUNNELS,
                u32s,
                size_of::<ProbeTunnel>(),
                PROBE_MARKS,
            ),
        ];
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        for (name, key, value, entries) in want {
            let map = object
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(map.key_size() as usize, key, "{name}: key bytes");
            assert_eq!(map.value_size() as usize, value, "{name}: value bytes");
            assert_eq!(map.max_entries(), entries, "{name}: entries");
        }
        let globals = object
            .maps
            .get(names::GLOBALS)
            .unwrap_or_else(|| panic!("{} missing", names::GLOBALS));
        assert_eq!(globals.value_size() as usize, size_of::<Globals>());
        assert_eq!(globals.max_entries(), 1);
        for name in object.maps.keys() {
            let aya_own = name.starts_with('.') || name.starts_with("AYA_");
            assert!(
                aya_own || want.iter().any(|(n, ..)| n == name),
                "map {name} of the object is not checked here"
            );
        }
        // Both map lists cover exactly the object's maps.
        let listed: std::collections::BTreeSet<&str> = ALL_MAPS
            .iter()
            .chain(&decap::DECAP_MAPS)
            .chain(&probe_encap::PROBE_ENCAP_MAPS)
            .copied()
            .collect();
        let checked: std::collections::BTreeSet<&str> = want.iter().map(|w| w.0).collect();
        assert_eq!(listed, checked);
    }
}
