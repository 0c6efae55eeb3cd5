//! The copy pipeline: mapped file pages → (pinned staging) → device, ordered by events.
//!
//! I/O threads take copy jobs (one layer each) from a queue. For each piece of a tensor:
//!
//! - if the device can read the file mapping in place (CUDA read-only registration, host direct
//!   reads), the piece is enqueued on the copy stream straight from the mapping;
//! - otherwise it is copied into a staging slot (pinned memory, allocated once at start) and
//!   enqueued from there. Small tensors share a slot; a tensor larger than a slot streams in
//!   slot-sized chunks. A slot is reused only once the event recorded after its last copy has
//!   completed.
//!
//! After the last piece the thread records an event on the copy stream and publishes it in the
//! job's [`ReadySignal`]; nothing on this path waits for the device to finish. Readers of the
//! mapping are protected from truncated files: the file length is checked before copying and
//! every mapping is registered with the SIGBUS guard, whose fault flag is checked after.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam::channel::{Receiver, Sender, bounded, unbounded};

use super::error::EngineError;
use super::lora_view::{FuseBudget, Fused, LoraMode, LoraState};
use super::runtime::ModelRuntime;
use crate::device::{Device, DeviceError, Event, HostBuffer};

/// One tensor to copy: `len` bytes of file `file` at `offset` go to device address `dst`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    /// The tensor (a LoRA stack may change its bytes).
    pub tensor: usize,
    pub file: usize,
    /// Offset in the file.
    pub offset: u64,
    pub len: u64,
    pub dst: u64,
}

/// Copying one layer.
#[derive(Debug)]
pub(crate) struct Job {
    pub runtime: Arc<ModelRuntime>,
    pub pieces: Vec<Piece>,
    pub ready: Arc<ReadySignal>,
    /// The model's LoRA stack, if one is applied.
    pub lora: Option<Arc<LoraState>>,
}

impl Job {
    /// The stack, if it changes this piece's tensor.
    fn lora_for(&self, piece: &Piece) -> Option<&LoraState> {
        self.lora.as_deref().filter(|l| l.touches(piece.tensor))
    }
}

#[derive(Debug)]
enum ReadyState {
    Pending,
    Recorded(Event),
    /// The job failed; copies it queued before failing complete with the event, if any.
    Failed(EngineError, Option<Event>),
}

/// Published by the I/O thread once a layer's copies are enqueued: the event to wait on, or why
/// the layer could not be copied.
#[derive(Debug)]
pub(crate) struct ReadySignal {
    state: Mutex<ReadyState>,
    changed: Condvar,
}

impl ReadySignal {
    pub fn new() -> Arc<ReadySignal> {
        Arc::new(ReadySignal { state: Mutex::new(ReadyState::Pending), changed: Condvar::new() })
    }

    fn set(&self, state: ReadyState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
        self.changed.notify_all();
    }

    /// Blocks until the copies are enqueued; returns the event that completes with them.
    pub fn recorded(&self) -> Result<Event, EngineError> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match &*s {
                ReadyState::Pending => {
                    s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                ReadyState::Recorded(e) => return Ok(e.clone()),
                ReadyState::Failed(e, _) => return Err(e.duplicate()),
            }
        }
    }

    /// Whether the layer is fully on the device (never blocks). Errors if copying failed.
    pub fn is_complete(&self) -> Result<bool, EngineError> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &*s {
            ReadyState::Pending => Ok(false),
            ReadyState::Recorded(e) => Ok(e.is_done()?),
            ReadyState::Failed(e, _) => Err(e.duplicate()),
        }
    }

    /// Once the job has finished, one way or the other: the event after the last copy it
    /// queued (`None` if it queued none). Its memory may be reused once that event completes.
    pub fn settled_event(&self) -> Option<Option<Event>> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &*s {
            ReadyState::Pending => None,
            ReadyState::Recorded(e) => Some(Some(e.clone())),
            ReadyState::Failed(_, e) => Some(e.clone()),
        }
    }

    /// Blocks until every copy the job queued has completed (whether or not it failed).
    pub fn wait_settled(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while matches!(*s, ReadyState::Pending) {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        let event = match &*s {
            ReadyState::Recorded(e) | ReadyState::Failed(_, Some(e)) => Some(e.clone()),
            _ => None,
        };
        drop(s);
        if let Some(e) = event {
            let _ = e.wait();
        }
    }
}

/// A staging slot and the event after its last copy.
#[derive(Debug)]
struct Slot {
    buf: HostBuffer,
    last: Option<Event>,
}

