//! The ICMP messages the load balancer sends: "fragmentation needed" (IPv4,
//! RFC 1191) and "packet too big" (IPv6, RFC 8201) for `ipip` packets that
//! would exceed the MTU once encapsulated, so the client's path MTU
//! discovery learns the tunnel's overhead instead of stalling; and echo
//! replies for VIPs whose service answers ping. Each kind has its own
//! per-CPU budget.
//!
//! The error is built in place: the frame grows by the new IP and ICMP
//! headers at the front, is cut after [`ICMP_QUOTE_LEN`] bytes of the
//! offending packet, and goes back out with the addresses swapped: from
//! the VIP to the client, from the interface's MAC to the one the frame
//! came from. VLAN tags stay.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    Counter, FAMILY_V4, IcmpKind, Interface,
    wire::{
        DEFAULT_TTL, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_FRAG_NEEDED, ICMP_HLEN,
        ICMP_QUOTE_LEN, ICMPV6_ECHO_REPLY, ICMPV6_PKT_TOOBIG, IPPROTO_ICMP, IPPROTO_ICMPV6,
        IPV4_DF, IPV4_HLEN, IPV6_DST_OFF, IPV6_HLEN,
    },
};

use crate::{
    checksum,
    forward::{L2Header, adjust_head, ipv4_header, return_to_sender},
    maps,
    packet::{bytes_at, frame_len, load, store},
    parse::{IPV6_ADDRS_OFF, Ip, source_is_unicast, v4_bytes},
};

/// What the ICMP checksum covers after the IP header: the ICMP header and
/// the quoted bytes.
const ICMP_MESSAGE_LEN: usize = ICMP_HLEN + ICMP_QUOTE_LEN;

