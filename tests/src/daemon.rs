//! A real `lb daemon` process in a namespace, driven through the real CLI.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;
use serde_json::Value;

use lb::netns::{Netns, PrivateBpffs, spawn_in};

/// The VIP of service `web` in the configurations below.
pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Its port (TCP).
pub const WEB_PORT: u16 = 80;

/// Service `web` on [`WEB_VIP`]:[`WEB_PORT`]/tcp, with `health` (a
/// `[service.health]` table, or nothing for the defaults), over `backends`
/// backends at 198.18.0.11 and up, as `Lan::build` numbers them.
fn web_service(health: &str, backends: u8) -> String {
    let mut text = format!(
        "[[service]]\nname = \"web\"\nvip = \"{WEB_VIP}\"\nport = {WEB_PORT}\nprotocol = \"tcp\"\n{health}"
    );
    for i in 1..=backends {
        text += &format!("\n[[service.backend]]\naddress = \"198.18.0.{}\"\n", 10 + i);
    }
    text
}

/// The configuration the namespace tests start from: service `web` (see
/// [`web_service`]) with fast health checks (200 ms, rise 2, fall 2, no
/// slow start) so tests are short; the defaults are measured separately.
/// Metrics on 127.0.0.1:9108 in the load balancer's namespace.
pub fn web_config(backends: u8) -> String {
    String::from(
        r#"[settings]
interfaces = ["eth0"]
xdp_mode = "generic"
metrics = "127.0.0.1:9108"
table_size = 4099
max_services = 4
max_backends = 16
conntrack_entries = 4096

"#,
    ) + &web_service(&lb::demo::edge::fast_health("http"), backends)
}

/// Service `web` as an operator would first write it: every setting at its
/// default (health checks included) but the XDP mode.
pub fn default_web_config(backends: u8, xdp_mode: &str) -> String {
    format!("[settings]\ninterfaces = [\"eth0\"]\nxdp_mode = \"{xdp_mode}\"\n\n")
        + &web_service("", backends)
}

/// The metrics page of the daemon in namespace `ns`, which serves it on
/// [`lb::demo::edge::METRICS`] as the configurations here and the demo's
/// ask.
pub fn metrics_in(ns: &Netns) -> Result<String> {
    ns.run(|| {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(lb::demo::edge::METRICS)?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
}

/// `lb --json <args>` run in namespace `ns` (a one-shot command such as
/// `lb decap`), its JSON output; its error output on failure.
pub fn lb_in(ns: &Netns, args: &[&str]) -> Result<Value> {
    let out = spawn_in(
        &ns.name,
        Command::new(lb_binary()?)
            .arg("--json")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )?
    .wait_with_output()?;
    // Some (`lb decap remove`) print no JSON.
    Ok(serde_json::from_slice(succeeded(&out, args)?).unwrap_or(Value::Null))
}

/// What `lb <args>` printed; its error output as the error if it failed.
fn succeeded<'a>(out: &'a std::process::Output, args: &[&str]) -> Result<&'a [u8]> {
    if !out.status.success() {
        bail!(
            "lb {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(&out.stdout)
}

/// The `lb` binary cargo built next to the calling binary: beside it (a
/// binary such as lb-bench, in `target/<profile>/`) or one level up (a test
/// binary, in `target/<profile>/deps/`).
pub fn lb_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the binary has no directory")?;
    let candidates = [Some(dir), dir.parent()];
    if let Some(path) = candidates
        .into_iter()
        .flatten()
        .map(|d| d.join("lb"))
        .find(|p| p.is_file())
    {
        return Ok(path);
    }
    bail!(
        "no lb binary beside {} or in its parent directory: build it first (cargo xtask test does)",
        exe.display()
    )
}

/// A daemon started by this test: killed by PID, its private bpffs
/// unmounted and its files removed on drop.
pub struct Daemon {
    child: Option<Child>,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its bpffs pin directory, on a bpffs mounted for this daemon alone so
    /// the host's /sys/fs/bpf is never touched.
    pub pins: PathBuf,
    /// That bpffs (dropped after the daemon is killed).
    bpffs: Option<PrivateBpffs>,
    /// Its control socket.
    pub socket: PathBuf,
    /// Working directory for config, socket, state and logs.
    pub dir: PathBuf,
    ns: String,
    env: Vec<(String, String)>,
    confinement: Confinement,
}

/// What a systemd unit's sandbox does to the daemon, for tests that run it
/// as the unit would without a systemd to start it.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// A program and its arguments that run `lb daemon ...`, such as
    /// `setpriv` dropping capabilities.
    pub wrapper: Vec<String>,
    /// The only address families socket(2) may open
    /// (`RestrictAddressFamilies=`), if limited.
    pub socket_families: Option<Vec<libc::c_int>>,
}

