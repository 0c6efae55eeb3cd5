//! Daemon mode: an engine handle that is a connection to `ferryd` (`ferry_connect`).
//!
//! The daemon owns the device, the models and the leases; this side keeps one
//! [`ferry::client::Client`] connection and a read-only mapping of the daemon's host arena
//! (its memfd, asked for once at connect), so a leased tensor's address is the mapping's base
//! plus the `arena_offset` the daemon reports. Layer counts and indices are answered from the
//! layouts the daemon sent when each model was opened, without a round trip.
//!
//! The connection serves one request at a time, so calls on one handle are serialised by a
//! mutex. When the connection fails (I/O error, a reply that does not decode, a fatal error
//! code, the daemon closing it) it is dropped for good and every later call fails with
//! `FERRY_ERR_DISCONNECTED`, naming the first failure. The mapping stays valid until the
//! handle is closed (the memfd lives as long as any mapping of it), so tensors of leases held
//! when the daemon went away can still be read: nothing faults.
//!
//! A CUDA daemon shares its arena as a VMM descriptor or a legacy IPC handle (`cuda_arena`):
//! it is imported once into this process's primary context of the GPU with the same UUID
//! ([`ImportedArena`]), and tensor addresses are device pointers into that mapping. The
//! daemon's copies are ordered on its own stream: a stream passed to `ferry_acquire` is made
//! to wait on the layer's interprocess ready event (`acquire_event`; a daemon without them:
//! the host waits with `wait_ready`), and one passed to `ferry_release` is synchronised before
//! the release is sent (the daemon may reuse the memory at once, and never waits on this
//! process's events). A process without a CUDA driver, or
//! without that GPU, gets `FERRY_ERR_NOT_SHAREABLE`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ferry::client::{ArenaHandle, Client, ClientError};
use ferry::device::cuda_import::ImportedArena;
use ferry::device::{ArenaShare, DeviceError};
use ferry::devices::DeviceRef;
use ferry::protocol::{
    Acquire, CudaHandle, DeviceSel, ErrorCode, Kind, Leased, LoraMode, LoraRef, LoraSource,
    Message, ModelOpened, Policy, Prefetch, ProtocolError, Release, StatsReply, WaitReady,
    features,
};
use memmap2::{Mmap, MmapOptions};

use crate::error::{FfiError, Result};
use crate::{VERSION, ferry_status, ptr};

/// A model's layout as the daemon described it: its components in order, each with its layer
/// names in streaming order (the index `ferry_acquire` takes).
type Layout = Arc<Vec<(String, Vec<String>)>>;

/// The daemon's arena, mapped into this process.
#[derive(Debug)]
enum RemoteArena {
    /// The host arena, mapped read-only and shared. Never read through a Rust reference: only
    /// its address range is handed out (the daemon writes into it).
    Host(Mmap),
    /// A CUDA arena imported into this process's primary context of the same GPU: tensor
    /// addresses are device pointers.
    Cuda(ImportedArena),
}

/// The host arena's memfd mapped read-only, after checking it holds `len` bytes.
fn map_host_arena(at: &std::path::Display<'_>, len: u64, fd: std::os::fd::OwnedFd) -> Result<Mmap> {
    let file = File::from(fd);
    let size = file
        .metadata()
        .map_err(|e| FfiError::new(ferry_status::FERRY_ERR_IO, format!("the arena fd: {e}")))?
        .len();
    // Mapping past the end of the memfd would fault on first read: refuse instead.
    let n = usize::try_from(len).ok().filter(|&n| n > 0 && len <= size).ok_or_else(|| {
        FfiError::new(
            ferry_status::FERRY_ERR_DEVICE,
            format!(
                "ferryd at {at} describes an arena of {len} bytes, its descriptor holds {size}"
            ),
        )
    })?;
    // SAFETY: a read-only shared mapping of `n` bytes of the arena's memfd, which holds at
    // least that many (checked above). The daemon keeps writing into it, which is why no Rust
    // reference to its bytes is ever made: only addresses are handed to C. The descriptor is
    // read-only (ferryd reopens its memfd so for clients), as is the mapping.
    unsafe { MmapOptions::new().len(n).map(&file) }.map_err(|e| {
        FfiError::new(ferry_status::FERRY_ERR_IO, format!("mapping ferryd's arena: {e}"))
    })
}

