//! Map keys and values. Every type is `#[repr(C)]` with explicit padding
//! fields (zeroed by user space, so hash keys compare byte-for-byte) and a
//! compile-time size assert, because the kernel sees raw bytes.

use core::{mem::size_of, net::IpAddr};

use crate::{
    counters::ForwardWay,
    limits::{
        CONNTRACK_BUCKET_GROUP, CONNTRACK_WAYS, CONNTRACK_WAYS_PER_LINE, NO_SERVICE,
        SERVICE_INDEX_WAYS,
    },
};

/// Address family tag for IPv4 in keys and values (not the libc `AF_*` value).
pub const FAMILY_V4: u8 = 4;
/// Address family tag for IPv6.
pub const FAMILY_V6: u8 = 6;

/// Service flag: forward in an IPIP/IP6IP6 tunnel (`ipip`) instead of
/// rewriting MACs (`dsr-l2`).
pub const SERVICE_F_IPIP: u32 = 1 << 0;
/// Service flag: hash the client address only (client affinity), not the 5-tuple.
pub const SERVICE_F_AFFINITY: u32 = 1 << 1;
/// Service flag: answer ICMP echo requests to the service's VIP.
pub const SERVICE_F_ECHO: u32 = 1 << 2;
/// Service flag: forward in a GUE tunnel (`gue`): the packet in UDP, right
/// after the UDP header (GUE variant 1), instead of rewriting MACs. Never
/// set with [`SERVICE_F_IPIP`].
pub const SERVICE_F_GUE: u32 = 1 << 3;
/// Either tunnel.
pub const SERVICE_F_TUNNEL: u32 = SERVICE_F_IPIP | SERVICE_F_GUE;
/// Service flag: the service has a deny list (`LB_ACL` entries of
/// [`ACL_DENY`]): new flows from a source in it are dropped.
pub const SERVICE_F_DENY_LIST: u32 = 1 << 4;
/// Service flag: the service has an allow list (`LB_ACL` entries of
/// [`ACL_ALLOW`]): new flows from a source in no prefix of `LB_ACL` are
/// dropped.
pub const SERVICE_F_ALLOW_LIST: u32 = 1 << 5;
/// Either source list: a service with neither pays one test for both.
pub const SERVICE_F_SOURCE_LISTS: u32 = SERVICE_F_DENY_LIST | SERVICE_F_ALLOW_LIST;
/// Service flag: the service limits the new flows of each source prefix
/// (its [`SourceLimit`] in `LB_SOURCE_LIMITS`).
pub const SERVICE_F_SOURCE_LIMIT: u32 = 1 << 6;
/// `LB_ACL` value: the prefix is in the service's deny list.
pub const ACL_DENY: u32 = 1;
/// `LB_ACL` value: the prefix is in the service's allow list (and in no
/// deny prefix of the service: user space leaves those out, so that the
/// longest match gives deny-wins).
pub const ACL_ALLOW: u32 = 2;

/// What `LB_VIPS` holds for an address: the services on it, plus this
/// unit for each of them that answers echo ([`SERVICE_F_ECHO`]). A VIP
/// has fewer services than the unit (configuration validation keeps
/// `max_services` below it).
pub const VIP_ECHO_UNIT: u32 = 1 << 16;

/// Whether a VIP whose `LB_VIPS` value is `v` answers echo.
#[inline(always)]
pub fn vip_answers_echo(v: u32) -> bool {
    v >= VIP_ECHO_UNIT
}

/// Backend flag: established flows may use this backend. Cleared when the
/// backend is down, in maintenance or removed, which turns its
/// connection-table entries into misses. A draining backend keeps it (its
/// flows stay) but is absent from the Maglev table (no new flows).
pub const BACKEND_F_UP: u8 = 1 << 0;

/// Where [`BackendValue::flags`] keeps the backend's egress port (the bits
/// above [`BACKEND_F_UP`]): the [`Interface::port`] of the attached
/// interface its route leaves by, or 0 for the interface each packet
/// arrived on. In `flags`, so the seal covers it with the MAC it goes with.
pub const BACKEND_PORT_SHIFT: u8 = 1;

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
    /// Dense id: index of the service's counters and slot.
    pub id: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// First slot of the service's Maglev table in `LB_RINGS`: slot `s` is
    /// at [`ring_position`]`(ring_offset, s)`. User space rewrites slots in
    /// place, and moves the table only when its size changes.
    pub ring_offset: u32,
    /// Slots of the table (a prime); 0 when it has none, and every packet
    /// is dropped as having no backend.
    pub ring_size: u32,
    /// Seconds a flow of this service may stay idle before its
    /// connection-table entry lapses; 0 takes the protocol's default from
    /// [`ConntrackSettings`].
    pub idle_timeout: u32,
}

/// An element of `LB_SERVICE_INDEX`: ids of services whose key hashes
/// here ([`crate::hash::service_index`]), [`NO_SERVICE`] where none. A
/// new flow finds its service through the index with two array reads (this
/// element, then the id's [`ServiceSlot`], whose key must match the flow)
/// instead of a hash lookup. User space rewrites elements in place, so an
/// id read may be stale: the slot's key decides, and a flow whose service
/// the index does not name takes the services hash.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ServiceIndexEntry {
    /// Service ids.
    pub ids: [u32; SERVICE_INDEX_WAYS],
}

impl Default for ServiceIndexEntry {
    fn default() -> Self {
        ServiceIndexEntry {
            ids: [NO_SERVICE; SERVICE_INDEX_WAYS],
        }
    }
}

/// A live service by id: its key with its value. Element of
/// `LB_SERVICE_SLOTS`, indexed by [`ServiceValue::id`]; all zero (family 0,
/// which no packet has) when no service has the id.
///
/// A packet of an established flow finds its service here, from the id its
/// connection-table entry keeps, and a new flow from the id the service
/// index gives ([`ServiceIndexEntry`]), with an array read instead of a
/// hash lookup; the key must match the flow's destination, so an entry
/// outliving its service (or a reused id, or a stale index) is never taken
/// for another service.
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

/// Bits of a [`SourceKey`] before its address: the family.
pub const SOURCE_FAMILY_BITS: u32 = 8;

/// Key data of `LB_DECAP_SOURCES`, the LPM trie of prefixes whose tunnel
/// packets the decapsulator accepts. The family comes first so that one
/// trie holds both families: a prefix of `n` bits is stored with a prefix
/// length of [`SOURCE_FAMILY_BITS`]` + n`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Network order; an IPv4 address fills the first 4 bytes.
    pub addr: Addr,
}

impl SourceKey {
    /// The key data for `ip`.
    pub fn new(ip: IpAddr) -> Self {
        let (addr, family) = addr_bytes(ip);
        SourceKey { family, addr }
    }
}

/// A backend of one service. Value of `LB_BACKENDS`, indexed by backend id.
///
/// User space rewrites a backend in place (a new MAC, up or down, the id
/// given to another backend), and the kernel copies the value in without
/// a lock, so a packet could read it half old, half new: a frame to a MAC
/// that names no host, or a new holder's MAC under the old holder's
/// generation. The seal over the rest tells a whole value from such a
/// mix: user space writes [`BackendValue::sealed`], and the data plane
/// uses a copy only if [`BackendValue::is_whole`].
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    /// Backend address (the tunnel destination for `ipip`), network order.
    pub addr: Addr,
    /// MAC of the next hop toward the backend (the backend itself when on-link).
    pub mac: [u8; 6],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// `BACKEND_F_*` bits, and the egress port ([`BACKEND_PORT_SHIFT`]).
    pub flags: u8,
    /// Bumped whenever the id is given to another backend, so connection-table
    /// entries made for the previous holder become misses.
    pub generation: u32,
    /// [`BackendValue::seal_of`] the fields above, as written.
    pub seal: u32,
}

