//! Prometheus metrics: a registry built at each scrape from the controller's
//! state and the data plane's counters (`lb_` prefix, base units, `_total`
//! on counters, no per-client labels), rendered in OpenMetrics; `http`
//! serves them as such to scrapers that ask for it and in Prometheus' text
//! format 0.0.4 (see [`text_format`]) to the rest.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::atomic::{AtomicI64, AtomicU64},
    time::Duration,
};

use anyhow::Result;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Metric, Registry},
};

use super::{controller::Controller, runtime::Admin};
use crate::api::NodeStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceDropLabels {
    service: String,
    /// `denied` (in the deny list), `not_allowed` (outside the allow
    /// list) or `limited` (over the new-flow limit).
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitedSourceLabels {
    service: String,
    /// The source prefix, `address/length`.
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WeightChangeLabels {
    service: String,
    backend: String,
    /// What changed the weight (`agent`, `feedback`).
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
}

/// A fleet node's figures for the metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FleetGauges {
    /// The revision of the fleet state its tables are built from.
    pub applied_revision: i64,
    /// etcd answers.
    pub etcd_reachable: bool,
    /// Registrations in the applied state this node refused.
    pub registrations_refused: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    service: String,
    digest: String,
}

/// Upper bounds of the probe-duration buckets, seconds: from a probe on the
/// same segment (well under a millisecond) to a timed-out one (the timeout,
/// a second or two by default).
const PROBE_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Every probe's duration, per backend: unlike the rest, a histogram
/// accumulates between scrapes, so it lives as long as the daemon.
pub(crate) struct ProbeDurations {
    family: Family<BackendLabels, Histogram, fn() -> Histogram>,
    seen: HashSet<BackendLabels>,
}

impl Default for ProbeDurations {
    fn default() -> Self {
        ProbeDurations {
            family: Family::new_with_constructor(|| Histogram::new(PROBE_BUCKETS)),
            seen: HashSet::new(),
        }
    }
}

impl ProbeDurations {
    /// Counts one probe of `backend` that took `took` (failed ones too: a
    /// timeout counts its timeout).
    pub(crate) fn observe(&mut self, service: &str, backend: IpAddr, took: Duration) {
        let labels = BackendLabels {
            service: service.to_string(),
            backend: backend.to_string(),
        };
        self.family
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.seen.insert(labels);
    }

    /// Forgets backends that are no longer configured, so their series end.
    pub(crate) fn retain(&mut self, ctl: &Controller) {
        let family = &self.family;
        self.seen.retain(|l| {
            let live = ctl
                .services()
                .get(&l.service)
                .zip(l.backend.parse::<IpAddr>().ok())
                .is_some_and(|(s, ip)| s.backends.contains_key(&ip));
            if !live {
                family.remove(l);
            }
            live
        });
    }
}

/// Registers `metric` and returns a handle to fill it.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Registers a gauge without labels, set to `value`.
fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    register(registry, name, help, Gauge::<i64, AtomicI64>::default()).set(value);
}

type Counters<L> = Family<L, Counter>;
type Gauges<L> = Family<L, Gauge>;

