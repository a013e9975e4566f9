//! The controller: configuration, runtime overrides and health turned into
//! backend values and Maglev tables, written through the map owner in an
//! order that keeps the kernel consistent:
//!
//! - a backend that gains traffic is written (up, with its MAC) before the
//!   table that names it is published;
//! - a backend that loses traffic leaves the table first, and only then is
//!   marked down (which releases its connection-table entries) or freed.
//!
//! Ids are kept in the runtime state so a restarted daemon addresses pinned
//! maps as its predecessor did, and a table equal to the live one is never
//! rewritten.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_common::{
    BACKEND_F_UP, BackendValue, FlowKey, SERVICE_F_AFFINITY, SERVICE_F_ALLOW_LIST,
    SERVICE_F_DENY_LIST, SERVICE_F_ECHO, SERVICE_F_GUE, SERVICE_F_IPIP, SERVICE_F_SOURCE_LIMIT,
    ServiceKey, SourceLimit, addr_bytes, addr_ip, hash::FLOW_HASH_VERSION, limits::NO_BACKEND,
};
use serde::Serialize;
use tracing::{error, info, warn};

use super::{
    registrations::HeldRegistrations,
    runtime::{Admin, History, Override, Runtime, ServiceIds},
};
use crate::{
    agent,
    announce::Pending,
    config::{self, Affinity, Desired, Mode, Via},
    dataplane::{Capacity, Dataplane, Prefix, ServiceStats, SourceEntries, insertion_order},
    feedback,
    fleet::{
        registry::Refused,
        state::{Agreed, AgreedHealth, Awaiting, FleetState, HealthView, Overrides},
    },
    health::{self, Health, Tracker},
    maglev::{self, Candidate},
    neighbor::{NextHop, Resolution},
    probe::ThroughVip,
    probe_path::{self, ProbePath, Tunnel},
};

/// The last probe of a backend.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Passed.
    pub ok: bool,
    /// How long it took.
    pub latency: Duration,
    /// Error text when it failed.
    pub detail: String,
    /// The backend's host answered (passed, refused the connection,
    /// answered wrongly), as opposed to silence.
    pub answered: bool,
}

/// A backend of a service, as the controller tracks it.
#[derive(Debug, Clone)]
pub struct BackendState {
    /// Data-plane id.
    pub id: u32,
    /// Generation of the id (connection-table entries must match it).
    pub generation: u32,
    /// Weight from the configuration file.
    pub configured_weight: u32,
    /// What the probes say.
    pub health: Tracker,
    /// Last probe and when it finished.
    pub last_probe: Option<(ProbeReport, SystemTime)>,
    /// Failed probes in a row that found its host silent (see
    /// [`ProbeReport::answered`]).
    pub silent_probes: u32,
    /// When the health state last changed.
    pub since: SystemTime,
    /// Health transitions so far.
    pub transitions: u64,
    /// Failed probes so far.
    pub probe_failures: u64,
    /// The counts above as the state file held them at start: the metrics
    /// count from there, so a restart reads as a counter reset rather than
    /// as the restored totals counted anew (failures since the last
    /// transition are not in the file).
    pub restored: History,
    /// When it recovered, while its slow start lasts.
    pub ramp_started: Option<Instant>,
    /// Percent of its weight it has in the table (slow start step).
    pub ramp_percent: u32,
    /// What its agent says, when the service has an agent check.
    pub agent: AgentState,
    /// Its weight by its probes' latency, when the service has load
    /// feedback.
    pub feedback: FeedbackState,
    /// What its host's `lb agent` registered, if it did.
    pub registered: Option<config::Registered>,
    /// What the data plane holds for it.
    written: Option<BackendValue>,
}

/// The least time between two rebuilds of a service's table for its
/// backends' health: changes within it wait for its end and are applied
/// together, so a storm of flapping backends costs each service at most
/// one rebuild per gap, while a change after a quiet spell applies at once.
pub const HEALTH_REBUILD_GAP: Duration = Duration::from_millis(100);

/// How long after a failed rebuild for health the daemon tries again.
pub const HEALTH_RETRY: Duration = Duration::from_secs(1);

/// A change asked from the backend's side (its agent, its latency): what
/// the tables follow, and what is asked, which waits for its service's
/// next chance to rebuild (see [`ServiceState::adjust_interval`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adjustment<T> {
    /// What the tables follow.
    pub applied: T,
    /// What is asked.
    pub wanted: T,
    /// Changes applied, for `lb_weight_changes_total`.
    pub changes: u64,
}

impl<T: Copy + PartialEq> Adjustment<T> {
    fn new(value: T) -> Self {
        Adjustment {
            applied: value,
            wanted: value,
            changes: 0,
        }
    }

    /// What is asked and not applied yet.
    pub fn pending(&self) -> Option<T> {
        (self.wanted != self.applied).then_some(self.wanted)
    }

    /// Applies what is asked; the change (from, to), if any.
    fn apply(&mut self) -> Option<(T, T)> {
        let from = self.applied;
        let to = self.pending()?;
        self.applied = to;
        self.changes += 1;
        Some((from, to))
    }
}

/// A backend's probe latency and active flows, and the percent of its
/// weight they leave it.
#[derive(Debug, Clone)]
pub struct FeedbackState {
    /// Smoothed latency of its successful probes.
    pub latency: Option<Duration>,
    /// Flows the connection table pins to it, when its service weighs by
    /// them (read about once a second).
    pub flows: Option<u64>,
    /// Percent of its weight.
    pub percent: Adjustment<u32>,
}

impl Default for FeedbackState {
    fn default() -> Self {
        FeedbackState {
            latency: None,
            flows: None,
            percent: Adjustment::new(feedback::FULL),
        }
    }
}

/// What a backend's agent said, and what of it the tables follow.
#[derive(Debug, Clone, Default)]
pub struct AgentState {
    /// Its state, up or down, and percent.
    pub view: Adjustment<agent::View>,
    /// The last answer (the line) or why there was none, and when.
    pub last: Option<(Result<String, String>, SystemTime)>,
}

impl BackendState {
    /// What the state file keeps of it.
    fn history(&self) -> History {
        History {
            since: self
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            transitions: self.transitions,
            probe_failures: self.probe_failures,
        }
    }

    /// It with the history a previous daemon kept.
    fn with_history(self, h: &History) -> Self {
        BackendState {
            // A hand-edited `since` past what the clock can hold keeps now.
            since: SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(h.since))
                .unwrap_or(self.since),
            transitions: h.transitions,
            probe_failures: h.probe_failures,
            restored: *h,
            ..self
        }
    }

    /// A backend with no probe history but `health`'s, at full weight, not
    /// yet written.
    fn new(id: u32, generation: u32, configured_weight: u32, health: Tracker) -> Self {
        BackendState {
            id,
            generation,
            configured_weight,
            health,
            last_probe: None,
            silent_probes: 0,
            since: SystemTime::now(),
            transitions: 0,
            probe_failures: 0,
            restored: History::default(),
            ramp_started: None,
            ramp_percent: 100,
            agent: AgentState::default(),
            feedback: FeedbackState::default(),
            registered: None,
            written: None,
        }
    }
}

/// A service, as the controller tracks it.
#[derive(Debug, Clone)]
pub struct ServiceState {
    /// Its configuration.
    pub config: config::Service,
    /// Data-plane id.
    pub id: u32,
    /// Backends by address.
    pub backends: BTreeMap<IpAddr, BackendState>,
    /// The live table (backend ids); empty until first published. Shared,
    /// so a copy of the state taken before a change costs no table copy.
    pub ring: Arc<[u32]>,
    /// Its backends that hold slots in the live table.
    pub in_table: usize,
    /// Flags and idle timeout the live service entry carries.
    published: Option<(u32, u32)>,
    /// The new-flow limit last written to the data plane for its id.
    limit_written: Option<Option<SourceLimit>>,
    /// Digest of the table by backend address: equal on every node that
    /// computes the same table.
    pub digest: u64,
    /// Tables published by this daemon.
    pub rebuilds: u64,
    /// Probes are not trusted (see [`health::panic`]).
    pub panic: bool,
    /// When its backends' agents or load feedback last changed its table.
    adjusted: Option<Instant>,
    /// When its table and backends were last brought in line with its state.
    synced: Option<Instant>,
    /// When a change of its backends' health held back since is to be
    /// applied ([`HEALTH_REBUILD_GAP`], [`HEALTH_RETRY`]).
    health_due: Option<Instant>,
}

impl ServiceState {
    /// The least time between two table rebuilds its backends' agents and
    /// load feedback cause: the agent interval, else the health-check
    /// interval; none without either.
    pub fn adjust_interval(&self) -> Option<Duration> {
        match (&self.config.agent, &self.config.feedback) {
            (Some(a), _) => Some(a.interval),
            (None, Some(_)) => Some(self.config.health.interval),
            (None, None) => None,
        }
    }
}

/// What a change did (or, in a dry run, would do).
#[derive(Debug, Default, Clone, Serialize)]
pub struct ChangeReport {
    /// One line per change.
    pub changes: Vec<String>,
    /// Table slots that moved to another backend, per service.
    pub slots_moved: BTreeMap<String, usize>,
    /// For services with new backends (checked before they take flows):
    /// the slots that move, from the table now, once those pass.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub slots_when_checked: BTreeMap<String, usize>,
    /// Registered backends left out for want of a backend id, which a
    /// backend this change removed frees once the change is written:
    /// service and address (see [`Controller::apply`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<(String, IpAddr)>,
}

impl ChangeReport {
    /// This report followed by `later`'s, of a change made right after.
    pub fn then(mut self, later: ChangeReport) -> ChangeReport {
        self.changes.extend(later.changes);
        for (service, moved) in later.slots_moved {
            *self.slots_moved.entry(service).or_default() += moved;
        }
        self.slots_when_checked = later.slots_when_checked;
        self.deferred = later.deferred;
        self
    }
}

/// Owner of the data plane's contents.
pub struct Controller {
    dp: Dataplane,
    desired: Desired,
    services: BTreeMap<String, ServiceState>,
    runtime: Runtime,
    hops: BTreeMap<IpAddr, Hop>,
    /// Backends whose route leaves by an interface lb is not attached to,
    /// with that interface.
    unattached: BTreeMap<IpAddr, String>,
    /// Backends without a next hop, and why (no route, neighbour failed).
    unresolved: BTreeMap<IpAddr, String>,
    /// Times a backend's next hop stopped resolving, taking it out of the
    /// tables.
    next_hops_lost: u64,
    /// Backends about to be added that enter the table on their first
    /// successful probe (`--trust-first-probe`), by service.
    trusted_first_probe: BTreeSet<(String, IpAddr)>,
    fleet_health: Option<FleetHealth>,
    /// Health changes since the state file was last saved
    /// ([`Controller::save_history`]).
    history_unsaved: bool,
    /// The operator's desired state without registrations, when a
    /// standalone daemon admits some ([`Controller::configured`]).
    configured: Option<Desired>,
    /// Registrations not admitted at the last apply.
    registrations_refused: Vec<Refused>,
    /// The interfaces' MTUs too small for an IPv6 tunnel, as last warned
    /// of ([`Controller::warn_short_tunnel_mtus`]).
    short_mtus: BTreeSet<String>,
    /// In a fleet, the backends some live node has seen pass, by service
    /// ([`Controller::set_fleet_proven`]).
    fleet_proven: BTreeMap<String, BTreeSet<IpAddr>>,
}

/// A backend's next hop as the data plane takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hop {
    mac: [u8; 6],
    /// The port of the attached interface the route leaves by.
    port: u8,
    /// The address the MAC answers for (the backend's, or its gateway's).
    addr: IpAddr,
}