impl BackendValue {
    /// The port of the interface frames to this backend leave by (0: the
    /// one each packet arrived on).
    #[inline(always)]
    pub fn port(&self) -> u8 {
        self.flags >> BACKEND_PORT_SHIFT
    }

    /// The value with egress port `port` (at most
    /// [`crate::limits::MAX_PORTS`]).
    pub fn with_port(self, port: u8) -> Self {
        let keep = (1 << BACKEND_PORT_SHIFT) - 1;
        BackendValue {
            flags: (self.flags & keep) | (port << BACKEND_PORT_SHIFT),
            ..self
        }
    }

    /// The value with its seal set: what user space writes.
    pub fn sealed(self) -> Self {
        BackendValue {
            seal: Self::seal_of(&self),
            ..self
        }
    }

    /// Whether this copy was read whole: its fields are the ones sealed
    /// together (a never-written, all-zero value is not).
    #[inline(always)]
    pub fn is_whole(&self) -> bool {
        self.seal == Self::seal_of(self)
    }

    /// The seal of `v`'s fields: its first 28 bytes as four little-endian
    /// words, each multiplied by its own odd constant, XORed, the upper 32
    /// bits. A mix of two values differs from the one its seal came with in
    /// some word, which changes that word's product (an odd multiplier is a
    /// bijection) and so, but for a chance in 2^32, the seal. The four
    /// products are independent, so the CPU runs them side by side: the
    /// seal's earlier form, a chain of the bucket hash's folds, held an
    /// eighth of an established packet's samples in the program.
    #[inline(always)]
    fn seal_of(v: &BackendValue) -> u32 {
        // SAFETY: 32 bytes, 8-aligned, and any bits are a valid [u64; 4].
        let w = unsafe { core::mem::transmute::<BackendValue, [u64; 4]>(*v) };
        // The last word's bytes 4..8 are the seal itself.
        let generation = u64::from_le(w[3]) & u64::from(u32::MAX);
        let h = (u64::from_le(w[0]) ^ BACKEND_SEAL_SEED).wrapping_mul(BACKEND_SEAL_MULTIPLIERS[0])
            ^ u64::from_le(w[1]).wrapping_mul(BACKEND_SEAL_MULTIPLIERS[1])
            ^ u64::from_le(w[2]).wrapping_mul(BACKEND_SEAL_MULTIPLIERS[2])
            ^ generation.wrapping_mul(BACKEND_SEAL_MULTIPLIERS[3]);
        (h >> 32) as u32
    }
}

/// Seed of [`BackendValue`]'s seal (arbitrary): an all-zero value, never
/// written, has no zero seal.
const BACKEND_SEAL_SEED: u64 = 0x6a09_e667_f3bc_c909;
/// The seal's multiplier of each word (odd).
const BACKEND_SEAL_MULTIPLIERS: [u64; 4] = {
    use crate::hash::{BUCKET_FINISH, WORD_MULTIPLIERS as M};
    [M[0], M[2], M[3], BUCKET_FINISH]
};

/// A flow as the client sent it. Key of [`FlowEntry`] and input of the
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
    /// Whether `self` and `other` are the same flow, compared as five
    /// 64-bit words (a 40-byte `==` may become a `memcmp` call, which BPF
    /// does not have).
    #[inline(always)]
    pub fn same_flow(&self, other: &FlowKey) -> bool {
        let (a, b) = (self.word(0) ^ other.word(0), self.word(1) ^ other.word(1));
        let (c, d) = (self.word(2) ^ other.word(2), self.word(3) ^ other.word(3));
        a | b | c | d | (self.word(4) ^ other.word(4)) == 0
    }

    /// The `i`th 64-bit word of the key (`i < 5`).
    #[inline(always)]
    pub(crate) fn word(&self, i: usize) -> u64 {
        debug_assert!(i < 5);
        // SAFETY: the key is 40 bytes aligned to 8 with explicit padding (see
        // the asserts), so each of its five words is initialised and aligned.
        unsafe { (self as *const FlowKey).cast::<u64>().add(i).read() }
    }

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

/// Where a flow went: a [`FlowEntry`]'s value, taken apart.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// Backend id.
    pub backend: u32,
    /// The backend's [`BackendValue::generation`] when the flow was pinned
    /// (its [`FLOW_GENERATION_MASK`] bits, read from an entry).
    pub generation: u32,
    /// The flow's last packet, as [`ConntrackSettings::now`] said then
    /// (its [`FLOW_SEEN_MASK`] bits, read from an entry).
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
        // In the entry's bits, as `last_seen` is kept.
        timeout != 0 && now.wrapping_sub(self.last_seen) & FLOW_SEEN_MASK > timeout
    }
}

/// One connection-table entry: an element of `LB_CONNTRACK`, an array of
/// buckets of [`CONNTRACK_WAYS`] entries ([`flow_buckets`]), 32 bytes. It
/// holds the client's side of the flow and the service's id; the VIP,
/// protocol and family are the service's ([`FlowEntry::key`]), which is
/// what lets an entry fit half a cache line: a table of the same entries
/// spans half the pages, which new flows and flows out of cache pay for
/// (`bench/levers.md`). An entry whose `service` is 0 is free. Any CPU may
/// rewrite an entry while another reads it, and user space clears entries
/// in place, so each entry carries a seal over its flow's bucket hash (of
/// the whole 5-tuple) and the fields that pick the backend: a torn read, or
/// the entry of another flow from the same client address and port, fails
/// [`FlowEntry::sealed_value`].
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// Client address, network order.
    pub src: Addr,
    /// Client port, network order.
    pub sport: u16,
    /// The flow's service id + 1; 0: a free entry.
    pub service: u16,
    /// Backend id.
    pub backend: u16,
    /// The low bits ([`FLOW_GENERATION_MASK`]) of the backend's
    /// [`BackendValue::generation`] when the flow was pinned.
    pub generation: u16,
    /// [`FlowEntry::seal`] of the flow and the three fields before.
    pub seal: u32,
    /// The flow's last packet ([`FLOW_SEEN_MASK`] bits of
    /// [`ConntrackSettings::now`]), and [`FLOW_SEEN_CLOSED`] once a TCP FIN
    /// or RST was seen. Updated in place, outside the seal: a torn update
    /// only ages the entry wrongly.
    pub seen: u32,
}

/// [`FlowEntry::seen`]'s flag for a closed TCP connection.
pub const FLOW_SEEN_CLOSED: u32 = 1 << 31;
/// [`FlowEntry::seen`]'s bits of the last-seen second: 68 years of uptime.
pub const FLOW_SEEN_MASK: u32 = !FLOW_SEEN_CLOSED;
/// The bits of a backend's generation an entry keeps: an entry is taken for
/// its backend's after 65,536 reuses of the backend's id while it stands.
pub const FLOW_GENERATION_MASK: u32 = 0xffff;
/// Service ids an entry can name (it stores the id + 1 in 16 bits).
pub const MAX_FLOW_SERVICE_IDS: u32 = 0xffff;
/// Backend ids an entry can name (16 bits).
pub const MAX_FLOW_BACKEND_IDS: u32 = 0x1_0000;

impl FlowEntry {
    /// The entry pinning `key`, whose [`bucket_hash`](crate::hash::bucket_hash)
    /// is `hash`, to `value` (its service and backend ids below
    /// [`MAX_FLOW_SERVICE_IDS`] and [`MAX_FLOW_BACKEND_IDS`], which the
    /// capacities' validation ensures).
    #[inline(always)]
    pub fn new(key: &FlowKey, value: &FlowValue, hash: u32) -> Self {
        FlowEntry {
            src: key.src,
            sport: key.sport,
            service: value.service.wrapping_add(1) as u16,
            backend: value.backend as u16,
            generation: (value.generation & FLOW_GENERATION_MASK) as u16,
            seal: Self::seal(hash, value),
            seen: Self::seen_of(value.last_seen, value.flags),
        }
    }

