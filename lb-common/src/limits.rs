//! Capacities and sizes shared by the kernel and user space.
//!
//! The map capacities here are the defaults compiled into the eBPF object; the
//! control plane may resize maps at load time (before the program is loaded)
//! when its configuration asks for more.

/// The Maglev table sizes a service's table takes, smallest first: primes
/// (Maglev needs M prime so that every `skip` in `1..M` generates a full
/// permutation), each about twice the one before. A service takes the
/// smallest that holds [`SLOTS_PER_BACKEND`] slots for each of its
/// backends, or the largest; the operator may fix one size instead. The
/// smallest is the size the Maglev paper and Katran use: a service of up
/// to 655 backends never changes size, so adding one moves only its share
/// of flows (a change of size remaps nearly every flow the connection
/// table does not hold). Every node computes the same size from the same
/// backends.
pub const TABLE_SIZES: [u32; 7] = [
    65_537, 131_101, 262_147, 524_309, 1_048_583, 2_097_169, 4_194_301,
];

/// The smallest table size, a service's unless it has more than 655 backends.
pub const DEFAULT_RING_SIZE: u32 = TABLE_SIZES[0];

/// The largest table size.
pub const MAX_TABLE_SIZE: u32 = TABLE_SIZES[TABLE_SIZES.len() - 1];

/// Slots per backend a table is sized for: the Maglev paper asks for
/// M > 100·N, which keeps the flows one backend's leaving moves, and each
/// backend's share, within about a percent of ideal.
pub const SLOTS_PER_BACKEND: u32 = 100;

/// Table slots in one element of the rings map. The kernel rounds an array
/// element up to 8 bytes, so a 4-byte slot per element would take 8; two
/// per element take exactly their own size.
pub const RING_CHUNK_SLOTS: u32 = 2;

/// Spare slots of the rings map per backend slot, beyond a table of the
/// smallest size per service: every table larger than the smallest holds
/// fewer than `2 * SLOTS_PER_BACKEND + 1` slots per backend (the sizes
/// about double), and a table replaced by one of another size keeps its
/// space for a moment ([`RING_RETIRE_GRACE_MS`]), so twice that.
pub const SPARE_RING_SLOTS_PER_BACKEND: u32 = 2 * (2 * SLOTS_PER_BACKEND + 1);

/// How long the space of a table replaced by one elsewhere in the rings
/// map stays untouched: a packet that read the service just before the
/// switch may still read that table. XDP programs run for microseconds;
/// this is thousands of times that.
pub const RING_RETIRE_GRACE_MS: u64 = 1_000;

/// Default number of service slots (service ids are `0..MAX_SERVICES`).
/// The rings map holds a table of the smallest size for each and one more,
/// plus [`SPARE_RING_SLOTS_PER_BACKEND`] slots per backend: 65 * 65,537 +
/// 402 * 4,096 slots of 4 B, 23 MiB by default.
pub const DEFAULT_MAX_SERVICES: u32 = 64;

/// Default number of backend slots. A backend id names one (service, backend)
/// membership, so the same server in two services takes two ids. At most
/// [`crate::MAX_FLOW_BACKEND_IDS`]: a connection-table entry names its
/// backend in 16 bits.
pub const DEFAULT_MAX_BACKENDS: u32 = 4_096;

/// Entries of the per-backend counters map for these capacities: one per
/// backend id, then the counts user space keeps of the backends it
/// released, one entry per service id and one for removed services.
pub const fn backend_stats_entries(max_backends: u32, max_services: u32) -> u32 {
    max_backends + max_services + 1
}

/// Default slots of the rings map (see [`DEFAULT_MAX_SERVICES`]).
pub const DEFAULT_RING_SLOTS: u32 = (DEFAULT_MAX_SERVICES + 1) * DEFAULT_RING_SIZE
    + SPARE_RING_SLOTS_PER_BACKEND * DEFAULT_MAX_BACKENDS;

/// Default connection-table capacity, in entries (32 bytes each: 16 MiB).
/// A flow may only live in two buckets, so a table holds about half its
/// entries before a new flow replaces an entry early (docs/dataplane.md):
/// this holds some 260,000 flows.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 524_288;

