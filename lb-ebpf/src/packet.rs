//! Bounds-checked packet access: the only raw-pointer `unsafe` on the packet
//! path. Every access checks `data + offset + size <= data_end` right before
//! it, in the form the verifier tracks.
//!
//! Verifier shape: callers read whole headers (or at least two bytes), never
//! a lone byte at a variable offset. For a one-byte access LLVM rewrites
//! `p + 1 > end` as `p >= end`, and the verifier derives no readable range
//! from that comparison when `p` has a variable offset.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

/// Pointer to a `T` at `off` bytes into the packet, if the packet holds it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Copies the `T` at `off` out of the packet.
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, off)?;
    // SAFETY: ptr_at checked that size_of::<T>() bytes at p lie inside the packet;
    // packet data has no alignment guarantee, hence read_unaligned.
    Some(unsafe { p.read_unaligned() })
}

/// Writes `value` at `off`; `None` if the packet is too short.
#[inline(always)]
pub fn store<T: Copy>(ctx: &XdpContext, off: usize, value: T) -> Option<()> {
    let p = ptr_at::<T>(ctx, off)?;
    // SAFETY: as in `load`; XDP packet data is writable.
    unsafe { p.write_unaligned(value) };
    Some(())
}

/// Big-endian u16 at `off`.
#[inline(always)]
pub fn load_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    load::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}

/// Length of the frame in bytes.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