    /// [`FlowEntry::seen`] for a flow last seen at `last_seen` with
    /// `FLOW_F_*` `flags`.
    #[inline(always)]
    pub fn seen_of(last_seen: u32, flags: u32) -> u32 {
        let closed = if flags & FLOW_F_CLOSED != 0 {
            FLOW_SEEN_CLOSED
        } else {
            0
        };
        (last_seen & FLOW_SEEN_MASK) | closed
    }

    /// The seal of an entry of a flow hashing to `hash` with `value`, the
    /// generation as the entry keeps it ([`FlowEntry::seal_fields`]).
    #[inline(always)]
    pub fn seal(hash: u32, value: &FlowValue) -> u32 {
        Self::seal_fields(
            hash,
            value.backend,
            value.generation & FLOW_GENERATION_MASK,
            value.service,
        )
    }

    /// The seal over a flow's bucket hash and the fields that pick its
    /// backend, which the 64-byte entries of earlier versions also used
    /// (over the whole generation). Each field is multiplied by its own odd
    /// constant, so fields from two different entries do not cancel out as
    /// small ids would under XOR.
    #[inline(always)]
    pub fn seal_fields(hash: u32, backend: u32, generation: u32, service: u32) -> u32 {
        hash ^ backend.wrapping_mul(0x9e37_79b1)
            ^ generation.wrapping_mul(0x85eb_ca6b)
            ^ service.wrapping_mul(0xc2b2_ae35)
    }

    /// Whether the entry is from `flow`'s client address and port: then it
    /// is `flow`'s if [`FlowEntry::sealed_value`] says so.
    #[inline(always)]
    pub fn same_client(&self, flow: &FlowKey) -> bool {
        let w = self.words();
        // The port is the low half of both third words.
        let port = (w[2] ^ flow.word(4)) & 0xffff;
        (w[0] ^ flow.word(0)) | (w[1] ^ flow.word(1)) | port == 0
    }

    /// The entry's value if it was read whole and is the entry of the flow
    /// whose bucket hash is `hash` (the client's side compared first).
    #[inline(always)]
    pub fn sealed_value(&self, hash: u32) -> Option<FlowValue> {
        let value = self.value();
        (Self::seal(hash, &value) == self.seal).then_some(value)
    }

    /// The entry's value, unsealed: the ids and the time taken apart.
    #[inline(always)]
    pub fn value(&self) -> FlowValue {
        // From the two last words, which the data plane then reads whole.
        let w = self.words();
        let seen = (w[3] >> 32) as u32;
        FlowValue {
            backend: (w[2] >> 32) as u32 & 0xffff,
            generation: (w[2] >> 48) as u32,
            last_seen: seen & FLOW_SEEN_MASK,
            flags: if seen & FLOW_SEEN_CLOSED != 0 {
                FLOW_F_CLOSED
            } else {
                0
            },
            service: ((w[2] >> 16) as u32 & 0xffff).wrapping_sub(1),
        }
    }

    /// Whether the entry holds no flow (never written, or cleared).
    #[inline(always)]
    pub fn is_free(&self) -> bool {
        self.service == 0
    }

    /// The flow of an entry in use, whose service has `service` as its key.
    pub fn key(&self, service: &ServiceKey) -> FlowKey {
        FlowKey {
            src: self.src,
            dst: service.addr,
            sport: self.sport,
            dport: service.port,
            proto: service.proto,
            family: service.family,
            _pad: [0; 2],
        }
    }

    /// Whether an entry read whole (a copy), of a service whose key is
    /// `service`, is sealed: written whole, by a version that hashes flows
    /// as this one does. User space only; the data plane has the hash
    /// already.
    pub fn is_readable(&self, service: &ServiceKey) -> bool {
        self.sealed_value(crate::hash::bucket_hash(&self.key(service)))
            .is_some()
    }

    /// The entry as four 64-bit words, the shape the data plane compares
    /// and takes apart.
    #[inline(always)]
    fn words(&self) -> [u64; 4] {
        // SAFETY: 32 bytes aligned to 8 with no padding (see the asserts).
        unsafe { core::mem::transmute::<FlowEntry, [u64; 4]>(*self) }
    }
}

/// The indices in `LB_CONNTRACK` of the first entries of the two buckets a
/// flow whose 5-tuple hashes to `hash` may live in, in a table of `buckets`
/// buckets (a multiple of [`CONNTRACK_BUCKET_GROUP`]). A new entry goes to
/// the less loaded of the two: with two choices, a bucket fills long after
/// it would with one. Both buckets are in one group of 2 KiB, one page, so
/// a lookup in a table far larger than the TLB's reach costs one page
/// walk, not two. The first bucket is the hash scaled (`(hash *
/// buckets) >> 32`, no division); the second is another of its group, from
/// the hash multiplied by an odd constant.
#[inline(always)]
pub fn flow_buckets(hash: u32, buckets: u32) -> [u32; 2] {
    const GROUP: u32 = CONNTRACK_BUCKET_GROUP;
    let first = ((u64::from(hash) * u64::from(buckets)) >> 32) as u32;
    // 1..GROUP: never the first bucket itself.
    let step =
        1 + (((u64::from(hash.wrapping_mul(0x9e37_79b1)) * u64::from(GROUP - 1)) >> 32) as u32);
    let second = (first & !(GROUP - 1)) | ((first + step) & (GROUP - 1));
    [first * CONNTRACK_WAYS, second * CONNTRACK_WAYS]
}

/// Data-plane settings. Index 0 of `LB_SETTINGS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// The operator's cap on the largest IP packet sent toward backends
    /// (the `mtu` setting); 0: none, the egress interface's own MTU
    /// ([`Interface::mtu`]) alone. Encapsulation beyond the smaller of the
    /// two drops the packet (counted as `drop_too_big`).
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
    /// UDP destination port of `gue` packets, network order.
    pub gue_port: u16,
    /// Explicit padding, zero.
    pub _pad: [u8; 2],
}

/// An interface the load balancer is attached to. Value of `LB_INTERFACES`
/// at [`interface_slot`] of its index; user space writes it when it
/// attaches and again whenever the interface's MAC or MTU changes.
#[repr(C, align(8))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Interface {
    /// Its index (0, which no interface has, marks a free slot).
    pub ifindex: u32,
    /// Its MTU: the largest IP packet it sends.
    pub mtu: u32,
    /// Its MAC. A frame sent to any other is not the load balancer's: it
    /// passes untouched. A forwarded frame leaves from this MAC.
    pub mac: [u8; 6],
    /// Its port, 1 to [`crate::limits::MAX_PORTS`]: its key in `LB_EGRESS`,
    /// the device map frames redirected to it go through, and what a
    /// backend behind it names ([`BackendValue::port`]).
    pub port: u8,
    /// Explicit padding, zero.
    pub _pad: u8,
}

impl Interface {
    /// Whether `mac` is this interface's, compared as a 4- and a 2-byte word.
    #[inline(always)]
    pub fn owns(&self, mac: &[u8; 6]) -> bool {
        let [a0, a1, a2, a3, a4, a5] = self.mac;
        let [b0, b1, b2, b3, b4, b5] = *mac;
        u32::from_ne_bytes([a0, a1, a2, a3]) == u32::from_ne_bytes([b0, b1, b2, b3])
            && u16::from_ne_bytes([a4, a5]) == u16::from_ne_bytes([b4, b5])
    }
}

/// A CPU's ICMP messages of one kind in the current second of the data
/// plane's clock. An entry of `LB_ICMP_BUDGET`, by [`IcmpKind`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct IcmpBudget {
    /// The second (`ConntrackSettings::now`) `sent` counts in.
    pub window: u32,
    /// Messages sent in it.
    pub sent: u32,
}

