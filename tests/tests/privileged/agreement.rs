//! Agreement: for thousands of random flows, the backend the XDP program
//! picks is the one user space computes from the same table and hash; and a
//! table changed in place, or moved by a change of size, reads back as
//! written.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb::maglev::is_prime;
use lb_common::{
    FlowKey, addr_bytes,
    hash::{flow_hash, maglev_slot},
    limits::DEFAULT_RING_SIZE,
    maps::PROG_LB,
    wire::*,
};
use lb_tests::{
    lab::{LB_MAC, Lab, ROUTER_MAC, TX, backend_of_mac, service_key, tcp4_frame},
    packet::{self, Ipv4},
    require_root,
};

/// Random flows per address family.
const FLOWS_PER_FAMILY: usize = 5_000;

/// xorshift64*: a deterministic stream, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn kernel_and_user_space_pick_the_same_backend() {
    require_root();
    let mut lab = Lab::new(DEFAULT_RING_SIZE).expect("load");
    // Tables of two sizes, so each packet's slot comes from its own.
    const SMALL: u32 = 4_099;
    let vip4 = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1));
    let vip6 = IpAddr::V6(Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 1));
    // Ten IPv4 backends weighted 1..=10, seven IPv6 ones of equal weight.
    let mut members4 = Vec::new();
    for i in 0..10u32 {
        lab.backend(
            i,
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + i as u8)),
            true,
            1,
        )
        .unwrap();
        members4.push((i, i + 1));
    }
    let mut members6 = Vec::new();
    for i in 10..17u32 {
        lab.backend(
            i,
            IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, i as u16)),
            true,
            1,
        )
        .unwrap();
        members6.push((i, 1));
    }
    let key4 = service_key(vip4, 80, IPPROTO_TCP);
    let key6 = service_key(vip6, 443, IPPROTO_TCP);
    let built4 = lab.service(0, key4, 0, &members4).unwrap();
    lab.ring_size = SMALL;
    let built6 = lab.service(1, key6, 0, &members6).unwrap();
    // User space's view: the table as the kernel holds it (and as built).
    let live4 = lab.dp.live_ring(&key4).unwrap();
    let live6 = lab.dp.live_ring(&key6).unwrap();
    assert_eq!(live4, built4);
    assert_eq!(live6, built6);
    // A change is stored in place and reads back; then the first table
    // again.
    let fewer = lab.service(1, key6, 0, &members6[1..]).unwrap();
    assert_ne!(fewer, built6);
    assert_eq!(lab.dp.live_ring(&key6).unwrap(), fewer);
    assert_eq!(lab.service(1, key6, 0, &members6).unwrap(), built6);
    assert_eq!(lab.dp.live_ring(&key6).unwrap(), built6);

    let mut rng = Rng(0x1b_2f3c_4d5e);
    let mut checked = 0usize;
    let mut hits = vec![0usize; 17];
    for family in [4, 6] {
        for _ in 0..FLOWS_PER_FAMILY {
            let r = rng.next();
            let sport = (r >> 16) as u16 | 1024;
            let (client, vip, dport, live) = if family == 4 {
                let c = Ipv4Addr::new(198, 18, (r >> 40) as u8 & 1, (r >> 48) as u8);
                (IpAddr::V4(c), vip4, 80, &live4)
            } else {
                let c = Ipv6Addr::new(
                    0x2001,
                    2,
                    2,
                    (r >> 32) as u16,
                    0,
                    0,
                    (r >> 48) as u16,
                    r as u16,
                );
                (IpAddr::V6(c), vip6, 443, &live6)
            };
            let seg = packet::tcp(client, vip, sport, dport, TCP_SYN, b"");
            let frame = match (client, vip) {
                (IpAddr::V4(c), IpAddr::V4(v)) => packet::ethernet(
                    LB_MAC,
                    ROUTER_MAC,
                    &[],
                    ETH_P_IP,
                    &Ipv4::new(c.octets(), v.octets(), IPPROTO_TCP).build(&seg),
                ),
                (IpAddr::V6(c), IpAddr::V6(v)) => packet::ethernet(
                    LB_MAC,
                    ROUTER_MAC,
                    &[],
                    ETH_P_IPV6,
                    &packet::ipv6(c.octets(), v.octets(), IPPROTO_TCP, &[], &seg),
                ),
                _ => unreachable!(),
            };
            let v = lab.run(PROG_LB, &frame).unwrap();
            assert_eq!(v.action, TX);
            let kernel = backend_of_mac(&v.out[0..6]);
            let (src, fam) = addr_bytes(client);
            let (dst, _) = addr_bytes(vip);
            let flow = FlowKey {
                src,
                dst,
                sport: sport.to_be(),
                dport: dport.to_be(),
                proto: IPPROTO_TCP,
                family: fam,
                _pad: [0; 2],
            };
            let user = live[maglev_slot(flow_hash(&flow, false), live.len() as u32) as usize];
            assert_eq!(kernel, user, "flow {client}:{sport} -> {vip}:{dport}");
            hits[kernel as usize] += 1;
            checked += 1;
        }
    }
    // Every backend got traffic, so the check covered the whole table.
    assert!(hits.iter().all(|&h| h > 0), "{hits:?}");
    eprintln!("agreement: {checked} packets checked, per-backend hits {hits:?}");
}