/// Answers a TCP or UDP packet that arrived on `iface` and does not fit
/// in its MTU once the tunnel's `overhead` bytes are added with an ICMP
/// error carrying the MTU less that overhead. `Err(DropTooBig)` when no
/// error is due (IPv4 without DF: XDP cannot fragment, and such a sender
/// expects fragmentation, not an error; a source that is no single host)
/// or this CPU's budget is spent; the packet is then dropped.
#[inline(always)]
pub(crate) fn reply_too_big(
    ctx: &XdpContext,
    ip: &Ip,
    iface: &Interface,
    overhead: usize,
) -> Result<Counter, Counter> {
    if ip.end - ip.l3_off < ICMP_QUOTE_LEN {
        // An MTU below the quote: nothing sensible to send.
        return Err(Counter::DropTooBig);
    }
    let v4 = ip.family == FAMILY_V4;
    if v4 {
        let h = load::<[u8; 8]>(ctx, ip.l3_off).ok_or(Counter::DropMalformedIpv4)?;
        if u16::from_be_bytes([h[6], h[7]]) & IPV4_DF == 0 {
            return Err(Counter::DropTooBig);
        }
    }
    if !source_is_unicast(ip) {
        return Err(Counter::DropTooBig);
    }
    let now = maps::conntrack_settings().now;
    if !maps::take_icmp_budget(IcmpKind::TooBig, now) {
        return Err(Counter::DropTooBig);
    }
    let mtu = maps::settings().mtu_of(iface);
    let next_hop_mtu = mtu.saturating_sub(overhead as u32);
    let ip_hlen = if v4 { IPV4_HLEN } else { IPV6_HLEN };
    let mut l2 = L2Header::load(ctx, ip.l3_off).ok_or(Counter::DropMalformedEthernet)?;
    adjust_head(ctx, -((ip_hlen + ICMP_HLEN) as i32))?;
    l2.reply();
    l2.store(ctx, 0).ok_or(Counter::DropEncapFailed)?;
    // Cut what follows the quote (and any Ethernet padding). The frame's
    // length is made opaque: LLVM would fold `len - (end - start)` into
    // arithmetic on the end pointer, which the verifier refuses.
    let len = ip.l3_off + ip_hlen + ICMP_MESSAGE_LEN;
    let now_len = core::hint::black_box(frame_len(ctx));
    // SAFETY: plain helper call on our own context; the kernel checks delta.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, len as i32 - now_len as i32) } != 0 {
        return Err(Counter::DropEncapFailed);
    }
    let icmp_off = ip.l3_off + ip_hlen;
    if v4 {
        let [m0, m1] = (next_hop_mtu.min(u32::from(u16::MAX)) as u16).to_be_bytes();
        store(
            ctx,
            icmp_off,
            [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0, m0, m1],
        )
        .ok_or(Counter::DropEncapFailed)?;
        let len = (IPV4_HLEN + ICMP_MESSAGE_LEN) as u16;
        let (src, dst) = (v4_bytes(&ip.dst), v4_bytes(&ip.src));
        let h = ipv4_header(0, len, 0, IPV4_DF, IPPROTO_ICMP, src, dst);
        store(ctx, ip.l3_off, h).ok_or(Counter::DropEncapFailed)?;
        let sum = message_sum(ctx, icmp_off, 0)?;
        store(ctx, icmp_off + 2, checksum::fold(sum)).ok_or(Counter::DropEncapFailed)?;
    } else {
        store(ctx, icmp_off, [ICMPV6_PKT_TOOBIG, 0, 0, 0]).ok_or(Counter::DropEncapFailed)?;
        store(ctx, icmp_off + 4, next_hop_mtu.to_be()).ok_or(Counter::DropEncapFailed)?;
        let [l0, l1] = (ICMP_MESSAGE_LEN as u16).to_be_bytes();
        store(
            ctx,
            ip.l3_off,
            [0x60, 0, 0, 0, l0, l1, IPPROTO_ICMPV6, DEFAULT_TTL],
        )
        .ok_or(Counter::DropEncapFailed)?;
        // From the VIP, to the client.
        store(ctx, ip.l3_off + IPV6_ADDRS_OFF, ip.dst).ok_or(Counter::DropEncapFailed)?;
        store(ctx, ip.l3_off + IPV6_DST_OFF, ip.src).ok_or(Counter::DropEncapFailed)?;
        // The pseudo-header (RFC 8200 §8.1): addresses, length, next header.
        let mut pseudo = [0u32; 10];
        // SAFETY: [u8; 16] and [u32; 4] have the same size.
        let (s, d) = unsafe {
            (
                core::mem::transmute::<[u8; 16], [u32; 4]>(ip.dst),
                core::mem::transmute::<[u8; 16], [u32; 4]>(ip.src),
            )
        };
        pseudo[..4].copy_from_slice(&s);
        pseudo[4..8].copy_from_slice(&d);
        pseudo[8] = (ICMP_MESSAGE_LEN as u32).to_be();
        pseudo[9] = u32::from(IPPROTO_ICMPV6).to_be();
        // SAFETY: plain helper call over a stack buffer of 40 bytes.
        let seed = unsafe {
            bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                pseudo.as_mut_ptr(),
                size_of_val(&pseudo) as u32,
                0,
            )
        };
        let sum = message_sum(ctx, icmp_off, seed as u32)?;
        store(ctx, icmp_off + 2, checksum::fold(sum)).ok_or(Counter::DropEncapFailed)?;
    }
    Ok(Counter::ReplyTooBig)
}

/// The unfolded one's-complement sum of the ICMP message at `off` (its
/// checksum field zero), starting from `seed`. The helper sums the bytes
/// as they lie in memory, so its folded checksum is stored as it is, not
/// byte-swapped.
#[inline(always)]
fn message_sum(ctx: &XdpContext, off: usize, seed: u32) -> Result<u64, Counter> {
    let msg = bytes_at::<ICMP_MESSAGE_LEN>(ctx, off).ok_or(Counter::DropEncapFailed)?;
    // SAFETY: plain helper call; `msg` is inside the packet, checked above.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            msg as *mut u32,
            ICMP_MESSAGE_LEN as u32,
            seed,
        )
    };
    if sum < 0 {
        return Err(Counter::DropEncapFailed);
    }
    Ok(sum as u64)
}

