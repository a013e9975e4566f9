//! The daemon's own history of its counters: sampled every second and kept
//! for a minute, so `lb stats`, the status page and scripts get rates from
//! one call instead of polling twice and dividing.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    time::Instant,
};

use anyhow::Result;

use super::controller::Controller;
use crate::api::Rates;

/// Samples kept: a minute of one-second intervals.
pub(super) const SAMPLES: usize = 61;
/// Intervals a rate averages over (fewer right after the daemon starts).
pub(super) const RATE_WINDOW: usize = 5;

/// What a counter belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Key {
    /// A service, by name.
    Service(String),
    /// A backend of a service.
    Backend(String, IpAddr),
    /// A data-plane outcome (`forward_dsr`, `drop_no_backend`, ...).
    Reason(String),
}

/// Monotonic counters of one thing at one instant (a reason counts only
/// packets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// Flows that took a table lookup.
    pub new_flows: u64,
    /// Packets dropped once matched to a service.
    pub drops: u64,
}

/// Every counter at one instant.
#[derive(Clone, Debug)]
pub(super) struct Sample {
    /// When it was read.
    pub at: Instant,
    /// The counters.
    pub counts: BTreeMap<Key, Counts>,
}

impl Sample {
    /// Reads every service's, backend's and outcome's counters.
    pub(super) fn read(ctl: &Controller) -> Result<Sample> {
        let dp = ctl.dataplane();
        let mut counts = BTreeMap::new();
        for (name, s) in ctl.services() {
            let st = ctl.service_stats(s)?;
            counts.insert(
                Key::Service(name.clone()),
                Counts {
                    packets: st.packets,
                    bytes: st.bytes,
                    new_flows: st.new_flows,
                    drops: st.drops,
                },
            );
            for (ip, b) in &s.backends {
                let st = dp.backend_stats(b.id)?;
                counts.insert(
                    Key::Backend(name.clone(), *ip),
                    Counts {
                        packets: st.packets(),
                        bytes: st.bytes,
                        ..Counts::default()
                    },
                );
            }
        }
        for (c, packets) in dp.counters()? {
            counts.insert(
                Key::Reason(c.name().to_string()),
                Counts {
                    packets,
                    ..Counts::default()
                },
            );
        }
        Ok(Sample {
            at: Instant::now(),
            counts,
        })
    }
}

/// The last [`SAMPLES`] samples, oldest first.
#[derive(Debug, Default)]
pub(super) struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Adds the newest sample, forgetting the oldest beyond [`SAMPLES`].
    pub(super) fn push(&mut self, sample: Sample) {
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Per-second rates of `key` over the last [`RATE_WINDOW`] intervals;
    /// none before two samples, or when the window's first sample lacks the
    /// key (it was just added).
    pub(super) fn rates(&self, key: &Key) -> Option<Rates> {
        let newest = self.samples.back()?;
        let first = self.samples.len().saturating_sub(RATE_WINDOW + 1);
        per_second(self.samples.get(first)?, newest, key)
    }

    /// Packets per second of `key` in each interval of the history, oldest
    /// first; 0 where it was not there.
    pub(super) fn packet_series(&self, key: &Key) -> Vec<f64> {
        self.samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|(a, b)| per_second(a, b, key).map_or(0.0, |r| r.packets))
            .collect()
    }
}

/// What `key` counted per second from `a` to `b`. A counter that went back
/// (its backend was removed and added again) counts 0, not a negative rate.
fn per_second(a: &Sample, b: &Sample, key: &Key) -> Option<Rates> {
    let (x, y) = (a.counts.get(key)?, b.counts.get(key)?);
    let seconds = b.at.checked_duration_since(a.at)?.as_secs_f64();
    if seconds <= 0.0 {
        return None;
    }
    let rate = |new: u64, old: u64| new.saturating_sub(old) as f64 / seconds;
    Some(Rates {
        packets: rate(y.packets, x.packets),
        bytes: rate(y.bytes, x.bytes),
        new_flows: rate(y.new_flows, x.new_flows),
        drops: rate(y.drops, x.drops),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample(start: Instant, second: u64, packets: u64) -> Sample {
        let counts = [(
            Key::Service("web".into()),
            Counts {
                packets,
                bytes: packets * 100,
                new_flows: packets / 10,
                drops: packets / 100,
            },
        )]
        .into_iter()
        .collect();
        Sample {
            at: start + Duration::from_secs(second),
            counts,
        }
    }

    #[test]
    fn rates_average_the_last_window_and_series_cover_every_interval() {
        let web = Key::Service("web".into());
        let start = Instant::now();
        let mut h = History::default();
        assert_eq!(h.rates(&web), None);
        h.push(sample(start, 0, 0));
        assert_eq!(h.rates(&web), None, "one sample has no interval");
        // 1,000 packets a second for 10 s, then 3,000 a second for 5 s.
        for s in 1..=10 {
            h.push(sample(start, s, s * 1000));
        }
        assert_eq!(h.rates(&web).map(|r| r.packets), Some(1000.0));
        for s in 11..=15 {
            h.push(sample(start, s, 10_000 + (s - 10) * 3000));
        }
        let r = h.rates(&web).unwrap();
        assert_eq!(
            (r.packets, r.bytes, r.new_flows, r.drops),
            (3000.0, 300_000.0, 300.0, 30.0)
        );
        let series = h.packet_series(&web);
        assert_eq!(series.len(), 15);
        assert_eq!(series[0], 1000.0);
        assert_eq!(series[14], 3000.0);
        assert_eq!(h.rates(&Key::Service("other".into())), None);
    }

    #[test]
    fn history_keeps_a_minute_and_counters_that_go_back_count_zero() {
        let web = Key::Service("web".into());
        let start = Instant::now();
        let mut h = History::default();
        for s in 0..200 {
            h.push(sample(start, s, s * 10));
        }
        assert_eq!(h.samples.len(), SAMPLES);
        assert_eq!(h.packet_series(&web).len(), SAMPLES - 1);
        // The backend was removed and added again: its counters restart.
        h.push(sample(start, 200, 5));
        assert_eq!(h.packet_series(&web).last(), Some(&0.0));
        assert!(h.rates(&web).unwrap().packets >= 0.0);
    }

    #[test]
    fn a_key_added_inside_the_window_has_no_rate_until_the_window_holds_it() {
        let start = Instant::now();
        let mut h = History::default();
        let new = Key::Backend("web".into(), "198.18.0.11".parse().unwrap());
        for s in 0..10 {
            let mut x = sample(start, s, s);
            if s >= 8 {
                x.counts.insert(new.clone(), Counts::default());
            }
            h.push(x);
        }
        assert_eq!(h.rates(&new), None);
        assert_eq!(h.packet_series(&new)[8], 0.0);
    }
}
