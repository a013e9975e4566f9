//! `lb decap` on a backend, end to end with the real binary: it attaches the
//! decapsulator from its file and pins it, `ipip` and `gue` services are
//! served through it in both families, a tunnelled packet from outside its accepted
//! prefixes never reaches the backend's stack, and `lb decap remove` takes
//! it all away.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use lb::{
    demo::server::{http_get, udp_request},
    netns::{Netns, PrivateBpffs},
};
use lb_common::{
    SERVICE_F_GUE, SERVICE_F_IPIP,
    wire::{IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP},
};
use lb_tests::{
    Scratch,
    daemon::lb_in as lb,
    lab::{Lab, service_key},
    lan::{CLIENT_V4, Lan},
    packet::{self, Ipv4},
    require_root,
};

const RING: u32 = 251;
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 2);
/// The VIPs of the `gue` services.
const GUE4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 5);
const GUE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 5);
const PORT: u16 = 80;

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn a_backend_running_lb_decap_serves_ipip_and_refuses_spoofed_tunnels() {
    require_root();
    run().unwrap();
}

/// Sends `packet` (a whole IPv4 packet, header included) from `ns` to `to`.
fn send_raw(ns: &Netns, to: Ipv4Addr, packet: &[u8]) -> Result<()> {
    ns.run(|| {
        // SAFETY: a plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_in is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_addr.s_addr = u32::from_ne_bytes(to.octets());
        // SAFETY: the buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        ensure!(sent >= 0, "sendto: {}", std::io::Error::last_os_error());
        Ok(())
    })
}

fn run() -> Result<()> {
    let lan = Lan::build(
        1,
        &[
            &format!("{VIP4}/32"),
            &format!("{VIP6}/128"),
            &format!("{GUE4}/32"),
            &format!("{GUE6}/128"),
        ],
    )?;
    let b = &lan.backends[0];
    let mut lab = Lab::new(RING)?;
    lab.backend_at(0, IpAddr::V4(b.v4), b.mac, true, 1)?;
    lab.backend_at(1, IpAddr::V6(b.v6), b.mac, true, 1)?;
    for (id, vip, proto, flags, backend) in [
        (0, IpAddr::V4(VIP4), IPPROTO_TCP, SERVICE_F_IPIP, 0),
        (1, IpAddr::V6(VIP6), IPPROTO_TCP, SERVICE_F_IPIP, 1),
        (2, IpAddr::V4(VIP4), IPPROTO_UDP, SERVICE_F_IPIP, 0),
        (3, IpAddr::V4(GUE4), IPPROTO_TCP, SERVICE_F_GUE, 0),
        (4, IpAddr::V6(GUE6), IPPROTO_TCP, SERVICE_F_GUE, 1),
    ] {
        lab.service(id, service_key(vip, PORT, proto), flags, &[(backend, 1)])?;
    }
    lan.lb
        .run(|| lab.dp.attach("eth0", 1, aya::programs::XdpMode::Skb, None))?;
    let _servers = lan.serve_names(PORT)?;

    let scratch = Scratch::new("decap")?;
    // Dropped before the scratch directory goes: it unpins whatever is
    // left (detaching the program).
    let bpffs = PrivateBpffs::mount(&scratch.dir.join("bpffs"))?;
    let pins = bpffs.path().join("decap");
    let file = scratch.dir.join("decap.toml");
    std::fs::write(
        &file,
        format!(
            "interfaces = [\"eth0\"]\nxdp_mode = \"generic\"\n\
             endpoints = [\"{}\", \"{}\"]\n\
             # the lab load balancer's tunnel sources\n\
             accept_from = [\"198.18.255.0/24\", \"2001:2:ff::/112\"]\n\
             vips = [\"{VIP4}\", \"{VIP6}\", \"{GUE4}\", \"{GUE6}\"]\n",
            b.v4, b.v6
        ),
    )?;
    exercise(&lan, &file, &pins)
}

/// A file that switches eth0 to native mode and adds an interface where
/// native mode is refused (a veth takes no native program while its peer's
/// MTU exceeds a page): refused as a whole, eth0 back in generic mode.
fn refused_mode_changes_nothing(lan: &Lan, file: &str, pins: &str) -> Result<()> {
    let ns = &lan.backends[0].ns;
    let xdp_mode = |iface: &str| -> Result<u64> {
        let out = ns.ip_output(&["-j", "-d", "link", "show", "dev", iface])?;
        let links: serde_json::Value = serde_json::from_str(&out)?;
        Ok(links[0]["xdp"]["mode"].as_u64().unwrap_or(0))
    };
    // iproute2's XDP_ATTACHED_* (if_link.h).
    const GENERIC: u64 = 2;
    ensure!(xdp_mode("eth0")? == GENERIC);
    ns.ip(&["link", "add", "xd0", "type", "veth", "peer", "name", "xd1"])?;
    let tried = (|| {
        ns.ip(&["link", "set", "xd1", "mtu", "9000"])?;
        ns.ip(&["link", "set", "xd0", "up"])?;
        ns.ip(&["link", "set", "xd1", "up"])?;
        let both = std::path::Path::new(file).with_file_name("both.toml");
        std::fs::write(
            &both,
            std::fs::read_to_string(file)?
                .replace("[\"eth0\"]", "[\"eth0\", \"xd0\"]")
                .replace("\"generic\"", "\"native\""),
        )?;
        let both = both.to_str().unwrap();
        let refused = lb(ns, &["decap", "apply", "-f", both, "--pin-dir", pins])
            .err()
            .context("applied with native mode refused on xd0")?;
        ensure!(
            format!("{refused:#}").contains("nothing changed"),
            "{refused:#}"
        );
        ensure!(xdp_mode("eth0")? == GENERIC, "eth0 left in another mode");
        ensure!(xdp_mode("xd0")? == 0, "xd0 left attached");
        let status = lb(ns, &["decap", "status", "--pin-dir", pins])?;
        ensure!(
            status["interfaces"] == serde_json::json!(["eth0"]),
            "{status}"
        );
        Ok(())
    })();
    ns.ip(&["link", "del", "xd0"])?;
    tried
}

