//! The configuration file: its TOML schema, and validation into a
//! [`Desired`] state. Validation is pure and complete: a file is accepted as
//! a whole or refused with every problem named by field and line, before
//! anything touches the kernel.
//!
//! `docs/config.md` and `examples/lb.toml` document every field.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    dataplane::{Capacity, Prefix, SourceList},
    health::Thresholds,
    maglev::is_prime,
};
use lb_common::{MAX_FLOW_BACKEND_IDS, MAX_FLOW_SERVICE_IDS, VIP_ECHO_UNIT, limits, wire};

// A connection-table entry names its service by id + 1 in 16 bits.
const _: () = assert!(VIP_ECHO_UNIT - 1 <= MAX_FLOW_SERVICE_IDS);

/// Largest weight: keeps `pass * weight` far from overflow in the builder and
/// is more resolution than any operator needs.
pub const MAX_WEIGHT: u32 = 65_535;

/// Longest probe or agent interval (and so timeout): an hour. Longer
/// checks would leave a dead backend in rotation for hours, and bounded
/// times keep the daemon's arithmetic on them from overflowing.
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Largest `rise` and `fall`.
pub const MAX_RISE_FALL: u32 = 100;
/// IPv6's minimum link MTU (RFC 8200 §5): the least a tunnel toward an
/// IPv6 service's backends may leave.
const IPV6_MIN_MTU: u32 = 1_280;

/// The one wording of a weight outside its range, for the CLI, the control
/// API and the fleet alike.
pub fn weight_range_error(weight: impl fmt::Display) -> String {
    format!("{weight}: a weight is a whole number from 0 to {MAX_WEIGHT} (0 takes no new flows)")
}

/// Refuses an operator's weight outside 0..=[`MAX_WEIGHT`] (`None`: no
/// weight of the operator's).
pub fn check_weight(weight: Option<u32>) -> anyhow::Result<()> {
    match weight {
        Some(w) if w > MAX_WEIGHT => anyhow::bail!(weight_range_error(w)),
        _ => Ok(()),
    }
}
/// Default socket of the control API.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";
/// Default file where runtime changes (weights, drain, maintenance) persist.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/lb/state.json";

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Host-wide settings.
    #[serde(default)]
    pub settings: SettingsFile,
    /// BGP announcement of VIPs through a kernel routing table; off when absent.
    pub announce: Option<Spanned<AnnounceFile>>,
    /// Fleet mode: the services live in etcd; off (standalone) when absent.
    pub fleet: Option<Spanned<FleetFile>>,
    /// A standalone daemon's port for `lb agent` registrations; off when
    /// absent.
    pub registration: Option<Spanned<RegistrationFile>>,
    /// Services, in any order.
    #[serde(default, rename = "service")]
    pub services: Vec<Spanned<ServiceFile>>,
}

/// `[announce]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceFile {
    /// Kernel routing table lb keeps one host route per announced VIP in.
    pub table: u32,
    /// BIRD's control socket, for `lb node status` and `lb doctor`.
    #[serde(default = "default_bird_socket")]
    pub bird_socket: PathBuf,
}

/// `[registration]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationFile {
    /// Address and port to listen on.
    pub listen: String,
    /// The shared secret agents sign with.
    pub secret_file: PathBuf,
    /// How long a registration lasts unless renewed.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
}

/// `[fleet]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// etcd endpoints, `http://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix of the fleet's state.
    #[serde(default = "default_fleet_prefix")]
    pub prefix: String,
    /// This node's name in the fleet (default: the host name).
    pub node: Option<String>,
    /// TTL of this node's status and leadership in etcd.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// PEM CA certificate that signed etcd's server certificate (`https://`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    /// Its PEM private key.
    pub key_file: Option<PathBuf>,
}

fn default_fleet_prefix() -> String {
    "/lb".into()
}
fn default_lease() -> Duration {
    Duration::from_secs(3)
}

/// The services of a fleet, as etcd holds them: `[[service]]` tables only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicesFile {
    /// Services, in any order.
    #[serde(default, rename = "service")]
    pub services: Vec<Spanned<ServiceFile>>,
}

/// Where Debian's BIRD 2 puts its control socket.
pub const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";

fn default_bird_socket() -> PathBuf {
    DEFAULT_BIRD_SOCKET.into()
}

/// Routing tables the kernel reserves (unspec, compat, default, main,
/// local): lb's routes in them would route the host's own traffic.
const RESERVED_TABLES: [u32; 5] = [0, 252, 253, 254, 255];

/// `[settings]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsFile {
    /// Interfaces to attach to.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// `auto` (driver mode where the driver has it), `native` or `generic`.
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    /// Maglev table size (prime) of every service; unset, each service's
    /// from its backends ([`crate::maglev::table_size`]).
    #[serde(default)]
    pub table_size: Option<u32>,
    /// Service slots in the maps.
    #[serde(default = "default_max_services")]
    pub max_services: u32,
    /// Backend slots in the maps (one per service membership).
    #[serde(default = "default_max_backends")]
    pub max_backends: u32,
    /// Connection-table entries.
    #[serde(default = "default_conntrack")]
    pub conntrack_entries: u32,
    /// Connection-table entries each CPU may add per second (0: no limit).
    #[serde(default = "default_conntrack_inserts")]
    pub conntrack_inserts_per_cpu: u32,
    /// Idle time after which a TCP flow's entry lapses.
    #[serde(default = "default_tcp_idle", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// Idle time after which a UDP flow's entry lapses.
    #[serde(default = "default_udp_idle", with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
    /// How long the entry of a TCP connection that saw a FIN or RST outlives
    /// its last packet.
    #[serde(default = "default_closed", with = "humantime_serde")]
    pub tcp_closed_timeout: Duration,
    /// A cap on the MTU toward backends, below the attached interface's
    /// own (`ipip` drops what would exceed the smaller). None: the
    /// interface's MTU alone.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Control socket path.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Where runtime changes persist.
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
    /// Prometheus endpoint (`host:port`); none by default.
    pub metrics: Option<String>,
    /// Outer IPv4 source of `ipip` packets, as `address/prefix`: host bits
    /// come from the flow's bucket hash.
    pub tunnel_source_v4: Option<String>,
    /// Outer IPv6 source, likewise (hash bits in the last 32 bits at most).
    pub tunnel_source_v6: Option<String>,
    /// UDP destination port of `gue` packets.
    #[serde(default = "default_gue_port")]
    pub gue_port: u16,
}

impl Default for SettingsFile {
    fn default() -> Self {
        SettingsFile {
            interfaces: Vec::new(),
            xdp_mode: XdpModeSetting::default(),
            table_size: None,
            max_services: default_max_services(),
            max_backends: default_max_backends(),
            conntrack_entries: default_conntrack(),
            conntrack_inserts_per_cpu: default_conntrack_inserts(),
            tcp_idle_timeout: default_tcp_idle(),
            udp_idle_timeout: default_udp_idle(),
            tcp_closed_timeout: default_closed(),
            mtu: None,
            socket: default_socket(),
            state_file: default_state_file(),
            metrics: None,
            tunnel_source_v4: None,
            tunnel_source_v6: None,
            gue_port: default_gue_port(),
        }
    }
}

fn default_gue_port() -> u16 {
    lb_common::limits::DEFAULT_GUE_PORT
}

fn default_max_services() -> u32 {
    limits::DEFAULT_MAX_SERVICES
}
fn default_max_backends() -> u32 {
    limits::DEFAULT_MAX_BACKENDS
}
fn default_conntrack() -> u32 {
    limits::DEFAULT_CONNTRACK_ENTRIES
}
fn default_conntrack_inserts() -> u32 {
    limits::DEFAULT_CONNTRACK_INSERTS_PER_CPU
}
fn default_tcp_idle() -> Duration {
    Duration::from_secs(900)
}
fn default_udp_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_closed() -> Duration {
    Duration::from_secs(10)
}
fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}
fn default_state_file() -> PathBuf {
    DEFAULT_STATE_FILE.into()
}

/// How XDP attaches.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpModeSetting {
    /// Driver mode, falling back to generic where the driver lacks XDP.
    #[default]
    Auto,
    /// Driver mode only.
    Native,
    /// Generic (skb) mode.
    Generic,
}

/// `[[service]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// Unique name, for the CLI and metrics.
    pub name: String,
    /// Virtual IP.
    pub vip: String,
    /// Port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// `dsr-l2` or `ipip`.
    #[serde(default)]
    pub mode: Mode,
    /// `none` (5-tuple hash) or `client` (client address only).
    #[serde(default)]
    pub affinity: Affinity,
    /// Answer ICMP echo requests ("ping") to the VIP from the data plane.
    /// Off by default: a VIP then does not answer ping at all.
    #[serde(default)]
    pub echo: bool,
    /// Health checking of this service's backends.
    #[serde(default)]
    pub health: HealthFile,
    /// An agent on each backend that sets its state and weight.
    pub agent: Option<AgentFile>,
    /// Weights that follow the backends' probe latency.
    pub feedback: Option<FeedbackFile>,
    /// How long a flow may stay idle before its connection-table entry
    /// lapses; the protocol's default (`[settings]`) when absent.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Sources (`address/prefix`) whose packets are dropped.
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    /// When not empty, the only sources whose packets are taken.
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    /// A limit on the new flows of each source prefix.
    pub new_flow_limit: Option<NewFlowLimitFile>,
    /// Backends.
    #[serde(default, rename = "backend")]
    pub backends: Vec<Spanned<BackendFile>>,
}

/// `[service.new_flow_limit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewFlowLimitFile {
    /// New flows a second from one source prefix.
    pub rate: u32,
    /// New flows a source prefix may open at once (default: `rate`).
    pub burst: Option<u32>,
    /// Leading bits of a source address that make its prefix (default: 32
    /// for IPv4, 64 for IPv6).
    pub prefix: Option<u8>,
}

/// Default bits of an IPv6 source that are one source to a new-flow
/// limit: a /64 is one host's, or one LAN's, to choose from.
pub const DEFAULT_LIMIT_PREFIX_V6: u8 = 64;

/// `[[service.backend]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    /// Address (the tunnel endpoint for `ipip`).
    pub address: String,
    /// Relative weight; 0 drains.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// `[service.health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// `tcp`, `http`, `https`, `udp` or `none`.
    #[serde(default)]
    pub check: CheckKind,
    /// Port to probe (default: the service port).
    pub port: Option<u16>,
    /// Time between probes while the state is stable.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time between probes while results disagree with the state.
    #[serde(default = "default_fast_interval", with = "humantime_serde")]
    pub fast_interval: Duration,
    /// Time a probe may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes that bring a backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take it down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// How long a recovered backend takes to reach its full weight (0: at once).
    #[serde(default = "default_slow_start", with = "humantime_serde")]
    pub slow_start: Duration,
    /// `http`, `https`: request path.
    pub path: Option<String>,
    /// `http`, `https`: expected status.
    pub status: Option<u16>,
    /// `http`, `https`: a string the response body must contain.
    pub body: Option<String>,
    /// `https`: the server name to send (SNI) and verify; default: the
    /// backend's address, verified against the certificate's IP addresses.
    pub sni: Option<String>,
    /// `https`: PEM file of the CA certificates to trust; default: the
    /// host's trust store.
    pub ca_file: Option<PathBuf>,
    /// `https`: accept any certificate (still TLS, not verified).
    #[serde(default)]
    pub insecure: bool,
    /// `udp` (required), `tcp` (optional): request payload.
    pub send: Option<String>,
    /// `udp` (required), `tcp` (optional): expected reply prefix.
    pub expect: Option<String>,
    /// Where probes go: the backend's own address, or the service's VIP
    /// delivered to the backend as clients' packets are (the default for
    /// `dsr-l2`).
    pub via: Option<Via>,
}

/// Where a backend's health probes are addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The backend's own address.
    Address,
    /// The service's VIP, sent to the backend the way the data plane sends
    /// clients' packets (see [`crate::probe_path`]): a backend that lost the
    /// VIP fails.
    Vip,
}

