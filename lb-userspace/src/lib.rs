//! `lb`: the control plane of an XDP L4 load balancer.
//!
//! # Layout
//! - [`maglev`]: weighted Maglev table construction (pure).
//! - [`dataplane`]: the one owner of the eBPF object and its maps.

pub mod dataplane;
pub mod maglev;