/// Where a fleet node's tables take backend health from: the fleet's
/// agreed view (see [`crate::fleet::agree`]), not its own probes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetHealth {
    /// The agreed view as last read. A backend it does not name yet is up
    /// (the leader's verdict on a backend nobody has probed).
    pub agreed: AgreedHealth,
    /// etcd is unreachable: this node also evicts backends its own probes
    /// see down (readmission waits for the fleet).
    pub own_eviction: bool,
}

/// What a fleet's state sets beside the services (see
/// [`Controller::set_fleet`]).
#[derive(Debug, Clone, Default)]
pub struct FleetInputs {
    /// Operator overrides.
    pub overrides: Overrides,
    /// Agreed health (`None`: a node's own probes, before any fleet state).
    pub health: Option<FleetHealth>,
    /// Backends whose maintenance the new overrides began or ended, as
    /// they were before ([`Controller::set_fleet`] sets their verdicts
    /// aside).
    rechecked: Vec<(String, IpAddr, BackendState)>,
}

/// A table digest as the CLI, metrics and the fleet show it.
pub fn digest_text(digest: u64) -> String {
    format!("{digest:016x}")
}

/// The data-plane key of a service.
pub fn service_key(svc: &config::Service) -> ServiceKey {
    let (addr, family) = addr_bytes(svc.vip);
    ServiceKey {
        addr,
        port: svc.port.to_be(),
        proto: svc.protocol.number(),
        family,
    }
}

fn service_flags(svc: &config::Service) -> u32 {
    let mut f = 0;
    match svc.mode {
        Mode::DsrL2 => {}
        Mode::Ipip => f |= SERVICE_F_IPIP,
        Mode::Gue => f |= SERVICE_F_GUE,
    }
    if svc.affinity == Affinity::Client {
        f |= SERVICE_F_AFFINITY;
    }
    if svc.echo {
        f |= SERVICE_F_ECHO;
    }
    if !svc.deny.is_empty() {
        f |= SERVICE_F_DENY_LIST;
    }
    if !svc.allow.is_empty() {
        f |= SERVICE_F_ALLOW_LIST;
    }
    if svc.new_flow_limit.is_some() {
        f |= SERVICE_F_SOURCE_LIMIT;
    }
    f
}

/// The source-list trie's entries `services` need.
fn source_entries<'a>(services: impl Iterator<Item = &'a ServiceState>) -> SourceEntries {
    services
        .flat_map(|s| {
            s.config
                .source_entries()
                .map(move |(prefix, list)| ((s.id, prefix), list))
        })
        .collect()
}

/// FNV-1a over the flow hash's version ([`FLOW_HASH_VERSION`], 8 bytes
/// little-endian), then the table as backend addresses (`NO_BACKEND` as
/// 0xff bytes): what a flow gets, so nodes that would send one flow to
/// different backends differ, whether in their tables or in their hash.
///
/// Byte by byte that is 17 dependent multiplications a slot, a millisecond
/// or more a table, so it is computed a slot at a time instead: a step
/// `h' = (h ^ b) * P` is `h * P + ((h & 0xff ^ b) - (h & 0xff)) * P`, and
/// the low byte of `h'` depends on the low byte of `h` alone. So a slot's
/// 17 bytes take `h` to `h * P^17 + c`, where `c` depends only on the
/// backend and the low byte of `h`: one multiplication and an addition a
/// slot, with `c` computed the first time each pair is met.
fn digest(ring: &[u32], addr_of: &BTreeMap<u32, IpAddr>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    /// Bytes of a slot: the address, then the family.
    const SLOT_BYTES: u32 = 17;
    const LOW_BYTES: usize = 256;
    // Backends densely numbered by id; the last number is every slot
    // without one (no backend, or an id without an address).
    let ids = addr_of
        .keys()
        .next_back()
        .map_or(0, |&max| max as usize + 1);
    let unknown = addr_of.len();
    let mut dense = vec![unknown; ids];
    let mut bytes_of = vec![[0xff; SLOT_BYTES as usize]; unknown + 1];
    for (n, (&id, ip)) in addr_of.iter().enumerate() {
        let (a, f) = addr_bytes(*ip);
        bytes_of[n][..16].copy_from_slice(&a);
        bytes_of[n][16] = f;
        dense[id as usize] = n;
    }
    let scale = PRIME.wrapping_pow(SLOT_BYTES);
    let mut step: Vec<Option<u64>> = vec![None; (unknown + 1) * LOW_BYTES];
    let mut h = FLOW_HASH_VERSION
        .to_le_bytes()
        .iter()
        .fold(OFFSET, |h, &byte| (h ^ u64::from(byte)).wrapping_mul(PRIME));
    for &id in ring {
        let n = dense.get(id as usize).copied().unwrap_or(unknown);
        let low = (h & 0xff) as usize;
        let c = *step[n * LOW_BYTES + low].get_or_insert_with(|| {
            let start = low as u64;
            let end = bytes_of[n]
                .iter()
                .fold(start, |x, &byte| (x ^ u64::from(byte)).wrapping_mul(PRIME));
            end.wrapping_sub(start.wrapping_mul(scale))
        });
        h = h.wrapping_mul(scale).wrapping_add(c);
    }
    h
}

/// [`digest`] of `ring`, a table of `backends`.
fn table_digest(ring: &[u32], backends: &BTreeMap<IpAddr, BackendState>) -> u64 {
    let addr_of: BTreeMap<u32, IpAddr> = backends.iter().map(|(ip, b)| (b.id, *ip)).collect();
    digest(ring, &addr_of)
}

/// How many of `backends` hold slots in `ring`.
fn holding_slots(ring: &[u32], backends: &BTreeMap<IpAddr, BackendState>) -> usize {
    let ids = backends
        .values()
        .map(|b| b.id as usize + 1)
        .max()
        .unwrap_or(0);
    let mut holds = vec![false; ids];
    for &id in ring {
        if let Some(h) = holds.get_mut(id as usize) {
            *h = true;
        }
    }
    backends.values().filter(|b| holds[b.id as usize]).count()
}

fn moved(old: &[u32], new: &[u32]) -> usize {
    if old.len() != new.len() {
        return new.iter().filter(|&&id| id != NO_BACKEND).count();
    }
    old.iter().zip(new).filter(|(a, b)| a != b).count()
}

/// The backends (with their services' ids) and services a change
/// released, by id.
#[derive(Default)]
struct Released {
    backends: Vec<(u32, u32)>,
    services: Vec<u32>,
}

/// Lowest free ids below a capacity.
struct IdPool(BTreeSet<u32>);

impl IdPool {
    fn new(capacity: u32, used: impl Iterator<Item = u32>) -> Self {
        let mut free: BTreeSet<u32> = (0..capacity).collect();
        for id in used {
            free.remove(&id);
        }
        IdPool(free)
    }

    fn take(&mut self, what: &str) -> Result<u32> {
        self.next().ok_or_else(|| Self::exhausted(what))
    }

    fn next(&mut self) -> Option<u32> {
        self.0.pop_first()
    }

    fn exhausted(what: &str) -> anyhow::Error {
        anyhow!(
            "no free {what} id: the ids of what this change removes are free only once it is \
             made, so at capacity remove first and add in a second change (or raise the \
             capacity in [settings], which takes a restart with the pins removed)"
        )
    }
}

impl Controller {
    /// Takes over `dp` (fresh, or adopted from pins) and applies `desired`:
    /// services already live keep their ids, tables and connection-table
    /// entries; kernel state nobody wants is removed.
    /// A fleet node passes the agreed health its tables are built from.
    pub fn new(
        dp: Dataplane,
        desired: Desired,
        runtime: Runtime,
        hops: Resolution,
        fleet_health: Option<FleetHealth>,
    ) -> Result<(Controller, ChangeReport)> {
        let mut c = Controller {
            dp,
            desired: Desired {
                settings: desired.settings.clone(),
                services: BTreeMap::new(),
            },
            services: BTreeMap::new(),
            runtime,
            hops: BTreeMap::new(),
            unattached: BTreeMap::new(),
            unresolved: hops.unresolved,
            next_hops_lost: 0,
            trusted_first_probe: BTreeSet::new(),
            fleet_health,
            history_unsaved: false,
            configured: None,
            registrations_refused: Vec::new(),
            short_mtus: BTreeSet::new(),
            fleet_proven: BTreeMap::new(),
        };
        for (ip, why) in &c.unresolved {
            warn!(backend = %ip, reason = %why, "next hop unresolved: out of the tables until it resolves");
        }
        c.hops = c.attached_hops(hops.hops);
        c.adopt(&desired)?;
        let report = c.apply(desired, false)?;
        // Lists may have changed while no daemon ran.
        c.forget_flows_the_lists_refuse()?;
        Ok((c, report))
    }

    /// Once this version's program runs, carries the connection-table
    /// entries the previous program wrote since the table was carried over
    /// ([`Dataplane::conntrack_carry_late`]): how many, or `None` when no
    /// table was. Those entries were never checked against the lists, which
    /// may have changed while no daemon ran, so the flows they refuse are
    /// forgotten again.
    pub fn carry_late_flows(&mut self) -> Result<Option<usize>> {
        let late = self.dp.conntrack_carry_late()?;
        if late.is_some_and(|n| n > 0) {
            self.forget_flows_the_lists_refuse()?;
        }
        Ok(late)
    }

    /// Removes the entries of flows from sources their service's lists
    /// refuse.
    fn forget_flows_the_lists_refuse(&mut self) -> Result<usize> {
        let listed = self
            .services
            .values()
            .filter(|s| s.config.has_lists())
            .map(|s| s.id)
            .collect();
        self.forget_refused_flows(&listed)
    }

    /// Writes the prefixes of `wanted` the kernel lacks or holds for the
    /// other list, inner prefixes first.
    fn add_source_entries(&mut self, wanted: &SourceEntries) -> Result<()> {
        for (&(id, prefix), &list) in insertion_order(wanted) {
            if self.dp.written_source_entries().get(&(id, prefix)) != Some(&list) {
                self.dp.set_source_entry(id, prefix, list)?;
            }
        }
        Ok(())
    }

    /// Removes the kernel's prefixes `wanted` does not name, the last step
    /// of a change to the lists: then places the changed services' blocks
    /// in the lists' directory, which the trie stood in for meanwhile.
    fn remove_source_entries(&mut self, wanted: &SourceEntries) -> Result<()> {
        let stale: Vec<(u32, Prefix)> = self
            .dp
            .written_source_entries()
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for (id, prefix) in stale {
            self.dp.remove_source_entry(id, prefix)?;
        }
        self.dp.settle_source_blocks()
    }

