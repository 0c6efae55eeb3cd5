//! The CUDA backend: NVIDIA GPUs through the CUDA driver API (cudarc, libcuda loaded at run
//! time).
//!
//! # Copy path
//!
//! ```text
//! mmap'd file ──memcpy (I/O threads)──▶ pinned staging ring (cuMemHostAlloc, PORTABLE)  ─┐
//! mmap'd file, registered read-only (cuMemHostRegister, PORTABLE|READ_ONLY) ─────────────┤
//!                                                                                        ▼
//!                          cuMemcpyHtoDAsync_v2 on ONE non-blocking copy stream ──▶ arena
//!                          cuEventRecord on the copy stream ──▶ Event
//! client stream: cuStreamWaitEvent(Event::cuda_event()) ──▶ client kernels (no host sync)
//! client release: its CUevent ──▶ cuStreamWaitEvent(copy stream) before the memory is reused
//! ```
//!
//! - All copies go to one dedicated non-blocking stream (`CU_STREAM_NON_BLOCKING`, so it never
//!   serialises with the legacy default stream of the application). H2D copies share the PCIe
//!   link anyway; one stream keeps "an event covers every copy enqueued before it" exactly as
//!   on the host backend. Copies may be enqueued from any thread: the context is made current
//!   on the calling thread first ([`bind`]: one `cuCtxGetCurrent` when it already is).
//! - Events are created with `CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC` and recycled
//!   through a small pool, so recording one on the hot path is a `cuEventRecord`, not a
//!   `cuEventCreate`. BLOCKING_SYNC makes [`CudaEventHandle::wait`] sleep instead of spinning a
//!   core that the I/O threads need for their memcpys.
//!
//! # Memory
//!
//! The arena is device memory other processes can map (ferryd's clients read layers in place):
//!
//! - **VMM** when the device offers it (`VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED` and
//!   `HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED`, asked once at open and logged):
//!   `cuMemCreate` (pinned device memory, POSIX-fd shareable, the size rounded up to the
//!   recommended allocation granularity), `cuMemAddressReserve`, `cuMemMap`, `cuMemSetAccess`
//!   (read-write for this device). [`CudaArena::share`] exports it with
//!   `cuMemExportToShareableHandle` as a file descriptor (a new one per call) that travels over
//!   the Unix socket (`SCM_RIGHTS`); the client maps it once
//!   ([`super::cuda_import::ImportedArena`]). The physical memory is reference-counted by the
//!   driver: it is freed when the arena is dropped *and* every importer has unmapped it, so a
//!   client that outlives the arena never reads freed memory.
//! - **`cuMemAlloc`** otherwise, or when any VMM step fails (undone step by step, logged as a
//!   warning; the engine never fails because VMM did): shared through a legacy IPC handle
//!   (`cuIpcGetMemHandle`), which needs the client in ferryd's IPC namespace and must be closed
//!   by every importer before the arena is freed. A device out of memory is an
//!   [`DeviceError::OutOfMemory`] either way, never a fallback.
//!
//! The arena's length is what the engine asked for (it sub-allocates exactly its budget); a
//! VMM arena's allocation may be larger (granularity), and that size is what importers map.
//! Neither kind is cudarc's `CudaStream::alloc`: that uses `cuMemAllocAsync` (stream-ordered
//! pool memory) whenever the device supports memory pools, and pool memory can be exported by
//! neither route. cudarc's per-slice event tracking is disabled too: ordering is expressed
//! with explicit events.
//!
//! Every object that owns a driver resource (arena, pinned buffer, registration, event) holds
//! the device's shared state, so the primary context outlives all of them whatever the drop
//! order, and each synchronises the copy stream before releasing memory a copy may still use.
//!
//! # LoRA on the device
//!
//! LoRA backup mode adds each adapter's delta to the weight on the device, after the weight's
//! copy, with one `cublasGemmEx` per adapter on the copy stream (beta = 1, so the GEMM
//! accumulates into the weight in place; f16 / bf16 weights with f32 compute). cuBLAS is
//! loaded at run time like libcuda (cudarc's `cublas` feature) and only when first needed; a
//! machine whose driver loads but has no libcublas keeps the CPU merge
//! ([`CudaDevice::device_gemm`] is false). The one handle is bound to the copy stream and
//! serialised by a mutex (configuring a shared handle from several threads is not safe;
//! enqueueing a GEMM takes microseconds). The factors live in [`CudaBuffer`]s: plain
//! `cuMemAlloc` memory outside the arena, tracked so GEMM operands can be range-checked.
//!
//! # Interprocess events
//!
//! A client in another process cannot use our `CUevent`s; it needs an event created with
//! `CU_EVENT_INTERPROCESS` and the 64-byte handle `cuIpcGetEventHandle` gives, which it opens
//! with `cuIpcOpenEventHandle` ([`super::cuda_import::ImportedArena::stream_wait`]).
//! [`super::Device::record_ipc`] records one on the copy stream and returns its handle. Such
//! events come from a **ring** of [`IPC_RING`] per device, created slot by slot on first use
//! (each with its handle, computed once) and re-recorded round-robin. Re-recording one a
//! client may still hold is sound because the copy stream is in order: every recording
//! completes only after everything enqueued before it, so a client that waits on a later
//! recording than the one it was given waits longer, never too little. The ring is destroyed
//! only with the device's shared state (after the device, its arenas and everything else
//! allocated from it are gone, and after one more drain of the copy stream): a client's
//! imported copy of a destroyed event is undefined behaviour. Ring events are created with
//! `CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS` only: the driver documents no combination
//! with `CU_EVENT_BLOCKING_SYNC`, and the daemon never host-waits on them.
//!
//! # Not done (yet)
//!
//! - Interprocess *done* events: a client in another process hands its release back without
//!   an event the copy stream can wait on (it synchronises first).
//! - Per-layer physical chunks (VMM lets layers be unmapped and remapped at stable addresses):
//!   the arena is one allocation, sub-allocated by the engine.
//! - Access for peer GPUs: only the arena's own device may touch a VMM arena.
//! - Multiple copy streams / priorities, and hugepage-backed staging.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaContext, CudaStream, DriverError, sys};
use tracing::{debug, error, info, warn};

use super::{
    Arena, ArenaInner, Backend, BackendOps, ClientDone, DeviceBuffer, DeviceBufferInner,
    DeviceConfig, DeviceError, DeviceInfo, Event, EventInner, GemmAccumulate, GemmType, HostBuffer,
    HostBufferInner, Registration, RegistrationInner,
};

/// Most recycled events kept per device; more are destroyed when dropped.
const EVENT_POOL_MAX: usize = 64;

/// Flags of every event: no timestamps (cheaper record), and a host wait that sleeps.
const EVENT_FLAGS: u32 = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
    | sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32;

/// Interprocess events per device (module docs, *Interprocess events*). A client caches the
/// events it opens by handle, so this also bounds what each client keeps open per device.
pub const IPC_RING: usize = 256;

/// Flags of the interprocess events: INTERPROCESS requires DISABLE_TIMING; no BLOCKING_SYNC
/// (module docs).
const IPC_EVENT_FLAGS: u32 = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
    | sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32;

/// What an interprocess-event failure that means "this driver or platform has none" reads as
/// (the same as a backend without them, so callers fall back to waiting in the daemon).
const IPC_UNSUPPORTED: DeviceError = DeviceError::Unsupported("export interprocess events");

/// Pinned staging flags. PORTABLE: pinned for every context, so a buffer stays usable if a
/// client's context (or a later one of ours) copies from it. Not WRITECOMBINED: WC memory is
/// uncached for CPU reads (tens of times slower), and a `HostBuffer` hands out `&mut [u8]` that
/// engine code (LoRA fusing, verification) may read. The copy engine reads ordinary cached
/// pinned memory at full PCIe rate on current platforms (WC's advantage — no snooping — dates
/// from front-side-bus systems), so the safe choice costs nothing measurable for H2D.
const STAGING_FLAGS: u32 = sys::CU_MEMHOSTALLOC_PORTABLE;

/// Registration flags for read-only file mappings: PORTABLE (all contexts) and READ_ONLY (the
/// device only reads; required to register `PROT_READ` mappings). Not DEVICEMAP: no zero-copy
/// kernel access is needed, only DMA by the copy engine.
const REGISTER_FLAGS: u32 = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_READ_ONLY;

/// A `CUevent` kept in the pool.
#[derive(Debug)]
struct RawEvent(sys::CUevent);

// SAFETY: a CUevent is an opaque handle to a driver object; the CUDA driver API is thread-safe
// and accepts handles from any thread. The pool only moves the handle value between threads.
unsafe impl Send for RawEvent {}

/// One interprocess event of the ring and its handle.
#[derive(Debug)]
struct IpcSlot {
    event: RawEvent,
    handle: [u8; 64],
}

