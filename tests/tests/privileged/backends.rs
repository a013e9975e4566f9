//! Backends rewritten while packets run: no packet reads a backend
//! half-written.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use lb_common::{
    BACKEND_F_UP, BackendValue, SERVICE_F_IPIP, addr_bytes,
    maps::{BACKENDS, PROG_LB},
    wire::{ETH_HLEN, ETH_P_IP, IPPROTO_UDP},
};
use lb_tests::{
    lab::{LB_MAC, Lab, ROUTER_MAC, TX, service_key},
    packet::{self, Ipv4},
    require_root,
};

const RING: u32 = 251;
const VIP: [u8; 4] = [198, 18, 1, 2];
const CLIENT: [u8; 4] = [198, 18, 2, 7];
/// Packets run while the backend is rewritten.
const PACKETS: u32 = 300_000;

/// A version of backend 1: every field a forwarded frame shows differs
/// between versions (address, MAC), and so does the generation.
fn version(last: u8, mac_byte: u8, generation: u32) -> BackendValue {
    let (addr, family) = addr_bytes(IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)));
    BackendValue {
        addr,
        mac: [0x02, mac_byte, mac_byte, mac_byte, mac_byte, mac_byte],
        family,
        flags: BACKEND_F_UP,
        generation,
        ..BackendValue::default()
    }
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_rewritten_under_traffic_is_never_read_half_written() {
    require_root();
    let mut lab = Lab::new(RING).unwrap();
    let versions = [version(11, 0xaa, 1), version(12, 0x55, 2)];
    lab.dp.set_backend(1, &versions[0]).unwrap();
    lab.service(
        0,
        service_key(IpAddr::V4(VIP.into()), 53, IPPROTO_UDP),
        SERVICE_F_IPIP,
        &[(1, 1)],
    )
    .unwrap();
    let mut writer = lab.array_handle::<BackendValue>(BACKENDS).unwrap();
    let sealed: Vec<BackendValue> = versions.iter().map(|v| v.sealed()).collect();
    let stop = AtomicBool::new(false);
    let writes = AtomicU64::new(0);
    let (mut torn, mut seen) = (Vec::new(), [0u64; 2]);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for v in &sealed {
                    writer.set(1, v, 0).unwrap();
                }
                writes.fetch_add(2, Ordering::Relaxed);
            }
        });
        for i in 0..PACKETS {
            let seg = packet::udp(
                IpAddr::V4(CLIENT.into()),
                IpAddr::V4(VIP.into()),
                (i % 50_000) as u16 + 1024,
                53,
                b"q",
            );
            let ip = Ipv4::new(CLIENT, VIP, IPPROTO_UDP).build(&seg);
            let frame = packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &ip);
            let v = lab.run(PROG_LB, &frame).unwrap();
            if v.action != TX {
                continue;
            }
            let mac = &v.out[0..6];
            let dst = &v.out[ETH_HLEN + 16..ETH_HLEN + 20];
            match versions
                .iter()
                .position(|b| b.mac == mac && b.addr[..4] == *dst)
            {
                Some(k) => seen[k] += 1,
                None if torn.len() < 10 => torn.push((mac.to_vec(), dst.to_vec())),
                None => {}
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let writes = writes.load(Ordering::Relaxed);
    eprintln!("{PACKETS} packets, {writes} backend writes, versions seen {seen:?}");
    assert!(
        torn.is_empty(),
        "frames to a half-written backend: {torn:?}"
    );
    assert!(
        seen.iter().all(|n| *n > 0) && writes > 1_000,
        "the writer raced the packets: {seen:?}, {writes} writes"
    );
}
