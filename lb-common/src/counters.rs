//! Global reasons: every packet the load-balancer program sees is counted under
//! exactly one of these, so the counters add up to the packets received.

/// Why the load-balancer program passed, dropped or forwarded a packet.
/// The discriminant is the index into the `LB_COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed to the kernel.
    PassNotIp = 0,
    /// IP, but no service matches (VIP, protocol, port): passed untouched.
    PassNotService = 1,
    /// A protocol other than TCP, UDP or an ICMP error quoting a service flow
    /// (tunnels, ICMP echo, ...): passed untouched.
    PassOtherProtocol = 2,
    /// Frame too short for its Ethernet or VLAN headers: dropped.
    DropMalformedEthernet = 3,
    /// Truncated IPv4 header, IHL below 5, or total length disagreeing with
    /// the frame: dropped.
    DropMalformedIpv4 = 4,
    /// Truncated IPv6 header or extension-header chain, payload length
    /// disagreeing with the frame, or a chain longer than the parser walks: dropped.
    DropMalformedIpv6 = 5,
    /// Truncated or invalid TCP/UDP header on a packet to a VIP address: dropped.
    DropMalformedL4 = 6,
    /// ICMP error to a VIP address whose quoted packet is truncated or no IP
    /// header, or an echo request lb answers shorter than its echo header:
    /// dropped.
    DropMalformedIcmp = 7,
    /// IP fragment addressed to a VIP address: dropped (see docs/dataplane.md).
    DropFragment = 8,
    /// The service has no backend in rotation (or, for an instant, the
    /// chosen backend's entry is being rewritten and was read half-written
    /// twice): dropped.
    DropNoBackend = 9,
    /// Encapsulation would exceed the MTU, and no ICMP error is sent (IPv4
    /// without DF, a source that names no single host, the CPU's ICMP
    /// budget spent): dropped.
    DropTooBig = 10,
    /// The kernel refused to grow or cut the packet (for a tunnel header or
    /// an ICMP error): dropped.
    DropEncapFailed = 11,
    /// Forwarded with a MAC rewrite (`dsr-l2`).
    ForwardDsr = 12,
    /// Forwarded in an IPIP/IP6IP6 tunnel (`ipip`).
    ForwardIpip = 13,
    /// An ICMP "fragmentation needed"/"packet too big" relayed to the backend
    /// owning the quoted flow.
    ForwardIcmpError = 14,
    /// Sent to a MAC other than the receiving interface's own (another
    /// host's, flooded by a switch; broadcast; multicast), or received on an
    /// interface lb was not attached to: passed untouched, never forwarded.
    PassForeignMac = 15,
    /// `ipip`: the packet would exceed the MTU once encapsulated; answered
    /// with an ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet
    /// too big" telling the client the MTU to use.
    ReplyTooBig = 16,
    /// An ICMP echo request ("ping") to a VIP whose service answers echo:
    /// answered with an echo reply from the VIP.
    ReplyEcho = 17,
    /// An ICMP echo request to a VIP that answers echo, beyond this CPU's
    /// echo budget: dropped.
    DropEchoLimit = 18,
    /// Sent to the backend in a GUE tunnel (`gue`).
    ForwardGue = 19,
    /// Forwarded (in any mode, an ICMP error too) to a backend whose route
    /// leaves by another interface lb is attached to: redirected there
    /// through the device map, with that interface's MAC and MTU.
    RedirectBackend = 20,
    /// The backend's route leaves by an interface that is no longer
    /// attached (its device-map entry is gone); dropped until the daemon
    /// takes the backend out or attaches the interface again.
    DropNoEgress = 21,
    /// A new flow (no connection-table entry) from a source in the
    /// service's deny list: dropped. User space removes the entries of
    /// flows a list change refuses, so their next packets land here.
    DropDenied = 22,
    /// Likewise, the service having an allow list without the source.
    DropNotAllowed = 23,
    /// A new flow (a TCP SYN, or a UDP packet without an entry) from a
    /// source prefix over the service's new-flow limit: dropped.
    DropRateLimited = 24,
}

