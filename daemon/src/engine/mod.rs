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
use self::pipeline::{Job, Piece, Pipeline, ReadySignal};
use self::policy::{Action, Policy, PolicySpec, Residency, ScopeLayer, Threshold, View};
use self::runtime::ModelRuntime;
use crate::device::{Arena, ClientDone, Device, DeviceChoice, DeviceConfig, DeviceInfo, Event};
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
    /// The policy of a model whose client never set one.
    pub default_policy: PolicySpec,
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
            default_policy: PolicySpec::Balanced { threshold: Threshold::default() },
        }
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
}

#[derive(Debug, Default)]
struct Counters {
    acquires: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    loads: AtomicU64,
    evictions: AtomicU64,
    bytes_streamed: AtomicU64,
    stall_ns: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A layer on the device (loading or loaded).
#[derive(Debug)]
struct Placed {
    offset: u64,
    bytes: u64,
    /// Offset of each tensor (in layer order) from `offset`.
    tensor_offsets: Vec<u64>,
    ready: Arc<ReadySignal>,
}

/// The layers one policy governs.
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

    /// Marks loading layers whose copies have completed as resident.
    fn sweep(&mut self) {
        for (r, p) in self.residency.iter_mut().zip(&self.placed) {
            if *r == Residency::Loading
                && let Some(p) = p
                && matches!(p.ready.is_complete(), Ok(true))
            {
                *r = Residency::Resident;
            }
        }
    }
}

#[derive(Debug)]
struct ModelState {
    runtime: Arc<ModelRuntime>,
    /// The policy for components without their own; `None` until set (or first acquire).
    model_spec: Option<PolicySpec>,
    /// Components (by index) with a policy of their own.
    overrides: BTreeMap<usize, PolicySpec>,
    scopes: Vec<Scope>,
    /// [component][layer] → (scope, index in scope).
    locate: Vec<Vec<Option<(usize, usize)>>>,
}

/// Memory of an evicted layer, reusable once its copy has finished.
#[derive(Debug)]
struct Pending {
    offset: u64,
    bytes: u64,
    ready: Arc<ReadySignal>,
}

#[derive(Debug)]
struct LeaseRecord {
    model: ModelId,
    scope: usize,
    index: usize,
}

#[derive(Debug)]
struct State {
    alloc: Allocator,
    /// Sum of the quotas of every scope.
    reserved: u64,
    models: BTreeMap<ModelId, ModelState>,
    leases: HashMap<LeaseId, LeaseRecord>,
    pins: HashMap<(ModelId, usize, usize), Vec<LeaseId>>,
    pending: Vec<Pending>,
    next_id: u64,
}