/// Entries in one bucket of the connection table (its ways). A flow's entry
/// can only be in one of its two buckets; a new flow whose buckets are both
/// full replaces their least recently seen entry. A bucket is two adjacent
/// 64-byte cache lines. (Eight ways would overflow later, but the verifier
/// gives up on a walk of sixteen entries: docs/dataplane.md.)
pub const CONNTRACK_WAYS: u32 = 4;

/// Entries of the connection table in one 64-byte cache line: a bucket's
/// second line starts at this way.
pub const CONNTRACK_WAYS_PER_LINE: u32 = 2;

/// Buckets in a group: a flow's two buckets are in the same group of 2 KiB
/// (16 buckets of four 32-byte entries), so both are in one page.
/// The table holds whole groups. A power of two.
pub const CONNTRACK_BUCKET_GROUP: u32 = 16;

/// Default of [`crate::ConntrackSettings::inserts_per_cpu`]: Katran's
/// default rate (125,000 new flows a second per CPU), rounded down. A CPU
/// inserting that many spends a fraction of its time on it; beyond it, a
/// flood of new flows (spoofed SYNs) would spend the rest and evict the
/// entries of established flows.
pub const DEFAULT_CONNTRACK_INSERTS_PER_CPU: u32 = 100_000;

/// Capacity of the VIP-address sets and of the decapsulator's endpoint
/// and VIP sets.
pub const MAX_ADDRESSES: u32 = 1_024;

/// Capacity of the decapsulator's accepted-source prefixes.
pub const MAX_DECAP_SOURCES: u32 = 1_024;

/// log2 of the bits in the VIP filter (`LB_VIP_FILTER`): 65,536 bits, so
/// with `MAX_ADDRESSES` VIPs at most one address in 64 that is no VIP passes
/// the filter and pays the service lookup.
pub const VIP_FILTER_BITS_LOG2: u32 = 16;

/// 64-bit words of the VIP filter.
pub const VIP_FILTER_WORDS: u32 = 1 << (VIP_FILTER_BITS_LOG2 - 6);

/// log2 of the elements of the service index (`LB_SERVICE_INDEX`): 4,096
/// elements of [`SERVICE_INDEX_WAYS`] ids each (32 KiB), so up to a few
/// thousand services each find a place; a service that finds none is still
/// found, by the services hash.
pub const SERVICE_INDEX_BITS: u32 = 12;

/// Elements of the service index.
pub const SERVICE_INDEX_ELEMENTS: u32 = 1 << SERVICE_INDEX_BITS;

/// Service ids per element of the service index.
pub const SERVICE_INDEX_WAYS: usize = 2;

/// An empty way of the service index (no service has this id).
pub const NO_SERVICE: u32 = u32::MAX;

/// Slots of the interface table (`LB_INTERFACES`), a power of two. An
/// interface lives in slot [`crate::interface_slot`] of its index; user space
/// refuses to attach to two interfaces whose indexes share a slot (their
/// indexes would have to differ by a multiple of this).
pub const INTERFACE_SLOTS: u32 = 256;

/// Interfaces the load balancer attaches to at once: their ports
/// ([`crate::Interface::port`]) run from 1 to this, so `LB_EGRESS` has one
/// entry more (port 0 is "the receiving interface").
pub const MAX_PORTS: u32 = 127;

/// ICMP errors each CPU sends per second of the data plane's clock
/// (`reply_too_big`); beyond it the packet is dropped (`drop_too_big`), so
/// a flood of oversized packets cannot turn the load balancer into a
/// source of as many replies.
pub const ICMP_ERRORS_PER_CPU: u32 = 1_000;

/// Echo replies each CPU sends per second of the data plane's clock
/// (`reply_echo`); beyond it the request is dropped (`drop_echo_limit`).
/// A budget of its own, so pings cannot spend the errors' budget.
pub const ECHO_REPLIES_PER_CPU: u32 = 1_000;

