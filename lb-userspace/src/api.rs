//! The control API between the CLI and the daemon: one JSON request per
//! connection on a unix socket only root can open, one JSON response back.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

use crate::{
    announce::Withheld, bird::Protocol, config_edit::Edit, daemon::runtime::Admin,
    fleet::state::NodeReport,
};

/// Largest request the daemon reads; a longer one is refused.
pub const MAX_REQUEST: u64 = 1 << 20;
/// How long either side waits for the other.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// What the CLI asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Daemon status.
    Status,
    /// Services with their tables' digests.
    Services,
    /// Backends, of one service or all.
    Backends {
        /// Service name.
        service: Option<String>,
    },
    /// The source lists' prefixes, of one service or all.
    SourceLists {
        /// Service name.
        service: Option<String>,
    },
    /// Per-service and per-backend counters and the global reasons.
    Stats,
    /// Health of every backend.
    Health,
    /// Reads the daemon's configuration file again and applies what
    /// changed (as SIGHUP does), answering with the changes or why the file
    /// was refused.
    Reload,
    /// Sets a backend's weight (an override that persists).
    SetWeight {
        /// Service name.
        service: String,
        /// Backend address.
        backend: IpAddr,
        /// New weight; `None` clears the operator's weight, so the
        /// configured one applies again.
        weight: Option<u32>,
    },
    /// Sets a backend's operator state.
    SetAdmin {
        /// Service name.
        service: String,
        /// Backend address.
        backend: IpAddr,
        /// ready, drain or maintenance.
        admin: Admin,
    },
    /// Makes the running state equal this configuration.
    Apply {
        /// The configuration file's text.
        config: String,
        /// Report what would change without changing it.
        #[serde(default)]
        dry_run: bool,
    },
    /// Adds or removes a service or backend: an edit of the running
    /// configuration, applied like `Apply` and written to the file.
    Edit {
        /// The change.
        edit: Edit,
        /// Report what would change without changing it.
        #[serde(default)]
        dry_run: bool,
    },
    /// The node: drained or not, its VIPs and their announcement.
    Node,
    /// Drains the node (every VIP withdrawn, forwarding kept) or undrains it.
    SetNodeDrained {
        /// Drained.
        drained: bool,
    },
    /// The fleet as this node sees it.
    FleetStatus,
    /// Seeds the fleet's services from a configuration file's `[[service]]`
    /// tables.
    FleetImport {
        /// The file's text.
        config: String,
        /// Replace services the fleet already has.
        #[serde(default)]
        replace: bool,
    },
    /// The fleet's state as a standalone configuration file.
    FleetExport,
    /// Which backend a flow goes to, and why.
    Explain {
        /// Service name.
        service: String,
        /// Client address.
        client: IpAddr,
        /// Client port.
        port: u16,
    },
    /// Connection-table entries, of one service or all, optionally only
    /// those on one backend.
    Conntrack {
        /// Service name.
        service: Option<String>,
        /// Backend address.
        backend: Option<IpAddr>,
    },
    /// Removes the connection-table entries of one service, or all.
    ConntrackFlush {
        /// Service name.
        service: Option<String>,
    },
    /// Connection-table occupancy, inserts, refusals and timeouts.
    ConntrackStats,
}

impl Request {
    /// Whether answering it changes nothing. Any other request may change
    /// what the connection table's counts mean (a drain, a timeout, a
    /// backend), so the daemon reads the table afresh after it.
    pub fn is_view(&self) -> bool {
        matches!(
            self,
            Request::Status
                | Request::Services
                | Request::Backends { .. }
                | Request::SourceLists { .. }
                | Request::Stats
                | Request::Health
                | Request::Node
                | Request::FleetStatus
                | Request::FleetExport
                | Request::Explain { .. }
                | Request::Conntrack { .. }
                | Request::ConntrackStats
        )
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// A row of `lb acl list`: one prefix of one service's list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceRow {
    /// Service name.
    pub service: String,
    /// `deny` or `allow`.
    pub list: String,
    /// The prefix, `address/length`.
    pub prefix: String,
}

/// A row of `lb service list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRow {
    /// Name.
    pub name: String,
    /// VIP:port/protocol.
    pub service: String,
    /// dsr-l2 or ipip.
    pub mode: String,
    /// none or client.
    pub affinity: String,
    /// Backends configured.
    pub backends: usize,
    /// Backends with table slots.
    pub in_table: usize,
    /// Slots of its Maglev table.
    #[serde(default)]
    pub table_size: usize,
    /// Table digest (equal on every node computing the same table).
    pub digest: String,
    /// Tables published by this daemon.
    pub rebuilds: u64,
    /// Probes not trusted: all ready backends kept in the table.
    #[serde(default)]
    pub panic: bool,
}

