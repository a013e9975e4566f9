//! `lb agent`: runs on a backend host and keeps the host registered with
//! the lb fleet while its local check passes (docs/agent.md).
//!
//! - [`settings`]: the agent's file.
//! - [`load`]: the share of its weight the host's load leaves it.
//! - [`setup`]: the host's side of its services (VIP on `lo`, ARP,
//!   decapsulator), checked and put right.
//! - [`registrar`]: the registration in etcd, under a lease the agent
//!   keeps alive; a host that dies leaves when the lease lapses.
//! - [`direct`]: the registration with a standalone daemon's port,
//!   signed with a shared secret.
//!
//! On SIGTERM or SIGINT the agent drains its backend (the registration
//! says so), waits until every live lb node reports no flow left on it or
//! `drain_timeout` passes, then deregisters and exits 0. Between its
//! checks it holds nothing: every step is retried on the next tick, so an
//! etcd that is away for a while costs the registration only once its
//! lease lapses. A registration its checks made is renewed every third of
//! the lease ([`KeepAlive`]), however long a check, the setup check or the
//! load sampling take.

pub mod direct;
pub mod load;
pub mod registrar;
pub mod settings;
pub mod setup;

use std::{
    collections::BTreeMap,
    future::Future,
    path::Path,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::AsyncWriteExt as _,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{config::Probe, doctor, probe};
use load::LoadSettings;
use registrar::{FlowsLeft, Registrar};
use settings::{Check, CheckKind, Settings, Target};

/// How often a leaving agent asks the fleet whether its flows ended.
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// Failed local checks in a row that deregister the host (lb's own probes
/// take `fall = 3` by default too).
const CHECK_FALL: u32 = 3;
/// Longest an agent-check answer may take to send.
const AGENT_WRITE: Duration = Duration::from_secs(1);

/// How `lb agent` runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Put the host's setup right where it fails (VIP on `lo`, ARP
    /// settings, the decapsulator).
    pub fix: bool,
    /// Check (and with `fix`, set up) once, say what it found, and exit.
    pub once: bool,
    /// With `once`: change nothing, say what would be done.
    pub dry_run: bool,
}

/// How often the host's setup is checked again while the agent runs.
const SETUP_RECHECK: Duration = Duration::from_secs(10);
/// How long a fix that applied but did not help waits before it is
/// applied again.
const FUTILE_RETRY: Duration = Duration::from_secs(60);

