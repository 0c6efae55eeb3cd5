//! The little CUDA the C ABI needs for callers' streams: making a stream wait on a lease's
//! ready event, and recording the event a release hands to the engine.
//!
//! These run only when the engine's backend is CUDA (so the driver is loaded) and the caller
//! passed a stream. The calling thread must have a current CUDA context on the engine's device
//! (as any thread using the CUDA runtime has): `cuEventCreate` uses it.
//!
//! Not exercised by the test suite, which runs on the host backend.

use core::ffi::c_void;

use cudarc::driver::sys;
use ferry::device::{ClientDone, RawCudaEvent};

use crate::error::{FfiError, Result};
use crate::ptr;

fn cuda_error(call: &str, e: impl core::fmt::Debug) -> FfiError {
    FfiError::new(crate::ferry_status::FERRY_ERR_DEVICE, format!("{call} failed: {e:?}"))
}

/// Makes the caller's `stream` wait (on the device) for the event `event` (a `CUevent` the
/// engine recorded on its copy stream).
pub(crate) fn stream_wait(stream: *mut c_void, event: u64) -> Result<()> {
    // SAFETY: `stream` is the caller's live CUstream (the export's contract) and `event` is a
    // live event of the engine's context, kept alive by the lease's ready signal for at least
    // this call; the wait captures the event's state now.
    unsafe {
        sys::cuStreamWaitEvent(
            ptr::cuda_stream(stream),
            ptr::cuda_event(event),
            sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT as u32,
        )
    }
    .result()
    .map_err(|e| cuda_error("cuStreamWaitEvent", e))
}

/// Blocks until the work queued on the caller's `stream` so far has finished
/// (`cuStreamSynchronize`: needs no current context).
pub(crate) fn stream_synchronize(stream: *mut c_void) -> Result<()> {
    // SAFETY: `stream` is the caller's live CUstream (the export's contract).
    unsafe { sys::cuStreamSynchronize(ptr::cuda_stream(stream)) }
        .result()
        .map_err(|e| cuda_error("cuStreamSynchronize", e))
}

/// An event recorded on a caller's stream, destroyed on drop.
#[derive(Debug)]
pub(crate) struct Recorded(sys::CUevent);

impl Recorded {
    /// Records a new event on `stream` (after the caller's work queued so far).
    pub(crate) fn on(stream: *mut c_void) -> Result<Recorded> {
        let mut ev: sys::CUevent = core::ptr::null_mut();
        // SAFETY: `ev` is a valid out-pointer; the calling thread's current context is used.
        unsafe { sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }
            .result()
            .map_err(|e| cuda_error("cuEventCreate", e))?;
        let recorded = Recorded(ev);
        // SAFETY: `ev` is the live event just created; `stream` is the caller's live stream.
        unsafe { sys::cuEventRecord(ev, ptr::cuda_stream(stream)) }
            .result()
            .map_err(|e| cuda_error("cuEventRecord", e))?;
        Ok(recorded)
    }

    /// The event as the engine's done signal; valid while `self` lives.
    pub(crate) fn client_done(&self) -> ClientDone {
        // SAFETY: `self.0` is a live CUevent of this process, recorded on the caller's stream,
        // and outlives the release it is passed to (the caller drops `self` afterwards).
        ClientDone::CudaEvent(unsafe { RawCudaEvent::from_raw(ptr::cuda_event_raw(self.0)) })
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a live event owned by `self`. Destroying an event that a stream
        // still waits on is allowed: the driver frees it once the wait is satisfied.
        let _ = unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}
