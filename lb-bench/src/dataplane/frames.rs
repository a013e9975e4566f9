//! The frames the data-plane benchmark sends: one template per (family,
//! destination, TCP flags), padded to `FRAME_LEN`, with the flow index
//! written into the source address's last two bytes and the source port
//! (exactly as the reset wrapper writes it, see `ResetConfig::frame_of`).
//!
//! Addresses come from the benchmarking ranges (RFC 2544, RFC 5180):
//! clients 198.19.0.0/16 and 2001:2:c::/48, VIPs and backends in
//! 198.18.0.0/16 and 2001:2::/48. The frames never leave BPF_PROG_TEST_RUN.
//! Checksums are valid for flow index 0 only: lb never verifies them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_bench_ebpf::{FRAME_LEN, ResetConfig};
use lb_common::wire::{
    ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPV4_DF, IPV4_HLEN, IPV6_HLEN, TCP_HLEN,
};
use lb_tests::{
    lab::{LB_MAC, ROUTER_MAC},
    packet,
};
use serde::{Deserialize, Serialize};

/// TCP flags of a packet in an established connection.
pub(crate) const TCP_ACK: u8 = 0x10;
/// TCP flags of a connection's first packet.
pub(crate) const TCP_SYN: u8 = 0x02;

/// Source port of flow indexes 0 to 65535 (the wrapper adds `index >> 16`).
pub(crate) const PORT_BASE: u16 = 1024;
/// The port every measured service listens on.
pub(crate) const SERVICE_PORT: u16 = 80;

/// IPv4 clients: 198.19.0.0/16, the flow index in the last two bytes.
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
/// IPv6 clients: 2001:2:c::/112.
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xc, 0, 0, 0, 0, 0);
/// An IPv4 destination that is no VIP: the "not a service" path.
pub(crate) const NOT_A_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
/// An IPv6 destination that is no VIP.
pub(crate) const NOT_A_VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0xfa, 0, 0, 0, 0, 1);

/// IP version of a measured path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

impl Family {
    /// Both, in report order.
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    /// As the report spells it.
    pub fn label(self) -> &'static str {
        match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        }
    }
}

/// Forwarding mode of a measured service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// MAC rewrite.
    DsrL2,
    /// IPIP / IP6IP6 encapsulation.
    Ipip,
}

impl Mode {
    /// Both, in report order.
    pub const ALL: [Mode; 2] = [Mode::DsrL2, Mode::Ipip];

    /// As the configuration spells it.
    pub fn label(self) -> &'static str {
        match self {
            Mode::DsrL2 => "dsr-l2",
            Mode::Ipip => "ipip",
        }
    }
}

/// The VIP of the measured service of `family` and `mode`.
pub(crate) fn vip(family: Family, mode: Mode) -> IpAddr {
    let host = match mode {
        Mode::DsrL2 => 1,
        Mode::Ipip => 2,
    };
    match family {
        Family::Ipv4 => Ipv4Addr::new(198, 18, 1, host as u8).into(),
        Family::Ipv6 => Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, host).into(),
    }
}

/// The prefix every client of `family` is in.
pub(crate) fn client_net(family: Family) -> (IpAddr, u8) {
    match family {
        Family::Ipv4 => (CLIENT_V4.into(), 16),
        Family::Ipv6 => (CLIENT_V6.into(), 48),
    }
}

/// A destination of `family` that is not a VIP.
pub(crate) fn not_a_vip(family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => NOT_A_VIP_V4.into(),
        Family::Ipv6 => NOT_A_VIP_V6.into(),
    }
}

/// The template frame (flow index 0) from a client to `dst`:`dport` with
/// TCP `flags`, and where the wrapper writes the flow index.
pub(crate) fn template(dst: IpAddr, dport: u16, flags: u8) -> ResetConfig {
    let (src, ip_hlen, ethertype): (IpAddr, usize, u16) = match dst {
        IpAddr::V4(_) => (CLIENT_V4.into(), IPV4_HLEN, ETH_P_IP),
        IpAddr::V6(_) => (CLIENT_V6.into(), IPV6_HLEN, ETH_P_IPV6),
    };
    // Pad with TCP payload so that every frame is FRAME_LEN bytes and the
    // IP length fields cover all of it (no trailing padding to parse).
    let payload = vec![0x5a; FRAME_LEN - ETH_HLEN - ip_hlen - TCP_HLEN];
    let segment = packet::tcp(src, dst, PORT_BASE, dport, flags, &payload);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => packet::Ipv4 {
            // Don't fragment, as TCP stacks send (path MTU discovery).
            frag: IPV4_DF,
            ..packet::Ipv4::new(s.octets(), d.octets(), IPPROTO_TCP)
        }
        .build(&segment),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            packet::ipv6(s.octets(), d.octets(), IPPROTO_TCP, &[], &segment)
        }
        _ => unreachable!("source chosen by the destination's family"),
    };
    let frame = packet::ethernet(LB_MAC, ROUTER_MAC, &[], ethertype, &ip);
    debug_assert_eq!(frame.len(), FRAME_LEN);
    // Source address: 4 bytes (IPv4) or 16 (IPv6) ending 8 bytes before the
    // destination; the wrapper writes its last two. The source port opens
    // the TCP header.
    let src_end = ETH_HLEN
        + match dst {
            IpAddr::V4(_) => 16,
            IpAddr::V6(_) => 24,
        };
    ResetConfig::new(
        &frame,
        (src_end - 2) as u16,
        (ETH_HLEN + ip_hlen) as u16,
        PORT_BASE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_writes_the_source_address_and_port() {
        for dst in [
            vip(Family::Ipv4, Mode::DsrL2),
            vip(Family::Ipv6, Mode::Ipip),
        ] {
            let t = template(dst, SERVICE_PORT, TCP_ACK);
            let index = 0x0003_0102;
            let f = t.frame_of(index);
            let (src_off, l4) = match dst {
                IpAddr::V4(_) => (ETH_HLEN + 12, ETH_HLEN + IPV4_HLEN),
                IpAddr::V6(_) => (ETH_HLEN + 8, ETH_HLEN + IPV6_HLEN),
            };
            let src_len = if dst.is_ipv4() { 4 } else { 16 };
            assert_eq!(&f[src_off + src_len - 2..src_off + src_len], &[1, 2]);
            assert_eq!(
                u16::from_be_bytes([f[l4], f[l4 + 1]]),
                PORT_BASE + 3,
                "source port"
            );
            assert_eq!(u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]), SERVICE_PORT);
            // Nothing else moved.
            let base = t.frame_of(0);
            let changed = f.iter().zip(base.iter()).filter(|(a, b)| a != b).count();
            assert_eq!(changed, 3);
        }
    }

    #[test]
    fn frames_fill_the_fixed_length() {
        let f = template(not_a_vip(Family::Ipv6), SERVICE_PORT, TCP_SYN).frame_of(0);
        let payload = u16::from_be_bytes([f[ETH_HLEN + 4], f[ETH_HLEN + 5]]) as usize;
        assert_eq!(ETH_HLEN + IPV6_HLEN + payload, FRAME_LEN);
    }
}
