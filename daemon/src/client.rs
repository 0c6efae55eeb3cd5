//! A small blocking client of ferryd's socket protocol (docs/protocol.md): one connection,
//! one request at a time, each method sending a request and returning its typed reply.
//!
//! ```no_run
//! let mut c = ferry::client::Client::connect(&ferry::server::default_socket_path(), "me")?;
//! println!("{} bytes streamed", c.stats()?.bytes_streamed);
//! # Ok::<(), ferry::client::ClientError>(())
//! ```
//!
//! The server closes a connection's models, views and leases when the connection ends, so
//! whatever a [`Client`] opens lives only as long as it does.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::protocol::socket::{FrameReader, FrameWriter, Received, SpinLimit};
use crate::protocol::{
    AcquireEvent, ApplyLora, ArenaFd, ClientInfo, CloseModel, CudaArena, CudaHandle, DeviceEntry,
    DeviceSel, ErrorCode, ErrorReply, Goodbye, Hello, Kind, LeasedEvent, ListClients, ListDevices,
    ListModels, LoraMode, LoraRef, MIN_PROTOCOL_VERSION, MapArena, MapArenaOn, Message, ModelInfo,
    ModelOpened, Offload, Offloaded, Onload, OpenModel, OpenModelFd, OpenModelFdOn, OpenModelOn,
    PROTOCOL_VERSION, Policy, ProtocolError, RemoveLora, SetResidency, Stats, StatsReply,
    ViewCreated, Welcome, features,
};

/// The host arena of a `map_arena` answer; a CUDA arena is a protocol error for callers
/// expecting a host mapping.
fn host_arena(h: ArenaHandle) -> Result<(ArenaFd, OwnedFd), ClientError> {
    match h {
        ArenaHandle::Host { len, fd } => Ok((ArenaFd { len, backend: "host".into() }, fd)),
        ArenaHandle::Cuda { arena, .. } => Err(ProtocolError::UnexpectedMessage {
            kind: Kind::CudaArena,
            reason: format!(
                "the device ({}) is a GPU, whose arena is not a host mapping: use \
                 Client::arena_handle and device::cuda_import",
                arena.device_uuid
            ),
        }
        .into()),
    }
}

/// A device's arena as a client process reaches it ([`Client::arena_handle`]).
#[derive(Debug)]
pub enum ArenaHandle {
    /// The host arena's memfd, read-only: `mmap` `len` bytes of it.
    Host { len: u64, fd: OwnedFd },
    /// A CUDA arena: the handle, and the VMM descriptor that came with it (for
    /// [`CudaHandle::PosixFd`]); map it with [`crate::device::cuda_import`].
    Cuda { arena: CudaArena, fd: Option<OwnedFd> },
}

/// How long a reply may take by default before the call fails with [`ClientError::Io`]
/// (`TimedOut`/`WouldBlock`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a [`Client`] polls for a reply before it sleeps, by default
/// ([`Client::set_spin`]).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached, or reading or writing it failed (or timed out).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server sent something this client cannot accept (or closed the connection).
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
    /// The server answered with an error reply.
    #[error("ferryd: {message} ({name}, code {code})", name = code_name(*.code))]
    Server { code: u32, message: String },
}

impl ClientError {
    /// The server's error code, when the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::from_u32(*code),
            _ => None,
        }
    }
}

fn code_name(code: u32) -> &'static str {
    ErrorCode::from_u32(code).map_or("unknown code", ErrorCode::name)
}

impl From<ProtocolError> for ClientError {
    fn from(e: ProtocolError) -> ClientError {
        match e {
            ProtocolError::Io(e) => ClientError::Io(e),
            e => ClientError::Protocol(e),
        }
    }
}

impl From<ErrorReply> for ClientError {
    fn from(e: ErrorReply) -> ClientError {
        ClientError::Server { code: e.code, message: e.message }
    }
}

/// Clients of one process poll on at most half its cores at once.
fn spin_limit() -> &'static Arc<SpinLimit> {
    static LIMIT: OnceLock<Arc<SpinLimit>> = OnceLock::new();
    LIMIT.get_or_init(|| Arc::new(SpinLimit::half_the_cores()))
}

/// A connection to ferryd that has completed the handshake.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    /// Buffered: a reply usually costs one `recvmsg`.
    reader: FrameReader,
    /// Keeps its buffer between requests.
    writer: FrameWriter,
    next_id: u64,
    welcome: Welcome,
}

impl Client {
    /// Connects to the socket at `path`, sends `Hello` (every known feature, versions
    /// [`MIN_PROTOCOL_VERSION`]`..=`[`PROTOCOL_VERSION`], `name` for the server's logs and
    /// `ListClients`) and waits for `Welcome`. Replies may take up to [`DEFAULT_TIMEOUT`].
    pub fn connect(path: &Path, name: &str) -> Result<Client, ClientError> {
        Client::connect_with_timeout(path, name, Some(DEFAULT_TIMEOUT))
    }

