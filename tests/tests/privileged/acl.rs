//! Source lists end to end, with the real binary and real TCP: `lb acl add
//! --deny` refuses a client (its open connection too: the daemon removes
//! its entry, so its next packet is checked), `lb acl del` lets it back,
//! an allow list without it refuses it, bad prefixes are refused with
//! nothing changed, and the lists outlive a daemon restart (and one that
//! finds them pinned by a version of a smaller capacity).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use aya::maps::{LpmTrie, Map, MapData};
use lb::demo::server::http_get;
use lb_common::{AclKey, limits::MAX_ACL_PREFIXES};
use lb_tests::{
    daemon::{Daemon, WEB_PORT, WEB_VIP, web_config},
    lan::{CLIENT_V4, Lan},
    require_root,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn denied_and_unlisted_clients_are_refused_and_bad_prefixes_change_nothing() {
    require_root();
    let lan = Lan::build(2, &[&format!("{WEB_VIP}/32")]).unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    let mut d = Daemon::start(&lan.lb, "acl", &web_config(2)).unwrap();
    d.wait_in_table(2, WAIT).unwrap();
    let vip = SocketAddr::new(WEB_VIP.into(), WEB_PORT);
    let served = || lan.client.run(|| http_get(vip)).is_ok();
    assert!(served(), "the client is served before any list");
    let client = format!("{CLIENT_V4}/32");
    let stats = |d: &Daemon| -> Value { d.cli(&["stats"]).unwrap()["services"][0].clone() };
    let lists = |d: &Daemon| -> Value { d.cli(&["acl", "list"]).unwrap() };

    // A connection open before the deny: its next request goes unanswered.
    let mut open = lan
        .client
        .run(|| Ok(TcpStream::connect_timeout(&vip, WAIT)?))
        .unwrap();
    d.cli(&["acl", "add", "web", &client, "--deny"]).unwrap();
    open.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    open.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    assert!(
        open.read_to_end(&mut answer).is_err() || answer.is_empty(),
        "a denied client's open connection was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(!served(), "a denied client is served");
    assert!(stats(&d)["denied"].as_u64().unwrap() > 0, "{}", stats(&d));
    let explained = d
        .cli(&["explain", &format!("{CLIENT_V4}:40000"), "web"])
        .unwrap();
    assert_eq!(explained["backend"], Value::Null, "{explained}");
    assert!(
        explained["reason"]
            .as_str()
            .is_some_and(|r| r.contains("drop_denied")),
        "{explained}"
    );
    let one = serde_json::json!([{"service": "web", "list": "deny", "prefix": client}]);
    assert_eq!(lists(&d), one);

    // Bad input: a clear error each, and the lists unchanged.
    for (args, want) in [
        (
            vec!["acl", "add", "web", "2001:2::/48", "--deny"],
            "not of the VIP's family",
        ),
        (
            vec!["acl", "add", "web", "198.18.0.1/24", "--deny"],
            "has host bits set",
        ),
        (
            vec!["acl", "add", "web", client.as_str(), "--deny"],
            "already has",
        ),
        (
            vec!["acl", "del", "web", "198.18.9.0/24", "--deny"],
            "has no 198.18.9.0/24",
        ),
        (
            vec!["acl", "add", "nope", "198.18.9.0/24", "--allow"],
            "no service named",
        ),
        (vec!["acl", "add", "web", "198.18.9.0/24"], "--deny"),
        (
            vec!["acl", "add", "web", "198.18.9.0/24", "--deny", "--allow"],
            "cannot be used with",
        ),
    ] {
        let (_, err) = d.cli_fails(&args).unwrap();
        assert!(err.contains(want), "lb {}: {err}", args.join(" "));
        assert_eq!(lists(&d), one, "after lb {}", args.join(" "));
    }

    // The list outlives a restart: adopted from the pins and in the file.
    d.kill(libc::SIGTERM).unwrap();
    d.spawn().unwrap();
    d.wait_in_table(2, WAIT).unwrap();
    assert_eq!(lists(&d), one);
    assert!(!served(), "a denied client is served after a restart");

    // A trie pinned by a version of half this one's capacity: its prefixes
    // are carried into a trie of this capacity, not refused.
    d.kill(libc::SIGTERM).unwrap();
    let pin = d.pins.join(lb_common::maps::ACL);
    let trie = |pin: &std::path::Path| {
        LpmTrie::<MapData, AclKey, u32>::try_from(Map::LpmTrie(MapData::from_pin(pin).unwrap()))
            .unwrap()
    };
    let pinned: Vec<_> = trie(&pin).iter().map(Result::unwrap).collect();
    assert_eq!(pinned.len(), 1);
    let flags = MapData::from_pin(&pin).unwrap().info().unwrap().map_flags();
    let mut earlier = LpmTrie::<MapData, AclKey, u32>::create(MAX_ACL_PREFIXES / 2, flags).unwrap();
    for (key, list) in &pinned {
        earlier.insert(key, list, 0).unwrap();
    }
    std::fs::remove_file(&pin).unwrap();
    earlier.pin(&pin).unwrap();
    d.spawn().unwrap();
    d.wait_in_table(2, WAIT).unwrap();
    let log = d.log();
    assert!(
        log.contains("carried the pinned source lists over"),
        "{log}"
    );
    let info = MapData::from_pin(&pin).unwrap().info().unwrap();
    assert_eq!(info.max_entries(), MAX_ACL_PREFIXES);
    assert_eq!(lists(&d), one);
    assert!(!served(), "a denied client is served after the carry");

    // Gone from the list: served again.
    d.cli(&["acl", "del", "web", &client, "--deny"]).unwrap();
    assert!(served(), "a client no longer denied is refused");

    // An allow list without the client refuses it; with it, serves it.
    d.cli(&["acl", "add", "web", "198.18.5.0/24", "--allow"])
        .unwrap();
    assert!(!served(), "a client outside the allow list is served");
    // Its last prefix goes only with --open: without it, every source is
    // admitted.
    let (_, err) = d
        .cli_fails(&["acl", "del", "web", "198.18.5.0/24", "--allow"])
        .unwrap();
    assert!(err.contains("--open"), "{err}");
    assert!(!served(), "the refused removal opened the service");
    assert!(
        stats(&d)["not_allowed"].as_u64().unwrap() > 0,
        "{}",
        stats(&d)
    );
    d.cli(&["acl", "add", "web", "198.18.0.0/24", "--allow"])
        .unwrap();
    assert!(served(), "a client inside the allow list is refused");
    drop(d);
}
