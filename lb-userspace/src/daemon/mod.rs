//! `lb daemon`: owns the data plane, applies the configuration, probes
//! backends, serves the control API, reloads on SIGHUP. On exit (SIGTERM,
//! SIGINT, or a kill) the program and maps stay pinned and attached, so
//! forwarding continues; the next daemon adopts them.
//!
//! - `controller`: configuration + overrides + health → maps (the core).
//! - `fleet`: a fleet node's link to etcd (state in, changes out, report).
//! - `runtime`: operator overrides and ids, persisted.
//! - `node`: the node's announcements and drain.
//! - `probers`: one probe task per backend.
//! - `views`: answers to the API's questions.
//! - `history`: the counters' last minute, for rates.
//! - `http`: the status page (`status`) and Prometheus metrics (`metrics`).
//! - `events`: recent events, for the status page.

pub mod controller;
mod durable;
pub(crate) mod events;
mod fleet;
mod flows;
mod history;
mod http;
mod metrics;
mod node;
mod probers;
pub mod registrations;
pub mod runtime;
mod status;
mod views;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::unix::fs::FileTypeExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::XdpMode;
use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use sd_notify::NotifyState;
use tokio::{
    io::{AsyncWriteExt as _, Interest, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot, watch},
};
use tracing::{error, info, warn};

use crate::{
    api::{self, Request, Response},
    config::{self, Desired, XdpModeSetting},
    config_edit::Edit,
    dataplane::{self, Dataplane, KernelLog, KernelLogLevel, Repair},
    fleet::registry,
    neighbor,
};
use controller::Controller;
use fleet::FleetNode;
use runtime::Runtime;

/// How often next-hop MACs are re-read from the neighbour table.
const MAC_REFRESH: Duration = Duration::from_secs(10);
/// How long a burst of neighbour and route changes is let settle before
/// the next hops are resolved again.
const NEXT_HOP_SETTLE: Duration = Duration::from_millis(100);
/// How often slow-start ramps advance (their steps are seconds long).
const SLOW_START_TICK: Duration = Duration::from_millis(250);
/// How often the daemon checks that its interfaces still have the program
/// and its pins are still there (see `Dataplane::repair`), and advances the
/// data plane's clock (`ConntrackSettings::now`, whole seconds).
const REPAIR_TICK: Duration = Duration::from_secs(1);

/// What `lb daemon` is started with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The configuration file.
    pub config: PathBuf,
    /// Where maps and links are pinned.
    pub pin_dir: PathBuf,
}

/// The attach mode aya takes for the setting.
pub(crate) fn xdp_mode(m: XdpModeSetting) -> XdpMode {
    match m {
        // The kernel picks driver mode when the driver has it.
        XdpModeSetting::Auto => XdpMode::Default,
        XdpModeSetting::Native => XdpMode::Driver,
        XdpModeSetting::Generic => XdpMode::Skb,
    }
}

/// Reads and validates a configuration file, its CA files included.
pub fn load_config(path: &Path) -> Result<Desired> {
    let (_, desired) = ConfigFile::read(path)?;
    crate::probe::load_ca_files(&desired, None)?;
    Ok(desired)
}

/// The configuration file and the text the daemon runs. The file always
/// holds what runs: `apply` and `service|backend add|del` write their text
/// back, so a reload or restart keeps them.
pub(crate) struct ConfigFile {
    path: PathBuf,
    text: String,
    /// What the file held when lb last read or wrote it: `text`, unless
    /// a change went live and its text could not be saved.
    saved: String,
}

