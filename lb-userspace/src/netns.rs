//! Network namespaces for the demo and the topology tests, processes started
//! inside them, and private bpffs mounts. Every namespace is deleted on drop
//! (which also removes its links and detaches programs), so a failing test
//! or an interrupted demo leaves nothing behind.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// Runs `program` with `args`, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    output(program, args).map(drop)
}

/// Runs `program` with `args`: what it printed, or a failure with its
/// stderr.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        // In a process group of its own, out of the terminal's reach: a
        // Ctrl-C (the demo's first, or a second one during teardown) must
        // not kill an `ip netns del` or `umount` half way, nor an `ip netns
        // add` after the namespace exists but before its owner does. A
        // caller that handles the signal (the demo) acts on it after.
        .process_group(0)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the names [`Netns::new`] gives start with: `lbt<pid>-`, this
/// process's own.
pub fn name_prefix() -> String {
    format!("lbt{}-", std::process::id())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates a namespace named `lbt<pid>-<n><role>` with loopback up.
    pub fn new(role: &str) -> Result<Netns> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{n}{role}", name_prefix());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates a namespace with a fixed name (the demo's, which operators
    /// type); fails if it exists.
    pub fn named(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Starts `cmd` inside the namespace (see [`spawn_in`]).
    pub fn spawn_process(&self, cmd: &mut Command) -> Result<Child> {
        spawn_in(&self.name, cmd)
    }

    /// Runs `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        self.ip_output(args).map(drop)
    }

    /// Runs `ip -n <ns> args`: what it printed.
    pub fn ip_output(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        output("ip", &full)
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
    }

    /// Moves the calling thread into the namespace (for good: call it from a
    /// thread made for the purpose, see [`Netns::run`] and [`Netns::spawn`]).
    pub fn enter(&self) -> Result<()> {
        enter(&self.name)
    }

    /// Runs `f` on a new thread inside the namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// Starts `f` on a detached thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name)?;
            f()
        })
    }
}

/// Starts `cmd` inside namespace `name`. Unlike `ip netns exec`, this
/// enters only the network namespace: the process keeps the host's mounts,
/// /sys included, and sees the same bpffs as its parent.
pub fn spawn_in(name: &str, cmd: &mut Command) -> Result<Child> {
    let netns = File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening namespace {name}"))?;
    let fd = netns.as_raw_fd();
    // SAFETY: setns is async-signal-safe; `netns` (and so `fd`) stays open
    // until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {:?} in {name}", cmd.get_program()))
}

fn enter(name: &str) -> Result<()> {
    let f = File::open(format!("/run/netns/{name}"))
        .with_context(|| format!("opening namespace {name}"))?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// A bpffs mounted on a directory of our own, so pins never touch the
/// host's /sys/fs/bpf. On drop, the pins are removed (unpinning a link
/// detaches its program) and the mount is undone.
pub struct PrivateBpffs {
    mount: PathBuf,
}

impl PrivateBpffs {
    /// Mounts a bpffs on `dir` (created if missing).
    pub fn mount(dir: &Path) -> Result<PrivateBpffs> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        run("mount", &["-t", "bpf", "bpf", &dir.to_string_lossy()])?;
        Ok(PrivateBpffs {
            mount: dir.to_path_buf(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.mount) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        // A process that just ended may hold the mount a moment longer (its
        // maps and links go with its last reference): retry, then detach it
        // so the kernel unmounts it once nothing uses it.
        let path = self.mount.to_string_lossy();
        for _ in 0..UMOUNT_TRIES {
            if run("umount", &[&path]).is_ok() {
                return;
            }
            std::thread::sleep(UMOUNT_RETRY);
        }
        if let Err(e) = run("umount", &["--lazy", &path]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Tries of a busy bpffs's unmount before it is detached lazily.
const UMOUNT_TRIES: u32 = 10;
/// Time between them.
const UMOUNT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// A veth pair: `a_name` in `a`, `b_name` (with `b_mac`, if given) in `b`.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str, b_mac: Option<&str>) -> Result<()> {
    let mut args = vec![
        "link", "add", a_name, "netns", &a.name, "type", "veth", "peer", "name", b_name, "netns",
        &b.name,
    ];
    if let Some(mac) = b_mac {
        args.extend(["address", mac]);
    }
    ip(&args)
}

/// Connects `host` (interface `eth0` with `mac`, addresses `addrs`) to the
/// bridge `br0` in `switch`, through a veth whose switch end is `port`.
pub fn plug(switch: &Netns, port: &str, host: &Netns, mac: &str, addrs: &[&str]) -> Result<()> {
    plug_as(switch, port, host, "eth0", mac, addrs)
}

/// [`plug`], with the host's interface named `iface`.
pub fn plug_as(
    switch: &Netns,
    port: &str,
    host: &Netns,
    iface: &str,
    mac: &str,
    addrs: &[&str],
) -> Result<()> {
    veth(switch, port, host, iface, Some(mac))?;
    switch.ip(&["link", "set", port, "master", "br0", "up"])?;
    for a in addrs {
        let mut args = vec!["addr", "add", *a, "dev", iface];
        if a.contains(':') {
            args.push("nodad");
        }
        host.ip(&args)?;
    }
    host.ip(&["link", "set", iface, "up"])?;
    // Small test messages never need segmentation offload, and generic XDP
    // must see wire-sized frames.
    host.exec(
        "ethtool",
        &["-K", iface, "tso", "off", "gso", "off", "gro", "off"],
    )?;
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff` for a MAC.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A namespace holding bridge `br0`: the shared L2 segment of a topology.
pub fn switch() -> Result<Netns> {
    let sw = Netns::new("sw")?;
    sw.ip(&["link", "add", "br0", "type", "bridge"])?;
    sw.ip(&["link", "set", "br0", "up"])?;
    Ok(sw)
}
