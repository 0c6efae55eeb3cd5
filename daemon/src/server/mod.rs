//! ferryd's socket server: the wire protocol (`docs/protocol.md`, [`crate::protocol`]) on a Unix
//! stream socket, dispatched to an [`Engine`].
//!
//! # Shape
//!
//! - [`Server::start`] binds the socket (parent directory created `0750` if missing; a stale
//!   socket file is removed only when nothing answers on it; the socket is `chmod 0660`) and
//!   starts an accept thread. Every accepted connection gets its own thread.
//! - On accept the peer's uid/gid/pid are read with `SO_PEERCRED` and checked against the allow
//!   list ([`ServerConfig::allow_uids`], [`ServerConfig::allow_gids`]; both empty: the daemon's
//!   own uid and root). A refused peer gets an `error` 202 `not_permitted` (request id 0) and is
//!   closed; so is a peer beyond [`ServerConfig::max_clients`] (219 `limit_exceeded`).
//! - A connection's id is its engine [`Owner`](crate::engine::Owner): its leases are acquired
//!   with [`Engine::acquire_as`] and, when it ends (goodbye, end of stream, a protocol error,
//!   shutdown), released with [`Engine::release_owner`]; the views it created are closed and the
//!   models it opened are closed once no connection uses them.
//! - Models are shared: opening the same canonical path from any connection gives the same id
//!   (the server keeps a registry of open models and which connections use them). A connection
//!   may only name models and views it opened itself (else 205 `unknown_model`).
//! - A connection's thread reads requests through a buffering
//!   [`FrameReader`](crate::protocol::socket::FrameReader) (one `recvmsg` per request) and
//!   answers on the same thread (no hand-off). When its client sends requests back to back it
//!   polls briefly for the next one before sleeping ([`ServerConfig::spin`]).
//! - [`Server::shutdown`] (also on drop) stops accepting (new connections are refused; those
//!   already in the listen backlog of a socket the server bound get the error below), sends
//!   every connection an `error` 300 `shutting_down` (request id 0) as its last frame, closes
//!   it, and waits for the connection threads, which release what their clients held. The
//!   error and the close happen under the connection's write lock, so a reply being written at
//!   that moment is finished first and nothing is written after the error; unread requests are
//!   drained before the close so the client reads the error and then the end of the stream,
//!   not a reset.
//!
//! # Known gaps (this version)
//!
//! - Models opened by descriptor are shared between clients by the descriptor's identity
//!   (device, inode, size, mtime), not with the same file opened by path (two engine models,
//!   two device copies).
//! - `map_arena` on the host backend sends a read-only reopening of the arena's memfd: clients
//!   can map and read layers, not write into them. On CUDA it sends the arena's exported VMM
//!   handle (a descriptor) or its legacy IPC handle ([`crate::device::ArenaShare`]). ferry's
//!   importer asks for read-only access and falls back to read-write where the driver refuses
//!   it (a legacy IPC mapping is always read-write), so a CUDA client is trusted not to write
//!   into weights. A CUDA client orders its reads after ferryd's copies with
//!   `acquire_event` (an interprocess event from a ring on the copy stream) or `wait_ready`,
//!   and synchronises its own stream before `release`: ferryd never waits on a client's event
//!   (a client that dies mid-wait must not stall the copy stream).
//! - Requests of one connection are answered in order by its thread: a `wait_ready` holds up the
//!   requests after it on the same connection (docs/protocol.md defines this: replies come in
//!   request order). Opening models is serialised server-wide (the registry lock is held across
//!   the open so two clients opening the same files get one id).
//! - Model roots: the path is canonicalised and checked, then opened by its canonical path; the
//!   files a sharded index or a diffusers folder names are resolved by the store, which is
//!   trusted to keep them inside the model's directory.
//! - The group check sees only the peer's primary gid (`SO_PEERCRED` does not report
//!   supplementary groups).
//! - A client that stops mid-frame after the handshake holds its thread until it closes or the
//!   server shuts down (the handshake itself has a read timeout). A client that stops reading
//!   its replies is dropped once a reply has waited [`REPLY_SEND_TIMEOUT`] for room.

