//! Reading and writing packet bytes: straight through the skb's linear
//! buffer where the bytes lie in it (the common case: the headers of every
//! packet a driver or veth hands over), else through the load/store
//! helpers, which also reach paged data. A helper call costs far more than
//! a bounds check, and every packet pays several.
//!
//! Writes do not touch skb->csum, like `bpf_skb_store_bytes` without
//! BPF_F_RECOMPUTE_CSUM: the callers compensate every change in a checksum
//! inside the packet, or tell the kernel with a csum helper. A program that
//! writes packet data directly gets a prologue from the verifier that
//! unclones a cloned skb's head, so the write never reaches a clone's copy.

use core::mem::{align_of, size_of};

use aya_ebpf::programs::{TcContext, XdpContext};

/// A packet as the TC and the XDP program see it. Parsing and rewriting are
/// written once against it.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length, paged data included.
    fn len(&self) -> u32;
    /// Whether the packet's VLAN tag was taken off into metadata.
    fn vlan_offloaded(&self) -> bool;
    /// Reads bytes outside the linear buffer; none for a frame without.
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()>;
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()>;
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn vlan_offloaded(&self) -> bool {
        // SAFETY: the context pointer is valid for the program's lifetime.
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ()> {
        TcContext::load(self, off).map_err(|_| ())
    }
    #[inline(always)]
    fn store<T: Copy>(&self, off: usize, v: &T) -> Result<(), ()> {
        TcContext::store(self, off, v, 0).map_err(|_| ())
    }
}

/// An XDP frame is one linear buffer: the program is not loaded for
/// multi-buffer frames, so nothing lies beyond `data_end`.
///
/// `data` and `data_end` are 32-bit fields of `xdp_md` that the verifier
/// rewrites into pointers. They are read with volatile loads: otherwise
/// LLVM may load them in a caller, pass them to a BPF subprogram as 32-bit
/// arguments and zero-extend them there with shifts, which the verifier
/// refuses on a packet pointer.
impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's lifetime.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data) as usize }
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data_end) as usize }
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (Frame::data_end(self) - Frame::data(self)) as u32
    }
    #[inline(always)]
    fn vlan_offloaded(&self) -> bool {
        false
    }
    #[inline(always)]
    fn load<T: Copy>(&self, _off: usize) -> Result<T, ()> {
        Err(())
    }
    #[inline(always)]
    fn store<T: Copy>(&self, _off: usize, _v: &T) -> Result<(), ()> {
        Err(())
    }
}

/// Largest offset tried directly: the verifier needs a bound on every
/// variable offset added to a packet pointer, and gives a range to none
/// whose bound plus the access size exceeds 0xffff.
const MAX_OFF: usize = 0x3fff;

/// Where `len` bytes at `off` lie in the linear buffer, if they do.
#[inline(always)]
fn at<C: Frame>(ctx: &C, off: usize, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    // At least two bytes are checked: LLVM turns `p + 1 > end` into
    // `p >= end`, from which the verifier learns no range. The last byte
    // of a packet is then read through the helper, which is just as right.
    let len = if len < 2 { 2 } else { len };
    if off > MAX_OFF {
        return None;
    }
    let ptr = start + bounded(off);
    if ptr + len > ctx.data_end() {
        return None;
    }
    Some(ptr as *mut u8)
}

/// `off & MAX_OFF`, which is `off` after the check in `at`, computed where
/// the compiler cannot drop it. The verifier bounds a pointer only by what
/// it knows of the very register added to it; LLVM may check a copy of
/// `off` and add another, which 6.6 and later relate to each other but 6.1
/// does not ("invalid access to packet ... r=0"). The mask bounds the
/// register that is added on every kernel.
#[inline(always)]
fn bounded(off: usize) -> usize {
    #[cfg(target_arch = "bpf")]
    {
        let mut off = off;
        // SAFETY: one ALU instruction on a register; no memory touched.
        unsafe {
            core::arch::asm!(
                "{0} &= {1}",
                inout(reg) off,
                const MAX_OFF,
                options(pure, nomem, nostack),
            )
        };
        off
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        off & MAX_OFF
    }
}

