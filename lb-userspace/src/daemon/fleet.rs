//! A fleet node's side of the daemon: applies the fleet's state as the
//! background session reads it, turns operators' changes into etcd writes
//! guarded by the revision this node applied, publishes this node's report,
//! and says whether this node has converged with the others (see
//! [`crate::announce`]).
//!
//! Every change, made here or on another node, reaches the tables the same
//! way: a read of the prefix, validated as a whole against this node's own
//! settings and applied, or refused and reported with the last good state
//! kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{
    controller::{BackendState, ChangeReport, Controller, FleetHealth, digest_text},
    flows::SummaryCache,
    node::Node,
    runtime::{Admin, Override},
};
use crate::{
    api::{FleetNodeRow, FleetStatus, RegistrationRow, Request},
    config::{self, Desired, Fleet},
    config_edit,
    fleet::{
        agree,
        registry::{self, Registrations},
        state::{FleetState, Guard, NodeReport, Overrides, Snapshot},
        store::{self, Event, Store, WriteError},
    },
};

/// Whether this node's tables are the fleet's (standalone: always).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Convergence {
    /// Not yet caught up with the fleet's newest state.
    pub behind: bool,
    /// Services whose table differs from most nodes' at this revision.
    pub differing: BTreeSet<String>,
}

impl Convergence {
    /// Caught up, and every table the fleet's.
    pub(crate) fn in_step(&self) -> bool {
        !self.behind && self.differing.is_empty()
    }
}

/// What a fleet node starts from, read before its controller exists.
pub(crate) struct Start {
    /// The desired state: the node's file with the fleet's services.
    pub desired: Desired,
    /// The fleet state it comes from (etcd's, or the cached one).
    pub state: Option<FleetState>,
    /// Read from etcd now (not from the cache).
    pub fresh: bool,
    /// The connection that read it, kept for this node's writes.
    pub store: Option<Store>,
    /// etcd answered with a state this node refuses: the cached state is
    /// one the fleet may have moved past.
    pub refused: bool,
}

/// Reads the fleet's state for a starting daemon: from etcd, or, when etcd
/// cannot be reached or its state is refused, the state this node applied
/// last (kept in its state file).
pub(crate) async fn start(
    fleet: &Fleet,
    node_text: &str,
    node: Desired,
    cache: Option<FleetState>,
) -> Start {
    // An error says whether etcd answered, with a state this node refuses,
    // and why.
    let read = async {
        let unreachable = |e: anyhow::Error| (false, e);
        let store = Store::connect(fleet).await.map_err(unreachable)?;
        let snapshot = store.read().await.map_err(unreachable)?;
        let state = snapshot
            .state
            .map_err(|e| (true, anyhow!("refused: {e}")))?;
        let (desired, _) = desired_of(node_text, &state.services, &state.registered)
            .map_err(|e| (true, anyhow!("the fleet's services are invalid here:\n{e}")))?;
        Ok((state, desired, store))
    };
    match read.await {
        Ok((state, desired, store)) => Start {
            desired,
            state: Some(state),
            fresh: true,
            store: Some(store),
            refused: false,
        },
        Err((refused, e)) => {
            warn!(error = %format!("{e:#}"), "cannot read the fleet's state at start; using the state applied last");
            let cached = cache.and_then(|state| {
                desired_of(node_text, &state.services, &state.registered)
                    .ok()
                    .map(|(d, _)| (d, state))
            });
            let (desired, state) = cached.map_or((node, None), |(d, state)| (d, Some(state)));
            Start {
                desired,
                state,
                fresh: false,
                store: None,
                refused,
            }
        }
    }
}

/// The services `lb apply -f` on a fleet node writes for the whole fleet:
/// the file's `[[service]]` tables. A node's own file (`[fleet]`) is
/// refused, as is a file without services while the fleet has some: read
/// as services alone, either would remove every service of every node.
fn services_to_apply(config: &str, base: &FleetState) -> Result<String> {
    if config_edit::has_table(config, "fleet") {
        bail!(
            "the file has [fleet]: it is a node's own file, whose settings change with `lb reload` \
             on that node; `lb apply -f` on a fleet node takes [[service]] tables for the whole fleet"
        );
    }
    let services = config_edit::services_only(config)?;
    if config_edit::service_count(config) == 0 && !base.services.trim().is_empty() {
        bail!(
            "the file has no [[service]] table: applied to the fleet it would remove every service \
             (revision {}); nothing changed. `lb service del` removes services one by one",
            base.revision
        );
    }
    Ok(services)
}

/// The agreed health a state gives the controller.
pub(crate) fn health_of(state: Option<&FleetState>, own_eviction: bool) -> FleetHealth {
    FleetHealth {
        agreed: state.map(|s| s.health.clone()).unwrap_or_default(),
        own_eviction,
    }
}

/// How long `lb fleet status` lists a node no longer live.
const GONE_NODES_KEPT: Duration = Duration::from_secs(24 * 60 * 60);

