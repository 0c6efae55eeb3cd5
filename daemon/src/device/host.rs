//! The host backend: system memory as device memory.
//!
//! - **Arena**: a memfd (`memfd_create`) sized to the budget and mapped shared, so that it can
//!   later be handed to client processes as a file descriptor. Pages are only backed when
//!   touched.
//! - **Copy engines**: `host_copy_threads` threads take copies from one queue, like the copy
//!   engines behind a CUDA stream, and run them while the caller goes on.
//! - **Events**: every copy gets a sequence number; an event is "every copy up to N done", kept
//!   as a watermark over out-of-order completions. Waiting blocks on a condition variable.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender, unbounded};

use super::{
    Arena, ArenaInner, Backend, BackendOps, ClientDone, DeviceConfig, DeviceError, DeviceInfo,
    Event, EventInner, HostBuffer, HostBufferInner, Registration, RegistrationInner,
};

/// One queued copy. Addresses are plain integers so the command can cross threads; the
/// `copy_h2d_async` contract keeps them valid until the copy's event completes.
#[derive(Debug)]
struct Copy {
    seq: u64,
    src: usize,
    dst: usize,
    len: usize,
}

#[derive(Debug, Default)]
struct Progress {
    /// Sequence number of the last copy enqueued (0: none yet).
    issued: u64,
    /// Every copy with a sequence number ≤ this has completed.
    watermark: u64,
    /// Completed copies above the watermark.
    done_above: BTreeSet<u64>,
    /// Set when a copy thread died; every later wait fails with it.
    failed: Option<String>,
}

#[derive(Debug, Default)]
struct Completion {
    progress: Mutex<Progress>,
    changed: Condvar,
}

impl Completion {
    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn complete(&self, seq: u64) {
        let mut p = self.lock();
        p.done_above.insert(seq);
        while p.done_above.first() == Some(&(p.watermark + 1)) {
            p.watermark += 1;
            p.done_above.pop_first();
        }
        drop(p);
        self.changed.notify_all();
    }
}

/// A host event: done once the watermark reaches `seq`.
#[derive(Clone, Debug)]
pub struct HostEvent {
    completion: Arc<Completion>,
    seq: u64,
}

impl HostEvent {
    pub fn is_done(&self) -> Result<bool, DeviceError> {
        let p = self.completion.lock();
        if let Some(f) = &p.failed {
            return Err(DeviceError::Stopped(f.clone()));
        }
        Ok(p.watermark >= self.seq)
    }