/// A change stores only the slots that differ, in place: the table stays
/// where it is and reads back as written. A table of another size is
/// written whole elsewhere, and the one it replaced is held back: undoing
/// the change takes it back, storing only what differs.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn changes_are_stored_in_place_and_a_new_size_moves_the_table() {
    require_root();
    const RING: u32 = 4_099;
    let mut lab = Lab::new(RING).expect("load");
    let members: Vec<(u32, u32)> = (0..20u32).map(|i| (i, 1)).collect();
    for &(id, _) in &members {
        lab.backend(
            id,
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + id as u8)),
            true,
            1,
        )
        .unwrap();
    }
    let key = service_key(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)), 80, IPPROTO_TCP);
    let mut table = lab.service(0, key, 0, &members).unwrap();
    let home = lab.dp.service(&key).unwrap().unwrap().ring_offset;
    let mut rng = Rng(0x05ee_d0fd_e17a);
    for round in 0..40 {
        let mut next = table.clone();
        for _ in 0..rng.next() % 300 {
            next[(rng.next() % u64::from(RING)) as usize] = (rng.next() % 20) as u32;
        }
        let differ = table.iter().zip(&next).filter(|(a, b)| a != b).count();
        let stored = lab.dp.publish_service(&key, 0, 0, 0, &next).unwrap();
        assert_eq!(stored, differ, "round {round}");
        assert_eq!(lab.dp.live_ring(&key).unwrap(), next, "round {round}");
        let value = lab.dp.service(&key).unwrap().unwrap();
        assert_eq!((value.ring_offset, value.ring_size), (home, RING));
        table = next;
    }

    // Another size: written whole, elsewhere.
    let larger = (RING + 1..).find(|&n| is_prime(n)).unwrap();
    lab.ring_size = larger;
    let free = lab.dp.free_ring_slots();
    let moved = lab.service(0, key, 0, &members).unwrap();
    let value = lab.dp.service(&key).unwrap().unwrap();
    assert_eq!(value.ring_size, larger);
    assert_ne!(value.ring_offset, home);
    assert_eq!(lab.dp.live_ring(&key).unwrap(), moved);
    // The old table's slots are held back, not freed.
    assert_eq!(lab.dp.free_ring_slots(), free - u64::from(larger));

    // Undone: back where it was, with only the slots the last table lacks
    // stored.
    let mut undo = table.clone();
    undo[0] = (undo[0] + 1) % 20;
    let stored = lab.dp.publish_service(&key, 0, 0, 0, &undo).unwrap();
    assert_eq!(stored, 1, "the old slots held the old table");
    let value = lab.dp.service(&key).unwrap().unwrap();
    assert_eq!((value.ring_offset, value.ring_size), (home, RING));
    assert_eq!(lab.dp.live_ring(&key).unwrap(), undo);
}

