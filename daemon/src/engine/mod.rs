//! The streaming engine: layers into device memory before they are needed, within a budget,
//! under the residency policy each model (or component) asked for.
//!
//! # Shape
//!
//! - One [`Device`] and one **arena** of device memory: the engine's whole budget, allocated at
//!   start and sub-allocated by [`alloc::Allocator`]. No allocation can exceed it, so the budget
//!   is a hard cap by construction.
//! - Per model, one or more **scopes**: the layers governed by one [`policy::Policy`] (the whole
//!   model, or a component with its own policy). A scope reserves a *quota* of the arena when its
//!   policy is set ([`Engine::set_residency`]); quotas never sum past the arena. A budget too small
//!   for a policy fails there, clearly, not later as a hang.
//! - The policy decides loads and evictions ([`policy::Action`]); the engine carries them out:
//!   a load allocates the layer's bytes and queues a copy job on the [`pipeline`]; an eviction
//!   frees them once the last copy into them has completed (the memory of an evicted layer is
//!   *pending* until then).
//! - [`Engine::acquire`] returns a [`Lease`] at once, without waiting for the copy: per-tensor
//!   device addresses and a ready signal. Host clients wait on it ([`Lease::wait_ready`]); CUDA
//!   clients make their stream wait on the event ([`Lease::ready_event`]). A leased layer is never
//!   evicted. Releasing hands back a done signal ([`ClientDone`]); on CUDA the copy stream waits
//!   for it on the device before any later copy can overwrite the memory.
//!
//! Everything is behind one mutex (`State`); copy threads never take it.

pub mod alloc;
pub mod error;
pub mod lora_view;
mod pipeline;
pub mod policy;
mod runtime;
pub mod sigbus;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use self::alloc::{Allocator, align_up};
pub use self::error::EngineError;
use self::lora_view::{LoraMode, LoraState};
use self::pipeline::{Job, Piece, Pipeline, ReadySignal};
use self::policy::{
    Action, LayerIdx, Policy, PolicyChoice, Residency, Resolved, ScopeLayer, Threshold, View,
};
use self::runtime::ModelRuntime;
use crate::device::{Arena, ClientDone, Device, DeviceChoice, DeviceConfig, DeviceInfo, Event};
use crate::numa::{Placement, Topology};
use crate::store::{Dtype, Model, Store};

/// Identifies an open model within an engine.
pub type ModelId = u64;
/// Identifies a lease within an engine.
pub type LeaseId = u64;

/// How to build an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub device: DeviceChoice,
    pub device_config: DeviceConfig,
    /// Bytes of device memory the engine may use (its arena). Default: 75% of the device's
    /// memory, at most what is free.
    pub budget: Option<u64>,
    /// Staging ring: number of pinned slots and bytes each (allocated once, at start).
    pub staging_slots: usize,
    pub staging_slot_bytes: usize,
    /// Threads moving mapped pages into staging slots and queueing device copies.
    pub io_threads: usize,
    /// How long an acquire waits for leased layers to be released before failing.
    pub acquire_timeout: Duration,
    /// The policy of a model whose client never set one (default `auto`).
    pub default_policy: PolicyChoice,
    /// Under `auto`, devices with at most this many bytes of memory get `sequential`, larger
    /// ones `balanced` (default 4 GiB).
    pub auto_sequential_max: u64,
    /// Host memory for fused LoRA layers (fuse mode). Default: a quarter of the RAM this
    /// process may use (cgroup limits included).
    pub fuse_cache_bytes: Option<u64>,
    /// The engine's place among several devices (ferryd's device index): every model, view and
    /// lease id it hands out carries it in its top 16 bits ([`ID_SHIFT`]), so ids from engines
    /// of different devices never collide and an id alone names its device.
    pub id_prefix: u16,
    /// Where the device's staging buffers and I/O threads live ([`NumaChoice`]).
    pub numa: NumaChoice,
}

/// Ids carry their engine's [`EngineConfig::id_prefix`] from this bit up.
pub const ID_SHIFT: u32 = 48;

/// The device index an id was handed out under (its top 16 bits).
pub fn id_prefix_of(id: u64) -> u16 {
    (id >> ID_SHIFT) as u16
}

/// NUMA placement of a device's staging buffers and I/O threads ([`crate::numa`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NumaChoice {
    /// The node nearest the device (sysfs), or no binding when that is unknown.
    #[default]
    Auto,
    /// No binding: threads and buffers go wherever the kernel puts them.
    Off,
    /// This node (an error at start if the machine has no such node).
    Node(u32),
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: DeviceChoice::Auto,
            device_config: DeviceConfig::default(),
            budget: None,
            staging_slots: 4,
            staging_slot_bytes: 16 << 20,
            io_threads: 2,
            acquire_timeout: Duration::from_secs(30),
            default_policy: PolicyChoice::Auto,
            auto_sequential_max: policy::choice::AUTO_SEQUENTIAL_MAX,
            fuse_cache_bytes: None,
            id_prefix: 0,
            numa: NumaChoice::Auto,
        }
    }
}

/// A model's residency policies, resolved ([`Engine::policies`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelPolicies {
    /// The policy of every component without its own.
    pub model: Resolved,
    /// Components with a policy of their own, in pipeline order.
    pub components: Vec<(String, Resolved)>,
    /// Whether a client set the model-wide policy (else it is the engine's default).
    pub set: bool,
    /// Whether the policies are in force (memory reserved): after a policy was set or a layer
    /// acquired.
    pub active: bool,
}

/// `balanced (auto: device 80.0 GiB > 4.0 GiB; threshold 75% of device)`, then
/// `; vae: sequential (lookahead 1)` for each component with its own.
impl std::fmt::Display for ModelPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.model)?;
        for (c, r) in &self.components {
            write!(f, "; {c}: {r}")?;
        }
        Ok(())
    }
}

/// One tensor of a leased layer, where it lives on the device.
#[derive(Clone, Debug, Serialize)]
pub struct TensorView {
    /// The tensor's local name (component prefix removed).
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Device address (a `CUdeviceptr` on CUDA, a pointer into the arena mapping on host).
    pub addr: u64,
    /// Offset from the start of the arena (for processes that map the arena themselves).
    pub arena_offset: u64,
    pub len: u64,
}

/// Counters since the engine started.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub acquires: u64,
    /// Acquires that found the layer present (resident or already loading).
    pub hits: u64,
    /// Acquires that had to start loading the layer.
    pub misses: u64,
    pub loads: u64,
    pub evictions: u64,
    /// Bytes queued for copying to the device.
    pub bytes_streamed: u64,
    /// Time clients spent waiting: for memory in `acquire`, and for copies in `wait_ready`.
    pub stall_ns: u64,
    /// Device bytes allocated now (including memory of evicted layers not yet reusable).
    pub device_bytes: u64,
    /// The most device bytes ever allocated at once.
    pub peak_device_bytes: u64,
    /// The arena size: the hard cap.
    pub budget: u64,
    /// Host memory held by fused LoRA layers (fuse mode).
    pub lora_cache_bytes: u64,
    /// Acquires waiting for device memory right now (every layer that could make room is
    /// leased): clients stalled at this moment.
    pub waiting_acquires: u64,
}

