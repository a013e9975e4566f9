//! Forwarding: MAC rewrite (`dsr-l2`) and encapsulation in IPIP/IP6IP6
//! (`ipip`) or GUE (`gue`), addressed from the interface the frame leaves
//! by (the receiving one, or another attached one it is redirected to);
//! plus moving the link-layer header when a tunnel header is added or
//! removed.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{
    Addr, Counter, FAMILY_V4, Interface, Settings,
    limits::{GUE_SOURCE_PORT_BASE, GUE_SOURCE_PORT_MASK},
    wire::{
        DEFAULT_TTL, ETH_HLEN, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV4_DF, IPV4_HLEN,
        IPV6_DST_OFF, IPV6_HLEN, UDP_HLEN, VLAN_HLEN,
    },
};

use crate::{
    checksum,
    packet::{load, store},
    parse::{IPV6_ADDRS_OFF, Ip, v4_bytes},
    select::Choice,
};

/// IPv6 flow label mask (20 bits, RFC 6437).
const FLOW_LABEL_MASK: u32 = 0x000f_ffff;

/// The two addresses that open an Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
struct Macs {
    to: [u8; 6],
    from: [u8; 6],
}

impl Macs {
    /// The addresses of a reply: back to the sender, from the MAC it sent
    /// to (ours: only frames sent to it are the load balancer's).
    #[inline(always)]
    fn reply(&self) -> Macs {
        Macs {
            to: self.from,
            from: self.to,
        }
    }
}

/// The link-layer header (Ethernet and up to two VLAN tags), held aside while
/// the packet's head moves.
pub(crate) struct L2Header {
    macs: Macs,
    ethertype: [u8; 2],
    tags: [[u8; VLAN_HLEN]; 2],
    len: usize,
}

/// Offset of the EtherType (or the first VLAN tag's TPID).
const ETHERTYPE_OFF: usize = 12;

impl L2Header {
    /// Copies the `len`-byte link-layer header from the start of the packet.
    #[inline(always)]
    pub(crate) fn load(ctx: &XdpContext, len: usize) -> Option<Self> {
        let mut h = L2Header {
            macs: load(ctx, 0)?,
            ethertype: load(ctx, ETHERTYPE_OFF)?,
            tags: [[0; VLAN_HLEN]; 2],
            len,
        };
        if len > ETH_HLEN {
            h.tags[0] = load(ctx, ETH_HLEN)?;
        }
        if len > ETH_HLEN + VLAN_HLEN {
            h.tags[1] = load(ctx, ETH_HLEN + VLAN_HLEN)?;
        }
        Some(h)
    }

    /// Readdresses the header back to where the frame came from, from the
    /// MAC it was sent to (ours).
    #[inline(always)]
    pub(crate) fn reply(&mut self) {
        self.macs = self.macs.reply();
    }

    /// Writes the header at `off`.
    #[inline(always)]
    pub(crate) fn store(&self, ctx: &XdpContext, off: usize) -> Option<()> {
        store(ctx, off, self.macs)?;
        store(ctx, off + ETHERTYPE_OFF, self.ethertype)?;
        if self.len > ETH_HLEN {
            store(ctx, off + ETH_HLEN, self.tags[0])?;
        }
        if self.len > ETH_HLEN + VLAN_HLEN {
            store(ctx, off + ETH_HLEN + VLAN_HLEN, self.tags[1])?;
        }
        Some(())
    }
}

/// Moves the packet's head by `delta` bytes (negative grows it).
#[inline(always)]
pub(crate) fn adjust_head(ctx: &XdpContext, delta: i32) -> Result<(), Counter> {
    // SAFETY: plain helper call on our own context; the kernel checks delta.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(Counter::DropEncapFailed);
    }
    Ok(())
}

/// `dsr-l2`: readdress the frame to the backend's next hop, from `out`
/// (the interface it leaves by); leave the IP packet as it is. Only the
/// 12 address bytes change; VLAN tags stay in place.
#[inline(always)]
pub(crate) fn rewrite_macs(
    ctx: &XdpContext,
    choice: &Choice,
    out: &Interface,
) -> Result<(), Counter> {
    let macs = Macs {
        to: choice.backend.mac,
        from: out.mac,
    };
    store(ctx, 0, macs).ok_or(Counter::DropMalformedEthernet)
}

