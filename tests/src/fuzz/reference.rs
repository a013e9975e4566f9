//! The reference classifier: what `lb_xdp` must do with a frame, written
//! from docs/dataplane.md over byte slices, independently of the program.
//!
//! It answers one question per frame: is this a well-formed TCP/UDP packet
//! of a configured service (or an ICMP "fragmentation needed" / "packet too
//! big" error about one), and if not, which counters may record it. It
//! knows nothing of backends, tables or the connection table: the world
//! (`super::world`) turns a service hit into the outcomes it allows.
//!
//! Rules beyond docs/dataplane.md, each argued where it is applied:
//! - every bound is taken against the IP packet: Ethernet padding after
//!   the datagram is never parsed (a quoted packet ends with the ICMP
//!   message that carries it);
//! - an ICMP error is about a service flow only if it is addressed to the
//!   VIP that sent the quoted packet (`icmp`);
//! - a frame not sent to the LB's MAC (another host's, a group's) is never
//!   forwarded or dropped for a VIP's rules ([`classify`]).
//!
//! Where the program may legitimately differ, the reference allows both
//! outcomes and says why: a message cut before its ICMP type byte
//! (`icmp`), and a packet whose destination falls in the VIP filter
//! without being a VIP ([`classify`]): it passes either way, but by the
//! rules after the filter, with their counter (and, not sent to the LB's
//! MAC, possibly as foreign).
//! IP and transport checksums are not verified, as the program does not
//! verify them (backends' kernels do); nor is the UDP length.

use crate::lab::LB_MAC;
use lb_common::{
    Addr, AddrKey, Counter, FAMILY_V4, FAMILY_V6, FlowKey, ServiceKey,
    limits::{MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS},
    wire::*,
};

/// What the reference needs to know of the configuration.
pub trait Services {
    /// The index of the service with this key, if one is configured.
    fn service(&self, key: &ServiceKey) -> Option<usize>;
    /// Whether at least one service uses this address as its VIP.
    fn is_vip(&self, addr: &AddrKey) -> bool;
    /// Whether a service on this VIP answers echo.
    fn answers_echo(&self, addr: &AddrKey) -> bool;
}

/// The reference's verdict on a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// Not for a service: the program must pass it untouched (XDP_PASS),
    /// counted by one of these.
    Pass(Vec<Counter>),
    /// Malformed, on a packet the program owns: it must never be forwarded
    /// or modified, and is counted by one of these (drop or pass reasons).
    Reject(Vec<Counter>),
    /// A well-formed packet of a configured service: it goes to a backend
    /// of that service, or is dropped for a reason the world decides.
    Service(Hit),
    /// An echo request to a VIP that answers echo: answered, or dropped
    /// over the CPU's echo budget.
    Echo(Echo),
}

/// Where an echo request's parts are, for checking the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo {
    /// The IP header.
    pub l3: usize,
    /// The ICMP message.
    pub l4: usize,
    /// One past the IP packet.
    pub end: usize,
}

/// A frame the reference attributes to a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Index of the service (see [`Services::service`]).
    pub service: usize,
    /// The client's flow: for an ICMP error, the flow the quoted reply
    /// belongs to, turned around (client to VIP).
    pub flow: FlowKey,
    /// A TCP SYN without ACK, RST or FIN (starts a connection: the table is
    /// re-read).
    pub syn: bool,
    /// An ICMP error relayed to the flow's backend (creates no state).
    pub icmp: bool,
    /// Offset of the (outer) IP header.
    pub l3_off: usize,
    /// Length of the IP packet, from its own length field (the frame may
    /// carry padding after it).
    pub ip_len: usize,
    /// Not sent to the LB's MAC (another host's, broadcast, multicast):
    /// never forwarded (see [`classify`]).
    pub foreign_destination: bool,
    /// Too big for a tunnel, it is answered with an ICMP error: the sender
    /// forbids fragmenting it on the way (IPv4 with DF, and every IPv6
    /// packet: RFC 8200, only sources fragment), and its source names one
    /// host ([`names_one_host`]).
    pub error_due: bool,
}

