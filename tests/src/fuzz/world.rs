//! The lab the fuzzer runs in, the model of its state, and the check of
//! every property on one verdict.
//!
//! The lab has services in both families and both modes, TCP and UDP, one
//! with client affinity and two without any backend. Before fuzzing, the
//! connection table is seeded with the pool's flows (see
//! [`Targets::clients`]), then the backend set changes under them the ways
//! an operator changes it: a backend taken down (its table rebuilt first),
//! one drained (out of the table, still up: its flows stay), one id given
//! to another backend (generation bumped), and one marked down while its
//! table still names it (the guard for a table not yet rebuilt).
//!
//! Three services then get source lists (a deny list, an allow list with
//! a deny list inside it, an allow list), and the entries of seeded flows
//! from sources they refuse are removed, as the daemon does: the program
//! checks the lists for new flows only, so those flows are dropped from
//! then on. Two services get new-flow limits.
//!
//! Before every service packet the check reads the flow's entry from the
//! connection table, so it knows the one outcome the documented rules
//! allow: the entry's backend if the entry is still valid (and the packet
//! no SYN), else the table's pick. After the packet it reads the entry
//! again: it must name the backend the packet was sent to.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, bail, ensure};
use lb::dataplane::{Capacity, SourceList};
use lb_common::{
    AddrKey, BACKEND_F_UP, BackendValue, Counter, FAMILY_V4, FLOW_F_CLOSED, FLOW_GENERATION_MASK,
    FlowKey, FlowValue, SERVICE_F_AFFINITY, SERVICE_F_ALLOW_LIST, SERVICE_F_DENY_LIST,
    SERVICE_F_ECHO, SERVICE_F_GUE, SERVICE_F_IPIP, SERVICE_F_SOURCE_LIMIT, SERVICE_F_TUNNEL,
    ServiceKey, SourceLimit, addr_ip,
    hash::{bucket_hash, flow_hash, maglev_slot},
    limits::{DEFAULT_GUE_PORT, GUE_SOURCE_PORT_BASE, GUE_SOURCE_PORT_MASK, NO_BACKEND},
    maps::PROG_LB,
    wire::*,
};

use super::{
    generate::Targets,
    hex,
    reference::{self, Class, Hit, Services},
};
use crate::{
    lab::{self, DROP, LB_MAC, Lab, PASS, REDIRECT, ROUTER_MAC, TX, backend_of_mac, service_key},
    packet::{self, Ipv4},
};

/// Maglev table size: a small prime keeps publishing ten services fast.
pub const RING: u32 = 251;
/// Service slots: more than the fixtures' lab has.
const MAX_SERVICES: u32 = 16;
/// Backend slots.
const MAX_BACKENDS: u32 = 64;
/// Connection-table entries: the fixtures' size. Random flows evict pool
/// flows now and then; the model allows for that (see [`World::outcomes`]).
const CONNTRACK_ENTRIES: u32 = 65_536;
/// IPv6 flow label bits (RFC 6437).
const FLOW_LABEL_MASK: u32 = 0x000f_ffff;

/// The bytes a tunnel service of `flags` adds to a packet of `family`:
/// none for `dsr-l2`.
fn tunnel_overhead(flags: u32, family: u8) -> usize {
    let ip = if family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    };
    if flags & SERVICE_F_GUE != 0 {
        ip + UDP_HLEN
    } else if flags & SERVICE_F_IPIP != 0 {
        ip
    } else {
        0
    }
}

/// The service VIPs.
pub const VIP4_DSR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// IPv4 VIP of the tunnel (`ipip`, `gue`) services.
pub const VIP4_IPIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// IPv4 VIP of a service without backends.
pub const VIP4_EMPTY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
/// IPv6 VIP of the `dsr-l2` services.
pub const VIP6_DSR: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 1);
/// IPv6 VIP of the tunnel (`ipip`, `gue`) services.
pub const VIP6_IPIP: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 2);
/// IPv6 VIP of a service without backends.
pub const VIP6_EMPTY: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 1, 0, 0, 0, 0, 3);
/// The load balancer's own IPv4 address: not a VIP, so its traffic is the host's.
pub const HOST4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The load balancer's own IPv6 address.
pub const HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// Clients in the pool, per family.
pub const CLIENTS: u8 = 8;
/// Client ports of the pool.
pub const CLIENT_PORTS: [u16; 8] = [40000, 40001, 40002, 40003, 40004, 40005, 40006, 40007];
/// Service ports.
const HTTP: u16 = 80;
const DNS: u16 = 53;

/// Taken down after seeding, its table rebuilt without it first (the order
/// user space keeps): its flows' entries turn into misses.
pub const DOWN: u32 = 3;
/// Drained after seeding (out of the table, still up): its flows stay.
pub const DRAINING: u32 = 12;
/// Marked down after seeding while its table still names it, the state the
/// data plane guards against: flows hashed to it are dropped (no backend).
pub const DOWN_IN_TABLE: u32 = 14;
/// Given to another backend after seeding (generation bumped): entries
/// made for the previous holder turn into misses.
pub const REUSED: u32 = 17;

/// Backends behind the lab's second interface ([`lab::Segment`]): one or
/// two of each service that has several, so both ways out are taken.
const BEHIND_SEGMENT: [u32; 6] = [2, 7, 9, 11, 16, 19];
/// A backend whose port no interface has: its flows are dropped.
pub const UNREACHABLE: u32 = 5;

/// The port backend `id` leaves by (0: the receiving interface).
fn port_of(id: u32) -> u8 {
    if BEHIND_SEGMENT.contains(&id) {
        lab::SEGMENT_PORT
    } else if id == UNREACHABLE {
        lab::NO_SUCH_PORT
    } else {
        0
    }
}

/// The MAC and MTU of the interface frames to backend `id` leave by.
fn egress_of(id: u32) -> (packet::Mac, u32) {
    if port_of(id) == lab::SEGMENT_PORT {
        (lab::SEGMENT_MAC, lab::SEGMENT_MTU)
    } else {
        (LB_MAC, lab::MTU)
    }
}

