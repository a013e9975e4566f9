//! The batch operations aya does not wrap: BPF_MAP_UPDATE_BATCH for arrays
//! (the benchmark's baseline objects' Maglev tables, 65,537 slots in one
//! system call instead of one per slot; a connection table carried into a
//! new one) and BPF_MAP_LOOKUP_BATCH (the connection table and the pinned
//! backends in a few calls instead of one or two per element).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use anyhow::Context as _;
use aya::maps::{Array, IterableMap as _, MapData};

/// `BPF_MAP_LOOKUP_BATCH` (enum bpf_cmd, linux/bpf.h; kernel 5.6+).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// `BPF_MAP_UPDATE_BATCH`.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Elements one lookup call returns at most.
const LOOKUP_CHUNK: u32 = 8192;

/// The batch operations' part of `union bpf_attr` (linux/bpf.h). The kernel
/// accepts an attribute shorter than its own union.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `values[i]` at `keys[i]` of the array `map`, whose values are
/// `V`, in one call. On error the kernel may have written a prefix of the
/// elements; callers write only where no reader looks (the inactive table
/// copy, a map not yet pinned or attached).
pub fn update_array<V: aya::Pod>(map: &MapData, keys: &[u32], values: &[V]) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let count = u32::try_from(keys.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let info = map.info().map_err(io::Error::other)?;
    if (info.key_size(), info.value_size()) != (4, size_of::<V>() as u32) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` points at `keys` and `values`, which outlive the call
    // and hold `count` elements each of the map's key and value size
    // (checked above); the kernel writes back only into `attr`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Every (key, value) of the map `map`, whose keys are `K` and values `V`
/// (the caller's types must be the map's: aya checked them when it opened
/// the map). Entries added or removed meanwhile may or may not be seen;
/// none is seen twice.
fn lookup_all<K: aya::Pod, V: aya::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    lookup_from(map, None, usize::MAX)
}

/// Every element of `array` with its index: one batch walk (its cost
/// follows the capacity, not the elements in use), or one read per element
/// on kernels without batches. `what` names the array in errors.
pub(super) fn array_all<V: aya::Pod>(
    array: &Array<MapData, V>,
    what: &str,
) -> anyhow::Result<Vec<(u32, V)>> {
    match lookup_all(array.map()) {
        Ok(all) => Ok(all),
        Err(e) if unsupported(&e) => (0..array.len())
            .map(|i| array.get(&i, 0).map(|v| (i, v)))
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {what}")),
        Err(e) => Err(e).with_context(|| format!("reading {what}")),
    }
}

/// Writes each (index, value) of `entries` into `array`: one batch call,
/// or one write per element on kernels without batches. `what` names the
/// array in errors.
pub(super) fn array_write<V: aya::Pod>(
    array: &mut Array<MapData, V>,
    entries: &[(u32, V)],
    what: &str,
) -> anyhow::Result<()> {
    let (keys, values): (Vec<u32>, Vec<V>) = entries.iter().copied().unzip();
    match update_array(array.map(), &keys, &values) {
        Ok(()) => Ok(()),
        Err(e) if unsupported(&e) => entries
            .iter()
            .try_for_each(|&(i, v)| array.set(i, v, 0))
            .with_context(|| format!("writing {what}")),
        Err(e) => Err(e).with_context(|| format!("writing {what}")),
    }
}

/// Up to `limit` (key, value)s of `map` after batch token `token` (`None`:
/// from the start). The token is a u32 for the maps lb walks: the next
/// bucket of a hash map, the last index read of an array.
fn lookup_from<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    mut token: Option<u32>,
    limit: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let chunk = limit.min(LOOKUP_CHUNK as usize);
    // SAFETY (both): Pod types are plain bytes, any bit pattern is valid.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
    while out.len() < limit {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: token.as_ref().map_or(0, |t| std::ptr::from_ref(t) as u64),
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk.min(limit - out.len()) as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `chunk` keys and values of
        // the map's sizes and at the two tokens, all of which outlive the
        // call; the kernel writes at most `count` (≤ `chunk`) elements.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let got = (attr.count as usize).min(keys.len());
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        if ret < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: the walk reached the map's end.
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(out);
            }
            return Err(e);
        }
        token = Some(next);
    }
    Ok(out)
}

/// Whether `e` says the kernel has no batch operations for the map (older
/// than 5.6): the caller falls back to one update per element.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | ENOTSUPP)
    )
}

/// The kernel's internal ENOTSUPP, which BPF returns to user space.
const ENOTSUPP: i32 = 524;

const _: () = assert!(size_of::<BatchAttr>() == 56);
