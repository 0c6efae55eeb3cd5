//! Fault injection against the real `ferryd` process (host backend, a temporary socket, a
//! preloaded model): bad frames of every kind while a healthy client keeps working, a client
//! killed with SIGKILL while holding leases, and 64 concurrent clients hammering
//! acquire/release with the bytes checked through the mapped arena.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferry::Dtype;
use ferry::client::{Client, ClientError};
use ferry::protocol::socket::{recv_frame, send_frame};
use ferry::protocol::*;
use ferry_tests::{Tensor, cargo_bin, write_file};

/// Set in the environment of the child process of
/// `a_client_killed_with_sigkill_gives_its_leases_back`: the socket to connect to.
const CHILD_SOCKET_ENV: &str = "FERRY_FAULTS_CHILD_SOCKET";
const CHILD_MODEL_ENV: &str = "FERRY_FAULTS_CHILD_MODEL";
const LAYERS: usize = 8;

/// A running `ferryd` over a temporary model root; killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    model: PathBuf,
    tensors: Vec<Tensor>,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Daemon {
    /// Starts ferryd with an 8-layer model of `layer_bytes` (plus a small bias) per layer.
    fn start(layer_bytes: usize) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("models");
        std::fs::create_dir_all(&root).expect("root");
        let mut tensors = Vec::new();
        for l in 0..LAYERS {
            tensors.push(Tensor::patterned(
                format!("blocks.{l}.weight"),
                Dtype::U8,
                &[layer_bytes + 64 * l],
            ));
            tensors.push(Tensor::patterned(format!("blocks.{l}.bias"), Dtype::F32, &[16]));
        }
        let model = root.join("m.safetensors");
        write_file(&model, &tensors).expect("model");
        let socket = dir.path().join("s.sock");
        let child = Command::new(cargo_bin("ferryd"))
            .args(["--device", "host", "--host-memory", "268435456"])
            .arg("--socket")
            .arg(&socket)
            .arg("--model-root")
            .arg(&root)
            .arg("--preload")
            .arg(&model)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ferryd");
        let mut d = Daemon { child, socket, model, tensors, root, _dir: dir };
        // Connectable, not just present: std's bind() and listen() are two system calls.
        wait_until("ferryd's socket", Duration::from_secs(30), || {
            UnixStream::connect(&d.socket).is_ok() || d.child.try_wait().ok().flatten().is_some()
        });
        d.assert_alive();
        d
    }

    fn assert_alive(&mut self) {
        assert!(self.child.try_wait().expect("try_wait").is_none(), "ferryd has exited");
    }

    fn client(&self, name: &str) -> Client {
        Client::connect(&self.socket, name).expect("connect to ferryd")
    }

    fn bytes_of(&self, local: &str) -> &[u8] {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == local || t.name.ends_with(&format!(".{local}")))
            .unwrap_or_else(|| panic!("no tensor {local}"));
        &t.data
    }
}

/// Kills a process on drop (SIGKILL), for a daemon shared with threads that may outlive a
/// failed test.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on ferryd's pid, a child of this process that has not been reaped
        // (the Daemon that would reap it is still alive while this guard is armed).
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every (component, layer index, layer name) of a model, in order.
fn layers_of(m: &ModelOpened) -> Vec<(String, u32, String)> {
    m.components
        .iter()
        .flat_map(|c| {
            c.layers.iter().enumerate().map(|(i, l)| (c.name.clone(), i as u32, l.name.clone()))
        })
        .collect()
}

fn acquire(c: &mut Client, model: u64, component: &str, layer: u32) -> Leased {
    match c.call(Acquire { model, component: component.into(), layer }.into(), &[]) {
        Ok(Message::Leased(l)) => l,
        other => panic!("expected leased, got {other:?}"),
    }
}

fn release(c: &mut Client, model: u64, lease: u64) {
    match c.call(Release { model, lease }.into(), &[]) {
        Ok(Message::Ack(_)) => {}
        other => panic!("expected ack, got {other:?}"),
    }
}