impl ConfigFile {
    /// Reads and validates the file (its CA files are the caller's to
    /// read: a fleet node's reload reads them for the fleet's services).
    fn read(path: &Path) -> Result<(ConfigFile, Desired)> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let desired =
            config::parse(&text).map_err(|e| anyhow!("{} is invalid:\n{e}", path.display()))?;
        runtime::check_apart_from(&desired.settings.state_file, path)?;
        let file = ConfigFile {
            path: path.to_path_buf(),
            saved: text.clone(),
            text,
        };
        Ok((file, desired))
    }

    /// The text running now.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Whether the file holds other text than lb last read or wrote there,
    /// than what runs (saved by hand after lb could not) and than `text`:
    /// edited by hand since. (A file that cannot be read,
    /// or is no regular file, holds no edit to keep.)
    fn edited_on_disk(&self, text: &str) -> bool {
        std::fs::metadata(&self.path)
            .is_ok_and(|m| m.is_file())
            .then(|| std::fs::read_to_string(&self.path).ok())
            .flatten()
            .is_some_and(|on_disk| ![&self.saved, &self.text, text].contains(&&*on_disk))
    }

    /// Whether a change runs that the file lacks (its save failed).
    fn unsaved(&self) -> bool {
        self.text != self.saved
    }

    /// Makes `text` the running configuration with `change`, then the
    /// file's content. The new text is written beside the file first, so a
    /// file that cannot be written refuses the change before anything
    /// changes; the rename that follows a successful change is atomic. A
    /// file edited since it was loaded refuses the change too: writing
    /// over it would drop those edits unseen. A link is followed, so the
    /// file it names is replaced (with its mode and owner), not the link.
    pub(crate) fn replace<T>(
        &mut self,
        text: String,
        change: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if self.edited_on_disk(&text) {
            bail!(
                "{} was edited since lb loaded it, and this change would write over those edits: \
                 apply them first (`lb reload`, which `lb check-config` checks) or undo them; \
                 nothing changed",
                self.path.display()
            );
        }
        let target = std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone());
        let tmp = target.with_extension("lb-new");
        if let Err(e) = durable::write_synced_like(&tmp, text.as_bytes(), &target) {
            let _ = std::fs::remove_file(&tmp);
            return Err(anyhow::Error::new(e).context(format!(
                "cannot write beside {} (the change would be lost at the next restart); nothing changed",
                target.display()
            )));
        }
        let result = change();
        if result.is_ok() {
            // Live from here: the next edit builds on this text, whether or
            // not the file could take it.
            self.text = text;
            durable::rename_synced(&tmp, &target).with_context(|| {
                format!(
                    "the change is live, but replacing {} failed: the next change saves it, \
                     and `lb reload` would take the file as it is",
                    self.path.display()
                )
            })?;
            self.saved = self.text.clone();
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn dataplane_settings(d: &Desired) -> lb_common::Settings {
    lb_common::Settings {
        mtu: d.settings.mtu.unwrap_or(0),
        tunnel_src_v4: d.settings.tunnel_source_v4.0,
        tunnel_src_v4_hash_mask: d.settings.tunnel_source_v4.1,
        tunnel_src_v6: d.settings.tunnel_source_v6.0,
        tunnel_src_v6_hash_mask: d.settings.tunnel_source_v6.1,
        gue_port: d.settings.gue_port.to_be(),
        _pad: [0; 2],
    }
}

/// The connection-table settings `d` asks for, with the clock at now.
fn conntrack_settings(d: &Desired) -> lb_common::ConntrackSettings {
    let t = d.settings.conntrack_timeouts;
    lb_common::ConntrackSettings {
        inserts_per_cpu: d.settings.conntrack_inserts_per_cpu,
        closed_timeout: t.tcp_closed,
        tcp_idle_timeout: t.tcp_idle,
        udp_idle_timeout: t.udp_idle,
        now: crate::dataplane::monotonic_seconds(),
        // The data plane's own (`Dataplane::set_conntrack_settings`).
        buckets: 0,
    }
}

/// Backends a configuration change would add whose next-hop MAC is not
/// known yet. They are resolved before the change, so the change (and its
/// dry run) counts the slots they take at once instead of leaving them out
/// until the next MAC refresh. Invalid changes yield none: they fail later.
fn unresolved_backends(
    request: &Request,
    file: &ConfigFile,
    fleet: Option<&FleetNode>,
    ctl: &Controller,
) -> Vec<IpAddr> {
    let proposed = match (fleet, request) {
        (Some(f), _) => f.proposed(request),
        (None, Request::Apply { config, .. }) => config::parse(config).ok(),
        (None, Request::Edit { edit, .. }) => edit
            .apply_to(file.text())
            .ok()
            .and_then(|text| config::parse(&text).ok()),
        _ => None,
    };
    // Only backends the change adds: one already configured whose MAC is
    // unknown (its route moved to an interface lb is not on) is out of the
    // tables, and must not hold up unrelated changes.
    let configured: BTreeSet<IpAddr> = backend_addrs(ctl.desired()).into_iter().collect();
    proposed
        .map(|d| {
            backend_addrs(&d)
                .into_iter()
                .filter(|ip| !ctl.has_mac(*ip) && !configured.contains(ip))
                .collect()
        })
        .unwrap_or_default()
}

fn backend_addrs(d: &Desired) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = d
        .services
        .values()
        .flat_map(|s| s.backends.keys().copied())
        .collect();
    set.into_iter().collect()
}

/// The mask the control socket is created under: mode 0600.
const SOCKET_UMASK: libc::mode_t = 0o177;

/// An error while a daemon answers on `path`.
fn refuse_if_served(path: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("another daemon is serving {}", path.display());
    }
    Ok(())
}

