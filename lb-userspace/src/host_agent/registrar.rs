//! Where the agent's registration lives: the fleet's etcd ([`Etcd`]), or a
//! standalone daemon's registration port ([`super::direct`]).
//!
//! In etcd: one key per service it serves,
//! `P/registered/SERVICE/ADDRESS`, all under one lease with the fleet's
//! TTL. Kept alive on every check that passes and, between, every third
//! of the lease ([`Registrar::renew`]); revoked (which deletes the keys)
//! when a check fails or the agent leaves. Any etcd error drops the
//! connection and the lease: the next step starts over, and a lease that
//! was not revoked lapses by itself.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use tokio::time::timeout;
use tracing::{info, warn};

use super::{
    direct::Direct,
    settings::{Settings, Target},
    setup::Served,
};
use crate::{
    config::{self, Fleet},
    fleet::{
        registry::{FULL_PERCENT, Registration},
        store::{CALL_TIMEOUT, Store},
    },
};

/// What the lb nodes say of a leaving backend's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowsLeft {
    /// Every live node counted them since the drain: this many in all.
    Counted(u64),
    /// Some node has not applied (and counted) the drain yet.
    Uncounted,
    /// No lb node reports at all: cut off from etcd, or all restarting,
    /// and maybe still forwarding them.
    NoNodes,
}

/// The registration, held or not, wherever it lives (one per agent: the
/// variants' sizes do not matter).
#[expect(
    clippy::large_enum_variant,
    reason = "one per agent, never moved in a loop"
)]
pub enum Registrar {
    /// In the fleet's etcd.
    Etcd(Etcd),
    /// With a standalone daemon.
    Direct(Direct),
}

impl Registrar {
    /// Nothing held yet.
    pub fn new(s: &Settings) -> Registrar {
        match &s.target {
            Target::Fleet(fleet) => Registrar::Etcd(Etcd::new(s, fleet)),
            Target::Daemon(daemon) => {
                let registrations = s
                    .services
                    .iter()
                    .map(|service| (service.clone(), registration(s, false, FULL_PERCENT)))
                    .collect();
                Registrar::Direct(Direct::new(daemon.clone(), registrations))
            }
        }
    }

    /// Whether the host is registered (as of the last step).
    pub fn registered(&self) -> bool {
        match self {
            Registrar::Etcd(e) => e.registered(),
            Registrar::Direct(d) => d.registered(),
        }
    }

    /// Registers, or keeps the registration alive, saying whether the
    /// backend is leaving and the percent of its weight its load leaves.
    pub async fn hold(&mut self, draining: bool, percent: u32) -> Result<()> {
        match self {
            Registrar::Etcd(e) => e.hold(draining, percent).await,
            Registrar::Direct(d) => d.hold(draining, percent).await,
        }
    }

    /// Keeps what is registered alive and nothing more: etcd's lease alone
    /// is renewed; a daemon's registration, which is renewed by sending it
    /// again, is sent with `draining` and `percent` (as last held). Nothing
    /// registered, nothing sent: the agent registers only on its checks.
    pub async fn renew(&mut self, draining: bool, percent: u32) -> Result<()> {
        if !self.registered() {
            return Ok(());
        }
        match self {
            Registrar::Etcd(e) => e.renew().await,
            Registrar::Direct(d) => d.hold(draining, percent).await,
        }
    }

    /// Deregisters.
    pub async fn leave(&mut self) -> Result<()> {
        match self {
            Registrar::Etcd(e) => e.leave().await,
            Registrar::Direct(d) => d.leave().await,
        }
    }

    /// Flows the load balancers still pin to this backend, as far as they
    /// have counted since it began draining.
    pub async fn flows_left(&mut self) -> Result<FlowsLeft> {
        match self {
            Registrar::Etcd(e) => e.flows_left().await,
            Registrar::Direct(d) => Ok(d
                .flows_left()
                .map_or(FlowsLeft::Uncounted, FlowsLeft::Counted)),
        }
    }

