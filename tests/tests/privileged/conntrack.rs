//! The connection table keeps established flows on their backend while the
//! table changes, lets go when the backend is down or its id is reused, and
//! a SYN always re-picks. Its life: a retransmitted SYN writes nothing, a
//! FIN or RST shortens an entry's life, idle entries lapse after their
//! service's timeout, and a flood of new flows spends each CPU's insert
//! budget instead of the established flows' entries. Entries are read back
//! from the map.

use std::net::{IpAddr, Ipv4Addr};

use aya::maps::{Array, Map, MapData};
use lb::{
    config,
    daemon::{controller::Controller, runtime::Runtime},
    dataplane::{Capacity, Dataplane, KernelLogLevel},
    neighbor::Resolution,
    netns::PrivateBpffs,
};
use lb_common::{
    ConntrackSettings, Counter, FLOW_F_CLOSED, FlowEntry, FlowKey, FlowValue, addr_bytes,
    flow_buckets,
    hash::{bucket_hash, flow_hash, maglev_slot},
    limits::{CONNTRACK_WAYS, NO_BACKEND},
    maps::PROG_LB,
    wire::*,
};
use lb_tests::{
    Scratch,
    lab::{
        LB_MAC, Lab, MTU, ROUTER_MAC, TX, backend_of_mac, lab_capacity, lab_interface,
        lab_settings, service_key,
    },
    packet::{self, Ipv4},
    require_root,
};

const RING: u32 = 251;
const CLIENT: [u8; 4] = [198, 18, 2, 9];
const VIP: [u8; 4] = [198, 18, 1, 1];
const PORT: u16 = 80;

