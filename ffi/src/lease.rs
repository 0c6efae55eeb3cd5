//! Leases: `ferry_acquire`, the tensor descriptors of a leased layer, `ferry_release`.

use core::ffi::{c_char, c_void};
use std::ffi::CString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferry::Dtype;
use ferry::device::{Backend, ClientDone};
use ferry::engine::Lease;
use ferry::protocol::Leased;

use crate::engine::{Mode, engine_arg, ferry_engine, str_arg};
use crate::error::{FfiError, Result};
use crate::remote::Remote;
use crate::{boundary, cuda, ferry_status, ptr};

/// The most dimensions a `ferry_tensor_desc` describes.
pub const FERRY_MAX_RANK: usize = 8;

/// A hold on one layer on the device, from `ferry_acquire`. While it is held the layer is not
/// evicted; give it back with `ferry_release`.
///
/// Opaque. A lease is not thread-safe: use it from one thread at a time (external
/// synchronisation is needed to share it) and release it exactly once. `ferry_release` frees
/// it on success, as does `ferry_engine_close` for leases still held; any later use of the
/// pointer is a use-after-free.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct ferry_lease {
    _private: [u8; 0],
}

/// Element types, numbered in safetensors' order. Stable: never renumbered, new ones appended.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ferry_dtype {
    FERRY_DTYPE_BOOL = 0,
    FERRY_DTYPE_F4 = 1,
    FERRY_DTYPE_F6_E2M3 = 2,
    FERRY_DTYPE_F6_E3M2 = 3,
    FERRY_DTYPE_U8 = 4,
    FERRY_DTYPE_I8 = 5,
    FERRY_DTYPE_F8_E5M2 = 6,
    FERRY_DTYPE_F8_E4M3 = 7,
    FERRY_DTYPE_F8_E8M0 = 8,
    FERRY_DTYPE_F8_E4M3FNUZ = 9,
    FERRY_DTYPE_F8_E5M2FNUZ = 10,
    FERRY_DTYPE_I16 = 11,
    FERRY_DTYPE_U16 = 12,
    FERRY_DTYPE_F16 = 13,
    FERRY_DTYPE_BF16 = 14,
    FERRY_DTYPE_I32 = 15,
    FERRY_DTYPE_U32 = 16,
    FERRY_DTYPE_F32 = 17,
    FERRY_DTYPE_C64 = 18,
    FERRY_DTYPE_F64 = 19,
    FERRY_DTYPE_I64 = 20,
    FERRY_DTYPE_U64 = 21,
}

fn dtype_code(d: Dtype) -> ferry_dtype {
    use ferry_dtype as F;
    match d {
        Dtype::BOOL => F::FERRY_DTYPE_BOOL,
        Dtype::F4 => F::FERRY_DTYPE_F4,
        Dtype::F6_E2M3 => F::FERRY_DTYPE_F6_E2M3,
        Dtype::F6_E3M2 => F::FERRY_DTYPE_F6_E3M2,
        Dtype::U8 => F::FERRY_DTYPE_U8,
        Dtype::I8 => F::FERRY_DTYPE_I8,
        Dtype::F8_E5M2 => F::FERRY_DTYPE_F8_E5M2,
        Dtype::F8_E4M3 => F::FERRY_DTYPE_F8_E4M3,
        Dtype::F8_E8M0 => F::FERRY_DTYPE_F8_E8M0,
        Dtype::F8_E4M3FNUZ => F::FERRY_DTYPE_F8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ => F::FERRY_DTYPE_F8_E5M2FNUZ,
        Dtype::I16 => F::FERRY_DTYPE_I16,
        Dtype::U16 => F::FERRY_DTYPE_U16,
        Dtype::F16 => F::FERRY_DTYPE_F16,
        Dtype::BF16 => F::FERRY_DTYPE_BF16,
        Dtype::I32 => F::FERRY_DTYPE_I32,
        Dtype::U32 => F::FERRY_DTYPE_U32,
        Dtype::F32 => F::FERRY_DTYPE_F32,
        Dtype::C64 => F::FERRY_DTYPE_C64,
        Dtype::F64 => F::FERRY_DTYPE_F64,
        Dtype::I64 => F::FERRY_DTYPE_I64,
        Dtype::U64 => F::FERRY_DTYPE_U64,
    }
}

