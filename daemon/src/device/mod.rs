//! Devices: where layers are copied to.
//!
//! The public surface is the [`Device`] enum (static dispatch over backends); each backend
//! implements the small internal [`Backend`] trait:
//!
//! - **cuda** (`cuda.rs`): NVIDIA GPUs through the CUDA driver API (cudarc, loaded at run time).
//!   Without libcuda it is replaced by a clear [`DeviceError::NoCudaDriver`].
//! - **host** (`host.rs`): system memory stands in for device memory: a memfd-backed arena,
//!   copy threads as copy engines, completion counters as events. It is asynchronous in the
//!   same way as CUDA (copies run on other threads while the caller works), so the engine and
//!   every test run unchanged on machines without a GPU.
//!
//! The engine allocates one **arena** per device (its whole budget) and sub-allocates layers
//! in it; device addresses are `u64` (a `CUdeviceptr` on CUDA, a pointer on host).
//!
//! **Device merges** (LoRA backup mode): a backend may offer [`BackendOps::gemm_accumulate`],
//! `C += alpha · A @ B` enqueued on the copy stream (cuBLAS on CUDA), with the factors in a
//! [`DeviceBuffer`] outside the arena. The host backend does not: there LoRA deltas are merged
//! on the CPU and written with [`BackendOps::write_sync`].

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod cuda;
pub mod cuda_import;
pub mod host;

/// What the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA if a driver can be loaded, else host.
    #[default]
    Auto,
    /// NVIDIA GPUs through the CUDA driver API.
    Cuda,
    /// System memory standing in for device memory.
    Host,
}

/// The backend actually in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cuda,
    Host,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Cuda => "cuda",
            Backend::Host => "host",
        })
    }
}

/// Everything that can go wrong with a device.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    #[error("the cuda backend was requested but no CUDA driver (libcuda.so) could be loaded")]
    NoCudaDriver,
    #[error("CUDA device {ordinal} does not exist ({count} visible)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("CUDA call {call} failed: {message}")]
    Cuda { call: &'static str, message: String },
    #[error("cannot allocate {bytes} bytes of {what}: {reason}")]
    OutOfMemory { what: &'static str, bytes: u64, reason: String },
    #[error("{what} failed: {reason}")]
    Os { what: &'static str, reason: String },
    #[error("device address range {addr:#x}+{len} is outside every arena")]
    OutOfRange { addr: u64, len: u64 },
    #[error("the device's copy engine stopped: {0}")]
    Stopped(String),
    #[error("this device cannot {0}")]
    Unsupported(&'static str),
    #[error("no visible GPU has UUID {uuid} (visible: {})", uuid_list(.visible))]
    UnknownUuid { uuid: String, visible: Vec<String> },
    #[error("a shared allocation of {alloc_len} bytes cannot hold an arena of {len} bytes")]
    ShareTooSmall { len: u64, alloc_len: u64 },
}

/// `a, b` or `none`, for error messages.
fn uuid_list(uuids: &[String]) -> String {
    if uuids.is_empty() { "none".into() } else { uuids.join(", ") }
}

impl DeviceError {
    pub(crate) fn os(what: &'static str, err: std::io::Error) -> Self {
        DeviceError::Os { what, reason: err.to_string() }
    }
}

/// What is known about a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    pub backend: Backend,
    /// Index among the backend's devices (CUDA ordinal; the simulated device's index on host).
    pub ordinal: usize,
    /// Product name (`NVIDIA H100 80GB HBM3`, or `host memory`).
    pub name: String,
    /// Stable identity (`GPU-…` UUID on CUDA; a per-process id on host).
    pub uuid: String,
    /// Bytes of device memory.
    pub total_memory: u64,
    /// Bytes free when the device was opened.
    pub free_memory: u64,
    /// PCIe link generation and width, when known (NVML).
    pub pcie: Option<(u32, u32)>,
    /// PCI bus id (`0000:3b:00.0`), when the device has one (CUDA): how its NUMA node is
    /// found ([`crate::numa`]).
    pub pci_bus_id: Option<String>,
    /// The NUMA node NVML reports for the device, when it does (a fallback for sysfs).
    pub nvml_numa_node: Option<u32>,
    /// Whether mapped files can be read in place by the copy engine (CUDA: read-only host
    /// registration supported; host: direct copies enabled).
    pub mapped_reads: bool,
}

/// Options for opening a device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// CUDA ordinal; on host, the index of the simulated device (its UUID is `HOST-000N`).
    pub ordinal: usize,
    /// Bytes of "device memory" the host backend reports (its budget is carved from RAM).
    pub host_memory: u64,
    /// Copy threads of the host backend (its copy engines).
    pub host_copy_threads: usize,
    /// Let the copy engine read mapped files in place (CUDA read-only registration; host direct
    /// copies) instead of going through the staging ring.
    pub mapped_reads: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig { ordinal: 0, host_memory: 4 << 30, host_copy_threads: 2, mapped_reads: true }
    }
}

