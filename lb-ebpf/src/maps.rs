//! The maps. Statics are named as `lb_common::maps` spells them (the symbol
//! name is the map name user space opens); capacities are the defaults from
//! `lb_common::limits`, which user space may raise at load time.

use core::{
    arch::asm,
    ptr::{self, NonNull},
};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::{Array, DevMap, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use lb_common::{
    AclKey, Addr, AddrKey, BLOCK_MIXED, BackendStats, BackendValue, CoarseClock, ConntrackSettings,
    ConntrackStats, Counter, FLOW_SEEN_MASK, FlowEntry, FlowKey, FlowValue, ForwardWay, Globals,
    IcmpBudget, IcmpKind, Interface, LimitedSource, ProbeTunnel, RingChunk, ServiceIndexEntry,
    ServiceKey, ServiceSlot, ServiceValue, Settings, SourceBlock, SourceBlockBucket, SourceDrops,
    SourceKey, SourceLimit, SourceRateBucket, SourceShape,
    counters::DecapCounter,
    flow_buckets,
    hash::{service_index, source_block_bucket, vip_filter_bit_of_fold},
    interface_slot, limits,
    limits::{CONNTRACK_WAYS, CONNTRACK_WAYS_PER_LINE, NO_SERVICE},
    ring_position, vip_answers_echo,
};

/// Services. Not preallocated, so an update replaces the element under RCU and
/// a reader never sees a recycled one (this is what makes a move of a table
/// to other slots atomic).
#[map]
static LB_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(limits::DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Live services by id, for packets whose connection-table entry or the
/// service index names their service: an array read instead of a hash
/// lookup on the path most packets take. User space keeps it equal to
/// `LB_SERVICES`.
#[map]
static LB_SERVICE_SLOTS: Array<ServiceSlot> =
    Array::with_max_entries(limits::DEFAULT_MAX_SERVICES, 0);

/// Service ids by a hash of their key, for packets without a
/// connection-table entry (new flows, floods): the index's element and the
/// id's slot instead of a hash lookup. User space keeps it, and where a
/// service finds no way, or a packet reads an element mid-write, the
/// services hash answers.
#[map]
static LB_SERVICE_INDEX: Array<ServiceIndexEntry> =
    Array::with_max_entries(limits::SERVICE_INDEX_ELEMENTS, 0);

/// VIP addresses, to tell "for a VIP but malformed or fragmented" from "not ours".
#[map]
static LB_VIPS: HashMap<AddrKey, u32> =
    HashMap::with_max_entries(limits::MAX_ADDRESSES, BPF_F_NO_PREALLOC);

/// Bitmap over hashed VIP addresses: traffic to no VIP (most of what a host
/// receives) leaves after one array read instead of a hash lookup.
#[map]
static LB_VIP_FILTER: Array<u64> = Array::with_max_entries(limits::VIP_FILTER_WORDS, 0);

/// Maglev tables, one per service, at the slots its value names
/// (`lb_common::ring_position`). Memory-mappable: user space writes the
/// slots a change moves with plain stores, in place.
#[map]
static LB_RINGS: Array<RingChunk> = Array::with_max_entries(
    limits::DEFAULT_RING_SLOTS.div_ceil(limits::RING_CHUNK_SLOTS),
    BPF_F_MMAPABLE,
);

/// Backends by id.
#[map]
static LB_BACKENDS: Array<BackendValue> = Array::with_max_entries(limits::DEFAULT_MAX_BACKENDS, 0);

/// Connection table: buckets of `CONNTRACK_WAYS` entries in one array shared
/// by all CPUs (a flow whose packets arrive on several CPUs still sticks).
/// An array element is read and written in place, where a hash map's insert
/// takes a free element off a list and links it in under a lock: replacing
/// an entry costs a few stores. The price is that a flow can only live in
/// its two buckets, so a table evicts before it is full (docs/dataplane.md).
/// Memory-mappable only for where the kernel puts it: the entries of such an
/// array start on a page, so each is one cache line and each bucket group
/// one page (elsewhere they start a header's length in, straddling lines).
#[map]
static LB_CONNTRACK: Array<FlowEntry> =
    Array::with_max_entries(limits::DEFAULT_CONNTRACK_ENTRIES, BPF_F_MMAPABLE);

/// The settings and the connection-table policy, as the program reads
/// them: a global variable (the kernel's global data), whose address the
/// program holds as a constant, where a map lookup took a bounds check and
/// a pointer on every packet. To user space it is a one-entry array named
/// by its section, `lb_common::maps::GLOBALS` (an attribute takes no
/// constant; the object's contract test checks the two agree). Exported,
/// so LLVM cannot take the initial value for what it holds.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.lb_globals")]
static mut LB_GLOBALS: Globals = Globals::ZERO;

/// Connection-table policy, one entry: the pinned record of
/// [`LB_GLOBALS`]'s, which a restarted daemon adopts and a program of an
/// earlier version reads.
#[map]
static LB_CONNTRACK_SETTINGS: Array<ConntrackSettings> = Array::with_max_entries(1, 0);

/// Connection-table accounting and each CPU's insert budget, one entry.
#[map]
static LB_CONNTRACK_STATS: PerCpuArray<ConntrackStats> = PerCpuArray::with_max_entries(1, 0);

/// Settings, one entry: the pinned record of [`LB_GLOBALS`]'s, which a
/// program of an earlier version reads.
#[map]
static LB_SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// The interfaces the program is attached to, by [`interface_slot`].
#[map]
static LB_INTERFACES: Array<Interface> = Array::with_max_entries(limits::INTERFACE_SLOTS, 0);

/// The attached interfaces by port, for XDP_REDIRECT to backends behind
/// another interface than the receiving one.
#[map]
static LB_EGRESS: DevMap = DevMap::with_max_entries(limits::MAX_PORTS + 1, 0);

/// Each CPU's ICMP messages of each kind in the current second.
#[map]
static LB_ICMP_BUDGET: PerCpuArray<IcmpBudget> = PerCpuArray::with_max_entries(IcmpKind::COUNT, 0);

/// Global reasons, one per `Counter`.
#[map]
static LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Per-service drops.
#[map]
static LB_SERVICE_DROPS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(limits::DEFAULT_MAX_SERVICES, 0);

/// Per-backend counters: a forwarded packet's only counters update. User
/// space sizes it with room after the backends for counts it keeps.
#[map]
static LB_BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(
    limits::backend_stats_entries(limits::DEFAULT_MAX_BACKENDS, limits::DEFAULT_MAX_SERVICES),
    0,
);

/// Services' source lists: each prefix with the list it is in.
#[map]
static LB_ACL: LpmTrie<AclKey, u32> =
    LpmTrie::with_max_entries(limits::MAX_ACL_PREFIXES, BPF_F_NO_PREALLOC);

/// The source lists' directory: each service's block length per family and
/// whether its blocks are all in `LB_SOURCE_BLOCKS`, by service id.
#[map]
static LB_SOURCE_SHAPES: Array<SourceShape> =
    Array::with_max_entries(limits::DEFAULT_MAX_SERVICES, 0);

/// The source lists' directory of blocks: a new flow's list in one array
/// read where the trie walks a node a level (docs/dataplane.md).
#[map]
static LB_SOURCE_BLOCKS: Array<SourceBlockBucket> =
    Array::with_max_entries(limits::SOURCE_BLOCK_BUCKETS, 0);

/// Per-service drops by source: its lists and its new-flow limit.
#[map]
static LB_SOURCE_DROPS: PerCpuArray<SourceDrops> =
    PerCpuArray::with_max_entries(limits::DEFAULT_MAX_SERVICES, 0);

/// Services' new-flow limits per source, by service id.
#[map]
static LB_SOURCE_LIMITS: Array<SourceLimit> =
    Array::with_max_entries(limits::DEFAULT_MAX_SERVICES, 0);

/// Each CPU's recent sources of limited services and when their next new
/// flow is due. Per CPU, so an update is a few plain stores: a source
/// whose flows land on n CPUs may open up to n times its rate.
#[map]
static LB_SOURCE_RATES: PerCpuArray<SourceRateBucket> =
    PerCpuArray::with_max_entries(limits::SOURCE_RATE_BUCKETS, 0);

/// Each CPU's last reading of the coarse clock, one entry.
#[map]
static LB_COARSE_CLOCK: PerCpuArray<CoarseClock> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's sample of limited sources, for `lb stats`.
#[map]
static LB_LIMITED_SOURCES: PerCpuArray<LimitedSource> =
    PerCpuArray::with_max_entries(limits::LIMITED_SOURCE_SLOTS, 0);

/// Decap program: the host's tunnel endpoint addresses, each with the UDP
/// port its GUE packets come to (0: none).
#[map]
static LB_DECAP_ADDRS: HashMap<AddrKey, u32> =
    HashMap::with_max_entries(limits::MAX_ADDRESSES, BPF_F_NO_PREALLOC);

/// Decap program: the prefixes whose tunnel packets it accepts.
#[map]
static LB_DECAP_SOURCES: LpmTrie<SourceKey, u32> =
    LpmTrie::with_max_entries(limits::MAX_DECAP_SOURCES, BPF_F_NO_PREALLOC);

/// Decap program: the VIPs an inner packet may be addressed to.
#[map]
static LB_DECAP_VIPS: HashMap<AddrKey, u32> =
    HashMap::with_max_entries(limits::MAX_ADDRESSES, BPF_F_NO_PREALLOC);

/// Decap program's counters.
#[map]
static LB_DECAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecapCounter::COUNT, 0);

/// The probe encapsulator's tunnels, by probe mark.
#[map]
static LB_PROBE_TUNNELS: HashMap<u32, ProbeTunnel> =
    HashMap::with_max_entries(limits::PROBE_MARKS, BPF_F_NO_PREALLOC);

/// The service for `key`, copied out of the map.
#[inline(always)]
fn service(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: the map is not preallocated, so the element stays valid under
    // RCU for the duration of the program; we copy it immediately.
    unsafe { LB_SERVICES.get(key).copied() }
}

/// The service `flow` was sent to, copied: the id the service index names
/// whose slot's key is the flow's destination, else the services hash's.
#[inline(always)]
pub(crate) fn service_of(flow: &FlowKey) -> Option<ServiceValue> {
    if let Some(e) = LB_SERVICE_INDEX.get(service_index(&flow.dst, flow.dport, flow.proto)) {
        // A loop of two, which LLVM unrolls.
        for id in e.ids {
            if id != NO_SERVICE
                && let Some(slot) = service_slot(id)
                && slot.serves(flow)
            {
                return Some(slot.value);
            }
        }
    }
    service(&flow.service_key())
}

/// The slot of service `id`, in place. User space rewrites a slot in place;
/// each field is read whole, and a slot whose key is being cleared or
/// replaced fails [`ServiceSlot::serves`] for the flows of another service.
#[inline(always)]
pub(crate) fn service_slot(id: u32) -> Option<&'static ServiceSlot> {
    LB_SERVICE_SLOTS.get(id)
}