/// The pipeline's threads and staging ring.
#[derive(Debug)]
pub(crate) struct Pipeline {
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    device: Arc<Device>,
    slots: Vec<Mutex<Slot>>,
    free_tx: Sender<usize>,
    free_rx: Receiver<usize>,
    slot_bytes: usize,
    /// Host memory held by every LoRA fuse cache of the engine (filled by the I/O threads).
    fuse_budget: Arc<FuseBudget>,
}

impl Pipeline {
    /// Allocates the staging ring (`slots` × `slot_bytes`, once, here) and starts `io_threads`.
    pub fn start(
        device: Arc<Device>,
        io_threads: usize,
        slots: usize,
        slot_bytes: usize,
    ) -> Result<Pipeline, EngineError> {
        let slots = slots.max(1);
        let slot_bytes = slot_bytes.max(4096);
        let mut ring = Vec::with_capacity(slots);
        for _ in 0..slots {
            ring.push(Mutex::new(Slot { buf: device.alloc_staging(slot_bytes)?, last: None }));
        }
        let (free_tx, free_rx) = bounded(slots);
        for i in 0..slots {
            // Cannot fail: the channel has room for every slot.
            let _ = free_tx.send(i);
        }
        let shared = Arc::new(Shared {
            device,
            slots: ring,
            free_tx,
            free_rx,
            slot_bytes,
            fuse_budget: FuseBudget::new(),
        });
        let (tx, rx) = unbounded::<Job>();
        let mut threads = Vec::new();
        for i in 0..io_threads.max(1) {
            let rx = rx.clone();
            let shared = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name(format!("ferry-io-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job.ready.set(outcome(&shared, &job));
                    }
                })
                .map_err(|e| EngineError::Device(DeviceError::os("starting an I/O thread", e)))?;
            threads.push(t);
        }
        Ok(Pipeline { jobs: Some(tx), threads, shared })
    }

    /// Queues a job; its signal reports the outcome. A job whose every piece the device reads
    /// in place has nothing to stage: its copies are queued on the device from the calling
    /// thread, sparing the wake-up of an I/O thread (it only checks file lengths and enqueues).
    pub fn submit(&self, job: Job) {
        if job.pieces.iter().all(|p| job.runtime.mapped_reads(p.file) && job.lora_for(p).is_none())
        {
            job.ready.set(outcome(&self.shared, &job));
            return;
        }
        let ready = Arc::clone(&job.ready);
        match &self.jobs {
            Some(tx) => {
                if tx.send(job).is_err() {
                    ready.set(ReadyState::Failed(EngineError::ShuttingDown, None));
                }
            }
            None => ready.set(ReadyState::Failed(EngineError::ShuttingDown, None)),
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Every copy is queued now; the staging ring may be freed (with `shared`) only once the
        // device has finished reading it.
        if let Ok(e) = self.shared.device.record() {
            let _ = e.wait();
        }
    }
}

/// Runs a job and says how it ended.
fn outcome(shared: &Shared, job: &Job) -> ReadyState {
    let pieces = job.pieces.iter().map(|p| (p.tensor, p.len));
    let _t = crate::trace::layer_span("io", job.runtime.model(), pieces); // timeline (if on)
    match run(shared, job) {
        Ok(e) => ReadyState::Recorded(e),
        // Copies queued before the failure still land: their memory is reusable only after
        // this event.
        Err(e) => ReadyState::Failed(e, shared.device.record().ok()),
    }
}

/// The slot being filled and how much of it is used.
struct Filling<'a> {
    index: usize,
    slot: std::sync::MutexGuard<'a, Slot>,
    used: usize,
}

fn run(shared: &Shared, job: &Job) -> Result<Event, EngineError> {
    let rt = &job.runtime;
    rt.check()?;
    let mut filling: Option<Filling<'_>> = None;
    let result = copy_pieces(shared, job, &mut filling);
    // Whatever happened, the slot in use goes back to the ring with its last event.
    if let Some(f) = filling.take() {
        finish_slot(shared, f)?;
    }
    result?;
    // LoRA backup mode: the originals have been queued; the adapted tensors change once they
    // land: GEMMs queued behind the copies on a device that has them, else a CPU merge written
    // synchronously (write_sync waits for everything queued before it).
    for piece in &job.pieces {
        if let Some(lora) = job.lora_for(piece)
            && lora.mode == LoraMode::Backup
        {
            let _t = crate::trace::span_bytes("lora", "LoRA merge + write (backup)", piece.len);
            lora.apply_backup(piece.tensor, piece.dst, &shared.device)?;
        }
    }
    let event = shared.device.record()?;
    // A truncation seen by the SIGBUS guard while copying poisons the model.
    rt.check()?;
    Ok(event)
}

