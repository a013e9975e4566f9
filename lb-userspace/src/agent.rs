//! The agent check (pure): HAProxy's agent-check protocol, and what a
//! backend's agent has lb do.
//!
//! An agent is a small server on the backend that answers each connection
//! with one line of words, separated by spaces, tabs or commas: `ready`,
//! `drain` or `maint` (the operator states), `up` or `down` (`fail` and
//! `stopped` mean down), `N%` (the share of the configured weight). A word
//! changes only what it names; what the line leaves out keeps its last
//! value. `maxconn:N` is accepted and ignored (lb limits no connections),
//! and `#` starts a comment. A line with any other word changes nothing.

use std::fmt;

use crate::daemon::runtime::Admin;

/// Longest reply line read from an agent.
pub const MAX_REPLY: usize = 512;

/// Highest percent an agent may give: an agent lowers a backend's weight,
/// never raises it above the configured one.
pub const MAX_PERCENT: u32 = 100;

/// What one reply says; `None` where it says nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reply {
    /// `ready`, `drain` or `maint`.
    pub admin: Option<Admin>,
    /// `up` (true), `down`, `fail` or `stopped` (false).
    pub up: Option<bool>,
    /// `N%`, capped at [`MAX_PERCENT`].
    pub percent: Option<u32>,
}

/// Parses one reply line (without its line end).
pub fn parse(line: &str) -> Result<Reply, String> {
    let words = line.split('#').next().unwrap_or_default();
    let mut reply = Reply::default();
    for word in words
        .split([' ', '\t', ','])
        .map(str::trim)
        .filter(|w| !w.is_empty())
    {
        let lower = word.to_ascii_lowercase();
        match lower.as_str() {
            "ready" => reply.admin = Some(Admin::Ready),
            "drain" => reply.admin = Some(Admin::Drain),
            "maint" => reply.admin = Some(Admin::Maintenance),
            "up" => reply.up = Some(true),
            "down" | "fail" | "stopped" => reply.up = Some(false),
            w if w.starts_with("maxconn:") => {}
            w => {
                let percent = w
                    .strip_suffix('%')
                    .and_then(|n| n.parse::<u32>().ok())
                    .ok_or_else(|| format!("unknown word {word:?}"))?;
                reply.percent = Some(percent.min(MAX_PERCENT));
            }
        }
    }
    Ok(reply)
}

/// What a backend's agent has lb do, as last applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The agent's operator state; the operator's own wins over it unless
    /// that is `ready`.
    pub admin: Admin,
    /// The agent said `down` (out of the table, as a failed health check).
    pub down: bool,
    /// Percent of the configured weight.
    pub percent: u32,
}

impl Default for View {
    /// Before any answer: no effect.
    fn default() -> Self {
        View {
            admin: Admin::Ready,
            down: false,
            percent: MAX_PERCENT,
        }
    }
}

impl View {
    /// The view after `reply`: what the reply names changes, the rest
    /// stays; a percent less than `step` points from the current one stays
    /// too, so that a noisy agent does not move flows for nothing (100 and
    /// 0 are always reached: they bring a backend back to its full weight
    /// or take it out).
    pub fn after(self, reply: &Reply, step: u32) -> View {
        let percent = match reply.percent {
            Some(p) if p.abs_diff(self.percent) >= step || p == MAX_PERCENT || p == 0 => p,
            _ => self.percent,
        };
        View {
            admin: reply.admin.unwrap_or(self.admin),
            down: reply.up.map_or(self.down, |up| !up),
            percent,
        }
    }
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let admin = match self.admin {
            Admin::Ready => "ready",
            Admin::Drain => "drain",
            Admin::Maintenance => "maint",
        };
        let health = if self.down { "down" } else { "up" };
        write!(f, "{admin} {health} {}%", self.percent)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn words_say_what_they_name_and_nothing_else() {
        assert_eq!(parse(""), Ok(Reply::default()));
        assert_eq!(
            parse("up 75%"),
            Ok(Reply {
                admin: None,
                up: Some(true),
                percent: Some(75)
            })
        );
        assert_eq!(
            parse("DRAIN,\tfail # disk full"),
            Ok(Reply {
                admin: Some(Admin::Drain),
                up: Some(false),
                percent: None
            })
        );
        assert_eq!(
            parse("maint maxconn:30"),
            Ok(Reply {
                admin: Some(Admin::Maintenance),
                ..Reply::default()
            })
        );
        assert_eq!(parse("stopped").map(|r| r.up), Ok(Some(false)));
        assert_eq!(parse("ready").map(|r| r.admin), Ok(Some(Admin::Ready)));
        assert_eq!(parse("250%").map(|r| r.percent), Ok(Some(MAX_PERCENT)));
        assert_eq!(parse("0%").map(|r| r.percent), Ok(Some(0)));
        for bad in ["sleepy", "50", "-5%", "5.5%", "%", "up, half%"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_view_changes_by_what_the_reply_says_and_by_steps() {
        let start = View::default();
        let half = start.after(&parse("50%").unwrap(), 5);
        assert_eq!(
            half,
            View {
                percent: 50,
                ..start
            }
        );
        // Within the step: unchanged; at the step: changed.
        assert_eq!(half.after(&parse("54%").unwrap(), 5), half);
        assert_eq!(half.after(&parse("55%").unwrap(), 5).percent, 55);
        // 100 and 0 are reached from anywhere near.
        assert_eq!(
            half.after(&parse("97%").unwrap(), 5)
                .after(&parse("100%").unwrap(), 5)
                .percent,
            100
        );
        assert_eq!(
            View {
                percent: 3,
                ..start
            }
            .after(&parse("0%").unwrap(), 5)
            .percent,
            0
        );
        // Words not in the reply keep their value.
        let drained = half.after(&parse("drain").unwrap(), 5);
        assert_eq!((drained.admin, drained.percent), (Admin::Drain, 50));
        let down = drained.after(&parse("down").unwrap(), 5);
        assert_eq!((down.admin, down.down), (Admin::Drain, true));
        let back = down.after(&parse("ready up 100%").unwrap(), 5);
        assert_eq!(back, View::default(), "{back}");
        assert_eq!(down.to_string(), "drain down 50%");
    }

    proptest! {
        #[test]
        fn any_line_parses_or_is_refused_without_panic(line in "\\PC{0,80}") {
            if let Ok(r) = parse(&line) {
                prop_assert!(r.percent.is_none_or(|p| p <= MAX_PERCENT));
            }
        }

        #[test]
        fn a_view_after_any_reply_stays_in_bounds(
            percent in 0u32..=100, step in 0u32..=100, reply in 0u32..=300,
        ) {
            let v = View { percent, ..View::default() };
            let r = Reply { percent: Some(reply.min(MAX_PERCENT)), ..Reply::default() };
            let after = v.after(&r, step);
            prop_assert!(after.percent <= MAX_PERCENT);
            prop_assert!(after.percent == percent || after.percent == r.percent.unwrap_or(percent));
        }
    }
}
