//! Header parsing: Ethernet with up to two VLAN tags, IPv4 with options,
//! IPv6 with a bounded extension-header walk, TCP, UDP and the packet quoted
//! by an ICMP error. Each parser returns what it found or the counter that
//! says why the packet cannot be taken further.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Addr, AddrKey, Counter, FAMILY_V4, FAMILY_V6,
    hash::fold_halves,
    limits::{MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS},
    same_words,
    wire::*,
};

use crate::packet::{frame_len, load, load_be16, load_u32, load_u64};

/// The network layer of a packet.
#[derive(Clone, Copy)]
pub(crate) struct Ip {
    /// Offset of the IP header (after Ethernet and VLAN tags).
    pub l3_off: usize,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// Offset one past the IP packet (the frame may carry padding after it).
    pub end: usize,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Part of a fragmented datagram.
    pub fragment: bool,
    /// Source address, network order.
    pub src: Addr,
    /// Destination address, network order.
    pub dst: Addr,
}

/// Ports of a TCP or UDP header, network order, and the TCP flags (0 for UDP).
#[derive(Clone, Copy)]
pub(crate) struct Ports {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TCP flags byte.
    pub tcp_flags: u8,
}

/// Walks Ethernet and VLAN tags. Returns the EtherType of the payload and the
/// offset of the network header.
#[inline(always)]
pub(crate) fn ethernet(ctx: &XdpContext) -> Result<(u16, usize), Counter> {
    let mut off = ETH_HLEN;
    let mut ethertype = load_be16(ctx, off - 2).ok_or(Counter::DropMalformedEthernet)?;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // The tag's own EtherType sits in its last two bytes.
        ethertype = load_be16(ctx, off + 2).ok_or(Counter::DropMalformedEthernet)?;
        off += VLAN_HLEN;
    }
    Ok((ethertype, off))
}

/// The 16-byte form of an IPv4 address. Built from two 8-byte halves, the
/// shape an IPv6 address is loaded in: zeroing a byte array and then
/// writing four bytes makes LLVM call `memset` for the other twelve, a
/// byte loop on every packet, and where the two families' addresses meet
/// in different shapes LLVM takes them apart byte by byte.
#[inline(always)]
fn v4_addr(b: [u8; 4]) -> Addr {
    let halves = [u64::from(u32::from_ne_bytes(b)), 0];
    // SAFETY: [u64; 2] and [u8; 16] have the same size, and any bytes are
    // a valid [u8; 16]; the native (little-endian) order keeps the four
    // bytes first.
    unsafe { core::mem::transmute::<[u64; 2], Addr>(halves) }
}

/// Whether `ip`'s source names a single host, the only kind an ICMP
/// message of ours may answer (RFC 1812 §4.3.2.7, RFC 4443 §2.4 (e)): not
/// unspecified, loopback, multicast, nor (IPv4) broadcast or class E. A
/// reply to such a source would go to a group, to no one, or be spoofed
/// at a third party; the kernel drops these sources as martians, and so
/// never answers them either.
#[inline(always)]
pub(crate) fn source_is_unicast(ip: &Ip) -> bool {
    let s = &ip.src;
    if ip.family == FAMILY_V4 {
        !matches!(s[0], 0 | 127 | 224..)
    } else {
        // SAFETY: [u8; 16] and [u64; 2] have the same size. Two words,
        // not sixteen bytes: `::` and `::1` are the first word zero and the
        // second, read big-endian, at most one.
        let [high, low] = unsafe { core::mem::transmute::<Addr, [u64; 2]>(*s) };
        s[0] != 0xff && !(high == 0 && u64::from_be(low) <= 1)
    }
}