/// The ring of interprocess events (module docs, *Interprocess events*).
#[derive(Debug)]
struct IpcRing {
    /// Created so far, in slot order; at most [`IPC_RING`]. Slot `next` is created when it is
    /// first taken, so `slots.len() == next` until the ring has wrapped once.
    slots: Vec<IpcSlot>,
    /// The slot the next recording takes.
    next: usize,
    /// Set once creating the first event failed, so later calls answer at once instead of
    /// trying again each time.
    unsupported: bool,
    /// The ring's size: [`IPC_RING`], or fewer when creating a later slot failed (the ring
    /// then wraps over the slots it has).
    len: usize,
}

/// State shared by the device and every resource allocated from it.
#[derive(Debug)]
struct Shared {
    /// The device's primary context (retained by cudarc, released when the last `Arc` goes).
    ctx: Arc<CudaContext>,
    /// The copy stream (non-blocking).
    stream: Arc<CudaStream>,
    /// Recycled events, all created in `ctx` with [`EVENT_FLAGS`].
    events: Mutex<Vec<RawEvent>>,
    /// Live arenas as (base, len), for `read_back`'s range check.
    arenas: Mutex<Vec<(u64, u64)>>,
    /// Live device buffers (LoRA factors) as (base, len), for GEMM range checks.
    buffers: Mutex<Vec<(u64, u64)>>,
    /// Interprocess events, destroyed only when this state is (module docs).
    ipc: Mutex<IpcRing>,
}

impl Shared {
    /// Copies pageable host bytes to the device and returns once they have landed: enqueued
    /// on the copy stream (so later copies, GEMMs and recorded events are ordered after it),
    /// then the stream is synchronised. (A plain `cuMemcpyHtoD` from pageable memory may
    /// return before its DMA finishes, and runs on the legacy stream, which the non-blocking
    /// copy stream is not ordered with.)
    fn copy_in_sync(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError> {
        if src.is_empty() {
            return Ok(());
        }
        let _bound = bind(&self.ctx)?;
        // SAFETY: the caller checked `dst..dst+len` lies in a live allocation of ours; `src`
        // is a Rust slice of exactly `len` readable bytes that outlives the copy, which is
        // complete when the stream synchronisation below returns.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), self.stream.cu_stream())
        }
        .result()
        .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
        self.sync_stream()
    }

    /// Blocks until every operation enqueued on the copy stream has completed.
    fn sync_stream(&self) -> Result<(), DeviceError> {
        let _bound = bind(&self.ctx)?;
        // SAFETY: the stream handle is valid while `self.stream` (an owned cudarc stream) lives.
        unsafe { sys::cuStreamSynchronize(self.stream.cu_stream()) }
            .result()
            .map_err(cuda_err("cuStreamSynchronize"))
    }

    /// Best-effort synchronisation before releasing memory a copy may still touch.
    fn sync_before_free(&self, what: &str) {
        if let Err(e) = self.sync_stream() {
            error!(error = %e, "syncing the copy stream before freeing {what} failed");
        }
    }

    fn arena_contains(&self, addr: u64, len: u64) -> bool {
        ranges_contain(&self.arenas.lock().unwrap_or_else(PoisonError::into_inner), addr, len)
    }

    fn buffer_contains(&self, addr: u64, len: u64) -> bool {
        ranges_contain(&self.buffers.lock().unwrap_or_else(PoisonError::into_inner), addr, len)
    }
}

/// Whether `addr..addr+len` lies inside one of `ranges` (base, len).
fn ranges_contain(ranges: &[(u64, u64)], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else { return false };
    ranges.iter().any(|&(base, alen)| addr >= base && end <= base.saturating_add(alen))
}

impl Drop for Shared {
    fn drop(&mut self) {
        let events = std::mem::take(self.events.get_mut().unwrap_or_else(PoisonError::into_inner));
        let ring =
            std::mem::take(&mut self.ipc.get_mut().unwrap_or_else(PoisonError::into_inner).slots);
        if events.is_empty() && ring.is_empty() {
            return;
        }
        let Ok(_bound) =
            bind(&self.ctx).inspect_err(|e| warn!(error = %e, "destroying pooled events"))
        else {
            return;
        };
        if !ring.is_empty() {
            // Every recording of a ring event completes before it is destroyed, so a client
            // stream that waits on its imported copy is released rather than left waiting on
            // an event that no longer exists.
            self.sync_before_free("interprocess events");
        }
        for ev in events.into_iter().chain(ring.into_iter().map(|s| s.event)) {
            // SAFETY: pooled and ring events were created in `ctx` (still alive: fields drop
            // after this), are owned only by the pool or the ring (both just emptied), and are
            // destroyed exactly once here.
            if let Err(e) = unsafe { sys::cuEventDestroy_v2(ev.0) }.result() {
                warn!(error = %describe(e), "cuEventDestroy failed");
            }
        }
    }
}

/// Maps a driver error to `DeviceError::Cuda` for `call`.
pub(super) fn cuda_err(call: &'static str) -> impl Fn(DriverError) -> DeviceError {
    move |e| DeviceError::Cuda { call, message: describe(e) }
}

/// `CUDA_ERROR_X (driver's description)`.
pub(super) fn describe(e: DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// The context made current on this thread for the guard's life (see [`bind`]).
pub(super) struct Bound {
    /// Another context that was current before and is made current again on drop.
    pub(super) restore: Option<sys::CUcontext>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(prev) = self.restore {
            // SAFETY: `prev` was the current context of this thread when the guard was made;
            // making it current again only restores the thread's previous state.
            if let Err(e) = unsafe { sys::cuCtxSetCurrent(prev) }.result() {
                warn!(error = %describe(e), "restoring the caller's CUDA context failed");
            }
        }
    }
}

/// Makes `ctx` current on the calling thread (copies are issued from I/O threads, record and
/// release from client threads). Cheap when it already is current: one `cuCtxGetCurrent`, a
/// thread-local read in the driver. When the thread had *another* context current (an
/// in-process client with its own context), that one is restored when the guard drops; when it
/// had none, ours stays current so the next call is the cheap case.
///
/// cudarc's `CudaContext::bind_to_thread` is not used: it also returns (and clears) errors that
/// cudarc recorded in unrelated `Drop`s, which would surface as spurious failures here.
pub(super) fn bind(ctx: &CudaContext) -> Result<Bound, DeviceError> {
    let current = current_context()?;
    let ours = ctx.cu_ctx();
    if current == ours {
        return Ok(Bound { restore: None });
    }
    // SAFETY: `ours` is the primary context retained by `ctx`, alive while `ctx` is.
    unsafe { sys::cuCtxSetCurrent(ours) }.result().map_err(cuda_err("cuCtxSetCurrent"))?;
    Ok(Bound { restore: (!current.is_null()).then_some(current) })
}

/// The context current on the calling thread (null: none).
pub(super) fn current_context() -> Result<sys::CUcontext, DeviceError> {
    let mut current: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: `current` is a valid out-pointer for one CUcontext.
    unsafe { sys::cuCtxGetCurrent(&mut current) }.result().map_err(cuda_err("cuCtxGetCurrent"))?;
    Ok(current)
}

/// The CUDA device (module docs).
#[derive(Debug)]
pub struct CudaDevice {
    info: DeviceInfo,
    shared: Arc<Shared>,
    page_size: usize,
    /// cuBLAS, created on first use; `Err` (logged once) when it cannot be loaded or created.
    blas: OnceLock<Result<Mutex<Blas>, String>>,
    /// The VMM allocation granularity (bytes) when arenas are exportable VMM allocations;
    /// `None`: `cuMemAlloc` arenas (module docs, *Memory*).
    vmm_granularity: Option<usize>,
}

impl CudaDevice {
    /// `cuMemAlloc` of `bytes` in our context; `oom` words an allocation the device cannot
    /// satisfy (a size beyond the address space, out of memory, or a size some drivers answer
    /// with INVALID_VALUE).
    fn device_malloc(
        &self,
        bytes: u64,
        oom: impl Fn(String) -> DeviceError,
    ) -> Result<u64, DeviceError> {
        let len =
            usize::try_from(bytes).map_err(|_| oom("larger than the address space".into()))?;
        let _bound = bind(&self.shared.ctx)?;
        // SAFETY: a plain allocation of `len` bytes in the current (our) context; callers
        // write the memory before anything reads it.
        match unsafe { cudarc::driver::result::malloc_sync(len) } {
            Ok(p) => Ok(p),
            Err(
                e @ DriverError(
                    sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY
                    | sys::CUresult::CUDA_ERROR_INVALID_VALUE,
                ),
            ) => Err(oom(describe(e))),
            Err(e) => Err(cuda_err("cuMemAlloc")(e)),
        }
    }