/// The wire's CUDA handle as the importer takes it (`None`: a VMM handle without its
/// descriptor, which `Client::arena_handle` already refuses).
fn arena_share(handle: CudaHandle, fd: Option<std::os::fd::OwnedFd>) -> Option<ArenaShare> {
    match handle {
        CudaHandle::PosixFd { alloc_len } => Some(ArenaShare::CudaFd { fd: fd?, alloc_len }),
        CudaHandle::Ipc { handle } => Some(ArenaShare::CudaIpc { handle: handle.try_into().ok()? }),
    }
}

/// What one exchange with the daemon gives.
type ClientResult<T> = core::result::Result<T, ClientError>;

/// The engine behind a daemon-mode `ferry_engine *`.
#[derive(Debug)]
pub(crate) struct Remote {
    socket: PathBuf,
    /// The daemon device this engine opens models on (`None`: the daemon's default device).
    device: Option<DeviceSel>,
    state: Mutex<State>,
    /// The daemon's arena as this process reaches it.
    arena: RemoteArena,
    /// Set once a stream could not wait on the daemon's interprocess events (this process is
    /// outside ferryd's IPC namespace, say): from then on the host waits instead.
    events_broken: AtomicBool,
}

impl Drop for Remote {
    /// This process's GPU work on the daemon's memory finishes before the connection closes:
    /// closing it releases every lease this engine held, after which ferryd may reuse the
    /// memory at once.
    fn drop(&mut self) {
        if let RemoteArena::Cuda(imported) = &self.arena {
            // Nothing to report it to (the engine is being closed); the release follows anyway.
            let _ = imported.synchronize();
        }
    }
}

#[derive(Debug)]
struct State {
    /// `None` once the connection has failed.
    client: Option<Client>,
    /// Why the connection failed (empty while it has not).
    lost: String,
    /// The layouts of the models and views this connection opened.
    models: HashMap<u64, Layout>,
}

/// The name this side gives ferryd in `Hello` (shown by `ferryctl clients`).
fn client_name() -> String {
    format!("libferry {} (pid {})", VERSION.to_string_lossy(), std::process::id())
}

/// The status of an error reply, and whether the daemon closes the connection after it.
fn server_status(code: u32) -> (ferry_status, bool) {
    use ferry_status as S;
    let Some(code) = ErrorCode::from_u32(code) else { return (S::FERRY_ERR_INTERNAL, false) };
    if code.is_fatal() {
        return (S::FERRY_ERR_DISCONNECTED, true);
    }
    let status = match code {
        ErrorCode::BadRequest | ErrorCode::LeaseOfOtherModel => S::FERRY_ERR_INVALID_ARGUMENT,
        ErrorCode::Unsupported => S::FERRY_ERR_UNSUPPORTED,
        ErrorCode::NotPermitted => S::FERRY_ERR_NOT_PERMITTED,
        // A path that does not exist: what an in-process engine reports for it too.
        ErrorCode::NotFound => S::FERRY_ERR_IO,
        ErrorCode::BadModel | ErrorCode::BadLora => S::FERRY_ERR_INVALID_MODEL,
        ErrorCode::UnknownModel
        | ErrorCode::UnknownComponent
        | ErrorCode::UnknownLayer
        | ErrorCode::UnknownLease
        | ErrorCode::UnknownView => S::FERRY_ERR_NOT_FOUND,
        ErrorCode::Busy => S::FERRY_ERR_BUSY,
        ErrorCode::Timeout => S::FERRY_ERR_TIMEOUT,
        ErrorCode::OutOfDeviceMemory | ErrorCode::BudgetTooSmall => S::FERRY_ERR_BUDGET,
        ErrorCode::FileTruncated => S::FERRY_ERR_TRUNCATED,
        ErrorCode::ModelFailed => S::FERRY_ERR_MODEL_FAILED,
        ErrorCode::Device => S::FERRY_ERR_DEVICE,
        ErrorCode::LimitExceeded => S::FERRY_ERR_LIMIT_EXCEEDED,
        _ => S::FERRY_ERR_INTERNAL,
    };
    (status, false)
}

/// The status of a failed call, and whether the connection is unusable after it.
fn classify(e: &ClientError) -> (ferry_status, bool) {
    match e {
        // Broken pipe, reset, end of file, or no reply in time: a reply that comes later
        // would be taken for the next request's, so a timeout ends the connection too.
        ClientError::Io(_) | ClientError::Protocol(_) => {
            (ferry_status::FERRY_ERR_DISCONNECTED, true)
        }
        ClientError::Server { code, .. } => server_status(*code),
    }
}

