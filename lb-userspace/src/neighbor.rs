//! Next-hop MACs from the kernel's routing and neighbour tables, read (and
//! watched) through netlink, never from constants and with no `ip` forks. A
//! backend's next hop is the backend itself when on-link, else its gateway.
//! Resolution is triggered with a datagram to the discard port when the
//! kernel has no usable neighbour entry.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures_util::{StreamExt as _, TryStreamExt as _, stream::BoxStream};
use rtnetlink::{
    Handle, MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType, RouteVia},
    },
};
use tokio::time::Instant;
use tracing::warn;

use crate::routes::ROUTE_PROTOCOL;

/// The discard service (RFC 863): a datagram to it makes the kernel resolve
/// the neighbour without asking the backend for anything.
const DISCARD_PORT: u16 = 9;
/// How long to wait for the kernel to resolve a neighbour.
const RESOLVE_WAIT: Duration = Duration::from_millis(500);
/// How often the neighbour table is read again while waiting.
const RESOLVE_POLL: Duration = Duration::from_millis(20);

/// Where frames to a backend go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// The MAC of the backend, or of its gateway when not on-link.
    pub mac: [u8; 6],
    /// The address that MAC answers for: the backend's, or its gateway's.
    pub addr: IpAddr,
    /// The interface the route leaves by.
    pub dev: String,
}

/// What resolving a set of backends found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// The backends' next hops.
    pub hops: BTreeMap<IpAddr, NextHop>,
    /// The backends without one, and why: no route, or their next hop's
    /// neighbour entry failed or was not answered in time.
    pub unresolved: BTreeMap<IpAddr, String>,
    /// The next hops of those whose neighbour entry was not usable, with
    /// the index of the interface they are resolved on.
    waiting: BTreeSet<(IpAddr, u32)>,
    /// The interface index each backend's next hop is resolved on: an
    /// address may be a neighbour on several (a router's `fe80::1` on each
    /// VLAN), whose other entries change nothing here.
    hop_indexes: BTreeMap<IpAddr, u32>,
}

impl Resolution {
    /// Whether the kernel's change `message` may change what resolving the
    /// same backends finds: a next hop's neighbour entry failing, going or
    /// changing its MAC, an awaited one becoming usable, a route added or
    /// removed (but lb's own). Other neighbour updates (a probe confirming
    /// a stale entry, lb's own resolution starting) are not. An overrun
    /// (the socket's buffer overflowed, in a burst of changes) may have
    /// lost any of those: it counts as one.
    pub fn affected_by(&self, message: &NetlinkMessage<RouteNetlinkMessage>) -> bool {
        let m = match &message.payload {
            NetlinkPayload::InnerMessage(m) => m,
            NetlinkPayload::Overrun(_) => return true,
            _ => return false,
        };
        match m {
            RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
                let Some((addr, entry)) = parse_neighbour(n) else {
                    return false;
                };
                let gone = matches!(m, RouteNetlinkMessage::DelNeighbour(_));
                let usable = entry.usable().filter(|_| !gone);
                let index = n.header.ifindex;
                self.hops.iter().any(|(ip, h)| {
                    h.addr == addr
                        // Hops put in by hand (tests) name no interface.
                        && self.hop_indexes.get(ip).is_none_or(|&i| i == index)
                        && usable != Some(h.mac)
                }) || (usable.is_some() && self.waiting.contains(&(addr, index)))
            }
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
            }
            _ => false,
        }
    }
}

/// The address and entry of neighbour message `n`.
fn parse_neighbour(n: &NeighbourMessage) -> Option<(IpAddr, Neighbour)> {
    let (mut addr, mut mac) = (None, None);
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                addr = Some(IpAddr::V4(*ip));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                addr = Some(IpAddr::V6(*ip));
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = l.as_slice().try_into().ok(),
            _ => {}
        }
    }
    let state = n.header.state;
    Some((addr?, Neighbour { state, mac }))
}