    pub fn wait(&self) -> Result<(), DeviceError> {
        let mut p = self.completion.lock();
        loop {
            if let Some(f) = &p.failed {
                return Err(DeviceError::Stopped(f.clone()));
            }
            if p.watermark >= self.seq {
                return Ok(());
            }
            p = self.completion.changed.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Live arenas of a device as (base, len), shared with the arenas so each removes itself.
type ArenaList = Arc<Mutex<Vec<(u64, u64)>>>;

/// The memfd behind an arena, and its mapping.
#[derive(Debug)]
pub struct HostArena {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
    live: ArenaList,
}

// SAFETY: the arena owns its mapping; the pointer is an address, and concurrent access to the
// bytes is coordinated by the engine (disjoint sub-allocations, events before reuse).
unsafe impl Send for HostArena {}
// SAFETY: as above; `&HostArena` exposes only the address and the fd.
unsafe impl Sync for HostArena {}

impl HostArena {
    /// The memfd (read-write: the engine's own).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// A new read-only descriptor of the arena, for client processes: they can map it to read
    /// layers but cannot write into them (`mmap(PROT_WRITE, MAP_SHARED)` on it fails).
    pub fn read_only_fd(&self) -> std::io::Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}\0", self.fd.as_raw_fd());
        // SAFETY: `path` is NUL-terminated; reopening a memfd through its /proc link with
        // O_RDONLY yields a new, read-only open file description of the same memory.
        let raw = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }
}

impl Drop for HostArena {
    fn drop(&mut self) {
        let base = self.ptr as u64;
        self.live.lock().unwrap_or_else(PoisonError::into_inner).retain(|&(b, _)| b != base);
        // SAFETY: `ptr`/`len` are exactly the mapping created in `alloc_arena`, not used after
        // this (the engine drops arenas only after every copy into them has completed).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// The host device (module docs).
#[derive(Debug)]
pub struct HostDevice {
    info: DeviceInfo,
    queue: Option<Sender<Copy>>,
    completion: Arc<Completion>,
    threads: Vec<JoinHandle<()>>,
    /// Live arenas as (base, len), so `read_back` can check its range.
    arenas: ArenaList,
}

impl HostDevice {
    pub fn new(config: &DeviceConfig) -> Result<HostDevice, DeviceError> {
        let (tx, rx) = unbounded::<Copy>();
        let completion = Arc::new(Completion::default());
        let mut threads = Vec::new();
        for i in 0..config.host_copy_threads.max(1) {
            let rx: Receiver<Copy> = rx.clone();
            let completion = Arc::clone(&completion);
            let t = std::thread::Builder::new()
                .name(format!("ferry-copy-{i}"))
                .spawn(move || copy_engine(&rx, &completion))
                .map_err(|e| DeviceError::os("starting a host copy thread", e))?;
            threads.push(t);
        }
        let info = DeviceInfo {
            backend: Backend::Host,
            ordinal: config.ordinal,
            name: "host memory".to_string(),
            // Stable across restarts, like a GPU's UUID, so configurations and clients can
            // name a simulated device by it.
            uuid: format!("HOST-{:04}", config.ordinal),
            total_memory: config.host_memory,
            free_memory: config.host_memory,
            pcie: None,
            pci_bus_id: None,
            nvml_numa_node: None,
            mapped_reads: config.mapped_reads,
        };
        Ok(HostDevice { info, queue: Some(tx), completion, threads, arenas: ArenaList::default() })
    }
}

fn copy_engine(rx: &Receiver<Copy>, completion: &Completion) {
    while let Ok(c) = rx.recv() {
        let _t = crate::trace::span_bytes("copy", "copy", c.len as u64); // timeline (if on)
        // SAFETY: `copy_h2d_async`'s contract: `src..src+len` is readable and unchanged and
        // `dst..dst+len` is writable arena memory until this copy's event completes, which
        // happens only after `complete` below; the two ranges never overlap (file mapping or
        // staging buffer vs. arena).
        unsafe {
            std::ptr::copy_nonoverlapping(c.src as *const u8, c.dst as *mut u8, c.len);
        }
        completion.complete(c.seq);
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        // Closing the queue lets the copy threads finish what is queued and exit.
        self.queue = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl BackendOps for HostDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc_arena(&self, bytes: u64) -> Result<Arena, DeviceError> {
        let oom = |reason: String| DeviceError::OutOfMemory { what: "host arena", bytes, reason };
        let len =
            usize::try_from(bytes).map_err(|_| oom("larger than the address space".into()))?;
        if len == 0 {
            return Err(oom("an arena cannot be empty".into()));
        }
        // SAFETY: the name is a valid NUL-terminated string; flags are valid for memfd_create.
        let raw = unsafe { libc::memfd_create(c"ferry-arena".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(DeviceError::os("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len).map_err(|_| oom("too large for ftruncate".into()))?;
        // SAFETY: `fd` is a valid memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(oom(std::io::Error::last_os_error().to_string()));
        }
        // SAFETY: a new shared read-write mapping of the whole memfd; the kernel picks the
        // address. The result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(oom(std::io::Error::last_os_error().to_string()));
        }
        let base = ptr as u64;
        self.arenas.lock().unwrap_or_else(PoisonError::into_inner).push((base, bytes));
        Ok(Arena {
            base,
            len: bytes,
            inner: ArenaInner::Host(HostArena {
                fd,
                ptr: ptr.cast(),
                len,
                live: Arc::clone(&self.arenas),
            }),
        })
    }

    fn alloc_staging(&self, bytes: usize) -> Result<HostBuffer, DeviceError> {
        let mut v = Vec::new();
        v.try_reserve_exact(bytes).map_err(|e| DeviceError::OutOfMemory {
            what: "staging buffer",
            bytes: bytes as u64,
            reason: e.to_string(),
        })?;
        v.resize(bytes, 0);
        let ptr = v.as_mut_ptr();
        Ok(HostBuffer { ptr, len: bytes, inner: HostBufferInner::Host(v) })
    }

    fn register_mapping(
        &self,
        _ptr: *const u8,
        _len: usize,
    ) -> Result<Option<Registration>, DeviceError> {
        Ok(self.info.mapped_reads.then_some(Registration { inner: RegistrationInner::Host }))
    }

    unsafe fn copy_h2d_async(
        &self,
        src: *const u8,
        dst: u64,
        len: usize,
    ) -> Result<(), DeviceError> {
        let queue = self.queue.as_ref().ok_or_else(|| DeviceError::Stopped("shut down".into()))?;
        let dst = usize::try_from(dst)
            .map_err(|_| DeviceError::OutOfRange { addr: dst, len: len as u64 })?;
        let seq = {
            let mut p = self.completion.lock();
            p.issued += 1;
            p.issued
        };
        queue
            .send(Copy { seq, src: src as usize, dst, len })
            .map_err(|_| DeviceError::Stopped("copy threads exited".into()))
    }

    fn record(&self) -> Result<Event, DeviceError> {
        let seq = self.completion.lock().issued;
        Ok(Event(EventInner::Host(HostEvent { completion: Arc::clone(&self.completion), seq })))
    }

    fn wait_client(&self, done: &ClientDone) -> Result<(), DeviceError> {
        match done {
            // Host clients are CPU code: by the time they release, they are done.
            ClientDone::Now | ClientDone::CudaEvent(_) => Ok(()),
            ClientDone::Event(e) => e.wait(),
        }
    }

    fn write_sync(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError> {
        // Like a synchronous CUDA copy: everything queued before it lands first.
        self.record()?.wait()?;
        let len = src.len() as u64;
        let live = self.arenas.lock().unwrap_or_else(PoisonError::into_inner);
        let inside =
            live.iter().any(|&(base, alen)| dst >= base && dst.saturating_add(len) <= base + alen);
        if !inside {
            return Err(DeviceError::OutOfRange { addr: dst, len });
        }
        // SAFETY: the range lies inside a live arena mapping (checked above; the arena cannot
        // be dropped while `live` is locked) and does not overlap `src`, ordinary memory.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst as usize as *mut u8, src.len());
        }
        Ok(())
    }

    fn read_back(&self, src: u64, dst: &mut [u8]) -> Result<(), DeviceError> {
        // Like a synchronous CUDA copy: everything queued before it lands first.
        self.record()?.wait()?;
        let len = dst.len() as u64;
        // Held during the copy, so the arena cannot be unmapped under it.
        let live = self.arenas.lock().unwrap_or_else(PoisonError::into_inner);
        let inside =
            live.iter().any(|&(base, alen)| src >= base && src.saturating_add(len) <= base + alen);
        if !inside {
            return Err(DeviceError::OutOfRange { addr: src, len });
        }
        // SAFETY: the range lies inside a live arena mapping (checked above, and the arena
        // cannot be dropped while `live` is locked) and does not overlap `dst`, a Rust slice of
        // ordinary memory.
        unsafe {
            std::ptr::copy_nonoverlapping(src as usize as *const u8, dst.as_mut_ptr(), dst.len());
        }
        Ok(())
    }
}