impl Stats {
    /// Adds another engine's counters (ferryd's totals over its devices).
    pub fn add(&mut self, o: &Stats) {
        self.acquires += o.acquires;
        self.hits += o.hits;
        self.misses += o.misses;
        self.loads += o.loads;
        self.evictions += o.evictions;
        self.bytes_streamed += o.bytes_streamed;
        self.stall_ns += o.stall_ns;
        self.device_bytes += o.device_bytes;
        self.peak_device_bytes += o.peak_device_bytes;
        self.budget += o.budget;
        self.lora_cache_bytes += o.lora_cache_bytes;
        self.waiting_acquires += o.waiting_acquires;
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// Acquires in their wait for memory now (a gauge).
    waiting: AtomicU64,
    acquires: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    loads: AtomicU64,
    evictions: AtomicU64,
    bytes_streamed: AtomicU64,
    stall_ns: AtomicU64,
    /// Bytes of layers on the device (placed or pending), and the most ever.
    device_in_use: AtomicU64,
    device_peak: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn take_device(&self, bytes: u64) {
        let now = self.device_in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.device_peak.fetch_max(now, Ordering::Relaxed);
    }

    fn give_device(&self, bytes: u64) {
        self.device_in_use.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A layer on the device (loading or loaded).
#[derive(Debug)]
struct Placed {
    /// Offset within the scope's region.
    offset: u64,
    bytes: u64,
    /// Offset of each tensor (in layer order) from `offset`.
    tensor_offsets: Vec<u64>,
    ready: Arc<ReadySignal>,
    /// Keeps the source mapping (and its registration) alive while the copy may run.
    runtime: Arc<ModelRuntime>,
}

/// Memory whose copy may still be running: an evicted layer (offset within its scope's
/// region), or a whole region of a torn-down scope (offset within the arena, with the layers
/// that were in it). Reusable once every copy into it has completed.
#[derive(Debug)]
struct Pending {
    offset: u64,
    bytes: u64,
    ready: Vec<Arc<ReadySignal>>,
    /// Layer bytes to take off the in-use figure when this is reclaimed.
    counted: u64,
    /// Keeps the source mappings alive until then.
    _runtime: Arc<ModelRuntime>,
}

impl Pending {
    fn of(p: Placed) -> Pending {
        let counted = align_up(p.bytes).unwrap_or(p.bytes);
        Pending {
            offset: p.offset,
            bytes: p.bytes,
            ready: vec![p.ready],
            counted,
            _runtime: p.runtime,
        }
    }

    /// Whether every copy into the memory has completed (never blocks).
    fn is_settled(&self) -> bool {
        self.ready.iter().all(|r| match r.settled_event() {
            None => false,
            Some(None) => true,
            Some(Some(e)) => e.is_done().unwrap_or(true),
        })
    }

    /// Blocks until every copy into the memory has completed.
    fn wait(&self) {
        for r in &self.ready {
            r.wait_settled();
        }
    }
}

/// Frees the settled entries of `pending` into `alloc`; with `wait`, first waits for the oldest
/// one.
fn reclaim(alloc: &mut Allocator, pending: &mut Vec<Pending>, wait: bool, counters: &Counters) {
    if wait && let Some(p) = pending.first() {
        p.wait();
    }
    let mut i = 0;
    while i < pending.len() {
        if pending[i].is_settled() {
            let p = pending.swap_remove(i);
            alloc.free(p.offset, p.bytes);
            counters.give_device(p.counted);
        } else {
            i += 1;
        }
    }
}

/// The layers one policy governs, in a region of the arena of its own (its quota): loads of
/// one scope can never fragment another's memory.
#[derive(Debug)]
struct Scope {
    /// `model 3` or `model 3 component "vae"`, for messages.
    name: String,
    policy: Box<dyn Policy>,
    /// (component, layer) of each scope layer.
    members: Vec<(usize, usize)>,
    meta: Vec<ScopeLayer>,
    residency: Vec<Residency>,
    leases: Vec<u32>,
    placed: Vec<Option<Placed>>,
    quota: u64,
    /// Offset of the scope's region in the arena; the region is `quota` bytes.
    region: u64,
    alloc: Allocator,
    pending: Vec<Pending>,
}

impl Scope {
    /// Asks the policy something about the scope's current state.
    fn ask(&mut self, f: impl FnOnce(&mut dyn Policy, &View<'_>) -> Vec<Action>) -> Vec<Action> {
        let view = View { layers: &self.meta, residency: &self.residency, leases: &self.leases };
        f(self.policy.as_mut(), &view)
    }

    fn lease_count(&self) -> u32 {
        self.leases.iter().sum()
    }

    /// Marks loading layers whose copies have completed as resident. A layer whose copy failed
    /// is taken off the device, so the next acquire loads it again (or reports the model's
    /// failure).
    fn sweep(&mut self) {
        for i in 0..self.placed.len() {
            if self.residency[i] != Residency::Loading {
                continue;
            }
            let Some(p) = &self.placed[i] else { continue };
            match p.ready.is_complete() {
                Ok(true) => self.residency[i] = Residency::Resident,
                Ok(false) => {}
                Err(_) if self.leases[i] == 0 => {
                    if let Some(p) = self.placed[i].take() {
                        self.pending.push(Pending::of(p));
                    }
                    self.residency[i] = Residency::Absent;
                }
                Err(_) => {}
            }
        }
    }

    /// Takes layer `i` off the device (its memory pending until its copy is done).
    fn evict(&mut self, i: LayerIdx, counters: &Counters) -> bool {
        if self.leases.get(i).is_none_or(|&n| n > 0) {
            return false;
        }
        match self.placed.get_mut(i).and_then(Option::take) {
            Some(p) => {
                let at = self.members.get(i).copied();
                crate::trace::layer_instant("evict", p.runtime.model(), at); // timeline (if on)
                self.pending.push(Pending::of(p));
                self.residency[i] = Residency::Absent;
                bump(&counters.evictions, 1);
                true
            }
            None => false,
        }
    }

    /// Finds room for `bytes` in the region: reclaiming settled memory, waiting for copies into
    /// evicted memory, and, with `make_hole`, if the free bytes are there but not in one piece,
    /// evicting unleased layers that sit where a hole could be (layers the policy keeps for good
    /// last). `None` when leased layers stand in the way (the caller waits for a release), or,
    /// without `make_hole`, when the free bytes are not in one piece.
    ///
    /// Hole evictions happen behind the policy's back, so only the load a client is waiting for
    /// may make them: a prefetch that made one could evict the very layer being acquired, and
    /// that client would then wait for a release that never comes.
    fn place(&mut self, bytes: u64, make_hole: bool, counters: &Counters) -> Option<u64> {
        loop {
            reclaim(&mut self.alloc, &mut self.pending, false, counters);
            if let Some(off) = self.alloc.alloc(bytes) {
                counters.take_device(align_up(bytes).unwrap_or(bytes));
                return Some(off);
            }
            if !self.pending.is_empty() {
                reclaim(&mut self.alloc, &mut self.pending, true, counters);
                continue;
            }
            if !make_hole {
                return None;
            }
            let victims = self.hole_victims(bytes)?;
            for v in victims {
                self.evict(v, counters);
            }
        }
    }

    /// The unleased layers to evict so that a hole of `bytes` opens, cheapest first by bytes
    /// moved (layers the policy keeps for good count double); `None` if no window is free of
    /// leased layers.
    fn hole_victims(&self, bytes: u64) -> Option<Vec<LayerIdx>> {
        let size = align_up(bytes)?;
        let kept: std::collections::HashSet<LayerIdx> =
            self.policy.pinned_set().into_iter().collect();
        let mut placed: Vec<(u64, u64, LayerIdx)> = self
            .placed
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                p.as_ref().map(|p| (p.offset, align_up(p.bytes).unwrap_or(p.bytes), i))
            })
            .collect();
        placed.sort_unstable();
        // Candidate windows start at 0 or right after a placed layer.
        let starts = std::iter::once(0).chain(placed.iter().map(|&(o, l, _)| o + l));
        let mut best: Option<(u64, Vec<LayerIdx>)> = None;
        for start in starts.chain(placed.iter().map(|&(o, _, _)| o)) {
            let end = start.checked_add(size)?;
            if end > self.alloc.capacity() {
                continue;
            }
            let mut cost = 0u64;
            let mut victims = Vec::new();
            let mut blocked = false;
            for &(o, l, i) in &placed {
                if o < end && start < o + l {
                    if self.leases[i] > 0 {
                        blocked = true;
                        break;
                    }
                    cost += if kept.contains(&i) { 2 * l } else { l };
                    victims.push(i);
                }
            }
            if !blocked && !victims.is_empty() && best.as_ref().is_none_or(|(c, _)| cost < *c) {
                best = Some((cost, victims));
            }
        }
        best.map(|(_, v)| v)
    }
}

#[derive(Debug)]
struct ModelState {
    runtime: Arc<ModelRuntime>,
    /// The policy for components without their own; `None` until set (the engine's default
    /// then applies).
    model_spec: Option<PolicyChoice>,
    /// Components (by index) with a policy of their own.
    overrides: BTreeMap<usize, PolicyChoice>,
    scopes: Vec<Scope>,
    /// [component][layer] → (scope, index in scope).
    locate: Vec<Vec<Option<(usize, usize)>>>,
    /// The LoRA stack applied to the model, if any.
    lora: Option<Arc<LoraState>>,
    /// For a view: the model it sees through its stack, and the (component, layer)s the stack
    /// touches. Every other layer is the base's own (shared, not copied).
    view_of: Option<(ModelId, std::collections::HashSet<(usize, usize)>)>,
}

impl ModelState {
    /// The model to serve `(component, layer)` from: the base, for a view's untouched layer.
    fn serves(&self, component: usize, layer: usize) -> Option<ModelId> {
        self.view_of.as_ref().filter(|(_, t)| !t.contains(&(component, layer))).map(|(b, _)| *b)
    }
}

#[derive(Debug)]
struct LeaseRecord {
    model: ModelId,
    scope: usize,
    index: usize,
    owner: Owner,
}

/// Who holds a lease: `0` for in-process callers, a connection id for the daemon's clients.
pub type Owner = u64;

#[derive(Debug)]
struct State {
    /// Allocates scope regions in the arena.
    alloc: Allocator,
    /// Regions of torn-down scopes whose copies may still run.
    pending: Vec<Pending>,
    models: BTreeMap<ModelId, ModelState>,
    leases: HashMap<LeaseId, LeaseRecord>,
    pins: HashMap<(ModelId, usize, usize), Vec<LeaseId>>,
    next_id: u64,
}

#[derive(Debug)]
struct Inner {
    config: EngineConfig,
    /// Where the staging ring and I/O threads live.
    placement: Placement,
    pipeline: Option<Pipeline>,
    device: Arc<Device>,
    arena: Option<Arena>,
    arena_base: u64,
    store: Store,
    state: Mutex<State>,
    /// Signalled on every release and eviction, for acquires waiting for room.
    changed: Condvar,
    counters: Counters,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Order matters: stop the I/O threads (every copy is then queued), wait for the device
        // to finish every copy, and only then free the arena the copies write into.
        self.pipeline = None;
        if let Ok(e) = self.device.record() {
            let _ = e.wait();
        }
        self.arena = None;
    }
}

/// The streaming engine (module docs). Cheap to clone; all clones share one engine.
#[derive(Clone, Debug)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A client's hold on one layer on the device. While it is held the layer is not evicted.
///
/// Release it with [`Engine::release`] (passing when the client's own use ends); dropping it
/// releases it as if the client were done now.
#[derive(Debug)]
pub struct Lease {
    id: LeaseId,
    owner: Owner,
    model: ModelId,
    component: String,
    layer: String,
    tensors: Vec<TensorView>,
    ready: Arc<ReadySignal>,
    runtime: Arc<ModelRuntime>,
    engine: Weak<Inner>,
    released: bool,
}

impl Lease {
    pub fn id(&self) -> LeaseId {
        self.id
    }