impl Counter {
    /// Number of counters (the `LB_COUNTERS` array size).
    pub const COUNT: u32 = 25;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::PassNotIp,
        Counter::PassNotService,
        Counter::PassOtherProtocol,
        Counter::DropMalformedEthernet,
        Counter::DropMalformedIpv4,
        Counter::DropMalformedIpv6,
        Counter::DropMalformedL4,
        Counter::DropMalformedIcmp,
        Counter::DropFragment,
        Counter::DropNoBackend,
        Counter::DropTooBig,
        Counter::DropEncapFailed,
        Counter::ForwardDsr,
        Counter::ForwardIpip,
        Counter::ForwardIcmpError,
        Counter::PassForeignMac,
        Counter::ReplyTooBig,
        Counter::ReplyEcho,
        Counter::DropEchoLimit,
        Counter::ForwardGue,
        Counter::RedirectBackend,
        Counter::DropNoEgress,
        Counter::DropDenied,
        Counter::DropNotAllowed,
        Counter::DropRateLimited,
    ];

    /// Stable snake_case name, for logs, JSON and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotService => "pass_not_service",
            Counter::PassOtherProtocol => "pass_other_protocol",
            Counter::DropMalformedEthernet => "drop_malformed_ethernet",
            Counter::DropMalformedIpv4 => "drop_malformed_ipv4",
            Counter::DropMalformedIpv6 => "drop_malformed_ipv6",
            Counter::DropMalformedL4 => "drop_malformed_l4",
            Counter::DropMalformedIcmp => "drop_malformed_icmp",
            Counter::DropFragment => "drop_fragment",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropTooBig => "drop_too_big",
            Counter::DropEncapFailed => "drop_encap_failed",
            Counter::ForwardDsr => "forward_dsr",
            Counter::ForwardIpip => "forward_ipip",
            Counter::ForwardIcmpError => "forward_icmp_error",
            Counter::PassForeignMac => "pass_foreign_mac",
            Counter::ReplyTooBig => "reply_too_big",
            Counter::ReplyEcho => "reply_echo",
            Counter::DropEchoLimit => "drop_echo_limit",
            Counter::ForwardGue => "forward_gue",
            Counter::RedirectBackend => "redirect_backend",
            Counter::DropNoEgress => "drop_no_egress",
            Counter::DropDenied => "drop_denied",
            Counter::DropNotAllowed => "drop_not_allowed",
            Counter::DropRateLimited => "drop_rate_limited",
        }
    }
}

impl Counter {
    /// The way a packet forwarded under this counter left, if it is one of
    /// the forward counters: those the data plane counts in the backend's
    /// [`crate::BackendStats`] only, not in `LB_COUNTERS`, so that a
    /// forwarded packet costs one counters update. User space adds the
    /// backends' counts to them.
    pub const fn forward_way(self) -> Option<ForwardWay> {
        match self {
            Counter::ForwardDsr => Some(ForwardWay::Dsr),
            Counter::ForwardIpip => Some(ForwardWay::Ipip),
            Counter::ForwardGue => Some(ForwardWay::Gue),
            Counter::RedirectBackend => Some(ForwardWay::Redirect),
            Counter::ForwardIcmpError => Some(ForwardWay::IcmpError),
            _ => None,
        }
    }
}

/// How a packet left for its backend: the index into
/// [`crate::BackendStats::forwarded`], one per forward [`Counter`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ForwardWay {
    /// [`Counter::ForwardDsr`].
    Dsr = 0,
    /// [`Counter::ForwardIpip`].
    Ipip = 1,
    /// [`Counter::ForwardGue`].
    Gue = 2,
    /// [`Counter::RedirectBackend`].
    Redirect = 3,
    /// [`Counter::ForwardIcmpError`].
    IcmpError = 4,
}

