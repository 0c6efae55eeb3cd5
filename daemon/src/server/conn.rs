//! One connection: the handshake, then requests dispatched to the engine until the client
//! leaves. Everything the client held is given back when [`Conn`] is dropped (also on unwind).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use tracing::{debug, info, warn};

use super::{ClientEntry, ModelEntry, Shared};
use crate::device::ClientDone;
use crate::device::{ArenaShare, Backend, DeviceError};
use crate::devices::DeviceRef;
use crate::engine::{Engine, EngineError, Lease, LeaseId, ModelId, id_prefix_of};
use crate::protocol::socket::{FrameReader, discard_input};
use crate::protocol::{
    Ack, Acquire, ApplyLora, ArenaFd, ClientInfo, Clients, CudaArena, CudaHandle, DeviceEntry,
    DeviceSel, DeviceSummary, Devices, ErrorCode, ErrorReply, Kind, Leased, LeasedEvent,
    LoraSource, MAX_BODY_LEN, MAX_FDS, MIN_PROTOCOL_VERSION, Message, ModelInfo, ModelOpened,
    Models, Offloaded, PROTOCOL_VERSION, ProtocolError, Ready, SetResidency, StatsReply,
    TensorDesc, ViewCreated, Welcome, features, negotiate,
};

type Reply = Result<Message, ErrorReply>;

fn engine_err(e: &EngineError) -> ErrorReply {
    ErrorReply::from(e)
}

/// A connection's state; dropping it releases everything the client held.
struct Conn<'a> {
    shared: &'a Shared,
    entry: &'a ClientEntry,
    stream: UnixStream,
    /// Reads requests; buffered, so a request usually costs one `recvmsg`.
    reader: FrameReader,
    /// The agreed version, once the handshake is done.
    version: Option<u16>,
    features: u64,
    /// Models and views this connection opened (views are also in `views`).
    open: BTreeSet<ModelId>,
    views: BTreeSet<ModelId>,
    /// Held leases, with the model id the client acquired them through.
    leases: HashMap<LeaseId, (ModelId, Lease)>,
}

/// Serves one connection to its end.
pub(super) fn serve(shared: &Arc<Shared>, entry: &Arc<ClientEntry>, stream: UnixStream) {
    if let Err(e) = stream.set_read_timeout(Some(shared.config().handshake_timeout)) {
        warn!(conn = entry.id, "setting the handshake timeout failed: {e}");
        shared.clients().remove(&entry.id);
        return;
    }
    let mut conn = Conn {
        shared,
        entry,
        stream,
        reader: {
            let mut r = FrameReader::new();
            // Polls for the next request (adaptively): see `ServerConfig::spin`.
            r.set_spin(shared.config().spin);
            r.set_spin_limit(Arc::clone(&shared.spin_limit));
            r
        },
        version: None,
        features: 0,
        open: BTreeSet::new(),
        views: BTreeSet::new(),
        leases: HashMap::new(),
    };
    let why = conn.run();
    info!(conn = entry.id, reason = %why, "client disconnected");
}