fn wait_ready(c: &mut Client, lease: u64) {
    match c.call(WaitReady { lease }.into(), &[]) {
        Ok(Message::Ready(r)) => assert_eq!(r.lease, lease),
        other => panic!("expected ready, got {other:?}"),
    }
}

fn map_arena(c: &mut Client) -> memmap2::Mmap {
    let (a, fd) = c.map_arena().expect("map_arena");
    let file = File::from(fd);
    // SAFETY: read-only shared mapping of the server's arena memfd; the tests read only bytes
    // of layers they hold a ready lease on, which the server does not write meanwhile.
    let map = unsafe { memmap2::Mmap::map(&file) }.expect("mmap the arena");
    assert_eq!(map.len() as u64, a.len);
    map
}

/// Checks a lease's tensors against the file (waiting for readiness first if needed).
fn check_bytes(d: &Daemon, c: &mut Client, map: &[u8], leased: &Leased) {
    if !leased.ready {
        wait_ready(c, leased.lease);
    }
    for t in &leased.tensors {
        let at = t.arena_offset as usize;
        let want = d.bytes_of(&t.name);
        assert_eq!(t.len as usize, want.len(), "length of {}", t.name);
        assert!(map[at..at + t.len as usize] == *want, "bytes of {} differ from the file", t.name);
    }
}

fn server_code(e: &ClientError) -> Option<ErrorCode> {
    e.code()
}

/// A raw 24-byte header.
fn header(magic: &[u8; 4], version: u16, kind: u16, flags: u32, body_len: u32, id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(magic);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&body_len.to_le_bytes());
    h.extend_from_slice(&id.to_le_bytes());
    h
}

/// A raw connection that has completed the handshake.
fn raw_after_hello(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        features: features::KNOWN,
        client_name: "bad".into(),
    };
    send_frame(&s, PROTOCOL_VERSION, 1, &hello.into(), &[]).expect("hello");
    match recv_frame(&s, None).expect("welcome").message {
        Message::Welcome(_) => {}
        other => panic!("expected welcome, got {other:?}"),
    }
    s
}

/// What a bad client must see: an error with one of `codes` then the end of the stream, or
/// (when `may_just_close`) the end of the stream at once.
fn expect_rejected(s: &UnixStream, what: &str, codes: &[ErrorCode], may_just_close: bool) {
    match recv_frame(s, None) {
        Ok(r) => match r.message {
            Message::Error(e) => {
                assert!(
                    e.error_code().is_some_and(|c| codes.contains(&c)),
                    "{what}: got error {} ({}), expected one of {codes:?}",
                    e.code,
                    e.message
                );
                match recv_frame(s, None) {
                    Err(ProtocolError::Closed) => {}
                    Err(ProtocolError::Io(e))
                        if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    other => {
                        panic!("{what}: the server should close after a fatal error: {other:?}")
                    }
                }
            }
            other => panic!("{what}: expected an error, got {other:?}"),
        },
        Err(ProtocolError::Closed) if may_just_close => {}
        Err(ProtocolError::Io(e))
            if may_just_close && e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected an error frame, got {e}"),
    }
}

/// The healthy client's round: every layer acquired, checked byte for byte, released; stats
/// answer.
fn healthy_round(d: &mut Daemon, c: &mut Client, m: &ModelOpened, map: &[u8], after: &str) {
    for (component, layer, name) in layers_of(m) {
        let l = acquire(c, m.model, &component, layer);
        assert_eq!(l.layer, name, "after {after}");
        check_bytes(d, c, map, &l);
        release(c, m.model, l.lease);
    }
    c.stats().unwrap_or_else(|e| panic!("stats after {after}: {e}"));
    d.assert_alive();
}