/// One tensor of a leased layer.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct ferry_tensor_desc {
    /// The tensor's local name (component prefix removed), NUL-terminated; owned by the lease
    /// and valid while it is held.
    pub name: *const c_char,
    /// Where the bytes are: a `CUdeviceptr` on CUDA, a plain pointer on the host backend.
    /// Read them only once the layer is ready (`ferry_lease_wait`, or a stream passed to
    /// `ferry_acquire`), and only while the lease is held.
    pub device_ptr: u64,
    /// Size of the tensor's bytes.
    pub byte_len: u64,
    /// A `ferry_dtype` value.
    pub dtype: u32,
    /// Number of dimensions (at most `FERRY_MAX_RANK`); `shape[rank..]` are 0.
    pub rank: u32,
    pub shape: [u64; FERRY_MAX_RANK],
}

/// One tensor of a leased layer, as handed to C.
#[derive(Debug)]
struct LeasedTensor {
    /// The local name as a C string (interior NULs replaced).
    name: CString,
    dtype: Dtype,
    shape: Vec<u64>,
    /// The address C reads the bytes at.
    addr: u64,
    len: u64,
}

fn c_name(name: &str) -> CString {
    CString::new(name.replace('\0', "\u{fffd}")).unwrap_or_default()
}

/// Whose lease it is.
#[derive(Debug)]
enum Held {
    InProcess(Lease),
    /// A lease the daemon holds for this connection.
    Daemon {
        remote: Arc<Remote>,
        model: u64,
        id: u64,
        ready: AtomicBool,
    },
}

/// What a `ferry_lease *` points to.
#[derive(Debug)]
pub(crate) struct LeaseHandle {
    held: Held,
    layer: String,
    /// In file header order, as the engine (or the daemon) listed them.
    tensors: Vec<LeasedTensor>,
}

impl LeaseHandle {
    fn in_process(lease: Lease) -> LeaseHandle {
        let tensors = lease
            .tensors()
            .iter()
            .map(|t| LeasedTensor {
                name: c_name(&t.name),
                dtype: t.dtype,
                shape: t.shape.clone(),
                addr: t.addr,
                len: t.len,
            })
            .collect();
        LeaseHandle { layer: lease.layer().to_string(), tensors, held: Held::InProcess(lease) }
    }

    /// Blocks until the layer is on the device (a daemon's lease it reported ready costs no
    /// round trip).
    fn wait(&self) -> Result<()> {
        match &self.held {
            Held::InProcess(lease) => lease.wait_ready()?,
            Held::Daemon { remote, id, ready, .. } => {
                if !ready.load(Ordering::Acquire) {
                    remote.wait_ready(*id)?;
                    ready.store(true, Ordering::Release);
                }
            }
        }
        Ok(())
    }

    /// A daemon's lease, its tensors placed in the arena mapping. A description that does not
    /// fit the mapping (or names an unknown dtype) is refused, releasing the lease.
    fn daemon(remote: &Arc<Remote>, model: u64, leased: Leased) -> Result<LeaseHandle> {
        let (base, arena_len) = remote.arena();
        let mut tensors = Vec::with_capacity(leased.tensors.len());
        for t in &leased.tensors {
            let dtype = Dtype::parse(&t.dtype);
            let end = t.arena_offset.checked_add(t.len).filter(|&end| end <= arena_len);
            let (Some(dtype), Some(_)) = (dtype, end) else {
                // Give the lease back; should that fail too, the daemon frees it when the
                // connection ends.
                let _ = remote.release(model, leased.lease);
                return Err(FfiError::new(
                    ferry_status::FERRY_ERR_INTERNAL,
                    format!(
                        "ferryd described tensor {:?} of layer {:?} as {} bytes of dtype {:?} at \
                         arena offset {}, which this side cannot use (the arena holds {arena_len} \
                         bytes); the lease was given back",
                        t.name, leased.layer, t.len, t.dtype, t.arena_offset
                    ),
                ));
            };
            tensors.push(LeasedTensor {
                name: c_name(&t.name),
                dtype,
                shape: t.shape.clone(),
                addr: base + t.arena_offset,
                len: t.len,
            });
        }
        Ok(LeaseHandle {
            held: Held::Daemon {
                remote: Arc::clone(remote),
                model,
                id: leased.lease,
                ready: AtomicBool::new(leased.ready),
            },
            layer: leased.layer,
            tensors,
        })
    }

