//! Every raw-pointer conversion of the C ABI lives here.
//!
//! Exported functions never dereference or cast a raw pointer themselves; they call one of
//! these helpers, which check for NULL and spell out the caller's obligations in one place.
//! Handles cross the boundary as pointers to zero-sized opaque types (`ferry_engine`,
//! `ferry_lease`); the conversions between those and the Rust objects behind them are here too.

use core::ffi::{CStr, c_char, c_void};
use core::ptr::NonNull;

use crate::engine::{EngineHandle, ferry_engine};
use crate::lease::{LeaseHandle, ferry_lease};

/// Borrows a caller-provided output buffer as a mutable byte slice.
///
/// Returns `None` when `buf` is NULL.
///
/// # Safety
///
/// When `buf` is non-NULL it must be valid for writes of `len` bytes, properly aligned for `u8`
/// (always true), and not accessed by anything else for the lifetime `'a`.
pub(crate) unsafe fn out_bytes<'a>(buf: *mut c_char, len: usize) -> Option<&'a mut [u8]> {
    if buf.is_null() {
        return None;
    }
    // SAFETY: `buf` is non-NULL, and the caller guarantees it is valid for `len` exclusive
    // writes for `'a`; `c_char` and `u8` have the same size and alignment.
    Some(unsafe { core::slice::from_raw_parts_mut(buf.cast::<u8>(), len) })
}

/// Stores `value` through an optional out-parameter; does nothing when `out` is NULL.
///
/// # Safety
///
/// When `out` is non-NULL it must be valid for a write of a `T` and properly aligned.
pub(crate) unsafe fn write_opt<T>(out: *mut T, value: T) {
    if out.is_null() {
        return;
    }
    // SAFETY: `out` is non-NULL, and the caller guarantees it is valid and aligned for a write
    // of `T`. `write` does not read or drop the previous (possibly uninitialised) value.
    unsafe { out.write(value) }
}

/// Returns a pointer to the first byte of a static NUL-terminated string.
///
/// This is a safe cast: the pointer is valid for the life of the process.
pub(crate) fn static_cstr(s: &'static CStr) -> *const c_char {
    s.as_ptr()
}

/// Returns a pointer to the first byte of a NUL-terminated string owned by a handle (valid
/// as long as the handle keeps the string).
pub(crate) fn owned_cstr(s: &CStr) -> *const c_char {
    s.as_ptr()
}

/// A required out-parameter, checked non-NULL on creation.
#[derive(Debug)]
pub(crate) struct Out<T>(NonNull<T>);

/// Checks a required out-parameter; `None` when `p` is NULL.
///
/// # Safety
///
/// When `p` is non-NULL it must be valid and aligned for a write of a `T` for as long as the
/// returned [`Out`] lives, which must not outlast the exported call that received `p`.
pub(crate) unsafe fn out<T>(p: *mut T) -> Option<Out<T>> {
    NonNull::new(p).map(Out)
}

impl<T> Out<T> {
    /// Stores `value` (the previous contents, possibly uninitialised, are not read or dropped).
    pub(crate) fn write(&self, value: T) {
        // SAFETY: `out` (the only constructor) was given a pointer valid and aligned for a
        // write of `T` for as long as this `Out` lives.
        unsafe { self.0.as_ptr().write(value) }
    }
}

/// Borrows a NUL-terminated C string argument; `None` when `p` is NULL.
///
/// # Safety
///
/// When `p` is non-NULL it must point to a NUL-terminated string that stays valid and
/// unchanged for `'a` (the exported call).
pub(crate) unsafe fn cstr<'a>(p: *const c_char) -> Option<&'a CStr> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL, and the caller guarantees a valid NUL-terminated string for `'a`.
    Some(unsafe { CStr::from_ptr(p) })
}

/// Borrows a struct passed by pointer; `None` when `p` is NULL.
///
/// # Safety
///
/// When `p` is non-NULL it must be valid and aligned for a read of an initialised `T` for `'a`.
pub(crate) unsafe fn read<'a, T>(p: *const T) -> Option<&'a T> {
    // SAFETY: the caller guarantees validity, alignment and initialisation when non-NULL.
    unsafe { p.as_ref() }
}