/// Under traffic (another thread running new flows through the program
/// without pause), 100 random changes (weights, backends added and
/// removed, and every 25th a table of another size, which moves it) never
/// send a packet to a backend outside the table before the change or after
/// it: each packet is checked against the tables of the changes under way
/// while it ran. A change writes its new backends first, then the table in
/// place, then takes the old ones down, as the daemon does.
#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn changes_under_traffic_send_packets_only_to_the_tables_before_and_after() {
    use std::{
        collections::BTreeSet,
        os::fd::AsFd as _,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
    };

    require_root();
    const RING: u32 = 4_099;
    const BACKENDS: u32 = 16;
    const CHANGES: u64 = 100;
    let other_size = (RING + 1..).find(|&n| is_prime(n)).unwrap();
    let mut lab = Lab::new(other_size).expect("load");
    lab.ring_size = RING;
    let ip = |id: u32| IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + id as u8));
    let key = service_key(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)), 80, IPPROTO_TCP);
    let mut rng = Rng(0x7ab1_e5ca_1e00);
    let mut members: Vec<(u32, u32)> = (0..8).map(|id| (id, 1)).collect();
    for &(id, _) in &members {
        lab.backend(id, ip(id), true, 1).unwrap();
    }
    let first = lab.service(0, key, 0, &members).unwrap();
    let holders = |t: &[u32]| -> BTreeSet<u32> { t.iter().copied().collect() };
    // tables[i]: the backends holding slots after change i (0: before any).
    let mut tables = vec![holders(&first)];
    // Odd while change (epoch + 1) / 2 is being written.
    let epoch = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let prog = lab
        .dp
        .program(PROG_LB)
        .unwrap()
        .fd()
        .unwrap()
        .try_clone()
        .unwrap();
    let traffic = {
        let (epoch, stop) = (epoch.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x0dd_ba11);
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = rng.next();
                let client = Ipv4Addr::new(198, 18, 2 + (r >> 56) as u8 % 2, (r >> 48) as u8);
                let frame = tcp4_frame(
                    client.octets(),
                    [198, 18, 1, 1],
                    (r as u16) | 1024,
                    80,
                    TCP_SYN,
                );
                let before = epoch.load(Ordering::SeqCst);
                let v = lb_tests::lab::test_run_fd(prog.as_fd(), &frame).unwrap();
                let after = epoch.load(Ordering::SeqCst);
                let backend = (v.action == TX).then(|| backend_of_mac(&v.out[0..6]));
                seen.push((before, after, backend));
            }
            seen
        })
    };
    for change in 1..=CHANGES {
        let before: BTreeSet<u32> = members.iter().map(|m| m.0).collect();
        // Weights anew; one backend in or out (at least two stay).
        for m in &mut members {
            m.1 = 1 + (rng.next() % 4) as u32;
        }
        let id = (rng.next() % u64::from(BACKENDS)) as u32;
        match members.iter().position(|m| m.0 == id) {
            Some(i) if members.len() > 2 => {
                members.remove(i);
            }
            Some(_) => {}
            None => members.push((id, 1)),
        }
        if change % 25 == 0 {
            lab.ring_size = if lab.ring_size == RING {
                other_size
            } else {
                RING
            };
        }
        let after: BTreeSet<u32> = members.iter().map(|m| m.0).collect();
        epoch.store(2 * change - 1, Ordering::SeqCst);
        for &id in after.difference(&before) {
            lab.backend(id, ip(id), true, 1).unwrap();
        }
        let table = lab.service(0, key, 0, &members).unwrap();
        for &id in before.difference(&after) {
            lab.backend(id, ip(id), false, 1).unwrap();
        }
        epoch.store(2 * change, Ordering::SeqCst);
        tables.push(holders(&table));
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.join().unwrap();
    let mut by_backend = vec![0usize; BACKENDS as usize];
    let mut dropped = 0;
    let mut during = 0;
    for &(before, after, backend) in &seen {
        // The tables a packet may have read: from the last one complete
        // when it started to the first complete when it ended.
        let (from, to) = (before / 2, after.div_ceil(2));
        during += usize::from(before % 2 == 1 || after != before);
        let Some(b) = backend else {
            dropped += 1;
            continue;
        };
        assert!(
            (from..=to).any(|t| tables[t as usize].contains(&b)),
            "backend {b} took a packet sent during tables {from}..={to}"
        );
        by_backend[b as usize] += 1;
    }
    eprintln!(
        "changes under traffic: {} packets, {during} during a change, {dropped} dropped, by backend {by_backend:?}",
        seen.len()
    );
    assert!(during > 0, "no packet ran while a change was written");
    assert!(seen.len() > 1_000, "too little traffic: {}", seen.len());
}
