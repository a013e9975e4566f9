//! The agent's file (`examples/lb-agent.toml`), validated whole: every
//! problem reported at once, with its line, as `lb check-config` does for
//! the daemon's.

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use serde::Deserialize;
use toml::Spanned;

use super::direct::Daemon;
use super::load::{self, LoadSettings};
use crate::{
    config::{self, ConfigError, ConfigErrors, Fleet, FleetFile, MAX_WEIGHT},
    registration::Secret,
};

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This backend's address, as lb reaches it.
    pub address: IpAddr,
    /// The lb services it serves, by name.
    pub services: Vec<String>,
    /// Its weight in each.
    pub weight: u32,
    /// Longest wait, on SIGTERM, for lb to report its flows ended.
    pub drain_timeout: Duration,
    /// What must pass for it to stay registered.
    pub check: Check,
    /// What its weight follows, if anything: the host's load.
    pub load: Option<LoadSettings>,
    /// This host's name, for operators.
    pub host: String,
    /// Where it registers.
    pub target: Target,
}

/// Where an agent registers.
#[derive(Debug, Clone)]
pub enum Target {
    /// The fleet's etcd (`[fleet]`): `fleet.lease` is the registration's
    /// TTL.
    Fleet(Fleet),
    /// A standalone lb daemon's registration port (`[lb]`).
    Daemon(Daemon),
}

/// The local check.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What is checked.
    pub kind: CheckKind,
    /// Between checks.
    pub interval: Duration,
    /// Longest a check may take.
    pub timeout: Duration,
}

/// One kind of local check.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    /// The port accepts a TCP connection on the backend's address.
    Port(u16),
    /// An HTTP GET of the path on the port answers 200.
    Http {
        /// The port.
        port: u16,
        /// The path.
        path: String,
    },
    /// The command exits 0.
    Command(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    address: Spanned<String>,
    services: Spanned<Vec<String>>,
    #[serde(default = "default_weight")]
    weight: Spanned<u32>,
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    drain_timeout: Duration,
    check: Spanned<CheckFile>,
    load: Option<Spanned<LoadFile>>,
    fleet: Option<Spanned<FleetFile>>,
    lb: Option<Spanned<LbFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LbFile {
    address: String,
    secret_file: std::path::PathBuf,
    host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadFile {
    #[serde(default)]
    cpu: bool,
    connections: Option<u64>,
    #[serde(default = "default_min_percent")]
    min_percent: u32,
    #[serde(default = "default_step")]
    step: u32,
    #[serde(default = "default_load_interval", with = "humantime_serde")]
    interval: Duration,
    agent_port: Option<u16>,
}

fn default_min_percent() -> u32 {
    load::DEFAULT_MIN_PERCENT
}
fn default_step() -> u32 {
    load::DEFAULT_STEP
}
/// The longest interval or timeout the agent takes: longer ones say
/// nothing useful, and the timer arithmetic overflows on absurd ones.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

fn default_load_interval() -> Duration {
    load::DEFAULT_INTERVAL
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckFile {
    port: Option<u16>,
    http_path: Option<String>,
    command: Option<Vec<String>>,
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    interval: Duration,
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    timeout: Duration,
}

fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}
/// Long enough for most requests to finish; an orchestrator's own grace
/// period (Kubernetes: 30 s) may need this raised.
fn default_drain_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_check_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}

/// Reads and validates the agent's file.
pub fn read(path: &Path) -> Result<Settings> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).map_err(|e| anyhow!("{}: invalid:\n{e}", path.display()))
}