/// A reply of the wrong kind: the two sides no longer agree on what is being answered.
fn unexpected(expected: Kind, got: &Message) -> ClientError {
    ClientError::Protocol(ProtocolError::UnexpectedMessage {
        kind: got.kind(),
        reason: format!("expected {}", expected.name()),
    })
}

/// `path` as the daemon wants it: absolute (the daemon resolves it, not relative to this
/// process's directory) and UTF-8 (the protocol's strings are).
fn wire_path(path: &Path, what: &str) -> Result<String> {
    let abs = std::path::absolute(path)
        .map_err(|e| FfiError::invalid(format!("{what} {}: {e}", path.display())))?;
    abs.into_os_string().into_string().map_err(|p| {
        FfiError::invalid(format!(
            "{what} {}: the daemon takes UTF-8 paths only",
            Path::new(&p).display()
        ))
    })
}

/// A layer index as the protocol carries it; an index that does not fit names no layer.
fn wire_layer(layer: usize) -> Result<u32> {
    u32::try_from(layer).map_err(|_| {
        FfiError::new(
            ferry_status::FERRY_ERR_NOT_FOUND,
            format!("layer index {layer} is out of range"),
        )
    })
}

impl Remote {
    /// Connects to ferryd at `socket`, checks its device (`device`, or the daemon's default)
    /// can be shared with this process and maps its arena.
    pub(crate) fn connect(socket: &Path, wanted: Option<DeviceRef>) -> Result<Remote> {
        let at = socket.display();
        let mut client = Client::connect(socket, &client_name()).map_err(|e| {
            let status = match &e {
                // A path the kernel cannot take for a socket (too long, embedded NUL).
                ClientError::Io(io) if io.kind() == std::io::ErrorKind::InvalidInput => {
                    ferry_status::FERRY_ERR_INVALID_ARGUMENT
                }
                ClientError::Server { code, .. }
                    if *code == ErrorCode::UnsupportedVersion as u32 =>
                {
                    ferry_status::FERRY_ERR_UNSUPPORTED
                }
                ClientError::Server { code, .. } if *code == ErrorCode::NotPermitted as u32 => {
                    ferry_status::FERRY_ERR_NOT_PERMITTED
                }
                _ => ferry_status::FERRY_ERR_DISCONNECTED,
            };
            FfiError::new(status, format!("connecting to ferryd at {at}: {e}"))
        })?;
        let device = client.welcome().device.clone();
        let shareable = match device.backend.as_str() {
            "host" => client.has_feature(features::HOST_ARENA),
            "cuda" => client.has_feature(features::CUDA_IPC),
            _ => false,
        };
        if !shareable {
            return Err(FfiError::new(
                ferry_status::FERRY_ERR_NOT_SHAREABLE,
                format!(
                    "ferryd at {at} cannot serve daemon mode: it does not share its {} device's \
                     memory ({}) with clients, so its tensor addresses would mean nothing in \
                     this process; open an in-process engine with ferry_engine_open instead",
                    device.backend, device.name
                ),
            ));
        }
        let wanted: Option<DeviceSel> = wanted.map(Into::into);
        if wanted.is_some() && !client.has_feature(features::DEVICES) {
            return Err(FfiError::new(
                ferry_status::FERRY_ERR_UNSUPPORTED,
                format!("ferryd at {at} does not let clients name a device"),
            ));
        }
        let handle = client.arena_handle(wanted.clone()).map_err(|e| {
            let status = match e.code() {
                Some(ErrorCode::UnknownDevice) => ferry_status::FERRY_ERR_NOT_FOUND,
                Some(ErrorCode::DeviceUnavailable) => ferry_status::FERRY_ERR_DEVICE,
                _ => classify(&e).0,
            };
            FfiError::new(status, format!("asking ferryd at {at} for its arena: {e}"))
        })?;
        let arena = match handle {
            ArenaHandle::Host { len, fd } => RemoteArena::Host(map_host_arena(&at, len, fd)?),
            ArenaHandle::Cuda { arena, fd } => {
                let len = arena.len;
                let uuid = arena.device_uuid.clone();
                let share = arena_share(arena.handle, fd).ok_or_else(|| {
                    FfiError::new(
                        ferry_status::FERRY_ERR_DEVICE,
                        format!("ferryd at {at} sent a CUDA arena handle without its descriptor"),
                    )
                })?;
                // Any failure means this process cannot use the daemon's memory (no driver, no
                // such GPU, another IPC namespace for a legacy handle, an importer refused):
                // the caller's way out is an in-process engine, whatever the cause.
                let imported = ImportedArena::import(&uuid, share, len).map_err(|e| {
                    let why = match e {
                        DeviceError::NoCudaDriver => {
                            "this process has no CUDA driver (libcuda.so could not be loaded)"
                                .to_string()
                        }
                        other => other.to_string(),
                    };
                    FfiError::new(
                        ferry_status::FERRY_ERR_NOT_SHAREABLE,
                        format!(
                            "ferryd at {at} streams to GPU {uuid}, whose memory this process \
                             cannot map: {why}; open an in-process engine with \
                             ferry_engine_open instead"
                        ),
                    )
                })?;
                RemoteArena::Cuda(imported)
            }
        };
        Ok(Remote {
            socket: socket.to_path_buf(),
            device: wanted,
            events_broken: AtomicBool::new(false),
            state: Mutex::new(State {
                client: Some(client),
                lost: String::new(),
                models: HashMap::new(),
            }),
            arena,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disconnected(&self, lost: &str) -> FfiError {
        FfiError::new(
            ferry_status::FERRY_ERR_DISCONNECTED,
            format!(
                "the connection to ferryd at {} is lost ({lost}); close this engine and connect \
                 again",
                self.socket.display()
            ),
        )
    }

    /// Runs one exchange with the daemon (`what` names it in messages). A failure that leaves
    /// the connection unusable drops it, so every later call reports the loss.
    fn with<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Client, &mut HashMap<u64, Layout>) -> ClientResult<T>,
    ) -> Result<T> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(client) = st.client.as_mut() else { return Err(self.disconnected(&st.lost)) };
        match f(client, &mut st.models) {
            Ok(v) => Ok(v),
            Err(e) => {
                let (status, fatal) = classify(&e);
                if fatal {
                    st.client = None;
                    st.lost = format!("{what}: {e}");
                    return Err(self.disconnected(&st.lost));
                }
                Err(FfiError::new(status, format!("{what}: {e}")))
            }
        }
    }

