//! Load feedback (pure): a backend's weight follows its health probes'
//! latency, so a slow (loaded) backend gets fewer new flows before it
//! fails its checks, and optionally its active flows, so one holding more
//! than its share of long-lived connections gets fewer new ones.
//!
//! Each backend's successful probes are smoothed (an exponentially weighted
//! average); a backend whose smoothed latency is `L` keeps `(F + T) / (L + T)`
//! of its weight, `F` being the fastest backend's of the service and `T` the
//! tolerance, so that latencies within a few milliseconds of each other
//! count as equal; never less than the service's lower bound. By flows, a
//! backend holding `A` active flows where its weight's share of them all is
//! `S` keeps `(S + T) / (A + T)`, `T` being the flow tolerance; the lower
//! of the two percents applies.

use std::time::Duration;

/// Weight of a new probe's latency in the smoothed one.
const SMOOTHING: f64 = 0.3;

/// Full weight, in percent.
pub const FULL: u32 = 100;

/// The smoothed latency after a successful probe that took `latency`.
pub fn smooth(previous: Option<Duration>, latency: Duration) -> Duration {
    match previous {
        None => latency,
        Some(p) => p.mul_f64(1.0 - SMOOTHING) + latency.mul_f64(SMOOTHING),
    }
}

/// Percent of its weight a backend with smoothed latency `own` keeps when
/// the service's fastest has `fastest`: `(fastest + tolerance) / (own +
/// tolerance)`, rounded, between `min_percent` and 100.
pub fn percent(own: Duration, fastest: Duration, tolerance: Duration, min_percent: u32) -> u32 {
    if own <= fastest {
        return FULL;
    }
    // Saturating: the tolerance is the operator's, up to Duration's end.
    let share = fastest.saturating_add(tolerance).as_secs_f64()
        / own.saturating_add(tolerance).as_secs_f64().max(1e-9);
    ((share * f64::from(FULL)).round() as u32).clamp(min_percent.min(FULL), FULL)
}

/// Percent of its weight a backend holding `active` flows keeps when its
/// weight's share of the service's active flows is `share`: `(share +
/// tolerance) / (active + tolerance)`, rounded, between `min_percent` and
/// 100. A backend at or under its share keeps all of its weight.
pub fn flow_percent(active: u64, share: f64, tolerance: u64, min_percent: u32) -> u32 {
    let active = active as f64;
    if active <= share {
        return FULL;
    }
    let tolerance = tolerance as f64;
    let kept = (share + tolerance) / (active + tolerance).max(f64::MIN_POSITIVE);
    ((kept * f64::from(FULL)).round() as u32).clamp(min_percent.min(FULL), FULL)
}

/// The percent to apply next, from `applied`, when `wanted` is asked:
/// changes under `step` points wait; within `step` of 100 counts as 100,
/// and 100 and the lower bound `min_percent` are always reached.
pub fn next(applied: u32, wanted: u32, step: u32, min_percent: u32) -> u32 {
    // The bound before the snap to 100: a bound within `step` of 100
    // would otherwise never be reached.
    if wanted == min_percent {
        return wanted;
    }
    let wanted = if FULL - wanted.min(FULL) < step {
        FULL
    } else {
        wanted
    };
    if wanted.abs_diff(applied) >= step || wanted == FULL {
        wanted
    } else {
        applied
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn slow_backends_lose_weight_down_to_the_bound() {
        let t = 50 * MS;
        // Equal, or within a few milliseconds' noise: full weight or
        // nearly (within the default step).
        assert_eq!(percent(MS, MS, t, 50), 100);
        assert!(percent(3 * MS, MS, t, 50) >= 96);
        // The tolerance slower: about half.
        assert_eq!(percent(52 * MS, MS, t, 10), 50);
        // Far slower: the bound.
        assert_eq!(percent(300 * MS, MS, t, 50), 50);
        assert_eq!(percent(1300 * MS, MS, t, 0), 4);
        // A tolerance near Duration's end: about full weight, no overflow.
        assert_eq!(percent(300 * MS, MS, Duration::MAX, 50), 100);
    }

    #[test]
    fn smoothing_follows_a_change_in_a_few_probes() {
        let mut s = smooth(None, MS);
        assert_eq!(s, MS);
        for _ in 0..10 {
            s = smooth(Some(s), 100 * MS);
        }
        assert!(s > 95 * MS && s < 100 * MS, "{s:?}");
    }

    #[test]
    fn small_changes_wait_for_the_step_but_the_bounds_are_reached() {
        assert_eq!(next(100, 97, 5, 50), 100);
        assert_eq!(next(100, 95, 5, 50), 95);
        assert_eq!(next(60, 97, 5, 50), 100);
        assert_eq!(next(60, 90, 5, 50), 90);
        assert_eq!(next(97, 100, 5, 50), 100);
        assert_eq!(next(52, 50, 5, 50), 50);
        assert_eq!(next(52, 51, 5, 50), 52);
        // A bound within the step of 100 is reached too, from either side.
        assert_eq!(next(100, 97, 5, 97), 97);
        assert_eq!(next(99, 97, 5, 97), 97);
        assert_eq!(next(100, 98, 5, 97), 100);
        assert_eq!(next(97, 100, 5, 97), 100);
    }

    #[test]
    fn backends_over_their_share_of_flows_lose_weight_down_to_the_bound() {
        // At or under the share: all of it.
        assert_eq!(flow_percent(50, 50.0, 100, 50), 100);
        assert_eq!(flow_percent(0, 50.0, 100, 50), 100);
        // A few flows over: within the step of all of it.
        assert!(flow_percent(55, 50.0, 100, 50) >= 96);
        // Twice its share, many flows: about half.
        assert_eq!(flow_percent(2000, 1000.0, 0, 10), 50);
        assert_eq!(flow_percent(2000, 1000.0, 100, 10), 52);
        // Far over: the bound; no tolerance and no share: the bound too.
        assert_eq!(flow_percent(10_000, 100.0, 100, 50), 50);
        assert_eq!(flow_percent(3, 0.0, 0, 20), 20);
    }

    proptest! {
        #[test]
        fn the_flow_percent_is_bounded_and_falls_with_flows(
            active in 0u64..1_000_000, more in 0u64..1_000_000, share in 0.0f64..1e6,
            tolerance in 0u64..1000, min in 0u32..=100,
        ) {
            let p = flow_percent(active, share, tolerance, min);
            prop_assert!((min..=FULL).contains(&p));
            prop_assert!(flow_percent(active + more, share, tolerance, min) <= p);
        }

        #[test]
        fn the_percent_is_bounded_and_falls_with_latency(
            own in 0u64..10_000, more in 0u64..10_000, fastest in 0u64..10_000,
            tolerance in 0u64..100, min in 0u32..=100,
        ) {
            let ms = Duration::from_millis;
            let (own, fastest) = (ms(own), ms(fastest.min(own)));
            let p = percent(own, fastest, ms(tolerance), min);
            prop_assert!((min..=FULL).contains(&p));
            prop_assert!(percent(own + ms(more), fastest, ms(tolerance), min) <= p);
        }
    }
}
