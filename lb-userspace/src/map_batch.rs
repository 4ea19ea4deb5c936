//! Reading a whole BPF map with BPF_MAP_LOOKUP_BATCH: one syscall per
//! `CHUNK` entries, where aya's iterator makes two per entry (next key,
//! lookup). Written by hand because aya 0.14 has no batch operations; on
//! a table of a million connections it turns a walk of seconds into one
//! of a fraction of that.

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

/// Calls `f` on every entry of `map`, a (LRU) hash map or an array with
/// `K` keys and `V` values. Returns Ok(false) if `stop` was raised
/// meanwhile, and an error if the kernel refuses batches for this map (the
/// caller then walks it the slow way).
pub fn for_each<K: Copy + Default, V: Copy + Default>(
    map: &MapData,
    stop: &AtomicBool,
    mut f: impl FnMut(&K, &V),
) -> io::Result<bool> {
    walk(map, stop, 1, |k, v: &[V]| f(k, &v[0]))
}

/// `for_each` for a per-CPU map: `f` gets each entry's value on every
/// possible CPU. `V` must be a multiple of 8 bytes, as the kernel lays
/// the CPUs' values out 8-byte aligned.
pub fn for_each_per_cpu<K: Copy + Default, V: Copy + Default>(
    map: &MapData,
    stop: &AtomicBool,
    f: impl FnMut(&K, &[V]),
) -> io::Result<bool> {
    if !size_of::<V>().is_multiple_of(8) {
        return Err(io::Error::other(
            "a per-CPU value must be a multiple of 8 bytes",
        ));
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    walk(map, stop, cpus, f)
}

/// Batches of up to CHUNK entries, each with `per_entry` values.
fn walk<K: Copy + Default, V: Copy + Default>(
    map: &MapData,
    stop: &AtomicBool,
    per_entry: usize,
    mut f: impl FnMut(&K, &[V]),
) -> io::Result<bool> {
    let info = map.info().map_err(io::Error::other)?;
    if info.key_size() as usize != size_of::<K>() || info.value_size() as usize != size_of::<V>() {
        return Err(io::Error::other("key or value size differs from the map's"));
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK * per_entry];
    // The kernel's resume token is a bucket index for hash maps and an
    // element index for arrays, a u32 either way.
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
        // SAFETY: the attr points at buffers of CHUNK keys and CHUNK times
        // `per_entry` values of the map's sizes (checked above) and at two
        // tokens, all alive for the call; the kernel writes no more than
        // `count` entries.
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
        for (k, v) in keys[..n].iter().zip(values.chunks(per_entry)) {
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
