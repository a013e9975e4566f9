//! Prometheus metrics: a registry built at each scrape from the controller's
//! state and the data plane's counters (`lb_` prefix, base units, `_total`
//! on counters, no per-client labels), served on `settings.metrics`.

use std::sync::atomic::{AtomicI64, AtomicU64};

use anyhow::Result;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Metric, Registry},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

use super::controller::Controller;
use crate::api::NodeStatus;

/// Largest request head read from a scraper.
const MAX_HEAD: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    service: String,
    digest: String,
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
) -> Result<String> {
    let mut r = Registry::with_prefix("lb");
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
    let b_fail = register(
        &mut r,
        "backend_probe_failures",
        "Failed health probes",
        Counters::<BackendLabels>::default(),
    );
    let b_trans = register(
        &mut r,
        "backend_transitions",
        "Health state changes",
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
    let flows = super::flows::Table::read(ctl)?;
    let ct = super::flows::stats(ctl, &flows)?;
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
    let active = flows.active_by_backend();

    for (name, s) in ctl.services() {
        let l = ServiceLabels {
            service: name.clone(),
        };
        let st = ctl.dataplane().service_stats(s.id)?;
        svc_packets.get_or_create(&l).inc_by(st.packets);
        svc_bytes.get_or_create(&l).inc_by(st.bytes);
        svc_flows.get_or_create(&l).inc_by(st.new_flows);
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
            b_packets.get_or_create(&l).inc_by(st.packets);
            b_bytes.get_or_create(&l).inc_by(st.bytes);
            b_up.get_or_create(&l).set(i64::from(ctl.is_up(name, *ip)));
            b_weight
                .get_or_create(&l)
                .set(i64::from(ctl.table_weight(name, *ip, b)));
            b_fail.get_or_create(&l).inc_by(b.probe_failures);
            b_trans.get_or_create(&l).inc_by(b.transitions);
            b_flows
                .get_or_create(&l)
                .set(active.get(&b.id).copied().unwrap_or(0) as i64);
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

/// A scrape waiting for the controller's answer.
pub type Scrape = oneshot::Sender<String>;

/// Serves `GET /metrics`, asking the daemon's loop through `scrapes`.
pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(answer(stream, scrapes.clone()));
    }
}

async fn answer(mut stream: TcpStream, scrapes: mpsc::Sender<Scrape>) {
    let mut head = vec![0u8; MAX_HEAD];
    let Ok(Ok(n)) = tokio::time::timeout(crate::api::TIMEOUT, stream.read(&mut head)).await else {
        return;
    };
    let wants_metrics = head[..n].starts_with(b"GET /metrics ");
    let (status, body) = if wants_metrics {
        let (tx, rx) = oneshot::channel();
        if scrapes.send(tx).await.is_err() {
            return;
        }
        match rx.await {
            Ok(text) => ("200 OK", text),
            Err(_) => ("503 Service Unavailable", String::new()),
        }
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}