/// The four bytes of an IPv4 address in its 16-byte form (the inverse of
/// [`v4_addr`]).
#[inline(always)]
pub(crate) fn v4_bytes(a: &Addr) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Parses an IPv4 header at `l3_off`, bounded by `limit` (the frame length, or
/// the end of the enclosing packet for a quoted one). A quoted header may be
/// cut short by the ICMP sender, so `quoted` skips the total-length check.
#[inline(always)]
pub(crate) fn ipv4(
    ctx: &XdpContext,
    l3_off: usize,
    limit: usize,
    quoted: bool,
) -> Result<Ip, Counter> {
    let h = load::<[u8; IPV4_HLEN]>(ctx, l3_off).ok_or(Counter::DropMalformedIpv4)?;
    let ihl = (h[0] & 0x0f) as usize;
    if h[0] >> 4 != 4 || ihl < 5 {
        return Err(Counter::DropMalformedIpv4);
    }
    let hlen = ihl * 4;
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let proto = h[9];
    let src = [h[12], h[13], h[14], h[15]];
    let dst = [h[16], h[17], h[18], h[19]];
    let l4_off = l3_off + hlen;
    // Options must be inside the frame and inside the datagram.
    if l4_off > limit || total < hlen {
        return Err(Counter::DropMalformedIpv4);
    }
    let end = if quoted {
        limit
    } else {
        if l3_off + total > limit {
            return Err(Counter::DropMalformedIpv4);
        }
        l3_off + total
    };
    Ok(Ip {
        l3_off,
        l4_off,
        end,
        family: FAMILY_V4,
        proto,
        fragment: frag & (IPV4_MF | IPV4_FRAG_OFFSET) != 0,
        src: v4_addr(src),
        dst: v4_addr(dst),
    })
}

/// Parses an IPv6 header at `l3_off` and walks up to `MAX_IPV6_EXT_HEADERS`
/// extension headers. A fragment header makes the packet a fragment unless it
/// is an atomic fragment (offset 0, no more fragments; RFC 8200 §4.5).
#[inline(always)]
pub(crate) fn ipv6(
    ctx: &XdpContext,
    l3_off: usize,
    limit: usize,
    quoted: bool,
) -> Result<Ip, Counter> {
    // The fixed part, then each address straight into place: copying the
    // whole 40-byte header first would move every byte twice.
    let h = load::<[u8; IPV6_ADDRS_OFF]>(ctx, l3_off).ok_or(Counter::DropMalformedIpv6)?;
    let src = load::<Addr>(ctx, l3_off + IPV6_ADDRS_OFF).ok_or(Counter::DropMalformedIpv6)?;
    let dst = load::<Addr>(ctx, l3_off + IPV6_DST_OFF).ok_or(Counter::DropMalformedIpv6)?;
    if h[0] >> 4 != 6 {
        return Err(Counter::DropMalformedIpv6);
    }
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    let mut next = h[6];
    let end = if quoted {
        // The quoted header must lie inside the ICMP message: the load
        // above only checked the frame, which may go on into padding.
        if l3_off + IPV6_HLEN > limit {
            return Err(Counter::DropMalformedIpv6);
        }
        limit
    } else {
        if l3_off + IPV6_HLEN + payload > limit {
            return Err(Counter::DropMalformedIpv6);
        }
        l3_off + IPV6_HLEN + payload
    };
    let mut off = l3_off + IPV6_HLEN;
    let mut fragment = false;
    // Bounded walk; the verifier sees at most MAX_IPV6_EXT_HEADERS + 1 rounds.
    for walked in 0..=MAX_IPV6_EXT_HEADERS {
        if !matches!(
            next,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
        ) {
            break;
        }
        if walked == MAX_IPV6_EXT_HEADERS {
            return Err(Counter::DropMalformedIpv6);
        }
        // Every extension header starts with next-header and length bytes;
        // the fragment header's offset and M flag follow (RFC 8200 §4.5).
        let e = load::<[u8; 4]>(ctx, off).ok_or(Counter::DropMalformedIpv6)?;
        let mut data_follows = false;
        let len = if next == IPPROTO_FRAGMENT {
            let field = u16::from_be_bytes([e[2], e[3]]);
            fragment |= field & (IPV6_FRAG_OFFSET | IPV6_FRAG_M) != 0;
            // A later fragment's header is followed by the original
            // packet's data, not by its headers.
            data_follows = field & IPV6_FRAG_OFFSET != 0;
            8
        } else {
            (e[1] as usize + 1) * 8
        };
        next = e[0];
        off += len;
        if off > end {
            return Err(Counter::DropMalformedIpv6);
        }
        if data_follows {
            break;
        }
    }
    Ok(Ip {
        l3_off,
        l4_off: off,
        end,
        family: FAMILY_V6,
        proto: next,
        fragment,
        src,
        dst,
    })
}

/// Parses the TCP or UDP header at `ip.l4_off`. `Err` means it is truncated
/// or (TCP) its data offset is out of range.
#[inline(always)]
pub(crate) fn ports(ctx: &XdpContext, ip: &Ip) -> Result<Ports, Counter> {
    let off = ip.l4_off;
    let (sport, dport, tcp_flags) = if ip.proto == IPPROTO_TCP {
        let h = load::<[u8; TCP_HLEN]>(ctx, off).ok_or(Counter::DropMalformedL4)?;
        let doff = (h[12] >> 4) as usize;
        if doff * 4 < TCP_HLEN || off + doff * 4 > ip.end {
            return Err(Counter::DropMalformedL4);
        }
        (
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            h[13],
        )
    } else {
        let h = load::<[u8; UDP_HLEN]>(ctx, off).ok_or(Counter::DropMalformedL4)?;
        if off + UDP_HLEN > ip.end {
            return Err(Counter::DropMalformedL4);
        }
        (
            u16::from_ne_bytes([h[0], h[1]]),
            u16::from_ne_bytes([h[2], h[3]]),
            0,
        )
    };
    // Ports stay in network order: they are compared with and hashed as the
    // wire bytes, so user space builds keys the same way.
    Ok(Ports {
        sport,
        dport,
        tcp_flags,
    })
}

/// The ICMP/ICMPv6 messages the load balancer acts on.
pub(crate) enum IcmpMessage {
    /// "Fragmentation needed" or "packet too big", the only errors relayed
    /// to backends.
    PmtuError,
    /// An echo request, answered for VIPs that ask for it.
    EchoRequest,
    /// Any other, or too short to tell.
    Other,
}

/// What the ICMP/ICMPv6 message at `ip.l4_off` is.
#[inline(always)]
pub(crate) fn icmp_message(ctx: &XdpContext, ip: &Ip) -> IcmpMessage {
    let Some([ty, code]) = load::<[u8; 2]>(ctx, ip.l4_off) else {
        return IcmpMessage::Other;
    };
    let v4 = ip.family == FAMILY_V4;
    match (ip.proto, ty, code) {
        (IPPROTO_ICMP, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED) if v4 => IcmpMessage::PmtuError,
        (IPPROTO_ICMP, ICMP_ECHO_REQUEST, 0) if v4 => IcmpMessage::EchoRequest,
        (IPPROTO_ICMPV6, ICMPV6_PKT_TOOBIG, _) if !v4 => IcmpMessage::PmtuError,
        (IPPROTO_ICMPV6, ICMPV6_ECHO_REQUEST, 0) if !v4 => IcmpMessage::EchoRequest,
        _ => IcmpMessage::Other,
    }
}

/// The packet an ICMP error quotes (sent by the VIP, so its source is the VIP)
/// and its first four transport bytes (the ports, RFC 792 guarantees eight).
#[inline(always)]
pub(crate) fn quoted(ctx: &XdpContext, ip: &Ip) -> Result<(Ip, Ports), Counter> {
    let inner_off = ip.l4_off + ICMP_HLEN;
    let inner = if ip.family == FAMILY_V4 {
        ipv4(ctx, inner_off, ip.end, true)
    } else {
        ipv6(ctx, inner_off, ip.end, true)
    }
    .map_err(|_| Counter::DropMalformedIcmp)?;
    if inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP {
        return Err(Counter::PassOtherProtocol);
    }
    let p = load::<[u8; 4]>(ctx, inner.l4_off).ok_or(Counter::DropMalformedIcmp)?;
    let (sport, dport) = (
        u16::from_ne_bytes([p[0], p[1]]),
        u16::from_ne_bytes([p[2], p[3]]),
    );
    if inner.l4_off + 4 > ip.end {
        return Err(Counter::DropMalformedIcmp);
    }
    // Routers send errors to the quoted packet's source, the VIP. An error
    // addressed elsewhere (the host, another VIP) is not about a flow of
    // ours, whatever it quotes: the kernel's.
    if !same_words(&inner.src, &ip.dst) {
        return Err(Counter::PassOtherProtocol);
    }
    Ok((
        inner,
        Ports {
            sport,
            dport,
            tcp_flags: 0,
        },
    ))
}

/// Offset of the source address in an IPv6 header (the destination, at
/// `IPV6_DST_OFF`, follows).
pub(crate) const IPV6_ADDRS_OFF: usize = 8;

/// The destination address of the IP packet of EtherType `ethertype` at
/// `l3_off`, folded for the VIP filter
/// ([`vip_filter_bit_of_fold`](lb_common::hash::vip_filter_bit_of_fold))
/// straight from the packet's words, before anything else of its header
/// is read: `Err` with the malformed counter of its family if the frame
/// ends before it, `Ok(None)` if the EtherType is no IP. Nothing else is
/// checked; [`ipv4`] and [`ipv6`] do that.
#[inline(always)]
pub(crate) fn destination_fold(
    ctx: &XdpContext,
    ethertype: u16,
    l3_off: usize,
) -> Result<Option<u32>, Counter> {
    match ethertype {
        ETH_P_IP => load_u32(ctx, l3_off + IPV4_DST_OFF)
            .map(Some)
            .ok_or(Counter::DropMalformedIpv4),
        ETH_P_IPV6 => {
            let dst = l3_off + IPV6_DST_OFF;
            match (load_u64(ctx, dst), load_u64(ctx, dst + 8)) {
                (Some(lo), Some(hi)) => Ok(Some(fold_halves(lo, hi))),
                _ => Err(Counter::DropMalformedIpv6),
            }
        }
        _ => Ok(None),
    }
}

/// The destination of the IP packet of EtherType `ethertype` (IPv4 or
/// IPv6) at `l3_off`, for a packet [`destination_fold`] read: what a
/// malformed header is judged by.
#[inline(always)]
pub(crate) fn destination(ctx: &XdpContext, ethertype: u16, l3_off: usize) -> Option<AddrKey> {
    Some(if ethertype == ETH_P_IP {
        AddrKey::from_bytes(v4_addr(load(ctx, l3_off + IPV4_DST_OFF)?), FAMILY_V4)
    } else {
        AddrKey::from_bytes(load(ctx, l3_off + IPV6_DST_OFF)?, FAMILY_V6)
    })
}

/// The MAC the frame was sent to.
#[inline(always)]
pub(crate) fn destination_mac(ctx: &XdpContext) -> Option<[u8; 6]> {
    load(ctx, 0)
}

/// The frame length, as the limit for the outermost header.
#[inline(always)]
pub(crate) fn limit(ctx: &XdpContext) -> usize {
    frame_len(ctx)
}
