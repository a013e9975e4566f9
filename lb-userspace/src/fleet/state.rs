//! The fleet's keys in etcd and their contents (pure): what a node reads,
//! what it writes, and how a read of the prefix becomes a [`Snapshot`].
//!
//! Under the prefix `P`:
//!
//! | key | written by | holds |
//! | --- | --- | --- |
//! | `P/services` | operators (`lb service|backend`, `lb apply`, `lb fleet import`) | the `[[service]]` tables, as a configuration file writes them |
//! | `P/overrides` | operators (`lb backend set-weight|drain|enable|maintenance`) | weights and operator states, JSON |
//! | `P/health` | the leader | the agreed health view and slow-start steps, JSON |
//! | `P/leader` | the leader, under its lease | its node name |
//! | `P/nodes/NAME` | node NAME, under its lease | its status, JSON ([`NodeReport`]) |
//! | `P/registered/SERVICE/ADDRESS` | `lb agent` on the backend, under its lease | the backend's registration, JSON ([`Registration`]) |
//!
//! The services, overrides, health and registrations are the desired
//! state: a node's tables are a function of them (and of its own settings),
//! and the state's revision is the newest `mod_revision` among them.
//! Anything else under the prefix is reported, never applied.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use super::registry::{Registration, Registrations};
use crate::{api::VipRow, bird::Protocol, daemon::runtime::Override};

/// Largest value lb accepts under the prefix; a larger one is refused as
/// bad data (etcd's own default request limit is 1.5 MiB).
pub const MAX_VALUE: usize = 1 << 20;

/// Operator overrides: service → backend → override.
pub type Overrides = BTreeMap<String, BTreeMap<IpAddr, Override>>;

/// The agreed health of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreed {
    /// In the tables (a majority of live nodes does not see it down).
    pub up: bool,
    /// Percent of its weight it has (slow start); 100 when not ramping.
    pub percent: u32,
}

/// Agreed health: service → backend → verdict.
pub type AgreedHealth = BTreeMap<String, BTreeMap<IpAddr, Agreed>>;

/// A node's own probe view: service → backend → up.
pub type HealthView = BTreeMap<String, BTreeMap<IpAddr, bool>>;

/// Backends a node's probes have not given their first verdict on yet
/// (new, rechecked after maintenance, or every backend of a daemon started
/// without a table to adopt): service → addresses.
pub type Awaiting = BTreeMap<String, BTreeSet<IpAddr>>;

/// The desired state as read, before validation against a node's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetState {
    /// The newest `mod_revision` of the desired keys (0: none written).
    pub revision: i64,
    /// `P/services`: `[[service]]` tables.
    pub services: String,
    /// Its `mod_revision` (0: absent), which writes are guarded by.
    pub services_revision: i64,
    /// `P/overrides`.
    pub overrides: Overrides,
    /// Its `mod_revision` (0: absent).
    pub overrides_revision: i64,
    /// `P/health`.
    pub health: AgreedHealth,
    /// `P/registered/...`: backends that registered themselves, as read
    /// (admitted or refused by each node against its services).
    #[serde(default)]
    pub registered: Registrations,
}

/// What a node publishes about itself under `P/nodes/NAME`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Its name.
    pub name: String,
    /// lb's version.
    pub version: String,
    /// The revision of the desired state its tables are built from.
    pub revision: i64,
    /// Table digest per service.
    pub digests: BTreeMap<String, String>,
    /// Its own probes' view, of the backends they have a verdict on.
    pub health: HealthView,
    /// The backends its probes have no verdict on yet. (Versions before
    /// this field report them down in `health`.)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub awaiting: Awaiting,
    /// Its VIPs, announced or why not.
    pub vips: Vec<VipRow>,
    /// Drained by its operator.
    pub drained: bool,
    /// Its BGP sessions, as its BIRD reports them.
    pub bgp: Vec<Protocol>,
    /// Why its BIRD could not be asked, if it announces.
    pub bgp_error: Option<String>,
    /// Flows its connection table still pins to each draining backend,
    /// registered and leaving or drained by the operator (what a leaving
    /// agent and `lb backend drain --wait` wait on): service → address →
    /// flows.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub draining_flows: BTreeMap<String, BTreeMap<IpAddr, u64>>,
    /// The backends its probes see down after seeing them pass (those up
    /// have passed too): every node's panic rule counts and keeps the
    /// backends any live node has seen work. (Versions before this field
    /// count only their own.)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proven_down: BTreeMap<String, BTreeSet<IpAddr>>,
}