/// The network layer as the reference reads it.
#[derive(Clone, Copy, Debug)]
struct Ip {
    family: u8,
    src: Addr,
    dst: Addr,
    /// Transport protocol, after any IPv6 extension headers.
    proto: u8,
    l3: usize,
    l4: usize,
    /// One past the IP packet (for a quoted packet: the end of the ICMP
    /// message that carries it).
    end: usize,
    fragment: bool,
}

impl Ip {
    fn dst_key(&self) -> AddrKey {
        AddrKey {
            addr: self.dst,
            family: self.family,
            _pad: [0; 3],
        }
    }
}

/// The IPv6 fragment header's offset bits and its M flag (RFC 8200 §4.5),
/// read here from the RFC rather than taken from the program's constants.
const FRAG_OFFSET_BITS: u16 = 0xfff8;
const FRAG_MORE: u16 = 0x0001;
/// IPv6 extension-header length unit (RFC 8200 §4.3: 8-octet units, not
/// counting the first 8 octets).
const IPV6_EXT_UNIT: usize = 8;
/// Bytes of the quoted transport header the relay reads: the two ports.
const QUOTED_PORTS_LEN: usize = 4;
/// Offset of TCP's data-offset byte, and of its flags byte.
const TCP_DOFF_BYTE: usize = 12;
const TCP_FLAGS_BYTE: usize = 13;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr4(b: &[u8]) -> Addr {
    let mut a = [0; 16];
    a[..4].copy_from_slice(&b[..4]);
    a
}

fn addr6(b: &[u8]) -> Addr {
    let mut a = [0; 16];
    a.copy_from_slice(&b[..16]);
    a
}

/// Classifies `frame` against the configuration `cfg`.
pub fn classify(frame: &[u8], cfg: &impl Services) -> Class {
    let Some((ethertype, l3)) = link(frame) else {
        return Class::Reject(vec![Counter::DropMalformedEthernet]);
    };
    let (family, malformed) = match ethertype {
        ETH_P_IP => (FAMILY_V4, Counter::DropMalformedIpv4),
        ETH_P_IPV6 => (FAMILY_V6, Counter::DropMalformedIpv6),
        _ => return Class::Pass(vec![Counter::PassNotIp]),
    };
    // The destination is read before the rest of the header: a frame
    // that ends before it is malformed whatever it is addressed to.
    let Some(dst) = destination(frame, l3, family) else {
        return Class::Reject(vec![malformed]);
    };
    let to_vip = cfg.is_vip(&dst);
    let ip = if family == FAMILY_V4 {
        ipv4(frame, l3, frame.len(), false)
    } else {
        ipv6(frame, l3, frame.len(), false)
    };
    let class = match ip {
        Some(ip) => network(frame, &ip, cfg),
        None => ours_or_pass(to_vip, malformed),
    };
    // A packet to no VIP passes at the VIP filter as `pass_not_service`,
    // or, where the filter cannot tell its destination from a VIP's, by
    // the rules after it (which pass it too).
    let class = match class {
        Class::Pass(mut allowed) if !to_vip => {
            if !allowed.contains(&Counter::PassNotService) {
                allowed.push(Counter::PassNotService);
            }
            Class::Pass(allowed)
        }
        other => other,
    };
    if frame[..6] == LB_MAC {
        return class;
    }
    // Not sent to the LB's MAC: another host's frame a switch flooded, or a
    // group address's. Forwarding it would carry another host's traffic
    // (and send it from another host's MAC), so the LB never forwards it,
    // nor drops it for a VIP's rules: it passes as `pass_foreign_mac`. The
    // program checks the MAC only where it would act on a packet to a VIP,
    // so what passes before that keeps its counter; a destination that
    // falls in the VIP filter without being a VIP may pass as foreign too.
    match class {
        Class::Pass(mut allowed) => {
            allowed.push(Counter::PassForeignMac);
            Class::Pass(allowed)
        }
        Class::Reject(allowed) => {
            let mut passed: Vec<Counter> = allowed.into_iter().filter(|c| passes(*c)).collect();
            passed.push(Counter::PassForeignMac);
            Class::Pass(passed)
        }
        Class::Service(hit) => Class::Service(Hit {
            foreign_destination: true,
            ..hit
        }),
        Class::Echo(_) => Class::Pass(vec![Counter::PassForeignMac]),
    }
}

