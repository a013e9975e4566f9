//! Frames for the fuzzer.
//!
//! A case starts from a *base*: a well-formed frame of one of the shapes
//! the data plane must handle ([`Shape`]), with 0-3 VLAN tags (802.1Q or
//! 802.1ad), IPv4 options, IPv6 extension-header chains, TCP options,
//! fragments, Ethernet padding and packets too big to encapsulate. The
//! builder records where every header field lies ([`Field`]), so that a
//! mutation can aim at any of them with values chosen to sit on boundaries
//! ([`field_values`]). A random case then applies one [`Mutation`]; some
//! cases are random bytes outright. The sweep ([`sweep`]) takes a few bases
//! and tries every truncation and every value of every field on each.
//!
//! Everything is drawn from a [`FuzzRng`] seeded per case ([`case_rng`]),
//! so a case replays from its seed and index alone.

use std::net::IpAddr;

use lb_common::wire::*;
use rand::{RngExt as _, SeedableRng as _, rngs::Xoshiro256PlusPlus, seq::IndexedRandom as _};

use crate::{
    lab::{LB_MAC, MTU, ROUTER_MAC},
    packet::{self, Mac},
};

/// The fuzzer's generator: Xoshiro256++, portable and reproducible across
/// platforms and rand releases (unlike `StdRng`).
pub type FuzzRng = Xoshiro256PlusPlus;

/// The generator of case `index` in the run seeded with `seed`. Each case
/// has its own, so one case is replayed without generating those before it.
pub fn case_rng(seed: u64, index: u64) -> FuzzRng {
    FuzzRng::seed_from_u64(splitmix64(seed ^ splitmix64(index)))
}

/// SplitMix64's output function: spreads neighbouring inputs apart.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// IP protocol: IPsec authentication header (not walked by the parser).
const IPPROTO_AH: u8 = 51;
/// IP protocol: IPsec ESP.
const IPPROTO_ESP: u8 = 50;
/// IPv6 "no next header".
const IPPROTO_NONE: u8 = 59;
/// IP protocol: SCTP.
const IPPROTO_SCTP: u8 = 132;
/// EtherType LLDP.
const ETH_P_LLDP: u16 = 0x88cc;
/// ARP payload length (Ethernet/IPv4).
const ARP_LEN: usize = 28;
/// ICMP echo request and reply types (v4), and ICMPv6's.
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_ECHO: u8 = 128;
/// The MTU a "fragmentation needed" error announces.
const ANNOUNCED_MTU: u16 = 1400;
/// TCP flags besides SYN and ACK.
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
/// Largest TCP option space (data offset 15).
const TCP_MAX_OPTIONS: usize = 40;
/// Largest IPv4 option space (IHL 15).
const IPV4_MAX_OPTIONS: usize = 40;
/// The longest IPv6 extension chain a base carries: more than the parser
/// walks, so chains past its limit are generated too.
const MAX_GENERATED_EXT: usize = 6;
/// Largest Ethernet padding appended after the IP packet.
const MAX_PADDING: usize = 32;
/// Minimum Ethernet frame (without FCS): senders pad up to it.
const ETH_MIN_FRAME: usize = 60;
/// Length range of random-byte frames (BPF_PROG_TEST_RUN wants at least an
/// Ethernet header).
const RANDOM_FRAME_LEN: std::ops::RangeInclusive<usize> = ETH_HLEN..=256;
/// Room around the MTU for packets that are too big once encapsulated.
const BIG_SLACK: usize = 64;

/// What a header field holds, which decides the values a mutation tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A MAC address.
    Mac,
    /// An EtherType or VLAN TPID.
    EtherType,
    /// A VLAN tag's control information.
    VlanTci,
    /// IPv4 version and IHL.
    Ipv4VersionIhl,
    /// IPv6 version, traffic class and flow label.
    Ipv6VersionClass,
    /// A length field (IPv4 total length, IPv6 payload length, UDP length).
    Length,
    /// IPv4 flags and fragment offset.
    Ipv4Fragment,
    /// An IP protocol or IPv6 next-header value.
    Protocol,
    /// An IPv4 (4 bytes) or IPv6 (16 bytes) address.
    Addr,
    /// A TCP or UDP port.
    Port,
    /// TCP data offset (high nibble) and reserved bits.
    TcpDataOffset,
    /// TCP flags.
    TcpFlags,
    /// An IPv6 extension header's length byte.
    Ipv6ExtLength,
    /// The IPv6 fragment header's offset and M flag.
    Ipv6Fragment,
    /// ICMP type.
    IcmpType,
    /// ICMP code.
    IcmpCode,
    /// Anything else: checksums, TTL, sequence numbers, options, payload.
    Opaque,
}

/// Where a header field lies in a frame.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// Name, e.g. `ipv4.total_length`.
    pub name: &'static str,
    /// Offset in the frame.
    pub off: usize,
    /// Length in bytes.
    pub len: usize,
    /// What it holds.
    pub kind: Kind,
    /// Inside the packet an ICMP error quotes.
    pub quoted: bool,
}

impl Field {
    /// `name`, prefixed with `quoted ` for fields of a quoted packet.
    pub fn describe(&self) -> String {
        if self.quoted {
            format!("quoted {}", self.name)
        } else {
            self.name.to_string()
        }
    }
}

/// Frame bytes with the fields they are made of.
#[derive(Clone, Debug, Default)]
pub struct Frame {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Every header field, in order.
    pub fields: Vec<Field>,
}

impl Frame {
    fn put(&mut self, name: &'static str, kind: Kind, data: &[u8]) {
        self.fields.push(Field {
            name,
            off: self.bytes.len(),
            len: data.len(),
            kind,
            quoted: false,
        });
        self.bytes.extend_from_slice(data);
    }

    fn append(&mut self, other: &Frame) {
        let base = self.bytes.len();
        self.fields.extend(other.fields.iter().map(|f| Field {
            off: f.off + base,
            ..*f
        }));
        self.bytes.extend_from_slice(&other.bytes);
    }