    fn desc(&self, i: usize) -> Result<ferry_tensor_desc> {
        let t = self.tensors.get(i).ok_or_else(|| {
            FfiError::new(
                ferry_status::FERRY_ERR_NOT_FOUND,
                format!("tensor index {i} is out of range ({} tensors)", self.tensors.len()),
            )
        })?;
        let mut shape = [0u64; FERRY_MAX_RANK];
        shape.get_mut(..t.shape.len()).map(|s| s.copy_from_slice(&t.shape)).ok_or_else(|| {
            FfiError::new(
                ferry_status::FERRY_ERR_UNSUPPORTED,
                format!(
                    "tensor {:?} has {} dimensions; ferry_tensor_desc holds at most {FERRY_MAX_RANK}",
                    t.name,
                    t.shape.len()
                ),
            )
        })?;
        Ok(ferry_tensor_desc {
            name: ptr::owned_cstr(&t.name),
            device_ptr: t.addr,
            byte_len: t.len,
            dtype: dtype_code(t.dtype) as u32,
            rank: t.shape.len() as u32,
            shape,
        })
    }
}

/// Borrows the lease behind `p` or fails with NULL_ARGUMENT.
///
/// # Safety
///
/// As [`ptr::lease_ref`].
unsafe fn lease<'a>(p: *const ferry_lease) -> Result<&'a LeaseHandle> {
    // SAFETY: forwarded to the caller.
    unsafe { ptr::lease_ref(p) }.ok_or_else(|| FfiError::null("lease"))
}

/// Acquires layer `layer` (its index, see `ferry_layer_count` / `ferry_layer_index`) of
/// `component` of `model`, and stores the lease in `*out` (NULL on failure).
///
/// Returns as soon as the layer's copy is under way, without waiting for it. Before reading
/// the tensors either call `ferry_lease_wait` (host sync), or, on CUDA, pass the `CUstream`
/// your kernels run on as `cuda_stream`: the stream is then made to wait (on the device) for
/// the copy, and the host does not block. On the host backend `cuda_stream` must be NULL. In
/// daemon mode with a CUDA daemon, tensor addresses are device pointers into the daemon's
/// arena imported into this process, and a stream passed here is made to wait on the daemon's
/// interprocess ready event for the layer (on the device, no host wait); a daemon that does
/// not offer such events makes this call wait for the layer on the host instead.
///
/// Blocks (up to the configured acquire timeout) only when every layer that could make room
/// is leased. Errors: `FERRY_ERR_NULL_ARGUMENT`, `FERRY_ERR_NOT_FOUND` (model, component, or
/// `layer` out of range), `FERRY_ERR_INVALID_ARGUMENT` (a stream on the host backend),
/// `FERRY_ERR_TIMEOUT`, `FERRY_ERR_BUDGET`, `FERRY_ERR_TRUNCATED`, `FERRY_ERR_DEVICE`.
/// Thread-safe with respect to the engine; the lease belongs to the calling thread.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `component` NULL or a NUL-terminated string;
/// `cuda_stream` NULL or a live `CUstream` of the engine's device whose context is current on
/// the calling thread; `out` NULL or valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_acquire(
    engine: *const ferry_engine,
    model: u64,
    component: *const c_char,
    layer: usize,
    cuda_stream: *mut c_void,
    out: *mut *mut ferry_lease,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `out`, when non-NULL, is valid for a write.
        let out = unsafe { ptr::out(out) }.ok_or_else(|| FfiError::null("out"))?;
        out.write(core::ptr::null_mut());
        // SAFETY: the caller's contract above covers each pointer.
        let (h, component) = unsafe { (engine_arg(engine)?, str_arg(component, "component")?) };
        let handle = match &h.mode {
            Mode::InProcess(e) => {
                let on_cuda = e.device_info().backend == Backend::Cuda;
                if !cuda_stream.is_null() && !on_cuda {
                    return Err(FfiError::invalid(
                        "cuda_stream must be NULL on the host backend (use ferry_lease_wait)",
                    ));
                }
                let lease = e.acquire(model, component, layer)?;
                if !cuda_stream.is_null()
                    && let Some(event) = lease.ready_event()?.cuda_event()
                {
                    // On failure `lease` is dropped here, which releases it.
                    cuda::stream_wait(cuda_stream, event)?;
                }
                LeaseHandle::in_process(lease)
            }
            Mode::Daemon(r) => {
                if !cuda_stream.is_null() && !r.on_cuda() {
                    return Err(FfiError::invalid(
                        "cuda_stream must be NULL in daemon mode with a host-backend daemon \
                         (use ferry_lease_wait)",
                    ));
                }
                // With a stream: ordered on the device through the daemon's interprocess
                // ready event when it offers them.
                let on_stream = match cuda_stream.is_null() {
                    true => None,
                    false => r.acquire_for_stream(
                        model,
                        component,
                        layer,
                        ptr::cuda_stream_raw(cuda_stream),
                    )?,
                };
                let waited = on_stream.is_some();
                let leased = match on_stream {
                    Some(l) => l,
                    None => r.acquire(model, component, layer)?,
                };
                let id = leased.lease;
                let handle = LeaseHandle::daemon(r, model, leased)?;
                if !cuda_stream.is_null()
                    && !waited
                    && let Err(e) = handle.wait()
                {
                    // No interprocess event to make the stream wait on the daemon's copy, so
                    // the host waits instead (stronger than asked); on failure the lease is
                    // given back, as in-process.
                    let _ = r.release(model, id);
                    return Err(e);
                }
                handle
            }
        };
        let (p, addr) = ptr::lease_into_raw(Box::new(handle));
        h.leases().insert(addr);
        out.write(p);
        Ok(())
    })
}