/// Whether `src` names a single host, the only source lb's ICMP messages
/// answer (RFC 1812 §4.3.2.7, RFC 4443 §2.4): not unspecified, loopback,
/// multicast, nor IPv4 broadcast or class E. An echo request from any
/// other is the kernel's.
fn names_one_host(family: u8, src: &Addr) -> bool {
    if family == FAMILY_V4 {
        let a = std::net::Ipv4Addr::new(src[0], src[1], src[2], src[3]);
        let this_network = a.octets()[0] == 0;
        let class_e = a.octets()[0] >= 240;
        !(this_network || a.is_loopback() || a.is_multicast() || a.is_broadcast() || class_e)
    } else {
        let a = std::net::Ipv6Addr::from(*src);
        !(a.is_unspecified() || a.is_loopback() || a.is_multicast())
    }
}

/// The destination of the IP packet of `family` at `l3`, if the frame
/// holds it (its place is all that is relied on).
fn destination(f: &[u8], l3: usize, family: u8) -> Option<AddrKey> {
    let addr = if family == FAMILY_V4 {
        addr4(f.get(l3 + IPV4_DST_OFF..l3 + IPV4_DST_OFF + 4)?)
    } else {
        addr6(f.get(l3 + IPV6_DST_OFF..l3 + IPV6_DST_OFF + 16)?)
    };
    Some(AddrKey {
        addr,
        family,
        _pad: [0; 3],
    })
}

/// Whether counter `c` records a frame passed to the kernel.
fn passes(c: Counter) -> bool {
    matches!(
        c,
        Counter::PassNotIp
            | Counter::PassNotService
            | Counter::PassOtherProtocol
            | Counter::PassForeignMac
    )
}

/// The part of [`classify`] after a well-formed IP header.
fn network(frame: &[u8], ip: &Ip, cfg: &impl Services) -> Class {
    let to_vip = cfg.is_vip(&ip.dst_key());
    if ip.fragment {
        return ours_or_pass(to_vip, Counter::DropFragment);
    }
    match (ip.family, ip.proto) {
        (_, IPPROTO_TCP | IPPROTO_UDP) => transport(frame, ip, cfg, to_vip),
        (FAMILY_V4, IPPROTO_ICMP) | (FAMILY_V6, IPPROTO_ICMPV6) => icmp(frame, ip, cfg, to_vip),
        _ => Class::Pass(vec![Counter::PassOtherProtocol]),
    }
}

/// A problem on a packet to a VIP address is the program's to drop; on
/// any other packet it is the kernel's business: passed untouched.
fn ours_or_pass(to_vip: bool, c: Counter) -> Class {
    if to_vip {
        Class::Reject(vec![c])
    } else {
        Class::Pass(vec![Counter::PassNotService])
    }
}

/// Ethernet and up to [`MAX_VLAN_TAGS`] 802.1Q/802.1ad tags: the payload's
/// EtherType and offset, or `None` if a header is cut. A third tag is not
/// walked: its TPID is then the EtherType, which is not IP.
fn link(f: &[u8]) -> Option<(u16, usize)> {
    if f.len() < ETH_HLEN {
        return None;
    }
    let mut ethertype = be16(f, ETH_HLEN - 2);
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag = f.get(off..off + VLAN_HLEN)?;
        // The tag's last two bytes are the EtherType of what follows it.
        ethertype = be16(tag, 2);
        off += VLAN_HLEN;
    }
    Some((ethertype, off))
}