/// Runs the agent with the file at `path`: once, or until SIGTERM or
/// SIGINT.
pub async fn run(path: &Path, options: &Options) -> Result<()> {
    let s = settings::read(path)?;
    if options.once {
        return once(&s, options).await;
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut registrar = Registrar::new(&s);
    let report = Arc::new(Report::default());
    if let Some(load) = &s.load {
        spawn_meter(Meter::new(load.clone()), report.clone());
    }
    if let Some(port) = s.load.as_ref().and_then(|l| l.agent_port) {
        serve_agent_check(port, report.clone()).await?;
    }
    let mut tick = tokio::time::interval(s.check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut passing: Option<bool> = None;
    let mut failures = 0u32;
    let mut set_up = SetUp::default();
    let mut keep = KeepAlive::new();
    info!(address = %s.address, services = ?s.services, host = %s.host, "agent started");
    loop {
        // The interval may be longer than a daemon's lease.
        let next = async {
            tokio::select! {
                _ = tick.tick() => true,
                _ = term.recv() => false,
                _ = int.recv() => false,
            }
        };
        if !keep.alongside(&mut registrar, next).await {
            break;
        }
        if !set_up.holds(&mut registrar, &mut keep, options.fix).await {
            if let Err(e) = registrar.leave().await {
                warn!(error = %format!("{e:#}"), "registering: retrying on the next check");
            }
            continue;
        }
        let result = keep.alongside(&mut registrar, check(&s.check, &s)).await;
        failures = if result.is_ok() { 0 } else { failures + 1 };
        // A host registers on a passing check; once registered, one failed
        // check is not enough to cut its connections.
        let ok = result.is_ok() || (passing == Some(true) && failures < CHECK_FALL);
        if passing != Some(ok) {
            match &result {
                Ok(()) => info!("local check passes: registering"),
                Err(why) => warn!(reason = %why, failures, "local check fails: deregistering"),
            }
            passing = Some(ok);
        }
        let percent = report.percent();
        let step = if ok {
            registrar.hold(false, percent).await
        } else {
            registrar.leave().await
        };
        keep.held(percent);
        if let Err(e) = step {
            warn!(error = %format!("{e:#}"), "registering: retrying on the next check");
        }
    }
    info!("stopping: draining this backend before deregistering");
    report.draining.store(true, Ordering::Relaxed);
    // Registered, or meant to be and held back only by a failed etcd
    // step: the drain writes the registration again, draining.
    if registrar.registered() || (passing == Some(true) && set_up.passes) {
        tokio::select! {
            () = drain(&mut registrar, &s, report.percent()) => {}
            _ = term.recv() => warn!("a second signal: deregistering without waiting for the flows"),
            _ = int.recv() => warn!("a second signal: deregistering without waiting for the flows"),
        }
    }
    if let Err(e) = registrar.leave().await {
        warn!(error = %format!("{e:#}"), "deregistering; the lease lapses by itself");
    }
    info!("deregistered; exiting");
    Ok(())
}

/// The host's setup as last checked.
#[derive(Default)]
struct SetUp {
    checked: Option<Instant>,
    passes: bool,
    /// What was last logged.
    reported: Option<bool>,
    /// Fixes that applied but did not put the host right (a decap file
    /// without the VIP), and when: applied again only after
    /// [`FUTILE_RETRY`] (the operator may have mended what they read).
    futile: Vec<(setup::Fix, Instant)>,
    /// The last error of each fix that failed, warned of once.
    failed: Vec<(setup::Fix, String)>,
}

impl SetUp {
    /// Whether the host is set up for its services, checked again every
    /// [`SETUP_RECHECK`] (with `fix`, put right where it is not), the
    /// registration kept alive meanwhile.
    async fn holds(&mut self, registrar: &mut Registrar, keep: &mut KeepAlive, fix: bool) -> bool {
        if self.checked.is_some_and(|t| t.elapsed() < SETUP_RECHECK) {
            return self.passes;
        }
        // The read takes up to CALL_TIMEOUT, and no renewal goes out
        // meanwhile: renewed first, the lease has all its time left.
        keep.renew(registrar).await;
        let served = match registrar.served().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading the fleet's services; retrying");
                return self.passes;
            }
        };
        self.checked = Some(Instant::now());
        // The findings and fixes fork `ip`, read /proc and load the
        // decapsulator, all blocking: on a thread of their own, or the
        // keep-alive would wait for them.
        let mut this = std::mem::take(self);
        let runtime = tokio::runtime::Handle::current();
        let examined = tokio::task::spawn_blocking(move || {
            if fix {
                runtime.block_on(this.fix(&served));
            }
            let findings = setup::findings(&served);
            (this, findings)
        });
        let findings = match keep.alongside(registrar, examined).await {
            Ok((this, findings)) => {
                *self = this;
                findings
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let passes = setup::passes(&findings);
        if self.reported != Some(passes) {
            self.reported = Some(passes);
            if passes {
                info!("the host is set up for its services");
            } else {
                for f in findings.iter().filter(|f| f.level == doctor::Level::Fail) {
                    warn!(check = %f.check, detail = %f.detail, fix = ?f.fix, "not set up: not registering (--fix puts it right)");
                }
            }
        }
        if passes {
            // Drift later is put right afresh.
            self.futile.clear();
            self.failed.clear();
        }
        self.passes = passes;
        passes
    }

    /// Applies the fixes `served` needs, but those that did not help
    /// before; says once of each that fails or does not help.
    async fn fix(&mut self, served: &BTreeMap<String, setup::Served>) {
        let mut applied = Vec::new();
        for f in setup::fixes(served) {
            if self
                .futile
                .iter()
                .any(|(x, at)| *x == f && at.elapsed() < FUTILE_RETRY)
            {
                continue;
            }
            match setup::apply(&f).await {
                Ok(()) => {
                    self.failed.retain(|(x, _)| *x != f);
                    applied.push(f);
                }
                // Retried on the next check (it may pass then: a VIP held
                // back until ARP is put right by hand), said once.
                Err(e) => {
                    let e = format!("{e:#}");
                    if !self.failed.iter().any(|(x, was)| *x == f && *was == e) {
                        warn!(fix = %f, error = %e, "setting up");
                        self.failed.retain(|(x, _)| *x != f);
                        self.failed.push((f, e));
                    }
                }
            }
        }
        if applied.is_empty() {
            return;
        }
        let still = setup::fixes(served);
        for f in applied {
            if !still.contains(&f) {
                self.futile.retain(|(x, _)| *x != f);
                info!(fix = %f, "set up");
            } else if let Some((_, at)) = self.futile.iter_mut().find(|(x, _)| *x == f) {
                *at = Instant::now();
            } else {
                warn!(fix = %f, "set up, but the check still fails: applying it again only once a minute until the host passes");
                self.futile.push((f, Instant::now()));
            }
        }
    }
}

/// `lb agent --once`: checks the setup (putting it right with `fix`, or
/// saying what that would do with `dry_run`) and the local check, and
/// says what the agent would register.
async fn once(s: &Settings, options: &Options) -> Result<()> {
    let mut registrar = Registrar::new(s);
    let served = registrar.served().await?;
    for name in s.services.iter().filter(|n| !served.contains_key(*n)) {
        println!(
            "service {name}: not among the fleet's services (a registration would be refused)"
        );
    }
    let mut findings = setup::findings(&served);
    print!("{}", doctor::render(&findings));
    let fixes = setup::fixes(&served);
    if options.fix || options.dry_run {
        for f in &fixes {
            if options.dry_run {
                println!("would: {f}");
            } else {
                setup::apply(f).await?;
                println!("did: {f}");
            }
        }
        if !options.dry_run && !fixes.is_empty() {
            findings = setup::findings(&served);
            print!("{}", doctor::render(&findings));
        }
    }
    let check = check(&s.check, s).await;
    match &check {
        Ok(()) => println!("local check: passes"),
        Err(why) => println!("local check: fails: {why}"),
    }
    let ready = setup::passes(&findings) && check.is_ok();
    let at = match &s.target {
        Target::Fleet(f) => format!("under a {:?} lease at {}", f.lease, f.endpoints.join(", ")),
        Target::Daemon(d) => format!("with the lb at {}", d.address),
    };
    println!(
        "{} register {} for {} (weight {}) {at}",
        if ready { "would" } else { "would not" },
        s.address,
        s.services.join(", "),
        s.weight,
    );
    if !ready && !options.dry_run {
        anyhow::bail!("this host is not ready to take traffic");
    }
    Ok(())
}

/// What the agent reports of its host: the share of its weight, and
/// whether it is leaving.
struct Report {
    percent: AtomicU32,
    draining: AtomicBool,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            percent: AtomicU32::new(load::FULL),
            draining: AtomicBool::new(false),
        }
    }
}