/// Whether `action` sends the frame on (back out, or out of another
/// interface).
fn forwards(action: u32) -> bool {
    action == TX || action == REDIRECT
}

/// A service of the lab.
struct Spec {
    name: &'static str,
    vip: IpAddr,
    port: u16,
    proto: u8,
    flags: u32,
    /// Backends in its table while the connection table is seeded.
    seeded: &'static [u32],
    /// Backends in its table while fuzzing.
    fuzzed: &'static [u32],
}

/// The lab's services; the index is the service id.
const SPECS: [Spec; 10] = [
    Spec {
        name: "tcp4-dsr",
        vip: IpAddr::V4(VIP4_DSR),
        port: HTTP,
        proto: IPPROTO_TCP,
        flags: 0,
        seeded: &[1, 2, DOWN],
        fuzzed: &[1, 2],
    },
    Spec {
        name: "udp4-dsr",
        vip: IpAddr::V4(VIP4_DSR),
        port: DNS,
        proto: IPPROTO_UDP,
        flags: SERVICE_F_ECHO,
        seeded: &[4, 5],
        fuzzed: &[4, 5],
    },
    Spec {
        name: "tcp4-ipip",
        vip: IpAddr::V4(VIP4_IPIP),
        port: HTTP,
        proto: IPPROTO_TCP,
        flags: SERVICE_F_IPIP,
        seeded: &[6, 7],
        fuzzed: &[6, 7],
    },
    Spec {
        name: "udp4-gue-affinity",
        vip: IpAddr::V4(VIP4_IPIP),
        port: DNS,
        proto: IPPROTO_UDP,
        flags: SERVICE_F_GUE | SERVICE_F_AFFINITY,
        seeded: &[8, 9],
        fuzzed: &[8, 9],
    },
    Spec {
        name: "tcp4-no-backend",
        vip: IpAddr::V4(VIP4_EMPTY),
        port: HTTP,
        proto: IPPROTO_TCP,
        flags: 0,
        seeded: &[],
        fuzzed: &[],
    },
    Spec {
        name: "tcp6-dsr",
        vip: IpAddr::V6(VIP6_DSR),
        port: HTTP,
        proto: IPPROTO_TCP,
        flags: 0,
        seeded: &[10, 11, DRAINING],
        fuzzed: &[10, 11],
    },
    Spec {
        name: "udp6-dsr",
        vip: IpAddr::V6(VIP6_DSR),
        port: DNS,
        proto: IPPROTO_UDP,
        flags: 0,
        seeded: &[13, DOWN_IN_TABLE],
        fuzzed: &[13, DOWN_IN_TABLE],
    },
    Spec {
        name: "tcp6-ipip",
        vip: IpAddr::V6(VIP6_IPIP),
        port: HTTP,
        proto: IPPROTO_TCP,
        flags: SERVICE_F_IPIP,
        seeded: &[15, 16, REUSED],
        fuzzed: &[15, 16, REUSED],
    },
    Spec {
        name: "udp6-gue",
        vip: IpAddr::V6(VIP6_IPIP),
        port: DNS,
        proto: IPPROTO_UDP,
        flags: SERVICE_F_GUE | SERVICE_F_ECHO,
        seeded: &[18, 19],
        fuzzed: &[18, 19],
    },
    Spec {
        name: "udp6-no-backend",
        vip: IpAddr::V6(VIP6_EMPTY),
        port: DNS,
        proto: IPPROTO_UDP,
        flags: SERVICE_F_IPIP,
        seeded: &[],
        fuzzed: &[],
    },
];

/// The services' source lists, by service index: deny one pool client of
/// `tcp4-dsr`; allow the first seven of `udp4-dsr` but deny four of those
/// (the longer prefix inside the shorter, and deny wins); allow three of
/// `tcp6-dsr`. Seeded flows from refused sources are dropped from then on.
const SOURCE_LISTS: &[(usize, SourceList, &str)] = &[
    (0, SourceList::Deny, "198.18.2.2/32"),
    (1, SourceList::Allow, "198.18.2.0/29"),
    (1, SourceList::Deny, "198.18.2.4/30"),
    (5, SourceList::Allow, "2001:2:2::/126"),
];

/// The services' new-flow limits, by service index: (rate, burst, prefix
/// length). `udp6-dsr`'s admits one flow a second from the clients' /64,
/// so most of its new flows are dropped; `tcp4-ipip`'s a burst of five
/// from each client. The limit's table is per CPU and its clock the real
/// one, so the model allows a flow that opens (a SYN, a UDP packet) without
/// an entry either outcome, and checks the drops add up.
const SOURCE_LIMITS: &[(usize, u32, u32, u8)] = &[(2, 50, 5, 32), (6, 1, 1, 64)];

/// The address of backend `id` (of family `v6`) in its `generation`.
fn backend_ip(id: u32, v6: bool, generation: u32) -> IpAddr {
    let (id, generation) = (id as u16, generation as u16);
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 2, 0, generation, 0, 0, 0, id))
    } else {
        // 198.18.1x.id: outside the VIP and host addresses.
        IpAddr::V4(Ipv4Addr::new(198, 18, 10 + generation as u8, id as u8))
    }
}

fn client4(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 2, 1 + i))
}

fn client6(i: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 2, 2, 0, 0, 0, 0, 1 + u16::from(i)))
}

/// What the program may do with a service packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to this backend.
    Tx(u32),
    /// Dropped, counted by this reason.
    Drop(Counter),
    /// Passed to the kernel, counted by this reason.
    Pass(Counter),
    /// Answered with an ICMP error telling the client the MTU to use.
    Reply,
}

/// What the program did with one frame.
#[derive(Clone, Copy, Debug)]
pub struct Verdict {
    /// The XDP action.
    pub action: u32,
    /// The one counter that moved.
    pub counter: Counter,
}

/// A property that did not hold.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Which property, in a few words (stable: the shrinker compares it).
    pub property: &'static str,
    /// What was seen.
    pub detail: String,
    /// The XDP action.
    pub action: u32,
    /// The counter that moved, if exactly one did.
    pub counter: Option<Counter>,
    /// The frame as the program left it.
    pub out: Vec<u8>,
}

