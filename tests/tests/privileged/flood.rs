//! A flood of new flows (a spoofed SYN and ACK from each of thousands of
//! sources) against a real `lb daemon` while real TCP connections are
//! established: a backend
//! added during the flood moves none of them, because the flood spends each
//! CPU's insert budget instead of the connections' entries.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb::demo::edge::{ECHO_PORT, EchoServer, Sessions, fast_health};
use lb_common::wire::{ETH_P_IP, IPPROTO_TCP, TCP_ACK, TCP_SYN};
use lb_tests::{
    daemon::Daemon,
    lan::Lan,
    packet::{self, Ipv4},
    require_root,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Long-lived connections established before the flood.
const CONNECTIONS: usize = 30;
/// The connection table: small, so that a flood without a budget evicts
/// every entry many times over, yet large enough for what the budget lets
/// in while the test runs (a few seconds, on every CPU).
const TABLE: u32 = 4096;
/// Entries each CPU may add per second.
const BUDGET: u32 = 100;
/// Spoofed packets (two a flow): far more flows than the table holds, at
/// least ten times the legitimate new flows.
const FLOOD: u32 = 40_000;
/// The load balancer's MAC (its port on the segment) and the client's.
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const WAIT: Duration = Duration::from_secs(20);

fn config() -> String {
    let mut text = format!(
        "[settings]\ninterfaces = [\"eth0\"]\nxdp_mode = \"generic\"\ntable_size = 4099\n\
         max_services = 4\nmax_backends = 16\nconntrack_entries = {TABLE}\n\
         conntrack_inserts_per_cpu = {BUDGET}\n\n\
         [[service]]\nname = \"echo\"\nvip = \"{VIP}\"\nport = {ECHO_PORT}\nprotocol = \"tcp\"\n{}",
        fast_health("tcp")
    );
    for i in 1..=3 {
        text += &format!("\n[[service.backend]]\naddress = \"198.18.0.{}\"\n", 10 + i);
    }
    text
}

/// Packet `n` of the flood's flow `n / 2`, from 198.18.128.0/17 and any
/// port: its SYN, then an ACK, so that the flow's entry (if it got one) is
/// used once and the kernel's LRU keeps it like an established flow's.
fn spoofed(n: u32) -> Vec<u8> {
    let (flow, flags) = (
        n / 2,
        if n.is_multiple_of(2) {
            TCP_SYN
        } else {
            TCP_ACK
        },
    );
    let n = flow;
    let [_, _, hi, lo] = n.to_be_bytes();
    let src = [198, 18, 0x80 | (hi & 0x7f), lo];
    // With the port, every SYN is a flow of its own.
    let sport = 1024 + (n % 60_000) as u16;
    let tcp = packet::tcp(
        IpAddr::from(src),
        IpAddr::V4(VIP),
        sport,
        ECHO_PORT,
        flags,
        b"",
    );
    packet::ethernet(
        LB_MAC,
        CLIENT_MAC,
        &[],
        ETH_P_IP,
        &Ipv4::new(src, VIP.octets(), IPPROTO_TCP).build(&tcp),
    )
}

/// Sends the flood from the client's `eth0` through a packet socket until
/// `stop` (or it has sent `FLOOD` frames, round after round); counts what it
/// sent in `sent`.
fn flood(stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) -> Result<()> {
    let frames: Vec<Vec<u8>> = (0..FLOOD).map(spoofed).collect();
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
    };
    ensure!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    let result = (|| {
        let name = std::ffi::CString::new("eth0")?;
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no eth0 in the client's namespace");
        // SAFETY: sockaddr_ll is plain data; zeroed is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&LB_MAC);
        while !stop.load(Ordering::Relaxed) {
            for f in &frames {
                // SAFETY: `f` and `addr` outlive the call; sizes are theirs.
                let n = unsafe {
                    libc::sendto(
                        fd,
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        (&raw const addr).cast(),
                        size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if n < 0 {
                    // A full queue: let it drain.
                    std::thread::sleep(Duration::from_micros(100));
                } else {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        Ok(())
    })();
    // SAFETY: our fd, closed once.
    unsafe { libc::close(fd) };
    result
}

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_added_during_a_flood_of_new_flows_moves_no_established_connection() {
    require_root();
    run().unwrap();
}

fn run() -> Result<()> {
    let lan = Lan::build(4, &["198.18.1.1/32"])?;
    let _servers: Vec<EchoServer> = lan
        .backends
        .iter()
        .enumerate()
        .map(|(i, h)| EchoServer::start(&h.ns, &format!("backend-{}", i + 1)))
        .collect::<Result<_>>()?;
    let d = Daemon::start(&lan.lb, "flood", &config())?;
    d.wait_in_table(3, WAIT)?;
    let mut sessions = Sessions::open(
        &lan.client,
        SocketAddr::new(IpAddr::V4(VIP), ECHO_PORT),
        CONNECTIONS,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, sent) = (stop.clone(), sent.clone());
        lan.client.spawn(move || flood(stop, sent))
    };
    // Let the flood churn through the table before the change.
    let start = std::time::Instant::now();
    while sent.load(Ordering::Relaxed) < u64::from(FLOOD) && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    d.cli(&["backend", "add", "echo", "198.18.0.14"])?;
    d.wait_in_table(4, WAIT)?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    flooder
        .join()
        .map_err(|_| anyhow::anyhow!("the flood's thread panicked"))??;
    let stats = d.cli(&["conntrack", "stats"])?;
    eprintln!(
        "flood: {} spoofed packets; connection table {}",
        sent.load(Ordering::Relaxed),
        stats
    );
    let refused = stats["refused"].as_u64().context("no refused count")?;
    // The segment may drop some of the flood on its way; most arrives.
    ensure!(
        refused >= u64::from(FLOOD) / 4,
        "only {refused} inserts refused: the flood did not reach the data plane's budget"
    );
    let (kept, broken) = sessions.check();
    ensure!(
        broken.is_empty(),
        "{kept} connections kept their backend, {} did not:\n{}",
        broken.len(),
        broken.join("\n")
    );
    Ok(())
}