/// A neighbour entry as the kernel holds it.
#[derive(Debug, Clone)]
struct Neighbour {
    state: NeighbourState,
    mac: Option<[u8; 6]>,
}

impl Neighbour {
    /// The MAC frames may go to: an entry resolved, or set by hand (a stale
    /// entry is confirmed by the kernel as soon as it sends to it, and
    /// fails if nobody answers). Not a failed or incomplete resolution, nor
    /// a `noarp` entry, which holds the interface's own or the broadcast
    /// address.
    fn usable(&self) -> Option<[u8; 6]> {
        match self.state {
            NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent => self.mac,
            _ => None,
        }
    }
}

/// A netlink connection to the kernel's routing and neighbour tables.
#[derive(Debug, Clone)]
pub struct Resolver {
    handle: Handle,
}

/// Neighbour and route changes in the kernel: each message is a hint that
/// next hops may have changed.
pub type Changes = BoxStream<
    'static,
    (
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    ),
>;

impl Resolver {
    /// Opens a connection, served by a task on the current runtime.
    pub fn open() -> Result<Resolver> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket for next hops")?;
        tokio::spawn(connection);
        Ok(Resolver { handle })
    }

    /// Opens a connection, and another that receives the kernel's
    /// neighbour and route changes (on a socket of its own: its
    /// notifications must not mingle with the answers to requests).
    pub fn watching() -> Result<(Resolver, Changes)> {
        let (connection, _, changes) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
        ])
        .context("subscribing to neighbour and route changes")?;
        tokio::spawn(connection);
        Ok((Resolver::open()?, changes.boxed()))
    }

    /// The route to `backend`: its next hop (the gateway, else the backend
    /// itself) and the index of the interface it leaves by, as `ip route
    /// get` says; `None` when the kernel answers that there is none.
    async fn route(&self, backend: IpAddr) -> Result<Option<(IpAddr, u32)>> {
        let mut query = RouteMessage::default();
        (
            query.header.address_family,
            query.header.destination_prefix_length,
        ) = match backend {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        query
            .attributes
            .push(RouteAttribute::Destination(backend.into()));
        let route = match self.handle.route().get(query).execute().try_next().await {
            Ok(Some(route)) => route,
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("asking for the route to {backend}")),
        };
        // An unreachable, prohibit or blackhole route, or a local address,
        // comes back by `lo`: no next hop frames could go to.
        if route.header.kind != RouteType::Unicast {
            return Ok(None);
        }
        let (mut gateway, mut oif) = (None, None);
        for a in route.attributes {
            match a {
                RouteAttribute::Gateway(RouteAddress::Inet(g))
                | RouteAttribute::Via(RouteVia::Inet(g)) => gateway = Some(IpAddr::V4(g)),
                // RFC 5549's IPv4 route through an IPv6 router (`via inet6`,
                // as BGP unnumbered fabrics install them): its frames go to
                // that router's MAC, which neighbour discovery gives.
                RouteAttribute::Gateway(RouteAddress::Inet6(g))
                | RouteAttribute::Via(RouteVia::Inet6(g)) => gateway = Some(IpAddr::V6(g)),
                RouteAttribute::Oif(index) => oif = Some(index),
                _ => {}
            }
        }
        let index = oif.with_context(|| format!("the route to {backend} has no interface"))?;
        Ok(Some((gateway.unwrap_or(backend), index)))
    }

    /// The kernel's neighbour entries, by interface index and address.
    async fn neighbours(&self) -> Result<BTreeMap<(u32, IpAddr), Neighbour>> {
        let mut table = BTreeMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut dump = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            while let Some(n) = dump
                .try_next()
                .await
                .context("reading the neighbour table")?
            {
                if let Some((addr, entry)) = parse_neighbour(&n) {
                    table.insert((n.header.ifindex, addr), entry);
                }
            }
        }
        Ok(table)
    }

    /// Resolves every address: its route, then its next hop's neighbour
    /// entry, making the kernel resolve those it has no usable entry for
    /// and waiting up to [`RESOLVE_WAIT`] for them. An address lb could not
    /// ask the kernel about (a netlink failure, not the kernel's answer) is
    /// in neither part of the result: what was known of it stands.
    pub async fn resolve_all(&self, addrs: impl IntoIterator<Item = IpAddr>) -> Resolution {
        let mut out = Resolution::default();
        let mut pending = BTreeMap::new();
        // Interface names by index, asked once a round (each costs a
        // socket), not once a backend.
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        for ip in addrs {
            let route = self.route(ip).await.and_then(|r| {
                r.map(|(hop, index)| {
                    let dev = match names.entry(index) {
                        Entry::Occupied(e) => e.get().clone(),
                        Entry::Vacant(e) => e.insert(ifname(index)?).clone(),
                    };
                    Ok((hop, index, dev))
                })
                .transpose()
            });
            match route {
                Ok(Some(route)) => {
                    pending.insert(ip, route);
                }
                Ok(None) => {
                    out.unresolved.insert(ip, format!("no route to {ip}"));
                }
                Err(e) => warn!(backend = %ip, error = %format!("{e:#}"), "next hop not checked"),
            }
        }
        let deadline = Instant::now() + RESOLVE_WAIT;
        let mut triggered = false;
        let mut table = BTreeMap::new();
        while !pending.is_empty() {
            table = match self.neighbours().await {
                Ok(t) => t,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "next hops not checked");
                    return out;
                }
            };
            pending.retain(|ip, (hop, index, dev): &mut (IpAddr, u32, String)| {
                let Some(mac) = table.get(&(*index, *hop)).and_then(Neighbour::usable) else {
                    return true;
                };
                let (addr, dev) = (*hop, dev.clone());
                out.hops.insert(*ip, NextHop { mac, addr, dev });
                out.hop_indexes.insert(*ip, *index);
                false
            });
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            if !triggered {
                // One backend behind each next hop: a datagram to it takes
                // the route `route` found, so the kernel resolves that hop
                // on that interface. One to the hop itself would take the
                // hop's own route, which may leave by another interface
                // (an onlink gateway, policy routing): the entry waited
                // for would never appear.
                let mut behind = BTreeMap::new();
                for (ip, (hop, index, _)) in &pending {
                    behind.entry((*hop, *index)).or_insert(*ip);
                }
                trigger(behind.into_iter().map(|((_, index), ip)| (ip, index)));
                triggered = true;
            }
            tokio::time::sleep(RESOLVE_POLL).await;
        }
        for (ip, (hop, index, dev)) in pending {
            out.waiting.insert((hop, index));
            let state = match table.get(&(index, hop)).map(|n| n.state) {
                Some(NeighbourState::Failed) => "failed",
                Some(NeighbourState::Incomplete) => "not answered yet",
                _ => "not answered",
            };
            out.unresolved.insert(
                ip,
                format!("neighbour resolution of {hop} on {dev}: {state}"),
            );
        }
        out
    }
}