impl Default for HealthFile {
    fn default() -> Self {
        HealthFile {
            check: CheckKind::default(),
            port: None,
            interval: default_interval(),
            fast_interval: default_fast_interval(),
            timeout: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            slow_start: default_slow_start(),
            path: None,
            body: None,
            sni: None,
            ca_file: None,
            insecure: false,
            status: None,
            send: None,
            expect: None,
            via: None,
        }
    }
}

/// `[service.agent]`: HAProxy's agent check (see [`crate::agent`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Port of the agent on each backend.
    pub port: u16,
    /// Time between questions.
    #[serde(default = "default_agent_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time an answer may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Sent once connected, before the agent answers (HAProxy's
    /// `agent-send`).
    pub send: Option<String>,
    /// Weight changes smaller than this many percentage points are ignored.
    #[serde(default = "default_agent_step")]
    pub step: u32,
}

/// `[service.feedback]`: weights that follow probe latency, and optionally
/// active flows (see [`crate::feedback`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackFile {
    /// The least percent of its weight a slow backend keeps.
    #[serde(default = "default_min_percent")]
    pub min_percent: u32,
    /// Latencies this close to the fastest backend's count as equal.
    #[serde(default = "default_tolerance", with = "humantime_serde")]
    pub tolerance: Duration,
    /// Weight changes smaller than this many percentage points are ignored.
    #[serde(default = "default_agent_step")]
    pub step: u32,
    /// Also weigh backends by their active flows (the connection table,
    /// read once a second).
    #[serde(default)]
    pub flows: bool,
    /// Flows over its share a backend may hold before it loses weight
    /// for them, so that small counts do not churn the table.
    #[serde(default = "default_flow_tolerance")]
    pub flow_tolerance: u64,
}

fn default_flow_tolerance() -> u64 {
    100
}

fn default_min_percent() -> u32 {
    50
}

fn default_tolerance() -> Duration {
    Duration::from_millis(50)
}

fn default_agent_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_agent_step() -> u32 {
    5
}

fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_fast_interval() -> Duration {
    Duration::from_millis(500)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

/// A check's timeout outside (0, interval], with both values: an unset
/// timeout is [`default_timeout`]'s, which an interval written alone may
/// fall below.
fn timeout_error(timeout: Duration, interval: Duration) -> String {
    let show = |d: Duration| humantime_serde::re::humantime::format_duration(d).to_string();
    format!(
        "must be positive and at most the interval (timeout {}, interval {}; unset, the timeout is {})",
        show(timeout),
        show(interval),
        show(default_timeout())
    )
}
fn default_slow_start() -> Duration {
    Duration::from_secs(8)
}
fn default_rise() -> u32 {
    Thresholds::default().rise
}
fn default_fall() -> u32 {
    Thresholds::default().fall
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => wire::IPPROTO_TCP,
            Protocol::Udp => wire::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Forwarding mode of a service.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Rewrite MACs; backends share the load balancer's L2 segment and hold the VIP.
    #[default]
    DsrL2,
    /// IPIP/IP6IP6 to the backend; backends decapsulate and hold the VIP.
    Ipip,
    /// The packet in UDP to the backend (GUE variant 1), to `gue_port`;
    /// backends decapsulate (`lb decap`) and hold the VIP.
    Gue,
}

/// Which part of a flow picks the backend.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// The 5-tuple.
    #[default]
    None,
    /// The client address: a client's flows share a backend.
    Client,
}

/// Health probe kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// TCP connect.
    #[default]
    Tcp,
    /// HTTP GET with an expected status.
    Http,
    /// HTTP GET over TLS with an expected status.
    Https,
    /// UDP request with an expected reply.
    Udp,
    /// No probing: backends are always up.
    None,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Host-wide settings.
    pub settings: Settings,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
}

/// The address the daemon's status page and metrics are served on when
/// `settings.metrics` is not set.
pub const DEFAULT_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9108);

/// Where the daemon serves its status page and metrics (`settings.metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Not set: [`DEFAULT_METRICS`], skipped with a warning when another
    /// program holds it, so an unset field cannot stop the daemon.
    Default,
    /// Set: the daemon does not start without it.
    At(SocketAddr),
    /// `"off"`.
    Off,
}

impl Listen {
    /// The address to bind, if any.
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Default => Some(DEFAULT_METRICS),
            Listen::At(a) => Some(a),
            Listen::Off => None,
        }
    }
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Interfaces to attach to, each once, at most [`limits::MAX_PORTS`]:
    /// the data plane knows each by its port ([`Settings::port_of`]).
    pub interfaces: Vec<String>,
    /// XDP attach mode.
    pub xdp_mode: XdpModeSetting,
    /// Map capacities.
    pub capacity: Capacity,
    /// The operator's Maglev table size for every service; `None`: each
    /// service's from its backend count.
    pub table_size: Option<u32>,
    /// Connection-table entries each CPU may add per second (0: no limit).
    pub conntrack_inserts_per_cpu: u32,
    /// Idle timeouts (TCP, UDP) and the closed-TCP timeout, whole seconds.
    pub conntrack_timeouts: ConntrackTimeouts,
    /// The operator's cap on the MTU toward backends, if any.
    pub mtu: Option<u32>,
    /// Control socket.
    pub socket: PathBuf,
    /// Persisted runtime state.
    pub state_file: PathBuf,
    /// Where the status page and metrics are served.
    pub metrics: Listen,
    /// `ipip` outer IPv4 source and hash mask.
    pub tunnel_source_v4: ([u8; 4], u32),
    /// `ipip` outer IPv6 source and hash mask (last 32 bits).
    pub tunnel_source_v6: ([u8; 16], u32),
    /// UDP destination port of `gue` packets.
    pub gue_port: u16,
    /// VIP announcement; `None` when the node announces nothing.
    pub announce: Option<Announce>,
    /// Fleet mode; `None` when standalone.
    pub fleet: Option<Fleet>,
    /// A standalone daemon's registration port; `None` when it has none.
    pub registration: Option<RegistrationPort>,
}

/// A standalone daemon's port for `lb agent` registrations
/// ([`crate::registration`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationPort {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The shared secret's file.
    pub secret_file: PathBuf,
    /// How long a registration lasts unless renewed.
    pub lease: Duration,
}

/// Connection-table timeouts, whole seconds (what the data plane keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    /// Idle TCP flows.
    pub tcp_idle: u32,
    /// Idle UDP flows.
    pub udp_idle: u32,
    /// TCP connections that saw a FIN or RST, after their last packet.
    pub tcp_closed: u32,
}

/// Connection-table timeouts are whole seconds from 1 s to a week: the data
/// plane's clock ticks in seconds, and 0 would mean "never".
const TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(7 * 24 * 3600));

fn validate_timeout(t: Duration, at: Option<usize>, field: &str, e: &mut Errors<'_>) {
    if !(TIMEOUT_RANGE.0..=TIMEOUT_RANGE.1).contains(&t) || t.subsec_nanos() != 0 {
        e.push(
            at,
            field,
            format!(
                "{} is not a whole number of seconds from 1s to 7days",
                humantime_serde::re::humantime::format_duration(t)
            ),
        );
    }
}

/// A validated timeout in whole seconds (the range keeps it in u32).
fn timeout_secs(t: Duration) -> u32 {
    u32::try_from(t.as_secs()).unwrap_or(u32::MAX)
}

/// Validated `[fleet]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing `/`.
    pub prefix: String,
    /// This node's name.
    pub node: String,
    /// TTL of this node's status and leadership.
    pub lease: Duration,
    /// TLS to etcd, for `https://` endpoints.
    pub tls: Option<FleetTls>,
}

/// TLS to etcd: the CA that signed its certificate, and this node's own
/// certificate when etcd checks clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTls {
    /// PEM CA certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Shortest and longest lease: under a second, a busy etcd drops live
/// nodes; over a minute, a dead node's view outlives it for too long.
const LEASE_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// Validated `[announce]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// Kernel routing table of the announced VIPs' routes.
    pub table: u32,
    /// BIRD's control socket.
    pub bird_socket: PathBuf,
}

/// A validated service.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// Name.
    pub name: String,
    /// VIP.
    pub vip: IpAddr,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Forwarding mode.
    pub mode: Mode,
    /// Hash on the client address only.
    pub affinity: Affinity,
    /// Answer echo requests to the VIP.
    pub echo: bool,
    /// Idle timeout of its flows, whole seconds; `None` takes the
    /// protocol's default.
    pub idle_timeout: Option<u32>,
    /// Health checking.
    pub health: HealthCheck,
    /// The agent check, if any.
    pub agent: Option<AgentCheck>,
    /// Load feedback, if any.
    pub feedback: Option<Feedback>,
    /// Source prefixes whose packets are dropped (deny wins over allow).
    pub deny: BTreeSet<Prefix>,
    /// Source prefixes taken when not empty; empty admits every source.
    pub allow: BTreeSet<Prefix>,
    /// The limit on each source prefix's new flows, if any.
    pub new_flow_limit: Option<NewFlowLimit>,
    /// Backends by address.
    pub backends: BTreeMap<IpAddr, u32>,
    /// Backends among them that registered themselves (`lb agent`, see
    /// [`crate::fleet::registry`]).
    pub registered: BTreeMap<IpAddr, Registered>,
}

/// What a backend's registration says beyond its address and weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// Leaving: drained until its agent deregisters it.
    pub draining: bool,
    /// The percent of its weight its host's load leaves it.
    pub percent: u32,
}

/// A validated new-flow limit per source prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewFlowLimit {
    /// New flows a second.
    pub rate: u32,
    /// New flows at once.
    pub burst: u32,
    /// Leading bits of a source address that make its prefix.
    pub prefix: u8,
}

impl Service {
    /// The data plane's form of the service's new-flow limit, if any.
    pub fn source_limit(&self) -> Option<lb_common::SourceLimit> {
        let (_, family) = lb_common::addr_bytes(self.vip);
        self.new_flow_limit
            .map(|l| lb_common::SourceLimit::new(l.rate, l.burst, family, l.prefix))
    }

    /// Whether the service has a source list, deny or allow.
    pub fn has_lists(&self) -> bool {
        !(self.deny.is_empty() && self.allow.is_empty())
    }

    /// Whether `other` has the same source lists.
    pub fn same_lists(&self, other: &Service) -> bool {
        (&self.deny, &self.allow) == (&other.deny, &other.allow)
    }

    /// The source-list trie's entries this service needs: every deny
    /// prefix, and every allow prefix no deny prefix holds, so that the
    /// longest match gives deny-wins.
    pub fn source_entries(&self) -> impl Iterator<Item = (Prefix, SourceList)> + '_ {
        let deny = self.deny.iter().map(|p| (*p, SourceList::Deny));
        let allow = self
            .allow
            .iter()
            .filter(|a| !self.deny.iter().any(|d| prefix_holds(*d, **a)))
            .map(|p| (*p, SourceList::Allow));
        deny.chain(allow)
    }

    /// Whether the lists refuse new flows from `src`: a deny prefix holds
    /// it, or there is an allow list and none of its prefixes does.
    pub fn refuses(&self, src: IpAddr) -> bool {
        self.refusal(src).is_some()
    }

    /// The counter that drops new flows from `src`, if the lists refuse
    /// them: `drop_denied` (a deny prefix holds it, whatever `allow` says)
    /// or `drop_not_allowed` (an allow list without it).
    pub fn refusal(&self, src: IpAddr) -> Option<lb_common::Counter> {
        let holds = |p: &Prefix| prefix_holds(*p, (src, if src.is_ipv4() { 32 } else { 128 }));
        if self.deny.iter().any(holds) {
            Some(lb_common::Counter::DropDenied)
        } else if !self.allow.is_empty() && !self.allow.iter().any(holds) {
            Some(lb_common::Counter::DropNotAllowed)
        } else {
            None
        }
    }
}

/// Whether prefix `outer` holds prefix `inner`: the same family, no longer,
/// and the same leading bits.
pub fn prefix_holds(outer: Prefix, inner: Prefix) -> bool {
    outer.0.is_ipv4() == inner.0.is_ipv4()
        && outer.1 <= inner.1
        && mask(inner.0, outer.1) == outer.0
}

/// A validated health check.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// What to probe.
    pub kind: Probe,
    /// Port probed.
    pub port: u16,
    /// Stable interval.
    pub interval: Duration,
    /// Interval while in transition.
    pub fast_interval: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Rise and fall.
    pub thresholds: Thresholds,
    /// Ramp of a recovered backend's weight.
    pub slow_start: Duration,
    /// Where probes are addressed.
    pub via: Via,
}

