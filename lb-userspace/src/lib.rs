//! `lb`: the control plane of an XDP L4 load balancer.
//!
//! # Layout
//! - [`config`]: the configuration file and its validation (pure).
//! - [`config_edit`]: `service|backend add|del` as edits of the file's text (pure).
//! - [`maglev`]: weighted Maglev table construction (pure).
//! - [`health`]: the per-backend health state machine (pure).
//! - [`agent`]: the agent check's protocol and what an agent changes (pure).
//! - [`feedback`]: weights that follow probe latency (pure).
//! - [`probe`]: health probes.
//! - [`probe_path`]: probes through the VIP, by policy routes to one backend.
//! - [`neighbor`]: next-hop MACs from the kernel's tables.
//! - [`announce`]: which VIPs the node announces, and why not (pure).
//! - [`arp`]: whether a `dsr-l2` backend answers ARP for its VIP.
//! - [`routes`]: announced VIPs as kernel routes, through netlink.
//! - [`bird`]: BIRD's control socket, for the BGP sessions' state.
//! - [`fleet`]: the fleet's shared state in etcd, and the agreed health view.
//! - [`daemon`]: `lb daemon`: controller, probers, control API server.
//! - [`api`]: the control API's messages, and the client side.
//! - [`cli`]: the command line (daemon, operator commands, demo).
//! - [`dataplane`]: the one owner of the eBPF object and its maps.
//! - [`decap`]: `lb decap`, the decapsulator backends of `ipip` services run.
//! - [`registration`]: registrations signed for a standalone daemon's
//!   port (pure).
//! - [`host_agent`]: `lb agent`, which registers a backend host with the
//!   fleet and drains it on the way out.
//! - [`netns`]: network namespaces, for the demo and the tests.
//! - [`doctor`]: `lb doctor`, host and backend checks with their fixes.
//! - [`xdp_features`]: a NIC's XDP features, read passively through
//!   generic netlink.
//! - [`demo`]: `lb demo`, the product end to end on an embedded default.

pub mod agent;
pub mod announce;
pub mod api;
pub mod arp;
pub mod bird;
pub mod cli;
pub mod config;
pub mod config_edit;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod demo;
pub mod doctor;
pub mod feedback;
pub mod fleet;
pub mod health;
pub mod host_agent;
pub mod listen;
pub mod maglev;
pub mod neighbor;
pub mod netns;
pub mod probe;
pub mod probe_path;
pub mod registration;
pub mod routes;
pub mod xdp_features;
