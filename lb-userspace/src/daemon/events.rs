//! Recent events for the status page: the daemon's own log lines at info
//! and above (backends down and up, tables rebuilt, configuration applied,
//! operator changes), the newest [`KEPT`] kept in memory. They are the log's
//! lines, so the page and the journal never tell different stories.

use std::{
    collections::VecDeque,
    fmt::{Debug, Write as _},
    sync::{LazyLock, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    Layer,
    filter::Targets,
    layer::{Context, Filter},
};

/// Events kept.
pub(crate) const KEPT: usize = 100;
/// lb's own modules (the daemon's, and what it runs: routes, the fleet,
/// the data plane, next hops): the crates lb uses are not events.
const LB_TARGET: &str = env!("CARGO_CRATE_NAME");

/// One event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct EventRow {
    /// When, in seconds since the Unix epoch.
    pub unix_seconds: f64,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// The log line's message and its fields.
    pub text: String,
}

static RECENT: LazyLock<Mutex<VecDeque<EventRow>>> =
    LazyLock::new(|| Mutex::new(VecDeque::with_capacity(KEPT)));

/// The kept events, newest first.
pub(crate) fn recent() -> Vec<EventRow> {
    RECENT
        .lock()
        .map(|r| r.iter().rev().cloned().collect())
        .unwrap_or_default()
}

/// The layer that keeps them; it sees only lb's lines at info and above,
/// whatever `LB_LOG` lets through to stderr.
pub(crate) fn layer<S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>>()
-> impl Layer<S> {
    Recorder.with_filter(daemon_lines())
}

fn daemon_lines<S>() -> impl Filter<S> {
    Targets::new()
        .with_target(LB_TARGET, Level::INFO)
        // The XDP program's lines, whose target `LB_TARGET` is a prefix
        // of, are not events either.
        .with_target(
            super::KERNEL_LOG_TARGET,
            tracing::level_filters::LevelFilter::OFF,
        )
}

struct Recorder;

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        let row = EventRow {
            unix_seconds: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            level: event.metadata().level().as_str().to_lowercase(),
            text: line.message + &line.fields,
        };
        if let Ok(mut recent) = RECENT.lock() {
            if recent.len() == KEPT {
                // The oldest info line goes first while warnings and errors
                // hold less than half: routine lines (slow start steps,
                // rebuilds) must not push out the warnings an operator
                // opens the page for, nor old warnings the info lines that
                // followed them ("backend up" after "backend down").
                let warnings = recent.iter().filter(|r| r.level != "info").count();
                let oldest = if warnings < KEPT / 2 {
                    recent.iter().position(|r| r.level == "info")
                } else {
                    None
                };
                recent.remove(oldest.unwrap_or(0));
            }
            recent.push_back(row);
        }
    }
}

/// A log line as text: the message, then ` field=value` for each field.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn keeps_lbs_lines_at_info_and_above_with_their_fields_warnings_longest() {
        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "lb::daemon::controller", service = "web", backend = %"198.18.0.11", "backend down");
            tracing::debug!(target: "lb::daemon::controller", "not an event");
            tracing::info!(target: "lb_ebpf", "the XDP program's line");
            tracing::info!(target: "aya", "a crate's line");
            tracing::info!(target: "lb::routes", "announced");
            for i in 0..KEPT {
                tracing::info!(target: "lb::daemon", i, "filler");
            }
            tracing::info!(target: "lb::daemon", "table rebuilt");
        });
        let events = recent();
        assert_eq!(events.len(), KEPT);
        assert_eq!(events[0].text, "table rebuilt");
        assert_eq!(events[0].level, "info");
        assert!(
            events
                .iter()
                .all(|e| !e.text.contains("XDP") && e.text != "not an event")
        );
        assert!(events.iter().all(|e| e.text != "a crate's line"));
        // The oldest kept is the warning: the routes' line and the first
        // two filler lines fell out before it.
        assert_eq!(events[KEPT - 1].level, "warn");
        assert_eq!(events[KEPT - 2].text, "filler i=2");

        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "lb::daemon::controller", service = "web", backend = %"198.18.0.11", "backend down");
        });
        assert_eq!(
            recent()[0].text,
            "backend down service=web backend=198.18.0.11"
        );
        assert_eq!(recent()[0].level, "warn");

        // Once warnings hold half, the oldest line goes whatever its level:
        // the info line after a run of warnings stays.
        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..KEPT {
                tracing::warn!(target: "lb::daemon", i, "backend down");
            }
            tracing::info!(target: "lb::daemon", "backend up");
            tracing::warn!(target: "lb::daemon", "backend down again");
        });
        assert_eq!(recent()[1].text, "backend up");
    }
}