/// Whether `key` is a VIP address of some service.
#[inline(always)]
pub(crate) fn is_vip(key: &AddrKey) -> bool {
    LB_VIPS.get_ptr(key).is_some()
}

/// Whether `key` is a VIP address with a service that answers echo.
#[inline(always)]
pub(crate) fn answers_echo(key: &AddrKey) -> bool {
    // SAFETY: a u32 in the map, read whole.
    LB_VIPS
        .get_ptr(key)
        .is_some_and(|v| vip_answers_echo(unsafe { *v }))
}

/// Whether the address whose words fold to `folded`
/// ([`parse::destination_fold`](crate::parse::destination_fold)) may be a
/// VIP address: `false` proves it is none.
#[inline(always)]
pub(crate) fn may_be_vip(folded: u32) -> bool {
    let (word, mask) = vip_filter_bit_of_fold(folded);
    LB_VIP_FILTER.get(word).is_some_and(|w| w & mask != 0)
}

/// The backend id in slot `slot` of the table starting at `offset`.
#[inline(always)]
pub(crate) fn ring_slot(offset: u32, slot: u32) -> Option<u32> {
    let (element, lane) = ring_position(offset, slot);
    // `lane` is below RING_CHUNK_SLOTS, the chunk's length: the bounds
    // check folds away.
    LB_RINGS
        .get(element)
        .and_then(|chunk| chunk.get(lane))
        .copied()
}

