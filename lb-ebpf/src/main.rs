//! lb's XDP programs.
//!
//! `lb_xdp` is the load balancer; its path reads as a pipeline in which every
//! step either continues or ends with the [`Counter`] that names the outcome.
//! The XDP action follows from that counter, so every exit is counted exactly
//! once. `lb_decap` runs on backends of `ipip` and `gue` services;
//! `lb_probe_encap` (TC egress) puts lb's probes of their backends in the
//! tunnel.
//!
//! # Layout
//! - `packet`: bounds-checked access (the only raw-pointer `unsafe`).
//! - `parse`: Ethernet/VLAN, IPv4, IPv6, TCP/UDP, quoted ICMP packets.
//! - `select`: connection table and Maglev lookup.
//! - `forward`: MAC rewrite and IPIP/GUE encapsulation.
//! - `icmp`: the ICMP messages lb sends (packet too big, echo replies).
//! - `checksum`: the Internet checksum (IPv4 headers, ICMP errors).
//! - `decap`: the backend-side decapsulator.
//! - `probe_encap`: the tunnel for lb's probes through the VIP.
//! - `maps`: every map and its accessors, counters included.
#![no_std]
#![no_main]
// Wide packet loads (`packet`): BPF inline assembly is unstable in Rust.
#![feature(asm_experimental_arch)]

mod checksum;
mod decap;
mod forward;
mod icmp;
mod maps;
mod packet;
mod parse;
mod probe_encap;
mod select;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use lb_common::{
    AddrKey, Counter, FlowKey, ForwardWay, Interface, SERVICE_F_GUE, SERVICE_F_TUNNEL,
    ServiceValue,
    wire::{ETH_P_IP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    forward::Tunnel,
    packet::frame_len,
    parse::{IcmpMessage, Ip},
    select::Choice,
};

/// The load balancer. Inlined into the wrapper `#[xdp]` generates: left
/// to LLVM's budget, a body this size was moved behind a call that every
/// packet paid for (see the `dataplane` unit tests).
#[xdp]
#[inline(always)]
pub(crate) fn lb_xdp(ctx: XdpContext) -> u32 {
    let counter = match balance(&ctx) {
        Ok(c) | Err(c) => c,
    };
    // A forward is counted once, in its backend's stats (`deliver`).
    if counter.forward_way().is_none() {
        maps::count(counter);
    }
    let action = action(counter);
    if action == xdp_action::XDP_DROP {
        log_drop(&ctx, counter);
    }
    action
}

/// The decapsulator for backends of `ipip` and `gue` services.
#[xdp]
pub(crate) fn lb_decap(ctx: XdpContext) -> u32 {
    let (action, counter) = decap::decapsulate(&ctx);
    maps::count_decap(counter);
    action
}

/// The probe encapsulator (TC egress) for backends of `ipip` and `gue`
/// services probed through the VIP.
#[classifier]
pub(crate) fn lb_probe_encap(ctx: TcContext) -> i32 {
    probe_encap::encapsulate(&ctx)
}

/// The XDP action each outcome implies.
#[inline(always)]
fn action(c: Counter) -> u32 {
    match c {
        Counter::PassNotIp
        | Counter::PassNotService
        | Counter::PassOtherProtocol
        | Counter::PassForeignMac => xdp_action::XDP_PASS,
        Counter::ForwardDsr
        | Counter::ForwardIpip
        | Counter::ForwardGue
        | Counter::ForwardIcmpError
        | Counter::ReplyTooBig
        | Counter::ReplyEcho => xdp_action::XDP_TX,
        // `forward` has named the device-map entry.
        Counter::RedirectBackend => xdp_action::XDP_REDIRECT,
        // Spelled out, so a new counter must be given its action here.
        Counter::DropMalformedEthernet
        | Counter::DropMalformedIpv4
        | Counter::DropMalformedIpv6
        | Counter::DropMalformedL4
        | Counter::DropMalformedIcmp
        | Counter::DropFragment
        | Counter::DropNoBackend
        | Counter::DropTooBig
        | Counter::DropEncapFailed
        | Counter::DropEchoLimit
        | Counter::DropNoEgress
        | Counter::DropDenied
        | Counter::DropNotAllowed
        | Counter::DropRateLimited => xdp_action::XDP_DROP,
    }
}

/// Reports a drop through aya-log, which the daemon forwards to its own log
/// at debug level. User space sets the level when it loads the program; off
/// (the default outside `LB_LOG=debug`), this costs one load and a branch.
/// The counters, not these lines, are the record of drops: the ring buffer
/// may be full under a flood, and then lines are lost.
#[inline(never)]
fn log_drop(ctx: &XdpContext, c: Counter) {
    match c {
        Counter::DropNoBackend => debug!(
            ctx,
            "drop_no_backend: the service has no backend in rotation"
        ),
        Counter::DropTooBig => debug!(
            ctx,
            "drop_too_big: the encapsulated packet would exceed the MTU"
        ),
        _ => debug!(
            ctx,
            "dropped a packet to a VIP address: reason {}", c as u32
        ),
    }
}

#[inline(always)]
fn vip_key(ip: &Ip) -> AddrKey {
    AddrKey::from_bytes(ip.dst, ip.family)
}

/// The interface the frame arrived on, if the frame was sent to its MAC.
/// Only such frames are the load balancer's: one a switch floods (unknown
/// unicast for another host), or sent to a group address, passes untouched,
/// so a forwarded frame always leaves from the interface's own MAC.
#[inline(always)]
fn receiving_interface(ctx: &XdpContext) -> Result<&'static Interface, Counter> {
    let iface = maps::interface(ctx.ingress_ifindex() as u32).ok_or(Counter::PassForeignMac)?;
    let to = parse::destination_mac(ctx).ok_or(Counter::DropMalformedEthernet)?;
    if iface.owns(&to) {
        Ok(iface)
    } else {
        Err(Counter::PassForeignMac)
    }
}