/// The daemon's link to the fleet.
pub(crate) struct FleetNode {
    settings: Fleet,
    /// The node's own file, which the fleet's services are validated with.
    node_text: String,
    /// For writes; reconnected after a failure.
    store: Option<Store>,
    report: watch::Sender<Option<NodeReport>>,
    /// The state applied last.
    applied: Option<FleetState>,
    /// The newest read of the prefix.
    latest: Option<Snapshot>,
    /// Why etcd is unreachable, while it is, and whether the node was
    /// behind the fleet (refusing its newest state) when it became so.
    unreachable: Option<(String, bool)>,
    /// Applied a read from etcd since the daemon started.
    synced: bool,
    /// Before the first read applied or refused: whether the state applied
    /// at start counts as converged (a daemon restarted over a live data
    /// plane and its cached state, etcd out of reach; not a fresh host, nor
    /// one that refuses what etcd holds).
    trust_start: bool,
    /// Why the fleet's newest state is refused, while it is.
    refused: Option<String>,
    /// Registrations the applied state holds that this node refused, with
    /// why.
    refused_registrations: Vec<String>,
    /// Flows pinned to each draining backend, as last counted.
    draining_flows: BTreeMap<String, BTreeMap<IpAddr, u64>>,
    /// When this node first saw each draining backend (service, address,
    /// id, generation) draining: a count from a read that began before
    /// then may miss flows pinned just before the drain, so none is
    /// reported for it until a later read.
    draining_since: BTreeMap<(String, IpAddr, u32, u32), Instant>,
    /// Every node seen, with when.
    seen: BTreeMap<String, (NodeReport, SystemTime)>,
}

impl FleetNode {
    /// Starts the background session (watch, status, leadership); returns
    /// the link and the receiver of its events.
    pub(crate) fn spawn(
        settings: Fleet,
        node_text: String,
        bird_socket: Option<std::path::PathBuf>,
        start: &Start,
        adopted: bool,
    ) -> (FleetNode, mpsc::Receiver<Event>) {
        let (report, report_rx) = watch::channel(None);
        let (events_tx, events) = mpsc::channel(16);
        tokio::spawn(store::run(store::Session {
            fleet: settings.clone(),
            bird_socket,
            report: report_rx,
            events: events_tx,
        }));
        let node = FleetNode {
            settings,
            node_text,
            store: start.store.clone(),
            report,
            applied: start.state.clone(),
            latest: None,
            unreachable: None,
            synced: start.fresh,
            trust_start: adopted && start.state.is_some() && !start.refused,
            refused: None,
            refused_registrations: Vec::new(),
            draining_flows: BTreeMap::new(),
            draining_since: BTreeMap::new(),
            seen: BTreeMap::new(),
        };
        (node, events)
    }

    /// What a new text of the node's own file (a reload) makes with the
    /// fleet's services; [`FleetNode::keep_node_text`] once it is applied.
    pub(crate) fn with_node_text(&self, text: &str) -> Result<Desired> {
        let state = self.applied.clone().unwrap_or_default();
        let (desired, _) = desired_of(text, &state.services, &state.registered)
            .map_err(|e| anyhow!("the file is invalid with the fleet's services:\n{e}"))?;
        Ok(desired)
    }

    /// Builds the fleet's states with `text` from now on: a reload's,
    /// once applied. A refused reload's text is never kept, or every
    /// fleet state after it would be built with what was refused.
    pub(crate) fn keep_node_text(&mut self, text: &str) {
        self.node_text = text.to_string();
    }

    /// Applies what the session read, or notes that etcd is unreachable
    /// (then this node also evicts on its own probes).
    pub(crate) fn on_event(&mut self, ctl: &mut Controller, event: Event) {
        match event {
            Event::Unreachable(why) => {
                let behind = match self.unreachable.take() {
                    Some((was, behind)) => {
                        if was != why {
                            warn!(error = %why, "etcd still unreachable");
                        }
                        behind
                    }
                    None => {
                        warn!(error = %why, "etcd unreachable: forwarding with the state applied last; this node evicts on its own probes until etcd is back");
                        self.convergence(ctl).behind
                    }
                };
                self.unreachable = Some((why, behind));
                if let Err(e) = ctl.set_own_eviction(true) {
                    error!(error = %format!("{e:#}"), "evicting on this node's own probes");
                }
            }
            Event::Snapshot(snapshot) => {
                // The session may have read this before the node's own
                // write and its read after it (`refresh`): applying it would
                // undo that write here, and base the next one on a stale
                // guard. After a reconnect any revision is taken, as etcd
                // may have been restored from a backup.
                let older = self
                    .latest
                    .as_ref()
                    .is_some_and(|l| snapshot.revision < l.revision);
                if older && self.unreachable.is_none() {
                    return;
                }
                if self.unreachable.take().is_some() {
                    info!("etcd reachable again");
                }
                let now = SystemTime::now();
                for (name, r) in &snapshot.nodes {
                    self.seen.insert(name.clone(), (r.clone(), now));
                }
                // A node gone that long was most likely taken out of the
                // fleet: `lb fleet status` stops listing it.
                self.seen
                    .retain(|_, (_, when)| when.elapsed().map_or(true, |d| d < GONE_NODES_KEPT));
                let _ = self.take(ctl, *snapshot);
            }
        }
    }