/// A whole copy of the backend with id `id`: `None` if the id is out of
/// range, never written, or being rewritten by user space as it is read
/// twice (a write takes nanoseconds; the second read is the retry).
#[inline(always)]
pub(crate) fn backend(id: u32) -> Option<BackendValue> {
    let p = LB_BACKENDS.get_ptr(id)?;
    let v = read_backend(p);
    if v.is_whole() {
        return Some(v);
    }
    let v = read_backend(p);
    v.is_whole().then_some(v)
}

/// One copy of the backend at `p`, as four 8-byte loads. Volatile: the
/// retry above must read memory again, which LLVM would otherwise fold
/// into the first copy.
#[inline(always)]
fn read_backend(p: *const BackendValue) -> BackendValue {
    let words = p as *const [u64; 4];
    // SAFETY: `p` is an element of the array, 8-aligned and 32 bytes long,
    // never freed; any bits are a valid value.
    unsafe {
        let w = [
            ptr::read_volatile(&(*words)[0]),
            ptr::read_volatile(&(*words)[1]),
            ptr::read_volatile(&(*words)[2]),
            ptr::read_volatile(&(*words)[3]),
        ];
        core::mem::transmute::<[u64; 4], BackendValue>(w)
    }
}

/// Where a flow stands in the connection table.
pub(crate) struct Lookup {
    /// Its entry, in place, with the value as read when it was found whole.
    pub hit: Option<(NonNull<FlowEntry>, FlowValue)>,
    /// The entry a new one for the flow would replace: the flow's own (torn
    /// or not), else a free one of the less loaded bucket, else the least
    /// recently seen of both buckets.
    victim: Option<NonNull<FlowEntry>>,
}