/// A region of device memory the engine sub-allocates.
#[derive(Debug)]
pub struct Arena {
    /// Device address of the first byte.
    pub base: u64,
    pub len: u64,
    #[allow(dead_code)]
    pub(crate) inner: ArenaInner,
}

/// How another process can map an arena ([`Arena::share`]): what ferryd sends a client that
/// asks for it (`map_arena`).
#[derive(Debug)]
pub enum ArenaShare {
    /// Host backend: a read-only descriptor of the arena's memfd; `mmap` it
    /// (`PROT_READ`, `MAP_SHARED`).
    HostFd(std::os::fd::OwnedFd),
    /// CUDA, a VMM allocation (`cuMemCreate`) exported as a POSIX file descriptor
    /// (`cuMemExportToShareableHandle`). The importer maps `alloc_len` bytes (the allocation's
    /// size, a multiple of the allocation granularity, at least the arena's length):
    /// `cuMemImportFromShareableHandle`, `cuMemAddressReserve`, `cuMemMap`, `cuMemSetAccess`.
    CudaFd { fd: std::os::fd::OwnedFd, alloc_len: u64 },
    /// CUDA, a `cuMemAlloc` arena: its legacy IPC handle (`cuIpcOpenMemHandle`), for drivers or
    /// devices without POSIX-fd VMM handles. Needs the importer in the same IPC namespace.
    CudaIpc { handle: [u8; 64] },
}

/// The backend's allocation behind an arena, held for its `Drop` (which frees it).
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) enum ArenaInner {
    Host(host::HostArena),
    Cuda(cuda::CudaArena),
}

impl Arena {
    /// A handle another process can map the arena through ([`ArenaShare`]); each call makes a
    /// new one (a new descriptor, owned by the caller).
    pub fn share(&self) -> Result<ArenaShare, DeviceError> {
        match &self.inner {
            ArenaInner::Host(h) => h
                .read_only_fd()
                .map(ArenaShare::HostFd)
                .map_err(|e| DeviceError::os("reopening the arena read-only", e)),
            ArenaInner::Cuda(c) => c.share(),
        }
    }
}

/// Host memory the copy engine can read fast (pinned on CUDA).
#[derive(Debug)]
pub struct HostBuffer {
    ptr: *mut u8,
    len: usize,
    #[allow(dead_code)]
    pub(crate) inner: HostBufferInner,
}

// SAFETY: a HostBuffer owns its allocation exclusively; the raw pointer is only a handle to it,
// and all access goes through &self / &mut self.
unsafe impl Send for HostBuffer {}
// SAFETY: shared references only hand out the pointer value and `&[u8]` reads; writes need
// `&mut self`.
unsafe impl Sync for HostBuffer {}

/// The allocation behind a host buffer, held for its `Drop`.
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) enum HostBufferInner {
    Host(Vec<u8>),
    Cuda(cuda::PinnedAlloc),
}

