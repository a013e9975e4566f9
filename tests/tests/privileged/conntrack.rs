//! The connection table keeps established flows on their backend while the
//! table changes, lets go when the backend is down or its id is reused, and
//! a SYN always re-picks.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{FlowKey, addr_bytes, hash::flow_hash, maps::PROG_LB, wire::*};
use lb_tests::{
    lab::{LB_MAC, Lab, ROUTER_MAC, TX, backend_of_mac, service_key},
    packet::{self, Ipv4},
    privileged,
};

const RING: u32 = 251;
const CLIENT: [u8; 4] = [198, 18, 2, 9];
const VIP: [u8; 4] = [198, 18, 1, 1];

fn ip(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn frame(sport: u16, proto: u8, flags: u8) -> Vec<u8> {
    let l4 = if proto == IPPROTO_TCP {
        packet::tcp(ip(CLIENT), ip(VIP), sport, 80, flags, b"data")
    } else {
        packet::udp(ip(CLIENT), ip(VIP), sport, 80, b"data")
    };
    packet::ethernet(
        LB_MAC,
        ROUTER_MAC,
        &[],
        ETH_P_IP,
        &Ipv4::new(CLIENT, VIP, proto).build(&l4),
    )
}

fn send(lab: &mut Lab, sport: u16, proto: u8, flags: u8) -> u32 {
    let v = lab.run(PROG_LB, &frame(sport, proto, flags)).unwrap();
    assert_eq!(v.action, TX);
    backend_of_mac(&v.out[0..6])
}

fn slot_owner(ring: &[u32], sport: u16, proto: u8) -> u32 {
    let (src, family) = addr_bytes(ip(CLIENT));
    let (dst, _) = addr_bytes(ip(VIP));
    let flow = FlowKey {
        src,
        dst,
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        proto,
        family,
        _pad: [0; 2],
    };
    ring[(flow_hash(&flow, false) % ring.len() as u32) as usize]
}

/// Backends 1..=3 of one service at 198.18.0.11..13.
fn setup(proto: u8) -> (Lab, lb_common::ServiceKey) {
    let mut lab = Lab::new(RING).unwrap();
    for id in 1..=3u32 {
        lab.backend(id, ip([198, 18, 0, 10 + id as u8]), true, 1)
            .unwrap();
    }
    let key = service_key(ip(VIP), 80, proto);
    lab.service(0, key, 0, &[(1, 1), (2, 1), (3, 1)]).unwrap();
    (lab, key)
}

#[test]
fn established_tcp_flow_survives_a_table_change_and_moves_when_its_backend_goes_down() {
    if !privileged() {
        return;
    }
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
fn a_reused_backend_id_does_not_inherit_old_flows() {
    if !privileged() {
        return;
    }
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
fn udp_flows_stick_too() {
    if !privileged() {
        return;
    }
    let (mut lab, key) = setup(IPPROTO_UDP);
    let sport = 50_002;
    let a = send(&mut lab, sport, IPPROTO_UDP, 0);
    let members: Vec<(u32, u32)> = (1..=3).map(|id| (id, u32::from(id != a))).collect();
    lab.service(0, key, 0, &members).unwrap();
    for _ in 0..3 {
        assert_eq!(send(&mut lab, sport, IPPROTO_UDP, 0), a);
    }
    let stats = lab.dp.service_stats(0).unwrap();
    assert_eq!(
        (stats.packets, stats.new_flows),
        (4, 1),
        "one new flow, four packets"
    );
}
