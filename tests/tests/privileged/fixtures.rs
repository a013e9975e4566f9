//! Packet fixtures: each case is a frame built by the packet builder, the
//! verdict and counter it must produce, and checks on the output bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb::dataplane::{DecapTables, Decapsulator, ServiceStats, SourceList};
use lb_common::{
    ConntrackSettings, Counter, FAMILY_V4, FAMILY_V6, FlowKey, SERVICE_F_AFFINITY,
    SERVICE_F_ALLOW_LIST, SERVICE_F_DENY_LIST, SERVICE_F_ECHO, SERVICE_F_GUE, SERVICE_F_IPIP,
    SERVICE_F_SOURCE_LIMIT, ServiceKey, SourceLimit, addr_bytes,
    counters::DecapCounter,
    hash::{flow_hash, maglev_slot},
    limits::{
        DEFAULT_GUE_PORT, ECHO_REPLIES_PER_CPU, GUE_SOURCE_PORT_BASE, GUE_SOURCE_PORT_MASK,
        ICMP_ERRORS_PER_CPU,
    },
    maps::PROG_LB,
    wire::*,
};
use lb_tests::{
    lab::{self, DROP, LB_MAC, Lab, PASS, REDIRECT, ROUTER_MAC, TX, backend_of_mac, service_key},
    packet::{self, Ipv4},
    require_root,
};

/// A small prime keeps publishing fast; the agreement test uses the default.
const RING: u32 = 251;

const CLIENT4: [u8; 4] = [198, 18, 2, 7];
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 2, 0, 0, 0, 0, 7);
const VIP4_DSR: [u8; 4] = [198, 18, 1, 1];
const VIP4_IPIP: [u8; 4] = [198, 18, 1, 2];
const VIP4_EMPTY: [u8; 4] = [198, 18, 1, 3];
const VIP4_AFFINITY: [u8; 4] = [198, 18, 1, 4];
const VIP6_DSR: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 1);
const VIP6_IPIP: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 2);
const VIP4_GUE: [u8; 4] = [198, 18, 1, 5];
const VIP6_GUE: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 5);
const HTTP: u16 = 80;
const DNS: u16 = 53;

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn b4(last: u8) -> IpAddr {
    v4([198, 18, 0, last])
}

fn b6(last: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, last))
}

/// The lab every fixture uses: services in both families and modes.
struct Fixture {
    lab: Lab,
    rings: Vec<Vec<u32>>,
    /// Each service as published, by id.
    services: Vec<FixtureService>,
}

/// A fixture service's key, flags and (backend, weight) members.
type FixtureService = (ServiceKey, u32, [(u32, u32); 2]);

/// Service ids, in the order `fixture()` creates them.
const SVC_TCP4: usize = 0;
const SVC_UDP4: usize = 1;
const SVC_TCP6: usize = 2;
const SVC_IPIP4: usize = 3;
const SVC_IPIP6: usize = 4;
const SVC_AFFINITY: usize = 6;
const SVC_GUE4: usize = 7;
const SVC_GUE6: usize = 8;

fn fixture() -> Fixture {
    let mut lab = Lab::new(RING).expect("load the data plane");
    // Backend ids: two per service.
    let backends: [(u32, IpAddr); 16] = [
        (1, b4(11)),
        (2, b4(12)),
        (3, b4(11)),
        (4, b4(12)),
        (5, b6(0x11)),
        (6, b6(0x12)),
        (7, b4(21)),
        (8, b4(22)),
        (9, b6(0x21)),
        (10, b6(0x22)),
        (11, b4(31)),
        (12, b4(32)),
        (13, b4(41)),
        (14, b4(42)),
        (15, b6(0x41)),
        (16, b6(0x42)),
    ];
    for (id, ip) in backends {
        lab.backend(id, ip, true, 1).expect("backend");
    }
    let services = [
        (
            service_key(v4(VIP4_DSR), HTTP, IPPROTO_TCP),
            0,
            [(1, 1), (2, 1)],
        ),
        (
            service_key(v4(VIP4_DSR), DNS, IPPROTO_UDP),
            0,
            [(3, 1), (4, 1)],
        ),
        (
            service_key(IpAddr::V6(VIP6_DSR), HTTP, IPPROTO_TCP),
            0,
            [(5, 1), (6, 1)],
        ),
        (
            service_key(v4(VIP4_IPIP), HTTP, IPPROTO_TCP),
            SERVICE_F_IPIP,
            [(7, 1), (8, 1)],
        ),
        (
            service_key(IpAddr::V6(VIP6_IPIP), HTTP, IPPROTO_TCP),
            SERVICE_F_IPIP,
            [(9, 1), (10, 1)],
        ),
        (
            service_key(v4(VIP4_EMPTY), HTTP, IPPROTO_TCP),
            0,
            [(11, 0), (12, 0)],
        ),
        (
            service_key(v4(VIP4_AFFINITY), HTTP, IPPROTO_TCP),
            SERVICE_F_AFFINITY,
            [(11, 1), (12, 1)],
        ),
        (
            service_key(v4(VIP4_GUE), HTTP, IPPROTO_TCP),
            SERVICE_F_GUE,
            [(13, 1), (14, 1)],
        ),
        (
            service_key(IpAddr::V6(VIP6_GUE), HTTP, IPPROTO_TCP),
            SERVICE_F_GUE,
            [(15, 1), (16, 1)],
        ),
    ];
    let rings = services
        .iter()
        .enumerate()
        .map(|(id, (key, flags, members))| {
            lab.service(id as u32, *key, *flags, members)
                .expect("service")
        })
        .collect();
    Fixture {
        lab,
        rings,
        services: services.to_vec(),
    }
}

impl Fixture {
    /// Sets the data plane's clock to second `now` (a new second brings
    /// new ICMP budgets).
    fn set_clock(&mut self, now: u32) {
        self.lab
            .dp
            .set_conntrack_settings(ConntrackSettings {
                now,
                ..ConntrackSettings::default()
            })
            .unwrap();
    }

    /// Runs one described case: asserts the action, that exactly `counter`
    /// moved (by one) among the global counters, and returns the output.
    fn case(&mut self, what: &str, frame: &[u8], action: u32, counter: Counter) -> Vec<u8> {
        self.cases(what, frame, 1, action, counter)
    }

    /// [`Fixture::case`] run `repeat` times in one BPF_PROG_TEST_RUN: for
    /// frames the program passes or drops (untouched), so every run sees
    /// the same packet; `counter` moves by `repeat`.
    fn cases(
        &mut self,
        what: &str,
        frame: &[u8],
        repeat: u32,
        action: u32,
        counter: Counter,
    ) -> Vec<u8> {
        let before = self.lab.dp.counters().expect("counters");
        let prog = self.lab.dp.program(PROG_LB).expect("program");
        let v = lab::test_run_repeated(prog, frame, repeat).expect("test run");
        let after = self.lab.dp.counters().expect("counters");
        assert_eq!(v.action, action, "{what}: action");
        for ((c, b), (_, a)) in before.iter().zip(&after) {
            let want = if *c == counter {
                b + u64::from(repeat)
            } else {
                *b
            };
            assert_eq!(*a, want, "{what}: counter {}", c.name());
        }
        if action == PASS || action == DROP {
            assert_eq!(
                v.out, frame,
                "{what}: a passed or dropped frame is not modified"
            );
        }
        v.out
    }

    /// Counters of service `svc`, with its members'.
    fn service_stats(&self, svc: usize) -> ServiceStats {
        let members = self.services[svc].2.map(|(id, _)| id);
        self.lab.dp.service_stats(svc as u32, &members).unwrap()
    }

    /// Publishes service `svc` again with `flags` besides its own.
    fn republish(&mut self, svc: usize, flags: u32) {
        let (key, own, members) = self.services[svc];
        self.lab
            .service(svc as u32, key, own | flags, &members)
            .unwrap();
    }

    /// The backend user space computes for a flow of service `svc`.
    fn expected(&self, svc: usize, flow: &FlowKey, affinity: bool) -> u32 {
        let ring = &self.rings[svc];
        ring[maglev_slot(flow_hash(flow, affinity), ring.len() as u32) as usize]
    }
}

fn flow(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    let (s, family) = addr_bytes(src);
    let (d, _) = addr_bytes(dst);
    FlowKey {
        src: s,
        dst: d,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, vlans: &[u16]) -> Vec<u8> {
    let seg = packet::tcp(v4(src), v4(dst), sport, dport, flags, b"hello");
    let ip = Ipv4::new(src, dst, IPPROTO_TCP).build(&seg);
    packet::ethernet(LB_MAC, ROUTER_MAC, vlans, ETH_P_IP, &ip)
}

fn tcp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, flags: u8, vlans: &[u16]) -> Vec<u8> {
    let seg = packet::tcp(
        IpAddr::V6(src),
        IpAddr::V6(dst),
        sport,
        dport,
        flags,
        b"hello",
    );
    let ip = packet::ipv6(src.octets(), dst.octets(), IPPROTO_TCP, &[], &seg);
    packet::ethernet(LB_MAC, ROUTER_MAC, vlans, ETH_P_IPV6, &ip)
}