/// A validated agent check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCheck {
    /// Port of the agent.
    pub port: u16,
    /// Time between questions; also the least time between two table
    /// rebuilds of the service that its agents cause.
    pub interval: Duration,
    /// Time an answer may take.
    pub timeout: Duration,
    /// Sent once connected.
    pub send: Option<Vec<u8>>,
    /// Least weight change applied, in percentage points.
    pub step: u32,
}

/// Validated load feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feedback {
    /// The least percent of its weight a slow backend keeps.
    pub min_percent: u32,
    /// Latencies this close to the fastest count as equal.
    pub tolerance: Duration,
    /// Least weight change applied, in percentage points.
    pub step: u32,
    /// Also by active flows, with this tolerance (flows over the share).
    pub flows: Option<u64>,
}

/// A probe, with what it needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// TCP connect; then, if given, `send`, and a reply starting with
    /// `expect` (so a server that accepts but hangs fails).
    Tcp {
        /// Sent once connected.
        send: Option<Vec<u8>>,
        /// Expected reply prefix.
        expect: Option<Vec<u8>>,
    },
    /// HTTP GET `path`, expecting `status` (over TLS with `tls`).
    Http {
        /// Request path.
        path: String,
        /// Expected status code.
        status: u16,
        /// A string the body must contain.
        body: Option<String>,
        /// TLS (`https`), and how the server's certificate is checked.
        tls: Option<Tls>,
    },
    /// UDP `send`, expecting a reply starting with `expect`.
    Udp {
        /// Request payload.
        send: Vec<u8>,
        /// Expected reply prefix.
        expect: Vec<u8>,
    },
    /// Always up.
    None,
}

/// An `https` check's TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tls {
    /// The name sent and verified (SNI); `None`: the backend's address.
    pub server_name: Option<String>,
    /// What a certificate is verified against.
    pub roots: TlsRoots,
}

/// The certificates an `https` check trusts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TlsRoots {
    /// The host's trust store.
    System,
    /// The CA certificates in this PEM file.
    File(PathBuf),
    /// Any certificate (`insecure = true`).
    Insecure,
}

/// Every problem found in a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One problem: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted field path, e.g. `service[web].backend[2].weight`.
    pub field: String,
    /// What is wrong and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// Parses and validates `text`.
pub fn parse(text: &str) -> Result<Desired, ConfigErrors> {
    let file: File = from_toml(text, "file").map_err(|e| every_missing_field(e, text))?;
    if file.fleet.is_some() && !file.services.is_empty() {
        let at = file.services[0].span().start;
        return Err(ConfigErrors(vec![ConfigError {
            line: Some(line_of(text, at)),
            field: "service".into(),
            message: "with [fleet], services live in etcd: seed them with `lb fleet import`, \
                      and keep only node settings here"
                .into(),
        }]));
    }
    validate(&file, text, text)
}

/// Parses and validates a fleet node's configuration: its own file
/// (`node_text`: settings, `[announce]`, `[fleet]`) with the fleet's
/// services from etcd (`services_text`: `[[service]]` tables only). Line
/// numbers of service errors are the services text's.
pub fn parse_fleet(node_text: &str, services_text: &str) -> Result<Desired, ConfigErrors> {
    let node: File = from_toml(node_text, "file").map_err(|e| every_missing_field(e, node_text))?;
    let services: ServicesFile = from_toml(services_text, "fleet services")
        .map_err(|e| every_missing_field(e, services_text))?;
    let file = File {
        services: services.services,
        ..node
    };
    validate(&file, node_text, services_text)
}

/// Each service's backend addresses and slow-start period, read from a
/// fleet's services text without a node's settings (the fleet leader's
/// view; every node validates the text in full against its own).
pub fn service_backends(
    services_text: &str,
) -> Result<BTreeMap<String, (Vec<IpAddr>, Duration)>, ConfigErrors> {
    let file: ServicesFile = from_toml(services_text, "fleet services")?;
    Ok(file
        .services
        .iter()
        .map(|s| {
            let s = s.get_ref();
            let ips = s
                .backends
                .iter()
                .filter_map(|b| b.get_ref().address.parse().ok())
                .collect();
            (s.name.clone(), (ips, s.health.slow_start))
        })
        .collect())
}

/// Each service's VIP and forwarding mode, read from a fleet's services
/// text without a node's settings (what a backend host's agent needs to
/// set itself up); services whose VIP does not parse are left out.
pub fn service_fronts(
    services_text: &str,
) -> Result<BTreeMap<String, (IpAddr, Mode)>, ConfigErrors> {
    let file: ServicesFile = from_toml(services_text, "fleet services")?;
    Ok(file
        .services
        .iter()
        .filter_map(|s| {
            let s = s.get_ref();
            Some((s.name.clone(), (s.vip.parse().ok()?, s.mode)))
        })
        .collect())
}

pub(crate) fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    what: &str,
) -> Result<T, ConfigErrors> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        ConfigErrors(vec![ConfigError {
            line,
            field: what.into(),
            message: e.message().trim().to_string(),
        }])
    })
}

/// Serde reports the first required field it misses; `check-config`
/// promises every problem at once. When `e` is such a report and more
/// fields are missing, the list of all of them replaces it.
fn every_missing_field(e: ConfigErrors, text: &str) -> ConfigErrors {
    let mut missing = missing_fields(text);
    let first_missing = e.0.iter().any(|c| c.message.starts_with("missing field"));
    if first_missing && missing.len() > 1 {
        // serde's report stays when the list does not have it (a field
        // the list does not track).
        let untracked =
            e.0.into_iter()
                .filter(|c| !missing.iter().any(|m| m.message == c.message));
        missing.splice(0..0, untracked.collect::<Vec<_>>());
        ConfigErrors(missing)
    } else {
        e
    }
}

/// The required fields absent from `text`'s tables, if it is TOML at all.
fn missing_fields(text: &str) -> Vec<ConfigError> {
    let Ok(doc) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut need = |t: &toml::Table, field: &str, keys: &[&str]| {
        for key in keys.iter().filter(|k| !t.contains_key(**k)) {
            out.push(ConfigError {
                line: None,
                field: field.to_string(),
                message: format!("missing field `{key}`"),
            });
        }
    };
    let tables = |v: Option<&toml::Value>| -> Vec<toml::Table> {
        v.and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_table().cloned())
            .collect()
    };
    if let Some(a) = doc.get("announce").and_then(toml::Value::as_table) {
        need(a, "announce", &["table"]);
    }
    if let Some(f) = doc.get("fleet").and_then(toml::Value::as_table) {
        need(f, "fleet", &["endpoints"]);
    }
    if let Some(r) = doc.get("registration").and_then(toml::Value::as_table) {
        need(r, "registration", &["listen", "secret_file"]);
    }
    for (i, svc) in tables(doc.get("service")).iter().enumerate() {
        let field = match svc.get("name").and_then(toml::Value::as_str) {
            Some(name) => format!("service[{name}]"),
            None => format!("service[{i}]"),
        };
        need(svc, &field, &["name", "vip", "port", "protocol"]);
        for (table, keys) in [("agent", &["port"][..]), ("new_flow_limit", &["rate"][..])] {
            if let Some(t) = svc.get(table).and_then(toml::Value::as_table) {
                need(t, &format!("{field}.{table}"), keys);
            }
        }
        for (j, b) in tables(svc.get("backend")).iter().enumerate() {
            need(b, &format!("{field}.backend[{j}]"), &["address"]);
        }
    }
    out
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

struct Errors<'a> {
    /// The text service spans point into.
    text: &'a str,
    /// The text the node's own sections' spans point into.
    node_text: &'a str,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, at: Option<usize>, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            line: at.map(|o| line_of(self.text, o)),
            field: field.into(),
            message: message.into(),
        });
    }

    /// A problem in the node's own sections (`[announce]`, `[fleet]`).
    fn push_node(&mut self, at: usize, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            line: Some(line_of(self.node_text, at)),
            field: field.into(),
            message: message.into(),
        });
    }
}

/// Validates a `[fleet]` table read from a file other than a node's (an
/// agent's, see [`crate::host_agent`]), its lines counted in `text`.
pub fn fleet_of(f: &Spanned<FleetFile>, text: &str) -> Result<Fleet, ConfigErrors> {
    let mut e = Errors {
        text,
        node_text: text,
        list: Vec::new(),
    };
    let fleet = validate_fleet(f.get_ref(), f.span().start, &mut e);
    if e.list.is_empty() {
        Ok(fleet)
    } else {
        Err(ConfigErrors(e.list))
    }
}

/// Validates a `[fleet]` table (a node's, or an agent's, see
/// [`crate::host_agent`]), its problems pushed at `at` in the node's text.
fn validate_fleet(f: &FleetFile, at: usize, e: &mut Errors<'_>) -> Fleet {
    if f.endpoints.is_empty() {
        e.push_node(at, "fleet.endpoints", "name at least one etcd endpoint");
    }
    let tls = f.endpoints.iter().any(|ep| ep.starts_with("https://"));
    for ep in &f.endpoints {
        if !ep.starts_with("http://") && !ep.starts_with("https://") {
            e.push_node(
                at,
                "fleet.endpoints",
                format!("{ep:?}: write it as http://host:port or https://host:port"),
            );
        } else if tls != ep.starts_with("https://") {
            e.push_node(
                at,
                "fleet.endpoints",
                "use https:// for every endpoint or for none",
            );
        }
    }
    if tls && f.ca_file.is_none() {
        e.push_node(
            at,
            "fleet.ca_file",
            "https:// endpoints need the CA that signed etcd's certificate",
        );
    }
    if !tls && (f.ca_file.is_some() || f.cert_file.is_some()) {
        e.push_node(at, "fleet.ca_file", "TLS files are for https:// endpoints");
    }
    if f.cert_file.is_some() != f.key_file.is_some() {
        e.push_node(
            at,
            "fleet.cert_file",
            "give cert_file and key_file together",
        );
    }
    if !f.prefix.starts_with('/') || f.prefix.ends_with('/') || f.prefix.len() < 2 {
        e.push_node(
            at,
            "fleet.prefix",
            format!(
                "{:?}: start with '/', end without one, e.g. \"/lb\"",
                f.prefix
            ),
        );
    }
    let node = f.node.clone().unwrap_or_else(host_name);
    if !valid_name(&node) {
        e.push_node(
            at,
            "fleet.node",
            format!("{node:?}: use letters, digits, '-', '_' or '.'"),
        );
    }
    // etcd's leases count whole seconds.
    if !(LEASE_RANGE.0..=LEASE_RANGE.1).contains(&f.lease) || f.lease.subsec_nanos() != 0 {
        e.push_node(
            at,
            "fleet.lease",
            format!(
                "{} is not a whole number of seconds from 1s to 60s",
                humantime_serde::re::humantime::format_duration(f.lease)
            ),
        );
    }
    Fleet {
        endpoints: f.endpoints.clone(),
        prefix: f.prefix.clone(),
        node,
        lease: f.lease,
        tls: f.ca_file.clone().filter(|_| tls).map(|ca_file| FleetTls {
            ca_file,
            identity: f.cert_file.clone().zip(f.key_file.clone()),
        }),
    }
}

/// Service and node names: letters, digits, `-`, `_`, `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn parse_prefix(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    Some((a.parse().ok()?, p.parse().ok()?))
}

/// Parses `address/prefix`, refusing host bits (a typo more often than
/// not) with the prefix that was probably meant.
pub fn parse_source(s: &str) -> Result<Prefix, String> {
    let bad = || format!("{s:?} is not a prefix such as \"198.18.0.0/24\" or \"2001:2::/64\"");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    if len > bits {
        return Err(format!(
            "/{len} is longer than an address of {ip}'s family ({bits} bits)"
        ));
    }
    let network = mask(ip, len);
    if network != ip {
        return Err(format!(
            "{s} has host bits set; the prefix is {network}/{len}"
        ));
    }
    Ok((ip, len))
}

