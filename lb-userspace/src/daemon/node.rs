//! The node as a whole: which VIPs it announces (through the route keeper,
//! when `[announce]` is configured), its drain, and how long since a new
//! flow last arrived.

use std::time::Instant;

use anyhow::Result;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{controller::Controller, fleet::Convergence};
use crate::{
    announce::{self, ConvergenceGrace, Decision, NodeView, Routes, ServiceView, SettleClock},
    api::{NodeStatus, VipRow},
    config::Announce,
    routes::{self, Installed, VipRoutes},
};

/// The daemon's view of the node.
pub(crate) struct Node {
    announce: Option<Announce>,
    /// What the route keeper is to make of the table; `None` until the
    /// first decision.
    wanted: watch::Sender<Option<Routes>>,
    /// What it did.
    installed: watch::Receiver<Installed>,
    decisions: Vec<Decision>,
    /// The fleet's word at the last update.
    convergence: Convergence,
    /// Short spells out of step with the fleet excused.
    grace: ConvergenceGrace,
    /// How long what each service's table waits on has been pending.
    settle: SettleClock,
    /// New flows over every service, and when that count last grew (or the
    /// node was drained, whichever is later).
    new_flows: u64,
    quiet_since: Instant,
}

impl Node {
    /// Starts the route keeper when `announce` is set. Nothing is added or
    /// withdrawn before the first [`Node::update`].
    pub(crate) fn start(announce: Option<Announce>) -> Result<Node> {
        let (wanted, wanted_rx) = watch::channel(None);
        let (installed_tx, installed) = watch::channel(Installed::default());
        let kept = announce.as_ref().map(|a| a.table);
        // Until it succeeds: a route left behind would go on being
        // announced by a BIRD that still learns its table.
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                let mut withdrawn = Vec::new();
                let result = routes::withdraw_all_but(kept, &mut withdrawn).await;
                for w in withdrawn {
                    info!(vip = %w.vip, table = w.table, "withdrawn: [announce] no longer names this table");
                }
                match result {
                    Ok(()) => break,
                    Err(e) if !warned => {
                        warn!(error = %format!("{e:#}"), "withdrawing VIP routes from tables [announce] no longer names; retrying every second");
                        warned = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(routes::RESYNC).await;
            }
        });
        if let Some(a) = &announce {
            let routes = VipRoutes::open(a.table)?;
            tokio::spawn(routes::keep(routes, wanted_rx, installed_tx));
            info!(
                table = a.table,
                "announcing VIPs through the kernel routing table"
            );
        }
        Ok(Node {
            announce,
            wanted,
            installed,
            decisions: Vec::new(),
            convergence: Convergence::default(),
            grace: ConvergenceGrace::default(),
            settle: SettleClock::default(),
            new_flows: 0,
            quiet_since: Instant::now(),
        })
    }

    /// Decides every VIP again from the controller's state, logs what
    /// changed and hands the result to the route keeper.
    pub(crate) fn update(&mut self, ctl: &Controller, convergence: &Convergence) {
        self.convergence = convergence.clone();
        // The fleet's word as the rule takes it: in step while the grace
        // counts the node so (asked every time: being in step is what
        // gives the node its standing).
        let now = Instant::now();
        let in_step = convergence.in_step();
        let convergence = if self.grace.counts_in_step(now, in_step) {
            &Convergence::default()
        } else {
            convergence
        };
        let interfaces = &ctl.desired().settings.interfaces;
        let view = NodeView {
            drained: ctl.node_drained(),
            attached: interfaces.iter().all(|i| ctl.dataplane().attached(i)),
            converged: !convergence.behind,
        };
        self.settle.retain(|name| ctl.services().contains_key(name));
        let services: Vec<ServiceView> = ctl
            .services()
            .iter()
            .map(|(name, s)| ServiceView {
                name: name.clone(),
                vip: s.config.vip,
                in_rotation: ctl.in_rotation(name),
                agreed: !convergence.differing.contains(name),
                settling: self.settle.counts_settling(name, now, &ctl.pending(name)),
            })
            .collect();
        let decisions = announce::decide(view, &services);
        if decisions != self.decisions {
            for d in &decisions {
                let before = self.decisions.iter().find(|o| o.vip == d.vip);
                if before.map(|b| b.withheld) == Some(d.withheld) {
                    continue;
                }
                match d.withheld {
                    Some(why) => warn!(vip = %d.vip, reason = why.describe(), "VIP withheld"),
                    None => info!(vip = %d.vip, "VIP can be served"),
                }
            }
            self.decisions = decisions;
        }
        let target = Some(announce::routes(&self.decisions));
        self.wanted.send_if_modified(|wanted| {
            let changed = *wanted != target;
            *wanted = target;
            changed
        });
    }

    /// Notes the node's count of new flows (sampled about once a second),
    /// those its services dropped included: no backend in rotation, refused
    /// by a source list or a new-flow limit. Each is traffic the routers
    /// still send here.
    pub(crate) fn observe_flows(&mut self, ctl: &Controller) {
        let total: u64 = ctl
            .services()
            .values()
            .map(|s| {
                let forwarded = ctl.service_stats(s).map_or(0, |st| st.new_flows + st.drops);
                let refused = ctl
                    .dataplane()
                    .source_drops(s.id)
                    .map_or(0, |d| d.denied + d.not_allowed + d.limited);
                forwarded + refused
            })
            .sum();
        if total != self.new_flows {
            self.new_flows = total;
            self.quiet_since = Instant::now();
        }
    }

    /// Drains or undrains the node.
    pub(crate) fn set_drained(&mut self, ctl: &mut Controller, drained: bool) -> Result<()> {
        if ctl.node_drained() != drained {
            ctl.set_node_drained(drained)?;
            self.quiet_since = Instant::now();
        }
        let convergence = self.convergence.clone();
        self.update(ctl, &convergence);
        Ok(())
    }

    /// `lb node status`, less the BGP sessions (the CLI asks BIRD).
    pub(crate) fn status(&self, ctl: &Controller) -> NodeStatus {
        let installed = self.installed.borrow();
        NodeStatus {
            drained: ctl.node_drained(),
            announce_table: self.announce.as_ref().map(|a| a.table),
            bird_socket: self.announce.as_ref().map(|a| a.bird_socket.clone()),
            interfaces: ctl
                .desired()
                .settings
                .interfaces
                .iter()
                .map(|i| (i.clone(), ctl.dataplane().attached(i)))
                .collect(),
            vips: self
                .decisions
                .iter()
                .map(|d| VipRow {
                    vip: d.vip,
                    services: d.services.clone(),
                    withheld: d.withheld,
                    settling: d.settling,
                    announced: installed.vips.contains(&d.vip),
                })
                .collect(),
            route_error: installed.error.clone(),
            quiet_seconds: self.quiet_since.elapsed().as_secs_f64(),
            bgp: Vec::new(),
            bgp_error: None,
        }
    }
}
