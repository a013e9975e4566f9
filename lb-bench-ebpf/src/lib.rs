//! The ABI of lb's benchmark-only XDP programs, shared by the programs (the
//! `lb-bench-ebpf` binary, built for the BPF target) and the benchmark
//! driver (`lb-bench`, with the `user` feature).
//!
//! None of this ships in lb's own object: the programs here are floors to
//! compare the load balancer with, references that do one
//! connection-table operation, and a wrapper that makes BPF_PROG_TEST_RUN's
//! repeat count measure what it claims to.
//!
//! # Why a reset wrapper
//!
//! With a repeat count the kernel runs the program again on the buffer the
//! previous iteration left behind (net/bpf/test_run.c, `bpf_test_run`). A
//! program that encapsulates sees its own output from the second iteration
//! on, and a flow that missed the connection table on the first iteration
//! hits it on every later one. [`PROG_RESET`] restores the input frame
//! (and, optionally, gives each iteration its own flow) before it tail-calls
//! the program under test through [`MAP_TARGET`]. It lets its own stores
//! settle first: a frame a NIC wrote has none pending, and a word load
//! that straddles two stores still in the CPU's store buffer waits for
//! them, which would charge a program for how wide its loads are.
#![no_std]

use core::mem::size_of;

/// Bytes of every benchmark frame. One size for every path, so that paths
/// compare like with like: it holds Ethernet + IPv6 + TCP (74 bytes) with
/// room to spare, and is a multiple of 8 so the wrapper copies whole words.
pub const FRAME_LEN: usize = 128;

/// [`FRAME_LEN`] in 8-byte words.
pub const FRAME_WORDS: usize = FRAME_LEN / 8;

/// Mask that keeps a field offset inside the frame, so the verifier sees a
/// bounded offset (offsets are checked against the frame end as well).
pub const FIELD_OFFSET_MASK: u16 = (FRAME_LEN - 1) as u16;

/// The trivial floor: returns XDP_PASS.
pub const PROG_PASS: &str = "bench_pass";
/// The parse-and-swap floor: parses Ethernet, IPv4 or IPv6 and TCP with
/// bounds checks, swaps the MACs and returns XDP_TX.
pub const PROG_SWAP: &str = "bench_swap";
/// Reference for lb's connection-table insert: parses like [`PROG_SWAP`],
/// builds the flow's key (lb's `FlowKey` shape), inserts it into an LRU
/// hash shaped like lb's connection table, counts, swaps, XDP_TX.
pub const PROG_LRU_INSERT: &str = "bench_lru_insert";
/// Reference for lb's connection-table hit: as [`PROG_LRU_INSERT`] but a
/// lookup, XDP_TX on a hit and XDP_DROP on a miss.
pub const PROG_LRU_LOOKUP: &str = "bench_lru_lookup";
/// The live benchmark's sink, on the generator's interface: counts every
/// frame the program under test sent back ([`MAP_SINK_COUNT`]) and drops it.
/// A veth peer needs an XDP program of its own to receive XDP_TX frames.
pub const PROG_SINK: &str = "bench_sink";
/// The reset wrapper: restores the frame, then tail-calls slot
/// [`TARGET_SLOT`] of [`MAP_TARGET`].
pub const PROG_RESET: &str = "bench_reset";

/// Program array the wrapper tail-calls into (u32 → program fd).
pub const MAP_TARGET: &str = "BENCH_TARGET";
/// The wrapper's configuration: index 0 → [`ResetConfig`] (array).
pub const MAP_RESET_CONFIG: &str = "BENCH_RESET_CONFIG";
/// The wrapper's per-CPU state: index 0 → [`ResetState`] (per-CPU array).
pub const MAP_RESET_STATE: &str = "BENCH_RESET_STATE";

/// The LRU hash of the reference programs: flow key → u64, the common LRU
/// list, capacity set at load to lb's connection table's.
pub const MAP_LRU: &str = "BENCH_LRU";
/// The reference programs' counters (per-CPU array of u64, [`LruCounter`]).
pub const MAP_LRU_COUNTERS: &str = "BENCH_LRU_COUNTERS";