mod conn;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard, TryLockError,
};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::device::Backend;
use crate::devices::DeviceSet;
use crate::engine::{Engine, ModelId};
use crate::protocol::socket::{FrameWriter, SpinLimit, discard_input, send_frame};
use crate::protocol::{
    ErrorCode, ErrorReply, Message, NO_REQUEST, PROTOCOL_VERSION, Policy, features,
};

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The socket's path.
    pub socket: PathBuf,
    /// Directories under which clients may open models and LoRA files by path (each is
    /// canonicalised at start; one that does not exist is an error). None: `open_model` is
    /// refused (clients would have to pass descriptors).
    pub model_roots: Vec<PathBuf>,
    /// Peers whose uid is listed are allowed.
    pub allow_uids: Vec<u32>,
    /// Peers whose (primary) gid is listed are allowed. When both lists are empty the daemon's
    /// own uid and root are allowed.
    pub allow_gids: Vec<u32>,
    /// Connections at once; more are refused with 219 `limit_exceeded`.
    pub max_clients: usize,
    /// Leases one connection may hold at once (219 `limit_exceeded` beyond).
    pub max_leases_per_client: usize,
    /// LoRA views one connection may have open at once (219 `limit_exceeded` beyond): each
    /// holds its adapters in memory and may hold fused layers.
    pub max_views_per_client: usize,
    /// How long a new connection has to send `hello`.
    pub handshake_timeout: Duration,
    /// How long a connection's thread polls for the next request before it sleeps. A client
    /// sending requests back to back is then read without the thread sleeping and being woken
    /// (tens of microseconds on a virtual machine with idle vCPUs); polling backs off for a
    /// client that is slow to send its next request (see
    /// [`FrameReader::set_spin`](crate::protocol::socket::FrameReader::set_spin)), and at most
    /// half the cores poll at once. Zero: never poll (on a machine whose cores are all busy
    /// with other work, sleeping can be the faster choice).
    pub spin: Duration,
    /// CUDA: offer interprocess ready events (`acquire_event`, feature `CUDA_EVENTS`). Off by
    /// default: an event handle opens only in a process that shares ferryd's IPC namespace
    /// (`/dev/shm`), which separate containers do not, and a client that cannot use it falls
    /// back to `wait_ready` anyway. Turn it on where clients run beside ferryd on the host.
    pub cuda_events: bool,
}

impl ServerConfig {
    /// Defaults for a socket at `socket`: no model roots, the default allow list, 256 clients.
    pub fn new(socket: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            socket: socket.into(),
            model_roots: Vec::new(),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            max_clients: 256,
            max_leases_per_client: 4096,
            max_views_per_client: 64,
            handshake_timeout: Duration::from_secs(10),
            spin: DEFAULT_SPIN,
            cuda_events: false,
        }
    }
}

/// [`ServerConfig::spin`] by default.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// The default socket path: `$XDG_RUNTIME_DIR/ferry/ferryd.sock` when that variable is set,
/// else `/run/ferry/ferryd.sock` for root, else `/tmp/ferry-$UID/ferryd.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("ferry").join("ferryd.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/ferry/ferryd.sock")
    } else {
        PathBuf::from(format!("/tmp/ferry-{uid}/ferryd.sock"))
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Config(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// A peer's credentials, from `SO_PEERCRED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Reads `SO_PEERCRED` of a connected Unix socket.
pub fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain data; all-zero bytes are a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a valid socket for the borrow of `stream`; `cred` and `len` are valid,
    // writable, and `len` holds the size of `cred`, which the kernel does not exceed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred { pid: cred.pid as u32, uid: cred.uid, gid: cred.gid })
}

/// One open model or view in the server's registry.
#[derive(Debug)]
pub(crate) struct ModelEntry {
    /// The canonical path (for a view: its base's, with the view noted).
    pub(crate) path: String,
    /// Registry key for path lookups (`None` for views).
    pub(crate) canonical: Option<PathBuf>,
    pub(crate) view_of: Option<ModelId>,
    /// Connections that have it open.
    pub(crate) holders: HashSet<u64>,
    /// The last model-wide policy set through the server.
    pub(crate) policy: Option<Policy>,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) models: HashMap<ModelId, ModelEntry>,
    /// Open models by (device index, canonical path or descriptor identity).
    pub(crate) by_path: HashMap<(u32, PathBuf), ModelId>,
    /// Opens in progress, by the same key: whoever opens a key holds its lock while the engine
    /// parses and maps the files, so a second client opening the same files waits for that
    /// one open (and then shares its id) while the registry itself stays free for everyone
    /// else, on every device.
    pub(crate) opening: HashMap<(u32, PathBuf), Arc<Mutex<()>>>,
}

