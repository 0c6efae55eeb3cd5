//! The client side of sharing a CUDA arena: a daemon's arena mapped into this process's CUDA
//! context, once, so leased tensors are read in place at `base() + arena_offset`.
//!
//! ferryd shares its arena as an [`ArenaShare`] (the `cuda_arena` reply to `map_arena`):
//!
//! - [`ArenaShare::CudaFd`], a VMM allocation's POSIX file descriptor (SCM_RIGHTS):
//!   `cuMemImportFromShareableHandle`, `cuMemAddressReserve(alloc_len)`, `cuMemMap`,
//!   `cuMemSetAccess`, then the imported handle is released and the descriptor closed at once:
//!   the mapping alone keeps the memory alive (the driver counts references), so the mapping
//!   stays valid even if ferryd frees its arena first. Access is asked read-only
//!   (`CU_MEM_ACCESS_FLAGS_PROT_READ`: a client never writes weights); drivers that refuse
//!   read-only access for a device (reports of `CUDA_ERROR_INVALID_VALUE`) get read-write, and
//!   [`ImportedArena::read_only`] says which one was granted.
//! - [`ArenaShare::CudaIpc`], a legacy IPC handle: `cuIpcOpenMemHandle_v2` (with
//!   `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`), closed with `cuIpcCloseMemHandle`. The daemon must
//!   keep the arena until then; a handle cannot be opened in the process that made it.
//!
//! The device is found by UUID, never by ordinal: ordinals differ between processes
//! (`CUDA_VISIBLE_DEVICES`). The mapping lives in the device's *primary* context, the one the
//! CUDA runtime (and so PyTorch) uses, so its addresses are valid in the application's kernels.
//!
//! Ordering: the daemon copies on its own stream. Read a leased layer only after it is ready:
//! `wait_ready`, a `leased` reply with `ready` set, or on the GPU, by making your stream wait
//! on the layer's interprocess ready event ([`ImportedArena::stream_wait`]; host threads:
//! [`ImportedArena::wait_host`]). Finish your own work on it before releasing the lease.
//!
//! Interprocess events: the daemon records them from a ring it reuses
//! ([`super::cuda::IPC_RING`] per device), so the same 64-byte handle comes back again and
//! again. Each is opened (`cuIpcOpenEventHandle`) once per imported arena and kept, by handle,
//! until the arena is dropped; so at most a ring's worth of events stays open. A handle cannot
//! be opened in the process that made it. The daemon destroys its events only when it closes
//! the device; waiting on them after that (a daemon that went away) is undefined behaviour
//! in the driver, so drop the imported arena when the connection to its daemon ends.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::{CudaContext, sys};
use tracing::{debug, error, warn};

use super::cuda::{Bound, CudaDevice, bind, cuda_err, current_context, describe, device_location};
use super::{ArenaShare, DeviceError};

/// How an [`ImportedArena`] is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportKind {
    /// A VMM allocation mapped from its file descriptor; `read_only` when the driver granted
    /// read-only access (else read-write).
    Vmm { read_only: bool },
    /// A legacy IPC handle, opened.
    Ipc,
}

/// How the mapping is undone on drop.
#[derive(Debug)]
enum Mapping {
    /// `cuMemUnmap` + `cuMemAddressFree` of `size` bytes.
    Vmm { size: usize, read_only: bool },
    /// `cuIpcCloseMemHandle`.
    Ipc,
}

/// An interprocess event opened in this process (`cuIpcOpenEventHandle`).
#[derive(Debug)]
struct OpenedEvent(sys::CUevent);

// SAFETY: a CUevent is an opaque handle to a driver object; the CUDA driver API is thread-safe
// and accepts handles from any thread. The cache only moves the handle value between threads.
unsafe impl Send for OpenedEvent {}

