//! The panic boundary every export runs inside.
//!
//! Unwinding out of an `extern "C"` function aborts the process, so no exported function lets
//! a panic escape: its body runs inside [`guard`] (or [`guard_or`] for functions that do not
//! return a [`ferry_status`]), and a panic becomes [`ferry_status::FERRY_ERR_PANIC`].
//!
//! Exports that can fail for a reason worth explaining use [`call`]: it also clears the
//! thread's last-error message on entry and stores the message of a failure (or a panic).

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::{self, FfiError};
use crate::ferry_status;

/// Runs `f` with the last-error message cleared; an `Err` stores its message and returns its
/// status, a panic stores a message and returns [`ferry_status::FERRY_ERR_PANIC`].
///
/// `AssertUnwindSafe`: as for [`guard`]; in addition every engine lock recovers from poisoning,
/// and a handle's own state is only changed after the fallible work has succeeded.
pub(crate) fn call<F: FnOnce() -> Result<(), FfiError>>(f: F) -> ferry_status {
    error::clear();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => ferry_status::FERRY_OK,
        Ok(Err(e)) => {
            error::set_message(e.message);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".into());
            error::set_message(format!("ferry panicked internally: {what}"));
            ferry_status::FERRY_ERR_PANIC
        }
    }
}

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

    #[test]
    fn call_records_messages() {
        assert_eq!(call(|| Ok(())), ferry_status::FERRY_OK);
        assert_eq!(error::last_message(), "");
        let status = call(|| Err(FfiError::null("engine")));
        assert_eq!(status, ferry_status::FERRY_ERR_NULL_ARGUMENT);
        assert!(error::last_message().contains("engine"));
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let status = call(|| panic!("boom"));
        std::panic::set_hook(prev);
        assert_eq!(status, ferry_status::FERRY_ERR_PANIC);
        assert!(error::last_message().contains("boom"));
        assert_eq!(call(|| Ok(())), ferry_status::FERRY_OK);
        assert_eq!(error::last_message(), "");
    }
}