    /// Applies `snapshot` and keeps it as the newest read. A state refused
    /// (bad data, or more than this node can hold) is noted, and its agreed
    /// view with it: the node then also evicts on its own probes, as while
    /// etcd is unreachable, until it applies a state.
    fn take(&mut self, ctl: &mut Controller, snapshot: Snapshot) -> Result<Option<ChangeReport>> {
        // What the live nodes have seen work, for the panic rule: reports
        // change without the state, so every snapshot sets it, before the
        // state's tables are built.
        let mut proven: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for (service, ip) in snapshot.nodes.values().flat_map(NodeReport::proven) {
            proven.entry(service.clone()).or_default().insert(ip);
        }
        if let Err(e) = ctl.set_fleet_proven(proven) {
            error!(error = %format!("{e:#}"), "rebuilding tables for the backends the fleet has seen work");
        }
        let result = self.apply(ctl, &snapshot);
        self.latest = Some(snapshot);
        match &result {
            Ok(_) => self.refused = None,
            Err(e) => {
                let why = format!("{e:#}");
                if self.refused.as_ref() != Some(&why) {
                    error!(error = %why, "the fleet's state is refused; keeping the last good state, evicting on this node's own probes");
                }
                self.refused = Some(why);
                if let Err(e) = ctl.set_own_eviction(true) {
                    error!(error = %format!("{e:#}"), "evicting on this node's own probes");
                }
            }
        }
        result
    }

    /// Applies a snapshot's state if it is new; returns what changed.
    fn apply(&mut self, ctl: &mut Controller, snapshot: &Snapshot) -> Result<Option<ChangeReport>> {
        let state = snapshot.state.clone().map_err(|e| anyhow!(e))?;
        let unchanged = self.synced && self.applied.as_ref() == Some(&state);
        if unchanged {
            ctl.set_own_eviction(false)?;
            return Ok(None);
        }
        let (desired, refused) = desired_of(&self.node_text, &state.services, &state.registered)
            .map_err(|e| {
                anyhow!(
                    "the fleet's services (revision {}) are invalid:\n{e}",
                    state.revision
                )
            })?;
        if let Err(e) = validate_overrides(&state.overrides, &desired) {
            bail!(
                "the fleet's overrides (revision {}) are invalid: {e}",
                state.revision
            );
        }
        let previous = ctl.set_fleet(state.overrides.clone(), health_of(Some(&state), false));
        let report = match super::apply(ctl, desired, false) {
            Ok(report) => report,
            // The last good state whole: its overrides and health too.
            Err(e) => {
                return Err(match ctl.put_fleet_back(previous) {
                    Ok(()) => e,
                    Err(undo) => e.context(format!(
                        "putting the last good overrides and agreed health back failed too \
                         ({undo:#}): some backends follow the refused state's until one is applied"
                    )),
                });
            }
        };
        info!(
            revision = state.revision,
            changes = report.changes.len(),
            "fleet state applied"
        );
        // Live from here, whatever the state file says: one that cannot be
        // written now gets it with its next save, and calling a live state
        // refused would make the node count itself behind the fleet.
        if let Err(e) = ctl.cache_fleet_state(state.clone()) {
            warn!(
                error = %format!("{e:#}"),
                "fleet state applied but not saved yet: a restart before the next save starts from the one before"
            );
        }
        // The applied state's refusals, shown beside its tables.
        if refused != self.refused_registrations {
            for why in refused
                .iter()
                .filter(|r| !self.refused_registrations.contains(r))
            {
                warn!(reason = %why, "registration refused");
            }
            self.refused_registrations = refused;
        }
        self.applied = Some(state);
        self.synced = true;
        Ok(Some(report))
    }

    /// Reads the prefix now and applies it (after this node's own write).
    async fn refresh(&mut self, ctl: &mut Controller) -> Result<Option<ChangeReport>> {
        let store = self.store().await?;
        let snapshot = store.read().await?;
        self.take(ctl, snapshot)
    }

