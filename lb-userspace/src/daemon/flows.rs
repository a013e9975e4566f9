//! The connection table as operators see it: every entry resolved to its
//! service and backend and judged by the data plane's own rules (a lapsed
//! entry or one whose backend no longer stands is a miss), per-backend
//! counts of the flows that stand, and flushes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{
    BACKEND_F_UP, BackendValue, FLOW_F_CLOSED, FLOW_GENERATION_MASK, FLOW_SEEN_MASK, FlowKey,
    FlowValue, ServiceKey, addr_ip, wire::IPPROTO_TCP,
};

use super::controller::{BackendState, Controller, ServiceState, service_key};
use crate::{
    api::{ConntrackStatsView, FlowRow},
    config::{self, ConntrackTimeouts, Protocol},
    dataplane::monotonic_seconds,
};

/// What the data plane makes of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlowState {
    /// Pins the flow to its backend.
    Established,
    /// Pins it too, but the TCP connection saw a FIN or RST: the entry
    /// lapses after the closed timeout.
    Closing,
    /// Idle past its timeout: the next packet takes the Maglev table.
    Lapsed,
    /// Its backend is down or gone (the id names another): a miss.
    Stale,
}

impl FlowState {
    /// Whether the entry still decides where the flow's packets go.
    pub(super) fn pins(self) -> bool {
        matches!(self, FlowState::Established | FlowState::Closing)
    }

    /// As the API and the CLI spell it.
    pub(super) fn name(self) -> &'static str {
        match self {
            FlowState::Established => "established",
            FlowState::Closing => "closing",
            FlowState::Lapsed => "lapsed",
            FlowState::Stale => "stale",
        }
    }
}

/// How the data plane judges `value` of a flow of `svc` at `now` (its
/// clock), `backend` being the kernel's entry for the value's backend id:
/// the rules of `select_backend`. An entry made for an earlier service on
/// the same address and port (another id) is stale: the data plane finds
/// the service by the entry's id, and that slot no longer serves the flow.
pub(super) fn judge(
    t: &ConntrackTimeouts,
    svc: &ServiceState,
    value: &FlowValue,
    backend: &BackendValue,
    now: u32,
) -> FlowState {
    if value.lapsed(now, idle_timeout(t, &svc.config), t.tcp_closed) {
        FlowState::Lapsed
    } else if backend.flags & BACKEND_F_UP == 0
        || backend.generation & FLOW_GENERATION_MASK != value.generation
        || value.service != svc.id
    {
        FlowState::Stale
    } else if value.flags & FLOW_F_CLOSED != 0 {
        FlowState::Closing
    } else {
        FlowState::Established
    }
}

fn idle_timeout(t: &ConntrackTimeouts, svc: &config::Service) -> u32 {
    svc.idle_timeout
        .unwrap_or(if svc.protocol == Protocol::Tcp {
            t.tcp_idle
        } else {
            t.udp_idle
        })
}

/// One entry, resolved.
struct Flow {
    service: String,
    key: FlowKey,
    value: FlowValue,
    state: FlowState,
}

/// The connection table, read once (one batch walk) and resolved.
pub(super) struct Table {
    /// The entries of configured services.
    flows: Vec<Flow>,
    /// Every entry, those of removed services included.
    entries: usize,
}

impl Table {
    /// Reads the whole table and judges every entry of a configured service
    /// (entries of removed services match nothing; they are only counted).
    pub(super) fn read(ctl: &Controller) -> Result<Table> {
        let by_key: BTreeMap<ServiceKey, &str> = ctl
            .services()
            .iter()
            .map(|(name, s)| (service_key(&s.config), name.as_str()))
            .collect();
        let t = ctl.desired().settings.conntrack_timeouts;
        let now = monotonic_seconds();
        let (all, in_use) = ctl.dataplane().conntrack_dump_counted()?;
        let mut backends = BTreeMap::new();
        let mut flows = Vec::new();
        for &(key, value) in &all {
            let Some(&name) = by_key.get(&key.service_key()) else {
                continue;
            };
            let backend = match backends.get(&value.backend) {
                Some(b) => b,
                None => {
                    let b = ctl.dataplane().backend(value.backend)?;
                    backends.entry(value.backend).or_insert(b)
                }
            };
            let state = judge(&t, &ctl.services()[name], &value, backend, now);
            flows.push(Flow {
                service: name.to_owned(),
                key,
                value,
                state,
            });
        }
        Ok(Table {
            flows,
            // Entries of removed services too, which the dump cannot
            // complete.
            entries: in_use,
        })
    }

    /// The flows each backend holds: entries that pin a flow to it.
    fn active_by_backend(&self) -> ActiveFlows {
        let mut counts = BTreeMap::new();
        for f in self.flows.iter().filter(|f| f.state.pins()) {
            // Pinned, so of the generation the backend's id has now.
            counts
                .entry(f.value.backend)
                .or_insert((f.value.generation, 0))
                .1 += 1;
        }
        ActiveFlows(counts)
    }
}

/// Each backend's active flows (the entries that pin a flow to it), by
/// backend id, with the generation they were counted for: a backend given
/// a freed id since is another generation, and none of them are its.
#[derive(Debug, Default)]
pub(super) struct ActiveFlows(BTreeMap<u32, (u32, u64)>);

impl ActiveFlows {
    /// The flows pinned to backend `b`.
    pub(super) fn of(&self, b: &BackendState) -> u64 {
        match self.0.get(&b.id) {
            Some(&(generation, n)) if generation == b.generation & FLOW_GENERATION_MASK => n,
            _ => 0,
        }
    }
}

/// How old a summary of the table may be when it is used again.
const SUMMARY_MAX_AGE: Duration = Duration::from_secs(1);

