//! The command line. One binary: `lb daemon` runs the daemon, the other
//! subcommands talk to it over its control socket. Human tables by default,
//! `--json` for scripts. Exit status: 0 on success, 1 on any error (with a
//! message on stderr saying what to do), 2 on a usage error.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use serde_json::Value;

use crate::{
    api::{
        self, AgentRow, BackendRow, ConntrackStatsView, FleetStatus, FlowRow, NodeStatus, Request,
        ServiceRow, SourceRow, Stats,
    },
    bird,
    config::{Affinity, CheckKind, DEFAULT_SOCKET, Mode, Protocol, XdpModeSetting},
    config_edit::Edit,
    daemon::{self, runtime::Admin},
    dataplane::{DEFAULT_DECAP_PIN_DIR, DEFAULT_PIN_DIR, SourceList},
    decap::{self, DEFAULT_DECAP_FILE},
    doctor,
};

/// lb: an XDP L4 load balancer.
#[derive(Parser)]
#[command(name = "lb", version, about)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "LB_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground; under systemd (Type=notify) it says
    /// READY=1 once attached, its tables live and its socket answering.
    Daemon {
        /// Configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// bpffs directory where maps and links are pinned.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Run on a backend host: keep it registered with the lb fleet while
    /// its local check passes; on SIGTERM drain it, wait for its flows to
    /// end, deregister and exit 0 (docs/agent.md).
    Agent {
        /// The agent's file (see examples/lb-agent.toml).
        #[arg(long, short)]
        config: PathBuf,
        /// Put the host's setup right where it fails: the VIP on lo, the
        /// ARP settings of dsr-l2, rp_filter and the decapsulator of
        /// ipip/gue (`lb doctor --backend` checks the same).
        #[arg(long)]
        fix: bool,
        /// Check the setup and the local check once, say what the agent
        /// would register, and exit (non-zero when not ready).
        #[arg(long)]
        once: bool,
        /// With --once: change nothing; say what --fix would do.
        #[arg(long, requires = "once")]
        dry_run: bool,
    },
    /// Validate a configuration file without touching anything.
    CheckConfig {
        /// Configuration file.
        file: PathBuf,
    },
    /// The daemon's status.
    Status,
    /// Services.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Services' source lists: prefixes whose packets are dropped (deny),
    /// or the only ones taken (allow).
    #[command(subcommand)]
    Acl(AclCommand),
    /// This node: drained or not, each VIP announced or why not, BGP sessions.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The fleet this node belongs to (with [fleet] in its configuration).
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// The connection table: its entries, flushes, occupancy.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Packets, bytes and new flows per service and backend, and the global
    /// reasons, with per-second rates over the daemon's last five seconds.
    Stats {
        /// Print again every second.
        #[arg(long)]
        watch: bool,
    },
    /// Health of every backend: state, last probe, since when.
    Health,
    /// Print a shell completion script (bash, zsh, fish, elvish or
    /// powershell) for lb.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the lb(8) man page (roff), as packages install it.
    #[command(hide = true)]
    Man,
    /// Read the daemon's configuration file again and apply what changed;
    /// an invalid file changes nothing and this exits non-zero (what
    /// `systemctl reload lb` runs).
    Reload,
    /// Make the running state equal a configuration file: all of it or,
    /// should a kernel write fail part way, none of it (what was written is
    /// undone).
    Apply {
        /// Configuration file.
        #[arg(short, long)]
        file: PathBuf,
        /// Show the changes and table slots that would move, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Which backend a client's flow goes to, and why.
    Explain {
        /// Client address and port, e.g. 198.18.0.1:40000 or [2001:2::1]:40000.
        client: SocketAddr,
        /// Service name.
        service: String,
    },
    /// Check this host before lb attaches (--config or --interface), or as a
    /// backend (--backend VIP); prints the command that fixes each problem.
    /// Without --probe-native it changes nothing: the driver's XDP support is
    /// read from the kernel (Linux 6.3 and later).
    Doctor {
        /// The daemon's configuration: its interfaces, XDP mode and backends' VIPs.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// An interface to check (instead of the configuration's).
        #[arg(long = "interface")]
        interfaces: Vec<String>,
        /// XDP mode the interfaces are to run in [default: the
        /// configuration's, else auto].
        #[arg(long, value_parser = config_word::<XdpModeSetting>)]
        xdp_mode: Option<XdpModeSetting>,
        /// This host is a backend of a service with this VIP.
        #[arg(long = "backend")]
        backend_vips: Vec<std::net::IpAddr>,
        /// Mode of the --backend services.
        #[arg(long, default_value = "dsr-l2", value_parser = config_word::<Mode>)]
        mode: Mode,
        /// bpffs directory where the daemon pins.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Attach lb's program in driver mode for a moment, on each
        /// interface without a program, to see whether the driver takes it.
        /// Some drivers (ixgbe, i40e) reset the link for it, dropping
        /// traffic for that moment: not on a host in service.
        #[arg(long)]
        probe_native: bool,
    },
    /// The decapsulator a backend of `ipip` and `gue` services runs (docs/decap.md).
    #[command(subcommand)]
    Decap(DecapCommand),
    /// Run the product end to end on a demo topology in network namespaces.
    Demo {
        /// Leave the topology and daemon running until Ctrl-C, and print how
        /// to explore them.
        #[arg(long, conflicts_with = "fleet")]
        keep: bool,
        /// Three lb nodes behind a BIRD router with one etcd: announcements,
        /// a change live on every node, a node failure under long-lived
        /// connections.
        #[arg(long)]
        fleet: bool,
    },
}

#[derive(Subcommand)]
enum DecapCommand {
    /// Make the decapsulator run as the file says: fill its addresses,
    /// attach it (switching a running one in place), pin it, and exit; the
    /// pins keep it running. Nothing changes if any of it fails.
    Apply {
        /// The decapsulator's file.
        #[arg(short, long, default_value = DEFAULT_DECAP_FILE)]
        file: PathBuf,
        /// bpffs directory for its maps and links.
        #[arg(long, default_value = DEFAULT_DECAP_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Its interfaces, endpoints, accepted sources, VIPs and counters.
    Status {
        /// bpffs directory of its maps and links.
        #[arg(long, default_value = DEFAULT_DECAP_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach it from every interface and remove its pins.
    Remove {
        /// bpffs directory of its maps and links.
        #[arg(long, default_value = DEFAULT_DECAP_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Every node, alive or not: revision, table digests (disagreements
    /// marked), announced VIPs, BGP sessions, drained.
    Status,
    /// Seed the fleet's services from a configuration file's [[service]]
    /// tables (its other sections are this node's own and stay local).
    Import {
        /// Configuration file.
        file: PathBuf,
        /// Replace the services the fleet already has.
        #[arg(long)]
        replace: bool,
    },
    /// Print the fleet's state as a standalone configuration file.
    Export,
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Drained or not, each VIP announced or why not, and BIRD's BGP sessions.
    Status,
    /// Withdraw every VIP of this node; keep forwarding what still arrives so
    /// established flows finish. Persists across restarts until `undrain`.
    Drain {
        /// Return once no new flow has arrived for --quiet (exit 1 after --timeout).
        #[arg(long)]
        wait: bool,
        /// With --wait: how long without a new flow counts as drained.
        #[arg(long, default_value = "5s", value_parser = duration, requires = "wait")]
        quiet: Duration,
        /// With --wait: give up after this long.
        #[arg(long, default_value = "5m", value_parser = duration, requires = "wait")]
        timeout: Duration,
    },
    /// Announce again the VIPs this node can serve.
    Undrain,
    /// With no daemon running: withdraw every VIP route lb left in the
    /// kernel's tables, so that BIRD stops announcing this node. Refused
    /// while a daemon listens on --socket (give its `settings.socket` when
    /// not the default; `lb node drain` is for a running one). A daemon
    /// started later announces again as its rules decide.
    Withdraw,
}

#[derive(Subcommand)]
enum ConntrackCommand {
    /// Entries of one service or all: client, backend, state, idle time.
    List {
        /// Service name.
        service: Option<String>,
        /// Only the entries on this backend.
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
    },
    /// Remove the entries of one service, or all: their flows' next packets
    /// take the Maglev table (they stay put unless the table moved them).
    Flush {
        /// Service name.
        service: Option<String>,
    },
    /// Occupancy by state, inserts, refused inserts, the insert budget's
    /// state and the timeouts.
    Stats,
}

/// Parses a weight, 0-65535, with the one message for anything else.
fn weight(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(w) if w <= crate::config::MAX_WEIGHT => Ok(w),
        _ => Err(crate::config::weight_range_error(s)),
    }
}

/// Parses `500ms`, `5s`, `2m` as the configuration file does.
fn duration(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// List services with their table digests (equal digests: equal tables).
    List,
    /// Add a service (no backends yet); written to the configuration file.
    Add {
        /// Unique name.
        name: String,
        /// VIP:PORT/PROTO, e.g. 198.18.1.1:80/tcp or [2001:2:1::53]:53/udp.
        endpoint: Endpoint,
        /// dsr-l2, ipip or gue.
        #[arg(long, default_value = "dsr-l2", value_parser = config_word::<Mode>)]
        mode: Mode,
        /// none (5-tuple) or client (client address only).
        #[arg(long, default_value = "none", value_parser = config_word::<Affinity>)]
        affinity: Affinity,
        /// Health probe: tcp, http, https, udp or none (edit the file for
        /// the rest of its settings).
        #[arg(long, default_value = "tcp", value_parser = config_word::<CheckKind>)]
        check: CheckKind,
        /// The probe's request payload: `--check udp` needs it (`tcp`: optional).
        #[arg(long)]
        send: Option<String>,
        /// The prefix the probe's reply must start with: `--check udp`
        /// needs it (`tcp`: optional).
        #[arg(long)]
        expect: Option<String>,
        /// Show the changes, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a service and its backends; written to the configuration file.
    Del {
        /// Service name.
        name: String,
        /// Show the changes, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A service's `VIP:PORT/PROTO` on the command line.
#[derive(Clone, Debug)]
struct Endpoint {
    addr: SocketAddr,
    protocol: Protocol,
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || format!("{s:?} is not VIP:PORT/PROTO, e.g. 198.18.1.1:80/tcp");
        let (addr, proto) = s.split_once('/').ok_or_else(usage)?;
        Ok(Endpoint {
            addr: addr.parse().map_err(|_| usage())?,
            protocol: config_word(proto)?,
        })
    }
}

/// Parses a word as the configuration file spells it (`dsr-l2`, `udp`, ...),
/// so the CLI and the file accept the same values.
fn config_word<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(Value::String(s.to_string())).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum AclCommand {
    /// List the prefixes of the services' lists, of one service or all.
    List {
        /// Service name.
        service: Option<String>,
    },
    /// Add a prefix to a service's list; written to the configuration file.
    Add(AclChange),
    /// Remove a prefix from a service's list; written to the configuration file.
    Del(AclChange),
}

/// One prefix of one service's list, added or removed.
#[derive(clap::Args)]
struct AclChange {
    /// Service name.
    service: String,
    /// ADDRESS/LENGTH, e.g. 198.18.0.0/16 or 2001:2::/48, host bits clear.
    prefix: String,
    #[command(flatten)]
    list: ListChoice,
    /// `del --allow`: remove the list's last prefix all the same, which
    /// admits every source.
    #[arg(long)]
    open: bool,
    /// Show the changes, change nothing.
    #[arg(long)]
    dry_run: bool,
}

impl AclChange {
    /// The request making the change: adding the prefix, or removing it.
    fn request(self, add: bool) -> Result<Request> {
        if add && self.open {
            anyhow::bail!("--open is for `lb acl del --allow` (the allow list's last prefix)");
        }
        Ok(Request::Edit {
            edit: Edit::source(add, self.service, self.list.list(), self.prefix, self.open),
            dry_run: self.dry_run,
        })
    }
}

/// Which source list a command changes.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct ListChoice {
    /// The deny list: packets from the prefix are dropped (deny wins).
    #[arg(long)]
    deny: bool,
    /// The allow list: once it has a prefix, only its sources are taken.
    #[arg(long)]
    allow: bool,
}

impl ListChoice {
    fn list(&self) -> SourceList {
        if self.allow {
            SourceList::Allow
        } else {
            SourceList::Deny
        }
    }
}

#[derive(Subcommand)]
enum BackendCommand {
    /// List backends, of one service or all.
    List {
        /// Service name.
        service: Option<String>,
    },
    /// Set a backend's weight (persists across restarts and reloads), or
    /// with --reset go back to the configured one.
    SetWeight {
        /// Service name.
        service: String,
        /// Backend address.
        backend: std::net::IpAddr,
        /// Weight, 0-65535 (0 takes no new flows).
        #[arg(required_unless_present = "reset", value_parser = weight)]
        weight: Option<u32>,
        /// Clear the weight set here: the configured weight applies again.
        #[arg(long, conflicts_with = "weight")]
        reset: bool,
    },
    /// No new flows to this backend; established flows stay until they end.
    Drain {
        /// Service name.
        service: String,
        /// Backend address.
        backend: std::net::IpAddr,
        /// Return once the connection table pins no flow to the backend (on a
        /// fleet node, no live node's); give up (exit 1, with the count left)
        /// after TIMEOUT (default 5m). Put it after the backend, or write
        /// --wait=TIMEOUT: its value is optional.
        #[arg(long, value_name = "TIMEOUT", num_args = 0..=1, default_missing_value = "5m", value_parser = duration)]
        wait: Option<Duration>,
    },
    /// Put a drained or maintained backend back in rotation.
    Enable {
        /// Service name.
        service: String,
        /// Backend address.
        backend: std::net::IpAddr,
    },
    /// No traffic and no probes, whatever its health.
    Maintenance {
        /// Service name.
        service: String,
        /// Backend address.
        backend: std::net::IpAddr,
    },
    /// Add a backend to a service; written to the configuration file.
    Add {
        /// Service name.
        service: String,
        /// Backend address (the tunnel endpoint for ipip).
        backend: std::net::IpAddr,
        /// Weight, 0-65535 (0 takes no new flows).
        #[arg(long, default_value_t = 1, value_parser = weight)]
        weight: u32,
        /// Put it in the table on its first successful probe, not its first
        /// `rise` (it is always checked before it takes a flow).
        #[arg(long)]
        trust_first_probe: bool,
        /// Show the changes and table slots that would move, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove a backend from a service at once; written to the configuration
    /// file. Its established flows move to other backends: drain it first and
    /// wait for them to end to avoid resets.
    Del {
        /// Service name.
        service: String,
        /// Backend address.
        backend: std::net::IpAddr,
        /// Show the changes and table slots that would move, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines to stderr, filtered by `LB_LOG` (default `info`): one JSON
/// object a line with `LB_LOG_FORMAT=json`, else text, coloured only on a
/// terminal, so a file or the journal gets plain text. The daemon's own
/// lines at info and above are also kept for the status page's events.
fn log_to_stderr() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{Layer, fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| "info".into());
    let format = std::env::var("LB_LOG_FORMAT").unwrap_or_default();
    let json = format == "json";
    let text = (!json).then(|| {
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let lines = json.then(|| fmt::layer().json().with_writer(std::io::stderr));
    tracing_subscriber::registry()
        .with(Layer::and_then(text, lines).with_filter(filter))
        .with(crate::daemon::events::layer())
        .init();
    if !matches!(format.as_str(), "" | "text" | "json") {
        tracing::warn!("LB_LOG_FORMAT={format:?} is neither json nor text: logging text");
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<()> {
    let call = |request: Request| -> Result<Value> {
        runtime()?.block_on(api::call(&cli.socket, &request))
    };
    // apply and the edits print what changed (or would), and the slots moved.
    let change = |request: Request, dry_run: bool| -> Result<()> {
        print(cli.json, call(request)?, |v| change_report(v, dry_run))
    };
    match cli.command {
        Command::Daemon { config, pin_dir } => {
            log_to_stderr();
            runtime()?.block_on(daemon::run(daemon::Options { config, pin_dir }))
        }
        Command::Agent {
            config,
            fix,
            once,
            dry_run,
        } => {
            log_to_stderr();
            let options = crate::host_agent::Options { fix, once, dry_run };
            runtime()?.block_on(crate::host_agent::run(&config, &options))
        }
        Command::CheckConfig { file } => {
            let d = daemon::load_config(&file)?;
            let backends: usize = d.services.values().map(|s| s.backends.len()).sum();
            let services = d.services.len();
            let v = serde_json::json!({
                "file": file,
                "valid": true,
                "services": services,
                "backends": backends,
            });
            print(cli.json, v, |_| {
                format!(
                    "{}: valid ({services} services, {backends} backends)\n",
                    file.display()
                )
            })
        }
        Command::Demo { keep, fleet } => crate::demo::run(&crate::demo::Options { keep, fleet }),
        Command::Decap(DecapCommand::Apply { file, pin_dir }) => {
            log_to_stderr();
            let config = decap::read(&file)?;
            let applied = decap::apply(&config, &pin_dir)?;
            print(cli.json, serde_json::to_value(&applied)?, |_| {
                let mut out = format!("lb_decap runs on {}\n", applied.attached.join(", "));
                if !applied.detached.is_empty() {
                    out += &format!("detached from {}\n", applied.detached.join(", "));
                }
                out
            })
        }
        Command::Decap(DecapCommand::Status { pin_dir }) => {
            let status = decap::status(&pin_dir)?;
            print(cli.json, serde_json::to_value(&status)?, |_| {
                status.render()
            })
        }
        Command::Decap(DecapCommand::Remove { pin_dir }) => {
            crate::dataplane::remove_pinned(&pin_dir)?;
            print(cli.json, serde_json::json!({ "removed": pin_dir }), |_| {
                format!("lb_decap removed ({} unpinned)\n", pin_dir.display())
            })
        }
        Command::Doctor {
            config,
            interfaces,
            xdp_mode,
            backend_vips,
            mode,
            pin_dir,
            probe_native,
        } => {
            let mut request = doctor::Request {
                interfaces,
                xdp_mode: xdp_mode.unwrap_or_default(),
                pin_dir: None,
                probe_native,
                backend_vips,
                backend_mode: mode,
                announce: None,
            };
            if let Some(path) = config {
                let d = daemon::load_config(&path)?;
                if request.interfaces.is_empty() {
                    request.interfaces = d.settings.interfaces.clone();
                }
                request.xdp_mode = xdp_mode.unwrap_or(d.settings.xdp_mode);
                request.announce = d.settings.announce.clone();
            }
            if request.interfaces.is_empty() && request.backend_vips.is_empty() {
                anyhow::bail!(
                    "nothing to check: give --config FILE or --interface IF (this host as the \
                     load balancer), or --backend VIP (this host as a backend)"
                );
            }
            if !request.interfaces.is_empty() {
                request.pin_dir = Some(pin_dir);
            }
            let findings = doctor::check(&request);
            print(cli.json, serde_json::to_value(&findings)?, |_| {
                doctor::render(&findings)
            })?;
            let failed = findings
                .iter()
                .filter(|f| f.level == doctor::Level::Fail)
                .count();
            if failed > 0 {
                anyhow::bail!("{failed} problem(s) to fix first (commands above)");
            }
            Ok(())
        }
        Command::Status => print(cli.json, call(Request::Status)?, |v| {
            let mut out = String::new();
            if let Value::Object(m) = v {
                for (k, v) in m {
                    let text = match v {
                        // `startup`: its phases on one line.
                        Value::Object(o) => o
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        v => v.to_string().trim_matches('"').to_owned(),
                    };
                    out += &format!("{k:<16} {text}\n");
                }
            }
            out
        }),
        Command::Service(ServiceCommand::List) => print(cli.json, call(Request::Services)?, |v| {
            let Ok(rows) = serde_json::from_value::<Vec<ServiceRow>>(v.clone()) else {
                return format!("{v}\n");
            };
            table(
                &[
                    "NAME", "SERVICE", "MODE", "AFFINITY", "BACKENDS", "IN TABLE", "PROBES",
                    "SLOTS", "DIGEST", "REBUILDS",
                ],
                rows.iter().map(|r| {
                    vec![
                        r.name.clone(),
                        r.service.clone(),
                        r.mode.clone(),
                        r.affinity.clone(),
                        r.backends.to_string(),
                        r.in_table.to_string(),
                        // Panic: every backend in the table whatever its
                        // probes say (docs/operations.md).
                        if r.panic { "panic" } else { "ok" }.to_owned(),
                        r.table_size.to_string(),
                        r.digest.clone(),
                        r.rebuilds.to_string(),
                    ]
                }),
            )
        }),
        Command::Backend(BackendCommand::List { service }) => {
            print(cli.json, call(Request::Backends { service })?, |v| {
                backend_table(v, false)
            })
        }
        Command::Health => print(cli.json, call(Request::Health)?, |v| backend_table(v, true)),
        Command::Backend(BackendCommand::SetWeight {
            service,
            backend,
            weight,
            reset: _,
        }) => print(
            cli.json,
            call(Request::SetWeight {
                service,
                backend,
                weight,
            })?,
            moved,
        ),
        Command::Backend(BackendCommand::Drain {
            service,
            backend,
            wait,
        }) => {
            let v = call(Request::SetAdmin {
                service: service.clone(),
                backend,
                admin: Admin::Drain,
            })?;
            if let Some(timeout) = wait {
                // On a fleet node, the revision the drain was written in.
                let revision = v["revision"].as_i64();
                wait_for_no_flows(&call, &service, backend, revision, timeout)?;
            }
            print(cli.json, v, moved)
        }
        Command::Backend(BackendCommand::Enable { service, backend }) => print(
            cli.json,
            call(Request::SetAdmin {
                service,
                backend,
                admin: Admin::Ready,
            })?,
            moved,
        ),
        Command::Backend(BackendCommand::Maintenance { service, backend }) => print(
            cli.json,
            call(Request::SetAdmin {
                service,
                backend,
                admin: Admin::Maintenance,
            })?,
            moved,
        ),
        Command::Reload => change(Request::Reload, false),
        Command::Completions { shell } => {
            use clap_complete::Generator as _;
            let mut command = Cli::command();
            command.set_bin_name("lb");
            command.build();
            shell
                .try_generate(&command, &mut std::io::stdout())
                .context("writing the completion script")
        }
        Command::Man => {
            let page = clap_mangen::Man::new(Cli::command())
                .section("8")
                .manual("System Administration");
            page.render(&mut std::io::stdout())
                .context("writing the man page")
        }
        Command::Apply { file, dry_run } => {
            let config = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            change(Request::Apply { config, dry_run }, dry_run)
        }
        Command::Service(ServiceCommand::Add {
            name,
            endpoint,
            mode,
            affinity,
            check,
            send,
            expect,
            dry_run,
        }) => {
            let edit = Edit::AddService {
                name,
                vip: endpoint.addr.ip(),
                port: endpoint.addr.port(),
                protocol: endpoint.protocol,
                mode,
                affinity,
                check,
                send,
                expect,
            };
            change(Request::Edit { edit, dry_run }, dry_run)
        }
        Command::Service(ServiceCommand::Del { name, dry_run }) => {
            let edit = Edit::DelService { name };
            change(Request::Edit { edit, dry_run }, dry_run)
        }
        Command::Backend(BackendCommand::Add {
            service,
            backend,
            weight,
            trust_first_probe,
            dry_run,
        }) => {
            let edit = Edit::AddBackend {
                service,
                address: backend,
                weight,
                trust_first_probe,
            };
            change(Request::Edit { edit, dry_run }, dry_run)
        }
        Command::Backend(BackendCommand::Del {
            service,
            backend,
            dry_run,
        }) => {
            let edit = Edit::DelBackend {
                service,
                address: backend,
            };
            change(Request::Edit { edit, dry_run }, dry_run)
        }
        Command::Acl(AclCommand::List { service }) => {
            print(cli.json, call(Request::SourceLists { service })?, |v| {
                let Ok(rows) = serde_json::from_value::<Vec<SourceRow>>(v.clone()) else {
                    return format!("{v}\n");
                };
                table(
                    &["SERVICE", "LIST", "PREFIX"],
                    rows.iter()
                        .map(|r| vec![r.service.clone(), r.list.clone(), r.prefix.clone()]),
                )
            })
        }
        Command::Acl(AclCommand::Add(c)) => {
            let dry_run = c.dry_run;
            change(c.request(true)?, dry_run)
        }
        Command::Acl(AclCommand::Del(c)) => {
            let dry_run = c.dry_run;
            change(c.request(false)?, dry_run)
        }
        Command::Explain { client, service } => {
            let v = call(Request::Explain {
                service,
                client: client.ip(),
                port: client.port(),
            })?;
            print(cli.json, v, |v| {
                let weights: Vec<String> = v["table_weights"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|w| {
                        format!(
                            "{} {:.1} ({})",
                            w["backend"].as_str().unwrap_or_default(),
                            w["weight"].as_f64().unwrap_or_default(),
                            w["set_by"].as_str().unwrap_or_default()
                        )
                    })
                    .collect();
                format!(
                    "{}\n  hash {} -> table slot {} -> {}\n  table weights: {}\n  connection table: {}\n  goes to: {} ({})\n",
                    v["flow"].as_str().unwrap_or_default(),
                    v["hash"].as_str().unwrap_or_default(),
                    v["slot"],
                    v["table_backend"].as_str().unwrap_or("no backend"),
                    weights.join(", "),
                    match (
                        v["conntrack_backend"].as_str(),
                        v["conntrack_state"].as_str()
                    ) {
                        (Some(b), Some(state)) => format!("{b} ({state})"),
                        // An entry that no longer pins the flow.
                        (None, Some(state)) => format!("{state} entry, not followed"),
                        _ => "no entry".into(),
                    },
                    v["backend"].as_str().unwrap_or("nowhere"),
                    v["reason"].as_str().unwrap_or_default(),
                )
            })
        }
        Command::Fleet(FleetCommand::Status) => {
            let v = call(Request::FleetStatus)?;
            print(cli.json, v, |v| {
                match serde_json::from_value::<FleetStatus>(v.clone()) {
                    Ok(s) => fleet_text(&s),
                    Err(_) => format!("{v}\n"),
                }
            })
        }
        Command::Fleet(FleetCommand::Import { file, replace }) => {
            let config = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            change(Request::FleetImport { config, replace }, false)
        }
        Command::Fleet(FleetCommand::Export) => {
            let v = call(Request::FleetExport)?;
            print(cli.json, v, |v| {
                format!(
                    "# The fleet's state at revision {}, as a standalone file.\n{}",
                    v["revision"],
                    v["config"].as_str().unwrap_or_default()
                )
            })
        }
        Command::Node(NodeCommand::Status) => {
            let status = node_status(&cli.socket, Request::Node)?;
            print(cli.json, serde_json::to_value(&status)?, |_| {
                node_text(&status)
            })
        }
        Command::Node(NodeCommand::Undrain) => {
            let status = set_drained(&cli.socket, false)?;
            print(cli.json, serde_json::to_value(&status)?, |_| {
                node_text(&status)
            })
        }
        Command::Node(NodeCommand::Withdraw) => {
            if std::os::unix::net::UnixStream::connect(&cli.socket).is_ok() {
                anyhow::bail!(
                    "a daemon listens on {}: `lb node drain` withdraws its VIPs and keeps them \
                     withdrawn (`lb node withdraw` is for a node whose daemon is gone)",
                    cli.socket.display()
                );
            }
            let mut withdrawn = Vec::new();
            let result = runtime()?.block_on(crate::routes::withdraw_all_but(None, &mut withdrawn));
            // What was withdrawn, then what was not.
            if result.is_ok() || !withdrawn.is_empty() {
                print(cli.json, serde_json::to_value(&withdrawn)?, |_| {
                    if withdrawn.is_empty() {
                        return "no VIP route of lb's to withdraw\n".to_owned();
                    }
                    withdrawn
                        .iter()
                        .map(|w| format!("withdrawn {} (table {})\n", w.vip, w.table))
                        .collect()
                })?;
            }
            result
        }
        Command::Node(NodeCommand::Drain {
            wait,
            quiet,
            timeout,
        }) => {
            let mut status = set_drained(&cli.socket, true)?;
            let start = Instant::now();
            while wait && status.quiet_seconds < quiet.as_secs_f64() {
                if start.elapsed() > timeout {
                    anyhow::bail!(
                        "the node is drained, but new flows still arrived {:.1}s ago, after {}: \
                         something still routes traffic to it",
                        status.quiet_seconds,
                        humantime_serde::re::humantime::format_duration(timeout)
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
                status = node_status(&cli.socket, Request::Node)?;
            }
            print(cli.json, serde_json::to_value(&status)?, |_| {
                node_text(&status)
            })
        }
        Command::Conntrack(ConntrackCommand::List { service, backend }) => print(
            cli.json,
            call(Request::Conntrack { service, backend })?,
            flow_table,
        ),
        Command::Conntrack(ConntrackCommand::Flush { service }) => {
            print(cli.json, call(Request::ConntrackFlush { service })?, |v| {
                format!("removed {} entries\n", v["removed"])
            })
        }
        Command::Conntrack(ConntrackCommand::Stats) => print(
            cli.json,
            call(Request::ConntrackStats)?,
            conntrack_stats_text,
        ),
        Command::Stats { watch } => loop {
            let v = call(Request::Stats)?;
            if !watch {
                return print(cli.json, v, stats_text);
            }
            if cli.json {
                write_out(&format!("{v}\n"))?;
            } else {
                write_out(&format!("\x1b[2J\x1b[H{}", stats_text(&v)))?;
            }
            std::thread::sleep(Duration::from_secs(1));
        },
    }
}

/// Asks the daemon (with `request`) for the node's status, then BIRD for
/// its BGP sessions when the node announces.
fn node_status(socket: &std::path::Path, request: Request) -> Result<NodeStatus> {
    let rt = runtime()?;
    let mut status: NodeStatus = serde_json::from_value(rt.block_on(api::call(socket, &request))?)
        .context("malformed node status from the daemon")?;
    if let Some(bird_socket) = &status.bird_socket {
        match rt.block_on(bird::bgp_sessions(bird_socket)) {
            Ok(sessions) => status.bgp = sessions,
            Err(e) => status.bgp_error = Some(format!("{e:#}")),
        }
    }
    Ok(status)
}

/// Digest characters `lb fleet status` shows (enough to tell tables apart).
const SHORT_DIGEST: usize = 8;

fn fleet_text(s: &FleetStatus) -> String {
    let mut out = format!(
        "fleet       {} (this node: {}, applied revision {} of {})\nleader      {}\netcd        {}\n\n",
        s.prefix,
        s.node,
        s.applied,
        s.revision,
        s.leader.as_deref().unwrap_or("none"),
        s.etcd_error
            .as_deref()
            .map_or("reachable".to_string(), |e| format!("UNREACHABLE: {e}")),
    );
    out += &table(
        &[
            "NODE",
            "ALIVE",
            "REVISION",
            "DRAINED",
            "ANNOUNCED",
            "BGP",
            "TABLES (! differs)",
        ],
        s.nodes.iter().map(|n| {
            let r = &n.report;
            let announced: Vec<String> = r
                .vips
                .iter()
                .filter(|v| v.announced)
                .map(|v| v.vip.to_string())
                .collect();
            let bgp = match &r.bgp_error {
                Some(_) => "unknown".to_string(),
                None => r
                    .bgp
                    .iter()
                    .map(|p| format!("{}:{}", p.name, p.info.split(' ').next().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(","),
            };
            let tables: Vec<String> = r
                .digests
                .iter()
                .map(|(svc, d)| {
                    let mark = if n.disagreeing.contains(svc) { "!" } else { "" };
                    // By characters: a report is another node's data.
                    let short: String = d.chars().take(SHORT_DIGEST).collect();
                    format!("{svc}={short}{mark}")
                })
                .collect();
            vec![
                format!("{}{}", n.name, if n.leader { "*" } else { "" }),
                if n.alive {
                    "yes".into()
                } else {
                    format!("no ({}s ago)", n.seen_seconds_ago)
                },
                format!("{}{}", r.revision, if n.behind { " (behind)" } else { "" }),
                if r.drained { "yes" } else { "no" }.into(),
                if announced.is_empty() {
                    "-".into()
                } else {
                    announced.join(",")
                },
                if bgp.is_empty() { "-".into() } else { bgp },
                tables.join(" "),
            ]
        }),
    );
    if !s.registered.is_empty() {
        out += "\nregistered by their hosts (lb agent):\n";
        out += &table(
            &["SERVICE", "BACKEND", "HOST", "WEIGHT", "STATE"],
            s.registered.iter().map(|r| {
                vec![
                    r.service.clone(),
                    r.address.to_string(),
                    r.host.clone(),
                    format!("{} ({}%)", r.weight, r.percent),
                    if r.draining { "leaving" } else { "serving" }.into(),
                ]
            }),
        );
    }
    if !s.problems.is_empty() {
        out += "\nproblems under the prefix:\n";
        for p in &s.problems {
            out += &format!("  {p}\n");
        }
    }
    out
}

/// How long `lb node drain|undrain` waits for the routes to follow.
const ROUTES_FOLLOW: Duration = Duration::from_secs(2);

/// Drains or undrains the node, then waits (briefly) until the announce
/// table matches the decisions, so the status printed is the routes' own.
fn set_drained(socket: &std::path::Path, drained: bool) -> Result<NodeStatus> {
    let mut status = node_status(socket, Request::SetNodeDrained { drained })?;
    let start = Instant::now();
    let settled = |s: &NodeStatus| {
        s.announce_table.is_none() || s.vips.iter().all(|v| v.announced == v.withheld.is_none())
    };
    while !settled(&status) && start.elapsed() < ROUTES_FOLLOW {
        std::thread::sleep(Duration::from_millis(20));
        status = node_status(socket, Request::Node)?;
    }
    Ok(status)
}

fn node_text(s: &NodeStatus) -> String {
    let mut out = format!(
        "node        {}\n",
        if s.drained {
            "drained: every VIP withdrawn, forwarding what still arrives"
        } else {
            "serving"
        }
    );
    out += &match (&s.announce_table, &s.bird_socket) {
        (Some(t), Some(b)) => format!("announce    routing table {t}, BIRD at {}\n", b.display()),
        _ => "announce    off (no [announce] in the configuration)\n".into(),
    };
    for (iface, attached) in &s.interfaces {
        out += &format!(
            "interface   {iface}: {}\n",
            if *attached {
                "attached"
            } else {
                "NOT attached"
            }
        );
    }
    out += &format!(
        "quiet       {:.1}s since the last new flow\n",
        s.quiet_seconds
    );
    if let Some(e) = &s.route_error {
        out += &format!("routes      FAILING: {e}\n");
    }
    out += "\n";
    out += &table(
        &["VIP", "SERVICES", "ANNOUNCED", "WITHHELD BECAUSE"],
        s.vips.iter().map(|v| {
            vec![
                v.vip.to_string(),
                v.services.join(","),
                if v.announced { "yes" } else { "no" }.into(),
                match (v.withheld, v.settling) {
                    (Some(w), _) => w.describe(),
                    (None, true) if !v.announced => crate::announce::SETTLING,
                    (None, _) => "-",
                }
                .into(),
            ]
        }),
    );
    if let Some(e) = &s.bgp_error {
        out += &format!("\nBGP sessions unknown: {e}\n");
    } else if s.bird_socket.is_some() {
        out += "\n";
        out += &table(
            &["BGP SESSION", "STATE", "INFO"],
            s.bgp
                .iter()
                .map(|p| vec![p.name.clone(), p.state.clone(), p.info.clone()]),
        );
    }
    out
}

/// Prints `v` as JSON, or as `human` renders it. Each renderer shows `v`
/// as it came when it cannot read it (a daemon of another version), never
/// an empty table.
fn print(json: bool, v: Value, human: impl FnOnce(&Value) -> String) -> Result<()> {
    if json {
        write_out(&format!("{}\n", serde_json::to_string_pretty(&v)?))
    } else {
        write_out(&human(&v))
    }
}

/// Writes `text` to stdout. A reader that went away (`lb conntrack list |
/// head`) ends the command quietly, as it ends `cat`, not with a panic.
fn write_out(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        written => Ok(written?),
    }
}

/// What `apply` or an edit changed (or would change), and the slots moved.
fn change_report(v: &Value, dry_run: bool) -> String {
    let mut out = String::new();
    let changes = v["changes"].as_array().cloned().unwrap_or_default();
    if changes.is_empty() {
        out += "no changes\n";
    }
    for c in changes {
        out += &format!(
            "{}{}\n",
            if dry_run { "would: " } else { "" },
            c.as_str().unwrap_or_default()
        );
    }
    if let Some(m) = v["slots_moved"].as_object() {
        for (svc, n) in m {
            out += &format!(
                "service {svc}: {n} table slots {}\n",
                if dry_run { "would move" } else { "moved" }
            );
        }
    }
    if let Some(m) = v["slots_when_checked"].as_object() {
        for (svc, n) in m {
            out += &format!(
                "service {svc}: {n} table slots move once its new backends pass their checks\n"
            );
        }
    }
    // Each a (service, address) pair.
    for d in v["deferred"].as_array().into_iter().flatten() {
        out += &format!(
            "service {}: registered backend {} waits for a backend id\n",
            d[0].as_str().unwrap_or_default(),
            d[1].as_str().unwrap_or_default()
        );
    }
    out
}

fn moved(v: &Value) -> String {
    format!("done: {} table slots moved\n", v["slots_moved"])
}

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let mut s: String = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}  "))
            .collect();
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut out = line(
        headers
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
    );
    for r in rows {
        out += &line(r);
    }
    out
}

fn backend_table(v: &Value, health: bool) -> String {
    let Ok(rows) = serde_json::from_value::<Vec<BackendRow>>(v.clone()) else {
        return format!("{v}\n");
    };
    if health {
        table(
            &[
                "SERVICE",
                "BACKEND",
                "HEALTH",
                "ADMIN",
                "SINCE",
                "LAST PROBE",
                "LATENCY",
                "TRANSITIONS",
                "FAILURES",
                "AGENT",
            ],
            rows.iter().map(|r| {
                vec![
                    r.service.clone(),
                    r.address.to_string(),
                    r.health.clone(),
                    admin_cell(r),
                    format!("{}s", r.since_seconds),
                    match (&r.last_probe_ok, &r.last_probe_error) {
                        (Some(true), _) => "ok".into(),
                        (Some(false), e) => format!("failed: {}", e.clone().unwrap_or_default()),
                        (None, _) => "-".into(),
                    },
                    r.last_probe_ms
                        .map_or("-".into(), |ms| format!("{ms:.1}ms")),
                    r.transitions.to_string(),
                    r.probe_failures.to_string(),
                    r.agent.as_ref().map_or("-".into(), agent_cell),
                ]
            }),
        )
    } else {
        table(
            &[
                "SERVICE", "BACKEND", "WEIGHT", "IN TABLE", "ADMIN", "HEALTH", "SLOTS", "MAC",
                "FLOWS", "PACKETS", "BYTES",
            ],
            rows.iter().map(|r| {
                vec![
                    r.service.clone(),
                    r.address.to_string(),
                    format!("{}{}", r.weight, if r.weight_overridden { "*" } else { "" }),
                    format!("{:.1} {}", r.table_weight, r.weight_set_by),
                    admin_cell(r),
                    r.health.clone(),
                    r.slots.to_string(),
                    match (&r.mac, &r.unattached_interface) {
                        (Some(mac), _) => mac.clone(),
                        (None, Some(dev)) => format!("via {dev} (not attached)"),
                        (None, None) => match &r.next_hop_error {
                            Some(why) => format!("unresolved: {why}"),
                            None => "unresolved".into(),
                        },
                    },
                    r.active_flows.to_string(),
                    r.packets.to_string(),
                    r.bytes.to_string(),
                ]
            }),
        )
    }
}

/// A backend's operator state, and whether its host registered it.
fn admin_cell(r: &BackendRow) -> String {
    let admin = format!("{:?}", r.admin).to_lowercase();
    match r.registered {
        None => admin,
        Some(false) => format!("{admin} (registered)"),
        Some(true) => format!("{admin} (leaving)"),
    }
}

/// A backend's agent in `lb health`: what applies, what waits, and the
/// last answer or failure.
fn agent_cell(a: &AgentRow) -> String {
    let mut cell = a.applied.clone();
    if let Some(p) = &a.pending {
        cell += &format!(" (to {p})");
    }
    match (&a.last_answer, &a.last_error, a.seconds_ago) {
        (_, Some(e), Some(s)) => cell += &format!("; failed {s}s ago: {e}"),
        (Some(line), None, Some(s)) => cell += &format!("; said {line:?} {s}s ago"),
        _ => cell += "; not asked yet",
    }
    cell
}

/// The flows every live node of the fleet pins to `backend` of `service`,
/// from their reports; `Err` with the nodes that have not counted them
/// since they applied `revision` (the drain's) while there are any.
fn fleet_flows_left(
    call: &dyn Fn(Request) -> Result<Value>,
    service: &str,
    backend: std::net::IpAddr,
    revision: i64,
) -> Result<std::result::Result<u64, String>> {
    let status: FleetStatus = serde_json::from_value(call(Request::FleetStatus)?)
        .context("reading the fleet's status")?;
    let mut total = 0;
    let mut uncounted = Vec::new();
    for node in status.nodes.iter().filter(|n| n.alive) {
        let counted = node.report.draining_flows.get(service);
        match counted.and_then(|by_address| by_address.get(&backend)) {
            Some(n) if node.report.revision >= revision => total += n,
            _ => uncounted.push(node.name.clone()),
        }
    }
    Ok(if uncounted.is_empty() {
        Ok(total)
    } else {
        Err(uncounted.join(", "))
    })
}

/// How often `lb backend drain --wait` asks.
const DRAIN_POLL: Duration = Duration::from_secs(1);

/// Waits until no connection table pins a flow to `backend` of
/// `service` (on a fleet node, that of every live node that applied
/// `revision`, the drain's), saying how many are left as they go; an error
/// after `timeout`.
fn wait_for_no_flows(
    call: &dyn Fn(Request) -> Result<Value>,
    service: &str,
    backend: std::net::IpAddr,
    revision: Option<i64>,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    let mut last = None;
    loop {
        let left = if let Some(revision) = revision {
            fleet_flows_left(call, service, backend, revision)?
        } else {
            let rows: Vec<BackendRow> = serde_json::from_value(call(Request::Backends {
                service: Some(service.to_owned()),
            })?)?;
            let row = rows.iter().find(|r| r.address == backend);
            Ok(row
                .map(|r| r.active_flows)
                .with_context(|| format!("{backend} is no longer a backend of {service}"))?)
        };
        if matches!(left, Ok(0)) {
            return Ok(());
        }
        let left = match left {
            Ok(n) => n.to_string(),
            Err(uncounted) => format!("an unknown number of (not yet counted by {uncounted})"),
        };
        if start.elapsed() >= timeout {
            anyhow::bail!(
                "{left} flow(s) still on {backend} after {}: they end when their clients \
                 close them or idle out (`lb conntrack list {service} --backend {backend}`)",
                humantime_serde::re::humantime::format_duration(timeout)
            );
        }
        if last.as_deref() != Some(left.as_str()) {
            eprintln!("waiting for {left} flow(s) on {backend} to end");
            last = Some(left);
        }
        std::thread::sleep(DRAIN_POLL);
    }
}

fn flow_table(v: &Value) -> String {
    let Ok(rows) = serde_json::from_value::<Vec<FlowRow>>(v.clone()) else {
        return format!("{v}\n");
    };
    table(
        &["SERVICE", "CLIENT", "PROTO", "BACKEND", "STATE", "IDLE"],
        rows.iter().map(|r| {
            vec![
                r.service.clone(),
                r.client.clone(),
                r.protocol.clone(),
                r.backend.map_or("(gone)".into(), |b| b.to_string()),
                r.state.clone(),
                format!("{}s", r.idle_seconds),
            ]
        }),
    )
}

fn conntrack_stats_text(v: &Value) -> String {
    let Ok(s) = serde_json::from_value::<ConntrackStatsView>(v.clone()) else {
        return format!("{v}\n");
    };
    let budget = if s.inserts_per_cpu == 0 {
        "no limit".to_owned()
    } else if s.refusing_cpus > 0 {
        format!(
            "{} per CPU per second; {} CPU(s) refusing inserts now (a flood of new flows?)",
            s.inserts_per_cpu, s.refusing_cpus
        )
    } else {
        format!("{} per CPU per second; not reached now", s.inserts_per_cpu)
    };
    format!(
        "entries: {} of {} ({} established, {} closing, {} lapsed, {} stale, {} of no service)\n\
         inserts: {}, refused: {}\n\
         insert budget: {budget}\n\
         timeouts: tcp idle {}s, udp idle {}s, tcp closed {}s\n",
        s.entries,
        s.capacity,
        s.established,
        s.closing,
        s.lapsed,
        s.stale,
        s.other,
        s.inserts,
        s.refused,
        s.tcp_idle_timeout,
        s.udp_idle_timeout,
        s.tcp_closed_timeout
    )
}

/// A per-second rate, `-` before the daemon has two samples.
fn rate(per_second: Option<f64>) -> String {
    per_second.map_or("-".into(), |r| format!("{r:.0}/s"))
}

fn stats_text(v: &Value) -> String {
    let Ok(s) = serde_json::from_value::<Stats>(v.clone()) else {
        return format!("{v}\n");
    };
    let mut out = table(
        &[
            "SERVICE",
            "PACKETS",
            "BYTES",
            "NEW FLOWS",
            "DROPS",
            "DENIED",
            "NOT ALLOWED",
            "LIMITED",
            "PKT RATE",
            "BYTE RATE",
            "FLOW RATE",
            "DROP RATE",
        ],
        s.services.iter().map(|r| {
            vec![
                r.name.clone(),
                r.packets.to_string(),
                r.bytes.to_string(),
                r.new_flows.to_string(),
                r.drops.to_string(),
                r.denied.to_string(),
                r.not_allowed.to_string(),
                r.limited.to_string(),
                rate(r.rates.map(|x| x.packets)),
                rate(r.rates.map(|x| x.bytes)),
                rate(r.rates.map(|x| x.new_flows)),
                rate(r.rates.map(|x| x.drops)),
            ]
        }),
    );
    out += "\n";
    out += &table(
        &[
            "SERVICE",
            "BACKEND",
            "PACKETS",
            "BYTES",
            "PKT RATE",
            "BYTE RATE",
        ],
        s.backends.iter().map(|r| {
            vec![
                r.service.clone(),
                r.address.to_string(),
                r.packets.to_string(),
                r.bytes.to_string(),
                rate(r.rates.map(|x| x.packets)),
                rate(r.rates.map(|x| x.bytes)),
            ]
        }),
    );
    out += "\n";
    out += &table(
        &["REASON", "PACKETS", "RATE"],
        s.reasons.iter().filter(|(_, n)| **n > 0).map(|(k, n)| {
            vec![
                k.clone(),
                n.to_string(),
                rate(s.reason_rates.get(k).copied()),
            ]
        }),
    );
    if !s.limited_sources.is_empty() {
        out += "\n";
        out += &table(
            &["SERVICE", "LIMITED SOURCE", "NEW FLOWS DROPPED", "LAST"],
            s.limited_sources.iter().map(|r| {
                vec![
                    r.service.clone(),
                    r.prefix.clone(),
                    r.drops.to_string(),
                    format!("{}s ago", r.seconds_ago),
                ]
            }),
        );
    }
    out
}
