//! A packet without a connection-table entry finds its service through the
//! service index, and through the services hash wherever the index does not
//! name it: a service its element had no way for, an element emptied or
//! naming other services (as a packet may read it mid-write). Never another
//! service's backend, and never a service for a port that has none.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{
    Counter, ServiceIndexEntry, ServiceKey,
    hash::service_index,
    limits::{NO_SERVICE, SERVICE_INDEX_WAYS},
    maps::{PROG_LB, SERVICE_INDEX},
    wire::*,
};
use lb_tests::{
    lab::{Lab, PASS, TX, backend_of_mac, service_key, tcp4_frame},
    require_root,
};

const RING: u32 = 251;
const CLIENT: [u8; 4] = [198, 18, 2, 9];
const VIP: [u8; 4] = [198, 18, 1, 1];

fn vip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(VIP))
}

/// The element of the TCP service on `VIP`:`port`.
fn element(port: u16) -> u32 {
    let k = service_key(vip(), port, IPPROTO_TCP);
    service_index(&k.addr, k.port, k.proto)
}

/// Where a SYN from a new client port to `VIP`:`port` goes: the backend,
/// or `None` if it passed.
fn syn(lab: &mut Lab, sport: u16, port: u16) -> Option<u32> {
    let frame = tcp4_frame(CLIENT, VIP, sport, port, TCP_SYN);
    let v = lab.run(PROG_LB, &frame).unwrap();
    match v.action {
        TX => Some(backend_of_mac(&v.out[0..6])),
        PASS => None,
        other => panic!("action {other}"),
    }
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_new_flow_finds_its_service_whether_the_index_names_it_or_not() {
    require_root();
    let mut lab = Lab::new(RING).unwrap();
    // Three ports whose services share one element of two ways, and one
    // with no service in the same element.
    let first = 80;
    let same: Vec<u16> = (1..u16::MAX)
        .filter(|&p| p != first && element(p) == element(first))
        .take(3)
        .collect();
    let ports = [first, same[0], same[1]];
    let unserved = same[2];
    let keys: Vec<ServiceKey> = ports
        .iter()
        .map(|&p| service_key(vip(), p, IPPROTO_TCP))
        .collect();
    // Service `id` on ports[id] has backend id + 1 alone.
    for (id, key) in keys.iter().enumerate() {
        let b = id as u32 + 1;
        lab.backend(
            b,
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + b as u8)),
            true,
            1,
        )
        .unwrap();
        lab.service(id as u32, *key, 0, &[(b, 1)]).unwrap();
    }
    let mut index = lab
        .array_handle::<ServiceIndexEntry>(SERVICE_INDEX)
        .unwrap();
    let at = element(first);
    // The first two in the element's ways; the third left to the hash.
    assert_eq!(index.get(&at, 0).unwrap().ids, [0, 1]);
    let mut sport = 40000;
    let mut check = |lab: &mut Lab, what: &str| {
        for (id, &port) in ports.iter().enumerate() {
            sport += 1;
            assert_eq!(
                syn(lab, sport, port),
                Some(id as u32 + 1),
                "{what}: port {port}"
            );
        }
        sport += 1;
        let passed = lab.counter(Counter::PassNotService).unwrap();
        assert_eq!(
            syn(lab, sport, unserved),
            None,
            "{what}: a port without a service"
        );
        assert_eq!(lab.counter(Counter::PassNotService).unwrap(), passed + 1);
    };
    check(&mut lab, "indexed");

    // An element emptied, and one naming the others' ids the wrong way
    // round or twice: each service still reaches its own backend.
    for ids in [
        [NO_SERVICE; SERVICE_INDEX_WAYS],
        [1, 0],
        [2, 2],
        [2, NO_SERVICE],
    ] {
        index.set(at, ServiceIndexEntry { ids }, 0).unwrap();
        check(&mut lab, &format!("element {ids:?}"));
    }

    // Removing a service frees its way for the one without (the element
    // rewritten, whatever it held); the removed one's packets pass.
    lab.dp.remove_service(&keys[0]).unwrap();
    assert_eq!(index.get(&at, 0).unwrap().ids, [1, 2]);
    sport += 1;
    assert_eq!(syn(&mut lab, sport, first), None);
    for (id, &port) in ports.iter().enumerate().skip(1) {
        sport += 1;
        assert_eq!(syn(&mut lab, sport, port), Some(id as u32 + 1));
    }
}