/// Borrows an array argument of `n` elements. `n == 0` gives an empty slice whatever `p` is;
/// otherwise `None` when `p` is NULL.
///
/// # Safety
///
/// When `n > 0` and `p` is non-NULL, `p` must be valid and aligned for reads of `n`
/// initialised `T`s that stay unchanged for `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, n: usize) -> Option<&'a [T]> {
    if n == 0 {
        return Some(&[]);
    }
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL, and the caller guarantees `n` valid, aligned, initialised elements.
    Some(unsafe { core::slice::from_raw_parts(p, n) })
}

/// Hands an engine to C.
pub(crate) fn engine_into_raw(engine: Box<EngineHandle>) -> *mut ferry_engine {
    Box::into_raw(engine).cast()
}

/// Borrows the engine behind a handle; `None` when `p` is NULL.
///
/// # Safety
///
/// When `p` is non-NULL it must come from [`engine_into_raw`] and not have been passed to
/// [`engine_from_raw`] yet; the engine must stay open for `'a`.
pub(crate) unsafe fn engine_ref<'a>(p: *const ferry_engine) -> Option<&'a EngineHandle> {
    // SAFETY: the caller guarantees `p` is NULL or a live `EngineHandle` from
    // `engine_into_raw`; the engine is only ever borrowed shared (it is `Sync`).
    unsafe { p.cast::<EngineHandle>().as_ref() }
}

/// Takes an engine back from C; `None` when `p` is NULL.
///
/// # Safety
///
/// When `p` is non-NULL it must come from [`engine_into_raw`], not have been taken back
/// before, and no other reference to the engine may be in use.
pub(crate) unsafe fn engine_from_raw(p: *mut ferry_engine) -> Option<Box<EngineHandle>> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees `p` came from `Box::into_raw` in `engine_into_raw` and is
    // taken back exactly once, with no borrow outstanding.
    Some(unsafe { Box::from_raw(p.cast::<EngineHandle>()) })
}

/// Hands a lease to C; returns the handle and its address (the key an engine tracks it by).
pub(crate) fn lease_into_raw(lease: Box<LeaseHandle>) -> (*mut ferry_lease, usize) {
    let p = Box::into_raw(lease);
    (p.cast(), p as usize)
}

/// The address of a lease handle, for looking it up without dereferencing it.
pub(crate) fn lease_addr(p: *const ferry_lease) -> usize {
    p as usize
}

/// Borrows the lease behind a handle; `None` when `p` is NULL.
///
/// # Safety
///
/// When `p` is non-NULL it must come from [`lease_into_raw`] and the lease must not have been
/// freed ([`lease_from_addr`]) before `'a` ends.
pub(crate) unsafe fn lease_ref<'a>(p: *const ferry_lease) -> Option<&'a LeaseHandle> {
    // SAFETY: the caller guarantees `p` is NULL or a live `LeaseHandle`; it is only borrowed
    // shared.
    unsafe { p.cast::<LeaseHandle>().as_ref() }
}

/// Takes a lease back from the address [`lease_into_raw`] returned, to free it.
///
/// # Safety
///
/// `addr` must be the address of a lease from [`lease_into_raw`] that was not taken back
/// before, and no reference to it may be in use.
pub(crate) unsafe fn lease_from_addr(addr: usize) -> Box<LeaseHandle> {
    // SAFETY: the caller guarantees `addr` is a live `Box<LeaseHandle>` pointer, taken back once.
    unsafe { Box::from_raw(addr as *mut LeaseHandle) }
}

/// A caller's `CUstream` (`void *` in the header) as the driver's type; NULL stays NULL.
pub(crate) fn cuda_stream(p: *mut c_void) -> cudarc::driver::sys::CUstream {
    p.cast()
}

/// A caller's `CUstream` as the integer the importer takes.
pub(crate) fn cuda_stream_raw(p: *mut c_void) -> u64 {
    p as usize as u64
}

/// A `CUevent` carried as an integer by the engine, as the driver's type.
pub(crate) fn cuda_event(raw: u64) -> cudarc::driver::sys::CUevent {
    raw as usize as cudarc::driver::sys::CUevent
}

/// A `CUevent` as the integer the engine carries.
pub(crate) fn cuda_event_raw(ev: cudarc::driver::sys::CUevent) -> u64 {
    ev as usize as u64
}

/// The address of the first byte at `p`, as C sees a device pointer (`uint64_t`).
pub(crate) fn addr(p: *const u8) -> u64 {
    p as usize as u64
}
