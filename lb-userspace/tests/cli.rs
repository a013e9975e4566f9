//! The `lb` binary's own command line, without root: configuration checks
//! and the error a CLI command gives when no daemon runs.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail loudly, like the tests"
)]

use std::process::Command;

fn lb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_the_example_and_names_problems_in_bad_files() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/lb.toml");
    let (code, out, _) = lb(&["check-config", example]);
    assert_eq!(code, 0);
    assert!(out.contains("valid (2 services, 3 backends)"), "{out}");

    let dir = std::env::temp_dir().join(format!("lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[settings]\ninterfaces = [\"eth0\"]\ntable_size = 1000\n",
    )
    .unwrap();
    let (code, _, err) = lb(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("settings.table_size: 1000 is not a prime"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn commands_without_a_daemon_say_what_to_do() {
    let (code, _, err) = lb(&["--socket", "/nonexistent/lb.sock", "status"]);
    assert_eq!(code, 1);
    assert!(err.contains("is `lb daemon` running?"), "{err}");
}

#[test]
fn usage_errors_exit_2_and_name_the_value() {
    for (args, says) in [
        (
            &["backend", "set-weight", "web", "not-an-ip", "3"][..],
            "invalid IP address syntax",
        ),
        (
            &["service", "add", "dns", "198.18.1.2/udp"][..],
            "is not VIP:PORT/PROTO",
        ),
        (
            &["service", "add", "dns", "198.18.1.2:53/sctp"][..],
            "unknown variant `sctp`",
        ),
        (
            &[
                "service",
                "add",
                "dns",
                "198.18.1.2:53/udp",
                "--mode",
                "nat",
            ][..],
            "unknown variant `nat`",
        ),
        (
            &["backend", "add", "web", "198.18.0.11", "--weight", "x"][..],
            "x: a weight is a whole number from 0 to 65535",
        ),
        (
            &["explain", "198.18.0.1", "web"][..],
            "invalid socket address",
        ),
    ] {
        let (code, _, err) = lb(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
