//! One probe task per backend. Tasks only probe and report; the controller
//! decides. Each task sleeps a jittered interval (±10 %) so probes of many
//! backends do not synchronise, and probes at the fast interval while its
//! results disagree with its backend's state.

use std::{
    collections::BTreeMap,
    hash::{Hash as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    sync::atomic::Ordering,
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    SharedControl,
    controller::{Controller, ProbeReport},
    runtime::Admin,
};
use crate::{config::HealthCheck, probe};

/// A probe's outcome, for the controller.
pub(super) struct Result {
    /// Service name.
    pub service: String,
    /// Backend address.
    pub backend: IpAddr,
    /// The outcome.
    pub report: ProbeReport,
}

struct Task {
    check: HealthCheck,
    control: SharedControl,
    handle: JoinHandle<()>,
}

/// The running probe tasks.
pub(super) struct Probers {
    tasks: BTreeMap<(String, IpAddr), Task>,
    out: mpsc::Sender<Result>,
}

impl Probers {
    /// No tasks yet; results go to `out`.
    pub(super) fn new(out: mpsc::Sender<Result>) -> Self {
        Probers {
            tasks: BTreeMap::new(),
            out,
        }
    }

    /// Starts, restarts or stops tasks to match the controller's backends,
    /// and passes each its backend's state and whether it is in maintenance.
    pub(super) fn sync(&mut self, ctl: &Controller) {
        let mut wanted = BTreeMap::new();
        for (name, svc) in ctl.services() {
            for ip in svc.backends.keys() {
                wanted.insert((name.clone(), *ip), svc.config.health.clone());
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted.get(key) == Some(&task.check);
            if !keep {
                task.handle.abort();
            }
            keep
        });
        for (key, check) in wanted {
            let (service, ip) = key.clone();
            let task = self.tasks.entry(key).or_insert_with(|| {
                let control = SharedControl::default();
                let handle = tokio::spawn(probe_loop(
                    service.clone(),
                    ip,
                    check.clone(),
                    control.clone(),
                    self.out.clone(),
                ));
                Task {
                    check,
                    control,
                    handle,
                }
            });
            let admin = ctl.override_of(&service, ip).admin;
            task.control
                .paused
                .store(admin == Admin::Maintenance, Ordering::Relaxed);
            task.control
                .up
                .store(ctl.is_up(&service, ip), Ordering::Relaxed);
        }
    }
}

impl Drop for Probers {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.handle.abort();
        }
    }
}

/// `base` ± 10 %, from a small xorshift state.
fn jittered(base: Duration, state: &mut u64) -> Duration {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let permille = 900 + (*state % 201);
    base * permille as u32 / 1000
}

async fn probe_loop(
    service: String,
    ip: IpAddr,
    check: HealthCheck,
    control: SharedControl,
    out: mpsc::Sender<Result>,
) {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&service, ip, std::process::id()).hash(&mut hasher);
    let mut state = hasher.finish() | 1;
    let addr = SocketAddr::new(ip, check.port);
    // Start at a random point of the first interval.
    tokio::time::sleep(jittered(check.interval / 2, &mut state)).await;
    loop {
        let mut in_transition = false;
        if !control.paused.load(Ordering::Relaxed) {
            let report = match probe::run(&check.kind, addr, check.timeout).await {
                Ok(latency) => ProbeReport {
                    ok: true,
                    latency,
                    detail: String::new(),
                },
                Err(detail) => ProbeReport {
                    ok: false,
                    latency: check.timeout,
                    detail,
                },
            };
            in_transition = report.ok != control.up.load(Ordering::Relaxed);
            let result = Result {
                service: service.clone(),
                backend: ip,
                report,
            };
            if out.send(result).await.is_err() {
                return;
            }
        }
        let base = if in_transition {
            check.fast_interval
        } else {
            check.interval
        };
        tokio::time::sleep(jittered(base, &mut state)).await;
    }
}