/// A daemon's arena mapped into this process's CUDA context (primary context of the device
/// with the daemon's UUID). Unmapped on drop, after this process's work in the context has
/// finished (`cuCtxSynchronize`: unmapping memory a kernel still reads would fault it).
#[derive(Debug)]
pub struct ImportedArena {
    base: sys::CUdeviceptr,
    len: u64,
    mapping: Mapping,
    /// The primary context the mapping lives in (retained while the mapping lives).
    ctx: Arc<CudaContext>,
    /// The daemon's interprocess events opened so far, by handle (module docs); destroyed on
    /// drop.
    events: Mutex<HashMap<[u8; 64], OpenedEvent>>,
}

impl ImportedArena {
    /// Maps the arena `share` describes, `len` bytes (the arena's length as the daemon reports
    /// it), on the device with `uuid` (`GPU-…`, as ferryd reports it; case-insensitive): the
    /// ordinal with that UUID in *this* process. Takes the share (its descriptor is closed once
    /// mapped).
    ///
    /// Errors: a host arena's descriptor is [`DeviceError::Unsupported`] (mmap it instead); an
    /// allocation smaller than `len` is [`DeviceError::ShareTooSmall`] — both before any CUDA
    /// call; no driver is [`DeviceError::NoCudaDriver`]; no visible GPU with the UUID is
    /// [`DeviceError::UnknownUuid`] (naming the visible ones); a driver refusal is
    /// [`DeviceError::Cuda`] naming the call, with everything done so far undone.
    pub fn import(uuid: &str, share: ArenaShare, len: u64) -> Result<ImportedArena, DeviceError> {
        // Checks without the driver first: they need no GPU to be tested, and a share that
        // cannot work loads nothing.
        check_share(&share, len)?;
        let ordinal = ordinal_of(uuid)?;
        // `CudaContext::new` makes the primary context current on this thread: a caller that
        // had its own context current gets it back when importing is over.
        let current = current_context()?;
        let _restore = Bound { restore: (!current.is_null()).then_some(current) };
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuDevicePrimaryCtxRetain"))?;
        let (base, mapping) = match share {
            ArenaShare::CudaFd { fd, alloc_len } => map_fd(&ctx, fd, alloc_len)?,
            ArenaShare::CudaIpc { handle } => open_ipc(&ctx, handle)?,
            // Refused by `check_share`.
            ArenaShare::HostFd(_) => return Err(host_fd_unsupported()),
        };
        debug!(uuid, ordinal, base = format_args!("{base:#x}"), len, ?mapping, "arena imported");
        Ok(ImportedArena { base, len, mapping, ctx, events: Mutex::new(HashMap::new()) })
    }

    /// Device pointer of arena offset 0 in this process.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes of the arena (as given to [`ImportedArena::import`]).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How the arena is mapped.
    pub fn kind(&self) -> ImportKind {
        match self.mapping {
            Mapping::Vmm { read_only, .. } => ImportKind::Vmm { read_only },
            Mapping::Ipc => ImportKind::Ipc,
        }
    }

    /// Whether the device can only read the mapping (a VMM mapping the driver granted
    /// read-only access to). `false` for IPC mappings and read-write VMM mappings.
    pub fn read_only(&self) -> bool {
        matches!(self.mapping, Mapping::Vmm { read_only: true, .. })
    }

    /// The device ordinal the arena is mapped on, in this process.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Copies `dst.len()` bytes from arena offset `offset` to host memory (`cuMemcpyDtoH`,
    /// synchronous). For tests and tools; read only layers that are ready (module docs).
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        let len = dst.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(DeviceError::OutOfRange { addr: self.base.saturating_add(offset), len });
        }
        if dst.is_empty() {
            return Ok(());
        }
        let _bound = bind(&self.ctx)?;
        // SAFETY: `base+offset .. +len` lies inside the mapping (checked above: `len` is at
        // most the mapped size, checked at import), which lives as long as `self`; `dst` is a
        // Rust slice of exactly `len` writable bytes; the copy is synchronous.
        unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), self.base + offset, dst.len()) }
            .result()
            .map_err(cuda_err("cuMemcpyDtoH"))
    }
}