/// `ip` with all but its first `len` bits cleared.
fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// A service's source list: prefixes of its VIP's family, host bits
/// clear, each once.
fn validate_sources(
    list: &[Spanned<String>],
    vip: Option<IpAddr>,
    field: &str,
    e: &mut Errors<'_>,
) -> BTreeSet<Prefix> {
    let mut out = BTreeSet::new();
    for (i, p) in list.iter().enumerate() {
        let at = Some(p.span().start);
        match parse_source(p.get_ref()) {
            Ok((ip, _)) if vip.is_some_and(|v| v.is_ipv4() != ip.is_ipv4()) => e.push(
                at,
                format!("{field}[{i}]"),
                format!(
                    "{} is not of the VIP's family: the service only sees {} sources",
                    p.get_ref(),
                    if ip.is_ipv4() { "IPv6" } else { "IPv4" }
                ),
            ),
            Ok(prefix) => {
                if !out.insert(prefix) {
                    e.push(at, format!("{field}[{i}]"), "listed twice");
                }
            }
            Err(message) => e.push(at, format!("{field}[{i}]"), message),
        }
    }
    out
}

/// A service's new-flow limit: a rate and a burst within what the data
/// plane counts, and a prefix no longer than the VIP family's addresses.
fn validate_new_flow_limit(
    l: &NewFlowLimitFile,
    vip: Option<IpAddr>,
    field: &str,
    at: Option<usize>,
    e: &mut Errors<'_>,
) -> NewFlowLimit {
    let max = limits::MAX_SOURCE_LIMIT;
    let burst = l.burst.unwrap_or(l.rate);
    // An unset burst is the rate's: said once, of the rate.
    for (name, value, what) in [
        ("rate", Some(l.rate), "new flows a second"),
        ("burst", l.burst, "new flows at once"),
    ] {
        if let Some(value) = value
            && (value == 0 || value > max)
        {
            e.push(
                at,
                format!("{field}.{name}"),
                format!("{value}: {what} from one source prefix, from 1 to {max}"),
            );
        }
    }
    let v4 = vip.is_none_or(|v| v.is_ipv4());
    let (bits, default) = if v4 {
        (32, 32)
    } else {
        (128, DEFAULT_LIMIT_PREFIX_V6)
    };
    let prefix = l.prefix.unwrap_or(default);
    if prefix > bits {
        e.push(
            at,
            format!("{field}.prefix"),
            format!(
                "/{prefix} is longer than an {} address (0 to {bits})",
                if v4 { "IPv4" } else { "IPv6" }
            ),
        );
    }
    NewFlowLimit {
        rate: l.rate,
        burst,
        prefix,
    }
}

/// Mask of the host bits of a prefix within a 32-bit word.
fn host_mask(prefix_in_word: u8) -> u32 {
    if prefix_in_word >= 32 {
        0
    } else {
        u32::MAX >> prefix_in_word
    }
}

/// Refuses a tunnel source prefix `text` (`base`, the bits under `mask` of
/// its last 32 from each flow's hash) with an address that cannot be a
/// packet's source. Its first and last suffice: each non-unicast block
/// (0.0.0.0, 127/8, 224/4, 255.255.255.255, `::`, `::1`, ff00::/8,
/// ::ffff:0:0/96) lies at one end of every prefix that holds part of it.
fn validate_tunnel_source(text: &str, base: IpAddr, mask: u32, e: &mut Errors<'_>) {
    let (field, example) = if base.is_ipv4() {
        ("settings.tunnel_source_v4", "198.18.255.0/24")
    } else {
        ("settings.tunnel_source_v6", "2001:2:ff::/112")
    };
    let with_last = |last: u32| match base {
        IpAddr::V4(_) => IpAddr::from(last.to_be_bytes()),
        IpAddr::V6(a) => {
            let mut octets = a.octets();
            octets[12..].copy_from_slice(&last.to_be_bytes());
            IpAddr::from(octets)
        }
    };
    let last = match base {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => {
            let [.., b0, b1, b2, b3] = a.octets();
            u32::from_be_bytes([b0, b1, b2, b3])
        }
    };
    if let Some(bad) = [last & !mask, last | mask]
        .into_iter()
        .map(with_last)
        .find(|ip| !usable(*ip))
    {
        e.push(
            None,
            field,
            format!(
                "{text:?} holds {bad}, which cannot be a packet's source: use a unicast \
                 prefix such as \"{example}\""
            ),
        );
    }
}

/// Whether `ip` can be a host's unicast address.
pub(crate) fn usable(ip: IpAddr) -> bool {
    unusable(ip).is_none()
}

/// Why `ip` cannot be a host's unicast address, if it cannot. An
/// IPv4-mapped IPv6 address is the IPv4 host's as a socket sees it, never
/// on the wire: a VIP written so would serve nothing, beside its IPv4
/// service.
pub(crate) fn unusable(ip: IpAddr) -> Option<&'static str> {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        Some("an IPv4-mapped IPv6 address: write the IPv4 address")
    } else if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || broadcast {
        Some("not a unicast address")
    } else {
        None
    }
}

impl Settings {
    /// The data plane's port of interface `name` (see
    /// [`lb_common::Interface::port`]): its place in `interfaces`, from 1,
    /// so a restarted daemon gives every interface the port backends
    /// already name. `None` if lb is not attached to it.
    pub fn port_of(&self, name: &str) -> Option<u8> {
        let i = self.interfaces.iter().position(|i| i == name)?;
        u8::try_from(i + 1).ok()
    }

    /// The first address of the tunnel source prefix of `v6`'s family:
    /// where lb's probes through a tunnel come from (the data plane fills
    /// the host bits from each flow's hash).
    pub fn tunnel_source(&self, v6: bool) -> IpAddr {
        if v6 {
            let (mut a, mask) = self.tunnel_source_v6;
            let last = u32::from_be_bytes([a[12], a[13], a[14], a[15]]) & !mask;
            a[12..].copy_from_slice(&last.to_be_bytes());
            IpAddr::from(a)
        } else {
            let (a, mask) = self.tunnel_source_v4;
            IpAddr::from((u32::from_be_bytes(a) & !mask).to_be_bytes())
        }
    }

    /// The interface with port `port` (see [`Settings::port_of`]).
    pub fn interface_of(&self, port: u8) -> Option<&str> {
        let i = usize::from(port).checked_sub(1)?;
        self.interfaces.get(i).map(String::as_str)
    }
}