    /// Marks every field as part of a quoted packet.
    fn quoted(mut self) -> Frame {
        for f in &mut self.fields {
            f.quoted = true;
        }
        self
    }

    /// Cuts the frame to `len` bytes, forgetting fields that no longer fit.
    fn cut(mut self, len: usize) -> Frame {
        self.bytes.truncate(len);
        self.fields.retain(|f| f.off + f.len <= len);
        self
    }
}

/// Where the lab's services and hosts are: what the generator aims at.
#[derive(Clone, Debug)]
pub struct Targets {
    /// Configured services: VIP, port (host order), protocol.
    pub services: Vec<(IpAddr, u16, u8)>,
    /// Addresses that are not VIPs (the host's own).
    pub hosts: Vec<IpAddr>,
    /// Clients: a small pool, so that flows repeat and hit the connection table.
    pub clients: Vec<IpAddr>,
    /// Client ports of the pool.
    pub client_ports: Vec<u16>,
    /// Routers that send ICMP errors.
    pub routers: Vec<IpAddr>,
    /// VIPs with a service that answers echo.
    pub echo_vips: Vec<IpAddr>,
}

impl Targets {
    fn services_of(&self, v6: bool) -> Vec<(IpAddr, u16, u8)> {
        self.services
            .iter()
            .copied()
            .filter(|(a, _, _)| a.is_ipv6() == v6)
            .collect()
    }

    fn vips(&self, v6: bool) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.services_of(v6).iter().map(|s| s.0).collect();
        v.sort();
        v.dedup();
        v
    }

    fn of_family(list: &[IpAddr], v6: bool) -> Vec<IpAddr> {
        list.iter().copied().filter(|a| a.is_ipv6() == v6).collect()
    }

    /// A client address: from the pool mostly, so flows repeat.
    fn client(&self, rng: &mut FuzzRng, v6: bool) -> IpAddr {
        if rng.random_bool(0.7) {
            *Self::of_family(&self.clients, v6)
                .choose(rng)
                .expect("clients of both families")
        } else {
            random_addr(rng, v6)
        }
    }

    fn client_port(&self, rng: &mut FuzzRng) -> u16 {
        if rng.random_bool(0.7) {
            *self.client_ports.choose(rng).expect("client ports")
        } else {
            rng.random()
        }
    }

    fn host(&self, rng: &mut FuzzRng, v6: bool) -> IpAddr {
        *Self::of_family(&self.hosts, v6)
            .choose(rng)
            .expect("hosts of both families")
    }

    fn router(&self, rng: &mut FuzzRng, v6: bool) -> IpAddr {
        *Self::of_family(&self.routers, v6)
            .choose(rng)
            .expect("routers of both families")
    }
}

