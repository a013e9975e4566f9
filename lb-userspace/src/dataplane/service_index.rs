//! The service index (`LB_SERVICE_INDEX`): service ids placed by a hash of
//! their key ([`service_index`]), which the data plane reads for packets
//! without a connection-table entry instead of the services hash. Built
//! whole from the live services, by id, so the same services always give
//! the same index; a change writes only the elements that differ.

use std::collections::BTreeMap;

use lb_common::{
    ServiceIndexEntry, ServiceKey,
    hash::service_index,
    limits::{NO_SERVICE, SERVICE_INDEX_ELEMENTS},
};

/// The index as written, and the services it was built from.
#[derive(Debug)]
pub(super) struct ServiceIndex {
    services: BTreeMap<u32, ServiceKey>,
    elements: Vec<ServiceIndexEntry>,
}

impl Default for ServiceIndex {
    fn default() -> Self {
        Self::new(BTreeMap::new())
    }
}

impl ServiceIndex {
    /// The index of `services` (id → key).
    pub(super) fn new(services: BTreeMap<u32, ServiceKey>) -> Self {
        let elements = build(&services);
        ServiceIndex { services, elements }
    }

    /// Every element, for a map written whole.
    pub(super) fn elements(&self) -> Vec<(u32, ServiceIndexEntry)> {
        (0..).zip(self.elements.iter().copied()).collect()
    }

    /// Service `id` now has `key` (`None`: no service has it): the
    /// elements that change, to write.
    pub(super) fn set(
        &mut self,
        id: u32,
        key: Option<ServiceKey>,
    ) -> Vec<(u32, ServiceIndexEntry)> {
        match key {
            Some(k) => self.services.insert(id, k),
            None => self.services.remove(&id),
        };
        let next = build(&self.services);
        let changed = (0..)
            .zip(next.iter().copied())
            .filter(|&(i, e)| self.elements[i as usize] != e)
            .collect();
        self.elements = next;
        changed
    }

    /// Services the index has no way for (found by the services hash).
    pub(super) fn overflow(&self) -> usize {
        let placed = self
            .elements
            .iter()
            .flat_map(|e| e.ids)
            .filter(|&id| id != NO_SERVICE)
            .count();
        self.services.len() - placed
    }
}

/// The element of `key`.
fn element_of(key: &ServiceKey) -> usize {
    service_index(&key.addr, key.port, key.proto) as usize
}

/// The index of `services` (id → key): each in the first free way of its
/// element, in order of id; one with no free way is left out.
fn build(services: &BTreeMap<u32, ServiceKey>) -> Vec<ServiceIndexEntry> {
    let mut elements = vec![ServiceIndexEntry::default(); SERVICE_INDEX_ELEMENTS as usize];
    for (&id, key) in services {
        let e = &mut elements[element_of(key)];
        if let Some(way) = e.ids.iter_mut().find(|w| **w == NO_SERVICE) {
            *way = id;
        }
    }
    elements
}

#[cfg(test)]
mod tests {
    use lb_common::{FAMILY_V4, limits::SERVICE_INDEX_WAYS};
    use proptest::prelude::*;

    use super::*;

    fn key(vip: u32, port: u16) -> ServiceKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&vip.to_be_bytes());
        ServiceKey {
            addr,
            port: port.to_be(),
            proto: 6,
            family: FAMILY_V4,
        }
    }

    /// Whether the data plane finds `id` for `key` through `elements`.
    fn indexed(elements: &[ServiceIndexEntry], key: &ServiceKey, id: u32) -> bool {
        elements[element_of(key)].ids.contains(&id)
    }

    #[test]
    fn an_empty_index_names_no_service() {
        let index = ServiceIndex::default();
        assert_eq!(index.elements().len(), SERVICE_INDEX_ELEMENTS as usize);
        assert!(
            index
                .elements()
                .iter()
                .all(|(_, e)| e.ids == [NO_SERVICE; SERVICE_INDEX_WAYS])
        );
        assert_eq!(index.overflow(), 0);
    }

    #[test]
    fn a_change_writes_only_the_elements_that_differ() {
        let mut index = ServiceIndex::default();
        let web = key(0xc612_0101, 80);
        let changed = index.set(3, Some(web));
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0 as usize, element_of(&web));
        assert!(indexed(&index.elements, &web, 3));
        // The same again changes nothing.
        assert!(index.set(3, Some(web)).is_empty());
        // Removed: its element is empty again.
        let changed = index.set(3, None);
        assert_eq!(
            changed,
            vec![(element_of(&web) as u32, ServiceIndexEntry::default())]
        );
    }

    proptest! {
        #[test]
        fn every_service_is_indexed_unless_its_element_is_full(
            services in proptest::collection::btree_map(0u32..5000, (any::<u32>(), any::<u16>()), 0..300),
            removed in proptest::collection::vec(0u32..5000, 0..50),
        ) {
            let mut index = ServiceIndex::default();
            let mut written = index.elements.clone();
            let mut live = BTreeMap::new();
            for (&id, &(vip, port)) in &services {
                for (i, e) in index.set(id, Some(key(vip, port))) {
                    written[i as usize] = e;
                }
                live.insert(id, key(vip, port));
            }
            for id in removed {
                for (i, e) in index.set(id, None) {
                    written[i as usize] = e;
                }
                live.remove(&id);
            }
            // What was written is the index of the services left, built
            // afresh: no trace of a removed one.
            prop_assert_eq!(&written, &build(&live));
            let mut unplaced = 0;
            for (&id, k) in &live {
                if !indexed(&written, k, id) {
                    // Left to the services hash: only when its element is
                    // full of other services' ids.
                    let e = written[element_of(k)];
                    prop_assert!(e.ids.iter().all(|&o| o != NO_SERVICE && o != id));
                    unplaced += 1;
                }
            }
            prop_assert_eq!(unplaced, index.overflow());
            // No id twice.
            let mut ids: Vec<u32> = written.iter().flat_map(|e| e.ids).filter(|&i| i != NO_SERVICE).collect();
            let n = ids.len();
            ids.sort_unstable();
            ids.dedup();
            prop_assert_eq!(ids.len(), n);
        }
    }
}