    pub fn model(&self) -> ModelId {
        self.model
    }

    pub fn component(&self) -> &str {
        &self.component
    }

    /// The layer's name.
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// The layer's tensors, in header order.
    pub fn tensors(&self) -> &[TensorView] {
        &self.tensors
    }

    /// A tensor by its local name.
    pub fn tensor(&self, name: &str) -> Option<&TensorView> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Whether the layer's bytes are all on the device (never blocks).
    pub fn is_ready(&self) -> Result<bool, EngineError> {
        let done = self.ready.is_complete()?;
        self.runtime.check()?;
        Ok(done)
    }

    /// The event to wait on before reading the layer (blocks only until its copies are queued,
    /// which has normally happened long before, through prefetching).
    pub fn ready_event(&self) -> Result<Event, EngineError> {
        self.ready.recorded()
    }

    /// Blocks until the layer's bytes are all on the device. The time spent counts as stall.
    pub fn wait_ready(&self) -> Result<(), EngineError> {
        let start = Instant::now();
        let result = self.ready.recorded().and_then(|e| Ok(e.wait()?));
        if let Some(inner) = self.engine.upgrade() {
            bump(&inner.counters.stall_ns, start.elapsed().as_nanos() as u64);
        }
        result?;
        self.runtime.check()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.released
            && let Some(inner) = self.engine.upgrade()
        {
            let _ = Engine { inner }.release_as(self.owner, self.model, self.id, ClientDone::Now);
        }
    }
}

impl Engine {
    /// The interprocess event a CUDA client in another process makes its stream wait on before
    /// its kernels read `lease`'s layer (the 64-byte `cuIpcGetEventHandle` handle, opened with
    /// [`crate::device::cuda_import::ImportedArena::stream_wait`]), so the wait happens on the
    /// client's GPU stream instead of in [`Lease::wait_ready`]. `Ok(None)` when the layer is on
    /// the device already: nothing to wait for. Blocks only until the layer's copies are
    /// queued, like [`Lease::ready_event`].
    ///
    /// A device without interprocess events (the host backend) answers
    /// [`EngineError::Device`] with [`crate::device::DeviceError::Unsupported`] for a layer not
    /// ready yet: wait with [`Lease::wait_ready`] instead. A lease of another engine is
    /// [`EngineError::UnknownLease`] (an event of this device would not cover its copies).
    pub fn ready_ipc_event(&self, lease: &Lease) -> Result<Option<[u8; 64]>, EngineError> {
        if !std::ptr::eq(lease.engine.as_ptr(), Arc::as_ptr(&self.inner)) {
            return Err(EngineError::UnknownLease { lease: lease.id });
        }
        if lease.is_ready()? {
            return Ok(None);
        }
        // Why the event covers the layer: `ready_event` returns only once the job has enqueued
        // every copy (and LoRA GEMM) of the layer on the device's one in-order copy stream and
        // recorded its own event after them; the interprocess event is recorded on that same
        // stream after that return, so it completes only after all of them. The device
        // re-records a ring of such events, so this one may be recorded again later, after
        // more work: a client whose wait sees a later recording waits longer, never less.
        lease.ready_event()?;
        Ok(Some(self.inner.device.record_ipc()?))
    }
}

impl Engine {
    /// Opens the device, allocates the arena (the budget) and the staging ring, starts the
    /// copy threads.
    pub fn new(config: EngineConfig) -> Result<Engine, EngineError> {
        let device = Arc::new(Device::open(config.device, &config.device_config)?);
        let info = device.info().clone();
        let budget = match config.budget {
            Some(b) => b,
            None => Threshold::default().bytes(info.total_memory).min(info.free_memory),
        };
        let budget = budget & !(alloc::ALIGN - 1);
        if budget == 0 {
            return Err(EngineError::Config(format!(
                "the device budget must be at least {} bytes",
                alloc::ALIGN
            )));
        }
        let staging =
            (config.staging_slots as u64).saturating_mul(config.staging_slot_bytes as u64);
        let ram = crate::sysmem::detect();
        if staging > ram.effective / 4 {
            return Err(EngineError::Config(format!(
                "a staging ring of {} exceeds a quarter of the memory available to this process ({}, limit from {})",
                crate::units::bytes(staging),
                crate::units::bytes(ram.effective),
                if ram.cgroup_limit.is_some() { "cgroup memory.max" } else { "MemTotal" },
            )));
        }
        let placement = placement(&config, &info)?;
        // The arena and the staging ring are allocated, and the I/O threads started, on a
        // thread bound to the device's NUMA node: pages are placed where they are first
        // touched (or pinned), and threads inherit their parent's CPU set and memory policy.
        let placed = std::thread::scope(|s| {
            s.spawn(|| {
                match placement.bind_current_thread() {
                    Ok(()) => {}
                    // The node the operator named must be honoured; the one found for them is
                    // an optimisation, so a refusal only costs bandwidth.
                    Err(e) if config.numa == NumaChoice::Auto => {
                        tracing::warn!(numa = %placement, "NUMA binding failed, not bound: {e}");
                    }
                    Err(e) => return Err(EngineError::Config(format!("NUMA placement: {e}"))),
                }
                let arena = device.alloc_arena(budget)?;
                let pipeline = Pipeline::start(
                    Arc::clone(&device),
                    config.io_threads,
                    config.staging_slots,
                    config.staging_slot_bytes,
                )?;
                Ok::<_, EngineError>((arena, pipeline))
            })
            .join()
        });
        let (arena, pipeline) = placed.map_err(|_| {
            EngineError::Config("allocating the arena and staging ring panicked".into())
        })??;
        let arena_base = arena.base;
        tracing::info!(
            backend = %info.backend,
            device = %info.name,
            uuid = %info.uuid,
            budget,
            staging,
            numa = %placement,
            "engine started"
        );
        let state = State {
            alloc: Allocator::new(budget),
            pending: Vec::new(),
            models: BTreeMap::new(),
            leases: HashMap::new(),
            pins: HashMap::new(),
            next_id: (u64::from(config.id_prefix) << ID_SHIFT) + 1,
        };
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                placement,
                pipeline: Some(pipeline),
                device,
                arena: Some(arena),
                arena_base,
                store: Store::new(),
                state: Mutex::new(state),
                changed: Condvar::new(),
                counters: Counters::default(),
            }),
        })
    }

    pub fn device_info(&self) -> &DeviceInfo {
        self.inner.device.info()
    }

    /// The device index its ids carry ([`EngineConfig::id_prefix`]).
    pub fn id_prefix(&self) -> u16 {
        self.inner.config.id_prefix
    }

    /// The NUMA node the device's staging ring and I/O threads live on, if any.
    pub fn placement(&self) -> &Placement {
        &self.inner.placement
    }

    /// The device itself (for reading bytes back in tests and tools).
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// The arena: the engine's device memory, whose size is the budget.
    pub fn arena(&self) -> Option<&Arena> {
        self.inner.arena.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a model (through the engine's store, so the same files are one model) and returns
    /// its id. Nothing is copied and nothing reserved until a policy is set or a layer acquired.
    pub fn open_model(&self, path: impl AsRef<Path>) -> Result<ModelId, EngineError> {
        let model = self.inner.store.open(path)?;
        Ok(self.add_model(model))
    }

    /// [`Engine::open_model`] from a descriptor the caller opened: a `.safetensors` file or a
    /// model folder (whose files must all lie inside it); `name` labels it in messages.
    pub fn open_model_file(&self, file: std::fs::File, name: &str) -> Result<ModelId, EngineError> {
        let model = self.inner.store.open_file(file, name)?;
        Ok(self.add_model(model))
    }

    fn add_model(&self, model: Arc<Model>) -> ModelId {
        let locate = model.components().iter().map(|c| vec![None; c.layers.len()]).collect();
        // Registration can pin whole files (seconds on CUDA): done before taking the lock.
        let id = {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id += 1;
            id
        };
        let runtime = Arc::new(ModelRuntime::new(id, model, &self.inner.device));
        let state = ModelState {
            runtime,
            model_spec: None,
            overrides: BTreeMap::new(),
            scopes: Vec::new(),
            locate,
            lora: None,
            view_of: None,
        };
        self.lock().models.insert(id, state);
        id
    }

    /// The model behind an id.
    pub fn model(&self, id: ModelId) -> Result<Arc<Model>, EngineError> {
        let st = self.lock();
        Ok(Arc::clone(st.models.get(&id).ok_or(EngineError::UnknownModel(id))?.runtime.model()))
    }

    /// Closes a model: its layers leave the device and its memory is returned. Fails while any
    /// of its layers is leased or pinned.
    pub fn close_model(&self, id: ModelId) -> Result<(), EngineError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let ms = st.models.get(&id).ok_or(EngineError::UnknownModel(id))?;
        let leases: u32 = ms.scopes.iter().map(Scope::lease_count).sum();
        if leases > 0 {
            return Err(EngineError::Busy { what: format!("closing model {id}"), leases });
        }
        let views = st.models.values().filter(|m| m.view_of.as_ref().is_some_and(|v| v.0 == id));
        let views = views.count();
        if views > 0 {
            return Err(EngineError::Busy {
                what: format!(
                    "closing model {id}: {views} view(s) of it are open; close them first"
                ),
                leases: 0,
            });
        }
        if let Some(mut ms) = st.models.remove(&id) {
            teardown(st, &mut ms, &self.inner.counters);
        }
        st.pins.retain(|k, v| k.0 != id && !v.is_empty());
        drop(guard);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// Sets the residency policy of a whole model (`component` = `None`) or of one component.
    /// The scopes of the model are rebuilt: its layers leave the device and the new policies
    /// reserve their regions and load what they keep resident. Fails, changing nothing, if the
    /// budget cannot serve the new policies or if a layer of the model is leased or pinned.
    /// `spec` is a [`policy::PolicySpec`] or a [`PolicyChoice`] (a preset, or `auto`).
    pub fn set_residency(
        &self,
        model: ModelId,
        component: Option<&str>,
        spec: impl Into<PolicyChoice>,
    ) -> Result<(), EngineError> {
        let spec = spec.into();
        let mut guard = self.lock();
        let st = &mut *guard;
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        let mut model_spec = ms.model_spec;
        let mut overrides = ms.overrides.clone();
        match component {
            None => model_spec = Some(spec),
            Some(name) => {
                overrides.insert(component_index(ms, model, name)?, spec);
            }
        }
        self.rebuild(st, model, model_spec, overrides)?;
        drop(guard);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// Replaces the scopes of `model` by those `model_spec` and `overrides` describe. Every
    /// check (leases, policy plans, room for the regions) happens before anything changes.
    fn rebuild(
        &self,
        st: &mut State,
        model: ModelId,
        model_spec: Option<PolicyChoice>,
        overrides: BTreeMap<usize, PolicyChoice>,
    ) -> Result<(), EngineError> {
        let device_total = self.inner.device.info().total_memory;
        let default_spec = self.inner.config.default_policy;
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        let leases: u32 = ms.scopes.iter().map(Scope::lease_count).sum();
        if leases > 0 {
            return Err(EngineError::Busy {
                what: format!("changing the residency of model {model}"),
                leases,
            });
        }
        let m = Arc::clone(ms.runtime.model());
        // Room once this model's own regions are back: the largest hole then, since a region
        // must be contiguous. Checked on a copy of the allocator.
        let mut trial = st.alloc.clone();
        for s in &ms.scopes {
            trial.free(s.region, s.quota);
        }
        for p in &st.pending {
            trial.free(p.offset, p.bytes);
        }
        let mut groups: Vec<(Option<usize>, PolicyChoice, Vec<usize>)> = Vec::new();
        let rest: Vec<usize> =
            (0..m.components().len()).filter(|c| !overrides.contains_key(c)).collect();
        if !rest.is_empty() {
            groups.push((None, model_spec.unwrap_or(default_spec), rest));
        }
        for (&c, &spec) in &overrides {
            groups.push((Some(c), spec, vec![c]));
        }
        let mut scopes = Vec::with_capacity(groups.len());
        // What each scope's policy resolved to (presets, `auto`), logged once committed.
        let mut decided: Vec<(String, Resolved)> = Vec::with_capacity(groups.len());
        let mut locate: Vec<Vec<Option<(usize, usize)>>> =
            m.components().iter().map(|c| vec![None; c.layers.len()]).collect();
        for (only, spec, comps) in groups {
            let name = match only.and_then(|c| m.components().get(c)) {
                None => format!("model {model}"),
                Some(c) => format!("model {model} component {:?}", c.name),
            };
            let mut members = Vec::new();
            let mut meta = Vec::new();
            for &c in &comps {
                for (li, layer) in m.components()[c].layers.iter().enumerate() {
                    if ms.serves(c, li).is_some() {
                        continue; // a view's untouched layer: the base serves it
                    }
                    let bytes = layer_device_bytes(&m, &layer.tensors);
                    members.push((c, li));
                    meta.push(ScopeLayer { bytes, group: c });
                }
            }
            if members.is_empty() {
                continue;
            }
            let si = scopes.len();
            for (idx, &(c, li)) in members.iter().enumerate() {
                locate[c][li] = Some((si, idx));
            }
            let resolved = self.resolve(spec);
            decided.push((name.clone(), resolved));
            let mut policy = resolved.spec.build(device_total);
            let quota = policy
                .plan(&meta, trial.largest_free())
                .map_err(|source| EngineError::Policy { scope: name.clone(), source })?;
            let region = trial.alloc(quota).ok_or_else(|| EngineError::OutOfDeviceMemory {
                bytes: quota,
                free: trial.capacity() - trial.used(),
                largest: trial.largest_free(),
            })?;
            let n = members.len();
            scopes.push(Scope {
                name,
                policy,
                members,
                meta,
                residency: vec![Residency::Absent; n],
                leases: vec![0; n],
                placed: (0..n).map(|_| None).collect(),
                quota,
                region,
                alloc: Allocator::new(quota),
                pending: Vec::new(),
            });
        }
        // Commit: the old scopes go; the new regions are carved out where the trial put them
        // (waiting, if need be, for copies still running into the old ones).
        let counters = &self.inner.counters;
        let Some(mut ms) = st.models.remove(&model) else {
            return Err(EngineError::UnknownModel(model));
        };
        teardown(st, &mut ms, counters);
        for s in &mut scopes {
            s.region = claim_region(st, s.quota, counters)?;
        }
        ms.model_spec = model_spec;
        ms.overrides = overrides;
        ms.locate = locate;
        ms.scopes = scopes;
        for si in 0..ms.scopes.len() {
            let actions = ms.scopes[si].ask(|p, v| p.initial(v));
            self.apply(&mut ms, si, &actions, None);
        }
        st.models.insert(model, ms);
        for (scope, resolved) in decided {
            tracing::info!(%scope, policy = %resolved, "residency policy");
        }
        Ok(())
    }

    /// The concrete policy `choice` stands for on this engine's device (`auto` decided from
    /// the device's total memory and `auto_sequential_max`).
    pub fn resolve(&self, choice: PolicyChoice) -> Resolved {
        let total = self.inner.device.info().total_memory;
        choice.resolve(total, self.inner.config.auto_sequential_max)
    }

    /// The policy of a model whose client sets none, resolved on this device.
    pub fn default_policy(&self) -> Resolved {
        self.resolve(self.inner.config.default_policy)
    }

    /// The residency policies of a model, resolved (with the preset or `auto` reason): the
    /// whole model's, then each component's own. Known before the first acquire, which is
    /// when the engine reserves memory for them.
    pub fn policies(&self, model: ModelId) -> Result<ModelPolicies, EngineError> {
        let st = self.lock();
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        let m = ms.runtime.model();
        let components = ms
            .overrides
            .iter()
            .filter_map(|(&c, &choice)| {
                Some((m.components().get(c)?.name.clone(), self.resolve(choice)))
            })
            .collect();
        Ok(ModelPolicies {
            model: self.resolve(ms.model_spec.unwrap_or(self.inner.config.default_policy)),
            components,
            set: ms.model_spec.is_some(),
            active: !ms.scopes.is_empty(),
        })
    }

    /// Makes sure `model` has scopes (the default policy on first use) and finds a layer.
    fn locate(
        &self,
        st: &mut State,
        model: ModelId,
        component: &str,
        layer: usize,
    ) -> Result<(usize, usize), EngineError> {
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        ms.runtime.check()?;
        let ci = component_index(ms, model, component)?;
        if ms.scopes.is_empty() {
            let (spec, overrides) = (ms.model_spec, ms.overrides.clone());
            self.rebuild(st, model, spec, overrides)?;
        }
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        ms.locate.get(ci).and_then(|l| l.get(layer)).copied().flatten().ok_or_else(|| {
            EngineError::UnknownLayer {
                model,
                component: component.to_string(),
                layer: layer.to_string(),
            }
        })
    }

    /// The index of layer `name` of `component`.
    pub fn layer_index(
        &self,
        model: ModelId,
        component: &str,
        name: &str,
    ) -> Result<usize, EngineError> {
        let m = self.model(model)?;
        let c = m.component(component).ok_or_else(|| EngineError::UnknownComponent {
            model,
            component: component.to_string(),
        })?;
        c.layers.iter().position(|l| l.name == name).ok_or_else(|| EngineError::UnknownLayer {
            model,
            component: component.to_string(),
            layer: name.to_string(),
        })
    }

    /// Acquires layer `layer` (its index in the component) of `component`: returns at once with
    /// the tensors' device addresses and a ready signal, after starting the copy if the layer
    /// was not already on its way. Waits (up to the configured timeout) only when every layer
    /// that could make room is leased.
    pub fn acquire(
        &self,
        model: ModelId,
        component: &str,
        layer: usize,
    ) -> Result<Lease, EngineError> {
        self.acquire_as(0, model, component, layer)
    }

    /// [`Engine::acquire`] on behalf of `owner` (a daemon connection): only the same owner can
    /// release the lease, and [`Engine::release_owner`] releases all of an owner's leases.
    pub fn acquire_as(
        &self,
        owner: Owner,
        model: ModelId,
        component: &str,
        layer: usize,
    ) -> Result<Lease, EngineError> {
        if let Some(base) = self.served_by(model, component, layer)? {
            return self.acquire_as(owner, base, component, layer);
        }
        let start = Instant::now();
        let timeout = self.inner.config.acquire_timeout;
        let counters = &self.inner.counters;
        let mut guard = self.lock();
        let mut first = true;
        // Counted in the `waiting` gauge from its first wait to its end, however it ends.
        let mut waiting: Option<Waiting<'_>> = None;
        let mut hit = false;
        let mut warned = false;
        let (si, idx) = loop {
            let st = &mut *guard;
            let (si, idx) = self.locate(st, model, component, layer)?;
            let Some(ms) = st.models.get_mut(&model) else {
                return Err(EngineError::UnknownModel(model));
            };
            let s = &mut ms.scopes[si];
            s.sweep();
            if first {
                hit = s.residency[idx] != Residency::Absent;
            }
            let actions = s.ask(|p, v| p.on_acquire(idx, v));
            self.apply(ms, si, &actions, Some(idx));
            if ms.scopes[si].residency[idx] != Residency::Absent {
                break (si, idx);
            }
            first = false;
            waiting.get_or_insert_with(|| Waiting::new(&counters.waiting));
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(EngineError::Timeout { layer: format!("{component}/{layer}"), waited });
            }
            // Only a release (or an eviction) can make room, and each one wakes us. With no
            // lease in the scope nothing will: that would be a policy bug, so say so and ask
            // again shortly instead of sleeping until the timeout.
            let mut wait = timeout - waited;
            if ms.scopes[si].lease_count() == 0 {
                // Once per acquire: the retries below would otherwise log every 5 ms.
                if !warned {
                    warned = true;
                    tracing::warn!(
                    scope = %ms.scopes[si].name,
                    layer = idx,
                    ?actions,
                        "acquired layer not loaded although nothing is leased; retrying"
                    );
                }
                wait = wait.min(Duration::from_millis(5));
            }
            guard = self
                .inner
                .changed
                .wait_timeout(guard, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        drop(waiting);
        bump(&counters.acquires, 1);
        bump(if hit { &counters.hits } else { &counters.misses }, 1);
        if !first {
            bump(&counters.stall_ns, start.elapsed().as_nanos() as u64);
            crate::trace::complete("stall", "waiting for device memory", start); // timeline
        }
        let st = &mut *guard;
        let id = st.next_id;
        st.next_id += 1;
        let ms = st.models.get_mut(&model).ok_or(EngineError::UnknownModel(model))?;
        let scope = &mut ms.scopes[si];
        let placed = scope.placed[idx].as_ref().ok_or(EngineError::UnknownLease { lease: id })?;
        let (ci, li) = scope.members[idx];
        let m = ms.runtime.model();
        let comp = &m.components()[ci];
        let layer_ref = &comp.layers[li];
        let base = self.inner.arena_base + scope.region + placed.offset;
        let tensors = layer_ref
            .tensors
            .iter()
            .zip(&placed.tensor_offsets)
            .filter_map(|(&t, &toff)| {
                let info = m.tensor(t)?;
                Some(TensorView {
                    name: m.local_name(t).unwrap_or(&info.name).to_string(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    addr: base + toff,
                    arena_offset: base + toff - self.inner.arena_base,
                    len: info.len,
                })
            })
            .collect();
        let lease = Lease {
            id,
            owner,
            model,
            component: comp.name.clone(),
            layer: layer_ref.name.clone(),
            tensors,
            ready: Arc::clone(&placed.ready),
            runtime: Arc::clone(&ms.runtime),
            engine: Arc::downgrade(&self.inner),
            released: false,
        };
        scope.leases[idx] += 1;
        st.leases.insert(id, LeaseRecord { model, scope: si, index: idx, owner });
        Ok(lease)
    }

    /// Releases a lease; `done` says when the client's own use of the memory ends.
    pub fn release(&self, mut lease: Lease, done: ClientDone) -> Result<(), EngineError> {
        if !Weak::ptr_eq(&lease.engine, &Arc::downgrade(&self.inner)) {
            return Err(EngineError::UnknownLease { lease: lease.id });
        }
        lease.released = true;
        self.release_as(lease.owner, lease.model, lease.id, done)
    }

    /// Releases an in-process lease by id (for the C ABI, where leases cross a boundary).
    pub fn release_id(
        &self,
        model: ModelId,
        lease: LeaseId,
        done: ClientDone,
    ) -> Result<(), EngineError> {
        self.release_as(0, model, lease, done)
    }

    /// Releases `owner`'s lease `lease` on `model`. Fails, keeping the lease, if it is not
    /// held, belongs to another model or owner, or if the device refuses to wait for `done`
    /// (then the memory cannot be known to be free: release again once the client has
    /// synchronised, with [`ClientDone::Now`]).
    pub fn release_as(
        &self,
        owner: Owner,
        model: ModelId,
        lease: LeaseId,
        done: ClientDone,
    ) -> Result<(), EngineError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let rec = st.leases.get(&lease).ok_or(EngineError::UnknownLease { lease })?;
        // A view's untouched layers are leased from its base: both ids may release them.
        let via_view = st
            .models
            .get(&model)
            .and_then(|m| m.view_of.as_ref())
            .is_some_and(|v| v.0 == rec.model);
        if rec.model != model && !via_view {
            return Err(EngineError::LeaseOfOtherModel { lease, owner: rec.model, model });
        }
        if rec.owner != owner {
            return Err(EngineError::UnknownLease { lease });
        }
        // Later copies may overwrite this memory: on CUDA the copy stream now waits, on the
        // device, for the client's kernels.
        self.inner.device.wait_client(&done)?;
        if let Some(rec) = st.leases.remove(&lease) {
            self.after_release(st, &rec);
        }
        drop(guard);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// Releases every lease `owner` holds (a client that went away); returns how many.
    pub fn release_owner(&self, owner: Owner) -> usize {
        let mut guard = self.lock();
        let st = &mut *guard;
        let ids: Vec<LeaseId> =
            st.leases.iter().filter(|(_, r)| r.owner == owner).map(|(&id, _)| id).collect();
        for id in &ids {
            if let Some(rec) = st.leases.remove(id) {
                self.after_release(st, &rec);
            }
        }
        drop(guard);
        self.inner.changed.notify_all();
        ids.len()
    }

    fn after_release(&self, st: &mut State, rec: &LeaseRecord) {
        let Some(ms) = st.models.get_mut(&rec.model) else { return };
        let Some(s) = ms.scopes.get_mut(rec.scope) else { return };
        let Some(n) = s.leases.get_mut(rec.index) else { return };
        *n = n.saturating_sub(1);
        if *n > 0 {
            return;
        }
        s.sweep();
        let actions = s.ask(|p, v| p.on_release(rec.index, v));
        self.apply(ms, rec.scope, &actions, None);
    }

    /// Applies a LoRA stack (`(file, strength)`, in order) to a model, replacing any stack it
    /// had; an empty stack removes it. Only layers the old or new stack touches leave the
    /// device (to come back with the new bytes on their next load); the rest stay. Fails,
    /// changing nothing, while a touched layer is leased. Returns what matching found
    /// (unmatched adapters are reported, never dropped silently).
    pub fn set_loras(
        &self,
        model: ModelId,
        stack: &[(std::path::PathBuf, f32)],
        mode: LoraMode,
    ) -> Result<crate::lora::export::ExportReport, EngineError> {
        let m = self.model(model)?;
        // Parsing and matching read files: done before taking the lock.
        let new = self.load_stack(&m, stack, mode)?;
        let report = new.as_ref().map(|l| l.report.clone()).unwrap_or_default();

        let mut guard = self.lock();
        let st = &mut *guard;
        let ms = st.models.get_mut(&model).ok_or(EngineError::UnknownModel(model))?;
        if ms.view_of.is_some() {
            return Err(EngineError::Config(format!(
                "model {model} is a view: its stack is fixed; create another view instead"
            )));
        }
        let mut touched: Vec<(usize, usize)> = ms
            .lora
            .iter()
            .chain(new.iter())
            .flat_map(|l| l.tensors())
            .filter_map(|t| m.tensor(t).map(|i| (i.component, i.layer)))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let places: Vec<(usize, usize)> = touched
            .iter()
            .filter_map(|&(c, l)| ms.locate.get(c).and_then(|v| v.get(l)).and_then(|x| *x))
            .collect();
        let leases: u32 = places.iter().map(|&(s, i)| ms.scopes[s].leases[i]).sum();
        if leases > 0 {
            return Err(EngineError::Busy {
                what: format!("changing the LoRA stack of model {model}"),
                leases,
            });
        }
        for &(s, i) in &places {
            ms.scopes[s].evict(i, &self.inner.counters);
        }
        ms.lora = new;
        drop(guard);
        self.inner.changed.notify_all();
        Ok(report)
    }

    /// For a view's layer its stack does not touch: the base model that serves it.
    fn served_by(
        &self,
        model: ModelId,
        component: &str,
        layer: usize,
    ) -> Result<Option<ModelId>, EngineError> {
        let st = self.lock();
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        if ms.view_of.is_none() {
            return Ok(None);
        }
        Ok(ms.serves(component_index(ms, model, component)?, layer))
    }

    /// Creates a *view*: `base` seen through a LoRA stack, with its own id. Layers the stack
    /// touches are the view's own (loaded with the merged bytes, under the view's policy,
    /// which starts as the base's); every other layer is the base's, shared: acquiring it
    /// through the view leases the base's copy. Several views of one base coexist. Returns the
    /// view's id and what matching found.
    pub fn create_view(
        &self,
        base: ModelId,
        stack: &[(std::path::PathBuf, f32)],
        mode: LoraMode,
    ) -> Result<(ModelId, crate::lora::export::ExportReport), EngineError> {
        let m = self.model(base)?;
        let lora = self
            .load_stack(&m, stack, mode)?
            .ok_or_else(|| EngineError::Config("a view needs at least one LoRA".into()))?;
        let touched: std::collections::HashSet<(usize, usize)> =
            lora.tensors().filter_map(|t| m.tensor(t).map(|i| (i.component, i.layer))).collect();
        let report = lora.report.clone();
        let mut guard = self.lock();
        let st = &mut *guard;
        let b = st.models.get(&base).ok_or(EngineError::UnknownModel(base))?;
        if b.view_of.is_some() {
            return Err(EngineError::Config(format!(
                "model {base} is a view; make views of its base instead"
            )));
        }
        let state = ModelState {
            runtime: Arc::clone(&b.runtime),
            model_spec: b.model_spec,
            overrides: b.overrides.clone(),
            scopes: Vec::new(),
            locate: m.components().iter().map(|c| vec![None; c.layers.len()]).collect(),
            lora: Some(lora),
            view_of: Some((base, touched)),
        };
        let id = st.next_id;
        st.next_id += 1;
        st.models.insert(id, state);
        Ok((id, report))
    }

    /// Parses and matches a stack (reading files: called without the lock).
    fn load_stack(
        &self,
        m: &Arc<Model>,
        stack: &[(std::path::PathBuf, f32)],
        mode: LoraMode,
    ) -> Result<Option<Arc<LoraState>>, EngineError> {
        let mut loras = Vec::with_capacity(stack.len());
        for (path, strength) in stack {
            if !strength.is_finite() {
                return Err(EngineError::Config(format!(
                    "LoRA {}: the strength must be finite, not {strength}",
                    path.display()
                )));
            }
            loras.push((crate::lora::format::load(path)?, *strength));
        }
        if loras.is_empty() {
            return Ok(None);
        }
        let limit = self
            .inner
            .config
            .fuse_cache_bytes
            .unwrap_or_else(|| crate::sysmem::detect().effective / 4);
        Ok(Some(Arc::new(LoraState::new(Arc::clone(m), loras, mode, limit)?)))
    }

    /// Hints that a layer will be acquired soon; the policy may start loading it.
    pub fn prefetch(
        &self,
        model: ModelId,
        component: &str,
        layer: usize,
    ) -> Result<(), EngineError> {
        if let Some(base) = self.served_by(model, component, layer)? {
            return self.prefetch(base, component, layer);
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let (si, idx) = self.locate(st, model, component, layer)?;
        let ms = st.models.get_mut(&model).ok_or(EngineError::UnknownModel(model))?;
        let s = &mut ms.scopes[si];
        s.sweep();
        let actions = s.ask(|p, v| p.on_prefetch(idx, v));
        self.apply(ms, si, &actions, None);
        Ok(())
    }

    /// Manual offload (SD.Next's "model out while the refiner runs"): takes a whole model
    /// (`component` = `None`) off the device and gives back its memory reservation, so another
    /// model can use the budget; or takes one component's layers off the device (their bytes
    /// stay in the page cache; the memory stays reserved for the model's policy). Fails with
    /// `Busy`, changing nothing, while any layer concerned is leased or pinned. The next
    /// acquire (or [`Engine::onload`]) brings the model back under its policy, reserving its
    /// memory again. Returns the device bytes given back (layers, or the whole reservation).
    pub fn offload(&self, model: ModelId, component: Option<&str>) -> Result<u64, EngineError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let ms = st.models.get_mut(&model).ok_or(EngineError::UnknownModel(model))?;
        let counters = &self.inner.counters;
        let freed = match component {
            None => {
                let leases: u32 = ms.scopes.iter().map(Scope::lease_count).sum();
                if leases > 0 {
                    return Err(EngineError::Busy {
                        what: format!("offloading model {model}"),
                        leases,
                    });
                }
                let quota: u64 = ms.scopes.iter().map(|s| s.quota).sum();
                let Some(mut ms) = st.models.remove(&model) else {
                    return Err(EngineError::UnknownModel(model));
                };
                teardown(st, &mut ms, counters);
                st.models.insert(model, ms);
                quota
            }
            Some(name) => {
                let ci = component_index(ms, model, name)?;
                let mine: Vec<(usize, usize)> = ms
                    .locate
                    .get(ci)
                    .map(|l| l.iter().flatten().copied().collect())
                    .unwrap_or_default();
                let leases: u32 = mine
                    .iter()
                    .map(|&(si, i)| ms.scopes[si].leases.get(i).copied().unwrap_or(0))
                    .sum();
                if leases > 0 {
                    return Err(EngineError::Busy {
                        what: format!("offloading component {name:?} of model {model}"),
                        leases,
                    });
                }
                let mut freed = 0u64;
                for (si, i) in mine {
                    let s = &mut ms.scopes[si];
                    let bytes = s.meta.get(i).map_or(0, |m| m.bytes);
                    if s.evict(i, counters) {
                        freed += bytes;
                    }
                }
                freed
            }
        };
        drop(guard);
        self.inner.changed.notify_all();
        Ok(freed)
    }

    /// Undoes [`Engine::offload`] ahead of use: asks the model's policy to bring back every
    /// layer of the model (or of one component), as prefetches; what the policy keeps out
    /// (a streaming window, say) still streams on acquire. A model offloaded whole reserves its
    /// memory again here (failing with `OutOfDeviceMemory` if another model now holds it).
    pub fn onload(&self, model: ModelId, component: Option<&str>) -> Result<(), EngineError> {
        let m = self.model(model)?;
        for c in m.components() {
            if component.is_some_and(|want| want != c.name) {
                continue;
            }
            for layer in 0..c.layers.len() {
                self.prefetch(model, &c.name, layer)?;
            }
        }
        if let Some(want) = component
            && m.component(want).is_none()
        {
            return Err(EngineError::UnknownComponent { model, component: want.to_string() });
        }
        Ok(())
    }

    /// Keeps a layer on the device until [`Engine::unpin`] (a lease the engine holds).
    pub fn pin(&self, model: ModelId, component: &str, layer: usize) -> Result<(), EngineError> {
        let ci = self.component_of(model, component)?;
        let mut lease = self.acquire(model, component, layer)?;
        lease.released = true; // the engine holds it now
        self.lock().pins.entry((model, ci, layer)).or_default().push(lease.id);
        Ok(())
    }

    /// Undoes one [`Engine::pin`] of a layer.
    pub fn unpin(&self, model: ModelId, component: &str, layer: usize) -> Result<(), EngineError> {
        let ci = self.component_of(model, component)?;
        let id = {
            let mut st = self.lock();
            let id = st.pins.get_mut(&(model, ci, layer)).and_then(Vec::pop);
            st.pins.retain(|_, v| !v.is_empty());
            id.ok_or_else(|| EngineError::UnknownLayer {
                model,
                component: component.to_string(),
                layer: format!("{layer} (not pinned)"),
            })?
        };
        self.release_id(model, id, ClientDone::Now)
    }

    fn component_of(&self, model: ModelId, component: &str) -> Result<usize, EngineError> {
        let st = self.lock();
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        component_index(ms, model, component)
    }

    /// Counters and memory figures.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let st = self.lock();
        Stats {
            acquires: c.acquires.load(Ordering::Relaxed),
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            loads: c.loads.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            bytes_streamed: c.bytes_streamed.load(Ordering::Relaxed),
            stall_ns: c.stall_ns.load(Ordering::Relaxed),
            device_bytes: c.device_in_use.load(Ordering::Relaxed),
            peak_device_bytes: c.device_peak.load(Ordering::Relaxed),
            budget: st.alloc.capacity(),
            lora_cache_bytes: st
                .models
                .values()
                .filter_map(|m| m.lora.as_ref())
                .map(|l| l.cached_bytes())
                .sum(),
            waiting_acquires: c.waiting.load(Ordering::Relaxed),
        }
    }

    /// The layers on the device now (loading or loaded), as (component, layer).
    pub fn resident_layers(&self, model: ModelId) -> Result<Vec<(String, String)>, EngineError> {
        let st = self.lock();
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        Ok(names(
            ms,
            ms.scopes.iter().flat_map(|s| {
                s.residency
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| **r != Residency::Absent)
                    .map(|(i, _)| s.members[i])
            }),
        ))
    }

    /// The layers the policies keep resident for good (balanced's resident set, everything under
    /// `none`), as (component, layer).
    pub fn kept_layers(&self, model: ModelId) -> Result<Vec<(String, String)>, EngineError> {
        let st = self.lock();
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        Ok(names(
            ms,
            ms.scopes.iter().flat_map(|s| {
                s.policy.pinned_set().into_iter().filter_map(|i| s.members.get(i).copied())
            }),
        ))
    }

    /// Copies a leased tensor's device bytes back (tests and verification). Waits for the
    /// layer first.
    pub fn read_tensor(&self, lease: &Lease, tensor: &TensorView) -> Result<Vec<u8>, EngineError> {
        lease.wait_ready()?;
        let len = usize::try_from(tensor.len)
            .map_err(|_| EngineError::Config("tensor larger than the address space".into()))?;
        let mut out = vec![0u8; len];
        if len > 0 {
            self.inner.device.read_back(tensor.addr, &mut out)?;
        }
        Ok(out)
    }

    /// Carries out a policy's actions on scope `si`. Loads that cannot get memory (leased
    /// layers in the way) are skipped: for the acquired layer the caller waits for a release;
    /// for a prefetch, nothing is lost. An eviction the contract forbids (a leased layer) stops
    /// the list, since the loads after it counted on the room.
    fn apply(&self, ms: &mut ModelState, si: usize, actions: &[Action], target: Option<LayerIdx>) {
        let counters = &self.inner.counters;
        let runtime = &ms.runtime;
        let lora = &ms.lora;
        let Some(scope) = ms.scopes.get_mut(si) else { return };
        for &action in actions {
            match action {
                Action::Evict(i) => {
                    if scope.leases.get(i).is_some_and(|&n| n > 0) {
                        tracing::error!(scope = %scope.name, layer = i, "policy tried to evict a leased layer; its actions are dropped");
                        return;
                    }
                    scope.evict(i, counters);
                }
                Action::Load(i) => {
                    if scope.placed.get(i).is_none_or(Option::is_some) {
                        continue;
                    }
                    let (ci, li) = scope.members[i];
                    let bytes = scope.meta[i].bytes;
                    let Some(offset) = scope.place(bytes, target == Some(i), counters) else {
                        continue;
                    };
                    let model = runtime.model();
                    let layer = &model.components()[ci].layers[li];
                    let dst = self.inner.arena_base + scope.region + offset;
                    let mut pieces = Vec::with_capacity(layer.tensors.len());
                    let mut tensor_offsets = Vec::with_capacity(layer.tensors.len());
                    let mut cursor = 0u64;
                    for &t in &layer.tensors {
                        let Some(info) = model.tensor(t) else { continue };
                        tensor_offsets.push(cursor);
                        if info.len > 0 {
                            pieces.push(Piece {
                                tensor: t,
                                file: info.file,
                                offset: info.offset,
                                len: info.len,
                                dst: dst + cursor,
                            });
                            advise_willneed(model, info.file, info.offset, info.len);
                        }
                        cursor += align_up(info.len).unwrap_or(info.len);
                    }
                    let ready = ReadySignal::new();
                    if let Some(p) = &self.inner.pipeline {
                        p.submit(Job {
                            runtime: Arc::clone(runtime),
                            pieces,
                            ready: Arc::clone(&ready),
                            lora: lora.clone(),
                        });
                    }
                    scope.placed[i] = Some(Placed {
                        offset,
                        bytes,
                        tensor_offsets,
                        ready,
                        runtime: Arc::clone(runtime),
                    });
                    scope.residency[i] = Residency::Loading;
                    bump(&counters.loads, 1);
                    bump(&counters.bytes_streamed, layer.bytes);
                    crate::trace::layer_instant("load", model, Some((ci, li))); // timeline
                }
            }
        }
    }
}

/// The NUMA placement `config` asks for on the device `info` describes.
fn placement(config: &EngineConfig, info: &DeviceInfo) -> Result<Placement, EngineError> {
    let requested = match config.numa {
        NumaChoice::Off => {
            return Ok(Placement::Unknown { reason: "NUMA placement turned off".into() });
        }
        NumaChoice::Auto => None,
        NumaChoice::Node(n) => Some(n),
    };
    let sys = Path::new("/sys");
    let topology = Topology::detect();
    let placement = Placement::resolve(&topology, sys, info.pci_bus_id.as_deref(), requested)
        .map_err(|e| EngineError::Config(format!("NUMA placement of {}: {e}", info.uuid)))?;
    // sysfs could not say (no PCI path in a container, say): NVML's node, if the topology
    // has it.
    Ok(match (&placement, info.nvml_numa_node) {
        (Placement::Unknown { .. }, Some(n)) => match topology.node(n) {
            Some(node) => Placement::Node(node.clone()),
            None => placement,
        },
        _ => placement,
    })
}

/// (component, layer) names of scope members.
fn names(ms: &ModelState, members: impl Iterator<Item = (usize, usize)>) -> Vec<(String, String)> {
    let m = ms.runtime.model();
    members
        .filter_map(|(c, l)| {
            let comp = m.components().get(c)?;
            Some((comp.name.clone(), comp.layers.get(l)?.name.clone()))
        })
        .collect()
}

/// Bytes a layer takes on the device: its tensors, each aligned.
fn layer_device_bytes(model: &Model, tensors: &[usize]) -> u64 {
    tensors
        .iter()
        .filter_map(|&t| model.tensor(t))
        .map(|t| align_up(t.len).unwrap_or(t.len))
        .fold(0u64, u64::saturating_add)
}

fn component_index(ms: &ModelState, model: ModelId, name: &str) -> Result<usize, EngineError> {
    ms.runtime
        .model()
        .components()
        .iter()
        .position(|c| c.name == name)
        .ok_or_else(|| EngineError::UnknownComponent { model, component: name.to_string() })
}

/// Takes every scope of a model off the device: each region becomes pending, with every copy
/// that may still write into it, until those copies are done.
fn teardown(st: &mut State, ms: &mut ModelState, counters: &Counters) {
    for mut s in ms.scopes.drain(..) {
        let mut ready = Vec::new();
        let mut counted = 0u64;
        for p in s.placed.drain(..).flatten() {
            counted += align_up(p.bytes).unwrap_or(p.bytes);
            ready.push(p.ready);
            bump(&counters.evictions, 1);
        }
        for p in s.pending.drain(..) {
            counted += p.counted;
            ready.extend(p.ready);
        }
        st.pending.push(Pending {
            offset: s.region,
            bytes: s.quota,
            ready,
            counted,
            _runtime: Arc::clone(&ms.runtime),
        });
    }
    for l in &mut ms.locate {
        l.iter_mut().for_each(|x| *x = None);
    }
}

/// Membership of an acquire in the `waiting` gauge, given up on drop.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a AtomicU64) -> Waiting<'a> {
        gauge.fetch_add(1, Ordering::Relaxed);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Carves a region of `bytes` out of the arena, waiting for copies into torn-down regions to
/// finish when that is what stands in the way.
fn claim_region(st: &mut State, bytes: u64, counters: &Counters) -> Result<u64, EngineError> {
    loop {
        reclaim(&mut st.alloc, &mut st.pending, false, counters);
        if let Some(off) = st.alloc.alloc(bytes) {
            return Ok(off);
        }
        if st.pending.is_empty() {
            return Err(EngineError::OutOfDeviceMemory {
                bytes,
                free: st.alloc.capacity() - st.alloc.used(),
                largest: st.alloc.largest_free(),
            });
        }
        reclaim(&mut st.alloc, &mut st.pending, true, counters);
    }
}

/// Asks the kernel to start reading a range of a mapped file ahead of the copy.
fn advise_willneed(model: &Model, file: usize, offset: u64, len: u64) {
    let Some(f) = model.files().get(file) else { return };
    let Some(bytes) = f.range(offset, len) else { return };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let start = bytes.as_ptr() as usize;
    let aligned = start & !(page - 1);
    // SAFETY: madvise(WILLNEED) on a range inside a live read-only mapping (rounded down to
    // its page) only schedules readahead; it never changes the mapping's contents.
    unsafe {
        libc::madvise(
            aligned as *mut libc::c_void,
            bytes.len() + (start - aligned),
            libc::MADV_WILLNEED,
        );
    }
}