fn validate(file: &File, node_text: &str, text: &str) -> Result<Desired, ConfigErrors> {
    let mut e = Errors {
        text,
        node_text,
        list: Vec::new(),
    };
    let s = &file.settings;
    if s.interfaces.is_empty() {
        e.push(
            None,
            "settings.interfaces",
            "name at least one interface to attach to",
        );
    } else if s.interfaces.len() > limits::MAX_PORTS as usize {
        e.push(
            None,
            "settings.interfaces",
            format!(
                "{} interfaces; lb attaches to at most {}",
                s.interfaces.len(),
                limits::MAX_PORTS
            ),
        );
    }
    let mut seen = BTreeSet::new();
    for name in &s.interfaces {
        if !seen.insert(name) {
            e.push(
                None,
                "settings.interfaces",
                format!("{name} is named twice"),
            );
        }
    }
    if let Some(size) = s.table_size
        && (!is_prime(size) || size > limits::MAX_TABLE_SIZE)
    {
        e.push(
            None,
            "settings.table_size",
            format!(
                "{size} is not a prime up to {} (unset, each service's table is sized \
                 from its backends)",
                limits::MAX_TABLE_SIZE
            ),
        );
    }
    let ring_slots = Capacity::ring_slots_for(s.max_services, s.max_backends, s.table_size);
    let capacity = Capacity {
        max_services: s.max_services,
        max_backends: s.max_backends,
        conntrack_entries: s.conntrack_entries,
        ring_slots: *ring_slots.as_ref().unwrap_or(&0),
    };
    for (field, v) in [
        ("settings.max_services", s.max_services),
        ("settings.max_backends", s.max_backends),
        ("settings.conntrack_entries", s.conntrack_entries),
    ] {
        if v == 0 {
            e.push(None, field, "must be at least 1");
        }
    }
    if let Err(err) = ring_slots {
        match s.table_size {
            // The tables sized from the backends fit: the fixed size is too large.
            Some(size)
                if Capacity::ring_slots_for(s.max_services, s.max_backends, None).is_ok() =>
            {
                e.push(
                    None,
                    "settings.table_size",
                    format!(
                        "{size} slots in each of {} tables (max_services {}, and a spare) \
                         exceed the rings map's 2^32 slots: lower table_size or max_services",
                        s.max_services.saturating_add(1),
                        s.max_services
                    ),
                );
            }
            _ => e.push(
                None,
                "settings.max_services/max_backends",
                format!("{err:#}"),
            ),
        }
    }
    if s.max_backends > MAX_FLOW_BACKEND_IDS {
        // A connection-table entry names its backend in 16 bits.
        e.push(
            None,
            "settings.max_backends",
            format!("must be at most {MAX_FLOW_BACKEND_IDS}"),
        );
    }
    if s.max_services >= VIP_ECHO_UNIT {
        // The VIP set counts a VIP's services below this unit.
        e.push(
            None,
            "settings.max_services",
            format!("must be below {VIP_ECHO_UNIT}"),
        );
    }
    for (field, t) in [
        ("settings.tcp_idle_timeout", s.tcp_idle_timeout),
        ("settings.udp_idle_timeout", s.udp_idle_timeout),
        ("settings.tcp_closed_timeout", s.tcp_closed_timeout),
    ] {
        validate_timeout(t, None, field, &mut e);
    }
    if let Some(mtu) = s.mtu
        && !(576..=65_535).contains(&mtu)
    {
        e.push(
            None,
            "settings.mtu",
            format!("{mtu} is outside 576..=65535"),
        );
    }
    let metrics = match s.metrics.as_deref() {
        None => Listen::Default,
        Some("off") => Listen::Off,
        Some(m) => match m.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                e.push(
                    None,
                    "settings.metrics",
                    format!("{m:?}: port 0 would listen on a port nobody knows"),
                );
                Listen::Off
            }
            Ok(a) => Listen::At(a),
            Err(_) => {
                e.push(
                    None,
                    "settings.metrics",
                    format!(
                        "{m:?} is not an IP address and port (e.g. \"127.0.0.1:9108\"; \
                         not a host name) or \"off\""
                    ),
                );
                Listen::Off
            }
        },
    };
    if s.gue_port == 0 {
        e.push(
            None,
            "settings.gue_port",
            "port 0 cannot be a destination: use 1-65535 (6080 by default)",
        );
    }
    let v4 = match s.tunnel_source_v4.as_deref().map(|t| (t, parse_prefix(t))) {
        None => ([0; 4], 0),
        Some((t, Some((IpAddr::V4(a), p)))) if p <= 32 => {
            let mask = host_mask(p);
            validate_tunnel_source(t, a.into(), mask, &mut e);
            (a.octets(), mask)
        }
        Some(_) => {
            e.push(
                None,
                "settings.tunnel_source_v4",
                "expected an IPv4 prefix such as \"198.18.255.0/24\"",
            );
            ([0; 4], 0)
        }
    };
    let v6 = match s.tunnel_source_v6.as_deref().map(|t| (t, parse_prefix(t))) {
        None => ([0; 16], 0),
        Some((t, Some((IpAddr::V6(a), p)))) if (96..=128).contains(&p) => {
            let mask = host_mask(p - 96);
            validate_tunnel_source(t, a.into(), mask, &mut e);
            (a.octets(), mask)
        }
        Some(_) => {
            e.push(
                None,
                "settings.tunnel_source_v6",
                "expected an IPv6 prefix of /96 to /128 such as \"2001:2:ff::/112\"",
            );
            ([0; 16], 0)
        }
    };

    let registration = file.registration.as_ref().map(|r| {
        let at = r.span().start;
        let r = r.get_ref();
        if file.fleet.is_some() {
            e.push_node(
                at,
                "registration",
                "in a fleet, agents register through etcd ([fleet] in their file): remove [registration]",
            );
        }
        let refused = |e: &mut Errors<'_>, why: &str| {
            e.push_node(at, "registration.listen", format!("{:?}: {why}", r.listen));
            SocketAddr::from(([0, 0, 0, 0], 0))
        };
        let listen = match r.listen.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => refused(&mut e, "port 0 would listen on a port no agent knows"),
            Ok(a) => a,
            Err(_) => refused(&mut e, "write it as address:port"),
        };
        if !(LEASE_RANGE.0..=LEASE_RANGE.1).contains(&r.lease) {
            e.push_node(at, "registration.lease", "must be between 1s and 60s");
        }
        RegistrationPort {
            listen,
            secret_file: r.secret_file.clone(),
            lease: r.lease,
        }
    });
    let announce = file.announce.as_ref().map(|a| {
        let at = a.span().start;
        let a = a.get_ref();
        if RESERVED_TABLES.contains(&a.table) {
            e.push_node(
                at,
                "announce.table",
                format!(
                    "table {} is the kernel's own (0, 252-255): use a table no rule looks up, e.g. 100",
                    a.table
                ),
            );
        }
        Announce {
            table: a.table,
            bird_socket: a.bird_socket.clone(),
        }
    });
    let fleet = file
        .fleet
        .as_ref()
        .map(|f| validate_fleet(f.get_ref(), f.span().start, &mut e));

    let mut services = BTreeMap::new();
    // Every service's name, valid or not: `services` holds the valid ones alone.
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    // The first service tunnelling IPv4, and IPv6, packets (ipip or gue).
    let mut tunnelled: [Option<&ServiceFile>; 2] = [None, None];
    let mut memberships = 0usize;
    // Prefixes in the deny lists and the allow lists, over every service.
    let mut list_prefixes = [0usize; 2];
    for spanned in &file.services {
        let at = Some(spanned.span().start);
        let svc = spanned.get_ref();
        let field = format!("service[{}]", svc.name);
        if !valid_name(&svc.name) {
            e.push(
                at,
                format!("{field}.name"),
                "use letters, digits, '-', '_' or '.'",
            );
        }
        if !names.insert(&svc.name) {
            e.push(at, format!("{field}.name"), "another service has this name");
        }
        let vip = match svc.vip.parse::<IpAddr>() {
            Ok(ip) if usable(ip) => Some(ip),
            Ok(ip) => {
                e.push(at, format!("{field}.vip"), unusable(ip).unwrap_or_default());
                None
            }
            Err(_) => {
                e.push(
                    at,
                    format!("{field}.vip"),
                    format!("{:?} is not an IP address", svc.vip),
                );
                None
            }
        };
        if let Some(vip) = vip
            && svc.mode != Mode::DsrL2
        {
            tunnelled[usize::from(vip.is_ipv6())].get_or_insert(svc);
        }
        if svc.port == 0 {
            e.push(
                at,
                format!("{field}.port"),
                "port 0 cannot be balanced; use 1-65535",
            );
        }
        if let Some(vip) = vip
            && !keys.insert((vip, svc.port, svc.protocol))
        {
            e.push(
                at,
                field.clone(),
                format!(
                    "another service already has {vip} port {} {}",
                    svc.port, svc.protocol
                ),
            );
        }
        let health = validate_health(&svc.health, svc.port, at, &field, &mut e);
        let agent = svc.agent.as_ref().map(|a| {
            let agent = validate_agent(a, at, &field, &mut e);
            if file.fleet.is_some() {
                e.push(
                    at,
                    format!("{field}.agent"),
                    "agent checks are for single nodes: in a fleet every node must weigh \
                     backends alike, and each node's agents answer it alone",
                );
            }
            agent
        });
        let feedback = svc.feedback.as_ref().map(|f| {
            let field = format!("{field}.feedback");
            if f.min_percent > crate::feedback::FULL {
                e.push(
                    at,
                    format!("{field}.min_percent"),
                    "a percent of the weight, from 0 to 100",
                );
            }
            if f.step > crate::feedback::FULL {
                e.push(
                    at,
                    format!("{field}.step"),
                    "percentage points, from 0 to 100",
                );
            }
            if svc.health.check == CheckKind::None {
                e.push(
                    at,
                    field.clone(),
                    "follows the health probes' latency: set a health check other than \"none\"",
                );
            }
            if file.fleet.is_some() {
                e.push(
                    at,
                    field,
                    "load feedback is for single nodes: in a fleet every node must weigh \
                     backends alike, and each node measures its own latencies",
                );
            }
            Feedback {
                min_percent: f.min_percent,
                tolerance: f.tolerance,
                step: f.step,
                flows: f.flows.then_some(f.flow_tolerance),
            }
        });
        if let Some(t) = svc.idle_timeout {
            validate_timeout(t, at, &format!("{field}.idle_timeout"), &mut e);
        }
        let deny = validate_sources(&svc.deny, vip, &format!("{field}.deny"), &mut e);
        let allow = validate_sources(&svc.allow, vip, &format!("{field}.allow"), &mut e);
        list_prefixes[0] += deny.len();
        list_prefixes[1] += allow.len();
        let new_flow_limit = svc.new_flow_limit.as_ref().map(|l| {
            validate_new_flow_limit(l, vip, &format!("{field}.new_flow_limit"), at, &mut e)
        });
        let mut backends = BTreeMap::new();
        for (i, b) in svc.backends.iter().enumerate() {
            let bat = Some(b.span().start);
            let b = b.get_ref();
            let bfield = format!("{field}.backend[{i}]");
            match b.address.parse::<IpAddr>() {
                Ok(ip) if !usable(ip) => {
                    let why = unusable(ip).unwrap_or_default();
                    e.push(bat, format!("{bfield}.address"), why);
                }
                Ok(ip) if vip.is_some_and(|v| v.is_ipv4() != ip.is_ipv4()) => e.push(
                    bat,
                    format!("{bfield}.address"),
                    "backend and VIP must be the same family (IPv4-in-IPv4 or IPv6-in-IPv6)",
                ),
                Ok(ip) => {
                    if backends.insert(ip, b.weight).is_some() {
                        e.push(
                            bat,
                            format!("{bfield}.address"),
                            format!("{ip} is listed twice in this service"),
                        );
                    }
                }
                Err(_) => e.push(
                    bat,
                    format!("{bfield}.address"),
                    format!("{:?} is not an IP address", b.address),
                ),
            }
            if b.weight > MAX_WEIGHT {
                e.push(
                    bat,
                    format!("{bfield}.weight"),
                    weight_range_error(b.weight),
                );
            }
        }
        if s.table_size
            .is_some_and(|size| backends.len() > size as usize)
        {
            e.push(
                at,
                format!("{field}.backend"),
                "more backends than table slots",
            );
        }
        memberships += backends.len();
        if let (Some(vip), Some(health)) = (vip, health) {
            services.insert(
                svc.name.clone(),
                Service {
                    name: svc.name.clone(),
                    vip,
                    port: svc.port,
                    protocol: svc.protocol,
                    mode: svc.mode,
                    affinity: svc.affinity,
                    echo: svc.echo,
                    idle_timeout: svc.idle_timeout.map(timeout_secs),
                    health,
                    agent,
                    feedback,
                    deny,
                    allow,
                    new_flow_limit,
                    backends,
                    registered: BTreeMap::new(),
                },
            );
        }
    }
    for (list, prefixes) in ["deny", "allow"].into_iter().zip(list_prefixes) {
        if prefixes > limits::MAX_LIST_PREFIXES as usize {
            e.push(
                None,
                format!("service.{list}"),
                format!(
                    "{prefixes} prefixes in the services' {list} lists, more than the {} lb holds",
                    limits::MAX_LIST_PREFIXES
                ),
            );
        }
    }
    // Unset, the data plane's outer source is 0.0.0.0 or ::, which nothing
    // on the way delivers and no backend's decapsulator accepts.
    for ((field, unset, family, example), svc) in [
        (
            "settings.tunnel_source_v4",
            s.tunnel_source_v4.is_none(),
            "IPv4",
            "198.18.255.0/24",
        ),
        (
            "settings.tunnel_source_v6",
            s.tunnel_source_v6.is_none(),
            "IPv6",
            "2001:2:ff::/112",
        ),
    ]
    .into_iter()
    .zip(tunnelled)
    {
        if let (true, Some(svc)) = (unset, svc) {
            let mode = if svc.mode == Mode::Gue { "gue" } else { "ipip" };
            e.push(
                None,
                field,
                format!(
                    "service {} tunnels to its backends ({mode}) and needs an outer {family} \
                     source: set a prefix its backends accept, such as \"{example}\"",
                    svc.name
                ),
            );
        }
    }
    if let Some(mtu) = s.mtu
        && let Some(short) = ipv6_tunnel_short_of(mtu, services.values())
    {
        e.push(None, "settings.mtu", format!("{mtu} leaves {short}"));
    }
    let vips: BTreeSet<IpAddr> = services.values().map(|svc| svc.vip).collect();
    if vips.len() > limits::MAX_ADDRESSES as usize {
        e.push(
            None,
            "service.vip",
            format!(
                "{} distinct VIPs, more than the {} lb holds (services share a VIP on other ports)",
                vips.len(),
                limits::MAX_ADDRESSES
            ),
        );
    }
    if file.services.len() > s.max_services as usize {
        e.push(
            None,
            "settings.max_services",
            format!(
                "{} services configured, capacity is {}",
                file.services.len(),
                s.max_services
            ),
        );
    }
    if memberships > s.max_backends as usize {
        e.push(
            None,
            "settings.max_backends",
            format!(
                "{memberships} backends configured across services, capacity is {}",
                s.max_backends
            ),
        );
    }
    if !e.list.is_empty() {
        return Err(ConfigErrors(e.list));
    }
    Ok(Desired {
        settings: Settings {
            interfaces: s.interfaces.clone(),
            xdp_mode: s.xdp_mode,
            capacity,
            table_size: s.table_size,
            conntrack_inserts_per_cpu: s.conntrack_inserts_per_cpu,
            conntrack_timeouts: ConntrackTimeouts {
                tcp_idle: timeout_secs(s.tcp_idle_timeout),
                udp_idle: timeout_secs(s.udp_idle_timeout),
                tcp_closed: timeout_secs(s.tcp_closed_timeout),
            },
            mtu: s.mtu,
            socket: s.socket.clone(),
            state_file: s.state_file.clone(),
            metrics,
            tunnel_source_v4: v4,
            tunnel_source_v6: v6,
            gue_port: s.gue_port,
            announce,
            fleet,
            registration,
        },
        services,
    })
}

/// The host's name when this process first asked, the default node name of
/// a fleet. Kept: every reload parses the node's file again, and a daemon
/// whose host was renamed since it started stays the node it registered as.
pub(crate) fn host_name() -> String {
    HOST_NAME.get_or_init(read_host_name).clone()
}

static HOST_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn read_host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn validate_agent(a: &AgentFile, at: Option<usize>, field: &str, e: &mut Errors<'_>) -> AgentCheck {
    let field = format!("{field}.agent");
    if a.port == 0 {
        e.push(at, format!("{field}.port"), "port 0 cannot be asked");
    }
    if a.interval.is_zero() || a.interval > MAX_CHECK_INTERVAL {
        e.push(
            at,
            format!("{field}.interval"),
            "must be positive and at most an hour",
        );
    }
    if a.timeout.is_zero() || a.timeout > a.interval {
        e.push(
            at,
            format!("{field}.timeout"),
            timeout_error(a.timeout, a.interval),
        );
    }
    if a.step > crate::agent::MAX_PERCENT {
        e.push(
            at,
            format!("{field}.step"),
            "percentage points, from 0 to 100",
        );
    }
    AgentCheck {
        port: a.port,
        interval: a.interval,
        timeout: a.timeout,
        send: a.send.clone().map(String::into_bytes),
        step: a.step,
    }
}

