//! The probe encapsulator (`lb_probe_encap`, TC egress): lb's health probes
//! to a backend of an `ipip` or `gue` service are addressed to the VIP and
//! routed to the backend's next hop by a per-backend policy route (see
//! `probe_path` in lb-userspace); here they get the tunnel header the data
//! plane would give a client's packet, so a backend whose decapsulator is
//! gone fails them. Packets without one of lb's probe marks pass untouched
//! after one comparison.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use lb_common::{
    FAMILY_V4, ProbeTunnel,
    limits::{PROBE_MARK_BASE, PROBE_MARKS},
    wire::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV4_DF,
        IPV4_HLEN, IPV6_DST_OFF, IPV6_HLEN, UDP_HLEN,
    },
};

use crate::{
    forward::{gue_udp_header, ipv4_header, ipv6_head},
    maps,
    parse::{IPV6_ADDRS_OFF, v4_bytes},
};

/// Puts a probe in its backend's tunnel; passes every other packet.
#[inline(always)]
pub(crate) fn encapsulate(ctx: &TcContext) -> i32 {
    // SAFETY: the context's own skb, read once.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark.wrapping_sub(PROBE_MARK_BASE) >= PROBE_MARKS {
        return TC_ACT_OK;
    }
    // A probe with no tunnel is a `dsr-l2` backend's: it goes as it is.
    let Some(tunnel) = maps::probe_tunnel(mark) else {
        return TC_ACT_OK;
    };
    // A probe that cannot be put in its tunnel is dropped, never sent bare:
    // a backend holding the VIP would answer it outside the tunnel and pass.
    match put_in_tunnel(ctx, &tunnel, mark) {
        Ok(()) => TC_ACT_OK,
        Err(()) => TC_ACT_SHOT,
    }
}

/// Inserts `tunnel`'s outer header (and a GUE UDP header) after the
/// Ethernet header. The route already sent the frame to the backend's next
/// hop, and the outer family is the inner one, so the Ethernet header stays.
#[inline(always)]
fn put_in_tunnel(ctx: &TcContext, tunnel: &ProbeTunnel, mark: u32) -> Result<(), ()> {
    let v4 = tunnel.family == FAMILY_V4;
    let (ethertype, ip_hlen, l3_flag, ip_in_ip) = if v4 {
        (
            ETH_P_IP,
            IPV4_HLEN,
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
            IPPROTO_IPIP,
        )
    } else {
        (
            ETH_P_IPV6,
            IPV6_HLEN,
            BPF_F_ADJ_ROOM_ENCAP_L3_IPV6,
            IPPROTO_IPV6,
        )
    };
    // `protocol` holds the EtherType in network order.
    if u16::from_be(ctx.skb.protocol() as u16) != ethertype {
        return Err(());
    }
    let gue = tunnel.gue_port != 0;
    let (proto, outer_len, flags) = if gue {
        (
            IPPROTO_UDP,
            ip_hlen + UDP_HLEN,
            l3_flag | BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        )
    } else {
        (ip_in_ip, ip_hlen, l3_flag)
    };
    ctx.adjust_room(outer_len as i32, BPF_ADJ_ROOM_MAC, u64::from(flags))
        .map_err(|_| ())?;
    // At egress the length counts the Ethernet header.
    let len = (ctx.len() as usize).saturating_sub(ETH_HLEN) as u16;
    if gue {
        // The mark stands in for the flow hash: a probe's source port.
        let udp = gue_udp_header(mark, tunnel.gue_port, len - ip_hlen as u16);
        ctx.store(ETH_HLEN + ip_hlen, &udp, 0).map_err(|_| ())?;
    }
    if v4 {
        let h = ipv4_header(
            0,
            len,
            0,
            IPV4_DF,
            proto,
            v4_bytes(&tunnel.src),
            v4_bytes(&tunnel.dst),
        );
        ctx.store(ETH_HLEN, &h, 0).map_err(|_| ())
    } else {
        let head = ipv6_head(0, mark, len - IPV6_HLEN as u16, proto);
        ctx.store(ETH_HLEN, &head, 0).map_err(|_| ())?;
        ctx.store(ETH_HLEN + IPV6_ADDRS_OFF, &tunnel.src, 0)
            .map_err(|_| ())?;
        ctx.store(ETH_HLEN + IPV6_DST_OFF, &tunnel.dst, 0)
            .map_err(|_| ())
    }
}