/// Where a datagram to `addr`, reached by interface `index`, is sent: its
/// discard port, on that interface for a link-local IPv6 address, which
/// without its scope is refused (EINVAL) and never resolved.
fn discard_address(addr: IpAddr, index: u32) -> SocketAddr {
    match addr {
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            SocketAddr::V6(std::net::SocketAddrV6::new(v6, DISCARD_PORT, 0, index))
        }
        _ => SocketAddr::new(addr, DISCARD_PORT),
    }
}

/// Sends an empty datagram to the discard port of each of `addrs` (address,
/// interface index of its route), which makes the kernel resolve their
/// next hops (it reports nothing: the answer is the neighbour table).
fn trigger(addrs: impl Iterator<Item = (IpAddr, u32)>) {
    let (mut v4, mut v6) = (None, None);
    for (addr, index) in addrs {
        let (socket, any) = match addr {
            IpAddr::V4(_) => (&mut v4, SocketAddr::from(([0u8; 4], 0))),
            IpAddr::V6(_) => (&mut v6, SocketAddr::from(([0u16; 8], 0))),
        };
        // A datagram to a neighbour being resolved is held, and charged
        // to its socket, until the neighbour answers or fails (seconds):
        // a few hundred fill a socket. Waiting for room would hold the
        // daemon's start up for as long (48 s for 4,096 unanswered
        // backends), so the socket does not block, and a full one is
        // replaced by a fresh one.
        for _ in 0..2 {
            if socket.is_none() {
                *socket = std::net::UdpSocket::bind(any)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .ok();
            }
            let Some(s) = socket.as_ref() else { break };
            match s.send_to(b"", discard_address(addr, index)) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => *socket = None,
                _ => break,
            }
        }
    }
}