/// The XDP action a counter implies, from its name alone (docs/dataplane.md:
/// `pass_*` pass, `drop_*` drop, `forward_*` and `reply_*` transmit).
pub fn implied_action(c: Counter) -> Option<u32> {
    let name = c.name();
    if name.starts_with("pass_") {
        Some(PASS)
    } else if name.starts_with("drop_") {
        Some(DROP)
    } else if name.starts_with("forward_") || name.starts_with("reply_") {
        Some(TX)
    } else if name.starts_with("redirect_") {
        Some(REDIRECT)
    } else {
        None
    }
}

/// An XDP action's name.
pub fn action_name(action: u32) -> &'static str {
    match action {
        DROP => "DROP",
        PASS => "PASS",
        TX => "TX",
        REDIRECT => "REDIRECT",
        _ => "other",
    }
}

/// A service as the world knows it.
struct Service {
    spec: &'static Spec,
    key: ServiceKey,
    /// Its source lists' and limit's flags (`SERVICE_F_*_LIST`,
    /// `SERVICE_F_SOURCE_LIMIT`), once they are set.
    source_flags: u32,
    /// The live table.
    ring: Vec<u32>,
    /// Every backend that may carry its flows: table members and those
    /// that left the table but stay up (draining).
    members: Vec<u32>,
}

/// The lab and its model.
pub struct World {
    lab: Lab,
    /// The second interface, for as long as the world lives.
    _segment: lab::Segment,
    services: Vec<Service>,
    backends: BTreeMap<u32, BackendValue>,
    keys: HashMap<ServiceKey, usize>,
    vips: HashSet<AddrKey>,
    /// The VIPs with a service that answers echo.
    echo_vips: HashSet<AddrKey>,
    /// Global counters after the last run, in `Counter::ALL` order.
    counters: Vec<u64>,
    /// Frames run through the program.
    runs: u64,
    /// Forwarded packets and bytes per service id, and packets per backend.
    forwarded: BTreeMap<u32, (u64, u64)>,
    to_backend: BTreeMap<u32, u64>,
    /// Service packets dropped, per service id.
    dropped: BTreeMap<u32, u64>,
    /// Of those, dropped by the service's source lists and limit:
    /// (denied, not allowed, limited).
    refused: BTreeMap<u32, (u64, u64, u64)>,
}

impl Services for World {
    fn service(&self, key: &ServiceKey) -> Option<usize> {
        self.keys.get(key).copied()
    }

    fn is_vip(&self, addr: &AddrKey) -> bool {
        self.vips.contains(addr)
    }

    fn answers_echo(&self, addr: &AddrKey) -> bool {
        self.echo_vips.contains(addr)
    }
}

impl World {
    /// Loads the data plane, publishes the services, seeds the connection
    /// table and changes the backend set under it.
    pub fn new() -> Result<World> {
        let mut lab = Lab::with_capacity(
            Capacity {
                max_services: MAX_SERVICES,
                max_backends: MAX_BACKENDS,
                conntrack_entries: CONNTRACK_ENTRIES,
                ring_slots: (MAX_SERVICES + 1) * RING,
            },
            RING,
        )?;
        let segment = lab.add_segment()?;
        let mut w = World {
            lab,
            _segment: segment,
            services: Vec::new(),
            backends: BTreeMap::new(),
            keys: HashMap::new(),
            vips: HashSet::new(),
            echo_vips: HashSet::new(),
            counters: vec![0; Counter::ALL.len()],
            runs: 0,
            forwarded: BTreeMap::new(),
            dropped: BTreeMap::new(),
            refused: BTreeMap::new(),
            to_backend: BTreeMap::new(),
        };
        w.counters = w.read_counters()?;
        for (i, spec) in SPECS.iter().enumerate() {
            let key = service_key(spec.vip, spec.port, spec.proto);
            w.keys.insert(key, i);
            w.vips.insert(AddrKey::new(spec.vip));
            if spec.flags & SERVICE_F_ECHO != 0 {
                w.echo_vips.insert(AddrKey::new(spec.vip));
            }
            let mut members: Vec<u32> = spec.seeded.iter().chain(spec.fuzzed).copied().collect();
            members.sort_unstable();
            members.dedup();
            for &id in &members {
                w.set_backend(id, backend_ip(id, spec.vip.is_ipv6(), 1), true, 1)?;
            }
            w.services.push(Service {
                spec,
                key,
                source_flags: 0,
                ring: Vec::new(),
                members,
            });
            w.publish(i, spec.seeded)?;
        }
        w.seed()?;
        w.change_backends()?;
        w.set_source_lists()?;
        Ok(w)
    }

    /// Gives the services of [`SOURCE_LISTS`] their lists and those of
    /// [`SOURCE_LIMITS`] their limits, after seeding.
    fn set_source_lists(&mut self) -> Result<()> {
        for &(i, list, prefix) in SOURCE_LISTS {
            let prefix = lb::config::parse_source(prefix).map_err(anyhow::Error::msg)?;
            self.lab.dp.set_source_entry(i as u32, prefix, list)?;
            self.services[i].source_flags |= match list {
                SourceList::Deny => SERVICE_F_DENY_LIST,
                SourceList::Allow => SERVICE_F_ALLOW_LIST,
            };
        }
        // The directory of blocks answers for `tcp4-dsr` (one /32 denied,
        // its block); the others' blocks are mixed, so the trie answers.
        self.lab.dp.settle_source_blocks()?;
        for &(i, rate, burst, prefix) in SOURCE_LIMITS {
            let family = self.services[i].key.family;
            let limit = SourceLimit::new(rate, burst, family, prefix);
            self.lab.dp.set_source_limit(i as u32, Some(&limit))?;
            self.services[i].source_flags |= SERVICE_F_SOURCE_LIMIT;
        }
        for i in 0..self.services.len() {
            if self.services[i].source_flags != 0 {
                let members: Vec<u32> = self.services[i].spec.fuzzed.to_vec();
                self.publish(i, &members)?;
            }
        }
        let refused: Vec<FlowKey> = self
            .lab
            .dp
            .conntrack_dump()?
            .into_iter()
            .filter(|(k, v)| {
                let src = addr_ip(&k.src, k.family);
                self.refuses(v.service as usize, src).is_some()
            })
            .map(|(k, _)| k)
            .collect();
        ensure!(
            !refused.is_empty(),
            "no seeded flow comes from a refused source"
        );
        self.lab.dp.conntrack_remove(&refused)?;
        Ok(())
    }