#[derive(Debug)]
struct Inner {
    config: EngineConfig,
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
            let _ = Engine { inner }.release_id(self.model, self.id, ClientDone::Now);
        }
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
            None => {
                let three_quarters = Threshold::default().bytes(info.total_memory);
                three_quarters.min(info.free_memory)
            }
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
        let arena = device.alloc_arena(budget)?;
        let arena_base = arena.base;
        let pipeline = Pipeline::start(
            Arc::clone(&device),
            config.io_threads,
            config.staging_slots,
            config.staging_slot_bytes,
        )?;
        tracing::info!(
            backend = %info.backend,
            device = %info.name,
            budget,
            staging,
            "engine started"
        );
        let state = State {
            alloc: Allocator::new(budget),
            reserved: 0,
            models: BTreeMap::new(),
            leases: HashMap::new(),
            pins: HashMap::new(),
            pending: Vec::new(),
            next_id: 1,
        };
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
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
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        let runtime = Arc::new(ModelRuntime::new(id, Arc::clone(&model), &self.inner.device));
        let locate =
            model.components().iter().map(|c| vec![None; c.layers.len()]).collect::<Vec<_>>();
        st.models.insert(
            id,
            ModelState {
                runtime,
                model_spec: None,
                overrides: BTreeMap::new(),
                scopes: Vec::new(),
                locate,
            },
        );
        Ok(id)
    }

    /// The model behind an id.
    pub fn model(&self, id: ModelId) -> Result<Arc<Model>, EngineError> {
        let st = self.lock();
        Ok(Arc::clone(st.models.get(&id).ok_or(EngineError::UnknownModel(id))?.runtime.model()))
    }

    /// Closes a model: its layers leave the device and its reservation is returned.
    pub fn close_model(&self, id: ModelId) -> Result<(), EngineError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let ms = st.models.get(&id).ok_or(EngineError::UnknownModel(id))?;
        let leases: u32 = ms.scopes.iter().map(Scope::lease_count).sum();
        if leases > 0 {
            return Err(EngineError::Busy { what: format!("closing model {id}"), leases });
        }
        if let Some(mut ms) = st.models.remove(&id) {
            teardown(st, &mut ms, &self.inner.counters);
        }
        st.pins.retain(|k, _| k.0 != id);
        drop(guard);
        self.inner.changed.notify_all();
        Ok(())
    }

    /// Sets the residency policy of a whole model (`component` = `None`) or of one component.
    /// The scopes of the model are rebuilt: its layers leave the device and the new policies
    /// reserve their quotas and load what they keep resident. Fails, changing nothing, if the
    /// budget cannot serve the new policies or if a layer of the model is leased.
    pub fn set_residency(
        &self,
        model: ModelId,
        component: Option<&str>,
        spec: PolicySpec,
    ) -> Result<(), EngineError> {
        let mut st = self.lock();
        let st = &mut *st;
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        let mut model_spec = ms.model_spec;
        let mut overrides = ms.overrides.clone();
        match component {
            None => model_spec = Some(spec),
            Some(name) => {
                let ci = component_index(ms, model, name)?;
                overrides.insert(ci, spec);
            }
        }
        self.rebuild(st, model, model_spec, overrides)
    }

    /// Replaces the scopes of `model` by those `model_spec` and `overrides` describe.
    fn rebuild(
        &self,
        st: &mut State,
        model: ModelId,
        model_spec: Option<PolicySpec>,
        overrides: BTreeMap<usize, PolicySpec>,
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
        // Plan every new scope before touching anything, against the room this model's old
        // scopes leave when they go.
        let own: u64 = ms.scopes.iter().map(|s| s.quota).sum();
        let mut available = st.alloc.capacity().saturating_sub(st.reserved - own);
        let mut groups: Vec<(Option<usize>, PolicySpec, Vec<usize>)> = Vec::new();
        let rest: Vec<usize> =
            (0..m.components().len()).filter(|c| !overrides.contains_key(c)).collect();
        if !rest.is_empty() {
            groups.push((None, model_spec.unwrap_or(default_spec), rest));
        }
        for (&c, &spec) in &overrides {
            groups.push((Some(c), spec, vec![c]));
        }
        let mut scopes = Vec::with_capacity(groups.len());
        let mut locate: Vec<Vec<Option<(usize, usize)>>> =
            m.components().iter().map(|c| vec![None; c.layers.len()]).collect();
        for (si, (only, spec, comps)) in groups.into_iter().enumerate() {
            let name = match only {
                None => format!("model {model}"),
                Some(c) => format!(
                    "model {model} component {:?}",
                    m.components().get(c).map(|c| c.name.as_str()).unwrap_or("?")
                ),
            };
            let mut members = Vec::new();
            let mut meta = Vec::new();
            for &c in &comps {
                for (li, layer) in m.components()[c].layers.iter().enumerate() {
                    let bytes = layer_device_bytes(&m, &layer.tensors);
                    locate[c][li] = Some((si, members.len()));
                    members.push((c, li));
                    meta.push(ScopeLayer { bytes, group: c });
                }
            }
            let mut policy = spec.build(device_total);
            let quota = policy
                .plan(&meta, available)
                .map_err(|source| EngineError::Policy { scope: name.clone(), source })?;
            available = available.saturating_sub(quota);
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
            });
        }
        // Commit: the old scopes go, the new ones reserve and load what they keep.
        let counters = &self.inner.counters;
        let Some(mut ms) = st.models.remove(&model) else {
            return Err(EngineError::UnknownModel(model));
        };
        teardown(st, &mut ms, counters);
        ms.model_spec = model_spec;
        ms.overrides = overrides;
        ms.locate = locate;
        ms.scopes = scopes;
        st.reserved += ms.scopes.iter().map(|s| s.quota).sum::<u64>();
        let mut result = Ok(());
        for si in 0..ms.scopes.len() {
            let actions = ms.scopes[si].ask(|p, v| p.initial(v));
            if let Err(e) = self.apply(st, &mut ms, si, &actions) {
                result = Err(e);
                break;
            }
        }
        st.models.insert(model, ms);
        // Callers hold the state lock; waiters wake once they release it.
        self.inner.changed.notify_all();
        result
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
            let overrides = ms.overrides.clone();
            let spec = ms.model_spec;
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
        let start = Instant::now();
        let timeout = self.inner.config.acquire_timeout;
        let counters = &self.inner.counters;
        let mut st = self.lock();
        let mut first = true;
        let mut hit = false;
        let (si, idx) = loop {
            let (si, idx) = self.locate(&mut st, model, component, layer)?;
            let stref = &mut *st;
            let Some(mut ms) = stref.models.remove(&model) else {
                return Err(EngineError::UnknownModel(model));
            };
            let outcome = (|| {
                let s = &mut ms.scopes[si];
                s.sweep();
                if first {
                    hit = s.residency[idx] != Residency::Absent;
                }
                let actions = s.ask(|p, v| p.on_acquire(idx, v));
                self.apply(stref, &mut ms, si, &actions)?;
                Ok::<bool, EngineError>(ms.scopes[si].residency[idx] != Residency::Absent)
            })();
            stref.models.insert(model, ms);
            if outcome? {
                break (si, idx);
            }
            first = false;
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(EngineError::Timeout { layer: format!("{component}/{layer}"), waited });
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, timeout - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        bump(&counters.acquires, 1);
        bump(if hit { &counters.hits } else { &counters.misses }, 1);
        if !first {
            bump(&counters.stall_ns, start.elapsed().as_nanos() as u64);
        }
        let id = st.next_id;
        st.next_id += 1;
        st.leases.insert(id, LeaseRecord { model, scope: si, index: idx });
        let ms = st.models.get_mut(&model).ok_or(EngineError::UnknownModel(model))?;
        let scope = &mut ms.scopes[si];
        scope.leases[idx] += 1;
        let (ci, li) = scope.members[idx];
        let placed = scope.placed[idx].as_ref().ok_or(EngineError::UnknownLease { lease: id })?;
        let m = ms.runtime.model();
        let comp = &m.components()[ci];
        let layer_ref = &comp.layers[li];
        let tensors = layer_ref
            .tensors
            .iter()
            .zip(&placed.tensor_offsets)
            .filter_map(|(&t, &toff)| {
                let info = m.tensor(t)?;
                let arena_offset = placed.offset + toff;
                Some(TensorView {
                    name: m.local_name(t).unwrap_or(&info.name).to_string(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    addr: self.inner.arena_base + arena_offset,
                    arena_offset,
                    len: info.len,
                })
            })
            .collect();
        Ok(Lease {
            id,
            model,
            component: comp.name.clone(),
            layer: layer_ref.name.clone(),
            tensors,
            ready: Arc::clone(&placed.ready),
            runtime: Arc::clone(&ms.runtime),
            engine: Arc::downgrade(&self.inner),
            released: false,
        })
    }

    /// Releases a lease; `done` says when the client's own use of the memory ends.
    pub fn release(&self, mut lease: Lease, done: ClientDone) -> Result<(), EngineError> {
        lease.released = true;
        self.release_id(lease.model, lease.id, done)
    }

    /// Releases a lease by id (for the C ABI and the daemon, where leases cross a boundary).
    /// Fails if `lease` is not held, or is held on another model.
    pub fn release_id(
        &self,
        model: ModelId,
        lease: LeaseId,
        done: ClientDone,
    ) -> Result<(), EngineError> {
        let mut st = self.lock();
        let rec = st.leases.get(&lease).ok_or(EngineError::UnknownLease { lease })?;
        if rec.model != model {
            return Err(EngineError::LeaseOfOtherModel { lease, owner: rec.model, model });
        }
        let Some(rec) = st.leases.remove(&lease) else {
            return Err(EngineError::UnknownLease { lease });
        };
        // Later copies may overwrite this memory: on CUDA the copy stream now waits, on the
        // device, for the client's kernels.
        let waited = self.inner.device.wait_client(&done);
        self.after_release(&mut st, &rec)?;
        drop(st);
        self.inner.changed.notify_all();
        waited.map_err(EngineError::from)
    }

    fn after_release(&self, st: &mut State, rec: &LeaseRecord) -> Result<(), EngineError> {
        let Some(mut ms) = st.models.remove(&rec.model) else { return Ok(()) };
        let result = (|| {
            let Some(s) = ms.scopes.get_mut(rec.scope) else { return Ok(()) };
            let Some(n) = s.leases.get_mut(rec.index) else { return Ok(()) };
            *n = n.saturating_sub(1);
            if *n > 0 {
                return Ok(());
            }
            s.sweep();
            let actions = s.ask(|p, v| p.on_release(rec.index, v));
            self.apply(st, &mut ms, rec.scope, &actions)
        })();
        st.models.insert(rec.model, ms);
        result
    }

    /// Hints that a layer will be acquired soon; the policy may start loading it.
    pub fn prefetch(
        &self,
        model: ModelId,
        component: &str,
        layer: usize,
    ) -> Result<(), EngineError> {
        let mut st = self.lock();
        let (si, idx) = self.locate(&mut st, model, component, layer)?;
        let st = &mut *st;
        let Some(mut ms) = st.models.remove(&model) else {
            return Err(EngineError::UnknownModel(model));
        };
        let s = &mut ms.scopes[si];
        s.sweep();
        let actions = s.ask(|p, v| p.on_prefetch(idx, v));
        let result = self.apply(st, &mut ms, si, &actions);
        st.models.insert(model, ms);
        result
    }

    /// Keeps a layer on the device until [`Engine::unpin`] (a lease without a client).
    pub fn pin(&self, model: ModelId, component: &str, layer: usize) -> Result<(), EngineError> {
        let mut lease = self.acquire(model, component, layer)?;
        lease.released = true; // the engine holds it now
        let ci = self.model(model)?.components().iter().position(|c| c.name == component);
        let mut st = self.lock();
        st.pins.entry((model, ci.unwrap_or(usize::MAX), layer)).or_default().push(lease.id);
        Ok(())
    }

    /// Undoes one [`Engine::pin`] of a layer.
    pub fn unpin(&self, model: ModelId, component: &str, layer: usize) -> Result<(), EngineError> {
        let ci = self.model(model)?.components().iter().position(|c| c.name == component);
        let key = (model, ci.unwrap_or(usize::MAX), layer);
        let id = {
            let mut st = self.lock();
            st.pins.get_mut(&key).and_then(Vec::pop).ok_or_else(|| EngineError::UnknownLayer {
                model,
                component: component.to_string(),
                layer: format!("{layer} (not pinned)"),
            })?
        };
        self.release_id(model, id, ClientDone::Now)
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
            device_bytes: st.alloc.used(),
            peak_device_bytes: st.alloc.peak(),
            budget: st.alloc.capacity(),
        }
    }

    /// The layers of a scope that its policy keeps resident for good (tests, stats).
    pub fn resident_layers(&self, model: ModelId) -> Result<Vec<(String, String)>, EngineError> {
        let st = self.lock();
        let ms = st.models.get(&model).ok_or(EngineError::UnknownModel(model))?;
        let m = ms.runtime.model();
        let mut out = Vec::new();
        for s in &ms.scopes {
            for (i, r) in s.residency.iter().enumerate() {
                if *r != Residency::Absent {
                    let (c, l) = s.members[i];
                    out.push((
                        m.components()[c].name.clone(),
                        m.components()[c].layers[l].name.clone(),
                    ));
                }
            }
        }
        Ok(out)
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

    /// Carries out a policy's actions on scope `si` of `ms` (which is out of `st.models`).
    fn apply(
        &self,
        st: &mut State,
        ms: &mut ModelState,
        si: usize,
        actions: &[Action],
    ) -> Result<(), EngineError> {
        let counters = &self.inner.counters;
        for &action in actions {
            let scope = &mut ms.scopes[si];
            match action {
                Action::Evict(i) => {
                    if scope.leases.get(i).is_some_and(|&n| n > 0) {
                        tracing::error!(scope = %scope.name, layer = i, "policy tried to evict a leased layer; ignored");
                        continue;
                    }
                    if let Some(p) = scope.placed.get_mut(i).and_then(Option::take) {
                        st.pending.push(Pending {
                            offset: p.offset,
                            bytes: p.bytes,
                            ready: p.ready,
                        });
                        scope.residency[i] = Residency::Absent;
                        bump(&counters.evictions, 1);
                    }
                }
                Action::Load(i) => {
                    if scope.placed.get(i).is_none_or(Option::is_some) {
                        continue;
                    }
                    let (ci, li) = scope.members[i];
                    let bytes = scope.meta[i].bytes;
                    let offset = allocate(st, bytes)?;
                    let model = ms.runtime.model();
                    let layer = &model.components()[ci].layers[li];
                    let mut pieces = Vec::with_capacity(layer.tensors.len());
                    let mut tensor_offsets = Vec::with_capacity(layer.tensors.len());
                    let mut cursor = 0u64;
                    for &t in &layer.tensors {
                        let Some(info) = model.tensor(t) else { continue };
                        tensor_offsets.push(cursor);
                        if info.len > 0 {
                            pieces.push(Piece {
                                file: info.file,
                                offset: info.offset,
                                len: info.len,
                                dst: self.inner.arena_base + offset + cursor,
                            });
                            advise_willneed(model, info.file, info.offset, info.len);
                        }
                        cursor += align_up(info.len).unwrap_or(info.len);
                    }
                    let ready = ReadySignal::new();
                    if let Some(p) = &self.inner.pipeline {
                        p.submit(Job {
                            runtime: Arc::clone(&ms.runtime),
                            pieces,
                            ready: Arc::clone(&ready),
                        });
                    }
                    scope.placed[i] = Some(Placed { offset, bytes, tensor_offsets, ready });
                    scope.residency[i] = Residency::Loading;
                    bump(&counters.loads, 1);
                    bump(&counters.bytes_streamed, layer.bytes);
                }
            }
        }
        Ok(())
    }
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

/// Removes every layer of a model's scopes from the device and returns their quotas.
fn teardown(st: &mut State, ms: &mut ModelState, counters: &Counters) {
    for s in ms.scopes.drain(..) {
        st.reserved = st.reserved.saturating_sub(s.quota);
        for p in s.placed.into_iter().flatten() {
            st.pending.push(Pending { offset: p.offset, bytes: p.bytes, ready: p.ready });
            bump(&counters.evictions, 1);
        }
    }
    for l in &mut ms.locate {
        l.iter_mut().for_each(|x| *x = None);
    }
}

/// Returns to the allocator the memory of evicted layers whose copies have finished.
fn reclaim(st: &mut State) {
    let mut i = 0;
    while i < st.pending.len() {
        let reusable = match st.pending[i].ready.settled_event() {
            None => false,
            Some(None) => true,
            Some(Some(e)) => e.is_done().unwrap_or(true),
        };
        if reusable {
            let p = st.pending.swap_remove(i);
            st.alloc.free(p.offset, p.bytes);
        } else {
            i += 1;
        }
    }
}

/// Allocates `bytes` in the arena, waiting for the copies into evicted memory to finish if
/// that is what stands in the way.
fn allocate(st: &mut State, bytes: u64) -> Result<u64, EngineError> {
    loop {
        reclaim(st);
        if let Some(off) = st.alloc.alloc(bytes) {
            return Ok(off);
        }
        let Some(p) = st.pending.first() else {
            return Err(EngineError::OutOfDeviceMemory {
                bytes,
                free: st.alloc.capacity() - st.alloc.used(),
                largest: st.alloc.largest_free(),
            });
        };
        // The copy into this evicted memory is still running: wait for it (on the device, not
        // for any client), then try again.
        if let Ok(e) = p.ready.recorded() {
            let _ = e.wait();
        }
        let p = st.pending.swap_remove(0);
        st.alloc.free(p.offset, p.bytes);
    }
}

/// Asks the kernel to start reading a range of a mapped file ahead of the copy.
fn advise_willneed(model: &Model, file: usize, offset: u64, len: u64) {
    let Some(f) = model.files().get(file) else { return };
    let Some(bytes) = f.range(offset, len) else { return };
    // SAFETY: page size is a positive constant of the running system.
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
