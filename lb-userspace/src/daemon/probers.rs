//! One probe task per backend, and one agent task per backend of a service
//! with an agent check. Tasks only probe and report; the controller
//! decides. Each task sleeps a jittered interval (±10 %) so probes of many
//! backends do not synchronise; a probe task probes at the fast interval
//! while its results disagree with its backend's state.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    controller::{Controller, ProbeReport},
    runtime::Admin,
};
use crate::{
    agent,
    config::{AgentCheck, HealthCheck},
    probe,
    probe_path::{self, ProbePath},
};

/// A probe's or an agent's outcome, for the controller.
pub(super) struct Result {
    /// Service name.
    pub service: String,
    /// Backend address.
    pub backend: IpAddr,
    /// The outcome.
    pub report: Report,
    /// The task that ran the probe or asked the agent, and the
    /// [`ProbeControl::epoch`] it began in: see [`Probers::is_stale`].
    probed_in: (SharedControl, u64),
}

/// What a task found.
pub(super) enum Report {
    /// The health probe's outcome.
    Probe(ProbeReport),
    /// The agent's line and what it says, or why there was none.
    Agent(std::result::Result<(String, agent::Reply), String>),
}

/// What a backend's tasks run.
#[derive(Clone, PartialEq)]
struct Checks {
    health: HealthCheck,
    agent: Option<AgentCheck>,
    /// Its health probes go through the VIP, or to its address.
    through: Option<probe::ThroughVip>,
}

/// Shared between the controller and a probe task.
#[derive(Debug, Default)]
struct ProbeControl {
    /// The backend's health state is up. A probe whose result disagrees
    /// with it starts a transition: the prober switches to the fast
    /// interval at once, without waiting for the controller.
    up: AtomicBool,
    /// Do not probe (maintenance).
    paused: AtomicBool,
    /// Changes whenever `paused` does. A probe reports the epoch it began
    /// in, and the controller drops its result if the epoch has changed
    /// since: a probe begun before maintenance, answered by the server
    /// since stopped, must not count once the backend leaves it.
    epoch: AtomicU64,
    /// Probe now: the backend left maintenance, and takes no flow until a
    /// probe passes.
    resumed: tokio::sync::Notify,
}

type SharedControl = Arc<ProbeControl>;

struct Task {
    checks: Checks,
    control: SharedControl,
    handles: Vec<JoinHandle<()>>,
}

/// The running probe tasks.
pub(super) struct Probers {
    tasks: BTreeMap<(String, IpAddr), Task>,
    out: mpsc::Sender<Result>,
    /// The routes probes through the VIP need, for [`probe_path::keep`].
    paths: watch::Sender<BTreeSet<ProbePath>>,
}

impl Probers {
    /// No tasks yet; results go to `out`. Starts the keeper of the probe
    /// paths with those `ctl` needs: its first sync must not take away the
    /// paths a previous daemon left for them.
    pub(super) fn new(out: mpsc::Sender<Result>, ctl: &Controller) -> Self {
        let (paths, wanted) = watch::channel(ctl.probe_paths());
        tokio::spawn(probe_path::keep(wanted));
        Probers {
            tasks: BTreeMap::new(),
            out,
            paths,
        }
    }