    /// The registration's lease: a fleet's from the agent's file, a
    /// standalone daemon's once it answered with it.
    pub fn lease(&self) -> Option<Duration> {
        match self {
            Registrar::Etcd(e) => Some(e.lease()),
            Registrar::Direct(d) => d.lease(),
        }
    }

    /// The VIP and mode of each service this host serves (a service the
    /// load balancers lack is left out).
    pub async fn served(&mut self) -> Result<BTreeMap<String, Served>> {
        match self {
            Registrar::Etcd(e) => e.served().await,
            Registrar::Direct(d) => d.served().await,
        }
    }
}

/// What the agent registers for each service.
fn registration(s: &Settings, draining: bool, percent: u32) -> Registration {
    Registration {
        address: s.address,
        weight: s.weight,
        percent,
        draining,
        host: s.host.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// The registration in the fleet's etcd.
pub struct Etcd {
    fleet: Fleet,
    /// What each key holds, but for draining and percent.
    template: Registration,
    services: Vec<String>,
    store: Option<Store>,
    held: Option<Held>,
}

/// A lease this agent holds, with its keys written.
struct Held {
    id: i64,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
    /// What the keys say now, draining and percent (`None`: not written
    /// yet).
    written: Option<(bool, u32)>,
    /// etcd's revision of the last write of the keys.
    revision: i64,
}

impl Held {
    /// Renews the lease: whether it was still alive.
    async fn keep_alive(&mut self) -> Result<bool> {
        within("renewing the lease", self.keeper.keep_alive()).await?;
        let answer = within("renewing the lease", self.answers.message()).await?;
        Ok(answer.is_some_and(|a| a.ttl() > 0))
    }
}

impl Etcd {
    /// Nothing held yet.
    pub fn new(s: &Settings, fleet: &Fleet) -> Etcd {
        Etcd {
            fleet: fleet.clone(),
            template: registration(s, false, FULL_PERCENT),
            services: s.services.clone(),
            store: None,
            held: None,
        }
    }

    /// Whether the keys are written under a live lease (as of the last
    /// step).
    pub fn registered(&self) -> bool {
        self.held.as_ref().is_some_and(|h| h.written.is_some())
    }

    /// Registers, or keeps the registration alive, saying whether the
    /// backend is leaving and the percent of its weight its load leaves.
    pub async fn hold(&mut self, draining: bool, percent: u32) -> Result<()> {
        let result = self.try_hold(draining, percent).await;
        if result.is_err() {
            self.store = None;
            self.held = None;
        }
        result
    }

    async fn try_hold(&mut self, draining: bool, percent: u32) -> Result<()> {
        let store = self.store().await?;
        let mut client = store.client();
        if let Some(h) = &mut self.held
            && !h.keep_alive().await?
        {
            warn!("the registration's lease lapsed: registering again");
            self.held = None;
        }
        if self.held.is_none() {
            let ttl = self.lease().as_secs() as i64;
            let id = within(
                "granting the registration's lease",
                client.lease_grant(ttl, None),
            )
            .await?
            .id();
            let (keeper, answers) =
                within("keeping the lease alive", client.lease_keep_alive(id)).await?;
            self.held = Some(Held {
                id,
                keeper,
                answers,
                written: None,
                revision: 0,
            });
        }
        let h = self.held.as_mut().context("no lease")?;
        if h.written == Some((draining, percent)) {
            return Ok(());
        }
        let ops = self
            .services
            .iter()
            .map(|service| {
                let r = Registration {
                    percent,
                    draining,
                    ..self.template.clone()
                };
                let key = store.keys().registration(service, r.address);
                let value = serde_json::to_string(&r)?;
                Ok(TxnOp::put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(h.id)),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let written = within(
            "writing the registration",
            client.txn(Txn::new().and_then(ops)),
        )
        .await?;
        h.revision = written
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        h.written = Some((draining, percent));
        info!(
            services = ?self.services,
            draining,
            percent,
            revision = h.revision,
            "registration written"
        );
        Ok(())
    }

    /// The lease's TTL (etcd's are whole seconds).
    fn lease(&self) -> Duration {
        Duration::from_secs(self.fleet.lease.as_secs().max(1))
    }

    /// Renews the lease held, writing nothing; a lapsed one is dropped,
    /// taken again by the next [`Etcd::hold`].
    pub async fn renew(&mut self) -> Result<()> {
        let Some(h) = &mut self.held else {
            return Ok(());
        };
        match h.keep_alive().await {
            Ok(true) => Ok(()),
            Ok(false) => {
                warn!("the registration's lease lapsed: registering again on the next check");
                self.held = None;
                Ok(())
            }
            Err(e) => {
                self.store = None;
                self.held = None;
                Err(e)
            }
        }
    }

    async fn store(&mut self) -> Result<Store> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let s = Store::connect(&self.fleet).await?;
        self.store = Some(s.clone());
        Ok(s)
    }

    /// Deregisters: revokes the lease, which deletes the keys.
    pub async fn leave(&mut self) -> Result<()> {
        let Some(h) = self.held.take() else {
            return Ok(());
        };
        let store = self.store().await?;
        within(
            "revoking the registration's lease",
            store.client().lease_revoke(h.id),
        )
        .await?;
        info!("deregistered");
        Ok(())
    }

    /// The VIP and mode of each service this host serves, as the fleet's
    /// services have them (a service they lack is left out).
    pub async fn served(&mut self) -> Result<BTreeMap<String, Served>> {
        let store = self.store().await?;
        let snapshot = store.read().await?;
        let state = snapshot
            .state
            .map_err(|e| anyhow!("the fleet's state is refused: {e}"))?;
        let fronts = config::service_fronts(&state.services)
            .map_err(|e| anyhow!("the fleet's services: {e}"))?;
        Ok(self
            .services
            .iter()
            .filter_map(|name| {
                let &(vip, mode) = fronts.get(name)?;
                Some((name.clone(), Served { vip, mode }))
            })
            .collect())
    }

    /// Flows the live lb nodes still pin to this backend, summed over its
    /// services.
    pub async fn flows_left(&mut self) -> Result<FlowsLeft> {
        let revision = self.held.as_ref().map_or(0, |h| h.revision);
        let store = self.store().await?;
        let snapshot = store.read().await?;
        // A service the fleet does not have refuses the registration on
        // every node: nothing to wait for there.
        // Unreadable: not known to be over.
        let Some(known) = snapshot
            .state
            .as_ref()
            .ok()
            .and_then(|s| config::service_backends(&s.services).ok())
        else {
            return Ok(FlowsLeft::Uncounted);
        };
        let serves_known = self.services.iter().any(|s| known.contains_key(s));
        // No live node: nobody has counted, which is not "none left" (the
        // nodes may be cut off from etcd, or restarting, and still forward
        // on what they hold).
        if serves_known && snapshot.nodes.is_empty() {
            return Ok(FlowsLeft::NoNodes);
        }
        let mut total = 0;
        for report in snapshot.nodes.values() {
            if report.revision < revision {
                return Ok(FlowsLeft::Uncounted);
            }
            for service in self.services.iter().filter(|s| known.contains_key(*s)) {
                let counted = report
                    .draining_flows
                    .get(service)
                    .and_then(|m| m.get(&self.template.address));
                match counted {
                    Some(n) => total += n,
                    None => return Ok(FlowsLeft::Uncounted),
                }
            }
        }
        Ok(FlowsLeft::Counted(total))
    }
}

/// Awaits one etcd call for at most [`CALL_TIMEOUT`]; either failure names
/// the step.
async fn within<T, E>(
    step: &'static str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("{step}: no answer within {CALL_TIMEOUT:?}"))?
        .context(step)
}