fn ip(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn frame(src: [u8; 4], sport: u16, proto: u8, flags: u8) -> Vec<u8> {
    let l4 = if proto == IPPROTO_TCP {
        packet::tcp(ip(src), ip(VIP), sport, PORT, flags, b"data")
    } else {
        packet::udp(ip(src), ip(VIP), sport, PORT, b"data")
    };
    packet::ethernet(
        LB_MAC,
        ROUTER_MAC,
        &[],
        ETH_P_IP,
        &Ipv4::new(src, VIP, proto).build(&l4),
    )
}

fn flow(src: [u8; 4], sport: u16, proto: u8) -> FlowKey {
    let (s, family) = addr_bytes(ip(src));
    let (d, _) = addr_bytes(ip(VIP));
    FlowKey {
        src: s,
        dst: d,
        sport: sport.to_be(),
        dport: PORT.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// Sends one packet from `src`; returns the backend it went to.
fn send_from(lab: &mut Lab, src: [u8; 4], sport: u16, proto: u8, flags: u8) -> u32 {
    let v = lab.run(PROG_LB, &frame(src, sport, proto, flags)).unwrap();
    assert_eq!(v.action, TX);
    backend_of_mac(&v.out[0..6])
}

/// Sends one packet from `CLIENT`.
fn send(lab: &mut Lab, sport: u16, proto: u8, flags: u8) -> u32 {
    send_from(lab, CLIENT, sport, proto, flags)
}

fn slot_owner(ring: &[u32], sport: u16, proto: u8) -> u32 {
    ring[maglev_slot(
        flow_hash(&flow(CLIENT, sport, proto), false),
        ring.len() as u32,
    ) as usize]
}

/// The service's backends, by id.
const BACKENDS: [u32; 3] = [1, 2, 3];

/// Backends 1..=3 of one service at 198.18.0.11..13, no aging and no
/// insert budget.
fn setup(proto: u8) -> (Lab, lb_common::ServiceKey) {
    let lab = setup_with(lab_capacity(RING), proto, ConntrackSettings::default(), 0);
    (lab, service_key(ip(VIP), PORT, proto))
}

/// The same with `capacity`, `ct` and the service's own idle timeout
/// `idle` (0: the protocol's default).
fn setup_with(capacity: Capacity, proto: u8, ct: ConntrackSettings, idle: u32) -> Lab {
    let mut lab = Lab::with_capacity(capacity, RING).unwrap();
    for id in BACKENDS {
        lab.backend(id, ip([198, 18, 0, 10 + id as u8]), true, 1)
            .unwrap();
    }
    let key = service_key(ip(VIP), PORT, proto);
    let ring = lab.service(0, key, 0, &[(1, 1), (2, 1), (3, 1)]).unwrap();
    lab.dp.publish_service(&key, 0, 0, idle, &ring).unwrap();
    lab.dp.set_conntrack_settings(ct).unwrap();
    lab
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn established_tcp_flow_survives_a_table_change_and_moves_when_its_backend_goes_down() {
    require_root();
    let (mut lab, key) = setup(IPPROTO_TCP);
    let sport = 50_000;
    let a = send(&mut lab, sport, IPPROTO_TCP, TCP_SYN);

    // Drain A (weight 0, still up): the table no longer names it...
    let members: Vec<(u32, u32)> = (1..=3).map(|id| (id, u32::from(id != a))).collect();
    let ring = lab.service(0, key, 0, &members).unwrap();
    assert!(!ring.contains(&a));
    // ...but the established flow stays on it,
    assert_eq!(
        send(&mut lab, sport, IPPROTO_TCP, TCP_ACK),
        a,
        "established flow moved on a table change"
    );
    // while new flows go elsewhere.
    for p in 1..200u16 {
        assert_ne!(
            send(&mut lab, p, IPPROTO_TCP, TCP_SYN),
            a,
            "a new flow went to the drained backend"
        );
    }

    // A goes down: the flow's entry is a miss and the flow re-hashes.
    lab.backend(a, ip([198, 18, 0, 10 + a as u8]), false, 1)
        .unwrap();
    let moved = send(&mut lab, sport, IPPROTO_TCP, TCP_ACK);
    assert_ne!(moved, a);
    assert_eq!(moved, slot_owner(&ring, sport, IPPROTO_TCP));
    // and stays where it moved, even once A is back in the table:
    lab.backend(a, ip([198, 18, 0, 10 + a as u8]), true, 1)
        .unwrap();
    let full = lab.service(0, key, 0, &[(1, 1), (2, 1), (3, 1)]).unwrap();
    assert_eq!(slot_owner(&full, sport, IPPROTO_TCP), a);
    assert_eq!(send(&mut lab, sport, IPPROTO_TCP, TCP_ACK), moved);
    // A SYN on the same 5-tuple is a new connection: it re-picks from the table.
    assert_eq!(send(&mut lab, sport, IPPROTO_TCP, TCP_SYN), a);
    assert_eq!(send(&mut lab, sport, IPPROTO_TCP, TCP_ACK), a);
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_reused_backend_id_does_not_inherit_old_flows() {
    require_root();
    let (mut lab, key) = setup(IPPROTO_TCP);
    let sport = 50_001;
    let a = send(&mut lab, sport, IPPROTO_TCP, TCP_SYN);
    // Remove A from the table and give its id to a new server (generation 2),
    // which is not in the table either.
    let others: Vec<(u32, u32)> = (1..=3).filter(|&id| id != a).map(|id| (id, 1)).collect();
    let ring = lab.service(0, key, 0, &others).unwrap();
    lab.backend(a, ip([198, 18, 0, 99]), true, 2).unwrap();
    let now = send(&mut lab, sport, IPPROTO_TCP, TCP_ACK);
    assert_ne!(now, a, "the flow followed the id to a different server");
    assert_eq!(now, slot_owner(&ring, sport, IPPROTO_TCP));
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn udp_flows_stick_too() {
    require_root();
    let (mut lab, key) = setup(IPPROTO_UDP);
    let sport = 50_002;
    let a = send(&mut lab, sport, IPPROTO_UDP, 0);
    let members: Vec<(u32, u32)> = (1..=3).map(|id| (id, u32::from(id != a))).collect();
    lab.service(0, key, 0, &members).unwrap();
    for _ in 0..3 {
        assert_eq!(send(&mut lab, sport, IPPROTO_UDP, 0), a);
    }
    let stats = lab.dp.service_stats(0, &BACKENDS).unwrap();
    assert_eq!(
        (stats.packets, stats.new_flows),
        (4, 1),
        "one new flow, four packets"
    );
}

/// Client `n` of the connection-life tests: 198.18.2.x.
fn client(n: u16) -> [u8; 4] {
    [198, 18, 2, n as u8]
}

/// Clients of the flood: 198.18.128.0/17, one address and port per flow.
const FLOOD_NET: [u8; 2] = [198, 18];

/// The flood's client `n`.
fn flood_client(n: u32) -> [u8; 4] {
    let [_, _, a, b] = n.to_be_bytes();
    [FLOOD_NET[0], FLOOD_NET[1], a | 0x80, b]
}

fn entry(lab: &Lab, src: [u8; 4], sport: u16, proto: u8) -> Option<FlowValue> {
    lab.dp.conntrack(&flow(src, sport, proto)).unwrap()
}

fn inserts(lab: &Lab) -> (u64, u64) {
    let stats = lab.dp.conntrack_stats().unwrap();
    (
        stats.iter().map(|s| s.inserts).sum(),
        stats.iter().map(|s| s.refused).sum(),
    )
}

fn new_flows(lab: &Lab) -> u64 {
    lab.dp.service_stats(0, &BACKENDS).unwrap().new_flows
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_retransmitted_syn_leaves_its_entry_alone_and_a_new_one_reopens_a_closed_entry() {
    require_root();
    let mut lab = setup_with(
        lab_capacity(RING),
        IPPROTO_TCP,
        ConntrackSettings::default(),
        0,
    );
    let c = client(1);
    let a = send_from(&mut lab, c, 40_000, IPPROTO_TCP, TCP_SYN);
    let first = entry(&lab, c, 40_000, IPPROTO_TCP).expect("the SYN made an entry");
    assert_eq!((first.backend, first.flags), (a, 0));
    assert_eq!(inserts(&lab), (1, 0));
    for _ in 0..3 {
        assert_eq!(send_from(&mut lab, c, 40_000, IPPROTO_TCP, TCP_SYN), a);
    }
    assert_eq!(
        inserts(&lab),
        (1, 0),
        "a SYN that picks the backend its entry names wrote an entry"
    );
    let e = entry(&lab, c, 40_000, IPPROTO_TCP).unwrap();
    assert_eq!((e.backend, e.generation), (first.backend, first.generation));
    // A FIN marks the entry closed; a later SYN on the same 5-tuple (a new
    // connection) reopens it, still without a new entry.
    send_from(&mut lab, c, 40_000, IPPROTO_TCP, TCP_FIN | TCP_ACK);
    assert_eq!(
        entry(&lab, c, 40_000, IPPROTO_TCP).unwrap().flags,
        FLOW_F_CLOSED
    );
    send_from(&mut lab, c, 40_000, IPPROTO_TCP, TCP_SYN);
    assert_eq!(entry(&lab, c, 40_000, IPPROTO_TCP).unwrap().flags, 0);
    assert_eq!(inserts(&lab), (1, 0));
}

/// The data plane's clock at the start of a test (user space writes it).
const START: u32 = 1_000;

/// Moves the data plane's clock to `now`, keeping the other settings.
fn set_clock(lab: &mut Lab, ct: ConntrackSettings, now: u32) {
    lab.dp
        .set_conntrack_settings(ConntrackSettings { now, ..ct })
        .unwrap();
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_closed_tcp_entry_lapses_after_the_closed_timeout_an_open_one_does_not() {
    require_root();
    let ct = ConntrackSettings {
        closed_timeout: 10,
        tcp_idle_timeout: 3_600,
        now: START,
        ..ConntrackSettings::default()
    };
    let mut lab = setup_with(lab_capacity(RING), IPPROTO_TCP, ct, 0);
    let (open, closed) = (client(2), client(3));
    send_from(&mut lab, open, 40_001, IPPROTO_TCP, TCP_SYN);
    send_from(&mut lab, closed, 40_002, IPPROTO_TCP, TCP_SYN);
    send_from(&mut lab, closed, 40_002, IPPROTO_TCP, TCP_RST);
    assert_eq!(
        entry(&lab, closed, 40_002, IPPROTO_TCP).unwrap().flags,
        FLOW_F_CLOSED
    );
    // At the timeout the entry still stands; one second later it lapsed.
    set_clock(&mut lab, ct, START + 10);
    let before = new_flows(&lab);
    send_from(&mut lab, closed, 40_002, IPPROTO_TCP, TCP_ACK);
    assert_eq!(new_flows(&lab), before, "the closed entry lapsed early");
    set_clock(&mut lab, ct, START + 21);
    send_from(&mut lab, open, 40_001, IPPROTO_TCP, TCP_ACK);
    assert_eq!(
        new_flows(&lab),
        before,
        "the open connection's entry lapsed"
    );
    send_from(&mut lab, closed, 40_002, IPPROTO_TCP, TCP_ACK);
    assert_eq!(
        new_flows(&lab),
        before + 1,
        "the closed connection's entry outlived the closed timeout"
    );
    // The lapsed entry was replaced by a fresh, open one.
    assert_eq!(entry(&lab, closed, 40_002, IPPROTO_TCP).unwrap().flags, 0);
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn idle_entries_lapse_after_their_services_timeout_or_the_protocols() {
    require_root();
    // The service's own timeout (30 s) over a long UDP default.
    let long = ConntrackSettings {
        udp_idle_timeout: 3_600,
        now: START,
        ..ConntrackSettings::default()
    };
    let mut own = setup_with(lab_capacity(RING), IPPROTO_UDP, long, 30);
    // The protocol's default (30 s), the service having none.
    let short = ConntrackSettings {
        udp_idle_timeout: 30,
        ..long
    };
    let mut default = setup_with(lab_capacity(RING), IPPROTO_UDP, short, 0);
    for (lab, ct) in [(&mut own, long), (&mut default, short)] {
        let c = client(4);
        send_from(lab, c, 40_003, IPPROTO_UDP, 0);
        // Idle for the timeout: still pinned, and the packet refreshes it.
        set_clock(lab, ct, START + 30);
        send_from(lab, c, 40_003, IPPROTO_UDP, 0);
        assert_eq!(new_flows(lab), 1, "the entry lapsed at its timeout");
        assert_eq!(
            entry(lab, c, 40_003, IPPROTO_UDP).unwrap().last_seen,
            START + 30
        );
        // Idle past it: lapsed, the next datagram is a new flow.
        set_clock(lab, ct, START + 61);
        send_from(lab, c, 40_003, IPPROTO_UDP, 0);
        assert_eq!(new_flows(lab), 2, "the idle entry did not lapse");
    }
}

/// Entries of the flood's lab: room for the established flows and a
/// second's budget, far fewer than the flood's flows.
const FLOOD_TABLE: u32 = 4_096;
/// Flows established before the flood.
const ESTABLISHED: u16 = 200;
/// The flood: new flows from spoofed sources, 40x the established ones.
const FLOOD: u32 = 8_000;
/// The insert budget under test, per CPU per second.
const BUDGET: u32 = 1_000;

/// Establishes `ESTABLISHED` flows, floods `FLOOD` SYNs of new flows, then
/// adds a backend. Returns the established flows that kept their backend
/// and the inserts refused.
fn flood(budget: u32) -> (usize, u64) {
    let capacity = Capacity {
        conntrack_entries: FLOOD_TABLE,
        ..lab_capacity(RING)
    };
    let ct = ConntrackSettings {
        inserts_per_cpu: budget,
        ..ConntrackSettings::default()
    };
    let mut lab = setup_with(capacity, IPPROTO_TCP, ct, 0);
    let established: Vec<(u16, u32)> = (1..=ESTABLISHED)
        .map(|sport| {
            (
                sport,
                send_from(&mut lab, client(5), sport, IPPROTO_TCP, TCP_SYN),
            )
        })
        .collect();
    for n in 0..FLOOD {
        let src = flood_client(0x8000 + n);
        send_from(
            &mut lab,
            src,
            1024 + (n % 60_000) as u16,
            IPPROTO_TCP,
            TCP_SYN,
        );
    }
    // A backend added during the flood: the table moves about a quarter of
    // its slots, so every flow that lost its entry has a fair chance to move.
    lab.backend(4, ip([198, 18, 0, 14]), true, 1).unwrap();
    let key = service_key(ip(VIP), PORT, IPPROTO_TCP);
    lab.service(0, key, 0, &[(1, 1), (2, 1), (3, 1), (4, 1)])
        .unwrap();
    let kept = established
        .iter()
        .filter(|&&(sport, b)| send_from(&mut lab, client(5), sport, IPPROTO_TCP, TCP_ACK) == b)
        .count();
    (kept, inserts(&lab).1)
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_flood_of_new_flows_spends_the_insert_budget_not_the_established_entries() {
    require_root();
    // The budget is per CPU: every frame must meet the same CPU's.
    lb_tests::pin_to_this_cpu().unwrap();
    let (kept, refused) = flood(BUDGET);
    assert_eq!(
        kept, ESTABLISHED as usize,
        "established flows moved when a backend was added during the flood"
    );
    // The lab's clock stands still: one second's budget, all of it.
    assert_eq!(
        refused,
        u64::from(FLOOD) + u64::from(ESTABLISHED) - u64::from(BUDGET),
        "the budget let in more or fewer than one second's entries"
    );
    // Without the budget the same flood evicts established entries, and
    // the backend added moves some of those flows: the budget is what
    // keeps them.
    let (kept, refused) = flood(0);
    assert_eq!(refused, 0);
    assert!(
        kept < ESTABLISHED as usize,
        "without a budget the flood evicted nothing: the test proves nothing"
    );
}

/// An established flow finds its service through the id its entry keeps;
/// the id's slot must still serve the flow's address and port. Removing the
/// service stops its established flows at once, and a service that reuses
/// the id (another address) inherits none of them.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn an_entry_outliving_its_service_is_not_taken_for_the_service_reusing_its_id() {
    require_root();
    let (mut lab, key) = setup(IPPROTO_TCP);
    let sport = 41_000;
    let a = send(&mut lab, sport, IPPROTO_TCP, TCP_SYN);
    let e = entry(&lab, CLIENT, sport, IPPROTO_TCP).expect("the SYN made an entry");
    assert_eq!((e.backend, e.service), (a, 0));
    assert_eq!(send(&mut lab, sport, IPPROTO_TCP, TCP_ACK), a);

    lab.dp.remove_service(&key).unwrap();
    let ack = frame(CLIENT, sport, IPPROTO_TCP, TCP_ACK);
    let v = lab.run(PROG_LB, &ack).unwrap();
    assert_eq!(
        v.out, ack,
        "a removed service's established flow was touched"
    );
    assert_ne!(
        v.action, TX,
        "a removed service's established flow was forwarded"
    );

    // Id 0 now belongs to a service elsewhere, with backend 3 alone.
    let other = service_key(ip([198, 18, 1, 2]), PORT, IPPROTO_TCP);
    lab.service(0, other, 0, &[(3, 1)]).unwrap();
    let v = lab.run(PROG_LB, &ack).unwrap();
    assert_ne!(
        v.action, TX,
        "the old flow was taken for the id's new service"
    );

    // The service back under another id: its old flow follows the table and
    // its entry is made again, naming the new id.
    let ring = lab.service(1, key, 0, &[(1, 1), (2, 1), (3, 1)]).unwrap();
    let want = slot_owner(&ring, sport, IPPROTO_TCP);
    assert_eq!(send(&mut lab, sport, IPPROTO_TCP, TCP_ACK), want);
    let e = entry(&lab, CLIENT, sport, IPPROTO_TCP).unwrap();
    assert_eq!((e.backend, e.service), (want, 1));
}

/// Entries of the fill test's table: 128 groups of 16 buckets of 4.
const FILL_TABLE: u32 = 8_192;

/// A lab with the fill tests' table, no aging and no insert budget.
fn fill_lab() -> Lab {
    let capacity = Capacity {
        conntrack_entries: FILL_TABLE,
        ..lab_capacity(RING)
    };
    setup_with(capacity, IPPROTO_TCP, ConntrackSettings::default(), 0)
}

/// Sends a SYN of each of `flows` fresh flows from the flood's clients,
/// from client `first` on, with the clock at `now`; returns them as
/// (client, port).
fn fill(lab: &mut Lab, first: u32, flows: u32, now: u32) -> Vec<([u8; 4], u16)> {
    set_clock(lab, ConntrackSettings::default(), now);
    (first..first + flows)
        .map(|n| {
            let (src, sport) = (flood_client(n), 1024 + (n % 60_000) as u16);
            send_from(lab, src, sport, IPPROTO_TCP, TCP_SYN);
            (src, sport)
        })
        .collect()
}

/// How many of `flows` (client, port) have an entry.
fn held(lab: &Lab, flows: &[([u8; 4], u16)]) -> usize {
    flows
        .iter()
        .filter(|&&(src, sport)| entry(lab, src, sport, IPPROTO_TCP).is_some())
        .count()
}

/// The table is buckets of four entries, and a flow may live in either of
/// two buckets: a quarter full, it holds every flow put in it; half full,
/// all but a few in ten thousand (docs/dataplane.md: size it at twice the
/// flows).
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_quarter_full_table_holds_every_flow_and_a_half_full_one_nearly_all() {
    require_root();
    let mut lab = fill_lab();
    let mut half = fill(&mut lab, 0, FILL_TABLE / 4, 100);
    assert_eq!(
        held(&lab, &half),
        half.len(),
        "a quarter-full table lost entries"
    );
    half.extend(fill(&mut lab, FILL_TABLE / 4, FILL_TABLE / 4, 100));
    let lost = half.len() - held(&lab, &half);
    assert!(
        lost * 1000 <= half.len(),
        "a half-full table lost {lost} of {} entries",
        half.len()
    );
    assert_eq!(inserts(&lab), (u64::from(FILL_TABLE / 2), 0));
}

/// `count` flows of the fill test's table (client, port) whose two buckets
/// are the same two: found with the data plane's own hash and placement.
fn sharing_buckets(lab: &Lab, count: usize) -> Vec<([u8; 4], u16)> {
    let buckets = lab.dp.capacity().conntrack_buckets();
    let place = |src: [u8; 4], sport: u16| {
        let mut pair = flow_buckets(bucket_hash(&flow(src, sport, IPPROTO_TCP)), buckets);
        pair.sort_unstable();
        pair
    };
    let first = place(client(1), 1024);
    let mut found = vec![(client(1), 1024)];
    for n in 0u32.. {
        let src = flood_client(n);
        for sport in [2000, 3000, 4000, 5000] {
            if place(src, sport) == first {
                found.push((src, sport));
                if found.len() == count {
                    return found;
                }
            }
        }
    }
    unreachable!()
}

/// Two full buckets: a new flow of theirs replaces the entry seen least
/// recently, whichever bucket it is in; a flow seen since keeps its entry.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_new_flow_in_full_buckets_replaces_the_least_recently_seen_entry() {
    require_root();
    let mut lab = fill_lab();
    let ways = 2 * CONNTRACK_WAYS as usize;
    let flows = sharing_buckets(&lab, ways + 1);
    let ct = ConntrackSettings::default();
    // Flow i arrives at second 100 + i: the two buckets are full.
    for (i, &(src, sport)) in flows[..ways].iter().enumerate() {
        set_clock(&mut lab, ct, 100 + i as u32);
        send_from(&mut lab, src, sport, IPPROTO_TCP, TCP_SYN);
    }
    // The first flow sends again, so the second is now the idlest.
    set_clock(&mut lab, ct, 200);
    let (src, sport) = flows[0];
    send_from(&mut lab, src, sport, IPPROTO_TCP, TCP_ACK);
    let (src, sport) = flows[ways];
    send_from(&mut lab, src, sport, IPPROTO_TCP, TCP_SYN);
    let kept: Vec<bool> = flows.iter().map(|f| held(&lab, &[*f]) == 1).collect();
    let mut want = vec![true; ways + 1];
    want[1] = false;
    assert_eq!(kept, want, "entries held, flow by flow");
}

/// A pin directory on a bpffs of its own, unmounted and removed on drop
/// (fields drop in order: the bpffs before its directory).
struct Pins {
    bpffs: PrivateBpffs,
    _scratch: Scratch,
}

impl Pins {
    fn new(tag: &str) -> Pins {
        let scratch = Scratch::new(tag).unwrap();
        Pins {
            bpffs: PrivateBpffs::mount(&scratch.dir).unwrap(),
            _scratch: scratch,
        }
    }

    fn path(&self) -> std::path::PathBuf {
        self.bpffs.path().join("lb")
    }
}

/// The connection table pinned under `pins`.
fn pinned_table(pins: &std::path::Path) -> Array<MapData, FlowEntry> {
    let map = MapData::from_pin(pins.join(lb_common::maps::CONNTRACK)).unwrap();
    Array::try_from(Map::Array(map)).unwrap()
}

/// Writes `key`'s entry pinning it to `v` in the first way of its first
/// bucket of `table`, as a program would.
fn put(table: &mut Array<MapData, FlowEntry>, key: &FlowKey, v: FlowValue) {
    let at = flow_buckets(bucket_hash(key), table.len() / CONNTRACK_WAYS)[0];
    table
        .set(at, FlowEntry::new(key, &v, bucket_hash(key)), 0)
        .unwrap();
}

/// A source the lists of [`listed_config`] may deny.
const DENIED: [u8; 4] = [198, 18, 2, 10];

/// A configuration of one service, `web` (the flows of [`flow`]), denying
/// `deny` (TOML strings), with its state file at `state_file`.
fn listed_config(state_file: &std::path::Path, deny: &str) -> config::Desired {
    config::parse(&format!(
        "[settings]\ninterfaces = ['lbt0']\nmax_services = 4\nmax_backends = 16\n\
         conntrack_entries = 8192\nstate_file = '{}'\n\n[[service]]\nname = 'web'\n\
         vip = '198.18.1.1'\nport = 80\nprotocol = 'tcp'\ndeny = [{deny}]\n\
         [[service.backend]]\naddress = '198.18.0.11'\n",
        state_file.display()
    ))
    .unwrap()
}

/// A restart with another table size carries the table over in two steps:
/// what the previous program's table holds when the new data plane loads,
/// and, once the new program runs, what the previous program wrote
/// meanwhile (it keeps its table until it is replaced). A late entry
/// replaces the one the new program made when the flow's packet missed:
/// the previous table has the backend the connection is on.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn entries_the_previous_program_writes_while_its_table_is_carried_follow_it() {
    require_root();
    let pins = Pins::new("carry");
    let capacity = |entries| Capacity {
        conntrack_entries: entries,
        ..lab_capacity(RING)
    };
    let value = |backend| FlowValue {
        backend,
        generation: 1,
        last_seen: 7,
        flags: 0,
        service: 0,
    };
    let (early, late) = (
        flow(CLIENT, 40000, IPPROTO_TCP),
        flow(CLIENT, 40001, IPPROTO_TCP),
    );
    let (mut previous, _) =
        Dataplane::load_pinned(capacity(4096), &pins.path(), KernelLogLevel::Off).unwrap();
    // The flows' service, id 0: an entry holds the client's side, and the
    // service completes its flow.
    previous
        .publish_service(&early.service_key(), 0, 0, 0, &[NO_BACKEND; RING as usize])
        .unwrap();
    let mut old_writer = pinned_table(&pins.path());
    put(&mut old_writer, &early, value(1));

    let (mut next, _) =
        Dataplane::load_pinned(capacity(8192), &pins.path(), KernelLogLevel::Off).unwrap();
    let mut new_table = pinned_table(&pins.path());
    assert_eq!(new_table.len(), 8192);
    assert_eq!(next.conntrack(&early).unwrap(), Some(value(1)));
    assert_eq!(next.conntrack(&late).unwrap(), None);
    // Before the new program replaces it, the previous one pins `late` to
    // backend 2; the new one, missing it, then pins it to backend 3.
    put(&mut old_writer, &late, value(2));
    put(&mut new_table, &late, value(3));
    assert_eq!(next.conntrack(&late).unwrap(), Some(value(3)));

    assert_eq!(next.conntrack_carry_late().unwrap(), Some(1));
    assert_eq!(next.conntrack(&late).unwrap(), Some(value(2)));
    assert_eq!(next.conntrack(&early).unwrap(), Some(value(1)));
    let copies = next
        .conntrack_dump()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.same_flow(&late))
        .count();
    assert_eq!(copies, 1, "one entry per flow");
    // Once only.
    assert_eq!(next.conntrack_carry_late().unwrap(), None);
}

/// The previous program's late entries were never checked against the
/// lists, which may have changed while no daemon ran (here a deny prefix
/// added): the late carry forgets the flows they refuse, as the start did
/// for the entries carried first.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_late_carry_forgets_the_flows_of_sources_the_lists_now_refuse() {
    require_root();
    let pins = Pins::new("carry-lists");
    let scratch = Scratch::new("carry-lists-state").unwrap();
    let desired = listed_config(&scratch.dir.join("state.json"), "'198.18.2.10/32'");
    let capacity = desired.settings.capacity;
    let (allowed, denied) = (
        flow(CLIENT, 40000, IPPROTO_TCP),
        flow(DENIED, 40000, IPPROTO_TCP),
    );
    let (mut previous, _) = Dataplane::load_pinned(
        Capacity {
            conntrack_entries: 4096,
            ..capacity
        },
        &pins.path(),
        KernelLogLevel::Off,
    )
    .unwrap();
    // The service as the previous daemon left it, id 0, before the deny
    // prefix was added.
    let service = 0;
    previous
        .publish_service(
            &allowed.service_key(),
            service,
            0,
            0,
            &[NO_BACKEND; RING as usize],
        )
        .unwrap();
    let mut old_writer = pinned_table(&pins.path());
    let (next, _) = Dataplane::load_pinned(capacity, &pins.path(), KernelLogLevel::Off).unwrap();
    let (mut ctl, _) = Controller::new(
        next,
        desired,
        Runtime::default(),
        Resolution::default(),
        None,
    )
    .unwrap();
    assert_eq!(ctl.services()["web"].id, service, "adopted");
    let value = FlowValue {
        backend: 0,
        generation: 1,
        last_seen: 7,
        flags: 0,
        service,
    };
    // Before the new program replaces it, the previous one pins both.
    put(&mut old_writer, &allowed, value);
    put(&mut old_writer, &denied, value);

    assert_eq!(ctl.carry_late_flows().unwrap(), Some(2));
    assert_eq!(ctl.dataplane().conntrack(&allowed).unwrap(), Some(value));
    assert_eq!(ctl.dataplane().conntrack(&denied).unwrap(), None);
}

/// A change to the lists that fails part way is undone whole: the lists
/// it had made live admitted new flows the lists put back refuse (here a
/// deny prefix dropped, then the state file unwritable), and their entries
/// go with the undo.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_failed_change_to_the_lists_forgets_the_flows_it_admitted() {
    require_root();
    let pins = Pins::new("undo-lists");
    let scratch = Scratch::new("undo-lists-state").unwrap();
    let state_dir = scratch.dir.join("state");
    let state_file = state_dir.join("state.json");
    let listed = listed_config(&state_file, "'198.18.2.10/32'");
    let (dp, _) =
        Dataplane::load_pinned(listed.settings.capacity, &pins.path(), KernelLogLevel::Off)
            .unwrap();
    let (mut ctl, _) =
        Controller::new(dp, listed, Runtime::default(), Resolution::default(), None).unwrap();
    // The state file can no longer be written: a file where its directory was.
    std::fs::remove_dir_all(&state_dir).unwrap();
    std::fs::write(&state_dir, b"").unwrap();

    // The change drops the deny prefix; once live, it admits the source.
    let denied = flow(DENIED, 40000, IPPROTO_TCP);
    let value = FlowValue {
        backend: 0,
        generation: 1,
        last_seen: 7,
        flags: 0,
        service: ctl.services()["web"].id,
    };
    put(&mut pinned_table(&pins.path()), &denied, value);
    assert_eq!(ctl.dataplane().conntrack(&denied).unwrap(), Some(value));

    let e = ctl
        .apply(listed_config(&state_file, ""), false)
        .unwrap_err();
    assert!(format!("{e:#}").contains("nothing changed"), "{e:#}");
    assert_eq!(
        ctl.services()["web"].config.deny.len(),
        1,
        "the lists put back"
    );
    assert_eq!(ctl.dataplane().conntrack(&denied).unwrap(), None);
}

/// An entry of a removed service holds its client's side only, and no slot
/// completes its flow: the dump leaves it out, but it counts as in use and
/// a full flush clears it.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_full_flush_clears_the_entries_of_removed_services_too() {
    require_root();
    let pins = Pins::new("flush");
    let (mut dp, _) =
        Dataplane::load_pinned(lab_capacity(RING), &pins.path(), KernelLogLevel::Off).unwrap();
    let (served, orphan) = (
        flow(CLIENT, 40000, IPPROTO_TCP),
        flow(CLIENT, 40001, IPPROTO_TCP),
    );
    dp.publish_service(&served.service_key(), 0, 0, 0, &[NO_BACKEND; RING as usize])
        .unwrap();
    let mut table = pinned_table(&pins.path());
    let buckets = table.len() / CONNTRACK_WAYS;
    // Service 1 was never published (or was removed): its slot is empty.
    for (key, service) in [(served, 0), (orphan, 1)] {
        let value = FlowValue {
            backend: 1,
            generation: 1,
            last_seen: 7,
            flags: 0,
            service,
        };
        let at = flow_buckets(bucket_hash(&key), buckets)[0];
        table
            .set(at, FlowEntry::new(&key, &value, bucket_hash(&key)), 0)
            .unwrap();
    }
    let (dumped, in_use) = dp.conntrack_dump_counted().unwrap();
    assert_eq!(dumped.len(), 1);
    assert!(dumped[0].0.same_flow(&served));
    assert_eq!(in_use, 2);
    assert_eq!(dp.conntrack_clear_in_use().unwrap(), 2);
    assert_eq!(dp.conntrack_dump_counted().unwrap().1, 0);
}

/// The data plane counts a forward in its backend's counters only: a
/// backend adopted from the pins before it had forwarded anything is
/// counted, in the global counters too, once it does.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn an_adopted_backend_without_counts_is_counted_once_it_forwards() {
    require_root();
    let pins = Pins::new("counts");
    let load = || {
        let (dp, adopted) =
            Dataplane::load_pinned(lab_capacity(RING), &pins.path(), KernelLogLevel::Off).unwrap();
        let mut lab = Lab {
            dp,
            ring_size: RING,
        };
        lab.dp.set_settings(lab_settings()).unwrap();
        lab.dp.set_interface(&lab_interface(MTU)).unwrap();
        (lab, adopted)
    };
    let (mut lab, adopted) = load();
    assert!(!adopted);
    lab.backend(1, ip([198, 18, 0, 11]), true, 1).unwrap();
    let key = service_key(ip(VIP), PORT, IPPROTO_TCP);
    lab.service(0, key, 0, &[(1, 1)]).unwrap();
    drop(lab);
    let (mut lab, adopted) = load();
    assert!(adopted);
    assert_eq!(send(&mut lab, 40000, IPPROTO_TCP, TCP_SYN), 1);
    assert_eq!(lab.counter(Counter::ForwardDsr).unwrap(), 1);
    assert_eq!(lab.dp.backend_stats(1).unwrap().packets(), 1);
    assert_eq!(lab.dp.service_stats(0, &[1]).unwrap().packets, 1);
}
