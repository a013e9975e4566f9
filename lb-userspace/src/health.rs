//! The health state machine of one backend (pure): consecutive probe results
//! move it between up and down after `rise` successes or `fall` failures, as
//! HAProxy and IPVS/keepalived do.

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
}

/// Whether a service's probes are no longer trusted: fewer than half of its
/// ready backends pass (Envoy's panic threshold, at 50 %). A fault on the
/// prober's side, such as the load balancer's own link flapping, fails every
/// probe at once; rather than evict every backend, the service keeps all
/// ready backends in its table until at least half pass again.
pub fn panic(ready: usize, healthy: usize) -> bool {
    ready > 0 && healthy * 2 < ready
}

/// Tracks one backend's probe results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    state: Health,
    /// Consecutive results that disagree with `state`.
    streak: u32,
}

impl Tracker {
    /// A tracker in `state` with no disagreeing results.
    pub fn new(state: Health) -> Self {
        Tracker { state, streak: 0 }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Whether results are disagreeing with the state (probe faster then).
    pub fn in_transition(&self) -> bool {
        self.streak > 0
    }

    /// Records one probe result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool, t: Thresholds) -> Option<Health> {
        let agrees = ok == (self.state == Health::Up);
        if agrees {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = match self.state {
            Health::Up => t.fall,
            Health::Down => t.rise,
        };
        if self.streak < needed.max(1) {
            return None;
        }
        self.streak = 0;
        self.state = match self.state {
            Health::Up => Health::Down,
            Health::Down => Health::Up,
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
    fn an_agreeing_result_resets_the_streak() {
        let mut t = Tracker::new(Health::Up);
        t.record(false, T);
        t.record(false, T);
        t.record(true, T);
        assert_eq!(t.record(false, T), None);
        assert_eq!(t.record(false, T), None);
        assert_eq!(t.record(false, T), Some(Health::Down));
    }

    proptest! {
        /// Whatever the results, the state changes exactly when the last
        /// `fall` (or `rise`) results all disagreed with the previous state.
        #[test]
        fn changes_only_after_a_full_streak(results in proptest::collection::vec(any::<bool>(), 0..200), rise in 1u32..5, fall in 1u32..5) {
            let t = Thresholds { rise, fall };
            let mut tr = Tracker::new(Health::Up);
            let mut streak = 0u32;
            for ok in results {
                let before = tr.state();
                let changed = tr.record(ok, t);
                if ok == (before == Health::Up) { streak = 0; } else { streak += 1; }
                let needed = if before == Health::Up { fall } else { rise };
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