impl ImportedArena {
    /// Makes `stream` wait, on the device, for the daemon's interprocess event `handle` (the
    /// layer's ready event): work queued on `stream` after this call runs only once every copy
    /// the daemon queued before recording the event has landed. The host does not wait.
    ///
    /// The event is opened in the arena's context the first time its handle is seen and kept
    /// (module docs). A handle the driver refuses (made in this very process, from a process
    /// outside this one's IPC namespace, or not an interprocess event) is
    /// [`DeviceError::Cuda`] naming `cuIpcOpenEventHandle`.
    ///
    /// # Safety
    ///
    /// `stream` must be a live `CUstream` (or 0, the legacy default stream) of a context on
    /// this arena's device, alive for the call: the driver is handed the value as is.
    pub unsafe fn stream_wait(&self, stream: u64, handle: &[u8; 64]) -> Result<(), DeviceError> {
        let _bound = bind(&self.ctx)?;
        let event = self.open_event(handle)?;
        // SAFETY: `stream` is a live stream of this device (the caller's contract above); `event` is an event opened in our context and kept open
        // until `self` drops, which cannot happen during this `&self` call. cuStreamWaitEvent
        // accepts an event of another context on the same device. The wait captures the
        // event's latest recording now.
        unsafe {
            sys::cuStreamWaitEvent(
                stream as usize as sys::CUstream,
                event,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT as u32,
            )
        }
        .result()
        .map_err(cuda_err("cuStreamWaitEvent"))
    }

    /// Blocks until every piece of work queued in this arena's context has finished
    /// (`cuCtxSynchronize`): before releasing leases whose layers streams may still read.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        let _bound = bind(&self.ctx)?;
        // SAFETY: a plain synchronisation of the (our) current context.
        unsafe { sys::cuCtxSynchronize() }.result().map_err(cuda_err("cuCtxSynchronize"))
    }

    /// Blocks the calling thread until the daemon's interprocess event `handle` completes
    /// (`cuEventSynchronize`), for callers without a stream. An imported event behaves like
    /// one created without `CU_EVENT_BLOCKING_SYNC`, so the wait follows the context's
    /// scheduling policy (by default it may spin). Errors as [`ImportedArena::stream_wait`].
    pub fn wait_host(&self, handle: &[u8; 64]) -> Result<(), DeviceError> {
        let _bound = bind(&self.ctx)?;
        let event = self.open_event(handle)?;
        // SAFETY: `event` is an event opened in our context and kept open until `self` drops,
        // which cannot happen during this `&self` call.
        unsafe { sys::cuEventSynchronize(event) }.result().map_err(cuda_err("cuEventSynchronize"))
    }

    /// How many of the daemon's interprocess events are open in this process (one per distinct
    /// handle seen; at most the daemon's ring).
    pub fn opened_events(&self) -> usize {
        self.events.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// The event behind `handle`, opened now if it has not been yet. The caller has our
    /// context bound.
    fn open_event(&self, handle: &[u8; 64]) -> Result<sys::CUevent, DeviceError> {
        // Held while opening, so two threads never open the same handle twice.
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ev) = events.get(handle) {
            return Ok(ev.0);
        }
        let raw = sys::CUipcEventHandle { reserved: handle.map(|b| b as std::ffi::c_char) };
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: `ev` is a valid out-pointer; the handle is 64 opaque bytes the driver checks
        // (one it cannot open is refused with an error); the event is opened in the current
        // context, ours (bound by the caller).
        unsafe { sys::cuIpcOpenEventHandle(&mut ev, raw) }
            .result()
            .map_err(cuda_err("cuIpcOpenEventHandle"))?;
        events.insert(*handle, OpenedEvent(ev));
        debug!(events = events.len(), "interprocess event opened");
        Ok(ev)
    }
}