fn validate_health(
    h: &HealthFile,
    port: u16,
    at: Option<usize>,
    field: &str,
    e: &mut Errors<'_>,
) -> Option<HealthCheck> {
    let field = format!("{field}.health");
    let errors_before = e.list.len();
    if !(1..=MAX_RISE_FALL).contains(&h.rise) || !(1..=MAX_RISE_FALL).contains(&h.fall) {
        e.push(
            at,
            format!("{field}.rise/fall"),
            format!("rise and fall must be from 1 to {MAX_RISE_FALL}"),
        );
    }
    let positive_within = |d: Duration| !d.is_zero() && d <= MAX_CHECK_INTERVAL;
    if !positive_within(h.interval) || !positive_within(h.fast_interval) {
        e.push(
            at,
            format!("{field}.interval"),
            "intervals must be positive and at most an hour",
        );
    }
    if h.slow_start > MAX_CHECK_INTERVAL {
        e.push(at, format!("{field}.slow_start"), "at most an hour");
    }
    if h.timeout.is_zero() || h.timeout > h.interval {
        e.push(
            at,
            format!("{field}.timeout"),
            timeout_error(h.timeout, h.interval),
        );
    }
    let kind = match h.check {
        CheckKind::Tcp => Probe::Tcp {
            send: h.send.clone().map(String::into_bytes),
            expect: h.expect.clone().map(String::into_bytes),
        },
        CheckKind::None => Probe::None,
        CheckKind::Http | CheckKind::Https => {
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                e.push(
                    at,
                    format!("{field}.path"),
                    "must start with '/' and contain no spaces",
                );
            }
            let status = h.status.unwrap_or(200);
            if !(100..=599).contains(&status) {
                e.push(
                    at,
                    format!("{field}.status"),
                    "must be an HTTP status (100-599)",
                );
            }
            if h.body.as_deref() == Some("") {
                e.push(at, format!("{field}.body"), "must not be empty");
            }
            let tls = (h.check == CheckKind::Https).then(|| Tls {
                server_name: h.sni.clone(),
                roots: match (&h.ca_file, h.insecure) {
                    (Some(_), true) => {
                        e.push(
                            at,
                            format!("{field}.insecure"),
                            "insecure = true verifies nothing: drop ca_file, or insecure",
                        );
                        TlsRoots::Insecure
                    }
                    (Some(file), false) => TlsRoots::File(file.clone()),
                    (None, true) => TlsRoots::Insecure,
                    (None, false) => TlsRoots::System,
                },
            });
            if let Some(name) = &h.sni
                && tokio_rustls::rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
            {
                e.push(
                    at,
                    format!("{field}.sni"),
                    format!("{name:?} is not a server name"),
                );
            }
            Probe::Http {
                path,
                status,
                body: h.body.clone(),
                tls,
            }
        }
        CheckKind::Udp => match (&h.send, &h.expect) {
            (Some(send), Some(expect)) => Probe::Udp {
                send: send.clone().into_bytes(),
                expect: expect.clone().into_bytes(),
            },
            _ => {
                e.push(at, field.clone(), "a udp check needs `send` and `expect`");
                Probe::None
            }
        },
    };
    let http = matches!(h.check, CheckKind::Http | CheckKind::Https);
    if !http && (h.path.is_some() || h.status.is_some() || h.body.is_some()) {
        e.push(
            at,
            format!("{field}.path"),
            "path, status and body only apply to check = \"http\" or \"https\"",
        );
    }
    if h.check != CheckKind::Https && (h.sni.is_some() || h.ca_file.is_some() || h.insecure) {
        e.push(
            at,
            format!("{field}.sni"),
            "sni, ca_file and insecure only apply to check = \"https\"",
        );
    }
    if !matches!(h.check, CheckKind::Udp | CheckKind::Tcp)
        && (h.send.is_some() || h.expect.is_some())
    {
        e.push(
            at,
            format!("{field}.send"),
            "send and expect only apply to check = \"tcp\" or \"udp\"",
        );
    }
    if h.port == Some(0) {
        e.push(at, format!("{field}.port"), "port 0 cannot be probed");
    }
    // Through the VIP by default in every mode: see docs/config.md.
    let via = h.via.unwrap_or(Via::Vip);
    (e.list.len() == errors_before).then(|| HealthCheck {
        kind,
        port: h.port.unwrap_or(port),
        interval: h.interval,
        fast_interval: h.fast_interval,
        timeout: h.timeout,
        thresholds: Thresholds {
            rise: h.rise,
            fall: h.fall,
        },
        slow_start: h.slow_start,
        via,
    })
}