impl Lookup {
    /// Nothing found and nowhere to write: a lookup skipped, or an index
    /// past the array (a table smaller than user space said).
    pub(crate) const NONE: Lookup = Lookup {
        hit: None,
        victim: None,
    };
}

/// Requests the second cache line of buckets `a` and `b` (the indices of
/// their first ways) without waiting for it: loads whose values are unused.
#[inline(always)]
fn request_second_lines(a: u32, b: u32) {
    for first in [a, b] {
        if let Some(p) = LB_CONNTRACK.get_ptr(first + CONNTRACK_WAYS_PER_LINE) {
            // SAFETY: an array element, never freed; the value is not used.
            unsafe { ptr::read_volatile(p as *const u64) };
        }
    }
}

/// Looks `flow`, whose bucket hash is `hash`, up in its two buckets.
/// `opening`: the packet most likely opens a flow (a TCP SYN), whose miss
/// reads both buckets whole.
#[inline(always)]
pub(crate) fn conntrack_lookup(
    ct: &ConntrackSettings,
    flow: &FlowKey,
    hash: u32,
    opening: bool,
) -> Lookup {
    // Without a table (`ct.buckets` 0, before user space sizes it) both
    // buckets are in the first group, whose entries are free: nothing is
    // found, and `conntrack_put` writes nothing. Checked there, not here, so
    // that a hit's path has one way out fewer.
    let [a, b] = flow_buckets(hash, ct.buckets);
    let (Some(first_a), Some(first_b)) = (
        LB_CONNTRACK.get_ptr_mut(a).and_then(NonNull::new),
        LB_CONNTRACK.get_ptr_mut(b).and_then(NonNull::new),
    ) else {
        return Lookup::NONE;
    };
    // The second bucket's first line requested before the first bucket's
    // compare: an entry is most often in the first way of either bucket,
    // and a cold one then costs one wait for both lines, not two.
    // SAFETY: an array element, never freed; the value is not used.
    unsafe { ptr::read_volatile(first_b.as_ptr() as *const u64) };
    // A SYN most often opens a flow, whose miss reads both buckets' second
    // lines too: requested now, they come in with the first touch's page
    // walk, not after it. Other packets are most often hits in a first
    // line, which would pay the loads for nothing.
    if opening {
        request_second_lines(a, b);
    }
    // Those two ways first, without the walk's bookkeeping of free and old
    // entries, which only a flow that needs a place pays for.
    if let Some(found) = found_at(first_a, flow, hash) {
        return found;
    }
    if let Some(found) = found_at(first_b, flow, hash) {
        return found;
    }
    // Missed in both first ways, another packet is most often a new flow
    // too: its walk reads the second lines, now requested together rather
    // than one after the other (a SYN's again, which costs it two loads of
    // lines on their way, and spares a branch).
    request_second_lines(a, b);
    // Nullable pointers for "none yet", and `NonNull` in `Lookup`, never
    // `Option<*mut _>`: LLVM leaves the payload of such a `None` undefined,
    // and the verifier refuses to spill a register never set. Scalars, not
    // arrays indexed by bucket: LLVM would index a stack array with a
    // bitwise or, which the verifier refuses on a pointer.
    // Per bucket: its first free entry, and how many are free.
    let (mut free_a, mut free_b): (*mut FlowEntry, *mut FlowEntry) =
        (ptr::null_mut(), ptr::null_mut());
    let (mut frees_a, mut frees_b) = (0u32, 0u32);
    let mut oldest: *mut FlowEntry = ptr::null_mut();
    let mut oldest_seen = u32::MAX;
    // A loop of a constant few rounds, which LLVM unrolls. The buckets'
    // ways alternate (a0, b0, a1, b1, ...): entries fill a bucket from its
    // first way, so most hits come in the first few cache lines read.
    for i in 0..2 * CONNTRACK_WAYS {
        let in_a = i & 1 == 0;
        // The two first ways were compared above.
        let p = match i {
            0 => first_a,
            1 => first_b,
            _ => {
                let index = if in_a { a + (i >> 1) } else { b + (i >> 1) };
                let Some(p) = LB_CONNTRACK.get_ptr_mut(index).and_then(NonNull::new) else {
                    return Lookup::NONE;
                };
                if let Some(found) = found_at(p, flow, hash) {
                    return found;
                }
                p
            }
        };
        // SAFETY: an array element, never freed; other CPUs may rewrite
        // it meanwhile, which the seal detects.
        let e = unsafe { p.as_ref() };
        if e.is_free() {
            if in_a {
                if free_a.is_null() {
                    free_a = p.as_ptr();
                }
                frees_a += 1;
            } else {
                if free_b.is_null() {
                    free_b = p.as_ptr();
                }
                frees_b += 1;
            }
        } else if oldest.is_null() || e.seen & FLOW_SEEN_MASK < oldest_seen {
            oldest_seen = e.seen & FLOW_SEEN_MASK;
            oldest = p.as_ptr();
        }
    }
    // The less loaded bucket's free entry, else the least recently seen.
    let victim = if frees_a >= frees_b && frees_a != 0 {
        free_a
    } else if frees_b != 0 {
        free_b
    } else {
        oldest
    };
    Lookup {
        hit: None,
        victim: NonNull::new(victim),
    }
}