/// An address in the benchmarking ranges (198.18.0.0/15, 2001:2::/48).
fn random_addr(rng: &mut FuzzRng, v6: bool) -> IpAddr {
    if v6 {
        let mut o = [0u8; 16];
        rng.fill(&mut o[6..]);
        o[..6].copy_from_slice(&[0x20, 0x01, 0, 2, 0, rng.random()]);
        IpAddr::from(o)
    } else {
        IpAddr::from([
            198,
            18 + rng.random_range(0..2u8),
            rng.random(),
            rng.random(),
        ])
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The transport checksum's pseudo-header sum (RFC 793, RFC 8200 §8.1).
fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut bytes = Vec::with_capacity(40);
    bytes.extend_from_slice(src);
    bytes.extend_from_slice(dst);
    if src.len() == 4 {
        bytes.extend_from_slice(&[0, proto]);
        bytes.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        bytes.extend_from_slice(&(len as u32).to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, proto]);
    }
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

/// Writes the checksum of `seg` (with pseudo-header `initial`) at `at`.
fn fill_checksum(seg: &mut Frame, initial: u32, at: usize) {
    let c = packet::checksum(initial, &seg.bytes);
    seg.bytes[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// A payload of `len` random bytes.
fn payload(rng: &mut FuzzRng, len: usize) -> Frame {
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    let mut f = Frame::default();
    if len > 0 {
        f.put("payload", Kind::Opaque, &data);
    }
    f
}

/// Payload length: small mostly, sometimes mid-sized, sometimes so large
/// the IP packet nears the MTU (and overflows it once encapsulated).
fn payload_len(rng: &mut FuzzRng, headers: usize) -> usize {
    match rng.random_range(0..100) {
        0..85 => rng.random_range(0..=64),
        85..95 => rng.random_range(65..=600),
        _ => {
            let mtu = MTU as usize;
            rng.random_range(mtu - BIG_SLACK..=mtu + BIG_SLACK / 4)
                .saturating_sub(headers)
        }
    }
}

/// A TCP segment, sometimes with options.
fn tcp(
    rng: &mut FuzzRng,
    src: &[u8],
    dst: &[u8],
    sport: u16,
    dport: u16,
    flags: u8,
    data: usize,
) -> Frame {
    let options = if rng.random_bool(0.2) {
        4 * rng.random_range(1..=TCP_MAX_OPTIONS / 4)
    } else {
        0
    };
    let doff = ((TCP_HLEN + options) / 4) as u8;
    let mut s = Frame::default();
    s.put("tcp.sport", Kind::Port, &sport.to_be_bytes());
    s.put("tcp.dport", Kind::Port, &dport.to_be_bytes());
    s.put("tcp.seq", Kind::Opaque, &rng.random::<u32>().to_be_bytes());
    s.put("tcp.ack", Kind::Opaque, &rng.random::<u32>().to_be_bytes());
    s.put("tcp.data_offset", Kind::TcpDataOffset, &[doff << 4]);
    s.put("tcp.flags", Kind::TcpFlags, &[flags]);
    s.put(
        "tcp.window",
        Kind::Opaque,
        &rng.random::<u16>().to_be_bytes(),
    );
    s.put("tcp.checksum", Kind::Opaque, &[0, 0]);
    s.put("tcp.urgent", Kind::Opaque, &[0, 0]);
    if options > 0 {
        // NOPs then end-of-options: valid, if unusual.
        let mut o = vec![1u8; options];
        o[options - 1] = 0;
        s.put("tcp.options", Kind::Opaque, &o);
    }
    s.append(&payload(rng, data));
    let sum = pseudo_sum(src, dst, IPPROTO_TCP, s.bytes.len());
    fill_checksum(&mut s, sum, 16);
    s
}

/// A UDP datagram.
fn udp(rng: &mut FuzzRng, src: &[u8], dst: &[u8], sport: u16, dport: u16, data: usize) -> Frame {
    let mut s = Frame::default();
    s.put("udp.sport", Kind::Port, &sport.to_be_bytes());
    s.put("udp.dport", Kind::Port, &dport.to_be_bytes());
    s.put(
        "udp.length",
        Kind::Length,
        &((UDP_HLEN + data) as u16).to_be_bytes(),
    );
    s.put("udp.checksum", Kind::Opaque, &[0, 0]);
    s.append(&payload(rng, data));
    let sum = pseudo_sum(src, dst, IPPROTO_UDP, s.bytes.len());
    fill_checksum(&mut s, sum, 6);
    s
}

/// An ICMP/ICMPv6 message: type, code, checksum, four bytes, then `body`.
fn icmp(src: &[u8], dst: &[u8], ty: u8, code: u8, rest: [u8; 4], body: &Frame) -> Frame {
    let v6 = src.len() == 16;
    let mut m = Frame::default();
    m.put("icmp.type", Kind::IcmpType, &[ty]);
    m.put("icmp.code", Kind::IcmpCode, &[code]);
    m.put("icmp.checksum", Kind::Opaque, &[0, 0]);
    m.put("icmp.rest", Kind::Opaque, &rest);
    m.append(body);
    // ICMPv6 covers a pseudo-header; ICMPv4 only the message.
    let sum = if v6 {
        pseudo_sum(src, dst, IPPROTO_ICMPV6, m.bytes.len())
    } else {
        0
    };
    fill_checksum(&mut m, sum, 2);
    m
}

/// An IPv6 extension header a base may carry.
#[derive(Clone, Copy, Debug)]
enum Ext {
    /// Hop-by-hop or destination options, `(units + 1) * 8` bytes.
    Options(u8, u8),
    /// Routing header, `(units + 1) * 8` bytes.
    Routing(u8),
    /// Fragment header: offset in 8-byte units, more fragments.
    Fragment(u16, bool),
    /// Authentication header (not walked: ends the chain as the protocol).
    Auth,
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::Options(n, _) => n,
            Ext::Routing(_) => IPPROTO_ROUTING,
            Ext::Fragment(..) => IPPROTO_FRAGMENT,
            Ext::Auth => IPPROTO_AH,
        }
    }

    fn build(self, next: u8) -> Frame {
        let mut h = Frame::default();
        h.put("ipv6.ext.next_header", Kind::Protocol, &[next]);
        match self {
            Ext::Options(_, units) | Ext::Routing(units) => {
                h.put("ipv6.ext.length", Kind::Ipv6ExtLength, &[units]);
                let body = (usize::from(units) + 1) * 8 - 2;
                let mut b = vec![0u8; body];
                if matches!(self, Ext::Options(..)) {
                    // One PadN option filling the header.
                    b[0] = 1;
                    b[1] = (body - 2) as u8;
                }
                h.put("ipv6.ext.body", Kind::Opaque, &b);
            }
            Ext::Fragment(offset, more) => {
                h.put("ipv6.frag.reserved", Kind::Ipv6ExtLength, &[0]);
                let field = (offset << 3) | u16::from(more);
                h.put("ipv6.frag.offset", Kind::Ipv6Fragment, &field.to_be_bytes());
                h.put("ipv6.frag.id", Kind::Opaque, &[0, 0, 0, 1]);
            }
            Ext::Auth => {
                // 16 bytes: length in 4-byte units minus 2 (RFC 4302).
                h.put("ipv6.ah.length", Kind::Ipv6ExtLength, &[2]);
                h.put("ipv6.ah.body", Kind::Opaque, &[0; 13]);
            }
        }
        h
    }
}

/// A random extension chain: none mostly; otherwise up to
/// [`MAX_GENERATED_EXT`] headers, fragments atomic or not.
fn ext_chain(rng: &mut FuzzRng) -> Vec<Ext> {
    if rng.random_bool(0.65) {
        return Vec::new();
    }
    let n = rng.random_range(1..=MAX_GENERATED_EXT);
    (0..n)
        .map(|_| match rng.random_range(0..100) {
            0..25 => Ext::Options(IPPROTO_HOPOPTS, rng.random_range(0..3)),
            25..55 => Ext::Options(IPPROTO_DSTOPTS, rng.random_range(0..3)),
            55..70 => Ext::Routing(rng.random_range(0..3)),
            70..95 => match rng.random_range(0..4) {
                // Atomic fragments are whole packets; weigh them up.
                0 | 1 => Ext::Fragment(0, false),
                2 => Ext::Fragment(0, true),
                _ => Ext::Fragment(rng.random_range(1..0x2000), rng.random()),
            },
            _ => Ext::Auth,
        })
        .collect()
}

/// The IPv4 packet around `payload`.
fn ipv4(rng: &mut FuzzRng, src: &[u8], dst: &[u8], proto: u8, frag: u16, body: &Frame) -> Frame {
    let options = if rng.random_bool(0.2) {
        4 * rng.random_range(1..=IPV4_MAX_OPTIONS / 4)
    } else {
        0
    };
    let hlen = IPV4_HLEN + options;
    let mut p = Frame::default();
    p.put(
        "ipv4.version_ihl",
        Kind::Ipv4VersionIhl,
        &[0x40 | (hlen / 4) as u8],
    );
    p.put("ipv4.tos", Kind::Opaque, &[rng.random()]);
    p.put(
        "ipv4.total_length",
        Kind::Length,
        &((hlen + body.bytes.len()) as u16).to_be_bytes(),
    );
    p.put("ipv4.id", Kind::Opaque, &rng.random::<u16>().to_be_bytes());
    p.put("ipv4.frag", Kind::Ipv4Fragment, &frag.to_be_bytes());
    p.put("ipv4.ttl", Kind::Opaque, &[64]);
    p.put("ipv4.protocol", Kind::Protocol, &[proto]);
    p.put("ipv4.checksum", Kind::Opaque, &[0, 0]);
    p.put("ipv4.src", Kind::Addr, src);
    p.put("ipv4.dst", Kind::Addr, dst);
    if options > 0 {
        // NOPs then end-of-options.
        let mut o = vec![1u8; options];
        o[options - 1] = 0;
        p.put("ipv4.options", Kind::Opaque, &o);
    }
    let c = packet::checksum(0, &p.bytes);
    p.bytes[10..12].copy_from_slice(&c.to_be_bytes());
    p.append(body);
    p
}

/// The IPv6 packet: `chain` of extension headers, then `proto` and `body`.
fn ipv6(
    rng: &mut FuzzRng,
    src: &[u8],
    dst: &[u8],
    chain: &[Ext],
    proto: u8,
    body: &Frame,
) -> Frame {
    let mut ext = Frame::default();
    for (i, e) in chain.iter().enumerate() {
        let next = chain.get(i + 1).map_or(proto, |n| n.number());
        ext.append(&e.build(next));
    }
    let first = chain.first().map_or(proto, |e| e.number());
    let mut p = Frame::default();
    let label = rng.random::<u32>() & 0x000f_ffff;
    p.put(
        "ipv6.version_class_label",
        Kind::Ipv6VersionClass,
        &(0x6000_0000 | label).to_be_bytes(),
    );
    p.put(
        "ipv6.payload_length",
        Kind::Length,
        &((ext.bytes.len() + body.bytes.len()) as u16).to_be_bytes(),
    );
    p.put("ipv6.next_header", Kind::Protocol, &[first]);
    p.put("ipv6.hop_limit", Kind::Opaque, &[64]);
    p.put("ipv6.src", Kind::Addr, src);
    p.put("ipv6.dst", Kind::Addr, dst);
    p.append(&ext);
    p.append(body);
    p
}

/// The Ethernet frame: VLAN tags (TPID, TCI), EtherType, payload, padding.
fn ethernet(
    dst: Mac,
    src: Mac,
    tags: &[(u16, u16)],
    ethertype: u16,
    body: &Frame,
    pad: &[u8],
) -> Frame {
    let mut f = Frame::default();
    f.put("eth.dst", Kind::Mac, &dst);
    f.put("eth.src", Kind::Mac, &src);
    for &(tpid, tci) in tags {
        f.put("vlan.tpid", Kind::EtherType, &tpid.to_be_bytes());
        f.put("vlan.tci", Kind::VlanTci, &tci.to_be_bytes());
    }
    f.put("eth.type", Kind::EtherType, &ethertype.to_be_bytes());
    f.append(body);
    if !pad.is_empty() {
        f.put("eth.padding", Kind::Opaque, pad);
    }
    f
}

/// 0-3 VLAN tags: none mostly; the third is one more than the parser walks.
fn vlan_tags(rng: &mut FuzzRng) -> Vec<(u16, u16)> {
    let n = match rng.random_range(0..100) {
        0..55 => 0,
        55..80 => 1,
        80..95 => 2,
        _ => 3,
    };
    (0..n)
        .map(|_| {
            let tpid = if rng.random() {
                ETH_P_8021Q
            } else {
                ETH_P_8021AD
            };
            (tpid, rng.random::<u16>() & 0x0fff)
        })
        .collect()
}

/// Ethernet padding after the IP packet: none mostly; else up to the
/// minimum frame, or random bytes.
fn padding(rng: &mut FuzzRng, len: usize) -> Vec<u8> {
    match rng.random_range(0..100) {
        0..80 => Vec::new(),
        80..90 => vec![0; ETH_MIN_FRAME.saturating_sub(len)],
        _ => {
            let mut p = vec![0u8; rng.random_range(1..=MAX_PADDING)];
            rng.fill(&mut p[..]);
            p
        }
    }
}

/// TCP flags: SYN and plain ACK mostly (new and established flows).
fn tcp_flags(rng: &mut FuzzRng) -> u8 {
    match rng.random_range(0..100) {
        0..35 => TCP_SYN,
        35..65 => TCP_ACK,
        65..75 => TCP_PSH | TCP_ACK,
        75..80 => TCP_SYN | TCP_ACK,
        80..85 => TCP_FIN | TCP_ACK,
        85..90 => TCP_RST,
        _ => rng.random(),
    }
}

/// The shape of a base frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// TCP or UDP to a configured service.
    ServiceFlow,
    /// TCP or UDP to a VIP on a port or protocol no service has.
    VipOtherPort,
    /// Another protocol to a VIP: ICMP echo, GRE, tunnels, SCTP, ...
    VipOtherProtocol,
    /// Traffic to the host's own address.
    HostTraffic,
    /// An ICMP error (mostly frag-needed / packet-too-big), quoting a
    /// service flow, a foreign flow, or a packet cut anywhere.
    IcmpError,
    /// An echo request, mostly to a VIP that answers echo: enough of them
    /// to spend a CPU's echo budget.
    Echo,
    /// Not IP: ARP, LLDP, any EtherType.
    NonIp,
}