impl Conn<'_> {
    fn id(&self) -> u64 {
        self.entry.id
    }

    fn send(&self, request_id: u64, msg: &Message) -> Result<(), ProtocolError> {
        self.entry.send(self.version.unwrap_or(PROTOCOL_VERSION), request_id, msg, &[])
    }

    /// Sends a fatal error; returns why the connection ends.
    fn fatal(&self, request_id: u64, reply: ErrorReply) -> String {
        warn!(conn = self.id(), code = reply.code, "closing the connection: {}", reply.message);
        let _ = self.send(request_id, &reply.clone().into());
        format!("error {}: {}", reply.code, reply.message)
    }

    fn run(&mut self) -> String {
        loop {
            if self.shared.stopping() {
                self.entry.say_shutting_down(self.version.unwrap_or(PROTOCOL_VERSION));
                return "server shutting down".into();
            }
            let r = match self.reader.read_frame(&self.stream, self.version) {
                Ok(r) => r,
                Err(_) if self.shared.stopping() => {
                    // The shutdown closed the socket under the read (and told the client).
                    self.entry.say_shutting_down(self.version.unwrap_or(PROTOCOL_VERSION));
                    return "server shutting down".into();
                }
                Err(f) => {
                    return match f.reply() {
                        Some(reply) => self.fatal(f.request_id(), reply),
                        None if matches!(f.error, ProtocolError::Closed) => "end of stream".into(),
                        None => f.error.to_string(),
                    };
                }
            };
            if self.shared.stopping() {
                // A request read as the server stops is not served: the client gets the
                // `shutting_down` error instead of its reply.
                self.entry.say_shutting_down(self.version.unwrap_or(PROTOCOL_VERSION));
                return "server shutting down".into();
            }
            let id = r.header.request_id;
            let kind = r.header.kind;
            if !kind.is_request() {
                return self
                    .fatal(id, unexpected(kind, "clients send requests; this is a reply kind"));
            }
            if id == 0 {
                return self.fatal(id, unexpected(kind, "request id 0 is reserved"));
            }
            let reply = match (self.version, r.message) {
                (None, Message::Hello(h)) => {
                    match negotiate(
                        &h,
                        MIN_PROTOCOL_VERSION,
                        PROTOCOL_VERSION,
                        self.shared.features(),
                    ) {
                        Err(e) => return self.fatal(id, e),
                        Ok(n) => {
                            self.version = Some(n.version);
                            self.features = n.features;
                            let _ = self.entry.name.set(h.client_name.clone());
                            if let Err(e) = self.stream.set_read_timeout(None) {
                                return e.to_string();
                            }
                            info!(
                                conn = self.id(),
                                name = %h.client_name,
                                version = n.version,
                                features = n.features,
                                "handshake done"
                            );
                            let engine = self.shared.devices.default_engine();
                            Ok(Message::Welcome(Welcome {
                                version: n.version,
                                features: n.features,
                                client_id: self.id(),
                                server_version: crate::VERSION.to_string(),
                                max_body_len: MAX_BODY_LEN,
                                max_fds: MAX_FDS as u32,
                                device: DeviceSummary::new(
                                    engine.device_info(),
                                    engine.stats().budget,
                                ),
                            }))
                        }
                    }
                }
                (None, _) => {
                    return self.fatal(id, unexpected(kind, "the first request must be hello"));
                }
                (Some(_), Message::Hello(_)) => {
                    return self.fatal(id, unexpected(kind, "the handshake is already done"));
                }
                (Some(_), Message::Goodbye(_)) => {
                    let _ = self.send(id, &Ack {}.into());
                    return "goodbye".into();
                }
                (Some(_), Message::MapArena(_)) => match self.map_arena(id, None) {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                },
                (Some(_), Message::MapArenaOn(m)) => match self.map_arena(id, Some(m.device)) {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                },
                (Some(_), msg) => self.handle(msg, r.fds),
            };
            let (msg, fatal) = match reply {
                Ok(m) => (m, false),
                Err(e) => {
                    debug!(conn = self.id(), code = e.code, kind = kind.name(), "{}", e.message);
                    let fatal = e.error_code().is_some_and(ErrorCode::is_fatal);
                    (Message::Error(e), fatal)
                }
            };
            if let Err(e) = self.send(id, &msg) {
                if self.shared.stopping() {
                    return "server shutting down".into();
                }
                return format!("sending a reply failed: {e}");
            }
            if fatal {
                return "fatal error sent".into();
            }
        }
    }

    fn need(&self, bit: u64, what: &str) -> Result<(), ErrorReply> {
        if self.features & bit == bit {
            Ok(())
        } else {
            Err(ErrorReply::new(
                ErrorCode::Unsupported,
                format!("{what} needs a feature that was not agreed in the handshake ({bit:#x})"),
            ))
        }
    }

    fn check_open(&self, model: ModelId) -> Result<(), ErrorReply> {
        if self.open.contains(&model) {
            Ok(())
        } else {
            Err(ErrorReply::new(
                ErrorCode::UnknownModel,
                format!("model {model} is not open on this connection"),
            ))
        }
    }

    fn update_counts(&self) {
        self.entry.models.store(self.open.len() as u32, Ordering::Relaxed);
        self.entry.leases.store(self.leases.len() as u32, Ordering::Relaxed);
    }

    /// The device a request names (for the requests that name one).
    fn device(&self, sel: DeviceSel) -> Result<(u32, Engine), ErrorReply> {
        self.need(features::DEVICES, "naming a device")?;
        let wanted: DeviceRef = sel.into();
        let (index, engine) =
            self.shared.devices.select(&wanted).map_err(|e| ErrorReply::from(&e))?;
        Ok((index, engine.clone()))
    }

    /// The device of requests that name none.
    fn default_device(&self) -> (u32, Engine) {
        let engine = self.shared.devices.default_engine();
        (u32::from(engine.id_prefix()), engine.clone())
    }

    fn handle(&mut self, msg: Message, fds: Vec<OwnedFd>) -> Reply {
        // Requests about a model, view or lease go to the device whose engine handed out the
        // id (its top 16 bits); the connection's own checks come first.
        let engine_of = |id: u64| self.shared.engine_of(id).cloned();
        match msg {
            Message::OpenModel(m) => {
                let device = self.default_device();
                self.open_model(&m.path, device)
            }
            Message::OpenModelFd(m) => {
                let device = self.default_device();
                self.open_model_fd(&m.name, fds, device)
            }
            Message::OpenModelOn(m) => {
                let device = self.device(m.device)?;
                self.open_model(&m.path, device)
            }
            Message::OpenModelFdOn(m) => {
                let device = self.device(m.device)?;
                self.open_model_fd(&m.name, fds, device)
            }
            Message::ListDevices(_) => {
                self.need(features::DEVICES, "list_devices")?;
                Ok(self.list_devices().into())
            }
            Message::CloseModel(m) => self.close_model(m.model),
            Message::SetResidency(m) => self.set_residency(m),
            // Manual offload acts on the shared model: a whole-model offload takes it off the
            // device for every client that has it open (ferryd manages one device for all of
            // them); a layer any client holds leased makes it `busy`.
            Message::Offload(m) => {
                self.check_open(m.model)?;
                let bytes = engine_of(m.model)?
                    .offload(m.model, m.component.as_deref())
                    .map_err(|e| engine_err(&e))?;
                info!(conn = self.id(), model = m.model, component = ?m.component, bytes, "offloaded");
                Ok(Offloaded { bytes }.into())
            }
            Message::Onload(m) => {
                self.check_open(m.model)?;
                engine_of(m.model)?
                    .onload(m.model, m.component.as_deref())
                    .map_err(|e| engine_err(&e))?;
                Ok(Ack {}.into())
            }
            Message::Acquire(m) => self.acquire(m, false),
            Message::AcquireEvent(m) => self
                .acquire(Acquire { model: m.model, component: m.component, layer: m.layer }, true),
            Message::WaitReady(m) => {
                let (_, lease) = self.leases.get(&m.lease).ok_or_else(|| unknown_lease(m.lease))?;
                lease.wait_ready().map_err(|e| engine_err(&e))?;
                Ok(Ready { lease: m.lease }.into())
            }
            Message::Release(m) => {
                if !self.leases.contains_key(&m.lease) {
                    return Err(unknown_lease(m.lease));
                }
                engine_of(m.lease)?
                    .release_as(self.id(), m.model, m.lease, ClientDone::Now)
                    .map_err(|e| engine_err(&e))?;
                // Released already: dropping the handle only finds it gone.
                self.leases.remove(&m.lease);
                self.update_counts();
                Ok(Ack {}.into())
            }
            Message::Prefetch(m) => {
                self.check_open(m.model)?;
                engine_of(m.model)?
                    .prefetch(m.model, &m.component, m.layer as usize)
                    .map_err(|e| engine_err(&e))?;
                Ok(Ack {}.into())
            }
            Message::ApplyLora(m) => self.apply_lora(m, &fds),
            Message::RemoveLora(m) => self.remove_view(m.view),
            Message::Stats(_) => Ok(StatsReply::from(&self.shared.devices.total_stats()).into()),
            Message::ListModels(_) => Ok(self.list_models().into()),
            Message::ListClients(_) => Ok(self.list_clients().into()),
            other => Err(unexpected(other.kind(), "not a request this server handles here")),
        }
    }

    fn open_model(&mut self, path: &str, (index, engine): (u32, Engine)) -> Reply {
        let canonical = self.shared.resolve_under_roots(path, "model")?;
        self.need(features::OPEN_PATH, "open_model")?;
        let shown = canonical.display().to_string();
        self.hold_model((index, canonical.clone()), shown, &engine, || {
            engine.open_model(&canonical)
        })
    }

    /// Makes this connection a holder of the model registered under `key`, opening it with
    /// `open` (and registering it as `shown`) if no client has it open yet.
    fn hold_model(
        &mut self,
        key: (u32, PathBuf),
        shown: String,
        engine: &Engine,
        open: impl FnOnce() -> Result<ModelId, EngineError>,
    ) -> Reply {
        let id = match self.join_open(&key) {
            Some(id) => id,
            None => {
                // Only opens of this key wait on this lock; the registry is not held while
                // the engine parses and maps the files (which can take seconds).
                let slot =
                    Arc::clone(self.shared.registry().opening.entry(key.clone()).or_default());
                let opened = {
                    let _opening = slot.lock().unwrap_or_else(PoisonError::into_inner);
                    match self.join_open(&key) {
                        Some(id) => Ok(id),
                        None => open().inspect(|&id| {
                            let mut reg = self.shared.registry();
                            reg.by_path.insert(key.clone(), id);
                            reg.models.insert(
                                id,
                                ModelEntry {
                                    path: shown.clone(),
                                    canonical: Some(key.1.clone()),
                                    view_of: None,
                                    holders: HashSet::from([self.id()]),
                                    policy: None,
                                },
                            );
                            info!(conn = self.id(), model = id, device = key.0, path = %shown, "model opened");
                        }),
                    }
                };
                let mut reg = self.shared.registry();
                // The last one out of this key's opens removes its lock (the map's reference
                // and ours are all that is left).
                if Arc::strong_count(&slot) == 2 {
                    reg.opening.remove(&key);
                }
                drop(reg);
                opened.map_err(|e| engine_err(&e))?
            }
        };
        self.open.insert(id);
        self.update_counts();
        let model = engine.model(id).map_err(|e| engine_err(&e))?;
        Ok(ModelOpened::describe(id, &model).into())
    }

    /// If the model registered under `key` is open, makes this connection one of its holders
    /// and returns its id.
    fn join_open(&self, key: &(u32, PathBuf)) -> Option<ModelId> {
        let mut reg = self.shared.registry();
        let id = *reg.by_path.get(key)?;
        reg.models.get_mut(&id)?.holders.insert(self.id());
        Some(id)
    }

    /// A model from the client's descriptor: ferryd reads only what the descriptor gives
    /// access to (model roots do not apply). Clients passing the same file (or folder) share
    /// one model, by the descriptor's identity (device, inode, size, mtime).
    fn open_model_fd(
        &mut self,
        name: &str,
        fds: Vec<OwnedFd>,
        (index, engine): (u32, Engine),
    ) -> Reply {
        self.need(features::FD_PASSING, "open_model_fd")?;
        let mut fds = fds.into_iter();
        let (Some(fd), None) = (fds.next(), fds.next()) else {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "open_model_fd takes exactly one descriptor",
            ));
        };
        let file = std::fs::File::from(fd);
        let meta = file.metadata().map_err(|e| {
            ErrorReply::new(
                ErrorCode::BadRequest,
                format!("the descriptor cannot be examined: {e}"),
            )
        })?;
        if !meta.is_file() && !meta.is_dir() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "open_model_fd: the descriptor is neither a regular file nor a directory",
            ));
        }
        use std::os::unix::fs::MetadataExt as _;
        let key = PathBuf::from(format!(
            "<descriptor dev={} ino={} size={} mtime={}.{:09}>",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec()
        ));
        let label = if name.is_empty() { "(unnamed)" } else { name };
        self.hold_model((index, key), format!("{label} (by descriptor)"), &engine, || {
            engine.open_model_file(file, label)
        })
    }

    fn close_model(&mut self, model: ModelId) -> Reply {
        if self.views.contains(&model) {
            return self.remove_view(model);
        }
        self.check_open(model)?;
        let held = self.leases.values().filter(|(m, l)| *m == model || l.model() == model).count();
        if held > 0 {
            return Err(ErrorReply::new(
                ErrorCode::Busy,
                format!("closing model {model}: this client holds {held} lease(s) on it"),
            ));
        }
        let reg = self.shared.registry();
        let views = self
            .views
            .iter()
            .filter(|v| reg.models.get(v).is_some_and(|e| e.view_of == Some(model)))
            .count();
        drop(reg);
        if views > 0 {
            return Err(ErrorReply::new(
                ErrorCode::Busy,
                format!("closing model {model}: remove this client's {views} view(s) of it first"),
            ));
        }
        self.leave_model(model)?;
        Ok(Ack {}.into())
    }

    /// Stops using `model`; closes it in the engine when no connection uses it.
    fn leave_model(&mut self, model: ModelId) -> Result<(), ErrorReply> {
        let mut reg = self.shared.registry();
        let Some(entry) = reg.models.get_mut(&model) else {
            drop(reg);
            self.open.remove(&model);
            self.update_counts();
            return Ok(());
        };
        entry.holders.remove(&self.id());
        if entry.holders.is_empty() {
            // Unregistered first, closed outside the registry lock (closing unpins files,
            // which takes a while on CUDA, and must not hold up other devices). A client
            // opening the same files meanwhile opens them afresh.
            let Some(entry) = reg.models.remove(&model) else { return Ok(()) };
            let key = entry.canonical.clone().map(|c| (u32::from(id_prefix_of(model)), c));
            if let Some(k) = &key {
                reg.by_path.remove(k);
            }
            drop(reg);
            let closed = match self.shared.engine_of(model) {
                Ok(engine) => engine.close_model(model).map_err(|e| engine_err(&e)),
                Err(e) => Err(e),
            };
            if let Err(e) = closed {
                // Still open: registered again, held by this connection as before.
                let mut reg = self.shared.registry();
                if let Some(k) = key {
                    reg.by_path.entry(k).or_insert(model);
                }
                let mut entry = entry;
                entry.holders.insert(self.id());
                reg.models.insert(model, entry);
                return Err(e);
            }
            info!(conn = self.id(), model, "model closed");
        } else {
            drop(reg);
        }
        self.open.remove(&model);
        self.update_counts();
        Ok(())
    }

    fn remove_view(&mut self, view: ModelId) -> Reply {
        if !self.views.contains(&view) {
            return Err(ErrorReply::new(
                ErrorCode::UnknownView,
                format!("view {view} was not created on this connection"),
            ));
        }
        let held = self.leases.values().filter(|(m, _)| *m == view).count();
        if held > 0 {
            return Err(ErrorReply::new(
                ErrorCode::Busy,
                format!("removing view {view}: this client holds {held} lease(s) through it"),
            ));
        }
        self.shared.engine_of(view)?.close_model(view).map_err(|e| engine_err(&e))?;
        self.shared.registry().models.remove(&view);
        self.views.remove(&view);
        self.open.remove(&view);
        self.update_counts();
        Ok(Ack {}.into())
    }

    fn set_residency(&mut self, m: SetResidency) -> Reply {
        self.check_open(m.model)?;
        let spec = m.policy.to_choice().map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e))?;
        self.shared
            .engine_of(m.model)?
            .set_residency(m.model, m.component.as_deref(), spec)
            .map_err(|e| engine_err(&e))?;
        if m.component.is_none()
            && let Some(e) = self.shared.registry().models.get_mut(&m.model)
        {
            e.policy = Some(m.policy);
        }
        Ok(Ack {}.into())
    }

    /// `acquire`, or with `event` (`acquire_event`) the layer's interprocess ready event too.
    fn acquire(&mut self, m: Acquire, event: bool) -> Reply {
        if event {
            self.need(features::CUDA_EVENTS, "acquire_event")?;
        }
        self.check_open(m.model)?;
        let max = self.shared.config().max_leases_per_client;
        if self.leases.len() >= max {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                format!("this client already holds {max} leases"),
            ));
        }
        let engine = self.shared.engine_of(m.model)?;
        let lease = engine
            .acquire_as(self.id(), m.model, &m.component, m.layer as usize)
            .map_err(|e| engine_err(&e))?;
        // On error the lease is dropped, which releases it.
        let ready_event = match event {
            false => None,
            true => match engine.ready_ipc_event(&lease) {
                Ok(e) => e,
                // A driver that cannot export events: no event, the client waits with
                // `wait_ready` (an empty handle with `ready` unset says so).
                Err(EngineError::Device(DeviceError::Unsupported(_))) => None,
                Err(e) => return Err(engine_err(&e)),
            },
        };
        let ready = ready_event.is_none() && lease.is_ready().map_err(|e| engine_err(&e))?;
        let leased = Leased {
            lease: lease.id(),
            layer: lease.layer().to_string(),
            ready,
            tensors: lease.tensors().iter().map(TensorDesc::from).collect(),
        };
        self.leases.insert(lease.id(), (m.model, lease));
        self.update_counts();
        Ok(match event {
            false => leased.into(),
            // Empty: ready already, or no event could be exported (the client then waits).
            true => {
                let ready_event = ready_event.map(|h| h.to_vec()).unwrap_or_default();
                LeasedEvent { leased, ready_event }.into()
            }
        })
    }

    fn apply_lora(&mut self, m: ApplyLora, fds: &[OwnedFd]) -> Reply {
        self.need(features::LORA, "apply_lora")?;
        self.check_open(m.model)?;
        let max = self.shared.config().max_views_per_client;
        if self.views.len() >= max {
            return Err(ErrorReply::new(
                ErrorCode::LimitExceeded,
                format!("this client already has {max} LoRA views open"),
            ));
        }
        // Every attached descriptor is named by exactly one `Fd` entry (docs/protocol.md).
        let mut named = vec![0u32; fds.len()];
        for r in &m.stack {
            if let LoraSource::Fd(i) = r.source
                && let Some(n) = named.get_mut(i as usize)
            {
                *n += 1;
            }
        }
        if let Some(i) = named.iter().position(|&n| n != 1) {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!(
                    "descriptor {i} attached to apply_lora is named by {} LoRA entries (exactly \
                     one expected)",
                    named[i]
                ),
            ));
        }
        // A LoRA by descriptor is read through the kernel's link to it while `fds` is open
        // (until create_view, which reads the whole file, returns).
        let mut stack: Vec<(PathBuf, f32)> = Vec::with_capacity(m.stack.len());
        for r in &m.stack {
            match &r.source {
                LoraSource::Path(p) => {
                    stack.push((self.shared.resolve_under_roots(p, "LoRA")?, r.scale));
                }
                LoraSource::Fd(i) => {
                    self.need(features::FD_PASSING, "a LoRA by descriptor")?;
                    let fd = fds.get(*i as usize).ok_or_else(|| {
                        ErrorReply::new(
                            ErrorCode::BadRequest,
                            format!(
                                "LoRA descriptor index {i} but {} descriptor(s) came with the frame",
                                fds.len()
                            ),
                        )
                    })?;
                    // The kernel's link to the open file (followed by metadata and open).
                    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                    if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                        return Err(ErrorReply::new(
                            ErrorCode::BadRequest,
                            format!("LoRA descriptor {i} is not a regular file"),
                        ));
                    }
                    stack.push((path, r.scale));
                }
            }
        }
        let (view, report) = self
            .shared
            .engine_of(m.model)?
            .create_view(m.model, &stack, m.mode.into())
            .map_err(|e| engine_err(&e))?;
        {
            let mut reg = self.shared.registry();
            let base = reg.models.get(&m.model).map(|e| e.path.clone()).unwrap_or_default();
            reg.models.insert(
                view,
                ModelEntry {
                    path: format!("{base} (LoRA view of model {})", m.model),
                    canonical: None,
                    view_of: Some(m.model),
                    holders: HashSet::from([self.id()]),
                    policy: None,
                },
            );
        }
        self.views.insert(view);
        self.open.insert(view);
        self.update_counts();
        info!(conn = self.id(), base = m.model, view, loras = stack.len(), "view created");
        Ok(ViewCreated::from_report(view, &report).into())
    }

    /// Sends the arena descriptor of the named device (`None`: the default one).
    fn map_arena(&self, id: u64, device: Option<DeviceSel>) -> Result<(), ErrorReply> {
        let (_, engine) = match device {
            Some(d) => self.device(d)?,
            None => self.default_device(),
        };
        // Features first: a client that did not agree to a way of sharing gets `unsupported`,
        // whatever the device.
        match engine.device_info().backend {
            Backend::Host => self.need(features::HOST_ARENA, "map_arena on the host backend")?,
            Backend::Cuda => self.need(features::CUDA_IPC, "map_arena on a CUDA device")?,
        }
        let arena = engine.arena().ok_or_else(|| {
            ErrorReply::new(ErrorCode::Internal, "the device has no arena (it is closing)")
        })?;
        let uuid = engine.device_info().uuid.clone();
        let share = arena.share().map_err(|e| {
            ErrorReply::new(ErrorCode::Device, format!("sharing the arena of {uuid}: {e}"))
        })?;
        let (msg, fd): (Message, Option<OwnedFd>) = match share {
            ArenaShare::HostFd(fd) => {
                (ArenaFd { len: arena.len, backend: "host".into() }.into(), Some(fd))
            }
            ArenaShare::CudaFd { fd, alloc_len } => (
                CudaArena {
                    len: arena.len,
                    device_uuid: uuid,
                    handle: CudaHandle::PosixFd { alloc_len },
                }
                .into(),
                Some(fd),
            ),
            ArenaShare::CudaIpc { handle } => (
                CudaArena {
                    len: arena.len,
                    device_uuid: uuid,
                    handle: CudaHandle::Ipc { handle: handle.to_vec() },
                }
                .into(),
                None,
            ),
        };
        let version = self.version.unwrap_or(PROTOCOL_VERSION);
        let fds: Vec<_> = fd.iter().map(AsFd::as_fd).collect();
        // The descriptor is ours until sent; dropping it after the send closes this process's
        // copy (the client holds its own).
        self.entry.send(version, id, &msg, &fds).map_err(|e| {
            ErrorReply::new(ErrorCode::Internal, format!("sending the arena handle: {e}"))
        })
    }

    fn list_devices(&self) -> Devices {
        let mut per_device: HashMap<u32, u32> = HashMap::new();
        for &id in self.shared.registry().models.keys() {
            *per_device.entry(u32::from(id_prefix_of(id))).or_default() += 1;
        }
        Devices {
            devices: self
                .shared
                .devices
                .slots()
                .iter()
                .map(|s| DeviceEntry::describe(s, per_device.get(&s.index).copied().unwrap_or(0)))
                .collect(),
        }
    }

    fn list_models(&self) -> Models {
        // A snapshot of the registry; the engines are asked without holding it (an engine's
        // lock may be held across a copy wait, which must not stall the other devices).
        let entries: Vec<(ModelId, String, Option<crate::protocol::Policy>, u32)> = self
            .shared
            .registry()
            .models
            .iter()
            .map(|(&id, e)| {
                let clients = e.holders.iter().filter(|&&h| h != 0).count() as u32;
                (id, e.path.clone(), e.policy, clients)
            })
            .collect();
        let mut models: Vec<ModelInfo> = entries
            .into_iter()
            .filter_map(|(id, path, policy, clients)| {
                let engine = self.shared.devices.for_id(id)?;
                let m = engine.model(id).ok()?;
                let source = serde_json::to_value(m.kind())
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let layers: usize = m.components().iter().map(|c| c.layers.len()).sum();
                let resident = engine.resident_layers(id).map(|v| v.len()).unwrap_or(0);
                Some(ModelInfo {
                    model: id,
                    path,
                    source,
                    total_bytes: m.total_bytes(),
                    layers: u32::try_from(layers).unwrap_or(u32::MAX),
                    resident_layers: u32::try_from(resident).unwrap_or(u32::MAX),
                    policy,
                    clients,
                })
            })
            .collect();
        models.sort_by_key(|m| m.model);
        Models { models }
    }

    fn list_clients(&self) -> Clients {
        let mut clients: Vec<ClientInfo> = self
            .shared
            .clients()
            .values()
            .map(|c| ClientInfo {
                id: c.id,
                pid: c.cred.pid,
                uid: c.cred.uid,
                gid: c.cred.gid,
                name: c.name.get().cloned().unwrap_or_default(),
                models: c.models.load(Ordering::Relaxed),
                leases: c.leases.load(Ordering::Relaxed),
            })
            .collect();
        clients.sort_by_key(|c| c.id);
        Clients { clients }
    }
}

