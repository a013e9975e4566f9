//! Map keys and values. Every type is `#[repr(C)]` with explicit padding
//! fields (zeroed by user space, so hash keys compare byte-for-byte) and a
//! compile-time size assert, because the kernel sees raw bytes.

use core::{mem::size_of, net::IpAddr};

/// Address family tag for IPv4 in keys and values (not the libc `AF_*` value).
pub const FAMILY_V4: u8 = 4;
/// Address family tag for IPv6.
pub const FAMILY_V6: u8 = 6;

/// Service flag: forward in an IPIP/IP6IP6 tunnel (`ipip`) instead of
/// rewriting MACs (`dsr-l2`).
pub const SERVICE_F_IPIP: u32 = 1 << 0;
/// Service flag: hash the client address only (client affinity), not the 5-tuple.
pub const SERVICE_F_AFFINITY: u32 = 1 << 1;

/// Backend flag: established flows may use this backend. Cleared when the
/// backend is down, in maintenance or removed, which turns its
/// connection-table entries into misses. A draining backend keeps it (its
/// flows stay) but is absent from the Maglev table (no new flows).
pub const BACKEND_F_UP: u8 = 1 << 0;

/// An address as 16 bytes in network order; IPv4 uses the first 4 bytes and
/// leaves the rest zero, so one key shape serves both families.
pub type Addr = [u8; 16];

/// Converts an address to the 16-byte form and its family tag.
pub fn addr_bytes(ip: IpAddr) -> (Addr, u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (a, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// The address the 16-byte form and family tag stand for (the inverse of
/// [`addr_bytes`]).
pub fn addr_ip(addr: &Addr, family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    } else {
        IpAddr::from(*addr)
    }
}

/// A service: (VIP, protocol, port). Key of `LB_SERVICES`. Aligned (the
/// layout is unchanged) so the data plane builds it with word stores.
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceKey {
    /// The VIP, network order.
    pub addr: Addr,
    /// Destination port, network order.
    pub port: u16,
    /// IP protocol number (TCP 6, UDP 17).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

/// What the data plane needs of a service. Value of `LB_SERVICES`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Dense id: index of the service's rings and counters.
    pub id: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// Which ring copy (0 or 1) is live; flipped after the other is written.
    pub active_ring: u32,
    /// Seconds a flow of this service may stay idle before its
    /// connection-table entry lapses; 0 takes the protocol's default from
    /// [`ConntrackSettings`].
    pub idle_timeout: u32,
}

/// A live service by id: its key with its value. Element of
/// `LB_SERVICE_SLOTS`, indexed by [`ServiceValue::id`]; all zero (family 0,
/// which no packet has) when no service has the id.
///
/// A packet of an established flow finds its service here, from the id its
/// connection-table entry keeps, with an array read instead of a hash
/// lookup; the key must match the flow's destination, so an entry outliving
/// its service (or a reused id) is never taken for another service.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceSlot {
    /// The service's key.
    pub key: ServiceKey,
    /// Its value, as `LB_SERVICES` holds it.
    pub value: ServiceValue,
}

impl ServiceSlot {
    /// Whether this slot's service is the one `flow` was sent to.
    #[inline(always)]
    pub fn serves(&self, flow: &FlowKey) -> bool {
        let k = &self.key;
        k.family == flow.family
            && k.proto == flow.proto
            && k.port == flow.dport
            && same_words(&k.addr, &flow.dst)
    }
}

/// Whether two addresses are equal, compared as four 32-bit words (a
/// 16-byte `==` may become a `memcmp` call, which BPF does not have).
#[inline(always)]
pub fn same_words(a: &Addr, b: &Addr) -> bool {
    use crate::hash::word;
    (word(a, 0) ^ word(b, 0))
        | (word(a, 1) ^ word(b, 1))
        | (word(a, 2) ^ word(b, 2))
        | (word(a, 3) ^ word(b, 3))
        == 0
}