impl Shape {
    fn pick(rng: &mut FuzzRng) -> Shape {
        match rng.random_range(0..100) {
            0..45 => Shape::ServiceFlow,
            45..53 => Shape::VipOtherPort,
            53..60 => Shape::VipOtherProtocol,
            60..72 => Shape::HostTraffic,
            72..92 => Shape::IcmpError,
            92..95 => Shape::Echo,
            _ => Shape::NonIp,
        }
    }

    /// Name, for descriptions and the summary.
    pub fn name(self) -> &'static str {
        match self {
            Shape::ServiceFlow => "service-flow",
            Shape::VipOtherPort => "vip-other-port",
            Shape::VipOtherProtocol => "vip-other-protocol",
            Shape::HostTraffic => "host-traffic",
            Shape::IcmpError => "icmp-error",
            Shape::Echo => "echo",
            Shape::NonIp => "non-ip",
        }
    }
}

/// An IP packet from `src` to `dst` carrying `proto`, fragmented sometimes
/// (IPv4 flags or an IPv6 extension chain).
fn ip_packet(rng: &mut FuzzRng, src: IpAddr, dst: IpAddr, proto: u8, l4: &Frame) -> Frame {
    let (s, d) = (octets(src), octets(dst));
    if src.is_ipv6() {
        let chain = ext_chain(rng);
        ipv6(rng, &s, &d, &chain, proto, l4)
    } else {
        let frag = match rng.random_range(0..100) {
            0..88 => 0,
            88..92 => IPV4_DF,
            92..96 => IPV4_MF,
            _ => rng.random_range(1..=IPV4_FRAG_OFFSET) | (IPV4_MF * rng.random_range(0..2)),
        };
        ipv4(rng, &s, &d, proto, frag, l4)
    }
}