    async fn store(&mut self) -> Result<Store> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let s = Store::connect(&self.settings).await?;
        self.store = Some(s.clone());
        Ok(s)
    }

    /// The state writes are based on: the one this node applied.
    fn base(&self) -> Result<FleetState> {
        if let Some((why, _)) = &self.unreachable {
            bail!(
                "etcd is unreachable ({why}): fleet changes are refused until it is back; forwarding continues with the state applied last"
            );
        }
        if !self.synced {
            if let Some(why) = &self.refused {
                bail!(
                    "this node refuses the fleet's state ({why}) and has applied none since it started: make the change on a node that applied it"
                );
            }
            bail!("this node has not read the fleet's state yet; retry in a moment");
        }
        Ok(self.applied.clone().unwrap_or_default())
    }

    /// The desired state a change request would lead to, if it is valid.
    pub(crate) fn proposed(&self, request: &Request) -> Option<Desired> {
        let services = match request {
            Request::Apply { config, .. } | Request::FleetImport { config, .. } => {
                config_edit::services_only(config).ok()?
            }
            Request::Edit { edit, .. } => edit.apply_to(&self.applied.as_ref()?.services).ok()?,
            _ => return None,
        };
        let registered = &self.applied.as_ref()?.registered;
        desired_of(&self.node_text, &services, registered)
            .ok()
            .map(|(d, _)| d)
    }

    /// Requests a fleet node answers itself: changes to the fleet's state
    /// and the fleet's status. Everything else is the node's own.
    pub(crate) fn handles(request: &Request) -> bool {
        matches!(
            request,
            Request::Apply { .. }
                | Request::Edit { .. }
                | Request::SetWeight { .. }
                | Request::SetAdmin { .. }
                | Request::FleetStatus
                | Request::FleetImport { .. }
                | Request::FleetExport
        )
    }

    /// Answers one of the requests [`FleetNode::handles`].
    pub(crate) async fn handle(
        &mut self,
        ctl: &mut Controller,
        node: &Node,
        request: Request,
    ) -> Result<Value> {
        match request {
            Request::Apply { config, dry_run } => {
                let services = services_to_apply(&config, &self.base()?)?;
                self.change_services(ctl, services, dry_run, false).await
            }
            Request::FleetImport { config, replace } => {
                let base = self.base()?;
                if !replace && !base.services.trim().is_empty() {
                    bail!(
                        "the fleet already has services (revision {}): `lb fleet import --replace` replaces them, `lb apply -f` too",
                        base.revision
                    );
                }
                let services = config_edit::services_only(&config)?;
                self.change_services(ctl, services, false, false).await
            }
            Request::Edit { edit, dry_run } => {
                let base = self.base()?;
                let text = edit.apply_to(&base.services)?;
                self.change_services(ctl, text, dry_run, true).await
            }
            Request::SetWeight {
                service,
                backend,
                weight,
            } => {
                config::check_weight(weight)?;
                self.change_override(ctl, &service, backend, |o| o.weight = weight)
                    .await
            }
            Request::SetAdmin {
                service,
                backend,
                admin,
            } => {
                self.change_override(ctl, &service, backend, |o| o.admin = admin)
                    .await
            }
            Request::FleetStatus => Ok(serde_json::to_value(self.status(ctl, node))?),
            Request::FleetExport => {
                // Whatever etcd's state now (an export is how a node leaves
                // a fleet that is down), but never an empty one standing in
                // for a state this node never had.
                let Some(base) = self.applied.clone() else {
                    bail!(
                        "this node has applied no fleet state (none read from etcd or its cache since it started): nothing to export"
                    );
                };
                let mut text = config_edit::standalone(&self.node_text, &base.services)?;
                text += &overrides_comment(&base.overrides);
                Ok(json!({ "config": text, "revision": base.revision }))
            }
            other => bail!("not a fleet request: {other:?}"),
        }
    }

    /// Makes `services` the fleet's services (with the overrides of
    /// backends that remain), or with `dry_run` reports what would change.
    /// `edit`: `services` is an edit of the state this node applied, not a
    /// whole replacement.
    async fn change_services(
        &mut self,
        ctl: &mut Controller,
        services: String,
        dry_run: bool,
        edit: bool,
    ) -> Result<Value> {
        let base = self.base()?;
        let (desired, _) = desired_of(&self.node_text, &services, &base.registered)
            .map_err(|e| anyhow!("the fleet's services would be invalid, nothing changed:\n{e}"))?;
        // Planned here first (the dry run's checks): a state this node
        // cannot apply, such as a backend that replaces another at
        // `max_backends` (the removed one's id is free only once the
        // change is written), would be refused by every node like it once
        // in etcd, while the operator was told nothing changed.
        let planned = super::apply(ctl, desired, true);
        if dry_run {
            return Ok(serde_json::to_value(planned?)?);
        }
        planned
            .map_err(|e| e.context("this node could not apply these services; nothing written"))?;
        // As configured, without registrations: a registered backend is no
        // backend the change removes.
        let configured = |text: &str| {
            config::parse_fleet(&self.node_text, text)
                .map_err(|e| anyhow!("the fleet's services are invalid here:\n{e}"))
        };
        // Over data this node cannot read, the last good overrides (kept)
        // replace what is there, which may be what was bad.
        let now = self.overrides_now(&base);
        let overrides = overrides_kept(
            now.unwrap_or(&base.overrides),
            &configured(&base.services)?,
            &configured(&services)?,
        );
        let overrides = (now != Some(&overrides)).then_some(overrides);
        self.write(ctl, &base, Some(&services), overrides.as_ref(), edit)
            .await
    }

    async fn change_override(
        &mut self,
        ctl: &mut Controller,
        service: &str,
        backend: IpAddr,
        change: impl FnOnce(&mut Override),
    ) -> Result<Value> {
        let base = self.base()?;
        let known = ctl
            .services()
            .get(service)
            .with_context(|| format!("no service named {service:?} (see `lb service list`)"))?;
        if !known.backends.contains_key(&backend) {
            bail!("service {service} has no backend {backend} (see `lb backend list`)");
        }
        let mut overrides = self
            .overrides_now(&base)
            .context(
                "the fleet's state in etcd cannot be read (see `lb fleet status`): an override \
                 written now would replace overrides nobody can see; replace the services \
                 whole first (`lb apply -f`)",
            )?
            .clone();
        let entry = overrides.entry(service.to_string()).or_default();
        let mut o = entry.get(&backend).copied().unwrap_or_default();
        change(&mut o);
        if o == Override::default() {
            entry.remove(&backend);
        } else {
            entry.insert(backend, o);
        }
        overrides.retain(|_, m| !m.is_empty());
        let v = self.write(ctl, &base, None, Some(&overrides), true).await?;
        let moved = v["slots_moved"][service].as_u64().unwrap_or(0);
        Ok(json!({ "slots_moved": moved, "revision": v["revision"] }))
    }

    /// The overrides a write starts from. While this node refuses the
    /// fleet's state, its writes replace what etcd holds (they are guarded
    /// by it), so they start from etcd's overrides rather than the last
    /// good state's, which would undo those written since; `None` when
    /// etcd's cannot be read.
    fn overrides_now<'a>(&'a self, base: &'a FleetState) -> Option<&'a Overrides> {
        match (&self.refused, &self.latest) {
            (Some(_), Some(latest)) => latest.state.as_ref().ok().map(|s| &s.overrides),
            _ => Some(&base.overrides),
        }
    }

    /// One guarded write, then this node applies the result at once (the
    /// other nodes through their watch). `edit`: computed from `base` (an
    /// edit or an override), not a whole replacement of the services.
    async fn write(
        &mut self,
        ctl: &mut Controller,
        base: &FleetState,
        services: Option<&str>,
        overrides: Option<&Overrides>,
        edit: bool,
    ) -> Result<Value> {
        // A write over data this node refused replaces it: guard it by what
        // etcd holds, not by the last good state. Not an edit of the last
        // good state over a state other nodes applied: it would undo that
        // state's changes.
        let guard = match (&self.refused, &self.latest) {
            (Some(why), Some(latest)) => {
                if edit && let Some(revision) = latest.applied_elsewhere(&self.settings.node) {
                    bail!(
                        "this node refuses the fleet's state at revision {revision}, which other nodes applied ({why}): an edit made here would be based on the state before it and undo its changes; make it on a node that applied it, or replace the services whole (`lb apply -f`)"
                    );
                }
                latest.raw
            }
            _ => Guard::of(base),
        };
        let store = self.store().await?;
        match store.write(guard, services, overrides).await {
            Ok(revision) => {
                let report = self.refresh(ctl).await.with_context(|| {
                    format!("written to the fleet at revision {revision}, but this node did not apply it")
                })?;
                let report = report.unwrap_or_default();
                let mut v = serde_json::to_value(report)?;
                v["revision"] = json!(revision);
                Ok(v)
            }
            Err(WriteError::Conflict(_)) => {
                let now = store.read().await.ok();
                let what = now
                    .as_ref()
                    .and_then(|s| s.state.as_ref().ok())
                    .map_or_else(
                        || "its state".into(),
                        |s| changed_since(base, s, &self.node_text),
                    );
                // Catch up, so a retry is based on the newest state.
                if let Some(s) = now {
                    let _ = self.take(ctl, s);
                }
                bail!(
                    "conflict: another change to the fleet landed first ({what}); nothing changed: check the new state and retry"
                )
            }
            Err(WriteError::Unreachable(e)) => {
                self.store = None;
                Err(e.context("writing the fleet's state to etcd; nothing changed"))
            }
            Err(e @ WriteError::Unanswered) => {
                self.store = None;
                bail!(
                    "{e}: the change may have landed or not; `lb fleet status` shows the fleet's revision (this one was based on {}) once etcd answers",
                    base.revision
                )
            }
        }
    }

    /// This node's report, handed to the session when it changes.
    pub(crate) fn publish(&self, ctl: &Controller, node: &Node) {
        let (health, awaiting) = ctl.own_view();
        let report = NodeReport {
            name: self.settings.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            revision: self.applied.as_ref().map_or(0, |s| s.revision),
            digests: digests(ctl),
            health,
            awaiting,
            vips: node.status(ctl).vips,
            drained: ctl.node_drained(),
            bgp: Vec::new(),
            bgp_error: None,
            draining_flows: self.draining_flows.clone(),
            proven_down: ctl.proven_down(),
        };
        self.report.send_if_modified(|r| {
            let changed = r.as_ref() != Some(&report);
            *r = Some(report);
            changed
        });
    }

    /// Counts the flows the connection table pins to each draining
    /// backend (a registered one leaving, or one the operator drained),
    /// for this node's report: a leaving agent and `lb backend drain
    /// --wait` wait for every node's to end; a backend is left out until a
    /// read of the table that began after this node saw it draining.
    /// Reads the table only while one is draining.
    pub(super) fn count_draining_flows(
        &mut self,
        ctl: &Controller,
        summary: &mut SummaryCache,
    ) -> Result<()> {
        let draining: Vec<(&String, IpAddr, &BackendState)> = ctl
            .services()
            .iter()
            .flat_map(|(name, s)| {
                s.backends
                    .iter()
                    .filter(move |(ip, b)| {
                        b.registered.is_some_and(|r| r.draining)
                            || ctl.admin(name, **ip, b) == Admin::Drain
                    })
                    .map(move |(ip, b)| (name, *ip, b))
            })
            .collect();
        let now = Instant::now();
        // Read after `now`: a fresh read counts a backend first seen now.
        let summary = match draining.is_empty() {
            true => None,
            false => Some(summary.get(ctl)?),
        };
        let mut since = BTreeMap::new();
        let mut counts: BTreeMap<String, BTreeMap<IpAddr, u64>> = BTreeMap::new();
        for (name, ip, b) in draining {
            let key = (name.clone(), ip, b.id, b.generation);
            let seen = self.draining_since.get(&key).copied().unwrap_or(now);
            since.insert(key, seen);
            if let Some(s) = summary.filter(|s| s.read_at > seen) {
                counts
                    .entry(name.clone())
                    .or_default()
                    .insert(ip, s.active.of(b));
            }
        }
        self.draining_since = since;
        self.draining_flows = counts;
        Ok(())
    }

    /// The node's fleet figures for the metrics.
    pub(crate) fn gauges(&self) -> super::metrics::FleetGauges {
        super::metrics::FleetGauges {
            applied_revision: self.applied.as_ref().map_or(0, |s| s.revision),
            etcd_reachable: self.unreachable.is_none(),
            registrations_refused: self.refused_registrations.len(),
        }
    }

    /// Whether this node's tables are the fleet's.
    pub(crate) fn convergence(&self, ctl: &Controller) -> Convergence {
        // The state applied at start is trusted until the fleet's is read:
        // refused (this node's settings cannot hold it), it is judged as a
        // synced node's refusal is, by what the other nodes applied.
        if !self.synced && self.refused.is_none() {
            return Convergence {
                behind: !self.trust_start,
                differing: BTreeSet::new(),
            };
        }
        // etcd trouble withdraws no node for its tables (which differ from
        // the others' as each evicts on its own probes), but a node behind
        // the fleet, refusing its newest state, stays withdrawn: its tables
        // are ones the others have moved past.
        if let Some((_, behind)) = &self.unreachable {
            return Convergence {
                behind: *behind,
                differing: BTreeSet::new(),
            };
        }
        let applied = self.applied.as_ref().map_or(0, |s| s.revision);
        let me = self.settings.node.as_str();
        let others = self
            .latest
            .iter()
            .flat_map(|s| s.nodes.values())
            .filter(|r| r.name != me)
            .map(|r| r.revision);
        let behind = behind(applied, self.refused.is_some(), others);
        let mine = digests(ctl);
        let (_, awaiting) = ctl.own_view();
        let mut tables: Vec<agree::Tables<'_>> = vec![(me, applied, &mine, &awaiting)];
        if let Some(s) = &self.latest {
            tables.extend(
                s.nodes
                    .values()
                    .filter(|r| r.name != me)
                    .map(|r| (r.name.as_str(), r.revision, &r.digests, &r.awaiting)),
            );
        }
        Convergence {
            behind,
            differing: agree::digest_outliers(&tables)
                .remove(me)
                .unwrap_or_default()
                .into_iter()
                .collect(),
        }
    }

    fn status(&self, ctl: &Controller, node: &Node) -> FleetStatus {
        let latest = self.latest.as_ref();
        let live: BTreeSet<&String> = latest.map(|s| s.nodes.keys().collect()).unwrap_or_default();
        let leader = latest.and_then(|s| s.leader.clone());
        let applied = self.applied.as_ref().map_or(0, |s| s.revision);
        let revision = latest
            .and_then(|s| s.state.as_ref().ok())
            .map_or(applied, |s| s.revision);
        let mut seen = self.seen.clone();
        // This node's tables and VIPs as they are now, with the BGP
        // sessions its session last published.
        let mut me = self.report.borrow().clone().unwrap_or_default();
        if let Some(published) = latest.and_then(|s| s.nodes.get(&self.settings.node)) {
            me.bgp = published.bgp.clone();
            me.bgp_error = published.bgp_error.clone();
        }
        me.vips = node.status(ctl).vips;
        seen.insert(self.settings.node.clone(), (me, SystemTime::now()));
        let tables: Vec<agree::Tables<'_>> = seen
            .iter()
            .filter(|(n, _)| live.contains(n) || **n == self.settings.node)
            .map(|(n, (r, _))| (n.as_str(), r.revision, &r.digests, &r.awaiting))
            .collect();
        let outliers = agree::digest_outliers(&tables);
        let nodes = seen
            .iter()
            .map(|(name, (report, when))| FleetNodeRow {
                name: name.clone(),
                alive: live.contains(name) || *name == self.settings.node,
                seen_seconds_ago: when.elapsed().map_or(0, |d| d.as_secs()),
                leader: leader.as_ref() == Some(name),
                behind: report.revision < revision,
                disagreeing: outliers.get(name).cloned().unwrap_or_default(),
                report: report.clone(),
            })
            .collect();
        let mut problems: Vec<String> = latest.map(|s| s.problems.clone()).unwrap_or_default();
        problems.extend(self.refused_registrations.iter().cloned());
        problems.extend(agree::digest_splits(&tables));
        if let Some(r) = &self.refused {
            problems.insert(0, format!("refused, last good state kept: {r}"));
        }
        FleetStatus {
            node: self.settings.node.clone(),
            prefix: self.settings.prefix.clone(),
            etcd_error: self.unreachable.as_ref().map(|(why, _)| why.clone()),
            revision,
            applied,
            leader,
            nodes,
            registered: self
                .applied
                .iter()
                .flat_map(|s| &s.registered)
                .flat_map(|(service, m)| {
                    m.values().map(|r| RegistrationRow {
                        service: service.clone(),
                        address: r.address,
                        host: r.host.clone(),
                        weight: r.weight,
                        percent: r.percent,
                        draining: r.draining,
                    })
                })
                .collect(),
            problems,
        }
    }
}