impl Drop for ImportedArena {
    fn drop(&mut self) {
        let Ok(_bound) =
            bind(&self.ctx).inspect_err(|e| error!(error = %e, "unmapping an imported arena"))
        else {
            return;
        };
        // SAFETY: a plain synchronisation of the (our) current context.
        if let Err(e) = unsafe { sys::cuCtxSynchronize() }.result() {
            warn!(error = %describe(e), "synchronising before unmapping an imported arena");
        }
        // The opened events go before the mapping: nothing of this arena is used after it.
        let events = std::mem::take(self.events.get_mut().unwrap_or_else(PoisonError::into_inner));
        for (_, ev) in events {
            // SAFETY: `ev` was opened by cuIpcOpenEventHandle in our context, is owned only by
            // the cache (just emptied) and destroyed exactly once, here; the context's work has
            // finished (above), so no stream of ours still waits on it.
            if let Err(e) = unsafe { sys::cuEventDestroy_v2(ev.0) }.result() {
                warn!(error = %describe(e), "cuEventDestroy of an interprocess event failed");
            }
        }
        match self.mapping {
            Mapping::Vmm { size, .. } => unmap_vmm(self.base, size, true),
            Mapping::Ipc => {
                // SAFETY: `base` was returned by cuIpcOpenMemHandle in this context and is
                // closed exactly once, here; the context's work has finished (above).
                if let Err(e) = unsafe { sys::cuIpcCloseMemHandle(self.base) }.result() {
                    error!(error = %describe(e), "cuIpcCloseMemHandle failed");
                }
            }
        }
    }
}

/// The checks that need no driver (module docs): a CUDA share, big enough for `len`.
fn check_share(share: &ArenaShare, len: u64) -> Result<(), DeviceError> {
    match share {
        ArenaShare::HostFd(_) => Err(host_fd_unsupported()),
        &ArenaShare::CudaFd { alloc_len, .. } if alloc_len == 0 || len > alloc_len => {
            Err(DeviceError::ShareTooSmall { len, alloc_len })
        }
        ArenaShare::CudaFd { .. } | ArenaShare::CudaIpc { .. } => Ok(()),
    }
}

fn host_fd_unsupported() -> DeviceError {
    DeviceError::Unsupported(
        "import a host arena into a CUDA context (map its descriptor with mmap instead)",
    )
}

/// The ordinal, in this process, of the visible GPU with `uuid`. No driver:
/// [`DeviceError::NoCudaDriver`].
pub fn ordinal_of(uuid: &str) -> Result<usize, DeviceError> {
    find_uuid(uuid, CudaDevice::enumerate()?)
}

/// The position of `uuid` among `visible` (case-insensitive), or an error naming them.
fn find_uuid(uuid: &str, visible: Vec<String>) -> Result<usize, DeviceError> {
    visible
        .iter()
        .position(|v| v.eq_ignore_ascii_case(uuid))
        .ok_or_else(|| DeviceError::UnknownUuid { uuid: uuid.to_string(), visible })
}

/// Imports, reserves, maps and grants access (module docs); releases the imported handle and
/// closes the descriptor whatever happens. Undoes everything on failure.
fn map_fd(
    ctx: &CudaContext,
    fd: OwnedFd,
    alloc_len: u64,
) -> Result<(sys::CUdeviceptr, Mapping), DeviceError> {
    let size = usize::try_from(alloc_len).map_err(|_| DeviceError::OutOfMemory {
        what: "imported arena address range",
        bytes: alloc_len,
        reason: "larger than the address space".into(),
    })?;
    let _bound = bind(ctx)?;
    let mut handle: sys::CUmemGenericAllocationHandle = 0;
    // SAFETY: for POSIX_FILE_DESCRIPTOR handles the OS handle argument is the descriptor's
    // number cast to a pointer (driver API docs); `fd` is open (owned here) across the call,
    // and the driver does not take it over: it is closed when `fd` drops, below.
    unsafe {
        sys::cuMemImportFromShareableHandle(
            &mut handle,
            fd.as_raw_fd() as usize as *mut std::ffi::c_void,
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        )
    }
    .result()
    .map_err(cuda_err("cuMemImportFromShareableHandle"))?;
    let mapped = reserve_map_access(ctx.cu_device(), handle, size);
    // The mapping (if any) holds the memory now; the handle and the descriptor are not needed.
    // SAFETY: `handle` came from the import above and is released exactly once, here.
    if let Err(e) = unsafe { sys::cuMemRelease(handle) }.result() {
        warn!(error = %describe(e), "cuMemRelease of an imported arena handle failed");
    }
    drop(fd);
    let (va, read_only) = mapped?;
    Ok((va, Mapping::Vmm { size, read_only }))
}