/// Sends the frame back to the MAC it came from, for a reply built in place.
#[inline(always)]
pub(crate) fn return_to_sender(ctx: &XdpContext) -> Result<(), Counter> {
    let macs: Macs = load(ctx, 0).ok_or(Counter::DropMalformedEthernet)?;
    store(ctx, 0, macs.reply()).ok_or(Counter::DropMalformedEthernet)
}

/// The outer source (its last 32 bits for IPv6, host order): the
/// configured address with the bits under `mask` taken from the flow hash,
/// so a backend's RSS spreads tunnelled flows.
#[inline(always)]
fn tunnel_source(base: [u8; 4], mask: u32, hash: u32) -> u32 {
    (u32::from_be_bytes(base) & !mask) | (hash & mask)
}

/// The first byte of an IPv4 header without options: version 4, 5 words.
const IPV4_VERSION_IHL: u8 = 0x45;
/// The 32-bit word of an IPv4 header whose upper half (as stored, read
/// little-endian) is the checksum.
const IPV4_CHECKSUM_WORD: usize = 2;

/// The outer header's identification and flags words, from the inner
/// header's flags word (RFC 2003 §3.1): DF copied; without DF, a random
/// non-zero id, so fragments of different packets on the way are not
/// mixed up (RFC 6864 lets a packet with DF carry any id: 0).
#[inline(always)]
fn outer_id_and_flags(inner_flags: u16) -> (u16, u16) {
    if inner_flags & IPV4_DF != 0 {
        return (0, IPV4_DF);
    }
    // SAFETY: plain helper call.
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    (if id == 0 { 1 } else { id }, 0)
}

/// A 20-byte IPv4 header, checksum filled in: no options, TTL 64, fragment
/// offset 0; `len`, `id` and `flags` host order, the addresses as on the
/// wire. Built as the five 32-bit words it is stored as (its bytes read
/// little-endian), so that no field but the three numbers is byte-swapped:
/// the Internet checksum of byte-swapped words is the byte-swapped checksum
/// (RFC 1071 §2(B)), which lands in the right order when stored the same
/// way.
#[inline(always)]
pub(crate) fn ipv4_header(
    tos: u8,
    len: u16,
    id: u16,
    flags: u16,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
) -> [u32; 5] {
    let mut h = [
        u32::from_le_bytes([IPV4_VERSION_IHL, tos, 0, 0]) | u32::from(len.to_be()) << 16,
        u32::from(id.to_be()) | u32::from(flags.to_be()) << 16,
        // `IPV4_CHECKSUM_WORD`: the checksum zero for now.
        u32::from_le_bytes([DEFAULT_TTL, proto, 0, 0]),
        u32::from_le_bytes(src),
        u32::from_le_bytes(dst),
    ];
    let sum: u64 = h.iter().map(|&w| u64::from(w)).sum();
    h[IPV4_CHECKSUM_WORD] |= u32::from(checksum::fold(sum)) << 16;
    h
}

/// Which tunnel a packet goes in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tunnel {
    /// IPIP (RFC 2003) or IPv6-in-IPv6 (RFC 2473).
    Ipip,
    /// GUE variant 1: an outer IP header, a UDP header, then the packet.
    Gue,
}

/// The bytes `tunnel` adds to `ip`: an outer header of its family, and for
/// GUE a UDP header.
#[inline(always)]
pub(crate) fn outer_len(ip: &Ip, tunnel: Tunnel) -> usize {
    let ip_len = if ip.family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    };
    match tunnel {
        Tunnel::Ipip => ip_len,
        Tunnel::Gue => ip_len + UDP_HLEN,
    }
}

