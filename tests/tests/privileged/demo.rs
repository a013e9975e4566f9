//! The README's first command runs `lb demo`: it must pass end to end
//! (topology, weighted spread, eviction, re-admission) and leave nothing behind.

use lb_tests::privileged;

#[test]
fn the_demo_runs_end_to_end() {
    if !privileged() {
        return;
    }
    lb::demo::run().unwrap();
}
