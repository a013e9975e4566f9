//! Whether a `dsr-l2` backend answers ARP for its service's VIP. A backend
//! holds the VIP on `lo`; unless it ignores ARP requests for addresses not
//! on the receiving interface (`arp_ignore = 1`), it answers for the VIP on
//! the segment, and whatever there resolves the VIP (a router, a host on
//! the segment) sends clients' packets straight to it, past lb. Probes
//! through the VIP (`via = "vip"`) check it: an ARP request for the VIP,
//! sent to the backend's MAC alone (no broadcast), from the unspecified
//! address as RFC 5227's probes are (nothing is learnt from it), must go
//! unanswered.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use tokio::io::{Interest, unix::AsyncFd};

/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// Ethernet header, then ARP for IPv4 over Ethernet: 14 + 28 bytes.
const FRAME_LEN: usize = 42;
/// ARP opcodes.
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// The request for `vip` from `ours` to `backend`'s MAC.
fn request(ours: [u8; 6], backend: [u8; 6], vip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&backend);
    f[6..12].copy_from_slice(&ours);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet (1), IPv4 (0x0800), 6-byte and 4-byte addresses.
    f[14..20].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f[20..22].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&ours);
    // Sender address 0.0.0.0 (28..32) and target MAC 0 (32..38).
    f[38..42].copy_from_slice(&vip.octets());
    f
}

/// Whether `frame` is `backend` answering ARP for `vip`.
fn is_answer(frame: &[u8], backend: [u8; 6], vip: Ipv4Addr) -> bool {
    frame.len() >= FRAME_LEN
        && frame[12..14] == ETH_P_ARP.to_be_bytes()
        && frame[20..22] == ARP_REPLY.to_be_bytes()
        && frame[22..28] == backend
        && frame[28..32] == vip.octets()
}

/// A raw socket for ARP frames on interface `index`.
fn arp_socket(index: u32) -> std::io::Result<OwnedFd> {
    let protocol = ETH_P_ARP.to_be();
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    // SAFETY: a valid socket and address of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// The MAC of interface `dev`, asked of the kernel through `socket` (sysfs
/// shows the interfaces of the namespace it was mounted in, which need not
/// be the daemon's).
fn interface_mac(socket: &OwnedFd, dev: &str) -> std::io::Result<[u8; 6]> {
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = dev.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a valid socket and ifreq; SIOCGIFHWADDR fills ifru_hwaddr.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote the hardware address into the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

/// Whether the backend with MAC `backend`, on interface `dev`, answers an
/// ARP request for `vip` within `wait`. `Err` if lb cannot ask.
pub async fn answers_for_vip(
    dev: &str,
    backend: [u8; 6],
    vip: Ipv4Addr,
    wait: Duration,
) -> Result<bool, String> {
    let index = crate::probe_path::ifindex(dev).map_err(|e| format!("{e:#}"))?;
    let fd = arp_socket(index).map_err(|e| format!("ARP socket on {dev}: {e}"))?;
    let ours = interface_mac(&fd, dev).map_err(|e| format!("the MAC of {dev}: {e}"))?;
    // SAFETY: the AsyncFd owns the descriptor, which stays open and the
    // same until it is dropped.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(|e| format!("ARP socket on {dev}: {e}"))?;
    let frame = request(ours, backend, vip);
    // SAFETY: a valid socket and a buffer of the given length.
    let sent = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if sent < 0 {
        return Err(format!(
            "ARP request on {dev}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let listen = async {
        let mut buf = [0u8; 128];
        loop {
            let mut ready = fd.readable().await.map_err(|e| e.to_string())?;
            // SAFETY: a valid socket and a buffer of the given length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    ready.clear_ready();
                    continue;
                }
                return Err(e.to_string());
            }
            if is_answer(&buf[..n as usize], backend, vip) {
                return Ok(true);
            }
        }
    };
    tokio::time::timeout(wait, listen)
        .await
        .unwrap_or(Ok(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const BACKEND: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

    #[test]
    fn the_request_asks_the_backend_alone_from_nowhere() {
        let f = request(OURS, BACKEND, VIP);
        assert_eq!(f[0..6], BACKEND);
        assert_eq!(f[6..12], OURS);
        assert_eq!(f[12..22], [8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(f[22..28], OURS);
        assert_eq!(f[28..38], [0; 10]);
        assert_eq!(f[38..42], VIP.octets());
    }

    #[test]
    fn only_the_backends_reply_for_the_vip_counts() {
        let mut reply = request(BACKEND, OURS, VIP);
        reply[20..22].copy_from_slice(&ARP_REPLY.to_be_bytes());
        reply[28..32].copy_from_slice(&VIP.octets());
        assert!(is_answer(&reply, BACKEND, VIP));
        assert!(!is_answer(&reply, OURS, VIP));
        assert!(!is_answer(&reply, BACKEND, Ipv4Addr::new(198, 18, 1, 2)));
        assert!(!is_answer(&reply[..41], BACKEND, VIP));
        // Our own request, seen on the socket, is no answer.
        assert!(!is_answer(&request(OURS, BACKEND, VIP), BACKEND, VIP));
    }
}