impl Daemon {
    /// Writes `config` (with `socket`, and `state_file` unless it sets one,
    /// pointing into a fresh directory) and starts `lb daemon` in `ns`;
    /// returns once it answers.
    pub fn start(ns: &Netns, tag: &str, config: &str) -> Result<Daemon> {
        Self::start_with_env(ns, tag, config, &[])
    }

    /// As [`Daemon::start`], with extra environment variables (`LB_LOG`).
    pub fn start_with_env(
        ns: &Netns,
        tag: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        Self::start_under(ns, tag, config, env, &Confinement::default())
    }

    /// As [`Daemon::start_with_env`], confined as a systemd unit confines
    /// it.
    pub fn start_under(
        ns: &Netns,
        tag: &str,
        config: &str,
        env: &[(&str, &str)],
        confinement: &Confinement,
    ) -> Result<Daemon> {
        // Unique per daemon: tests that share a tag run in parallel.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lbt-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("lb.sock");
        // A state file the test chose stays.
        let state_file = match config.contains("\nstate_file = ") {
            true => String::new(),
            false => format!("state_file = \"{}\"\n", dir.join("state.json").display()),
        };
        let full = config.replacen(
            "[settings]\n",
            &format!(
                "[settings]\nsocket = \"{}\"\n{state_file}",
                socket.display()
            ),
            1,
        );
        let path = dir.join("lb.toml");
        std::fs::write(&path, full)?;
        let bpffs = PrivateBpffs::mount(&dir.join("bpffs"))?;
        let mut d = Daemon {
            child: None,
            config: path,
            pins: bpffs.path().join("lb"),
            bpffs: Some(bpffs),
            socket,
            dir,
            ns: ns.name.clone(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            confinement: confinement.clone(),
        };
        d.spawn()?;
        Ok(d)
    }

    /// Starts the daemon process (again) and waits until it answers.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))?;
        // Only the network namespace: `ip netns exec` would also give the
        // daemon a private /sys without the bpffs its pins live on.
        let lb = lb_binary()?;
        let mut command = match self.confinement.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&lb);
                c
            }
            None => Command::new(&lb),
        };
        if let Some(families) = &self.confinement.socket_families {
            crate::seccomp::restrict_socket_families(&mut command, families);
        }
        let child = spawn_in(
            &self.ns,
            command
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .args(["daemon", "--config"])
                .arg(&self.config)
                .arg("--pin-dir")
                .arg(&self.pins)
                .stderr(log),
        )?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("daemon exited with {status}: {}", self.log());
            }
            if self.cli(&["status"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("daemon did not answer within 20 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Sends `signal` to the daemon and waits for it to exit.
    pub fn kill(&mut self, signal: i32) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe { libc::kill(c.id() as i32, signal) };
            c.wait()?;
        }
        Ok(())
    }

    /// Sends `signal` without waiting (SIGHUP).
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: as in `kill`.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// Runs `lb --socket S --json args` and returns its JSON output.
    pub fn cli(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(lb_binary()?)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(args)
            .output()?;
        Ok(serde_json::from_slice(succeeded(&out, args)?)?)
    }

    /// Runs the CLI expecting failure; returns its exit code and stderr.
    pub fn cli_fails(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = Command::new(lb_binary()?)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?;
        if out.status.success() {
            bail!("lb {} succeeded", args.join(" "));
        }
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Makes the daemon's pinned map `name` read-only to system calls
    /// (`BPF_MAP_FREEZE`), for good: every write the daemon tries from then
    /// on fails, while the XDP program still reads and writes it. How a
    /// test makes a kernel write fail part way through a change.
    pub fn freeze_map(&self, name: &str) -> Result<()> {
        /// `enum bpf_cmd`'s `BPF_MAP_FREEZE`.
        const BPF_MAP_FREEZE: libc::c_long = 22;
        let map = MapData::from_pin(self.pins.join(name))
            .with_context(|| format!("opening the pin of {name}"))?;
        // `union bpf_attr`, zeroed but its first field, `map_fd`.
        let mut attr = [0u64; 16];
        attr[0] = u64::from(map.fd().as_fd().as_raw_fd() as u32);
        // SAFETY: `attr` outlives the call, which reads at most its size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_FREEZE,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if r != 0 {
            bail!("freezing {name}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until the first service's table holds `backends` backends.
    pub fn wait_in_table(&self, backends: usize, timeout: Duration) -> Result<Duration> {
        self.wait_until("the backends in the table", timeout, |d| {
            Ok(d.cli(&["service", "list"])?[0]["in_table"] == backends)
        })
    }

    /// Polls `check` until it holds or `timeout` passes.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Daemon) -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if check(self)? {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("{what}: not within {timeout:?}; log: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill(libc::SIGKILL);
        // Unpins (detaching the program) and unmounts, then the files go.
        drop(self.bpffs.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