    /// [`Client::connect`] with a reply timeout (`None`: wait forever).
    pub fn connect_with_timeout(
        path: &Path,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let hello = Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            features: features::KNOWN,
            client_name: name.to_string(),
        };
        let mut reader = FrameReader::new();
        reader.set_spin(DEFAULT_SPIN);
        reader.set_spin_limit(Arc::clone(spin_limit()));
        let mut writer = FrameWriter::new();
        // The handshake's frames have the same layout in every version.
        writer.send(&stream, PROTOCOL_VERSION, 1, &hello.into(), &[])?;
        let r = reader.read_frame(&stream, None).map_err(|f| f.error)?;
        check_id(1, r.header.request_id, &r.message)?;
        let welcome = match r.message {
            Message::Welcome(w) => w,
            Message::Error(e) => return Err(e.into()),
            other => return Err(unexpected(Kind::Welcome, &other)),
        };
        Ok(Client { stream, reader, writer, next_id: 2, welcome })
    }

    /// Before sleeping until a reply arrives, poll for it for up to `spin` (zero: sleep at
    /// once). Most replies (acquire, release, stats) take the server a few microseconds, less
    /// than putting this thread to sleep and waking it costs (tens of microseconds on a
    /// virtual machine with idle vCPUs); a slow reply costs the spin in CPU time. Polling
    /// backs off after polls that end in sleep anyway
    /// ([`FrameReader::set_spin`](crate::protocol::socket::FrameReader::set_spin)), and the
    /// clients of one process poll on at most half its cores at once (the others sleep at
    /// once). Default: [`DEFAULT_SPIN`].
    pub fn set_spin(&mut self, spin: Duration) {
        self.reader.set_spin(spin);
    }

    /// What the handshake agreed on, and the server's device.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Whether the server granted a feature bit ([`features`]).
    pub fn has_feature(&self, bit: u64) -> bool {
        self.welcome.features & bit == bit
    }

    /// The engine's counters.
    pub fn stats(&mut self) -> Result<StatsReply, ClientError> {
        match self.call(Stats {}.into(), &[])? {
            Message::StatsReply(s) => Ok(s),
            other => Err(unexpected(Kind::StatsReply, &other)),
        }
    }

    /// The models open in the daemon (by any connection, or preloaded).
    pub fn list_models(&mut self) -> Result<Vec<ModelInfo>, ClientError> {
        match self.call(ListModels {}.into(), &[])? {
            Message::Models(m) => Ok(m.models),
            other => Err(unexpected(Kind::Models, &other)),
        }
    }

    /// The connected clients (this one included).
    pub fn list_clients(&mut self) -> Result<Vec<ClientInfo>, ClientError> {
        match self.call(ListClients {}.into(), &[])? {
            Message::Clients(c) => Ok(c.clients),
            other => Err(unexpected(Kind::Clients, &other)),
        }
    }

    /// Opens a model by path; the path must resolve under one of the daemon's model roots and
    /// is resolved by the daemon, so pass an absolute path.
    pub fn open_model(&mut self, path: &Path) -> Result<ModelOpened, ClientError> {
        let path = path.to_str().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not UTF-8", path.display()))
        })?;
        self.model_opened(OpenModel { path: path.to_string() }.into(), &[])
    }

    /// [`Client::open_model`] on a named device (needs [`features::DEVICES`]).
    pub fn open_model_on(
        &mut self,
        path: &Path,
        device: DeviceSel,
    ) -> Result<ModelOpened, ClientError> {
        let path = path.to_str().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not UTF-8", path.display()))
        })?;
        self.model_opened(OpenModelOn { path: path.to_string(), device }.into(), &[])
    }

    /// [`Client::open_model_fd`] on a named device (needs [`features::DEVICES`]).
    pub fn open_model_fd_on(
        &mut self,
        fd: BorrowedFd<'_>,
        name: &str,
        device: DeviceSel,
    ) -> Result<ModelOpened, ClientError> {
        self.model_opened(OpenModelFdOn { name: name.to_string(), device }.into(), &[fd])
    }

    /// The daemon's devices, with their counters (needs [`features::DEVICES`]).
    pub fn list_devices(&mut self) -> Result<Vec<DeviceEntry>, ClientError> {
        match self.call(ListDevices {}.into(), &[])? {
            Message::Devices(d) => Ok(d.devices),
            other => Err(unexpected(Kind::Devices, &other)),
        }
    }

    /// Opens a model from a descriptor (a `.safetensors` file, or a model directory opened
    /// `O_RDONLY | O_DIRECTORY`). Needs [`features::FD_PASSING`].
    pub fn open_model_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        name: &str,
    ) -> Result<ModelOpened, ClientError> {
        self.model_opened(OpenModelFd { name: name.to_string() }.into(), &[fd])
    }

    fn model_opened(
        &mut self,
        msg: Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ModelOpened, ClientError> {
        match self.call(msg, fds)? {
            Message::ModelOpened(m) => Ok(m),
            other => Err(unexpected(Kind::ModelOpened, &other)),
        }
    }

    /// Stops using a model or view.
    pub fn close_model(&mut self, model: u64) -> Result<(), ClientError> {
        self.ack(CloseModel { model }.into(), &[])
    }

    /// Sets the residency policy of a whole model (`component` = `None`) or one component.
    pub fn set_residency(
        &mut self,
        model: u64,
        component: Option<&str>,
        policy: Policy,
    ) -> Result<(), ClientError> {
        let component = component.map(str::to_string);
        self.ack(SetResidency { model, component, policy }.into(), &[])
    }

    /// Takes a whole model (`component` = `None`: its memory reservation is given back too) or
    /// one component off the device; returns the device bytes freed. This acts on the model
    /// every client of the daemon shares. `busy` while any of its layers is leased.
    pub fn offload(&mut self, model: u64, component: Option<&str>) -> Result<u64, ClientError> {
        let component = component.map(str::to_string);
        match self.call(Offload { model, component }.into(), &[])? {
            Message::Offloaded(Offloaded { bytes }) => Ok(bytes),
            other => Err(unexpected(Kind::Offloaded, &other)),
        }
    }

    /// Brings a model (or one component) back ahead of use: prefetches its layers through
    /// its policy and, for a model offloaded whole, reserves its memory again.
    pub fn onload(&mut self, model: u64, component: Option<&str>) -> Result<(), ClientError> {
        let component = component.map(str::to_string);
        self.ack(Onload { model, component }.into(), &[])
    }

    /// Creates a view of `model` through a LoRA stack. `fds` are the descriptors the stack's
    /// [`LoraSource::Fd`](crate::protocol::LoraSource::Fd) entries index.
    pub fn apply_lora(
        &mut self,
        model: u64,
        stack: Vec<LoraRef>,
        mode: LoraMode,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ViewCreated, ClientError> {
        match self.call(ApplyLora { model, stack, mode }.into(), fds)? {
            Message::ViewCreated(v) => Ok(v),
            other => Err(unexpected(Kind::ViewCreated, &other)),
        }
    }

    /// Drops a view.
    pub fn remove_lora(&mut self, view: u64) -> Result<(), ClientError> {
        self.ack(RemoveLora { view }.into(), &[])
    }

    /// The host arena's memfd and its length. Needs [`features::HOST_ARENA`].
    pub fn map_arena(&mut self) -> Result<(ArenaFd, OwnedFd), ClientError> {
        host_arena(self.arena_handle(None)?)
    }

    /// [`Client::map_arena`] for a named device's arena (needs [`features::DEVICES`]).
    pub fn map_arena_on(&mut self, device: DeviceSel) -> Result<(ArenaFd, OwnedFd), ClientError> {
        host_arena(self.arena_handle(Some(device))?)
    }

    /// `acquire` with the layer's interprocess ready event (needs [`features::CUDA_EVENTS`]):
    /// make the reading stream wait on `ready_event` (empty: the layer is on the device) with
    /// [`crate::device::cuda_import::ImportedArena::stream_wait`] instead of `wait_ready`.
    pub fn acquire_event(
        &mut self,
        model: u64,
        component: &str,
        layer: u32,
    ) -> Result<LeasedEvent, ClientError> {
        let msg = AcquireEvent { model, component: component.to_string(), layer };
        match self.call(msg.into(), &[])? {
            Message::LeasedEvent(l) if l.ready_event.is_empty() || l.ready_event.len() == 64 => {
                Ok(l)
            }
            Message::LeasedEvent(l) => Err(ProtocolError::UnexpectedMessage {
                kind: Kind::LeasedEvent,
                reason: format!(
                    "an interprocess event handle has 64 bytes, this one {}",
                    l.ready_event.len()
                ),
            }
            .into()),
            other => Err(unexpected(Kind::LeasedEvent, &other)),
        }
    }

    /// How this process reaches a device's arena (`None`: the default device), whatever the
    /// backend: the host arena's memfd (needs [`features::HOST_ARENA`]) or a CUDA arena's
    /// handle (needs [`features::CUDA_IPC`]), its descriptor checked against its kind.
    pub fn arena_handle(&mut self, device: Option<DeviceSel>) -> Result<ArenaHandle, ClientError> {
        let msg: Message = match device {
            None => MapArena {}.into(),
            Some(device) => MapArenaOn { device }.into(),
        };
        let id = self.send(msg, &[])?;
        let r = self.recv()?;
        check_id(id, r.header.request_id, &r.message)?;
        let flagged = r.header.carries_fds();
        let mut fds = r.fds.into_iter();
        match r.message {
            Message::ArenaFd(a) => match fds.next() {
                Some(fd) => Ok(ArenaHandle::Host { len: a.len, fd }),
                None => {
                    Err(ProtocolError::BadFds { kind: Kind::ArenaFd, flagged, received: 0 }.into())
                }
            },
            Message::CudaArena(a) => {
                let fd = fds.next();
                let received = usize::from(fd.is_some());
                let bad = |reason: String| -> ClientError {
                    ProtocolError::UnexpectedMessage { kind: Kind::CudaArena, reason }.into()
                };
                match (&a.handle, &fd) {
                    (CudaHandle::PosixFd { alloc_len }, Some(_)) if *alloc_len >= a.len => {}
                    (CudaHandle::PosixFd { alloc_len }, Some(_)) => {
                        return Err(bad(format!(
                            "allocation of {alloc_len} bytes is smaller than the arena ({})",
                            a.len
                        )));
                    }
                    (CudaHandle::Ipc { handle }, None) if handle.len() == 64 => {}
                    (CudaHandle::Ipc { handle }, None) => {
                        return Err(bad(format!(
                            "an IPC handle has 64 bytes, this one {}",
                            handle.len()
                        )));
                    }
                    _ => {
                        return Err(ProtocolError::BadFds {
                            kind: Kind::CudaArena,
                            flagged,
                            received,
                        }
                        .into());
                    }
                }
                Ok(ArenaHandle::Cuda { arena: a, fd })
            }
            Message::Error(e) => Err(e.into()),
            other => Err(unexpected(Kind::ArenaFd, &other)),
        }
    }

    /// Says goodbye and closes the connection (dropping a client closes it too).
    pub fn close(mut self) -> Result<(), ClientError> {
        self.ack(Goodbye {}.into(), &[])
    }

    /// Sends one request and returns its reply; an error reply becomes
    /// [`ClientError::Server`].
    pub fn call(&mut self, msg: Message, fds: &[BorrowedFd<'_>]) -> Result<Message, ClientError> {
        let id = self.send(msg, fds)?;
        let r = self.recv()?;
        check_id(id, r.header.request_id, &r.message)?;
        match r.message {
            Message::Error(e) => Err(e.into()),
            m => Ok(m),
        }
    }

    fn send(&mut self, msg: Message, fds: &[BorrowedFd<'_>]) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer.send(&self.stream, self.welcome.version, id, &msg, fds)?;
        Ok(id)
    }

    fn recv(&mut self) -> Result<Received, ClientError> {
        Ok(self.reader.read_frame(&self.stream, Some(self.welcome.version)).map_err(|f| f.error)?)
    }

    fn ack(&mut self, msg: Message, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        match self.call(msg, fds)? {
            Message::Ack(_) => Ok(()),
            other => Err(unexpected(Kind::Ack, &other)),
        }
    }
}

/// A reply must carry its request's id; an error sent before closing may carry id 0.
fn check_id(sent: u64, got: u64, msg: &Message) -> Result<(), ClientError> {
    if got == sent || (got == crate::protocol::NO_REQUEST && matches!(msg, Message::Error(_))) {
        return Ok(());
    }
    Err(ClientError::Protocol(ProtocolError::UnexpectedMessage {
        kind: msg.kind(),
        reason: format!("reply to request {got}, expected {sent}"),
    }))
}

fn unexpected(expected: Kind, got: &Message) -> ClientError {
    ClientError::Protocol(ProtocolError::UnexpectedMessage {
        kind: got.kind(),
        reason: format!("expected {}", expected.name()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_name_their_code() {
        let e = ClientError::from(ErrorReply::new(ErrorCode::BadBody, "nope"));
        assert_eq!(e.code(), Some(ErrorCode::BadBody));
        assert_eq!(e.to_string(), "ferryd: nope (bad_body, code 106)");
        let e = ClientError::from(ProtocolError::Io(io::Error::other("x")));
        assert!(matches!(e, ClientError::Io(_)));
    }

    #[test]
    fn replies_must_match_their_request() {
        let stats = Message::StatsReply(StatsReply {
            acquires: 0,
            hits: 0,
            misses: 0,
            loads: 0,
            evictions: 0,
            bytes_streamed: 0,
            stall_ns: 0,
            device_bytes: 0,
            peak_device_bytes: 0,
            budget: 0,
            lora_cache_bytes: 0,
        });
        assert!(check_id(3, 3, &stats).is_ok());
        assert!(check_id(3, 4, &stats).is_err());
        assert!(check_id(3, 0, &stats).is_err());
        let err = Message::Error(ErrorReply::new(ErrorCode::ShuttingDown, "bye"));
        assert!(check_id(3, 0, &err).is_ok());
    }
}