    /// Removes the connection-table entries of the flows of services `ids`
    /// whose sources their lists now refuse. The data plane checks the
    /// lists for new flows only, so the next packet of such a flow misses
    /// and is dropped; returns how many were removed.
    fn forget_refused_flows(&mut self, ids: &BTreeSet<u32>) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let lists: BTreeMap<u32, &config::Service> = self
            .services
            .values()
            .filter(|s| ids.contains(&s.id))
            .map(|s| (s.id, &s.config))
            .collect();
        let refused: Vec<FlowKey> = self
            .dp
            .conntrack_dump()?
            .into_iter()
            .filter(|(k, v)| {
                lists
                    .get(&v.service)
                    .is_some_and(|c| c.refuses(addr_ip(&k.src, k.family)))
            })
            .map(|(k, _)| k)
            .collect();
        let removed = self.dp.conntrack_remove(&refused)?;
        if removed > 0 {
            info!(
                flows = removed,
                "forgot the flows of sources the lists now refuse"
            );
        }
        Ok(removed)
    }

    /// The configured backends of `cfg` that `ring` (a live table) names,
    /// by their ids.
    fn backends_in(&self, ring: &[u32], cfg: &config::Service) -> Result<BTreeMap<IpAddr, u32>> {
        let ids: BTreeSet<u32> = ring
            .iter()
            .copied()
            .filter(|&id| id != NO_BACKEND)
            .collect();
        let mut found = BTreeMap::new();
        for id in ids {
            // Unreadable, it names no backend to adopt.
            let Ok(v) = self.dp.backend(id) else { continue };
            if let Some(ip) = cfg
                .backends
                .keys()
                .find(|ip| addr_bytes(**ip) == (v.addr, v.family))
            {
                found.insert(*ip, id);
            }
        }
        Ok(found)
    }

    /// Builds state for the desired services the kernel already serves.
    fn adopt(&mut self, desired: &Desired) -> Result<()> {
        let mut wanted = BTreeSet::new();
        // Backends an adopted service's table names that the configuration
        // dropped meanwhile: their counts stay the service's.
        let mut dropped_from = BTreeMap::new();
        for (name, cfg) in &desired.services {
            let key = service_key(cfg);
            wanted.insert(key);
            let Some(live) = self.dp.service(&key)? else {
                continue;
            };
            let ring = self.dp.live_ring(&key)?;
            let mut ids = self
                .runtime
                .ids
                .get(name)
                .map(|ids| ids.backends.clone())
                .unwrap_or_default();
            // Without a state file (lost, or corrupt and set aside), or one
            // saved before the last table (a crash between the two), the
            // live table names the backends that serve.
            if cfg.backends.keys().any(|ip| !ids.contains_key(ip)) {
                for (ip, id) in self.backends_in(&ring, cfg)? {
                    ids.entry(ip).or_insert(id);
                }
            }
            let mut backends = BTreeMap::new();
            for (ip, id) in ids {
                let Ok(v) = self.dp.backend(id) else { continue };
                if (v.addr, v.family) != addr_bytes(ip) {
                    continue;
                }
                if !cfg.backends.contains_key(&ip) {
                    dropped_from.insert(id, live.id);
                    continue;
                }
                let health = if v.flags & BACKEND_F_UP != 0 {
                    Health::Up
                } else {
                    Health::Down
                };
                let mut b =
                    BackendState::new(id, v.generation, cfg.backends[&ip], Tracker::new(health));
                if health == Health::Down {
                    // Down with its flows moved: a drained one stays so
                    // until its host answers a probe.
                    b.silent_probes = u32::MAX;
                }
                if let Some(h) = self.runtime.history.get(name).and_then(|m| m.get(&ip)) {
                    b = b.with_history(h);
                }
                b.written = Some(v);
                backends.insert(ip, b);
            }
            info!(service = %name, id = live.id, backends = backends.len(), "adopted live service");
            self.services.insert(
                name.clone(),
                ServiceState {
                    config: cfg.clone(),
                    id: live.id,
                    in_table: holding_slots(&ring, &backends),
                    backends,
                    ring: ring.into(),
                    published: Some((live.flags, live.idle_timeout)),
                    limit_written: None,
                    digest: 0,
                    rebuilds: 0,
                    panic: false,
                    adjusted: None,
                    synced: None,
                    health_due: None,
                },
            );
            self.desired.services.insert(name.clone(), cfg.clone());
        }
        let mut removed = Vec::new();
        for key in self.dp.service_keys()? {
            if !wanted.contains(&key) {
                removed.extend(self.dp.service(&key)?.map(|v| v.id));
                self.dp.remove_service(&key)?;
                info!(
                    ?key,
                    "removed a live service the configuration no longer has"
                );
            }
        }
        // Backend slots nobody holds must not honour old flows; their counts
        // are kept with their service's, or the removed services'.
        let held: BTreeSet<u32> = self
            .services
            .values()
            .flat_map(|s| s.backends.values().map(|b| b.id))
            .collect();
        for id in 0..self.dp.capacity().max_backends {
            if !held.contains(&id) {
                let v = self.dp.backend(id)?;
                if v.flags != 0 {
                    self.dp.set_backend(id, &BackendValue { flags: 0, ..v })?;
                }
                self.dp
                    .release_backend_stats(id, dropped_from.get(&id).copied())?;
            }
        }
        for id in removed {
            self.dp.release_service_stats(id)?;
        }
        Ok(())
    }

    /// The configuration in force.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The services.
    pub fn services(&self) -> &BTreeMap<String, ServiceState> {
        &self.services
    }

    /// Counters of service `s`: its drops and its backends' forwards.
    pub fn service_stats(&self, s: &ServiceState) -> Result<ServiceStats> {
        let backends: Vec<u32> = s.backends.values().map(|b| b.id).collect();
        self.dp.service_stats(s.id, &backends)
    }

    /// The data plane (for counters).
    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    /// The data plane, to attach it or change its settings.
    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// The operator override of a backend.
    pub fn override_of(&self, service: &str, ip: IpAddr) -> Override {
        self.runtime.get(service, ip)
    }

    /// Warns of each attached interface whose MTU (capped by
    /// `settings.mtu`) leaves an IPv6 tunnel whose backends are routed by
    /// it less than IPv6's minimum MTU, once, until that changes, and says
    /// when it no longer does: the configuration refuses such a
    /// `settings.mtu`, but an interface's own MTU is only known here (and
    /// changes under the daemon). The daemon calls it every second.
    pub fn warn_short_tunnel_mtus(&mut self) {
        let cap = self.desired.settings.mtu.unwrap_or(u32::MAX);
        let short: BTreeSet<String> = self
            .dp
            .interface_mtus()
            .into_iter()
            .filter_map(|(iface, port, mtu)| {
                let mtu = mtu.min(cap);
                // IPv6 services alone can fall short: the others' backends
                // are not looked up each second.
                let routed_here = self.desired.services.values().filter(|svc| {
                    svc.vip.is_ipv6()
                        && svc
                            .backends
                            .keys()
                            .any(|ip| self.hops.get(ip).is_some_and(|h| h.port == port))
                });
                let short = config::ipv6_tunnel_short_of(mtu, routed_here)?;
                Some(format!("{iface}: an MTU of {mtu} leaves {short}"))
            })
            .collect();
        for line in short.difference(&self.short_mtus) {
            warn!(
                "{line}: full-size packets of its IPv6 clients are lost; raise the interface's MTU"
            );
        }
        for line in self.short_mtus.difference(&short) {
            info!(was = %line, "an interface's MTU no longer leaves an IPv6 tunnel short");
        }
        self.short_mtus = short;
    }

    /// Whether a backend's next hop is known, on an attached interface.
    pub fn has_mac(&self, ip: IpAddr) -> bool {
        self.hops.contains_key(&ip)
    }

    /// Whether a service's table ignores its probes (see
    /// [`health::panic`]), as of its last rebuild.
    pub fn in_panic(&self, service: &str) -> bool {
        self.services.get(service).is_some_and(|s| s.panic)
    }

    /// Whether `svc`'s probes are not to be trusted now: O(backends), so
    /// worked out once a rebuild ([`Self::refresh_panic`]), not once a
    /// backend. The rule counts the backends that would take flows if they
    /// passed and have passed before: one that never has, or that its
    /// operator, agent or weight keeps out, says nothing of the probes.
    fn panic_of(&self, svc: &ServiceState) -> bool {
        let name = &svc.config.name;
        let ready = svc
            .backends
            .iter()
            .filter(|(ip, b)| self.proven(name, **ip, b) && self.wanted(name, **ip, b));
        let (mut ready_count, mut healthy) = (0, 0);
        for (ip, b) in ready {
            ready_count += 1;
            healthy += usize::from(self.probe_up(name, *ip, b));
        }
        health::panic(ready_count, healthy)
    }

    /// Whether a backend has been seen to work, which the panic rule asks:
    /// by this node's probes, or in a fleet by some live node's, so that
    /// every node counts and keeps the same backends (a node restarted or
    /// new during an outage has seen none of the dead ones pass).
    fn proven(&self, service: &str, ip: IpAddr, b: &BackendState) -> bool {
        b.health.proven()
            || self
                .fleet_proven
                .get(service)
                .is_some_and(|s| s.contains(&ip))
    }

    /// Sets the backends some live node of the fleet has seen pass
    /// (their reports: up now, or down after passing), and rebuilds the
    /// services whose set changed.
    pub fn set_fleet_proven(&mut self, proven: BTreeMap<String, BTreeSet<IpAddr>>) -> Result<()> {
        let changed: Vec<String> = self
            .services
            .keys()
            .filter(|n| self.fleet_proven.get(*n) != proven.get(*n))
            .cloned()
            .collect();
        self.fleet_proven = proven;
        self.sync_each(changed)
    }

    /// The backends this node's probes see down after seeing them pass,
    /// by service, for its report ([`Controller::set_fleet_proven`] on the
    /// others).
    pub fn proven_down(&self) -> BTreeMap<String, BTreeSet<IpAddr>> {
        self.services
            .iter()
            .map(|(name, s)| {
                let down = s
                    .backends
                    .iter()
                    .filter(|(_, b)| b.health.proven() && b.health.state() == Health::Down)
                    .map(|(ip, _)| *ip)
                    .collect::<BTreeSet<_>>();
                (name.clone(), down)
            })
            .filter(|(_, down)| !down.is_empty())
            .collect()
    }

    /// Works out whether `service` is in panic before its table is rebuilt,
    /// and says so when that changes.
    fn refresh_panic(&mut self, service: &str) -> Result<()> {
        let svc = self.services.get(service).context("no such service")?;
        let panic = self.panic_of(svc);
        if panic != svc.panic {
            if panic {
                warn!(
                    service,
                    "panic: fewer than half the ready backends pass probes; keeping all ready backends in the table"
                );
            } else {
                info!(service, "panic over: probes trusted again");
            }
            self.services
                .get_mut(service)
                .context("no such service")?
                .panic = panic;
        }
        Ok(())
    }

    /// Whether the probes that count say a backend is up: its own, or in a
    /// fleet the agreed view (and its own too while etcd is unreachable).
    /// A backend this node is still checking is never up.
    fn probe_up(&self, service: &str, ip: IpAddr, b: &BackendState) -> bool {
        if b.health.state() == Health::Checking {
            return false;
        }
        let own = b.health.state() == Health::Up;
        match &self.fleet_health {
            None => own,
            Some(f) => {
                let agreed = f
                    .agreed
                    .get(service)
                    .and_then(|m| m.get(&ip))
                    .is_none_or(|a| a.up);
                agreed && (own || !f.own_eviction)
            }
        }
    }

    /// Percent of its weight a backend has (slow start): its own ramp, or
    /// in a fleet the agreed view's step.
    fn ramp_percent(&self, service: &str, ip: IpAddr, b: &BackendState) -> u32 {
        match &self.fleet_health {
            None => b.ramp_percent,
            Some(f) => f
                .agreed
                .get(service)
                .and_then(|m| m.get(&ip))
                .map_or(100, |a| a.percent),
        }
    }

    /// Whether a backend counts as healthy: its agent does not say down,
    /// and it passes probes, or its service is in `panic` and it has passed
    /// them before (panic never gives flows to a backend nobody saw work).
    fn healthy(&self, service: &str, ip: IpAddr, b: &BackendState, panic: bool) -> bool {
        !b.agent.view.applied.down
            && ((panic && self.proven(service, ip, b)) || self.probe_up(service, ip, b))
    }

    /// A backend's operator state: the operator's, or while that is
    /// `ready`, its agent's (operator commands win over the agent).
    pub fn admin(&self, service: &str, ip: IpAddr, b: &BackendState) -> Admin {
        match self.runtime.get(service, ip).admin {
            // A leaving host drains, whatever its agent check says.
            Admin::Ready if b.registered.is_some_and(|r| r.draining) => Admin::Drain,
            Admin::Ready => b.agent.view.applied.admin,
            operator => operator,
        }
    }

    /// Percent of its weight a backend's agent and its latency (load
    /// feedback) leave it: all of it while the operator has set its weight
    /// (operator commands win).
    fn scale_percent(&self, service: &str, ip: IpAddr, b: &BackendState) -> u32 {
        if self.runtime.get(service, ip).weight.is_some() {
            feedback::FULL
        } else {
            let load = b.registered.map_or(feedback::FULL, |r| r.percent);
            let factors = [
                b.agent.view.applied.percent,
                b.feedback.percent.applied,
                load,
            ];
            let scaled = factors[0] * factors[1] / feedback::FULL * factors[2] / feedback::FULL;
            // A share below one percent is still a share: only a factor of
            // 0 (an agent saying 0%) takes the backend out.
            if factors.iter().all(|&f| f > 0) {
                scaled.max(1)
            } else {
                scaled
            }
        }
    }

    /// How backend `ip` of `service` is probed: at its address (`None`),
    /// or with `via = "vip"` through the service's VIP, with the mark that
    /// routes the probe to it (see [`crate::probe_path`]). `Err` for no
    /// such backend.
    pub fn probe_route(&self, service: &str, ip: IpAddr) -> Result<Option<ThroughVip>> {
        let s = self.services.get(service).context("no such service")?;
        let b = s.backends.get(&ip).context("no such backend")?;
        // As `probe_paths`: no probe, no route through the VIP.
        if s.config.health.via == Via::Address || s.config.health.kind == config::Probe::None {
            return Ok(None);
        }
        let hop = self.next_hop_on(ip);
        // A tunnelled backend's ARP does not decide where clients' packets go.
        let arp = hop
            .filter(|_| s.config.vip.is_ipv4() && s.config.mode == Mode::DsrL2)
            .map(|(hop, dev)| (dev.to_string(), hop.mac));
        Ok(probe_path::mark(b.id).map(|mark| ThroughVip {
            vip: s.config.vip,
            mark,
            arp,
            // As `probe_paths` gives it a route.
            routed: hop.is_some(),
        }))
    }

    /// The probe paths that `via = "vip"` services need: one per backend
    /// whose next hop is known, by the interface the data plane sends its
    /// frames from, in the tunnel the data plane would use.
    pub fn probe_paths(&self) -> BTreeSet<ProbePath> {
        let settings = &self.desired.settings;
        let mut paths = BTreeSet::new();
        for s in self.services.values() {
            if s.config.health.via != Via::Vip || s.config.health.kind == config::Probe::None {
                continue;
            }
            for (ip, b) in &s.backends {
                if let (Some((hop, dev)), Some(mark)) =
                    (self.next_hop_on(*ip), probe_path::mark(b.id))
                {
                    let tunnel = (s.config.mode != Mode::DsrL2).then(|| Tunnel {
                        src: settings.tunnel_source(ip.is_ipv6()),
                        dst: *ip,
                        gue_port: (s.config.mode == Mode::Gue).then_some(settings.gue_port),
                    });
                    paths.insert(ProbePath {
                        mark,
                        vip: s.config.vip,
                        next_hop: hop.addr,
                        dev: dev.to_string(),
                        tunnel,
                    });
                }
            }
        }
        paths
    }

    /// Backend `ip`'s next hop and the attached interface it is reached by.
    fn next_hop_on(&self, ip: IpAddr) -> Option<(&Hop, &str)> {
        let hop = self.hops.get(&ip)?;
        Some((hop, self.desired.settings.interface_of(hop.port)?))
    }

    /// Backends of a service that take new flows on their own probes' word:
    /// ready, passing probes, next hop resolved, weight above 0. Unlike the
    /// table, panic does not count (see [`crate::announce`]).
    pub fn in_rotation(&self, service: &str) -> usize {
        let Some(s) = self.services.get(service) else {
            return 0;
        };
        s.backends
            .iter()
            .filter(|(ip, b)| {
                self.wanted(service, **ip, b)
                    && self.probe_up(service, **ip, b)
                    && self.hops.contains_key(*ip)
            })
            .count()
    }

    /// What `service`'s table waits on before it settles (rule 5 of
    /// [`crate::announce`]), each with how long it may when probes answer
    /// in time: a backend it wants that awaits its first verdict (new, or
    /// back from maintenance), for its first probe (within an interval:
    /// the prober starts at a random point of half of it, jittered), then
    /// the passes it needs (`rise`, more after flaps), each within its
    /// timeout and a fast interval apart (jittered up to 10 %, here a whole
    /// one), and the rebuild gap; and a change of its backends' health
    /// held back, for the gap and a retry.
    pub fn pending(&self, service: &str) -> Vec<(Pending, Duration)> {
        let Some(s) = self.services.get(service) else {
            return Vec::new();
        };
        // Configuration bounds the times (an hour) and `rise` (100);
        // saturating all the same, as a bound on a wait.
        let h = &s.config.health;
        let probe = h.timeout.saturating_add(h.fast_interval.saturating_mul(2));
        let mut pending: Vec<_> = s
            .backends
            .iter()
            .filter(|(ip, b)| b.health.state() == Health::Checking && self.wanted(service, **ip, b))
            .map(|(ip, b)| {
                let passes = probe.saturating_mul(b.health.rise_needed(h.thresholds));
                let limit = h
                    .interval
                    .saturating_add(passes)
                    .saturating_add(HEALTH_REBUILD_GAP);
                (Pending::Verdict(*ip), limit)
            })
            .collect();
        if s.health_due.is_some() {
            pending.push((Pending::Rebuild, HEALTH_REBUILD_GAP + HEALTH_RETRY));
        }
        pending
    }

    /// Whether a backend would take new flows if its probes passed: its
    /// operator and agent want it, and its weight is above 0.
    fn wanted(&self, service: &str, ip: IpAddr, b: &BackendState) -> bool {
        let weight = self.runtime.get(service, ip).weight;
        self.admin(service, ip, b) == Admin::Ready
            && !b.agent.view.applied.down
            && weight.unwrap_or(b.configured_weight) > 0
            && self.scale_percent(service, ip, b) > 0
    }

    /// A fleet node's operator overrides and agreed health, as the fleet's
    /// state holds them; [`Controller::apply`] then builds the tables.
    /// Returns the ones they replace, for [`Controller::put_fleet_back`].
    pub fn set_fleet(&mut self, overrides: Overrides, health: FleetHealth) -> FleetInputs {
        let overrides = std::mem::replace(&mut self.runtime.overrides, overrides);
        let rechecked = self.recheck_left_maintenance(&overrides);
        FleetInputs {
            overrides,
            health: self.fleet_health.replace(health),
            rechecked,
        }
    }

    /// Sets aside the verdict of every backend that was in maintenance
    /// under `before` and is not now: its probes were paused, and its
    /// server was likely stopped or changed meanwhile, so it takes no flow
    /// until a probe passes again ([`Tracker::recheck`]; the prober probes
    /// it at once).
    /// A backend entering maintenance is down from then on (the page and
    /// `lb health` say so), so its `since` starts there too. Returns those
    /// backends as they were.
    fn recheck_left_maintenance(
        &mut self,
        before: &Overrides,
    ) -> Vec<(String, IpAddr, BackendState)> {
        let mut changed = Vec::new();
        let was_in_maintenance = |name: &str, ip: &IpAddr| {
            before
                .get(name)
                .and_then(|m| m.get(ip))
                .is_some_and(|o| o.admin == Admin::Maintenance)
        };
        for (name, svc) in &mut self.services {
            for (ip, b) in &mut svc.backends {
                let was = was_in_maintenance(name, ip);
                let is = self.runtime.get(name, *ip).admin == Admin::Maintenance;
                if was != is {
                    changed.push((name.clone(), *ip, b.clone()));
                }
                if was && !is {
                    b.health.recheck();
                    b.ramp_started = None;
                    b.ramp_percent = 100;
                    // Nor is its host taken to answer until it does.
                    b.silent_probes = u32::MAX;
                }
                if was != is {
                    b.since = SystemTime::now();
                }
            }
        }
        changed
    }

    /// Puts back what [`Controller::set_fleet`] replaced, once the change it
    /// came with failed: a fleet state is applied whole or not at all. The
    /// failed change's undo wrote the tables as they were, but the backends'
    /// states under the new overrides and health: the services holding such
    /// a backend are written again.
    pub fn put_fleet_back(&mut self, previous: FleetInputs) -> Result<()> {
        self.runtime.overrides = previous.overrides;
        self.fleet_health = previous.health;
        // Their verdicts, as the refused state found them.
        for (name, ip, was) in previous.rechecked {
            if let Some(b) = self
                .services
                .get_mut(&name)
                .and_then(|s| s.backends.get_mut(&ip))
                .filter(|b| b.id == was.id)
            {
                b.health = was.health;
                b.ramp_started = was.ramp_started;
                b.ramp_percent = was.ramp_percent;
                b.silent_probes = was.silent_probes;
                b.since = was.since;
            }
        }
        let stale: Vec<String> = self
            .services
            .iter()
            .filter(|(name, s)| {
                s.backends
                    .iter()
                    .any(|(ip, b)| b.written != Some(self.backend_value(name, *ip, b)))
            })
            .map(|(name, _)| name.clone())
            .collect();
        self.sync_each(stale)
    }

    /// Whether a fleet node evicts on its own probes too (etcd unreachable);
    /// rebuilds the tables that changes.
    pub fn set_own_eviction(&mut self, on: bool) -> Result<()> {
        let Some(f) = self.fleet_health.as_mut() else {
            return Ok(());
        };
        if f.own_eviction == on {
            return Ok(());
        }
        f.own_eviction = on;
        let names: Vec<String> = self.services.keys().cloned().collect();
        self.sync_each(names)
    }

    /// What this node's own probes say of every backend they probe, and
    /// the backends they have no verdict on yet (maintenance pauses probes:
    /// those are in neither).
    pub fn own_view(&self) -> (HealthView, Awaiting) {
        let mut view = HealthView::new();
        let mut awaiting = Awaiting::new();
        for (name, s) in &self.services {
            let (verdicts, awaited) = (
                view.entry(name.clone()).or_default(),
                awaiting.entry(name.clone()).or_default(),
            );
            for (ip, b) in &s.backends {
                if self.runtime.get(name, *ip).admin == Admin::Maintenance {
                    continue;
                }
                match b.health.state() {
                    Health::Checking => {
                        awaited.insert(*ip);
                    }
                    state => {
                        verdicts.insert(*ip, state == Health::Up);
                    }
                }
            }
        }
        awaiting.retain(|_, s| !s.is_empty());
        (view, awaiting)
    }

    /// The runtime state (ids, overrides, the node's state, the fleet cache).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The operator's desired state, before a standalone daemon's
    /// registrations were admitted into it.
    pub fn configured(&self) -> &Desired {
        self.configured.as_ref().unwrap_or(&self.desired)
    }

    /// Records the operator's desired state just applied, and the
    /// registrations it did not admit.
    pub fn set_configured(&mut self, configured: Desired, refused: Vec<Refused>) {
        self.configured = Some(configured);
        self.registrations_refused = refused;
    }

    /// Registrations the services did not admit, as of the last apply.
    pub fn registrations_refused(&self) -> &[Refused] {
        &self.registrations_refused
    }

    /// Replaces the standalone registrations held (applied, and saved, by
    /// the next [`Controller::apply`]); returns those held before.
    pub fn set_registered(&mut self, held: HeldRegistrations) -> HeldRegistrations {
        std::mem::replace(&mut self.runtime.registered, held)
    }

    /// Keeps the fleet state last applied in the state file, for a restart
    /// while etcd is unreachable.
    pub fn cache_fleet_state(&mut self, state: FleetState) -> Result<()> {
        self.runtime.fleet = Some(state);
        self.runtime.save(&self.desired.settings.state_file)
    }

    /// Whether the operator drained the node.
    pub fn node_drained(&self) -> bool {
        self.runtime.node.drained
    }

    /// Drains or undrains the node; persisted before it takes effect.
    pub fn set_node_drained(&mut self, drained: bool) -> Result<()> {
        let was = self.runtime.node.drained;
        self.runtime.node.drained = drained;
        if let Err(e) = self.runtime.save(&self.desired.settings.state_file) {
            self.runtime.node.drained = was;
            return Err(e.context("the node's state could not be saved; nothing changed"));
        }
        info!(drained, "node state changed");
        Ok(())
    }

    /// The weight a backend has in its table now, before slow start and
    /// its agent scale it.
    pub fn table_weight(&self, service: &str, ip: IpAddr, b: &BackendState) -> u32 {
        self.weight_in_table(service, ip, b, self.in_panic(service))
    }

    /// [`Self::table_weight`] with its service in `panic` or not.
    fn weight_in_table(&self, service: &str, ip: IpAddr, b: &BackendState, panic: bool) -> u32 {
        let o = self.runtime.get(service, ip);
        if self.admin(service, ip, b) != Admin::Ready
            || !self.healthy(service, ip, b, panic)
            || !self.hops.contains_key(&ip)
        {
            return 0;
        }
        o.weight.unwrap_or(b.configured_weight)
    }

    /// The weight a backend takes in its table now, slow start, agent and
    /// load feedback included, and what sets it: `operator` (drain,
    /// maintenance or a weight override), `leaving` (a registered host
    /// that is leaving), `agent` (its state, `down` or a percent), `health`
    /// (down), `neighbour` (no MAC), `slow start`, `load` (its registered
    /// host's), `feedback` (its latency) or `config`.
    pub fn effective_weight(&self, service: &str, ip: IpAddr, b: &BackendState) -> (f64, &str) {
        let o = self.runtime.get(service, ip);
        let ramp = self.ramp_percent(service, ip, b);
        let scale = self.scale_percent(service, ip, b);
        let weight = f64::from(self.table_weight(service, ip, b)) * f64::from(ramp) / 100.0
            * f64::from(scale)
            / 100.0;
        let by = if o.admin != Admin::Ready {
            "operator"
        } else if b.registered.is_some_and(|r| r.draining) {
            "leaving"
        } else if b.agent.view.applied.admin != Admin::Ready || b.agent.view.applied.down {
            "agent"
        } else if !self.healthy(service, ip, b, self.in_panic(service)) {
            "health"
        } else if !self.hops.contains_key(&ip) {
            "neighbour"
        } else if ramp < 100 {
            "slow start"
        } else if o.weight.is_some() {
            "operator"
        } else if b.agent.view.applied.percent < agent::MAX_PERCENT {
            "agent"
        } else if b.registered.is_some_and(|r| r.percent < feedback::FULL) {
            "load"
        } else if b.feedback.percent.applied < feedback::FULL {
            "feedback"
        } else {
            "config"
        };
        (weight, by)
    }

    fn backend_value(&self, service: &str, ip: IpAddr, b: &BackendState) -> BackendValue {
        let (addr, family) = addr_bytes(ip);
        let hop = self.hops.get(&ip).copied();
        // A drained backend whose probes fail stays up while its host
        // answers them: it gets no new flow, and a server shutting down
        // gracefully stops listening (refusing probes) or answers 503
        // while it finishes the connections it has, which must not
        // re-hash elsewhere to be reset. A host silent for `fall` probes
        // in a row is down, as any other, so its flows move rather than
        // vanish into it; so is one its agent says is down.
        let healthy = self.healthy(service, ip, b, self.in_panic(service));
        let answers = || {
            let fall = self
                .services
                .get(service)
                .map_or(1, |s| s.config.health.thresholds.fall);
            !b.agent.view.applied.down && b.silent_probes < fall
        };
        let up = hop.is_some()
            && match self.admin(service, ip, b) {
                Admin::Maintenance => false,
                Admin::Drain => healthy || answers(),
                Admin::Ready => healthy,
            };
        BackendValue {
            addr,
            mac: hop.map_or([0; 6], |h| h.mac),
            family,
            flags: if up { BACKEND_F_UP } else { 0 },
            generation: b.generation,
            seal: 0,
        }
        .with_port(hop.map_or(0, |h| h.port))
    }

    fn build_ring(&self, svc: &ServiceState) -> Result<Vec<u32>> {
        let panic = self.panic_of(svc);
        let keys: Vec<(IpAddr, Vec<u8>)> = svc
            .backends
            .keys()
            .map(|ip| {
                let (a, f) = addr_bytes(*ip);
                (*ip, [&a[..], &[f]].concat())
            })
            .collect();
        let candidates: Vec<Candidate<'_>> = keys
            .iter()
            .map(|(ip, key)| {
                let b = &svc.backends[ip];
                // Maglev uses only weight ratios: scaling every weight by its
                // slow-start and agent-and-feedback percents ramps a weight
                // of 1 as finely as 1000 (at most 65,535 × 100 × 100,
                // within u32).
                let name = &svc.config.name;
                let weight = self.weight_in_table(name, *ip, b, panic)
                    * self.ramp_percent(name, *ip, b)
                    * self.scale_percent(name, *ip, b);
                Candidate { key, weight }
            })
            .collect();
        let size = self
            .desired
            .settings
            .table_size
            .unwrap_or_else(|| maglev::table_size(svc.backends.len()));
        let slots = maglev::build(&candidates, size)?;
        let ids: Vec<u32> = keys.iter().map(|(ip, _)| svc.backends[ip].id).collect();
        Ok(slots
            .into_iter()
            .map(|s| s.map_or(NO_BACKEND, |i| ids[i as usize]))
            .collect())
    }

    /// The table `svc` would have once its checking backends pass their
    /// probes. In a fleet the agreed view may already hold them down (the
    /// other nodes are checking them too); once they pass it holds them up,
    /// so for this build it counts them as a backend it does not name yet.
    fn ring_once_checked(&mut self, svc: &ServiceState) -> Result<Vec<u32>> {
        let mut checked = svc.clone();
        let mut passing = Vec::new();
        for (ip, b) in &mut checked.backends {
            if b.health.state() == Health::Checking {
                b.health = Tracker::new(Health::Up);
                passing.push(*ip);
            }
        }
        // Their verdicts set aside for this one build, not a copy of the
        // whole view: at start every backend of every service is checking.
        let name = &svc.config.name;
        let set_aside: Vec<_> = self
            .agreed_of(name)
            .map(|m| passing.iter().filter_map(|ip| m.remove_entry(ip)).collect())
            .unwrap_or_default();
        let ring = self.build_ring(&checked);
        if let Some(m) = self.agreed_of(name) {
            m.extend(set_aside);
        }
        ring
    }

    /// The fleet's agreed verdicts on the backends of `service`, if any.
    fn agreed_of(&mut self, service: &str) -> Option<&mut BTreeMap<IpAddr, Agreed>> {
        self.fleet_health.as_mut()?.agreed.get_mut(service)
    }

    /// Makes the running state equal `desired`. With `dry_run`, only reports.
    pub fn apply(&mut self, desired: Desired, dry_run: bool) -> Result<ChangeReport> {
        let cap = self.dp.capacity();
        let wanted = desired.settings.capacity;
        if wanted
            == (Capacity {
                conntrack_entries: wanted.conntrack_entries,
                ..cap
            })
            && wanted.conntrack_entries != cap.conntrack_entries
        {
            bail!(
                "conntrack_entries changes at a restart (systemctl restart lb): the table is resized then, its entries carried over"
            );
        }
        if wanted != cap {
            bail!(
                "table size and capacities cannot change under a running data plane: stop lb, remove its pin directory and start it again (forwarding stops meanwhile)"
            );
        }
        if desired.settings.table_size != self.desired.settings.table_size {
            bail!(
                "table_size changes at a restart (systemctl restart lb): the tables are resized then, the pinned data plane kept"
            );
        }
        let mut report = ChangeReport::default();
        let mut service_ids = IdPool::new(cap.max_services, self.services.values().map(|s| s.id));
        let mut backend_ids = IdPool::new(
            cap.max_backends,
            self.services
                .values()
                .flat_map(|s| s.backends.values().map(|b| b.id)),
        );
        let mut next = BTreeMap::new();
        // Services whose source lists change.
        let mut relisted = BTreeSet::new();
        for (name, cfg) in &desired.services {
            let prev = self
                .services
                .get(name)
                .filter(|s| service_key(&s.config) == service_key(cfg));
            let mut state = match prev {
                Some(s) => {
                    if s.config.mode != cfg.mode || s.config.affinity != cfg.affinity {
                        report.changes.push(format!(
                            "service {name}: mode {:?} affinity {:?}",
                            cfg.mode, cfg.affinity
                        ));
                    }
                    if s.config.health != cfg.health {
                        report
                            .changes
                            .push(format!("service {name}: health check changed"));
                    }
                    if s.config.agent != cfg.agent {
                        report
                            .changes
                            .push(format!("service {name}: agent check changed"));
                    }
                    if s.config.feedback != cfg.feedback {
                        report
                            .changes
                            .push(format!("service {name}: load feedback changed"));
                    }
                    if !s.config.same_lists(cfg) {
                        relisted.insert(s.id);
                        report.changes.push(format!(
                            "service {name}: source lists now deny {} and allow {} prefixes",
                            cfg.deny.len(),
                            cfg.allow.len()
                        ));
                    }
                    if s.config.new_flow_limit != cfg.new_flow_limit {
                        report.changes.push(match cfg.new_flow_limit {
                            Some(l) => format!(
                                "service {name}: new flows limited to {} a second, {} at once, \
                                 per /{}",
                                l.rate, l.burst, l.prefix
                            ),
                            None => format!("service {name}: new flows no longer limited"),
                        });
                    }
                    ServiceState {
                        config: cfg.clone(),
                        backends: BTreeMap::new(),
                        ..s.clone()
                    }
                }
                None => {
                    report.changes.push(format!(
                        "service {name}: added {}:{}/{} ({:?})",
                        cfg.vip, cfg.port, cfg.protocol, cfg.mode
                    ));
                    ServiceState {
                        config: cfg.clone(),
                        id: service_ids.take("service")?,
                        backends: BTreeMap::new(),
                        ring: Arc::from([]),
                        in_table: 0,
                        published: None,
                        limit_written: None,
                        digest: 0,
                        rebuilds: 0,
                        panic: false,
                        adjusted: None,
                        synced: None,
                        health_due: None,
                    }
                }
            };
            let mut deferred = Vec::new();
            for (ip, weight) in &cfg.backends {
                let registered = cfg.registered.get(ip).copied();
                let mut b = match prev.and_then(|s| s.backends.get(ip)) {
                    Some(b) => {
                        if b.configured_weight != *weight {
                            report.changes.push(format!(
                                "service {name}: backend {ip} weight {} -> {weight}",
                                b.configured_weight
                            ));
                        }
                        BackendState {
                            configured_weight: *weight,
                            // Without an agent check, what agents said stops counting.
                            agent: if cfg.agent.is_some() {
                                b.agent.clone()
                            } else {
                                AgentState::default()
                            },
                            feedback: if cfg.feedback.is_some() {
                                b.feedback.clone()
                            } else {
                                FeedbackState::default()
                            },
                            ..b.clone()
                        }
                    }
                    None => {
                        // The ids of backends this change removes are free
                        // only once it is written: a registered backend
                        // (admitted against the capacity the change leaves)
                        // waits for the next change instead of failing this
                        // one, which `daemon::apply` makes at once.
                        let id = match backend_ids.next() {
                            Some(id) => id,
                            None if registered.is_some() => {
                                report.changes.push(format!(
                                    "service {name}: backend {ip} registered; it waits for the id a backend removed now frees"
                                ));
                                deferred.push(*ip);
                                continue;
                            }
                            None => return Err(IdPool::exhausted("backend")),
                        };
                        let unresolved = if self.hops.contains_key(ip) {
                            ""
                        } else {
                            "; its next hop's MAC is not resolved yet: out of the table until it is"
                        };
                        report.changes.push(format!(
                            "service {name}: backend {ip} added (weight {weight}); it takes flows once its probes pass{unresolved}"
                        ));
                        // A new holder of the id: its predecessor's flows must miss.
                        let generation = self.dp.backend(id)?.generation.wrapping_add(1);
                        // Out of the table until its probes pass. A plan (a
                        // fleet write's, before it reaches etcd) leaves the
                        // operator's trust for the change it plans.
                        let key = (name.clone(), *ip);
                        let trust = if dry_run {
                            self.trusted_first_probe.contains(&key)
                        } else {
                            self.trusted_first_probe.remove(&key)
                        };
                        BackendState::new(id, generation, *weight, Tracker::checking(trust))
                    }
                };
                let leaving = |r: Option<config::Registered>| r.is_some_and(|r| r.draining);
                if leaving(registered) && !leaving(b.registered) {
                    report.changes.push(format!(
                        "service {name}: backend {ip} is leaving (its agent drains it)"
                    ));
                }
                b.registered = registered;
                state.backends.insert(*ip, b);
            }
            for ip in deferred {
                state.config.backends.remove(&ip);
                state.config.registered.remove(&ip);
                report.deferred.push((name.clone(), ip));
            }
            if let Some(p) = prev {
                for ip in p
                    .backends
                    .keys()
                    .filter(|ip| !cfg.backends.contains_key(ip))
                {
                    report
                        .changes
                        .push(format!("service {name}: backend {ip} removed"));
                }
            }
            let ring = self.build_ring(&state)?;
            let moved_from_now = |to: &[u32]| {
                if state.ring.is_empty() {
                    0
                } else {
                    moved(&state.ring, to)
                }
            };
            report
                .slots_moved
                .insert(name.clone(), moved_from_now(&ring));
            if state
                .backends
                .values()
                .any(|b| b.health.state() == Health::Checking)
            {
                let ring = self.ring_once_checked(&state)?;
                report
                    .slots_when_checked
                    .insert(name.clone(), moved_from_now(&ring));
            }
            next.insert(name.clone(), (state, ring));
        }
        let gone: Vec<String> = self
            .services
            .iter()
            .filter(|(n, s)| {
                next.get(*n)
                    .is_none_or(|(t, _)| service_key(&t.config) != service_key(&s.config))
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in &gone {
            report.changes.push(format!("service {name}: removed"));
        }
        if dry_run {
            return Ok(report);
        }

        self.atomically(|c| c.commit(&gone, next, &relisted))?;
        let mut desired = desired;
        for (name, ip) in &report.deferred {
            if let Some(svc) = desired.services.get_mut(name) {
                svc.backends.remove(ip);
                svc.registered.remove(ip);
            }
        }
        self.desired = desired;
        for line in &report.changes {
            info!(change = %line, "config applied");
        }
        Ok(report)
    }

    /// Writes a planned change: `gone` services out, the `next` services
    /// (each with its table) in, the flows of sources the `relisted`
    /// services' lists now refuse forgotten, and the state file saved.
    fn commit(
        &mut self,
        gone: &[String],
        next: BTreeMap<String, (ServiceState, Vec<u32>)>,
        relisted: &BTreeSet<u32>,
    ) -> Result<()> {
        // Services going away: out of the data plane, then their backends.
        let mut released = Released::default();
        for name in gone {
            if let Some(old) = self.services.remove(name) {
                self.dp.remove_service(&service_key(&old.config))?;
                for b in old.backends.values() {
                    self.release_backend(b)?;
                    released.backends.push((b.id, old.id));
                }
                released.services.push(old.id);
            }
        }
        // Source lists: new prefixes in before a service's flags name its
        // lists, stale ones out once none does (removed services' too).
        let sources = source_entries(next.values().map(|(s, _)| s));
        self.add_source_entries(&sources)?;
        // Backends the operator removed: their overrides go with them.
        let mut deleted = BTreeSet::new();
        for (name, (state, ring)) in next {
            let old = self.services.remove(&name);
            // A new service's or backend's id may still hold counts nobody
            // released: a change that failed after writing it, a crash
            // between a removal and its release, a release that failed. Its
            // holder starts from zero.
            if old.is_none() {
                self.dp.release_service_stats(state.id)?;
            }
            let held: BTreeSet<u32> = old
                .iter()
                .flat_map(|o| o.backends.values().map(|b| b.id))
                .collect();
            for b in state.backends.values().filter(|b| !held.contains(&b.id)) {
                // Counts only: not the change's to fail for.
                if let Err(e) = self.dp.release_backend_stats(b.id, None) {
                    warn!(backend_id = b.id, error = %format!("{e:#}"), "a new backend id keeps counts it had");
                }
            }
            self.services.insert(name.clone(), state);
            self.sync(&name, Some(ring))?;
            if let Some(old) = old {
                let kept = &self.services[&name].backends;
                let removed: Vec<(IpAddr, BackendState)> = old
                    .backends
                    .into_iter()
                    .filter(|(ip, _)| !kept.contains_key(ip))
                    .collect();
                let service = self.services[&name].id;
                for (ip, b) in removed {
                    info!(service = %name, backend = %ip, "backend removed");
                    self.release_backend(&b)?;
                    released.backends.push((b.id, service));
                    if b.registered.is_none() {
                        deleted.insert((name.clone(), ip));
                    }
                }
            }
        }
        self.remove_source_entries(&sources)?;
        self.forget_refused_flows(relisted)?;
        // A registered backend whose lease lapsed keeps its override, inert,
        // for when it registers again (as in a fleet): an operator's drain
        // outlives the agent's restart.
        let services = &self.services;
        self.runtime.retain(|svc, ip| {
            services.contains_key(svc) && !deleted.contains(&(svc.to_string(), ip))
        });
        self.persist()?;
        self.keep_counts(&released);
        Ok(())
    }

    /// Moves the counts of backends and services a committed change
    /// released to where they are kept ([`Dataplane::release_backend_stats`]).
    /// Only once the change is whole: one undone would have its backends
    /// back with their counts. A failure leaves that id's counts with it
    /// (its next holder starts from zero regardless), is said so, and is
    /// not the change's; the others are moved all the same.
    fn keep_counts(&mut self, released: &Released) {
        for &(id, service) in &released.backends {
            if let Err(e) = self.dp.release_backend_stats(id, Some(service)) {
                warn!(backend_id = id, error = %format!("{e:#}"), "counts of a released backend not kept apart");
            }
        }
        for &id in &released.services {
            if let Err(e) = self.dp.release_service_stats(id) {
                warn!(service_id = id, error = %format!("{e:#}"), "counts of a released service not kept apart");
            }
        }
    }

    /// Runs `change`, which writes the data plane. If it fails, puts the
    /// services, backends, tables, source lists and overrides back as they
    /// were before it, and says so in the error: a change is applied whole
    /// or not at all.
    fn atomically<T>(&mut self, change: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        // Cheap: the tables are shared, not copied.
        let services = self.services.clone();
        let runtime = self.runtime.clone();
        let failed = match change(self) {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        match self.restore(services, runtime) {
            Ok(()) => {
                warn!(error = %format!("{failed:#}"), "change failed part way: what it had written is undone");
                Err(failed
                    .context("nothing changed: what the change had already written is undone"))
            }
            Err(undo) => {
                error!(error = %format!("{failed:#}"), undo = %format!("{undo:#}"), "change failed part way, and undoing it failed too");
                Err(failed.context(format!(
                    "the change failed part way, and undoing what it had written failed too \
                     ({undo:#}): the data plane may be half changed; a restart of lb (`systemctl \
                     restart lb`) adopts it and writes the running configuration again"
                )))
            }
        }
    }

    /// Brings the data plane back to `services` and the overrides back to
    /// `runtime` after a change failed part way. The current state says what
    /// the change managed to write (each write is recorded as it succeeds),
    /// so only that is written again, in the order of any change: services
    /// the change added out, then each service's gains, table and losses,
    /// then backends the change added released, and the flows of sources
    /// the restored lists refuse forgotten. Memory holds every service of
    /// `services` before any write, and each step is tried whatever an
    /// earlier one's failure: a failed undo leaves none of them unknown to
    /// the daemon (unprobed, its VIP withdrawn), and their tables are tried
    /// again a second later. A service the change added that cannot be
    /// taken out stays in the kernel until a restart. Returns the first
    /// failure.
    fn restore(
        &mut self,
        services: BTreeMap<String, ServiceState>,
        runtime: Runtime,
    ) -> Result<()> {
        self.runtime = runtime;
        let now = std::mem::take(&mut self.services);
        let old_services: BTreeSet<u32> = services.values().map(|s| s.id).collect();
        let old_backends: BTreeSet<u32> = services
            .values()
            .flat_map(|s| s.backends.values().map(|b| b.id))
            .collect();
        let sources = source_entries(services.values());
        // The change's lists were live from its service's sync on: the
        // flows they admitted that the lists put back refuse go again.
        let relisted: BTreeSet<u32> = services
            .iter()
            .filter(|(name, old)| {
                now.get(*name)
                    .is_some_and(|cur| cur.id == old.id && !cur.config.same_lists(&old.config))
            })
            .map(|(_, old)| old.id)
            .collect();
        let mut rings = Vec::new();
        for (name, mut old) in services {
            rings.push((name.clone(), old.ring.to_vec(), old.health_due));
            match now.get(&name).filter(|cur| cur.id == old.id) {
                // What the kernel holds now.
                Some(cur) => {
                    old.ring = cur.ring.clone();
                    old.in_table = cur.in_table;
                    old.published = cur.published;
                    old.limit_written = cur.limit_written;
                    old.digest = cur.digest;
                    old.rebuilds = cur.rebuilds;
                    for (ip, b) in &mut old.backends {
                        b.written = cur
                            .backends
                            .get(ip)
                            .filter(|c| c.id == b.id)
                            .and_then(|c| c.written);
                    }
                }
                // Taken out by the change: written whole again.
                None => {
                    old.ring = Arc::from([]);
                    old.in_table = 0;
                    old.published = None;
                    old.limit_written = None;
                    for b in old.backends.values_mut() {
                        b.written = None;
                    }
                }
            }
            self.services.insert(name, old);
        }
        let mut first: Option<anyhow::Error> = None;
        let mut note = |r: Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        for cur in now.values().filter(|c| !old_services.contains(&c.id)) {
            let key = service_key(&cur.config);
            note(match self.dp.service(&key) {
                Ok(Some(v)) if v.id == cur.id => self.dp.remove_service(&key),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            });
        }
        note(self.add_source_entries(&sources));
        for (name, ring, due) in rings {
            note(self.sync_or_retry(&name, Some(ring)));
            // The table put back predates a held-back health change (or a
            // failed rebuild's retry) that the backends just written
            // already show: it stays due, or a backend gone down would
            // keep its slots, dropping their new flows, until the next.
            if let Some(due) = due
                && let Some(svc) = self.services.get_mut(&name)
            {
                svc.health_due = Some(svc.health_due.map_or(due, |d| d.min(due)));
            }
        }
        for b in now.values().flat_map(|s| s.backends.values()) {
            if !old_backends.contains(&b.id) && b.written.is_some() {
                note(self.release_backend(b));
            }
        }
        note(self.remove_source_entries(&sources));
        note(self.forget_refused_flows(&relisted).map(drop));
        first.map_or(Ok(()), Err)
    }

    fn release_backend(&mut self, b: &BackendState) -> Result<()> {
        let v = self.dp.backend(b.id)?;
        self.dp.set_backend(b.id, &BackendValue { flags: 0, ..v })
    }

    /// Brings one service's backends and table in line with its state:
    /// gains first, then the table, then losses. Returns slots moved.
    fn sync(&mut self, name: &str, ring: Option<Vec<u32>>) -> Result<usize> {
        self.refresh_panic(name)?;
        let svc = self.services.get(name).context("no such service")?;
        let ring = match ring {
            Some(r) => r,
            None => self.build_ring(svc)?,
        };
        let mut gains = Vec::new();
        let mut losses = Vec::new();
        for (ip, b) in &svc.backends {
            let v = self.backend_value(name, *ip, b);
            if b.written == Some(v) {
                continue;
            }
            if v.flags & BACKEND_F_UP != 0 {
                gains.push((*ip, v));
            } else {
                losses.push((*ip, v));
            }
        }
        let flags = service_flags(&svc.config);
        // 0: the protocol's default, from the connection-table settings.
        let idle_timeout = svc.config.idle_timeout.unwrap_or(0);
        let key = service_key(&svc.config);
        let id = svc.id;
        for (ip, v) in &gains {
            self.write_backend(name, *ip, v)?;
        }
        // The limit before the flags that name it.
        let limit = self.services[name].config.source_limit();
        if self.services[name].limit_written != Some(limit) {
            self.dp.set_source_limit(id, limit.as_ref())?;
            let svc = self.services.get_mut(name).context("no such service")?;
            svc.limit_written = Some(limit);
        }
        let svc = &self.services[name];
        let mut moved_slots = 0;
        if *svc.ring != *ring || svc.published != Some((flags, idle_timeout)) {
            moved_slots = if svc.ring.is_empty() {
                0
            } else {
                moved(&svc.ring, &ring)
            };
            if let Err(e) = self
                .dp
                .publish_service(&key, id, flags, idle_timeout, &ring)
            {
                // Part of it may be live (a table of the same size is
                // rewritten in place before the entry; the slot follows the
                // entry): the next sync, an undo's included, writes the
                // table whole rather than trust that nothing changed.
                if let Some(svc) = self.services.get_mut(name) {
                    svc.published = None;
                }
                return Err(e);
            }
            let svc = self.services.get_mut(name).context("no such service")?;
            let d = table_digest(&ring, &svc.backends);
            svc.in_table = holding_slots(&ring, &svc.backends);
            svc.ring = ring.into();
            svc.published = Some((flags, idle_timeout));
            svc.digest = d;
            svc.rebuilds += 1;
            info!(service = %name, slots_moved = moved_slots, digest = %digest_text(d), "table rebuilt");
        } else if svc.digest == 0 {
            let d = table_digest(&svc.ring, &svc.backends);
            self.services
                .get_mut(name)
                .context("no such service")?
                .digest = d;
        }
        for (ip, v) in &losses {
            self.write_backend(name, *ip, v)?;
        }
        let svc = self.services.get_mut(name).context("no such service")?;
        svc.synced = Some(Instant::now());
        svc.health_due = None;
        Ok(moved_slots)
    }

    fn write_backend(&mut self, service: &str, ip: IpAddr, v: &BackendValue) -> Result<()> {
        let b = self
            .services
            .get_mut(service)
            .and_then(|s| s.backends.get_mut(&ip))
            .context("no such backend")?;
        self.dp.set_backend(b.id, v)?;
        b.written = Some(*v);
        Ok(())
    }

    fn persist(&mut self) -> Result<()> {
        self.runtime.ids = self
            .services
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    ServiceIds {
                        id: s.id,
                        backends: s.backends.iter().map(|(ip, b)| (*ip, b.id)).collect(),
                    },
                )
            })
            .collect();
        self.runtime.history = self
            .services
            .iter()
            .map(|(n, s)| {
                let backends = s.backends.iter().map(|(ip, b)| (*ip, b.history()));
                (n.clone(), backends.collect())
            })
            .collect();
        self.runtime.save(&self.desired.settings.state_file)?;
        self.history_unsaved = false;
        Ok(())
    }

    fn backend_mut(&mut self, service: &str, ip: IpAddr) -> Result<&mut BackendState> {
        self.services
            .get_mut(service)
            .with_context(|| format!("no service named {service:?} (see `lb service list`)"))?
            .backends
            .get_mut(&ip)
            .with_context(|| {
                format!("service {service} has no backend {ip} (see `lb backend list`)")
            })
    }

    /// Records a probe result; rebuilds the table when the state changes
    /// (held back within [`HEALTH_REBUILD_GAP`] of the last rebuild).
    pub fn record_probe(
        &mut self,
        service: &str,
        ip: IpAddr,
        report: ProbeReport,
    ) -> Result<Option<Health>> {
        let svc = self.services.get(service).context("no such service")?;
        let (thresholds, slow_start) = (svc.config.health.thresholds, svc.config.health.slow_start);
        // The live table, shared: read only if the backend comes up.
        let ring = Arc::clone(&svc.ring);
        let b = self.backend_mut(service, ip)?;
        if report.ok {
            b.feedback.latency = Some(feedback::smooth(b.feedback.latency, report.latency));
        } else {
            b.probe_failures += 1;
        }
        b.silent_probes = if report.answered {
            0
        } else {
            b.silent_probes.saturating_add(1)
        };
        let changed = b.health.record(report.ok, thresholds);
        let detail = report.detail.clone();
        b.last_probe = Some((report, SystemTime::now()));
        if let Some(state) = changed {
            b.since = SystemTime::now();
            b.transitions += 1;
            match state {
                Health::Down | Health::Checking => {
                    b.ramp_started = None;
                    b.ramp_percent = 100;
                    warn!(service, backend = %ip, probe = %detail, "backend down");
                }
                Health::Up => {
                    // Recovered or proven new: ramp up. An adopted backend
                    // is never ramped, nor one the table still holds (panic
                    // kept it): it has taken its whole share all along.
                    if !ring.contains(&b.id) {
                        b.ramp_started = Some(Instant::now());
                        b.ramp_percent = health::slow_start_percent(Duration::ZERO, slow_start);
                    }
                    info!(service, backend = %ip, "backend up");
                }
            }
            self.health_changed(service)?;
        } else if self.up_flag_moved(service, ip) {
            // No state change, but what the data plane holds changes (a
            // drained backend's host fell silent, or answers again).
            self.health_changed(service)?;
        }
        self.reweigh(service)?;
        Ok(changed)
    }

    /// Whether backend `ip` of `service` would be written with another up
    /// flag than it was, and no rebuild of the service is due already
    /// (held back, or a failed one's retry), which would write it: each
    /// probe result must not start a rebuild of its own.
    fn up_flag_moved(&self, service: &str, ip: IpAddr) -> bool {
        let Some(svc) = self
            .services
            .get(service)
            .filter(|s| s.health_due.is_none())
        else {
            return false;
        };
        let Some(b) = svc.backends.get(&ip) else {
            return false;
        };
        let want = self.backend_value(service, ip, b).flags & BACKEND_F_UP;
        b.written.is_some_and(|w| w.flags & BACKEND_F_UP != want)
    }

    /// Brings `service`'s table in line with its backends' health: at
    /// once, or within [`HEALTH_REBUILD_GAP`] of its last rebuild at the
    /// end of the gap ([`Self::flush_health_changes`]), so a storm of
    /// probe results costs each service at most one rebuild a gap.
    fn health_changed(&mut self, service: &str) -> Result<()> {
        let svc = self.services.get_mut(service).context("no such service")?;
        if let Some(t) = svc.synced.filter(|t| t.elapsed() < HEALTH_REBUILD_GAP) {
            svc.health_due.get_or_insert(t + HEALTH_REBUILD_GAP);
            return Ok(());
        }
        self.rebuild_for_health(service)
    }

    /// Rebuilds `service`'s table for its backends' health; if that fails,
    /// tries again [`HEALTH_RETRY`] later.
    fn rebuild_for_health(&mut self, service: &str) -> Result<()> {
        self.sync_each([service.to_string()])?;
        self.history_unsaved = true;
        Ok(())
    }

    /// Syncs each of `names` with what memory says, every one whatever
    /// another's failure: one that fails is tried again [`HEALTH_RETRY`]
    /// later ([`Self::flush_health_changes`]), since memory already holds
    /// what its table lacks and no later change need touch it. Returns the
    /// first failure.
    fn sync_each(&mut self, names: impl IntoIterator<Item = String>) -> Result<()> {
        let mut first = None;
        for name in names {
            if let Err(e) = self.sync_or_retry(&name, None) {
                first.get_or_insert(e.context(format!("service {name}")));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// [`Self::sync`]s `name`; if that fails, tries again from memory
    /// [`HEALTH_RETRY`] later, with the held-back health changes.
    fn sync_or_retry(&mut self, name: &str, ring: Option<Vec<u32>>) -> Result<()> {
        let synced = self.sync(name, ring);
        if synced.is_err()
            && let Some(svc) = self.services.get_mut(name)
        {
            svc.health_due = Some(Instant::now() + HEALTH_RETRY);
        }
        synced.map(drop)
    }

    /// When the next held-back health change is due
    /// ([`Self::flush_health_changes`]), if any is waiting.
    pub fn health_changes_due(&self) -> Option<Instant> {
        self.services.values().filter_map(|s| s.health_due).min()
    }

    /// Rebuilds the tables of the services whose held-back health changes
    /// are due. A service whose rebuild fails is said so, and tried again
    /// later; the others are rebuilt regardless.
    pub fn flush_health_changes(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.health_due.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &due {
            if let Err(e) = self.rebuild_for_health(name) {
                error!(service = %name, error = %format!("{e:#}"), "applying held-back health changes; retrying in 1 s");
            }
        }
    }

    /// Saves the health history if changes since the last save left it
    /// unsaved: once a second at most (the daemon's repair tick), not once
    /// a rebuild. The changes already apply, so a crash loses at most that
    /// second of history, and a file that cannot be written only the
    /// history.
    pub fn save_history(&mut self) {
        if !self.history_unsaved {
            return;
        }
        if let Err(e) = self.persist() {
            warn!(error = %format!("{e:#}"), "saving the health history to the state file");
        }
    }

    /// Load feedback: what each backend of `service` should keep of its
    /// weight by its smoothed probe latency, against the fastest's, and by
    /// its active flows, against its weight's share of them (the lower of
    /// the two); applied when the service may rebuild again.
    fn reweigh(&mut self, service: &str) -> Result<()> {
        let svc = self.services.get(service).context("no such service")?;
        let Some(f) = svc.config.feedback else {
            return Ok(());
        };
        // Measured against the backends taking new flows: a dead one's
        // last latency says nothing of the others, and a drained one's
        // flows are no share of the new ones.
        let serving: BTreeMap<IpAddr, u32> = svc
            .backends
            .iter()
            .filter(|(ip, b)| {
                b.health.state() == Health::Up && self.admin(service, **ip, b) == Admin::Ready
            })
            .map(|(ip, b)| {
                (
                    *ip,
                    self.runtime
                        .get(service, *ip)
                        .weight
                        .unwrap_or(b.configured_weight),
                )
            })
            .collect();
        let serving_states = || {
            svc.backends
                .iter()
                .filter(|(ip, _)| serving.contains_key(*ip))
                .map(|(_, b)| &b.feedback)
        };
        let fastest = serving_states().filter_map(|f| f.latency).min();
        let total_flows: u64 = serving_states().filter_map(|f| f.flows).sum();
        let total_weight: u64 = serving.values().map(|&w| u64::from(w)).sum();
        let svc = self.services.get_mut(service).context("no such service")?;
        for (ip, b) in &mut svc.backends {
            let by_latency = match (b.feedback.latency, fastest) {
                (Some(l), Some(fastest)) => {
                    feedback::percent(l, fastest, f.tolerance, f.min_percent)
                }
                _ => feedback::FULL,
            };
            let by_flows = match (f.flows, b.feedback.flows, serving.get(ip)) {
                (Some(tolerance), Some(active), Some(&weight)) if total_weight > 0 => {
                    let share = total_flows as f64 * f64::from(weight) / total_weight as f64;
                    feedback::flow_percent(active, share, tolerance, f.min_percent)
                }
                _ => feedback::FULL,
            };
            let p = &mut b.feedback.percent;
            p.wanted = feedback::next(p.applied, by_latency.min(by_flows), f.step, f.min_percent);
        }
        self.apply_adjustments(service)
    }

    /// Whether a service weighs its backends by their active flows, so the
    /// connection table must be read for [`Controller::observe_active_flows`].
    pub fn weighs_by_flows(&self) -> bool {
        self.services
            .values()
            .any(|s| s.config.feedback.is_some_and(|f| f.flows.is_some()))
    }

    /// Records each backend's active flows (by backend id, from the
    /// connection table) for the services that weigh by them, and weighs
    /// those services' backends again.
    pub(super) fn observe_active_flows(
        &mut self,
        active: &super::flows::ActiveFlows,
    ) -> Result<()> {
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.config.feedback.is_some_and(|f| f.flows.is_some()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let svc = self.services.get_mut(&name).context("no such service")?;
            for b in svc.backends.values_mut() {
                b.feedback.flows = Some(active.of(b));
            }
            self.reweigh(&name)?;
        }
        Ok(())
    }

    /// Applies what `service`'s backends' agents and latencies ask for, if
    /// any and if its table may be rebuilt again (once per
    /// [`ServiceState::adjust_interval`]): one rebuild for all of them.
    fn apply_adjustments(&mut self, service: &str) -> Result<()> {
        let svc = self.services.get_mut(service).context("no such service")?;
        let Some(interval) = svc.adjust_interval() else {
            return Ok(());
        };
        let pending = svc
            .backends
            .values()
            .any(|b| b.agent.view.pending().is_some() || b.feedback.percent.pending().is_some());
        if !pending || svc.adjusted.is_some_and(|t| t.elapsed() < interval) {
            return Ok(());
        }
        svc.adjusted = Some(Instant::now());
        for (ip, b) in &mut svc.backends {
            if let Some((from, to)) = b.agent.view.apply() {
                info!(service, backend = %ip, from = %from, to = %to, cause = "agent", "weight change");
            }
            if let Some((from, to)) = b.feedback.percent.apply() {
                let latency = b.feedback.latency.unwrap_or_default();
                let flows = b.feedback.flows.map_or("-".to_string(), |f| f.to_string());
                info!(service, backend = %ip, from = %format!("{from}%"), to = %format!("{to}%"), latency = ?latency, active_flows = %flows, cause = "feedback", "weight change");
            }
        }
        self.sync_each([service.to_string()])
    }

    /// Moves recovered backends to their next slow-start step and rebuilds
    /// the tables whose weights changed.
    pub fn advance_slow_start(&mut self) -> Result<()> {
        let now = Instant::now();
        let mut changed = Vec::new();
        for (name, s) in &mut self.services {
            let period = s.config.health.slow_start;
            for (ip, b) in &mut s.backends {
                let Some(start) = b.ramp_started else {
                    continue;
                };
                let percent = health::slow_start_percent(now - start, period);
                if percent != b.ramp_percent {
                    b.ramp_percent = percent;
                    info!(service = %name, backend = %ip, percent, "slow start");
                    if !changed.contains(name) {
                        changed.push(name.clone());
                    }
                }
                if percent == 100 {
                    b.ramp_started = None;
                }
            }
        }
        self.sync_each(changed)
    }

    /// Records what backend `ip`'s agent answered (`Ok`: the line and what
    /// it says) or why it did not, and applies it when its service may
    /// rebuild again. An agent that does not answer changes nothing: the
    /// probes, not the agent, say whether a backend serves.
    pub fn record_agent(
        &mut self,
        service: &str,
        ip: IpAddr,
        answer: Result<(String, agent::Reply), String>,
    ) -> Result<()> {
        let Some(step) = self
            .services
            .get(service)
            .context("no such service")?
            .config
            .agent
            .as_ref()
            .map(|a| a.step)
        else {
            // Asked before a reload took the agent check away.
            return Ok(());
        };
        let b = self.backend_mut(service, ip)?;
        let failed_before = matches!(b.agent.last, Some((Err(_), _)));
        match &answer {
            Ok((_, reply)) => b.agent.view.wanted = b.agent.view.wanted.after(reply, step),
            Err(e) if !failed_before => {
                warn!(service, backend = %ip, error = %e, "agent check failed; its last answer stands");
            }
            Err(_) => {}
        }
        if failed_before && answer.is_ok() {
            info!(service, backend = %ip, "agent answers again");
        }
        b.agent.last = Some((answer.map(|(line, _)| line), SystemTime::now()));
        self.apply_adjustments(service)
    }

    /// Applies what agents and load feedback asked for to every service
    /// whose table may change again.
    pub fn apply_weight_changes(&mut self) -> Result<()> {
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            self.apply_adjustments(&name)?;
        }
        Ok(())
    }

    /// Lets backend `ip` of `service`, when a change adds it next, into the
    /// table on its first successful probe instead of `rise` of them; or,
    /// `trust` false, no longer (the change that was to add it failed).
    pub fn trust_first_probe(&mut self, service: &str, ip: IpAddr, trust: bool) {
        let key = (service.to_string(), ip);
        if trust {
            self.trusted_first_probe.insert(key);
        } else {
            self.trusted_first_probe.remove(&key);
        }
    }

    /// Whether the probes say a backend is up.
    pub fn is_up(&self, service: &str, ip: IpAddr) -> bool {
        self.services
            .get(service)
            .and_then(|s| s.backends.get(&ip))
            .is_some_and(|b| b.health.state() == Health::Up)
    }

    /// Changes an operator override and applies it. Returns slots moved.
    pub fn set_override(
        &mut self,
        service: &str,
        ip: IpAddr,
        change: impl FnOnce(&mut Override),
    ) -> Result<usize> {
        self.backend_mut(service, ip)?;
        let mut o = self.runtime.get(service, ip);
        change(&mut o);
        let moved = self.atomically(|c| {
            let before = c.runtime.overrides.clone();
            c.runtime.set(service, ip, o);
            c.recheck_left_maintenance(&before);
            let moved = c.sync(service, None)?;
            c.persist()?;
            Ok(moved)
        })?;
        info!(service, backend = %ip, admin = ?o.admin, weight = ?o.weight, slots_moved = moved, "operator change");
        Ok(moved)
    }

    /// Records what resolving next hops found and resyncs the services
    /// whose backends it changes. A backend whose next hop no longer
    /// resolves (no route, its neighbour entry failed) leaves the tables,
    /// counted, until it resolves again; one whose route now leaves by an
    /// interface lb is not attached to is taken out of its tables (see
    /// [`Controller::unattached`]).
    pub fn set_next_hops(&mut self, found: Resolution) -> Result<()> {
        let configured: BTreeSet<IpAddr> = self
            .services
            .values()
            .flat_map(|s| s.backends.keys().copied())
            .collect();
        // What the change resolved for stays (a change resolves the backends
        // it adds before it applies); the rest follows the configuration,
        // so addresses a dry run or a removed backend left are forgotten.
        let keep = |ip: &IpAddr| configured.contains(ip) || found.hops.contains_key(ip);
        self.unresolved.retain(|ip, _| configured.contains(ip));
        self.hops.retain(|ip, _| keep(ip));
        self.unattached.retain(|ip, _| keep(ip));
        let mut changed = BTreeSet::new();
        for (ip, why) in found.unresolved {
            if self.hops.remove(&ip).is_some() {
                self.next_hops_lost += 1;
                warn!(backend = %ip, reason = %why, "next hop lost: out of the tables until it resolves again");
                changed.insert(ip);
            }
            self.unresolved.insert(ip, why);
        }
        let resolved: Vec<IpAddr> = found.hops.keys().copied().collect();
        let hops = self.attached_hops(found.hops);
        for ip in resolved {
            if self.unresolved.remove(&ip).is_some() && hops.contains_key(&ip) {
                info!(backend = %ip, "next hop resolved");
            }
            if self.hops.get(&ip) != hops.get(&ip) {
                match hops.get(&ip) {
                    Some(hop) => self.hops.insert(ip, *hop),
                    None => self.hops.remove(&ip),
                };
                changed.insert(ip);
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.backends.keys().any(|ip| changed.contains(ip)))
            .map(|(n, _)| n.clone())
            .collect();
        self.sync_each(names)
    }

    /// Why backend `ip` has no next hop, if it has none.
    pub fn next_hop_error(&self, ip: IpAddr) -> Option<&str> {
        self.unresolved.get(&ip).map(String::as_str)
    }

    /// Times a backend's next hop stopped resolving.
    pub fn next_hops_lost(&self) -> u64 {
        self.next_hops_lost
    }

    /// Of `hops`, those on interfaces lb is attached to, by port. The
    /// others are recorded as unattached, and reported when that is news.
    fn attached_hops(&mut self, hops: BTreeMap<IpAddr, NextHop>) -> BTreeMap<IpAddr, Hop> {
        let mut attached = BTreeMap::new();
        for (ip, hop) in hops {
            if let Some(port) = self.desired.settings.port_of(&hop.dev) {
                attached.insert(
                    ip,
                    Hop {
                        mac: hop.mac,
                        port,
                        addr: hop.addr,
                    },
                );
                self.unattached.remove(&ip);
            } else if self.unattached.get(&ip) != Some(&hop.dev) {
                self.unattached.insert(ip, hop.dev);
                if let Some(message) = self.unattached(ip) {
                    warn!("{message}");
                }
            }
        }
        attached
    }

    /// The interface backend `ip`'s route leaves by, if lb is not attached
    /// to it.
    pub fn unattached_interface(&self, ip: IpAddr) -> Option<String> {
        self.unattached.get(&ip).cloned()
    }

    /// Why backend `ip` is out of the tables, if its route leaves by an
    /// interface lb is not attached to: frames sent to it out of another
    /// one would carry that segment's MACs onto the wrong one.
    pub fn unattached(&self, ip: IpAddr) -> Option<String> {
        let dev = self.unattached.get(&ip)?;
        Some(format!(
            "backend {ip}: its route leaves by {dev}, which lb is not attached to \
             (settings.interfaces: {}); it stays out of the tables: attach lb to {dev} \
             too, or route the backend through one of those",
            self.desired.settings.interfaces.join(", "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_history_is_kept_and_a_since_past_the_clock_is_now() {
        let fresh = BackendState::new(0, 0, 1, Tracker::new(Health::Up));
        let now = fresh.since;
        let h = History {
            since: u64::MAX,
            transitions: 3,
            probe_failures: 9,
        };
        let b = fresh.clone().with_history(&h);
        assert_eq!((b.since, b.restored), (now, h));
        assert_eq!((b.transitions, b.probe_failures), (3, 9));
        let b = fresh.with_history(&History { since: 60, ..h });
        assert_eq!(b.since, SystemTime::UNIX_EPOCH + Duration::from_secs(60));
    }

    /// The digest by its definition: the flow hash's version, then each
    /// slot's backend address and family (all ones for none), FNV-1a over
    /// them all.
    fn digest_by_definition(ring: &[u32], addr_of: &BTreeMap<u32, IpAddr>) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in FLOW_HASH_VERSION.to_le_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        for id in ring {
            let bytes = addr_of.get(id).map_or([0xff; 17], |ip| {
                let (a, f) = addr_bytes(*ip);
                let mut b = [0u8; 17];
                b[..16].copy_from_slice(&a);
                b[16] = f;
                b
            });
            for byte in bytes {
                h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    #[test]
    fn the_digest_is_the_same_by_definition() {
        let addr_of: BTreeMap<u32, IpAddr> = [
            (0, "198.18.0.11".parse().unwrap()),
            (7, "2001:2::12".parse().unwrap()),
            (3, "198.18.0.13".parse().unwrap()),
        ]
        .into();
        // Ids without an address (a stale id, no backend) included.
        let ring: Vec<u32> = (0..1_000u32)
            .map(|i| [0, 7, 3, 5, NO_BACKEND][(i * 7 % 5) as usize])
            .collect();
        assert_eq!(
            digest(&ring, &addr_of),
            digest_by_definition(&ring, &addr_of)
        );
        assert_eq!(digest(&[], &addr_of), digest_by_definition(&[], &addr_of));
        assert_eq!(
            digest(&ring, &BTreeMap::new()),
            digest_by_definition(&ring, &BTreeMap::new())
        );
    }
}