    /// A model's layout, failing as a daemon call would once the connection is lost.
    fn layout(&self, model: u64) -> Result<Layout> {
        let st = self.lock();
        if st.client.is_none() {
            return Err(self.disconnected(&st.lost));
        }
        st.models.get(&model).cloned().ok_or_else(|| {
            FfiError::new(
                ferry_status::FERRY_ERR_NOT_FOUND,
                format!("model {model} is not open on this connection to ferryd"),
            )
        })
    }

    /// The arena mapping's first address and its length.
    pub(crate) fn arena(&self) -> (u64, u64) {
        match &self.arena {
            RemoteArena::Host(m) => (ptr::addr(m.as_ptr()), m.len() as u64),
            RemoteArena::Cuda(c) => (c.base(), c.len()),
        }
    }

    /// Whether tensor addresses are CUDA device pointers (else host pointers).
    pub(crate) fn on_cuda(&self) -> bool {
        matches!(self.arena, RemoteArena::Cuda(_))
    }

    pub(crate) fn open_model(&self, path: &Path) -> Result<u64> {
        let wire = wire_path(path, "model")?;
        self.with("opening a model", |c, models| {
            let opened: ModelOpened = match &self.device {
                None => c.open_model(Path::new(&wire))?,
                Some(d) => c.open_model_on(Path::new(&wire), d.clone())?,
            };
            let layout = opened
                .components
                .into_iter()
                .map(|c| (c.name, c.layers.into_iter().map(|l| l.name).collect()))
                .collect();
            models.insert(opened.model, Arc::new(layout));
            Ok(opened.model)
        })
    }

    pub(crate) fn close_model(&self, model: u64) -> Result<()> {
        self.with("closing a model", |c, models| {
            c.close_model(model)?;
            models.remove(&model);
            Ok(())
        })
    }

    pub(crate) fn set_residency(
        &self,
        model: u64,
        component: Option<&str>,
        policy: Policy,
    ) -> Result<()> {
        self.with("setting a residency policy", |c, _| c.set_residency(model, component, policy))
    }

    pub(crate) fn offload(&self, model: u64, component: Option<&str>) -> Result<u64> {
        self.with("offloading", |c, _| c.offload(model, component))
    }

