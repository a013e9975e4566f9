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
    wire::{
        ECN_MASK, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, UDP_HLEN,
        ecn_decapsulated,
    },
};

use crate::{
    checksum,
    forward::{L2Header, adjust_head},
    maps,
    packet::{load, store},
    parse,
};

/// Offset of the header checksum in an IPv4 header.
const IPV4_CHECKSUM_OFF: usize = 10;
/// Where the ECN field sits in the second byte of an IP header: the TOS
/// byte's low bits (IPv4), the traffic class's low bits, which are that
/// byte's bits 4 and 5 (IPv6).
const ECN_SHIFT_V4: u8 = 0;
const ECN_SHIFT_V6: u8 = 4;

/// Decapsulates if the packet is a tunnel packet for this host.
#[inline(always)]
pub(crate) fn decapsulate(ctx: &XdpContext) -> (u32, DecapCounter) {
    let counter = match try_decapsulate(ctx) {
        Ok(c) | Err(c) => c,
    };
    let action = match counter {
        DecapCounter::DropMalformed
        | DecapCounter::DropForeignSource
        | DecapCounter::DropNotVip
        | DecapCounter::DropCongestedNotEct => xdp_action::XDP_DROP,
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
    carry_ecn(ctx, l3_off, inner_off, ip_in_ip == IPPROTO_IPIP)?;
    // The inner family equals the outer one, so the EtherType stays; move
    // the link-layer header up to the inner packet.
    let outer_len = inner_off - l3_off;
    let l2 = L2Header::load(ctx, l3_off).ok_or(DecapCounter::DropMalformed)?;
    l2.store(ctx, outer_len)
        .ok_or(DecapCounter::DropMalformed)?;
    adjust_head(ctx, outer_len as i32).map_err(|_| DecapCounter::DropMalformed)?;
    Ok(DecapCounter::Decapsulated)
}

/// Carries the outer header's ECN marks over to the inner header at
/// `inner_off` ([`ecn_decapsulated`], RFC 6040 §4.2): congestion marked on
/// the tunnel's path reaches the transport instead of vanishing with the
/// outer header. An IPv4 inner header's checksum follows its TOS byte.
#[inline(always)]
fn carry_ecn(
    ctx: &XdpContext,
    outer_off: usize,
    inner_off: usize,
    v4: bool,
) -> Result<(), DecapCounter> {
    let malformed = DecapCounter::DropMalformed;
    let shift = if v4 { ECN_SHIFT_V4 } else { ECN_SHIFT_V6 };
    let [_, outer] = load::<[u8; 2]>(ctx, outer_off).ok_or(malformed)?;
    let [first, second] = load::<[u8; 2]>(ctx, inner_off).ok_or(malformed)?;
    let was = (second >> shift) & ECN_MASK;
    let ecn = ecn_decapsulated(outer >> shift, was).ok_or(DecapCounter::DropCongestedNotEct)?;
    if ecn == was {
        return Ok(());
    }
    let marked = (second & !(ECN_MASK << shift)) | (ecn << shift);
    // Both bytes, where they were read: the verifier then sees the store
    // through the pointer the load checked.
    store(ctx, inner_off, [first, marked]).ok_or(malformed)?;
    if v4 {
        let off = inner_off + IPV4_CHECKSUM_OFF;
        let check = load::<[u8; 2]>(ctx, off).ok_or(malformed)?;
        let check = checksum::replace(
            u16::from_be_bytes(check),
            u16::from_be_bytes([first, second]),
            u16::from_be_bytes([first, marked]),
        );
        store(ctx, off, check.to_be_bytes()).ok_or(malformed)?;
    }
    Ok(())
}
