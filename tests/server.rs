//! ferryd's socket server, in process on a temporary socket (plus the real `ferryd` once):
//! handshake, models under roots, leases and the mapped host arena, typed errors, isolation of
//! bad clients, clean-up of departed clients, peer credentials, shutdown.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::Dtype;
use ferry::engine::Engine;
use ferry::protocol::socket::{Received, recv_frame, send_frame, send_frame_bytes};
use ferry::protocol::*;
use ferry::server::{Server, ServerConfig};
use ferry_tests::{Tensor, write_file};

/// A temporary directory with a model root holding one model, and a socket path.
struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    tensors: Vec<Tensor>,
    socket: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).expect("root");
    let mut tensors = Vec::new();
    for l in 0..4 {
        tensors.push(Tensor::patterned(format!("blocks.{l}.weight"), Dtype::U8, &[3000 + l]));
        tensors.push(Tensor::patterned(format!("blocks.{l}.bias"), Dtype::F32, &[5]));
    }
    let model = root.join("m.safetensors");
    write_file(&model, &tensors).expect("model");
    // The server creates the socket's directory.
    let socket = dir.path().join("run").join("ferryd.sock");
    Setup { _dir: dir, root, model, tensors, socket }
}

fn engine() -> Engine {
    ferry_tests::host_engine(4 << 20, true, Duration::from_secs(2), 16 << 10)
}

fn start(s: &Setup, f: impl FnOnce(&mut ServerConfig)) -> (Engine, Server) {
    let engine = engine();
    let mut config = ServerConfig::new(&s.socket);
    config.model_roots = vec![s.root.clone()];
    f(&mut config);
    let server = Server::start(engine.clone(), config).expect("server starts");
    (engine, server)
}

struct Client {
    s: UnixStream,
    next: u64,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        Client { s, next: 1 }
    }

    /// Connects and completes the handshake.
    fn open(path: &Path, name: &str) -> (Client, Welcome) {
        let mut c = Client::connect(path);
        let w = match c.call(Hello {
            min_version: 1,
            max_version: 1,
            features: features::KNOWN,
            client_name: name.into(),
        }) {
            Message::Welcome(w) => w,
            other => panic!("expected welcome, got {other:?}"),
        };
        (c, w)
    }

    fn send_with(&mut self, msg: impl Into<Message>, fds: &[std::os::fd::BorrowedFd<'_>]) -> u64 {
        let id = self.next;
        self.next += 1;
        send_frame(&self.s, PROTOCOL_VERSION, id, &msg.into(), fds).expect("send");
        id
    }

    fn recv(&mut self) -> Received {
        recv_frame(&self.s, None).expect("reply")
    }

    fn call(&mut self, msg: impl Into<Message>) -> Message {
        let id = self.send_with(msg, &[]);
        let r = self.recv();
        assert_eq!(r.header.request_id, id, "reply to the request");
        r.message
    }

    /// A request that must fail with `code`.
    fn fails(&mut self, msg: impl Into<Message>, code: ErrorCode) -> String {
        match self.call(msg) {
            Message::Error(e) => {
                assert_eq!(e.error_code(), Some(code), "{}", e.message);
                e.message
            }
            other => panic!("expected error {code:?}, got {other:?}"),
        }
    }

    fn ack(&mut self, msg: impl Into<Message>) {
        match self.call(msg) {
            Message::Ack(_) => {}
            other => panic!("expected ack, got {other:?}"),
        }
    }

    fn open_model(&mut self, path: &Path) -> ModelOpened {
        match self.call(OpenModel { path: path.to_str().expect("utf-8").into() }) {
            Message::ModelOpened(m) => m,
            other => panic!("expected model_opened, got {other:?}"),
        }
    }

    fn acquire(&mut self, model: u64, component: &str, layer: u32) -> Leased {
        match self.call(Acquire { model, component: component.into(), layer }) {
            Message::Leased(l) => l,
            other => panic!("expected leased, got {other:?}"),
        }
    }

    fn clients(&mut self) -> Vec<ClientInfo> {
        match self.call(ListClients {}) {
            Message::Clients(c) => c.clients,
            other => panic!("expected clients, got {other:?}"),
        }
    }

    /// The next frame must be an error with `code` (id 0 unless `id`), then the end of stream.
    fn expect_closed_with(&mut self, code: ErrorCode) {
        let r = recv_frame(&self.s, None).expect("error frame before closing");
        match r.message {
            Message::Error(e) => assert_eq!(e.error_code(), Some(code), "{}", e.message),
            other => panic!("expected error {code:?}, got {other:?}"),
        }
        assert!(
            matches!(recv_frame(&self.s, None), Err(ProtocolError::Closed)),
            "the server closed the connection"
        );
    }
}