/// A TCP or UDP segment from `src`:`sport` to `dst`:`dport`.
fn segment(
    rng: &mut FuzzRng,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
) -> Frame {
    let (s, d) = (octets(src), octets(dst));
    let headers = if src.is_ipv6() { IPV6_HLEN } else { IPV4_HLEN };
    if proto == IPPROTO_TCP {
        let data = payload_len(rng, headers + TCP_HLEN);
        let flags = tcp_flags(rng);
        tcp(rng, &s, &d, sport, dport, flags, data)
    } else {
        let data = payload_len(rng, headers + UDP_HLEN);
        udp(rng, &s, &d, sport, dport, data)
    }
}

/// A base frame of a random shape, and its description.
pub fn base(rng: &mut FuzzRng, t: &Targets) -> (Frame, String) {
    let shape = Shape::pick(rng);
    base_of(rng, t, shape)
}

/// A base frame of `shape`, and its description.
pub fn base_of(rng: &mut FuzzRng, t: &Targets, shape: Shape) -> (Frame, String) {
    let v6 = rng.random();
    let tags = vlan_tags(rng);
    let ethertype = if v6 { ETH_P_IPV6 } else { ETH_P_IP };
    let (ip, what) = match shape {
        Shape::ServiceFlow => {
            let &(vip, port, proto) = t.services_of(v6).choose(rng).expect("services");
            let client = t.client(rng, v6);
            let sport = t.client_port(rng);
            let l4 = segment(rng, client, vip, proto, sport, port);
            (
                ip_packet(rng, client, vip, proto, &l4),
                format!("{proto}/{port} to {vip}"),
            )
        }
        Shape::VipOtherPort => {
            let vip = *t.vips(v6).choose(rng).expect("vips");
            let proto = *[IPPROTO_TCP, IPPROTO_UDP].choose(rng).expect("protocols");
            let port = rng.random();
            let client = t.client(rng, v6);
            let sport = t.client_port(rng);
            let l4 = segment(rng, client, vip, proto, sport, port);
            (
                ip_packet(rng, client, vip, proto, &l4),
                format!("{proto}/{port} to {vip}"),
            )
        }
        Shape::VipOtherProtocol | Shape::HostTraffic => {
            let dst = if shape == Shape::HostTraffic {
                t.host(rng, v6)
            } else {
                *t.vips(v6).choose(rng).expect("vips")
            };
            let client = t.client(rng, v6);
            let (proto, l4) = match rng.random_range(0..100) {
                // The host's own TCP and UDP (SSH, DNS, ...).
                0..40 if shape == Shape::HostTraffic => {
                    let proto = *[IPPROTO_TCP, IPPROTO_UDP].choose(rng).expect("protocols");
                    let port = *t.services.choose(rng).expect("services");
                    let sport = t.client_port(rng);
                    (proto, segment(rng, client, dst, proto, sport, port.1))
                }
                0..40 => {
                    let (s, d) = (octets(client), octets(dst));
                    let (proto, ty) = if v6 {
                        (IPPROTO_ICMPV6, ICMPV6_ECHO)
                    } else {
                        (IPPROTO_ICMP, ICMP_ECHO)
                    };
                    (proto, icmp(&s, &d, ty, 0, [0, 1, 0, 1], &payload(rng, 16)))
                }
                40..60 => {
                    // A tunnel packet: IPIP or IP6IP6 around a service flow.
                    let &(vip, port, proto) = t.services_of(v6).choose(rng).expect("services");
                    let inner_l4 = segment(rng, client, vip, proto, 1, port);
                    let inner = ip_packet(rng, client, vip, proto, &inner_l4);
                    let tunnel = if v6 { IPPROTO_IPV6 } else { IPPROTO_IPIP };
                    (tunnel, inner)
                }
                60..90 => {
                    let proto = *[IPPROTO_GRE, IPPROTO_SCTP, IPPROTO_ESP, IPPROTO_NONE]
                        .choose(rng)
                        .expect("protocols");
                    let len = rng.random_range(0..=64);
                    (proto, payload(rng, len))
                }
                _ => {
                    let len = rng.random_range(0..=64);
                    (rng.random(), payload(rng, len))
                }
            };
            (
                ip_packet(rng, client, dst, proto, &l4),
                format!("protocol {proto} to {dst}"),
            )
        }
        Shape::IcmpError => icmp_error(rng, t, v6),
        Shape::Echo => {
            let answering = Targets::of_family(&t.echo_vips, v6);
            let dst = match answering.choose(rng) {
                Some(&vip) if rng.random_bool(0.8) => vip,
                _ => *t.vips(v6).choose(rng).expect("vips"),
            };
            let client = t.client(rng, v6);
            let (s, d) = (octets(client), octets(dst));
            let (proto, ty) = if v6 {
                (IPPROTO_ICMPV6, ICMPV6_ECHO)
            } else {
                (IPPROTO_ICMP, ICMP_ECHO)
            };
            // Identifier and sequence.
            let rest: [u8; 4] = rng.random();
            let len = rng.random_range(0..=64);
            let l4 = icmp(&s, &d, ty, 0, rest, &payload(rng, len));
            (
                ip_packet(rng, client, dst, proto, &l4),
                format!("echo request to {dst}"),
            )
        }
        Shape::NonIp => {
            let (ethertype, len) = match rng.random_range(0..3) {
                0 => (ETH_P_ARP, ARP_LEN),
                1 => (ETH_P_LLDP, rng.random_range(0..=64)),
                _ => (rng.random(), rng.random_range(0..=64)),
            };
            let body = payload(rng, len);
            let f = ethernet(LB_MAC, ROUTER_MAC, &tags, ethertype, &body, &[]);
            return (f, format!("{}: EtherType {ethertype:#06x}", shape.name()));
        }
    };
    let l2 = ETH_HLEN + VLAN_HLEN * tags.len();
    let pad = padding(rng, l2 + ip.bytes.len());
    let f = ethernet(LB_MAC, ROUTER_MAC, &tags, ethertype, &ip, &pad);
    let what = format!(
        "{}: {what}, {} VLAN tag(s), {} bytes of padding",
        shape.name(),
        tags.len(),
        pad.len()
    );
    (f, what)
}

