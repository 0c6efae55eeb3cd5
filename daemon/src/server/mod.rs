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
//! - [`Server::shutdown`] (also on drop) stops accepting, sends every connection an `error` 300
//!   `shutting_down` (request id 0), closes it, and waits for the connection threads, which
//!   release what their clients held.
//!
//! # Known gaps (this version)
//!
//! - `open_model_fd` and `LoraSource::Fd` are answered 201 `unsupported` and the `FD_PASSING`
//!   feature is never granted: the store has no API to open a model from a descriptor.
//! - `map_arena` works on the host backend only (CUDA: 201 `unsupported`; CUDA IPC is reserved).
//!   The descriptor sent is a read-only reopening of the arena's memfd: clients can map and read
//!   layers, not write into them.
//! - Requests of one connection are answered in order by its thread: a `wait_ready` holds up the
//!   requests after it on the same connection (the protocol allows, but does not require, out of
//!   order replies). Opening models is serialised server-wide (the registry lock is held across
//!   the open so two clients opening the same files get one id).
//! - Model roots: the path is canonicalised and checked, then opened by its canonical path; the
//!   files a sharded index or a diffusers folder names are resolved by the store, which is
//!   trusted to keep them inside the model's directory.
//! - The group check sees only the peer's primary gid (`SO_PEERCRED` does not report
//!   supplementary groups).
//! - A client that stops mid-frame after the handshake holds its thread until it closes or the
//!   server shuts down (the handshake itself has a read timeout).
//! - No TOML config file, SIGHUP reload, or systemd unit / socket activation yet.

mod conn;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use crate::device::{ArenaInner, Backend};
use crate::engine::{Engine, ModelId};
use crate::protocol::socket::send_frame;
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
    /// How long a new connection has to send `hello`.
    pub handshake_timeout: Duration,
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
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

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
    pub(crate) by_path: HashMap<PathBuf, ModelId>,
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
    /// Serialises whole frames written to `stream`.
    pub(crate) write: Mutex<()>,
    /// Whether the `shutting_down` error was sent (it is sent once).
    pub(crate) told_shutdown: AtomicBool,
}

impl ClientEntry {
    /// Sends one frame (whole, under the write lock).
    pub(crate) fn send(
        &self,
        version: u16,
        request_id: u64,
        msg: &Message,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), crate::protocol::ProtocolError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        send_frame(&self.stream, version, request_id, msg, fds)
    }

    /// Sends the `shutting_down` error (request id 0), once, whoever notices the shutdown
    /// first (the connection's thread or [`Server::shutdown`]).
    pub(crate) fn say_shutting_down(&self, version: u16) {
        if !self.told_shutdown.swap(true, Ordering::SeqCst) {
            let bye = ErrorReply::new(ErrorCode::ShuttingDown, "the server is shutting down");
            let _ = self.send(version, NO_REQUEST, &bye.into(), &[]);
        }
    }
}

/// State shared by the accept thread and every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) engine: Engine,
    pub(crate) config: ServerConfig,
    /// Canonical model roots.
    pub(crate) roots: Vec<PathBuf>,
    /// Feature bits the server offers.
    pub(crate) features: u64,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) clients: Mutex<HashMap<u64, Arc<ClientEntry>>>,
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

    fn allowed(&self, cred: &PeerCred) -> bool {
        let c = &self.config;
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
        if self.roots.is_empty() {
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
        if self.roots.iter().any(|r| canonical.starts_with(r)) {
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

    /// A read-only descriptor of the arena's memfd (host backend only): clients read layers
    /// through it and cannot write into another client's weights.
    pub(crate) fn arena_fd(&self) -> Option<std::io::Result<(OwnedFd, u64)>> {
        let arena = self.engine.arena()?;
        match &arena.inner {
            ArenaInner::Host(h) => Some(h.read_only_fd().map(|fd| (fd, arena.len))),
            ArenaInner::Cuda(_) => None,
        }
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
    pub fn start(engine: Engine, config: ServerConfig) -> Result<Server, ServerError> {
        Server::start_on(engine, config, None)
    }

    /// Like [`Server::start`], on a listener bound by someone else (systemd socket activation):
    /// `config.socket` names it for logs, and the server neither binds nor removes it.
    pub fn start_with_listener(
        engine: Engine,
        config: ServerConfig,
        listener: UnixListener,
    ) -> Result<Server, ServerError> {
        Server::start_on(engine, config, Some(listener))
    }

    fn start_on(
        engine: Engine,
        config: ServerConfig,
        inherited: Option<UnixListener>,
    ) -> Result<Server, ServerError> {
        let mut roots = Vec::new();
        for r in &config.model_roots {
            let c =
                std::fs::canonicalize(r).map_err(io_err(format!("model root {}", r.display())))?;
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
        let mut offered = features::LORA;
        if !roots.is_empty() {
            offered |= features::OPEN_PATH;
        }
        if engine.device_info().backend == Backend::Host {
            offered |= features::HOST_ARENA;
        }
        let owns_socket = inherited.is_none();
        let listener = match inherited {
            Some(l) => l,
            None => bind(&config.socket)?,
        };
        let (wake_r, wake_w) = pipe().map_err(io_err("creating the wake pipe"))?;
        let socket = config.socket.clone();
        let shared = Arc::new(Shared {
            engine,
            config,
            roots,
            features: offered,
            registry: Mutex::new(Registry::default()),
            clients: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let s2 = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("ferryd-accept".into())
            .spawn(move || accept_loop(&s2, &listener, &wake_r))
            .map_err(io_err("starting the accept thread"))?;
        info!(socket = %socket.display(), roots = ?shared.roots, "listening");
        Ok(Server { shared, socket, owns_socket, wake: Some(wake_w), accept: Some(accept) })
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
        let model = self.shared.engine.model(id).map_err(|e| ServerError::Config(e.to_string()))?;
        let canonical = model.root().to_path_buf();
        let mut reg = self.shared.registry();
        reg.by_path.insert(canonical.clone(), id);
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
            c.say_shutting_down(PROTOCOL_VERSION);
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
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
    threads
}

/// Checks a new connection and starts its thread.
fn admit(shared: &Arc<Shared>, stream: UnixStream) -> Option<JoinHandle<()>> {
    let refuse = |stream: &UnixStream, code: ErrorCode, message: String| {
        let e = ErrorReply::new(code, message);
        let _ = send_frame(stream, PROTOCOL_VERSION, NO_REQUEST, &e.into(), &[]);
    };
    let cred = match peer_cred(&stream) {
        Ok(c) => c,
        Err(e) => {
            warn!("SO_PEERCRED failed: {e}; closing the connection");
            return None;
        }
    };
    if !shared.allowed(&cred) {
        warn!(uid = cred.uid, gid = cred.gid, pid = cred.pid, "peer not allowed; refused");
        refuse(
            &stream,
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
    let entry = Arc::new(ClientEntry {
        id,
        cred,
        name: OnceLock::new(),
        models: AtomicU32::new(0),
        leases: AtomicU32::new(0),
        stream: writer,
        write: Mutex::new(()),
        told_shutdown: AtomicBool::new(false),
    });
    {
        let mut clients = shared.clients();
        if clients.len() >= shared.config.max_clients {
            drop(clients);
            warn!(uid = cred.uid, pid = cred.pid, "too many clients; refused");
            refuse(
                &stream,
                ErrorCode::LimitExceeded,
                format!("the server already has {} clients", shared.config.max_clients),
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