/// What the daemon shows and uses of the table: its counts and each
/// backend's active flows, from one read of it.
pub(super) struct Summary {
    /// When the read began: it misses no flow pinned before.
    pub read_at: Instant,
    /// `lb conntrack stats`.
    pub stats: ConntrackStatsView,
    /// Active flows by backend.
    pub active: ActiveFlows,
}

/// The table's summary, shared by all that count flows (the pages, `lb
/// backend list`, `lb health`, `lb stats`, `drain --wait`, weighing by
/// flows, leaving backends): a read of the whole table (half a million
/// entries by default) runs in the daemon's loop, so it is read at most
/// once a [`SUMMARY_MAX_AGE`] however many ask, and what anyone who
/// reaches the pages or the socket can make it read is bounded.
#[derive(Default)]
pub(super) struct SummaryCache(Option<Summary>);

impl SummaryCache {
    /// The summary, read again if it is older than [`SUMMARY_MAX_AGE`].
    pub(super) fn get(&mut self, ctl: &Controller) -> Result<&Summary> {
        let stale = self
            .0
            .as_ref()
            .is_none_or(|s| s.read_at.elapsed() >= SUMMARY_MAX_AGE);
        if stale {
            let read_at = Instant::now();
            let table = Table::read(ctl)?;
            self.0 = Some(Summary {
                read_at,
                stats: stats(ctl, &table)?,
                active: table.active_by_backend(),
            });
        }
        self.0.as_ref().context("internal: no flow summary")
    }

    /// Forgets the summary (after a change): the next asker reads it.
    pub(super) fn forget(&mut self) {
        self.0 = None;
    }
}

fn check_service(ctl: &Controller, service: Option<&str>) -> Result<()> {
    if let Some(s) = service
        && !ctl.services().contains_key(s)
    {
        bail!("no service named {s:?} (see `lb service list`)");
    }
    Ok(())
}

/// The entries of one service or all, optionally only those on `backend`.
pub(super) fn list(
    ctl: &Controller,
    service: Option<&str>,
    backend: Option<IpAddr>,
) -> Result<Vec<FlowRow>> {
    check_service(ctl, service)?;
    let now = monotonic_seconds();
    // Each backend by the id and generation its entries name: a backend
    // given an id since (another generation) is not the one they were made
    // for.
    let addresses: BTreeMap<(&str, u32, u32), IpAddr> = ctl
        .services()
        .iter()
        .flat_map(|(name, s)| {
            s.backends.iter().map(move |(ip, b)| {
                let id = (name.as_str(), b.id, b.generation & FLOW_GENERATION_MASK);
                (id, *ip)
            })
        })
        .collect();
    let mut rows = Vec::new();
    for f in Table::read(ctl)?.flows {
        if service.is_some_and(|s| s != f.service) {
            continue;
        }
        let id = (f.service.as_str(), f.value.backend, f.value.generation);
        let address = addresses.get(&id).copied();
        if backend.is_some_and(|b| Some(b) != address) {
            continue;
        }
        let client = SocketAddr::new(addr_ip(&f.key.src, f.key.family), u16::from_be(f.key.sport));
        rows.push(FlowRow {
            service: f.service,
            client: client.to_string(),
            protocol: if f.key.proto == IPPROTO_TCP {
                "tcp"
            } else {
                "udp"
            }
            .to_owned(),
            backend: address,
            state: f.state.name().to_owned(),
            idle_seconds: now.wrapping_sub(f.value.last_seen) & FLOW_SEEN_MASK,
        });
    }
    rows.sort_by(|a, b| (&a.service, &a.client).cmp(&(&b.service, &b.client)));
    Ok(rows)
}

/// Removes the entries of one service, or every entry; returns how many.
/// Their flows' next packets take the Maglev table: established
/// connections stay where they are unless the table moved them.
pub(super) fn flush(ctl: &mut Controller, service: Option<&str>) -> Result<usize> {
    check_service(ctl, service)?;
    let Some(service) = service else {
        return ctl.dataplane_mut().conntrack_clear_in_use();
    };
    let key = service_key(&ctl.services()[service].config);
    ctl.dataplane_mut().conntrack_clear_service(&key)
}

/// Occupancy by state, inserts and refusals, and whether the insert budget
/// is being hit right now, from `table` and the data plane's accounting.
pub(super) fn stats(ctl: &Controller, table: &Table) -> Result<ConntrackStatsView> {
    let d = ctl.desired();
    let limit = d.settings.conntrack_inserts_per_cpu;
    let count = |state: FlowState| table.flows.iter().filter(|f| f.state == state).count() as u64;
    let per_cpu = ctl.dataplane().conntrack_stats()?;
    // The data plane's clock lags ours by up to a tick.
    let now = u64::from(monotonic_seconds());
    let refusing_cpus = per_cpu
        .iter()
        .filter(|c| {
            limit != 0 && c.window_inserts >= u64::from(limit) && now.saturating_sub(c.window) <= 1
        })
        .count();
    let t = d.settings.conntrack_timeouts;
    Ok(ConntrackStatsView {
        capacity: ctl.dataplane().capacity().conntrack_table_entries()?,
        entries: table.entries as u64,
        established: count(FlowState::Established),
        closing: count(FlowState::Closing),
        lapsed: count(FlowState::Lapsed),
        stale: count(FlowState::Stale),
        other: (table.entries - table.flows.len()) as u64,
        inserts: per_cpu.iter().map(|c| c.inserts).sum(),
        refused: per_cpu.iter().map(|c| c.refused).sum(),
        inserts_per_cpu: limit,
        refusing_cpus,
        tcp_idle_timeout: t.tcp_idle,
        udp_idle_timeout: t.udp_idle,
        tcp_closed_timeout: t.tcp_closed,
    })
}