/// A problem on a packet to a VIP address (`dst`), sent to this
/// interface's MAC, is ours to drop and count; on any other packet it is
/// the kernel's business, so the packet passes untouched.
#[inline(always)]
fn ours_or_pass(ctx: &XdpContext, dst: &AddrKey, c: Counter) -> Counter {
    if !maps::is_vip(dst) {
        Counter::PassNotService
    } else if let Err(foreign) = receiving_interface(ctx) {
        foreign
    } else {
        c
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<Counter, Counter> {
    let (ethertype, l3_off) = parse::ethernet(ctx)?;
    // The destination before the rest of the header: most of what a host
    // receives is not for a VIP, and passes after one read of the VIP
    // filter, whatever else its header holds. Every step below is for
    // packets to a VIP, or to an address the filter cannot tell from one.
    let Some(folded) = parse::destination_fold(ctx, ethertype, l3_off)? else {
        return Ok(Counter::PassNotIp);
    };
    if !maps::may_be_vip(folded) {
        return Ok(Counter::PassNotService);
    }
    let limit = parse::limit(ctx);
    // `destination_fold` knows no other EtherType.
    let ip = if ethertype == ETH_P_IP {
        parse::ipv4(ctx, l3_off, limit, false)
    } else {
        parse::ipv6(ctx, l3_off, limit, false)
    };
    // A malformed header is ours only on a packet to a VIP (the
    // destination is there: `destination_fold` read it).
    let ip = ip.map_err(|c| match parse::destination(ctx, ethertype, l3_off) {
        Some(dst) => ours_or_pass(ctx, &dst, c),
        None => c,
    })?;
    // Fragments: see docs/dataplane.md. Non-first fragments carry no ports,
    // so the rule keys on the VIP address alone.
    if ip.fragment {
        return Ok(ours_or_pass(ctx, &vip_key(&ip), Counter::DropFragment));
    }
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => balance_flow(ctx, &ip),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => match parse::icmp_message(ctx, &ip) {
            IcmpMessage::PmtuError => relay_icmp(ctx, &ip),
            IcmpMessage::EchoRequest => answer_echo(ctx, &ip),
            IcmpMessage::Other => Ok(Counter::PassOtherProtocol),
        },
        _ => Ok(Counter::PassOtherProtocol),
    }
}

/// A TCP or UDP packet: to its service's backend, or passed if no service.
#[inline(always)]
fn balance_flow(ctx: &XdpContext, ip: &Ip) -> Result<Counter, Counter> {
    let iface = receiving_interface(ctx)?;
    let ports = parse::ports(ctx, ip).map_err(|c| ours_or_pass(ctx, &vip_key(ip), c))?;
    let flow = FlowKey {
        src: ip.src,
        dst: ip.dst,
        sport: ports.sport,
        dport: ports.dport,
        proto: ip.proto,
        family: ip.family,
        _pad: [0; 2],
    };
    let ct = maps::conntrack_settings();
    let (service, choice) = select::select_backend(ct, &flow, ports.tcp_flags, true)?;
    charged(&service, deliver(ctx, ip, iface, &service, &choice, false))
}

/// Sends a packet of `service` to its chosen backend: a TCP or UDP packet,
/// or with `relayed` an ICMP error about one of its flows.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    ip: &Ip,
    iface: &'static Interface,
    service: &ServiceValue,
    choice: &Choice,
    relayed: bool,
) -> Result<Counter, Counter> {
    let out = egress(iface, choice)?;
    // As received, before any tunnel header.
    let bytes = frame_len(ctx) as u64;
    match forward(ctx, ip, &out, service, choice) {
        // Never for relayed ICMP errors: never an error about an error
        // (RFC 1122 §3.2.2), so those are only dropped.
        Err(Counter::DropTooBig) if !relayed => {
            let overhead = tunnel(service).map_or(0, |t| forward::outer_len(ip, t));
            return icmp::reply_too_big(ctx, ip, out.iface, overhead);
        }
        done => done?,
    }
    let way = match (out.redirect, relayed, tunnel(service)) {
        (Some(_), _, _) => ForwardWay::Redirect,
        (None, true, _) => ForwardWay::IcmpError,
        (None, false, None) => ForwardWay::Dsr,
        (None, false, Some(Tunnel::Ipip)) => ForwardWay::Ipip,
        (None, false, Some(Tunnel::Gue)) => ForwardWay::Gue,
    };
    maps::count_forward(choice.id, way, bytes, choice.new_flow);
    Ok(way.counter())
}