impl NodeReport {
    /// The backends this node has seen pass, by service: up in its view,
    /// or down after passing.
    pub fn proven(&self) -> impl Iterator<Item = (&String, IpAddr)> {
        let up = self
            .health
            .iter()
            .flat_map(|(s, m)| m.iter().filter(|(_, up)| **up).map(move |(ip, _)| (s, *ip)));
        let down = self
            .proven_down
            .iter()
            .flat_map(|(s, ips)| ips.iter().map(move |ip| (s, *ip)));
        up.chain(down)
    }
}

/// A write's guard: the `mod_revision` each operator-written key had when
/// read (0: absent). The write fails if either changed since.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Guard {
    /// `P/services`.
    pub services: i64,
    /// `P/overrides`.
    pub overrides: i64,
}

impl Guard {
    /// The guard of a state as read.
    pub fn of(state: &FleetState) -> Guard {
        Guard {
            services: state.services_revision,
            overrides: state.overrides_revision,
        }
    }
}

/// One read of the whole prefix.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// etcd's revision at the read.
    pub revision: i64,
    /// The desired state, or why it is refused.
    pub state: Result<FleetState, String>,
    /// The operator-written keys' revisions as read, valid or not: a write
    /// that replaces refused data is guarded by these.
    pub raw: Guard,
    /// Live nodes' reports, by name.
    pub nodes: BTreeMap<String, NodeReport>,
    /// The leader's name.
    pub leader: Option<String>,
    /// Keys that are refused or not lb's, with why.
    pub problems: Vec<String>,
    /// When the agreed view (`P/health`) is all that refuses the state:
    /// the rest of it, decoded, for the leader to write a fresh view over
    /// the bad one (nodes refuse the state meanwhile, as for any bad key).
    pub health_refused: Option<FleetState>,
}

impl Snapshot {
    /// The revision of its state if a live node other than `me` applied it:
    /// then it is the fleet's state, though `me` may refuse it (its own
    /// settings cannot hold it), not bad data every node refuses.
    pub fn applied_elsewhere(&self, me: &str) -> Option<i64> {
        let revision = self.state.as_ref().ok()?.revision;
        self.nodes
            .values()
            .any(|r| r.name != me && r.revision >= revision)
            .then_some(revision)
    }
}

/// The key names under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `P/services`.
    Services,
    /// `P/overrides`.
    Overrides,
    /// `P/health`.
    Health,
    /// `P/leader`.
    Leader,
    /// `P/nodes/NAME`.
    Node(String),
    /// `P/registered/SERVICE/ADDRESS`.
    Registered(String, IpAddr),
    /// Anything else.
    Unknown,
}

impl Keys {
    /// The keys under `prefix` (no trailing `/`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// Everything lb reads: `P/`.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// `P/services`.
    pub fn services(&self) -> String {
        format!("{}/services", self.prefix)
    }

    /// `P/overrides`.
    pub fn overrides(&self) -> String {
        format!("{}/overrides", self.prefix)
    }

    /// `P/health`.
    pub fn health(&self) -> String {
        format!("{}/health", self.prefix)
    }

    /// `P/leader`.
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// `P/nodes/NAME`.
    pub fn node(&self, name: &str) -> String {
        format!("{}/nodes/{name}", self.prefix)
    }

    /// `P/registered/`: every registration.
    pub fn registrations(&self) -> String {
        format!("{}/registered/", self.prefix)
    }

    /// `P/registered/SERVICE/ADDRESS`.
    pub fn registration(&self, service: &str, address: IpAddr) -> String {
        format!("{}/registered/{service}/{address}", self.prefix)
    }

