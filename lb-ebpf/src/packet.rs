//! Bounds-checked packet access: the only raw-pointer `unsafe` on the packet
//! path. Every access checks `data + offset + size <= data_end` right before
//! it, in the form the verifier tracks.
//!
//! Verifier shape: callers read whole headers (or at least two bytes), never
//! a lone byte at a variable offset. For a one-byte access LLVM rewrites
//! `p + 1 > end` as `p >= end`, and the verifier derives no readable range
//! from that comparison when `p` has a variable offset.

use aya_ebpf::programs::XdpContext;
use core::{arch::asm, mem::MaybeUninit};

/// Pointer to a `T` at `off` bytes into the packet, if the packet holds it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Copies the `T` at `off` out of the packet, in 8-byte words and then
/// the 4-, 2- and 1-byte rest, into an 8-byte-aligned buffer: the fields
/// are then read from registers or aligned stack words, not byte by byte.
#[inline(always)]
pub(crate) fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    let src = ptr_at::<T>(ctx, off)? as usize;
    let mut buf = Aligned::<T>(MaybeUninit::uninit());
    let dst = buf.0.as_mut_ptr() as *mut u8;
    let n = size_of::<T>();
    let mut i = 0;
    // SAFETY: ptr_at checked that the n bytes at src lie inside the packet;
    // every write lands inside buf at an offset aligned for its width (the
    // widths only shrink, and buf is 8-byte aligned).
    unsafe {
        while i + 8 <= n {
            (dst.add(i) as *mut u64).write(read_u64(src + i));
            i += 8;
        }
        if i + 4 <= n {
            (dst.add(i) as *mut u32).write(read_u32(src + i));
            i += 4;
        }
        if i + 2 <= n {
            (dst.add(i) as *mut u16).write((src as *const u16).byte_add(i).read_unaligned());
            i += 2;
        }
        if i < n {
            dst.add(i).write((src as *const u8).add(i).read());
        }
        Some(buf.0.assume_init())
    }
}

/// A `T` at an 8-byte boundary.
#[repr(C, align(8))]
struct Aligned<T>(MaybeUninit<T>);

// Why assembly: LLVM assumes the BPF target cannot access memory at an
// address not aligned to the access's width, so it splits every wider
// access to packet data (alignment 1) into single bytes. The kernel allows
// unaligned packet access where the CPU does it efficiently (x86-64, arm64;
// elsewhere the verifier refuses the program at load, loudly), and the JIT
// makes each of these one move.

/// One 8-byte load from packet memory.
///
/// # Safety
/// `p..p + 8` must lie inside the packet, checked in the verifier's shape.
#[inline(always)]
unsafe fn read_u64(p: usize) -> u64 {
    let v: u64;
    // SAFETY: the caller's; the instruction only reads those 8 bytes.
    unsafe {
        asm!("{v} = *(u64 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v,
             options(nostack, readonly, preserves_flags));
    }
    v
}

/// One 4-byte load from packet memory.
///
/// # Safety
/// As for [`read_u64`], for 4 bytes.
#[inline(always)]
unsafe fn read_u32(p: usize) -> u32 {
    let v: u32;
    // SAFETY: the caller's; the instruction only reads those 4 bytes.
    unsafe {
        asm!("{v} = *(u32 *)({p} + 0)", p = in(reg) p, v = lateout(reg) v,
             options(nostack, readonly, preserves_flags));
    }
    v
}

/// One 8-byte store to packet memory.
///
/// # Safety
/// As for [`read_u64`].
#[inline(always)]
unsafe fn write_u64(p: usize, v: u64) {
    // SAFETY: the caller's; the instruction only writes those 8 bytes.
    unsafe {
        asm!("*(u64 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v,
             options(nostack, preserves_flags));
    }
}

/// One 4-byte store to packet memory.
///
/// # Safety
/// As for [`read_u64`], for 4 bytes.
#[inline(always)]
unsafe fn write_u32(p: usize, v: u32) {
    // SAFETY: the caller's; the instruction only writes those 4 bytes.
    unsafe {
        asm!("*(u32 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v,
             options(nostack, preserves_flags));
    }
}

/// Writes `value` at `off`, in 8-byte words and then the 4-, 2- and 1-byte
/// rest (as [`load`] reads); `None` if the packet is too short.
#[inline(always)]
pub(crate) fn store<T: Copy>(ctx: &XdpContext, off: usize, value: T) -> Option<()> {
    let dst = ptr_at::<T>(ctx, off)? as usize;
    let buf = Aligned::<T>(MaybeUninit::new(value));
    let src = buf.0.as_ptr() as *const u8;
    let n = size_of::<T>();
    let mut i = 0;
    // SAFETY: as in `load`, with the roles swapped; XDP packet data is
    // writable.
    unsafe {
        while i + 8 <= n {
            write_u64(dst + i, (src.add(i) as *const u64).read());
            i += 8;
        }
        if i + 4 <= n {
            write_u32(dst + i, (src.add(i) as *const u32).read());
            i += 4;
        }
        if i + 2 <= n {
            (dst as *mut u16)
                .byte_add(i)
                .write_unaligned((src.add(i) as *const u16).read());
            i += 2;
        }
        if i < n {
            (dst as *mut u8).add(i).write(src.add(i).read());
        }
    }
    Some(())
}

/// The `N` bytes at `off`, in place, for a helper that reads packet
/// memory; `None` if the packet is too short.
#[inline(always)]
pub(crate) fn bytes_at<const N: usize>(ctx: &XdpContext, off: usize) -> Option<*const [u8; N]> {
    ptr_at::<[u8; N]>(ctx, off).map(|p| p as *const [u8; N])
}

/// The 8 bytes at `off` as one little-endian word (the BPF target's
/// order), if the packet holds them.
#[inline(always)]
pub(crate) fn load_u64(ctx: &XdpContext, off: usize) -> Option<u64> {
    let p = ptr_at::<u64>(ctx, off)? as usize;
    // SAFETY: ptr_at checked that the 8 bytes lie inside the packet.
    Some(unsafe { read_u64(p) })
}

/// The 4 bytes at `off` as one little-endian word, if the packet holds
/// them.
#[inline(always)]
pub(crate) fn load_u32(ctx: &XdpContext, off: usize) -> Option<u32> {
    let p = ptr_at::<u32>(ctx, off)? as usize;
    // SAFETY: as for `load_u64`, for 4 bytes.
    Some(unsafe { read_u32(p) })
}

/// Big-endian u16 at `off`.
#[inline(always)]
pub(crate) fn load_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    load::<[u8; 2]>(ctx, off).map(u16::from_be_bytes)
}

/// Length of the frame in bytes.
#[inline(always)]
pub(crate) fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
