//! Support for lb's privileged black-box tests.
//!
//! # Layout
//! - [`lan`]: client, load balancer and backends on one bridge, in namespaces.
//! - [`packet`]: builds and inspects frames (Ethernet, VLAN, IPv4/IPv6, TCP,
//!   UDP, ICMP) with valid lengths and checksums.
//! - [`daemon`]: a real `lb daemon` process in a namespace, driven by the CLI.
//! - [`browser`]: headless Chromium in a namespace, driven through WebDriver.
//! - [`edge`]: a client behind a BIRD router that learns VIPs over BGP from
//!   lb nodes, each with its own BIRD; etcd; echo servers and long-lived
//!   sessions (`lb::demo::edge`, which `lb demo --fleet` runs too).
//! - [`lab`]: a loaded data plane with services and backends, and a way to
//!   run one frame through a program with BPF_PROG_TEST_RUN.
//! - [`fuzz`]: the packet fuzzer: seeded frame generator, reference
//!   classifier, and the properties every verdict of `lb_xdp` must keep.
//! - [`responder`]: a server whose answers and delay a test sets (agents,
//!   health-check targets).
//! - [`seccomp`]: a unit's `RestrictAddressFamilies=` for a child process.
//! - [`legacy`]: what earlier versions wrote into pinned maps (their hash
//!   and seals), for upgrade tests and the benchmark's baselines.
//!
//! Network namespaces come from `lb::netns`, which the demo uses too.

pub mod browser;
pub mod daemon;
pub use lb::demo::edge;
pub mod fuzz;
pub mod lab;
pub mod lan;
pub mod legacy;
pub mod packet;
pub mod responder;
pub mod seccomp;

/// Fails the test unless it runs as root. The tests that need root (the
/// kernel, namespaces) are `#[ignore]`d with that reason, so a plain
/// `cargo test` lists them as ignored instead of passing them unrun; `cargo
/// xtask test` runs them with `--include-ignored`, and this makes one run
/// without root fail rather than pass.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (the kernel's BPF and network namespaces): run cargo xtask test"
    );
}

/// A directory of the test's own under the system's temporary directory,
/// removed with everything in it when dropped: for files a test's
/// configuration names (a state file), never the host's defaults.
pub struct Scratch {
    /// The directory.
    pub dir: std::path::PathBuf,
}

impl Scratch {
    /// Creates `lbt-<pid>-<tag>`.
    pub fn new(tag: &str) -> std::io::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("lbt-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Serializes the tests that run `lb demo`: the demo's namespaces and
/// directory have fixed names, so two demos cannot run at once.
pub fn demo_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding the lock leaves nothing to protect.
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Pins the calling thread to the CPU it runs on, so that packets it runs
/// through BPF_PROG_TEST_RUN all meet the same per-CPU state.
pub fn pin_to_this_cpu() -> std::io::Result<()> {
    // SAFETY: sched_getcpu has no preconditions; the set is zeroed, then
    // filled with one CPU, and only read by sched_setaffinity.
    unsafe {
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