impl Report {
    fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// The agent-check line (see [`crate::agent`]): the state, at 100 %.
    /// The load goes in the registration, which lb multiplies the weight
    /// by; the load here too would count it twice (50 % load: a quarter).
    /// 100 % rather than none, which lb reads as "keep the last percent":
    /// after an upgrade from an agent that sent its load here, that would
    /// stay applied for good.
    fn line(&self) -> String {
        if self.draining.load(Ordering::Relaxed) {
            "100% drain\n".into()
        } else {
            "100% ready\n".into()
        }
    }
}

/// A listener on `port` of every address: both families where the host
/// has IPv6 (IPV6_V6ONLY cleared, whatever `net.ipv6.bindv6only` says), else
/// IPv4 alone.
fn listen_any(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let listen = |socket: tokio::net::TcpSocket, addr: SocketAddr| {
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    let dual = tokio::net::TcpSocket::new_v6().and_then(|socket| {
        let off: libc::c_int = 0;
        crate::probe::set_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &off)?;
        listen(socket, (Ipv6Addr::UNSPECIFIED, port).into())
    });
    dual.or_else(|_| {
        listen(
            tokio::net::TcpSocket::new_v4()?,
            (Ipv4Addr::UNSPECIFIED, port).into(),
        )
    })
}

/// Connections waiting to be accepted by the agent-check listener.
const LISTEN_BACKLOG: u32 = 128;