/// The component holding layer `blocks.N`, and that layer's index.
fn block_layer(m: &ModelOpened, n: usize) -> (String, u32) {
    for c in &m.components {
        if let Some(i) = c.layers.iter().position(|l| l.name.ends_with(&format!("{n}"))) {
            return (c.name.clone(), i as u32);
        }
    }
    panic!("no layer {n} in {m:?}")
}

fn file_bytes<'a>(tensors: &'a [Tensor], local: &str) -> &'a [u8] {
    let t = tensors
        .iter()
        .find(|t| t.name == local || t.name.ends_with(&format!(".{local}")))
        .unwrap_or_else(|| panic!("no tensor {local}"));
    &t.data
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn handshake_open_acquire_map_the_arena_and_read_the_exact_bytes() {
    let s = setup();
    let (_engine, server) = start(&s, |_| {});
    let mode = std::fs::metadata(&s.socket).expect("socket").permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o660);

    let (mut c, w) = Client::open(&s.socket, "test-client");
    assert_eq!(w.version, 1);
    assert_eq!(
        w.features,
        features::FD_PASSING
            | features::OPEN_PATH
            | features::HOST_ARENA
            | features::LORA
            | features::DEVICES,
    );
    assert_eq!(w.device.backend, "host");
    assert_eq!(w.max_body_len, MAX_BODY_LEN);

    let m = c.open_model(&s.model);
    let (component, layer) = block_layer(&m, 2);
    let leased = c.acquire(m.model, &component, layer);
    assert_eq!(leased.tensors.len(), 2);
    match c.call(WaitReady { lease: leased.lease }) {
        Message::Ready(r) => assert_eq!(r.lease, leased.lease),
        other => panic!("expected ready, got {other:?}"),
    }

    let id = c.send_with(MapArena {}, &[]);
    let r = c.recv();
    assert_eq!(r.header.request_id, id);
    let Message::ArenaFd(a) = r.message else { panic!("expected arena_fd, got {:?}", r.message) };
    assert_eq!(a.backend, "host");
    let [fd] = <[OwnedFd; 1]>::try_from(r.fds).expect("one descriptor");
    // SAFETY: the memfd is the server's arena; the test only reads leased, ready bytes while the
    // lease is held, so no one writes them during the read.
    let file = File::from(fd);
    // The descriptor is read-only: a client cannot write into the shared weights.
    // SAFETY: a mapping attempt that must fail; nothing is read or written through it.
    assert!(unsafe { memmap2::MmapMut::map_mut(&file) }.is_err(), "the arena fd must be read-only");
    // SAFETY: as above, read-only.
    let map = unsafe { memmap2::Mmap::map(&file) }.expect("mmap the arena");
    assert_eq!(map.len() as u64, a.len);
    for t in &leased.tensors {
        let at = t.arena_offset as usize;
        let got = &map[at..at + t.len as usize];
        assert_eq!(got, file_bytes(&s.tensors, &t.name), "bytes of {}", t.name);
    }

    // The same path from another client is the same model; list_models and list_clients agree.
    let (mut b, _) = Client::open(&s.socket, "second");
    assert_eq!(b.open_model(&s.model).model, m.model);
    match b.call(ListModels {}) {
        Message::Models(ms) => {
            assert_eq!(ms.models.len(), 1);
            assert_eq!(ms.models[0].clients, 2);
            assert_eq!(ms.models[0].source, "single_file");
        }
        other => panic!("expected models, got {other:?}"),
    }
    let clients = b.clients();
    let me = clients.iter().find(|x| x.id == w.client_id).expect("listed");
    assert_eq!((me.name.as_str(), me.leases, me.models), ("test-client", 1, 1));
    assert_eq!(me.pid, std::process::id());

    c.ack(Release { model: m.model, lease: leased.lease });
    c.fails(Release { model: m.model, lease: leased.lease }, ErrorCode::UnknownLease);
    c.fails(WaitReady { lease: leased.lease }, ErrorCode::UnknownLease);
    match c.call(Stats {}) {
        Message::StatsReply(st) => assert!(st.acquires >= 1),
        other => panic!("expected stats, got {other:?}"),
    }
    c.ack(CloseModel { model: m.model });
    c.fails(Acquire { model: m.model, component, layer }, ErrorCode::UnknownModel);
    c.ack(Goodbye {});
    assert!(matches!(recv_frame(&c.s, None), Err(ProtocolError::Closed)));
    drop(b);
    server.shutdown();
    assert!(!s.socket.exists(), "the socket is removed at shutdown");
}

