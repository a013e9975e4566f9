//! The controller on a real data plane (no daemon or namespace), fed probe
//! results as its probers would feed them. The panic rule: panic keeps
//! backends whose probes may be wrong in the table; it counts and keeps
//! only backends that could take flows and have been seen to work. And
//! what a failed change's undo keeps: a held-back health change, and the
//! verdicts of backends a refused fleet state took out of maintenance.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use lb::{
    config::{self, Desired},
    daemon::{
        controller::{Controller, FleetHealth, HEALTH_REBUILD_GAP, ProbeReport},
        runtime::{Admin, Override, Runtime},
    },
    dataplane::Dataplane,
    fleet::state::{Agreed, Overrides},
    neighbor::{NextHop, Resolution},
};
use lb_tests::{Scratch, require_root};

const SERVICE: &str = "echo";

/// The service with `backends` (address, weight), probed with rise 1 and
/// fall 1, its state file in `scratch`.
fn config_with(scratch: &Scratch, backends: &[(&str, u32)]) -> Desired {
    config_with_health(scratch, backends, "")
}

/// [`config_with`], with `health` added to the service's health table.
fn config_with_health(scratch: &Scratch, backends: &[(&str, u32)], health: &str) -> Desired {
    let mut text = format!(
        "[settings]\ninterfaces = ['lbt0']\nstate_file = '{}'\n\n[[service]]\n\
         name = '{SERVICE}'\nvip = '198.18.1.1'\nport = 7\nprotocol = 'tcp'\n\
         [service.health]\nrise = 1\nfall = 1\n{health}\n",
        scratch.dir.join("state.json").display()
    );
    for (b, weight) in backends {
        text.push_str(&format!(
            "[[service.backend]]\naddress = '{b}'\nweight = {weight}\n"
        ));
    }
    config::parse(&text).unwrap()
}

/// Next hops for every backend of `desired`'s service.
fn hops(desired: &Desired) -> Resolution {
    let mut hops = Resolution::default();
    for (i, addr) in desired.services[SERVICE].backends.keys().enumerate() {
        let mac = [2, 0, 0, 0, 0, 0x11 + i as u8];
        let dev = "lbt0".to_string();
        hops.hops.insert(
            *addr,
            NextHop {
                mac,
                addr: *addr,
                dev,
            },
        );
    }
    hops
}

fn probe(ctl: &mut Controller, ip: &str, ok: bool) {
    let report = ProbeReport {
        ok,
        latency: Duration::from_millis(1),
        detail: String::new(),
        answered: true,
    };
    let ip: IpAddr = ip.parse().unwrap();
    ctl.record_probe(SERVICE, ip, report).unwrap();
}

/// Backends added while their servers are not up yet fail from their first
/// probe: they are no sign the probes are wrong, so they neither put the
/// service in panic nor enter its table.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn backends_that_never_passed_neither_cause_panic_nor_enter_the_table() {
    require_root();
    let scratch = Scratch::new("panic-unproven").unwrap();
    let (up, new) = (
        ["198.18.0.11", "198.18.0.12"],
        ["198.18.0.13", "198.18.0.14", "198.18.0.15"],
    );
    let all: Vec<(&str, u32)> = up.iter().chain(&new).map(|b| (*b, 1)).collect();
    let desired = config_with(&scratch, &all);
    let dp = Dataplane::load(desired.settings.capacity).unwrap();
    let hops = hops(&desired);
    let two = config_with(&scratch, &all[..2]);
    let (mut ctl, _) = Controller::new(dp, two.clone(), Runtime::default(), hops, None).unwrap();
    for b in up {
        probe(&mut ctl, b, true);
    }
    ctl.apply(two, false).unwrap();
    assert_eq!(ctl.services()[SERVICE].in_table, 2);

    ctl.apply(desired.clone(), false).unwrap();
    for b in new {
        probe(&mut ctl, b, false);
    }
    ctl.apply(desired.clone(), false).unwrap();
    assert!(!ctl.in_panic(SERVICE), "two of two proven backends pass");
    assert_eq!(ctl.services()[SERVICE].in_table, 2);

    // Both proven backends fail: panic keeps them, and only them.
    for b in up {
        probe(&mut ctl, b, false);
    }
    ctl.apply(desired, false).unwrap();
    assert!(ctl.in_panic(SERVICE));
    assert_eq!(
        ctl.services()[SERVICE].in_table,
        2,
        "panic kept the proven ones"
    );
}

/// A backend its weight keeps out (0: drained) is not counted by the rule,
/// as a drained one is not: with one of two weighted backends dead, the
/// dead one leaves the table instead of putting the service in panic.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_of_weight_zero_does_not_count_for_panic() {
    require_root();
    let scratch = Scratch::new("panic-weight").unwrap();
    let backends = [
        ("198.18.0.11", 1),
        ("198.18.0.12", 1),
        ("198.18.0.13", 0),
        ("198.18.0.14", 0),
    ];
    let (mut ctl, desired, _state) = controller_with_all_up(&scratch, &backends);
    // The weight-0 backends switched off, then one weighted backend dies.
    for b in ["198.18.0.13", "198.18.0.14", "198.18.0.11"] {
        probe(&mut ctl, b, false);
    }
    ctl.apply(desired, false).unwrap();
    assert!(
        !ctl.in_panic(SERVICE),
        "one of two backends that count passes"
    );
    assert_eq!(ctl.services()[SERVICE].in_table, 1);
}