#[inline(always)]
pub fn read<T: Copy, C: Frame>(ctx: &C, off: usize) -> Result<T, ()> {
    match at(ctx, off, size_of::<T>()) {
        // SAFETY: within the linear buffer, checked above; any bit pattern
        // is a valid T for the plain integers and byte arrays read here.
        Some(ptr) => Ok(unsafe { ptr.cast::<T>().read_unaligned() }),
        None => ctx.load(off),
    }
}

#[inline(always)]
pub fn write<T: Copy, C: Frame>(ctx: &C, off: usize, v: &T) -> Result<(), ()> {
    match at(ctx, off, size_of::<T>()) {
        Some(ptr) => {
            // SAFETY: within the linear buffer, checked above, which the
            // verifier's prologue made this program's own.
            unsafe { ptr.cast::<T>().write_unaligned(*v) };
            Ok(())
        }
        None => ctx.store(off, v),
    }
}

/// Ones'-complement sum of 16-bit big-endian words.
#[inline(always)]
pub fn sum16<const N: usize>(b: &[u8; N]) -> u64 {
    let mut acc = 0u64;
    let mut i = 0;
    while i + 1 < N {
        acc += u16::from_be_bytes([b[i], b[i + 1]]) as u64;
        i += 2;
    }
    acc
}

/// The change from `old` to `new` as a term for `apply` (RFC 1624:
/// HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn delta<const N: usize>(old: &[u8; N], new: &[u8; N]) -> u64 {
    (N as u64 / 2) * 0xffff - sum16(old) + sum16(new)
}

#[inline(always)]
pub fn fold(mut acc: u64) -> u16 {
    acc = (acc & 0xffff_ffff) + (acc >> 32);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// A checksum after words it covers changed by `delta`.
#[inline(always)]
pub fn apply(csum: u16, delta: u64) -> u16 {
    !fold((!csum) as u64 + delta)
}

/// Adjusts the 16-bit big-endian checksum at `off` for words it covers
/// that changed by `delta`.
#[inline(always)]
pub fn fix_csum<C: Frame>(ctx: &C, off: usize, delta: u64) -> Result<(), ()> {
    let old = u16::from_be_bytes(read::<[u8; 2], _>(ctx, off)?);
    write(ctx, off, &apply(old, delta).to_be_bytes())
}

// The BPF target's memcpy, memmove and memset, which LLVM calls for
// copies and fills of more than a few bytes, go a byte at a time: several
// instructions per byte on every packet. Volatile word accesses are never
// turned back into such calls.

/// `*dst = *src`, a 32-bit word at a time.
#[inline(always)]
pub fn copy_words<T>(dst: &mut T, src: *const T) {
    const { assert!(size_of::<T>() % 4 == 0 && align_of::<T>() >= 4) };
    let d = (dst as *mut T).cast::<u32>();
    let s = src.cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: both are valid, aligned Ts (asserted above), read and
        // written in whole words.
        unsafe { d.add(i).write_volatile(s.add(i).read_volatile()) };
    }
}

/// Zeroes `dst`, a 32-bit word at a time. For plain C structs of integers,
/// for which all zeroes is a valid value.
#[inline(always)]
pub fn zero_words<T>(dst: &mut T) {
    const { assert!(size_of::<T>() % 4 == 0 && align_of::<T>() >= 4) };
    let d = (dst as *mut T).cast::<u32>();
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: a valid, aligned T (asserted above), written in whole words.
        unsafe { d.add(i).write_volatile(0) };
    }
}

/// `*dst = lb_common::v4_mapped(v4)`, byte by byte but without a call.
#[inline(always)]
pub fn set_v4_mapped(dst: &mut [u8; 16], v4: [u8; 4]) {
    let d = dst.as_mut_ptr();
    for i in 0..16 {
        let b = match i {
            0..=9 => 0,
            10 | 11 => 0xff,
            _ => v4[i - 12],
        };
        // SAFETY: i < 16.
        unsafe { d.add(i).write_volatile(b) };
    }
}