fn copy_pieces<'a>(
    shared: &'a Shared,
    job: &Job,
    filling: &mut Option<Filling<'a>>,
) -> Result<(), EngineError> {
    let rt = &job.runtime;
    let model = rt.model();
    for piece in &job.pieces {
        let file = model.files().get(piece.file).ok_or(EngineError::ShuttingDown)?;
        if !file.still_whole() {
            return Err(rt.fail_truncated(piece.file));
        }
        let src =
            file.range(piece.offset, piece.len).ok_or_else(|| rt.fail_truncated(piece.file))?;
        if let Some(lora) = job.lora_for(piece)
            && lora.mode == LoraMode::Fuse
        {
            let t = crate::trace::span_bytes("lora", "LoRA fused bytes (fuse)", piece.len);
            let fused = lora.fused(piece.tensor, &shared.device, &shared.fuse_budget)?;
            drop(t);
            match fused {
                Fused::Cached(buf) => {
                    if buf.len() as u64 != piece.len {
                        let e = DeviceError::Stopped("fused tensor of the wrong length".into());
                        return Err(e.into());
                    }
                    // SAFETY: the buffer is a staging allocation of this device (pinned on
                    // CUDA), held by the stack's cache, which waits for the device's copies
                    // before freeing it; `dst` lies in this layer's reserved arena range.
                    unsafe { shared.device.copy_h2d_async(buf.as_ptr(), piece.dst, buf.len())? };
                }
                // Did not fit the cache: plain memory, through the staging ring.
                Fused::Uncached(bytes) => stage(shared, &bytes, piece.dst, filling)?,
            }
            continue;
        }
        if rt.mapped_reads(piece.file) {
            // SAFETY: `src` lies in a mapping registered with the device, kept alive (with its
            // registration) by the layer's placement until the job's event completes; `dst`
            // lies in the engine's arena, reserved for this layer until then.
            unsafe { shared.device.copy_h2d_async(src.as_ptr(), piece.dst, src.len())? };
            continue;
        }
        stage(shared, src, piece.dst, filling)?;
    }
    Ok(())
}

/// Copies `src` to device address `dst` through staging slots: filling the current slot, and
/// taking the next one when it is full.
fn stage<'a>(
    shared: &'a Shared,
    src: &[u8],
    dst: u64,
    filling: &mut Option<Filling<'a>>,
) -> Result<(), EngineError> {
    let mut done = 0usize;
    while done < src.len() {
        if filling.as_ref().is_none_or(|f| f.used == shared.slot_bytes) {
            if let Some(full) = filling.take() {
                finish_slot(shared, full)?;
            }
            *filling = Some(take_slot(shared)?);
        }
        let Some(f) = filling.as_mut() else {
            // Never happens: a slot was just taken. An error all the same, not a panic.
            return Err(DeviceError::Stopped("staging slot missing".into()).into());
        };
        let n = (src.len() - done).min(shared.slot_bytes - f.used);
        let at = f.used;
        let _t = crate::trace::span_bytes("io", "stage", n as u64); // timeline (if on)
        if !f.slot.buf.write_at(at, &src[done..done + n]) {
            return Err(DeviceError::Stopped("staging slot overflow".into()).into());
        }
        // SAFETY: the staging bytes just written stay untouched until the slot's event,
        // recorded in `finish_slot` after this copy, completes (the next user waits for it);
        // `dst + done` lies in this layer's reserved arena range.
        unsafe {
            shared.device.copy_h2d_async(f.slot.buf.as_ptr().add(at), dst + done as u64, n)?;
        }
        f.used += n;
        done += n;
    }
    Ok(())
}

fn take_slot(shared: &Shared) -> Result<Filling<'_>, EngineError> {
    let index = shared
        .free_rx
        .recv()
        .map_err(|_| EngineError::Device(DeviceError::Stopped("staging ring closed".into())))?;
    let slot = shared.slots[index].lock().unwrap_or_else(PoisonError::into_inner);
    // The previous copies out of this slot must be done before it is overwritten. This waits
    // on the I/O thread, never on a client's path.
    let _t = crate::trace::span("io", "wait for a staging slot"); // timeline (if on)
    if let Some(last) = &slot.last
        && let Err(e) = last.wait()
    {
        drop(slot);
        let _ = shared.free_tx.send(index);
        return Err(e.into());
    }
    Ok(Filling { index, slot, used: 0 })
}

fn finish_slot(shared: &Shared, mut f: Filling<'_>) -> Result<(), EngineError> {
    let index = f.index;
    if f.used > 0 {
        match shared.device.record() {
            Ok(e) => f.slot.last = Some(e),
            // Without an event nobody could tell when the slot's copies are done: it stays
            // out of the ring (the device is failing anyway).
            Err(e) => return Err(EngineError::Device(e)),
        }
    }
    drop(f);
    let _ = shared.free_tx.send(index);
    Ok(())
}
