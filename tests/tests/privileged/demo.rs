//! The README's first command runs `lb demo`: it must pass end to end
//! (doctor, weighted spread, eviction, re-admission, stats and health) and
//! leave nothing behind, also when interrupted with Ctrl-C.

use std::{
    io::{BufRead as _, BufReader, Lines},
    process::{Child, ChildStdout, Command, Output, Stdio},
};

use lb_tests::{daemon::lb_binary, require_root};

fn demo_output(args: &[&str]) -> (bool, String) {
    let out = Command::new(lb_binary().unwrap())
        .arg("demo")
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn assert_nothing_left() {
    assert!(
        lb::demo::leftovers().is_empty(),
        "namespaces left: {:?}",
        lb::demo::leftovers()
    );
    assert!(!std::path::Path::new(lb::demo::DIR).exists());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(lb::demo::DIR), "{mounts}");
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn the_demo_runs_end_to_end_and_is_interrupted_cleanly() {
    require_root();
    let _demo = lb_tests::demo_lock();
    let (ok, text) = demo_output(&[]);
    println!("{text}");
    assert!(ok, "lb demo failed:\n{text}");
    for line in [
        "[2/7] lb doctor",
        "ARP for the VIP is suppressed",
        "lb daemon (pid",
        "the health checker evicted backend-2",
        "re-admitted",
        "$ lb stats",
        "forward_dsr",
        "$ lb health",
        "done: every namespace",
    ] {
        assert!(text.contains(line), "demo output lacks {line:?}");
    }
    assert_eq!(text.matches("300 answered, 0 failed").count(), 3);
    assert_nothing_left();

    // Ctrl-C in the middle, or its terminal closed (SIGHUP): exit 1, a
    // clear message, nothing left. (SIGHUP once killed the demo outright,
    // leaving its daemon running and its namespaces behind.)
    for signal in [libc::SIGINT, libc::SIGHUP] {
        let (demo, mut lines) = Running::start(&[]);
        lines
            .by_ref()
            .map(Result::unwrap)
            .find(|l| l.starts_with("[4/7]"));
        let out = demo.stop(signal, lines);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "signal {signal}: {err}");
        assert!(err.contains("interrupted"), "signal {signal}: {err}");
        assert_nothing_left();
    }

    // A second demo while one is still building its topology (before its
    // daemon's socket exists): refused at once, the first one untouched.
    // (It once removed the first one's namespaces and directory.)
    let (first, mut lines) = Running::start(&["--keep"]);
    lines
        .by_ref()
        .map(Result::unwrap)
        .find(|l| l.starts_with("[1/7]"));
    let (ok, second) = demo_output(&[]);
    assert!(!ok, "a second demo ran: {second}");
    assert!(second.contains("another lb demo is running"), "{second}");
    let mut read = Vec::new();
    for line in lines.by_ref().map(Result::unwrap) {
        let kept = line.contains("stays up until Ctrl-C");
        read.push(line);
        if kept {
            break;
        }
    }
    let out = first.stop(libc::SIGINT, lines);
    assert!(
        read.iter().any(|l| l.contains("300 answered, 0 failed")),
        "the first demo, beside the refused one: {read:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left();
}

/// A demo the test runs, its output piped: interrupted and waited for if
/// the test fails before it stops it, so that none outlives the test.
struct Running(Option<Child>);

impl Running {
    /// `lb demo ARGS`, and the lines it prints.
    fn start(args: &[&str]) -> (Running, Lines<BufReader<ChildStdout>>) {
        let mut child = Command::new(lb_binary().unwrap())
            .arg("demo")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (Running(Some(child)), lines)
    }

    /// Sends `signal` and waits for the demo to exit, reading the rest of
    /// its `lines` meanwhile (a closed pipe would fail its next print).
    fn stop(mut self, signal: libc::c_int, lines: Lines<BufReader<ChildStdout>>) -> Output {
        let child = self.0.take().unwrap();
        let rest = std::thread::spawn(move || lines.count());
        // SAFETY: kill(2) on the PID of the child we started, not reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        rest.join().unwrap();
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn the_fleet_demo_runs_end_to_end_and_leaves_nothing() {
    require_root();
    let child = Command::new(lb_binary().unwrap())
        .args(["demo", "--fleet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "lb demo --fleet failed:\n{text}");
    for line in [
        "every node announced 198.18.1.1",
        "nexthop via 198.18.0.4",
        "live on all 3 nodes",
        "the router withdrew lb2",
        "connections still answer from their backend",
        "status left etcd with its lease",
        "done: every namespace",
    ] {
        assert!(text.contains(line), "fleet demo output lacks {line:?}");
    }
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let namespaces = String::from_utf8_lossy(&namespaces.stdout);
    assert!(!namespaces.contains(&format!("lbt{pid}-")), "{namespaces}");
    assert!(!std::path::Path::new(lb::demo::FLEET_DIR).exists());
}