/// Validates the agent's file text.
pub fn parse(text: &str) -> Result<Settings, ConfigErrors> {
    let file: File = config::from_toml(text, "file")?;
    let mut errors = Vec::new();
    let mut push = |at: &std::ops::Range<usize>, field: &str, message: String| {
        errors.push(ConfigError {
            line: Some(text[..at.start.min(text.len())].matches('\n').count() + 1),
            field: field.into(),
            message,
        });
    };
    let address = file.address.get_ref().parse::<IpAddr>();
    match &address {
        Ok(ip) if !config::usable(*ip) => {
            push(
                &file.address.span(),
                "address",
                "not a unicast address".into(),
            );
        }
        Ok(_) => {}
        Err(_) => push(
            &file.address.span(),
            "address",
            format!("{:?} is not an IP address", file.address.get_ref()),
        ),
    }
    if file.services.get_ref().is_empty() {
        push(
            &file.services.span(),
            "services",
            "name at least one service this host serves".into(),
        );
    }
    let mut named = std::collections::BTreeSet::new();
    for s in file.services.get_ref() {
        if !named.insert(s) {
            push(
                &file.services.span(),
                "services",
                format!("{s:?} is named twice"),
            );
        }
        if !config::valid_name(s) {
            push(
                &file.services.span(),
                "services",
                format!("{s:?}: a service name is letters, digits, '-', '_' or '.'"),
            );
        }
    }
    if *file.weight.get_ref() > MAX_WEIGHT {
        push(
            &file.weight.span(),
            "weight",
            config::weight_range_error(file.weight.get_ref()),
        );
    }
    let c = file.check.get_ref();
    let kind = match (c.port, &c.http_path, &c.command) {
        (Some(port), None, None) => Some(CheckKind::Port(port)),
        (Some(port), Some(path), None) if path.starts_with('/') => Some(CheckKind::Http {
            port,
            path: path.clone(),
        }),
        (Some(_), Some(path), None) => {
            push(
                &file.check.span(),
                "check.http_path",
                format!("{path:?}: a path starts with '/'"),
            );
            None
        }
        (None, None, Some(cmd)) if !cmd.is_empty() => Some(CheckKind::Command(cmd.clone())),
        _ => {
            push(
                &file.check.span(),
                "check",
                "give port (with http_path for an HTTP check), or command".into(),
            );
            None
        }
    };
    if c.interval.is_zero() || c.timeout.is_zero() {
        push(
            &file.check.span(),
            "check",
            "interval and timeout must be above zero".into(),
        );
    }
    if c.interval > MAX_INTERVAL || c.timeout > MAX_INTERVAL {
        push(
            &file.check.span(),
            "check",
            format!("interval and timeout must be at most {MAX_INTERVAL:?}"),
        );
    }
    let load = file.load.as_ref().map(|l| {
        let span = l.span();
        let l = l.get_ref();
        if !l.cpu && l.connections.is_none() {
            push(
                &span,
                "load",
                "weigh by cpu = true, connections = N, or both".into(),
            );
        }
        if l.connections == Some(0) {
            push(&span, "load.connections", "must be above zero".into());
        }
        let port = match &kind {
            Some(CheckKind::Port(p) | CheckKind::Http { port: p, .. }) => Some(*p),
            _ => None,
        };
        if l.connections.is_some() && port.is_none() {
            push(
                &span,
                "load.connections",
                "counts connections to the check's port: give check.port".into(),
            );
        }
        for (field, v) in [("load.min_percent", l.min_percent), ("load.step", l.step)] {
            if !(1..=100).contains(&v) {
                push(&span, field, format!("{v}: a percent from 1 to 100"));
            }
        }
        if l.interval.is_zero() || l.interval > MAX_INTERVAL {
            push(
                &span,
                "load.interval",
                format!("must be above zero and at most {MAX_INTERVAL:?}"),
            );
        }
        LoadSettings {
            cpu: l.cpu,
            connections: l.connections.zip(port).map(|(n, p)| (p, n)),
            min_percent: l.min_percent,
            step: l.step,
            interval: l.interval,
            agent_port: l.agent_port,
        }
    });
    let target = match (&file.fleet, &file.lb) {
        (Some(f), None) => match config::fleet_of(f, text) {
            Ok(f) => {
                // Renewals do not wait for checks, but a check slower than
                // the lease is a mistake in the file: a host then stays
                // registered for several leases after its service stops.
                let ttl = Duration::from_secs(f.lease.as_secs().max(1));
                if c.interval.saturating_add(c.timeout) >= ttl {
                    push(
                        &file.check.span(),
                        "check.interval",
                        format!(
                            "checks every {:?}, each taking up to {:?}, outlast a {ttl:?} lease: a host whose service stopped would stay registered for several leases; check more often than fleet.lease, or with a shorter timeout",
                            c.interval, c.timeout
                        ),
                    );
                }
                Some((f.node.clone(), Target::Fleet(f)))
            }
            Err(e) => {
                errors.extend(e.0);
                None
            }
        },
        (None, Some(lb)) => {
            let span = lb.span();
            let l = lb.get_ref();
            let address = l
                .address
                .parse()
                .map_err(|_| format!("{:?}: write it as address:port", l.address));
            let secret = Secret::read(&l.secret_file).map_err(|e| format!("{e:#}"));
            let host = l.host.clone().unwrap_or_else(config::host_name);
            if !config::valid_name(&host) {
                push(
                    &span,
                    "lb.host",
                    format!("{host:?}: use letters, digits, '-', '_' or '.'"),
                );
            }
            match (address, secret) {
                (Ok(address), Ok(secret)) => {
                    Some((host, Target::Daemon(Daemon { address, secret })))
                }
                (address, secret) => {
                    if let Err(e) = address {
                        push(&span, "lb.address", e);
                    }
                    if let Err(e) = secret {
                        push(&span, "lb.secret_file", e);
                    }
                    None
                }
            }
        }
        _ => {
            push(
                &(0..0),
                "fleet",
                "give [fleet] (register in the fleet's etcd) or [lb] (a standalone lb's registration port), one of them".into(),
            );
            None
        }
    };
    match (address, kind, target) {
        (Ok(address), Some(kind), Some((host, target))) if errors.is_empty() => Ok(Settings {
            address,
            services: file.services.get_ref().clone(),
            weight: *file.weight.get_ref(),
            drain_timeout: file.drain_timeout,
            check: Check {
                kind,
                interval: c.interval,
                timeout: c.timeout,
            },
            load,
            host,
            target,
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../examples/lb-agent.toml");

    #[test]
    fn the_example_is_valid() {
        let s = parse(EXAMPLE).unwrap();
        assert_eq!(s.services, ["web"]);
        assert!(matches!(s.check.kind, CheckKind::Http { port: 80, .. }));
        assert!(matches!(&s.target, Target::Fleet(f) if f.prefix == "/lb"));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = r#"
address = "224.0.0.1"
services = ["bad name", "web", "web"]
weight = 70000
[check]
port = 80
command = ["true"]
[fleet]
endpoints = ["localhost:2379"]
"#;
        let e = parse(text).unwrap_err().to_string();
        for needle in [
            "unicast",
            "service name",
            "\"web\" is named twice",
            "weight",
            "give port",
            "http://host:port",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn load_settings_are_checked() {
        let base = "address = \"198.18.0.11\"\nservices = [\"web\"]\n[check]\ncommand = [\"true\"]\n\
                    [fleet]\nendpoints = [\"http://198.18.0.250:2379\"]\n";
        let e = parse(&format!(
            "{base}[load]\nconnections = 10\nmin_percent = 0\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("give check.port") && e.contains("load.min_percent"),
            "{e}"
        );
        let e = parse(&format!("{base}[load]\n")).unwrap_err().to_string();
        assert!(e.contains("cpu = true"), "{e}");
        let s = parse(&format!("{base}[load]\ncpu = true\nagent_port = 9300\n")).unwrap();
        let l = s.load.unwrap();
        assert!(l.cpu && l.connections.is_none());
        assert_eq!((l.min_percent, l.step, l.agent_port), (10, 10, Some(9300)));
    }

    #[test]
    fn a_check_slower_than_the_lease_is_refused() {
        let text = r#"
address = "198.18.0.11"
services = ["web"]
[check]
port = 80
interval = "5s"
[fleet]
endpoints = ["http://198.18.0.250:2379"]
lease = "3s"
"#;
        let e = parse(text).unwrap_err().to_string();
        assert!(e.contains("check more often"), "{e}");
        // Fast enough, but a check may take its whole timeout before the
        // keep-alive.
        let slow = text
            .replace("interval = \"5s\"", "interval = \"1s\"\ntimeout = \"2s\"")
            .replace("lease = \"3s\"", "lease = \"2s\"");
        let e = parse(&slow).unwrap_err().to_string();
        assert!(e.contains("check more often"), "{e}");
        // Durations past what an Instant holds are refused, not a panic.
        let huge = text.replace(
            "interval = \"5s\"",
            "interval = \"400000000000years\"\ntimeout = \"400000000000years\"",
        );
        assert!(parse(&huge).is_err());
        // And so are they with an lb target, which has no lease.
        let standalone = huge.replace(
            "[fleet]\nendpoints = [\"http://198.18.0.250:2379\"]\nlease = \"3s\"\n",
            "[lb]\naddress = \"198.18.0.1:9200\"\nsecret_file = \"/etc/lb/secret\"\n",
        );
        assert_ne!(standalone, huge);
        let e = parse(&standalone).unwrap_err().to_string();
        assert!(e.contains("at most 3600s"), "{e}");
        let fine = slow
            .replace("timeout = \"2s\"", "timeout = \"500ms\"")
            .replace("lease = \"2s\"", "lease = \"3s\"");
        assert!(parse(&fine).is_ok());
    }
}