/// An IPv4 header at `l3` within `f[..limit]`, or `None` if malformed:
/// version not 4, IHL below 5, header (options included) past `limit`,
/// total length below the header, or (unless `quoted`: ICMP senders cut
/// the packets they quote) total length past `limit`.
fn ipv4(f: &[u8], l3: usize, limit: usize, quoted: bool) -> Option<Ip> {
    let h = f.get(l3..limit)?;
    if h.len() < IPV4_HLEN || h[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(be16(h, 2));
    if hlen < IPV4_HLEN || hlen > h.len() || total < hlen {
        return None;
    }
    if !quoted && total > h.len() {
        return None;
    }
    Some(Ip {
        family: FAMILY_V4,
        src: addr4(&h[12..]),
        dst: addr4(&h[16..]),
        proto: h[9],
        l3,
        l4: l3 + hlen,
        end: if quoted { limit } else { l3 + total },
        fragment: be16(h, 6) & (IPV4_MF | IPV4_FRAG_OFFSET) != 0,
    })
}

/// An IPv6 header at `l3` within `f[..limit]` and its extension headers
/// (hop-by-hop, routing, destination options, fragment; at most
/// [`MAX_IPV6_EXT_HEADERS`]), or `None` if malformed: version not 6,
/// payload length past `limit` (unless `quoted`), an extension header
/// past the packet, or a longer chain.
///
/// Other next-header values (AH, ESP, "no next header", ...) end the walk
/// and are the packet's protocol. Like the program, the reference accepts
/// a hop-by-hop header anywhere in the chain (RFC 8200 wants it first):
/// such a packet is odd but not dangerous to forward.
fn ipv6(f: &[u8], l3: usize, limit: usize, quoted: bool) -> Option<Ip> {
    let h = f.get(l3..limit)?;
    if h.len() < IPV6_HLEN || h[0] >> 4 != 6 {
        return None;
    }
    let payload = usize::from(be16(h, 4));
    if !quoted && IPV6_HLEN + payload > h.len() {
        return None;
    }
    let end = if quoted {
        limit
    } else {
        l3 + IPV6_HLEN + payload
    };
    let mut next = h[6];
    let mut off = l3 + IPV6_HLEN;
    let mut fragment = false;
    let mut walked = 0;
    while matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
    ) {
        if walked == MAX_IPV6_EXT_HEADERS {
            return None;
        }
        walked += 1;
        let rest = f.get(off..end)?;
        // Every extension header is at least 8 bytes.
        if rest.len() < IPV6_EXT_UNIT {
            return None;
        }
        let field = be16(rest, 2);
        let len = if next == IPPROTO_FRAGMENT {
            // An atomic fragment (offset 0, M clear) is a whole packet.
            if field & (FRAG_OFFSET_BITS | FRAG_MORE) != 0 {
                fragment = true;
            }
            IPV6_EXT_UNIT
        } else {
            (usize::from(rest[1]) + 1) * IPV6_EXT_UNIT
        };
        if len > rest.len() {
            return None;
        }
        let data_follows = next == IPPROTO_FRAGMENT && field & FRAG_OFFSET_BITS != 0;
        next = rest[0];
        off += len;
        // A later fragment carries the original packet's data from here.
        if data_follows {
            break;
        }
    }
    Some(Ip {
        family: FAMILY_V6,
        src: addr6(&h[8..]),
        dst: addr6(&h[24..]),
        proto: next,
        l3,
        l4: off,
        end,
        fragment,
    })
}