/// Ring slot value meaning "no backend": the ring of a service whose backends
/// are all out of rotation is filled with it, and such packets are dropped and
/// counted rather than passed (a VIP is not the host's own address).
pub const NO_BACKEND: u32 = u32::MAX;

/// 802.1Q/802.1ad tags the parser walks through (QinQ).
pub const MAX_VLAN_TAGS: usize = 2;

/// IPv6 extension headers the parser walks through before giving up (counted
/// as malformed). Bounded so the verifier sees a finite loop.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Default UDP destination port of `gue` packets, which `lb decap`
/// recognises them by: Katran's.
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// `gue` packets leave from a UDP source port in the dynamic range
/// (RFC 6335), its low bits taken from the flow hash, so backends' RSS and
/// ECMP on the way spread flows: this base ...
pub const GUE_SOURCE_PORT_BASE: u16 = 0xc000;
/// ... and these bits from the hash.
pub const GUE_SOURCE_PORT_MASK: u16 = 0x3fff;

/// The first of lb's probe marks (SO_MARK) and routing tables: backend
/// `id`'s are this plus `id` ("LB" in the upper half, so `ip rule` shows
/// them apart). The probe encapsulator looks at no packet outside them.
pub const PROBE_MARK_BASE: u32 = 0x4c42_0000;
/// Backend ids that have a probe mark of their own.
pub const PROBE_MARKS: u32 = 0x1_0000;

/// Prefixes in all the services' deny lists together, and as many in their
/// allow lists.
pub const MAX_LIST_PREFIXES: u32 = 65_536;
/// Prefixes the source lists' trie (`LB_ACL`) holds: both kinds of list,
/// twice, as a change writes the new lists beside the old before taking
/// the old out (so that no source is admitted that both refuse). An LPM
/// trie takes memory only for what it holds.
pub const MAX_ACL_PREFIXES: u32 = 4 * MAX_LIST_PREFIXES;

/// Buckets of the source lists' directory of blocks (`LB_SOURCE_BLOCKS`),
/// a power of two: with [`SOURCE_BLOCK_WAYS`] ways, 32,768 blocks in
/// 512 KiB, which every service's blocks share (a service whose blocks do
/// not all fit is answered by the trie alone).
pub const SOURCE_BLOCK_BUCKETS: u32 = 8_192;
/// Blocks a bucket of the directory holds: four 16-byte ways, one cache
/// line.
pub const SOURCE_BLOCK_WAYS: usize = 4;
/// The longest block of the directory: a block is the first bits of an
/// address, at most its first 8 bytes (one word).
pub const SOURCE_BLOCK_MAX_BITS: u8 = 64;

/// Buckets of each CPU's table of recent sources (`LB_SOURCE_RATES`), a
/// power of two: with [`SOURCE_RATE_WAYS`] ways, 2,048 sources a CPU in
/// 32 KiB. Small on purpose: every new source of a flood of spoofed ones
/// reads a bucket no packet has touched lately, and a table this size
/// stays in the caches where one of 512 KiB did not (docs/dataplane.md).
pub const SOURCE_RATE_BUCKETS: u32 = 512;
/// Sources a bucket of that table holds: four 16-byte ways, one cache line.
pub const SOURCE_RATE_WAYS: usize = 4;
/// Slots of each CPU's sample of limited sources (`LB_LIMITED_SOURCES`), a
/// power of two.
pub const LIMITED_SOURCE_SLOTS: u32 = 256;
/// Seconds without a limited flow after which a sampled source gives its
/// slot to another.
pub const LIMITED_SOURCE_QUIET_SECS: u32 = 10;
/// The longest tick of the clock new-flow limits read
/// (`bpf_ktime_get_coarse_ns`, which advances a tick at a time: 1 to 10 ms
/// by the kernel's `CONFIG_HZ`). Flows within one tick see one time, so a
/// limit admits at least a tick's worth of its rate at once, or it could
/// not keep its rate.
pub const COARSE_CLOCK_TICK_NS: u64 = 10_000_000;
/// The highest new-flow rate and burst a source limit takes: one new flow
/// a microsecond, a million at once.
pub const MAX_SOURCE_LIMIT: u32 = 1_000_000;
