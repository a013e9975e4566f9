//! An edge in namespaces, for `lb demo --fleet` and the fleet tests: a
//! client behind a router running BIRD, which learns the VIPs over BGP from
//! lb nodes (each with its own BIRD and `lb daemon`) on one segment with the
//! backends and etcd. The addresses and BIRD configurations are the shipped
//! examples' (`examples/bird-*.conf`), embedded in the binary.
//!
//! ```text
//!  client 198.18.2.2 ── 198.18.2.1 router 198.18.0.254 ─┐ br0
//!                                    lb nodes 198.18.0.2, .3, .4
//!                                    backends 198.18.0.11, .12, ...
//! ```

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{as_demo_daemon, check_interrupted};
use crate::{
    config::{Fleet, FleetTls},
    netns::{self, Netns, spawn_in},
};
use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// The router's address on the lb segment (BGP peer of every node).
pub const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The client, on its own link to the router.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The router's address toward the client.
const ROUTER_CLIENT_SIDE: &str = "198.18.2.1/24";
/// The routing table lb announces into (`[announce] table`, as in the example).
pub const ANNOUNCE_TABLE: u32 = 100;

/// BIRD configurations as shipped.
const NODE_CONF: &str = include_str!("../../../examples/bird-lb-node.conf");
const ROUTER_CONF: &str = include_str!("../../../examples/bird-router.conf");
/// The node address the node example is written for.
const EXAMPLE_NODE: &str = "198.18.0.2";

/// Address of lb node `i` (0-based), as the router example peers with them.
pub fn node_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 2 + i as u8)
}

/// The name backend `i`'s echo server answers with.
pub fn backend_name(i: usize) -> String {
    format!("backend-{}", i + 1)
}

/// Address of backend `i` (0-based).
pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 11 + i as u8)
}

/// A BIRD process started by a test: killed by PID on drop.
pub struct Bird {
    child: Child,
    /// Its control socket.
    pub socket: PathBuf,
    dir: PathBuf,
}

/// A new directory `name` in the temporary directory, for root alone
/// (mode 0700): one a crashed run left there is removed first, and one
/// that appears meanwhile (another user's, planted) is an error, never
/// used, since its files would be written as root.
fn private_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(name);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(
                anyhow::Error::new(e).context(format!("removing a stale {}", dir.display()))
            );
        }
        _ => {}
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