/// Checks a `dsr-l2` output: MACs rewritten, everything else identical.
fn assert_dsr(what: &str, input: &[u8], out: &[u8], backend: u32) {
    assert_eq!(out.len(), input.len(), "{what}: length");
    assert_eq!(
        &out[0..6],
        &lab::backend_mac(backend),
        "{what}: destination MAC"
    );
    assert_eq!(&out[6..12], &LB_MAC, "{what}: source MAC is the LB's");
    assert_eq!(
        &out[12..],
        &input[12..],
        "{what}: rest of the frame untouched"
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn non_service_traffic_passes_untouched() {
    require_root();
    let mut f = fixture();
    let arp = packet::ethernet([0xff; 6], ROUTER_MAC, &[], ETH_P_ARP, &[0u8; 28]);
    f.case("ARP", &arp, PASS, Counter::PassNotIp);
    let other = tcp4(CLIENT4, [198, 18, 0, 2], 40000, 22, TCP_SYN, &[]);
    f.case(
        "TCP to the host's own address (SSH)",
        &other,
        PASS,
        Counter::PassNotService,
    );
    let port = tcp4(CLIENT4, VIP4_DSR, 40000, 443, TCP_SYN, &[]);
    f.case(
        "TCP to a VIP on an unconfigured port",
        &port,
        PASS,
        Counter::PassNotService,
    );
    let seg = packet::udp(v4(CLIENT4), v4(VIP4_DSR), 40000, HTTP, b"x");
    let udp = packet::ethernet(
        LB_MAC,
        ROUTER_MAC,
        &[],
        ETH_P_IP,
        &Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_UDP).build(&seg),
    );
    f.case(
        "UDP to a VIP port configured for TCP only",
        &udp,
        PASS,
        Counter::PassNotService,
    );
    let echo = Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_ICMP).build(&packet::icmp4_echo());
    f.case(
        "ICMP echo to a VIP",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &echo),
        PASS,
        Counter::PassOtherProtocol,
    );
    let inner = Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_TCP).build(&packet::tcp(
        v4(CLIENT4),
        v4(VIP4_DSR),
        1,
        HTTP,
        TCP_SYN,
        b"",
    ));
    let tunnel = Ipv4::new([198, 18, 0, 99], VIP4_DSR, IPPROTO_IPIP).build(&inner);
    f.case(
        "an IPIP tunnel packet",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &tunnel),
        PASS,
        Counter::PassOtherProtocol,
    );
    let gre = Ipv4::new([198, 18, 0, 99], VIP4_DSR, IPPROTO_GRE).build(&[0u8; 8]);
    f.case(
        "a GRE packet to a VIP",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &gre),
        PASS,
        Counter::PassOtherProtocol,
    );
    // To the host: passed at the VIP filter, before its protocol is read.
    let gre = Ipv4::new([198, 18, 0, 99], [198, 18, 0, 2], IPPROTO_GRE).build(&[0u8; 8]);
    f.case(
        "a GRE packet to the host",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &gre),
        PASS,
        Counter::PassNotService,
    );
    let other6 = tcp6(
        CLIENT6,
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2),
        40000,
        22,
        TCP_SYN,
        &[],
    );
    f.case(
        "IPv6 TCP to the host",
        &other6,
        PASS,
        Counter::PassNotService,
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn dsr_forwards_ipv4_ipv6_vlan_and_options_to_the_hashed_backend() {
    require_root();
    let mut f = fixture();
    let cases: [(&str, Vec<u8>, FlowKey, usize); 6] = [
        (
            "IPv4 TCP SYN",
            tcp4(CLIENT4, VIP4_DSR, 40001, HTTP, TCP_SYN, &[]),
            flow(v4(CLIENT4), v4(VIP4_DSR), 40001, HTTP, IPPROTO_TCP),
            SVC_TCP4,
        ),
        (
            "IPv4 TCP behind one 802.1Q tag",
            tcp4(CLIENT4, VIP4_DSR, 40002, HTTP, TCP_SYN, &[100]),
            flow(v4(CLIENT4), v4(VIP4_DSR), 40002, HTTP, IPPROTO_TCP),
            SVC_TCP4,
        ),
        (
            "IPv6 TCP behind 802.1ad + 802.1Q (QinQ)",
            tcp6(CLIENT6, VIP6_DSR, 40003, HTTP, TCP_SYN, &[200, 100]),
            flow(
                IpAddr::V6(CLIENT6),
                IpAddr::V6(VIP6_DSR),
                40003,
                HTTP,
                IPPROTO_TCP,
            ),
            SVC_TCP6,
        ),
        (
            "IPv6 TCP",
            tcp6(CLIENT6, VIP6_DSR, 40004, HTTP, TCP_SYN | TCP_ACK, &[]),
            flow(
                IpAddr::V6(CLIENT6),
                IpAddr::V6(VIP6_DSR),
                40004,
                HTTP,
                IPPROTO_TCP,
            ),
            SVC_TCP6,
        ),
        (
            "IPv4 UDP",
            packet::ethernet(
                LB_MAC,
                ROUTER_MAC,
                &[],
                ETH_P_IP,
                &Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_UDP).build(&packet::udp(
                    v4(CLIENT4),
                    v4(VIP4_DSR),
                    5353,
                    DNS,
                    b"query",
                )),
            ),
            flow(v4(CLIENT4), v4(VIP4_DSR), 5353, DNS, IPPROTO_UDP),
            SVC_UDP4,
        ),
        (
            "IPv4 with 12 bytes of options (IHL 8)",
            {
                let mut ip = Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_TCP);
                ip.options = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
                let seg = packet::tcp(v4(CLIENT4), v4(VIP4_DSR), 40005, HTTP, TCP_SYN, b"hi");
                packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &ip.build(&seg))
            },
            flow(v4(CLIENT4), v4(VIP4_DSR), 40005, HTTP, IPPROTO_TCP),
            SVC_TCP4,
        ),
    ];
    for (what, frame, key, svc) in cases {
        let want = f.expected(svc, &key, false);
        let stats_before = f.service_stats(svc);
        let backend_before = f.lab.dp.backend_stats(want).expect("stats");
        let out = f.case(what, &frame, TX, Counter::ForwardDsr);
        assert_dsr(what, &frame, &out, want);
        let stats = f.service_stats(svc);
        assert_eq!(
            stats.packets,
            stats_before.packets + 1,
            "{what}: service packets"
        );
        assert_eq!(
            stats.bytes,
            stats_before.bytes + frame.len() as u64,
            "{what}: service bytes"
        );
        assert_eq!(
            stats.new_flows,
            stats_before.new_flows + 1,
            "{what}: new flow"
        );
        let b = f.lab.dp.backend_stats(want).expect("stats");
        assert_eq!(
            b.packets(),
            backend_before.packets() + 1,
            "{what}: backend packets"
        );
    }

    // IPv6 with hop-by-hop and destination-options headers before TCP.
    let seg = packet::tcp(
        IpAddr::V6(CLIENT6),
        IpAddr::V6(VIP6_DSR),
        40006,
        HTTP,
        TCP_SYN,
        b"",
    );
    let ext = [
        packet::ipv6_opts_header(IPPROTO_DSTOPTS),
        packet::ipv6_opts_header(IPPROTO_TCP),
    ]
    .concat();
    let ip = packet::ipv6(
        CLIENT6.octets(),
        VIP6_DSR.octets(),
        IPPROTO_HOPOPTS,
        &ext,
        &seg,
    );
    let frame = packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &ip);
    let key = flow(
        IpAddr::V6(CLIENT6),
        IpAddr::V6(VIP6_DSR),
        40006,
        HTTP,
        IPPROTO_TCP,
    );
    let out = f.case(
        "IPv6 with two extension headers",
        &frame,
        TX,
        Counter::ForwardDsr,
    );
    assert_dsr("IPv6 ext", &frame, &out, f.expected(SVC_TCP6, &key, false));

    // An atomic IPv6 fragment (offset 0, no more fragments) is a whole packet.
    let ext = packet::ipv6_fragment_header(IPPROTO_TCP, 0, false);
    let ip = packet::ipv6(
        CLIENT6.octets(),
        VIP6_DSR.octets(),
        IPPROTO_FRAGMENT,
        &ext,
        &seg,
    );
    let frame = packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &ip);
    let out = f.case("IPv6 atomic fragment", &frame, TX, Counter::ForwardDsr);
    assert_dsr(
        "IPv6 atomic fragment",
        &frame,
        &out,
        f.expected(SVC_TCP6, &key, false),
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn client_affinity_hashes_the_client_address_only() {
    require_root();
    let mut f = fixture();
    let mut seen = std::collections::BTreeSet::new();
    for port in 40000..40064u16 {
        let frame = tcp4(CLIENT4, VIP4_AFFINITY, port, HTTP, TCP_SYN, &[]);
        let out = f.case("affinity SYN", &frame, TX, Counter::ForwardDsr);
        seen.insert(backend_of_mac(&out[0..6]));
    }
    assert_eq!(seen.len(), 1, "one client, one backend: {seen:?}");
    let key = flow(v4(CLIENT4), v4(VIP4_AFFINITY), 1, HTTP, IPPROTO_TCP);
    assert_eq!(
        seen.into_iter().next(),
        Some(f.expected(SVC_AFFINITY, &key, true))
    );
}

/// Checks an `ipip` output: outer header toward the backend, inner packet intact.
/// Which tunnel a fixture expects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tunnel {
    Ipip,
    Gue,
}

/// Asserts that `out` is `input`'s IP packet in `tunnel` toward `backend`
/// (id `backend_id`), the link-layer header readdressed and kept.
fn assert_tunnelled(
    what: &str,
    tunnel: Tunnel,
    input: &[u8],
    out: &[u8],
    l3: usize,
    backend: IpAddr,
    backend_id: u32,
) {
    assert_tunnelled_from(what, tunnel, input, out, l3, backend, backend_id, LB_MAC);
}

/// [`assert_tunnelled`], sent from `from` (the interface it leaves by).
#[expect(
    clippy::too_many_arguments,
    reason = "one assertion's expected values, each named"
)]
fn assert_tunnelled_from(
    what: &str,
    tunnel: Tunnel,
    input: &[u8],
    out: &[u8],
    l3: usize,
    backend: IpAddr,
    backend_id: u32,
    from: packet::Mac,
) {
    let udp = if tunnel == Tunnel::Gue { UDP_HLEN } else { 0 };
    assert_eq!(
        &out[0..6],
        &lab::backend_mac(backend_id),
        "{what}: next-hop MAC"
    );
    assert_eq!(out[6..12], from, "{what}: source MAC");
    assert_eq!(
        &out[12..l3],
        &input[12..l3],
        "{what}: VLAN tags and EtherType kept"
    );
    match backend {
        IpAddr::V4(b) => {
            let outer = &out[l3..l3 + IPV4_HLEN];
            assert_eq!(outer[0], 0x45, "{what}: version/IHL");
            let inner_len = input.len() - l3;
            assert_eq!(
                u16::from_be_bytes([outer[2], outer[3]]) as usize,
                inner_len + IPV4_HLEN + udp,
                "{what}: total length"
            );
            assert_eq!(outer[8], DEFAULT_TTL, "{what}: TTL");
            let proto = match tunnel {
                Tunnel::Ipip => IPPROTO_IPIP,
                Tunnel::Gue => IPPROTO_UDP,
            };
            assert_eq!(outer[9], proto, "{what}: protocol");
            assert_eq!(outer[1], input[l3 + 1], "{what}: TOS copied");
            let inner_flags = u16::from_be_bytes([input[l3 + 6], input[l3 + 7]]);
            let flags = u16::from_be_bytes([outer[6], outer[7]]);
            assert_eq!(
                flags,
                inner_flags & IPV4_DF,
                "{what}: DF copied, no fragment"
            );
            let id = u16::from_be_bytes([outer[4], outer[5]]);
            if flags & IPV4_DF == 0 {
                assert_ne!(id, 0, "{what}: an id where fragmenting is allowed");
            }
            assert!(packet::ipv4_header_valid(outer), "{what}: header checksum");
            assert_eq!(
                &outer[12..15],
                &lab::TUNNEL_SRC_V4[..3],
                "{what}: source prefix"
            );
            assert_eq!(
                &outer[16..20],
                &b.octets(),
                "{what}: destination is the backend"
            );
            if tunnel == Tunnel::Gue {
                // The source's host bits and the UDP source port's low bits
                // are both the flow's hash.
                let host = u16::from(outer[15]);
                assert_gue_udp(what, &out[l3 + IPV4_HLEN..], inner_len, host, 0xff);
            }
            assert_eq!(
                &out[l3 + IPV4_HLEN + udp..],
                &input[l3..],
                "{what}: inner packet intact"
            );
        }
        IpAddr::V6(b) => {
            let outer = &out[l3..l3 + IPV6_HLEN];
            assert_eq!(outer[0] >> 4, 6, "{what}: version");
            let class = |h: &[u8]| (h[0] << 4) | (h[1] >> 4);
            assert_eq!(
                class(outer),
                class(&input[l3..]),
                "{what}: traffic class copied, ECN with it"
            );
            let inner_len = input.len() - l3;
            assert_eq!(
                u16::from_be_bytes([outer[4], outer[5]]) as usize,
                inner_len + udp,
                "{what}: payload length"
            );
            let next = match tunnel {
                Tunnel::Ipip => IPPROTO_IPV6,
                Tunnel::Gue => IPPROTO_UDP,
            };
            assert_eq!(outer[6], next, "{what}: next header");
            assert_eq!(
                &outer[8..22],
                &lab::TUNNEL_SRC_V6[..14],
                "{what}: source prefix"
            );
            assert_eq!(
                &outer[24..40],
                &b.octets(),
                "{what}: destination is the backend"
            );
            if tunnel == Tunnel::Gue {
                let host = u16::from_be_bytes([outer[22], outer[23]]);
                let mask = GUE_SOURCE_PORT_MASK;
                assert_gue_udp(what, &out[l3 + IPV6_HLEN..], inner_len, host, mask);
            }
            assert_eq!(
                &out[l3 + IPV6_HLEN + udp..],
                &input[l3..],
                "{what}: inner packet intact"
            );
        }
    }
}

