//! The backend-side program for `ipip` and `gue` services (`lb decap`):
//! strip the outer IPv4/IPv6 header (and, for GUE, the UDP header) of tunnel
//! packets addressed to this host and pass the inner packet to the stack
//! (for kernels without the ipip/ip6_tunnel/fou modules). Only the load
//! balancers may tunnel packets in: a tunnel packet from outside the
//! accepted source prefixes, or one whose inner packet is not for a VIP
//! configured here, is dropped.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    AddrKey,
    counters::DecapCounter,
    wire::{ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, UDP_HLEN},
};

use crate::{
    forward::{L2Header, adjust_head},
    maps,
    packet::load,
    parse,
};

/// Decapsulates if the packet is a tunnel packet for this host.
#[inline(always)]
pub(crate) fn decapsulate(ctx: &XdpContext) -> (u32, DecapCounter) {
    let counter = match try_decapsulate(ctx) {
        Ok(c) | Err(c) => c,
    };
    let action = match counter {
        DecapCounter::DropMalformed
        | DecapCounter::DropForeignSource
        | DecapCounter::DropNotVip => xdp_action::XDP_DROP,
        DecapCounter::PassNotTunnel | DecapCounter::PassNotLocal | DecapCounter::Decapsulated => {
            xdp_action::XDP_PASS
        }
    };
    (action, counter)
}

#[inline(always)]
fn try_decapsulate(ctx: &XdpContext) -> Result<DecapCounter, DecapCounter> {
    let not_tunnel = |_| DecapCounter::PassNotTunnel;
    let (ethertype, l3_off) = parse::ethernet(ctx).map_err(not_tunnel)?;
    let limit = parse::limit(ctx);
    let (outer, ip_in_ip) = match ethertype {
        ETH_P_IP => (
            parse::ipv4(ctx, l3_off, limit, false).map_err(not_tunnel)?,
            IPPROTO_IPIP,
        ),
        ETH_P_IPV6 => (
            parse::ipv6(ctx, l3_off, limit, false).map_err(not_tunnel)?,
            IPPROTO_IPV6,
        ),
        _ => return Err(DecapCounter::PassNotTunnel),
    };
    let gue = outer.proto == IPPROTO_UDP;
    if !(gue || outer.proto == ip_in_ip) || outer.fragment {
        return Err(DecapCounter::PassNotTunnel);
    }
    let endpoint = AddrKey::from_bytes(outer.dst, outer.family);
    let Some(gue_port) = maps::decap_endpoint(&endpoint) else {
        return Err(if gue {
            DecapCounter::PassNotTunnel
        } else {
            DecapCounter::PassNotLocal
        });
    };
    // GUE variant 1: the inner packet right after the UDP header. Other
    // UDP to this host is not ours.
    let inner_off = if gue {
        let udp = load::<[u8; UDP_HLEN]>(ctx, outer.l4_off).ok_or(DecapCounter::PassNotTunnel)?;
        if gue_port == 0 || u32::from(u16::from_be_bytes([udp[2], udp[3]])) != gue_port {
            return Err(DecapCounter::PassNotTunnel);
        }
        outer.l4_off + UDP_HLEN
    } else {
        outer.l4_off
    };
    if !maps::is_decap_source(outer.src, outer.family) {
        return Err(DecapCounter::DropForeignSource);
    }
    // The inner packet is of the outer family (the parsers check its
    // version; lb sends no other) and must fit inside the outer one.
    let malformed = |_| DecapCounter::DropMalformed;
    let inner = match ip_in_ip {
        IPPROTO_IPIP => parse::ipv4(ctx, inner_off, outer.end, false).map_err(malformed)?,
        _ => parse::ipv6(ctx, inner_off, outer.end, false).map_err(malformed)?,
    };
    if !maps::is_decap_vip(&AddrKey::from_bytes(inner.dst, inner.family)) {
        return Err(DecapCounter::DropNotVip);
    }
    // The inner family equals the outer one, so the EtherType stays; move
    // the link-layer header up to the inner packet.
    let outer_len = inner_off - l3_off;
    let l2 = L2Header::load(ctx, l3_off).ok_or(DecapCounter::DropMalformed)?;
    l2.store(ctx, outer_len)
        .ok_or(DecapCounter::DropMalformed)?;
    adjust_head(ctx, outer_len as i32).map_err(|_| DecapCounter::DropMalformed)?;
    Ok(DecapCounter::Decapsulated)
}