#[test]
fn bad_paths_and_unknown_ids_are_typed_errors_and_the_connection_stays_usable() {
    let s = setup();
    let (_engine, _server) = start(&s, |_| {});
    let (mut c, _) = Client::open(&s.socket, "t");
    let outside = s.root.parent().expect("parent").join("outside.safetensors");
    write_file(&outside, &s.tensors).expect("outside model");
    let escape = s.root.join("escape.safetensors");
    std::os::unix::fs::symlink(&outside, &escape).expect("symlink");

    c.fails(OpenModel { path: outside.to_str().expect("utf-8").into() }, ErrorCode::NotPermitted);
    c.fails(OpenModel { path: escape.to_str().expect("utf-8").into() }, ErrorCode::NotPermitted);
    let missing = s.root.join("missing.safetensors");
    c.fails(OpenModel { path: missing.to_str().expect("utf-8").into() }, ErrorCode::NotFound);
    c.fails(OpenModel { path: "models/m.safetensors".into() }, ErrorCode::BadRequest);
    c.fails(Acquire { model: 999, component: "x".into(), layer: 0 }, ErrorCode::UnknownModel);
    c.fails(Release { model: 999, lease: 12345 }, ErrorCode::UnknownLease);
    c.fails(WaitReady { lease: 77 }, ErrorCode::UnknownLease);
    c.fails(RemoveLora { view: 5 }, ErrorCode::UnknownView);

    let m = c.open_model(&s.model);
    let (component, layer) = block_layer(&m, 0);
    c.fails(
        Acquire { model: m.model, component: "nope".into(), layer: 0 },
        ErrorCode::UnknownComponent,
    );
    c.fails(
        Acquire { model: m.model, component: component.clone(), layer: 99 },
        ErrorCode::UnknownLayer,
    );
    let bad = Policy::Balanced { threshold: Threshold::Fraction(2.0) };
    c.fails(SetResidency { model: m.model, component: None, policy: bad }, ErrorCode::BadRequest);
    // A lease is this client's: releasing it under another model id is a typed error.
    let l = c.acquire(m.model, &component, layer);
    c.fails(CloseModel { model: m.model }, ErrorCode::Busy);
    c.fails(
        SetResidency { model: m.model, component: None, policy: Policy::None },
        ErrorCode::Busy,
    );
    c.fails(Release { model: m.model + 100, lease: l.lease }, ErrorCode::LeaseOfOtherModel);
    c.ack(Release { model: m.model, lease: l.lease });
    c.ack(SetResidency { model: m.model, component: None, policy: Policy::None });

    // Descriptors: a LoRA entry naming a descriptor that was not attached, and a descriptor
    // that is not a file, are typed errors, not a closed connection.
    let stack = vec![LoraRef { source: LoraSource::Fd(0), scale: 1.0 }];
    c.fails(ApplyLora { model: m.model, stack, mode: LoraMode::Backup }, ErrorCode::BadRequest);
    let dev_null = File::open("/dev/null").expect("/dev/null");
    let id = c.send_with(OpenModelFd { name: "null".into() }, &[dev_null.as_fd()]);
    let r = c.recv();
    assert_eq!(r.header.request_id, id);
    match r.message {
        Message::Error(e) => assert_eq!(e.error_code(), Some(ErrorCode::BadRequest)),
        other => panic!("expected bad_request, got {other:?}"),
    }
    let stack = vec![LoraRef {
        source: LoraSource::Path(outside.to_str().expect("utf-8").into()),
        scale: 1.0,
    }];
    c.fails(ApplyLora { model: m.model, stack, mode: LoraMode::Backup }, ErrorCode::NotPermitted);

    // Still usable.
    assert!(matches!(c.call(Stats {}), Message::StatsReply(_)));
}