fn exercise(lan: &Lan, file: &std::path::Path, pins: &std::path::Path) -> Result<()> {
    let b = &lan.backends[0];
    let (file, pins) = (file.to_str().unwrap(), pins.to_str().unwrap());
    let applied = lb(&b.ns, &["decap", "apply", "-f", file, "--pin-dir", pins])?;
    ensure!(
        applied["attached"] == serde_json::json!(["eth0"]),
        "{applied}"
    );
    // Applying again switches the pinned program in place.
    lb(&b.ns, &["decap", "apply", "-f", file, "--pin-dir", pins])?;
    refused_mode_changes_nothing(lan, file, pins)?;

    for vip in [
        IpAddr::V4(VIP4),
        IpAddr::V6(VIP6),
        IpAddr::V4(GUE4),
        IpAddr::V6(GUE6),
    ] {
        let to = SocketAddr::new(vip, PORT);
        let name = lan.client.run(|| http_get(to))?;
        ensure!(name == "backend-1", "{to}: answered by {name:?}");
    }
    let name = lan
        .client
        .run(|| udp_request(SocketAddr::new(IpAddr::V4(VIP4), PORT)))?;
    ensure!(name == "backend-1", "UDP: answered by {name:?}");

    // The client tunnels "who?" to the VIP itself, straight to the backend:
    // once from its own address (not a load balancer's) and once from the
    // load balancers' prefix. The name server answers the client directly,
    // so an answer on a port shows that the packet reached the stack.
    let (spoofed, accepted) = lan.client.run(|| {
        let bind = || UdpSocket::bind((CLIENT_V4, 0));
        Ok((bind()?, bind()?))
    })?;
    let tunnelled = |outer_src: [u8; 4], reply_to: &UdpSocket| -> Result<Vec<u8>> {
        let sport = reply_to.local_addr()?.port();
        let inner = Ipv4::new(CLIENT_V4.octets(), VIP4.octets(), IPPROTO_UDP).build(&packet::udp(
            IpAddr::V4(CLIENT_V4),
            IpAddr::V4(VIP4),
            sport,
            PORT,
            b"who?",
        ));
        Ok(Ipv4::new(outer_src, b.v4.octets(), IPPROTO_IPIP).build(&inner))
    };
    send_raw(&lan.client, b.v4, &tunnelled(CLIENT_V4.octets(), &spoofed)?)?;
    send_raw(&lan.client, b.v4, &tunnelled([198, 18, 255, 9], &accepted)?)?;
    let mut buf = [0u8; 64];
    accepted.set_read_timeout(Some(Duration::from_secs(5)))?;
    let n = accepted
        .recv(&mut buf)
        .context("no answer to the tunnel packet from an accepted source")?;
    let answer = String::from_utf8_lossy(&buf[..n]);
    ensure!(answer.trim() == "backend-1", "answered {answer:?}");
    spoofed.set_read_timeout(Some(Duration::from_millis(500)))?;
    if let Ok(n) = spoofed.recv(&mut buf) {
        bail!(
            "the spoofed tunnel packet reached the backend's stack: answered {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    let status = lb(&b.ns, &["decap", "status", "--pin-dir", pins])?;
    let counter = |name: &str| status["counters"][name].as_u64().unwrap_or(0);
    ensure!(counter("decapsulated") >= 4, "{status}");
    ensure!(counter("drop_foreign_source") == 1, "{status}");
    ensure!(
        status["interfaces"] == serde_json::json!(["eth0"]),
        "{status}"
    );
    ensure!(
        status["vips"].as_array().map(Vec::len) == Some(4),
        "{status}"
    );
    ensure!(status["gue_port"] == 6080, "{status}");

    // Gone again: unpinned and detached.
    lb(&b.ns, &["decap", "remove", "--pin-dir", pins])?;
    ensure!(!std::path::Path::new(pins).exists(), "pins left behind");
    let links = b.ns.run(|| {
        let out = Command::new("ip")
            .args(["-j", "-d", "link", "show", "dev", "eth0"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    ensure!(!links.contains("lb_decap"), "still attached: {links}");
    Ok(())
}