    /// The counter that drops `hit` for its source, if its service's lists
    /// refuse it: in the deny list (deny wins), or outside an allow list.
    fn refused(&self, hit: &Hit) -> Option<Counter> {
        self.refuses(hit.service, addr_ip(&hit.flow.src, hit.flow.family))
    }

    /// The counter that drops new flows from `src` to service `service`,
    /// if its lists refuse them.
    fn refuses(&self, service: usize, src: IpAddr) -> Option<Counter> {
        let flags = self.services.get(service)?.source_flags;
        let host_len = if src.is_ipv4() { 32 } else { 128 };
        let listed = |want: SourceList| {
            SOURCE_LISTS.iter().any(|&(i, list, prefix)| {
                i == service
                    && list == want
                    && lb::config::parse_source(prefix)
                        .is_ok_and(|p| lb::config::prefix_holds(p, (src, host_len)))
            })
        };
        if flags & SERVICE_F_DENY_LIST != 0 && listed(SourceList::Deny) {
            Some(Counter::DropDenied)
        } else if flags & SERVICE_F_ALLOW_LIST != 0 && !listed(SourceList::Allow) {
            Some(Counter::DropNotAllowed)
        } else {
            None
        }
    }

    /// What the generator aims at.
    pub fn targets(&self) -> Targets {
        let mut clients: Vec<IpAddr> = (0..CLIENTS).map(client4).collect();
        clients.extend((0..CLIENTS).map(client6));
        Targets {
            services: SPECS.iter().map(|s| (s.vip, s.port, s.proto)).collect(),
            hosts: vec![IpAddr::V4(HOST4), IpAddr::V6(HOST6)],
            clients,
            client_ports: CLIENT_PORTS.to_vec(),
            routers: vec![
                IpAddr::V4(Ipv4Addr::new(198, 18, 3, 1)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 2, 3, 0, 0, 0, 0, 1)),
            ],
            echo_vips: SPECS
                .iter()
                .filter(|s| s.flags & SERVICE_F_ECHO != 0)
                .map(|s| s.vip)
                .collect(),
        }
    }

    fn set_backend(&mut self, id: u32, ip: IpAddr, up: bool, generation: u32) -> Result<()> {
        self.lab.backend(id, ip, up, generation)?;
        self.lab.route_backend(id, port_of(id))?;
        self.backends.insert(id, self.lab.dp.backend(id)?);
        Ok(())
    }

    /// Publishes service `i` with `members` (weight 1 each) as its table.
    fn publish(&mut self, i: usize, members: &[u32]) -> Result<()> {
        let svc = &self.services[i];
        let (key, flags) = (svc.key, svc.spec.flags | svc.source_flags);
        let ring = if members.is_empty() {
            let ring = vec![NO_BACKEND; RING as usize];
            self.lab
                .dp
                .publish_service(&key, i as u32, flags, 0, &ring)?;
            ring
        } else {
            let weighted: Vec<(u32, u32)> = members.iter().map(|&b| (b, 1)).collect();
            self.lab.service(i as u32, key, flags, &weighted)?
        };
        self.services[i].ring = ring;
        Ok(())
    }

    /// Sends a SYN (or a datagram) of every pool flow to every service
    /// that has backends, so the connection table holds entries for them.
    fn seed(&mut self) -> Result<()> {
        for i in 0..self.services.len() {
            let spec = self.services[i].spec;
            if spec.seeded.is_empty() {
                continue;
            }
            for c in 0..CLIENTS {
                let client = if spec.vip.is_ipv6() {
                    client6(c)
                } else {
                    client4(c)
                };
                for sport in CLIENT_PORTS {
                    let frame = flow_frame(spec, client, sport);
                    match self.check(&frame) {
                        // A flow to the unreachable backend is dropped, but
                        // its entry made all the same.
                        Ok(v) if forwards(v.action) || v.counter == Counter::DropNoEgress => {}
                        Ok(v) => bail!(
                            "seeding {}: {} ({}) for {}",
                            spec.name,
                            action_name(v.action),
                            v.counter.name(),
                            hex(&frame)
                        ),
                        Err(f) => bail!("seeding {}: {}: {}", spec.name, f.property, f.detail),
                    }
                }
            }
        }
        Ok(())
    }

    /// Changes the backend set under the seeded flows (see the constants).
    fn change_backends(&mut self) -> Result<()> {
        let v6_of = |w: &World, id: u32| {
            w.services
                .iter()
                .find(|s| s.members.contains(&id))
                .map(|s| s.spec.vip.is_ipv6())
                .context("a backend of no service")
        };
        // The reused id gets a new address and generation before its
        // table is rebuilt (the table is built from addresses).
        let v6 = v6_of(self, REUSED)?;
        self.set_backend(REUSED, backend_ip(REUSED, v6, 2), true, 2)?;
        for i in 0..self.services.len() {
            let spec = self.services[i].spec;
            if spec.seeded != spec.fuzzed || spec.fuzzed.contains(&REUSED) {
                self.publish(i, spec.fuzzed)?;
            }
        }
        for id in [DOWN, DOWN_IN_TABLE] {
            let v6 = v6_of(self, id)?;
            self.set_backend(id, backend_ip(id, v6, 1), false, 1)?;
        }
        Ok(())
    }

    fn read_counters(&self) -> Result<Vec<u64>> {
        Ok(self
            .lab
            .dp
            .counters()?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Runs `frame` through `lb_xdp` and checks every property. Errors of
    /// the machinery (a failing syscall) panic: they are not verdicts.
    pub fn check(&mut self, frame: &[u8]) -> Result<Verdict, Failure> {
        let class = reference::classify(frame, &*self);
        let entry = match &class {
            Class::Service(hit) => self.entry(&hit.flow),
            _ => None,
        };
        let v = self.lab.run(PROG_LB, frame).expect("BPF_PROG_TEST_RUN");
        self.runs += 1;
        let now = self.read_counters().expect("reading the counters");
        let moved: Vec<(Counter, u64)> = Counter::ALL
            .iter()
            .zip(now.iter().zip(&self.counters))
            .filter(|(_, (a, b))| a != b)
            .map(|(c, (a, b))| (*c, a.wrapping_sub(*b)))
            .collect();
        self.counters = now;
        let single = match moved[..] {
            [(c, 1)] => Some(c),
            _ => None,
        };
        let fail = |property: &'static str, detail: String| Failure {
            property,
            detail,
            action: v.action,
            counter: single,
            out: v.out.clone(),
        };
        if forwards(v.action) {
            self.account(frame, &v.out);
        }

        // (4) Counters add up: exactly one moved, by one.
        let Some(counter) = single else {
            return Err(fail("counted once", format!("counters moved: {moved:?}")));
        };
        // (4) The counter that moved agrees with the verdict.
        if implied_action(counter) != Some(v.action) {
            return Err(fail(
                "counter agrees with the action",
                format!("{} with {}", counter.name(), action_name(v.action)),
            ));
        }
        // (2) A dropped or passed frame is never modified.
        if !forwards(v.action) && v.out != frame {
            return Err(fail(
                "dropped or passed frames are not modified",
                format!(
                    "first difference at byte {}",
                    first_difference(frame, &v.out)
                ),
            ));
        }
        let verdict = Verdict {
            action: v.action,
            counter,
        };
        match class {
            // (1) Not for a service: passed untouched.
            Class::Pass(allowed) => {
                if v.action != PASS {
                    return Err(fail(
                        "frames not for a service pass",
                        format!(
                            "{} ({}), expected one of {}",
                            action_name(v.action),
                            counter.name(),
                            names(&allowed)
                        ),
                    ));
                }
                if !allowed.contains(&counter) {
                    return Err(fail(
                        "counted by the expected reason",
                        format!("{}, expected one of {}", counter.name(), names(&allowed)),
                    ));
                }
            }
            // (2) Malformed: never forwarded, counted.
            Class::Reject(allowed) => {
                if forwards(v.action) {
                    return Err(fail(
                        "malformed frames are never forwarded",
                        format!("{}, expected one of {}", counter.name(), names(&allowed)),
                    ));
                }
                if !allowed.contains(&counter) {
                    return Err(fail(
                        "counted by the expected reason",
                        format!("{}, expected one of {}", counter.name(), names(&allowed)),
                    ));
                }
            }
            Class::Service(hit) => {
                self.check_service(frame, &hit, entry, &v.out, verdict)
                    .map_err(|(property, detail)| fail(property, detail))?;
            }
            // (5) An echo request the program owns: answered with a well
            // formed reply to its source, or over the budget.
            Class::Echo(e) => match counter {
                Counter::ReplyEcho => {
                    let bad = packet::echo_reply_problems(frame, &v.out, e.l3, e.l4, e.end);
                    if !bad.is_empty() {
                        return Err(fail(
                            "an echo reply is well formed and goes to the request's source",
                            bad.join(", "),
                        ));
                    }
                }
                Counter::DropEchoLimit => {}
                _ => {
                    return Err(fail(
                        "echo requests to a VIP that answers echo are answered",
                        format!("{}, expected reply_echo or drop_echo_limit", counter.name()),
                    ));
                }
            },
        }
        Ok(verdict)
    }

    /// (3) A service packet: forwarded to a valid backend of its service,
    /// well formed, or dropped for a reason the state explains.
    fn check_service(
        &mut self,
        frame: &[u8],
        hit: &Hit,
        entry: Option<FlowValue>,
        out: &[u8],
        v: Verdict,
    ) -> Result<(), (&'static str, String)> {
        let svc = &self.services[hit.service];
        let tunnel = svc.spec.flags & SERVICE_F_TUNNEL != 0;
        let allowed = self.outcomes(hit, entry);
        let observed = match v.action {
            a if forwards(a) && hit.foreign_destination => {
                return Err((
                    "frames not sent to the LB's MAC are not forwarded",
                    format!("{} to {}", v.counter.name(), hex(&frame[..6])),
                ));
            }
            TX if v.counter == Counter::ReplyTooBig => {
                if !allowed.contains(&Outcome::Reply) {
                    return Err((
                        "ICMP errors answer only packets too big for the tunnel",
                        format!("allowed {allowed:?}"),
                    ));
                }
                let overhead = tunnel_overhead(svc.spec.flags, svc.key.family);
                let (_, egress_mtu) = egress_of(self.chosen(hit, entry).unwrap_or_default());
                let mtu = egress_mtu - overhead as u32;
                let bad = packet::too_big_reply_problems(frame, out, hit.l3_off, mtu);
                if !bad.is_empty() {
                    return Err((
                        "a generated ICMP error is well formed and goes to the packet's source",
                        bad.join(", "),
                    ));
                }
                Outcome::Reply
            }
            TX | REDIRECT => {
                let id = backend_of_mac(&out[..6]);
                let backend = match self.backends.get(&id) {
                    Some(b) if b.mac[..] == out[..6] => *b,
                    _ => {
                        return Err((
                            "forwarded to a backend's MAC",
                            format!("destination MAC {}", hex(&out[..6])),
                        ));
                    }
                };
                let want = if port_of(id) == lab::SEGMENT_PORT {
                    Counter::RedirectBackend
                } else if hit.icmp {
                    Counter::ForwardIcmpError
                } else if svc.spec.flags & SERVICE_F_GUE != 0 {
                    Counter::ForwardGue
                } else if tunnel {
                    Counter::ForwardIpip
                } else {
                    Counter::ForwardDsr
                };
                if v.counter != want {
                    return Err((
                        "the forward counter names the mode and the way out",
                        format!("{}, expected {}", v.counter.name(), want.name()),
                    ));
                }
                if !svc.members.contains(&id) || backend.flags & BACKEND_F_UP == 0 {
                    return Err((
                        "the backend is up and a member of the service",
                        format!(
                            "backend {id} of {} (members {:?})",
                            svc.spec.name, svc.members
                        ),
                    ));
                }
                if !allowed.contains(&Outcome::Tx(id)) {
                    return Err((
                        "the backend is the flow's",
                        format!("backend {id}; allowed {allowed:?}"),
                    ));
                }
                self.check_link(frame, out, id, &backend)?;
                if tunnel {
                    self.check_tunnel(frame, out, hit, &backend)?;
                } else if out.len() != frame.len() || out[12..] != frame[12..] {
                    return Err((
                        "dsr-l2 changes only the MACs",
                        format!(
                            "first difference at byte {}",
                            first_difference(&frame[12..], &out[12..]) + 12
                        ),
                    ));
                }
                Outcome::Tx(id)
            }
            DROP => {
                // Every drop of a matched packet is its service's too.
                *self.dropped.entry(hit.service as u32).or_default() += 1;
                let refused = self.refused.entry(hit.service as u32).or_default();
                match v.counter {
                    Counter::DropDenied => refused.0 += 1,
                    Counter::DropNotAllowed => refused.1 += 1,
                    Counter::DropRateLimited => refused.2 += 1,
                    _ => {}
                }
                let o = Outcome::Drop(v.counter);
                if !allowed.contains(&o) {
                    return Err((
                        "service packets are dropped only for a reason",
                        format!("{}; allowed {allowed:?}", v.counter.name()),
                    ));
                }
                o
            }
            _ => {
                let o = Outcome::Pass(v.counter);
                if !allowed.contains(&o) {
                    return Err((
                        "service packets are passed only when not sent to the LB's MAC",
                        format!("{}; allowed {allowed:?}", v.counter.name()),
                    ));
                }
                o
            }
        };
        self.check_entry(hit, entry, observed)
    }

    /// Counts a forwarded frame for [`World::check_totals`], by the backend
    /// its destination MAC names (each backend id serves one service), so
    /// that frames forwarded against a property are counted too.
    fn account(&mut self, frame: &[u8], out: &[u8]) {
        let id = backend_of_mac(&out[..6]);
        let names_backend = self
            .backends
            .get(&id)
            .is_some_and(|b| b.mac[..] == out[..6]);
        if !names_backend {
            return;
        }
        if let Some(service) = self.services.iter().position(|s| s.members.contains(&id)) {
            let e = self.forwarded.entry(service as u32).or_default();
            e.0 += 1;
            e.1 += frame.len() as u64;
        }
        *self.to_backend.entry(id).or_default() += 1;
    }

    /// The link layer of a forwarded frame: to the backend's MAC, from the
    /// LB's own on the interface it leaves by (only frames sent to it are
    /// forwarded).
    fn check_link(
        &self,
        frame: &[u8],
        out: &[u8],
        id: u32,
        backend: &BackendValue,
    ) -> Result<(), (&'static str, String)> {
        if out[0..6] != backend.mac {
            return Err(("destination MAC is the backend's", hex(&out[0..6])));
        }
        if out[6..12] != egress_of(id).0 {
            return Err((
                "source MAC is the LB's on the interface the frame leaves by",
                format!(
                    "{} (frame was sent to {})",
                    hex(&out[6..12]),
                    hex(&frame[0..6])
                ),
            ));
        }
        Ok(())
    }

    /// An `ipip` or `gue` frame: the outer headers valid and toward the
    /// backend, the inner packet byte-identical to the input's IP packet.
    fn check_tunnel(
        &self,
        frame: &[u8],
        out: &[u8],
        hit: &Hit,
        backend: &BackendValue,
    ) -> Result<(), (&'static str, String)> {
        let l3 = hit.l3_off;
        let svc = &self.services[hit.service];
        let v4 = svc.key.family == FAMILY_V4;
        let gue = svc.spec.flags & SERVICE_F_GUE != 0;
        let outer_len = tunnel_overhead(svc.spec.flags, svc.key.family);
        let ip_hlen = if v4 { IPV4_HLEN } else { IPV6_HLEN };
        // What follows the outer IP header: the packet, or a UDP header.
        let (proto4, proto6) = if gue {
            (IPPROTO_UDP, IPPROTO_UDP)
        } else {
            (IPPROTO_IPIP, IPPROTO_IPV6)
        };
        let hash = bucket_hash(&hit.flow);
        if out.len() != frame.len() + outer_len {
            return Err((
                "a tunnel adds its outer headers",
                format!("{} bytes out of {}", out.len(), frame.len()),
            ));
        }
        if out[12..l3] != frame[12..l3] {
            return Err(("a tunnel keeps VLAN tags and EtherType", hex(&out[12..l3])));
        }
        let o = &out[l3..l3 + outer_len];
        let bad = |what: &str| Err(("the outer headers are valid", format!("{what}: {}", hex(o))));
        if v4 {
            let total = usize::from(u16::from_be_bytes([o[2], o[3]]));
            let src = u32::from_be_bytes([o[12], o[13], o[14], o[15]]);
            let base = u32::from_be_bytes(lab::TUNNEL_SRC_V4);
            let mask = lab::TUNNEL_SRC_V4_MASK;
            if o[0] != 0x45 {
                return bad("version/IHL");
            }
            if total != hit.ip_len + outer_len {
                return bad("total length");
            }
            if packet::checksum(0, &o[..IPV4_HLEN]) != 0 {
                return bad("checksum");
            }
            if o[9] != proto4 {
                return bad("protocol");
            }
            if o[8] == 0 {
                return bad("TTL");
            }
            if u16::from_be_bytes([o[6], o[7]]) & (IPV4_MF | IPV4_FRAG_OFFSET) != 0 {
                return bad("a fragment");
            }
            if o[1] != frame[l3 + 1] {
                return bad("TOS not copied (RFC 2003)");
            }
            if src & !mask != base & !mask {
                return bad("source outside the tunnel prefix");
            }
            if src & mask != hash & mask {
                return bad("source host bits are not the flow hash's");
            }
            if o[16..20] != backend.addr[..4] {
                return bad("destination is not the backend");
            }
        } else {
            let payload = usize::from(u16::from_be_bytes([o[4], o[5]]));
            let label = u32::from_be_bytes([0, o[1] & 0x0f, o[2], o[3]]);
            let last = u32::from_be_bytes([o[20], o[21], o[22], o[23]]);
            let base = lab::TUNNEL_SRC_V6;
            let base_last = u32::from_be_bytes([base[12], base[13], base[14], base[15]]);
            let mask = lab::TUNNEL_SRC_V6_MASK;
            if o[0] >> 4 != 6 {
                return bad("version");
            }
            if payload != hit.ip_len + outer_len - IPV6_HLEN {
                return bad("payload length");
            }
            if o[6] != proto6 {
                return bad("next header");
            }
            if o[7] == 0 {
                return bad("hop limit");
            }
            if label != hash & FLOW_LABEL_MASK {
                return bad("flow label is not the flow hash's");
            }
            if o[8..20] != base[..12] || last & !mask != base_last & !mask {
                return bad("source outside the tunnel prefix");
            }
            if last & mask != hash & mask {
                return bad("source host bits are not the flow hash's");
            }
            if o[24..40] != backend.addr {
                return bad("destination is not the backend");
            }
        }
        if gue {
            let u = &o[ip_hlen..];
            let sport = u16::from_be_bytes([u[0], u[1]]);
            if sport & !GUE_SOURCE_PORT_MASK != GUE_SOURCE_PORT_BASE
                || sport & GUE_SOURCE_PORT_MASK != hash as u16 & GUE_SOURCE_PORT_MASK
            {
                return bad("UDP source port is not the flow hash's");
            }
            if u16::from_be_bytes([u[2], u[3]]) != DEFAULT_GUE_PORT {
                return bad("UDP destination port is not the GUE port");
            }
            if usize::from(u16::from_be_bytes([u[4], u[5]])) != hit.ip_len + UDP_HLEN {
                return bad("UDP length");
            }
            if u[6..8] != [0, 0] {
                return bad("UDP checksum is not zero");
            }
        }
        let inner = &out[l3 + outer_len..];
        if inner[..hit.ip_len] != frame[l3..l3 + hit.ip_len] {
            return Err((
                "the inner packet is the input's",
                format!(
                    "first difference at inner byte {}",
                    first_difference(&frame[l3..l3 + hit.ip_len], &inner[..hit.ip_len])
                ),
            ));
        }
        if inner[hit.ip_len..] != frame[l3 + hit.ip_len..] {
            return Err(("a tunnel keeps the padding after the packet", String::new()));
        }
        Ok(())
    }

    /// The table's pick for the flow, if it names a backend that is up.
    fn table_pick(&self, hit: &Hit) -> Option<u32> {
        let svc = &self.services[hit.service];
        let affinity = svc.spec.flags & SERVICE_F_AFFINITY != 0;
        let slot = maglev_slot(flow_hash(&hit.flow, affinity), svc.ring.len() as u32);
        let id = svc.ring[slot as usize];
        self.valid(id, None).then_some(id)
    }

    /// Whether backend `id` is up (and, given one, still of `generation`).
    fn valid(&self, id: u32, generation: Option<u32>) -> bool {
        id != NO_BACKEND
            && self.backends.get(&id).is_some_and(|b| {
                // An entry keeps the generation's low bits.
                b.flags & BACKEND_F_UP != 0
                    && generation.is_none_or(|g| g == b.generation & FLOW_GENERATION_MASK)
            })
    }

    /// The flow's connection-table entry, as the kernel holds it.
    fn entry(&self, flow: &FlowKey) -> Option<FlowValue> {
        self.lab
            .dp
            .conntrack(flow)
            .expect("reading the connection table")
    }

    /// The backend a valid entry pins the flow to: a SYN re-picks, and an
    /// entry whose backend is down or whose id now names another backend
    /// (generation), or that names another service (the world's services
    /// have their index as id), is a miss.
    fn pinned(&self, hit: &Hit, entry: Option<FlowValue>) -> Option<u32> {
        entry
            .filter(|e| {
                !hit.syn
                    && e.service == hit.service as u32
                    && self.valid(e.backend, Some(e.generation))
            })
            .map(|e| e.backend)
    }

    /// The outcome the documented rules allow for a service packet, given
    /// the flow's entry before it: the pinned backend, else the table's pick
    /// (no backend in the table's slot drops it); a tunnelled packet too big
    /// for the MTU once encapsulated drops it. A frame not sent to the LB's
    /// MAC passes before any of that.
    pub fn outcomes(&self, hit: &Hit, entry: Option<FlowValue>) -> Vec<Outcome> {
        let svc = &self.services[hit.service];
        let chosen = self.chosen(hit, entry);
        let mut v = vec![chosen.map_or(Outcome::Drop(Counter::DropNoBackend), Outcome::Tx)];
        if chosen == Some(UNREACHABLE) {
            // Its way out is looked up before anything else is done.
            v = vec![Outcome::Drop(Counter::DropNoEgress)];
        } else if let Some(id) = chosen
            && svc.spec.flags & SERVICE_F_TUNNEL != 0
        {
            let outer = tunnel_overhead(svc.spec.flags, svc.key.family);
            if hit.ip_len + outer > egress_of(id).1 as usize {
                // Answered unless it may be fragmented on the way, or is
                // itself an error, or the CPU's ICMP budget is spent.
                v = vec![Outcome::Drop(Counter::DropTooBig)];
                if hit.error_due && !hit.icmp {
                    v.push(Outcome::Reply);
                }
            }
        }
        if self.may_limit(hit, entry) {
            // After the lists, before the choice.
            v.push(Outcome::Drop(Counter::DropRateLimited));
        }
        if let Some(refused) = self.refused(hit) {
            // Checked once the service is known, before anything else.
            v = vec![Outcome::Drop(refused)];
        }
        if hit.foreign_destination {
            // See `reference::classify`.
            v = vec![Outcome::Pass(Counter::PassForeignMac)];
        }
        v
    }

    /// Whether `hit` may be dropped by its service's new-flow limit: the
    /// service has one, the packet opens a flow (a SYN or UDP, no relayed
    /// ICMP error), and it has no entry of its service that stands (any
    /// entry of the service, even one whose backend is gone, but not for a
    /// SYN one its connection's FIN or RST closed; the lab ages nothing).
    fn may_limit(&self, hit: &Hit, entry: Option<FlowValue>) -> bool {
        self.services[hit.service].source_flags & SERVICE_F_SOURCE_LIMIT != 0
            && !hit.icmp
            && (hit.syn || hit.flow.proto == IPPROTO_UDP)
            && entry.is_none_or(|e| {
                e.service != hit.service as u32 || (hit.syn && e.flags & FLOW_F_CLOSED != 0)
            })
    }

    /// The backend the flow goes to: the pinned one, else the table's pick.
    fn chosen(&self, hit: &Hit, entry: Option<FlowValue>) -> Option<u32> {
        self.pinned(hit, entry).or_else(|| self.table_pick(hit))
    }

    /// The connection table after a service packet: a packet that went
    /// through the choice (forwarded, or dropped as too big or for want
    /// of a way out) leaves the
    /// entry naming its backend (a valid entry kept, a miss or a SYN
    /// written); relayed ICMP errors and packets that never reached the
    /// choice leave it as it was.
    fn check_entry(
        &self,
        hit: &Hit,
        entry_before: Option<FlowValue>,
        observed: Outcome,
    ) -> Result<(), (&'static str, String)> {
        // The lab ages nothing: an entry is its (backend, generation).
        let pin = |e: Option<FlowValue>| e.map(|e| (e.backend, e.generation));
        let (before, after) = (pin(entry_before), pin(self.entry(&hit.flow)));
        let chosen = self.chosen(hit, entry_before).map(|id| {
            let generation = self.backends.get(&id).map_or(0, |b| b.generation);
            (id, generation & FLOW_GENERATION_MASK)
        });
        let chose = matches!(
            observed,
            Outcome::Tx(_)
                | Outcome::Drop(Counter::DropTooBig | Counter::DropNoEgress)
                | Outcome::Reply
        );
        let expected = if hit.icmp || !chose { before } else { chosen };
        if after != expected {
            return Err((
                "the connection table remembers the flow's backend",
                format!(
                    "entry {after:?} after {observed:?}, expected {expected:?} (before: {before:?})"
                ),
            ));
        }
        Ok(())
    }

    /// Checks what adds up over the whole run: the global counters sum to
    /// the frames run, per-service and per-backend packet and byte counters
    /// match the frames forwarded, and per-service drops the service
    /// packets dropped.
    pub fn check_totals(&self) -> Result<()> {
        let total = self.lab.counter_total()?;
        ensure!(
            total == self.runs,
            "global counters sum to {total}, frames run {}",
            self.runs
        );
        for (i, svc) in self.services.iter().enumerate() {
            let stats = self.lab.dp.service_stats(i as u32, &svc.members)?;
            let (packets, bytes) = self.forwarded.get(&(i as u32)).copied().unwrap_or_default();
            let drops = self.dropped.get(&(i as u32)).copied().unwrap_or_default();
            ensure!(
                (stats.packets, stats.bytes, stats.drops) == (packets, bytes, drops),
                "service {}: counted {} packets / {} bytes / {} drops, forwarded {packets} / \
                 {bytes} and dropped {drops}",
                svc.spec.name,
                stats.packets,
                stats.bytes,
                stats.drops
            );
            let lists = self.lab.dp.source_drops(i as u32)?;
            let refused = self.refused.get(&(i as u32)).copied().unwrap_or_default();
            ensure!(
                (lists.denied, lists.not_allowed, lists.limited) == refused,
                "service {}: counted {} denied / {} not allowed / {} limited, dropped {refused:?}",
                svc.spec.name,
                lists.denied,
                lists.not_allowed,
                lists.limited
            );
        }
        for &id in self.backends.keys() {
            let stats = self.lab.dp.backend_stats(id)?;
            let packets = self.to_backend.get(&id).copied().unwrap_or_default();
            ensure!(
                stats.packets() == packets,
                "backend {id}: counted {} packets, forwarded {packets}",
                stats.packets()
            );
        }
        Ok(())
    }

    /// Frames run so far (seeding and shrinking included).
    pub fn runs(&self) -> u64 {
        self.runs
    }
}

/// A SYN (TCP) or a small datagram (UDP) of a pool flow to `spec`.
fn flow_frame(spec: &Spec, client: IpAddr, sport: u16) -> Vec<u8> {
    let seg = if spec.proto == IPPROTO_TCP {
        packet::tcp(client, spec.vip, sport, spec.port, TCP_SYN, b"seed")
    } else {
        packet::udp(client, spec.vip, sport, spec.port, b"seed")
    };
    match (client, spec.vip) {
        (IpAddr::V4(c), IpAddr::V4(v)) => {
            let ip = Ipv4::new(c.octets(), v.octets(), spec.proto).build(&seg);
            packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IP, &ip)
        }
        (IpAddr::V6(c), IpAddr::V6(v)) => {
            let ip = packet::ipv6(c.octets(), v.octets(), spec.proto, &[], &seg);
            packet::ethernet(LB_MAC, ROUTER_MAC, &[], ETH_P_IPV6, &ip)
        }
        _ => unreachable!("pool clients are of the service's family"),
    }
}

fn names(counters: &[Counter]) -> String {
    counters
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first offset at which `a` and `b` differ (the shorter length if one
/// is a prefix of the other).
fn first_difference(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}