    /// What `key` is.
    pub fn classify(&self, key: &str) -> Key {
        let Some(rest) = key
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Key::Unknown;
        };
        match rest {
            "services" => Key::Services,
            "overrides" => Key::Overrides,
            "health" => Key::Health,
            "leader" => Key::Leader,
            _ => {
                if let Some(name) = rest.strip_prefix("nodes/") {
                    if crate::config::valid_name(name) {
                        return Key::Node(name.to_string());
                    }
                } else if let Some((service, address)) = rest
                    .strip_prefix("registered/")
                    .and_then(|r| r.split_once('/'))
                    && crate::config::valid_name(service)
                    && let Ok(ip) = address.parse()
                {
                    return Key::Registered(service.to_string(), ip);
                }
                Key::Unknown
            }
        }
    }
}

/// One key-value as etcd returns it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Its `mod_revision`.
    pub mod_revision: i64,
}

/// Why an agreed view lb would never write is refused: a percent of a
/// backend's weight outside 1-100 (the ramp's steps; more would overflow
/// the weights its table is built from, and 0 would take it out unseen).
fn out_of_range(health: &AgreedHealth) -> Option<String> {
    health.iter().find_map(|(service, backends)| {
        backends
            .iter()
            .find(|(_, a)| !(1..=100).contains(&a.percent))
            .map(|(ip, a)| {
                format!(
                    "service {service}, backend {ip}: percent {} is not 1-100",
                    a.percent
                )
            })
    })
}