/// Answers every connection to `port` with the agent-check line, for a
/// standalone lb whose service has `[service.agent]`.
async fn serve_agent_check(port: u16, report: Arc<Report>) -> Result<()> {
    let listener =
        listen_any(port).with_context(|| format!("listening for agent checks on port {port}"))?;
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = crate::listen::accept("agent check", || listener.accept()).await;
            let line = report.line();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(AGENT_WRITE, conn.write_all(line.as_bytes())).await;
            });
        }
    });
    Ok(())
}

/// Samples the host's load every `interval` into `report`, in a task of
/// its own and on a blocking thread: `/proc/net/tcp{,6}` on a host with
/// many sockets takes a while to read, and nothing need wait for it.
fn spawn_meter(mut meter: Meter, report: Arc<Report>) {
    tokio::spawn(async move {
        loop {
            let interval = meter.settings.interval;
            let sampled = tokio::task::spawn_blocking(move || {
                let p = meter.sample();
                (meter, p)
            })
            .await;
            let Ok((m, p)) = sampled else {
                // A low figure must not stick with nothing to lower it.
                warn!("sampling the host's load failed: its whole weight from now on");
                report.percent.store(load::FULL, Ordering::Relaxed);
                return;
            };
            meter = m;
            if let Some(p) = p
                && p != report.percent()
            {
                info!(percent = p, "weight by load");
                report.percent.store(p, Ordering::Relaxed);
            }
            tokio::time::sleep(interval).await;
        }
    });
}

/// Samples the host's load.
struct Meter {
    settings: LoadSettings,
    cpu: Option<load::CpuTimes>,
    /// The percent reported.
    current: u32,
}

impl Meter {
    fn new(settings: LoadSettings) -> Meter {
        Meter {
            settings,
            cpu: None,
            current: load::FULL,
        }
    }

    /// The percent the host's load leaves, when a reading can be taken
    /// (CPU time needs two).
    fn sample(&mut self) -> Option<u32> {
        let mut busy: f64 = 0.0;
        if self.settings.cpu {
            let now = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|t| load::cpu_times(&t))?;
            let before = self.cpu.replace(now);
            busy = busy.max(load::cpu_busy(before?, now)?);
        }
        if let Some((port, full)) = self.settings.connections {
            let established: u64 = ["/proc/net/tcp", "/proc/net/tcp6"]
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .map(|t| load::established_to(&t, port))
                .sum();
            busy = busy.max(established as f64 / full as f64);
        }
        self.current = load::next(
            self.current,
            busy,
            self.settings.min_percent,
            self.settings.step,
        );
        Some(self.current)
    }
}

/// Renews what the registrar holds every [`keep_alive_period`] of its
/// lease while the agent is busy with something else: a check may hang to
/// its timeout and the setup take its time, and a renewal once a check
/// only would let a short lease lapse (every node would drop the backend
/// and re-hash its flows).
struct KeepAlive {
    /// The last renewal, or step that renewed (or tried to).
    last: Instant,
    /// The percent the registration was last held with (a daemon's
    /// renewal carries it).
    percent: u32,
}

impl KeepAlive {
    fn new() -> KeepAlive {
        KeepAlive {
            last: Instant::now(),
            percent: load::FULL,
        }
    }

    /// A check's step just renewed (or left) with `percent`.
    fn held(&mut self, percent: u32) {
        self.last = Instant::now();
        self.percent = percent;
    }

    /// Renews what is registered now; a failure waits for the next
    /// renewal or check.
    async fn renew(&mut self, registrar: &mut Registrar) {
        self.last = Instant::now();
        if let Err(e) = registrar.renew(false, self.percent).await {
            warn!(error = %format!("{e:#}"), "renewing the registration: retrying");
        }
    }

    /// Runs `work`, renewing whenever a renewal is due until it is done.
    /// A renewal under way is finished, not dropped: an etcd answer left
    /// unread would be taken for the next renewal's.
    async fn alongside<T>(
        &mut self,
        registrar: &mut Registrar,
        work: impl Future<Output = T>,
    ) -> T {
        let done = tokio::sync::Notify::new();
        let work = async {
            let out = work.await;
            done.notify_one();
            out
        };
        let keep = async {
            loop {
                // The lease may be learnt (from a daemon's answer) on the way.
                let due = registrar.lease().map(|l| self.last + keep_alive_period(l));
                let wait = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    () = done.notified() => return,
                    () = wait => self.renew(registrar).await,
                }
            }
        };
        tokio::join!(work, keep).0
    }
}