#[test]
fn bad_frames_close_only_the_offending_client() {
    let mut d = Daemon::start(4096);
    let mut healthy = d.client("healthy");
    let m = healthy.open_model(&d.model).expect("open the preloaded model");
    let map = map_arena(&mut healthy);
    healthy_round(&mut d, &mut healthy, &m, &map, "start");

    let (component, _, _) = layers_of(&m).remove(0);
    let acquire_body = Message::from(Acquire { model: m.model, component, layer: 0 })
        .encode_body()
        .expect("encode");
    let stats = Kind::Stats as u16;

    // (name, bytes to send, after the handshake?, accepted codes, may the server just close?)
    type Case = (&'static str, Vec<u8>, bool, Vec<ErrorCode>, bool);
    let mut cases: Vec<Case> = vec![
        (
            "garbage",
            b"GARBAGE!GARBAGE!GARBAGE!GARBAGE!".to_vec(),
            true,
            vec![ErrorCode::BadMagic],
            false,
        ),
        ("garbage before hello", vec![0xa5; 100], false, vec![ErrorCode::BadMagic], false),
        ("wrong magic", header(b"FRRX", 1, stats, 0, 0, 5), true, vec![ErrorCode::BadMagic], false),
        (
            "version 0",
            header(&MAGIC, 0, stats, 0, 0, 5),
            true,
            vec![ErrorCode::UnsupportedVersion],
            false,
        ),
        (
            "version 2 after the handshake",
            header(&MAGIC, 2, stats, 0, 0, 5),
            true,
            vec![ErrorCode::UnsupportedVersion],
            false,
        ),
        (
            "hello offering only version 7",
            {
                let h =
                    Hello { min_version: 7, max_version: 7, features: 0, client_name: "x".into() };
                encode_frame(1, &h.into()).expect("encode")
            },
            false,
            vec![ErrorCode::UnsupportedVersion],
            false,
        ),
        (
            "unknown kind",
            header(&MAGIC, 1, 0x0777, 0, 0, 5),
            true,
            vec![ErrorCode::UnknownKind],
            false,
        ),
        (
            "reserved flag",
            header(&MAGIC, 1, stats, 0x4, 0, 5),
            true,
            vec![ErrorCode::ReservedFlags],
            false,
        ),
        (
            "fd flag on stats",
            header(&MAGIC, 1, stats, 0x1, 0, 5),
            true,
            vec![ErrorCode::BadFds],
            false,
        ),
        (
            "oversized body length",
            header(&MAGIC, 1, stats, 0, MAX_BODY_LEN + 1, 5),
            true,
            vec![ErrorCode::FrameTooLarge],
            false,
        ),
        (
            "huge body length",
            header(&MAGIC, 1, Kind::Acquire as u16, 0, u32::MAX, 5),
            true,
            vec![ErrorCode::FrameTooLarge],
            false,
        ),
        (
            "acquire body cut short",
            {
                let mut f = header(&MAGIC, 1, Kind::Acquire as u16, 0, 10, 5);
                f.extend_from_slice(&acquire_body[..10]);
                f
            },
            true,
            vec![ErrorCode::BadBody],
            false,
        ),
        (
            "acquire body with a string length past the body",
            {
                let mut body = acquire_body.clone();
                body[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                let mut f = header(&MAGIC, 1, Kind::Acquire as u16, 0, body.len() as u32, 5);
                f.extend_from_slice(&body);
                f
            },
            true,
            vec![ErrorCode::BadBody],
            false,
        ),
        (
            "set_residency with a bad option tag",
            {
                let mut body = 1u64.to_le_bytes().to_vec();
                body.push(7);
                body.extend_from_slice(&0u32.to_le_bytes());
                let mut f = header(&MAGIC, 1, Kind::SetResidency as u16, 0, body.len() as u32, 5);
                f.extend_from_slice(&body);
                f
            },
            true,
            vec![ErrorCode::BadBody],
            false,
        ),
        (
            "set_residency with a bad policy index",
            {
                let mut body = 1u64.to_le_bytes().to_vec();
                body.push(0);
                body.extend_from_slice(&99u32.to_le_bytes());
                let mut f = header(&MAGIC, 1, Kind::SetResidency as u16, 0, body.len() as u32, 5);
                f.extend_from_slice(&body);
                f
            },
            true,
            vec![ErrorCode::BadBody],
            false,
        ),
        (
            "stats with trailing bytes",
            {
                let mut f = header(&MAGIC, 1, stats, 0, 4, 5);
                f.extend_from_slice(&[1, 2, 3, 4]);
                f
            },
            true,
            vec![ErrorCode::TrailingBytes],
            false,
        ),
        (
            "request id 0",
            header(&MAGIC, 1, stats, 0, 0, 0),
            true,
            vec![ErrorCode::UnexpectedMessage],
            false,
        ),
        (
            "a reply kind from a client",
            encode_frame(5, &Ack {}.into()).expect("encode"),
            true,
            vec![ErrorCode::UnexpectedMessage],
            false,
        ),
    ];
    // Truncated: a header (then part of the body), then the write side closed.
    for (name, n) in [
        ("truncated header", 10),
        ("header then close", HEADER_LEN),
        ("half a body", HEADER_LEN + 8),
    ] {
        let mut f = header(&MAGIC, 1, Kind::Acquire as u16, 0, acquire_body.len() as u32, 5);
        f.extend_from_slice(&acquire_body);
        f.truncate(n);
        cases.push((name, f, true, vec![ErrorCode::Truncated], true));
    }

    for (name, bytes, handshake, codes, may_just_close) in cases {
        let s = if handshake {
            raw_after_hello(&d.socket)
        } else {
            let s = UnixStream::connect(&d.socket).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            s
        };
        (&s).write_all(&bytes).unwrap_or_else(|e| panic!("{name}: write: {e}"));
        if codes == [ErrorCode::Truncated] {
            s.shutdown(Shutdown::Write).expect("shutdown");
        }
        expect_rejected(&s, name, &codes, may_just_close);
        drop(s);
        healthy_round(&mut d, &mut healthy, &m, &map, name);
    }

    // A bad client that just vanishes mid-frame (no shutdown, close).
    {
        let s = raw_after_hello(&d.socket);
        (&s).write_all(&header(&MAGIC, 1, stats, 0, 100, 5)).expect("write");
    }
    healthy_round(&mut d, &mut healthy, &m, &map, "a client gone mid-frame");

    // Typed request errors: the connection stays.
    let mut other = d.client("other");
    let mo = other.open_model(&d.model).expect("open");
    assert_eq!(mo.model, m.model, "the preloaded model");
    let (component, layer, _) = layers_of(&mo).remove(1);
    let l = acquire(&mut other, mo.model, &component, layer);
    release(&mut other, mo.model, l.lease);
    let e = other.call(Release { model: mo.model, lease: l.lease }.into(), &[]).expect_err("twice");
    assert_eq!(server_code(&e), Some(ErrorCode::UnknownLease), "{e}");
    let outside = d.root.parent().expect("parent").join("outside.safetensors");
    write_file(&outside, &d.tensors).expect("outside model");
    let escape = d.root.join("escape.safetensors");
    std::os::unix::fs::symlink(&outside, &escape).expect("symlink");
    let e = other.open_model(&outside).expect_err("outside the roots");
    assert_eq!(server_code(&e), Some(ErrorCode::NotPermitted), "{e}");
    let e = other.open_model(&escape).expect_err("symlink escape");
    assert_eq!(server_code(&e), Some(ErrorCode::NotPermitted), "{e}");
    let dotdot = d.root.join("..").join("outside.safetensors");
    let e = other.open_model(&dotdot).expect_err("dot-dot escape");
    assert_eq!(server_code(&e), Some(ErrorCode::NotPermitted), "{e}");
    other.stats().expect("the connection stays usable");
    let l = acquire(&mut other, mo.model, &component, layer);
    check_bytes(&d, &mut other, &map, &l);
    release(&mut other, mo.model, l.lease);
    healthy_round(&mut d, &mut healthy, &m, &map, "typed request errors");
}

/// The child half of `a_client_killed_with_sigkill_gives_its_leases_back`: does nothing unless
/// the parent set the environment.
#[test]
fn child_mode_holder() {
    let (Ok(socket), Ok(model)) = (std::env::var(CHILD_SOCKET_ENV), std::env::var(CHILD_MODEL_ENV))
    else {
        return;
    };
    let mut c = Client::connect(Path::new(&socket), "doomed").expect("connect");
    let m = c.open_model(Path::new(&model)).expect("open");
    for (component, layer, _) in layers_of(&m).into_iter().take(3) {
        let l = acquire(&mut c, m.model, &component, layer);
        wait_ready(&mut c, l.lease);
    }
    println!("\nHOLDING");
    std::io::stdout().flush().expect("flush");
    // The parent kills us long before this.
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_client_killed_with_sigkill_gives_its_leases_back() {
    let mut d = Daemon::start(16 << 10);
    let mut b = d.client("survivor");
    let m = b.open_model(&d.model).expect("open");
    b.set_residency(m.model, None, Policy::None).expect("policy none");
    let before = b.stats().expect("stats").device_bytes;

    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--exact", "child_mode_holder", "--nocapture", "--test-threads=1"])
        .env(CHILD_SOCKET_ENV, &d.socket)
        .env(CHILD_MODEL_ENV, &d.model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child");
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let start = Instant::now();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read the child's stdout");
        assert!(n > 0, "the child ended before holding its leases: {:?}", child.wait());
        if line.contains("HOLDING") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the child never held its leases");
    }
    let child_client = b.list_clients().expect("clients").into_iter().find(|c| c.pid == pid);
    assert_eq!(child_client.map(|c| c.leases), Some(3), "the child holds 3 leases");
    let e = b.set_residency(m.model, None, Policy::None).expect_err("busy while leased");
    assert_eq!(server_code(&e), Some(ErrorCode::Busy), "{e}");

    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0, "kill");
    let killed = Instant::now();
    let status = child.wait().expect("reap the child");
    assert!(!status.success(), "killed: {status:?}");
    let mut gone = false;
    let mut freed = false;
    while killed.elapsed() < Duration::from_secs(1) {
        gone = gone || b.list_clients().expect("clients").iter().all(|c| c.pid != pid);
        if gone && !freed {
            match b.set_residency(m.model, None, Policy::None) {
                Ok(()) => freed = true,
                Err(e) if server_code(&e) == Some(ErrorCode::Busy) => {}
                Err(e) => panic!("set_residency: {e}"),
            }
        }
        if gone && freed {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = killed.elapsed();
    assert!(gone, "ListClients still shows the killed client after {took:?}");
    assert!(freed, "the killed client's leases still block set_residency after {took:?}");
    let after = b.stats().expect("stats");
    assert_eq!(after.device_bytes, before, "the budget is back");
    assert!(after.peak_device_bytes <= after.budget);
    d.assert_alive();
}

#[test]
fn sixty_four_clients_hammering_acquire_release_balanced() {
    hammer(|layer_bytes| Policy::Balanced { threshold: Threshold::Bytes(3 * layer_bytes) });
}

#[test]
fn sixty_four_clients_hammering_acquire_release_sequential() {
    hammer(|_| Policy::Sequential { lookahead: 2 });
}

/// 64 clients, each on its own connection, doing acquire/release cycles of random layers under
/// `policy` (given the largest layer's bytes), with a sample of the bytes checked through the
/// mapped arena, a watchdog, and the peak within the budget.
fn hammer(policy: impl Fn(u64) -> Policy) {
    const CLIENTS: usize = 64;
    // Debug builds on a 2-core machine: 11 s unloaded, up to 100 s under heavy load for the
    // 64,000 cycles. The watchdog fails a run in which no cycle completes for STALL (a
    // deadlock), or that is not done within WATCHDOG.
    const CYCLES: usize = 1000;
    const SAMPLE_EVERY: usize = 16;
    const WATCHDOG: Duration = Duration::from_secs(240);
    const STALL: Duration = Duration::from_secs(20);

    let mut d = Daemon::start(64 << 10);
    let mut setup = d.client("setup");
    let m = setup.open_model(&d.model).expect("open");
    let layers = layers_of(&m);
    assert_eq!(layers.len(), LAYERS);
    let layer_bytes: u64 =
        m.components.iter().flat_map(|c| &c.layers).map(|l| l.bytes).max().expect("layers");
    setup.set_residency(m.model, None, policy(layer_bytes)).expect("policy");
    let map = Arc::new(map_arena(&mut setup));
    d.assert_alive();
    // If this thread panics while client threads still hold the daemon, kill it anyway.
    let guard = KillOnDrop(d.child.id());
    let d = Arc::new(d);
    let layers = Arc::new(layers);

    let (tx, rx) = std::sync::mpsc::channel::<(usize, std::thread::Result<usize>)>();
    let progress = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    for t in 0..CLIENTS {
        let (d, map, layers, tx) =
            (Arc::clone(&d), Arc::clone(&map), Arc::clone(&layers), tx.clone());
        let model = m.model;
        let progress = Arc::clone(&progress);
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut c = d.client(&format!("hammer-{t}"));
                assert_eq!(c.open_model(&d.model).expect("open").model, model);
                let mut rng =
                    0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut checked = 0;
                for i in 0..CYCLES {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let (component, layer, name) = &layers[(rng % LAYERS as u64) as usize];
                    let l = acquire(&mut c, model, component, *layer);
                    assert_eq!(&l.layer, name, "client {t} cycle {i}");
                    assert_eq!(l.tensors.len(), 2, "client {t} cycle {i}");
                    if i % SAMPLE_EVERY == t % SAMPLE_EVERY {
                        check_bytes(&d, &mut c, &map, &l);
                        checked += 1;
                    } else {
                        for tensor in &l.tensors {
                            assert_eq!(tensor.len as usize, d.bytes_of(&tensor.name).len());
                        }
                    }
                    release(&mut c, model, l.lease);
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                checked
            }));
            // Our references go before the parent is told, so it can take the daemon back.
            drop((d, map, layers));
            let _ = tx.send((t, r));
        });
    }
    drop(tx);
    let mut checked = 0;
    let mut done = 0;
    let (mut seen, mut seen_at) = (0, Instant::now());
    while done < CLIENTS {
        let now = progress.load(Ordering::Relaxed);
        if now != seen {
            (seen, seen_at) = (now, Instant::now());
        }
        if seen_at.elapsed() >= STALL {
            let mut probe =
                Client::connect_with_timeout(&d.socket, "probe", Some(Duration::from_secs(5)));
            let stats = probe
                .as_mut()
                .map_err(|e| e.to_string())
                .and_then(|p| p.stats().map_err(|e| e.to_string()));
            let clients = probe
                .as_mut()
                .map_err(|e| e.to_string())
                .and_then(|p| p.list_clients().map_err(|e| e.to_string()));
            panic!(
                "no cycle completed for {STALL:?} at {now}: deadlock? stats {stats:?} clients {clients:?}"
            );
        }
        assert!(start.elapsed() < WATCHDOG, "not done after {WATCHDOG:?} ({now} cycles)");
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok((_, Ok(n))) => {
                checked += n;
                done += 1;
            }
            Ok((t, Err(p))) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("client {t} failed: {msg}");
            }
            Err(_) => {}
        }
    }
    let took = start.elapsed();
    eprintln!(
        "{CLIENTS} clients x {CYCLES} acquire/release cycles in {took:.2?} ({checked} byte checks)"
    );
    let mut d = Arc::try_unwrap(d).unwrap_or_else(|_| panic!("threads are done"));
    std::mem::forget(guard);
    let st = setup.stats().expect("stats");
    assert!(st.acquires >= (CLIENTS * CYCLES) as u64, "{st:?}");
    assert!(
        st.peak_device_bytes <= st.budget,
        "peak {} over budget {}",
        st.peak_device_bytes,
        st.budget
    );
    let me = setup.list_clients().expect("clients");
    assert!(me.iter().all(|c| c.leases == 0), "no lease left behind: {me:?}");
    d.assert_alive();
}