/// The lookup's answer if the entry at `p` is from `flow`'s client (bucket
/// hash `hash`): a hit if it is sealed for the flow; if not (torn, being
/// rewritten or cleared by user space, or the entry of the client's flow to
/// another service), a miss with the entry as the place to write the flow.
#[inline(always)]
fn found_at(p: NonNull<FlowEntry>, flow: &FlowKey, hash: u32) -> Option<Lookup> {
    // SAFETY: an array element, never freed; other CPUs may rewrite it
    // meanwhile, which the seal detects.
    let e = unsafe { p.as_ref() };
    if !e.same_client(flow) {
        return None;
    }
    let hit = e.sealed_value(hash).map(|value| (p, value));
    Some(Lookup {
        hit,
        victim: Some(p),
    })
}

/// The connection-table policy (all zero, no table, no limits and no
/// aging, until user space writes it).
#[inline(always)]
pub(crate) fn conntrack_settings() -> &'static ConntrackSettings {
    &globals().conntrack
}

/// The program's singletons ([`LB_GLOBALS`]).
#[inline(always)]
fn globals() -> &'static Globals {
    // SAFETY: the program never writes it, and it lives as long as the
    // program; user space rewrites it in place, and each field the program
    // reads is one aligned word, read whole.
    unsafe { &*ptr::addr_of!(LB_GLOBALS) }
}

/// Whether this CPU's insert budget (`ct`) allows another entry in the
/// second `ct.now`. The budget counts in the data plane's clock, which user
/// space advances: while it does not (no daemon), a CPU adds at most one
/// second's budget, and unpinned flows follow the Maglev table, which
/// nothing changes meanwhile.
#[inline(always)]
pub(crate) fn may_insert(ct: &ConntrackSettings) -> bool {
    ct.inserts_per_cpu == 0
        || LB_CONNTRACK_STATS.get(0).is_none_or(|s| {
            s.window != u64::from(ct.now) || s.window_inserts < u64::from(ct.inserts_per_cpu)
        })
}