/// An address with its family. Key of `LB_VIPS` and `LB_DECAP_ADDRS`.
/// Aligned like [`ServiceKey`].
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrKey {
    /// Network order.
    pub addr: Addr,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: [u8; 3],
}

impl AddrKey {
    /// The key for `ip`.
    pub fn new(ip: IpAddr) -> Self {
        let (addr, family) = addr_bytes(ip);
        Self::from_bytes(addr, family)
    }

    /// The key for the 16-byte form `addr` of an address of `family`.
    /// Built as words: a literal with `_pad: [0; 3]` makes LLVM call
    /// `memset` for the padding in the data plane, a byte loop.
    #[inline(always)]
    pub fn from_bytes(addr: Addr, family: u8) -> Self {
        #[repr(C, align(4))]
        struct Words {
            addr: Addr,
            tail: u32,
        }
        let words = Words {
            addr,
            tail: u32::from_ne_bytes([family, 0, 0, 0]),
        };
        // SAFETY: both are repr(C), 20 bytes and 4-aligned with the address
        // first; the tail's bytes in memory are the family then three zero
        // bytes, whatever the byte order; any bytes are a valid AddrKey.
        unsafe { core::mem::transmute::<Words, AddrKey>(words) }
    }
}

/// A backend of one service. Value of `LB_BACKENDS`, indexed by backend id.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    /// Backend address (the tunnel destination for `ipip`), network order.
    pub addr: Addr,
    /// MAC of the next hop toward the backend (the backend itself when on-link).
    pub mac: [u8; 6],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// Bumped whenever the id is given to another backend, so connection-table
    /// entries made for the previous holder become misses.
    pub generation: u32,
}

/// A flow as the client sent it. Key of `LB_CONNTRACK` and input of the
/// hash. Aligned (the layout is unchanged) so the data plane copies its
/// addresses and hashes its words with 8- and 4-byte accesses.
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Client address, network order.
    pub src: Addr,
    /// VIP, network order.
    pub dst: Addr,
    /// Client port, network order.
    pub sport: u16,
    /// Service port, network order.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The service the flow was sent to.
    #[inline(always)]
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            family: self.family,
        }
    }
}

/// Flow flag: a TCP FIN or RST was seen; the entry lapses after
/// [`ConntrackSettings::closed_timeout`].
pub const FLOW_F_CLOSED: u32 = 1 << 0;

/// Where a flow went. Value of `LB_CONNTRACK`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// Backend id.
    pub backend: u32,
    /// The backend's [`BackendValue::generation`] when the flow was pinned.
    pub generation: u32,
    /// The flow's last packet, as [`ConntrackSettings::now`] said then.
    pub last_seen: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    /// The id of the flow's service ([`ServiceSlot`]).
    pub service: u32,
}

impl FlowValue {
    /// Whether the entry has lapsed at `now` (seconds, as `last_seen`):
    /// idle for longer than its timeout, `closed` for a closed TCP
    /// connection, else `idle`. A timeout of 0 never lapses.
    #[inline(always)]
    pub fn lapsed(&self, now: u32, idle: u32, closed: u32) -> bool {
        let timeout = if self.flags & FLOW_F_CLOSED != 0 {
            closed
        } else {
            idle
        };
        timeout != 0 && now.wrapping_sub(self.last_seen) > timeout
    }
}

/// Data-plane settings. Index 0 of `LB_SETTINGS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// Maglev table size (prime); the stride of `LB_RINGS`. Zero means "not
    /// configured yet": every service packet is dropped as having no backend.
    pub ring_size: u32,
    /// Largest IP packet the egress link carries (its MTU); encapsulation
    /// beyond it drops the packet (counted as `drop_too_big`).
    pub mtu: u32,
    /// Outer IPv4 source for `ipip`, network order.
    pub tunnel_src_v4: [u8; 4],
    /// Host-order mask of the outer IPv4 source bits taken from the flow hash,
    /// so backends' receive-side scaling spreads tunnelled flows (0: fixed source).
    pub tunnel_src_v4_hash_mask: u32,
    /// Outer IPv6 source for `ipip`, network order.
    pub tunnel_src_v6: Addr,
    /// Host-order mask over the last 32 bits of the outer IPv6 source, as above.
    pub tunnel_src_v6_hash_mask: u32,
}