/// Where a frame to a backend leaves: the interface, and the port to
/// redirect it to when that is not the receiving one.
struct Egress {
    iface: &'static Interface,
    redirect: Option<u8>,
}

/// The attached interface the chosen backend's route leaves by (its
/// [`BackendValue::port`](lb_common::BackendValue::port)), found before the
/// frame is touched so that a detached one drops it unchanged.
#[inline(always)]
fn egress(arrived: &'static Interface, choice: &Choice) -> Result<Egress, Counter> {
    let port = choice.backend.port();
    if port == 0 || port == arrived.port {
        return Ok(Egress {
            iface: arrived,
            redirect: None,
        });
    }
    Ok(Egress {
        iface: maps::egress(port).ok_or(Counter::DropNoEgress)?,
        redirect: Some(port),
    })
}

/// The tunnel `service` forwards in, if any.
#[inline(always)]
fn tunnel(service: &ServiceValue) -> Option<Tunnel> {
    if service.flags & SERVICE_F_TUNNEL == 0 {
        None
    } else if service.flags & SERVICE_F_GUE != 0 {
        Some(Tunnel::Gue)
    } else {
        Some(Tunnel::Ipip)
    }
}

/// An ICMP "fragmentation needed"/"packet too big" quoting a service flow
/// goes to the backend that owns the flow, so its path MTU discovery works.
#[inline(always)]
fn relay_icmp(ctx: &XdpContext, ip: &Ip) -> Result<Counter, Counter> {
    let (inner, ports) = match parse::quoted(ctx, ip) {
        Ok(q) => q,
        Err(Counter::DropMalformedIcmp) => {
            return Err(ours_or_pass(ctx, &vip_key(ip), Counter::DropMalformedIcmp));
        }
        Err(_) => return Ok(Counter::PassOtherProtocol),
    };
    let iface = receiving_interface(ctx)?;
    // The quoted packet went from the VIP to the client: the flow is its
    // reverse.
    let flow = FlowKey {
        src: inner.dst,
        dst: inner.src,
        sport: ports.dport,
        dport: ports.sport,
        proto: inner.proto,
        family: inner.family,
        _pad: [0; 2],
    };
    let ct = maps::conntrack_settings();
    let (service, choice) = match select::select_backend(ct, &flow, 0, false) {
        Err(Counter::PassNotService) => return Ok(Counter::PassOtherProtocol),
        other => other?,
    };
    charged(&service, deliver(ctx, ip, iface, &service, &choice, true))
}

/// `outcome`, of a packet matched to `service`: a drop is counted against
/// the service too, so its own counters show what it lost.
#[inline(always)]
fn charged(service: &ServiceValue, outcome: Result<Counter, Counter>) -> Result<Counter, Counter> {
    if let Ok(c) | Err(c) = outcome
        && action(c) == xdp_action::XDP_DROP
    {
        maps::count_service_drop(service.id);
    }
    outcome
}

/// An echo request to a VIP whose service answers echo is answered here;
/// any other is the kernel's, which drops one from a source that is no
/// single host (multicast, broadcast, ...) as a martian.
#[inline(always)]
fn answer_echo(ctx: &XdpContext, ip: &Ip) -> Result<Counter, Counter> {
    if !maps::answers_echo(&vip_key(ip)) {
        return Ok(Counter::PassOtherProtocol);
    }
    receiving_interface(ctx)?;
    if !parse::source_is_unicast(ip) {
        return Ok(Counter::PassOtherProtocol);
    }
    icmp::reply_echo(ctx, ip)
}

/// Sends the packet to the chosen backend by the service's mode, out of
/// `out`.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    ip: &Ip,
    out: &Egress,
    service: &ServiceValue,
    choice: &Choice,
) -> Result<(), Counter> {
    if let Some(t) = tunnel(service) {
        forward::encapsulate(ctx, ip, choice, out.iface, maps::settings(), t)?;
    } else {
        forward::rewrite_macs(ctx, choice, out.iface)?;
    }
    if let Some(port) = out.redirect
        && !maps::redirect(port)
    {
        // Detached since `egress` found it.
        return Err(Counter::DropNoEgress);
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel requires a GPL-compatible license for some helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