/// A row of `lb backend list` and `lb health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendRow {
    /// Service name.
    pub service: String,
    /// Backend address.
    pub address: IpAddr,
    /// Weight in force (configured, or the operator's override).
    pub weight: u32,
    /// Whether the weight is an operator override.
    pub weight_overridden: bool,
    /// ready, drain or maintenance: the operator's, or while that is ready,
    /// the agent's.
    pub admin: Admin,
    /// What the backend's agent says, when its service has an agent check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentRow>,
    /// Its weight by its probes' latency, when its service has load
    /// feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackRow>,
    /// up or down, as the probes say.
    pub health: String,
    /// Table slots it owns.
    pub slots: usize,
    /// Next-hop MAC, if resolved.
    pub mac: Option<String>,
    /// The interface the backend's route leaves by, when lb is not attached
    /// to it (the backend is then out of the tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unattached_interface: Option<String>,
    /// Why its next hop does not resolve (no route, its neighbour entry
    /// failed): it is then out of the tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_error: Option<String>,
    /// Seconds in the current health state.
    pub since_seconds: u64,
    /// Last probe passed.
    pub last_probe_ok: Option<bool>,
    /// Last probe's latency in milliseconds.
    pub last_probe_ms: Option<f64>,
    /// Why the last probe failed.
    pub last_probe_error: Option<String>,
    /// Health transitions.
    pub transitions: u64,
    /// Failed probes.
    pub probe_failures: u64,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// Flows the connection table pins to it (entries neither lapsed nor stale).
    #[serde(default)]
    pub active_flows: u64,
    /// Weight in the table now: 0 while down, drained or in maintenance,
    /// ramping during slow start.
    #[serde(default)]
    pub table_weight: f64,
    /// What sets the table weight now: `config`, `operator`, `agent`,
    /// `load` (its host's `lb agent`), `feedback`, `slow start`, `health`
    /// or `neighbour`.
    #[serde(default)]
    pub weight_set_by: String,
    /// Registered by its host's `lb agent` (see docs/agent.md): `Some(true)`
    /// while that host is leaving; `None` when configured by an operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered: Option<bool>,
    /// Per-second rates from the daemon's counter history.
    #[serde(default)]
    pub rates: Option<Rates>,
}

/// A backend's agent in `lb backend list` and `lb health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRow {
    /// What the tables follow: its state, up or down, and percent of the
    /// configured weight (`ready up 100%` changes nothing).
    pub applied: String,
    /// What it says and is not applied yet (its service's tables change at
    /// most once per agent interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// Its last line.
    pub last_answer: Option<String>,
    /// Why the last question got no usable answer (the applied state stands).
    pub last_error: Option<String>,
    /// Seconds since the last answer or failure.
    pub seconds_ago: Option<u64>,
    /// Changes applied since the daemon started.
    pub changes: u64,
}

/// A backend's load feedback in `lb backend list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedbackRow {
    /// Percent of its weight the tables give it.
    pub percent: u32,
    /// Percent its latency asks for, not applied yet (its service's tables
    /// change at most once per health-check interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u32>,
    /// Smoothed latency of its successful probes, milliseconds.
    pub latency_ms: Option<f64>,
    /// The active flows it was last weighed by (services that weigh by
    /// flows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_flows: Option<u64>,
    /// Changes applied since the daemon started.
    pub changes: u64,
}

/// Per-second rates over the daemon's last few seconds of counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Packets a second.
    pub packets: f64,
    /// Bytes a second.
    pub bytes: f64,
    /// New flows (table lookups) a second; 0 for backends.
    pub new_flows: f64,
    /// Packets dropped a second, once matched to the service; 0 for
    /// backends.
    #[serde(default)]
    pub drops: f64,
}

