//! Summaries of repeated measurements: min, median, max and spread.

use serde::{Deserialize, Serialize};

/// What several interleaved measurements of one figure came to.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The smallest sample: the least disturbed run.
    pub min: f64,
    /// The median sample: the figure the report uses.
    pub median: f64,
    /// The largest sample.
    pub max: f64,
    /// `(max - min) / median`: how much the runs disagreed, as a fraction.
    pub spread: f64,
    /// Samples summarised.
    pub n: usize,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none or one is not finite.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let (min, max) = (sorted[0], sorted[n - 1]);
        let spread = if median > 0.0 {
            (max - min) / median
        } else {
            0.0
        };
        Some(Summary {
            min,
            median,
            max,
            spread,
            n,
        })
    }

    /// Summarises the per-round ratios `a[i] / b[i]` of two figures measured
    /// in the same rounds: pairing each round with itself takes out what
    /// disturbed both alike (another tenant, a frequency change), which the
    /// ratio of two medians keeps. `None` when the rounds do not pair up.
    pub fn of_ratios(a: &[f64], b: &[f64]) -> Option<Summary> {
        if a.len() != b.len() || b.iter().any(|&x| x <= 0.0) {
            return None;
        }
        let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        Summary::of(&ratios)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_takes_the_middle_sample() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 3.0, 5.0, 3));
        assert!((s.spread - 4.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn even_count_averages_the_middle_pair() {
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn ratios_pair_rounds() {
        // Round 2 disturbed both figures alike: pairing leaves 2× each round.
        let s = Summary::of_ratios(&[2.0, 8.0, 4.0], &[1.0, 4.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (2.0, 2.0, 2.0));
        assert_eq!(Summary::of_ratios(&[1.0], &[1.0, 2.0]), None);
        assert_eq!(Summary::of_ratios(&[1.0], &[0.0]), None);
    }

    #[test]
    fn nothing_to_summarise() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }
}
