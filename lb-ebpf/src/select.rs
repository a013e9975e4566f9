//! Backend choice: the connection table first, then the service's live
//! Maglev table indexed by the flow hash.

use core::ptr::NonNull;

use lb_common::{
    ACL_DENY, BACKEND_F_UP, BackendValue, ConntrackSettings, Counter, FLOW_F_CLOSED,
    FLOW_GENERATION_MASK, FLOW_SEEN_MASK, FlowEntry, FlowKey, FlowValue, SERVICE_F_AFFINITY,
    SERVICE_F_ALLOW_LIST, SERVICE_F_SOURCE_LIMIT, SERVICE_F_SOURCE_LISTS, ServiceValue,
    hash::{bucket_hash, flow_hash_of_bucket, maglev_slot, source_hash, source_tag},
    limits::NO_BACKEND,
    wire::{IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::maps::{self, Lookup};

/// The backend a packet goes to.
pub(crate) struct Choice {
    /// Backend id.
    pub id: u32,
    /// The backend, a whole copy.
    pub backend: BackendValue,
    /// Chosen by a Maglev lookup rather than a connection-table hit.
    pub new_flow: bool,
    /// The flow's [`bucket_hash`], which `ipip` spreads tunnels by (outer
    /// source, flow label): computed for every packet anyway, and one flow
    /// per tunnel spreads better than one client per tunnel.
    pub hash: u32,
}

/// Whether a remembered entry still stands: its backend is up and the id
/// still names the backend it was pinned to (same generation).
#[inline(always)]
fn stands(pinned: &FlowValue, backend: &BackendValue) -> bool {
    backend.flags & BACKEND_F_UP != 0
        && backend.generation & FLOW_GENERATION_MASK == pinned.generation
}

/// Whether `entry` of `flow`, a flow of `service`, has lapsed by the
/// data plane's clock.
#[inline(always)]
fn lapsed(
    ct: &ConntrackSettings,
    service: &ServiceValue,
    flow: &FlowKey,
    entry: &FlowValue,
) -> bool {
    entry.lapsed(ct.now, idle_timeout(ct, service, flow), ct.closed_timeout)
}

/// The idle timeout of `flow`'s entry: the service's own, else its
/// protocol's default.
#[inline(always)]
fn idle_timeout(ct: &ConntrackSettings, service: &ServiceValue, flow: &FlowKey) -> u32 {
    if service.idle_timeout != 0 {
        service.idle_timeout
    } else if flow.proto == IPPROTO_TCP {
        ct.tcp_idle_timeout
    } else {
        ct.udp_idle_timeout
    }
}

/// Whether `service` takes a new flow from `flow`'s source: not in its
/// deny list (deny wins: user space leaves out allow prefixes inside deny
/// ones, so the longest match says), and in its allow list if it has one.
/// The directory of blocks answers in one array read when it can, the trie
/// otherwise; for new flows only: user space removes the entries of flows
/// whose source a list change refuses, so their next packets come here. A
/// service without lists pays one flag test.
#[inline(always)]
fn admits(service: &ServiceValue, flow: &FlowKey) -> Result<(), Counter> {
    if service.flags & SERVICE_F_SOURCE_LISTS == 0 {
        return Ok(());
    }
    let refused = match maps::source_list(service.id, flow.family, &flow.src) {
        Some(ACL_DENY) => Counter::DropDenied,
        None if service.flags & SERVICE_F_ALLOW_LIST != 0 => Counter::DropNotAllowed,
        _ => return Ok(()),
    };
    maps::count_source_drop(service.id, refused == Counter::DropDenied);
    Err(refused)
}

/// Whether `service` takes another new flow from `flow`'s source prefix
/// now. Only packets that open a flow are limited, a TCP SYN or a UDP
/// packet without an entry: a TCP packet of an established connection
/// whose entry is gone (evicted, or never written under a flood) passes,
/// so established flows are never limited, and so do relayed ICMP errors
/// (`opens` false). A service without a limit pays one flag test.
#[inline(always)]
fn within_limit(
    ct: &ConntrackSettings,
    service: &ServiceValue,
    flow: &FlowKey,
    opens: bool,
) -> Result<(), Counter> {
    if service.flags & SERVICE_F_SOURCE_LIMIT == 0 || !opens {
        return Ok(());
    }
    let Some(limit) = maps::source_limit(service.id) else {
        return Ok(());
    };
    let prefix = limit.prefix_of(&flow.src);
    let hash = source_hash(service.id, &prefix);
    let place = hash as u32;
    // The kernel's coarse clock (its last tick), not the data plane's
    // whole seconds, which would hold a limit whose burst is below its rate
    // to one flow a second; not `bpf_ktime_get_ns`, which cost 35-45 ns a
    // SYN in the benchmark.
    let now_ns = maps::coarse_now_ns();
    if maps::take_source_rate(&limit, place, source_tag(hash), now_ns) {
        return Ok(());
    }
    maps::count_limited_source(service.id, &prefix, place, ct.now);
    Err(Counter::DropRateLimited)
}

/// Picks the service and backend of `flow`, whose packet carries
/// `tcp_flags` (0 for UDP). An established flow finds both through its
/// connection-table entry: the service in its slot by the id the entry
/// keeps, with no hash lookup. A TCP SYN ignores the entry (a
/// new connection on a reused 5-tuple must not inherit the old one's
/// backend), as does a lapsed entry (idle past its timeout) or one whose
/// service is gone. A FIN or RST marks the entry closed, which shortens its
/// life. `remember` is false for packets that must not create state
/// (relayed ICMP errors). `Err(PassNotService)` when the flow's
/// destination is no service; a drop once the service is known (its source
/// lists refusing the source, no backend) is counted against it.
#[inline(always)]
pub(crate) fn select_backend(
    ct: &ConntrackSettings,
    flow: &FlowKey,
    tcp_flags: u8,
    remember: bool,
) -> Result<(ServiceValue, Choice), Counter> {
    // SYN with RST or FIN opens nothing: it is no SYN here.
    let syn =
        flow.proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN;
    let closing = if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        FLOW_F_CLOSED
    } else {
        0
    };
    let now = ct.now;
    // The bucket hash finds the flow's entry and, on a miss, its Maglev
    // slot (the client address's own hash with client affinity).
    let bucket = bucket_hash(flow);
    // A SYN reads its entry only to spare a rewrite; with the insert budget
    // spent there will be no write, so it skips the lookup: a flood of SYNs
    // costs a Maglev lookup a packet, no bucket walk.
    let at = if syn && !maps::may_insert(ct) {
        Lookup::NONE
    } else {
        maps::conntrack_lookup(ct, flow, bucket, syn)
    };
    // The entry's service, if its slot still serves the flow.
    let slotted = at
        .hit
        .and_then(|(_, e)| maps::service_slot(e.service))
        .filter(|slot| slot.serves(flow))
        .map(|slot| slot.value);
    // The entry, if it stands: its slot still serves the flow, and it has
    // not lapsed.
    let standing = match (at.hit, slotted) {
        (Some((p, e)), Some(service)) if !lapsed(ct, &service, flow, &e) => Some((p, e, service)),
        _ => None,
    };
    if !syn
        && let Some((p, pinned, service)) = standing
        && let Some(backend) = maps::backend(pinned.backend)
        && stands(&pinned, &backend)
    {
        if remember {
            refresh(p, &pinned, now, pinned.flags | closing);
        }
        let choice = Choice {
            id: pinned.backend,
            backend,
            new_flow: false,
            hash: bucket,
        };
        return Ok((service, choice));
    }
    // A SYN on a flow whose entry stands (a retransmission) was admitted
    // when the entry was made. One after the connection closed opens a new
    // one, and a flow whose entry lapsed is a new flow again: both are
    // checked, and counted by the new-flow limit.
    let admitted = standing
        .filter(|(_, e, _)| !(syn && e.flags & FLOW_F_CLOSED != 0))
        .map(|(_, _, service)| service);
    let service = match admitted {
        Some(service) => service,
        None => {
            let service = match slotted {
                Some(service) => service,
                None => maps::service_of(flow).ok_or(Counter::PassNotService)?,
            };
            // Before the Maglev lookup and any write: a refused source
            // costs no state, and a denied one no place among the
            // limited service's recent sources.
            admits(&service, flow)?;
            let opens = remember && (syn || flow.proto == IPPROTO_UDP);
            within_limit(ct, &service, flow, opens)?;
            service
        }
    };
    let (id, backend) =
        maglev(flow, bucket, &service).inspect_err(|_| maps::count_service_drop(service.id))?;
    if remember {
        match at.hit {
            // Writing an entry costs more than updating one in place: a SYN
            // that picks the backend its entry names (a retransmitted SYN)
            // only refreshes it, and reopens it if it was closed.
            Some((p, old))
                if old.backend == id
                    && old.generation == backend.generation & FLOW_GENERATION_MASK
                    && old.service == service.id
                    && !lapsed(ct, &service, flow, &old) =>
            {
                refresh(p, &old, now, closing);
            }
            _ => maps::conntrack_put(
                ct,
                &at,
                flow,
                &FlowValue {
                    backend: id,
                    generation: backend.generation,
                    last_seen: now,
                    flags: closing,
                    service: service.id,
                },
                bucket,
            ),
        }
    }
    let choice = Choice {
        id,
        backend,
        new_flow: true,
        hash: bucket,
    };
    Ok((service, choice))
}

/// The backend `service`'s live Maglev table gives `flow` (whose
/// [`bucket_hash`] is `bucket`), and its value.
#[inline(always)]
fn maglev(
    flow: &FlowKey,
    bucket: u32,
    service: &ServiceValue,
) -> Result<(u32, BackendValue), Counter> {
    if service.ring_size == 0 {
        return Err(Counter::DropNoBackend);
    }
    let affinity = service.flags & SERVICE_F_AFFINITY != 0;
    let slot = maglev_slot(
        flow_hash_of_bucket(bucket, flow, affinity),
        service.ring_size,
    );
    let id = maps::ring_slot(service.ring_offset, slot).ok_or(Counter::DropNoBackend)?;
    if id == NO_BACKEND {
        return Err(Counter::DropNoBackend);
    }
    let backend = maps::backend(id).ok_or(Counter::DropNoBackend)?;
    // User space rebuilds the tables before it takes a backend down, so this
    // only guards against a table that names a backend not yet written (a
    // backend being rewritten as it is read is `None` above).
    if backend.flags & BACKEND_F_UP == 0 {
        return Err(Counter::DropNoBackend);
    }
    Ok((id, backend))
}

/// Brings the entry `seen` was read from up to date in place: its last
/// packet `now`, its flags `flags`. Writes only what changed: the time at
/// most once a second per flow.
#[inline(always)]
fn refresh(p: NonNull<FlowEntry>, seen: &FlowValue, now: u32, flags: u32) {
    let now = now & FLOW_SEEN_MASK;
    if seen.last_seen != now || flags != seen.flags {
        // SAFETY: an array element, never freed. Were it rewritten for
        // another flow meanwhile, this would only touch that flow's time and
        // flags, which the seal leaves out, never its backend.
        unsafe { (*p.as_ptr()).seen = FlowEntry::seen_of(now, flags) };
    }
}