/// Between renewals of a `lease`: a third, so one renewal lost or slow
/// (an etcd call may take [`crate::fleet::store::CALL_TIMEOUT`]) still
/// leaves the next in time, as lb nodes renew theirs.
fn keep_alive_period(lease: Duration) -> Duration {
    lease / 3
}

/// Marks the backend draining and waits until the fleet's nodes report
/// none of its flows left, or `drain_timeout`; keeps the lease alive
/// meanwhile.
async fn drain(registrar: &mut Registrar, s: &Settings, percent: u32) {
    // None: a timeout past what the clock holds, which is no timeout.
    let deadline = Instant::now().checked_add(s.drain_timeout);
    // What was last said.
    let mut last: Option<FlowsLeft> = None;
    loop {
        match registrar.hold(true, percent).await {
            Ok(()) => match registrar.flows_left().await {
                Ok(FlowsLeft::Counted(0)) => {
                    info!("every lb node reports no flow left");
                    return;
                }
                Ok(left) => {
                    if last != Some(left) {
                        match left {
                            FlowsLeft::Counted(n) => info!(flows = n, "waiting for flows to end"),
                            FlowsLeft::Uncounted => {
                                info!("waiting for every lb node to apply the drain");
                            }
                            FlowsLeft::NoNodes => warn!(
                                "no lb node reports (cut off from etcd, or restarting): waiting for their count, at most drain_timeout"
                            ),
                        }
                        last = Some(left);
                    }
                }
                Err(e) => warn!(error = %format!("{e:#}"), "reading the fleet's reports"),
            },
            Err(e) => {
                warn!(error = %format!("{e:#}"), "renewing the draining registration: retrying");
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            warn!(
                left = ?last,
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

/// Runs `argv`, killed after `limit` with what it started: it runs in a
/// process group of its own, so a script's children (a `curl` without a
/// timeout) do not outlive it, one more each check.
async fn command(argv: &[String], limit: Duration) -> Result<(), String> {
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{}: {status}", argv[0])),
        Ok(Err(e)) => Err(format!("{}: {e}", argv[0])),
        Err(_) => {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) of the group this child leads; the child
                // is not reaped yet, so its PID (the group's id) is not
                // reused.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            Err(format!("{}: still running after {limit:?}", argv[0]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a process runs with exactly `argv`.
    fn running(argv: &[&str]) -> bool {
        let wanted: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == wanted))
    }

    #[test]
    fn the_lease_is_renewed_every_third_of_it() {
        assert_eq!(
            keep_alive_period(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(
            keep_alive_period(Duration::from_secs(1)),
            Duration::from_nanos(333_333_333)
        );
    }

    #[tokio::test]
    async fn slow_work_does_not_hold_the_renewal_back() {
        let secret = || crate::registration::Secret::new(b"0123456789abcdef0123").unwrap();
        let requests = Arc::new(AtomicU32::new(0));
        let address = direct::tests::daemon_port(secret(), Some(300), requests.clone()).await;
        let mut registrar = Registrar::Direct(direct::tests::registrar(address, secret()));
        let mut keep = KeepAlive::new();
        let slow = |ms| tokio::time::sleep(Duration::from_millis(ms));
        // Not registered: nothing to keep alive.
        keep.alongside(&mut registrar, slow(250)).await;
        assert_eq!(requests.load(Ordering::Relaxed), 0);
        registrar.hold(false, load::FULL).await.unwrap();
        keep.held(load::FULL);
        // A check hanging past the lease (300 ms: renewed every 100 ms).
        keep.alongside(&mut registrar, slow(650)).await;
        let renewals = requests.load(Ordering::Relaxed) - 1;
        assert!(renewals >= 3, "{renewals} renewals in 650 ms");
        assert!(registrar.registered());
    }

    #[tokio::test]
    async fn a_command_past_its_limit_is_killed_with_what_it_started() {
        // A time no other process sleeps for.
        let time = format!("97.{}", std::process::id());
        let script = format!("sleep {time} & wait");
        let argv = ["sh", "-c", &script].map(String::from);
        let err = command(&argv, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.contains("still running"), "{err}");
        let gone = Instant::now();
        while running(&["sleep", &time]) {
            assert!(
                gone.elapsed() < Duration::from_secs(2),
                "its sleep outlived it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
