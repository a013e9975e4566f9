//! What the data plane keeps of an interface it is attached to (its index,
//! MAC and MTU), read with the ioctls `ifconfig` uses, and the mode of the
//! XDP program on it, read over rtnetlink. An ioctl or netlink socket
//! answers for the network namespace it is made in, the caller's, where
//! sysfs answers for the namespace it was mounted in.

use std::{ffi::CString, os::fd::AsRawFd as _, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use lb_common::Interface;

/// `ARPHRD_ETHER` (include/uapi/linux/if_arp.h): an Ethernet link.
const ARPHRD_ETHER: u16 = 1;

/// Reads interface `name` as the data plane needs it.
pub fn read(name: &str) -> Result<Interface> {
    let c = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    if c.as_bytes().len() >= libc::IFNAMSIZ {
        bail!("interface name {name:?} is longer than the kernel allows");
    }
    // SAFETY: if_nametoindex only reads the NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {name}");
    }
    // SAFETY: a plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a socket for ioctls");
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let request = |op: libc::c_ulong, what: &str| -> Result<libc::ifreq> {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(c.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: op is a SIOCGIF* request, which fills the ifreq it is given.
        if unsafe { libc::ioctl(sock.as_raw_fd(), op as _, &mut req) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("reading the {what} of {name}"));
        }
        Ok(req)
    };
    let hw = request(libc::SIOCGIFHWADDR, "MAC")?;
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let hw = unsafe { hw.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != ARPHRD_ETHER {
        bail!(
            "{name} is not an Ethernet interface (link type {}); lb forwards Ethernet frames",
            hw.sa_family
        );
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data) {
        *dst = src as u8;
    }
    let mtu = request(libc::SIOCGIFMTU, "MTU")?;
    // SAFETY: SIOCGIFMTU filled the mtu member of the union.
    let mtu = unsafe { mtu.ifr_ifru.ifru_mtu };
    Ok(Interface {
        ifindex,
        mtu: mtu.max(0) as u32,
        mac,
        // Given by the attachment.
        port: 0,
        _pad: 0,
    })
}

/// The mode of the XDP program attached to interface `ifindex`, if one is
/// (IFLA_XDP_ATTACHED, through rtnetlink's packet types on a blocking
/// socket: the attach path is not async). `None` for none, or one the
/// kernel reports as neither generic, driver nor hardware.
pub(super) fn xdp_mode_attached(ifindex: u32) -> Result<Option<XdpMode>> {
    use rtnetlink::{
        packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
        packet_route::{
            RouteNetlinkMessage,
            link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
        },
        sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
    };
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetLink(link));
    request.header.flags = NLM_F_REQUEST;
    request.finalize();
    let mut buf = vec![0u8; request.header.length as usize];
    request.serialize(&mut buf);
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting a netlink socket")?;
    socket.send(&buf, 0).context("asking for the link")?;
    // One link's message, stats included: well within 64 KiB.
    let mut reply = Vec::with_capacity(64 * 1024);
    socket.recv(&mut reply, 0).context("reading the link")?;
    let message =
        NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply).context("parsing the link")?;
    let link = match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link,
        NetlinkPayload::Error(e) => bail!("reading link {ifindex}: {e}"),
        other => bail!("reading link {ifindex}: unexpected answer {other:?}"),
    };
    let attached = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
            LinkXdp::Attached(a) => Some(*a),
            _ => None,
        }),
        _ => None,
    });
    Ok(match attached {
        Some(XdpAttached::SocketBuffer) => Some(XdpMode::Skb),
        Some(XdpAttached::Driver) => Some(XdpMode::Driver),
        Some(XdpAttached::Hardware) => Some(XdpMode::Hardware),
        _ => None,
    })
}

/// Whether `name` is a bond in the caller's network namespace: the bonding
/// driver lists its bonds under /proc/net/bonding, which (unlike sysfs)
/// answers for the reading process's namespace.
pub(super) fn is_bond(name: &str) -> bool {
    Path::new("/proc/net/bonding").join(name).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_cannot_hold_are_refused() {
        let e = read("x".repeat(40).as_str()).unwrap_err();
        assert!(format!("{e:#}").contains("longer"), "{e:#}");
        let e = read("bad\0name").unwrap_err();
        assert!(format!("{e:#}").contains("interface name"), "{e:#}");
        let e = read("lb-no-such-if").unwrap_err();
        assert!(format!("{e:#}").contains("no interface"), "{e:#}");
    }

    #[test]
    fn loopback_is_not_ethernet() {
        // lo exists in every namespace and has link type ARPHRD_LOOPBACK.
        let e = read("lo").unwrap_err();
        assert!(format!("{e:#}").contains("not an Ethernet"), "{e:#}");
    }
}
