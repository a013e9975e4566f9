//! Every command in the README's code blocks, run in order against a kept
//! demo (`lb demo --keep`, what `cargo xtask demo --keep` runs once built):
//! `lb` commands inside the demo's load-balancer namespace with the README's
//! `LB_SOCKET`, the `/etc/lb/lb.toml` of the operator guide replaced by the
//! demo's configuration. A README command that fails fails this test.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use lb_tests::{daemon::lb_binary, require_root};

/// The guide's configuration path, and what stands for it here.
const GUIDE_CONFIG: &str = "/etc/lb/lb.toml";
/// `cargo xtask` commands this test does not run, and what runs them.
const XTASK_ELSEWHERE: &[(&str, &str)] = &[
    ("test", "CI runs it (.ci/run)"),
    ("demo", "runs `lb demo`, which demo.rs runs"),
    (
        "build",
        "cargo xtask test starts with the same build (xtask/src/build.rs)",
    ),
    (
        "package",
        "cargo xtask test builds the package, which package.rs installs",
    ),
];
/// How long `lb stats --watch` runs before it is stopped.
const WATCH_FOR: Duration = Duration::from_millis(2500);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The command lines of every ```sh block, comments removed.
fn readme_commands() -> Vec<String> {
    let text = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if in_block {
            // Comments start with "  #" (a command itself never has one).
            let cmd = line.split("  #").next().unwrap_or("").trim();
            if !cmd.is_empty() {
                out.push(cmd.to_string());
            }
        }
    }
    out
}

/// The demo, left running; interrupted (as with Ctrl-C) on drop.
struct KeptDemo {
    child: Child,
    output: std::thread::JoinHandle<Vec<String>>,
    daemon_pid: u32,
}

impl KeptDemo {
    fn start() -> KeptDemo {
        let mut child = Command::new(lb_binary().unwrap())
            .args(["demo", "--keep"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut daemon_pid = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            println!("{line}");
            if let Some(rest) = line.split("lb daemon (pid ").nth(1) {
                daemon_pid = rest.split(')').next().unwrap().parse().unwrap();
            }
            if line.starts_with("The demo stays up") {
                break;
            }
        }
        assert!(daemon_pid > 0, "the demo did not come up");
        // Keep draining: a closed pipe would fail the demo's next print.
        let output = std::thread::spawn(move || lines.map_while(Result::ok).collect());
        KeptDemo {
            child,
            output,
            daemon_pid,
        }
    }

    fn stop(mut self) -> (Option<i32>, Vec<String>) {
        // SAFETY: kill(2) on the PID of the child we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        let output = std::mem::replace(&mut self.output, std::thread::spawn(Vec::new));
        (status.code(), output.join().unwrap())
    }
}

impl Drop for KeptDemo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let _ = self.child.wait();
        }
    }
}

fn run_lb(args: &[String], env: &BTreeMap<String, String>) -> Child {
    lb::netns::spawn_in(
        "lb-demo-lb",
        Command::new(lb_binary().unwrap())
            .args(args)
            .envs(env)
            .current_dir(workspace())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap()
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn every_readme_command_runs() {
    require_root();
    let _demo = lb_tests::demo_lock();
    let commands = readme_commands();
    assert!(commands.len() > 15, "README commands: {commands:?}");
    let demo = KeptDemo::start();
    let demo_config = Path::new(lb::demo::DIR).join("lb.toml");
    let mut env = BTreeMap::new();
    let mut ran = 0;
    for line in &commands {
        let line = line.replace(GUIDE_CONFIG, &demo_config.to_string_lossy());
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        match words.first().map(String::as_str) {
            Some("cargo") => {
                assert_eq!(words[1], "xtask", "{line}");
                let task = words[2..].join(" ");
                if task == "demo --keep" {
                    continue; // this test's own demo
                }
                assert!(
                    XTASK_ELSEWHERE.iter().any(|(t, _)| *t == task),
                    "README runs `cargo xtask {task}`, which no test runs"
                );
            }
            Some("export") => {
                let (k, v) = words[1].split_once('=').unwrap();
                env.insert(k.to_string(), v.to_string());
            }
            Some("lb") if words.get(1).map(String::as_str) == Some("daemon") => {
                // The demo's daemon is this very command.
                let cmdline = std::fs::read(format!("/proc/{}/cmdline", demo.daemon_pid)).unwrap();
                let argv: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                assert_eq!(argv[1..words.len()], words[1..], "{argv:?}");
                ran += 1;
            }
            Some("lb") if words.contains(&"--watch".to_string()) => {
                let mut child = run_lb(&words[1..], &env);
                std::thread::sleep(WATCH_FOR);
                child.kill().unwrap();
                let out = child.wait_with_output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("PKT RATE"), "{line}: {text}");
                ran += 1;
            }
            Some("lb") => {
                let out = run_lb(&words[1..], &env).wait_with_output().unwrap();
                let (stdout, stderr) = (
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                );
                println!("$ {line}\n{stdout}{stderr}");
                assert!(out.status.success(), "`{line}` failed: {stderr}");
                ran += 1;
            }
            _ => panic!("README command {line:?}: no test knows how to run it"),
        }
    }
    let (code, output) = demo.stop();
    assert_eq!(code, Some(0), "{output:?}");
    assert!(lb::demo::leftovers().is_empty());
    println!("README: {ran} lb commands ran");
}