/// Decodes a read of the prefix. A desired key that is not what lb writes
/// (not UTF-8, not the JSON it should be, too large) refuses the whole
/// desired state: the node keeps the last good one. A node report that does
/// not decode is left out, and a key lb does not know is ignored; both are
/// reported.
pub fn decode(keys: &Keys, revision: i64, entries: &[Entry]) -> Snapshot {
    let mut state = FleetState::default();
    let mut refused = Vec::new();
    let mut snapshot = Snapshot {
        revision,
        state: Ok(FleetState::default()),
        raw: Guard::default(),
        nodes: BTreeMap::new(),
        leader: None,
        problems: Vec::new(),
        health_refused: None,
    };
    // Refusals of the agreed view, kept apart: the leader repairs those.
    let mut health_refusals = Vec::new();
    for e in entries {
        let kind = keys.classify(&e.key);
        // Valid or not, a write over these keys is guarded by what is there.
        match kind {
            Key::Services => snapshot.raw.services = e.mod_revision,
            Key::Overrides => snapshot.raw.overrides = e.mod_revision,
            _ => {}
        }
        if e.value.len() > MAX_VALUE {
            let why = format!(
                "{}: {} bytes, over the {MAX_VALUE}-byte limit",
                e.key,
                e.value.len()
            );
            match kind {
                Key::Services | Key::Overrides => refused.push(why),
                Key::Health => health_refusals.push(why),
                _ => snapshot.problems.push(why),
            }
            continue;
        }
        let text = std::str::from_utf8(&e.value);
        match kind {
            Key::Services => match text {
                Ok(t) => {
                    state.services = t.to_string();
                    state.services_revision = e.mod_revision;
                    state.revision = state.revision.max(e.mod_revision);
                }
                Err(_) => refused.push(format!("{}: not UTF-8 text", e.key)),
            },
            Key::Overrides => match serde_json::from_slice(&e.value) {
                Ok(o) => {
                    state.overrides = o;
                    state.overrides_revision = e.mod_revision;
                    state.revision = state.revision.max(e.mod_revision);
                }
                Err(err) => refused.push(format!("{}: {err}", e.key)),
            },
            Key::Health => match serde_json::from_slice(&e.value) {
                Ok(h) => match out_of_range(&h) {
                    None => {
                        state.health = h;
                        state.revision = state.revision.max(e.mod_revision);
                    }
                    Some(why) => health_refusals.push(format!("{}: {why}", e.key)),
                },
                Err(err) => health_refusals.push(format!("{}: {err}", e.key)),
            },
            Key::Leader => match text {
                Ok(name) => snapshot.leader = Some(name.to_string()),
                Err(_) => snapshot.problems.push(format!("{}: not UTF-8 text", e.key)),
            },
            Key::Node(name) => match serde_json::from_slice::<NodeReport>(&e.value) {
                Ok(r) if r.name == name => {
                    snapshot.nodes.insert(name, r);
                }
                Ok(r) => snapshot
                    .problems
                    .push(format!("{}: names node {:?}", e.key, r.name)),
                Err(err) => snapshot.problems.push(format!("{}: {err}", e.key)),
            },
            Key::Registered(service, ip) => {
                match serde_json::from_slice::<Registration>(&e.value) {
                    Ok(r) if r.address == ip => {
                        state.registered.entry(service).or_default().insert(ip, r);
                        state.revision = state.revision.max(e.mod_revision);
                    }
                    Ok(r) => snapshot.problems.push(format!(
                        "{}: registration refused: names {}",
                        e.key, r.address
                    )),
                    Err(err) => snapshot
                        .problems
                        .push(format!("{}: registration refused: {err}", e.key)),
                }
            }
            Key::Unknown => snapshot
                .problems
                .push(format!("{}: not a key lb writes; ignored", e.key)),
        }
    }
    snapshot.state = if refused.is_empty() && health_refusals.is_empty() {
        Ok(state)
    } else {
        if refused.is_empty() {
            snapshot.health_refused = Some(state);
        }
        refused.extend(health_refusals);
        Err(refused.join("; "))
    };
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str, rev: i64) -> Entry {
        Entry {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: rev,
        }
    }

    #[test]
    fn a_state_is_the_fleets_once_another_node_applied_it() {
        let report = |name: &str, revision| NodeReport {
            name: name.into(),
            revision,
            ..NodeReport::default()
        };
        let state = FleetState {
            revision: 100,
            ..FleetState::default()
        };
        let mut snapshot = Snapshot {
            revision: 120,
            state: Ok(state),
            raw: Guard::default(),
            nodes: [("lb3".into(), report("lb3", 90))].into(),
            leader: None,
            problems: Vec::new(),
            health_refused: None,
        };
        // Only this node, behind: nobody applied it yet.
        assert_eq!(snapshot.applied_elsewhere("lb3"), None);
        // Another node behind too.
        snapshot.nodes.insert("lb2".into(), report("lb2", 90));
        assert_eq!(snapshot.applied_elsewhere("lb3"), None);
        // Another node at it.
        snapshot.nodes.insert("lb1".into(), report("lb1", 100));
        assert_eq!(snapshot.applied_elsewhere("lb3"), Some(100));
        // Bad data: no state anybody applied.
        snapshot.state = Err("invalid".into());
        assert_eq!(snapshot.applied_elsewhere("lb3"), None);
    }

    #[test]
    fn keys_are_classified() {
        let k = Keys::new("/lb");
        assert_eq!(k.classify("/lb/services"), Key::Services);
        assert_eq!(k.classify("/lb/nodes/lb1"), Key::Node("lb1".into()));
        assert_eq!(k.classify("/lb/nodes/a/b"), Key::Unknown);
        assert_eq!(k.classify("/lbx/services"), Key::Unknown);
        assert_eq!(k.classify("/lb/whatever"), Key::Unknown);
        assert_eq!(
            k.classify("/lb/registered/web/2001:2::11"),
            Key::Registered("web".into(), "2001:2::11".parse().unwrap())
        );
        assert_eq!(
            k.classify(&k.registration("web", "198.18.0.11".parse().unwrap())),
            Key::Registered("web".into(), "198.18.0.11".parse().unwrap())
        );
        assert_eq!(k.classify("/lb/registered/web/nope"), Key::Unknown);
        assert_eq!(k.classify("/lb/registered/web"), Key::Unknown);
    }

    #[test]
    fn a_read_decodes_into_the_state_and_the_nodes() {
        let k = Keys::new("/lb");
        let report = serde_json::to_string(&NodeReport {
            name: "lb1".into(),
            revision: 7,
            ..NodeReport::default()
        })
        .unwrap();
        let s = decode(
            &k,
            9,
            &[
                entry("/lb/services", "[[service]]\n", 5),
                entry(
                    "/lb/overrides",
                    r#"{"web":{"198.18.0.11":{"admin":"drain"}}}"#,
                    7,
                ),
                entry("/lb/health", "{}", 6),
                entry("/lb/leader", "lb1", 8),
                entry("/lb/nodes/lb1", &report, 9),
                entry("/lb/nodes/lb2", "{not json", 9),
                entry("/lb/stray", "x", 3),
                entry(
                    "/lb/registered/web/198.18.0.12",
                    r#"{"address":"198.18.0.12","weight":2,"host":"b","version":"1"}"#,
                    8,
                ),
                entry(
                    "/lb/registered/web/198.18.0.13",
                    r#"{"address":"198.18.0.14","weight":2,"host":"b","version":"1"}"#,
                    8,
                ),
                entry("/lb/registered/web/198.18.0.15", "{", 8),
            ],
        );
        let state = s.state.unwrap();
        assert_eq!(state.revision, 8);
        assert_eq!(state.registered["web"].len(), 1);
        assert_eq!(s.problems.len(), 4, "{:?}", s.problems);
        assert_eq!((state.services_revision, state.overrides_revision), (5, 7));
        assert_eq!(s.leader.as_deref(), Some("lb1"));
        assert_eq!(s.nodes.keys().collect::<Vec<_>>(), ["lb1"]);
    }

    #[test]
    fn bad_desired_data_refuses_the_whole_state() {
        let k = Keys::new("/lb");
        let big = "x".repeat(MAX_VALUE + 1);
        for bad in [
            entry("/lb/overrides", r#"{"web":{"not-an-ip":{}}}"#, 2),
            entry(
                "/lb/health",
                r#"{"web":{"198.18.0.11":{"up":true,"percent":100,"x":1}}}"#,
                2,
            ),
            entry(
                "/lb/health",
                r#"{"web":{"198.18.0.11":{"up":true,"percent":100000}}}"#,
                2,
            ),
            entry(
                "/lb/health",
                r#"{"web":{"198.18.0.11":{"up":true,"percent":0}}}"#,
                2,
            ),
            entry("/lb/services", &big, 2),
        ] {
            let s = decode(&k, 3, &[entry("/lb/services", "", 1), bad.clone()]);
            assert!(s.state.is_err(), "{} accepted", bad.key);
            // The rest of the state, for the leader's repair, only when the
            // agreed view is all that is bad.
            assert_eq!(
                s.health_refused.is_some(),
                bad.key == "/lb/health",
                "{}",
                bad.key
            );
        }
        // A bad agreed view beside other bad data: nothing to repair it with.
        let s = decode(
            &k,
            3,
            &[
                entry("/lb/services", "", 1),
                entry("/lb/overrides", "{", 2),
                entry("/lb/health", "{", 2),
            ],
        );
        assert!(s.state.is_err() && s.health_refused.is_none());
    }

    #[test]
    fn a_report_names_the_backends_its_node_has_seen_work() {
        let ip = |last: u8| IpAddr::from([198, 18, 0, last]);
        let report: NodeReport = serde_json::from_str(
            r#"{"name":"lb1","version":"0","revision":1,"digests":{},
                "health":{"web":{"198.18.0.11":true,"198.18.0.12":false}},
                "vips":[],"drained":false,"bgp":[],"bgp_error":null,
                "proven_down":{"web":["198.18.0.13"]}}"#,
        )
        .unwrap();
        let proven: Vec<(&String, IpAddr)> = report.proven().collect();
        let web = "web".to_string();
        assert_eq!(proven, [(&web, ip(11)), (&web, ip(13))]);
        // An earlier version's report, without the field, still reads.
        let old = r#"{"name":"lb1","version":"0","revision":1,"digests":{},"health":{},
                "vips":[],"drained":false,"bgp":[],"bgp_error":null}"#;
        assert!(
            serde_json::from_str::<NodeReport>(old)
                .unwrap()
                .proven_down
                .is_empty()
        );
    }
}