/// The first of `services` whose IPv6 tunnel an MTU of `mtu` leaves less
/// than IPv6's minimum MTU, said as "service NAME's IPv6 tunnel ...": its
/// clients are told the tunnel's MTU when a packet does not fit, and below
/// the minimum they never send one small enough (RFC 8201 §4), so its
/// full-size packets are lost. `None` when every one fits.
pub fn ipv6_tunnel_short_of<'a>(
    mtu: u32,
    services: impl IntoIterator<Item = &'a Service>,
) -> Option<String> {
    services
        .into_iter()
        .filter(|svc| svc.vip.is_ipv6())
        .find_map(|svc| {
            let overhead = match svc.mode {
                Mode::DsrL2 => return None,
                Mode::Ipip => wire::IPV6_HLEN,
                Mode::Gue => wire::IPV6_HLEN + wire::UDP_HLEN,
            } as u32;
            (mtu < IPV6_MIN_MTU + overhead).then(|| {
                format!(
                    "service {}'s IPv6 tunnel ({overhead} bytes) less than IPv6's minimum MTU \
                     of {IPV6_MIN_MTU}, which clients never go below: at least {}",
                    svc.name,
                    IPV6_MIN_MTU + overhead
                )
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Service `a` on an IPv4 VIP with these source lists.
    fn listed(deny: &[Prefix], allow: &[Prefix]) -> Service {
        let list = |ps: &[Prefix]| {
            ps.iter()
                .map(|(ip, len)| format!("\"{ip}/{len}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        let text = format!(
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\n\
             port=80\nprotocol=\"tcp\"\ndeny=[{}]\nallow=[{}]\n",
            list(deny),
            list(allow)
        );
        parse(&text).unwrap().services["a"].clone()
    }

    #[test]
    fn allow_prefixes_inside_deny_ones_are_left_out_so_deny_wins() {
        let p = |s: &str| parse_source(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let svc = listed(
            &[p("198.18.2.0/24")],
            &[p("198.18.0.0/16"), p("198.18.2.128/25")],
        );
        let entries: Vec<_> = svc.source_entries().collect();
        assert_eq!(
            entries,
            [
                (p("198.18.2.0/24"), SourceList::Deny),
                (p("198.18.0.0/16"), SourceList::Allow)
            ]
        );
        assert!(
            svc.refuses(ip("198.18.2.200")),
            "denied, though allowed by a /25"
        );
        assert!(!svc.refuses(ip("198.18.3.1")));
        assert!(svc.refuses(ip("198.19.0.1")), "outside the allow list");
        assert!(!listed(&[p("198.18.2.0/24")], &[]).refuses(ip("198.19.0.1")));
        assert!(!listed(&[], &[]).refuses(ip("198.18.2.1")));
    }

    /// A prefix of 198.18.0.0/16 (what the property test draws from).
    fn prefix() -> impl Strategy<Value = Prefix> {
        (any::<u16>(), 16u8..=32).prop_map(|(bits, len)| {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 | u32::from(bits)));
            (mask(ip, len), len)
        })
    }

    proptest! {
        /// What the data plane decides from the trie (the longest prefix
        /// holding the source: deny drops, allow takes, none drops only
        /// with an allow list) is what the lists say (deny wins).
        #[test]
        fn the_longest_match_of_the_entries_is_deny_wins(
            deny in proptest::collection::btree_set(prefix(), 0..6),
            allow in proptest::collection::btree_set(prefix(), 0..6),
            sources in proptest::collection::vec(any::<u16>(), 1..40),
        ) {
            let deny: Vec<Prefix> = deny.into_iter().collect();
            let allow: Vec<Prefix> = allow.into_iter().collect();
            let svc = listed(&deny, &allow);
            let entries: Vec<(Prefix, SourceList)> = svc.source_entries().collect();
            for bits in sources {
                let src = IpAddr::V4(std::net::Ipv4Addr::from(0xc612_0000 | u32::from(bits)));
                let longest = entries
                    .iter()
                    .filter(|(p, _)| prefix_holds(*p, (src, 32)))
                    .max_by_key(|(p, _)| p.1)
                    .map(|(_, list)| *list);
                let trie_refuses = match longest {
                    Some(SourceList::Deny) => true,
                    Some(SourceList::Allow) => false,
                    None => !svc.allow.is_empty(),
                };
                prop_assert_eq!(trie_refuses, svc.refuses(src), "source {}", src);
            }
        }
    }

    #[test]
    fn masks_clear_exactly_the_host_bits() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(mask(ip("198.18.255.255"), 0), ip("0.0.0.0"));
        assert_eq!(mask(ip("198.18.255.255"), 17), ip("198.18.128.0"));
        assert_eq!(mask(ip("198.18.255.255"), 32), ip("198.18.255.255"));
        assert_eq!(mask(ip("2001:2::ffff"), 120), ip("2001:2::ff00"));
        assert_eq!(mask(ip("2001:2::ffff"), 0), ip("::"));
        assert_eq!(parse_source("0.0.0.0/0"), Ok((ip("0.0.0.0"), 0)));
    }

    const MINIMAL: &str = r#"
[settings]
interfaces = ["eth0"]

[[service]]
name = "web"
vip = "198.18.1.1"
port = 80
protocol = "tcp"

[[service.backend]]
address = "198.18.0.11"
"#;

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../examples/lb.toml");
        let d = parse(text).unwrap();
        assert_eq!(d.services.len(), 2);
        let web = &d.services["web"];
        assert_eq!(web.backends.len(), 2);
        assert_eq!(
            web.health.kind,
            Probe::Http {
                path: "/healthz".into(),
                status: 200,
                body: None,
                tls: None,
            }
        );
        assert_eq!(d.settings.tunnel_source_v4, ([198, 18, 255, 0], 0xff));
        assert_eq!(d.settings.tunnel_source_v6.1, 0xffff);
    }

    #[test]
    fn defaults_are_haproxy_like() {
        let d = parse(MINIMAL).unwrap();
        let h = &d.services["web"].health;
        assert_eq!(
            h.kind,
            Probe::Tcp {
                send: None,
                expect: None
            }
        );
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_secs(2), Duration::from_secs(1))
        );
        assert_eq!(h.thresholds, Thresholds { rise: 2, fall: 3 });
        assert_eq!(d.settings.table_size, None, "sized from the backends");
        assert_eq!(
            d.services["web"]
                .backends
                .values()
                .copied()
                .collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn a_new_flow_limit_takes_its_defaults_from_the_rate_and_the_family() {
        let text = |vip: &str, limit: &str| {
            format!(
                "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"{vip}\"\n\
                 port=80\nprotocol=\"tcp\"\nnew_flow_limit={limit}\n"
            )
        };
        let limit = |vip: &str, limit: &str| {
            let d = parse(&text(vip, limit)).unwrap();
            d.services["a"].new_flow_limit.unwrap()
        };
        let l = limit("198.18.1.1", "{rate=50}");
        assert_eq!((l.rate, l.burst, l.prefix), (50, 50, 32));
        let l = limit("2001:2::1", "{rate=5, burst=20}");
        assert_eq!(
            (l.rate, l.burst, l.prefix),
            (5, 20, DEFAULT_LIMIT_PREFIX_V6)
        );
        let l = limit("2001:2::1", "{rate=5, prefix=128}");
        assert_eq!(l.prefix, 128);
        let e = parse(&text("2001:2::1", "{rate=5, prefix=129}")).unwrap_err();
        assert!(
            e.to_string()
                .contains("/129 is longer than an IPv6 address (0 to 128)"),
            "{e}"
        );
        // The data plane's form: a /24 mask, a tenth of a second a flow,
        // nine more at once.
        let d = parse(&text("198.18.1.1", "{rate=10, burst=10, prefix=24}")).unwrap();
        let sl = d.services["a"].source_limit().unwrap();
        assert_eq!(sl.interval_ns, 100_000_000);
        assert_eq!(sl.tolerance_ns, 900_000_000);
        assert_eq!(&sl.mask[..4], &[255, 255, 255, 0]);
        assert!(sl.mask[4..].iter().all(|b| *b == 0));
        let none = parse(&text("198.18.1.1", "{rate=1}").replace("new_flow_limit={rate=1}\n", ""));
        assert_eq!(none.unwrap().services["a"].source_limit(), None);
    }

    /// Each invalid input, and a fragment its message must contain. This
    /// table is the one docs/config.md shows.
    const INVALID: &[(&str, &str, &str)] = &[
        ("not TOML", "[settings\n", "line 1: file:"),
        (
            "source prefix with host bits",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\ndeny=[\"198.18.2.7/24\"]\n",
            "service[a].deny[0]: 198.18.2.7/24 has host bits set; the prefix is 198.18.2.0/24",
        ),
        (
            "source prefix of the other family",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\nallow=[\"2001:2::/48\"]\n",
            "service[a].allow[0]: 2001:2::/48 is not of the VIP's family: the service only sees IPv4 sources",
        ),
        (
            "source prefix listed twice",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\nallow=[\"198.18.0.0/16\", \"198.18.0.0/16\"]\n",
            "service[a].allow[1]: listed twice",
        ),
        (
            "new-flow rate of 0",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\nnew_flow_limit={rate=0}\n",
            "service[a].new_flow_limit.rate: 0: new flows a second from one source prefix, from 1 to 1000000",
        ),
        (
            "new-flow burst too large",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\nnew_flow_limit={rate=10, burst=2000000}\n",
            "service[a].new_flow_limit.burst: 2000000: new flows at once from one source prefix, from 1 to 1000000",
        ),
        (
            "limit prefix too long",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\nnew_flow_limit={rate=10, prefix=33}\n",
            "service[a].new_flow_limit.prefix: /33 is longer than an IPv4 address (0 to 32)",
        ),
        (
            "not a source prefix",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\ndeny=[\"198.18.2.7\"]\n",
            "service[a].deny[0]: \"198.18.2.7\" is not a prefix such as",
        ),
        (
            "unknown field",
            "[settings]\ninterfaces=[\"eth0\"]\ncolour = 1\n",
            "unknown field `colour`",
        ),
        (
            "no interfaces",
            "[settings]\n",
            "settings.interfaces: name at least one interface",
        ),
        (
            "an interface twice",
            "[settings]\ninterfaces=[\"e\", \"f\", \"e\"]\n",
            "settings.interfaces: e is named twice",
        ),
        (
            "table size not prime",
            "[settings]\ninterfaces=[\"e\"]\ntable_size = 65536\n",
            "settings.table_size: 65536 is not a prime",
        ),
        (
            "bad VIP",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1\"\nport=80\nprotocol=\"tcp\"\n",
            "line 3: service[a].vip: \"198.18.1\" is not an IP address",
        ),
        (
            "multicast VIP",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"224.0.0.1\"\nport=80\nprotocol=\"tcp\"\n",
            "service[a].vip: not a unicast address",
        ),
        (
            "IPv4-mapped VIP",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"::ffff:198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n",
            "service[a].vip: an IPv4-mapped IPv6 address: write the IPv4 address",
        ),
        (
            "metrics on port 0",
            "[settings]\ninterfaces=[\"e\"]\nmetrics = \"127.0.0.1:0\"\n",
            "settings.metrics: \"127.0.0.1:0\": port 0 would listen",
        ),
        (
            "port 0",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=0\nprotocol=\"tcp\"\n",
            "service[a].port: port 0 cannot be balanced",
        ),
        (
            "port out of range",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=70000\nprotocol=\"tcp\"\n",
            "line 6: file:",
        ),
        (
            "unknown protocol",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"sctp\"\n",
            "unknown variant `sctp`",
        ),
        (
            "duplicate service",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[[service]]\nname=\"b\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n",
            "line 8: service[b]: another service already has 198.18.1.1 port 80 tcp",
        ),
        (
            "duplicate name",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=81\nprotocol=\"tcp\"\n",
            "service[a].name: another service has this name",
        ),
        (
            "duplicate backend",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[[service.backend]]\naddress=\"198.18.0.11\"\n[[service.backend]]\naddress=\"198.18.0.11\"\n",
            "line 10: service[a].backend[1].address: 198.18.0.11 is listed twice",
        ),
        (
            "weight too large",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[[service.backend]]\naddress=\"198.18.0.11\"\nweight=70000\n",
            "service[a].backend[0].weight: 70000: a weight is a whole number from 0 to 65535",
        ),
        (
            "negative weight",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[[service.backend]]\naddress=\"198.18.0.11\"\nweight=-1\n",
            "line 10: file:",
        ),
        (
            "family mismatch",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[[service.backend]]\naddress=\"2001:2::1\"\n",
            "must be the same family",
        ),
        (
            "https options on an http check",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\ncheck=\"http\"\ninsecure=true\n",
            "sni, ca_file and insecure only apply to check = \"https\"",
        ),
        (
            "insecure with a CA file",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=443\nprotocol=\"tcp\"\n[service.health]\ncheck=\"https\"\nca_file=\"/etc/lb/ca.pem\"\ninsecure=true\n",
            "insecure = true verifies nothing: drop ca_file, or insecure",
        ),
        (
            "bad server name",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=443\nprotocol=\"tcp\"\n[service.health]\ncheck=\"https\"\nsni=\"not a name\"\n",
            "service[a].health.sni: \"not a name\" is not a server name",
        ),
        (
            "body on a tcp check",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\nbody=\"ok\"\n",
            "path, status and body only apply to check = \"http\" or \"https\"",
        ),
        (
            "udp check without payloads",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=53\nprotocol=\"udp\"\n[service.health]\ncheck=\"udp\"\n",
            "a udp check needs `send` and `expect`",
        ),
        (
            "timeout above interval",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\ninterval=\"1s\"\ntimeout=\"2s\"\n",
            "health.timeout: must be positive and at most the interval (timeout 2s, interval 1s; unset, the timeout is 1s)",
        ),
        (
            "agent timeout above interval",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.agent]\nport=10000\ninterval=\"1s\"\ntimeout=\"2s\"\n",
            "service[a].agent.timeout: must be positive and at most the interval (timeout 2s, interval 1s; unset, the timeout is 1s)",
        ),
        (
            "agent step above 100",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.agent]\nport=10000\nstep=150\n",
            "service[a].agent.step: percentage points, from 0 to 100",
        ),
        (
            "feedback bound above 100",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.feedback]\nmin_percent=120\n",
            "service[a].feedback.min_percent: a percent of the weight, from 0 to 100",
        ),
        (
            "feedback without probes",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\ncheck=\"none\"\n[service.feedback]\n",
            "service[a].feedback: follows the health probes' latency",
        ),
        (
            "agent port 0",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.agent]\nport=0\n",
            "service[a].agent.port: port 0 cannot be asked",
        ),
        (
            "bad duration",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\ninterval=\"soon\"\n",
            "line 9: file:",
        ),
        (
            "rise 0",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\nrise=0\n",
            "rise and fall must be from 1 to 100",
        ),
        (
            "rise too large",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\nrise=4000000000\n",
            "rise and fall must be from 1 to 100",
        ),
        (
            "interval of centuries",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\nfast_interval=\"300000000000y\"\n",
            "service[a].health.interval: intervals must be positive and at most an hour",
        ),
        (
            "slow start of a day",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.health]\nslow_start=\"1d\"\n",
            "service[a].health.slow_start: at most an hour",
        ),
        (
            "agent interval of a day",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.agent]\nport=5555\ninterval=\"1d\"\n",
            "service[a].agent.interval: must be positive and at most an hour",
        ),
        (
            "GUE port 0",
            "[settings]\ninterfaces=[\"e\"]\ngue_port=0\n",
            "settings.gue_port: port 0 cannot be a destination",
        ),
        (
            "bad metrics address",
            "[settings]\ninterfaces=[\"e\"]\nmetrics=\"localhost:9108\"\n",
            "settings.metrics: \"localhost:9108\" is not an IP address and port (e.g.",
        ),
        (
            "bad tunnel prefix",
            "[settings]\ninterfaces=[\"e\"]\ntunnel_source_v4=\"2001:2::/64\"\n",
            "settings.tunnel_source_v4: expected an IPv4 prefix",
        ),
        (
            "tunnel source not unicast",
            "[settings]\ninterfaces=[\"e\"]\ntunnel_source_v4=\"224.0.0.0/24\"\n",
            "settings.tunnel_source_v4: \"224.0.0.0/24\" holds 224.0.0.0, which cannot be a packet's source",
        ),
        (
            "tunnel without a tunnel source",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\nmode=\"ipip\"\n",
            "settings.tunnel_source_v4: service a tunnels to its backends (ipip) and needs an outer IPv4 source",
        ),
        (
            "tables past the rings map",
            "[settings]\ninterfaces=[\"e\"]\nmax_services=1024\ntable_size=4194301\n",
            "settings.table_size: 4194301 slots in each of 1025 tables (max_services 1024, and a spare) exceed the rings map's 2^32 slots",
        ),
        (
            "reserved routing table",
            "[settings]\ninterfaces=[\"e\"]\n[announce]\ntable=254\n",
            "line 3: announce.table: table 254 is the kernel's own",
        ),
        (
            "fleet without endpoints",
            "[settings]\ninterfaces=[\"e\"]\n[fleet]\nendpoints=[]\nnode=\"a\"\n",
            "fleet.endpoints: name at least one etcd endpoint",
        ),
        (
            "fleet over https without a CA",
            "[settings]\ninterfaces=[\"e\"]\n[fleet]\nendpoints=[\"https://198.18.0.250:2379\"]\nnode=\"a\"\n",
            "fleet.ca_file: https:// endpoints need the CA",
        ),
        (
            "fleet with services",
            "[settings]\ninterfaces=[\"e\"]\n[fleet]\nendpoints=[\"http://198.18.0.254:2379\"]\nnode=\"a\"\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n",
            "line 6: service: with [fleet], services live in etcd",
        ),
        (
            "fleet lease in milliseconds",
            "[settings]\ninterfaces=[\"e\"]\n[fleet]\nendpoints=[\"http://198.18.0.254:2379\"]\nnode=\"lb1\"\nlease=\"1500ms\"\n",
            "line 3: fleet.lease: 1s 500ms is not a whole number of seconds from 1s to 60s",
        ),
        (
            "services past the VIP set's count",
            "[settings]\ninterfaces=[\"e\"]\nmax_services=65536\ntable_size=13\n",
            "settings.max_services: must be below 65536",
        ),
        (
            "backends past a connection-table entry's ids",
            "[settings]\ninterfaces=[\"e\"]\nmax_backends=65537\ntable_size=13\n",
            "settings.max_backends: must be at most 65536",
        ),
        (
            "IPv6 tunnel below IPv6's minimum MTU",
            "[settings]\ninterfaces=[\"e\"]\nmtu=1300\ntunnel_source_v6=\"2001:2:ff::/112\"\n[[service]]\nname=\"a\"\nvip=\"2001:2:1::1\"\nport=80\nprotocol=\"tcp\"\nmode=\"gue\"\n",
            "settings.mtu: 1300 leaves service a's IPv6 tunnel (48 bytes) less than IPv6's minimum MTU of 1280, which clients never go below: at least 1328",
        ),
        (
            "too many services",
            "[settings]\ninterfaces=[\"e\"]\nmax_services=1\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[[service]]\nname=\"b\"\nvip=\"198.18.1.1\"\nport=81\nprotocol=\"tcp\"\n",
            "2 services configured, capacity is 1",
        ),
        (
            "idle timeout of zero",
            "[settings]\ninterfaces=[\"e\"]\nudp_idle_timeout=\"0s\"\n",
            "settings.udp_idle_timeout: 0s is not a whole number of seconds from 1s to 7days",
        ),
        (
            "service idle timeout in ms",
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"udp\"\nidle_timeout=\"1500ms\"\n",
            "line 3: service[a].idle_timeout: 1s 500ms is not a whole number of seconds",
        ),
    ];

    #[test]
    fn every_invalid_case_is_refused_with_its_message() {
        for (what, text, fragment) in INVALID {
            match parse(text) {
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(fragment), "{what}: {msg:?} lacks {fragment:?}");
                }
            }
        }
    }

    #[test]
    fn a_fleet_node_takes_its_services_from_the_fleet_text() {
        let node = "[settings]\ninterfaces=[\"eth0\"]\n[fleet]\nendpoints=[\"http://198.18.0.254:2379\"]\nnode=\"lb1\"\n";
        let services = "[[service]]\nname=\"web\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n";
        let d = parse_fleet(node, services).unwrap();
        assert_eq!(d.services.len(), 1);
        let f = d.settings.fleet.unwrap();
        assert_eq!((f.node.as_str(), f.prefix.as_str()), ("lb1", "/lb"));
        assert_eq!(f.lease, Duration::from_secs(3));
        // The node file alone is valid too (no services yet).
        assert!(parse(node).unwrap().services.is_empty());
        // Service errors carry the services text's lines.
        let bad = "[[service]]\nname=\"web\"\nvip=\"x\"\nport=80\nprotocol=\"tcp\"\n";
        let e = parse_fleet(node, bad).unwrap_err().to_string();
        assert!(e.starts_with("line 1: service[web].vip"), "{e}");
        // Only services belong in the fleet's text.
        let e = parse_fleet(node, "[settings]\ninterfaces=[\"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fleet services") && e.contains("unknown field `settings`"),
            "{e}"
        );
        // Agents answer, and latencies are measured by, one node each: not
        // in a fleet.
        let agent = format!("{services}[service.agent]\nport=10000\n");
        let e = parse_fleet(node, &agent).unwrap_err().to_string();
        assert!(
            e.contains("service[web].agent: agent checks are for single nodes"),
            "{e}"
        );
        let feedback = format!("{services}[service.feedback]\n");
        let e = parse_fleet(node, &feedback).unwrap_err().to_string();
        assert!(
            e.contains("service[web].feedback: load feedback is for single nodes"),
            "{e}"
        );
    }

    #[test]
    fn an_agent_check_takes_its_defaults() {
        let text = "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n[service.agent]\nport=10000\nsend=\"hello\\n\"\n";
        let agent = parse(text).unwrap().services["a"].agent.clone().unwrap();
        assert_eq!(
            agent,
            AgentCheck {
                port: 10000,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                send: Some(b"hello\n".to_vec()),
                step: 5,
            }
        );
        let none = parse(&text.replace("[service.agent]\nport=10000\nsend=\"hello\\n\"\n", ""));
        assert_eq!(none.unwrap().services["a"].agent, None);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[settings]\ntable_size=10\n[[service]]\nname=\"a\"\nvip=\"x\"\nport=0\nprotocol=\"tcp\"\n";
        let e = parse(text).unwrap_err();
        assert_eq!(e.0.len(), 4, "{e}");
    }

    #[test]
    fn more_source_prefixes_than_the_tries_hold_are_refused() {
        let list = |n: u32| {
            (0..n)
                .map(|i| format!("\"2001:2::{:x}:{:x}/128\"", i >> 16, i & 0xffff))
                .collect::<Vec<_>>()
                .join(",")
        };
        let config = |n: u32| {
            format!(
                "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"2001:2:1::1\"\n\
                 port=80\nprotocol=\"tcp\"\ndeny=[{}]\n",
                list(n)
            )
        };
        let full = limits::MAX_LIST_PREFIXES;
        assert_eq!(
            parse(&config(full)).unwrap().services["a"].deny.len(),
            full as usize
        );
        let err = parse(&config(full + 1)).unwrap_err().to_string();
        assert!(
            err.contains("service.deny: 65537 prefixes in the services' deny lists, more than the 65536 lb holds"),
            "{err}"
        );
    }

    #[test]
    fn errors_of_defaulted_fields_say_where_the_value_comes_from() {
        let service = "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=80\nprotocol=\"tcp\"\n";
        // An unset burst is the rate's: only the rate is wrong.
        let e = parse(&format!("{service}new_flow_limit={{rate=0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("burst"), "{e}");
        // An interval written alone, under the default timeout.
        let e = parse(&format!("{service}[service.health]\ninterval=\"500ms\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("(timeout 1s, interval 500ms; unset, the timeout is 1s)"),
            "{e}"
        );
    }

    #[test]
    fn more_vips_than_the_vip_set_holds_are_refused() {
        let config = |n: u32| {
            let services: String = (0..n)
                .map(|i| {
                    format!(
                        "[[service]]\nname=\"s{i}\"\nvip=\"198.18.{}.{}\"\nport=80\nprotocol=\"tcp\"\n",
                        i >> 8,
                        i & 0xff
                    )
                })
                .collect();
            format!("[settings]\ninterfaces=[\"e\"]\nmax_services=2000\n{services}")
        };
        let full = limits::MAX_ADDRESSES;
        assert_eq!(parse(&config(full)).unwrap().services.len(), full as usize);
        let err = parse(&config(full + 1)).unwrap_err().to_string();
        assert!(
            err.contains("service.vip: 1025 distinct VIPs, more than the 1024 lb holds"),
            "{err}"
        );
    }

    #[test]
    fn every_missing_field_is_reported_at_once() {
        let text = "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nprotocol=\"tcp\"\n\
                    [[service.backend]]\nweight=2\n[[service]]\nvip=\"198.18.1.2\"\n";
        let e = parse(text).unwrap_err().to_string();
        for want in [
            "service[a]: missing field `vip`",
            "service[a]: missing field `port`",
            "service[a].backend[0]: missing field `address`",
            "service[1]: missing field `name`",
            "service[1]: missing field `port`",
            "service[1]: missing field `protocol`",
        ] {
            assert!(e.contains(want), "{want:?} not in:\n{e}");
        }
        assert_eq!(e.lines().count(), 6, "{e}");
        // One missing field keeps serde's report, with its line.
        let one = parse(
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nprotocol=\"tcp\"\n",
        );
        assert!(one.unwrap_err().to_string().starts_with("line "));
        // Those of nested tables too, a service's port and its agent's
        // (one message) each with its own field.
        let e = parse(
            "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nprotocol=\"tcp\"\n\
             [service.agent]\nsend=\"x\"\n[service.new_flow_limit]\nburst=5\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "service[a].agent: missing field `port`",
            "service[a].new_flow_limit: missing field `rate`",
            "service[a]: missing field `vip`",
            "service[a]: missing field `port`",
        ] {
            assert!(e.contains(want), "{want:?} not in:\n{e}");
        }
        assert_eq!(e.lines().count(), 4, "{e}");
    }

    #[test]
    fn interfaces_get_ports_in_the_order_they_are_named() {
        let d = parse("[settings]\ninterfaces=[\"eth0\", \"bond0\"]\n").unwrap();
        assert_eq!(d.settings.port_of("eth0"), Some(1));
        assert_eq!(d.settings.port_of("bond0"), Some(2));
        assert_eq!(d.settings.port_of("eth2"), None);
        let many: Vec<String> = (0..=limits::MAX_PORTS)
            .map(|i| format!("\"e{i}\""))
            .collect();
        let e = parse(&format!("[settings]\ninterfaces=[{}]\n", many.join(","))).unwrap_err();
        assert!(
            e.to_string()
                .contains("128 interfaces; lb attaches to at most 127"),
            "{e}"
        );
    }

    #[test]
    fn a_defaulted_node_name_is_the_host_name_read_once() {
        let f: FleetFile = toml::from_str("endpoints=[\"http://198.18.0.254:2379\"]\n").unwrap();
        let mut e = Errors {
            text: "",
            node_text: "",
            list: Vec::new(),
        };
        let node = validate_fleet(&f, 0, &mut e).node;
        // Kept, not read again: a reload after the host is renamed names
        // the node the daemon started as, so [fleet] does not change.
        assert_eq!(HOST_NAME.get(), Some(&node));
        assert_eq!(validate_fleet(&f, 0, &mut e).node, node);
    }

    #[test]
    fn tunnelled_services_need_a_unicast_tunnel_source_of_their_family() {
        let config = |sources: &str, vip: &str, mode: &str| {
            format!(
                "[settings]\ninterfaces=[\"e\"]\n{sources}[[service]]\nname=\"a\"\n\
                 vip=\"{vip}\"\nport=80\nprotocol=\"tcp\"\nmode=\"{mode}\"\n"
            )
        };
        let v4 = "tunnel_source_v4=\"198.18.255.0/24\"\n";
        let v6 = "tunnel_source_v6=\"2001:2:ff::/112\"\n";
        assert!(parse(&config("", "198.18.1.1", "dsr-l2")).is_ok());
        assert!(parse(&config(v4, "198.18.1.1", "ipip")).is_ok());
        assert!(parse(&config(v6, "2001:2:1::1", "gue")).is_ok());
        // The other family's source is no source.
        let e = parse(&config(v4, "2001:2:1::1", "gue"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("settings.tunnel_source_v6: service a tunnels to its backends (gue)"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        // Reported with the service's other problems.
        let both = config("", "198.18.1.1", "ipip").replace("port=80", "port=0");
        assert_eq!(parse(&both).unwrap_err().0.len(), 2);
        // Every address of the prefix is some flow's source.
        for (field, prefix, bad) in [
            ("v4", "0.0.0.0/24", "0.0.0.0"),
            ("v4", "255.255.255.255/32", "255.255.255.255"),
            ("v4", "128.0.0.0/1", "255.255.255.255"),
            ("v4", "64.0.0.0/2", "127.255.255.255"),
            ("v4", "239.0.0.0/8", "239.0.0.0"),
            ("v6", "::/96", "::"),
            ("v6", "::1/128", "::1"),
            ("v6", "ff02::/112", "ff02::"),
            ("v6", "::ffff:198.18.255.0/120", "::ffff:198.18.255.0"),
        ] {
            let text =
                format!("[settings]\ninterfaces=[\"e\"]\ntunnel_source_{field}=\"{prefix}\"\n");
            let e = parse(&text).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "settings.tunnel_source_{field}: \"{prefix}\" holds {bad},"
                )),
                "{prefix}: {e}"
            );
        }
        for (field, prefix) in [("v4", "198.18.255.7/32"), ("v6", "2001:2:ff::/96")] {
            let text =
                format!("[settings]\ninterfaces=[\"e\"]\ntunnel_source_{field}=\"{prefix}\"\n");
            assert!(parse(&text).is_ok(), "{prefix}");
        }
    }

    #[test]
    fn a_duplicate_name_is_reported_beside_the_services_other_problems() {
        let text = "[settings]\ninterfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"x\"\nport=80\n\
                    protocol=\"tcp\"\n[[service]]\nname=\"a\"\nvip=\"198.18.1.1\"\nport=81\nprotocol=\"tcp\"\n";
        let e = parse(text).unwrap_err().to_string();
        assert!(
            e.contains("service[a].vip: \"x\" is not an IP address"),
            "{e}"
        );
        assert!(
            e.contains("line 8: service[a].name: another service has this name"),
            "{e}"
        );
    }

    #[test]
    fn a_rings_overflow_names_the_settings_that_cause_it() {
        let e = parse("[settings]\ninterfaces=[\"e\"]\nmax_services=1024\ntable_size=4194301\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("settings.table_size: 4194301 slots"), "{e}");
        assert!(!e.contains("settings.max_services"), "{e}");
        // The tables sized from the backends overflow by themselves.
        let e = parse("[settings]\ninterfaces=[\"e\"]\nmax_services=65535\ntable_size=13\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("settings.max_services/max_backends: the tables of 65535 services"),
            "{e}"
        );
        assert!(!e.contains("settings.table_size"), "{e}");
    }

    #[test]
    fn a_fleet_lease_is_whole_seconds() {
        let node = |lease: &str| {
            format!(
                "[settings]\ninterfaces=[\"e\"]\n[fleet]\nendpoints=[\"http://198.18.0.254:2379\"]\n\
                 node=\"lb1\"\nlease=\"{lease}\"\n"
            )
        };
        assert_eq!(
            parse(&node("2s")).unwrap().settings.fleet.unwrap().lease,
            Duration::from_secs(2)
        );
        for lease in ["1500ms", "500ms", "61s"] {
            let e = parse(&node(lease)).unwrap_err().to_string();
            assert!(
                e.contains("fleet.lease:")
                    && e.contains("is not a whole number of seconds from 1s to 60s"),
                "{lease}: {e}"
            );
        }
    }

    #[test]
    fn the_docs_table_lists_every_case() {
        let docs = include_str!("../../docs/config.md");
        for (what, _, _) in INVALID {
            assert!(
                docs.contains(&format!("| {what} |")),
                "docs/config.md lacks the case {what:?}"
            );
        }
    }
}