    /// A VMM arena of at least `bytes` (module docs, *Memory*): created, given an address
    /// range, mapped and made accessible to this device. Whatever fails after `cuMemCreate` is
    /// undone before returning.
    fn vmm_alloc(&self, bytes: u64, granularity: usize) -> Result<VmmMemory, VmmFailure> {
        // A size the device cannot have is out of memory, not a reason to try cuMemAlloc.
        if bytes > self.info.total_memory {
            return Err(VmmFailure::OutOfMemory(format!(
                "more than the device's {} bytes",
                self.info.total_memory
            )));
        }
        let size = bytes
            .checked_next_multiple_of(granularity as u64)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| VmmFailure::OutOfMemory("larger than the address space".into()))?;
        let _bound = bind(&self.shared.ctx).map_err(VmmFailure::Other)?;
        let dev = self.shared.ctx.cu_device();
        let prop = vmm_prop(dev);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: `handle` is a valid out-pointer; `prop` is fully initialised and lives across
        // the call; `size` is a multiple of the granularity the driver reported for `prop`.
        match unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) }.result() {
            Ok(()) => {}
            Err(e @ DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                return Err(VmmFailure::OutOfMemory(describe(e)));
            }
            Err(e) => return Err(VmmFailure::Other(cuda_err("cuMemCreate")(e))),
        }
        let mut va: sys::CUdeviceptr = 0;
        // SAFETY: `va` is a valid out-pointer; alignment 0 asks for the default (the
        // granularity), address 0 for no placement hint; no flags are defined.
        if let Err(e) = unsafe { sys::cuMemAddressReserve(&mut va, size, 0, 0, 0) }.result() {
            vmm_undo(handle, None, size);
            return Err(VmmFailure::Other(cuda_err("cuMemAddressReserve")(e)));
        }
        // SAFETY: `va..va+size` is the range just reserved, `handle` an allocation of exactly
        // `size` bytes mapped from its start; no flags are defined.
        if let Err(e) = unsafe { sys::cuMemMap(va, size, 0, handle, 0) }.result() {
            vmm_undo(handle, Some((va, false)), size);
            return Err(VmmFailure::Other(cuda_err("cuMemMap")(e)));
        }
        let access = sys::CUmemAccessDesc {
            location: device_location(dev),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range is mapped (above); `access` is one initialised descriptor that
        // lives across the call.
        if let Err(e) = unsafe { sys::cuMemSetAccess(va, size, &access, 1) }.result() {
            vmm_undo(handle, Some((va, true)), size);
            return Err(VmmFailure::Other(cuda_err("cuMemSetAccess")(e)));
        }
        Ok(VmmMemory { handle, va, size })
    }

    /// The UUID of every visible GPU, by ordinal, without creating a context (for choosing
    /// devices by UUID before opening them). No driver: [`DeviceError::NoCudaDriver`]; a
    /// driver without GPUs: an empty list.
    pub fn enumerate() -> Result<Vec<String>, DeviceError> {
        (0..visible_count()?)
            .map(|i| {
                let dev = cudarc::driver::result::device::get(i as i32)
                    .map_err(cuda_err("cuDeviceGet"))?;
                let uuid = cudarc::driver::result::device::get_uuid(dev)
                    .map_err(cuda_err("cuDeviceGetUuid"))?;
                Ok(format_uuid(&uuid))
            })
            .collect()
    }

    pub fn new(config: &DeviceConfig) -> Result<CudaDevice, DeviceError> {
        let ordinal = config.ordinal;
        let count = visible_count()?;
        if ordinal >= count {
            return Err(DeviceError::NoSuchDevice { ordinal, count });
        }
        // `CudaContext::new` makes the primary context current on this thread: give a caller
        // that had its own context current that one back when opening is over.
        let current = current_context()?;
        let _restore = Bound { restore: (!current.is_null()).then_some(current) };
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: ferry never creates a cudarc `CudaSlice` (whose cross-stream use this tracking
        // would guard): device memory is raw driver allocations (VMM or cuMemAlloc), and every
        // ordering between the copy stream and client streams is expressed with explicit
        // events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        let shared = Arc::new(Shared {
            ctx,
            stream,
            events: Mutex::new(Vec::new()),
            arenas: Mutex::new(Vec::new()),
            buffers: Mutex::new(Vec::new()),
            ipc: Mutex::new(IpcRing {
                slots: Vec::new(),
                next: 0,
                unsupported: false,
                len: IPC_RING,
            }),
        });
        let ctx = &shared.ctx;

        let name = device_name(ctx.cu_device()).unwrap_or_else(|e| {
            warn!(error = %e, "cuDeviceGetName failed");
            format!("CUDA device {ordinal}")
        });
        let uuid = format_uuid(&ctx.uuid().map_err(cuda_err("cuDeviceGetUuid"))?);
        let (free, total) = ctx.mem_get_info().map_err(cuda_err("cuMemGetInfo"))?;
        let attr = |a: sys::CUdevice_attribute| match ctx.attribute(a) {
            Ok(v) => v,
            Err(e) => {
                // Older drivers do not know newer attributes: treat as unsupported.
                warn!(attribute = ?a, error = %describe(e), "cuDeviceGetAttribute failed");
                0
            }
        };
        let register = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED);
        let register_ro =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED);
        let mapped_reads = config.mapped_reads && register != 0 && register_ro != 0;
        if config.mapped_reads && !mapped_reads {
            info!(
                host_register = register,
                read_only_host_register = register_ro,
                "read-only host registration unsupported: mapped files go through the staging ring"
            );
        }
        let vmm_granularity = vmm_support(ctx.cu_device(), &attr);
        let (pcie, nvml_numa_node) = nvml_facts(&uuid);
        let pci_bus_id = pci_bus_id(ctx.cu_device()).unwrap_or_else(|e| {
            warn!(error = %e, "cuDeviceGetPCIBusId failed: NUMA node unknown");
            None
        });

        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page_size = usize::try_from(page).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096);

        let info = DeviceInfo {
            backend: Backend::Cuda,
            ordinal,
            name,
            uuid,
            total_memory: total as u64,
            free_memory: free as u64,
            pcie,
            pci_bus_id,
            nvml_numa_node,
            mapped_reads,
        };
        info!(
            ordinal,
            name = %info.name,
            uuid = %info.uuid,
            total = info.total_memory,
            free = info.free_memory,
            pcie = ?info.pcie,
            mapped_reads,
            vmm_granularity,
            "CUDA device opened"
        );
        Ok(CudaDevice { info, shared, page_size, blas: OnceLock::new(), vmm_granularity })
    }

    /// Whether arenas are VMM allocations shared as POSIX file descriptors
    /// ([`super::ArenaShare::CudaFd`]); `false`: `cuMemAlloc` arenas shared through legacy IPC
    /// handles. (An arena whose VMM allocation failed falls back to `cuMemAlloc` even when
    /// this is `true`; the log says so.)
    pub fn vmm_arenas(&self) -> bool {
        self.vmm_granularity.is_some()
    }

    /// The allocation granularity VMM arenas are rounded up to, when arenas are VMM.
    pub fn vmm_granularity(&self) -> Option<u64> {
        self.vmm_granularity.map(|g| g as u64)
    }
}

/// The allocation properties of a VMM arena on device `dev`: pinned device memory, exportable
/// as a POSIX file descriptor.
fn vmm_prop(dev: sys::CUdevice) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes:
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        location: device_location(dev),
        win32HandleMetaData: std::ptr::null_mut(),
        // No compression, no GPUDirect RDMA, no special usage.
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// The memory location "device `dev`" (a `CUdevice`, as the VMM calls take it).
pub(super) fn device_location(dev: sys::CUdevice) -> sys::CUmemLocation {
    sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: dev }
}

/// Whether arenas on `dev` can be exportable VMM allocations, as their granularity (logged
/// either way). Needs both attributes: VMM itself, and POSIX-fd handles (the only kind that
/// crosses a Unix socket).
fn vmm_support(dev: sys::CUdevice, attr: &dyn Fn(sys::CUdevice_attribute) -> i32) -> Option<usize> {
    let vmm =
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED);
    let posix_fd = attr(
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
    );
    if vmm == 0 || posix_fd == 0 {
        info!(
            virtual_memory_management = vmm,
            posix_fd_handles = posix_fd,
            "VMM export unsupported: arenas use cuMemAlloc (shared through legacy IPC handles)"
        );
        return None;
    }
    let prop = vmm_prop(dev);
    let query = |option| {
        let mut granularity = 0usize;
        // SAFETY: `granularity` is a valid out-pointer; `prop` is a fully initialised property
        // struct that lives across the call.
        unsafe { sys::cuMemGetAllocationGranularity(&mut granularity, &prop, option) }
            .result()
            .map_err(cuda_err("cuMemGetAllocationGranularity"))
            .and_then(|()| match granularity {
                0 => Err(DeviceError::Cuda {
                    call: "cuMemGetAllocationGranularity",
                    message: "the driver reported a granularity of 0".into(),
                }),
                g => Ok(g),
            })
    };
    use sys::CUmemAllocationGranularity_flags::{
        CU_MEM_ALLOC_GRANULARITY_MINIMUM, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
    };
    match query(CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        .or_else(|_| query(CU_MEM_ALLOC_GRANULARITY_MINIMUM))
    {
        Ok(g) => {
            info!(granularity = g, "arenas are VMM allocations shared as POSIX file descriptors");
            Some(g)
        }
        Err(e) => {
            warn!(error = %e, "VMM granularity unknown: arenas use cuMemAlloc (legacy IPC handles)");
            None
        }
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Nothing the device enqueued may run past it unobserved (resources allocated from it
        // keep the stream and context alive and synchronise again before freeing).
        if let Err(e) = self.shared.sync_stream() {
            warn!(error = %e, "syncing the copy stream while closing the device failed");
        }
    }
}

/// How many GPUs this process sees (`cuInit` + `cuDeviceGetCount`); checks for libcuda first,
/// since cudarc panics on its first call without it.
fn visible_count() -> Result<usize, DeviceError> {
    if !super::cuda_driver_present() {
        return Err(DeviceError::NoCudaDriver);
    }
    match CudaContext::device_count() {
        Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
        // cuInit reports a driver without usable GPUs this way (e.g. a container without
        // /dev/nvidia*).
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(0),
        // The toolkit's link-time stub (stubs/libcuda.so, found on build machines) loads but
        // is no driver.
        Err(DriverError(sys::CUresult::CUDA_ERROR_STUB_LIBRARY)) => Err(DeviceError::NoCudaDriver),
        Err(e) => Err(cuda_err("cuInit/cuDeviceGetCount")(e)),
    }
}

/// A string the driver writes into a caller's buffer: `fill(buf, len)` is the call.
fn driver_string(
    call: &'static str,
    fill: impl FnOnce(*mut c_char, i32) -> sys::CUresult,
) -> Result<String, DeviceError> {
    let mut buf = [0 as c_char; 256];
    // The last byte is never handed to the driver, so a NUL is always present.
    fill(buf.as_mut_ptr(), (buf.len() - 1) as i32).result().map_err(cuda_err(call))?;
    let bytes: Vec<u8> = buf.iter().map(|&c| c as u8).collect();
    Ok(CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().trim().to_string())
        .unwrap_or_default())
}