    pub(crate) fn onload(&self, model: u64, component: Option<&str>) -> Result<()> {
        self.with("onloading", |c, _| c.onload(model, component))
    }

    pub(crate) fn layer_count(&self, model: u64, component: &str) -> Result<usize> {
        let layout = self.layout(model)?;
        let (_, layers) = find_component(&layout, model, component)?;
        Ok(layers.len())
    }

    pub(crate) fn layer_index(&self, model: u64, component: &str, name: &str) -> Result<usize> {
        let layout = self.layout(model)?;
        let (_, layers) = find_component(&layout, model, component)?;
        layers.iter().position(|l| l == name).ok_or_else(|| {
            FfiError::new(
                ferry_status::FERRY_ERR_NOT_FOUND,
                format!("component {component:?} of model {model} has no layer {name:?}"),
            )
        })
    }

    pub(crate) fn prefetch(&self, model: u64, component: &str, layer: usize) -> Result<()> {
        let layer = wire_layer(layer)?;
        let msg = Prefetch { model, component: component.to_string(), layer };
        self.with("prefetching a layer", |c, _| match c.call(msg.into(), &[])? {
            Message::Ack(_) => Ok(()),
            other => Err(unexpected(Kind::Ack, &other)),
        })
    }

    pub(crate) fn acquire(&self, model: u64, component: &str, layer: usize) -> Result<Leased> {
        let layer = wire_layer(layer)?;
        let msg = Acquire { model, component: component.to_string(), layer };
        self.with("acquiring a layer", |c, _| match c.call(msg.into(), &[])? {
            Message::Leased(l) => Ok(l),
            other => Err(unexpected(Kind::Leased, &other)),
        })
    }

    /// Acquires for a caller's CUDA `stream`: with interprocess events (`CUDA_EVENTS`), the
    /// stream is made to wait on the layer's ready event on the device and the lease returned
    /// as ready for it; without them, `None` (the caller waits on the host instead).
    pub(crate) fn acquire_for_stream(
        &self,
        model: u64,
        component: &str,
        layer: usize,
        stream: u64,
    ) -> Result<Option<Leased>> {
        let RemoteArena::Cuda(imported) = &self.arena else { return Ok(None) };
        if self.events_broken.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let layer = wire_layer(layer)?;
        let got = self.with("acquiring a layer", |c, _| {
            if !c.has_feature(features::CUDA_EVENTS) {
                return Ok(None);
            }
            c.acquire_event(model, component, layer).map(Some)
        })?;
        let Some(got) = got else { return Ok(None) };
        let mut leased = got.leased;
        let waited = match <[u8; 64]>::try_from(got.ready_event.as_slice()) {
            // SAFETY: `stream` is the C caller's live CUstream of this device, alive for the
            // call (`ferry_acquire`'s contract).
            Ok(handle) => match unsafe { imported.stream_wait(stream, &handle) } {
                Ok(()) => Ok(()),
                // The event cannot be used here (another IPC namespace, say): wait through the
                // daemon, now and for every later lease of this engine.
                Err(_) => {
                    self.events_broken.store(true, Ordering::Relaxed);
                    self.wait_ready(leased.lease).inspect(|()| leased.ready = true)
                }
            },
            // No event: the layer is on the device already, or the daemon could not export
            // one (then the host waits, as without events).
            Err(_) if leased.ready => Ok(()),
            Err(_) => self.wait_ready(leased.lease).inspect(|()| leased.ready = true),
        };
        if let Err(e) = waited {
            let _ = self.release(model, leased.lease);
            return Err(e);
        }
        Ok(Some(leased))
    }

    pub(crate) fn wait_ready(&self, lease: u64) -> Result<()> {
        self.with("waiting for a layer", |c, _| match c.call(WaitReady { lease }.into(), &[])? {
            Message::Ready(_) => Ok(()),
            other => Err(unexpected(Kind::Ready, &other)),
        })
    }

    pub(crate) fn release(&self, model: u64, lease: u64) -> Result<()> {
        self.with("releasing a lease", |c, _| {
            match c.call(Release { model, lease }.into(), &[])? {
                Message::Ack(_) => Ok(()),
                other => Err(unexpected(Kind::Ack, &other)),
            }
        })
    }