impl ForwardWay {
    /// Number of ways.
    pub const COUNT: usize = 5;

    /// Every way, in index order.
    pub const ALL: [ForwardWay; Self::COUNT] = [
        ForwardWay::Dsr,
        ForwardWay::Ipip,
        ForwardWay::Gue,
        ForwardWay::Redirect,
        ForwardWay::IcmpError,
    ];

    /// The global counter this way's packets are counted under.
    pub const fn counter(self) -> Counter {
        match self {
            ForwardWay::Dsr => Counter::ForwardDsr,
            ForwardWay::Ipip => Counter::ForwardIpip,
            ForwardWay::Gue => Counter::ForwardGue,
            ForwardWay::Redirect => Counter::RedirectBackend,
            ForwardWay::IcmpError => Counter::ForwardIcmpError,
        }
    }
}

/// What the decapsulation program did with a packet; index into `LB_DECAP_COUNTERS`.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// Not an IPIP/IP6IP6 packet, nor UDP to the GUE port of an endpoint:
    /// passed untouched.
    PassNotTunnel = 0,
    /// A tunnel packet for an address that is not a configured endpoint: passed untouched.
    PassNotLocal = 1,
    /// Outer header stripped, inner packet passed to the stack.
    Decapsulated = 2,
    /// Truncated outer or inner header: dropped.
    DropMalformed = 3,
    /// A tunnel packet to a local endpoint from a source outside the
    /// accepted prefixes: dropped, so nobody else can tunnel packets in.
    DropForeignSource = 4,
    /// A tunnel packet whose inner packet is not addressed to a VIP
    /// configured here: dropped.
    DropNotVip = 5,
    /// The tunnel's path marked congestion (outer ECN CE) on a packet
    /// whose transport does not do ECN (inner not-ECT): dropped, as RFC
    /// 6040 asks, since the inner packet cannot carry the mark.
    DropCongestedNotEct = 6,
}

impl DecapCounter {
    /// Number of decap counters.
    pub const COUNT: u32 = 7;

    /// Every counter, in index order.
    pub const ALL: [DecapCounter; Self::COUNT as usize] = [
        DecapCounter::PassNotTunnel,
        DecapCounter::PassNotLocal,
        DecapCounter::Decapsulated,
        DecapCounter::DropMalformed,
        DecapCounter::DropForeignSource,
        DecapCounter::DropNotVip,
        DecapCounter::DropCongestedNotEct,
    ];

    /// Stable snake_case name, for `lb decap status` and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            DecapCounter::PassNotTunnel => "pass_not_tunnel",
            DecapCounter::PassNotLocal => "pass_not_local",
            DecapCounter::Decapsulated => "decapsulated",
            DecapCounter::DropMalformed => "drop_malformed",
            DecapCounter::DropForeignSource => "drop_foreign_source",
            DecapCounter::DropNotVip => "drop_not_vip",
            DecapCounter::DropCongestedNotEct => "drop_congested_not_ect",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_forward_counter_is_one_way_and_each_way_one_forward_counter() {
        for (i, way) in ForwardWay::ALL.iter().enumerate() {
            assert_eq!(*way as usize, i, "ALL is in index order");
            assert_eq!(way.counter().forward_way(), Some(*way));
        }
        let forwards = Counter::ALL
            .iter()
            .filter(|c| c.forward_way().is_some())
            .count();
        assert_eq!(forwards, ForwardWay::COUNT);
    }

    /// docs/dataplane.md says every packet ends with one of the counters in
    /// its table: so the table has a row for each.
    #[test]
    fn the_docs_table_lists_every_counter() {
        extern crate std;
        let docs = include_str!("../../docs/dataplane.md");
        for c in Counter::ALL {
            let row = std::format!("| `{}` |", c.name());
            assert!(docs.contains(&row), "docs/dataplane.md lacks {row}");
        }
    }
}