/// An ICMP error. The quoted packet is what a backend sent from a VIP to a
/// client (a service flow), or a packet of a foreign flow (the host's own,
/// an unconfigured port, the other family), cut at the RFC minimum, in
/// full, or anywhere. Mostly addressed to the quoted packet's source, as
/// routers do; sometimes elsewhere.
fn icmp_error(rng: &mut FuzzRng, t: &Targets, v6: bool) -> (Frame, String) {
    let roll = rng.random_range(0..100);
    // Quoting a packet of the other family happens only by mistake or malice.
    let quoted_v6 = if roll >= 95 { !v6 } else { v6 };
    let (qsrc, qsport, mut qproto, what) = match roll {
        0..60 => {
            let &(vip, port, proto) = t.services_of(quoted_v6).choose(rng).expect("services");
            (vip, port, proto, "a service flow")
        }
        60..70 => {
            let vip = *t.vips(quoted_v6).choose(rng).expect("vips");
            (vip, rng.random(), IPPROTO_TCP, "a VIP's unconfigured port")
        }
        70..85 => (
            t.host(rng, quoted_v6),
            rng.random(),
            IPPROTO_TCP,
            "the host's own flow",
        ),
        85..95 => (
            random_addr(rng, quoted_v6),
            rng.random(),
            IPPROTO_UDP,
            "a foreign flow",
        ),
        _ => {
            let &(vip, port, proto) = t.services_of(quoted_v6).choose(rng).expect("services");
            (vip, port, proto, "a packet of the other family")
        }
    };
    if rng.random_bool(0.1) {
        qproto = *[IPPROTO_ICMP, IPPROTO_GRE, IPPROTO_ICMPV6]
            .choose(rng)
            .expect("protocols");
    }
    let client = t.client(rng, quoted_v6);
    let cport = t.client_port(rng);
    let l4 = if qproto == IPPROTO_TCP || qproto == IPPROTO_UDP {
        segment(rng, qsrc, client, qproto, qsport, cport)
    } else {
        payload(rng, 16)
    };
    let quoted = ip_packet(rng, qsrc, client, qproto, &l4);
    // RFC 792: the IP header and 8 bytes of the transport header; RFC 4443:
    // as much as fits. The transport header starts after the last field
    // that is not the transport's.
    let l4_at = quoted
        .fields
        .iter()
        .find(|f| f.name.starts_with("tcp") || f.name.starts_with("udp"))
        .map_or(quoted.bytes.len(), |f| f.off);
    let full = quoted.bytes.len();
    let cut = match rng.random_range(0..100) {
        0..30 => full,
        30..70 => (l4_at + 8).min(full),
        _ => rng.random_range(0..=full),
    };
    let quoted = quoted.cut(cut).quoted();
    let router = t.router(rng, v6);
    // Errors go to the quoted packet's source (the VIP); mostly.
    let dst = if quoted_v6 == v6 && rng.random_bool(0.8) {
        qsrc
    } else if rng.random() {
        t.host(rng, v6)
    } else {
        *t.vips(v6).choose(rng).expect("vips")
    };
    let (r, d) = (octets(router), octets(dst));
    let (proto, ty, code, rest) = if v6 {
        let ty = match rng.random_range(0..100) {
            0..80 => ICMPV6_PKT_TOOBIG,
            80..90 => ICMPV6_DEST_UNREACH,
            _ => ICMPV6_TIME_EXCEEDED,
        };
        (
            IPPROTO_ICMPV6,
            ty,
            0,
            u32::from(ANNOUNCED_MTU).to_be_bytes(),
        )
    } else {
        let (ty, code) = match rng.random_range(0..100) {
            0..80 => (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED),
            80..90 => (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH),
            _ => (ICMP_TIME_EXCEEDED, 0),
        };
        let [m0, m1] = ANNOUNCED_MTU.to_be_bytes();
        (IPPROTO_ICMP, ty, code, [0, 0, m0, m1])
    };
    let msg = icmp(&r, &d, ty, code, rest, &quoted);
    let ip = ip_packet(rng, router, dst, proto, &msg);
    (
        ip,
        format!("ICMP {ty}/{code} to {dst} quoting {what} ({cut} of {full} bytes)"),
    )
}