    /// The daemon's counters: of the device this engine is bound to
    /// (`ferry_connect_device`), else summed over the daemon's devices.
    pub(crate) fn stats(&self) -> Result<StatsReply> {
        let device = self.device.clone();
        self.with("reading the daemon's stats", |c, _| match device {
            None => c.stats(),
            Some(sel) => {
                let wanted = DeviceRef::from(sel);
                let devices = c.list_devices()?;
                let entry = devices.into_iter().find(|d| wanted.names(d.index, Some(&d.uuid)));
                entry.and_then(|d| d.stats).ok_or_else(|| ClientError::Server {
                    code: ErrorCode::DeviceUnavailable as u32,
                    message: "the device this engine is bound to no longer serves".into(),
                })
            }
        })
    }

    /// Creates a view of `model` through `stack` (`(path, strength)`), returns its id.
    pub(crate) fn create_view(
        &self,
        model: u64,
        stack: &[(PathBuf, f32)],
        mode: LoraMode,
    ) -> Result<u64> {
        let stack = stack
            .iter()
            .map(|(p, s)| {
                Ok(LoraRef { source: LoraSource::Path(wire_path(p, "LoRA")?), scale: *s })
            })
            .collect::<Result<Vec<_>>>()?;
        self.with("creating a LoRA view", |c, models| {
            let created = c.apply_lora(model, stack, mode, &[])?;
            // A view has its base's layout.
            if let Some(layout) = models.get(&model).cloned() {
                models.insert(created.view, layout);
            }
            Ok(created.view)
        })
    }

    pub(crate) fn remove_view(&self, view: u64) -> Result<()> {
        self.with("removing a LoRA view", |c, models| {
            c.remove_lora(view)?;
            models.remove(&view);
            Ok(())
        })
    }
}

fn find_component<'a>(
    layout: &'a Layout,
    model: u64,
    component: &str,
) -> Result<&'a (String, Vec<String>)> {
    layout.iter().find(|(name, _)| name == component).ok_or_else(|| {
        FfiError::new(
            ferry_status::FERRY_ERR_NOT_FOUND,
            format!("model {model} has no component {component:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_statuses() {
        use ferry_status as S;
        let cases = [
            (ErrorCode::BadRequest, S::FERRY_ERR_INVALID_ARGUMENT, false),
            (ErrorCode::NotPermitted, S::FERRY_ERR_NOT_PERMITTED, false),
            (ErrorCode::NotFound, S::FERRY_ERR_IO, false),
            (ErrorCode::UnknownLease, S::FERRY_ERR_NOT_FOUND, false),
            (ErrorCode::Busy, S::FERRY_ERR_BUSY, false),
            (ErrorCode::Timeout, S::FERRY_ERR_TIMEOUT, false),
            (ErrorCode::BudgetTooSmall, S::FERRY_ERR_BUDGET, false),
            (ErrorCode::LimitExceeded, S::FERRY_ERR_LIMIT_EXCEEDED, false),
            (ErrorCode::Internal, S::FERRY_ERR_INTERNAL, false),
            (ErrorCode::ShuttingDown, S::FERRY_ERR_DISCONNECTED, true),
            (ErrorCode::BadMagic, S::FERRY_ERR_DISCONNECTED, true),
        ];
        for (code, status, fatal) in cases {
            assert_eq!(server_status(code as u32), (status, fatal), "{code:?}");
        }
        assert_eq!(server_status(9999), (S::FERRY_ERR_INTERNAL, false));
        let io = ClientError::Io(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(classify(&io), (S::FERRY_ERR_DISCONNECTED, true));
        let closed = ClientError::Protocol(ProtocolError::Closed);
        assert_eq!(classify(&closed), (S::FERRY_ERR_DISCONNECTED, true));
    }

    #[test]
    fn paths_go_on_the_wire_absolute() {
        let p = wire_path(Path::new("m.safetensors"), "model").expect("utf-8");
        assert!(Path::new(&p).is_absolute() && p.ends_with("/m.safetensors"), "{p}");
        use std::os::unix::ffi::OsStrExt;
        let bad = Path::new(std::ffi::OsStr::from_bytes(b"/m\xff.safetensors"));
        let e = wire_path(bad, "model").expect_err("not UTF-8");
        assert_eq!(e.status, ferry_status::FERRY_ERR_INVALID_ARGUMENT);
        assert!(matches!(wire_layer(7), Ok(7)));
        #[cfg(target_pointer_width = "64")]
        assert_eq!(
            wire_layer(usize::MAX).expect_err("past u32").status,
            ferry_status::FERRY_ERR_NOT_FOUND
        );
    }
}