/// Frames the sink received: per-CPU array, one u64.
pub const MAP_SINK_COUNT: &str = "BENCH_SINK_COUNT";

/// Bytes of the reference programs' flow key: lb's `FlowKey`.
pub const FLOW_KEY_LEN: usize = 40;

/// What the reference programs count, one per-CPU slot each, so a run can
/// prove that every iteration inserted or hit.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LruCounter {
    /// Inserts the kernel accepted.
    Inserted = 0,
    /// Lookups that found the flow.
    Hit = 1,
    /// Lookups that did not.
    Missed = 2,
}

impl LruCounter {
    /// Slots in [`MAP_LRU_COUNTERS`].
    pub const COUNT: u32 = 3;
}

/// The slot of [`MAP_TARGET`] that holds the program under test.
pub const TARGET_SLOT: u32 = 0;

/// XDP_ABORTED: what the wrapper returns when it cannot reset the frame or
/// the tail call fails, so such a run can never pass for the path measured.
pub const XDP_ABORTED: u32 = 0;

/// What the wrapper writes before every iteration. Byte order: `frame` is
/// raw frame bytes; the integers are host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetConfig {
    /// The input frame as 8-byte words (the bytes in memory order), so the
    /// wrapper copies it with whole-word loads and stores.
    pub frame: [u64; FRAME_WORDS],
    /// Flow index of the first iteration.
    pub flow_base: u32,
    /// Flows cycled through: iteration `i` gets flow index
    /// `flow_base + (i * stride) % flows`; 0 never wraps (every iteration a
    /// new flow, `flow_base + i`).
    pub flows: u32,
    /// Offset of the two bytes that take the flow index's low 16 bits,
    /// big-endian (the last two bytes of the source address).
    pub addr_off: u16,
    /// Offset of the two bytes that take `port_base + (index >> 16)`,
    /// big-endian (the source port).
    pub port_off: u16,
    /// Source port of flow indexes 0 to 65535.
    pub port_base: u16,
    /// Step through the cycle, coprime with `flows` so that each pass
    /// visits every flow once: 1 visits them in order.
    pub stride: u16,
}

/// The wrapper's state on one CPU; user space zeroes it before each run.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetState {
    /// Iterations that restored the frame and reached the tail call: equal
    /// to the repeat count when every iteration went through the wrapper.
    pub iterations: u64,
    /// Position in the flow cycle (`0..flows`).
    pub next: u32,
    /// Zero.
    pub _pad: u32,
}

const _: () = assert!(FRAME_LEN.is_multiple_of(8) && FRAME_LEN.is_power_of_two());
const _: () = assert!(size_of::<ResetConfig>() == FRAME_LEN + 16);
const _: () = assert!(size_of::<ResetState>() == 16);

impl ResetConfig {
    /// A configuration for `frame` (at most [`FRAME_LEN`] bytes; the rest
    /// is zero) that gives every iteration flow `flow_base` unless `flows`
    /// says otherwise.
    pub fn new(frame: &[u8], addr_off: u16, port_off: u16, port_base: u16) -> Self {
        let mut bytes = [0u8; FRAME_LEN];
        let len = frame.len().min(FRAME_LEN);
        bytes[..len].copy_from_slice(&frame[..len]);
        let mut words = [0u64; FRAME_WORDS];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            *word = u64::from_ne_bytes(w);
        }
        ResetConfig {
            frame: words,
            flow_base: 0,
            flows: 1,
            addr_off,
            port_off,
            port_base,
            stride: 1,
        }
    }

    /// The frame bytes of flow `index`, as the wrapper writes them.
    pub fn frame_of(&self, index: u32) -> [u8; FRAME_LEN] {
        let mut bytes = [0u8; FRAME_LEN];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(self.frame) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        let addr = (self.addr_off & FIELD_OFFSET_MASK) as usize;
        let port = (self.port_off & FIELD_OFFSET_MASK) as usize;
        bytes[addr..addr + 2].copy_from_slice(&(index as u16).to_be_bytes());
        let sport = self.port_base.wrapping_add((index >> 16) as u16);
        bytes[port..port + 2].copy_from_slice(&sport.to_be_bytes());
        bytes
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::ResetConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ResetState {}
}
