//! Reading a whole BPF hash map with BPF_MAP_LOOKUP_BATCH: one syscall per
//! `CHUNK` entries, where aya's iterator makes two per entry (next key,
//! lookup). Written by hand because aya 0.14 has no batch operations; on a
//! table of a million connections it turns a walk of seconds into one of
//! a fraction of that.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::MapData;

/// Entries asked for per call. A hash bucket holding more than this would
/// make the kernel answer ENOSPC; buckets hold a handful.
const CHUNK: usize = 4096;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
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

/// Calls `f` on every entry of `map`, a (LRU) hash map with `K` keys and
/// `V` values. Returns Ok(false) if `stop` was raised meanwhile, and an
/// error if the kernel refuses batches for this map (the caller then walks
/// it the slow way).
pub fn for_each<K: Copy + Default, V: Copy + Default>(
    map: &MapData,
    stop: &AtomicBool,
    mut f: impl FnMut(&K, &V),
) -> io::Result<bool> {
    let info = map.info().map_err(io::Error::other)?;
    if info.key_size() as usize != size_of::<K>() || info.value_size() as usize != size_of::<V>() {
        return Err(io::Error::other("key or value size differs from the map's"));
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    // The kernel's resume token for hash maps is a bucket index (u32).
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u64 as u64
            },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attr points at buffers of CHUNK keys and values of
        // the map's sizes (checked above) and at two tokens, all alive for
        // the call; the kernel writes no more than `count` entries.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let done = if rc < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: no more entries (those of this call are valid).
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        let n = (attr.count as usize).min(CHUNK);
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            f(k, v);
        }
        if done {
            return Ok(true);
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        token_in = token_out;
        first = false;
    }
}
