//! The kernel/user ABI of `lb`: everything the XDP programs and the control
//! plane must agree on, and nothing else.
//!
//! # Layout
//! - [`limits`]: capacities and sizes, each with its derivation.
//! - [`maps`]: the names of the maps, as both sides spell them.
//! - [`types`]: map keys and values (`#[repr(C)]`, explicit padding, size asserts).
//! - [`counters`]: the global pass/drop/forward reasons.
//! - [`hash`]: the flow and bucket hashes, one implementation for the kernel and user space.
//! - [`wire`]: protocol numbers and header sizes.
//!
//! Byte order: addresses and ports are kept as they appear on the wire
//! (network byte order); every other integer is host order.
#![no_std]

pub mod counters;
pub mod hash;
pub mod limits;
pub mod maps;
pub mod types;
pub mod wire;

pub use counters::{Counter, ForwardWay};
pub use types::*;
