//! Errors: the status code of each failure and the thread-local last-error message.
//!
//! Every fallible export (except the two that read the message) clears the calling thread's
//! message on entry and, when it fails, stores a description there before returning its
//! status. `ferry_last_error` hands out a pointer to that message, so it stays valid until the
//! next fallible ferry call on the same thread.

use core::cell::RefCell;
use core::ffi::c_char;
use std::ffi::CString;

use ferry::StoreError;
use ferry::device::DeviceError;
use ferry::engine::EngineError;
use ferry::engine::policy::PolicyError;
use ferry::lora::LoraError;

use crate::{boundary, ferry_status, ptr};

/// A failed call: its status and a message for `ferry_last_error`.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub(crate) status: ferry_status,
    pub(crate) message: String,
}

pub(crate) type Result<T> = core::result::Result<T, FfiError>;

impl FfiError {
    pub(crate) fn new(status: ferry_status, message: impl Into<String>) -> Self {
        FfiError { status, message: message.into() }
    }

    /// A required pointer argument was NULL.
    pub(crate) fn null(arg: &str) -> Self {
        Self::new(ferry_status::FERRY_ERR_NULL_ARGUMENT, format!("argument `{arg}` is NULL"))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ferry_status::FERRY_ERR_INVALID_ARGUMENT, message)
    }
}

/// Status of a store failure.
fn store_status(e: &StoreError) -> ferry_status {
    match e {
        StoreError::Io { .. } => ferry_status::FERRY_ERR_IO,
        StoreError::UnknownComponent { .. } => ferry_status::FERRY_ERR_NOT_FOUND,
        _ => ferry_status::FERRY_ERR_INVALID_MODEL,
    }
}

/// Status of a device failure.
fn device_status(e: &DeviceError) -> ferry_status {
    match e {
        DeviceError::NoCudaDriver | DeviceError::NoSuchDevice { .. } => {
            ferry_status::FERRY_ERR_UNSUPPORTED
        }
        _ => ferry_status::FERRY_ERR_DEVICE,
    }
}

/// Status of an engine failure.
pub(crate) fn engine_status(e: &EngineError) -> ferry_status {
    use ferry_status as S;
    match e {
        EngineError::Store(s) => store_status(s),
        EngineError::Device(d) => device_status(d),
        EngineError::Lora(LoraError::Store(s)) => store_status(s),
        EngineError::Lora(
            LoraError::UnsupportedDtype { .. } | LoraError::UnsupportedAdapter { .. },
        ) => S::FERRY_ERR_UNSUPPORTED,
        EngineError::Lora(LoraError::ShapeMismatch { .. }) => S::FERRY_ERR_INVALID_ARGUMENT,
        EngineError::Lora(_) => S::FERRY_ERR_INVALID_MODEL,
        EngineError::Policy { source: PolicyError::BudgetTooSmall { .. }, .. } => {
            S::FERRY_ERR_BUDGET
        }
        EngineError::Policy { source: PolicyError::Empty, .. } => S::FERRY_ERR_INVALID_ARGUMENT,
        EngineError::Config(_) => S::FERRY_ERR_INVALID_ARGUMENT,
        EngineError::UnknownModel(_)
        | EngineError::UnknownComponent { .. }
        | EngineError::UnknownLayer { .. }
        | EngineError::UnknownLease { .. } => S::FERRY_ERR_NOT_FOUND,
        EngineError::LeaseOfOtherModel { .. } => S::FERRY_ERR_INVALID_ARGUMENT,
        EngineError::Busy { .. } => S::FERRY_ERR_BUSY,
        EngineError::Timeout { .. } => S::FERRY_ERR_TIMEOUT,
        EngineError::OutOfDeviceMemory { .. } => S::FERRY_ERR_BUDGET,
        EngineError::FileTruncated { .. } => S::FERRY_ERR_TRUNCATED,
        EngineError::ModelFailed { .. } => S::FERRY_ERR_MODEL_FAILED,
        _ => S::FERRY_ERR_INTERNAL,
    }
}

impl From<EngineError> for FfiError {
    fn from(e: EngineError) -> Self {
        FfiError::new(engine_status(&e), e.to_string())
    }
}

thread_local! {
    /// The calling thread's last error message (empty when the last call succeeded).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Clears the calling thread's last error.
pub(crate) fn clear() {
    set_message(String::new());
}

/// Stores `message` as the calling thread's last error (interior NULs become U+FFFD).
pub(crate) fn set_message(message: String) {
    let message = if message.contains('\0') { message.replace('\0', "\u{fffd}") } else { message };
    let message = CString::new(message).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; the message is then dropped.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = message);
}

/// Returns the calling thread's last error message: why the most recent fallible ferry call
/// on this thread failed, or an empty string if it succeeded.
///
/// The string is NUL-terminated and never NULL. It is owned by ferry and stays valid until the
/// next ferry call on the same thread that returns a `ferry_status` (other than
/// `ferry_last_error_copy`); do not free it. Each thread has its own message.
#[unsafe(no_mangle)]
pub extern "C" fn ferry_last_error() -> *const c_char {
    boundary::guard_or(ptr::static_cstr(c""), || {
        LAST_ERROR
            .try_with(|slot| ptr::owned_cstr(slot.borrow().as_c_str()))
            .unwrap_or_else(|_| ptr::static_cstr(c""))
    })
}

/// Copies the calling thread's last error message, with its terminating NUL, into `buf`.
///
/// `*needed` (when `needed` is not NULL) receives the size of the message including the NUL,
/// whatever the outcome. Returns `FERRY_ERR_BUFFER_TOO_SMALL` (writing nothing to `buf`) when
/// `len` is smaller than that, and `FERRY_ERR_NULL_ARGUMENT` when `buf` is NULL (so
/// `ferry_last_error_copy(NULL, 0, &needed)` queries the size). This function does not change
/// the last error message. Thread-safe (each thread has its own message).
///
/// # Safety
///
/// `buf`, if non-NULL, must be valid for writes of `len` bytes; `needed`, if non-NULL, must be
/// valid for a write of a `size_t`. They must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_last_error_copy(
    buf: *mut c_char,
    len: usize,
    needed: *mut usize,
) -> ferry_status {
    boundary::guard(|| {
        let message: Vec<u8> = LAST_ERROR
            .try_with(|slot| slot.borrow().as_bytes_with_nul().to_vec())
            .unwrap_or_else(|_| vec![0]);
        // SAFETY: the caller guarantees `needed`, when non-NULL, is valid for a write.
        unsafe { ptr::write_opt(needed, message.len()) };
        // SAFETY: the caller guarantees `buf`, when non-NULL, is valid for `len` exclusive
        // writes for the duration of this call, and that it does not overlap `needed`.
        let Some(out) = (unsafe { ptr::out_bytes(buf, len) }) else {
            return ferry_status::FERRY_ERR_NULL_ARGUMENT;
        };
        match out.get_mut(..message.len()) {
            Some(dst) => {
                dst.copy_from_slice(&message);
                ferry_status::FERRY_OK
            }
            None => ferry_status::FERRY_ERR_BUFFER_TOO_SMALL,
        }
    })
}

/// The message of the calling thread's last error (for tests).
#[cfg(test)]
pub(crate) fn last_message() -> String {
    LAST_ERROR.with(|slot| slot.borrow().to_string_lossy().into_owned())
}