/// A row of `lb conntrack list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowRow {
    /// Service name.
    pub service: String,
    /// Client address and port.
    pub client: String,
    /// tcp or udp.
    pub protocol: String,
    /// The backend the entry was made for, if it is still one of the
    /// service's (not a backend given its id since).
    pub backend: Option<IpAddr>,
    /// established, closing (a FIN or RST seen), lapsed (idle past its
    /// timeout) or stale (its backend down or gone): only the first two
    /// decide where packets go.
    pub state: String,
    /// Seconds since the flow's last packet (to the data plane's second).
    pub idle_seconds: u32,
}

/// `lb conntrack stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConntrackStatsView {
    /// Entries the table holds at most.
    pub capacity: u32,
    /// Entries it holds.
    pub entries: u64,
    /// Entries pinning an open flow.
    pub established: u64,
    /// Entries pinning a TCP connection that saw a FIN or RST.
    pub closing: u64,
    /// Entries idle past their timeout, waiting to be reused.
    pub lapsed: u64,
    /// Entries whose backend is down or gone.
    pub stale: u64,
    /// Entries of no configured service (removed services).
    pub other: u64,
    /// Entries added since the data plane was loaded, over all CPUs.
    pub inserts: u64,
    /// New flows forwarded without an entry, a CPU's insert budget spent.
    pub refused: u64,
    /// The insert budget: entries each CPU may add per second (0: none).
    pub inserts_per_cpu: u32,
    /// CPUs refusing inserts right now (their budget for this second spent).
    pub refusing_cpus: usize,
    /// Idle timeout of TCP flows, seconds.
    pub tcp_idle_timeout: u32,
    /// Idle timeout of UDP flows, seconds.
    pub udp_idle_timeout: u32,
    /// How long a closed TCP connection's entry stays, seconds.
    pub tcp_closed_timeout: u32,
}

/// Per-service counters in `lb stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStatsRow {
    /// Name.
    pub name: String,
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// New flows (Maglev lookups).
    pub new_flows: u64,
    /// Packets dropped once matched to the service (no backend in rotation,
    /// too big to encapsulate, no way out); the global reasons say why.
    #[serde(default)]
    pub drops: u64,
    /// Of the drops: sources in the deny list.
    #[serde(default)]
    pub denied: u64,
    /// Of the drops: sources outside the allow list.
    #[serde(default)]
    pub not_allowed: u64,
    /// Of the drops: new flows over the service's limit per source.
    #[serde(default)]
    pub limited: u64,
    /// Per-second rates from the daemon's counter history.
    #[serde(default)]
    pub rates: Option<Rates>,
}

/// `lb stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    /// Per service.
    pub services: Vec<ServiceStatsRow>,
    /// Per backend.
    pub backends: Vec<BackendRow>,
    /// Global pass/drop/forward reasons.
    pub reasons: std::collections::BTreeMap<String, u64>,
    /// Their packets a second, from the daemon's counter history (empty
    /// in the daemon's first seconds).
    #[serde(default)]
    pub reason_rates: std::collections::BTreeMap<String, f64>,
    /// The source prefixes limited most, from the data plane's sample.
    #[serde(default)]
    pub limited_sources: Vec<LimitedSourceRow>,
}

/// A source prefix whose new flows a service's limit dropped, in `lb stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitedSourceRow {
    /// The service.
    pub service: String,
    /// The source prefix (`address/length`).
    pub prefix: String,
    /// New flows dropped, as sampled: at least this many since the prefix
    /// took its place in the sample.
    pub drops: u64,
    /// Seconds since its last dropped new flow.
    pub seconds_ago: u32,
}

/// A VIP in `lb node status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRow {
    /// The VIP.
    pub vip: IpAddr,
    /// Services on it.
    pub services: Vec<String>,
    /// Why the node does not announce it, if it does not.
    pub withheld: Option<Withheld>,
    /// It can be announced, but its table is settling: no route is added
    /// yet, and one already there stays (docs/fleet.md, rule 5). Apart
    /// from `withheld`, which older nodes read in the fleet's reports.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub settling: bool,
    /// Its route is in the announce table now.
    pub announced: bool,
}