/// Blocks until the lease's layer is entirely on the device (the time counts as stall).
/// In daemon mode a layer the daemon reported ready costs no round trip.
///
/// Errors: `FERRY_ERR_NULL_ARGUMENT`, `FERRY_ERR_TRUNCATED` (the file was truncated while
/// mapped), `FERRY_ERR_DEVICE`, `FERRY_ERR_DISCONNECTED`. The lease stays held either way.
///
/// # Safety
///
/// `lease` must be NULL or a held lease, not used by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_lease_wait(lease: *const ferry_lease) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `lease` is NULL or held.
        let l = unsafe { self::lease(lease) }?;
        l.wait()
    })
}

/// Stores the number of tensors of the leased layer in `*out`.
///
/// # Safety
///
/// `lease` must be NULL or a held lease; `out` NULL or valid for a write of a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_lease_tensor_count(
    lease: *const ferry_lease,
    out: *mut usize,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (l, out) =
            unsafe { (self::lease(lease)?, ptr::out(out).ok_or_else(|| FfiError::null("out"))?) };
        out.write(l.tensors.len());
        Ok(())
    })
}

/// Describes tensor `index` (header order) of the leased layer in `*out`.
///
/// Errors: `FERRY_ERR_NULL_ARGUMENT`, `FERRY_ERR_NOT_FOUND` (index out of range),
/// `FERRY_ERR_UNSUPPORTED` (more than `FERRY_MAX_RANK` dimensions).
///
/// # Safety
///
/// `lease` must be NULL or a held lease; `out` NULL or valid for a write of a
/// `ferry_tensor_desc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_lease_tensor(
    lease: *const ferry_lease,
    index: usize,
    out: *mut ferry_tensor_desc,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (l, out) =
            unsafe { (self::lease(lease)?, ptr::out(out).ok_or_else(|| FfiError::null("out"))?) };
        out.write(l.desc(index)?);
        Ok(())
    })
}

/// Describes the tensor named `name` (its local name, e.g. `"blocks.0.weight"`) of the leased
/// layer in `*out`. Errors as `ferry_lease_tensor`; `FERRY_ERR_NOT_FOUND` for an unknown name.
///
/// # Safety
///
/// `lease` must be NULL or a held lease; `name` NULL or a NUL-terminated string; `out` NULL or
/// valid for a write of a `ferry_tensor_desc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_lease_tensor_by_name(
    lease: *const ferry_lease,
    name: *const c_char,
    out: *mut ferry_tensor_desc,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (l, name, out) = unsafe {
            (
                self::lease(lease)?,
                ptr::cstr(name).ok_or_else(|| FfiError::null("name"))?,
                ptr::out(out).ok_or_else(|| FfiError::null("out"))?,
            )
        };
        let i = l.tensors.iter().position(|t| t.name.as_c_str() == name).ok_or_else(|| {
            FfiError::new(
                ferry_status::FERRY_ERR_NOT_FOUND,
                format!("layer {:?} has no tensor {:?}", l.layer, name.to_string_lossy()),
            )
        })?;
        out.write(l.desc(i)?);
        Ok(())
    })
}