/// Asserts the UDP header of a GUE packet around `inner_len` bytes whose
/// outer source's host bits are `host`: the source port from the same hash
/// (compared under `mask`), to the GUE port, no checksum.
fn assert_gue_udp(what: &str, udp: &[u8], inner_len: usize, host: u16, mask: u16) {
    let word = |i: usize| u16::from_be_bytes([udp[i], udp[i + 1]]);
    let sport = word(0);
    assert_eq!(
        sport & !GUE_SOURCE_PORT_MASK,
        GUE_SOURCE_PORT_BASE,
        "{what}: source port in the dynamic range"
    );
    assert_eq!(
        sport & mask,
        host & mask,
        "{what}: source port from the flow hash"
    );
    assert_eq!(word(2), DEFAULT_GUE_PORT, "{what}: destination port");
    assert_eq!(
        usize::from(word(4)),
        inner_len + UDP_HLEN,
        "{what}: UDP length"
    );
    assert_eq!(word(6), 0, "{what}: no UDP checksum");
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn ipip_encapsulates_toward_the_backend_in_both_families() {
    require_root();
    let mut f = fixture();
    let frame = tcp4(CLIENT4, VIP4_IPIP, 41000, HTTP, TCP_SYN, &[]);
    let want = f.expected(
        SVC_IPIP4,
        &flow(v4(CLIENT4), v4(VIP4_IPIP), 41000, HTTP, IPPROTO_TCP),
        false,
    );
    let out = f.case("IPv4-in-IPv4", &frame, TX, Counter::ForwardIpip);
    assert_eq!(out.len(), frame.len() + IPV4_HLEN);
    let addr =
        IpAddr::from(<[u8; 16]>::try_from(&f.lab.dp.backend(want).unwrap().addr[..]).unwrap());
    let addr = match addr {
        IpAddr::V6(a) => IpAddr::V4(Ipv4Addr::new(
            a.octets()[0],
            a.octets()[1],
            a.octets()[2],
            a.octets()[3],
        )),
        v => v,
    };
    assert_tunnelled(
        "IPv4-in-IPv4",
        Tunnel::Ipip,
        &frame,
        &out,
        ETH_HLEN,
        addr,
        want,
    );

    let frame = tcp4(CLIENT4, VIP4_IPIP, 41001, HTTP, TCP_SYN, &[7]);
    let want = f.expected(
        SVC_IPIP4,
        &flow(v4(CLIENT4), v4(VIP4_IPIP), 41001, HTTP, IPPROTO_TCP),
        false,
    );
    let out = f.case(
        "IPv4-in-IPv4 behind a VLAN tag",
        &frame,
        TX,
        Counter::ForwardIpip,
    );
    let b = f.lab.dp.backend(want).unwrap().addr;
    assert_tunnelled(
        "IPv4-in-IPv4 VLAN",
        Tunnel::Ipip,
        &frame,
        &out,
        ETH_HLEN + VLAN_HLEN,
        v4([b[0], b[1], b[2], b[3]]),
        want,
    );

    // Traffic class 0xb9: DSCP EF and ECT(1), for the outer header to copy.
    let mut frame = tcp6(CLIENT6, VIP6_IPIP, 41002, HTTP, TCP_SYN, &[]);
    frame[ETH_HLEN] |= 0x0b;
    frame[ETH_HLEN + 1] |= 0x90;
    let want = f.expected(
        SVC_IPIP6,
        &flow(
            IpAddr::V6(CLIENT6),
            IpAddr::V6(VIP6_IPIP),
            41002,
            HTTP,
            IPPROTO_TCP,
        ),
        false,
    );
    let out = f.case("IPv6-in-IPv6", &frame, TX, Counter::ForwardIpip);
    assert_eq!(out.len(), frame.len() + IPV6_HLEN);
    let b = IpAddr::V6(Ipv6Addr::from(f.lab.dp.backend(want).unwrap().addr));
    assert_tunnelled(
        "IPv6-in-IPv6",
        Tunnel::Ipip,
        &frame,
        &out,
        ETH_HLEN,
        b,
        want,
    );

    // A packet that would exceed the MTU once encapsulated, without DF, is
    // dropped.
    let big = sized(v4(VIP4_IPIP), 41003, 1500, &[], false);
    f.case(
        "1500-byte packet into a 1500 MTU tunnel",
        &big,
        DROP,
        Counter::DropTooBig,
    );

    // DF is copied to the outer header; with DF, the id may be zero.
    let frame = sized(v4(VIP4_IPIP), 41004, 100, &[], true);
    let want = f.expected(
        SVC_IPIP4,
        &flow(v4(CLIENT4), v4(VIP4_IPIP), 41004, HTTP, IPPROTO_TCP),
        false,
    );
    let out = f.case("IPv4-in-IPv4 with DF", &frame, TX, Counter::ForwardIpip);
    let b = f.lab.dp.backend(want).unwrap().addr;
    assert_tunnelled(
        "IPv4-in-IPv4 with DF",
        Tunnel::Ipip,
        &frame,
        &out,
        ETH_HLEN,
        v4([b[0], b[1], b[2], b[3]]),
        want,
    );

    // The MTU is the receiving interface's, or the configured cap where
    // that is lower: a packet that fits 1500 once encapsulated is dropped
    // under either at 1400.
    let fits = sized(v4(VIP4_IPIP), 41005, 1440, &[], false);
    f.case(
        "1440-byte packet, 1500 MTU",
        &fits,
        TX,
        Counter::ForwardIpip,
    );
    f.lab.dp.set_interface(&lab::lab_interface(1400)).unwrap();
    f.case(
        "1440-byte packet, interface MTU 1400",
        &fits,
        DROP,
        Counter::DropTooBig,
    );
    f.lab
        .dp
        .set_interface(&lab::lab_interface(lab::MTU))
        .unwrap();
    let mut capped = lab::lab_settings();
    capped.mtu = 1400;
    f.lab.dp.set_settings(capped).unwrap();
    f.case(
        "1440-byte packet, MTU capped at 1400",
        &fits,
        DROP,
        Counter::DropTooBig,
    );
    capped.mtu = 0;
    f.lab.dp.set_settings(capped).unwrap();
    f.case(
        "1440-byte packet, no cap, interface MTU 1500",
        &fits,
        TX,
        Counter::ForwardIpip,
    );
}

/// The address of backend `id` as the data plane holds it.
fn backend_addr(f: &Fixture, id: u32) -> IpAddr {
    let b = f.lab.dp.backend(id).unwrap();
    lb_common::addr_ip(&b.addr, b.family)
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn gue_encapsulates_in_udp_toward_the_backend_in_both_families() {
    require_root();
    let mut f = fixture();
    for (what, vlans, sport) in [
        ("IPv4 in GUE", &[][..], 42000),
        ("IPv4 in GUE, VLAN", &[7][..], 42001),
    ] {
        let frame = tcp4(CLIENT4, VIP4_GUE, sport, HTTP, TCP_SYN, vlans);
        let want = f.expected(
            SVC_GUE4,
            &flow(v4(CLIENT4), v4(VIP4_GUE), sport, HTTP, IPPROTO_TCP),
            false,
        );
        let out = f.case(what, &frame, TX, Counter::ForwardGue);
        assert_eq!(out.len(), frame.len() + IPV4_HLEN + UDP_HLEN, "{what}");
        let l3 = ETH_HLEN + VLAN_HLEN * vlans.len();
        let b = backend_addr(&f, want);
        assert_tunnelled(what, Tunnel::Gue, &frame, &out, l3, b, want);
    }
    let frame = tcp6(CLIENT6, VIP6_GUE, 42002, HTTP, TCP_SYN, &[]);
    let flow6 = flow(
        IpAddr::V6(CLIENT6),
        IpAddr::V6(VIP6_GUE),
        42002,
        HTTP,
        IPPROTO_TCP,
    );
    let want = f.expected(SVC_GUE6, &flow6, false);
    let out = f.case("IPv6 in GUE", &frame, TX, Counter::ForwardGue);
    assert_eq!(out.len(), frame.len() + IPV6_HLEN + UDP_HLEN);
    let b = backend_addr(&f, want);
    assert_tunnelled("IPv6 in GUE", Tunnel::Gue, &frame, &out, ETH_HLEN, b, want);

    // The UDP header counts against the MTU too: a packet that fits an
    // `ipip` tunnel by 4 bytes does not fit GUE.
    let frame = sized(v4(VIP4_GUE), 42003, 1476, &[], false);
    f.case("1476 bytes, 1500 MTU", &frame, DROP, Counter::DropTooBig);
    let frame = sized(v4(VIP4_GUE), 42004, 1472, &[], false);
    f.case("1472 bytes, 1500 MTU", &frame, TX, Counter::ForwardGue);
}

/// An `ip_len`-byte TCP segment of the client's to `vip`, behind `vlans`,
/// with DF set if `df` (IPv4).
fn sized(vip: IpAddr, sport: u16, ip_len: usize, vlans: &[u16], df: bool) -> Vec<u8> {
    let client = match vip {
        IpAddr::V4(_) => v4(CLIENT4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT6),
    };
    sized_from(client, vip, sport, ip_len, vlans, df)
}

/// [`sized`], from `client`.
fn sized_from(
    client: IpAddr,
    vip: IpAddr,
    sport: u16,
    ip_len: usize,
    vlans: &[u16],
    df: bool,
) -> Vec<u8> {
    let hlen = if vip.is_ipv4() { IPV4_HLEN } else { IPV6_HLEN };
    let data = vec![0x5a; ip_len - hlen - TCP_HLEN];
    let seg = packet::tcp(client, vip, sport, HTTP, TCP_ACK, &data);
    let (ethertype, ip) = match (client, vip) {
        (IpAddr::V4(c), IpAddr::V4(v)) => {
            let mut h = Ipv4::new(c.octets(), v.octets(), IPPROTO_TCP);
            h.frag = if df { IPV4_DF } else { 0 };
            (ETH_P_IP, h.build(&seg))
        }
        (IpAddr::V6(c), IpAddr::V6(v)) => (
            ETH_P_IPV6,
            packet::ipv6(c.octets(), v.octets(), IPPROTO_TCP, &[], &seg),
        ),
        _ => unreachable!("one family"),
    };
    packet::ethernet(LB_MAC, ROUTER_MAC, vlans, ethertype, &ip)
}

/// Sources that name no single host (RFC 1812 §4.3.2.7, RFC 4443 §2.4):
/// lb's ICMP messages never answer them.
const NOT_ONE_HOST: [&str; 7] = [
    "224.0.0.1",
    "255.255.255.255",
    "0.0.0.0",
    "127.0.0.1",
    "ff02::1",
    "::",
    "::1",
];

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn packets_too_big_for_the_tunnel_are_answered_with_the_mtu_to_use() {
    require_root();
    // Every reply below is counted against this CPU's budget.
    lb_tests::pin_to_this_cpu().unwrap();
    let mut f = fixture();
    let v4_mtu = lab::MTU - IPV4_HLEN as u32;
    for (what, frame, l3, mtu) in [
        (
            "IPv4 with DF",
            sized(v4(VIP4_IPIP), 43000, 1500, &[], true),
            ETH_HLEN,
            v4_mtu,
        ),
        (
            "IPv4 with DF behind a VLAN tag",
            sized(v4(VIP4_IPIP), 43001, 1500, &[7], true),
            ETH_HLEN + VLAN_HLEN,
            v4_mtu,
        ),
        (
            "IPv6",
            sized(IpAddr::V6(VIP6_IPIP), 43002, 1500, &[], true),
            ETH_HLEN,
            lab::MTU - IPV6_HLEN as u32,
        ),
        (
            "IPv4 with DF to a GUE service",
            sized(v4(VIP4_GUE), 43010, 1500, &[], true),
            ETH_HLEN,
            lab::MTU - (IPV4_HLEN + UDP_HLEN) as u32,
        ),
        (
            "IPv6 to a GUE service",
            sized(IpAddr::V6(VIP6_GUE), 43011, 1500, &[], true),
            ETH_HLEN,
            lab::MTU - (IPV6_HLEN + UDP_HLEN) as u32,
        ),
    ] {
        let out = f.case(what, &frame, TX, Counter::ReplyTooBig);
        let bad = packet::too_big_reply_problems(&frame, &out, l3, mtu);
        assert!(bad.is_empty(), "{what}: {bad:?}");
    }
    // The MTU told is the interface's or the cap, whichever is lower.
    let mut capped = lab::lab_settings();
    capped.mtu = 1400;
    f.lab.dp.set_settings(capped).unwrap();
    let frame = sized(v4(VIP4_IPIP), 43003, 1400, &[], true);
    let out = f.case("IPv4 under a cap", &frame, TX, Counter::ReplyTooBig);
    let bad = packet::too_big_reply_problems(&frame, &out, ETH_HLEN, 1400 - IPV4_HLEN as u32);
    assert!(bad.is_empty(), "under a cap: {bad:?}");
    f.lab.dp.set_settings(lab::lab_settings()).unwrap();
    // Never to a source that is no single host, nor from the budget.
    for (i, src) in NOT_ONE_HOST.into_iter().enumerate() {
        let src: IpAddr = src.parse().unwrap();
        let vip = if src.is_ipv4() {
            v4(VIP4_IPIP)
        } else {
            IpAddr::V6(VIP6_IPIP)
        };
        let frame = sized_from(src, vip, 43020 + i as u16, 1500, &[], true);
        f.case(&format!("from {src}"), &frame, DROP, Counter::DropTooBig);
    }

    // A CPU sends at most ICMP_ERRORS_PER_CPU a second: then drops.
    let frame = sized(v4(VIP4_IPIP), 43004, 1500, &[], true);
    let mut replies = 6;
    while replies < ICMP_ERRORS_PER_CPU {
        assert_eq!(f.lab.run(PROG_LB, &frame).unwrap().action, TX);
        replies += 1;
    }
    f.case("over the budget", &frame, DROP, Counter::DropTooBig);
    // The next second of the data plane's clock brings a new budget.
    f.set_clock(1);
    f.case("the next second", &frame, TX, Counter::ReplyTooBig);
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn echo_requests_to_a_vip_that_asks_are_answered() {
    require_root();
    // Every reply below is counted against this CPU's budget.
    lb_tests::pin_to_this_cpu().unwrap();
    let mut f = fixture();
    let (c4, c6) = (v4(CLIENT4), IpAddr::V6(CLIENT6));
    let (vip4, vip6) = (v4(VIP4_DSR), IpAddr::V6(VIP6_DSR));
    let echo = |src: IpAddr, dst: IpAddr, seq: u16, vlans: &[u16]| {
        let m = packet::icmp_echo(src, dst, 0x4c42, seq, b"are you there?");
        let (ethertype, ip) = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (
                ETH_P_IP,
                Ipv4::new(s.octets(), d.octets(), IPPROTO_ICMP).build(&m),
            ),
            (IpAddr::V6(s), IpAddr::V6(d)) => (
                ETH_P_IPV6,
                packet::ipv6(s.octets(), d.octets(), IPPROTO_ICMPV6, &[], &m),
            ),
            _ => unreachable!("one family"),
        };
        packet::ethernet(LB_MAC, ROUTER_MAC, vlans, ethertype, &ip)
    };
    // Off by default: the kernel's.
    f.case(
        "IPv4 echo, echo off",
        &echo(c4, vip4, 1, &[]),
        PASS,
        Counter::PassOtherProtocol,
    );
    f.case(
        "IPv6 echo, echo off",
        &echo(c6, vip6, 1, &[]),
        PASS,
        Counter::PassOtherProtocol,
    );

    // One service on each VIP asks for it (the VIP's other services do not).
    let with_echo = |f: &mut Fixture, svc: usize, key: ServiceKey, flags: u32| {
        let ring = f.rings[svc].clone();
        f.lab
            .dp
            .publish_service(&key, svc as u32, flags, 0, &ring)
            .unwrap();
    };
    let tcp4 = service_key(vip4, HTTP, IPPROTO_TCP);
    let tcp6 = service_key(vip6, HTTP, IPPROTO_TCP);
    with_echo(&mut f, SVC_TCP4, tcp4, SERVICE_F_ECHO);
    with_echo(&mut f, SVC_TCP6, tcp6, SERVICE_F_ECHO);
    for (what, frame, l3) in [
        ("IPv4", echo(c4, vip4, 2, &[]), ETH_HLEN),
        (
            "IPv4 behind a VLAN tag",
            echo(c4, vip4, 3, &[7]),
            ETH_HLEN + VLAN_HLEN,
        ),
        ("IPv6", echo(c6, vip6, 2, &[]), ETH_HLEN),
    ] {
        let out = f.case(what, &frame, TX, Counter::ReplyEcho);
        let ip_hlen = if frame[l3] >> 4 == 4 {
            IPV4_HLEN
        } else {
            IPV6_HLEN
        };
        let bad = packet::echo_reply_problems(&frame, &out, l3, l3 + ip_hlen, frame.len());
        assert!(bad.is_empty(), "{what}: {bad:?}");
    }
    // The kernel's, which drops them, from a source that is no single host.
    for src in NOT_ONE_HOST {
        let src: IpAddr = src.parse().unwrap();
        let vip = if src.is_ipv4() { vip4 } else { vip6 };
        let frame = echo(src, vip, 9, &[]);
        f.case(
            &format!("from {src}"),
            &frame,
            PASS,
            Counter::PassOtherProtocol,
        );
    }
    // Not a request, not addressed to lb's MAC, or to another address.
    let mut reply = echo(c4, vip4, 4, &[]);
    reply[ETH_HLEN + IPV4_HLEN] = ICMP_ECHO_REPLY;
    f.case("an echo reply", &reply, PASS, Counter::PassOtherProtocol);
    // The IPv4 length cuts the message before its identifier (the frame
    // keeps the bytes, as Ethernet padding).
    let mut short = echo(c4, vip4, 5, &[]);
    let short_len = (IPV4_HLEN + ICMP_HLEN - 1) as u16;
    short[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&short_len.to_be_bytes());
    let h = &mut short[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    h[10..12].fill(0);
    let c = packet::checksum(0, h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    f.case(
        "shorter than an echo header",
        &short,
        DROP,
        Counter::DropMalformedIcmp,
    );
    let foreign = sent_to([0x02, 0, 0, 0, 0, 0x77], &echo(c4, vip4, 5, &[]));
    f.case(
        "to another host's MAC",
        &foreign,
        PASS,
        Counter::PassForeignMac,
    );
    f.case(
        "to a VIP without echo",
        &echo(c4, v4(VIP4_IPIP), 6, &[]),
        PASS,
        Counter::PassOtherProtocol,
    );

    // A CPU sends at most ECHO_REPLIES_PER_CPU a second; errors have a
    // budget of their own.
    let frame = echo(c4, vip4, 7, &[]);
    for _ in 3..ECHO_REPLIES_PER_CPU {
        assert_eq!(f.lab.run(PROG_LB, &frame).unwrap().action, TX);
    }
    f.case("over the budget", &frame, DROP, Counter::DropEchoLimit);
    let too_big = sized(v4(VIP4_IPIP), 43100, 1500, &[], true);
    f.case(
        "an error after the echo budget",
        &too_big,
        TX,
        Counter::ReplyTooBig,
    );
    f.set_clock(1);
    f.case("the next second", &frame, TX, Counter::ReplyEcho);

    // Turned off again: the VIP stays (its services do), its echo goes.
    with_echo(&mut f, SVC_TCP4, tcp4, 0);
    f.case(
        "echo turned off",
        &echo(c4, vip4, 8, &[]),
        PASS,
        Counter::PassOtherProtocol,
    );
    let udp = service_key(vip4, DNS, IPPROTO_UDP);
    f.lab.dp.remove_service(&udp).unwrap();
    with_echo(&mut f, SVC_TCP4, tcp4, SERVICE_F_ECHO);
    f.case(
        "on, with one service left",
        &echo(c4, vip4, 9, &[]),
        TX,
        Counter::ReplyEcho,
    );
}

/// `frame` sent to `mac` instead.
fn sent_to(mac: [u8; 6], frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&mac);
    f
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn frames_to_backends_behind_another_interface_are_redirected_from_its_mac() {
    require_root();
    /// A port for the receiving interface.
    const LAB_PORT: u8 = 1;
    let mut f = fixture();
    let segment = f.lab.add_segment().unwrap();
    let flow4 = |sport, vip, svc, f: &Fixture| {
        f.expected(
            svc,
            &flow(v4(CLIENT4), v4(vip), sport, HTTP, IPPROTO_TCP),
            false,
        )
    };

    // dsr-l2: the backend's port names the second interface.
    let syn = tcp4(CLIENT4, VIP4_DSR, 42100, HTTP, TCP_SYN, &[]);
    let want = flow4(42100, VIP4_DSR, SVC_TCP4, &f);
    f.lab.route_backend(want, lab::SEGMENT_PORT).unwrap();
    let out = f.case(
        "dsr-l2, other interface",
        &syn,
        REDIRECT,
        Counter::RedirectBackend,
    );
    assert_eq!(out[0..6], lab::backend_mac(want), "to the backend");
    assert_eq!(
        out[6..12],
        lab::SEGMENT_MAC,
        "from the egress interface's MAC"
    );
    assert_eq!(out[12..], syn[12..], "dsr-l2 changes only the MACs");
    // Port 0, and the receiving interface's own port, stay on XDP_TX.
    f.lab.route_backend(want, 0).unwrap();
    let out = f.case("dsr-l2, port 0", &syn, TX, Counter::ForwardDsr);
    assert_eq!(out[6..12], LB_MAC);
    let mut own = lab::lab_interface(lab::MTU);
    own.port = LAB_PORT;
    f.lab.dp.set_interface(&own).unwrap();
    f.lab.route_backend(want, LAB_PORT).unwrap();
    f.case("dsr-l2, the receiving port", &syn, TX, Counter::ForwardDsr);
    // A device-map entry whose interface has another port is not used.
    f.lab
        .dp
        .set_interface(&lab::lab_interface(lab::MTU))
        .unwrap();
    f.case("dsr-l2, a stale port", &syn, DROP, Counter::DropNoEgress);
    f.lab.route_backend(want, lab::SEGMENT_PORT).unwrap();

    // ipip: encapsulated from the egress interface's MAC, within its MTU.
    let frame = sized(v4(VIP4_IPIP), 42101, 1300, &[], true);
    let want = flow4(42101, VIP4_IPIP, SVC_IPIP4, &f);
    f.lab.route_backend(want, lab::SEGMENT_PORT).unwrap();
    let out = f.case(
        "ipip, other interface",
        &frame,
        REDIRECT,
        Counter::RedirectBackend,
    );
    assert_eq!(
        out[6..12],
        lab::SEGMENT_MAC,
        "from the egress interface's MAC"
    );
    let b = f.lab.dp.backend(want).unwrap().addr;
    assert_tunnelled_from(
        "ipip, other interface",
        Tunnel::Ipip,
        &frame,
        &out,
        ETH_HLEN,
        v4([b[0], b[1], b[2], b[3]]),
        want,
        lab::SEGMENT_MAC,
    );
    // 1390 bytes fit the receiving interface's 1500 but not the egress
    // one's 1400 once encapsulated: the client is told 1380, from the
    // receiving interface (XDP_TX back to it).
    let frame = sized(v4(VIP4_IPIP), 42102, 1390, &[], true);
    let want = flow4(42102, VIP4_IPIP, SVC_IPIP4, &f);
    f.lab.route_backend(want, lab::SEGMENT_PORT).unwrap();
    let out = f.case("too big for the egress", &frame, TX, Counter::ReplyTooBig);
    let mtu = lab::SEGMENT_MTU - IPV4_HLEN as u32;
    let bad = packet::too_big_reply_problems(&frame, &out, ETH_HLEN, mtu);
    assert!(bad.is_empty(), "too big for the egress: {bad:?}");

    // A port no interface has: dropped untouched (the connection table
    // still remembers the flow's backend).
    let syn = tcp4(CLIENT4, VIP4_DSR, 42103, HTTP, TCP_SYN, &[]);
    let want = flow4(42103, VIP4_DSR, SVC_TCP4, &f);
    f.lab.route_backend(want, lab::NO_SUCH_PORT).unwrap();
    f.case("no such port", &syn, DROP, Counter::DropNoEgress);
    // Nor one whose device is gone (the kernel empties its entry).
    f.lab.route_backend(want, lab::SEGMENT_PORT).unwrap();
    f.case("registered port", &syn, REDIRECT, Counter::RedirectBackend);
    segment.remove_device().unwrap();
    f.case("its device gone", &syn, DROP, Counter::DropNoEgress);
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn frames_not_sent_to_the_lbs_mac_pass_untouched() {
    require_root();
    let mut f = fixture();
    // Another host's MAC: a switch floods unknown unicast to every port.
    let other_host = [0x02, 0, 0, 0, 0, 0x77];
    let syn = tcp4(CLIENT4, VIP4_DSR, 42000, HTTP, TCP_SYN, &[]);
    let flow4 = flow(v4(CLIENT4), v4(VIP4_DSR), 42000, HTTP, IPPROTO_TCP);
    for (what, mac) in [
        ("another host's MAC", other_host),
        ("the router's MAC", ROUTER_MAC),
        ("broadcast", [0xff; 6]),
        ("IPv4 multicast", [0x01, 0x00, 0x5e, 0, 0, 1]),
    ] {
        let frame = sent_to(mac, &syn);
        f.case(
            &format!("service SYN to {what}"),
            &frame,
            PASS,
            Counter::PassForeignMac,
        );
    }
    assert_eq!(
        f.lab.dp.conntrack(&flow4).unwrap(),
        None,
        "a passed frame leaves no connection-table entry"
    );
    let syn6 = tcp6(CLIENT6, VIP6_IPIP, 42001, HTTP, TCP_SYN, &[]);
    f.case(
        "IPv6 service SYN to another host's MAC",
        &sent_to(other_host, &syn6),
        PASS,
        Counter::PassForeignMac,
    );
    f.case(
        "IPv6 service SYN to IPv6 multicast",
        &sent_to([0x33, 0x33, 0, 0, 0, 1], &syn6),
        PASS,
        Counter::PassForeignMac,
    );
    // What would be dropped for a VIP's rules passes too.
    let mut frag = Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_TCP);
    frag.frag = 0x2000;
    let seg = packet::tcp(v4(CLIENT4), v4(VIP4_DSR), 42002, HTTP, TCP_ACK, b"x");
    let frag = packet::ethernet(other_host, ROUTER_MAC, &[], ETH_P_IP, &frag.build(&seg));
    f.case(
        "a fragment to a VIP, to another host's MAC",
        &frag,
        PASS,
        Counter::PassForeignMac,
    );
    let empty = tcp4(CLIENT4, VIP4_EMPTY, 42003, HTTP, TCP_SYN, &[]);
    f.case(
        "a SYN to a backendless service, to another host's MAC",
        &sent_to(other_host, &empty),
        PASS,
        Counter::PassForeignMac,
    );
    // Traffic to no VIP passes as before.
    let ssh = tcp4(CLIENT4, [198, 18, 0, 2], 42004, 22, TCP_SYN, &[]);
    f.case(
        "TCP to the host, to another host's MAC",
        &sent_to(other_host, &ssh),
        PASS,
        Counter::PassNotService,
    );
    // The same frame to the LB's own MAC is forwarded...
    f.case("service SYN to the LB's MAC", &syn, TX, Counter::ForwardDsr);
    // ... but not when it arrives on an interface the table does not hold
    // (an index sharing the receiving interface's slot).
    let mut elsewhere = lab::lab_interface(lab::MTU);
    elsewhere.ifindex += lb_common::limits::INTERFACE_SLOTS;
    f.lab.dp.set_interface(&elsewhere).unwrap();
    f.case(
        "service SYN on an interface not attached",
        &syn,
        PASS,
        Counter::PassForeignMac,
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn malformed_fragmented_and_backendless_packets_are_dropped_and_counted() {
    require_root();
    let mut f = fixture();
    let mut ihl = tcp4(CLIENT4, VIP4_DSR, 1, HTTP, TCP_SYN, &[]);
    ihl[ETH_HLEN] = 0x44;
    f.case("IPv4 IHL 4", &ihl, DROP, Counter::DropMalformedIpv4);
    // To the host, a malformed IP header is the kernel's: the destination
    // is read, and found to be no VIP's, before the rest of the header.
    let mut ihl_host = tcp4(CLIENT4, [198, 18, 0, 2], 1, 22, TCP_SYN, &[]);
    ihl_host[ETH_HLEN] = 0x44;
    f.case(
        "IPv4 IHL 4 to the host",
        &ihl_host,
        PASS,
        Counter::PassNotService,
    );
    let mut version_host = tcp6(
        CLIENT6,
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2),
        1,
        22,
        TCP_SYN,
        &[],
    );
    version_host[ETH_HLEN] = 0x40;
    f.case(
        "IPv6 version 4 to the host",
        &version_host,
        PASS,
        Counter::PassNotService,
    );
    // Too short to hold the destination: malformed whatever it was for.
    f.case(
        "IPv6 cut before its destination",
        &version_host[..ETH_HLEN + 30],
        DROP,
        Counter::DropMalformedIpv6,
    );
    let mut ihl15 = tcp4(CLIENT4, VIP4_DSR, 1, HTTP, TCP_SYN, &[]);
    ihl15[ETH_HLEN] = 0x4f;
    f.case(
        "IPv4 IHL 15 past the datagram",
        &ihl15,
        DROP,
        Counter::DropMalformedIpv4,
    );
    let mut long = tcp4(CLIENT4, VIP4_DSR, 1, HTTP, TCP_SYN, &[]);
    long[ETH_HLEN + 2] = 0x05;
    f.case(
        "IPv4 total length beyond the frame",
        &long,
        DROP,
        Counter::DropMalformedIpv4,
    );
    let mut doff = tcp4(CLIENT4, VIP4_DSR, 1, HTTP, TCP_SYN, &[]);
    doff[ETH_HLEN + IPV4_HLEN + 12] = 0x40;
    f.case(
        "TCP data offset 4 to a VIP",
        &doff,
        DROP,
        Counter::DropMalformedL4,
    );
    let mut doff_other = tcp4(CLIENT4, [198, 18, 0, 2], 1, 22, TCP_SYN, &[]);
    doff_other[ETH_HLEN + IPV4_HLEN + 12] = 0xf0;
    f.case(
        "TCP data offset 15 to the host: the kernel's business",
        &doff_other,
        PASS,
        Counter::PassNotService,
    );

    let mut frag = Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_TCP);
    frag.frag = IPV4_MF;
    let seg = packet::tcp(v4(CLIENT4), v4(VIP4_DSR), 1, HTTP, TCP_SYN, b"");
    f.case(
        "IPv4 first fragment to a VIP",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &frag.build(&seg)),
        DROP,
        Counter::DropFragment,
    );
    frag.frag = 100;
    f.case(
        "IPv4 later fragment to a VIP",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &frag.build(&[0u8; 16])),
        DROP,
        Counter::DropFragment,
    );
    frag.dst = [198, 18, 0, 2];
    f.case(
        "IPv4 fragment to the host",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &frag.build(&[0u8; 16])),
        PASS,
        Counter::PassNotService,
    );
    let ext = packet::ipv6_fragment_header(IPPROTO_TCP, 0, true);
    let seg6 = packet::tcp(
        IpAddr::V6(CLIENT6),
        IpAddr::V6(VIP6_DSR),
        1,
        HTTP,
        TCP_SYN,
        b"",
    );
    let ip = packet::ipv6(
        CLIENT6.octets(),
        VIP6_DSR.octets(),
        IPPROTO_FRAGMENT,
        &ext,
        &seg6,
    );
    f.case(
        "IPv6 first fragment to a VIP",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &ip),
        DROP,
        Counter::DropFragment,
    );
    // A later fragment whose first header in the original packet was a
    // destination-options header: its data (here a length byte far past
    // the packet) is no header, and the packet is a fragment, not malformed.
    let ext = packet::ipv6_fragment_header(IPPROTO_DSTOPTS, 4, true);
    let ip = packet::ipv6(
        CLIENT6.octets(),
        VIP6_DSR.octets(),
        IPPROTO_FRAGMENT,
        &ext,
        &[0xff; 16],
    );
    f.case(
        "IPv6 later fragment, its data after a fragment header",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &ip),
        DROP,
        Counter::DropFragment,
    );
    let chain: Vec<u8> = (0..5)
        .flat_map(|_| packet::ipv6_opts_header(IPPROTO_DSTOPTS))
        .collect();
    let ip = packet::ipv6(
        CLIENT6.octets(),
        VIP6_DSR.octets(),
        IPPROTO_DSTOPTS,
        &chain,
        &seg6,
    );
    f.case(
        "IPv6 chain of five extension headers",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &ip),
        DROP,
        Counter::DropMalformedIpv6,
    );

    let frame = tcp4(CLIENT4, VIP4_EMPTY, 1, HTTP, TCP_SYN, &[]);
    f.case(
        "a service with every backend out",
        &frame,
        DROP,
        Counter::DropNoBackend,
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn truncation_at_every_offset_is_never_forwarded() {
    require_root();
    let mut f = fixture();
    let frames = [
        tcp4(CLIENT4, VIP4_DSR, 42000, HTTP, TCP_SYN, &[]),
        tcp6(CLIENT6, VIP6_DSR, 42000, HTTP, TCP_SYN, &[100, 200]),
        tcp4(CLIENT4, VIP4_IPIP, 42000, HTTP, TCP_SYN, &[5]),
    ];
    let mut runs = 0u64;
    let total_before = f.lab.counter_total().unwrap();
    for frame in &frames {
        // BPF_PROG_TEST_RUN needs at least an Ethernet header.
        for len in ETH_HLEN..frame.len() {
            let cut = &frame[..len];
            let v = f.lab.run(PROG_LB, cut).unwrap();
            assert_ne!(v.action, TX, "a frame cut at {len} bytes was forwarded");
            assert_eq!(v.out, cut, "a frame cut at {len} bytes was modified");
            runs += 1;
        }
    }
    assert_eq!(
        f.lab.counter_total().unwrap() - total_before,
        runs,
        "every run counted once"
    );
    assert!(f.lab.counter(Counter::DropMalformedIpv4).unwrap() > 0);
    assert!(f.lab.counter(Counter::DropMalformedIpv6).unwrap() > 0);
    assert!(f.lab.counter(Counter::DropMalformedEthernet).unwrap() > 0);

    // A datagram whose IP length is consistent but whose TCP header is cut.
    let seg = packet::tcp(v4(CLIENT4), v4(VIP4_DSR), 1, HTTP, TCP_SYN, b"");
    let short = Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_TCP).build(&seg[..12]);
    f.case(
        "TCP header cut inside a consistent datagram",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &short),
        DROP,
        Counter::DropMalformedL4,
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn icmp_errors_quoting_a_service_flow_go_to_its_backend() {
    require_root();
    let mut f = fixture();
    // The client's flow, then an ICMP error about the backend's reply to it
    // (sent from the VIP to the client) arriving at the VIP.
    let key = flow(v4(CLIENT4), v4(VIP4_DSR), 43000, HTTP, IPPROTO_TCP);
    let owner = f.expected(SVC_TCP4, &key, false);
    let syn = tcp4(CLIENT4, VIP4_DSR, 43000, HTTP, TCP_SYN, &[]);
    f.case("the flow's SYN", &syn, TX, Counter::ForwardDsr);
    let reply = Ipv4::new(VIP4_DSR, CLIENT4, IPPROTO_TCP).build(&packet::tcp(
        v4(VIP4_DSR),
        v4(CLIENT4),
        HTTP,
        43000,
        TCP_ACK,
        &[0u8; 8],
    ));
    let icmp = Ipv4::new([198, 18, 3, 1], VIP4_DSR, IPPROTO_ICMP)
        .build(&packet::icmp4_frag_needed(1400, &reply[..28]));
    let frame = packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &icmp);
    let out = f.case(
        "ICMP fragmentation needed",
        &frame,
        TX,
        Counter::ForwardIcmpError,
    );
    assert_dsr("ICMP fragmentation needed", &frame, &out, owner);

    let key6 = flow(
        IpAddr::V6(CLIENT6),
        IpAddr::V6(VIP6_DSR),
        43001,
        HTTP,
        IPPROTO_TCP,
    );
    let owner6 = f.expected(SVC_TCP6, &key6, false);
    let reply6 = packet::ipv6(
        VIP6_DSR.octets(),
        CLIENT6.octets(),
        IPPROTO_TCP,
        &[],
        &packet::tcp(
            IpAddr::V6(VIP6_DSR),
            IpAddr::V6(CLIENT6),
            HTTP,
            43001,
            TCP_ACK,
            b"",
        ),
    );
    let router6 = Ipv6Addr::new(0x2001, 2, 3, 0, 0, 0, 0, 1);
    let icmp6 = packet::ipv6(
        router6.octets(),
        VIP6_DSR.octets(),
        IPPROTO_ICMPV6,
        &[],
        &packet::icmp6_too_big(1280, &reply6),
    );
    let frame = packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &icmp6);
    let out = f.case(
        "ICMPv6 packet too big",
        &frame,
        TX,
        Counter::ForwardIcmpError,
    );
    assert_dsr("ICMPv6 packet too big", &frame, &out, owner6);

    // About a flow of no service (the host's own connection): the host's.
    let foreign = Ipv4::new([198, 18, 0, 2], CLIENT4, IPPROTO_TCP).build(&packet::tcp(
        v4([198, 18, 0, 2]),
        v4(CLIENT4),
        22,
        43002,
        TCP_ACK,
        b"",
    ));
    let icmp = Ipv4::new([198, 18, 3, 1], [198, 18, 0, 2], IPPROTO_ICMP)
        .build(&packet::icmp4_frag_needed(1400, &foreign[..28]));
    f.case(
        "ICMP error about the host's own flow",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &icmp),
        PASS,
        Counter::PassNotService,
    );

    // Quoting a packet cut inside its IP header, sent to a VIP.
    let icmp = Ipv4::new([198, 18, 3, 1], VIP4_DSR, IPPROTO_ICMP)
        .build(&packet::icmp4_frag_needed(1400, &reply[..12]));
    f.case(
        "ICMP error quoting a truncated header",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &icmp),
        DROP,
        Counter::DropMalformedIcmp,
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn decap_strips_tunnels_from_accepted_sources_to_local_endpoints_and_vips_only() {
    require_root();
    let me4 = [198, 18, 0, 21];
    let me6 = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x21);
    let mut decap = Decapsulator::load().unwrap();
    decap
        .set_tables(&DecapTables {
            endpoints: [v4(me4), IpAddr::V6(me6)].into(),
            sources: lab::tunnel_sources(),
            vips: [v4(VIP4_IPIP), IpAddr::V6(VIP6_IPIP)].into(),
            gue_port: DEFAULT_GUE_PORT,
        })
        .unwrap();
    let inner = Ipv4::new(CLIENT4, VIP4_IPIP, IPPROTO_TCP).build(&packet::tcp(
        v4(CLIENT4),
        v4(VIP4_IPIP),
        1,
        HTTP,
        TCP_SYN,
        b"x",
    ));
    let mut count = |what: &str, frame: &[u8], action: u32, c: DecapCounter| {
        let before = decap.counters().unwrap()[c as usize];
        let v = lab::test_run(decap.program().unwrap(), frame).unwrap();
        assert_eq!(v.action, action, "{what}: action");
        assert_eq!(
            decap.counters().unwrap()[c as usize],
            before + 1,
            "{what}: counter"
        );
        v.out
    };
    let ipip = |src: [u8; 4], dst: [u8; 4], inner: &[u8]| {
        packet::ethernet(
            LB_MAC,
            ROUTER_MAC,
            &[],
            ETH_P_IP,
            &Ipv4::new(src, dst, IPPROTO_IPIP).build(inner),
        )
    };
    for vlans in [&[][..], &[9][..]] {
        let outer = Ipv4::new([198, 18, 255, 7], me4, IPPROTO_IPIP).build(&inner);
        let frame = packet::ethernet(LB_MAC, ROUTER_MAC, vlans, ETH_P_IP, &outer);
        let out = count(
            "IPIP to this host",
            &frame,
            PASS,
            DecapCounter::Decapsulated,
        );
        let l2 = ETH_HLEN + VLAN_HLEN * vlans.len();
        assert_eq!(&out[..l2], &frame[..l2], "link-layer header kept");
        assert_eq!(&out[l2..], &inner[..], "outer header removed");
    }
    let tcp6 = |vip: Ipv6Addr| {
        packet::ipv6(
            CLIENT6.octets(),
            vip.octets(),
            IPPROTO_TCP,
            &[],
            &packet::tcp(IpAddr::V6(CLIENT6), IpAddr::V6(vip), 1, HTTP, TCP_SYN, b""),
        )
    };
    let ip6ip6 = |src: [u8; 16], inner: &[u8]| {
        let outer = packet::ipv6(src, me6.octets(), IPPROTO_IPV6, &[], inner);
        packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &outer)
    };
    let inner6 = tcp6(VIP6_IPIP);
    let out = count(
        "IP6IP6 to this host",
        &ip6ip6(lab::TUNNEL_SRC_V6, &inner6),
        PASS,
        DecapCounter::Decapsulated,
    );
    assert_eq!(&out[ETH_HLEN..], &inner6[..]);

    // GUE: the same, in UDP to the GUE port.
    let gue4 = |src: [u8; 4], port: u16, inner: &[u8]| {
        let udp = packet::udp(v4(src), v4(me4), 49999, port, inner);
        packet::ethernet(
            LB_MAC,
            ROUTER_MAC,
            &[],
            ETH_P_IP,
            &Ipv4::new(src, me4, IPPROTO_UDP).build(&udp),
        )
    };
    let out = count(
        "GUE to this host",
        &gue4([198, 18, 255, 7], DEFAULT_GUE_PORT, &inner),
        PASS,
        DecapCounter::Decapsulated,
    );
    assert_eq!(
        &out[ETH_HLEN..],
        &inner[..],
        "outer IP and UDP headers removed"
    );
    let udp6 = packet::udp(
        IpAddr::from(lab::TUNNEL_SRC_V6),
        IpAddr::V6(me6),
        49999,
        DEFAULT_GUE_PORT,
        &inner6,
    );
    let gue6 = packet::ipv6(lab::TUNNEL_SRC_V6, me6.octets(), IPPROTO_UDP, &[], &udp6);
    let out = count(
        "GUE over IPv6 to this host",
        &packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &gue6),
        PASS,
        DecapCounter::Decapsulated,
    );
    assert_eq!(&out[ETH_HLEN..], &inner6[..]);
    let other_port = gue4([198, 18, 255, 7], 53, &inner);
    let out = count(
        "UDP to another port",
        &other_port,
        PASS,
        DecapCounter::PassNotTunnel,
    );
    assert_eq!(out, other_port);
    count(
        "GUE from outside the accepted prefix",
        &gue4([198, 18, 254, 7], DEFAULT_GUE_PORT, &inner),
        DROP,
        DecapCounter::DropForeignSource,
    );

    // Only the load balancers may tunnel packets in.
    for (what, frame) in [
        (
            "IPIP from outside the accepted prefix",
            ipip([198, 18, 254, 7], me4, &inner),
        ),
        (
            "IP6IP6 from outside the accepted prefix",
            ip6ip6(
                Ipv6Addr::new(0x2001, 2, 0xff, 0, 0, 0, 1, 1).octets(),
                &inner6,
            ),
        ),
    ] {
        count(what, &frame, DROP, DecapCounter::DropForeignSource);
    }
    // And only to the VIPs this host serves.
    let not_vip = Ipv4::new(CLIENT4, me4, IPPROTO_TCP).build(&packet::tcp(
        v4(CLIENT4),
        v4(me4),
        1,
        22,
        TCP_SYN,
        b"",
    ));
    count(
        "IPIP to this host's own address inside",
        &ipip([198, 18, 255, 7], me4, &not_vip),
        DROP,
        DecapCounter::DropNotVip,
    );
    count(
        "GUE to this host's own address inside",
        &gue4([198, 18, 255, 7], DEFAULT_GUE_PORT, &not_vip),
        DROP,
        DecapCounter::DropNotVip,
    );
    count(
        "IP6IP6 to another VIP inside",
        &ip6ip6(
            lab::TUNNEL_SRC_V6,
            &tcp6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x99)),
        ),
        DROP,
        DecapCounter::DropNotVip,
    );

    // Congestion marked on the tunnel's path (outer CE) reaches the inner
    // packet (RFC 6040): ECT becomes CE, the IPv4 checksum following; a
    // packet whose transport does not do ECN is dropped.
    let ecn = |outer_tos: u8, inner_tos: u8| {
        let inner = Ipv4 {
            tos: inner_tos,
            ..Ipv4::new(CLIENT4, VIP4_IPIP, IPPROTO_TCP)
        }
        .build(&packet::tcp(
            v4(CLIENT4),
            v4(VIP4_IPIP),
            1,
            HTTP,
            TCP_SYN,
            b"x",
        ));
        let outer = Ipv4 {
            tos: outer_tos,
            ..Ipv4::new([198, 18, 255, 7], me4, IPPROTO_IPIP)
        }
        .build(&inner);
        packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &outer)
    };
    let out = count(
        "IPIP marked CE over ECT(0)",
        &ecn(0xb8 | ECN_CE, 0xb8 | ECN_ECT0),
        PASS,
        DecapCounter::Decapsulated,
    );
    let inner_out = &out[ETH_HLEN..];
    assert_eq!(inner_out[1], 0xb8 | ECN_CE, "CE carried over, DSCP kept");
    assert!(packet::ipv4_header_valid(&inner_out[..IPV4_HLEN]));
    let plain_ect = ecn(0xb8 | ECN_ECT0, 0xb8 | ECN_ECT0);
    let out = count(
        "IPIP not marked",
        &plain_ect,
        PASS,
        DecapCounter::Decapsulated,
    );
    assert_eq!(&out[ETH_HLEN..], &plain_ect[ETH_HLEN + IPV4_HLEN..]);
    count(
        "IPIP marked CE over not-ECT",
        &ecn(ECN_CE, ECN_NOT_ECT),
        DROP,
        DecapCounter::DropCongestedNotEct,
    );
    let mut marked6 = ip6ip6(lab::TUNNEL_SRC_V6, &inner6);
    marked6[ETH_HLEN + 1] |= ECN_CE << 4;
    marked6[ETH_HLEN + IPV6_HLEN + 1] |= ECN_ECT1 << 4;
    let out = count(
        "IP6IP6 marked CE over ECT(1)",
        &marked6,
        PASS,
        DecapCounter::Decapsulated,
    );
    assert_eq!((out[ETH_HLEN + 1] >> 4) & ECN_MASK, ECN_CE);

    let elsewhere = ipip([198, 18, 255, 7], [198, 18, 0, 99], &inner);
    let out = count(
        "IPIP to another host",
        &elsewhere,
        PASS,
        DecapCounter::PassNotLocal,
    );
    assert_eq!(out, elsewhere);
    let plain = tcp4(CLIENT4, me4, 1, 22, TCP_SYN, &[]);
    let out = count("plain TCP", &plain, PASS, DecapCounter::PassNotTunnel);
    assert_eq!(out, plain);
    count(
        "IPIP with a truncated inner header",
        &ipip([198, 18, 255, 7], me4, &inner[..10]),
        DROP,
        DecapCounter::DropMalformed,
    );
    let mut long = inner.clone();
    long[3] += 1; // the inner total length runs past the outer packet
    count(
        "IPIP whose inner packet is longer than the outer one",
        &ipip([198, 18, 255, 7], me4, &long),
        DROP,
        DecapCounter::DropMalformed,
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn decap_tables_are_replaced_whole_and_read_back() {
    require_root();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let mut decap = Decapsulator::load().unwrap();
    let first = DecapTables {
        endpoints: [ip("198.18.0.21"), ip("2001:2::21")].into(),
        sources: [(ip("198.18.255.0"), 24), (ip("0.0.0.0"), 0)].into(),
        vips: [ip("198.18.100.1")].into(),
        gue_port: DEFAULT_GUE_PORT,
    };
    decap.set_tables(&first).unwrap();
    assert_eq!(decap.tables().unwrap(), first);
    let second = DecapTables {
        endpoints: [ip("198.18.0.21")].into(),
        sources: [(ip("2001:2:ff::"), 112)].into(),
        vips: [ip("198.18.100.2"), ip("2001:2:100::1")].into(),
        // A new port is written to the endpoints that stay.
        gue_port: 7000,
    };
    decap.set_tables(&second).unwrap();
    assert_eq!(decap.tables().unwrap(), second);
    // Beyond the map's capacity: refused, and nothing changed.
    let too_many = DecapTables {
        vips: (0..=lb_common::limits::MAX_ADDRESSES)
            .map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0x100, 0, 0, 0, 0, i as u16)))
            .collect(),
        ..second.clone()
    };
    let e = decap.set_tables(&too_many).unwrap_err();
    assert!(format!("{e:#}").contains("nothing changed"), "{e:#}");
    assert_eq!(decap.tables().unwrap(), second);
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn source_lists_drop_new_flows_from_denied_and_unlisted_sources() {
    require_root();
    let mut f = fixture();
    f.set_clock(1);
    let parse = |p: &str| lb::config::parse_source(p).unwrap();
    let set_lists = |f: &mut Fixture, svc: usize, flags: u32, entries: &[(&str, SourceList)]| {
        for (prefix, list) in entries {
            f.lab
                .dp
                .set_source_entry(svc as u32, parse(prefix), *list)
                .unwrap();
        }
        f.lab.dp.settle_source_blocks().unwrap();
        f.republish(svc, flags);
    };
    // An established flow from CLIENT4 before any list.
    let syn = tcp4(CLIENT4, VIP4_DSR, 40000, HTTP, TCP_SYN, &[]);
    let ack = tcp4(CLIENT4, VIP4_DSR, 40000, HTTP, TCP_ACK, &[]);
    f.case("no lists: SYN", &syn, TX, Counter::ForwardDsr);

    // Entries without the service's flag are never consulted.
    set_lists(&mut f, SVC_TCP4, 0, &[("198.18.2.0/24", SourceList::Deny)]);
    let fresh = tcp4(CLIENT4, VIP4_DSR, 40001, HTTP, TCP_SYN, &[]);
    f.case("entries, no flag", &fresh, TX, Counter::ForwardDsr);

    // The deny list refuses new flows, SYN or not. The established flow's
    // entry still pins it (the program checks new flows only) until it is
    // removed, as the daemon removes the entries of flows a list change
    // refuses: then its next packet is dropped.
    set_lists(&mut f, SVC_TCP4, SERVICE_F_DENY_LIST, &[]);
    let new_syn = tcp4(CLIENT4, VIP4_DSR, 40003, HTTP, TCP_SYN, &[]);
    f.case(
        "denied: a new flow's SYN",
        &new_syn,
        DROP,
        Counter::DropDenied,
    );
    // A flow with an entry was admitted when it was made: its SYN
    // (retransmitted) is too.
    f.case(
        "denied: a SYN with an entry",
        &fresh,
        TX,
        Counter::ForwardDsr,
    );
    let fresh_ack = tcp4(CLIENT4, VIP4_DSR, 40002, HTTP, TCP_ACK, &[]);
    f.case(
        "denied: a new flow's ACK",
        &fresh_ack,
        DROP,
        Counter::DropDenied,
    );
    f.case(
        "denied: established, entry kept",
        &ack,
        TX,
        Counter::ForwardDsr,
    );
    let key = flow(v4(CLIENT4), v4(VIP4_DSR), 40000, HTTP, IPPROTO_TCP);
    assert_eq!(f.lab.dp.conntrack_remove(&[key]).unwrap(), 1);
    f.case(
        "denied: established, entry removed",
        &ack,
        DROP,
        Counter::DropDenied,
    );
    let other = tcp4([198, 18, 3, 7], VIP4_DSR, 40000, HTTP, TCP_SYN, &[]);
    f.case("outside the deny list", &other, TX, Counter::ForwardDsr);
    // Those answers came from the directory of blocks: one /24, its block.
    assert!(f.lab.dp.source_blocks_ready(SVC_TCP4 as u32).unwrap());
    // An entry changing hands the service to the trie until its blocks
    // are placed again, and the answers stay the same.
    f.lab
        .dp
        .set_source_entry(SVC_TCP4 as u32, parse("198.18.9.0/24"), SourceList::Allow)
        .unwrap();
    assert!(!f.lab.dp.source_blocks_ready(SVC_TCP4 as u32).unwrap());
    let new_syn2 = tcp4(CLIENT4, VIP4_DSR, 40004, HTTP, TCP_SYN, &[]);
    f.case("denied, by the trie", &new_syn2, DROP, Counter::DropDenied);
    f.lab
        .dp
        .remove_source_entry(SVC_TCP4 as u32, parse("198.18.9.0/24"))
        .unwrap();
    f.lab.dp.settle_source_blocks().unwrap();
    assert!(f.lab.dp.source_blocks_ready(SVC_TCP4 as u32).unwrap());

    // The deny list out, and an allow list of whole blocks: the directory
    // says which.
    f.lab
        .dp
        .remove_source_entry(SVC_TCP4 as u32, parse("198.18.2.0/24"))
        .unwrap();
    set_lists(
        &mut f,
        SVC_TCP4,
        SERVICE_F_ALLOW_LIST,
        &[("198.18.0.0/16", SourceList::Allow)],
    );
    assert!(f.lab.dp.source_blocks_ready(SVC_TCP4 as u32).unwrap());
    let allowed = tcp4(CLIENT4, VIP4_DSR, 40005, HTTP, TCP_SYN, &[]);
    f.case(
        "allowed by a whole block",
        &allowed,
        TX,
        Counter::ForwardDsr,
    );
    let unlisted = tcp4([198, 19, 0, 8], VIP4_DSR, 40005, HTTP, TCP_SYN, &[]);
    f.case("in no block", &unlisted, DROP, Counter::DropNotAllowed);
    // An allow list around a deny: the longest prefix decides, and deny
    // wins because user space leaves out allow prefixes inside deny ones.
    set_lists(
        &mut f,
        SVC_TCP4,
        SERVICE_F_DENY_LIST | SERVICE_F_ALLOW_LIST,
        &[
            ("198.18.0.0/16", SourceList::Allow),
            ("198.18.2.128/25", SourceList::Deny),
        ],
    );
    f.case("allowed, deny /25 elsewhere", &syn, TX, Counter::ForwardDsr);
    let denied = tcp4([198, 18, 2, 200], VIP4_DSR, 40000, HTTP, TCP_SYN, &[]);
    f.case(
        "allowed but denied by a /25",
        &denied,
        DROP,
        Counter::DropDenied,
    );
    let outside = tcp4([198, 19, 0, 7], VIP4_DSR, 40000, HTTP, TCP_SYN, &[]);
    f.case(
        "outside the allow list",
        &outside,
        DROP,
        Counter::DropNotAllowed,
    );
    let stats = f.lab.dp.source_drops(SVC_TCP4 as u32).unwrap();
    assert_eq!((stats.denied, stats.not_allowed), (5, 2));
    assert_eq!(
        f.service_stats(SVC_TCP4).drops,
        7,
        "every refused packet is the service's drop too"
    );

    // IPv6: an allow list of one /126, a /128 denied inside it.
    set_lists(
        &mut f,
        SVC_TCP6,
        SERVICE_F_ALLOW_LIST | SERVICE_F_DENY_LIST,
        &[
            ("2001:2:2::4/126", SourceList::Allow),
            ("2001:2:2::6/128", SourceList::Deny),
        ],
    );
    let from6 = |last: u16| {
        let src = Ipv6Addr::new(0x2001, 2, 2, 0, 0, 0, 0, last);
        tcp6(src, VIP6_DSR, 40000, HTTP, TCP_SYN, &[])
    };
    f.case("IPv6 allowed", &from6(7), TX, Counter::ForwardDsr);
    f.case("IPv6 denied inside", &from6(6), DROP, Counter::DropDenied);
    f.case("IPv6 not allowed", &from6(8), DROP, Counter::DropNotAllowed);

    // Every prefix reads back with its list.
    let entries = f.lab.dp.source_entries().unwrap();
    assert_eq!(entries.len(), 4, "{entries:?}");
    assert_eq!(
        entries.get(&(SVC_TCP6 as u32, parse("2001:2:2::6/128"))),
        Some(&SourceList::Deny)
    );
    assert_eq!(
        entries.get(&(SVC_TCP4 as u32, parse("198.18.0.0/16"))),
        Some(&SourceList::Allow)
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn new_flow_limits_drop_a_prefixs_new_flows_past_its_burst_until_it_refills() {
    require_root();
    // The table of recent sources is per CPU: every run on one.
    lb_tests::pin_to_this_cpu().unwrap();
    let mut f = fixture();
    f.set_clock(1);
    // Sets a service's limit, and its flag with it.
    let limit = |f: &mut Fixture, svc: usize, l: Option<SourceLimit>| {
        f.lab.dp.set_source_limit(svc as u32, l.as_ref()).unwrap();
        f.republish(
            svc,
            if l.is_some() {
                SERVICE_F_SOURCE_LIMIT
            } else {
                0
            },
        );
    };
    let syn = |src: [u8; 4], sport: u16| tcp4(src, VIP4_DSR, sport, HTTP, TCP_SYN, &[]);

    // 2 new flows a second per /24, 2 at once: a 500 ms interval, so the
    // cases up to the refill run well within one.
    limit(
        &mut f,
        SVC_TCP4,
        Some(SourceLimit::new(2, 2, FAMILY_V4, 24)),
    );
    f.case("burst: 1st", &syn(CLIENT4, 41000), TX, Counter::ForwardDsr);
    f.case("burst: 2nd", &syn(CLIENT4, 41001), TX, Counter::ForwardDsr);
    let over = syn(CLIENT4, 41002);
    f.cases("over: 100 SYNs", &over, 100, DROP, Counter::DropRateLimited);
    let neighbour = [198, 18, 2, 8];
    f.case(
        "over: the same /24",
        &syn(neighbour, 41000),
        DROP,
        Counter::DropRateLimited,
    );
    f.case(
        "another /24",
        &syn([198, 18, 3, 7], 41000),
        TX,
        Counter::ForwardDsr,
    );
    // Established flows are never limited: an admitted flow's packets and
    // its retransmitted SYN find its entry; a TCP packet without one (an
    // entry lost) opens nothing at the backend and is not counted.
    let ack = tcp4(CLIENT4, VIP4_DSR, 41000, HTTP, TCP_ACK, &[]);
    f.case("established ACK", &ack, TX, Counter::ForwardDsr);
    f.case(
        "retransmitted SYN",
        &syn(CLIENT4, 41001),
        TX,
        Counter::ForwardDsr,
    );
    let lost = tcp4(CLIENT4, VIP4_DSR, 41099, HTTP, TCP_ACK, &[]);
    f.case("ACK without an entry", &lost, TX, Counter::ForwardDsr);

    let drops = f.lab.dp.source_drops(SVC_TCP4 as u32).unwrap();
    assert_eq!((drops.limited, drops.denied), (101, 0));
    let sampled = f.lab.dp.limited_prefixes().unwrap();
    assert_eq!(sampled.len(), 1, "{sampled:?}");
    assert_eq!(sampled[0].service, SVC_TCP4 as u32);
    assert_eq!(&sampled[0].prefix[..4], &[198, 18, 2, 0]);
    assert_eq!((sampled[0].drops, sampled[0].last), (101, 1));

    // After the burst's worth of intervals, the burst again, and no more.
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    f.case(
        "refilled: 1st",
        &syn(CLIENT4, 41003),
        TX,
        Counter::ForwardDsr,
    );
    f.case(
        "refilled: 2nd",
        &syn(neighbour, 41004),
        TX,
        Counter::ForwardDsr,
    );
    f.case(
        "refilled: over",
        &syn(CLIENT4, 41005),
        DROP,
        Counter::DropRateLimited,
    );

    // The limit's entry without the service's flag is never read.
    limit(&mut f, SVC_TCP4, None);
    f.lab
        .dp
        .set_source_limit(
            SVC_TCP4 as u32,
            Some(&SourceLimit::new(1, 1, FAMILY_V4, 32)),
        )
        .unwrap();
    for port in 41010..41015 {
        f.case("no flag", &syn(CLIENT4, port), TX, Counter::ForwardDsr);
    }

    // UDP: every packet without an entry opens a flow; a flow's next
    // packets find its entry.
    limit(
        &mut f,
        SVC_UDP4,
        Some(SourceLimit::new(1, 1, FAMILY_V4, 32)),
    );
    let dns = |sport: u16| {
        let seg = packet::udp(v4(CLIENT4), v4(VIP4_DSR), sport, DNS, b"query");
        let ip = Ipv4::new(CLIENT4, VIP4_DSR, IPPROTO_UDP).build(&seg);
        packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &ip)
    };
    f.case("UDP: a flow", &dns(5300), TX, Counter::ForwardDsr);
    f.case("UDP: its next packet", &dns(5300), TX, Counter::ForwardDsr);
    f.case(
        "UDP: another flow",
        &dns(5301),
        DROP,
        Counter::DropRateLimited,
    );

    // A SYN after its connection's RST opens a new connection: counted,
    // though the closed entry is still there.
    limit(
        &mut f,
        SVC_TCP4,
        Some(SourceLimit::new(1, 1, FAMILY_V4, 32)),
    );
    let closer = [198, 18, 4, 7];
    f.case("a connection", &syn(closer, 42000), TX, Counter::ForwardDsr);
    let rst = tcp4(closer, VIP4_DSR, 42000, HTTP, TCP_RST, &[]);
    f.case("its RST", &rst, TX, Counter::ForwardDsr);
    f.cases(
        "SYNs reopening it",
        &syn(closer, 42000),
        50,
        DROP,
        Counter::DropRateLimited,
    );
    // A UDP flow whose entry lapsed is a new flow again.
    let udp_idle_at = |f: &mut Fixture, now| {
        let settings = ConntrackSettings {
            now,
            udp_idle_timeout: 30,
            ..ConntrackSettings::default()
        };
        f.lab.dp.set_conntrack_settings(settings).unwrap();
    };
    udp_idle_at(&mut f, 1);
    let idle = [198, 18, 4, 8];
    let from = |src: [u8; 4]| {
        let seg = packet::udp(v4(src), v4(VIP4_DSR), 5400, DNS, b"query");
        let ip = Ipv4::new(src, VIP4_DSR, IPPROTO_UDP).build(&seg);
        packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &ip)
    };
    f.case("UDP: a flow", &from(idle), TX, Counter::ForwardDsr);
    udp_idle_at(&mut f, 40);
    f.case(
        "UDP: the flow after its entry lapsed",
        &from(idle),
        DROP,
        Counter::DropRateLimited,
    );
    f.set_clock(1);

    // IPv6 by /64.
    limit(
        &mut f,
        SVC_TCP6,
        Some(SourceLimit::new(1, 1, FAMILY_V6, 64)),
    );
    let from6 = |a: Ipv6Addr| tcp6(a, VIP6_DSR, 41000, HTTP, TCP_SYN, &[]);
    f.case("IPv6: first", &from6(CLIENT6), TX, Counter::ForwardDsr);
    let same64 = Ipv6Addr::new(0x2001, 2, 2, 0, 9, 9, 9, 9);
    f.case(
        "IPv6: same /64",
        &from6(same64),
        DROP,
        Counter::DropRateLimited,
    );
    let other64 = Ipv6Addr::new(0x2001, 2, 2, 1, 0, 0, 0, 7);
    f.case(
        "IPv6: another /64",
        &from6(other64),
        TX,
        Counter::ForwardDsr,
    );
}
