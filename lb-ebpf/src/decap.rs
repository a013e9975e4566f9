//! The backend-side program for `ipip` services: strip the outer IPv4/IPv6
//! header of tunnel packets addressed to this host and pass the inner packet
//! to the stack (for kernels without the ipip/ip6_tunnel modules).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    AddrKey,
    counters::DecapCounter,
    wire::{ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN},
};

use crate::{
    forward::{L2Header, adjust_head},
    maps,
    packet::load,
    parse,
};

/// Decapsulates if the packet is a tunnel packet for this host.
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext) -> (u32, DecapCounter) {
    let counter = match try_decapsulate(ctx) {
        Ok(c) | Err(c) => c,
    };
    let action = match counter {
        DecapCounter::DropMalformed => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    };
    (action, counter)
}

#[inline(always)]
fn try_decapsulate(ctx: &XdpContext) -> Result<DecapCounter, DecapCounter> {
    let not_tunnel = |_| DecapCounter::PassNotTunnel;
    let (ethertype, l3_off) = parse::ethernet(ctx).map_err(not_tunnel)?;
    let limit = parse::limit(ctx);
    let (outer, tunnel_proto, inner_hlen, inner_version) = match ethertype {
        ETH_P_IP => (
            parse::ipv4(ctx, l3_off, limit, false).map_err(not_tunnel)?,
            IPPROTO_IPIP,
            IPV4_HLEN,
            4,
        ),
        ETH_P_IPV6 => (
            parse::ipv6(ctx, l3_off, limit, false).map_err(not_tunnel)?,
            IPPROTO_IPV6,
            IPV6_HLEN,
            6,
        ),
        _ => return Err(DecapCounter::PassNotTunnel),
    };
    if outer.proto != tunnel_proto || outer.fragment {
        return Err(DecapCounter::PassNotTunnel);
    }
    let endpoint = AddrKey::from_bytes(outer.dst, outer.family);
    if !maps::is_decap_addr(&endpoint) {
        return Err(DecapCounter::PassNotLocal);
    }
    let version = load::<[u8; 2]>(ctx, outer.l4_off).ok_or(DecapCounter::DropMalformed)?[0] >> 4;
    if version != inner_version || outer.l4_off + inner_hlen > outer.end {
        return Err(DecapCounter::DropMalformed);
    }
    // The inner family equals the outer one (checked above), so the
    // EtherType stays; move the link-layer header up to the inner packet.
    let outer_len = outer.l4_off - l3_off;
    let l2 = L2Header::load(ctx, l3_off).ok_or(DecapCounter::DropMalformed)?;
    l2.store(ctx, outer_len)
        .ok_or(DecapCounter::DropMalformed)?;
    adjust_head(ctx, outer_len as i32).map_err(|_| DecapCounter::DropMalformed)?;
    Ok(DecapCounter::Decapsulated)
}
