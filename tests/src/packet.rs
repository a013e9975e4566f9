//! Frame builders and inspectors for the tests.

use std::net::IpAddr;

use lb_common::wire::*;

/// A MAC address.
pub type Mac = [u8; 6];

/// RFC 1071 checksum over `data` with an initial partial sum.
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut bytes = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&[0, proto]);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            bytes.extend_from_slice(&s.octets());
            bytes.extend_from_slice(&d.octets());
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    let mut sum = 0u32;
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    sum
}

/// A TCP segment (20-byte header plus `options`) with a valid checksum.
pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&1u32.to_be_bytes());
    s.extend_from_slice(&0u32.to_be_bytes());
    s.push(((TCP_HLEN / 4) as u8) << 4);
    s.push(flags);
    s.extend_from_slice(&65535u16.to_be_bytes());
    s.extend_from_slice(&[0, 0, 0, 0]);
    s.extend_from_slice(payload);
    let c = checksum(pseudo_header_sum(src, dst, IPPROTO_TCP, s.len()), &s);
    s[16..18].copy_from_slice(&c.to_be_bytes());
    s
}

/// A UDP datagram with a valid checksum.
pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sport.to_be_bytes());
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((UDP_HLEN + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    let c = checksum(pseudo_header_sum(src, dst, IPPROTO_UDP, s.len()), &s);
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// IPv4 header fields the tests vary.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    /// Source.
    pub src: [u8; 4],
    /// Destination.
    pub dst: [u8; 4],
    /// Protocol.
    pub proto: u8,
    /// Flags and fragment offset.
    pub frag: u16,
    /// Options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// TOS byte.
    pub tos: u8,
}

impl Ipv4 {
    /// A header from `src` to `dst` carrying `proto`.
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> Self {
        Ipv4 {
            src,
            dst,
            proto,
            frag: 0,
            options: Vec::new(),
            tos: 0,
        }
    }

    /// The packet: header with valid length and checksum, then `payload`.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = IPV4_HLEN + self.options.len();
        let mut p = vec![
            0x40 | (hlen / 4) as u8,
            self.tos,
            0,
            0,
            0x12,
            0x34,
            (self.frag >> 8) as u8,
            self.frag as u8,
            64,
            self.proto,
            0,
            0,
        ];
        p[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&self.src);
        p.extend_from_slice(&self.dst);
        p.extend_from_slice(&self.options);
        let c = checksum(0, &p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }
}

/// An IPv6 packet; `ext` is a ready-made extension-header chain whose first
/// header is `first_next` (pass `proto` and an empty chain for none).
pub fn ipv6(src: [u8; 16], dst: [u8; 16], first_next: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
    p.push(first_next);
    p.push(64);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(ext);
    p.extend_from_slice(payload);
    p
}

/// One IPv6 options-style extension header (hop-by-hop, destination
/// options) of 8 bytes: next header, length 0, six bytes of padding options.
pub fn ipv6_opts_header(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header.
pub fn ipv6_fragment_header(next: u8, offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1]);
    h
}