fn digests(ctl: &Controller) -> BTreeMap<String, String> {
    ctl.services()
        .iter()
        .map(|(n, s)| (n.clone(), digest_text(s.digest)))
        .collect()
}

/// The overrides that outlive a change of the fleet's services from `old`
/// to `new` (both as configured, without registrations). Those of the
/// backends the change removes go with them, and those of the services it
/// removes; a registered backend's stay, inert while its lease has lapsed
/// or this node refuses it, as a standalone daemon keeps them.
fn overrides_kept(overrides: &Overrides, old: &Desired, new: &Desired) -> Overrides {
    let mut kept = overrides.clone();
    kept.retain(|svc, m| {
        let Some(now) = new.services.get(svc) else {
            return false;
        };
        let before = old.services.get(svc);
        m.retain(|ip, _| {
            now.backends.contains_key(ip) || !before.is_some_and(|b| b.backends.contains_key(ip))
        });
        !m.is_empty()
    });
    kept
}

/// The desired state a node builds from the fleet's: its own file with
/// the fleet's services and the registrations they admit; with why each
/// refused registration was refused.
pub(crate) fn desired_of(
    node_text: &str,
    services: &str,
    registered: &Registrations,
) -> Result<(Desired, Vec<String>), config::ConfigErrors> {
    let mut desired = config::parse_fleet(node_text, services)?;
    let refused = registry::admit(&mut desired, registered)
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok((desired, refused))
}