/// A connected client, as `list_clients` shows it (and what shutdown needs to close it).
#[derive(Debug)]
pub(crate) struct ClientEntry {
    pub(crate) id: u64,
    pub(crate) cred: PeerCred,
    pub(crate) name: OnceLock<String>,
    pub(crate) models: AtomicU32,
    pub(crate) leases: AtomicU32,
    /// A handle on the connection (for writing replies and for shutdown).
    pub(crate) stream: UnixStream,
    /// Everything written to `stream` goes through this lock, a whole frame at a time.
    pub(crate) write: Mutex<Outgoing>,
}

/// The writing side of a connection, under [`ClientEntry::write`].
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    frames: FrameWriter,
    /// Whether the `shutting_down` error was sent (it is sent once).
    told_shutdown: bool,
    /// Shut down for the server's shutdown: nothing more is written.
    closed: bool,
}

impl ClientEntry {
    fn outgoing(&self) -> MutexGuard<'_, Outgoing> {
        self.write.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one frame (whole, under the write lock). Refused once the connection has been
    /// closed for the server's shutdown: the `shutting_down` error is the last frame a client
    /// gets.
    pub(crate) fn send(
        &self,
        version: u16,
        request_id: u64,
        msg: &Message,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), crate::protocol::ProtocolError> {
        let mut out = self.outgoing();
        if out.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the connection was closed for the server's shutdown",
            )
            .into());
        }
        out.frames.send(&self.stream, version, request_id, msg, fds)
    }

    /// Sends the `shutting_down` error (request id 0) unless it was sent already (it is sent
    /// once, by whoever notices the shutdown first: the connection's thread or
    /// [`Server::shutdown`]).
    pub(crate) fn say_shutting_down(&self, version: u16) {
        let mut out = self.outgoing();
        Self::tell_shutdown(&self.stream, &mut out, version);
    }

    fn tell_shutdown(stream: &UnixStream, out: &mut Outgoing, version: u16) {
        if out.told_shutdown || out.closed {
            return;
        }
        out.told_shutdown = true;
        let bye = ErrorReply::new(ErrorCode::ShuttingDown, "the server is shutting down");
        // Only fails when the client is gone already.
        let _ = out.frames.send(stream, version, NO_REQUEST, &bye.into(), &[]);
    }

    /// For the server's shutdown: sends the `shutting_down` error unless it was sent, then
    /// shuts the socket down, all under the write lock. So the error is sent whole before the
    /// socket closes, whichever thread sends it (the connection's own thread may be sending it,
    /// or a reply, at this moment: this waits for that frame), and nothing follows it. The
    /// connection's thread, blocked in a read or not, then reads the end of the stream.
    ///
    /// A client that stopped reading holds this up: a reply blocked on its full socket buffer
    /// holds the lock until that send times out ([`REPLY_SEND_TIMEOUT`]). Sends started from
    /// now on time out after [`SHUTDOWN_SEND_TIMEOUT`], and when the lock is not free by then
    /// the socket is shut down without it (so the connection's thread stops at its next read
    /// or write) and this waits for the blocked send to time out. Such a client gets no
    /// `shutting_down` error: it was not reading.
    pub(crate) fn close_for_shutdown(&self, version: u16) {
        // Applies to sends that start from now on (one already blocked keeps its own).
        let _ = self.stream.set_write_timeout(Some(SHUTDOWN_SEND_TIMEOUT));
        let deadline = Instant::now() + SHUTDOWN_SEND_TIMEOUT;
        let mut out = loop {
            match self.write.try_lock() {
                Ok(out) => break out,
                Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TryLockError::WouldBlock) => {
                    warn!(conn = self.id, "a reply is stuck on a client that stopped reading");
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    break self.outgoing();
                }
            }
        };
        Self::tell_shutdown(&self.stream, &mut out, version);
        out.closed = true;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// How long the server's shutdown waits to send a client the `shutting_down` error.
