//! Wire-format constants (IEEE 802.3, RFC 791, RFC 8200, RFC 792, RFC 4443),
//! named once for the parser, the packet builders of the tests and user space.

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// 802.1Q/802.1ad tag length.
pub const VLAN_HLEN: usize = 4;
/// IPv4 header length without options.
pub const IPV4_HLEN: usize = 20;
/// IPv6 fixed header length.
pub const IPV6_HLEN: usize = 40;
/// Offset of the destination address in an IPv4 header.
pub const IPV4_DST_OFF: usize = 16;
/// Offset of the destination address in an IPv6 header.
pub const IPV6_DST_OFF: usize = 24;
/// TCP header length without options.
pub const TCP_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// ICMP/ICMPv6 header length (type, code, checksum, 4 bytes of rest).
pub const ICMP_HLEN: usize = 8;

/// EtherType IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType 802.1ad service VLAN tag (QinQ).
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol: ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol: IPv4 in IP (RFC 2003).
pub const IPPROTO_IPIP: u8 = 4;
/// IP protocol: TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol: UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol: IPv6 in IP (RFC 2473).
pub const IPPROTO_IPV6: u8 = 41;
/// IPv6 extension: hop-by-hop options.
pub const IPPROTO_HOPOPTS: u8 = 0;
/// IPv6 extension: routing header.
pub const IPPROTO_ROUTING: u8 = 43;
/// IPv6 extension: fragment header.
pub const IPPROTO_FRAGMENT: u8 = 44;
/// IP protocol: GRE.
pub const IPPROTO_GRE: u8 = 47;
/// IP protocol: ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension: destination options.
pub const IPPROTO_DSTOPTS: u8 = 60;

/// IPv4 flags/fragment-offset field: "more fragments".
pub const IPV4_MF: u16 = 0x2000;
/// IPv4 flags/fragment-offset field: "don't fragment".
pub const IPV4_DF: u16 = 0x4000;
/// IPv4 flags/fragment-offset field: the offset bits.
pub const IPV4_FRAG_OFFSET: u16 = 0x1fff;
/// IPv6 fragment header's offset-and-flags field (RFC 8200 §4.5): the
/// offset bits (the two bits below them are reserved).
pub const IPV6_FRAG_OFFSET: u16 = 0xfff8;
/// IPv6 fragment header's offset-and-flags field: "more fragments".
pub const IPV6_FRAG_M: u16 = 0x0001;
/// Default TTL of the outer header we build (RFC 1700's recommended 64).
pub const DEFAULT_TTL: u8 = 64;

/// ICMPv4 type "destination unreachable".
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMPv4 code "fragmentation needed and DF set".
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 type "packet too big".
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMPv4 type "echo request".
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMPv4 type "echo reply".
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMPv6 type "echo request".
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 type "echo reply".
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// Bytes of the offending packet the ICMP errors lb sends quote: its IP
/// header and the start of its payload, enough for the sender to find its
/// socket (RFC 792 asks for the header and 8 bytes; IPv4 options and IPv6
/// extension headers take more). A multiple of 4 (the checksum helper's
/// unit), and far below RFC 1812's 576-byte bound.
pub const ICMP_QUOTE_LEN: usize = 128;

/// TCP flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flag RST.
pub const TCP_RST: u8 = 0x04;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// The ECN field (RFC 3168): the low two bits of the IPv4 TOS byte and of
/// the IPv6 traffic class.
pub const ECN_MASK: u8 = 0b11;
/// ECN: the transport does not support ECN.
pub const ECN_NOT_ECT: u8 = 0b00;
/// ECN: ECN-capable transport, ECT(1).
pub const ECN_ECT1: u8 = 0b01;
/// ECN: ECN-capable transport, ECT(0).
pub const ECN_ECT0: u8 = 0b10;
/// ECN: congestion experienced.
pub const ECN_CE: u8 = 0b11;

/// The inner header's ECN field once a tunnel's outer header carrying
/// `outer` is stripped from an inner one carrying `inner` (RFC 6040 §4.2,
/// the table of Figure 4): congestion marked on the tunnel's path (outer
/// CE) is carried over, and so is ECT(1) over ECT(0). `None`: the packet
/// must be dropped, as its transport cannot carry the congestion the path
/// marked (outer CE over a not-ECT inner). Only the ECN bits of either
/// argument are read.
pub const fn ecn_decapsulated(outer: u8, inner: u8) -> Option<u8> {
    match (outer & ECN_MASK, inner & ECN_MASK) {
        (ECN_CE, ECN_NOT_ECT) => None,
        (ECN_CE, _) => Some(ECN_CE),
        (ECN_ECT1, ECN_ECT0) => Some(ECN_ECT1),
        (_, inner) => Some(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecn_decapsulation_follows_rfc_6040_figure_4() {
        // Rows: inner Not-ECT, ECT(0), ECT(1), CE; columns: outer in the
        // same order. 0xff: drop.
        const DROP: u8 = 0xff;
        let order = [ECN_NOT_ECT, ECN_ECT0, ECN_ECT1, ECN_CE];
        let table = [
            [ECN_NOT_ECT, ECN_NOT_ECT, ECN_NOT_ECT, DROP],
            [ECN_ECT0, ECN_ECT0, ECN_ECT1, ECN_CE],
            [ECN_ECT1, ECN_ECT1, ECN_ECT1, ECN_CE],
            [ECN_CE, ECN_CE, ECN_CE, ECN_CE],
        ];
        for (row, inner) in order.iter().enumerate() {
            for (col, outer) in order.iter().enumerate() {
                // The DSCP bits around them are ignored.
                let got = ecn_decapsulated(0xa8 | outer, 0xb8 | inner).unwrap_or(DROP);
                assert_eq!(got, table[row][col], "inner {inner:#b}, outer {outer:#b}");
            }
        }
    }
}