/// The product name, from `cuDeviceGetName`.
fn device_name(dev: sys::CUdevice) -> Result<String, DeviceError> {
    driver_string("cuDeviceGetName", |buf, len| {
        // SAFETY: `buf` has room for `len` bytes; the driver writes a NUL-terminated name.
        unsafe { sys::cuDeviceGetName(buf, len, dev) }
    })
}

/// The PCI bus id (`0000:3B:00.0`), from `cuDeviceGetPCIBusId`; `None` if the driver gives
/// an empty one.
fn pci_bus_id(dev: sys::CUdevice) -> Result<Option<String>, DeviceError> {
    let id = driver_string("cuDeviceGetPCIBusId", |buf, len| {
        // SAFETY: `buf` has room for `len` bytes; the driver writes a NUL-terminated id.
        unsafe { sys::cuDeviceGetPCIBusId(buf, len, dev) }
    })?;
    Ok((!id.is_empty()).then_some(id))
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as nvidia-smi and NVML print it.
pub(super) fn format_uuid(uuid: &sys::CUuuid) -> String {
    let b: Vec<u8> = uuid.bytes.iter().map(|&c| c as u8).collect();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
}

/// What NVML knows about the GPU: its PCIe link (generation, width) and its NUMA node; each
/// `None` (logged) when NVML is unavailable or does not say.
///
/// Generation is the *maximum* the device and system support: the current generation drops
/// to Gen1 at idle (power saving), so it says nothing about the link's capacity. Width is the
/// *current* one (it does not change with power states, and a link trained at x8 is worth
/// knowing), falling back to the maximum.
fn nvml_facts(uuid: &str) -> (Option<(u32, u32)>, Option<u32>) {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "NVML unavailable: PCIe link and NUMA node unknown to NVML");
            return (None, None);
        }
    };
    let dev = match nvml.device_by_uuid(uuid) {
        Ok(d) => d,
        Err(e) => {
            warn!(uuid, error = %e, "NVML does not know this GPU: PCIe link unknown");
            return (None, None);
        }
    };
    let generation = dev.max_pcie_link_gen().or_else(|_| dev.current_pcie_link_gen());
    let width = dev.current_pcie_link_width().or_else(|_| dev.max_pcie_link_width());
    let link = match (generation, width) {
        (Ok(g), Ok(w)) => Some((g, w)),
        (g, w) => {
            warn!(generation = ?g.err(), width = ?w.err(), "NVML PCIe link query failed");
            None
        }
    };
    // Newer drivers only; sysfs is the first source anyway (crate::numa).
    let node = dev.numa_node_id().ok();
    (link, node)
}