#[test]
fn no_model_roots_means_open_by_path_is_refused_with_advice() {
    let s = setup();
    let (_engine, _server) = start(&s, |c| c.model_roots.clear());
    let (mut c, w) = Client::open(&s.socket, "t");
    assert_eq!(w.features & features::OPEN_PATH, 0);
    let msg = c
        .fails(OpenModel { path: s.model.to_str().expect("utf-8").into() }, ErrorCode::Unsupported);
    assert!(msg.contains("--model-root"), "{msg}");
}

#[test]
fn cuda_only_requests_are_refused_by_a_host_server_without_closing() {
    let s = setup();
    let (_engine, _server) = start(&s, |_| {});
    let (mut c, w) = Client::open(&s.socket, "t");
    assert_eq!(w.features & (features::CUDA_IPC | features::CUDA_EVENTS), 0);
    let m = c.open_model(&s.model);
    let msg = c.fails(
        AcquireEvent { model: m.model, component: "model".into(), layer: 0 },
        ErrorCode::Unsupported,
    );
    assert!(msg.contains("acquire_event"), "{msg}");
    // The connection still serves, and a plain acquire works.
    let l = c.acquire(m.model, "model", 0);
    assert_eq!(l.layer, "blocks.0");
}

#[test]
fn a_bad_frame_closes_that_client_only() {
    let s = setup();
    let (_engine, _server) = start(&s, |_| {});
    let (mut a, _) = Client::open(&s.socket, "a");
    let (mut b, _) = Client::open(&s.socket, "b");
    let mo = b.open_model(&s.model);

    a.s.write_all(b"GARBAGE!GARBAGE!GARBAGE!").expect("write garbage");
    a.expect_closed_with(ErrorCode::BadMagic);

    // A valid frame of a reply kind, and a second hello: fatal too.
    let (mut c, _) = Client::open(&s.socket, "c");
    send_frame_bytes(&c.s, &encode_frame(1, &Ack {}.into()).expect("encode"), &[]).expect("send");
    let r = c.recv();
    assert_eq!(r.header.request_id, 1, "the error carries the frame's id");
    assert!(
        matches!(r.message, Message::Error(ref e) if e.code == ErrorCode::UnexpectedMessage as u32)
    );
    let (mut d, _) = Client::open(&s.socket, "d");
    let hello = Hello { min_version: 1, max_version: 1, features: 0, client_name: "x".into() };
    d.fails(hello, ErrorCode::UnexpectedMessage);
    assert!(matches!(recv_frame(&d.s, None), Err(ProtocolError::Closed)));

    // A request before hello.
    let mut e = Client::connect(&s.socket);
    e.fails(Stats {}, ErrorCode::UnexpectedMessage);
    assert!(matches!(recv_frame(&e.s, None), Err(ProtocolError::Closed)));

    // B never noticed.
    let (component, layer) = block_layer(&mo, 1);
    let l = b.acquire(mo.model, &component, layer);
    b.ack(Release { model: mo.model, lease: l.lease });
    assert!(matches!(b.call(Stats {}), Message::StatsReply(_)));
}

#[test]
fn a_client_that_disconnects_holding_leases_releases_them() {
    let s = setup();
    let (engine, _server) = start(&s, |_| {});
    let (mut a, wa) = Client::open(&s.socket, "a");
    let (mut b, _) = Client::open(&s.socket, "b");
    let m = a.open_model(&s.model);
    let (component, layer) = block_layer(&m, 3);
    a.acquire(m.model, &component, layer);
    a.acquire(m.model, &component, 0);
    assert_eq!(b.open_model(&s.model).model, m.model);
    let busy = SetResidency { model: m.model, component: None, policy: Policy::None };
    b.fails(busy.clone(), ErrorCode::Busy);
    let leases = b.clients().iter().find(|c| c.id == wa.client_id).map(|c| c.leases);
    assert_eq!(leases, Some(2));

    drop(a);
    wait_until("a's connection to end", || b.clients().iter().all(|c| c.id != wa.client_id));
    b.ack(busy);
    // The engine no longer holds a's leases: the model can be closed (b is its last user).
    b.ack(CloseModel { model: m.model });
    assert!(engine.model(m.model).is_err(), "closed in the engine once no client uses it");
}