/// A TCP or UDP packet: a service hit if well formed and its (VIP, port,
/// protocol) is configured. The UDP length field is not checked (the
/// program does not read it; the IP length bounds the datagram).
fn transport(f: &[u8], ip: &Ip, cfg: &impl Services, to_vip: bool) -> Class {
    let seg = &f[ip.l4..ip.end];
    let well_formed = if ip.proto == IPPROTO_TCP {
        seg.len() >= TCP_HLEN && {
            let header = usize::from(seg[TCP_DOFF_BYTE] >> 4) * 4;
            (TCP_HLEN..=seg.len()).contains(&header)
        }
    } else {
        seg.len() >= UDP_HLEN
    };
    if !well_formed {
        return ours_or_pass(to_vip, Counter::DropMalformedL4);
    }
    // Ports stay in network order, as the maps hold them.
    let sport = u16::from_ne_bytes([seg[0], seg[1]]);
    let dport = u16::from_ne_bytes([seg[2], seg[3]]);
    let key = ServiceKey {
        addr: ip.dst,
        port: dport,
        proto: ip.proto,
        family: ip.family,
    };
    let Some(service) = cfg.service(&key) else {
        return Class::Pass(vec![Counter::PassNotService]);
    };
    let opening = TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN;
    let syn = ip.proto == IPPROTO_TCP && seg[TCP_FLAGS_BYTE] & opening == TCP_SYN;
    let dont_fragment =
        ip.family == FAMILY_V6 || u16::from_be_bytes([f[ip.l3 + 6], f[ip.l3 + 7]]) & IPV4_DF != 0;
    let error_due = dont_fragment && names_one_host(ip.family, &ip.src);
    Class::Service(Hit {
        service,
        flow: FlowKey {
            src: ip.src,
            dst: ip.dst,
            sport,
            dport,
            proto: ip.proto,
            family: ip.family,
            _pad: [0; 2],
        },
        syn,
        icmp: false,
        l3_off: ip.l3,
        ip_len: ip.end - ip.l3,
        foreign_destination: false,
        error_due,
    })
}