/// Connection-table policy. Index 0 of `LB_CONNTRACK_SETTINGS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ConntrackSettings {
    /// Entries each CPU may add per second; a new flow beyond it is
    /// forwarded by the Maglev table without an entry. 0: no limit.
    pub inserts_per_cpu: u32,
    /// Seconds the entry of a TCP connection that saw a FIN or RST
    /// outlives its last packet (0: as long as an open one).
    pub closed_timeout: u32,
    /// Default idle timeout of TCP flows, seconds (0: never lapse).
    pub tcp_idle_timeout: u32,
    /// Default idle timeout of UDP flows, seconds (0: never lapse).
    pub udp_idle_timeout: u32,
    /// The data plane's clock: whole seconds of `CLOCK_MONOTONIC`, written
    /// by user space every second. One array read on the packet path
    /// instead of a clock helper call; while nothing writes it, nothing
    /// lapses.
    pub now: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
}

/// One CPU's connection-table accounting. Value of `LB_CONNTRACK_STATS`
/// (per CPU, one entry).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ConntrackStats {
    /// Entries added (or replaced).
    pub inserts: u64,
    /// New flows forwarded without an entry because the CPU had spent its
    /// [`ConntrackSettings::inserts_per_cpu`] for the second.
    pub refused: u64,
    /// The second ([`ConntrackSettings::now`]) the budget is counting.
    pub window: u64,
    /// Entries added in that second.
    pub window_inserts: u64,
}

/// Per-service counters (per CPU). Value of `LB_SERVICE_STATS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded, as received (before encapsulation).
    pub bytes: u64,
    /// Flows that took a Maglev lookup (connection-table miss or TCP SYN).
    pub new_flows: u64,
}

impl ServiceStats {
    /// The sum of per-CPU values.
    pub fn total<'a>(per_cpu: impl IntoIterator<Item = &'a ServiceStats>) -> ServiceStats {
        per_cpu
            .into_iter()
            .fold(ServiceStats::default(), |a, s| ServiceStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                new_flows: a.new_flows + s.new_flows,
            })
    }
}

/// Per-backend counters (per CPU). Value of `LB_BACKEND_STATS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Packets forwarded to the backend.
    pub packets: u64,
    /// Bytes forwarded, as received.
    pub bytes: u64,
}

/// Index of a ring slot in `LB_RINGS`: each service owns [`crate::limits::RING_COPIES`]
/// consecutive tables of `ring_size` slots.
#[inline(always)]
pub const fn ring_index(service_id: u32, copy: u32, ring_size: u32, slot: u32) -> u32 {
    (service_id * crate::limits::RING_COPIES + copy) * ring_size + slot
}

const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<ServiceValue>() == 16);
const _: () = assert!(size_of::<AddrKey>() == 20);
const _: () = assert!(size_of::<BackendValue>() == 28);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(align_of::<FlowKey>() == 8 && align_of::<ServiceKey>() == 4);
const _: () = assert!(align_of::<AddrKey>() == 4);
const _: () = assert!(size_of::<FlowValue>() == 20);
const _: () = assert!(size_of::<ServiceSlot>() == 36);
const _: () = assert!(size_of::<Settings>() == 36);
const _: () = assert!(size_of::<ConntrackSettings>() == 24);
const _: () = assert!(size_of::<ConntrackStats>() == 32);
const _: () = assert!(size_of::<ServiceStats>() == 24);
const _: () = assert!(size_of::<BackendStats>() == 16);

#[cfg(feature = "user")]
mod pod {
    //! SAFETY (all impls): `#[repr(C)]`, only integer and byte-array fields,
    //! no implicit padding (the size asserts above pin the layout).
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for ServiceSlot {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for ConntrackSettings {}
    unsafe impl aya::Pod for ConntrackStats {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for BackendStats {}
}
