//! Real traffic through the attached program: a client, the load balancer and
//! two backends in namespaces on one bridge; TCP and UDP servers that answer
//! with their name; `dsr-l2` and `ipip` services in both families.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use lb::{
    dataplane::{DecapTables, Decapsulator, Repair},
    demo::server::{NameServer, http_get, udp_request},
    netns::{self, Netns},
};
use lb_common::{
    Counter, SERVICE_F_GUE, SERVICE_F_IPIP,
    counters::DecapCounter,
    limits::DEFAULT_GUE_PORT,
    wire::{IPPROTO_TCP, IPPROTO_UDP},
};
use lb_tests::{
    lab::{self, Lab, service_key},
    lan::{Host, LB_V4, Lan},
    require_root,
};

const RING: u32 = 251;

const VIP_DSR4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const VIP_IPIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const VIP_DSR6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 1);
const VIP_IPIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 2);
const VIP_GUE4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 5);
const VIP_GUE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 5);
const HOST_PORT: u16 = 2222;

/// The decapsulator of backend `b`, attached to its `eth0`, accepting the
/// lab's tunnel sources and inner packets to `vips`.
fn decapsulator(b: &Host, vips: &[IpAddr]) -> Result<Decapsulator> {
    let mut decap = Decapsulator::load()?;
    decap.set_tables(&DecapTables {
        endpoints: [IpAddr::V4(b.v4), IpAddr::V6(b.v6)].into(),
        sources: lab::tunnel_sources(),
        vips: vips.iter().copied().collect(),
        gue_port: DEFAULT_GUE_PORT,
    })?;
    b.ns.run(|| decap.attach("eth0", XdpMode::Skb, None))?;
    Ok(decap)
}

/// A client request: sends to an address, returns the answering server's name.
type Request = fn(SocketAddr) -> Result<String>;