impl Bird {
    /// Starts `bird` in the foreground in `ns` with `config`, logging to a
    /// file in a fresh directory; returns once its control socket answers.
    pub fn start(ns: &Netns, tag: &str, config: &str) -> Result<Bird> {
        // Named after the namespace, which is unique: tests run in parallel.
        let dir = private_dir(&format!("{}-bird-{tag}", ns.name))?;
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, config.replace("log syslog all;", "log stderr all;"))?;
        let socket = dir.join("bird.ctl");
        let log = std::fs::File::create(dir.join("bird.log"))?;
        let child = spawn_in(
            &ns.name,
            as_demo_daemon(&mut Command::new("bird"))
                .arg("-f")
                .arg("-c")
                .arg(&conf)
                .arg("-s")
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(log),
        )?;
        let bird = Bird { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&bird.socket).is_err() {
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!("bird in {} did not start: {}", ns.name, bird.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(bird)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }

    /// Whether every BGP session is established.
    pub fn sessions_up(&self) -> Result<bool> {
        let rt = tokio_runtime()?;
        let sessions = rt.block_on(crate::bird::bgp_sessions(&self.socket))?;
        Ok(!sessions.is_empty() && sessions.iter().all(crate::bird::Protocol::established))
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// How BGP sessions detect a dead peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timers {
    /// BFD, 100 ms x 3, as the examples ship.
    Bfd,
    /// No BFD: the BGP hold timer alone, in seconds (keepalives at a third).
    HoldTime(u32),
}

impl Timers {
    /// A BIRD configuration from the examples with these timers.
    fn apply(self, config: &str) -> String {
        match self {
            Timers::Bfd => config.to_string(),
            Timers::HoldTime(s) => config.replace(
                "bfd on;",
                &format!(
                    "bfd off;\n    hold time {s};\n    keepalive time {};",
                    (s / 3).max(1)
                ),
            ),
        }
    }
}

/// An lb node's namespace and its BIRD (the daemon is the test's).
pub struct Node {
    /// Its BIRD, stopped before the namespace goes.
    pub bird: Option<Bird>,
    /// Its namespace.
    pub ns: Netns,
    /// Its address.
    pub v4: Ipv4Addr,
    /// Its BGP timers.
    timers: Timers,
}

/// etcd's address on the lb segment.
pub const ETCD_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
/// Its client port.
pub const ETCD_PORT: u16 = 2379;
/// The fleet nodes' lease in the tests: short, so a dead node leaves soon.
const FLEET_LEASE: Duration = Duration::from_secs(2);
/// Bound on what [`Etcd::client`] runs (hangs, not slowness).
const ETCD_CALLS_TIMEOUT: Duration = Duration::from_secs(30);
/// The fleet's key prefix in the tests.
pub const FLEET_PREFIX: &str = "/lb";

/// An etcd server started by a test in its own namespace: killed by PID on
/// drop, its data directory removed.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    /// Clients' TLS files, when it serves `https://` and checks clients.
    tls: Option<FleetTls>,
    /// Its namespace, removed after the process is gone.
    ns: Netns,
}

/// How long the test certificates are valid.
const CERT_DAYS: &str = "2";

/// Makes a CA, a server certificate for [`ETCD_V4`] and a client
/// certificate in `dir` with `openssl`; returns the clients' files.
fn make_certificates(dir: &Path) -> Result<FleetTls> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    netns::run(
        "openssl",
        &[
            &["req", "-x509"][..],
            &key,
            &[
                "-keyout",
                &path("ca.key"),
                "-out",
                &path("ca.pem"),
                "-days",
                CERT_DAYS,
                "-subj",
                "/CN=lbt-ca",
            ],
        ]
        .concat(),
    )?;
    for (name, usage) in [
        (
            "server",
            format!("subjectAltName=IP:{ETCD_V4}\nextendedKeyUsage=serverAuth\n"),
        ),
        ("client", "extendedKeyUsage=clientAuth\n".to_string()),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), usage)?;
        netns::run(
            "openssl",
            &[
                &["req"][..],
                &key,
                &[
                    "-keyout",
                    &path(&format!("{name}.key")),
                    "-out",
                    &path(&format!("{name}.csr")),
                    "-subj",
                    &format!("/CN=lbt-{name}"),
                ],
            ]
            .concat(),
        )?;
        netns::run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &path(&format!("{name}.csr")),
                "-CA",
                &path("ca.pem"),
                "-CAkey",
                &path("ca.key"),
                "-CAcreateserial",
                "-days",
                CERT_DAYS,
                "-out",
                &path(&format!("{name}.pem")),
                "-extfile",
                &path(&format!("{name}.ext")),
            ],
        )?;
    }
    Ok(FleetTls {
        ca_file: dir.join("ca.pem"),
        identity: Some((dir.join("client.pem"), dir.join("client.key"))),
    })
}

impl Etcd {
    /// Starts etcd in `ns` (which it then owns) on [`ETCD_V4`], data in a
    /// fresh directory; with `tls`, on `https://` with client certificates
    /// checked.
    pub fn start(ns: Netns, tls: bool) -> Result<Etcd> {
        let dir = private_dir(&format!("{}-etcd", ns.name))?;
        let mut etcd = Etcd {
            child: None,
            tls: None,
            dir,
            ns,
        };
        if tls {
            etcd.tls = Some(make_certificates(&etcd.dir)?);
        }
        etcd.spawn()?;
        Ok(etcd)
    }

