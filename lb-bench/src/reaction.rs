//! How fast the daemon acts on the data plane: from `lb backend set-weight`
//! to the new table being live, and from a backend's death to its eviction
//! under the default health settings.
//!
//! A real `lb daemon` runs in the namespace tests' segment (`Lan`) with the
//! configuration an operator first writes (every setting at its default),
//! in front of three backends serving HTTP. "Live" is the moment the
//! service's table in the kernel's rings map changes: from the next packet
//! on, the XDP program reads the new slots. A thread watches the table
//! through the daemon's pinned maps.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb::{
    config::HealthFile, dataplane::PinnedTables, demo::server::NameServer, health::STABLE_SUCCESSES,
};
use lb_common::{ServiceKey, wire::IPPROTO_TCP};
use lb_tests::{
    daemon::{Daemon, WEB_PORT, WEB_VIP, default_web_config},
    lab::service_key,
    lan::Lan,
};
use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// The VIP and port of `default_web_config`'s service.
const VIP: Ipv4Addr = WEB_VIP;
const PORT: u16 = WEB_PORT;
/// Backends; the first is the one reweighted and killed.
const BACKENDS: u8 = 3;
/// The backend reweighted and killed.
const SUBJECT: &str = "198.18.0.11";
/// Its weights, alternated by the set-weight runs.
const WEIGHTS: [u32; 2] = [2, 1];
/// How often the watcher reads the table.
const WATCH_POLL: Duration = Duration::from_micros(50);
/// Longest wait for a change: a readmission takes `rise` probes at the
/// default interval, an eviction `fall` at the fast one.
const FLIP_TIMEOUT: Duration = Duration::from_secs(30);

/// How much to measure.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// `set-weight` commands timed.
    pub weight_changes: usize,
    /// Backend deaths timed.
    pub evictions: usize,
}

impl Plan {
    /// The full plan, or the quick one.
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                weight_changes: 5,
                evictions: 2,
            }
        } else {
            Plan {
                weight_changes: 20,
                evictions: 10,
            }
        }
    }
}

/// The part's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReactionResults {
    /// How much was measured.
    pub plan: Plan,
    /// The health settings in force (the defaults).
    pub health: String,
    /// From running `lb backend set-weight` to the command returning, ms.
    pub set_weight_return_ms: Summary,
    /// From running it to the new table being live, ms.
    pub set_weight_live_ms: Summary,
    /// How long before the command returned the table was live, ms
    /// (negative: it went live after).
    pub live_before_return_ms: Summary,
    /// From a backend's server closing to the table without it being live,
    /// ms, every run.
    pub evictions_ms: Vec<f64>,
    /// Their summary.
    pub eviction_ms: Summary,
    /// From the server coming back to the table with it being live, ms.
    pub readmission_ms: Summary,
}

/// Runs the part.
pub(crate) fn run(plan: Plan) -> Result<ReactionResults> {
    let lan = Lan::build(BACKENDS, &[&format!("{VIP}/32")])?;
    let mut servers: Vec<Option<NameServer>> =
        lan.serve_names(PORT)?.into_iter().map(Some).collect();
    let d = Daemon::start(
        &lan.lb,
        "bench-reaction",
        &default_web_config(BACKENDS, "generic"),
    )?;
    let defaults = HealthFile::default();
    // Between runs: until slow start has ended, the daemon rebuilds the
    // table as weights ramp (every change watched must be the one caused);
    // until a readmitted backend is stable, its next death counts as a flap
    // and damping doubles the successes it needs to return. Each run starts
    // from a stable backend, as a first failure in production does.
    let settle = defaults
        .slow_start
        .max(defaults.interval * STABLE_SUCCESSES)
        + defaults.interval;
    d.wait_in_table(BACKENDS.into(), FLIP_TIMEOUT)?;
    std::thread::sleep(settle);
    let key = service_key(IpAddr::V4(VIP), PORT, IPPROTO_TCP);

    let (mut returned, mut live, mut margin) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..plan.weight_changes {
        let weight = WEIGHTS[i % WEIGHTS.len()].to_string();
        eprintln!("reaction: set-weight {}/{}", i + 1, plan.weight_changes);
        let watch = Watch::start(&d.pins, key)?;
        let issued = Instant::now();
        d.cli(&["backend", "set-weight", "web", SUBJECT, &weight])?;
        let done = Instant::now();
        let changed = watch.changed()?;
        returned.push(ms(done - issued));
        live.push(ms(changed - issued));
        margin.push(ms_signed(done, changed));
    }

    let (mut evictions, mut readmissions) = (Vec::new(), Vec::new());
    for i in 0..plan.evictions {
        eprintln!("reaction: eviction {}/{}", i + 1, plan.evictions);
        // Spread the deaths over the probe schedule (a golden-ratio
        // sequence of fractions of the interval).
        let phase = (i as f64 * 0.618_034).fract();
        std::thread::sleep(defaults.interval.mul_f64(phase));
        let watch = Watch::start(&d.pins, key)?;
        servers[0] = None;
        let dead = Instant::now();
        evictions.push(ms(watch.changed()? - dead));
        let health = d.cli(&["health"])?;
        ensure!(
            health
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["address"] == SUBJECT))
                .is_some_and(|r| r["health"] == "down"),
            "the table changed but {SUBJECT} is not down: {health}"
        );
        let watch = Watch::start(&d.pins, key)?;
        servers[0] = Some(NameServer::start(&lan.backends[0].ns, "backend-1", PORT)?);
        let back = Instant::now();
        readmissions.push(ms(watch.changed()? - back));
        std::thread::sleep(settle);
    }
    let of = |v: &[f64]| Summary::of(v).context("nothing measured");
    Ok(ReactionResults {
        plan,
        health: format!(
            "interval {:?}, fast interval {:?}, timeout {:?}, rise {}, fall {}, slow start {:?}",
            defaults.interval,
            defaults.fast_interval,
            defaults.timeout,
            defaults.rise,
            defaults.fall,
            defaults.slow_start
        ),
        set_weight_return_ms: of(&returned)?,
        set_weight_live_ms: of(&live)?,
        live_before_return_ms: of(&margin)?,
        eviction_ms: of(&evictions)?,
        evictions_ms: evictions,
        readmission_ms: of(&readmissions)?,
    })
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `later - earlier` in ms, negative when `later` came first.
fn ms_signed(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => ms(d),
        None => -ms(earlier - later),
    }
}

/// A thread watching one service's live table until it changes.
pub(crate) struct Watch {
    thread: JoinHandle<Result<Instant>>,
}

impl Watch {
    /// Reads the service's live table now, then watches it from a thread.
    pub(crate) fn start(pins: &Path, key: ServiceKey) -> Result<Watch> {
        let tables = PinnedTables::open(pins)?;
        let before = tables.table(&key)?;
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + FLIP_TIMEOUT;
            loop {
                if tables.table(&key)? != before {
                    return Ok(Instant::now());
                }
                ensure!(
                    Instant::now() < deadline,
                    "the table did not change within {FLIP_TIMEOUT:?}"
                );
                std::thread::sleep(WATCH_POLL);
            }
        });
        Ok(Watch { thread })
    }

    /// When the live table changed.
    pub(crate) fn changed(self) -> Result<Instant> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the watcher panicked"))?
    }
}
