//! The panic boundary every export runs inside.
//!
//! Unwinding out of an `extern "C"` function aborts the process, so no exported function lets
//! a panic escape: its body runs inside [`guard`] (or [`guard_or`] for functions that do not
//! return a [`ferry_status`]), and a panic becomes [`ferry_status::FERRY_ERR_PANIC`].

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::ferry_status;

/// Runs `f`, turning a panic into [`ferry_status::FERRY_ERR_PANIC`].
///
/// `AssertUnwindSafe` is sound here because the closure only touches caller-owned memory and
/// process-wide immutable data; a state left half-written by a panic is reported to the caller
/// through the status code rather than observed again by Rust.
pub(crate) fn guard<F: FnOnce() -> ferry_status>(f: F) -> ferry_status {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(ferry_status::FERRY_ERR_PANIC)
}

/// Runs `f`, returning `on_panic` if it panics. For exports whose return type is not a status.
pub(crate) fn guard_or<T, F: FnOnce() -> T>(on_panic: T, f: F) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(on_panic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_passes_through() {
        assert_eq!(guard(|| ferry_status::FERRY_OK), ferry_status::FERRY_OK);
    }

    #[test]
    fn panic_becomes_status() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let status = guard(|| panic!("boom"));
        let value = guard_or(7u32, || panic!("boom"));
        std::panic::set_hook(prev);
        assert_eq!(status, ferry_status::FERRY_ERR_PANIC);
        assert_eq!(value, 7);
    }
}