/// The metrics in Prometheus text format.
pub(crate) fn render(
    ctl: &Controller,
    node: &NodeStatus,
    fleet: Option<FleetGauges>,
    registration: Option<super::registrations::Gauges>,
    durations: &mut ProbeDurations,
    flows: &super::flows::Summary,
) -> Result<String> {
    let mut r = Registry::with_prefix("lb");
    r.register(
        "build",
        "The running lb's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    durations.retain(ctl);
    r.register(
        "backend_probe_duration_seconds",
        "How long health probes took, failed ones included (a timeout counts its timeout)",
        durations.family.clone(),
    );
    let announced = register(
        &mut r,
        "vip_announced",
        "1 while the VIP's route is in the announce table (BGP through BIRD)",
        Gauges::<VipLabels>::default(),
    );
    for v in &node.vips {
        announced
            .get_or_create(&VipLabels {
                vip: v.vip.to_string(),
            })
            .set(i64::from(v.announced));
    }
    gauge(
        &mut r,
        "node_drained",
        "1 while the operator has drained the node",
        i64::from(node.drained),
    );
    if let Some(f) = fleet {
        gauge(
            &mut r,
            "fleet_applied_revision",
            "Revision of the fleet's state the tables are built from",
            f.applied_revision,
        );
        gauge(
            &mut r,
            "fleet_etcd_reachable",
            "1 while etcd answers",
            i64::from(f.etcd_reachable),
        );
        gauge(
            &mut r,
            "fleet_registrations_refused",
            "Registrations of backends (lb agent) in the fleet's state that this node refuses; lb fleet status says why",
            f.registrations_refused as i64,
        );
    }
    if let Some(g) = registration {
        gauge(
            &mut r,
            "registrations",
            "Backends registered through this daemon's registration port",
            g.held as i64,
        );
        let refused = register(
            &mut r,
            "registration_requests_refused",
            "Registration requests and registrations refused, by reason (malformed, signature, payload, stale, busy, sender, admission)",
            Counters::<ReasonLabels>::default(),
        );
        for (reason, n) in g.refused {
            refused
                .get_or_create(&ReasonLabels {
                    reason: reason.to_string(),
                })
                .inc_by(n);
        }
    }
    let svc_packets = register(
        &mut r,
        "service_packets",
        "Packets forwarded for a service",
        Counters::<ServiceLabels>::default(),
    );
    let svc_bytes = register(
        &mut r,
        "service_bytes",
        "Bytes forwarded for a service, as received",
        Counters::<ServiceLabels>::default(),
    );
    let svc_flows = register(
        &mut r,
        "service_new_flows",
        "Flows that took a Maglev lookup",
        Counters::<ServiceLabels>::default(),
    );
    let svc_drops = register(
        &mut r,
        "service_drops",
        "Packets dropped once matched to a service (lb_packets_total's drop reasons say why)",
        Counters::<ServiceLabels>::default(),
    );
    let source_drops = register(
        &mut r,
        "service_source_drops",
        "Packets a service's source lists and new-flow limit dropped, by reason \
         (denied, not_allowed, limited)",
        Counters::<SourceDropLabels>::default(),
    );
    let limited_sources = register(
        &mut r,
        "limited_source_drops",
        "New flows dropped by a service's limit, for the source prefixes limited most \
         (sampled: at least this many)",
        Gauges::<LimitedSourceLabels>::default(),
    );
    for row in super::views::limited_sources(ctl, super::views::TOP_LIMITED_SOURCES)? {
        limited_sources
            .get_or_create(&LimitedSourceLabels {
                service: row.service,
                source: row.prefix,
            })
            .set(i64::try_from(row.drops).unwrap_or(i64::MAX));
    }
    let rebuilds = register(
        &mut r,
        "table_rebuilds",
        "Maglev tables published by this daemon",
        Counters::<ServiceLabels>::default(),
    );
    let table = register(
        &mut r,
        "table_info",
        "The live table's digest (equal on nodes with equal tables)",
        Gauges::<TableLabels>::default(),
    );
    let panic = register(
        &mut r,
        "service_panic",
        "1 while the service ignores its probes (under half healthy)",
        Gauges::<ServiceLabels>::default(),
    );
    let b_packets = register(
        &mut r,
        "backend_packets",
        "Packets forwarded to a backend",
        Counters::<BackendLabels>::default(),
    );
    let b_bytes = register(
        &mut r,
        "backend_bytes",
        "Bytes forwarded to a backend, as received",
        Counters::<BackendLabels>::default(),
    );
    let b_up = register(
        &mut r,
        "backend_up",
        "1 when the probes say the backend is up",
        Gauges::<BackendLabels>::default(),
    );
    let b_weight = register(
        &mut r,
        "backend_weight",
        "Weight in the table now (0: out of rotation)",
        Gauges::<BackendLabels>::default(),
    );
    let b_effective = register(
        &mut r,
        "backend_effective_weight",
        "Weight in the table now, slow start and agent included (0: out of rotation)",
        Family::<BackendLabels, Gauge<f64, AtomicU64>>::default(),
    );
    let weight_changes = register(
        &mut r,
        "weight_changes",
        "Weight and state changes applied from a backend's agent or load feedback",
        Counters::<WeightChangeLabels>::default(),
    );
    let b_fail = register(
        &mut r,
        "backend_probe_failures",
        "Failed health probes since the daemon started",
        Counters::<BackendLabels>::default(),
    );
    let b_trans = register(
        &mut r,
        "backend_transitions",
        "Health state changes since the daemon started",
        Counters::<BackendLabels>::default(),
    );
    let b_latency = register(
        &mut r,
        "backend_probe_latency_seconds",
        "Latency of the last probe",
        Family::<BackendLabels, Gauge<f64, AtomicU64>>::default(),
    );
    let b_flows = register(
        &mut r,
        "backend_active_flows",
        "Flows the connection table pins to the backend (neither lapsed nor stale)",
        Gauges::<BackendLabels>::default(),
    );
    let reasons = register(
        &mut r,
        "packets",
        "Packets seen by the data plane, by outcome",
        Counters::<ReasonLabels>::default(),
    );
    let ct = &flows.stats;
    gauge(
        &mut r,
        "conntrack_entries",
        "Entries in the connection table",
        ct.entries as i64,
    );
    gauge(
        &mut r,
        "conntrack_capacity",
        "Entries the connection table holds at most",
        i64::from(ct.capacity),
    );
    gauge(
        &mut r,
        "conntrack_refusing_cpus",
        "CPUs whose connection-table insert budget for this second is spent",
        ct.refusing_cpus as i64,
    );
    register(
        &mut r,
        "conntrack_inserts",
        "Connection-table entries added",
        Counter::<u64>::default(),
    )
    .inc_by(ct.inserts);
    register(
        &mut r,
        "conntrack_refused",
        "New flows forwarded without an entry, their CPU's insert budget spent",
        Counter::<u64>::default(),
    )
    .inc_by(ct.refused);
    register(
        &mut r,
        "next_hops_lost",
        "Times a backend's next hop stopped resolving (no route, its neighbour entry failed), taking it out of the tables until it resolves again",
        Counter::<u64>::default(),
    )
    .inc_by(ctl.next_hops_lost());
    let active = &flows.active;

    for (name, s) in ctl.services() {
        let l = ServiceLabels {
            service: name.clone(),
        };
        let st = ctl.service_stats(s)?;
        svc_packets.get_or_create(&l).inc_by(st.packets);
        svc_bytes.get_or_create(&l).inc_by(st.bytes);
        svc_flows.get_or_create(&l).inc_by(st.new_flows);
        svc_drops.get_or_create(&l).inc_by(st.drops);
        let lists = ctl.dataplane().source_drops(s.id)?;
        for (reason, n) in [
            ("denied", lists.denied),
            ("not_allowed", lists.not_allowed),
            ("limited", lists.limited),
        ] {
            source_drops
                .get_or_create(&SourceDropLabels {
                    service: name.clone(),
                    reason: reason.into(),
                })
                .inc_by(n);
        }
        rebuilds.get_or_create(&l).inc_by(s.rebuilds);
        panic.get_or_create(&l).set(i64::from(s.panic));
        table
            .get_or_create(&TableLabels {
                service: name.clone(),
                digest: super::controller::digest_text(s.digest),
            })
            .set(1);
        for (ip, b) in &s.backends {
            let l = BackendLabels {
                service: name.clone(),
                backend: ip.to_string(),
            };
            let st = ctl.dataplane().backend_stats(b.id)?;
            b_packets.get_or_create(&l).inc_by(st.packets());
            b_bytes.get_or_create(&l).inc_by(st.bytes);
            // In maintenance probes stop, and the last verdict says
            // nothing: down, as the status page and `lb health` show it.
            let up = ctl.is_up(name, *ip) && ctl.override_of(name, *ip).admin != Admin::Maintenance;
            b_up.get_or_create(&l).set(i64::from(up));
            b_weight
                .get_or_create(&l)
                .set(i64::from(ctl.table_weight(name, *ip, b)));
            b_effective
                .get_or_create(&l)
                .set(ctl.effective_weight(name, *ip, b).0);
            let causes = [
                ("agent", s.config.agent.is_some(), b.agent.view.changes),
                (
                    "feedback",
                    s.config.feedback.is_some(),
                    b.feedback.percent.changes,
                ),
            ];
            for (cause, configured, changes) in causes {
                if configured {
                    weight_changes
                        .get_or_create(&WeightChangeLabels {
                            service: name.clone(),
                            backend: ip.to_string(),
                            cause: cause.into(),
                        })
                        .inc_by(changes);
                }
            }
            b_fail
                .get_or_create(&l)
                .inc_by(b.probe_failures - b.restored.probe_failures);
            b_trans
                .get_or_create(&l)
                .inc_by(b.transitions - b.restored.transitions);
            b_flows.get_or_create(&l).set(active.of(b) as i64);
            if let Some((p, _)) = &b.last_probe {
                b_latency.get_or_create(&l).set(p.latency.as_secs_f64());
            }
        }
    }
    for (c, v) in ctl.dataplane().counters()? {
        reasons
            .get_or_create(&ReasonLabels {
                reason: c.name().to_string(),
            })
            .inc_by(v);
    }
    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

/// OpenMetrics text as Prometheus' text format 0.0.4: a counter family is
/// named by its samples' `_total` name, an info family becomes a gauge
/// named by its `_info` samples, and the `# UNIT` and `# EOF` lines, which
/// 0.0.4 lacks, go.
pub(super) fn text_format(openmetrics: &str) -> String {
    let renamed: HashMap<&str, (String, &str)> = openmetrics
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("# TYPE ")?.split(' ');
            let (name, kind) = (words.next()?, words.next()?);
            match kind {
                "counter" => Some((name, (format!("{name}_total"), "counter"))),
                "info" => Some((name, (format!("{name}_info"), "gauge"))),
                _ => None,
            }
        })
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                match renamed.get(name) {
                    Some((new, kind)) if prefix == "# TYPE " => {
                        out += &format!("{prefix}{new} {kind}");
                    }
                    Some((new, _)) => out += &format!("{prefix}{new} {tail}"),
                    None => out += line,
                }
            }
            None => out += line,
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::info::Info;

    #[test]
    fn the_text_format_types_every_family_by_its_samples_names() {
        let mut r = Registry::default();
        register(
            &mut r,
            "packets",
            "Packets, by reason",
            Counters::<ReasonLabels>::default(),
        )
        .get_or_create(&ReasonLabels {
            reason: "forward_dsr".into(),
        })
        .inc_by(7);
        gauge(&mut r, "services", "Services.", 2);
        r.register("build", "The build.", Info::new(vec![("version", "1.0")]));
        let mut durations = ProbeDurations::default();
        durations.observe(
            "web",
            "198.18.0.11".parse().unwrap(),
            Duration::from_millis(3),
        );
        r.register("probe_seconds", "Probes.", durations.family.clone());
        let mut open = String::new();
        encode(&mut open, &r).unwrap();
        assert!(open.contains("# TYPE packets counter\n"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");

        // An OpenMetrics scrape reads the same samples.
        let samples = prometheus_parse::Scrape::parse(open.lines().map(|l| Ok(l.to_string())))
            .unwrap()
            .samples;
        let packets = samples.iter().find(|s| s.metric == "packets_total");
        assert!(
            packets.is_some_and(|s| s.labels.get("reason") == Some("forward_dsr")),
            "{open}"
        );

        let text = text_format(&open);
        let parsed =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let kind = |name: &str| {
            parsed
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| s.value.clone())
        };
        assert!(
            matches!(
                kind("packets_total"),
                Some(prometheus_parse::Value::Counter(7.0))
            ),
            "{text}"
        );
        assert!(matches!(
            kind("services"),
            Some(prometheus_parse::Value::Gauge(2.0))
        ));
        assert!(matches!(
            kind("build_info"),
            Some(prometheus_parse::Value::Gauge(1.0))
        ));
        assert_eq!(parsed.docs["packets_total"], "Packets, by reason.");
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(text.contains("# TYPE packets_total counter\n"), "{text}");
        assert!(text.contains("# TYPE build_info gauge\n"), "{text}");
        let histogram = parsed
            .samples
            .iter()
            .find(|s| s.metric == "probe_seconds")
            .map(|s| s.value.clone());
        let Some(prometheus_parse::Value::Histogram(buckets)) = histogram else {
            panic!("no histogram in {text}");
        };
        let count = |le: f64| buckets.iter().find(|b| b.less_than == le).map(|b| b.count);
        assert_eq!(
            (count(0.0025), count(0.005)),
            (Some(0.0), Some(1.0)),
            "{text}"
        );
    }
}