/// Binds the control socket, mode 0600: only root can use the API.
fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    refuse_if_served(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a stale socket is ours to remove: never a file the setting
        // names by mistake (the state file, say).
        if !meta.file_type().is_socket() {
            bail!(
                "{} is not a socket: settings.socket must name a path of its own",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // Created 0600 under a mask for the bind alone, not chmod-ed after: a
    // connection made while others could use the socket would stay open
    // once the mode was tightened. The mask is the whole process's, but
    // every file the daemon writes is written from this task.
    // SAFETY: umask only swaps the process's mask; it is put back below.
    let umask = unsafe { libc::umask(SOCKET_UMASK) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    bound.with_context(|| format!("binding {}", path.display()))
}

type Call = (Request, oneshot::Sender<Response>);

/// A call, with the next hops of the backends it adds resolved (`None`
/// when it adds no unresolved one).
struct ResolvedCall {
    request: Request,
    reply: oneshot::Sender<Response>,
    new: Vec<IpAddr>,
    hops: Option<neighbor::Resolution>,
}

async fn serve_connection(mut stream: UnixStream, calls: mpsc::Sender<Call>) {
    let response = match tokio::time::timeout(api::TIMEOUT, api::read_request(&mut stream)).await {
        Err(_) => Response {
            error: Some("request timed out".into()),
            data: Default::default(),
        },
        Ok(Err(e)) => Response {
            error: Some(format!("{e:#}")),
            data: Default::default(),
        },
        Ok(Ok(request)) => {
            let (tx, rx) = oneshot::channel();
            if calls.send((request, tx)).await.is_err() {
                return;
            }
            match rx.await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Ok(bytes) = serde_json::to_vec(&response) {
        let _ = stream.write_all(&bytes).await;
    }
}

/// How the daemon's start went, for `lb status`: what it was started
/// with, and where the time went before it answered, phase by phase.
pub(super) struct Startup {
    /// The daemon's options.
    pub(super) options: Options,
    /// When it began answering.
    pub(super) answering: Instant,
    /// Each phase (in order) and how long it took.
    pub(super) phases: Vec<(&'static str, Duration)>,
}

impl Startup {
    /// The phases in milliseconds, and their total.
    pub(super) fn to_json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        // Tenths of a millisecond.
        let ms = |d: Duration| serde_json::json!((d.as_secs_f64() * 1e4).round() / 10.0);
        for (name, took) in &self.phases {
            out.insert(format!("{name}_ms"), ms(*took));
        }
        out.insert(
            "total_ms".into(),
            ms(self.phases.iter().map(|(_, took)| *took).sum()),
        );
        serde_json::Value::Object(out)
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> Result<()> {
    // SIGHUP's default action ends the process: a reload asked for while
    // the daemon starts waits for it to serve instead.
    let mut hup = signal(SignalKind::hangup())?;
    let mut phase = Instant::now();
    let mut phases = Vec::new();
    let mut timed = |name: &'static str| {
        let now = Instant::now();
        phases.push((name, now - phase));
        phase = now;
    };
    let (mut file, local) = ConfigFile::read(&opts.config)?;
    crate::probe::load_ca_files(&local, None)?;
    timed("config");
    let settings = local.settings.clone();
    // Every interface before anything is written: one that cannot be
    // attached refuses the start with the pins and tables untouched, not
    // after the first interfaces forward with the new tables.
    for iface in &settings.interfaces {
        dataplane::check_interface(iface, xdp_mode(settings.xdp_mode))?;
    }
    // The XDP program's own lines cost ring-buffer writes per dropped
    // packet: only a daemon logging at debug level asks for them.
    let kernel_debug = tracing::enabled!(target: KERNEL_LOG_TARGET, tracing::Level::DEBUG);
    let level = if kernel_debug {
        KernelLogLevel::Debug
    } else {
        KernelLogLevel::Off
    };
    // Refused here, before the pins, the links or the routes are touched,
    // while another daemon runs on the same pins or socket; the socket is
    // bound only once the program is attached, so it is checked now too.
    let _claim = Dataplane::claim_pin_dir(&opts.pin_dir)?;
    refuse_if_served(&settings.socket)?;
    let (mut dp, adopted) = Dataplane::load_pinned(settings.capacity, &opts.pin_dir, level)?;
    timed("load");
    if kernel_debug {
        tokio::spawn(forward_kernel_log(dp.kernel_log()?));
    }
    let mut runtime = Runtime::load(&settings.state_file)?;
    // Held registrations get their leases once the port opens.
    if settings.registration.is_none() {
        runtime.registered.clear();
    }
    timed("state");
    // A fleet node's services come from etcd (or, unreachable, its cache).
    let fleet_start = match &settings.fleet {
        Some(f) => Some(fleet::start(f, file.text(), local.clone(), runtime.fleet.clone()).await),
        None => None,
    };
    if fleet_start.is_some() {
        timed("fleet");
    }
    let configured = fleet_start.as_ref().map_or(local, |s| s.desired.clone());
    let (desired, admitted) = admit_registrations(configured, &runtime.registered);
    let fleet_health = fleet_start.as_ref().map(|s| {
        if let Some(state) = &s.state {
            runtime.overrides = state.overrides.clone();
            // Read from etcd: the state applied last from now on. Left to
            // the session, an unchanged first read would never cache it,
            // and a later start without etcd would go back to an older one.
            if s.fresh {
                runtime.fleet = Some(state.clone());
            }
        }
        fleet::health_of(s.state.as_ref(), !s.fresh)
    });
    dp.set_settings(dataplane_settings(&desired))?;
    dp.set_conntrack_settings(conntrack_settings(&desired))?;
    let resolver = neighbor::Resolver::open()?;
    let hops = resolver.resolve_all(backend_addrs(&desired)).await;
    timed("next_hops");
    let (mut ctl, report) = Controller::new(dp, desired, runtime, hops, fleet_health)?;
    if let Some((configured, refused)) = admitted {
        ctl.set_configured(configured, refused);
    }
    timed("tables");
    for iface in &settings.interfaces {
        let pin = opts.pin_dir.join(format!("link-{iface}"));
        let port = settings
            .port_of(iface)
            .context("an interface without a port")?;
        ctl.dataplane_mut()
            .attach(iface, port, xdp_mode(settings.xdp_mode), Some(&pin))?;
        info!(interface = %iface, mode = ?settings.xdp_mode, pinned = %pin.display(), "attached");
    }
    // This version's program now runs in place of the previous one.
    // A carried table holds only entries this version reads; an adopted
    // one may hold older versions' entries, which are dropped.
    if let Some(late) = ctl.carry_late_flows()? {
        info!(
            late,
            "carried the connection-table entries the previous program wrote since"
        );
    } else if adopted {
        let dropped = ctl.dataplane_mut().conntrack_clear_unreadable()?;
        if dropped > 0 {
            warn!(
                dropped,
                "connection-table entries this version cannot read (an earlier version placed them) were dropped; their flows follow the Maglev tables, the same backend unless a table changed since they started"
            );
        }
    }
    timed("attach");
    info!(
        adopted,
        services = ctl.services().len(),
        changes = report.changes.len(),
        "daemon ready"
    );
    let (mut fleet_node, mut fleet_events) = match (&settings.fleet, &fleet_start) {
        (Some(f), Some(start)) => {
            let bird = settings.announce.as_ref().map(|a| a.bird_socket.clone());
            let (link, events) =
                FleetNode::spawn(f.clone(), file.text().to_string(), bird, start, adopted);
            (Some(link), Some(events))
        }
        _ => (None, None),
    };
    let mut node = node::Node::start(settings.announce.clone())?;
    update_node(&mut node, &ctl, fleet_node.as_ref());

    let listener = bind_socket(&settings.socket)?;
    let (call_tx, mut calls) = mpsc::channel::<Call>(64);
    tokio::spawn(async move {
        loop {
            let (stream, _) = crate::listen::accept("control", || listener.accept()).await;
            tokio::spawn(serve_connection(stream, call_tx.clone()));
        }
    });

    let (mut registration_port, mut registration_requests) = match &settings.registration {
        Some(port) => {
            let (tx, rx) = mpsc::channel(64);
            let refused = registrations::start(port, tx).await?;
            // The leases restored at start ran through the tables' build
            // and the attach: each gets a whole lease from the moment its
            // agent can renew it, so a restart keeps registered backends.
            let mut held = ctl.runtime().registered.clone();
            registrations::renew_all(&mut held, port.lease);
            ctl.set_registered(held);
            (
                Some((registrations::Port::new(port.lease), refused)),
                Some(rx),
            )
        }
        None => (None, None),
    };

    let (ask_tx, mut asks) = mpsc::channel::<http::Ask>(16);
    if let Some(addr) = settings.metrics.addr() {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                info!(%addr, "serving the status page at / and metrics at /metrics");
                tokio::spawn(http::serve(listener, ask_tx));
            }
            // Only an address the operator chose is worth not starting for.
            Err(e) if settings.metrics == config::Listen::Default => warn!(
                %addr, error = %e,
                "no status page or metrics: the default address is taken (set settings.metrics to another, or to \"off\")"
            ),
            Err(e) => return Err(anyhow!(e).context(format!("binding settings.metrics {addr}"))),
        }
    }
    let mut history = history::History::default();
    let mut probe_durations = metrics::ProbeDurations::default();
    // The connection table's counts, read at most once a second.
    let mut summary = flows::SummaryCache::default();

    let (probe_tx, mut results) = mpsc::channel(1024);
    let mut probers = probers::Probers::new(probe_tx, &ctl);
    probers.sync(&ctl);

    let (addrs_tx, addrs_rx) = watch::channel(backend_addrs(ctl.desired()));
    let (mac_tx, mut mac_updates) = mpsc::channel(4);
    tokio::spawn(refresh_macs(addrs_rx, mac_tx));

    // Attached, tables live, the socket and the status page answering:
    // systemd (Type=notify) may start what depends on lb, and `systemctl
    // reload` may call `lb reload`. Outside systemd this does nothing.
    let ready = format!("serving {} services", ctl.services().len());
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&ready)]) {
        warn!(error = %e, "telling systemd the daemon is ready");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    timed("serve");
    let startup = Startup {
        options: opts.clone(),
        answering: Instant::now(),
        phases,
    };
    let mut ramp = tokio::time::interval(SLOW_START_TICK);
    let mut repair = tokio::time::interval(REPAIR_TICK);
    // After a stall (a large reload, a conntrack flush), one tick, not a
    // burst of them: each repairs everything, and each takes a history
    // sample, whose rates would then span milliseconds.
    for tick in [&mut ramp, &mut repair] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut resolving: FuturesUnordered<BoxFuture<'static, ResolvedCall>> = FuturesUnordered::new();
    loop {
        let health_due = ctl.health_changes_due();
        tokio::select! {
            _ = tokio::time::sleep_until(health_due.unwrap_or_else(Instant::now).into()), if health_due.is_some() => {
                ctl.flush_health_changes();
            }
            Some((request, reply)) = calls.recv() => {
                let new = unresolved_backends(&request, &file, fleet_node.as_ref(), &ctl);
                let resolver = resolver.clone();
                // Resolving waits for the neighbours (half a second for a
                // silent one): off the loop, so probes, scrapes, upkeep and
                // other calls go on. A client waits for each answer, so its
                // own calls keep their order.
                resolving.push(async move {
                    let hops = if new.is_empty() {
                        None
                    } else {
                        Some(resolver.resolve_all(new.clone()).await)
                    };
                    ResolvedCall { request, reply, new, hops }
                }.boxed());
            }
            Some(ResolvedCall { request, reply, new, hops }) = resolving.next(), if !resolving.is_empty() => {
                if let Some(hops) = hops
                    && let Err(e) = ctl.set_next_hops(hops)
                {
                    error!(error = %format!("{e:#}"), "applying next hops");
                }
                let trusted = match &request {
                    Request::Edit {
                        edit: Edit::AddBackend { service, address, trust_first_probe: true, .. },
                        dry_run: false,
                    } => Some((service.clone(), *address)),
                    _ => None,
                };
                if let Some((service, address)) = &trusted {
                    ctl.trust_first_probe(service, *address, true);
                }
                // Nothing half-applied: a change that adds a backend lb
                // cannot reach through its interfaces is refused whole.
                let unattached: Vec<String> = new.iter().filter_map(|ip| ctl.unattached(*ip)).collect();
                let view = request.is_view();
                let result = match fleet_node.as_mut() {
                    _ if !unattached.is_empty() => Err(anyhow!("{}", unattached.join("\n"))),
                    _ if request == Request::Reload => reload(&mut ctl, &mut file, fleet_node.as_mut())
                        .inspect(log_reload)
                        .map_err(|e| e.context("reload refused; running configuration unchanged"))
                        .and_then(|report| Ok(serde_json::to_value(report)?)),
                    Some(f) if FleetNode::handles(&request) => f.handle(&mut ctl, &node, request).await,
                    _ => views::handle(&mut ctl, &mut node, &mut file, request, &startup, &history, &mut summary),
                };
                if let (Some((service, address)), Err(_)) = (&trusted, &result) {
                    ctl.trust_first_probe(service, *address, false);
                }
                // A count read before a drain could miss flows pinned just
                // before it: `drain --wait` asks next.
                if !view {
                    summary.forget();
                }
                let response = match result {
                    Ok(data) => Response { error: None, data },
                    Err(e) => Response { error: Some(format!("{e:#}")), data: Default::default() },
                };
                let _ = reply.send(response);
                probers.sync(&ctl);
                publish_addrs(&addrs_tx, &ctl);
            }
            Some(result) = results.recv() => {
                if probers.is_stale(&result) {
                    continue;
                }
                let probers::Result { service, backend, report, .. } = result;
                // Whether the result may have changed what the node serves.
                let changed = match report {
                    probers::Report::Probe(report) => {
                        probe_durations.observe(&service, backend, report.latency);
                        ctl.record_probe(&service, backend, report).map(|c| c.is_some())
                    }
                    probers::Report::Agent(answer) => {
                        ctl.record_agent(&service, backend, answer).map(|()| true)
                    }
                };
                if let Err(e) = &changed {
                    error!(error = %format!("{e:#}"), "applying a probe or agent result");
                }
                probers.update(&ctl, &service, backend);
                // A result that changes no state costs O(1): the node's
                // decisions (O(backends)) stand.
                if matches!(changed, Ok(false)) {
                    continue;
                }
            }
            Some(request) = next_of(&mut registration_requests) => {
                let registrations::Request { message, peer, reply } = request;
                if let Some((port, _)) = registration_port.as_mut() {
                    let _ = reply.send(port.receive(&mut ctl, message, peer, &mut summary));
                }
                probers.sync(&ctl);
                publish_addrs(&addrs_tx, &ctl);
            }
            Some((page, reply)) = asks.recv() => {
                let status = node.status(&ctl);
                let answer = summary.get(&ctl).and_then(|flows| match page {
                    http::Page::Metrics => {
                        let fleet = fleet_node.as_ref().map(FleetNode::gauges);
                        let registration = registration_port
                            .as_ref()
                            .map(|(port, refused)| port.gauges(&ctl, refused));
                        metrics::render(&ctl, &status, fleet, registration, &mut probe_durations, flows)
                    }
                    http::Page::Status => status::snapshot(&ctl, &status, &history, startup.answering, flows)
                        .map(|v| v.to_string()),
                });
                match answer {
                    Ok(text) => { let _ = reply.send(text); }
                    Err(e) => error!(error = %format!("{e:#}"), page = ?page, "answering an HTTP request"),
                }
            }
            Some(hops) = mac_updates.recv() => {
                if let Err(e) = ctl.set_next_hops(hops) {
                    error!(error = %format!("{e:#}"), "applying next hops");
                }
                // Probes through the VIP route by the next hops.
                probers.sync(&ctl);
            }
            _ = ramp.tick() => {
                if let Err(e) = ctl.advance_slow_start() {
                    error!(error = %format!("{e:#}"), "advancing slow start");
                }
            }
            _ = repair.tick() => {
                // The data plane's clock, for aging the connection table.
                let ct = conntrack_settings(ctl.desired());
                if let Err(e) = ctl.dataplane_mut().set_conntrack_settings(ct) {
                    error!(error = %format!("{e:#}"), "advancing the data plane's clock");
                }
                match ctl.dataplane_mut().repair(Some(&opts.pin_dir)) {
                    Ok(done) => done.iter().for_each(log_repair),
                    Err(e) => error!(error = %format!("{e:#}"), "repairing the data plane; retrying in 1 s"),
                }
                ctl.warn_short_tunnel_mtus();
                ctl.save_history();
                // Unscraped, the histograms of removed backends would pile
                // up (registrations come and go).
                probe_durations.retain(&ctl);
                // Agents' answers and load feedback held back by their
                // service's rebuild limit.
                if let Err(e) = ctl.apply_weight_changes() {
                    error!(error = %format!("{e:#}"), "applying weight changes");
                }
                if ctl.weighs_by_flows() {
                    let active = summary.get(&ctl);
                    if let Err(e) = active.and_then(|s| ctl.observe_active_flows(&s.active)) {
                        error!(error = %format!("{e:#}"), "weighing backends by their active flows");
                    }
                }
                node.observe_flows(&ctl);
                if let Some((port, _)) = registration_port.as_mut() {
                    match port.expire(&mut ctl) {
                        Ok(true) => {
                            probers.sync(&ctl);
                            publish_addrs(&addrs_tx, &ctl);
                        }
                        Ok(false) => {}
                        Err(e) => error!(error = %format!("{e:#}"), "removing lapsed registrations"),
                    }
                }
                if let Some(f) = fleet_node.as_mut()
                    && let Err(e) = f.count_draining_flows(&ctl, &mut summary)
                {
                    error!(error = %format!("{e:#}"), "counting the flows of leaving backends");
                }
                match history::Sample::read(&ctl) {
                    Ok(sample) => history.push(sample),
                    Err(e) => error!(error = %format!("{e:#}"), "reading the counters for their history"),
                }
            }
            Some(event) = next_of(&mut fleet_events) => {
                if let Some(f) = fleet_node.as_mut() {
                    f.on_event(&mut ctl, event);
                }
                probers.sync(&ctl);
                publish_addrs(&addrs_tx, &ctl);
            }
            _ = hup.recv() => {
                match reload(&mut ctl, &mut file, fleet_node.as_mut()) {
                    Ok(report) => log_reload(&report),
                    Err(e) => error!(error = %format!("{e:#}"), "reload refused; running configuration unchanged"),
                }
                probers.sync(&ctl);
                publish_addrs(&addrs_tx, &ctl);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        // Every event above can change what the node can serve.
        update_node(&mut node, &ctl, fleet_node.as_ref());
    }
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    let _ = std::fs::remove_file(&settings.socket);
    info!(pins = %opts.pin_dir.display(), "exiting: the data plane stays attached and keeps forwarding");
    Ok(())
}

/// Validates the file and applies only the difference. A fleet node's file
/// holds its own settings: it is validated with the fleet's services.
fn reload(
    ctl: &mut Controller,
    file: &mut ConfigFile,
    fleet: Option<&mut FleetNode>,
) -> Result<controller::ChangeReport> {
    let (read, desired) = ConfigFile::read(&file.path)?;
    if file.unsaved() && read.text != file.text {
        warn!(
            file = %file.path.display(),
            "reloading a file that lacks changes made at run time (their save failed): they are undone"
        );
    }
    let desired = match &fleet {
        Some(f) => f.with_node_text(read.text())?,
        None => desired,
    };
    // Every CA file again, unchanged checks' too: a reload is how a
    // rotated file comes into use (a fleet node's own file names none).
    crate::probe::load_ca_files(&desired, None)?;
    let report = apply_with_ca_files_read(ctl, desired, false)?;
    if let Some(f) = fleet {
        f.keep_node_text(read.text());
    }
    *file = read;
    Ok(report)
}

fn log_reload(report: &controller::ChangeReport) {
    info!(changes = report.changes.len(), "configuration reloaded");
}

/// Decides the node's announcements again and, in a fleet, publishes its report.
fn update_node(node: &mut node::Node, ctl: &Controller, fleet: Option<&FleetNode>) {
    let convergence = fleet.map(|f| f.convergence(ctl)).unwrap_or_default();
    node.update(ctl, &convergence);
    if let Some(f) = fleet {
        f.publish(ctl, node);
    }
}

/// The next message of a channel the daemon may not have (a fleet
/// session's events, a registration port's requests); never, without one.
async fn next_of<T>(receiver: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match receiver {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies a new configuration: settings that can change at run time (MTU,
/// tunnel sources) and the services; anything else is refused whole.
pub(crate) fn apply(
    ctl: &mut Controller,
    desired: Desired,
    dry_run: bool,
) -> Result<controller::ChangeReport> {
    crate::probe::load_ca_files(&desired, Some(ctl.desired()))?;
    apply_with_ca_files_read(ctl, desired, dry_run)
}

/// [`apply`] once the CA files `desired` needs are read.
fn apply_with_ca_files_read(
    ctl: &mut Controller,
    desired: Desired,
    dry_run: bool,
) -> Result<controller::ChangeReport> {
    let now = &ctl.desired().settings;
    let new = &desired.settings;
    if now.interfaces != new.interfaces
        || now.xdp_mode != new.xdp_mode
        || now.socket != new.socket
        || now.state_file != new.state_file
        || now.metrics != new.metrics
        || now.announce != new.announce
        || now.fleet != new.fleet
        || now.registration != new.registration
    {
        bail!(
            "interfaces, xdp_mode, socket, state_file, metrics, [announce], [fleet] and [registration] only change with a daemon restart"
        );
    }
    let (desired, admitted) = admit_registrations(desired, &ctl.runtime().registered);
    if dry_run {
        return ctl.apply(desired, true);
    }
    let before = (
        dataplane_settings(ctl.desired()),
        conntrack_settings(ctl.desired()),
    );
    let after = (dataplane_settings(&desired), conntrack_settings(&desired));
    // The settings first, and back as they were if the services cannot
    // follow (which undo their own writes): all or nothing.
    let applied = write_settings(ctl, after).and_then(|()| ctl.apply(desired.clone(), false));
    // Registered backends that waited for the ids this change freed take
    // them now. The change stands if this fails: they wait for the next.
    let applied = match applied {
        Ok(report) if !report.deferred.is_empty() => match ctl.apply(desired, false) {
            Ok(then) => Ok(report.then(then)),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "registered backends still wait for a backend id");
                Ok(report)
            }
        },
        other => other,
    };
    if let Err(e) = &applied
        && let Err(undo) = write_settings(ctl, before)
    {
        return Err(anyhow!(
            "{e:#}; putting the data-plane settings back failed too ({undo:#}): \
             `lb reload` writes the running configuration again"
        ));
    }
    if applied.is_ok()
        && let Some((configured, refused)) = admitted
    {
        for r in refused
            .iter()
            .filter(|r| !ctl.registrations_refused().contains(r))
        {
            warn!(reason = %r, "registration refused");
        }
        ctl.set_configured(configured, refused);
    }
    applied
}

/// A standalone daemon's registrations admitted into the operator's
/// services: the state to apply and, with a registration port, the
/// operator's own with the registrations refused, to record once it
/// applies. A fleet node's registrations came with the fleet's state
/// ([`fleet::desired_of`]), so its state is applied as it is.
fn admit_registrations(
    configured: Desired,
    held: &registrations::HeldRegistrations,
) -> (Desired, Option<(Desired, Vec<registry::Refused>)>) {
    if configured.settings.registration.is_none() {
        return (configured, None);
    }
    let mut desired = configured.clone();
    let refused = registry::admit(&mut desired, &registrations::registrations_of(held));
    (desired, Some((configured, refused)))
}

/// Makes `held` the standalone registrations and applies the operator's
/// services with them; returns the registrations not admitted. On failure
/// the registrations held before stay.
pub(crate) fn apply_registrations(
    ctl: &mut Controller,
    held: registrations::HeldRegistrations,
) -> Result<Vec<registry::Refused>> {
    let previous = ctl.set_registered(held);
    let configured = ctl.configured().clone();
    match apply(ctl, configured, false) {
        Ok(_) => Ok(ctl.registrations_refused().to_vec()),
        Err(e) => {
            ctl.set_registered(previous);
            Err(e)
        }
    }
}

/// Writes the data plane's settings and the connection table's.
fn write_settings(
    ctl: &mut Controller,
    (dp, ct): (lb_common::Settings, lb_common::ConntrackSettings),
) -> Result<()> {
    ctl.dataplane_mut().set_settings(dp)?;
    ctl.dataplane_mut().set_conntrack_settings(ct)
}

fn log_repair(r: &Repair) {
    match r {
        Repair::InterfaceGone(iface) => warn!(
            interface = %iface,
            "interface gone: nothing to forward on; the program is attached again when it returns"
        ),
        Repair::Reattached(iface) => {
            info!(interface = %iface, "interface re-created: attached again");
        }
        Repair::LinkRepinned(iface) => warn!(
            interface = %iface,
            "the link's pin was removed under the daemon: pinned again (forwarding never stopped)"
        ),
        Repair::InterfaceChanged(iface, now) => info!(
            interface = %iface,
            mac = %crate::netns::mac_string(&now.mac),
            mtu = now.mtu,
            "interface's MAC or MTU changed: the data plane takes frames to the new MAC and encapsulates up to the new MTU"
        ),
        Repair::MapsRepinned(maps) => warn!(
            maps = ?maps,
            "map pins were removed under the daemon: pinned again (forwarding never stopped)"
        ),
    }
}

/// The `log` target aya-log gives the XDP program's lines (its crate name).
const KERNEL_LOG_TARGET: &str = "lb_ebpf";

/// Forwards the XDP program's aya-log lines into the daemon's log as they
/// arrive (aya-log → `log` → tracing).
async fn forward_kernel_log(log: KernelLog) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the
    // same until the logger (owned by the AsyncFd) is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(log, Interest::READABLE) };
    let mut log = match registered {
        Ok(fd) => fd,
        Err(e) => return warn!(error = %e, "cannot watch the XDP program's log buffer"),
    };
    loop {
        match log.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => return warn!(error = %e, "reading the XDP program's log buffer"),
        }
    }
}

/// Tells the next-hop task the backends' addresses, if they changed: it
/// resolves them all again on every change it is told of.
fn publish_addrs(addrs: &watch::Sender<Vec<IpAddr>>, ctl: &Controller) {
    let now = backend_addrs(ctl.desired());
    addrs.send_if_modified(|cur| {
        let changed = *cur != now;
        if changed {
            *cur = now;
        }
        changed
    });
}

/// Resolves the backends' next hops again whenever the list of backends
/// changes, the kernel reports a neighbour or route change, and every
/// [`MAC_REFRESH`] regardless, and sends what it finds to the control loop.
async fn refresh_macs(
    mut addrs: watch::Receiver<Vec<IpAddr>>,
    out: mpsc::Sender<neighbor::Resolution>,
) {
    let (resolver, mut changes) = match neighbor::Resolver::watching() {
        Ok(r) => r,
        Err(e) => return error!(error = %format!("{e:#}"), "next hops will not be refreshed"),
    };
    loop {
        let list = addrs.borrow_and_update().clone();
        let last = resolver.resolve_all(list).await;
        if out.send(last.clone()).await.is_err() {
            return;
        }
        let refresh = tokio::time::sleep(MAC_REFRESH);
        tokio::pin!(refresh);
        loop {
            tokio::select! {
                _ = &mut refresh => break,
                _ = addrs.changed() => break,
                Some((change, _)) = changes.next() => if last.affected_by(&change) {
                    // One resolution for a burst of changes.
                    tokio::time::sleep(NEXT_HOP_SETTLE).await;
                    while let Some(Some(_)) = changes.next().now_or_never() {}
                    break;
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_change_is_what_the_next_edit_builds_on_even_if_the_file_refused_it() {
        let dir = std::env::temp_dir().join(format!("lb-config-file-{}", std::process::id()));
        // A non-empty directory where the file is: the rename fails.
        std::fs::create_dir_all(dir.join("lb.toml/in-the-way")).unwrap();
        let mut file = ConfigFile {
            path: dir.join("lb.toml"),
            text: "old".into(),
            saved: "old".into(),
        };
        let e = file.replace("new".into(), || Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("the change is live"), "{e:#}");
        assert_eq!(file.text(), "new");
        assert!(file.unsaved());
        // The file as lb last saved it is no hand edit: the next change
        // goes through, and saves both.
        std::fs::remove_dir_all(dir.join("lb.toml")).unwrap();
        std::fs::write(dir.join("lb.toml"), "old").unwrap();
        file.replace("newer".into(), || Ok(())).unwrap();
        assert!(!file.unsaved());
        assert_eq!(
            std::fs::read_to_string(dir.join("lb.toml")).unwrap(),
            "newer"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