/// Overrides must name services that exist, with weights in range. One
/// may name a backend its service does not have now: a registered backend
/// whose lease lapsed, whose operator state stays for when it registers
/// again.
fn validate_overrides(overrides: &Overrides, desired: &Desired) -> Result<()> {
    for (svc, backends) in overrides {
        if !desired.services.contains_key(svc) {
            bail!("service {svc:?} does not exist");
        }
        for (ip, o) in backends {
            config::check_weight(o.weight)
                .with_context(|| format!("service {svc}, backend {ip}"))?;
        }
    }
    Ok(())
}

/// What changed between the state a write was based on and the newest.
fn changed_since(base: &FleetState, now: &FleetState, node_text: &str) -> String {
    let mut parts = Vec::new();
    if now.services_revision != base.services_revision {
        let names = |text: &str| {
            config::parse_fleet(node_text, text)
                .map(|d| d.services)
                .unwrap_or_default()
        };
        let (old, new) = (names(&base.services), names(&now.services));
        let differing: BTreeSet<&String> = old
            .keys()
            .chain(new.keys())
            .filter(|n| old.get(*n) != new.get(*n))
            .collect();
        parts.push(format!(
            "services changed at revision {} (was {}): {}",
            now.services_revision,
            base.services_revision,
            if differing.is_empty() {
                "formatting only".to_string()
            } else {
                differing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
    }
    if now.overrides_revision != base.overrides_revision {
        let differing: BTreeSet<&String> = base
            .overrides
            .keys()
            .chain(now.overrides.keys())
            .filter(|n| base.overrides.get(*n) != now.overrides.get(*n))
            .collect();
        parts.push(format!(
            "operator overrides changed at revision {} (was {}): {}",
            now.overrides_revision,
            base.overrides_revision,
            differing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if parts.is_empty() {
        "the state changed".into()
    } else {
        parts.join("; ")
    }
}

/// The fleet's operator overrides as comments of an exported file (a
/// standalone file has no place for them; `lb backend ...` restores them).
fn overrides_comment(overrides: &Overrides) -> String {
    let mut out = String::new();
    for (svc, m) in overrides {
        for (ip, o) in m {
            if out.is_empty() {
                out += "\n# Operator overrides in the fleet (restore with `lb backend ...`):\n";
            }
            if let Some(w) = o.weight {
                out += &format!("#   lb backend set-weight {svc} {ip} {w}\n");
            }
            match o.admin {
                Admin::Ready => {}
                Admin::Drain => out += &format!("#   lb backend drain {svc} {ip}\n"),
                Admin::Maintenance => out += &format!("#   lb backend maintenance {svc} {ip}\n"),
            }
        }
    }
    out
}

/// Whether a fleet node that applied the state at revision `applied` is
/// behind the fleet, given the revisions the other live nodes report. One
/// that applied the state it read last holds the newest there is: a higher
/// revision in a report is a stale one (the state's revision, the newest of
/// its keys', goes back when a registration that held it expires). One
/// that `refused` it is behind when another node applied a newer state: that
/// state is the fleet's, though this node's settings cannot hold it. Data
/// that every node refuses is no newer state: all keep the last good one.
fn behind(applied: i64, refused: bool, others: impl IntoIterator<Item = i64>) -> bool {
    refused && others.into_iter().any(|r| r > applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_node_that_refused_the_state_it_read_is_behind() {
        // Applied what it read: other nodes' reports still name the
        // revision before an expired registration took it back.
        assert!(!behind(8, false, [10, 10]));
        // Refused it, which other nodes applied.
        assert!(behind(8, true, [8, 10]));
        // Refused it, as every node did: bad data.
        assert!(!behind(8, true, [8, 8]));
        assert!(!behind(8, true, []));
    }

    #[test]
    fn an_edit_keeps_the_overrides_of_backends_it_does_not_remove() {
        const NODE: &str = "[settings]\ninterfaces = ['eth0']\n[fleet]\nendpoints = ['http://198.18.0.2:2379']\nnode = 'lb1'\n";
        let services = |backends: &[&str]| {
            let mut text = String::from(
                "[[service]]\nname = 'web'\nvip = '198.18.1.1'\nport = 80\nprotocol = 'tcp'\n",
            );
            for b in backends {
                text.push_str(&format!("[[service.backend]]\naddress = '{b}'\n"));
            }
            config::parse_fleet(NODE, &text).unwrap()
        };
        let drained = Override {
            admin: Admin::Drain,
            ..Override::default()
        };
        // .11 and .12 configured; .13 a registered backend (its lease
        // lapsed, or refused here); an inert override of a gone service.
        let overrides: Overrides = [
            (
                "web".to_string(),
                ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
                    .map(|ip| (ip.parse().unwrap(), drained))
                    .into(),
            ),
            (
                "gone".to_string(),
                [("198.18.0.14".parse().unwrap(), drained)].into(),
            ),
        ]
        .into();
        let old = services(&["198.18.0.11", "198.18.0.12"]);
        // Removing .12: its override goes, the registered one's stays.
        let kept = overrides_kept(&overrides, &old, &services(&["198.18.0.11"]));
        let web: Vec<String> = kept["web"].keys().map(ToString::to_string).collect();
        assert_eq!(web, ["198.18.0.11", "198.18.0.13"]);
        assert!(!kept.contains_key("gone"));
        // No change to the backends: every override of the service stays.
        let same = overrides_kept(&overrides, &old, &old);
        assert_eq!(same["web"], overrides["web"]);
        // Overrides as the fleet holds them: services that exist, weights
        // in range (a hand may have written them).
        let mut checked = same.clone();
        assert!(validate_overrides(&checked, &old).is_ok());
        checked.get_mut("web").unwrap().insert(
            "198.18.0.11".parse().unwrap(),
            Override {
                weight: Some(429_497),
                ..drained
            },
        );
        let e = validate_overrides(&checked, &old).unwrap_err();
        assert!(format!("{e:#}").contains("backend 198.18.0.11"), "{e:#}");
        assert!(
            validate_overrides(&overrides, &old).is_err(),
            "a gone service"
        );
    }
}
