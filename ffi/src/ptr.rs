//! Every raw-pointer conversion of the C ABI lives here.
//!
//! Exported functions never dereference or cast a raw pointer themselves; they call one of
//! these helpers, which check for NULL and spell out the caller's obligations in one place.
//! Handles cross the boundary as pointers to zero-sized opaque types, and the conversions
//! between those and the Rust objects behind them will be added here too.

use core::ffi::c_char;

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
pub(crate) fn static_cstr(s: &'static core::ffi::CStr) -> *const c_char {
    s.as_ptr()
}