/// The ICMP messages the data plane sends, each with a budget of its own;
/// the index into `LB_ICMP_BUDGET`.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// "Fragmentation needed" / "packet too big".
    TooBig = 0,
    /// Echo replies.
    Echo = 1,
}

impl IcmpKind {
    /// Number of kinds (the `LB_ICMP_BUDGET` array size).
    pub const COUNT: u32 = 2;

    /// Messages of this kind each CPU may send per second.
    #[inline(always)]
    pub fn per_cpu(self) -> u32 {
        match self {
            IcmpKind::TooBig => crate::limits::ICMP_ERRORS_PER_CPU,
            IcmpKind::Echo => crate::limits::ECHO_REPLIES_PER_CPU,
        }
    }
}

/// The slot of `LB_INTERFACES` an interface with index `ifindex` lives in.
#[inline(always)]
pub const fn interface_slot(ifindex: u32) -> u32 {
    ifindex & (crate::limits::INTERFACE_SLOTS - 1)
}

impl Settings {
    /// The largest IP packet to send out of `iface`: its MTU, or the
    /// operator's cap where that is lower.
    #[inline(always)]
    pub fn mtu_of(&self, iface: &Interface) -> u32 {
        if self.mtu != 0 && self.mtu < iface.mtu {
            self.mtu
        } else {
            iface.mtu
        }
    }
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
    /// by user space every second. One load on the packet path
    /// instead of a clock helper call; while nothing writes it, nothing
    /// lapses.
    pub now: u32,
    /// Buckets of `LB_CONNTRACK` (its entries / [`CONNTRACK_WAYS`]), which
    /// user space writes when it loads the table. 0: no connection table.
    pub buckets: u32,
}

/// The data plane's singletons as one global variable of the program (its
/// section [`crate::maps::GLOBALS`]), which the program reads at a fixed
/// address instead of through a map lookup. User space writes it whole.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Globals {
    /// The connection-table policy (also kept in `LB_CONNTRACK_SETTINGS`).
    pub conntrack: ConntrackSettings,
    /// The settings (also kept in `LB_SETTINGS`).
    pub settings: Settings,
}

impl Globals {
    /// All zero: no connection table, no settings (the program's initial
    /// value; `Default` is not `const`).
    // SAFETY: plain integers and byte arrays; zero is valid for each.
    pub const ZERO: Globals = unsafe { core::mem::zeroed() };
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

/// Bits of an [`AclKey`] before its address: the service id, matched whole.
pub const ACL_SERVICE_BITS: u32 = 32;

/// Key data of `LB_ACL`, the LPM trie of the services' source prefixes.
/// The service id comes first, then the source as the decapsulator keys
/// it, so one trie holds every service's lists: a
/// prefix of `n` bits is stored with a prefix length of
/// [`ACL_SERVICE_BITS`]` + `[`SOURCE_FAMILY_BITS`]` + n`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct AclKey {
    /// The service id, big-endian (bytes, so the key has no padding).
    pub service: [u8; 4],
    /// The source.
    pub source: SourceKey,
}

impl AclKey {
    /// The key's prefix length for a prefix of `bits` bits.
    pub const fn prefix_len(bits: u32) -> u32 {
        ACL_SERVICE_BITS + SOURCE_FAMILY_BITS + bits
    }
}

/// Per-service drops by source (per CPU). Value of `LB_SOURCE_DROPS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceDrops {
    /// Packets from a source in the deny list.
    pub denied: u64,
    /// Packets from a source outside the allow list.
    pub not_allowed: u64,
    /// New flows from a source prefix over the service's [`SourceLimit`].
    pub limited: u64,
}

/// Nanoseconds in a second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// A service's limit on the new flows of each source prefix: a generic
/// cell rate algorithm (GCRA), which keeps one time per source, the
/// earliest its next new flow is due. Value of `LB_SOURCE_LIMITS`, indexed
/// by service id, read only when the service has
/// [`SERVICE_F_SOURCE_LIMIT`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceLimit {
    /// Nanoseconds one new flow costs: a second over the rate.
    pub interval_ns: u64,
    /// How far a source's due time may run ahead of the clock and still
    /// be admitted: `burst - 1` intervals.
    pub tolerance_ns: u64,
    /// The mask that takes a source address to its prefix (network order).
    pub mask: Addr,
}

impl SourceLimit {
    /// `rate` new flows a second (at least 1) and bursts of `burst` (at
    /// least 1), per prefix of `prefix_len` bits of an address of `family`.
    pub fn new(rate: u32, burst: u32, family: u8, prefix_len: u8) -> Self {
        let interval_ns = NS_PER_SEC / u64::from(rate.max(1));
        let bits: u32 = if family == FAMILY_V4 { 32 } else { 128 };
        let len = u32::from(prefix_len).min(bits);
        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
        let burst_ns = interval_ns * u64::from(burst.max(1) - 1);
        let tick_ns = crate::limits::COARSE_CLOCK_TICK_NS.saturating_sub(interval_ns);
        SourceLimit {
            interval_ns,
            tolerance_ns: burst_ns.max(tick_ns),
            mask: mask.to_be_bytes(),
        }
    }

    /// The new flows a fresh source may open at once: the burst asked
    /// for, or a tick's worth of the rate if that is more
    /// ([`COARSE_CLOCK_TICK_NS`](crate::limits::COARSE_CLOCK_TICK_NS)).
    pub fn burst(&self) -> u64 {
        1 + self.tolerance_ns / self.interval_ns
    }

    /// `src`'s prefix under this limit.
    #[inline(always)]
    pub fn prefix_of(&self, src: &Addr) -> Addr {
        // SAFETY: [u8; 16] and [u32; 4] have the same size and any bits
        // are valid for both; AND is bytewise, so the order does not matter.
        let (s, m) = unsafe {
            (
                core::mem::transmute::<Addr, [u32; 4]>(*src),
                core::mem::transmute::<Addr, [u32; 4]>(self.mask),
            )
        };
        let masked = [s[0] & m[0], s[1] & m[1], s[2] & m[2], s[3] & m[3]];
        // SAFETY: as above.
        unsafe { core::mem::transmute::<[u32; 4], Addr>(masked) }
    }

    /// Whether a new flow at `now_ns` (`CLOCK_MONOTONIC`) from a source
    /// whose next flow is due at `due_ns` (0: never seen) is admitted, and if so the source's next
    /// due time. A refused flow leaves the due time as it was.
    ///
    /// This limit never sets a due time further ahead than its burst and
    /// one interval. One that is was set under a stricter limit since
    /// changed (or by a removed service whose id is reused): the flow is
    /// admitted and the source left as having just spent its burst under
    /// this limit, not owing the old one's debt (an hour's, after a rate of
    /// 1 with a burst of 3,600). Refusing it instead would leave the old
    /// due time in place, since a refusal writes nothing.
    #[inline(always)]
    pub fn admit(&self, due_ns: u64, now_ns: u64) -> Option<u64> {
        let due = if due_ns > now_ns { due_ns } else { now_ns };
        let ahead = due - now_ns;
        if ahead > self.tolerance_ns + self.interval_ns {
            Some(now_ns + self.tolerance_ns + self.interval_ns)
        } else if ahead > self.tolerance_ns {
            None
        } else {
            Some(due + self.interval_ns)
        }
    }
}