/// `lb node status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The operator drained the node.
    pub drained: bool,
    /// The kernel routing table of announced VIPs; `None` when the node
    /// announces nothing (no `[announce]`).
    pub announce_table: Option<u32>,
    /// BIRD's control socket.
    pub bird_socket: Option<PathBuf>,
    /// Interfaces, and whether the program is attached to each.
    pub interfaces: Vec<(String, bool)>,
    /// Every VIP.
    pub vips: Vec<VipRow>,
    /// Why the last update of the announce table failed, if it did.
    pub route_error: Option<String>,
    /// Seconds since a new flow last arrived (or since the node was drained
    /// or undrained, if later).
    pub quiet_seconds: f64,
    /// BIRD's BGP sessions (filled in by the CLI, which asks BIRD itself).
    #[serde(default)]
    pub bgp: Vec<Protocol>,
    /// Why BIRD could not be asked, when the node announces.
    #[serde(default)]
    pub bgp_error: Option<String>,
}

/// A node in `lb fleet status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetNodeRow {
    /// Its name.
    pub name: String,
    /// Its status key is alive (its lease holds).
    pub alive: bool,
    /// Seconds since this node last saw its status.
    pub seen_seconds_ago: u64,
    /// It holds the leadership.
    pub leader: bool,
    /// It has not applied the fleet's newest state.
    pub behind: bool,
    /// Services whose table differs from most nodes' at its revision.
    pub disagreeing: Vec<String>,
    /// What it published last.
    pub report: NodeReport,
}

/// `lb fleet status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetStatus {
    /// The node answering.
    pub node: String,
    /// The fleet's key prefix.
    pub prefix: String,
    /// Why etcd cannot be reached now; `None` when it can.
    pub etcd_error: Option<String>,
    /// The newest revision of the fleet's desired state.
    pub revision: i64,
    /// The revision this node applied.
    pub applied: i64,
    /// The leader, if any.
    pub leader: Option<String>,
    /// Every node seen since this daemon started, alive or not.
    pub nodes: Vec<FleetNodeRow>,
    /// Backends registered by their hosts' agents, as the applied state
    /// holds them (refused ones are among the problems).
    #[serde(default)]
    pub registered: Vec<RegistrationRow>,
    /// Data under the prefix refused or ignored, with why.
    pub problems: Vec<String>,
}

/// One registration in `lb fleet status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationRow {
    /// The service it registers for.
    pub service: String,
    /// The backend's address.
    pub address: IpAddr,
    /// The host's name.
    pub host: String,
    /// Its weight.
    pub weight: u32,
    /// The percent of it its host's load leaves it.
    pub percent: u32,
    /// Leaving (its agent drains it).
    pub draining: bool,
}

/// Reads one request from a connection, bounded in size.
pub async fn read_request(stream: &mut UnixStream) -> Result<Request> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST);
    let n = reader.read_line(&mut line).await?;
    if n as u64 >= MAX_REQUEST && !line.ends_with('\n') {
        bail!("request larger than {MAX_REQUEST} bytes");
    }
    serde_json::from_str(line.trim()).context("malformed request")
}

/// Sends `request` to the daemon at `socket` and returns its answer.
pub async fn call(socket: &Path, request: &Request) -> Result<serde_json::Value> {
    let mut s = tokio::time::timeout(TIMEOUT, UnixStream::connect(socket))
        .await
        .context("the daemon did not accept the connection in time")?
        .with_context(|| {
            format!(
                "cannot reach the daemon at {} (is `lb daemon` running? are you root?)",
                socket.display()
            )
        })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // The daemon would close the connection on it unread: a bare "broken
    // pipe" here.
    if line.len() as u64 > MAX_REQUEST {
        bail!(
            "the request is {} bytes, more than the daemon takes ({MAX_REQUEST}): put a configuration this large in the daemon's file and run `lb reload`",
            line.len()
        );
    }
    s.write_all(&line).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut answer))
        .await
        .with_context(|| {
            format!(
                "the daemon did not answer within {TIMEOUT:?}: a change it was asked for may still apply (see `lb service list`, `lb backend list`)"
            )
        })??;
    let response: Response =
        serde_json::from_slice(&answer).context("malformed response from the daemon")?;
    match response.error {
        Some(e) => bail!("{e}"),
        None => Ok(response.data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_ones_are_refused() {
        let r = Request::SetWeight {
            service: "web".into(),
            backend: "198.18.0.11".parse().unwrap(),
            weight: Some(3),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"command":"format-disk"}"#).is_err());
        let bad_address = r#"{"command":"set-weight","service":"web","backend":"x","weight":1}"#;
        assert!(serde_json::from_str::<Request>(bad_address).is_err());
        assert!(serde_json::from_str::<Request>("\u{0}\u{1}garbage").is_err());
    }
}