/// Sends `n` requests from `client` and tallies the answering backends.
fn spread(
    client: &Netns,
    n: usize,
    to: SocketAddr,
    request: Request,
) -> Result<BTreeMap<String, usize>> {
    client.run(|| {
        let mut tally = BTreeMap::new();
        for _ in 0..n {
            *tally.entry(request(to)?).or_insert(0) += 1;
        }
        Ok(tally)
    })
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn only_frames_sent_to_the_lbs_current_mac_are_forwarded() {
    require_root();
    run_flooded().unwrap();
}

/// The client sends to the VIP through a next hop that is not there (a
/// permanent neighbour entry with a MAC no port has): the bridge floods
/// those frames to every port, the load balancer's included. They are not
/// the load balancer's: it must neither answer them through a backend nor
/// send them out under the other host's MAC (which would teach the switch
/// that MAC is on its port). Then the load balancer's interface changes
/// its MAC: once the data plane has repaired itself, frames to the new MAC
/// are served.
fn run_flooded() -> Result<()> {
    const GHOST_V4: &str = "198.18.0.3";
    const GHOST_MAC: &str = "02:00:00:00:00:77";
    let lan = Lan::build(1, &["198.18.1.1/32"])?;
    let mut lab = Lab::new(RING)?;
    let b = &lan.backends[0];
    lab.backend_at(0, IpAddr::V4(b.v4), b.mac, true, 1)?;
    lab.service(
        0,
        service_key(IpAddr::V4(VIP_DSR4), 80, IPPROTO_UDP),
        0,
        &[(0, 1)],
    )?;
    lan.lb
        .run(|| lab.dp.attach("eth0", 1, XdpMode::Skb, None))?;
    let _servers = lan.serve_names(80)?;
    let vip = SocketAddr::new(IpAddr::V4(VIP_DSR4), 80);

    // Through the load balancer's own MAC, the service answers.
    let through_lb = spread(&lan.client, 2, vip, udp_request)?;
    assert_eq!(through_lb.get("backend-1"), Some(&2), "{through_lb:?}");
    let forwarded = |lab: &Lab| -> Result<u64> {
        let c: BTreeMap<_, _> = lab.dp.counters()?.into_iter().collect();
        Ok(c[&Counter::ForwardDsr])
    };
    let (fwd_before, foreign_before) = (forwarded(&lab)?, lab.counter(Counter::PassForeignMac)?);

    // Through the ghost, nothing answers.
    lan.client.ip(&[
        "neigh",
        "add",
        GHOST_V4,
        "lladdr",
        GHOST_MAC,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    lan.client
        .ip(&["route", "add", "198.18.1.1/32", "via", GHOST_V4])?;
    const FLOODED: usize = 2;
    for _ in 0..FLOODED {
        let answer = lan.client.run(|| udp_request(vip));
        assert!(
            answer.is_err(),
            "a frame for another host was answered: {answer:?}"
        );
    }
    assert_eq!(
        forwarded(&lab)?,
        fwd_before,
        "flooded frames were forwarded"
    );
    assert!(
        lab.counter(Counter::PassForeignMac)? >= foreign_before + FLOODED as u64,
        "flooded frames are counted as passed"
    );
    let (switch, port) = lan.lb_port();
    let fdb = std::process::Command::new("bridge")
        .args(["-n", &switch.name, "fdb", "show", "dev", port])
        .output()?;
    let fdb = String::from_utf8_lossy(&fdb.stdout);
    assert!(
        !fdb.contains(GHOST_MAC),
        "the switch learned the other host's MAC on the load balancer's port:\n{fdb}"
    );

    // A new MAC on the load balancer's interface, which the client learns
    // by ARP again.
    lan.client.ip(&["route", "del", "198.18.1.1/32"])?;
    const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
    lan.lb.ip(&[
        "link",
        "set",
        "eth0",
        "address",
        &netns::mac_string(&NEW_MAC),
    ])?;
    lan.client.ip(&["neigh", "flush", "dev", "eth0"])?;
    let repairs = lan.lb.run(|| lab.dp.repair(None))?;
    assert!(
        repairs
            .iter()
            .any(|r| matches!(r, Repair::InterfaceChanged(_, i) if i.mac == NEW_MAC)),
        "the new MAC is noticed: {repairs:?}"
    );
    let after = spread(&lan.client, 2, vip, udp_request)?;
    assert_eq!(
        after.get("backend-1"),
        Some(&2),
        "after the new MAC: {after:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn full_size_uploads_through_a_tunnel_find_the_path_mtu() {
    require_root();
    run_uploads().unwrap();
}

/// Bytes each upload sends.
const UPLOAD: usize = 10 << 20;
/// How long an upload may take: a stalled path MTU discovery takes longer.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Every host's link is 1500 bytes, so the client's full-size segments do
/// not fit in the load balancer's `ipip` or `gue` tunnels: 10 MB uploads in
/// both families and both tunnels finish only if the client learns each
/// tunnel's MTU from the load balancer's ICMP errors.
fn run_uploads() -> Result<()> {
    let lan = Lan::build(
        1,
        &[
            "198.18.1.2/32",
            "2001:2:1::2/128",
            "198.18.1.5/32",
            "2001:2:1::5/128",
        ],
    )?;
    let b = &lan.backends[0];
    let mut lab = Lab::new(RING)?;
    lab.backend_at(0, IpAddr::V4(b.v4), b.mac, true, 1)?;
    lab.backend_at(1, IpAddr::V6(b.v6), b.mac, true, 1)?;
    let vips = [
        (IpAddr::V4(VIP_IPIP4), SERVICE_F_IPIP),
        (IpAddr::V6(VIP_IPIP6), SERVICE_F_IPIP),
        (IpAddr::V4(VIP_GUE4), SERVICE_F_GUE),
        (IpAddr::V6(VIP_GUE6), SERVICE_F_GUE),
    ];
    for (id, (vip, flags)) in vips.iter().enumerate() {
        let backend = if vip.is_ipv4() { 0 } else { 1 };
        lab.service(
            id as u32,
            service_key(*vip, SINK_PORT, IPPROTO_TCP),
            *flags,
            &[(backend, 1)],
        )?;
    }
    lan.lb
        .run(|| lab.dp.attach("eth0", 1, XdpMode::Skb, None))?;
    // Held: its links detach when it drops.
    let _decap = decapsulator(b, &vips.map(|(vip, _)| vip))?;
    let sink = b.ns.run(|| Ok(std::net::TcpListener::bind("[::]:9000")?))?;
    const UPLOADS: usize = 4;
    // Counts what each connection sends and answers with the count.
    let server = std::thread::spawn(move || {
        for mut conn in sink.incoming().take(UPLOADS).flatten() {
            let mut n = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(k @ 1..) = conn.read(&mut buf) {
                n += k as u64;
            }
            let _ = conn.write_all(n.to_string().as_bytes());
        }
    });
    for (vip, _) in vips {
        let to = SocketAddr::new(vip, SINK_PORT);
        let received = lan.client.run(move || {
            let mut c = TcpStream::connect_timeout(&to, UPLOAD_TIMEOUT)?;
            c.set_write_timeout(Some(UPLOAD_TIMEOUT))?;
            c.set_read_timeout(Some(UPLOAD_TIMEOUT))?;
            c.write_all(&vec![0x5a; UPLOAD])
                .with_context(|| format!("uploading to {to}"))?;
            c.shutdown(Shutdown::Write)?;
            let mut answer = String::new();
            c.read_to_string(&mut answer)?;
            Ok(answer)
        })?;
        assert_eq!(received, UPLOAD.to_string(), "bytes {vip} received");
    }
    server.join().expect("the sink thread");
    let replies = lab.counter(Counter::ReplyTooBig)?;
    assert!(replies >= 4, "the clients were told the MTU: {replies}");
    assert!(lab.counter(Counter::ForwardGue)? > 0);
    Ok(())
}

/// The upload sink's port on the backend.
const SINK_PORT: u16 = 9000;

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn real_tcp_and_udp_reach_backends_in_both_modes_and_host_traffic_still_flows() {
    require_root();
    run_topology().unwrap();
}

fn run_topology() -> Result<()> {
    let lan = Lan::build(
        2,
        &[
            "198.18.1.1/32",
            "198.18.1.2/32",
            "2001:2:1::1/128",
            "2001:2:1::2/128",
        ],
    )?;
    let (client, lb, backends) = (&lan.client, &lan.lb, &lan.backends);

    // The load balancer: both modes, both families, TCP and UDP.
    let mut lab = Lab::new(RING)?;
    let services = [
        (IpAddr::V4(VIP_DSR4), IPPROTO_TCP, 0),
        (IpAddr::V4(VIP_DSR4), IPPROTO_UDP, 0),
        (IpAddr::V6(VIP_DSR6), IPPROTO_TCP, 0),
        (IpAddr::V4(VIP_IPIP4), IPPROTO_TCP, SERVICE_F_IPIP),
        (IpAddr::V6(VIP_IPIP6), IPPROTO_TCP, SERVICE_F_IPIP),
    ];
    let mut next_id = 0;
    for (svc, (vip, proto, flags)) in services.iter().enumerate() {
        let mut members = Vec::new();
        for b in backends {
            let addr = if vip.is_ipv4() {
                IpAddr::V4(b.v4)
            } else {
                IpAddr::V6(b.v6)
            };
            lab.backend_at(next_id, addr, b.mac, true, 1)?;
            members.push((next_id, 1));
            next_id += 1;
        }
        lab.service(svc as u32, service_key(*vip, 80, *proto), *flags, &members)?;
    }
    lb.run(|| {
        lab.dp.attach("eth0", 1, XdpMode::Skb, None)?;
        Ok(())
    })?;

    // Backends of ipip services decapsulate with the decap program.
    let mut decaps = Vec::new();
    for b in backends {
        decaps.push(decapsulator(
            b,
            &[IpAddr::V4(VIP_IPIP4), IpAddr::V6(VIP_IPIP6)],
        )?);
    }

    let _servers = lan.serve_names(80)?;
    let _host_service = NameServer::start(lb, "lb-host", HOST_PORT)?;

    let cases: [(&str, SocketAddr, Request); 5] = [
        (
            "dsr-l2 IPv4 TCP",
            SocketAddr::new(IpAddr::V4(VIP_DSR4), 80),
            http_get,
        ),
        (
            "dsr-l2 IPv4 UDP",
            SocketAddr::new(IpAddr::V4(VIP_DSR4), 80),
            udp_request,
        ),
        (
            "dsr-l2 IPv6 TCP",
            SocketAddr::new(IpAddr::V6(VIP_DSR6), 80),
            http_get,
        ),
        (
            "ipip IPv4 TCP",
            SocketAddr::new(IpAddr::V4(VIP_IPIP4), 80),
            http_get,
        ),
        (
            "ipip IPv6 TCP",
            SocketAddr::new(IpAddr::V6(VIP_IPIP6), 80),
            http_get,
        ),
    ];
    const REQUESTS: usize = 40;
    for (what, to, request) in cases {
        let tally = spread(client, REQUESTS, to, request).with_context(|| what.to_string())?;
        eprintln!("{what}: {tally:?}");
        if tally.len() != backends.len() {
            bail!("{what}: {REQUESTS} requests reached only {tally:?}");
        }
    }

    // The load balancer's own service is untouched by the program.
    let host = spread(
        client,
        3,
        SocketAddr::new(IpAddr::V4(LB_V4), HOST_PORT),
        http_get,
    )?;
    assert_eq!(host.get("lb-host"), Some(&3), "host traffic: {host:?}");

    let counters: BTreeMap<_, _> = lab.dp.counters()?.into_iter().collect();
    eprintln!(
        "lb counters: {:?}",
        counters
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(c, v)| (c.name(), *v))
            .collect::<Vec<_>>()
    );
    assert!(counters[&Counter::ForwardDsr] >= 3 * REQUESTS as u64);
    assert!(counters[&Counter::ForwardIpip] >= 2 * REQUESTS as u64);
    assert!(
        counters[&Counter::PassNotService] > 0,
        "host traffic was seen and passed"
    );
    for d in &decaps {
        assert!(d.counters()?[DecapCounter::Decapsulated as usize] > 0);
    }
    Ok(())
}