const SHUTDOWN_SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a reply may wait for room in a client's socket buffer (the client is not reading
/// its replies) before the connection is dropped. Without it a connection thread could block
/// forever in that send, and the server's shutdown with it: nothing else wakes a blocked send.
pub const REPLY_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Tells a connection that was never served (refused, or left in the listen backlog at
/// shutdown) why it is closed, then closes it so that the client reads the error and then
/// the end of the stream.
fn turn_away(stream: UnixStream, code: ErrorCode, message: String) {
    let _ = stream.set_write_timeout(Some(SHUTDOWN_SEND_TIMEOUT));
    let e = ErrorReply::new(code, message);
    let _ = send_frame(&stream, PROTOCOL_VERSION, NO_REQUEST, &e.into(), &[]);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    discard_input(&stream);
}

/// State shared by the accept thread and every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    /// One engine per device; ids route requests to theirs.
    pub(crate) devices: DeviceSet,
    /// Replaced as a whole by [`Server::reload`] (SIGHUP); readers take a short read lock.
    config: RwLock<ServerConfig>,
    /// Canonical model roots (replaced with `config`).
    roots: RwLock<Vec<PathBuf>>,
    /// Feature bits the server offers whatever its roots (`OPEN_PATH` is added while it has
    /// some).
    base_features: u64,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) clients: Mutex<HashMap<u64, Arc<ClientEntry>>>,
    /// Connections polling for their next request at once.
    pub(crate) spin_limit: Arc<SpinLimit>,
    next_conn: AtomicU64,
    stopping: AtomicBool,
}

impl Shared {
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn clients(&self) -> MutexGuard<'_, HashMap<u64, Arc<ClientEntry>>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The configuration in force (a reload swaps it between requests).
    pub(crate) fn config(&self) -> RwLockReadGuard<'_, ServerConfig> {
        self.config.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn roots(&self) -> RwLockReadGuard<'_, Vec<PathBuf>> {
        self.roots.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Feature bits offered to a new connection.
    pub(crate) fn features(&self) -> u64 {
        let mut f = self.base_features;
        if !self.roots().is_empty() {
            f |= features::OPEN_PATH;
        }
        if f & features::CUDA_IPC != 0 && self.config().cuda_events {
            f |= features::CUDA_EVENTS;
        }
        f
    }

    fn allowed(&self, cred: &PeerCred) -> bool {
        let c = self.config();
        if c.allow_uids.is_empty() && c.allow_gids.is_empty() {
            // SAFETY: getuid has no preconditions and cannot fail.
            let me = unsafe { libc::getuid() };
            return cred.uid == me || cred.uid == 0;
        }
        c.allow_uids.contains(&cred.uid) || c.allow_gids.contains(&cred.gid)
    }

    /// The canonical form of `path` if it lies under a model root, else the error reply.
    pub(crate) fn resolve_under_roots(
        &self,
        path: &str,
        what: &str,
    ) -> Result<PathBuf, ErrorReply> {
        let roots = self.roots();
        if roots.is_empty() {
            return Err(ErrorReply::new(
                ErrorCode::Unsupported,
                format!(
                    "this server has no model roots, so it cannot open {what} {path:?} by path: \
                     pass a file descriptor, or configure ferryd with --model-root"
                ),
            ));
        }
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("{what} path {path:?} is not absolute"),
            ));
        }
        let canonical = std::fs::canonicalize(p).map_err(|e| {
            let code = match e.kind() {
                io::ErrorKind::NotFound => ErrorCode::NotFound,
                io::ErrorKind::PermissionDenied => ErrorCode::NotPermitted,
                _ => ErrorCode::BadRequest,
            };
            ErrorReply::new(code, format!("{what} {path:?}: {e}"))
        })?;
        if roots.iter().any(|r| canonical.starts_with(r)) {
            Ok(canonical)
        } else {
            Err(ErrorReply::new(
                ErrorCode::NotPermitted,
                format!(
                    "{what} {path:?} (resolved to {}) is not under any of the server's model roots",
                    canonical.display()
                ),
            ))
        }
    }

    /// The engine that handed out `id` (a model, view or lease id).
    pub(crate) fn engine_of(&self, id: u64) -> Result<&Engine, ErrorReply> {
        self.devices.for_id(id).ok_or_else(|| {
            ErrorReply::new(ErrorCode::UnknownModel, format!("no open model has id {id}"))
        })
    }
}

