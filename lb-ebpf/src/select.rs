//! Backend choice: the connection table first, then the service's live
//! Maglev table indexed by the flow hash.

use lb_common::{
    BACKEND_F_UP, BackendValue, Counter, FlowKey, FlowValue, SERVICE_F_AFFINITY, ServiceValue,
    Settings, hash::flow_hash, limits::NO_BACKEND, ring_index,
};

use crate::maps;

/// The backend a packet goes to.
pub struct Choice {
    /// Backend id.
    pub id: u32,
    /// The backend.
    pub backend: BackendValue,
    /// Chosen by a Maglev lookup rather than a connection-table hit.
    pub new_flow: bool,
    /// The flow hash (also feeds the tunnel source address).
    pub hash: u32,
}

/// Picks the backend of `flow`. A TCP SYN (`repick`) skips the connection
/// table; a hit whose backend is no longer up, or whose id now names another
/// backend (generation changed), counts as a miss. `remember` is false for
/// packets that must not create state (relayed ICMP errors).
#[inline(always)]
pub fn select_backend(
    settings: &Settings,
    service: &ServiceValue,
    flow: &FlowKey,
    repick: bool,
    remember: bool,
) -> Result<Choice, Counter> {
    let affinity = service.flags & SERVICE_F_AFFINITY != 0;
    let hash = flow_hash(flow, affinity);
    if !repick
        && let Some(pinned) = maps::conntrack_get(flow)
        && let Some(backend) = maps::backend(pinned.backend)
        && backend.flags & BACKEND_F_UP != 0
        && backend.generation == pinned.generation
    {
        return Ok(Choice {
            id: pinned.backend,
            backend,
            new_flow: false,
            hash,
        });
    }
    let ring_size = settings.ring_size;
    if ring_size == 0 {
        return Err(Counter::DropNoBackend);
    }
    let slot = hash % ring_size;
    let id = maps::ring_slot(ring_index(
        service.id,
        service.active_ring & 1,
        ring_size,
        slot,
    ))
    .ok_or(Counter::DropNoBackend)?;
    if id == NO_BACKEND {
        return Err(Counter::DropNoBackend);
    }
    let backend = maps::backend(id).ok_or(Counter::DropNoBackend)?;
    // User space rebuilds the tables before it takes a backend down, so this
    // only guards against a table that names a backend not yet written.
    if backend.flags & BACKEND_F_UP == 0 {
        return Err(Counter::DropNoBackend);
    }
    if remember {
        maps::conntrack_put(
            flow,
            &FlowValue {
                backend: id,
                generation: backend.generation,
            },
        );
    }
    Ok(Choice {
        id,
        backend,
        new_flow: true,
        hash,
    })
}
