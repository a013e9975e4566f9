//! `lb agent`: runs on a backend host and keeps the host registered with
//! the lb fleet while its local check passes (docs/agent.md).
//!
//! - [`settings`]: the agent's file.
//! - [`registrar`]: the registration in etcd, under a lease the agent
//!   keeps alive; a host that dies leaves when the lease lapses.
//!
//! On SIGTERM or SIGINT the agent drains its backend (the registration
//! says so), waits until every live lb node reports no flow left on it or
//! `drain_timeout` passes, then deregisters and exits 0. Between its
//! checks it holds nothing: every step is retried on the next tick, so an
//! etcd that is away for a while costs the registration only once its
//! lease lapses.

pub mod registrar;
pub mod settings;

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{config::Probe, probe};
use registrar::Registrar;
use settings::{Check, CheckKind, Settings};

/// How often a leaving agent asks the fleet whether its flows ended.
const DRAIN_POLL: Duration = Duration::from_millis(500);

/// Runs the agent with the file at `path` until SIGTERM or SIGINT.
pub async fn run(path: &Path) -> Result<()> {
    let s = settings::read(path)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut registrar = Registrar::new(&s);
    let mut tick = tokio::time::interval(s.check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut passing: Option<bool> = None;
    info!(address = %s.address, services = ?s.services, host = %s.fleet.node, "agent started");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let result = check(&s.check, &s).await;
        let ok = result.is_ok();
        if passing != Some(ok) {
            match &result {
                Ok(()) => info!("local check passes: registering"),
                Err(why) => warn!(reason = %why, "local check fails: deregistering"),
            }
            passing = Some(ok);
        }
        let step = if ok {
            registrar.hold(false).await
        } else {
            registrar.leave().await
        };
        if let Err(e) = step {
            warn!(error = %format!("{e:#}"), "etcd: retrying on the next check");
        }
    }
    info!("stopping: draining this backend before deregistering");
    if registrar.registered() {
        drain(&mut registrar, &s).await;
    }
    if let Err(e) = registrar.leave().await {
        warn!(error = %format!("{e:#}"), "deregistering; the lease lapses by itself");
    }
    info!("deregistered; exiting");
    Ok(())
}

/// Marks the backend draining and waits until the fleet's nodes report
/// none of its flows left, or `drain_timeout`; keeps the lease alive
/// meanwhile.
async fn drain(registrar: &mut Registrar, s: &Settings) {
    let deadline = Instant::now() + s.drain_timeout;
    let mut last: Option<u64> = None;
    loop {
        match registrar.hold(true).await {
            Ok(()) => match registrar.flows_left().await {
                Ok(Some(0)) => {
                    info!("every lb node reports no flow left");
                    return;
                }
                Ok(left) => {
                    if left != last {
                        match left {
                            Some(n) => info!(flows = n, "waiting for flows to end"),
                            None => info!("waiting for every lb node to apply the drain"),
                        }
                        last = left;
                    }
                }
                Err(e) => warn!(error = %format!("{e:#}"), "reading the fleet's reports"),
            },
            Err(e) => warn!(error = %format!("{e:#}"), "etcd: retrying"),
        }
        if Instant::now() >= deadline {
            warn!(
                flows = ?last,
                timeout = ?s.drain_timeout,
                "drain timeout: deregistering with flows left (they re-hash to other backends)"
            );
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Runs the local check once: `Ok` when it passes, else why not.
pub async fn check(c: &Check, s: &Settings) -> Result<(), String> {
    let (port, kind) = match &c.kind {
        CheckKind::Port(port) => (
            *port,
            Probe::Tcp {
                send: None,
                expect: None,
            },
        ),
        CheckKind::Http { port, path } => (
            *port,
            Probe::Http {
                path: path.clone(),
                status: 200,
                body: None,
                tls: None,
            },
        ),
        CheckKind::Command(argv) => return command(argv, c.timeout).await,
    };
    let addr = std::net::SocketAddr::new(s.address, port);
    probe::run(&kind, addr, None, c.timeout)
        .await
        .map(|_| ())
        .map_err(|e| format!("{addr}: {e}"))
}

/// Runs `argv`, killed after `limit`.
async fn command(argv: &[String], limit: Duration) -> Result<(), String> {
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{}: {status}", argv[0])),
        Ok(Err(e)) => Err(format!("{}: {e}", argv[0])),
        Err(_) => Err(format!("{}: still running after {limit:?}", argv[0])),
    }
}
