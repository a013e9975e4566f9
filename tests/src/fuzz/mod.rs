//! A packet fuzzer for `lb_xdp`: generated frames run through the compiled
//! program with BPF_PROG_TEST_RUN, every verdict checked against
//! properties that must hold for any input:
//!
//! 1. a frame not for a configured service is passed, unmodified;
//! 2. a malformed frame is never forwarded, and is counted; a dropped or
//!    passed frame is never modified;
//! 3. a forwarded frame is well formed (`dsr-l2`: only the MACs changed;
//!    `ipip`: a valid outer header toward the backend around the input's
//!    IP packet; `gue`: the same with a valid UDP header between), its
//!    backend is up, a member of the service, and the one the documented
//!    rules pick, and it leaves by the backend's interface, from its MAC,
//!    within its MTU (XDP_TX, or XDP_REDIRECT to the lab's second one);
//! 4. exactly one global counter moves per frame, and it agrees with the
//!    verdict (`pass_*` pass, `drop_*` drop, `forward_*` and `reply_*`
//!    transmit, `redirect_*` redirect).
//!
//! # Layout
//! - [`generate`]: seeded frames: valid frames of every shape, mutated at
//!   every field, truncated at every offset, random bytes.
//! - [`reference`](mod@reference): an independent, simple classifier written from
//!   docs/dataplane.md: is a frame a well-formed packet of a service?
//! - [`world`]: the lab (services in every mode and both families, backends
//!   down, draining, reused, none, behind a second interface or one that
//!   is gone), the model of its connection table, and
//!   the check of one verdict.
//! - [`shrink`]: makes a failing frame smaller for the report.

pub mod generate;
pub mod reference;
pub mod world;

use lb_common::wire::ETH_HLEN;

use world::World;

/// `bytes` as lowercase hex, no separators (paste into `LB_FUZZ_FRAME`).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string (whitespace ignored), or `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// Shrinks `frame`, which breaks `property`, into a smaller frame that
/// still breaks it: cuts the tail, then zeroes bytes one at a time, while
/// the same property keeps failing; at most `budget` runs. The result is
/// for the report: fewer non-zero bytes are fewer to explain.
pub fn shrink(world: &mut World, frame: &[u8], property: &str, budget: usize) -> Vec<u8> {
    let mut best = frame.to_vec();
    let mut runs = 0;
    let fails = |world: &mut World, runs: &mut usize, candidate: &[u8]| {
        *runs += 1;
        matches!(world.check(candidate), Err(f) if f.property == property)
    };
    let mut progress = true;
    while progress {
        progress = false;
        while best.len() > ETH_HLEN
            && runs < budget
            && fails(world, &mut runs, &best[..best.len() - 1])
        {
            best.pop();
            progress = true;
        }
        for i in 0..best.len() {
            if best[i] == 0 || runs >= budget {
                continue;
            }
            let mut candidate = best.clone();
            candidate[i] = 0;
            if fails(world, &mut runs, &candidate) {
                best = candidate;
                progress = true;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let bytes = [0x00, 0x0f, 0xa0, 0xff];
        assert_eq!(hex(&bytes), "000fa0ff");
        assert_eq!(unhex("00 0f a0ff").as_deref(), Some(&bytes[..]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
