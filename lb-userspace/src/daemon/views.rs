//! Answers to the control API, from the controller's state and the data
//! plane's counters.

use std::{collections::BTreeMap, time::SystemTime};

use anyhow::{Context as _, Result, bail};
use lb_common::{
    BACKEND_F_UP, FlowKey, addr_bytes,
    hash::{flow_hash, maglev_slot},
    limits::NO_BACKEND,
};
use serde_json::{Value, json};

use super::{
    ConfigFile,
    controller::{AgentState, Controller, ServiceState},
    flows::{self, ActiveFlows, FlowState, SummaryCache},
    history::{History, Key},
    node::Node,
    runtime::Admin,
};
use crate::{
    api::{
        AgentRow, BackendRow, FeedbackRow, LimitedSourceRow, Request, ServiceRow, ServiceStatsRow,
        SourceRow, Stats,
    },
    config::{self, Mode},
    dataplane::monotonic_seconds,
};

/// Answers one request.
pub(super) fn handle(
    ctl: &mut Controller,
    node: &mut Node,
    file: &mut ConfigFile,
    request: Request,
    startup: &super::Startup,
    history: &History,
    summary: &mut SummaryCache,
) -> Result<Value> {
    Ok(match request {
        Request::Status => {
            let d = ctl.desired();
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_seconds": startup.answering.elapsed().as_secs(),
                "startup": startup.to_json(),
                "config": startup.options.config,
                "pin_dir": startup.options.pin_dir,
                "interfaces": d.settings.interfaces,
                "xdp_mode": d.settings.xdp_mode,
                "table_size": d.settings.table_size.map_or_else(|| json!("per service, from its backends"), |size| json!(size)),
                "services": ctl.services().len(),
                "fleet": d.settings.fleet.as_ref().map_or("standalone".to_string(), |f| format!("node {} at {}", f.node, f.endpoints.join(","))),
                "backends": ctl.services().values().map(|s| s.backends.len()).sum::<usize>(),
            })
        }
        Request::Services => serde_json::to_value(services(ctl))?,
        Request::Backends { service } => {
            if let Some(s) = &service
                && !ctl.services().contains_key(s)
            {
                bail!("no service named {s:?} (see `lb service list`)");
            }
            let active = &summary.get(ctl)?.active;
            serde_json::to_value(backends(ctl, service.as_deref(), history, active)?)?
        }
        Request::SourceLists { service } => {
            if let Some(s) = &service
                && !ctl.services().contains_key(s)
            {
                bail!("no service named {s:?} (see `lb service list`)");
            }
            serde_json::to_value(source_lists(ctl, service.as_deref()))?
        }
        Request::Health => {
            serde_json::to_value(backends(ctl, None, history, &summary.get(ctl)?.active)?)?
        }
        Request::Stats => serde_json::to_value(stats(ctl, history, &summary.get(ctl)?.active)?)?,
        Request::SetWeight {
            service,
            backend,
            weight,
        } => {
            config::check_weight(weight)?;
            let moved = ctl.set_override(&service, backend, |o| o.weight = weight)?;
            json!({ "slots_moved": moved })
        }
        Request::SetAdmin {
            service,
            backend,
            admin,
        } => {
            let moved = ctl.set_override(&service, backend, |o| o.admin = admin)?;
            json!({ "slots_moved": moved })
        }
        Request::Apply { config, dry_run } => change(ctl, file, config, dry_run)?,
        Request::Edit { edit, dry_run } => {
            let text = edit.apply_to(file.text())?;
            change(ctl, file, text, dry_run)?
        }
        Request::Explain {
            service,
            client,
            port,
        } => explain(ctl, &service, client, port)?,
        Request::Node => serde_json::to_value(node.status(ctl))?,
        // The loop answers it: a fleet node's reload needs its fleet link.
        Request::Reload => bail!("internal: reload reached the views"),
        Request::FleetStatus | Request::FleetImport { .. } | Request::FleetExport => bail!(
            "this node is standalone: a [fleet] section in its configuration makes it a fleet node (docs/fleet.md)"
        ),
        Request::Conntrack { service, backend } => {
            serde_json::to_value(flows::list(ctl, service.as_deref(), backend)?)?
        }
        Request::ConntrackFlush { service } => {
            let removed = flows::flush(ctl, service.as_deref())?;
            json!({ "removed": removed })
        }
        Request::ConntrackStats => serde_json::to_value(&summary.get(ctl)?.stats)?,
        Request::SetNodeDrained { drained } => {
            node.set_drained(ctl, drained)?;
            serde_json::to_value(node.status(ctl))?
        }
    })
}