#[test]
fn lora_views_are_created_under_roots_and_closed_with_their_connection() {
    let s = setup();
    let (engine, _server) = start(&s, |_| {});
    let base = s.root.join("base.safetensors");
    let bf16 = |name: &str, shape: &[usize], f: &dyn Fn(usize) -> f32| {
        let n: usize = shape.iter().product();
        let data = (0..n).flat_map(|i| half::bf16::from_f32(f(i)).to_le_bytes()).collect();
        Tensor { name: name.into(), dtype: Dtype::BF16, shape: shape.to_vec(), data }
    };
    let f32t = |name: &str, shape: &[usize], f: &dyn Fn(usize) -> f32| {
        let n: usize = shape.iter().product();
        let data = (0..n).flat_map(|i| f(i).to_le_bytes()).collect();
        Tensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data }
    };
    let blocks: Vec<Tensor> = (0..3)
        .map(|b| bf16(&format!("blocks.{b}.proj.weight"), &[32, 16], &|i| (i as f32 * 0.1).sin()))
        .collect();
    write_file(&base, &blocks).expect("base");
    let lora = s.root.join("lora.safetensors");
    write_file(
        &lora,
        &[
            f32t("blocks.1.proj.lora_A.weight", &[2, 16], &|i| (i as f32 - 8.0) * 0.03),
            f32t("blocks.1.proj.lora_B.weight", &[32, 2], &|i| (i as f32 - 16.0) * 0.02),
            f32t("blocks.1.proj.alpha", &[], &|_| 1.0),
        ],
    )
    .expect("lora");

    let (mut c, _) = Client::open(&s.socket, "lora");
    let m = c.open_model(&base);
    let stack = vec![LoraRef {
        source: LoraSource::Path(lora.to_str().expect("utf-8").into()),
        scale: 1.0,
    }];
    let v = match c.call(ApplyLora { model: m.model, stack, mode: LoraMode::Backup }) {
        Message::ViewCreated(v) => v,
        other => panic!("expected view_created, got {other:?}"),
    };
    assert_eq!(v.merged, 1);
    let (component, layer) = block_layer(&m, 1);
    let l = c.acquire(v.view, &component, layer);
    c.fails(CloseModel { model: m.model }, ErrorCode::Busy);
    c.fails(RemoveLora { view: v.view }, ErrorCode::Busy);
    c.ack(Release { model: v.view, lease: l.lease });
    c.ack(RemoveLora { view: v.view });
    c.fails(
        Acquire { model: v.view, component: component.clone(), layer },
        ErrorCode::UnknownModel,
    );

    // A second view, left open: the connection's end closes it, then the model.
    let stack = vec![LoraRef {
        source: LoraSource::Path(lora.to_str().expect("utf-8").into()),
        scale: 0.5,
    }];
    let Message::ViewCreated(v2) =
        c.call(ApplyLora { model: m.model, stack, mode: LoraMode::Fuse })
    else {
        panic!("second view");
    };
    c.acquire(v2.view, &component, layer);
    drop(c);
    wait_until("the view and model to close", || {
        engine.model(v2.view).is_err() && engine.model(m.model).is_err()
    });
}

#[test]
fn peers_outside_the_allow_list_and_beyond_the_client_cap_are_refused() {
    let s = setup();
    let me = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .expect("uid");
    let other = me.wrapping_add(12345);
    {
        let (_engine, server) = start(&s, |c| {
            c.allow_uids = vec![other];
            c.allow_gids = vec![other];
        });
        let mut c = Client::connect(&s.socket);
        c.expect_closed_with(ErrorCode::NotPermitted);
        assert_eq!(server.client_count(), 0);
    }
    {
        let (_engine, _server) = start(&s, |c| {
            c.allow_uids = vec![me];
            c.max_clients = 1;
        });
        let (mut a, _) = Client::open(&s.socket, "a");
        let mut b = Client::connect(&s.socket);
        b.expect_closed_with(ErrorCode::LimitExceeded);
        assert!(matches!(a.call(Stats {}), Message::StatsReply(_)));
    }
}