    /// Its client endpoint.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{ETCD_V4}:{ETCD_PORT}")
    }

    /// The fleet settings of node `node` using this etcd under `prefix`.
    pub fn fleet(&self, prefix: &str, node: &str) -> Fleet {
        Fleet {
            endpoints: vec![self.endpoint()],
            prefix: prefix.into(),
            node: node.into(),
            lease: FLEET_LEASE,
            tls: self.tls.clone(),
        }
    }

    /// Starts the server (again, on the same data) and waits until it answers.
    pub fn spawn(&mut self) -> Result<()> {
        let client = self.endpoint();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "lbt", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "lbt=http://127.0.0.1:2380"])
            .stdout(Stdio::null())
            .stderr(log);
        if self.tls.is_some() {
            cmd.arg("--cert-file")
                .arg(self.dir.join("server.pem"))
                .arg("--key-file")
                .arg(self.dir.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(self.dir.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = spawn_in(&self.ns.name, as_demo_daemon(&mut cmd))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self
                .client(|c| async move {
                    let mut c = c;
                    c.status().await?;
                    Ok(())
                })
                .is_ok()
            {
                return Ok(());
            }
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!("etcd did not start: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (its data stays for [`Etcd::spawn`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// Runs `f` with a client connected from etcd's namespace (the test
    /// writes keys by hand through it).
    pub fn client<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(etcd_client::Client) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let fleet = self.fleet(FLEET_PREFIX, "test");
        self.ns.run(move || {
            tokio_runtime()?.block_on(async move {
                let client = crate::fleet::store::Store::connect(&fleet).await?.client();
                tokio::time::timeout(ETCD_CALLS_TIMEOUT, f(client))
                    .await
                    .context("etcd calls timed out")?
            })
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nftables table the tests' firewall rules go in.
const FIREWALL_TABLE: &str = "lbt";

impl Node {
    /// Drops what this node sends to `dst` (and to `port` of it, if given)
    /// in its output path: its own traffic (probes, etcd), never what its
    /// XDP program forwards. Addressed to `dst`, or routed to it as the
    /// next hop: probes through a VIP go to the VIP, by way of the backend.
    pub fn block(&self, dst: Ipv4Addr, port: Option<u16>) -> Result<()> {
        let _ = self
            .ns
            .exec("nft", &["add", "table", "inet", FIREWALL_TABLE]);
        self.ns.exec(
            "nft",
            &[&format!(
                "add chain inet {FIREWALL_TABLE} out {{ type filter hook output priority 0 ; }}"
            )],
        )?;
        let port = port.map_or(String::new(), |p| format!(" tcp dport {p}"));
        for to in [format!("ip daddr {dst}"), format!("rt ip nexthop {dst}")] {
            let rule = format!("add rule inet {FIREWALL_TABLE} out {to}{port} drop");
            self.ns.exec("nft", &[&rule])?;
        }
        Ok(())
    }

    /// Removes every rule [`Node::block`] added.
    pub fn unblock(&self) -> Result<()> {
        self.ns
            .exec("nft", &["delete", "table", "inet", FIREWALL_TABLE])
    }

    /// Takes its link down or up (a cable pulled or put back).
    pub fn link(&self, up: bool) -> Result<()> {
        self.ns
            .ip(&["link", "set", "eth0", if up { "up" } else { "down" }])
    }

    /// Stops its BIRD (as a crashed or rebooted host's goes).
    pub fn stop_bird(&mut self) {
        self.bird = None;
    }

    /// Starts its BIRD again, as configured at first.
    pub fn start_bird(&mut self, i: usize) -> Result<()> {
        self.bird = Some(Bird::start(
            &self.ns,
            &format!("lb{i}"),
            &self.timers.apply(&node_bird_config(self.v4)),
        )?);
        Ok(())
    }
}

/// The topology; dropping it stops every BIRD and removes every namespace.
pub struct Edge {
    /// etcd, when the edge has a fleet (stopped before the namespaces go).
    pub etcd: Option<Etcd>,
    /// The router's BIRD.
    pub router_bird: Bird,
    /// lb nodes.
    pub nodes: Vec<Node>,
    /// Backends, each holding the VIPs on `lo`.
    pub backends: Vec<Netns>,
    /// The client.
    pub client: Netns,
    /// The router.
    pub router: Netns,
    switch: Netns,
}

impl Edge {
    /// Builds the edge with `nodes` lb nodes (each running BIRD) and
    /// `backends` backends holding `vips` on `lo`.
    pub fn build(nodes: usize, backends: usize, vips: &[Ipv4Addr]) -> Result<Edge> {
        Edge::build_with(nodes, backends, vips, Timers::Bfd)
    }

    /// As [`Edge::build`], with BGP `timers` on the router and every node.
    pub fn build_with(
        nodes: usize,
        backends: usize,
        vips: &[Ipv4Addr],
        timers: Timers,
    ) -> Result<Edge> {
        let switch = netns::switch()?;
        let router = Netns::new("rt")?;
        let client = Netns::new("cl")?;
        netns::plug(
            &switch,
            "prt",
            &router,
            "02:00:00:00:00:fe",
            &[&format!("{ROUTER_V4}/24")],
        )?;
        netns::veth(&router, "eth1", &client, "eth0", None)?;
        router.ip(&["addr", "add", ROUTER_CLIENT_SIDE, "dev", "eth1"])?;
        router.ip(&["link", "set", "eth1", "up"])?;
        client.ip(&["addr", "add", &format!("{CLIENT_V4}/24"), "dev", "eth0"])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        client.ip(&["route", "add", "default", "via", "198.18.2.1"])?;
        for (ns, dev) in [(&router, "eth1"), (&client, "eth0")] {
            ns.exec(
                "ethtool",
                &["-K", dev, "tso", "off", "gso", "off", "gro", "off"],
            )?;
        }
        router.sysctl("net.ipv4.ip_forward", "1")?;
        // Spread flows over the nodes by their 5-tuple.
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        let router_bird = Bird::start(&router, "router", &timers.apply(ROUTER_CONF))?;

        let mut backend_ns = Vec::new();
        for i in 0..backends {
            let ns = Netns::new(&format!("b{i}"))?;
            netns::plug(
                &switch,
                &format!("pb{i}"),
                &ns,
                &format!("02:00:00:00:01:{:02x}", i + 1),
                &[&format!("{}/24", backend_v4(i))],
            )?;
            ns.ip(&["route", "add", "default", "via", &ROUTER_V4.to_string()])?;
            for vip in vips {
                ns.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            }
            // The VIP is the backend's own, but only lb may answer for it
            // on the segment.
            ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
            backend_ns.push(ns);
        }

        let mut edge = Edge {
            etcd: None,
            router_bird,
            nodes: Vec::new(),
            backends: backend_ns,
            client,
            router,
            switch,
        };
        for i in 0..nodes {
            let ns = Netns::new(&format!("lb{i}"))?;
            let v4 = node_v4(i);
            netns::plug(
                &edge.switch,
                &format!("plb{i}"),
                &ns,
                &format!("02:00:00:00:00:{:02x}", 2 + i),
                &[&format!("{v4}/24")],
            )?;
            let bird = Bird::start(&ns, &format!("lb{i}"), &timers.apply(&node_bird_config(v4)))?;
            edge.nodes.push(Node {
                bird: Some(bird),
                ns,
                v4,
                timers,
            });
        }
        Ok(edge)
    }

    /// Starts etcd in a namespace of its own on the segment, at
    /// [`ETCD_V4`]; with `tls`, on `https://` with client certificates.
    pub fn start_etcd(&mut self, tls: bool) -> Result<()> {
        let ns = Netns::new("etcd")?;
        netns::plug(
            &self.switch,
            "petcd",
            &ns,
            "02:00:00:00:00:fa",
            &[&format!("{ETCD_V4}/24")],
        )?;
        self.etcd = Some(Etcd::start(ns, tls)?);
        Ok(())
    }

    /// The next hops the router's kernel has for `vip` (empty when no node
    /// announces it).
    pub fn paths(&self, vip: Ipv4Addr) -> Result<Vec<Ipv4Addr>> {
        let out = Command::new("ip")
            .args(["-n", &self.router.name, "-j", "route", "show", "exact"])
            .arg(format!("{vip}/32"))
            .output()?;
        let routes: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut hops = Vec::new();
        for r in routes {
            if let Some(gw) = r["gateway"].as_str() {
                hops.push(gw.parse()?);
            }
            for h in r["nexthops"].as_array().into_iter().flatten() {
                if let Some(gw) = h["gateway"].as_str() {
                    hops.push(gw.parse()?);
                }
            }
        }
        hops.sort();
        Ok(hops)
    }

    /// The router's route to `vip` as `ip route` prints it.
    fn route_text(&self, vip: Ipv4Addr) -> Result<String> {
        let out = Command::new("ip")
            .args(["-n", &self.router.name, "route", "show", "exact"])
            .arg(format!("{vip}/32"))
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the router's next hops for `vip` are exactly `nodes`:
    /// how long that took.
    pub fn wait_paths(
        &self,
        vip: Ipv4Addr,
        nodes: &[Ipv4Addr],
        timeout: Duration,
    ) -> Result<Duration> {
        self.wait_route(vip, nodes, timeout).map(|(t, _)| t)
    }

    /// [`Edge::wait_paths`], and the route as `ip route` printed it then:
    /// read after the next hops, it must name each node too, so what is
    /// shown never misses a next hop that went and came back in between.
    pub fn wait_route(
        &self,
        vip: Ipv4Addr,
        nodes: &[Ipv4Addr],
        timeout: Duration,
    ) -> Result<(Duration, String)> {
        let mut want = nodes.to_vec();
        want.sort();
        let start = Instant::now();
        loop {
            let now = self.paths(vip)?;
            if now == want {
                let text = self.route_text(vip)?;
                if want.iter().all(|n| text.contains(&format!("via {n} "))) {
                    return Ok((start.elapsed(), text));
                }
            }
            check_interrupted()?;
            if start.elapsed() > timeout {
                bail!(
                    "the router's paths to {vip} are {now:?}, not {want:?}, after {timeout:?}; router BIRD: {}",
                    self.router_bird.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The VIP routes lb keeps in node `i`'s announce table.
    pub fn announced(&self, i: usize) -> Result<Vec<String>> {
        let out = Command::new("ip")
            .args(["-n", &self.nodes[i].ns.name, "-j", "route", "show", "table"])
            .arg(ANNOUNCE_TABLE.to_string())
            .args(["proto", &crate::routes::ROUTE_PROTOCOL.to_string()])
            .output()?;
        let routes: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok(routes
            .iter()
            .filter_map(|r| r["dst"].as_str().map(str::to_string))
            .collect())
    }
}

/// The node example with this node's address.
fn node_bird_config(v4: Ipv4Addr) -> String {
    NODE_CONF
        .replace(&format!("{EXAMPLE_NODE};"), &format!("{v4};"))
        .replace(&format!("{EXAMPLE_NODE} as"), &format!("{v4} as"))
}

/// A node's own settings: generic XDP on `eth0`, small maps, and
/// announcements into [`ANNOUNCE_TABLE`] through `bird`.
fn node_settings(bird: &Bird) -> String {
    format!(
        r#"[settings]
interfaces = ["eth0"]
xdp_mode = "generic"
table_size = 4099
max_services = 4
max_backends = 16
conntrack_entries = 4096
metrics = "{METRICS}"

[announce]
table = {ANNOUNCE_TABLE}
bird_socket = "{}"
"#,
        bird.socket.display()
    )
}

/// Where each node's daemon serves its metrics, in its own namespace.
pub const METRICS: &str = "127.0.0.1:9108";

/// Service `echo` on `vip` port [`ECHO_PORT`] over `backends` backends,
/// with fast TCP health checks.
fn echo_service(vip: Ipv4Addr, backends: usize) -> String {
    let mut text = format!(
        "[[service]]\nname = \"echo\"\nvip = \"{vip}\"\nport = {ECHO_PORT}\nprotocol = \"tcp\"\n{}",
        fast_health("tcp")
    );
    for i in 0..backends {
        text += &format!("\n[[service.backend]]\naddress = \"{}\"\n", backend_v4(i));
    }
    text
}

/// A `[service.health]` table with `check` probing fast (200 ms, rise 2,
/// fall 2, no slow start), so namespace tests are short; the defaults are
/// measured by the benchmarks.
pub fn fast_health(check: &str) -> String {
    format!(
        r#"
[service.health]
check = "{check}"
interval = "200ms"
fast_interval = "100ms"
timeout = "150ms"
rise = 2
fall = 2
slow_start = "0s"
"#
    )
}

/// A standalone node's configuration: its settings and service `echo`.
pub fn node_config(vip: Ipv4Addr, backends: usize, bird: &Bird) -> String {
    format!("{}\n{}", node_settings(bird), echo_service(vip, backends))
}

/// A fleet node's own file: its settings, in the fleet on `etcd` as node
/// `lb<i>`.
pub fn fleet_node_config(i: usize, bird: &Bird, etcd: &Etcd) -> String {
    let f = etcd.fleet(FLEET_PREFIX, &format!("lb{i}"));
    let mut text = format!(
        "{}\n[fleet]\nendpoints = [\"{}\"]\nprefix = \"{}\"\nnode = \"{}\"\nlease = \"{}\"\n",
        node_settings(bird),
        f.endpoints[0],
        f.prefix,
        f.node,
        humantime_serde::re::humantime::format_duration(f.lease)
    );
    if let Some(tls) = &f.tls {
        text += &format!("ca_file = \"{}\"\n", tls.ca_file.display());
        if let Some((cert, key)) = &tls.identity {
            text += &format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                cert.display(),
                key.display()
            );
        }
    }
    text
}

/// The fleet's services, as `lb fleet import` reads them: service `echo`.
pub fn fleet_services(vip: Ipv4Addr, backends: usize) -> String {
    echo_service(vip, backends)
}

/// The port of the echo service.
pub const ECHO_PORT: u16 = 7;

/// A TCP server that answers every line with its name, one thread per
/// connection, so connections can live as long as a test needs.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

/// How long a client or server waits for the other.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

impl EchoServer {
    /// Serves [`ECHO_PORT`] in `ns`; returns once bound.
    pub fn start(ns: &Netns, name: &str) -> Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, bound) = std::sync::mpsc::channel();
        let (flag, name) = (stop.clone(), name.to_string());
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind(("0.0.0.0", ECHO_PORT))?;
            listener.set_nonblocking(true)?;
            let _ = ready.send(());
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let (name, flag) = (name.clone(), flag.clone());
                        std::thread::spawn(move || echo(s, &name, &flag));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        bound
            .recv_timeout(IO_TIMEOUT)
            .context("echo server did not start")?;
        Ok(EchoServer {
            stop,
            thread: Some(thread),
        })
    }
}

fn echo(s: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Long-lived TCP connections from the client to a VIP, each remembering
/// the backend that answered first.
pub struct Sessions {
    conns: Vec<(BufReader<TcpStream>, String)>,
}

impl Sessions {
    /// Opens `n` connections to `to` from `client` and asks each once.
    pub fn open(client: &Netns, to: SocketAddr, n: usize) -> Result<Sessions> {
        client.run(move || {
            let mut conns = Vec::new();
            for i in 0..n {
                let s = TcpStream::connect_timeout(&to, IO_TIMEOUT)
                    .with_context(|| format!("connection {i} to {to}"))?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                let mut r = BufReader::new(s);
                let name = ask(&mut r).with_context(|| format!("connection {i}: first answer"))?;
                conns.push((r, name));
            }
            Ok(Sessions { conns })
        })
    }

    /// Asks on every connection; returns how many answered from their first
    /// backend, and a description of each that did not.
    pub fn check(&mut self) -> (usize, Vec<String>) {
        let broken = self.broken();
        let bad: Vec<String> = broken
            .iter()
            .map(|b| {
                format!(
                    "connection from port {} (on {}): {}",
                    b.port, b.first, b.what
                )
            })
            .collect();
        (self.conns.len() - bad.len(), bad)
    }

    /// Asks on every connection; returns those that did not answer from
    /// their first backend.
    pub fn broken(&mut self) -> Vec<Broken> {
        let mut out = Vec::new();
        for (r, first) in &mut self.conns {
            let port = r.get_ref().local_addr().map_or(0, |a| a.port());
            let what = match ask(r) {
                Ok(name) if name == *first => continue,
                Ok(name) => format!("answered by {name}"),
                Err(e) => format!("{e:#}"),
            };
            out.push(Broken {
                port,
                first: first.clone(),
                what,
            });
        }
        out
    }

    /// Connections per backend name.
    pub fn spread(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for (_, name) in &self.conns {
            *m.entry(name.clone()).or_default() += 1;
        }
        m
    }
}

/// A connection that did not answer from its first backend.
#[derive(Debug, Clone)]
pub struct Broken {
    /// The client's port.
    pub port: u16,
    /// The backend that answered first.
    pub first: String,
    /// What happened instead.
    pub what: String,
}

fn ask(r: &mut BufReader<TcpStream>) -> Result<String> {
    r.get_mut().write_all(b"who?\n")?;
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("closed by the other end");
    }
    Ok(line.trim().to_string())
}
