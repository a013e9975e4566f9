//! The health state machine of one backend (pure): consecutive probe results
//! move it between up and down after `rise` successes or `fall` failures, as
//! HAProxy and IPVS/keepalived do, damped against flapping; a new backend
//! is checked before it takes any flow; plus the slow start and panic rules
//! that depend only on counts and time.

use std::time::Duration;

/// Probe results needed to change state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
}

impl Default for Thresholds {
    /// HAProxy's defaults.
    fn default() -> Self {
        Thresholds { rise: 2, fall: 3 }
    }
}

/// What the probes say of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Passing: in rotation (unless an operator says otherwise).
    Up,
    /// Failing: out of rotation, its flows re-hash.
    Down,
    /// New, not proven yet: out of rotation until its first `rise`
    /// successes (up), or a failure (down). Not counted by the panic rule
    /// (nor is one that went down from here without ever being up, see
    /// [`Tracker::proven`]): a backend nobody has seen work is no sign the
    /// probes are wrong.
    Checking,
}

/// Steps of slow start: a recovered backend gets 1/4, 2/4, 3/4, then all of
/// its weight, each for a quarter of the slow-start period (HAProxy ramps
/// continuously; steps bound how often its table is rebuilt).
pub const SLOW_START_STEPS: u32 = 4;

/// Percent of its weight a backend up for `elapsed` gets, with slow start
/// lasting `period` (zero: disabled).
pub fn slow_start_percent(elapsed: Duration, period: Duration) -> u32 {
    if period.is_zero() || elapsed >= period {
        return 100;
    }
    let step = (elapsed.as_nanos() * u128::from(SLOW_START_STEPS) / period.as_nanos()) as u32;
    (step + 1) * 100 / SLOW_START_STEPS
}

/// Whether a service's probes are no longer trusted: fewer than half of its
/// ready backends pass (Envoy's panic threshold, at 50 %). A fault on the
/// prober's side, such as the load balancer's own link flapping, fails every
/// probe at once; rather than evict every backend, the service keeps all
/// ready backends in its table until at least half pass again.
pub fn panic(ready: usize, healthy: usize) -> bool {
    ready > 0 && healthy * 2 < ready
}

/// Successes in a row after which an up backend counts as stable again and
/// its flap penalty is forgiven.
pub const STABLE_SUCCESSES: u32 = 10;
/// Largest flap penalty: a flapping backend needs at most `rise << 3`
/// successes to come back.
pub const MAX_FLAP_PENALTY: u32 = 3;

/// Tracks one backend's probe results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    state: Health,
    /// Consecutive results that disagree with `state`.
    streak: u32,
    /// Successes in a row while up, kept at [`STABLE_SUCCESSES`] or more
    /// once reached: stable until it goes down.
    up_run: u32,
    /// Flap damping: each return to down before the backend was stable
    /// doubles the successes it needs to come back.
    penalty: u32,
    /// While checking, one success is enough.
    trust_first_probe: bool,
    /// Up at some time since it was tracked.
    proven: bool,
}

impl Tracker {
    /// A tracker for a new backend: [`Health::Checking`] until `rise`
    /// successes, or only one if `trust_first_probe`.
    pub fn checking(trust_first_probe: bool) -> Self {
        Tracker {
            state: Health::Checking,
            streak: 0,
            up_run: 0,
            penalty: 0,
            trust_first_probe,
            proven: false,
        }
    }

    /// A tracker in `state` with no disagreeing results (proven if up).
    pub fn new(state: Health) -> Self {
        Tracker {
            state,
            streak: 0,
            // A backend that starts up starts stable: its first failure is
            // not a flap.
            up_run: STABLE_SUCCESSES,
            penalty: 0,
            trust_first_probe: false,
            proven: state == Health::Up,
        }
    }