/// An ICMP or ICMPv6 message. Echo requests (code 0) to a VIP that answers
/// echo are the program's to answer. Of the rest, only "fragmentation
/// needed" (type 3 code 4) and "packet too big" (ICMPv6 type 2) errors
/// about a service flow are the program's: the quoted packet is a reply the backend sent from the VIP,
/// so its source (VIP, port, protocol) names the service, and the error
/// must be addressed to that VIP (routers send errors to the quoted
/// packet's source). Everything else passes.
///
/// Where the program may differ: it reads the type and code from the frame,
/// not the IP packet, so a message cut before its type byte may be read
/// from Ethernet padding and then be found truncated. Such a frame is
/// accepted as passed (`pass_other_protocol`) or as a malformed error.
fn icmp(f: &[u8], ip: &Ip, cfg: &impl Services, to_vip: bool) -> Class {
    let msg = &f[ip.l4..ip.end];
    // Type and code: two bytes.
    if msg.len() < 2 {
        return if to_vip {
            Class::Reject(vec![Counter::PassOtherProtocol, Counter::DropMalformedIcmp])
        } else {
            Class::Pass(vec![Counter::PassOtherProtocol, Counter::PassNotService])
        };
    }
    let (pmtu, echo) = if ip.family == FAMILY_V4 {
        (
            msg[0] == ICMP_DEST_UNREACH && msg[1] == ICMP_FRAG_NEEDED,
            msg[0] == ICMP_ECHO_REQUEST && msg[1] == 0,
        )
    } else {
        (
            msg[0] == ICMPV6_PKT_TOOBIG,
            msg[0] == ICMPV6_ECHO_REQUEST && msg[1] == 0,
        )
    };
    if echo && cfg.answers_echo(&ip.dst_key()) && names_one_host(ip.family, &ip.src) {
        // Identifier and sequence are part of the message.
        if msg.len() < ICMP_HLEN {
            return Class::Reject(vec![Counter::DropMalformedIcmp]);
        }
        return Class::Echo(Echo {
            l3: ip.l3,
            l4: ip.l4,
            end: ip.end,
        });
    }
    if !pmtu {
        return Class::Pass(vec![Counter::PassOtherProtocol]);
    }
    let quoted_at = ip.l4 + ICMP_HLEN;
    let inner = if ip.family == FAMILY_V4 {
        ipv4(f, quoted_at, ip.end, true)
    } else {
        ipv6(f, quoted_at, ip.end, true)
    };
    // A quoted header cut short, or of the wrong version.
    let Some(inner) = inner else {
        return ours_or_pass(to_vip, Counter::DropMalformedIcmp);
    };
    if inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP {
        return Class::Pass(vec![Counter::PassOtherProtocol]);
    }
    // RFC 792 guarantees 8 bytes of the quoted transport header; the
    // relay needs the ports. (The quoted packet's fragment bits are not
    // looked at: like the program, the reference reads the ports of a
    // quoted non-first fragment from its payload. Relaying such an error
    // is harmless: the backend's stack finds no matching socket.)
    let Some(ports) = f.get(inner.l4..inner.l4 + QUOTED_PORTS_LEN) else {
        return ours_or_pass(to_vip, Counter::DropMalformedIcmp);
    };
    if inner.l4 + QUOTED_PORTS_LEN > ip.end {
        return ours_or_pass(to_vip, Counter::DropMalformedIcmp);
    }
    let sport = u16::from_ne_bytes([ports[0], ports[1]]);
    let dport = u16::from_ne_bytes([ports[2], ports[3]]);
    let key = ServiceKey {
        addr: inner.src,
        port: sport,
        proto: inner.proto,
        family: inner.family,
    };
    let Some(service) = cfg.service(&key) else {
        return Class::Pass(vec![Counter::PassOtherProtocol]);
    };
    // The error is about a reply from this VIP, so it is addressed to it;
    // one addressed elsewhere (the host itself, another VIP) is not the
    // service's.
    if inner.src != ip.dst {
        return Class::Pass(vec![Counter::PassOtherProtocol]);
    }
    Class::Service(Hit {
        service,
        flow: FlowKey {
            src: inner.dst,
            dst: inner.src,
            sport: dport,
            dport: sport,
            proto: inner.proto,
            family: inner.family,
            _pad: [0; 2],
        },
        syn: false,
        icmp: true,
        l3_off: ip.l3,
        ip_len: ip.end - ip.l3,
        foreign_destination: false,
        error_due: false,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use lb_common::addr_bytes;

    use super::*;
    use crate::packet::{self, Ipv4};

    const VIP: [u8; 4] = [198, 18, 1, 1];
    const CLIENT: [u8; 4] = [198, 18, 2, 1];
    const PORT: u16 = 80;

    /// One TCP service on `VIP`:80.
    struct One;

    impl Services for One {
        fn service(&self, key: &ServiceKey) -> Option<usize> {
            let (addr, family) = addr_bytes(IpAddr::V4(Ipv4Addr::from(VIP)));
            (key.addr == addr
                && key.family == family
                && key.port == PORT.to_be()
                && key.proto == IPPROTO_TCP)
                .then_some(0)
        }
        fn is_vip(&self, a: &AddrKey) -> bool {
            a.addr == addr_bytes(IpAddr::V4(Ipv4Addr::from(VIP))).0
        }
        fn answers_echo(&self, a: &AddrKey) -> bool {
            self.is_vip(a)
        }
    }

    #[test]
    fn echo_requests_to_a_vip_that_answers_are_the_programs() {
        let v4 = |a| IpAddr::V4(Ipv4Addr::from(a));
        let frame = |dst: [u8; 4], ty: u8, data: &[u8]| {
            let mut m = packet::icmp_echo(v4(CLIENT), v4(dst), 1, 1, data);
            m[0] = ty;
            let ip = Ipv4::new(CLIENT, dst, IPPROTO_ICMP).build(&m);
            packet::ethernet(LB_MAC, [4; 6], &[], ETH_P_IP, &ip)
        };
        let l3 = ETH_HLEN;
        let l4 = l3 + IPV4_HLEN;
        let f = frame(VIP, ICMP_ECHO_REQUEST, b"ping");
        let end = f.len();
        assert_eq!(classify(&f, &One), Class::Echo(Echo { l3, l4, end }));
        assert_eq!(
            classify(&frame([198, 18, 9, 9], ICMP_ECHO_REQUEST, b""), &One),
            Class::Pass(vec![Counter::PassOtherProtocol, Counter::PassNotService]),
            "not a VIP: passed at the filter, or after it"
        );
        assert_eq!(
            classify(&frame(VIP, ICMP_ECHO_REPLY, b""), &One),
            Class::Pass(vec![Counter::PassOtherProtocol]),
            "a reply"
        );
        let mut foreign = f.clone();
        foreign[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x77]);
        assert_eq!(
            classify(&foreign, &One),
            Class::Pass(vec![Counter::PassForeignMac])
        );
        // Cut before the identifier by the IP length.
        let mut short = frame(VIP, ICMP_ECHO_REQUEST, b"");
        short.truncate(l4 + ICMP_HLEN - 1);
        short[l3 + 2..l3 + 4].copy_from_slice(&((IPV4_HLEN + ICMP_HLEN - 1) as u16).to_be_bytes());
        assert_eq!(
            classify(&short, &One),
            Class::Reject(vec![Counter::DropMalformedIcmp])
        );
    }

    fn tcp_frame(dst: [u8; 4], flags: u8) -> Vec<u8> {
        let v4 = |a| IpAddr::V4(Ipv4Addr::from(a));
        let seg = packet::tcp(v4(CLIENT), v4(dst), 40000, PORT, flags, b"x");
        let ip = Ipv4::new(CLIENT, dst, IPPROTO_TCP).build(&seg);
        packet::ethernet(LB_MAC, [4; 6], &[], ETH_P_IP, &ip)
    }

    #[test]
    fn a_service_syn_is_a_hit_and_other_traffic_passes() {
        match classify(&tcp_frame(VIP, TCP_SYN), &One) {
            Class::Service(hit) => {
                assert!(hit.syn);
                assert_eq!(hit.l3_off, ETH_HLEN);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            classify(&tcp_frame([198, 18, 0, 2], TCP_SYN), &One),
            Class::Pass(vec![Counter::PassNotService])
        );
    }

    #[test]
    fn malformed_headers_are_rejected_by_reason() {
        let mut ihl = tcp_frame(VIP, TCP_ACK);
        ihl[ETH_HLEN] = 0x44;
        assert_eq!(
            classify(&ihl, &One),
            Class::Reject(vec![Counter::DropMalformedIpv4])
        );
        let mut doff = tcp_frame(VIP, TCP_ACK);
        doff[ETH_HLEN + IPV4_HLEN + TCP_DOFF_BYTE] = 0xf0;
        assert_eq!(
            classify(&doff, &One),
            Class::Reject(vec![Counter::DropMalformedL4])
        );
        assert_eq!(
            classify(&[0u8; ETH_HLEN - 1], &One),
            Class::Reject(vec![Counter::DropMalformedEthernet])
        );
    }

    #[test]
    fn frames_to_another_mac_are_never_the_lbs() {
        let other = |mut f: Vec<u8>| {
            f[..6].copy_from_slice(&[2; 6]);
            f
        };
        match classify(&other(tcp_frame(VIP, TCP_SYN)), &One) {
            Class::Service(hit) => assert!(hit.foreign_destination),
            c => panic!("{c:?}"),
        }
        let mut doff = tcp_frame(VIP, TCP_ACK);
        doff[ETH_HLEN + IPV4_HLEN + TCP_DOFF_BYTE] = 0xf0;
        assert_eq!(
            classify(&other(doff), &One),
            Class::Pass(vec![Counter::PassForeignMac])
        );
        assert_eq!(
            classify(&other(tcp_frame([198, 18, 0, 2], TCP_SYN)), &One),
            Class::Pass(vec![Counter::PassNotService, Counter::PassForeignMac])
        );
        let mut ihl = other(tcp_frame(VIP, TCP_ACK));
        ihl[ETH_HLEN] = 0x44;
        assert_eq!(
            classify(&ihl, &One),
            Class::Pass(vec![Counter::PassForeignMac]),
            "a malformed IP header to a VIP in another host's frame passes"
        );
        let mut cut = other(tcp_frame(VIP, TCP_ACK));
        cut.truncate(ETH_HLEN + IPV4_HLEN - 1);
        assert_eq!(
            classify(&cut, &One),
            Class::Reject(vec![Counter::DropMalformedIpv4]),
            "a frame cut before its destination is dropped whatever the MAC"
        );
    }
}
