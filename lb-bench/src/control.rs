//! Control plane: how good lb's Maglev tables are, and how long one takes
//! to build (from criterion's estimates) next to how long it takes to write
//! it into the kernel (measured here, on a loaded data plane).
//!
//! Quality is exact, not sampled: every slot is a share of the flow-hash
//! space, so slot counts are flow shares and changed slots are moved flows.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb::{
    dataplane::Capacity,
    maglev::{self, Candidate},
};
use lb_common::{
    limits::{DEFAULT_RING_SIZE, NO_BACKEND},
    wire::IPPROTO_TCP,
};
use lb_tests::lab::{Lab, service_key};
use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// Backend counts the quality and timing figures are given for.
pub(crate) const BACKEND_COUNTS: [u32; 3] = [10, 100, LARGEST_COUNT];

/// The largest backend count, also measured in the smallest table size
/// (every service's before sizes followed the backend count).
const LARGEST_COUNT: u32 = 1000;

/// Weights cycled over the backends for the weighted-share figure: a
/// spread of 1 to 4, as an operator mixing server generations might use.
const WEIGHT_CYCLE: [u32; 4] = [1, 2, 3, 4];

/// Times each table write is repeated for its summary.
const PUBLISH_ROUNDS_FULL: usize = 7;
/// The same, for `--quick`.
const PUBLISH_ROUNDS_QUICK: usize = 3;

/// The criterion group the Maglev bench (lb-userspace/benches/maglev.rs) uses.
pub(crate) const CRITERION_GROUP: &str = "maglev_build";

/// Table quality for one backend count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Quality {
    /// Backends in the table.
    pub backends: u32,
    /// Table size (slots).
    pub table_size: u32,
    /// Equal weights: the largest backend's slots over the mean (ideal 1).
    pub max_over_mean: f64,
    /// Equal weights: the smallest backend's slots over the mean (ideal 1).
    pub min_over_mean: f64,
    /// Weights 1..4 cycled: the largest |share - weight share| / weight
    /// share over backends (ideal 0).
    pub weighted_max_error: f64,
    /// The same, averaged over backends.
    pub weighted_mean_error: f64,
    /// Fraction of flows (slots) that changed backend when one backend
    /// left, averaged over the backends tried.
    pub moved_on_removal: f64,
    /// The ideal: only the leaving backend's flows move, 1/N.
    pub ideal_moved: f64,
    /// `moved_on_removal / ideal_moved` (ideal 1).
    pub moved_over_ideal: f64,
}

/// Build and write times for one backend count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timing {
    /// Backends in the table.
    pub backends: u32,
    /// Criterion's median estimate of one build, ns (None: not run).
    pub build_ns: Option<f64>,
    /// Criterion's 95 % confidence interval of the median, ns.
    pub build_ci_ns: Option<(f64, f64)>,
    /// Writing the table into the kernel's rings map (the reference), ns.
    pub publish: Summary,
    /// Writing a one-backend change (one backend leaving, then coming
    /// back) as the daemon does: a store per slot that moves, in place, ns.
    pub delta: Summary,
    /// The slots that change moves, and stores.
    pub delta_slots: usize,
}

/// Everything the control-plane part measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControlResults {
    /// Table quality by backend count.
    pub quality: Vec<Quality>,
    /// Build and write time by backend count.
    pub timing: Vec<Timing>,
}

/// Distinct backend keys as the daemon builds them: address bytes then the
/// family tag.
fn keys(n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i);
            let mut k = [0u8; 17];
            k[..4].copy_from_slice(&ip.octets());
            k[16] = lb_common::FAMILY_V4;
            k.to_vec()
        })
        .collect()
}

fn build(keys: &[Vec<u8>], weights: &[u32], size: u32) -> Result<Vec<Option<u32>>> {
    let candidates: Vec<Candidate<'_>> = keys
        .iter()
        .zip(weights)
        .map(|(k, &weight)| Candidate { key: k, weight })
        .collect();
    Ok(maglev::build(&candidates, size)?)
}

/// Slots held by each candidate.
fn slot_counts(table: &[Option<u32>], n: usize) -> Vec<u64> {
    let mut counts = vec![0u64; n];
    for slot in table.iter().flatten() {
        counts[*slot as usize] += 1;
    }
    counts
}

/// The quality figures for `n` backends in a table of `size` slots.
pub(crate) fn quality(n: u32, size: u32) -> Result<Quality> {
    let keys = keys(n);
    let equal = vec![1; n as usize];
    let table = build(&keys, &equal, size)?;
    let counts = slot_counts(&table, n as usize);
    let mean = f64::from(size) / f64::from(n);
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let min = counts.iter().copied().min().unwrap_or(0) as f64;

    let weights: Vec<u32> = (0..n as usize)
        .map(|i| WEIGHT_CYCLE[i % WEIGHT_CYCLE.len()])
        .collect();
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let weighted = slot_counts(&build(&keys, &weights, size)?, n as usize);
    let errors: Vec<f64> = weighted
        .iter()
        .zip(&weights)
        .map(|(&c, &w)| {
            let want = f64::from(w) / total as f64;
            ((c as f64 / f64::from(size)) - want).abs() / want
        })
        .collect();

    // Removal: a few backends spread over the sorted order, each taken out
    // of the full set on its own.
    let tries: Vec<usize> = [0, n as usize / 3, 2 * n as usize / 3, n as usize - 1]
        .into_iter()
        .collect();
    let mut moved = 0.0;
    for &gone in &tries {
        let mut w = equal.clone();
        w[gone] = 0;
        let after = build(&keys, &w, size)?;
        let changed = table.iter().zip(&after).filter(|(a, b)| a != b).count();
        moved += changed as f64 / f64::from(size);
    }
    let moved = moved / tries.len() as f64;
    let ideal = 1.0 / f64::from(n);
    Ok(Quality {
        backends: n,
        table_size: size,
        max_over_mean: max / mean,
        min_over_mean: min / mean,
        weighted_max_error: errors.iter().copied().fold(0.0, f64::max),
        weighted_mean_error: errors.iter().sum::<f64>() / errors.len() as f64,
        moved_on_removal: moved,
        ideal_moved: ideal,
        moved_over_ideal: moved / ideal,
    })
}