/// Releases a lease of `engine` and frees it.
///
/// `cuda_stream`: on CUDA, the stream your kernels reading the layer were queued on; the
/// engine then waits (on the device) for that work before reusing the memory, so you need not
/// synchronise. NULL means your use is already over (the only choice on the host backend). In
/// daemon mode with a CUDA daemon the stream is synchronised (on the host) before the release
/// is sent: the daemon may reuse the memory as soon as it acknowledges.
///
/// On `FERRY_OK` the lease is freed and the pointer must not be used again. On failure the
/// lease is untouched and still held (e.g. `FERRY_ERR_INVALID_ARGUMENT` for a stream on the
/// host backend, `FERRY_ERR_DEVICE` if the device refused to wait for the stream: synchronise
/// and release again with NULL). In daemon mode `FERRY_ERR_DISCONNECTED` means the daemon is
/// gone, and with it the lease's hold on the layer; the handle (its descriptors, and the
/// bytes at its addresses, which nothing overwrites any more) stays valid until
/// `ferry_engine_close` frees it.
///
/// The engine tracks the leases it handed out, so a lease of another engine, or one already
/// released, is refused with `FERRY_ERR_NOT_FOUND` without touching it (the other engine's
/// lease stays usable). A pointer already released can only be caught as long as its memory
/// was not reused for a newer lease of the same engine: do not rely on it.
/// Thread-safe with respect to the engine.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `lease` NULL or a pointer `ferry_acquire`
/// returned (checked against the engine's leases before use), not used by another thread;
/// `cuda_stream` as for `ferry_acquire`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_release(
    engine: *const ferry_engine,
    lease: *mut ferry_lease,
    cuda_stream: *mut c_void,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `engine` is NULL or live.
        let h = unsafe { engine_arg(engine) }?;
        if lease.is_null() {
            return Err(FfiError::null("lease"));
        }
        let on_cuda = match &h.mode {
            Mode::InProcess(e) => e.device_info().backend == Backend::Cuda,
            Mode::Daemon(r) => r.on_cuda(),
        };
        if !cuda_stream.is_null() && !on_cuda {
            return Err(FfiError::invalid("cuda_stream must be NULL on the host backend"));
        }
        let addr = ptr::lease_addr(lease);
        if !h.leases().remove(&addr) {
            return Err(FfiError::new(
                ferry_status::FERRY_ERR_NOT_FOUND,
                "this lease is not held on this engine: it was already released, or it belongs to another engine",
            ));
        }
        let restore = |e: FfiError| {
            h.leases().insert(addr);
            e
        };
        // SAFETY: `addr` was in this engine's set, so it is a live lease from `lease_into_raw`;
        // having removed it, this thread is the only one that may free it.
        let l = unsafe { ptr::lease_ref(lease) }.ok_or_else(|| FfiError::null("lease"))?;
        match (&h.mode, &l.held) {
            (Mode::InProcess(e), Held::InProcess(lease)) => {
                let recorded = if cuda_stream.is_null() {
                    None
                } else {
                    Some(cuda::Recorded::on(cuda_stream).map_err(restore)?)
                };
                let done = recorded.as_ref().map_or(ClientDone::Now, cuda::Recorded::client_done);
                e.release_id(lease.model(), lease.id(), done)
                    .map_err(|e| restore(FfiError::from(e)))?;
                drop(recorded);
            }
            (Mode::Daemon(r), Held::Daemon { model, id, .. }) => {
                if !cuda_stream.is_null() {
                    // The daemon may reuse the memory as soon as it acknowledges the release,
                    // and cannot wait for this process's stream: finish the caller's work on
                    // the layer first.
                    cuda::stream_synchronize(cuda_stream).map_err(restore)?;
                }
                r.release(*model, *id).map_err(restore)?;
            }
            // Each engine's set holds only the leases it made, in its own mode.
            _ => {
                return Err(restore(FfiError::new(
                    ferry_status::FERRY_ERR_INTERNAL,
                    "the lease was made in another mode than this engine's",
                )));
            }
        }
        // SAFETY: as above; `l` is not used past this point.
        drop(unsafe { ptr::lease_from_addr(addr) });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_codes_follow_safetensors_order() {
        for (i, d) in Dtype::ALL.iter().enumerate() {
            assert_eq!(dtype_code(*d) as usize, i, "{d:?}");
        }
    }
}