/// Pins `flow` (bucket hash `hash`) to a backend in the entry `at` found
/// for it, if there is a table (`ct.buckets`, see [`conntrack_lookup`]) and
/// this CPU's insert budget allows; accounts the insert or the refusal. Not
/// pinning only means the flow follows the Maglev table, as it does anyway
/// while the table does not change.
#[inline(always)]
pub(crate) fn conntrack_put(
    ct: &ConntrackSettings,
    at: &Lookup,
    flow: &FlowKey,
    value: &FlowValue,
    hash: u32,
) {
    if ct.buckets == 0 {
        return;
    }
    let Some(stats) = LB_CONNTRACK_STATS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let stats = unsafe { &mut *stats };
    if ct.inserts_per_cpu != 0 {
        if stats.window != u64::from(ct.now) {
            stats.window = u64::from(ct.now);
            stats.window_inserts = 0;
        }
        if stats.window_inserts >= u64::from(ct.inserts_per_cpu) {
            stats.refused += 1;
            return;
        }
        stats.window_inserts += 1;
    }
    // A lookup skipped because the budget was spent (refused above).
    let Some(p) = at.victim else {
        return;
    };
    stats.inserts += 1;
    // SAFETY: an array element, never freed. Another CPU writing the same
    // entry at once leaves it torn, which the seal tells readers.
    unsafe { *p.as_ptr() = FlowEntry::new(flow, value, hash) };
}

/// The data-plane settings (all zero until user space writes them).
#[inline(always)]
pub(crate) fn settings() -> &'static Settings {
    &globals().settings
}

/// The interface with index `ifindex`, if user space registered it. User
/// space rewrites an entry in place when the interface's MAC or MTU
/// changes: a frame read against a half-written MAC passes to the kernel.
#[inline(always)]
pub(crate) fn interface(ifindex: u32) -> Option<&'static Interface> {
    LB_INTERFACES
        .get(interface_slot(ifindex))
        .filter(|i| i.ifindex == ifindex)
}

/// The attached interface with port `port`: its device-map entry and its
/// interface-table entry agree. `None` once it is detached or gone (the
/// kernel takes a removed device out of the device map).
#[inline(always)]
pub(crate) fn egress(port: u8) -> Option<&'static Interface> {
    interface(LB_EGRESS.get_ifindex(u32::from(port))?).filter(|i| i.port == port)
}

/// Tells the kernel to send the frame out of the interface with port
/// `port` when the program returns XDP_REDIRECT. False if it has no entry.
#[inline(always)]
pub(crate) fn redirect(port: u8) -> bool {
    LB_EGRESS.redirect(u32::from(port), 0).is_ok()
}

/// Takes one ICMP message of `kind` from this CPU's budget for second
/// `now`, if any is left ([`IcmpKind::per_cpu`]).
#[inline(always)]
pub(crate) fn take_icmp_budget(kind: IcmpKind, now: u32) -> bool {
    let Some(b) = LB_ICMP_BUDGET.get_ptr_mut(kind as u32) else {
        return false;
    };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let b = unsafe { &mut *b };
    if b.window != now {
        b.window = now;
        b.sent = 0;
    }
    if b.sent >= kind.per_cpu() {
        return false;
    }
    b.sent += 1;
    true
}

/// Adds one to the global counter `c`.
#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(p) = LB_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Accounts a forwarded packet to its backend: the service's and the
/// global forward counts are sums of these, which user space adds up.
#[inline(always)]
pub(crate) fn count_forward(backend_id: u32, way: ForwardWay, bytes: u64, new_flow: bool) {
    if let Some(b) = LB_BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU value. `way` indexes `forwarded` within bounds
        // (an enum of `ForwardWay::COUNT` values).
        unsafe {
            (*b).forwarded[way as usize] += 1;
            (*b).bytes += bytes;
            (*b).new_flows += u64::from(new_flow);
        }
    }
}

