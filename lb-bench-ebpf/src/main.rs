//! Benchmark-only XDP programs: the floors lb is compared with, references
//! that do one connection-table operation and nothing else, and the reset
//! wrapper (see the library's docs for why it exists).
//!
//! The floors are deliberately minimal but honest: `bench_swap` does the
//! bounds checks any XDP forwarder must do before it may touch a packet,
//! and reads the fields it checks so the compiler cannot drop the loads.
//! The references add one LRU-hash insert or lookup keyed like lb's
//! connection table, so the report can say how much of lb's cost is that
//! map operation.
#![no_std]
#![no_main]
// The locked add in `reset`: BPF inline assembly is unstable in Rust.
#![feature(asm_experimental_arch)]

use core::arch::asm;

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, LruHashMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_bench_ebpf::{
    FIELD_OFFSET_MASK, FLOW_KEY_LEN, FRAME_LEN, LruCounter, ResetConfig, ResetState, TARGET_SLOT,
    XDP_ABORTED,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6,
    limits::DEFAULT_CONNTRACK_ENTRIES,
    wire::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPV4_HLEN, IPV6_HLEN, TCP_HLEN},
};

/// The program under test, in slot `TARGET_SLOT`.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The wrapper's configuration, one entry.
#[map]
static BENCH_RESET_CONFIG: Array<ResetConfig> = Array::with_max_entries(1, 0);

/// The wrapper's per-CPU state, one entry.
#[map]
static BENCH_RESET_STATE: PerCpuArray<ResetState> = PerCpuArray::with_max_entries(1, 0);

/// The reference programs' connection table, shaped like lb's (one hash,
/// the common LRU list); user space sets the capacity to lb's.
#[map]
static BENCH_LRU: LruHashMap<[u8; FLOW_KEY_LEN], u64> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// The reference programs' counters, indexed by `LruCounter`.
#[map]
static BENCH_LRU_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LruCounter::COUNT, 0);

/// The sink's count of frames received, one per-CPU slot.
#[map]
static BENCH_SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Floor: the cheapest XDP program there is.
#[xdp]
pub(crate) fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Floor: parse Ethernet, IPv4/IPv6 and TCP, swap the MACs, send it back.
/// Anything it cannot parse passes.
#[xdp]
pub(crate) fn bench_swap(ctx: XdpContext) -> u32 {
    swap_and_send(&ctx)
}

/// Reference: parse, insert the flow into an LRU hash, swap MACs.
#[xdp]
pub(crate) fn bench_lru_insert(ctx: XdpContext) -> u32 {
    let Some(key) = flow_key(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    if BENCH_LRU.insert(key, 0, 0).is_ok() {
        count(LruCounter::Inserted);
    }
    swap_and_send(&ctx)
}

/// Reference: parse, look the flow up in an LRU hash, swap MACs on a hit.
#[xdp]
pub(crate) fn bench_lru_lookup(ctx: XdpContext) -> u32 {
    let Some(key) = flow_key(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    if BENCH_LRU.get_ptr(key).is_none() {
        count(LruCounter::Missed);
        return xdp_action::XDP_DROP;
    }
    count(LruCounter::Hit);
    swap_and_send(&ctx)
}

/// The live benchmark's sink: count the frame, drop it.
#[xdp]
pub(crate) fn bench_sink(_ctx: XdpContext) -> u32 {
    if let Some(p) = BENCH_SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
    xdp_action::XDP_DROP
}

/// Restores the input frame, then runs the program under test on it.
#[xdp]
pub(crate) fn bench_reset(ctx: XdpContext) -> u32 {
    if reset(&ctx).is_none() {
        return XDP_ABORTED;
    }
    // SAFETY: a tail call on our own context; on success it does not return.
    unsafe { BENCH_TARGET.tail_call(&ctx, TARGET_SLOT) };
    XDP_ABORTED
}

/// Pointer to `size` bytes at `off`, if the packet holds them.
#[inline(always)]
fn bytes_at(ctx: &XdpContext, off: usize, size: usize) -> Option<usize> {
    let p = ctx.data() + off;
    if p + size > ctx.data_end() {
        return None;
    }
    Some(p)
}

/// Copies the `T` at `off` out of the packet. Callers read whole headers:
/// a lone byte at a variable offset defeats the verifier's range tracking
/// (see lb-ebpf's `packet` module).
#[inline(always)]
fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    let p = bytes_at(ctx, off, size_of::<T>())?;
    // SAFETY: bytes_at checked the packet holds size_of::<T>() bytes at p;
    // packet data has no alignment guarantee, hence read_unaligned.
    Some(unsafe { (p as *const T).read_unaligned() })
}

/// The floor's ending: swap the MACs and send the frame back (XDP_TX), or
/// pass what does not parse.
#[inline(always)]
fn swap_and_send(ctx: &XdpContext) -> u32 {
    match swap_macs(ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let eth = load::<[u8; ETH_HLEN]>(ctx, 0)?;
    let l4_off = match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let ip = load::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN)?;
            let ihl = (ip[0] & 0x0f) as usize;
            if ip[0] >> 4 != 4 || ihl < 5 || ip[9] != IPPROTO_TCP {
                return None;
            }
            ETH_HLEN + ihl * 4
        }
        ETH_P_IPV6 => {
            let ip = load::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN)?;
            if ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP {
                return None;
            }
            ETH_HLEN + IPV6_HLEN
        }
        _ => return None,
    };
    let tcp = load::<[u8; TCP_HLEN]>(ctx, l4_off)?;
    if ((tcp[12] >> 4) as usize) * 4 < TCP_HLEN {
        return None;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&eth[6..12]);
    macs[6..].copy_from_slice(&eth[..6]);
    let p = bytes_at(ctx, 0, macs.len())?;
    // SAFETY: bytes_at checked the 12 bytes; XDP packet data is writable.
    unsafe { (p as *mut [u8; 12]).write_unaligned(macs) };
    Some(())
}

