//! New-flow limits end to end, with the real binary and real TCP: one
//! client opens connections far faster than its limit while a second
//! client's connections all succeed; `lb stats` and the metrics name the
//! flooder, which is served again once its budget refills; a bad limit is
//! refused with nothing changed, and a service whose limit is taken away
//! limits nothing. (That established flows are never limited is a fixture:
//! the backends' servers answer one connection at a time, so an idle one
//! held open would fail their health checks.)

use std::{
    collections::VecDeque,
    net::{SocketAddr, SocketAddrV4},
    os::fd::{FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use lb::demo::server::http_get;
use lb_common::{SourceDrops, maps};
use lb_tests::{
    daemon::{Daemon, WEB_PORT, WEB_VIP, metrics_in, web_config},
    lan::{CLIENT_V4, Lan, SECOND_CLIENT_V4},
    require_root,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
/// The limit: 50 new connections a second per client, 50 at once.
const LIMIT: &str = "new_flow_limit = { rate = 50, burst = 50 }\n";
/// Connections the flooder keeps open at most; older ones are closed, so
/// those the limit admits do not hold the backends' one-at-a-time servers
/// (which would fail their health checks, and the flows on them move).
const HALF_OPEN: usize = 16;
/// New connections the flooder opens a second: 40 times its limit, and
/// few enough that the two shared CPUs' generic XDP keeps up (beyond,
/// packets of anyone are lost in the kernel's queues before XDP sees them).
const FLOOD_RATE: u32 = 2_000;

/// Opens TCP connections to `to` without waiting for any, [`FLOOD_RATE`]
/// a second for `time`: each a new flow (a new source port). Returns the
/// connections attempted.
fn flood(to: SocketAddrV4, time: Duration) -> Result<u32> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut open = VecDeque::new();
    let mut attempts: u32 = 0;
    let start = Instant::now();
    while start.elapsed() < time {
        if start.elapsed() < Duration::from_secs(1) * attempts / FLOOD_RATE {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        // SAFETY: plain socket calls on a descriptor this function owns
        // from the moment it is made; the address outlives the call.
        let fd = unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let rc = libc::connect(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let err = std::io::Error::last_os_error();
            if rc != 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
                bail!("connect: {err}");
            }
            fd
        };
        attempts += 1;
        open.push_back(fd);
        if open.len() > HALF_OPEN {
            open.pop_front();
        }
    }
    Ok(attempts)
}

/// Writes drops on service id `id` into the daemon's pinned counters,
/// per source and of the service, on every CPU.
fn leave_counts_on(d: &Daemon, id: u32) {
    let per_cpu = |name: &str| MapData::from_pin(d.pins.join(name)).unwrap();
    let mut by_source = PerCpuArray::<MapData, SourceDrops>::try_from(Map::PerCpuArray(per_cpu(
        maps::SOURCE_DROPS,
    )))
    .unwrap();
    let cpus = by_source.get(&id, 0).unwrap().len();
    let left = SourceDrops {
        denied: 7,
        not_allowed: 0,
        limited: 11,
    };
    by_source
        .set(id, PerCpuValues::try_from(vec![left; cpus]).unwrap(), 0)
        .unwrap();
    let mut drops =
        PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(per_cpu(maps::SERVICE_DROPS)))
            .unwrap();
    drops
        .set(id, PerCpuValues::try_from(vec![13u64; cpus]).unwrap(), 0)
        .unwrap();
}

/// The web service's row of `lb stats`, and its limited sources.
fn stats(d: &Daemon) -> (Value, Value) {
    let s = d.cli(&["stats"]).unwrap();
    (s["services"][0].clone(), s["limited_sources"].clone())
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_flooding_client_is_limited_while_another_is_served() {
    require_root();
    let lan = Lan::build(2, &[&format!("{WEB_VIP}/32")]).unwrap();
    let second = lan.second_client().unwrap();
    let _servers = lan.serve_names(WEB_PORT).unwrap();
    let limited = web_config(2).replace(
        "protocol = \"tcp\"\n",
        &format!("protocol = \"tcp\"\n{LIMIT}"),
    );
    let d = Daemon::start(&lan.lb, "limits", &limited).unwrap();
    d.wait_in_table(2, WAIT).unwrap();
    let vip = SocketAddrV4::new(WEB_VIP, WEB_PORT);
    let served = |ns: &lb::netns::Netns| ns.run(|| http_get(SocketAddr::V4(vip))).is_ok();
    assert!(
        served(&lan.client) && served(&second),
        "served before the flood"
    );

    // The flood, and the second client's requests during it, paced well
    // under its own limit.
    let (attempts, failed) = std::thread::scope(|s| {
        let flooder = s.spawn(|| lan.client.run(|| flood(vip, Duration::from_secs(3))));
        let failed: Vec<String> = (0..30)
            .filter_map(|_| {
                std::thread::sleep(Duration::from_millis(50));
                let got = second.run(|| http_get(SocketAddr::V4(vip)));
                got.err().map(|e| format!("{e:#}"))
            })
            .collect();
        (flooder.join().unwrap().unwrap(), failed)
    });
    assert!(
        failed.is_empty(),
        "the second client's connections during the flood: {failed:?}\n{}",
        d.log()
    );
    let (row, sources) = stats(&d);
    let (attempts, dropped) = (u64::from(attempts), row["limited"].as_u64().unwrap());
    // On each CPU its SYNs land on, at most the burst and the flood's three
    // seconds (and one for packets still queued) at the rate got through:
    // the table of recent sources is per CPU. The fixture checks the exact
    // figures.
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let admitted = cpus * (50 + 4 * 50);
    assert!(
        attempts > 1_000 && dropped + admitted >= attempts,
        "{attempts} connections attempted, {dropped} limited ({cpus} CPUs): {row}"
    );
    let flooder = format!("{CLIENT_V4}/32");
    assert_eq!(sources[0]["service"], "web", "{sources}");
    assert_eq!(sources[0]["prefix"], flooder.as_str(), "{sources}");
    assert!(sources[0]["drops"].as_u64().unwrap() > 0, "{sources}");
    let second_prefix = format!("{SECOND_CLIENT_V4}/32");
    assert!(
        !sources
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["prefix"] == second_prefix.as_str()),
        "{sources}"
    );
    let text = metrics_in(&lan.lb).unwrap();
    for line in [
        format!("lb_limited_source_drops{{service=\"web\",source=\"{flooder}\"}}"),
        "lb_service_source_drops_total{service=\"web\",reason=\"limited\"}".into(),
    ] {
        assert!(text.contains(&line), "metrics lack {line}");
    }

    // Its budget refills within a second (burst 50 at 50 a second).
    std::thread::sleep(Duration::from_millis(1_200));
    assert!(
        served(&lan.client),
        "the flooder is not served once refilled"
    );

    // A bad limit: a clear error, the running configuration unchanged.
    let running = std::fs::read_to_string(&d.config).unwrap();
    let bad = d.dir.join("bad.toml");
    std::fs::write(&bad, running.replace("rate = 50", "rate = 0")).unwrap();
    let (code, err) = d
        .cli_fails(&["apply", "-f", bad.to_str().unwrap()])
        .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("service[web].new_flow_limit.rate: 0"), "{err}");
    assert_eq!(std::fs::read_to_string(&d.config).unwrap(), running);

    // The limit's prefix changed: the sampled prefixes, masked with the
    // old one, are forgotten rather than shown with the new length.
    let wider = d.dir.join("wider.toml");
    std::fs::write(
        &wider,
        running.replace("burst = 50 }", "burst = 50, prefix = 24 }"),
    )
    .unwrap();
    d.cli(&["apply", "-f", wider.to_str().unwrap()]).unwrap();
    let sources = stats(&d).1;
    assert_eq!(sources.as_array().map(Vec::len), Some(0), "{sources}");

    // Without a limit, a flood is not limited at all.
    let unlimited = d.dir.join("unlimited.toml");
    std::fs::write(&unlimited, running.replace(LIMIT, "")).unwrap();
    d.cli(&["apply", "-f", unlimited.to_str().unwrap()])
        .unwrap();
    let before = stats(&d).0["limited"].as_u64().unwrap();
    lan.client
        .run(|| flood(vip, Duration::from_millis(500)))
        .unwrap();
    assert_eq!(stats(&d).0["limited"].as_u64().unwrap(), before);

    // The service removed and added again, under its old id: it starts
    // from nothing, not with its predecessor's drops and sampled sources.
    let none = d.dir.join("none.toml");
    let settings = running.split("[[service]]").next().unwrap().to_string();
    std::fs::write(&none, settings).unwrap();
    d.cli(&["apply", "-f", none.to_str().unwrap()]).unwrap();
    // Counts nobody released on the free id, as a crash between a removal
    // and its release leaves them: its next holder starts from zero too.
    leave_counts_on(&d, 0);
    d.cli(&["apply", "-f", unlimited.to_str().unwrap()])
        .unwrap();
    let (row, sources) = stats(&d);
    assert_eq!(row["limited"].as_u64(), Some(0), "{row}");
    assert_eq!(row["denied"].as_u64(), Some(0), "{row}");
    assert_eq!(row["drops"].as_u64(), Some(0), "{row}");
    assert_eq!(sources.as_array().map(Vec::len), Some(0), "{sources}");
    drop(d);
}