/// Counts a drop of a packet matched to service `service_id`.
#[inline(always)]
pub(crate) fn count_service_drop(service_id: u32) {
    if let Some(d) = LB_SERVICE_DROPS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU value.
        unsafe { *d += 1 };
    }
}

/// The list (`ACL_DENY`, `ACL_ALLOW`) of service `service_id`'s longest
/// prefix holding `src` (of `family`), if any: from the directory of
/// blocks when it knows, else from the trie.
#[inline(always)]
pub(crate) fn source_list(service_id: u32, family: u8, src: &Addr) -> Option<u32> {
    match source_block(service_id, family, src) {
        Some(list) => list,
        None => source_list_in_trie(service_id, family, *src),
    }
}

/// [`source_list`] by the trie's longest match.
#[inline(always)]
fn source_list_in_trie(service_id: u32, family: u8, src: Addr) -> Option<u32> {
    let key = Key::new(
        AclKey::prefix_len(8 * core::mem::size_of::<Addr>() as u32),
        AclKey {
            service: service_id.to_be_bytes(),
            source: SourceKey { family, addr: src },
        },
    );
    LB_ACL.get(key).copied()
}

/// Keeps LLVM from moving memory accesses across it: the BPF target has no
/// fence instruction (LLVM cannot select `compiler_fence`), and an empty
/// assembly block that may touch memory orders them just as well. Emits
/// nothing.
#[inline(always)]
fn compiler_barrier() {
    // SAFETY: no instruction.
    unsafe { asm!("", options(nostack, preserves_flags)) };
}

/// What the directory of blocks says of `src` (of `family`) for service
/// `service_id`: `Some` of its list (`None`: in no list) when it knows,
/// `None` when the trie must answer (the service's blocks are not all
/// there, the source's block is [`BLOCK_MIXED`], or user space rebuilt the
/// service's blocks while this read them).
#[inline(always)]
fn source_block(service_id: u32, family: u8, src: &Addr) -> Option<Option<u32>> {
    // The shape as one word: one load each time (its fields are bytes,
    // which a volatile read of the struct would load one by one).
    let shape_at = LB_SOURCE_SHAPES.get_ptr(service_id)? as *const u32;
    // SAFETY (both shape reads): an array element, 4-aligned, never freed.
    let word = unsafe { ptr::read_volatile(shape_at) };
    // SAFETY: `SourceShape` is four bytes with no invalid bit pattern.
    let shape: SourceShape = unsafe { core::mem::transmute(word) };
    if shape.ready == 0 {
        return None;
    }
    let len = shape.len_of(family);
    let head = SourceBlock::head_of(service_id, shape.generation, family, len);
    let block = SourceBlock::of(src, len);
    let bucket = LB_SOURCE_BLOCKS.get(source_block_bucket(head, block))?;
    // The bucket read between the two reads of the shape, in place: only
    // the ways up to the block's.
    compiler_barrier();
    let found = bucket.find(head, block);
    compiler_barrier();
    // Unchanged: the bucket was read while these blocks were the service's.
    if unsafe { ptr::read_volatile(shape_at) } != word {
        return None;
    }
    match found {
        Some(BLOCK_MIXED) => None,
        found => Some(found.map(u32::from)),
    }
}

/// Counts a packet of service `service_id` dropped by its source lists:
/// `denied`, or else outside its allow list.
#[inline(always)]
pub(crate) fn count_source_drop(service_id: u32, denied: bool) {
    if let Some(s) = LB_SOURCE_DROPS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU value.
        unsafe {
            if denied {
                (*s).denied += 1;
            } else {
                (*s).not_allowed += 1;
            }
        }
    }
    count_service_drop(service_id);
}

/// Service `service_id`'s new-flow limit per source.
#[inline(always)]
pub(crate) fn source_limit(service_id: u32) -> Option<SourceLimit> {
    LB_SOURCE_LIMITS.get(service_id).copied()
}

/// The kernel's coarse clock (`bpf_ktime_get_coarse_ns`: its last tick),
/// from this CPU's reading of it in the current jiffy: the helper call
/// cost 8-10 ns a new flow in the benchmark, the inlined read of
/// `jiffies` next to nothing, and both advance in the same tick.
#[inline(always)]
pub(crate) fn coarse_now_ns() -> u64 {
    // SAFETY (both helpers): no arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = LB_COARSE_CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: a per-CPU value: no other program touches it meanwhile.
    let c = unsafe { &mut *c };
    if c.jiffies != jiffies {
        c.ns = unsafe { bpf_ktime_get_coarse_ns() };
        c.jiffies = jiffies;
    }
    c.ns
}