    /// Successes a down or checking backend needs now (rise, doubled per
    /// recent flap; one for a checking backend trusted on its first probe).
    pub fn rise_needed(&self, t: Thresholds) -> u32 {
        if self.state == Health::Checking && self.trust_first_probe {
            1
        } else {
            t.rise.max(1) << self.penalty
        }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Whether the backend has been up since it was tracked: only then do
    /// its failures count as a sign the probes may be wrong (the panic
    /// rule), and only then does panic put it in the table. A backend added
    /// while its server is not answering yet fails from its first probe.
    pub fn proven(&self) -> bool {
        self.proven
    }

    /// Whether results are disagreeing with the state (probe faster then).
    pub fn in_transition(&self) -> bool {
        self.streak > 0
    }

    /// Sets the verdict aside: [`Health::Checking`], as a new backend, for
    /// one leaving maintenance, whose probes were paused while its server
    /// was likely stopped or changed. Nobody has seen it work since, so it
    /// is not proven (the panic rule neither counts nor keeps it) until it
    /// is up again: after one passing probe if it was up before, else
    /// after its `rise` (its flap penalty kept); down at one failure.
    pub fn recheck(&mut self) {
        // Checking already (set aside again before any probe, or new):
        // the trust it had stands.
        self.trust_first_probe = match self.state {
            Health::Up => true,
            Health::Checking => self.trust_first_probe,
            Health::Down => false,
        };
        self.state = Health::Checking;
        self.streak = 0;
        self.proven = false;
    }

    /// Records one probe result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool, t: Thresholds) -> Option<Health> {
        if self.state == Health::Checking && !ok {
            // A new backend that fails is down, its probe saying why.
            self.streak = 0;
            self.state = Health::Down;
            return Some(Health::Down);
        }
        let agrees = ok == (self.state == Health::Up);
        if agrees {
            self.streak = 0;
            if ok {
                self.up_run += 1;
                if self.up_run >= STABLE_SUCCESSES {
                    self.penalty = 0;
                }
            }
            return None;
        }
        // A failure while up, before it was stable, ends the run.
        if self.state == Health::Up && self.up_run < STABLE_SUCCESSES {
            self.up_run = 0;
        }
        self.streak += 1;
        let needed = match self.state {
            Health::Up => t.fall.max(1),
            Health::Down | Health::Checking => self.rise_needed(t),
        };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.state = match self.state {
            Health::Up => {
                // Down again before it was stable: a flap.
                if self.up_run < STABLE_SUCCESSES {
                    self.penalty = (self.penalty + 1).min(MAX_FLAP_PENALTY);
                }
                Health::Down
            }
            Health::Down | Health::Checking => {
                self.up_run = 0;
                self.proven = true;
                Health::Up
            }
        };
        Some(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 3 };

    #[test]
    fn goes_down_after_fall_failures_and_up_after_rise_successes() {
        let mut t = Tracker::new(Health::Up);
        assert_eq!(t.record(false, T), None);
        assert_eq!(t.record(false, T), None);
        assert!(t.in_transition());
        assert_eq!(t.record(false, T), Some(Health::Down));
        assert!(!t.in_transition());
        assert_eq!(t.record(true, T), None);
        assert_eq!(t.record(true, T), Some(Health::Up));
    }

    #[test]
    fn flapping_doubles_the_successes_needed_until_stable() {
        let t = Thresholds { rise: 2, fall: 1 };
        let mut tr = Tracker::new(Health::Up);
        let mut needed = Vec::new();
        for _ in 0..5 {
            tr.record(false, t);
            assert_eq!(tr.state(), Health::Down);
            needed.push(tr.rise_needed(t));
            while tr.record(true, t).is_none() {}
        }
        assert_eq!(
            needed,
            [2, 4, 8, 16, 16],
            "each flap doubles rise, capped at 8x"
        );
        // Stable for long enough: forgiven.
        for _ in 0..STABLE_SUCCESSES {
            tr.record(true, t);
        }
        tr.record(false, t);
        assert_eq!(tr.rise_needed(t), 2);
    }

    /// Ramp shares for slow start.
    #[test]
    fn slow_start_ramps_in_steps() {
        let d = Duration::from_secs(8);
        let f = |ms| slow_start_percent(Duration::from_millis(ms), d);
        assert_eq!(
            [
                f(0),
                f(1_999),
                f(2_000),
                f(4_000),
                f(6_500),
                f(8_000),
                f(60_000)
            ],
            [25, 25, 50, 75, 100, 100, 100]
        );
        assert_eq!(
            slow_start_percent(Duration::ZERO, Duration::ZERO),
            100,
            "disabled"
        );
    }

    #[test]
    fn panic_below_half_healthy() {
        assert!(!panic(0, 0), "nothing ready: nothing to keep");
        assert!(panic(1, 0));
        assert!(!panic(2, 1), "half is enough");
        assert!(panic(3, 1));
        assert!(!panic(3, 2));
        assert!(panic(10, 4));
        assert!(!panic(10, 5));
    }

    #[test]
    fn a_new_backend_is_up_after_rise_successes_and_down_at_its_first_failure() {
        let mut t = Tracker::checking(false);
        assert_eq!(t.state(), Health::Checking);
        assert_eq!(t.record(true, T), None);
        assert!(t.in_transition());
        assert_eq!(t.record(true, T), Some(Health::Up));
        let mut t = Tracker::checking(false);
        assert_eq!(t.record(true, T), None);
        assert_eq!(t.record(false, T), Some(Health::Down));
        assert_eq!(t.rise_needed(T), 2, "then as any down backend");
        assert_eq!(t.record(true, T), None);
        assert_eq!(t.record(true, T), Some(Health::Up));
        let mut t = Tracker::checking(true);
        assert_eq!(t.rise_needed(T), 1);
        assert_eq!(t.record(true, T), Some(Health::Up));
        assert_eq!(t.rise_needed(T), 2, "trust is for the first probe only");
    }

    #[test]
    fn an_agreeing_result_resets_the_streak() {
        let mut t = Tracker::new(Health::Up);
        t.record(false, T);
        t.record(false, T);
        t.record(true, T);
        assert_eq!(t.record(false, T), None);
        assert_eq!(t.record(false, T), None);
        assert_eq!(t.record(false, T), Some(Health::Down));
    }

    #[test]
    fn only_successes_in_a_row_forgive_a_flap() {
        let mut tr = Tracker::new(Health::Up);
        let mut run = |results: &[bool]| {
            for ok in results {
                tr.record(*ok, T);
            }
        };
        // Down (stable before: no flap), up, down again (a flap), up.
        run(&[false, false, false, true, true, false, false, false]);
        run(&[true; 4]);
        // Ten successes, each followed by a failure, then down.
        for _ in 0..STABLE_SUCCESSES {
            run(&[true, false]);
        }
        run(&[false, false]);
        assert_eq!(tr.state(), Health::Down);
        assert_eq!(tr.rise_needed(T), T.rise << 2, "a second flap");
    }

    #[test]
    fn a_backend_is_proven_once_it_has_been_up() {
        let mut tr = Tracker::checking(false);
        assert!(!tr.proven());
        tr.record(false, T);
        assert_eq!(tr.state(), Health::Down);
        assert!(!tr.proven(), "failed from its first probe");
        tr.record(true, T);
        tr.record(true, T);
        assert!(tr.proven());
        tr.record(false, T);
        tr.record(false, T);
        tr.record(false, T);
        assert_eq!(tr.state(), Health::Down);
        assert!(tr.proven(), "down after being up");
        assert!(Tracker::new(Health::Up).proven());
        assert!(!Tracker::new(Health::Down).proven());
    }

    #[test]
    fn a_rechecked_backend_takes_no_flow_until_a_probe_passes() {
        let mut tr = Tracker::new(Health::Up);
        tr.recheck();
        assert_eq!(tr.state(), Health::Checking);
        assert!(!tr.proven(), "not seen working since");
        assert_eq!(
            tr.record(true, T),
            Some(Health::Up),
            "one pass, as it was up"
        );
        assert!(tr.proven());
        let mut tr = Tracker::new(Health::Up);
        tr.recheck();
        assert_eq!(
            tr.record(false, T),
            Some(Health::Down),
            "one failure is down"
        );
        assert_eq!(tr.rise_needed(T), T.rise);
        // Down (after a flap) before maintenance: its rise, doubled, again.
        let mut tr = Tracker::checking(false);
        tr.record(true, T);
        tr.record(true, T);
        for _ in 0..T.fall {
            tr.record(false, T);
        }
        assert_eq!(tr.state(), Health::Down);
        tr.recheck();
        assert_eq!(tr.state(), Health::Checking);
        assert_eq!(tr.rise_needed(T), T.rise << 1);
        // Set aside twice before any probe (out of maintenance, in and out
        // again): it was up, so one pass still does; a new backend keeps
        // whatever trust it was added with.
        let mut tr = Tracker::new(Health::Up);
        tr.recheck();
        tr.recheck();
        assert_eq!(tr.rise_needed(T), 1);
        for trust in [false, true] {
            let mut tr = Tracker::checking(trust);
            tr.recheck();
            assert_eq!(tr.rise_needed(T), if trust { 1 } else { T.rise });
        }
    }

    proptest! {
        /// Whatever the results, the state changes exactly when the last
        /// `fall` results failed, or the last `rise_needed` (rise, doubled
        /// per recent flap, at most 8x) succeeded.
        #[test]
        fn changes_only_after_a_full_streak(results in proptest::collection::vec(any::<bool>(), 0..300), rise in 1u32..5, fall in 1u32..5) {
            let t = Thresholds { rise, fall };
            let mut tr = Tracker::new(Health::Up);
            let mut streak = 0u32;
            for ok in results {
                let before = tr.state();
                let needed = if before == Health::Up { fall } else { tr.rise_needed(t) };
                prop_assert!(needed <= rise.max(fall) << MAX_FLAP_PENALTY);
                let changed = tr.record(ok, t);
                if ok == (before == Health::Up) { streak = 0; } else { streak += 1; }
                if streak == needed {
                    prop_assert!(changed.is_some());
                    streak = 0;
                } else {
                    prop_assert!(changed.is_none());
                }
            }
        }
    }
}
