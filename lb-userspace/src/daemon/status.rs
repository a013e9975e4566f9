//! The status page: one self-contained HTML file (its style and script
//! inline, nothing fetched from anywhere), and the JSON it polls, which
//! scripts can read too. The JSON is the API's own rows (`lb service list`,
//! `lb backend list`, `lb stats`) with the counter history and the recent
//! events added, so the page shows nothing the CLI cannot.

use std::time::Instant;

use anyhow::Result;
use serde_json::{Value, json};

use super::{
    controller::Controller,
    events,
    history::{History, Key},
    views,
};
use crate::api::NodeStatus;

/// The page, served at `/`.
pub(super) const PAGE: &str = include_str!("status.html");

/// What the page shows, as served at `/status.json`.
pub(super) fn snapshot(
    ctl: &Controller,
    node: &NodeStatus,
    history: &History,
    started: Instant,
    flows: &super::flows::Summary,
) -> Result<Value> {
    let settings = &ctl.desired().settings;
    let table_size = |service: &str| ctl.services().get(service).map_or(0, |s| s.ring.len());
    // `lb stats`' rows: the services' drops, the backends with their
    // rates, and every outcome's count and rate, in one read of the counters
    // and the connection table.
    let stats = views::stats(ctl, history, &flows.active)?;
    let services: Vec<Value> = views::services(ctl)
        .into_iter()
        .map(|row| {
            let key = Key::Service(row.name.clone());
            let mut v = serde_json::to_value(&row)?;
            v["rates"] = serde_json::to_value(history.rates(&key))?;
            v["history"] = serde_json::to_value(history.packet_series(&key))?;
            v["drops"] = json!(
                stats
                    .services
                    .iter()
                    .find(|s| s.name == row.name)
                    .map_or(0, |s| s.drops)
            );
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let backends: Vec<Value> = stats
        .backends
        .into_iter()
        .map(|row| {
            let key = Key::Backend(row.service.clone(), row.address);
            let mut v = serde_json::to_value(&row)?;
            v["share"] = json!(row.slots as f64 / table_size(&row.service).max(1) as f64);
            v["history"] = serde_json::to_value(history.packet_series(&key))?;
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let reasons: Vec<Value> = stats
        .reasons
        .iter()
        .map(|(reason, packets)| {
            json!({
                "reason": reason,
                "packets": packets,
                "per_second": stats.reason_rates.get(reason),
            })
        })
        .collect();
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": started.elapsed().as_secs(),
        "interfaces": settings.interfaces,
        "drained": node.drained,
        "vips": node.vips.iter().map(|v| json!({"vip": v.vip, "announced": v.announced})).collect::<Vec<_>>(),
        "services": services,
        "backends": backends,
        "reasons": reasons,
        "events": events::recent(),
    }))
}