/// Makes `text` the running configuration (and the file's content), or with
/// `dry_run` only reports what that would change.
fn change(
    ctl: &mut Controller,
    file: &mut ConfigFile,
    text: String,
    dry_run: bool,
) -> Result<Value> {
    let desired = config::parse(&text)
        .map_err(|e| anyhow::anyhow!("the configuration is invalid, nothing changed:\n{e}"))?;
    let report = if dry_run {
        super::apply(ctl, desired, true)?
    } else {
        file.replace(text, || super::apply(ctl, desired, false))?
    };
    Ok(serde_json::to_value(report)?)
}

/// `lb service list`.
pub(super) fn services(ctl: &Controller) -> Vec<ServiceRow> {
    ctl.services()
        .values()
        .map(|s| ServiceRow {
            name: s.config.name.clone(),
            service: format!(
                "{}:{}/{}",
                fmt_ip(s.config.vip),
                s.config.port,
                s.config.protocol
            ),
            mode: match s.config.mode {
                Mode::DsrL2 => "dsr-l2".into(),
                Mode::Ipip => "ipip".into(),
                Mode::Gue => "gue".into(),
            },
            affinity: format!("{:?}", s.config.affinity).to_lowercase(),
            backends: s.backends.len(),
            in_table: s.in_table,
            table_size: s.ring.len(),
            digest: super::controller::digest_text(s.digest),
            rebuilds: s.rebuilds,
            panic: s.panic,
        })
        .collect()
}

