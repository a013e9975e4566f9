//! lb's privileged tests, in one binary: packet fixtures run through the
//! compiled XDP object with BPF_PROG_TEST_RUN, and namespace topologies with
//! real TCP/UDP traffic. Each needs root; see `lb_tests::privileged`.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail loudly, like the tests"
)]

mod acl;
mod agent;
mod agreement;
mod announce;
mod backends;
mod capacity;
mod conntrack;
mod daemon;
mod decap;
mod demo;
mod faults;
mod fixtures;
mod fleet;
mod flood;
mod fuzz;
mod interfaces;
mod limits;
mod next_hops;
mod package;
mod panic_rule;
mod probes;
mod readme;
mod service_index;
mod status_page;
mod systemd;
mod topology;
mod weights;