/// Takes a new flow from the source prefix placed at `place` and tagged
/// `tag` ([`lb_common::hash::source_hash`]) at `now_ns` under `limit`:
/// whether it is admitted. The prefix's way in its bucket of this CPU's
/// table, or the way due earliest, is read and written in place.
#[inline(always)]
pub(crate) fn take_source_rate(limit: &SourceLimit, place: u32, tag: u32, now_ns: u64) -> bool {
    let Some(b) = LB_SOURCE_RATES.get_ptr_mut(place & (limits::SOURCE_RATE_BUCKETS - 1)) else {
        return true;
    };
    // SAFETY: a per-CPU value: no other program touches it meanwhile.
    let bucket = unsafe { &mut *b };
    let (i, known) = bucket.way_for(tag);
    // The mask: in bounds for the compiler too, so no panic branch.
    let way = &mut bucket.ways[i & (limits::SOURCE_RATE_WAYS - 1)];
    if !known {
        way.tag = tag;
        way.due_ns = 0;
    }
    match limit.admit(way.due_ns, now_ns) {
        Some(next) => {
            way.due_ns = next;
            true
        }
        None => false,
    }
}

/// Counts a new flow of service `service_id` from `prefix` (placed at
/// `place`) dropped by its limit, and samples the prefix: it keeps its slot
/// while it goes on being limited, and gives it up after a quiet spell.
#[inline(always)]
pub(crate) fn count_limited_source(service_id: u32, prefix: &Addr, place: u32, now: u32) {
    if let Some(s) = LB_SOURCE_DROPS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU value.
        unsafe { (*s).limited += 1 };
    }
    count_service_drop(service_id);
    let Some(slot) = LB_LIMITED_SOURCES.get_ptr_mut(place & (limits::LIMITED_SOURCE_SLOTS - 1))
    else {
        return;
    };
    // SAFETY: per-CPU value.
    let slot = unsafe { &mut *slot };
    if slot.holds(service_id, prefix) {
        slot.drops += 1;
    } else if slot.service == 0 || now.wrapping_sub(slot.last) >= limits::LIMITED_SOURCE_QUIET_SECS
    {
        slot.prefix = *prefix;
        slot.service = service_id + 1;
        slot.drops = 1;
    } else {
        return;
    }
    slot.last = now;
}

/// If `key` is one of this host's tunnel endpoints, the UDP port of GUE
/// packets to it (0: none) (decap program).
#[inline(always)]
pub(crate) fn decap_endpoint(key: &AddrKey) -> Option<u32> {
    // SAFETY: a hash value, read once.
    LB_DECAP_ADDRS.get_ptr(key).map(|p| unsafe { *p })
}

/// Whether `src` of `family` is inside an accepted source prefix (decap
/// program).
#[inline(always)]
pub(crate) fn is_decap_source(src: Addr, family: u8) -> bool {
    let bits = lb_common::SOURCE_FAMILY_BITS + 8 * core::mem::size_of::<Addr>() as u32;
    LB_DECAP_SOURCES
        .get(Key::new(bits, SourceKey { family, addr: src }))
        .is_some()
}

/// Whether `key` is a VIP configured on this host (decap program).
#[inline(always)]
pub(crate) fn is_decap_vip(key: &AddrKey) -> bool {
    LB_DECAP_VIPS.get_ptr(key).is_some()
}

/// Adds one to the decap counter `c`.
#[inline(always)]
pub(crate) fn count_decap(c: DecapCounter) {
    if let Some(p) = LB_DECAP_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU value.
        unsafe { *p += 1 };
    }
}

/// The tunnel of the probe with `mark`, if its backend's service has one
/// (probe encapsulator).
#[inline(always)]
pub(crate) fn probe_tunnel(mark: u32) -> Option<ProbeTunnel> {
    // SAFETY: a hash value, copied out at once.
    LB_PROBE_TUNNELS.get_ptr(mark).map(|p| unsafe { *p })
}