/// Random bytes: raw, or with an IP EtherType and version nibble (and
/// sometimes a VIP as destination) so the parser gets past Ethernet.
pub fn random_frame(rng: &mut FuzzRng, t: &Targets) -> (Vec<u8>, String) {
    let len = rng.random_range(RANDOM_FRAME_LEN);
    let mut f = vec![0u8; len];
    rng.fill(&mut f[..]);
    let variant = rng.random_range(0..3);
    if variant > 0 && len >= ETH_HLEN + IPV6_HLEN {
        let v6 = variant == 2;
        let (ethertype, version) = if v6 {
            (ETH_P_IPV6, 0x60)
        } else {
            (ETH_P_IP, 0x40)
        };
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        f[ETH_HLEN] = version | (f[ETH_HLEN] & 0x0f);
        if rng.random() {
            let vip = octets(*t.vips(v6).choose(rng).expect("vips"));
            let at = ETH_HLEN + if v6 { 24 } else { 16 };
            f[at..at + vip.len()].copy_from_slice(&vip);
        }
        return (f, format!("random bytes, IPv{}", if v6 { 6 } else { 4 }));
    }
    (f, "random bytes".into())
}

/// Values a mutation of `field` tries: boundaries for its kind, the
/// lab's addresses and ports, and random ones.
pub fn field_values(rng: &mut FuzzRng, field: &Field, frame: &[u8], t: &Targets) -> Vec<Vec<u8>> {
    let cur = &frame[field.off..field.off + field.len];
    let be16 = |v: u16| v.to_be_bytes().to_vec();
    let random = |rng: &mut FuzzRng| {
        let mut v = vec![0u8; field.len];
        rng.fill(&mut v[..]);
        v
    };
    let mut values: Vec<Vec<u8>> = match field.kind {
        Kind::Mac => vec![
            LB_MAC.to_vec(),
            vec![0xff; 6],
            vec![0x01, 0x00, 0x5e, 0, 0, 1],
            vec![0x33, 0x33, 0, 0, 0, 1],
            ROUTER_MAC.to_vec(),
            vec![0; 6],
        ],
        Kind::EtherType => [
            ETH_P_IP,
            ETH_P_IPV6,
            ETH_P_8021Q,
            ETH_P_8021AD,
            ETH_P_ARP,
            ETH_P_LLDP,
            0,
            0xffff,
        ]
        .into_iter()
        .map(be16)
        .collect(),
        Kind::VlanTci => [0, 0x0fff, 0xffff].into_iter().map(be16).collect(),
        Kind::Ipv4VersionIhl => (0..=15u8)
            .map(|ihl| vec![0x40 | ihl])
            .chain([vec![0x65], vec![0x05], vec![0xf5]])
            .collect(),
        Kind::Ipv6VersionClass => [0x0u8, 0x4, 0x6, 0xf]
            .into_iter()
            .map(|v| {
                let mut x = cur.to_vec();
                x[0] = (v << 4) | (x[0] & 0x0f);
                x
            })
            .collect(),
        Kind::Length => {
            let c = u16::from_be_bytes([cur[0], cur[1]]);
            [
                0,
                1,
                7,
                8,
                19,
                20,
                39,
                40,
                c.wrapping_sub(1),
                c.wrapping_add(1),
                c.wrapping_sub(8),
                c.wrapping_add(8),
                c.wrapping_mul(2),
                0xffff,
            ]
            .into_iter()
            .map(be16)
            .collect()
        }
        Kind::Ipv4Fragment => [
            0,
            IPV4_MF,
            IPV4_DF,
            IPV4_MF | 1,
            1,
            IPV4_FRAG_OFFSET,
            IPV4_DF | IPV4_MF,
            0x8000,
            0xffff,
        ]
        .into_iter()
        .map(be16)
        .collect(),
        Kind::Protocol => [
            IPPROTO_TCP,
            IPPROTO_UDP,
            IPPROTO_ICMP,
            IPPROTO_ICMPV6,
            IPPROTO_IPIP,
            IPPROTO_IPV6,
            IPPROTO_GRE,
            IPPROTO_HOPOPTS,
            IPPROTO_ROUTING,
            IPPROTO_FRAGMENT,
            IPPROTO_DSTOPTS,
            IPPROTO_NONE,
            IPPROTO_AH,
            IPPROTO_ESP,
            0xff,
        ]
        .into_iter()
        .map(|p| vec![p])
        .collect(),
        Kind::Addr => {
            let v6 = field.len == 16;
            let mut v: Vec<Vec<u8>> = t.vips(v6).into_iter().map(octets).collect();
            v.extend(Targets::of_family(&t.hosts, v6).into_iter().map(octets));
            v.extend(
                Targets::of_family(&t.clients, v6)
                    .into_iter()
                    .take(1)
                    .map(octets),
            );
            v.push(vec![0; field.len]);
            v.push(vec![0xff; field.len]);
            v
        }
        Kind::Port => {
            let mut v: Vec<Vec<u8>> = t.services.iter().map(|s| be16(s.1)).collect();
            v.dedup();
            v.extend([be16(0), be16(0xffff), be16(t.client_ports[0])]);
            v
        }
        Kind::TcpDataOffset => (0..=15u8)
            .map(|d| vec![(d << 4) | (cur[0] & 0x0f)])
            .collect(),
        Kind::TcpFlags => [
            TCP_SYN,
            TCP_ACK,
            TCP_SYN | TCP_ACK,
            TCP_RST,
            TCP_FIN,
            0,
            0xff,
        ]
        .into_iter()
        .map(|b| vec![b])
        .collect(),
        Kind::Ipv6ExtLength => [0u8, 1, 2, 3, 0x7f, 0xff]
            .into_iter()
            .map(|b| vec![b])
            .collect(),
        Kind::Ipv6Fragment => [0u16, 1, 6, 8, 9, 0xfff8, 0xfff9, 0xffff]
            .into_iter()
            .map(be16)
            .collect(),
        Kind::IcmpType => [
            ICMP_DEST_UNREACH,
            ICMPV6_PKT_TOOBIG,
            ICMP_TIME_EXCEEDED,
            ICMP_ECHO,
            ICMPV6_ECHO,
            0,
            0xff,
        ]
        .into_iter()
        .map(|b| vec![b])
        .collect(),
        Kind::IcmpCode => [0u8, 1, ICMP_PORT_UNREACH, ICMP_FRAG_NEEDED, 0xff]
            .into_iter()
            .map(|b| vec![b])
            .collect(),
        Kind::Opaque => vec![vec![0; field.len], vec![0xff; field.len]],
    };
    values.push(random(rng));
    values.push(random(rng));
    values
}