impl BackendOps for CudaDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc_arena(&self, bytes: u64) -> Result<Arena, DeviceError> {
        let oom = |reason: String| DeviceError::OutOfMemory { what: "device arena", bytes, reason };
        if bytes == 0 {
            return Err(oom("an arena cannot be empty".into()));
        }
        let vmm = match self.vmm_granularity {
            None => None,
            Some(granularity) => match self.vmm_alloc(bytes, granularity) {
                Ok(memory) => Some(memory),
                Err(VmmFailure::OutOfMemory(reason)) => return Err(oom(reason)),
                Err(VmmFailure::Other(e)) => {
                    warn!(
                        error = %e,
                        bytes,
                        "VMM arena allocation failed: falling back to cuMemAlloc (the arena is \
                         shared through a legacy IPC handle)"
                    );
                    None
                }
            },
        };
        // Either kind of memory is uninitialised, fine for raw bytes only written by copies.
        let (ptr, memory) = match vmm {
            Some(vmm) => (vmm.va, ArenaMemory::Vmm(vmm)),
            // cuMemAlloc (not cuMemAllocAsync): exportable with cuIpcGetMemHandle (module docs).
            None => (self.device_malloc(bytes, oom)?, ArenaMemory::Alloc),
        };
        debug!(base = format_args!("{ptr:#x}"), bytes, memory = ?memory, "device arena allocated");
        self.shared.arenas.lock().unwrap_or_else(PoisonError::into_inner).push((ptr, bytes));
        Ok(Arena {
            base: ptr,
            len: bytes,
            inner: ArenaInner::Cuda(CudaArena {
                ptr,
                len: bytes,
                memory,
                shared: Arc::clone(&self.shared),
            }),
        })
    }

    fn alloc_staging(&self, bytes: usize) -> Result<HostBuffer, DeviceError> {
        if bytes == 0 {
            // cuMemHostAlloc rejects 0 bytes; an empty buffer needs no memory at all.
            return Ok(HostBuffer {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
                inner: HostBufferInner::Cuda(PinnedAlloc {
                    ptr: std::ptr::null_mut(),
                    len: 0,
                    shared: Arc::clone(&self.shared),
                }),
            });
        }
        let _bound = bind(&self.shared.ctx)?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; the driver allocates and pins `bytes` bytes.
        let r = unsafe { sys::cuMemHostAlloc(&mut ptr, bytes, STAGING_FLAGS) }.result();
        if let Err(e) = r {
            return Err(DeviceError::OutOfMemory {
                what: "pinned staging buffer",
                bytes: bytes as u64,
                reason: describe(e),
            });
        }
        if ptr.is_null() {
            return Err(DeviceError::OutOfMemory {
                what: "pinned staging buffer",
                bytes: bytes as u64,
                reason: "cuMemHostAlloc returned a null pointer".into(),
            });
        }
        // Zero it once, as the host backend does (and so no stale bytes can ever leak out);
        // this also faults nothing new in: cuMemHostAlloc memory is already resident.
        // SAFETY: `ptr` points to `bytes` writable bytes just allocated and owned by nobody else.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, bytes) };
        Ok(HostBuffer {
            ptr: ptr.cast(),
            len: bytes,
            inner: HostBufferInner::Cuda(PinnedAlloc {
                ptr,
                len: bytes,
                shared: Arc::clone(&self.shared),
            }),
        })
    }

    fn register_mapping(
        &self,
        ptr: *const u8,
        len: usize,
    ) -> Result<Option<Registration>, DeviceError> {
        if !self.info.mapped_reads || len == 0 || ptr.is_null() {
            return Ok(None);
        }
        let page = self.page_size;
        let start = (ptr as usize) & !(page - 1);
        let Some(end) =
            (ptr as usize).checked_add(len).and_then(|e| e.checked_next_multiple_of(page))
        else {
            return Ok(None);
        };
        let reg_len = end - start;
        let _bound = bind(&self.shared.ctx)?;
        let base = start as *mut c_void;
        // SAFETY: the caller passes a live read-only mapping of `len` bytes at `ptr`; the range
        // rounded out to whole pages is still inside it (mappings are page-granular).
        // READ_ONLY tells the driver the device never writes it, which a PROT_READ mapping
        // requires. Registration only pins pages; it does not change their contents.
        match unsafe { sys::cuMemHostRegister_v2(base, reg_len, REGISTER_FLAGS) }.result() {
            Ok(()) => {
                debug!(addr = ?base, bytes = reg_len, "mapping registered with the device");
                Ok(Some(Registration {
                    inner: RegistrationInner::Cuda(CudaRegistration {
                        ptr: base,
                        len: reg_len,
                        shared: Arc::clone(&self.shared),
                    }),
                }))
            }
            Err(e) => {
                // Expected on some platforms (field reports: "operation not supported" for
                // MAP_SHARED file pages, driver regressions); the staging ring is the fallback.
                info!(
                    addr = ?base,
                    bytes = reg_len,
                    error = %describe(e),
                    "cuMemHostRegister of a mapping failed: using the staging ring"
                );
                Ok(None)
            }
        }
    }

    unsafe fn copy_h2d_async(
        &self,
        src: *const u8,
        dst: u64,
        len: usize,
    ) -> Result<(), DeviceError> {
        if len == 0 {
            return Ok(());
        }
        debug_assert!(self.shared.arena_contains(dst, len as u64), "copy outside every arena");
        let _bound = bind(&self.shared.ctx)?;
        // SAFETY: the caller guarantees `src..src+len` is a staging buffer or a registered
        // mapping (page-locked, so the copy is truly asynchronous) that stays valid and
        // unchanged until an event recorded after this call completes, and that
        // `dst..dst+len` lies in a live arena of this device. The stream is ours and alive.
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), len, self.shared.stream.cu_stream()) }
            .result()
            .map_err(cuda_err("cuMemcpyHtoDAsync"))
    }

    fn record(&self) -> Result<Event, DeviceError> {
        let _bound = bind(&self.shared.ctx)?;
        let pooled = self.shared.events.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let event = match pooled {
            Some(RawEvent(ev)) => ev,
            None => {
                let mut ev: sys::CUevent = std::ptr::null_mut();
                // SAFETY: `ev` is a valid out-pointer; the event is created in the current
                // (our) context.
                unsafe { sys::cuEventCreate(&mut ev, EVENT_FLAGS) }
                    .result()
                    .map_err(cuda_err("cuEventCreate"))?;
                ev
            }
        };
        // Owned from here: dropping the handle recycles or destroys the event.
        let handle = CudaEventHandle { event, shared: Arc::clone(&self.shared) };
        // SAFETY: `event` is a live event of our context, owned by `handle`; re-recording a
        // recycled one is allowed (earlier waits on it keep the state they captured).
        unsafe { sys::cuEventRecord(event, self.shared.stream.cu_stream()) }
            .result()
            .map_err(cuda_err("cuEventRecord"))?;
        Ok(Event(EventInner::Cuda(Arc::new(handle))))
    }

    fn record_ipc(&self) -> Result<[u8; 64], DeviceError> {
        let _bound = bind(&self.shared.ctx)?;
        // Held through the record, so slots are taken and recorded in one order (and a slot
        // is never created twice); a record is a few microseconds.
        let mut ring = self.shared.ipc.lock().unwrap_or_else(PoisonError::into_inner);
        if ring.unsupported {
            return Err(IPC_UNSUPPORTED);
        }
        let mut at = ring.next;
        if at == ring.slots.len() {
            match new_ipc_event() {
                Ok(slot) => ring.slots.push(slot),
                Err(e) if !ring.slots.is_empty() => {
                    // Out of event resources part way: keep the slots there are.
                    warn!(error = %e, slots = ring.slots.len(), "interprocess event ring capped");
                    ring.len = ring.slots.len();
                    at = 0;
                }
                Err(e) => {
                    // Whatever the reason (unsupported, out of resources, an OS refusal), no
                    // more events are tried: clients wait through the daemon instead, which
                    // only costs a round trip. Asking again on every acquire would not help.
                    ring.unsupported = true;
                    warn!(
                        error = %e,
                        "interprocess events unavailable: clients wait for layers through the \
                         daemon (wait_ready)"
                    );
                    return Err(IPC_UNSUPPORTED);
                }
            }
        }
        let slot = &ring.slots[at];
        // SAFETY: the event is a live interprocess event of our context, owned by the ring
        // (destroyed only with `Shared`); the stream is ours and alive. Re-recording it is the
        // design (module docs): earlier waits keep the state they captured, later ones wait
        // for this later point.
        unsafe { sys::cuEventRecord(slot.event.0, self.shared.stream.cu_stream()) }
            .result()
            .map_err(cuda_err("cuEventRecord"))?;
        let handle = slot.handle;
        ring.next = (at + 1) % ring.len;
        Ok(handle)
    }

    fn wait_client(&self, done: &ClientDone) -> Result<(), DeviceError> {
        match done {
            ClientDone::Now => Ok(()),
            ClientDone::CudaEvent(raw) => self.stream_wait(raw.raw() as usize as sys::CUevent),
            ClientDone::Event(e) => match &e.0 {
                EventInner::Cuda(h) => self.stream_wait(h.event),
                // Done returns at once; a host event (another device's copy engine) is waited
                // on here, since the GPU cannot wait for it.
                EventInner::Done | EventInner::Host(_) => e.wait(),
            },
        }
    }

    fn read_back(&self, src: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        let len = dst.len() as u64;
        // Copies into the range may still be in flight on the copy stream (non-blocking, so
        // the synchronous memcpy below would not wait for it).
        self.shared.sync_stream()?;
        // Held through the copy, so the arena cannot be freed between the check and the copy
        // (`CudaArena::drop` takes this lock first). read_back is for tests and verification,
        // never the streaming path, so blocking arena changes meanwhile costs nothing.
        let arenas = self.shared.arenas.lock().unwrap_or_else(PoisonError::into_inner);
        if !ranges_contain(&arenas, src, len) {
            return Err(DeviceError::OutOfRange { addr: src, len });
        }
        if dst.is_empty() {
            return Ok(());
        }
        let _bound = bind(&self.shared.ctx)?;
        // SAFETY: `src..src+len` lies in a live arena (checked above, kept alive by the lock);
        // `dst` is a Rust slice of exactly `len` writable bytes; the copy is synchronous.
        let r = unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()) };
        drop(arenas);
        r.result().map_err(cuda_err("cuMemcpyDtoH"))
    }

    fn write_sync(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError> {
        let len = src.len() as u64;
        // Everything queued before (the layer's own copy in particular) lands first.
        self.shared.sync_stream()?;
        let arenas = self.shared.arenas.lock().unwrap_or_else(PoisonError::into_inner);
        if !ranges_contain(&arenas, dst, len) {
            return Err(DeviceError::OutOfRange { addr: dst, len });
        }
        // The arena stays alive (and its range valid) while the lock is held.
        let r = self.shared.copy_in_sync(dst, src);
        drop(arenas);
        r
    }

    fn device_gemm(&self) -> bool {
        self.blas().is_ok()
    }

    fn alloc_device_buffer(&self, bytes: u64) -> Result<DeviceBuffer, DeviceError> {
        let oom =
            |reason: String| DeviceError::OutOfMemory { what: "device buffer", bytes, reason };
        if bytes == 0 {
            return Err(oom("a device buffer cannot be empty".into()));
        }
        // Filled with `DeviceBuffer::write` before anything reads it.
        let ptr = self.device_malloc(bytes, oom)?;
        self.shared.buffers.lock().unwrap_or_else(PoisonError::into_inner).push((ptr, bytes));
        Ok(DeviceBuffer {
            addr: ptr,
            len: bytes,
            inner: DeviceBufferInner::Cuda(CudaBuffer { ptr, shared: Arc::clone(&self.shared) }),
        })
    }

    unsafe fn gemm_accumulate(&self, g: &GemmAccumulate) -> Result<(), DeviceError> {
        let args = col_major(g).ok_or(DeviceError::Unsupported(
            "run a GEMM of these types or sizes (cublasGemmEx takes 32-bit dimensions)",
        ))?;
        if g.m == 0 || g.n == 0 || g.k == 0 {
            return Ok(());
        }
        // Operands must lie in memory of this device: A and B in a device buffer (or the arena),
        // C in the arena. The sizes cannot overflow: col_major checked they fit i32s.
        let bytes = |rows: u64, cols: u64, t: GemmType| rows * cols * t.size();
        let inside = |addr, len| {
            self.shared.buffer_contains(addr, len) || self.shared.arena_contains(addr, len)
        };
        for (addr, len) in [(g.a, bytes(g.m, g.k, g.ab)), (g.b, bytes(g.k, g.n, g.ab))] {
            if !inside(addr, len) {
                return Err(DeviceError::OutOfRange { addr, len });
            }
        }
        let c_len = bytes(g.m, g.n, g.c_type);
        if !self.shared.arena_contains(g.c, c_len) {
            return Err(DeviceError::OutOfRange { addr: g.c, len: c_len });
        }
        let blas = self
            .blas()
            .map_err(|reason| DeviceError::Cuda { call: "cublasCreate", message: reason })?;
        let blas = blas.lock().unwrap_or_else(PoisonError::into_inner);
        let _bound = bind(&self.shared.ctx)?;
        let (alpha32, beta32) = (g.alpha as f32, 1f32);
        let (alpha64, beta64) = (g.alpha, 1f64);
        let (alpha, beta): (*const c_void, *const c_void) =
            if args.compute == blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_64F {
                ((&raw const alpha64).cast(), (&raw const beta64).cast())
            } else {
                ((&raw const alpha32).cast(), (&raw const beta32).cast())
            };
        // SAFETY: the handle is live (owned by `blas`, used under its mutex) and bound to our
        // copy stream, so the GEMM runs after every copy enqueued before it (the weight's own
        // copy in particular); A, B and C lie in live device memory of this context (checked
        // above; the caller keeps them allocated until an event after this call completes);
        // the leading dimensions describe dense row-major matrices (see `col_major`); alpha and
        // beta are host scalars of the compute type (pointer mode host, the default) that
        // cuBLAS reads before returning.
        let status = unsafe {
            blas_sys::cublasGemmEx(
                blas.handle,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                args.m,
                args.n,
                args.k,
                alpha,
                args.a as usize as *const c_void,
                args.ab,
                args.lda,
                args.b as usize as *const c_void,
                args.ab,
                args.ldb,
                beta,
                args.c as usize as *mut c_void,
                args.c_type,
                args.ldc,
                args.compute,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        status
            .result()
            .map_err(|e| DeviceError::Cuda { call: "cublasGemmEx", message: format!("{e:?}") })
    }
}

impl CudaDevice {
    /// cuBLAS on the copy stream, created on first use (module docs).
    fn blas(&self) -> Result<&Mutex<Blas>, String> {
        self.blas
            .get_or_init(|| {
                Blas::new(&self.shared).map(Mutex::new).inspect_err(|e| {
                    info!(error = %e, "cuBLAS unavailable: LoRA deltas are merged on the CPU");
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// A cuBLAS handle bound to the copy stream.
#[derive(Debug)]
struct Blas {
    handle: blas_sys::cublasHandle_t,
    shared: Arc<Shared>,
}

// SAFETY: a cuBLAS handle may be used from any thread; `Blas` is only used under a mutex, so
// one thread at a time configures or enqueues on it.
unsafe impl Send for Blas {}

impl Blas {
    fn new(shared: &Arc<Shared>) -> Result<Blas, String> {
        // cudarc panics on the first call into a library it cannot load: ask first.
        // SAFETY: only tries to dlopen libcublas by its usual names; runs no cuBLAS call.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err("libcublas could not be loaded".into());
        }
        let _bound = bind(&shared.ctx).map_err(|e| e.to_string())?;
        let mut handle: blas_sys::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; the handle is created for the current
        // (our primary) context.
        unsafe { blas_sys::cublasCreate_v2(&mut handle) }
            .result()
            .map_err(|e| format!("cublasCreate: {e:?}"))?;
        let blas = Blas { handle, shared: Arc::clone(shared) };
        // SAFETY: the handle was just created; the stream is ours and lives as long as
        // `shared`, which the handle's owner holds.
        unsafe {
            blas_sys::cublasSetStream_v2(
                handle,
                shared.stream.cu_stream() as blas_sys::cudaStream_t,
            )
        }
        .result()
        .map_err(|e| format!("cublasSetStream: {e:?}"))?;
        Ok(blas)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // GEMMs still queued use the handle's workspace.
        self.shared.sync_before_free("the cuBLAS handle");
        let Ok(_bound) = bind(&self.shared.ctx).inspect_err(|e| warn!(error = %e, "cuBLAS drop"))
        else {
            return;
        };
        // SAFETY: the handle is owned by this value and destroyed exactly once; nothing is
        // queued on it any more (the stream was drained above).
        if let Err(e) = unsafe { blas_sys::cublasDestroy_v2(self.handle) }.result() {
            warn!(error = ?e, "cublasDestroy failed");
        }
    }
}

/// `cublasGemmEx` arguments for a row-major [`GemmAccumulate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ColMajor {
    m: i32,
    n: i32,
    k: i32,
    a: u64,
    lda: i32,
    b: u64,
    ldb: i32,
    c: u64,
    ldc: i32,
    ab: blas_sys::cudaDataType,
    c_type: blas_sys::cudaDataType,
    compute: blas_sys::cublasComputeType_t,
}

/// cuBLAS is column-major. A row-major `[r, c]` matrix with row stride `c` is the column-major
/// `[c, r]` matrix (its transpose) with leading dimension `c`, and `C = A B` is `Cᵀ = Bᵀ Aᵀ`:
/// so the row-major GEMM is the column-major one with `m' = n`, `n' = m`, `A' = B` (ld `n`),
/// `B' = A` (ld `k`), `C' = C` (ld `n`), and no transposes. `None` for a type pair cuBLAS
/// does not offer as `C += A B` or a dimension beyond `i32`.
fn col_major(g: &GemmAccumulate) -> Option<ColMajor> {
    use blas_sys::cublasComputeType_t::{CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_64F};
    use blas_sys::cudaDataType::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F, CUDA_R_64F};
    let (ab, c_type, compute) = match (g.ab, g.c_type) {
        (GemmType::F16, GemmType::F16) => (CUDA_R_16F, CUDA_R_16F, CUBLAS_COMPUTE_32F),
        (GemmType::BF16, GemmType::BF16) => (CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F),
        (GemmType::F32, GemmType::F32) => (CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F),
        (GemmType::F64, GemmType::F64) => (CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F),
        _ => return None,
    };
    let dim = |x: u64| i32::try_from(x.max(1)).ok();
    let (m, n, k) = (dim(g.m)?, dim(g.n)?, dim(g.k)?);
    Some(ColMajor {
        m: n,
        n: m,
        k,
        a: g.b,
        lda: n,
        b: g.a,
        ldb: k,
        c: g.c,
        ldc: n,
        ab,
        c_type,
        compute,
    })
}

/// Creates one interprocess event in the current (our) context and gets its handle; the
/// event is destroyed again if the handle cannot be had. A driver that refuses either step as
/// unsupported answers [`IPC_UNSUPPORTED`].
fn new_ipc_event() -> Result<IpcSlot, DeviceError> {
    let unsupported_or = |call| {
        move |e: DriverError| match e.0 {
            sys::CUresult::CUDA_ERROR_NOT_SUPPORTED => IPC_UNSUPPORTED,
            _ => cuda_err(call)(e),
        }
    };
    let mut ev: sys::CUevent = std::ptr::null_mut();
    // SAFETY: `ev` is a valid out-pointer; the event is created in the current context, which
    // the caller has made ours.
    unsafe { sys::cuEventCreate(&mut ev, IPC_EVENT_FLAGS) }
        .result()
        .map_err(unsupported_or("cuEventCreate"))?;
    let mut handle = sys::CUipcEventHandle { reserved: [0; 64] };
    // SAFETY: `handle` is a valid out-pointer; `ev` is the live interprocess event just made.
    if let Err(e) = unsafe { sys::cuIpcGetEventHandle(&mut handle, ev) }.result() {
        // SAFETY: `ev` was created above, never recorded or shared, and destroyed once here.
        if let Err(d) = unsafe { sys::cuEventDestroy_v2(ev) }.result() {
            warn!(error = %describe(d), "cuEventDestroy failed");
        }
        return Err(unsupported_or("cuIpcGetEventHandle")(e));
    }
    Ok(IpcSlot { event: RawEvent(ev), handle: handle.reserved.map(|c| c as u8) })
}

impl CudaDevice {
    /// Makes the copy stream wait (on the device, no host sync) for `event`.
    fn stream_wait(&self, event: sys::CUevent) -> Result<(), DeviceError> {
        if event.is_null() {
            return Err(DeviceError::Cuda {
                call: "cuStreamWaitEvent",
                message: "null CUevent handle".into(),
            });
        }
        let _bound = bind(&self.shared.ctx)?;
        // SAFETY: `event` is a live CUevent: either one of ours (kept alive by the borrowed
        // `Event`) or, for `ClientDone::CudaEvent`, the client's, which its contract requires to
        // be a valid event recorded on the client's stream (possibly in another context of this
        // process; cuStreamWaitEvent allows that). The wait captures the event's state now.
        unsafe {
            sys::cuStreamWaitEvent(
                self.shared.stream.cu_stream(),
                event,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT as u32,
            )
        }
        .result()
        .map_err(cuda_err("cuStreamWaitEvent"))
    }
}

/// Why a VMM arena could not be made.
#[derive(Debug)]
enum VmmFailure {
    /// The device has no room: reported as such, like `cuMemAlloc`'s.
    OutOfMemory(String),
    /// Anything else (undone already): the arena falls back to `cuMemAlloc`.
    Other(DeviceError),
}

/// A VMM allocation, mapped read-write for our device at `va..va+size`.
#[derive(Debug)]
struct VmmMemory {
    handle: sys::CUmemGenericAllocationHandle,
    va: sys::CUdeviceptr,
    /// Bytes allocated and mapped (the arena's length rounded up to the granularity).
    size: usize,
}

/// Releases what a VMM allocation got so far: the mapping (`mapped`) and the address range
/// (`va`, if reserved), then the allocation handle. Each failure is logged; none stops the
/// rest. The caller has our context bound, and nothing may use the range any more.
fn vmm_undo(
    handle: sys::CUmemGenericAllocationHandle,
    va: Option<(sys::CUdeviceptr, bool)>,
    size: usize,
) {
    if let Some((va, mapped)) = va {
        if mapped {
            // SAFETY: `va..va+size` is mapped by us and unmapped exactly once, here; the caller
            // guarantees no operation uses it any more.
            if let Err(e) = unsafe { sys::cuMemUnmap(va, size) }.result() {
                error!(error = %describe(e), "cuMemUnmap of a device arena failed");
            }
        }
        // SAFETY: `va..va+size` was reserved by cuMemAddressReserve and is freed exactly once,
        // here, after its mapping is gone.
        if let Err(e) = unsafe { sys::cuMemAddressFree(va, size) }.result() {
            error!(error = %describe(e), "cuMemAddressFree of a device arena failed");
        }
    }
    // SAFETY: `handle` came from cuMemCreate and is released exactly once, here. Memory still
    // mapped by importers stays alive until they unmap it (the driver counts references).
    if let Err(e) = unsafe { sys::cuMemRelease(handle) }.result() {
        error!(error = %describe(e), "cuMemRelease of a device arena failed");
    }
}

/// The memory behind a [`CudaArena`].
#[derive(Debug)]
enum ArenaMemory {
    /// `cuMemAlloc`: shared through a legacy IPC handle.
    Alloc,
    /// VMM: shared as a POSIX file descriptor.
    Vmm(VmmMemory),
}

/// The engine's arena: a VMM allocation or one `cuMemAlloc` allocation (module docs,
/// *Memory*). Freed (after the copy stream drains) on drop; importers of a `cuMemAlloc`
/// arena's IPC handle must have closed it by then (a VMM arena's memory lives on until every
/// importer has unmapped it).
#[derive(Debug)]
pub struct CudaArena {
    ptr: sys::CUdeviceptr,
    len: u64,
    memory: ArenaMemory,
    shared: Arc<Shared>,
}

impl CudaArena {
    /// The legacy CUDA IPC handle of the whole allocation (`cuIpcGetMemHandle`), for a client
    /// process to `cuIpcOpenMemHandle`; offsets are sent separately. The arena must outlive
    /// every importer's mapping. VMM arenas have none ([`DeviceError::Unsupported`]): share
    /// them with [`CudaArena::share`].
    pub fn ipc_handle(&self) -> Result<[u8; 64], DeviceError> {
        if let ArenaMemory::Vmm(_) = self.memory {
            return Err(DeviceError::Unsupported(
                "export a legacy IPC handle of a VMM arena (it is shared as a file descriptor)",
            ));
        }
        let _bound = bind(&self.shared.ctx)?;
        let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `handle` is a valid out-pointer; `ptr` is the base of a live cuMemAlloc
        // allocation of our context.
        unsafe { sys::cuIpcGetMemHandle(&mut handle, self.ptr) }
            .result()
            .map_err(cuda_err("cuIpcGetMemHandle"))?;
        Ok(handle.reserved.map(|c| c as u8))
    }

    /// How a client process maps this arena: a VMM arena as a new file descriptor of its
    /// allocation (owned by the caller; close-on-exec), a `cuMemAlloc` arena as its legacy IPC
    /// handle.
    pub fn share(&self) -> Result<super::ArenaShare, DeviceError> {
        let vmm = match &self.memory {
            ArenaMemory::Alloc => {
                return Ok(super::ArenaShare::CudaIpc { handle: self.ipc_handle()? });
            }
            ArenaMemory::Vmm(vmm) => vmm,
        };
        let _bound = bind(&self.shared.ctx)?;
        let mut fd: c_int = -1;
        // SAFETY: for POSIX_FILE_DESCRIPTOR handles the driver writes one `int` through the
        // pointer, and `fd` is an `int` that lives across the call; `handle` is our live
        // allocation, created with that handle type requested.
        unsafe {
            sys::cuMemExportToShareableHandle(
                (&raw mut fd).cast(),
                vmm.handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        }
        .result()
        .map_err(cuda_err("cuMemExportToShareableHandle"))?;
        if fd < 0 {
            return Err(DeviceError::Cuda {
                call: "cuMemExportToShareableHandle",
                message: format!("the driver returned descriptor {fd}"),
            });
        }
        // SAFETY: the driver has just opened `fd` for this call; nothing else owns or closes
        // it, so it is owned from here on (closed when dropped).
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_cloexec(&fd);
        Ok(super::ArenaShare::CudaFd { fd, alloc_len: vmm.size as u64 })
    }

    /// Bytes in the arena.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this is a VMM allocation (shared as a file descriptor).
    pub fn is_vmm(&self) -> bool {
        matches!(self.memory, ArenaMemory::Vmm(_))
    }

    /// Bytes allocated: the length, rounded up to the granularity for a VMM arena.
    pub fn alloc_len(&self) -> u64 {
        match &self.memory {
            ArenaMemory::Alloc => self.len,
            ArenaMemory::Vmm(vmm) => vmm.size as u64,
        }
    }
}

/// Marks a descriptor the driver made close-on-exec, so it leaks into no child process
/// (the driver does not document the flag on descriptors it exports). Failing only logs.
fn set_cloexec(fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFD / F_SETFD on a descriptor we own only read and set its flags.
    let r = unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFD);
        if flags < 0 { flags } else { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) }
    };
    if r < 0 {
        warn!(error = %std::io::Error::last_os_error(), "marking an exported arena descriptor close-on-exec");
    }
}

impl Drop for CudaArena {
    fn drop(&mut self) {
        {
            let mut arenas = self.shared.arenas.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = arenas.iter().position(|&(b, _)| b == self.ptr) {
                arenas.swap_remove(i);
            }
        }
        self.shared.sync_before_free("a device arena");
        let Ok(_bound) =
            bind(&self.shared.ctx).inspect_err(|e| error!(error = %e, "freeing arena"))
        else {
            return;
        };
        match &self.memory {
            // Released exactly once, here; no copy into it is pending (the stream was drained
            // above).
            ArenaMemory::Vmm(vmm) => vmm_undo(vmm.handle, Some((vmm.va, true)), vmm.size),
            ArenaMemory::Alloc => {
                // SAFETY: `ptr` came from cuMemAlloc in our context (alive through `shared`),
                // is freed exactly once here, and no copy into it is pending (the stream was
                // drained above).
                if let Err(e) = unsafe { sys::cuMemFree_v2(self.ptr) }.result() {
                    error!(error = %describe(e), "cuMemFree of a device arena failed");
                }
            }
        }
    }
}

/// A pinned host allocation (`cuMemHostAlloc`) behind a staging [`HostBuffer`].
#[derive(Debug)]
pub struct PinnedAlloc {
    /// Null for an empty buffer (nothing allocated).
    ptr: *mut c_void,
    len: usize,
    shared: Arc<Shared>,
}

// SAFETY: the allocation is owned exclusively by this value (the `HostBuffer` around it hands
// out access under Rust borrows); the pointer is only an address, and freeing it through the
// driver is allowed from any thread.
unsafe impl Send for PinnedAlloc {}
// SAFETY: `&PinnedAlloc` exposes nothing (no accessor reads through the pointer).
unsafe impl Sync for PinnedAlloc {}

impl PinnedAlloc {
    /// Bytes pinned.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedAlloc {
    fn drop(&mut self) {
        if self.ptr.is_null() {
            return;
        }
        // A DMA still reading this memory would read freed (and soon reused) pages.
        self.shared.sync_before_free("a pinned staging buffer");
        let Ok(_bound) =
            bind(&self.shared.ctx).inspect_err(|e| error!(error = %e, "freeing pinned memory"))
        else {
            return;
        };
        // SAFETY: `ptr` came from cuMemHostAlloc, is freed exactly once here, and no copy reads
        // it any more (the stream was drained above).
        if let Err(e) = unsafe { sys::cuMemFreeHost(self.ptr) }.result() {
            error!(error = %describe(e), "cuMemFreeHost failed");
        }
    }
}

/// A `cuMemAlloc` allocation outside the arena behind a [`DeviceBuffer`] (LoRA factors).
/// Freed (after the copy stream drains: GEMMs may still read it) on drop.
#[derive(Debug)]
pub struct CudaBuffer {
    ptr: sys::CUdeviceptr,
    shared: Arc<Shared>,
}

impl CudaBuffer {
    /// Synchronous upload of `src` to device address `dst` (inside this buffer: the caller,
    /// `DeviceBuffer::write`, checked the range).
    pub(crate) fn write(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError> {
        // `dst..dst+len` lies in this live allocation (checked by the caller); nothing on the
        // device reads it while the buffer is being filled.
        self.shared.copy_in_sync(dst, src)
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        {
            let mut buffers = self.shared.buffers.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = buffers.iter().position(|&(b, _)| b == self.ptr) {
                buffers.swap_remove(i);
            }
        }
        self.shared.sync_before_free("a device buffer");
        let Ok(_bound) =
            bind(&self.shared.ctx).inspect_err(|e| error!(error = %e, "freeing a device buffer"))
        else {
            return;
        };
        // SAFETY: `ptr` came from cuMemAlloc in our context, is freed exactly once here, and no
        // GEMM reads it any more (the stream was drained above).
        if let Err(e) = unsafe { sys::cuMemFree_v2(self.ptr) }.result() {
            error!(error = %describe(e), "cuMemFree of a device buffer failed");
        }
    }
}

/// A file mapping registered read-only with the device; unregistered on drop, which must
/// happen before the mapping is unmapped. Registering pins the mapping's page-cache pages
/// (faulting them all in first) until then.
#[derive(Debug)]
pub struct CudaRegistration {
    /// Page-aligned start of the registered range.
    ptr: *mut c_void,
    len: usize,
    shared: Arc<Shared>,
}

// SAFETY: the registration is a driver-side record keyed by the address; the pointer is never
// dereferenced by Rust code, and cuMemHostUnregister may be called from any thread.
unsafe impl Send for CudaRegistration {}
// SAFETY: `&CudaRegistration` exposes nothing.
unsafe impl Sync for CudaRegistration {}

impl CudaRegistration {
    /// Bytes registered (the mapping range rounded out to whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for CudaRegistration {
    fn drop(&mut self) {
        // Copies may still be reading the pinned pages.
        self.shared.sync_before_free("a registered mapping");
        let Ok(_bound) =
            bind(&self.shared.ctx).inspect_err(|e| error!(error = %e, "unregistering a mapping"))
        else {
            return;
        };
        // SAFETY: `ptr` is the base address passed to a successful cuMemHostRegister, and it is
        // unregistered exactly once here; no copy reads it any more (stream drained above).
        if let Err(e) = unsafe { sys::cuMemHostUnregister(self.ptr) }.result() {
            error!(error = %describe(e), "cuMemHostUnregister failed");
        }
    }
}

/// A `CUevent` recorded on the copy stream. Recycled through the device's pool when the last
/// [`Event`] clone drops.
#[derive(Debug)]
pub struct CudaEventHandle {
    event: sys::CUevent,
    shared: Arc<Shared>,
}

// SAFETY: a CUevent is an opaque handle to a thread-safe driver object: querying,
// synchronising and waiting on it from several threads at once is allowed; it is recorded only
// once, in `record`, before the handle is shared.
unsafe impl Send for CudaEventHandle {}
// SAFETY: as above; `&self` methods only query or wait.
unsafe impl Sync for CudaEventHandle {}

impl CudaEventHandle {
    /// Whether every copy enqueued before the event has completed (`cuEventQuery`).
    pub fn is_done(&self) -> Result<bool, DeviceError> {
        let _bound = bind(&self.shared.ctx)?;
        // SAFETY: the event is live (owned by `self`).
        match unsafe { sys::cuEventQuery(self.event) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            e => Err(cuda_err("cuEventQuery")(DriverError(e))),
        }
    }

    /// Blocks until the event completes (`cuEventSynchronize`; sleeps: BLOCKING_SYNC event).
    pub fn wait(&self) -> Result<(), DeviceError> {
        let _bound = bind(&self.shared.ctx)?;
        // SAFETY: the event is live (owned by `self`).
        unsafe { sys::cuEventSynchronize(self.event) }
            .result()
            .map_err(cuda_err("cuEventSynchronize"))
    }

    /// The raw `CUevent`, for a client stream in this process to `cuStreamWaitEvent` on. Valid
    /// while an [`Event`] holding this handle lives; the event is recycled afterwards, so a
    /// stale wait on it waits for a later point on the copy stream (never for an earlier one).
    pub fn raw(&self) -> u64 {
        self.event as usize as u64
    }
}

impl Drop for CudaEventHandle {
    fn drop(&mut self) {
        {
            let mut pool = self.shared.events.lock().unwrap_or_else(PoisonError::into_inner);
            if pool.len() < EVENT_POOL_MAX {
                pool.push(RawEvent(self.event));
                return;
            }
        }
        let Ok(_bound) = bind(&self.shared.ctx).inspect_err(|e| warn!(error = %e, "event drop"))
        else {
            return;
        };
        // SAFETY: the event is owned by this handle and destroyed exactly once; destroying an
        // event that has not completed yet is allowed (released when it completes).
        if let Err(e) = unsafe { sys::cuEventDestroy_v2(self.event) }.result() {
            warn!(error = %describe(e), "cuEventDestroy failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_formatted_like_nvidia_smi() {
        let mut u = sys::CUuuid { bytes: [0; 16] };
        for (i, b) in u.bytes.iter_mut().enumerate() {
            *b = (i as u8 * 17) as c_char;
        }
        assert_eq!(format_uuid(&u), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }

    /// Needs a GPU; passes trivially without one.
    #[test]
    fn arenas_are_shared_by_their_kind() {
        if !super::super::cuda_driver_present() {
            return;
        }
        let device = match CudaDevice::new(&DeviceConfig::default()) {
            Ok(d) => d,
            Err(DeviceError::NoSuchDevice { count: 0, .. }) => return,
            Err(e) => panic!("opening the CUDA device: {e}"),
        };
        // Not a multiple of any granularity: a VMM allocation is rounded up, the arena not.
        let len = (4 << 20) + 4096;
        let arena = device.alloc_arena(len).expect("arena");
        let ArenaInner::Cuda(cuda) = &arena.inner else {
            panic!("a CUDA device made a host arena")
        };
        assert_eq!((cuda.len(), arena.len), (len, len));
        assert_eq!(cuda.is_vmm(), device.vmm_arenas(), "VMM allocation failed (see the log)");
        match (cuda.share().expect("share"), device.vmm_granularity()) {
            (super::super::ArenaShare::CudaFd { fd, alloc_len }, Some(g)) => {
                assert!(alloc_len >= len && alloc_len % g == 0, "{alloc_len} for {len} ({g})");
                assert_eq!(alloc_len, cuda.alloc_len());
                // A new descriptor per call, each one open.
                let Ok(super::super::ArenaShare::CudaFd { fd: other, .. }) = cuda.share() else {
                    panic!("a second share of a VMM arena is a descriptor too")
                };
                assert_ne!(fd.as_raw_fd(), other.as_raw_fd());
                assert!(matches!(cuda.ipc_handle(), Err(DeviceError::Unsupported(_))));
            }
            (super::super::ArenaShare::CudaIpc { handle }, None) => {
                assert!(handle.iter().any(|&b| b != 0), "an IPC handle is not all zeros");
                assert_eq!(cuda.alloc_len(), len);
            }
            (share, g) => panic!("{share:?} from a device with VMM granularity {g:?}"),
        }
    }

    /// `cublasGemmEx` with no transposes, as documented (column-major, `C = αAB + βC`), over
    /// host vectors: `a`, `b`, `c` are whole memories and the "pointers" are element indices.
    #[allow(clippy::too_many_arguments)]
    fn reference_gemm_ex(args: &ColMajor, alpha: f64, a: &[f64], b: &[f64], c: &mut [f64]) {
        let (m, n, k) = (args.m as usize, args.n as usize, args.k as usize);
        let (lda, ldb, ldc) = (args.lda as usize, args.ldb as usize, args.ldc as usize);
        let (a0, b0, c0) = (args.a as usize, args.b as usize, args.c as usize);
        for j in 0..n {
            for i in 0..m {
                let mut sum = 0.0;
                for l in 0..k {
                    sum += a[a0 + i + l * lda] * b[b0 + l + j * ldb];
                }
                c[c0 + i + j * ldc] += alpha * sum;
            }
        }
    }

    #[test]
    fn row_major_gemms_map_to_column_major_cublas_arguments() {
        // Row-major A [m,k], B [k,n], C [m,n] with C at an offset (a row slice of a weight),
        // A and B in one "buffer" memory.
        let (m, n, k) = (3u64, 5u64, 2u64);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 + 1.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64) * 0.5 - 1.0).collect();
        let mut memory = vec![0.0; 100];
        memory[7..7 + a.len()].copy_from_slice(&a);
        memory[40..40 + b.len()].copy_from_slice(&b);
        let weight: Vec<f64> = (0..(m + 2) * n).map(|i| i as f64 * 0.25).collect();
        let g = GemmAccumulate {
            m,
            n,
            k,
            alpha: 0.75,
            a: 7,
            b: 40,
            c: n, // the weight's rows 1..=3
            ab: GemmType::F64,
            c_type: GemmType::F64,
        };
        let args = col_major(&g).expect("supported");
        let mut got = weight.clone();
        reference_gemm_ex(&args, g.alpha, &memory, &memory, &mut got);
        let mut want = weight.clone();
        for i in 0..m as usize {
            for j in 0..n as usize {
                let dot: f64 =
                    (0..k as usize).map(|l| a[i * k as usize + l] * b[l * n as usize + j]).sum();
                want[(i + 1) * n as usize + j] += 0.75 * dot;
            }
        }
        assert_eq!(got, want);
        assert_eq!((args.lda, args.ldb, args.ldc), (5, 2, 5));

        // Types: the four same-type pairs; anything mixed, or too large, is refused.
        for t in [GemmType::F16, GemmType::BF16, GemmType::F32, GemmType::F64] {
            assert!(col_major(&GemmAccumulate { ab: t, c_type: t, ..g }).is_some(), "{t:?}");
        }
        assert!(
            col_major(&GemmAccumulate { ab: GemmType::F32, c_type: GemmType::F16, ..g }).is_none()
        );
        assert!(col_major(&GemmAccumulate { n: 1 << 31, ..g }).is_none());
    }

    #[test]
    fn opening_without_a_driver_fails_clearly() {
        if super::super::cuda_driver_present() {
            return;
        }
        assert_eq!(
            CudaDevice::new(&DeviceConfig::default()).map(|_| ()),
            Err(DeviceError::NoCudaDriver)
        );
    }
}