    /// Starts, restarts or stops tasks to match the controller's backends,
    /// and passes each its backend's state and whether it is in maintenance.
    pub(super) fn sync(&mut self, ctl: &Controller) {
        let paths = ctl.probe_paths();
        self.paths.send_if_modified(|old| {
            let changed = *old != paths;
            *old = paths;
            changed
        });
        let mut wanted = BTreeMap::new();
        for (name, svc) in ctl.services() {
            for ip in svc.backends.keys() {
                let Ok(through) = ctl.probe_route(name, *ip) else {
                    continue;
                };
                let checks = Checks {
                    health: svc.config.health.clone(),
                    agent: svc.config.agent.clone(),
                    through,
                };
                wanted.insert((name.clone(), *ip), checks);
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted.get(key) == Some(&task.checks);
            if !keep {
                task.handles.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        for (key, checks) in wanted {
            let (service, ip) = key.clone();
            let task = self.tasks.entry(key).or_insert_with(|| {
                let control = SharedControl::default();
                let mut handles = vec![tokio::spawn(probe_loop(
                    service.clone(),
                    ip,
                    checks.clone(),
                    control.clone(),
                    self.out.clone(),
                ))];
                if let Some(agent) = &checks.agent {
                    handles.push(tokio::spawn(agent_loop(
                        service.clone(),
                        ip,
                        agent.clone(),
                        control.clone(),
                        self.out.clone(),
                    )));
                }
                Task {
                    checks,
                    control,
                    handles,
                }
            });
            task.pass_state(ctl, &service, ip);
        }
    }

    /// Passes one backend's state to its task: all that a probe or agent
    /// result of that backend can change. One task's lookup, where
    /// [`Probers::sync`] walks every backend.
    pub(super) fn update(&self, ctl: &Controller, service: &str, ip: IpAddr) {
        if let Some(task) = self.tasks.get(&(service.to_string(), ip)) {
            task.pass_state(ctl, service, ip);
        }
    }

    /// Whether `result` is a probe's or an agent's that no longer speaks
    /// for its backend: its task has been replaced (the checks changed, the
    /// backend was removed and perhaps added again) or stopped, or the
    /// backend entered or left maintenance after the probe began.
    pub(super) fn is_stale(&self, result: &Result) -> bool {
        let (control, epoch) = &result.probed_in;
        self.tasks
            .get(&(result.service.clone(), result.backend))
            .is_none_or(|t| {
                !Arc::ptr_eq(&t.control, control)
                    || t.control.epoch.load(Ordering::SeqCst) != *epoch
            })
    }
}

impl Task {
    /// Tells the task whether its backend is up and whether it is in
    /// maintenance.
    fn pass_state(&self, ctl: &Controller, service: &str, ip: IpAddr) {
        let paused = ctl.override_of(service, ip).admin == Admin::Maintenance;
        // SeqCst, and the epoch after the flag: a probe that read the new
        // epoch reads the new flag too, so none runs in maintenance under
        // an epoch that outlives it.
        if self.control.paused.swap(paused, Ordering::SeqCst) != paused {
            self.control.epoch.fetch_add(1, Ordering::SeqCst);
            if !paused {
                self.control.resumed.notify_one();
            }
        }
        self.control
            .up
            .store(ctl.is_up(service, ip), Ordering::Relaxed);
    }
}

impl Drop for Probers {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.handles.iter().for_each(JoinHandle::abort);
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

/// A uniform point of `interval`, for a task's first sleep: tasks started
/// together (at start, or a service's after a reload changed its checks)
/// spread over the whole interval at once.
fn first_delay(interval: Duration, state: &mut u64) -> Duration {
    jittered(interval, state);
    interval * (*state % 1000) as u32 / 1000
}

/// A jitter state of its own for each task: the same backend's probe and
/// agent tasks, and different backends, do not run in step.
fn jitter_seed(service: &str, ip: IpAddr, task: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (service, ip, task, std::process::id()).hash(&mut hasher);
    hasher.finish() | 1
}

/// Asks the backend's agent every interval, whatever its state: an agent
/// may bring a backend it took out back.
async fn agent_loop(
    service: String,
    ip: IpAddr,
    check: AgentCheck,
    control: SharedControl,
    out: mpsc::Sender<Result>,
) {
    let mut state = jitter_seed(&service, ip, "agent");
    let addr = SocketAddr::new(ip, check.port);
    tokio::time::sleep(first_delay(check.interval, &mut state)).await;
    loop {
        let epoch = control.epoch.load(Ordering::SeqCst);
        let answer = probe::ask_agent(addr, check.send.as_deref(), check.timeout).await;
        let result = Result {
            service: service.clone(),
            backend: ip,
            report: Report::Agent(answer),
            probed_in: (control.clone(), epoch),
        };
        if out.send(result).await.is_err() {
            return;
        }
        tokio::time::sleep(jittered(check.interval, &mut state)).await;
    }
}

async fn probe_loop(
    service: String,
    ip: IpAddr,
    checks: Checks,
    control: SharedControl,
    out: mpsc::Sender<Result>,
) {
    let mut state = jitter_seed(&service, ip, "probe");
    let (check, through) = (checks.health, checks.through);
    let addr = SocketAddr::new(ip, check.port);
    tokio::time::sleep(first_delay(check.interval, &mut state)).await;
    loop {
        let mut in_transition = false;
        let epoch = control.epoch.load(Ordering::SeqCst);
        if !control.paused.load(Ordering::SeqCst) {
            let started = Instant::now();
            let report = match probe::run(&check.kind, addr, through.as_ref(), check.timeout).await
            {
                Ok(latency) => ProbeReport {
                    ok: true,
                    latency,
                    detail: String::new(),
                    answered: true,
                },
                // As long as it took: a refused connection fails at once,
                // a timeout at its timeout.
                Err(failure) => ProbeReport {
                    ok: false,
                    latency: started.elapsed().min(check.timeout),
                    detail: failure.detail,
                    answered: !failure.silent,
                },
            };
            in_transition = report.ok != control.up.load(Ordering::Relaxed);
            let result = Result {
                service: service.clone(),
                backend: ip,
                report: Report::Probe(report),
                probed_in: (control.clone(), epoch),
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
        tokio::select! {
            () = tokio::time::sleep(jittered(base, &mut state)) => {}
            () = control.resumed.notified() => {}
        }
    }
}