/// An Ethernet frame with optional VLAN tags (802.1ad outer, 802.1Q inner).
pub fn ethernet(dst: Mac, src: Mac, vlans: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (i, vid) in vlans.iter().enumerate() {
        let tpid = if i + 1 < vlans.len() {
            ETH_P_8021AD
        } else {
            ETH_P_8021Q
        };
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// ICMPv4 "fragmentation needed" quoting `quoted`, with a valid checksum.
pub fn icmp4_frag_needed(mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quoted);
    let c = checksum(0, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// ICMPv4 echo request.
pub fn icmp4_echo() -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0, 0, 1, 0, 1];
    let c = checksum(0, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ICMP (IPv4) or ICMPv6 echo request from `src` to `dst` with a valid
/// checksum (ICMPv6's over the pseudo-header too).
pub fn icmp_echo(src: IpAddr, dst: IpAddr, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let v4 = src.is_ipv4();
    let ty = if v4 {
        ICMP_ECHO_REQUEST
    } else {
        ICMPV6_ECHO_REQUEST
    };
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let initial = if v4 {
        0
    } else {
        pseudo_header_sum(src, dst, IPPROTO_ICMPV6, m.len())
    };
    let c = checksum(initial, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// What is wrong with `out` as the load balancer's echo reply to the echo
/// request `input`: its IP packet at `l3`, the ICMP message at `l4`, the
/// packet's end at `end` (Ethernet padding may follow). The same frame
/// back to the MAC it came from, from the VIP to the client with a fresh
/// TTL, options or extension headers kept, an echo reply of the same
/// identifier, sequence and data. Checksums are updated, not recomputed: each
/// is valid in the reply if and only if it was in the request.
pub fn echo_reply_problems(
    input: &[u8],
    out: &[u8],
    l3: usize,
    l4: usize,
    end: usize,
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = |ok: bool, what: &str| {
        if !ok {
            bad.push(what.to_string());
        }
    };
    if out.len() != input.len() {
        return vec![format!("length {} for {}", out.len(), input.len())];
    }
    want(out[0..6] == input[6..12], "to the MAC the frame came from");
    want(out[6..12] == input[0..6], "from the MAC it was sent to");
    want(out[12..l3] == input[12..l3], "VLAN tags and EtherType kept");
    want(out[end..] == input[end..], "padding kept");
    let (i, o) = (&input[l3..l4], &out[l3..l4]);
    let (msg_in, msg) = (&input[l4..end], &out[l4..end]);
    want(
        msg[1..2] == msg_in[1..2] && msg[4..] == msg_in[4..],
        "code, identifier, sequence and data kept",
    );
    if i[0] >> 4 == 4 {
        want(o[..8] == i[..8], "version to flags as they were");
        want(o[8] == DEFAULT_TTL && o[9] == i[9], "TTL and protocol");
        want(
            ipv4_header_valid(o) == ipv4_header_valid(i),
            "IPv4 header checksum updated",
        );
        want(
            o[12..16] == i[16..20] && o[16..20] == i[12..16],
            "addresses swapped",
        );
        want(o[20..] == i[20..], "options kept");
        want(msg[0] == ICMP_ECHO_REPLY, "an echo reply");
        want(
            (checksum(0, msg) == 0) == (checksum(0, msg_in) == 0),
            "ICMP checksum updated",
        );
    } else {
        want(o[..7] == i[..7], "version to next header as they were");
        want(o[7] == DEFAULT_TTL, "hop limit");
        want(
            o[8..24] == i[24..40] && o[24..40] == i[8..24],
            "addresses swapped",
        );
        want(o[40..] == i[40..], "extension headers kept");
        want(msg[0] == ICMPV6_ECHO_REPLY, "an echo reply");
        let addr = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).unwrap_or_default());
        let valid = |ip: &[u8], msg: &[u8]| {
            let sum = pseudo_header_sum(
                addr(&ip[8..24]),
                addr(&ip[24..40]),
                IPPROTO_ICMPV6,
                msg.len(),
            );
            checksum(sum, msg) == 0
        };
        want(valid(o, msg) == valid(i, msg_in), "ICMPv6 checksum updated");
    }
    bad
}

/// ICMPv6 "packet too big" quoting `quoted` (checksum left zero: the data
/// plane does not read it).
pub fn icmp6_too_big(mtu: u32, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![ICMPV6_PKT_TOOBIG, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quoted);
    m
}

/// Whether the 20-byte-or-longer IPv4 header at the start of `h` has a valid checksum.
pub fn ipv4_header_valid(h: &[u8]) -> bool {
    let hlen = (h[0] & 0x0f) as usize * 4;
    checksum(0, &h[..hlen]) == 0
}

/// What is wrong with `out` as the load balancer's ICMP answer to the
/// frame `input` (its IP packet at `l3`) that was too big for a tunnel
/// whose path takes `mtu`-byte packets: "fragmentation needed" for IPv4,
/// "packet too big" for IPv6, from the VIP to the client, quoting the
/// first [`ICMP_QUOTE_LEN`] bytes of the packet, all checksums valid.
pub fn too_big_reply_problems(input: &[u8], out: &[u8], l3: usize, mtu: u32) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = |ok: bool, what: &str| {
        if !ok {
            bad.push(what.to_string());
        }
    };
    let v4 = input[l3] >> 4 == 4;
    let ip_hlen = if v4 { IPV4_HLEN } else { IPV6_HLEN };
    if out.len() != l3 + ip_hlen + ICMP_HLEN + ICMP_QUOTE_LEN {
        return vec![format!("length {}", out.len())];
    }
    want(out[0..6] == input[6..12], "to the MAC the frame came from");
    want(out[6..12] == input[0..6], "from the MAC it was sent to");
    want(out[12..l3] == input[12..l3], "VLAN tags and EtherType kept");
    let (ip, msg) = out[l3..].split_at(ip_hlen);
    want(
        msg[ICMP_HLEN..] == input[l3..l3 + ICMP_QUOTE_LEN],
        "quotes the packet's first bytes",
    );
    if v4 {
        want(ip[0] == 0x45 && ipv4_header_valid(ip), "IPv4 header valid");
        want(
            u16::from_be_bytes([ip[2], ip[3]]) as usize == ip_hlen + msg.len(),
            "total length",
        );
        want(ip[9] == IPPROTO_ICMP, "protocol ICMP");
        want(ip[12..16] == input[l3 + 16..l3 + 20], "from the VIP");
        want(ip[16..20] == input[l3 + 12..l3 + 16], "to the client");
        want(
            msg[0] == ICMP_DEST_UNREACH && msg[1] == ICMP_FRAG_NEEDED,
            "fragmentation needed",
        );
        want(
            u32::from(u16::from_be_bytes([msg[6], msg[7]])) == mtu && msg[4..6] == [0, 0],
            "the MTU to use",
        );
        want(checksum(0, msg) == 0, "ICMP checksum");
    } else {
        want(ip[0] >> 4 == 6, "IPv6 header");
        want(
            u16::from_be_bytes([ip[4], ip[5]]) as usize == msg.len(),
            "payload length",
        );
        want(ip[6] == IPPROTO_ICMPV6, "next header ICMPv6");
        want(ip[8..24] == input[l3 + 24..l3 + 40], "from the VIP");
        want(ip[24..40] == input[l3 + 8..l3 + 24], "to the client");
        want(msg[0] == ICMPV6_PKT_TOOBIG && msg[1] == 0, "packet too big");
        want(
            u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]) == mtu,
            "the MTU to use",
        );
        let addr = |b: &[u8]| IpAddr::from(<[u8; 16]>::try_from(b).unwrap_or_default());
        let sum = pseudo_header_sum(
            addr(&ip[8..24]),
            addr(&ip[24..40]),
            IPPROTO_ICMPV6,
            msg.len(),
        );
        want(checksum(sum, msg) == 0, "ICMPv6 checksum");
    }
    bad
}