impl HostBuffer {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
    /// Host memory this buffer holds: its length, rounded up to whole pages when pinned
    /// (page-locked memory is page-granular).
    pub fn footprint(&self) -> u64 {
        match &self.inner {
            HostBufferInner::Host(_) => self.len as u64,
            HostBufferInner::Cuda(_) => (self.len as u64).next_multiple_of(4096),
        }
    }
    /// The buffer's bytes. Only for buffers no copy is writing, which is all of them: copies
    /// only read host buffers.
    pub fn as_slice(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr..ptr+len` is memory this buffer owns; writes need `&mut self`, so none
        // can happen while this borrow lives (the device only reads it).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    /// Copies `src` into the buffer at `at`, touching no other byte: earlier bytes of the
    /// buffer may still be read by copies in flight, so no `&mut [u8]` over the whole buffer is
    /// ever formed. Returns `false` (copying nothing) if the range does not fit.
    pub fn write_at(&mut self, at: usize, src: &[u8]) -> bool {
        if at.checked_add(src.len()).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: `at..at + src.len()` lies inside the `len` bytes this buffer owns (checked
        // above); `src` is ordinary memory that cannot overlap a buffer we own exclusively.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) };
        true
    }
}

/// Device memory outside the arena, owned by whoever allocated it (LoRA factors on CUDA);
/// freed on drop, after the copy stream has finished with it.
#[derive(Debug)]
pub struct DeviceBuffer {
    /// Device address of the first byte.
    pub addr: u64,
    pub len: u64,
    pub(crate) inner: DeviceBufferInner,
}

#[derive(Debug)]
pub(crate) enum DeviceBufferInner {
    Cuda(cuda::CudaBuffer),
}

impl DeviceBuffer {
    /// Copies `src` to the buffer at byte `at`, synchronously. Nothing may be reading that
    /// range on the device meanwhile (the buffer is filled before any GEMM reads it).
    pub fn write(&mut self, at: u64, src: &[u8]) -> Result<(), DeviceError> {
        let len = src.len() as u64;
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(DeviceError::OutOfRange { addr: self.addr.saturating_add(at), len });
        }
        match &self.inner {
            DeviceBufferInner::Cuda(b) => b.write(self.addr + at, src),
        }
    }
}

/// Element types of a device GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmType {
    F16,
    BF16,
    F32,
    F64,
}

impl GemmType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            GemmType::F16 | GemmType::BF16 => 2,
            GemmType::F32 => 4,
            GemmType::F64 => 8,
        }
    }
}

/// `C ← alpha · A @ B + C` (beta = 1), enqueued on the copy stream after everything enqueued
/// before it. Row-major and dense: `A [m, k]`, `B [k, n]`, `C [m, n]`.
///
/// `A` and `B` have type `ab`, `C` type `c`; the pairs offered are (F16, F16), (BF16, BF16),
/// (F32, F32) with f32 arithmetic (`alpha` rounded to f32) and (F64, F64) in f64. 16-bit `C` is
/// rounded once per GEMM, from the f32 result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmAccumulate {
    pub m: u64,
    pub n: u64,
    pub k: u64,
    pub alpha: f64,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub ab: GemmType,
    pub c_type: GemmType,
}

/// A point on a device's copy stream: done when every copy enqueued before it has completed.
#[derive(Clone, Debug)]
pub struct Event(pub(crate) EventInner);

#[derive(Clone, Debug)]
pub(crate) enum EventInner {
    /// Already complete (nothing was enqueued).
    Done,
    Host(host::HostEvent),
    Cuda(Arc<cuda::CudaEventHandle>),
}

impl Event {
    /// An event that is already complete.
    pub fn done() -> Event {
        Event(EventInner::Done)
    }

    /// Whether the work before the event has completed (never blocks).
    pub fn is_done(&self) -> Result<bool, DeviceError> {
        match &self.0 {
            EventInner::Done => Ok(true),
            EventInner::Host(e) => e.is_done(),
            EventInner::Cuda(e) => e.is_done(),
        }
    }

    /// Blocks the calling thread until the event completes.
    pub fn wait(&self) -> Result<(), DeviceError> {
        match &self.0 {
            EventInner::Done => Ok(()),
            EventInner::Host(e) => e.wait(),
            EventInner::Cuda(e) => e.wait(),
        }
    }

    /// The raw `CUevent` behind a CUDA event (for a client stream to wait on), if it is one.
    pub fn cuda_event(&self) -> Option<u64> {
        match &self.0 {
            EventInner::Cuda(e) => Some(e.raw()),
            _ => None,
        }
    }
}

/// What a client hands back with a lease: when its own use of the memory is over.
#[derive(Clone, Debug, Default)]
pub enum ClientDone {
    /// The client is done already (host clients, or a client that synchronised).
    #[default]
    Now,
    /// A `CUevent` recorded on the client's stream after its last kernel reading the layer.
    /// The copy stream waits on it on the device before the memory is reused (no host sync).
    CudaEvent(RawCudaEvent),
    /// An event of this device.
    Event(Event),
}

/// A raw `CUevent` handle from a client in this process. Only [`RawCudaEvent::from_raw`]
/// makes one, and it is unsafe: the engine hands the value to the driver as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawCudaEvent(u64);

impl RawCudaEvent {
    /// # Safety
    ///
    /// `raw` must be a live `CUevent` created in this process's CUDA context for the device
    /// the engine runs on, and must stay alive until the release that carries it returns.
    /// Never build one from a number that crossed a process boundary.
    pub unsafe fn from_raw(raw: u64) -> RawCudaEvent {
        RawCudaEvent(raw)
    }

    pub fn raw(self) -> u64 {
        self.0
    }
}

/// The operations every backend provides (module docs).
pub(crate) trait BackendOps: Send + Sync + fmt::Debug {
    fn info(&self) -> &DeviceInfo;

    /// Allocates `bytes` of device memory as one arena.
    fn alloc_arena(&self, bytes: u64) -> Result<Arena, DeviceError>;

    /// Allocates host memory the copy engine reads fast (pinned on CUDA), for the staging ring.
    fn alloc_staging(&self, bytes: usize) -> Result<HostBuffer, DeviceError>;

    /// Makes `len` bytes at `ptr` (a read-only file mapping) readable in place by the copy
    /// engine. `Ok(None)` when the device cannot, so the caller uses the staging ring.
    fn register_mapping(
        &self,
        ptr: *const u8,
        len: usize,
    ) -> Result<Option<Registration>, DeviceError>;

    /// Enqueues an asynchronous copy of `len` bytes from host `src` to device address `dst`.
    ///
    /// # Safety
    ///
    /// `src..src+len` must stay valid and unchanged until an event recorded after this call
    /// has completed; it must be a staging buffer of this device or a registered mapping.
    /// `dst..dst+len` must lie in an arena of this device that outlives the copy.
    unsafe fn copy_h2d_async(
        &self,
        src: *const u8,
        dst: u64,
        len: usize,
    ) -> Result<(), DeviceError>;

    /// Records an event after everything enqueued so far.
    fn record(&self) -> Result<Event, DeviceError>;

    /// Records an *interprocess* event after everything enqueued so far and returns its
    /// 64-byte handle (`cuIpcGetEventHandle`), for a client process to make its stream wait on
    /// ([`cuda_import::ImportedArena::stream_wait`]). Handles come from a ring the device
    /// reuses, so the same handle comes back later, recorded at a later point: a client waiting
    /// on it then only waits longer. Backends without interprocess events (host) answer
    /// [`DeviceError::Unsupported`].
    fn record_ipc(&self) -> Result<[u8; 64], DeviceError> {
        Err(DeviceError::Unsupported("export interprocess events"))
    }

    /// Makes the copy stream wait for a client's done signal before any later copy.
    fn wait_client(&self, done: &ClientDone) -> Result<(), DeviceError>;

    /// Copies device bytes back to the host, synchronously (tests, verification, export).
    fn read_back(&self, src: u64, dst: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes host bytes to device memory, synchronously, after everything queued so far
    /// (LoRA backup mode overwrites a layer's adapted tensors once its copy has landed).
    fn write_sync(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError>;

    /// Whether [`BackendOps::gemm_accumulate`] works here (CUDA with cuBLAS loadable). The
    /// host backend merges LoRA deltas on the CPU instead.
    fn device_gemm(&self) -> bool {
        false
    }

    /// Allocates `bytes` of device memory outside the arena (LoRA factors for device merges).
    fn alloc_device_buffer(&self, bytes: u64) -> Result<DeviceBuffer, DeviceError> {
        let _ = bytes;
        Err(DeviceError::Unsupported("allocate device buffers"))
    }

    /// Enqueues `g` on the copy stream ([`GemmAccumulate`]).
    ///
    /// # Safety
    ///
    /// `A`, `B` and `C` must lie in live memory of this device (a [`DeviceBuffer`] or the
    /// arena) that stays allocated until an event recorded after this call completes, and no
    /// copy or client may write `C`'s range meanwhile. Backends check the ranges too.
    unsafe fn gemm_accumulate(&self, g: &GemmAccumulate) -> Result<(), DeviceError> {
        let _ = g;
        Err(DeviceError::Unsupported("run GEMMs"))
    }
}

/// A mapping registered with the device; unregistered on drop.
#[derive(Debug)]
pub struct Registration {
    #[allow(dead_code)]
    pub(crate) inner: RegistrationInner,
}

/// The registration behind a [`Registration`], held for its `Drop` (which unregisters).
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) enum RegistrationInner {
    Host,
    Cuda(cuda::CudaRegistration),
}

/// A device (module docs).
#[derive(Debug)]
pub enum Device {
    Host(host::HostDevice),
    Cuda(cuda::CudaDevice),
}

impl Device {
    /// Opens the device `choice` resolves to on this machine.
    /// With `auto`, a machine whose libcuda loads but that has no usable GPU (no device, a
    /// stub driver) falls back to host, with a warning.
    pub fn open(choice: DeviceChoice, config: &DeviceConfig) -> Result<Device, DeviceError> {
        match select(choice)?.0 {
            Backend::Host => Ok(Device::Host(host::HostDevice::new(config)?)),
            Backend::Cuda => match cuda::CudaDevice::new(config) {
                Ok(d) => Ok(Device::Cuda(d)),
                Err(e @ (DeviceError::NoSuchDevice { .. } | DeviceError::NoCudaDriver))
                    if choice == DeviceChoice::Auto =>
                {
                    tracing::warn!("auto: CUDA unusable ({e}); using host memory");
                    Ok(Device::Host(host::HostDevice::new(config)?))
                }
                Err(e) => Err(e),
            },
        }
    }

    pub(crate) fn ops(&self) -> &dyn BackendOps {
        match self {
            Device::Host(d) => d,
            Device::Cuda(d) => d,
        }
    }

    pub fn info(&self) -> &DeviceInfo {
        self.ops().info()
    }

    pub fn alloc_arena(&self, bytes: u64) -> Result<Arena, DeviceError> {
        self.ops().alloc_arena(bytes)
    }

    pub fn alloc_staging(&self, bytes: usize) -> Result<HostBuffer, DeviceError> {
        self.ops().alloc_staging(bytes)
    }

    pub fn register_mapping(
        &self,
        ptr: *const u8,
        len: usize,
    ) -> Result<Option<Registration>, DeviceError> {
        self.ops().register_mapping(ptr, len)
    }

    /// See [`BackendOps::copy_h2d_async`].
    ///
    /// # Safety
    ///
    /// As for [`BackendOps::copy_h2d_async`].
    pub unsafe fn copy_h2d_async(
        &self,
        src: *const u8,
        dst: u64,
        len: usize,
    ) -> Result<(), DeviceError> {
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { self.ops().copy_h2d_async(src, dst, len) }
    }

    pub fn record(&self) -> Result<Event, DeviceError> {
        self.ops().record()
    }

    /// Records an interprocess event after everything enqueued so far and returns its 64-byte
    /// handle, for a client process to make its stream wait on
    /// ([`cuda_import::ImportedArena::stream_wait`]). The handles come from a ring the device
    /// reuses (a later recording only makes a waiter wait longer). Host devices answer
    /// [`DeviceError::Unsupported`].
    pub fn record_ipc(&self) -> Result<[u8; 64], DeviceError> {
        self.ops().record_ipc()
    }

    pub fn wait_client(&self, done: &ClientDone) -> Result<(), DeviceError> {
        self.ops().wait_client(done)
    }

    pub fn read_back(&self, src: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        self.ops().read_back(src, dst)
    }

    pub fn write_sync(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError> {
        self.ops().write_sync(dst, src)
    }

    /// See [`BackendOps::device_gemm`].
    pub fn device_gemm(&self) -> bool {
        self.ops().device_gemm()
    }

    /// See [`BackendOps::alloc_device_buffer`].
    pub fn alloc_device_buffer(&self, bytes: u64) -> Result<DeviceBuffer, DeviceError> {
        self.ops().alloc_device_buffer(bytes)
    }

    /// See [`BackendOps::gemm_accumulate`].
    ///
    /// # Safety
    ///
    /// As for [`BackendOps::gemm_accumulate`].
    pub unsafe fn gemm_accumulate(&self, g: &GemmAccumulate) -> Result<(), DeviceError> {
        // SAFETY: the caller upholds the contract, which is the same.
        unsafe { self.ops().gemm_accumulate(g) }
    }
}

/// Whether libcuda can be loaded. cudarc panics on first use without it, so this is asked first.
pub fn cuda_driver_present() -> bool {
    // SAFETY: this only attempts to dlopen libcuda by its usual names and closes it again; it
    // runs no CUDA call. Loading a library runs its initialisers, which for the NVIDIA driver
    // are safe to run at any point in the process.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Resolves the operator's choice against what this machine has.
pub fn select(choice: DeviceChoice) -> Result<(Backend, &'static str), DeviceError> {
    select_with(choice, cuda_driver_present())
}

fn select_with(choice: DeviceChoice, cuda: bool) -> Result<(Backend, &'static str), DeviceError> {
    match (choice, cuda) {
        (DeviceChoice::Host, _) => Ok((Backend::Host, "host requested")),
        (DeviceChoice::Cuda, true) => Ok((Backend::Cuda, "cuda requested")),
        (DeviceChoice::Cuda, false) => Err(DeviceError::NoCudaDriver),
        (DeviceChoice::Auto, true) => Ok((Backend::Cuda, "auto: CUDA driver found")),
        (DeviceChoice::Auto, false) => {
            Ok((Backend::Host, "auto: no CUDA driver, using host memory"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_host_and_cuda_fails_clearly() {
        assert_eq!(select_with(DeviceChoice::Auto, false).map(|s| s.0), Ok(Backend::Host));
        assert_eq!(select_with(DeviceChoice::Auto, true).map(|s| s.0), Ok(Backend::Cuda));
        assert_eq!(select_with(DeviceChoice::Cuda, false), Err(DeviceError::NoCudaDriver));
        assert_eq!(select_with(DeviceChoice::Host, true).map(|s| s.0), Ok(Backend::Host));
    }

    #[test]
    fn probing_for_the_driver_does_not_panic() {
        let _ = cuda_driver_present();
    }
}