#[test]
fn stale_sockets_are_replaced_live_ones_are_not() {
    let s = setup();
    std::fs::create_dir_all(s.socket.parent().expect("dir")).expect("dir");
    drop(UnixListener::bind(&s.socket).expect("bind"));
    assert!(s.socket.exists(), "a stale socket file is left behind");
    let (_engine, server) = start(&s, |_| {});
    let second = Server::start(engine(), ServerConfig::new(&s.socket));
    assert!(second.is_err(), "a live socket is never replaced");
    let (mut c, _) = Client::open(&s.socket, "t");
    assert!(matches!(c.call(Stats {}), Message::StatsReply(_)));

    // Shutdown tells connected clients, then closes them: the error, then the end of stream.
    server.shutdown();
    c.expect_closed_with(ErrorCode::ShuttingDown);
}

/// Every client connected when the server stops gets the `shutting_down` error, then the end
/// of the stream (never a bare close, a reset, or a reply after the error), whatever it is
/// doing: idle after the handshake, with requests in flight, connected but silent, or
/// connecting as the server stops (accepted at that moment, or still in the listen backlog).
/// The connections race the shutdown, so this runs 50 rounds.
#[test]
fn shutdown_tells_every_client_whatever_it_is_doing() {
    for round in 0..50 {
        let s = setup();
        let (_engine, server) = start(&s, |_| {});
        let (mut idle, _) = Client::open(&s.socket, "idle");
        assert!(matches!(idle.call(Stats {}), Message::StatsReply(_)));
        let (mut busy, _) = Client::open(&s.socket, "busy");
        let m = busy.open_model(&s.model);
        let (component, layer) = block_layer(&m, 0);
        let first = busy.next;
        for i in 0..100 {
            if i % 2 == 0 {
                busy.send_with(Stats {}, &[]);
            } else {
                busy.send_with(
                    Acquire { model: m.model, component: component.clone(), layer },
                    &[],
                );
            }
        }
        let silent = Client::connect(&s.socket);
        // Clients connecting until the socket refuses them.
        let socket = s.socket.clone();
        let connecting = std::thread::spawn(move || {
            let mut streams = Vec::new();
            while streams.len() < 32 {
                match UnixStream::connect(&socket) {
                    Ok(c) => streams.push(c),
                    Err(_) => break,
                }
            }
            streams
        });
        std::thread::sleep(Duration::from_micros(200 * (round % 5)));
        server.shutdown();

        idle.expect_closed_with(ErrorCode::ShuttingDown);
        // Replies to the requests served before the shutdown, in order, then the error.
        let mut id = first;
        loop {
            let r = busy.recv();
            if let Message::Error(e) = &r.message {
                assert_eq!(e.error_code(), Some(ErrorCode::ShuttingDown), "{}", e.message);
                assert_eq!(r.header.request_id, NO_REQUEST);
                break;
            }
            assert_eq!(r.header.request_id, id, "round {round}: replies in order");
            id += 1;
        }
        assert!(
            matches!(recv_frame(&busy.s, None), Err(ProtocolError::Closed)),
            "round {round}: nothing after the error"
        );
        let mut silent = silent;
        silent.expect_closed_with(ErrorCode::ShuttingDown);
        for stream in connecting.join().expect("connecting thread") {
            stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            let mut c = Client { s: stream, next: 1 };
            c.expect_closed_with(ErrorCode::ShuttingDown);
        }
        assert!(UnixStream::connect(&s.socket).is_err(), "nothing listens any more");
    }
}

#[test]
fn ferryd_serves_the_socket_and_exits_cleanly_on_sigterm() {
    let s = setup();
    let mut child = std::process::Command::new(ferry_tests::cargo_bin("ferryd"))
        .args(["--device", "host", "--host-memory", "67108864", "--budget", "16777216"])
        .arg("--socket")
        .arg(&s.socket)
        .arg("--model-root")
        .arg(&s.root)
        .arg("--preload")
        .arg(&s.model)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn ferryd");
    wait_until("ferryd's socket", || {
        s.socket.exists() || child.try_wait().ok().flatten().is_some()
    });
    assert!(child.try_wait().expect("try_wait").is_none(), "ferryd is running");
    let (mut c, w) = Client::open(&s.socket, "t");
    assert_eq!(w.device.budget, 16 << 20);
    let m = c.open_model(&s.model);
    let (component, layer) = block_layer(&m, 0);
    c.acquire(m.model, &component, layer);

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    c.expect_closed_with(ErrorCode::ShuttingDown);
    let start = Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("ferryd did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code.code(), Some(0), "ferryd exits 0 after SIGTERM: {code:?}");
    assert!(!s.socket.exists(), "the socket is removed");
}
