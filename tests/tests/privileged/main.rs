//! lb's privileged tests, in one binary: packet fixtures run through the
//! compiled XDP object with BPF_PROG_TEST_RUN, and namespace topologies with
//! real TCP/UDP traffic. Each needs root; see `lb_tests::privileged`.

mod agreement;
mod conntrack;
mod fixtures;
mod topology;
