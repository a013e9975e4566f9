//! Terminal bar charts of how connections spread over backends.

use std::fmt::Write as _;

/// Width of the longest bar, in characters.
const BAR_WIDTH: usize = 40;

/// One row: a backend, its configured weight and the connections it got.
pub struct Row<'a> {
    /// Backend name.
    pub name: &'a str,
    /// Configured weight (shown beside the bar for comparison).
    pub weight: u32,
    /// Connections it answered.
    pub count: usize,
}

/// Renders rows as bars scaled to the largest count, with each row's share
/// of the total next to its share of the weights.
pub fn render(rows: &[Row<'_>]) -> String {
    let total: usize = rows.iter().map(|r| r.count).sum();
    let weights: u32 = rows.iter().map(|r| r.weight).sum();
    let max = rows.iter().map(|r| r.count).max().unwrap_or(0).max(1);
    let name_width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in rows {
        let bar = "█".repeat(r.count * BAR_WIDTH / max);
        let share = pct(r.count as f64, total as f64);
        let target = pct(f64::from(r.weight), f64::from(weights));
        let _ = writeln!(
            out,
            "  {:<name_width$}  weight {:>2} ({target:>5.1}%)  {bar:<BAR_WIDTH$} {:>4} ({share:>5.1}%)",
            r.name, r.weight, r.count
        );
    }
    out
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole == 0.0 {
        0.0
    } else {
        100.0 * part / whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_count_and_show_shares() {
        let out = render(&[
            Row {
                name: "a",
                weight: 1,
                count: 10,
            },
            Row {
                name: "bb",
                weight: 3,
                count: 30,
            },
            Row {
                name: "c",
                weight: 0,
                count: 0,
            },
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].matches('█').count(), BAR_WIDTH);
        assert_eq!(lines[0].matches('█').count(), BAR_WIDTH / 3);
        assert_eq!(lines[2].matches('█').count(), 0);
        assert!(lines[1].contains("( 75.0%)"), "{}", lines[1]);
        assert!(lines[0].contains("( 25.0%)"), "{}", lines[0]);
    }
}