/// Answers an ICMP/ICMPv6 echo request in place: the same message back as
/// an echo reply, from the VIP it was sent to, to the MAC it came from.
/// The checksums are updated for the words that change (RFC 1624), so a
/// request with a bad checksum gets a reply with one, which its sender
/// discards as the kernel would have discarded the request.
/// `Err(DropEchoLimit)` when this CPU's echo budget is spent, and
/// `Err(DropMalformedIcmp)` for a message shorter than an echo header.
#[inline(always)]
pub(crate) fn reply_echo(ctx: &XdpContext, ip: &Ip) -> Result<Counter, Counter> {
    if ip.l4_off + ICMP_HLEN > ip.end {
        return Err(Counter::DropMalformedIcmp);
    }
    let now = maps::conntrack_settings().now;
    if !maps::take_icmp_budget(IcmpKind::Echo, now) {
        return Err(Counter::DropEchoLimit);
    }
    let v4 = ip.family == FAMILY_V4;
    let reply = if v4 {
        ICMP_ECHO_REPLY
    } else {
        ICMPV6_ECHO_REPLY
    };
    // Type, code, checksum. The ICMPv6 checksum also covers the addresses,
    // whose sum the swap below leaves as it was.
    let [ty, code, c0, c1] = load::<[u8; 4]>(ctx, ip.l4_off).ok_or(Counter::DropMalformedIcmp)?;
    let [s0, s1] = checksum::replace(
        u16::from_be_bytes([c0, c1]),
        u16::from_be_bytes([ty, code]),
        u16::from_be_bytes([reply, code]),
    )
    .to_be_bytes();
    store(ctx, ip.l4_off, [reply, code, s0, s1]).ok_or(Counter::DropMalformedIcmp)?;
    if v4 {
        // TTL, protocol, header checksum; then the addresses, swapped
        // (which leaves the header's sum as it was).
        let [ttl, proto, h0, h1] =
            load::<[u8; 4]>(ctx, ip.l3_off + IPV4_TTL_OFF).ok_or(Counter::DropMalformedIpv4)?;
        let [h0, h1] = checksum::replace(
            u16::from_be_bytes([h0, h1]),
            u16::from_be_bytes([ttl, proto]),
            u16::from_be_bytes([DEFAULT_TTL, proto]),
        )
        .to_be_bytes();
        let (d, s) = (ip.dst, ip.src);
        let h = [
            DEFAULT_TTL,
            proto,
            h0,
            h1,
            d[0],
            d[1],
            d[2],
            d[3],
            s[0],
            s[1],
            s[2],
            s[3],
        ];
        store(ctx, ip.l3_off + IPV4_TTL_OFF, h).ok_or(Counter::DropMalformedIpv4)?;
    } else {
        store(ctx, ip.l3_off + IPV6_HOP_LIMIT_OFF, DEFAULT_TTL)
            .ok_or(Counter::DropMalformedIpv6)?;
        store(ctx, ip.l3_off + IPV6_ADDRS_OFF, ip.dst).ok_or(Counter::DropMalformedIpv6)?;
        store(ctx, ip.l3_off + IPV6_DST_OFF, ip.src).ok_or(Counter::DropMalformedIpv6)?;
    }
    return_to_sender(ctx)?;
    Ok(Counter::ReplyEcho)
}

/// Offset of the TTL in an IPv4 header (protocol, checksum and the
/// addresses follow).
const IPV4_TTL_OFF: usize = 8;
/// Offset of the hop limit in an IPv6 header.
const IPV6_HOP_LIMIT_OFF: usize = 7;