/// Criterion's `estimates.json`, the part we read.
#[derive(Deserialize)]
struct Estimates {
    median: Estimate,
}

#[derive(Deserialize)]
struct Estimate {
    point_estimate: f64,
    confidence_interval: Interval,
}

#[derive(Deserialize)]
struct Interval {
    lower_bound: f64,
    upper_bound: f64,
}

/// Criterion's median estimate for `backends`, if the bench ran.
fn criterion_median(dir: &Path, backends: u32) -> Option<(f64, (f64, f64))> {
    let path = dir
        .join(CRITERION_GROUP)
        .join(backends.to_string())
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let e: Estimates = serde_json::from_str(&text).ok()?;
    let m = e.median;
    Some((
        m.point_estimate,
        (
            m.confidence_interval.lower_bound,
            m.confidence_interval.upper_bound,
        ),
    ))
}

/// Time to write a table of `n` backends into the kernel, `rounds` times:
/// whole (over a table with no backend, so every slot is stored), and as
/// the change of one backend leaving or coming back (only the slots that
/// move are stored). Returns both and the slots such a change stores.
fn publish_times(lab: &mut Lab, n: u32, rounds: usize) -> Result<(Summary, Summary, usize)> {
    let members: Vec<(u32, u32)> = (0..n).map(|id| (id, 1)).collect();
    for id in 0..n {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + id);
        lab.backend(id, ip.into(), true, 1)?;
    }
    lab.ring_size = maglev::table_size(n as usize);
    let key = service_key(Ipv4Addr::new(198, 18, 1, 1).into(), 80, IPPROTO_TCP);
    let ring = lab.service(0, key, 0, &members)?;
    let empty = vec![NO_BACKEND; ring.len()];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        lab.dp.publish_service(&key, 0, 0, 0, &empty)?;
        let start = Instant::now();
        let stored = lab.dp.publish_service(&key, 0, 0, 0, &ring)?;
        samples.push(duration_ns(start.elapsed()));
        ensure!(
            stored == ring.len(),
            "{stored} of {} slots stored",
            ring.len()
        );
    }
    let whole = Summary::of(&samples).context("no publish samples")?;
    let fewer = lab.service(0, key, 0, &members[..members.len() - 1])?;
    let slots = ring.iter().zip(&fewer).filter(|(a, b)| a != b).count();
    let (mut from, mut to) = (&fewer, &ring);
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        let stored = lab.dp.publish_service(&key, 0, 0, 0, to)?;
        samples.push(duration_ns(start.elapsed()));
        ensure!(
            stored == slots,
            "{stored} slots stored for a change of {slots}"
        );
        (from, to) = (to, from);
    }
    ensure!(
        lab.dp.live_ring(&key)? == *from,
        "the live table is not the one written last"
    );
    let delta = Summary::of(&samples).context("no delta samples")?;
    Ok((whole, delta, slots))
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// Measures quality, and build time against write time.
pub(crate) fn run(quick: bool, criterion: Option<&Path>) -> Result<ControlResults> {
    let quality = BACKEND_COUNTS
        .iter()
        .map(|&n| quality(n, maglev::table_size(n as usize)))
        .chain(std::iter::once(quality(LARGEST_COUNT, DEFAULT_RING_SIZE)))
        .collect::<Result<Vec<_>>>()?;
    let max_backends = *BACKEND_COUNTS.iter().max().unwrap_or(&1);
    let mut lab = Lab {
        dp: lb::dataplane::Dataplane::load(Capacity {
            max_services: 1,
            max_backends,
            conntrack_entries: 1024,
            ring_slots: Capacity::ring_slots_for(1, max_backends, None)?,
        })?,
        ring_size: 0,
    };
    let rounds = if quick {
        PUBLISH_ROUNDS_QUICK
    } else {
        PUBLISH_ROUNDS_FULL
    };
    let mut timing = Vec::new();
    for &n in &BACKEND_COUNTS {
        let (publish, delta, delta_slots) = publish_times(&mut lab, n, rounds)?;
        let build = criterion.and_then(|dir| criterion_median(dir, n));
        timing.push(Timing {
            backends: n,
            build_ns: build.map(|b| b.0),
            build_ci_ns: build.map(|b| b.1),
            publish,
            delta,
            delta_slots,
        });
    }
    if timing.iter().all(|t| t.build_ns.is_none()) {
        eprintln!("control: no criterion estimates found; build times left out");
    }
    Ok(ControlResults { quality, timing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_of_a_small_table_is_sane() {
        let q = quality(10, 4099).unwrap();
        assert!(q.max_over_mean >= 1.0 && q.max_over_mean < 1.1, "{q:?}");
        assert!(q.min_over_mean <= 1.0 && q.min_over_mean > 0.9, "{q:?}");
        assert!(q.weighted_max_error < 0.05, "{q:?}");
        // At least the leaving backend's share moves.
        assert!(q.moved_on_removal >= 0.09, "{q:?}");
        assert!((q.ideal_moved - 0.1).abs() < 1e-12);
    }

    #[test]
    fn keys_are_distinct() {
        let k = keys(1000);
        let mut sorted = k.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), k.len());
    }
}
