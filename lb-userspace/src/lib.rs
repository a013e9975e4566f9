//! `lb`: the control plane of an XDP L4 load balancer.
//!
//! # Layout
//! - [`config`]: the configuration file and its validation (pure).
//! - [`maglev`]: weighted Maglev table construction (pure).
//! - [`health`]: the per-backend health state machine (pure).
//! - [`probe`]: health probes.
//! - [`dataplane`]: the one owner of the eBPF object and its maps.
//! - [`netns`]: network namespaces, for the demo and the tests.
//! - [`demo`]: `lb demo`, the product end to end on an embedded default.

pub mod config;
pub mod dataplane;
pub mod demo;
pub mod health;
pub mod maglev;
pub mod netns;
pub mod probe;