/// Slow start ramps up a backend that was out of the table. One that panic
/// kept in it took its whole share all along: it comes up at full weight.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_panic_kept_serving_comes_up_without_a_slow_start() {
    require_root();
    let scratch = Scratch::new("panic-slow-start").unwrap();
    let backends = [("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)];
    let desired = config_with_health(&scratch, &backends, "slow_start = '60s'");
    let dp = Dataplane::load(desired.settings.capacity).unwrap();
    let hops = hops(&desired);
    let (mut ctl, _) =
        Controller::new(dp, desired.clone(), Runtime::default(), hops, None).unwrap();
    let ramping = |ctl: &Controller, b: &str| {
        let ip: IpAddr = b.parse().unwrap();
        ctl.services()[SERVICE].backends[&ip].ramp_started.is_some()
    };
    for (b, _) in backends {
        probe(&mut ctl, b, true);
    }
    // One of three down: no panic, out of the table; back, it ramps.
    probe(&mut ctl, "198.18.0.11", false);
    ctl.apply(desired.clone(), false).unwrap();
    assert!(!ctl.in_panic(SERVICE));
    assert_eq!(ctl.services()[SERVICE].in_table, 2);
    // Passing probes until it is up: each flap doubles the passes needed.
    let bring_up = |ctl: &mut Controller, b: &str| {
        for _ in 0..16 {
            if ctl.is_up(SERVICE, b.parse().unwrap()) {
                return;
            }
            probe(ctl, b, true);
        }
        panic!("{b} never came up");
    };
    bring_up(&mut ctl, "198.18.0.11");
    assert!(ramping(&ctl, "198.18.0.11"), "back from out of the table");

    // Every one down: panic keeps them; the two that bring it to an end
    // come up without a ramp. The table then leaves out the third, which
    // ramps as any backend back from outside it.
    for (b, _) in backends {
        probe(&mut ctl, b, false);
    }
    ctl.apply(desired.clone(), false).unwrap();
    assert!(ctl.in_panic(SERVICE));
    assert_eq!(ctl.services()[SERVICE].in_table, 3);
    let (kept, last) = (["198.18.0.11", "198.18.0.12"], "198.18.0.13");
    for b in kept {
        bring_up(&mut ctl, b);
        assert!(!ramping(&ctl, b), "{b} served all along");
    }
    ctl.apply(desired, false).unwrap();
    assert!(!ctl.in_panic(SERVICE));
    assert_eq!(ctl.services()[SERVICE].in_table, 2);
    bring_up(&mut ctl, last);
    assert!(ramping(&ctl, last), "back from out of the table");
}

/// A controller over `backends`, each probed up once, its state file in a
/// directory of `scratch` that [`saves_fail`] can take away.
fn controller_with_all_up(
    scratch: &Scratch,
    backends: &[(&str, u32)],
) -> (Controller, Desired, Scratch) {
    let state = Scratch {
        dir: scratch.dir.join("state"),
    };
    std::fs::create_dir_all(&state.dir).unwrap();
    let desired = config_with(&state, backends);
    let dp = Dataplane::load(desired.settings.capacity).unwrap();
    let hops = hops(&desired);
    let (mut ctl, _) =
        Controller::new(dp, desired.clone(), Runtime::default(), hops, None).unwrap();
    for (b, _) in backends {
        probe(&mut ctl, b, true);
    }
    (ctl, desired, state)
}

/// With `fail`, puts a file where the state file's directory `state` is,
/// so a change fails when it saves; without, the directory back.
fn saves_fail(state: &Scratch, fail: bool) {
    if fail {
        std::fs::remove_dir_all(&state.dir).unwrap();
        std::fs::write(&state.dir, "").unwrap();
    } else {
        std::fs::remove_file(&state.dir).unwrap();
        std::fs::create_dir_all(&state.dir).unwrap();
    }
}

/// A backend that goes down within the gap after a rebuild waits for the
/// next one ([`HEALTH_REBUILD_GAP`]). A change that fails meanwhile puts
/// the table from before it back, which still holds the backend: the
/// held-back rebuild stays due and takes it out.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_health_change_held_back_outlives_the_undo_of_a_failed_change() {
    require_root();
    let scratch = Scratch::new("undo-held-back").unwrap();
    let backends = [("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)];
    let (mut ctl, desired, state) = controller_with_all_up(&scratch, &backends);
    ctl.apply(desired.clone(), false).unwrap();
    assert_eq!(ctl.services()[SERVICE].in_table, 3);
    // Right after that rebuild: held back.
    probe(&mut ctl, "198.18.0.11", false);
    assert!(
        ctl.health_changes_due().is_some(),
        "the change is held back"
    );
    assert_eq!(ctl.services()[SERVICE].in_table, 3);

    saves_fail(&state, true);
    let reweighed = config_with(
        &state,
        &[("198.18.0.11", 1), ("198.18.0.12", 2), ("198.18.0.13", 1)],
    );
    let err = ctl.apply(reweighed, false).unwrap_err();
    assert!(format!("{err:#}").contains("nothing changed"), "{err:#}");
    saves_fail(&state, false);
    assert_eq!(ctl.services()[SERVICE].in_table, 3, "the table from before");
    assert!(
        ctl.health_changes_due().is_some(),
        "the held-back rebuild was dropped by the undo"
    );
    std::thread::sleep(HEALTH_REBUILD_GAP * 2);
    ctl.flush_health_changes();
    assert_eq!(
        ctl.services()[SERVICE].in_table,
        2,
        "the dead backend is out"
    );
    assert!(ctl.health_changes_due().is_none());
}

/// A fleet state that takes a backend out of maintenance sets its verdict
/// aside until a probe passes. Refused (its change failed), it leaves the
/// backend as it found it: still in maintenance, its verdict and `since`
/// kept.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_refused_fleet_state_leaves_the_verdicts_it_found() {
    require_root();
    let scratch = Scratch::new("undo-fleet").unwrap();
    let (mut ctl, desired, state) =
        controller_with_all_up(&scratch, &[("198.18.0.11", 1), ("198.18.0.12", 1)]);
    let health = || FleetHealth {
        agreed: Default::default(),
        own_eviction: false,
    };
    let ip: IpAddr = "198.18.0.11".parse().unwrap();
    let mut maintenance = Overrides::new();
    maintenance.entry(SERVICE.into()).or_default().insert(
        ip,
        Override {
            admin: Admin::Maintenance,
            ..Default::default()
        },
    );
    ctl.set_fleet(maintenance, health());
    ctl.apply(desired.clone(), false).unwrap();
    let found = ctl.services()[SERVICE].backends[&ip].clone();

    // The next state ends it, but its change fails when it saves.
    let previous = ctl.set_fleet(Overrides::new(), health());
    saves_fail(&state, true);
    ctl.apply(desired, false).unwrap_err();
    saves_fail(&state, false);
    ctl.put_fleet_back(previous).unwrap();
    let kept = &ctl.services()[SERVICE].backends[&ip];
    assert_eq!(kept.health, found.health);
    assert_eq!(kept.silent_probes, found.silent_probes);
    assert_eq!(kept.since, found.since);
}

/// In a fleet, the panic rule counts and keeps the backends any live node
/// has seen work: a node restarted during an outage, which has seen only
/// the live backend pass, goes into panic with the others and keeps the
/// same backends in its table. (It kept one where they kept four.)
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn in_a_fleet_panic_counts_the_backends_other_nodes_saw_work() {
    require_root();
    let scratch = Scratch::new("panic-fleet").unwrap();
    let all = ["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"];
    let backends: Vec<(&str, u32)> = all.iter().map(|b| (*b, 1)).collect();
    let desired = config_with(&scratch, &backends);
    let dp = Dataplane::load(desired.settings.capacity).unwrap();
    let hops = hops(&desired);
    // The fleet agrees three are down; this node has just started.
    let agreed: BTreeMap<IpAddr, Agreed> = all
        .iter()
        .map(|b| {
            let up = *b == all[0];
            (b.parse().unwrap(), Agreed { up, percent: 100 })
        })
        .collect();
    let health = FleetHealth {
        agreed: [(SERVICE.to_string(), agreed)].into(),
        own_eviction: false,
    };
    let (mut ctl, _) =
        Controller::new(dp, desired.clone(), Runtime::default(), hops, Some(health)).unwrap();
    probe(&mut ctl, all[0], true);
    for b in &all[1..] {
        probe(&mut ctl, b, false);
    }
    ctl.apply(desired.clone(), false).unwrap();
    assert!(!ctl.in_panic(SERVICE), "it has seen only the live one work");
    assert_eq!(ctl.services()[SERVICE].in_table, 1);

    // The other nodes' reports: all four seen to work.
    let proven: BTreeSet<IpAddr> = all.iter().map(|b| b.parse().unwrap()).collect();
    ctl.set_fleet_proven([(SERVICE.to_string(), proven)].into())
        .unwrap();
    assert!(ctl.in_panic(SERVICE), "one of four proven backends passes");
    assert_eq!(ctl.services()[SERVICE].in_table, 4, "panic keeps all four");
    // Its own report names the ones it has seen pass and then fail.
    assert!(ctl.proven_down().is_empty());
    probe(&mut ctl, all[0], false);
    let down: BTreeSet<IpAddr> = [all[0].parse().unwrap()].into();
    assert_eq!(ctl.proven_down(), [(SERVICE.to_string(), down)].into());
}