/// What a random case did to its base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mutation {
    /// Nothing: the base as built.
    None,
    /// One field set to one of [`field_values`].
    Field,
    /// Two fields.
    Fields,
    /// A length field (IP total/payload length, UDP length) set to a
    /// value that disagrees with the frame.
    Length,
    /// Cut at a random offset.
    Truncate,
    /// 1-4 random bytes overwritten.
    Overwrite,
    /// Random bytes appended.
    Extend,
    /// Not from a base: random bytes.
    RandomBytes,
    /// Sweep: every truncation of a base.
    SweepTruncate,
    /// Sweep: every value of every field of a base.
    SweepField,
}

impl Mutation {
    /// Name, for the summary.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::None => "valid",
            Mutation::Field => "field",
            Mutation::Fields => "two-fields",
            Mutation::Length => "length",
            Mutation::Truncate => "truncate",
            Mutation::Overwrite => "overwrite",
            Mutation::Extend => "extend",
            Mutation::RandomBytes => "random-bytes",
            Mutation::SweepTruncate => "sweep-truncate",
            Mutation::SweepField => "sweep-field",
        }
    }
}

/// One generated frame.
#[derive(Clone, Debug)]
pub struct Case {
    /// The frame.
    pub frame: Vec<u8>,
    /// What was done to the base.
    pub mutation: Mutation,
    /// How it was made, for failure reports.
    pub description: String,
}

/// Sets `field` of `f` to a random one of its values; returns a description.
fn mutate_field(rng: &mut FuzzRng, f: &mut Frame, field: Field, t: &Targets) -> String {
    let values = field_values(rng, &field, &f.bytes, t);
    let v = values.choose(rng).expect("every kind has values");
    f.bytes[field.off..field.off + field.len].copy_from_slice(v);
    format!("{} = {}", field.describe(), super::hex(v))
}

/// A random case: random bytes sometimes; otherwise a base and one mutation.
pub fn random_case(rng: &mut FuzzRng, t: &Targets) -> Case {
    if rng.random_bool(0.05) {
        let (frame, description) = random_frame(rng, t);
        return Case {
            frame,
            mutation: Mutation::RandomBytes,
            description,
        };
    }
    let (mut f, what) = base(rng, t);
    let mutation = match rng.random_range(0..100) {
        0..25 => Mutation::None,
        25..55 => Mutation::Field,
        55..62 => Mutation::Fields,
        62..72 => Mutation::Length,
        72..85 => Mutation::Truncate,
        85..95 => Mutation::Overwrite,
        _ => Mutation::Extend,
    };
    let how = match mutation {
        Mutation::Field | Mutation::Fields => {
            let times = if mutation == Mutation::Fields { 2 } else { 1 };
            (0..times)
                .map(|_| {
                    let field = *f.fields.choose(rng).expect("every frame has fields");
                    mutate_field(rng, &mut f, field, t)
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        Mutation::Length => {
            let lengths: Vec<Field> = f
                .fields
                .iter()
                .copied()
                .filter(|x| x.kind == Kind::Length)
                .collect();
            match lengths.choose(rng) {
                Some(&field) => mutate_field(rng, &mut f, field, t),
                None => "no length field".into(),
            }
        }
        Mutation::Truncate => {
            let len = rng.random_range(ETH_HLEN..=f.bytes.len());
            f.bytes.truncate(len);
            format!("cut to {len} bytes")
        }
        Mutation::Overwrite => {
            let n = rng.random_range(1..=4);
            (0..n)
                .map(|_| {
                    let at = rng.random_range(0..f.bytes.len());
                    f.bytes[at] = rng.random();
                    format!("byte {at} = {:02x}", f.bytes[at])
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        Mutation::Extend => {
            let mut extra = vec![0u8; rng.random_range(1..=MAX_PADDING)];
            rng.fill(&mut extra[..]);
            f.bytes.extend_from_slice(&extra);
            format!("{} random bytes appended", extra.len())
        }
        _ => "as built".into(),
    };
    Case {
        frame: f.bytes,
        mutation,
        description: format!("{what}; {}: {how}", mutation.name()),
    }
}

/// Bases the sweep takes, per shape: each is truncated at every offset and
/// has every field set to every value of [`field_values`].
const SWEEP_BASES_PER_SHAPE: usize = 6;

/// The sweep of a run: deterministic from `seed`.
pub fn sweep(seed: u64, t: &Targets) -> Vec<Case> {
    // Its own stream, apart from the random cases' (which are keyed by index).
    let mut rng = FuzzRng::seed_from_u64(splitmix64(!seed));
    let shapes = [
        Shape::ServiceFlow,
        Shape::ServiceFlow,
        Shape::VipOtherPort,
        Shape::VipOtherProtocol,
        Shape::HostTraffic,
        Shape::IcmpError,
        Shape::IcmpError,
        Shape::Echo,
        Shape::NonIp,
    ];
    let mut cases = Vec::new();
    for shape in shapes {
        for _ in 0..SWEEP_BASES_PER_SHAPE {
            let (base, what) = base_of(&mut rng, t, shape);
            for len in ETH_HLEN..base.bytes.len() {
                cases.push(Case {
                    frame: base.bytes[..len].to_vec(),
                    mutation: Mutation::SweepTruncate,
                    description: format!("{what}; cut to {len} bytes"),
                });
            }
            for field in &base.fields {
                for v in field_values(&mut rng, field, &base.bytes, t) {
                    let mut frame = base.bytes.clone();
                    frame[field.off..field.off + field.len].copy_from_slice(&v);
                    cases.push(Case {
                        frame,
                        mutation: Mutation::SweepField,
                        description: format!("{what}; {} = {}", field.describe(), super::hex(&v)),
                    });
                }
            }
        }
    }
    cases
}