/// The name of interface `index`.
fn ifname(index: u32) -> Result<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes the call may write.
    let p = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if p.is_null() {
        bail!("no interface with index {index}");
    }
    // SAFETY: on success, `name` holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overrun_may_have_lost_a_change_that_matters() {
        let message = |payload| {
            NetlinkMessage::new(rtnetlink::packet_core::NetlinkHeader::default(), payload)
        };
        let none = Resolution::default();
        assert!(none.affected_by(&message(NetlinkPayload::Overrun(Vec::new()))));
        assert!(!none.affected_by(&message(NetlinkPayload::Noop)));
    }

    #[test]
    fn a_neighbour_change_counts_on_the_hops_interface_only() {
        use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};
        let router: IpAddr = "fe80::1".parse().unwrap();
        let backend: IpAddr = "2001:2::11".parse().unwrap();
        let mac = [2, 0, 0, 0, 0, 1];
        let mut r = Resolution::default();
        r.hops.insert(
            backend,
            NextHop {
                mac,
                addr: router,
                dev: "eth0".into(),
            },
        );
        r.hop_indexes.insert(backend, 2);
        // The same router on another interface, with another MAC.
        let entry = |index: u32, mac: [u8; 6]| {
            let mut n = NeighbourMessage::default();
            n.header.ifindex = index;
            n.header.state = NeighbourState::Reachable;
            n.attributes = vec![
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(
                    "fe80::1".parse().unwrap(),
                )),
                NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
            ];
            NetlinkMessage::new(
                rtnetlink::packet_core::NetlinkHeader::default(),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)),
            )
        };
        let other = [2, 0, 0, 0, 0, 2];
        assert!(!r.affected_by(&entry(3, other)));
        assert!(r.affected_by(&entry(2, other)));
        assert!(!r.affected_by(&entry(2, mac)));
    }

    #[test]
    fn a_link_local_next_hop_is_resolved_on_its_interface() {
        let router: IpAddr = "fe80::1".parse().unwrap();
        match discard_address(router, 7) {
            SocketAddr::V6(a) => assert_eq!((a.scope_id(), a.port()), (7, DISCARD_PORT)),
            v4 => panic!("{v4}"),
        }
        let global: IpAddr = "2001:2::1".parse().unwrap();
        match discard_address(global, 7) {
            SocketAddr::V6(a) => assert_eq!(a.scope_id(), 0),
            v4 => panic!("{v4}"),
        }
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        assert_eq!(discard_address(v4, 7), SocketAddr::new(v4, DISCARD_PORT));
    }

    #[test]
    fn failed_and_incomplete_entries_are_not_used() {
        let mac = Some([2, 0, 0, 0, 0, 1]);
        let entry = |state| Neighbour { state, mac };
        assert_eq!(entry(NeighbourState::Reachable).usable(), mac);
        assert_eq!(entry(NeighbourState::Stale).usable(), mac);
        assert_eq!(entry(NeighbourState::Permanent).usable(), mac);
        assert_eq!(entry(NeighbourState::Failed).usable(), None);
        assert_eq!(entry(NeighbourState::Incomplete).usable(), None);
        let none = Neighbour {
            state: NeighbourState::Reachable,
            mac: None,
        };
        assert_eq!(none.usable(), None);
    }
}