/// Prepends `tunnel`'s headers toward the backend, for a packet that fits
/// `out` (the interface it leaves by) once encapsulated. The outer family
/// is the inner one, so the EtherType stays.
#[inline(always)]
pub(crate) fn encapsulate(
    ctx: &XdpContext,
    ip: &Ip,
    choice: &Choice,
    out: &Interface,
    settings: &Settings,
    tunnel: Tunnel,
) -> Result<(), Counter> {
    let backend = &choice.backend;
    if backend.family != ip.family {
        // Refused by config validation; counted in case the maps disagree.
        return Err(Counter::DropEncapFailed);
    }
    let inner_len = ip.end - ip.l3_off;
    let outer_len = outer_len(ip, tunnel);
    if inner_len + outer_len > settings.mtu_of(out) as usize {
        return Err(Counter::DropTooBig);
    }
    let mut l2 = L2Header::load(ctx, ip.l3_off).ok_or(Counter::DropMalformedEthernet)?;
    // The outer TOS and DF (RFC 2003 §3.1), or traffic class (RFC 2473
    // §6.5), are the inner header's: its ECN field too, so congestion on
    // the tunnel's path can be marked (RFC 6040 §4.1, normal mode).
    let (tos, inner_flags) = if ip.family == FAMILY_V4 {
        let h = load::<[u8; 8]>(ctx, ip.l3_off).ok_or(Counter::DropMalformedIpv4)?;
        (h[1], u16::from_be_bytes([h[6], h[7]]))
    } else {
        let [h0, h1] = load::<[u8; 2]>(ctx, ip.l3_off).ok_or(Counter::DropMalformedIpv6)?;
        ((h0 << 4) | (h1 >> 4), 0)
    };
    adjust_head(ctx, -(outer_len as i32))?;
    l2.macs = Macs {
        to: backend.mac,
        from: out.mac,
    };
    l2.store(ctx, 0).ok_or(Counter::DropEncapFailed)?;
    let len = (inner_len + outer_len) as u16;
    let (proto, ip_hlen) = match (tunnel, ip.family == FAMILY_V4) {
        (Tunnel::Gue, v4) => (IPPROTO_UDP, if v4 { IPV4_HLEN } else { IPV6_HLEN }),
        (Tunnel::Ipip, true) => (IPPROTO_IPIP, IPV4_HLEN),
        (Tunnel::Ipip, false) => (IPPROTO_IPV6, IPV6_HLEN),
    };
    if tunnel == Tunnel::Gue {
        store(
            ctx,
            ip.l3_off + ip_hlen,
            gue_udp_header(choice.hash, settings.gue_port, len - ip_hlen as u16),
        )
        .ok_or(Counter::DropEncapFailed)?;
    }
    if ip.family == FAMILY_V4 {
        let src = tunnel_source(
            settings.tunnel_src_v4,
            settings.tunnel_src_v4_hash_mask,
            choice.hash,
        );
        let (id, flags) = outer_id_and_flags(inner_flags);
        let h = ipv4_header(
            tos,
            len,
            id,
            flags,
            proto,
            src.to_be_bytes(),
            v4_bytes(&backend.addr),
        );
        store(ctx, ip.l3_off, h).ok_or(Counter::DropEncapFailed)
    } else {
        let mut src: Addr = settings.tunnel_src_v6;
        let last = tunnel_source(
            [src[12], src[13], src[14], src[15]],
            settings.tunnel_src_v6_hash_mask,
            choice.hash,
        )
        .to_be_bytes();
        src[12] = last[0];
        src[13] = last[1];
        src[14] = last[2];
        src[15] = last[3];
        // The flow label carries the flow hash so ECMP on the way spreads tunnels.
        let head = ipv6_head(tos, choice.hash, len - IPV6_HLEN as u16, proto);
        store(ctx, ip.l3_off, head).ok_or(Counter::DropEncapFailed)?;
        store(ctx, ip.l3_off + IPV6_ADDRS_OFF, src).ok_or(Counter::DropEncapFailed)?;
        store(ctx, ip.l3_off + IPV6_DST_OFF, backend.addr).ok_or(Counter::DropEncapFailed)
    }
}

/// The first 8 bytes of an IPv6 header (the addresses follow): traffic
/// class `class`, flow label `label`'s low 20 bits, `payload_len` bytes
/// after the header, next header `proto`, hop limit 64.
#[inline(always)]
pub(crate) fn ipv6_head(class: u8, label: u32, payload_len: u16, proto: u8) -> [u8; 8] {
    let label = label & FLOW_LABEL_MASK;
    let [p0, p1] = payload_len.to_be_bytes();
    [
        0x60 | (class >> 4),
        (class << 4) | (label >> 16) as u8,
        (label >> 8) as u8,
        label as u8,
        p0,
        p1,
        proto,
        DEFAULT_TTL,
    ]
}

/// The UDP header of a GUE packet of `udp_len` bytes (header included):
/// the source port from the flow hash, so backends' RSS and ECMP on the
/// way spread flows; to `port` (network order); no checksum (RFC 6935 lets
/// tunnels over IPv6 leave it zero, as over IPv4; `lb decap` needs none).
#[inline(always)]
pub(crate) fn gue_udp_header(hash: u32, port: u16, udp_len: u16) -> [u16; UDP_HLEN / 2] {
    let sport = GUE_SOURCE_PORT_BASE | (hash as u16 & GUE_SOURCE_PORT_MASK);
    [sport.to_be(), port, udp_len.to_be(), 0]
}