impl Drop for Conn<'_> {
    /// Gives back everything the client held: leases, views, models.
    fn drop(&mut self) {
        let id = self.id();
        let released: usize =
            self.shared.devices.ready().map(|(_, engine)| engine.release_owner(id)).sum();
        // Released already: dropping the handles only finds them gone.
        self.leases.clear();
        for view in std::mem::take(&mut self.views) {
            if let Some(engine) = self.shared.devices.for_id(view)
                && let Err(e) = engine.close_model(view)
            {
                warn!(conn = id, view, "closing a view failed: {e}");
            }
            self.shared.registry().models.remove(&view);
            self.open.remove(&view);
        }
        for model in std::mem::take(&mut self.open) {
            self.open.insert(model);
            if let Err(e) = self.leave_model(model) {
                warn!(conn = id, model, "closing a model failed: {}", e.message);
            }
        }
        self.shared.clients().remove(&id);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        // Requests the client sent that were never read would make the close reset the
        // connection: after the last frame it was sent, the client would read ECONNRESET
        // instead of the end of the stream. Read and drop them.
        discard_input(&self.stream);
        if released > 0 {
            info!(conn = id, released, "released the leases of a departed client");
        }
    }
}

fn unknown_lease(lease: LeaseId) -> ErrorReply {
    ErrorReply::new(ErrorCode::UnknownLease, format!("this client holds no lease {lease}"))
}

fn unexpected(kind: Kind, reason: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UnexpectedMessage,
        format!("unexpected {} frame: {reason}", kind.name()),
    )
}