/// Each CPU's reading of the kernel's coarse clock and the jiffy it was
/// read in, which the data plane keeps so that it calls the clock's helper
/// once a tick (docs/dataplane.md). Value of `LB_COARSE_CLOCK` (per CPU,
/// one entry).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct CoarseClock {
    /// The kernel's `jiffies` when `ns` was read; 0: never read (jiffies
    /// start far from 0).
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns` then.
    pub ns: u64,
}

/// One source prefix's due time under its service's [`SourceLimit`].
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceRate {
    /// The service's and prefix's [`crate::hash::source_tag`]; 0: an
    /// empty way. A tag, not the 20 bytes it stands for, so that four
    /// ways fit a cache line.
    pub tag: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// When the prefix's next new flow is due, in nanoseconds of
    /// `CLOCK_MONOTONIC` ([`SourceLimit::admit`]).
    pub due_ns: u64,
}

/// A bucket of each CPU's table of recent sources (`LB_SOURCE_RATES`, per
/// CPU, indexed by the low half of [`crate::hash::source_hash`] modulo
/// [`limits::SOURCE_RATE_BUCKETS`](crate::limits::SOURCE_RATE_BUCKETS)),
/// one cache line. A source not in its bucket takes the way due earliest:
/// a way due in the past is as good as empty (the source would be admitted
/// with a full burst either way), so a source loses its state early only
/// when every way holds a source being limited.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceRateBucket {
    /// The ways.
    pub ways: [SourceRate; crate::limits::SOURCE_RATE_WAYS],
}

impl SourceRateBucket {
    /// The way of the source tagged `tag` (a [`crate::hash::source_tag`]),
    /// and whether it holds that source already: its own way if it has
    /// one, else the way due earliest, which it is to take. The ways in a
    /// fixed order, so the data plane and its tests agree.
    #[inline(always)]
    pub fn way_for(&self, tag: u32) -> (usize, bool) {
        let mut earliest = 0;
        let mut i = 0;
        while i < crate::limits::SOURCE_RATE_WAYS {
            if self.ways[i].tag == tag {
                return (i, true);
            }
            if self.ways[i].due_ns < self.ways[earliest].due_ns {
                earliest = i;
            }
            i += 1;
        }
        (earliest, false)
    }
}

/// A service's entry in the source lists' directory of blocks
/// (`LB_SOURCE_SHAPES`, by service id), one word so that the data plane
/// reads it whole, twice: before the block's bucket and after it. A word
/// changed in between means user space rebuilt the service's blocks
/// meanwhile, and the trie answers instead.
///
/// A service's blocks are the first `len` bits of its sources, `len` per
/// family being the shortest prefix of that family in its lists: every
/// prefix then lies inside one block, so a block holding none is in no
/// list. The directory holds each block that holds a prefix: with the
/// list of a prefix of exactly `len` bits that is alone in it, else
/// [`BLOCK_MIXED`] (asked of the trie).
#[repr(C, align(4))]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceShape {
    /// Bumped at each rebuild: blocks of another generation never match.
    pub generation: u8,
    /// 1: the service's blocks are all in the directory; 0: ask the trie.
    pub ready: u8,
    /// Bits of a block: IPv4, then IPv6.
    pub len: [u8; 2],
}

impl SourceShape {
    /// The bits of a block of `family`.
    #[inline(always)]
    pub fn len_of(&self, family: u8) -> u8 {
        if family == FAMILY_V4 {
            self.len[0]
        } else {
            self.len[1]
        }
    }
}

/// A block of the directory: no list holds it whole (some prefix inside
/// it is longer), so the trie answers for its sources.
pub const BLOCK_MIXED: u8 = 3;
/// Bit position of a block's list ([`ACL_DENY`], [`ACL_ALLOW`] or
/// [`BLOCK_MIXED`]) in its [`SourceBlock::head`].
const BLOCK_LIST_SHIFT: u32 = 56;
/// The bits of a [`SourceBlock::head`] that name the block, all but its list.
const BLOCK_NAME_MASK: u64 = (1 << BLOCK_LIST_SHIFT) - 1;

/// One way of a bucket of the directory of blocks.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceBlock {
    /// [`SourceBlock::head_of`] the block's service, generation, family
    /// and length, with its list in the top byte; 0: an empty way.
    pub head: u64,
    /// The block: the address's first 8 bytes as a little-endian word
    /// (the BPF target's order), the bits past the block's length clear.
    pub block: u64,
}

impl SourceBlock {
    /// The head of a block of service `service_id` (plus one, so no head
    /// is 0), of its `generation`, of `family` and `len` bits, without its
    /// list.
    #[inline(always)]
    pub fn head_of(service_id: u32, generation: u8, family: u8, len: u8) -> u64 {
        u64::from(service_id.wrapping_add(1))
            | u64::from(generation) << 32
            | u64::from(family) << 40
            | u64::from(len) << 48
    }

    /// The way for block `block` under `head` ([`SourceBlock::head_of`])
    /// with `list`.
    #[inline(always)]
    pub fn new(head: u64, block: u64, list: u8) -> Self {
        SourceBlock {
            head: head | u64::from(list) << BLOCK_LIST_SHIFT,
            block,
        }
    }

    /// The block's list.
    #[inline(always)]
    pub fn list(&self) -> u8 {
        (self.head >> BLOCK_LIST_SHIFT) as u8
    }

    /// The service id this way holds a block of, if any.
    pub fn service(&self) -> Option<u32> {
        (self.head != 0).then(|| (self.head as u32).wrapping_sub(1))
    }

    /// The generation of this way's block.
    pub fn generation(&self) -> u8 {
        (self.head >> 32) as u8
    }

    /// The first `len` bits of `addr` (at most
    /// [`limits::SOURCE_BLOCK_MAX_BITS`](crate::limits::SOURCE_BLOCK_MAX_BITS)),
    /// as [`SourceBlock::block`] holds them.
    #[inline(always)]
    pub fn of(addr: &Addr, len: u8) -> u64 {
        let first = u64::from_le_bytes([
            addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
        ]);
        let len = u32::from(len.min(crate::limits::SOURCE_BLOCK_MAX_BITS));
        // The mask in network order, read as the address's word is.
        let mask = if len == 0 {
            0
        } else {
            (u64::MAX << (64 - len)).swap_bytes()
        };
        first & mask
    }
}

/// A bucket of the directory of blocks (`LB_SOURCE_BLOCKS`, indexed by
/// [`crate::hash::source_block_bucket`]), one cache line. User space
/// places a block in its bucket's first empty way, and a service whose
/// blocks do not all find one is answered by the trie.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceBlockBucket {
    /// The ways.
    pub ways: [SourceBlock; crate::limits::SOURCE_BLOCK_WAYS],
}

impl SourceBlockBucket {
    /// The list of `block` under `head` ([`SourceBlock::head_of`]), if this
    /// bucket holds it. The ways in a fixed order, so the data plane and
    /// its tests agree.
    #[inline(always)]
    pub fn find(&self, head: u64, block: u64) -> Option<u8> {
        let mut i = 0;
        while i < crate::limits::SOURCE_BLOCK_WAYS {
            let w = &self.ways[i];
            if w.head & BLOCK_NAME_MASK == head && w.block == block {
                return Some(w.list());
            }
            i += 1;
        }
        None
    }
}

/// A source prefix whose new flows were limited, in one slot of each CPU's
/// sample of them (`LB_LIMITED_SOURCES`, per CPU, indexed by
/// [`crate::hash::source_hash`] modulo
/// [`limits::LIMITED_SOURCE_SLOTS`](crate::limits::LIMITED_SOURCE_SLOTS)).
/// A slot keeps its source while the source goes on being limited; another
/// source takes it once it has been quiet for
/// [`limits::LIMITED_SOURCE_QUIET_SECS`](crate::limits::LIMITED_SOURCE_QUIET_SECS).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct LimitedSource {
    /// The source prefix.
    pub prefix: Addr,
    /// The service id plus one; 0: an empty slot.
    pub service: u32,
    /// The second of the data plane's clock of its last limited flow.
    pub last: u32,
    /// Its new flows limited since it took the slot.
    pub drops: u64,
}

impl LimitedSource {
    /// Whether this slot holds `prefix` of service `service_id`.
    #[inline(always)]
    pub fn holds(&self, service_id: u32, prefix: &Addr) -> bool {
        self.service == service_id + 1 && same_words(&self.prefix, prefix)
    }
}

/// Per-backend counters (per CPU). Value of `LB_BACKEND_STATS`: the one
/// counters update of a forwarded packet. A service's forwards are the sum
/// of its backends', and the global forward counters the sum of all
/// backends'; user space adds them up (see docs/dataplane.md).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Packets forwarded to the backend, by [`ForwardWay`].
    pub forwarded: [u64; ForwardWay::COUNT],
    /// Bytes forwarded, as received (before encapsulation).
    pub bytes: u64,
    /// Flows that took a Maglev lookup (connection-table miss or TCP SYN)
    /// and were forwarded to the backend.
    pub new_flows: u64,
}

impl BackendStats {
    /// Packets forwarded, every way.
    pub fn packets(&self) -> u64 {
        self.forwarded.iter().sum()
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &BackendStats) {
        for (a, b) in self.forwarded.iter_mut().zip(other.forwarded) {
            *a += b;
        }
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
    }

    /// The sum of `stats` (per-CPU values, or backends).
    pub fn total<'a>(stats: impl IntoIterator<Item = &'a BackendStats>) -> BackendStats {
        stats.into_iter().fold(BackendStats::default(), |mut a, s| {
            a.add(s);
            a
        })
    }
}

/// How lb's probes to one backend of an `ipip` or `gue` service are put in
/// its tunnel, as the data plane would put clients' packets. Value of
/// `LB_PROBE_TUNNELS`, by the probe's mark.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct ProbeTunnel {
    /// Outer source (the data plane's tunnel source), network order; an
    /// IPv4 address in the first 4 bytes.
    pub src: Addr,
    /// Outer destination: the backend.
    pub dst: Addr,
    /// [`FAMILY_V4`] or [`FAMILY_V6`], the outer and the inner header's.
    pub family: u8,
    /// Padding, zero.
    pub _pad: u8,
    /// UDP destination port of a `gue` tunnel, network order; 0 for `ipip`.
    pub gue_port: u16,
}

/// One element of `LB_RINGS`: [`crate::limits::RING_CHUNK_SLOTS`]
/// consecutive table slots, each a backend id or [`crate::limits::NO_BACKEND`].
pub type RingChunk = [u32; crate::limits::RING_CHUNK_SLOTS as usize];

/// Where slot `slot` of the table starting at slot `offset` is in
/// `LB_RINGS`: the element, and the slot within it. The elements are
/// contiguous, so user space, which maps the array, sees slot
/// `offset + slot` of one flat `[u32]`.
#[inline(always)]
pub const fn ring_position(offset: u32, slot: u32) -> (u32, usize) {
    let index = offset + slot;
    (
        index / crate::limits::RING_CHUNK_SLOTS,
        (index % crate::limits::RING_CHUNK_SLOTS) as usize,
    )
}

const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<ServiceValue>() == 20);
const _: () = assert!(size_of::<AddrKey>() == 20);
const _: () = assert!(size_of::<SourceKey>() == 17);
const _: () = assert!(size_of::<BackendValue>() == 32 && align_of::<BackendValue>() == 8);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(align_of::<FlowKey>() == 8 && align_of::<ServiceKey>() == 4);
const _: () = assert!(align_of::<AddrKey>() == 4);
const _: () = assert!(size_of::<FlowValue>() == 20);
// Two entries a cache line.
const _: () = assert!(size_of::<FlowEntry>() == 32 && align_of::<FlowEntry>() == 8);
// A bucket is two lines; the lookup requests its second (`conntrack_lookup`).
const _: () = assert!(
    size_of::<FlowEntry>() as u32 * CONNTRACK_WAYS_PER_LINE == 64
        && CONNTRACK_WAYS == 2 * CONNTRACK_WAYS_PER_LINE
);
const _: () = assert!(size_of::<ServiceSlot>() == 40);
const _: () = assert!(size_of::<ServiceIndexEntry>() == 8);
const _: () = assert!(size_of::<RingChunk>() == 8);
const _: () = assert!(size_of::<Settings>() == 36);
const _: () = assert!(size_of::<Interface>() == 16);
const _: () = assert!(size_of::<IcmpBudget>() == 8);
const _: () = assert!(crate::limits::INTERFACE_SLOTS.is_power_of_two());
// The port fits in the flag bits above BACKEND_F_UP.
const _: () = assert!(crate::limits::MAX_PORTS <= (u8::MAX >> BACKEND_PORT_SHIFT) as u32);
const _: () = assert!(BACKEND_F_UP < 1 << BACKEND_PORT_SHIFT);
const _: () = assert!(size_of::<ConntrackSettings>() == 24);
const _: () = assert!(size_of::<Globals>() == 60);
const _: () = assert!(size_of::<ConntrackStats>() == 32);
const _: () = assert!(size_of::<BackendStats>() == 56);
const _: () = assert!(size_of::<ProbeTunnel>() == 36);
const _: () = assert!(size_of::<AclKey>() == 21 && align_of::<AclKey>() == 1);
const _: () = assert!(size_of::<SourceDrops>() == 24);
const _: () = assert!(size_of::<SourceLimit>() == 32);
const _: () = assert!(size_of::<SourceRate>() == 16);
// One cache line a bucket; masks index the ways and buckets.
const _: () = assert!(size_of::<SourceRateBucket>() == 64);
const _: () = assert!(crate::limits::SOURCE_RATE_WAYS.is_power_of_two());
const _: () = assert!(crate::limits::SOURCE_RATE_BUCKETS.is_power_of_two());
const _: () = assert!(size_of::<LimitedSource>() == 32);
const _: () = assert!(size_of::<CoarseClock>() == 16);
const _: () = assert!(size_of::<SourceShape>() == 4);
const _: () = assert!(size_of::<SourceBlock>() == 16);
// One cache line a bucket; masks index the buckets.
const _: () = assert!(size_of::<SourceBlockBucket>() == 64);
const _: () = assert!(crate::limits::SOURCE_BLOCK_BUCKETS.is_power_of_two());
// A block's list fits the head's top byte, above its name.
const _: () = assert!(ACL_DENY < 256 && ACL_ALLOW < 256 && BLOCK_MIXED as u32 > ACL_ALLOW);

#[cfg(feature = "user")]
mod pod {
    //! SAFETY (all impls): `#[repr(C)]`, only integer and byte-array fields,
    //! no implicit padding (the size asserts above pin the layout).
    use super::*;
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for ServiceSlot {}
    unsafe impl aya::Pod for ServiceIndexEntry {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Interface {}
    unsafe impl aya::Pod for IcmpBudget {}
    unsafe impl aya::Pod for ConntrackSettings {}
    unsafe impl aya::Pod for Globals {}
    unsafe impl aya::Pod for ConntrackStats {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for ProbeTunnel {}
    unsafe impl aya::Pod for AclKey {}
    unsafe impl aya::Pod for SourceDrops {}
    unsafe impl aya::Pod for SourceLimit {}
    unsafe impl aya::Pod for SourceRateBucket {}
    unsafe impl aya::Pod for LimitedSource {}
    unsafe impl aya::Pod for SourceShape {}
    unsafe impl aya::Pod for SourceBlockBucket {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{CONNTRACK_BUCKET_GROUP, CONNTRACK_WAYS};

    /// Two backend values that differ in every byte but the family.
    fn two_backends() -> [BackendValue; 2] {
        let v = |b: u8, generation: u32| BackendValue {
            addr: [b; 16],
            mac: [b; 6],
            family: FAMILY_V6,
            flags: b,
            generation,
            seal: 0,
        };
        [v(0x11, 0x1111_1111).sealed(), v(0xee, 0xeeee_eeee).sealed()]
    }

    fn bytes(v: &BackendValue) -> [u8; 32] {
        // SAFETY: 32 bytes of plain integers.
        unsafe { core::mem::transmute(*v) }
    }

    fn value(b: [u8; 32]) -> BackendValue {
        // SAFETY: any bits are a valid BackendValue.
        unsafe { core::mem::transmute(b) }
    }

    #[test]
    fn a_source_finds_its_own_way_else_takes_the_way_due_earliest() {
        let way = |tag, due_ns| SourceRate {
            tag,
            _pad: 0,
            due_ns,
        };
        let mut b = SourceRateBucket::default();
        assert_eq!(b.way_for(7), (0, false), "an empty bucket: the first way");
        b.ways = [way(3, 50), way(5, 20), way(7, 90), way(9, 40)];
        for (i, w) in b.ways.iter().enumerate() {
            assert_eq!(b.way_for(w.tag), (i, true));
        }
        assert_eq!(b.way_for(11), (1, false), "the way due earliest");
        b.ways[3] = SourceRate::default();
        assert_eq!(b.way_for(11), (3, false), "an empty way is due earliest");
    }

    #[test]
    fn source_tags_are_never_empty_and_tell_services_and_prefixes_apart() {
        use crate::hash::{source_hash, source_tag};
        let a: Addr = [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut b = a;
        b[3] = 2;
        let hashes = [source_hash(1, &a), source_hash(1, &b), source_hash(2, &a)];
        for h in hashes {
            assert_ne!(source_tag(h), 0);
        }
        for (i, x) in hashes.iter().enumerate() {
            for y in &hashes[i + 1..] {
                assert_ne!(x >> 32, y >> 32, "tags");
                assert_ne!(*x as u32, *y as u32, "places");
            }
        }
    }

    #[test]
    fn the_port_rides_in_the_flags_beside_up_and_under_the_seal() {
        for v in two_backends() {
            for port in [0, 1, 2, crate::limits::MAX_PORTS as u8] {
                for up in [0, BACKEND_F_UP] {
                    let w = BackendValue { flags: up, ..v }.with_port(port);
                    assert_eq!(w.port(), port);
                    assert_eq!(w.flags & BACKEND_F_UP, up, "port {port}");
                    assert_eq!(w.with_port(0).flags, up);
                }
            }
            let moved = v.with_port(2);
            assert!(!moved.is_whole(), "a new port needs a new seal");
            assert!(moved.sealed().is_whole());
        }
    }

    #[test]
    fn a_sealed_backend_is_whole_and_any_changed_byte_is_not() {
        for v in two_backends() {
            assert!(v.is_whole());
            for i in 0..32 {
                let mut b = bytes(&v);
                b[i] ^= 0x01;
                assert!(!value(b).is_whole(), "byte {i} changed");
            }
        }
        assert!(
            !BackendValue::default().is_whole(),
            "a never-written slot is not whole"
        );
    }

    #[test]
    fn no_mix_of_two_backends_is_whole() {
        // Whatever order the kernel copies bytes in, a reader sees some
        // bytes of the new value and the rest of the old: every subset of
        // the four 8-byte words, and every cut within each word.
        let [a, b] = two_backends();
        let (a, b) = (bytes(&a), bytes(&b));
        for mask in 1..15u32 {
            let mut m = a;
            for w in 0..4 {
                if mask & (1 << w) != 0 {
                    m[w * 8..w * 8 + 8].copy_from_slice(&b[w * 8..w * 8 + 8]);
                }
            }
            assert!(!value(m).is_whole(), "words {mask:04b} new");
        }
        for cut in 1..32 {
            let mut m = a;
            m[cut..].copy_from_slice(&b[cut..]);
            assert!(!value(m).is_whole(), "new from byte {cut}");
            let mut m = b;
            m[cut..].copy_from_slice(&a[cut..]);
            assert!(!value(m).is_whole(), "old from byte {cut}");
        }
    }

    #[test]
    fn a_flows_two_buckets_are_distinct_whole_and_in_one_group() {
        let group_entries = CONNTRACK_BUCKET_GROUP * CONNTRACK_WAYS;
        for buckets in [16, 32, 4096, 65_536 * 16] {
            for i in 0..20_000u32 {
                let hash = i.wrapping_mul(0x2545_f491) ^ (i << 7);
                let [a, b] = flow_buckets(hash, buckets);
                assert!(a < buckets * CONNTRACK_WAYS && b < buckets * CONNTRACK_WAYS);
                assert_eq!((a % CONNTRACK_WAYS, b % CONNTRACK_WAYS), (0, 0));
                assert_ne!(a, b, "hash {hash:#x}: one bucket twice");
                assert_eq!(a / group_entries, b / group_entries, "hash {hash:#x}");
            }
        }
    }

    #[test]
    fn an_entry_gives_back_its_flow_and_value() {
        let flow = FlowKey {
            src: [0x20, 1, 0, 2, 0, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            dst: [0x20, 1, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            sport: 40_000u16.to_be(),
            dport: 443u16.to_be(),
            proto: 6,
            family: FAMILY_V6,
            _pad: [0; 2],
        };
        let value = FlowValue {
            backend: 0xfffe,
            generation: 0x1_2345,
            last_seen: 0x8000_0007,
            flags: FLOW_F_CLOSED,
            service: 0xfffe,
        };
        let hash = crate::hash::bucket_hash(&flow);
        let e = FlowEntry::new(&flow, &value, hash);
        assert!(!e.is_free() && e.same_client(&flow));
        let kept = FlowValue {
            generation: 0x2345,
            last_seen: 7,
            ..value
        };
        assert_eq!(e.sealed_value(hash), Some(kept));
        assert_eq!(e.key(&flow.service_key()), flow);
        assert!(e.is_readable(&flow.service_key()));
        // Another port of the same client, or another flow's hash.
        let other = FlowKey {
            sport: 40_001u16.to_be(),
            ..flow
        };
        assert!(!e.same_client(&other));
        assert_eq!(e.sealed_value(hash ^ 1), None);
        assert!(FlowEntry::default().is_free());
    }

    #[test]
    fn the_seal_changes_with_each_field_it_covers() {
        let value = FlowValue {
            backend: 1,
            generation: 2,
            last_seen: 3,
            flags: 0,
            service: 3,
        };
        let seal = FlowEntry::seal(7, &value);
        assert!(FlowEntry::seal(7, &value) == seal);
        assert!(FlowEntry::seal(8, &value) != seal, "another flow's hash");
        // Fields of another entry, alone or swapped: small ids that XOR
        // alone would cancel (1 ^ 2 == 2 ^ 1).
        for other in [
            FlowValue {
                backend: 2,
                ..value
            },
            FlowValue {
                generation: 3,
                ..value
            },
            FlowValue {
                service: 1,
                ..value
            },
            FlowValue {
                backend: 2,
                generation: 1,
                ..value
            },
        ] {
            assert!(FlowEntry::seal(7, &other) != seal, "{other:?}");
        }
        // Refreshed in place, outside the seal.
        let refreshed = FlowValue {
            last_seen: 99,
            flags: FLOW_F_CLOSED,
            ..value
        };
        assert!(FlowEntry::seal(7, &refreshed) == seal);
    }

    #[test]
    fn flows_compare_by_every_field() {
        let a = FlowKey {
            src: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [198, 18, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: 1000,
            dport: 80,
            proto: 6,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        assert!(a.same_flow(&a));
        let mut src = a.src;
        src[15] = 1;
        for b in [
            FlowKey { src, ..a },
            FlowKey { sport: 1001, ..a },
            FlowKey { dport: 81, ..a },
            FlowKey { proto: 17, ..a },
            FlowKey {
                family: FAMILY_V6,
                ..a
            },
        ] {
            assert!(!a.same_flow(&b), "{b:?}");
        }
    }

    /// A source limit admits its burst at once, at most `burst + rate × d`
    /// in any span of `d` seconds, and `rate` a second in the long run to a
    /// source that keeps trying, also on a clock that moves by ticks.
    #[test]
    fn a_source_limit_admits_its_burst_then_its_rate() {
        const SECONDS: usize = 12;
        for rate in [1, 3, 10, 1_000] {
            for burst in [1, 2, 5, 20] {
                let limit = SourceLimit::new(rate, burst, FAMILY_V4, 32);
                // All at one instant: the burst.
                let mut due = 0;
                let at_once = (0..50)
                    .filter(|_| {
                        limit
                            .admit(due, NS_PER_SEC)
                            .map(|next| due = next)
                            .is_some()
                    })
                    .count();
                assert_eq!(at_once as u64, limit.burst(), "{rate}/s {burst}: at once");
                let tick = crate::limits::COARSE_CLOCK_TICK_NS;
                assert_eq!(
                    limit.burst(),
                    u64::from(burst).max(tick / limit.interval_ns),
                    "{rate}/s {burst}: a tick's worth"
                );
                for (tries, tick) in [1, 2, 3, 7, 10, 11, 25, 40, 3_000]
                    .into_iter()
                    .flat_map(|t| [(t, 1), (t, 4_000_000)])
                {
                    // `tries` a second, evenly spread.
                    let mut due = 0;
                    let mut admitted = [0u64; SECONDS];
                    for (second, n) in admitted.iter_mut().enumerate() {
                        for k in 0..tries {
                            let now = (second as u64 + 1) * NS_PER_SEC + k * NS_PER_SEC / tries;
                            let now = now / tick * tick;
                            if let Some(next) = limit.admit(due, now) {
                                due = next;
                                *n += 1;
                            }
                        }
                    }
                    let (r, b) = (u64::from(rate), limit.burst());
                    for from in 0..SECONDS {
                        for to in from..SECONDS {
                            let n: u64 = admitted[from..=to].iter().sum();
                            let span = (to - from + 1) as u64;
                            assert!(
                                n <= b + r * span,
                                "{rate}/s {burst}, {tries}: {n} in {from}..={to}"
                            );
                        }
                    }
                    // Each admitted flow waits at most one gap between
                    // tries past its interval, and a tick more on a
                    // ticking clock.
                    if tries >= r {
                        let total: u64 = admitted.iter().sum();
                        let gap = NS_PER_SEC / tries + tick;
                        let pace = limit.interval_ns + gap;
                        assert!(
                            total * pace >= (SECONDS as u64 - 1) * NS_PER_SEC,
                            "{rate}/s {burst}, {tries}: {total}"
                        );
                    }
                }
            }
        }
    }

    /// On a clock that moves by 4 ms ticks, a limit of 1,000 a second with
    /// a burst of 1 still keeps its rate: it admits a tick's worth at once.
    #[test]
    fn a_source_limit_keeps_a_rate_above_the_clocks_ticks() {
        let limit = SourceLimit::new(1_000, 1, FAMILY_V4, 32);
        let tick = 4_000_000;
        let mut due = 0;
        let mut admitted = 0u64;
        // 3,000 tries a second for 10 seconds.
        for i in 0..30_000u64 {
            let now = NS_PER_SEC + i * NS_PER_SEC / 3_000;
            if let Some(next) = limit.admit(due, now / tick * tick) {
                due = next;
                admitted += 1;
            }
        }
        assert!((9_900..=10_020).contains(&admitted), "{admitted} in 10 s");
    }

    /// A source limited under a strict limit is not held to it once the
    /// limit is raised: its first flow under the new one is admitted, and
    /// it then has the new rate, its burst spent.
    #[test]
    fn a_raised_source_limit_does_not_keep_the_old_ones_debt() {
        let strict = SourceLimit::new(1, 3_600, FAMILY_V4, 32);
        let mut due = 0;
        for _ in 0..strict.burst() {
            due = strict.admit(due, NS_PER_SEC).unwrap();
        }
        assert_eq!(strict.admit(due, NS_PER_SEC), None, "its burst spent");
        let raised = SourceLimit::new(50, 100, FAMILY_V4, 32);
        let now = 2 * NS_PER_SEC;
        let next = raised
            .admit(due, now)
            .expect("admitted under the raised limit");
        assert_eq!(next, now + raised.tolerance_ns + raised.interval_ns);
        assert_eq!(
            raised.admit(next, now),
            None,
            "its burst spent under the new one"
        );
        assert!(raised.admit(next, now + raised.interval_ns).is_some());
    }

    #[test]
    fn a_source_limit_masks_sources_to_their_prefix() {
        let v4 = SourceLimit::new(1, 1, FAMILY_V4, 24);
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[198, 19, 7, 9]);
        assert_eq!(&v4.prefix_of(&a)[..4], &[198, 19, 7, 0]);
        let v6 = SourceLimit::new(1, 1, FAMILY_V6, 64);
        let b = [0x20, 1, 0, 2, 0, 0xc, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(
            v6.prefix_of(&b),
            [0x20, 1, 0, 2, 0, 0xc, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(SourceLimit::new(1, 1, FAMILY_V6, 0).prefix_of(&b), [0; 16]);
        assert_eq!(SourceLimit::new(1, 1, FAMILY_V6, 128).prefix_of(&b), b);
    }

    #[test]
    fn a_block_is_the_first_bits_of_an_address() {
        let a = [0x20, 1, 0, 2, 0, 0xc, 0xab, 0xcd, 9, 9, 9, 9, 9, 9, 9, 9];
        let first = |bytes: [u8; 8]| u64::from_le_bytes(bytes);
        assert_eq!(SourceBlock::of(&a, 0), 0);
        assert_eq!(
            SourceBlock::of(&a, 48),
            first([0x20, 1, 0, 2, 0, 0xc, 0, 0])
        );
        assert_eq!(
            SourceBlock::of(&a, 52),
            first([0x20, 1, 0, 2, 0, 0xc, 0xa0, 0])
        );
        assert_eq!(
            SourceBlock::of(&a, 64),
            first([0x20, 1, 0, 2, 0, 0xc, 0xab, 0xcd])
        );
        // Past 64 bits: the first 64.
        assert_eq!(SourceBlock::of(&a, 128), SourceBlock::of(&a, 64));
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[198, 19, 7, 9]);
        assert_eq!(SourceBlock::of(&v4, 16), first([198, 19, 0, 0, 0, 0, 0, 0]));
        assert_eq!(SourceBlock::of(&v4, 31), first([198, 19, 7, 8, 0, 0, 0, 0]));
    }

    #[test]
    fn a_bucket_finds_a_block_by_its_whole_name() {
        let head = SourceBlock::head_of(7, 3, FAMILY_V4, 16);
        let mut bucket = SourceBlockBucket::default();
        bucket.ways[2] = SourceBlock::new(head, 0xc613, ACL_ALLOW as u8);
        assert_eq!(bucket.find(head, 0xc613), Some(ACL_ALLOW as u8));
        assert_eq!(bucket.ways[2].service(), Some(7));
        assert_eq!(bucket.ways[2].generation(), 3);
        // Another block, service, generation, family or length: not found.
        assert_eq!(bucket.find(head, 0xc612), None);
        for other in [
            SourceBlock::head_of(8, 3, FAMILY_V4, 16),
            SourceBlock::head_of(7, 4, FAMILY_V4, 16),
            SourceBlock::head_of(7, 3, FAMILY_V6, 16),
            SourceBlock::head_of(7, 3, FAMILY_V4, 15),
        ] {
            assert_eq!(bucket.find(other, 0xc613), None);
        }
        // An empty way names no block, not even service 0's empty block.
        assert_eq!(SourceBlock::default().service(), None);
        assert_eq!(
            SourceBlockBucket::default().find(SourceBlock::head_of(0, 0, 0, 0), 0),
            None
        );
    }
}
