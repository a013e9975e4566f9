//! A fleet of lb nodes sharing one desired state in etcd (docs/fleet.md).
//!
//! - [`state`]: the keys under the prefix and what they hold (pure).
//! - [`agree`]: the agreed health view and lockstep slow start (pure).
//! - [`registry`]: backends that register themselves, and their admission
//!   (pure).
//! - [`store`]: etcd reads, guarded writes, and the background session
//!   (watch, this node's status under a lease, the leader's work).

pub mod agree;
pub mod registry;
pub mod state;
pub mod store;