fn fmt_ip(ip: std::net::IpAddr) -> String {
    if ip.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// `lb backend list`, of one service or all, with each backend's `active`
/// flows by id.
pub(super) fn backends(
    ctl: &Controller,
    only: Option<&str>,
    history: &History,
    active: &ActiveFlows,
) -> Result<Vec<BackendRow>> {
    let now = SystemTime::now();
    let mut rows = Vec::new();
    for (name, s) in ctl.services() {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        // One pass over the table, not one per backend: a table is at
        // least a hundred slots a backend.
        let mut slots = BTreeMap::<u32, usize>::new();
        for &id in s.ring.iter() {
            *slots.entry(id).or_default() += 1;
        }
        for (ip, b) in &s.backends {
            let o = ctl.override_of(name, *ip);
            let stats = ctl.dataplane().backend_stats(b.id)?;
            let kernel = ctl.dataplane().backend(b.id)?;
            let (probe, _) = b.last_probe.clone().unzip();
            let (table_weight, set_by) = ctl.effective_weight(name, *ip, b);
            rows.push(BackendRow {
                service: name.clone(),
                address: *ip,
                weight: o.weight.unwrap_or(b.configured_weight),
                weight_overridden: o.weight.is_some(),
                admin: ctl.admin(name, *ip, b),
                agent: s.config.agent.is_some().then(|| agent_row(&b.agent, now)),
                feedback: s.config.feedback.is_some().then(|| FeedbackRow {
                    percent: b.feedback.percent.applied,
                    pending: b.feedback.percent.pending(),
                    latency_ms: b.feedback.latency.map(|l| l.as_secs_f64() * 1000.0),
                    active_flows: b.feedback.flows,
                    changes: b.feedback.percent.changes,
                }),
                // Probes stop in maintenance, so the last verdict would
                // stay: the backend takes no traffic, and says so.
                health: if o.admin == Admin::Maintenance {
                    "down".into()
                } else {
                    format!("{:?}", b.health.state()).to_lowercase()
                },
                slots: slots.get(&b.id).copied().unwrap_or(0),
                mac: (kernel.flags & BACKEND_F_UP != 0 || ctl.has_mac(*ip))
                    .then(|| crate::netns::mac_string(&kernel.mac)),
                unattached_interface: ctl.unattached_interface(*ip),
                next_hop_error: ctl.next_hop_error(*ip).map(str::to_string),
                since_seconds: now.duration_since(b.since).unwrap_or_default().as_secs(),
                last_probe_ok: probe.as_ref().map(|p| p.ok),
                last_probe_ms: probe.as_ref().map(|p| p.latency.as_secs_f64() * 1000.0),
                last_probe_error: probe.and_then(|p| (!p.ok).then_some(p.detail)),
                transitions: b.transitions,
                probe_failures: b.probe_failures,
                packets: stats.packets(),
                bytes: stats.bytes,
                active_flows: active.of(b),
                table_weight,
                weight_set_by: set_by.to_string(),
                registered: b.registered.map(|r| r.draining),
                rates: history.rates(&Key::Backend(name.clone(), *ip)),
            });
        }
    }
    Ok(rows)
}

/// `lb acl list`: every prefix of the services' lists (of `only`), deny
/// lists first.
fn source_lists(ctl: &Controller, only: Option<&str>) -> Vec<SourceRow> {
    let mut rows = Vec::new();
    for (name, s) in ctl.services() {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        for (list, prefixes) in [("deny", &s.config.deny), ("allow", &s.config.allow)] {
            rows.extend(prefixes.iter().map(|(ip, len)| SourceRow {
                service: name.clone(),
                list: list.into(),
                prefix: format!("{ip}/{len}"),
            }));
        }
    }
    rows
}

/// `lb stats`, with each backend's `active` flows.
pub(super) fn stats(ctl: &Controller, history: &History, active: &ActiveFlows) -> Result<Stats> {
    let mut services = Vec::new();
    for (name, s) in ctl.services() {
        let st = ctl.service_stats(s)?;
        let lists = ctl.dataplane().source_drops(s.id)?;
        services.push(ServiceStatsRow {
            name: name.clone(),
            packets: st.packets,
            bytes: st.bytes,
            new_flows: st.new_flows,
            drops: st.drops,
            denied: lists.denied,
            not_allowed: lists.not_allowed,
            limited: lists.limited,
            rates: history.rates(&Key::Service(name.clone())),
        });
    }
    let reasons: BTreeMap<String, u64> = ctl
        .dataplane()
        .counters()?
        .into_iter()
        .map(|(c, v)| (c.name().to_string(), v))
        .collect();
    let reason_rates = reasons
        .keys()
        .filter_map(|r| Some((r.clone(), history.rates(&Key::Reason(r.clone()))?.packets)))
        .collect();
    Ok(Stats {
        services,
        backends: backends(ctl, None, history, active)?,
        reasons,
        reason_rates,
        limited_sources: limited_sources(ctl, TOP_LIMITED_SOURCES)?,
    })
}

/// Limited source prefixes `lb stats` and the metrics show.
pub(super) const TOP_LIMITED_SOURCES: usize = 10;

/// The `top` source prefixes the data plane's sample holds with the most
/// limited new flows, of services that still exist.
pub(super) fn limited_sources(ctl: &Controller, top: usize) -> Result<Vec<LimitedSourceRow>> {
    let by_id: std::collections::BTreeMap<u32, (&String, &ServiceState)> =
        ctl.services().iter().map(|(n, s)| (s.id, (n, s))).collect();
    let now = monotonic_seconds();
    Ok(ctl
        .dataplane()
        .limited_prefixes()?
        .into_iter()
        .filter_map(|p| {
            let (name, s) = by_id.get(&p.service)?;
            let limit = s.config.new_flow_limit?;
            let ip = lb_common::addr_ip(&p.prefix, addr_bytes(s.config.vip).1);
            Some(LimitedSourceRow {
                service: (*name).clone(),
                prefix: format!("{ip}/{}", limit.prefix),
                drops: p.drops,
                seconds_ago: now.saturating_sub(p.last),
            })
        })
        .take(top)
        .collect())
}

/// Which backend a client's flow goes to: the same hash and table the
/// kernel uses, and the connection-table entry if the flow has one.
fn explain(ctl: &Controller, service: &str, client: std::net::IpAddr, port: u16) -> Result<Value> {
    let s = ctl
        .services()
        .get(service)
        .with_context(|| format!("no service named {service:?} (see `lb service list`)"))?;
    if client.is_ipv4() != s.config.vip.is_ipv4() {
        bail!("the client and the VIP are of different families");
    }
    let (src, family) = addr_bytes(client);
    let (dst, _) = addr_bytes(s.config.vip);
    let flow = FlowKey {
        src,
        dst,
        sport: port.to_be(),
        dport: s.config.port.to_be(),
        proto: s.config.protocol.number(),
        family,
        _pad: [0; 2],
    };
    let affinity = s.config.affinity == config::Affinity::Client;
    let hash = flow_hash(&flow, affinity);
    let size = s.ring.len() as u32;
    let slot = maglev_slot(hash, size);
    let by_id = |id: u32| {
        s.backends
            .iter()
            .find(|(_, b)| b.id == id)
            .map(|(ip, _)| *ip)
    };
    let table = s
        .ring
        .get(slot as usize)
        .copied()
        .filter(|&id| id != NO_BACKEND)
        .and_then(by_id);
    let entry = ctl.dataplane().conntrack(&flow)?;
    let state = match &entry {
        Some(v) => Some(flows::judge(
            &ctl.desired().settings.conntrack_timeouts,
            s,
            v,
            &ctl.dataplane().backend(v.backend)?,
            monotonic_seconds(),
        )),
        None => None,
    };
    let pinned = entry
        .filter(|_| state.is_some_and(FlowState::pins))
        .and_then(|v| by_id(v.backend));
    let (goes_to, reason) = match (pinned, state, table) {
        (Some(p), Some(FlowState::Closing), _) => (
            Some(p),
            "closing connection (FIN or RST seen): the connection table pins it until the \
             closed timeout (a new SYN would use the table)",
        ),
        (Some(p), _, _) => (
            Some(p),
            "established flow: the connection table pins it (a new SYN would use the table)",
        ),
        (None, Some(FlowState::Lapsed), Some(t)) => (
            Some(t),
            "the flow's entry lapsed (idle past its timeout): the next packet takes the \
             Maglev table slot",
        ),
        (None, Some(FlowState::Stale), Some(t)) => (
            Some(t),
            "the flow's entry names a backend that is down or gone: the next packet takes \
             the Maglev table slot",
        ),
        (None, _, Some(t)) => (Some(t), "new flow: Maglev table slot"),
        (None, _, None) => (
            None,
            "no backend in rotation: packets are dropped and counted as drop_no_backend",
        ),
    };
    // A flow without a live entry is checked against the source lists first.
    let refusal = s.config.refusal(client).filter(|_| pinned.is_none());
    let (goes_to, reason) = match refusal {
        Some(c) => (
            None,
            format!(
                "the service's source lists refuse the client: its new flows are dropped and \
                 counted as {}",
                c.name()
            ),
        ),
        None => match s.config.new_flow_limit.filter(|_| pinned.is_none()) {
            Some(l) => (
                goes_to,
                format!(
                    "{reason}, if its prefix is within the service's new-flow limit ({} a \
                     second, {} at once, per /{}): beyond it, dropped and counted as {}",
                    l.rate,
                    l.burst,
                    l.prefix,
                    lb_common::Counter::DropRateLimited.name()
                ),
            ),
            None => (goes_to, reason.to_string()),
        },
    };
    Ok(json!({
        "service": service,
        "flow": format!("{}:{port} -> {}:{}/{}", fmt_ip(client), fmt_ip(s.config.vip), s.config.port, s.config.protocol),
        "hash": format!("{hash:08x}"),
        "affinity": affinity,
        "slot": slot,
        "table_backend": table,
        "conntrack_backend": pinned,
        "conntrack_state": state.map(FlowState::name),
        "backend": goes_to,
        "reason": reason,
        // What a new flow's slot was drawn by: each backend's weight in
        // the table and what set it (an agent's percent shows here).
        "table_weights": s.backends.iter().map(|(ip, b)| {
            let (weight, set_by) = ctl.effective_weight(service, *ip, b);
            json!({"backend": ip, "weight": weight, "set_by": set_by})
        }).collect::<Vec<_>>(),
    }))
}

/// `lb backend list`'s view of a backend's agent.
fn agent_row(a: &AgentState, now: SystemTime) -> AgentRow {
    let (answer, at) = a.last.clone().unzip();
    AgentRow {
        applied: a.view.applied.to_string(),
        pending: a.view.pending().map(|v| v.to_string()),
        last_answer: answer.clone().and_then(Result::ok),
        last_error: answer.and_then(Result::err),
        seconds_ago: at.map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
        changes: a.view.changes,
    }
}