/// Reserves `size` bytes of address space, maps `handle` there and grants this device access:
/// read-only if the driver accepts it, else read-write. Undoes the reservation and mapping on
/// failure. Returns the address and whether access is read-only.
fn reserve_map_access(
    dev: sys::CUdevice,
    handle: sys::CUmemGenericAllocationHandle,
    size: usize,
) -> Result<(sys::CUdeviceptr, bool), DeviceError> {
    let mut va: sys::CUdeviceptr = 0;
    // SAFETY: `va` is a valid out-pointer; alignment 0 asks for the default (the
    // granularity), address 0 for no placement hint; no flags are defined.
    unsafe { sys::cuMemAddressReserve(&mut va, size, 0, 0, 0) }
        .result()
        .map_err(cuda_err("cuMemAddressReserve"))?;
    // SAFETY: `va..va+size` was just reserved; `handle` is a live imported allocation, mapped
    // from its start (a size beyond it is refused by the driver); no flags are defined.
    if let Err(e) = unsafe { sys::cuMemMap(va, size, 0, handle, 0) }.result() {
        unmap_vmm(va, size, false);
        return Err(cuda_err("cuMemMap")(e));
    }
    let set_access = |flags| {
        let access = sys::CUmemAccessDesc { location: device_location(dev), flags };
        // SAFETY: `va..va+size` is mapped (above); `access` is one initialised descriptor that
        // lives across the call.
        unsafe { sys::cuMemSetAccess(va, size, &access, 1) }.result()
    };
    use sys::CUmemAccess_flags::{
        CU_MEM_ACCESS_FLAGS_PROT_READ, CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    let read_only = match set_access(CU_MEM_ACCESS_FLAGS_PROT_READ) {
        Ok(()) => true,
        Err(e) => {
            debug!(error = %describe(e), "read-only access refused: mapping read-write");
            match set_access(CU_MEM_ACCESS_FLAGS_PROT_READWRITE) {
                Ok(()) => false,
                Err(e) => {
                    unmap_vmm(va, size, true);
                    return Err(cuda_err("cuMemSetAccess")(e));
                }
            }
        }
    };
    Ok((va, read_only))
}

/// Unmaps (if `mapped`) and frees an address range of ours; failures are logged.
fn unmap_vmm(va: sys::CUdeviceptr, size: usize, mapped: bool) {
    if mapped {
        // SAFETY: `va..va+size` is mapped by this module and unmapped exactly once, here; the
        // callers guarantee nothing uses it any more.
        if let Err(e) = unsafe { sys::cuMemUnmap(va, size) }.result() {
            error!(error = %describe(e), "cuMemUnmap of an imported arena failed");
        }
    }
    // SAFETY: `va..va+size` was reserved by this module and is freed exactly once, here,
    // after its mapping is gone.
    if let Err(e) = unsafe { sys::cuMemAddressFree(va, size) }.result() {
        error!(error = %describe(e), "cuMemAddressFree of an imported arena failed");
    }
}

/// Opens a legacy IPC handle in `ctx`.
fn open_ipc(
    ctx: &CudaContext,
    handle: [u8; 64],
) -> Result<(sys::CUdeviceptr, Mapping), DeviceError> {
    let _bound = bind(ctx)?;
    let handle = sys::CUipcMemHandle { reserved: handle.map(|b| b as std::ffi::c_char) };
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: `ptr` is a valid out-pointer; the handle is 64 opaque bytes the driver checks
    // (a handle of no live allocation is refused with an error, not undefined behaviour).
    unsafe {
        sys::cuIpcOpenMemHandle_v2(
            &mut ptr,
            handle,
            sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
        )
    }
    .result()
    .map_err(cuda_err("cuIpcOpenMemHandle"))?;
    Ok((ptr, Mapping::Ipc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any open descriptor (the checks under test never hand it to the driver).
    fn some_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("/dev/null").into()
    }

    const UUID: &str = "GPU-00112233-4455-6677-8899-aabbccddeeff";

    #[test]
    fn host_descriptors_are_refused_before_any_cuda_call() {
        let err = ImportedArena::import(UUID, ArenaShare::HostFd(some_fd()), 4096)
            .expect_err("a host arena");
        assert_eq!(err, host_fd_unsupported());
        assert!(err.to_string().contains("mmap"), "{err}");
    }

    #[test]
    fn an_allocation_smaller_than_the_arena_is_refused_before_any_cuda_call() {
        let share = ArenaShare::CudaFd { fd: some_fd(), alloc_len: 2 << 20 };
        let err = ImportedArena::import(UUID, share, (2 << 20) + 1).expect_err("too small");
        assert_eq!(err, DeviceError::ShareTooSmall { len: (2 << 20) + 1, alloc_len: 2 << 20 });
        assert_eq!(
            err.to_string(),
            "a shared allocation of 2097152 bytes cannot hold an arena of 2097153 bytes"
        );
        let share = ArenaShare::CudaFd { fd: some_fd(), alloc_len: 0 };
        assert_eq!(
            ImportedArena::import(UUID, share, 0).expect_err("empty"),
            DeviceError::ShareTooSmall { len: 0, alloc_len: 0 }
        );
        // Equal sizes pass this check (and go on to the driver).
        let share = ArenaShare::CudaFd { fd: some_fd(), alloc_len: 2 << 20 };
        assert_eq!(check_share(&share, 2 << 20), Ok(()));
        assert_eq!(check_share(&ArenaShare::CudaIpc { handle: [1; 64] }, u64::MAX), Ok(()));
    }

    #[test]
    fn without_a_driver_the_uuid_lookup_fails_clearly() {
        if super::super::cuda_driver_present() {
            return;
        }
        assert_eq!(ordinal_of(UUID), Err(DeviceError::NoCudaDriver));
        let share = ArenaShare::CudaFd { fd: some_fd(), alloc_len: 2 << 20 };
        assert_eq!(
            ImportedArena::import(UUID, share, 1 << 20).map(|_| ()),
            Err(DeviceError::NoCudaDriver)
        );
        let share = ArenaShare::CudaIpc { handle: [7; 64] };
        assert_eq!(
            ImportedArena::import(UUID, share, 1 << 20).map(|_| ()),
            Err(DeviceError::NoCudaDriver)
        );
    }

    #[test]
    fn uuids_are_found_case_insensitively_and_unknown_ones_name_the_visible() {
        let visible =
            vec!["GPU-aaaaaaaa-0000-0000-0000-000000000000".to_string(), UUID.to_string()];
        assert_eq!(find_uuid(UUID, visible.clone()), Ok(1));
        assert_eq!(find_uuid(&UUID.to_uppercase().replace("GPU", "gpu"), visible.clone()), Ok(1));
        let missing = "GPU-ffffffff-0000-0000-0000-000000000000";
        let err = find_uuid(missing, visible.clone()).expect_err("unknown");
        assert_eq!(
            err,
            DeviceError::UnknownUuid { uuid: missing.into(), visible: visible.clone() }
        );
        assert_eq!(
            err.to_string(),
            format!("no visible GPU has UUID {missing} (visible: {}, {UUID})", visible[0])
        );
        assert_eq!(
            find_uuid(missing, Vec::new()).expect_err("none").to_string(),
            format!("no visible GPU has UUID {missing} (visible: none)")
        );
    }
}
