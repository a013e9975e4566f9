//! Header parsing: Ethernet with up to two VLAN tags, IPv4 with options,
//! IPv6 with a bounded extension-header walk, TCP, UDP and the packet quoted
//! by an ICMP error. Each parser returns what it found or the counter that
//! says why the packet cannot be taken further.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Addr, Counter, FAMILY_V4, FAMILY_V6,
    limits::{MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS},
    wire::*,
};

use crate::packet::{frame_len, load, load_be16};

/// The network layer of a packet.
#[derive(Clone, Copy)]
pub struct Ip {
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
pub struct Ports {
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
pub fn ethernet(ctx: &XdpContext) -> Result<(u16, usize), Counter> {
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

#[inline(always)]
fn v4_addr(b: [u8; 4]) -> Addr {
    let mut a = [0u8; 16];
    a[0] = b[0];
    a[1] = b[1];
    a[2] = b[2];
    a[3] = b[3];
    a
}

/// Parses an IPv4 header at `l3_off`, bounded by `limit` (the frame length, or
/// the end of the enclosing packet for a quoted one). A quoted header may be
/// cut short by the ICMP sender, so `quoted` skips the total-length check.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l3_off: usize, limit: usize, quoted: bool) -> Result<Ip, Counter> {
    let vihl = load::<u8>(ctx, l3_off).ok_or(Counter::DropMalformedIpv4)?;
    let ihl = (vihl & 0x0f) as usize;
    if vihl >> 4 != 4 || ihl < 5 {
        return Err(Counter::DropMalformedIpv4);
    }
    let hlen = ihl * 4;
    let total = load_be16(ctx, l3_off + 2).ok_or(Counter::DropMalformedIpv4)? as usize;
    let frag = load_be16(ctx, l3_off + 6).ok_or(Counter::DropMalformedIpv4)?;
    let proto = load::<u8>(ctx, l3_off + 9).ok_or(Counter::DropMalformedIpv4)?;
    let src = load::<[u8; 4]>(ctx, l3_off + 12).ok_or(Counter::DropMalformedIpv4)?;
    let dst = load::<[u8; 4]>(ctx, l3_off + 16).ok_or(Counter::DropMalformedIpv4)?;
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
pub fn ipv6(ctx: &XdpContext, l3_off: usize, limit: usize, quoted: bool) -> Result<Ip, Counter> {
    let vtc = load::<u8>(ctx, l3_off).ok_or(Counter::DropMalformedIpv6)?;
    if vtc >> 4 != 6 {
        return Err(Counter::DropMalformedIpv6);
    }
    let payload = load_be16(ctx, l3_off + 4).ok_or(Counter::DropMalformedIpv6)? as usize;
    let mut next = load::<u8>(ctx, l3_off + 6).ok_or(Counter::DropMalformedIpv6)?;
    let src = load::<Addr>(ctx, l3_off + 8).ok_or(Counter::DropMalformedIpv6)?;
    let dst = load::<Addr>(ctx, l3_off + 24).ok_or(Counter::DropMalformedIpv6)?;
    let end = if quoted {
        limit
    } else {
        if l3_off + IPV6_HLEN + payload > limit {
            return Err(Counter::DropMalformedIpv6);
        }
        l3_off + IPV6_HLEN + payload
    };
    let mut off = l3_off + IPV6_HLEN;
    let mut fragment = false;
    let mut walked = 0;
    // Bounded walk; the verifier sees at most MAX_IPV6_EXT_HEADERS + 1 rounds.
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        let len = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let hdr_len = load::<u8>(ctx, off + 1).ok_or(Counter::DropMalformedIpv6)?;
                (hdr_len as usize + 1) * 8
            }
            IPPROTO_FRAGMENT => {
                let offset_m = load_be16(ctx, off + 2).ok_or(Counter::DropMalformedIpv6)?;
                // Fragment offset is the top 13 bits, M the lowest bit.
                if offset_m & 0xfff9 != 0 {
                    fragment = true;
                }
                8
            }
            _ => break,
        };
        if walked == MAX_IPV6_EXT_HEADERS {
            return Err(Counter::DropMalformedIpv6);
        }
        walked += 1;
        next = load::<u8>(ctx, off).ok_or(Counter::DropMalformedIpv6)?;
        off += len;
        if off > end {
            return Err(Counter::DropMalformedIpv6);
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
pub fn ports(ctx: &XdpContext, ip: &Ip) -> Result<Ports, Counter> {
    let off = ip.l4_off;
    let sport = load::<u16>(ctx, off).ok_or(Counter::DropMalformedL4)?;
    let dport = load::<u16>(ctx, off + 2).ok_or(Counter::DropMalformedL4)?;
    let tcp_flags = if ip.proto == IPPROTO_TCP {
        let doff = (load::<u8>(ctx, off + 12).ok_or(Counter::DropMalformedL4)? >> 4) as usize;
        let flags = load::<u8>(ctx, off + 13).ok_or(Counter::DropMalformedL4)?;
        if doff * 4 < TCP_HLEN || off + doff * 4 > ip.end {
            return Err(Counter::DropMalformedL4);
        }
        flags
    } else {
        if off + UDP_HLEN > ip.end {
            return Err(Counter::DropMalformedL4);
        }
        0
    };
    // Ports stay in network order: they are compared with and hashed as the
    // wire bytes, so user space builds keys the same way.
    Ok(Ports {
        sport,
        dport,
        tcp_flags,
    })
}

/// Whether the ICMP/ICMPv6 message at `ip.l4_off` is a "fragmentation needed"
/// or "packet too big" error, the only errors relayed to backends.
#[inline(always)]
pub fn is_pmtu_error(ctx: &XdpContext, ip: &Ip) -> bool {
    let Some([ty, code]) = load::<[u8; 2]>(ctx, ip.l4_off) else {
        return false;
    };
    if ip.family == FAMILY_V4 {
        ip.proto == IPPROTO_ICMP && ty == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED
    } else {
        ip.proto == IPPROTO_ICMPV6 && ty == ICMPV6_PKT_TOOBIG
    }
}

/// The packet an ICMP error quotes (sent by the VIP, so its source is the VIP)
/// and its first four transport bytes (the ports, RFC 792 guarantees eight).
#[inline(always)]
pub fn quoted(ctx: &XdpContext, ip: &Ip) -> Result<(Ip, Ports), Counter> {
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
    let sport = load::<u16>(ctx, inner.l4_off).ok_or(Counter::DropMalformedIcmp)?;
    let dport = load::<u16>(ctx, inner.l4_off + 2).ok_or(Counter::DropMalformedIcmp)?;
    if inner.l4_off + 4 > ip.end {
        return Err(Counter::DropMalformedIcmp);
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

/// The frame length, as the limit for the outermost header.
#[inline(always)]
pub fn limit(ctx: &XdpContext) -> usize {
    frame_len(ctx)
}
