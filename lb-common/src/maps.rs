//! Map names, spelled once. The eBPF crate names its statics identically (the
//! symbol name is the map name) and a contract test checks the object.

/// Services: [`crate::ServiceKey`] → [`crate::ServiceValue`] (hash).
pub const SERVICES: &str = "LB_SERVICES";
/// Live services by id: [`crate::ServiceValue::id`] → [`crate::ServiceSlot`] (array).
pub const SERVICE_SLOTS: &str = "LB_SERVICE_SLOTS";
/// Service ids by a hash of their key: [`crate::hash::service_index`] →
/// [`crate::ServiceIndexEntry`] (array).
pub const SERVICE_INDEX: &str = "LB_SERVICE_INDEX";
/// VIP addresses with at least one service: [`crate::AddrKey`] → u32 (hash).
pub const VIPS: &str = "LB_VIPS";
/// VIP filter: word index → u64 bitmap over [`crate::hash::vip_filter_bit`] (array).
pub const VIP_FILTER: &str = "LB_VIP_FILTER";
/// Maglev tables: element → [`crate::RingChunk`] of backend ids (array,
/// memory-mappable), see [`crate::ring_position`].
pub const RINGS: &str = "LB_RINGS";
/// Backends: backend id → [`crate::BackendValue`] (array).
pub const BACKENDS: &str = "LB_BACKENDS";
/// Connection table: buckets of [`crate::FlowEntry`] (array; see
/// [`crate::flow_buckets`]).
pub const CONNTRACK: &str = "LB_CONNTRACK";
/// Connection-table policy: index 0 → [`crate::ConntrackSettings`] (array);
/// the program reads its copy in [`GLOBALS`].
pub const CONNTRACK_SETTINGS: &str = "LB_CONNTRACK_SETTINGS";
/// Connection-table accounting: index 0 → [`crate::ConntrackStats`] (per-CPU array).
pub const CONNTRACK_STATS: &str = "LB_CONNTRACK_STATS";
/// The program's global variable of [`crate::Globals`] (the kernel's global
/// data: a one-entry array, never pinned, one for each loaded object).
pub const GLOBALS: &str = ".data.lb_globals";
/// Data-plane settings: index 0 → [`crate::Settings`] (array); the program
/// reads its copy in [`GLOBALS`].
pub const SETTINGS: &str = "LB_SETTINGS";
/// Interfaces the load balancer is attached to: [`crate::interface_slot`]
/// → [`crate::Interface`] (array).
pub const INTERFACES: &str = "LB_INTERFACES";
/// The device map frames to backends behind another attached interface
/// are redirected through: [`crate::Interface::port`] → its ifindex
/// (devmap).
pub const EGRESS: &str = "LB_EGRESS";
/// Each CPU's ICMP budgets: [`crate::IcmpKind`] → [`crate::IcmpBudget`] (per-CPU array).
pub const ICMP_BUDGET: &str = "LB_ICMP_BUDGET";
/// Global reasons: [`crate::Counter`] → u64 (per-CPU array).
pub const COUNTERS: &str = "LB_COUNTERS";
/// Per-service counters (packets, bytes, Maglev lookups, drops; per-CPU
/// array) of versions before a forward was counted in its backend's
/// counters only: what a pin of that name holds.
pub const FORMER_SERVICE_STATS: &str = "LB_SERVICE_STATS";
/// Per-service drops (packets matched to the service and then dropped):
/// service id → u64 (per-CPU array).
pub const SERVICE_DROPS: &str = "LB_SERVICE_DROPS";
/// Per-backend counters: backend id → [`crate::BackendStats`] (per-CPU
/// array), and after the backends the counts user space keeps of backends
/// it released (docs/dataplane.md).
pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";
/// Services' source lists: `lpm_trie::Key<`[`crate::AclKey`]`>` →
/// [`crate::ACL_DENY`] or [`crate::ACL_ALLOW`] (LPM trie).
pub const ACL: &str = "LB_ACL";
/// Per-service drops by source: service id → [`crate::SourceDrops`] (per-CPU array).
pub const SOURCE_DROPS: &str = "LB_SOURCE_DROPS";
/// Services' new-flow limits per source: service id → [`crate::SourceLimit`] (array).
pub const SOURCE_LIMITS: &str = "LB_SOURCE_LIMITS";
/// The source lists' directory of blocks, by service id →
/// [`crate::SourceShape`] (array).
pub const SOURCE_SHAPES: &str = "LB_SOURCE_SHAPES";
/// The source lists' directory of blocks: bucket →
/// [`crate::SourceBlockBucket`] (array).
pub const SOURCE_BLOCKS: &str = "LB_SOURCE_BLOCKS";
/// Each CPU's recent sources of limited services: bucket →
/// [`crate::SourceRateBucket`] (per-CPU array).
pub const SOURCE_RATES: &str = "LB_SOURCE_RATES";
/// Each CPU's last reading of the coarse clock: 0 → [`crate::CoarseClock`]
/// (per-CPU array).
pub const COARSE_CLOCK: &str = "LB_COARSE_CLOCK";
/// Each CPU's sample of limited sources: slot → [`crate::LimitedSource`]
/// (per-CPU array).
pub const LIMITED_SOURCES: &str = "LB_LIMITED_SOURCES";
/// Decap program: local tunnel endpoints, [`crate::AddrKey`] → u32 (hash).
pub const DECAP_ADDRS: &str = "LB_DECAP_ADDRS";
/// Decap program: the prefixes whose tunnel packets it accepts (the load
/// balancers' tunnel sources), `lpm_trie::Key<`[`crate::SourceKey`]`>` → u32
/// (LPM trie).
pub const DECAP_SOURCES: &str = "LB_DECAP_SOURCES";
/// Decap program: the VIPs inner packets may be addressed to,
/// [`crate::AddrKey`] → u32 (hash).
pub const DECAP_VIPS: &str = "LB_DECAP_VIPS";
/// Decap program's counters: [`crate::DecapCounter`] → u64 (per-CPU array).
pub const DECAP_COUNTERS: &str = "LB_DECAP_COUNTERS";

/// The probe encapsulator: a probe's mark (see
/// [`crate::limits::PROBE_MARK_BASE`]) → [`crate::ProbeTunnel`] (hash).
pub const PROBE_TUNNELS: &str = "LB_PROBE_TUNNELS";

/// The load-balancer XDP program.
pub const PROG_LB: &str = "lb_xdp";
/// The backend-side decapsulation XDP program.
pub const PROG_DECAP: &str = "lb_decap";
/// The TC egress program that puts lb's probes to backends of `ipip` and
/// `gue` services in their tunnel.
pub const PROG_PROBE_ENCAP: &str = "lb_probe_encap";