/// The running server (module docs). Dropping it shuts it down.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    socket: PathBuf,
    /// Whether the server bound the socket file (and so removes it when it stops).
    owns_socket: bool,
    /// Write end of the pipe that wakes the accept thread.
    wake: Option<OwnedFd>,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Server {
    /// Binds the socket and starts accepting connections (module docs).
    /// `devices`: a [`DeviceSet`], or one [`Engine`].
    pub fn start(
        devices: impl Into<DeviceSet>,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        Server::start_on(devices.into(), config, None)
    }

    /// Like [`Server::start`], on a listener bound by someone else (systemd socket activation):
    /// `config.socket` names it for logs, and the server neither binds nor removes it.
    pub fn start_with_listener(
        devices: impl Into<DeviceSet>,
        config: ServerConfig,
        listener: UnixListener,
    ) -> Result<Server, ServerError> {
        Server::start_on(devices.into(), config, Some(listener))
    }

    fn start_on(
        devices: DeviceSet,
        config: ServerConfig,
        inherited: Option<UnixListener>,
    ) -> Result<Server, ServerError> {
        let roots = checked_roots(&config)?;
        let mut offered = features::LORA | features::FD_PASSING | features::DEVICES;
        // Every device of a set has the same backend.
        offered |= match devices.default_engine().device_info().backend {
            Backend::Host => features::HOST_ARENA,
            // CUDA_EVENTS on top where the configuration asks for it (`Shared::features`).
            Backend::Cuda => features::CUDA_IPC,
        };
        let owns_socket = inherited.is_none();
        let listener = match inherited {
            Some(l) => l,
            None => bind(&config.socket)?,
        };
        let (wake_r, wake_w) = pipe().map_err(io_err("creating the wake pipe"))?;
        let socket = config.socket.clone();
        let shared = Arc::new(Shared {
            devices,
            config: RwLock::new(config),
            roots: RwLock::new(roots),
            base_features: offered,
            registry: Mutex::new(Registry::default()),
            clients: Mutex::new(HashMap::new()),
            spin_limit: Arc::new(SpinLimit::half_the_cores()),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let s2 = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("ferryd-accept".into())
            .spawn(move || accept_loop(&s2, &listener, &wake_r, owns_socket))
            .map_err(io_err("starting the accept thread"))?;
        info!(socket = %socket.display(), roots = ?*shared.roots(), "listening");
        Ok(Server { shared, socket, owns_socket, wake: Some(wake_w), accept: Some(accept) })
    }

    /// Applies a new configuration to the running server (SIGHUP): model roots, the allow
    /// lists and the limits take effect for the next request or connection; connections keep
    /// what they already opened. The socket cannot change without a restart. Returns the
    /// names of the settings that changed; on an error (a root that is not a directory, a
    /// zero client limit, a different socket) nothing changes.
    pub fn reload(&self, config: ServerConfig) -> Result<Vec<&'static str>, ServerError> {
        let roots = checked_roots(&config)?;
        let mut current = self.shared.config.write().unwrap_or_else(PoisonError::into_inner);
        if config.socket != current.socket {
            return Err(ServerError::Config(format!(
                "the socket cannot change without a restart ({} -> {})",
                current.socket.display(),
                config.socket.display()
            )));
        }
        let mut changed = Vec::new();
        let c = &*current;
        for (name, differs) in [
            ("model_roots", config.model_roots != c.model_roots),
            ("allow_uids", config.allow_uids != c.allow_uids),
            ("allow_gids", config.allow_gids != c.allow_gids),
            ("max_clients", config.max_clients != c.max_clients),
            ("max_leases_per_client", config.max_leases_per_client != c.max_leases_per_client),
            ("max_views_per_client", config.max_views_per_client != c.max_views_per_client),
            ("handshake_timeout", config.handshake_timeout != c.handshake_timeout),
            ("spin", config.spin != c.spin),
            ("cuda_events", config.cuda_events != c.cuda_events),
        ] {
            if differs {
                changed.push(name);
            }
        }
        *self.shared.roots.write().unwrap_or_else(PoisonError::into_inner) = roots;
        *current = config;
        Ok(changed)
    }

    /// The socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Connections open now.
    pub fn client_count(&self) -> usize {
        self.shared.clients().len()
    }

    /// Registers models opened before the server started (ferryd's `--preload`): clients that
    /// open the same path get this id, and the server never closes it.
    pub fn adopt_model(&self, id: ModelId) -> Result<(), ServerError> {
        let engine = self
            .shared
            .devices
            .for_id(id)
            .ok_or_else(|| ServerError::Config(format!("no device serves model {id}")))?;
        let model = engine.model(id).map_err(|e| ServerError::Config(e.to_string()))?;
        let canonical = model.root().to_path_buf();
        let mut reg = self.shared.registry();
        reg.by_path.insert((u32::from(crate::engine::id_prefix_of(id)), canonical.clone()), id);
        reg.models.insert(
            id,
            ModelEntry {
                path: canonical.display().to_string(),
                canonical: Some(canonical),
                view_of: None,
                // Held by owner 0 (the daemon itself): never the last holder to leave.
                holders: HashSet::from([0]),
                policy: None,
            },
        );
        Ok(())
    }

    /// Stops accepting, closes every connection (releasing what its client held) and waits for
    /// the connection threads. Also done on drop.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(w) = self.wake.take() {
            // SAFETY: `w` is the pipe's open write end; one byte from a valid buffer.
            unsafe {
                libc::write(w.as_raw_fd(), [1u8].as_ptr().cast(), 1);
            }
        }
        let conns = accept.join().unwrap_or_default();
        let clients: Vec<Arc<ClientEntry>> = self.shared.clients().values().cloned().collect();
        info!(clients = clients.len(), "shutting down: closing connections");
        for c in &clients {
            c.close_for_shutdown(PROTOCOL_VERSION);
        }
        for h in conns {
            let _ = h.join();
        }
        if self.owns_socket && std::fs::remove_file(&self.socket).is_ok() {
            info!(socket = %self.socket.display(), "socket removed");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates the parent directory if needed, removes a stale socket, binds, `chmod 0660`.
fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
            .map_err(io_err(format!("chmod 0750 {}", dir.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ServerError::Config(format!(
                    "{}: another server is listening on this socket",
                    path.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                warn!(socket = %path.display(), "removing a stale socket");
                std::fs::remove_file(path)
                    .map_err(io_err(format!("removing stale socket {}", path.display())))?;
            }
            Err(e) => return Err(io_err(format!("probing {}", path.display()))(e)),
        },
        Ok(_) => {
            return Err(ServerError::Config(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("{}", path.display()))(e)),
    }
    let listener =
        UnixListener::bind(path).map_err(io_err(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err(format!("chmod 0660 {}", path.display())))?;
    Ok(listener)
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are new descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits for the listener or the wake pipe; true when the listener is readable.
fn wait_readable(listener: &UnixListener, wake: &OwnedFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(fds[1].revents == 0 && fds[0].revents != 0)
}

fn accept_loop(
    shared: &Arc<Shared>,
    listener: &UnixListener,
    wake: &OwnedFd,
    owns_socket: bool,
) -> Vec<JoinHandle<()>> {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    loop {
        match wait_readable(listener, wake) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                warn!("poll on the listening socket failed: {e}");
                break;
            }
        }
        if shared.stopping() {
            break;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("accept failed: {e}");
                // Out of descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        threads.retain(|h| !h.is_finished());
        if let Some(h) = admit(shared, stream) {
            threads.push(h);
        }
    }
    if owns_socket && shared.stopping() {
        turn_away_backlog(listener);
    }
    threads
}

/// At shutdown, on a socket the server bound itself: refuses new connections, then tells
/// every connection still waiting in the listen backlog (its `connect` has succeeded, so its
/// client thinks it is connected) that the server is shutting down, instead of letting the
/// kernel reset them when the listener closes. An inherited (socket-activated) listener is
/// left alone: systemd keeps it, and what waits in its backlog is for the next instance.
fn turn_away_backlog(listener: &UnixListener) {
    // SAFETY: the descriptor is the listener's, open for the borrow; shutdown only changes
    // the socket's state. On Linux a listening Unix socket shut down for reading refuses
    // `connect` (ECONNREFUSED) but still hands out the connections already queued.
    if unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD) } != 0 {
        warn!("refusing new connections failed: {}", io::Error::last_os_error());
    }
    if let Err(e) = listener.set_nonblocking(true) {
        warn!("draining the listen backlog failed: {e}");
        return;
    }
    let mut turned = 0usize;
    while let Ok((stream, _)) = listener.accept() {
        // A descriptor accepted from a non-blocking listener is blocking again on Linux;
        // `turn_away` bounds its one send anyway.
        turn_away(stream, ErrorCode::ShuttingDown, "the server is shutting down".into());
        turned += 1;
    }
    if turned > 0 {
        info!(connections = turned, "shutting down: turned away connections not yet accepted");
    }
}

/// Checks a new connection and starts its thread.
fn admit(shared: &Arc<Shared>, stream: UnixStream) -> Option<JoinHandle<()>> {
    let cred = match peer_cred(&stream) {
        Ok(c) => c,
        Err(e) => {
            warn!("SO_PEERCRED failed: {e}; closing the connection");
            return None;
        }
    };
    if !shared.allowed(&cred) {
        warn!(uid = cred.uid, gid = cred.gid, pid = cred.pid, "peer not allowed; refused");
        turn_away(
            stream,
            ErrorCode::NotPermitted,
            format!("uid {} / gid {} is not allowed to use this server", cred.uid, cred.gid),
        );
        return None;
    }
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            warn!("duplicating a connection failed: {e}");
            return None;
        }
    };
    if let Err(e) = writer.set_write_timeout(Some(REPLY_SEND_TIMEOUT)) {
        warn!("setting a connection's send timeout failed: {e}");
        return None;
    }
    let entry = Arc::new(ClientEntry {
        id,
        cred,
        name: OnceLock::new(),
        models: AtomicU32::new(0),
        leases: AtomicU32::new(0),
        stream: writer,
        write: Mutex::new(Outgoing::default()),
    });
    {
        let mut clients = shared.clients();
        if clients.len() >= shared.config().max_clients {
            drop(clients);
            warn!(uid = cred.uid, pid = cred.pid, "too many clients; refused");
            turn_away(
                stream,
                ErrorCode::LimitExceeded,
                format!("the server already has {} clients", shared.config().max_clients),
            );
            return None;
        }
        clients.insert(id, Arc::clone(&entry));
    }
    info!(conn = id, uid = cred.uid, gid = cred.gid, pid = cred.pid, "client connected");
    let s2 = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("ferryd-conn-{id}"))
        .spawn(move || conn::serve(&s2, &entry, stream));
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(conn = id, "starting a connection thread failed: {e}");
            shared.clients().remove(&id);
            None
        }
    }
}

/// The canonical model roots of `config`, checked; and the other values a server refuses.
fn checked_roots(config: &ServerConfig) -> Result<Vec<PathBuf>, ServerError> {
    let mut roots = Vec::new();
    for r in &config.model_roots {
        let c = std::fs::canonicalize(r).map_err(io_err(format!("model root {}", r.display())))?;
        if !c.is_dir() {
            return Err(ServerError::Config(format!(
                "model root {} is not a directory",
                r.display()
            )));
        }
        roots.push(c);
    }
    if config.max_clients == 0 {
        return Err(ServerError::Config("max_clients must be at least 1".into()));
    }
    Ok(roots)
}