/// Adds one to the reference programs' counter `c`.
#[inline(always)]
fn count(c: LruCounter) {
    if let Some(p) = BENCH_LRU_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// The flow key lb would build (addresses, ports, protocol, family) of an
/// IPv4 or IPv6 TCP packet.
#[inline(always)]
fn flow_key(ctx: &XdpContext) -> Option<[u8; FLOW_KEY_LEN]> {
    let eth = load::<[u8; ETH_HLEN]>(ctx, 0)?;
    let mut key = [0u8; FLOW_KEY_LEN];
    let l4_off = match u16::from_be_bytes([eth[12], eth[13]]) {
        ETH_P_IP => {
            let ip = load::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN)?;
            let ihl = (ip[0] & 0x0f) as usize;
            if ip[0] >> 4 != 4 || ihl < 5 || ip[9] != IPPROTO_TCP {
                return None;
            }
            key[..4].copy_from_slice(&ip[12..16]);
            key[16..20].copy_from_slice(&ip[16..20]);
            key[37] = FAMILY_V4;
            ETH_HLEN + ihl * 4
        }
        ETH_P_IPV6 => {
            let ip = load::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN)?;
            if ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP {
                return None;
            }
            key[..32].copy_from_slice(&ip[8..40]);
            key[37] = FAMILY_V6;
            ETH_HLEN + IPV6_HLEN
        }
        _ => return None,
    };
    let ports = load::<[u8; 4]>(ctx, l4_off)?;
    key[32..36].copy_from_slice(&ports);
    key[36] = IPPROTO_TCP;
    Some(key)
}

/// Puts the configured frame back, with this iteration's flow written in.
#[inline(always)]
fn reset(ctx: &XdpContext) -> Option<()> {
    let config = BENCH_RESET_CONFIG.get(0)?;
    let state = BENCH_RESET_STATE.get_ptr_mut(0)?;
    // The program under test may have moved the head (an encapsulation
    // prepends a header); move it back so the frame starts where it did.
    // Called even when the delta is 0, so every path pays the same.
    let delta = (ctx.data_end() - ctx.data()) as i32 - FRAME_LEN as i32;
    // SAFETY: plain helper call on our own context; the kernel checks delta.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return None;
    }
    // One helper call copies the frame: the BPF backend splits unaligned
    // stores into single bytes, which would make the wrapper cost eight
    // times more instructions than the copy needs.
    // SAFETY: the source is FRAME_LEN bytes of map value; the helper
    // checks that the packet holds offset 0..FRAME_LEN.
    let copied = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            0,
            config.frame.as_ptr() as *mut c_void,
            FRAME_LEN as u32,
        )
    };
    if copied != 0 {
        return None;
    }
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    let s = unsafe { &mut *state };
    let step = if config.flows != 0 {
        (u64::from(s.next) * u64::from(config.stride) % u64::from(config.flows)) as u32
    } else {
        s.next
    };
    let index = config.flow_base.wrapping_add(step);
    s.next += 1;
    if config.flows != 0 && s.next >= config.flows {
        s.next = 0;
    }
    store_be16(ctx, config.addr_off, index as u16)?;
    store_be16(
        ctx,
        config.port_off,
        config.port_base.wrapping_add((index >> 16) as u16),
    )?;
    // Counted with a locked add: the x86 JIT's `lock add` waits for every
    // store above to leave the store buffer, so the program under test
    // reads a frame at rest, as a NIC's DMA leaves it (see the library's
    // docs). Assembly that may write memory: LLVM keeps the stores above it.
    // SAFETY: this CPU's u64, 8-aligned; no other program runs on it
    // meanwhile.
    unsafe {
        asm!(
            "lock *(u64 *)({p} + 0) += {v}",
            p = in(reg) &mut s.iterations as *mut u64,
            v = in(reg) 1u64,
            options(nostack),
        );
    }
    Some(())
}

/// Writes `value` big-endian at `off` (masked into the frame).
#[inline(always)]
fn store_be16(ctx: &XdpContext, off: u16, value: u16) -> Option<()> {
    let off = (off & FIELD_OFFSET_MASK) as usize;
    let p = bytes_at(ctx, off, 2)?;
    // SAFETY: bytes_at checked the two bytes at p.
    unsafe { (p as *mut [u8; 2]).write_unaligned(value.to_be_bytes()) };
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel requires a GPL-compatible license for some helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
