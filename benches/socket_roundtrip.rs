//! `socket_roundtrip`: what the socket costs. Acquire/release round trips of one resident
//! layer (policy `none`) from one client over ferryd's Unix socket, beside the same
//! acquire/release on an in-process [`Engine`] (host backend, same model), measured in the
//! same run: round trips per second, p50 and p99 latency, and the ratio.
//!
//! A second baseline is the floor of any socket protocol whose two sides sleep in blocking
//! reads: two threads trading fixed 64-byte messages over a socketpair, two exchanges per
//! round trip like acquire + release (no framing, no engine). The socket is measured as
//! shipped (server and client poll briefly before sleeping: `ServerConfig::spin`,
//! `Client::set_spin`) and with polling off, which sleeps like the raw baseline. On a virtual
//! machine, waking a thread that sleeps on an idle vCPU costs tens of microseconds, so
//! sleeping is slow there when the machine is otherwise idle (and, oddly, faster when other
//! work keeps the vCPUs awake); polling is where the socket's speed comes from.
//!
//! The variants run interleaved, in rounds (a slice of each per round), so that a change in
//! the machine's load during the run (other builds) affects all of them alike.
//!
//! Run: `cargo bench --bench socket_roundtrip` (`FERRY_BENCH_ITERATIONS=N` to change the
//! 100,000 iterations per variant). Under `cargo test` (no `--bench` argument) it runs a few
//! iterations only.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry::Dtype;
use ferry::client::Client;
use ferry::device::ClientDone;
use ferry::engine::Engine;
use ferry::engine::policy::PolicySpec;
use ferry::protocol::{Acquire, Message, Policy, Release, WaitReady};
use ferry::server::{Server, ServerConfig};
use ferry_tests::{Tensor, write_file};

const LAYERS: usize = 8;
const LAYER: usize = 3;
/// Each variant's iterations are spread over this many rounds.
const ROUNDS: usize = 20;

/// One variant: a round trip to time, and what was measured.
struct Variant<'a> {
    name: &'static str,
    round_trip: Box<dyn FnMut() + 'a>,
    lat: Vec<Duration>,
    busy: Duration,
}

impl<'a> Variant<'a> {
    fn new(name: &'static str, round_trip: impl FnMut() + 'a) -> Variant<'a> {
        Variant { name, round_trip: Box::new(round_trip), lat: Vec::new(), busy: Duration::ZERO }
    }

    /// `n` timed round trips.
    fn run(&mut self, n: usize) {
        let start = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            (self.round_trip)();
            self.lat.push(t.elapsed());
        }
        self.busy += start.elapsed();
    }

    /// Round trips per second, p50, p99.
    fn figures(&mut self) -> (f64, Duration, Duration) {
        self.lat.sort_unstable();
        let lat = &self.lat;
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        (lat.len() as f64 / self.busy.as_secs_f64(), pct(0.50), pct(0.99))
    }
}

fn engine() -> Engine {
    ferry_tests::host_engine(64 << 20, true, Duration::from_secs(10), 1 << 20)
}

/// A server on `socket` and a connected client with the model open under policy `none` and
/// layer [`LAYER`] resident. `poll`: whether server and client poll before sleeping (their
/// defaults) or sleep at once.
fn socket_setup(model: &Path, root: &Path, socket: &Path, poll: bool) -> (Server, Client, u64) {
    let mut config = ServerConfig::new(socket);
    config.model_roots = vec![root.to_path_buf()];
    if !poll {
        config.spin = Duration::ZERO;
    }
    let server = Server::start(engine(), config).expect("server starts");
    let mut c = Client::connect(socket, "socket_roundtrip").expect("connect");
    if !poll {
        c.set_spin(Duration::ZERO);
    }
    let m = c.open_model(model).expect("open");
    c.set_residency(m.model, None, Policy::None).expect("policy none");
    // Policy none loads every layer at once, asynchronously: wait for ours before timing.
    let acquire = Acquire { model: m.model, component: component_of(&m), layer: LAYER as u32 };
    let Message::Leased(l) = c.call(acquire.into(), &[]).expect("acquire") else {
        panic!("expected leased");
    };
    c.call(WaitReady { lease: l.lease }.into(), &[]).expect("wait_ready");
    c.call(Release { model: m.model, lease: l.lease }.into(), &[]).expect("release");
    (server, c, m.model)
}

fn component_of(m: &ferry::protocol::ModelOpened) -> String {
    m.components[0].name.clone()
}

/// One acquire + release over the socket.
fn socket_round_trip(c: &mut Client, model: u64, component: &str) {
    let acquire = Acquire { model, component: component.to_string(), layer: LAYER as u32 };
    let lease = match c.call(acquire.into(), &[]).expect("acquire") {
        Message::Leased(l) => {
            assert!(l.ready, "policy none: the layer is resident");
            l.lease
        }
        other => panic!("expected leased, got {other:?}"),
    };
    match c.call(Release { model, lease }.into(), &[]).expect("release") {
        Message::Ack(_) => {}
        other => panic!("expected ack, got {other:?}"),
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("FERRY_BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench_mode { 100_000 } else { 50 });
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).expect("root");
    let tensors: Vec<Tensor> = (0..LAYERS)
        .flat_map(|l| {
            [
                Tensor::patterned(format!("blocks.{l}.weight"), Dtype::F16, &[256, 256]),
                Tensor::patterned(format!("blocks.{l}.bias"), Dtype::F16, &[256]),
            ]
        })
        .collect();
    let model = root.join("m.safetensors");
    write_file(&model, &tensors).expect("model");

    // The in-process engine.
    let e = engine();
    let id = e.open_model(&model).expect("open");
    e.set_residency(id, None, PolicySpec::None).expect("policy none");
    let component = e.model(id).expect("model").components()[0].name.clone();
    let lease = e.acquire(id, &component, LAYER).expect("acquire");
    lease.wait_ready().expect("ready");
    e.release(lease, ClientDone::Now).expect("release");

    // The raw floor: an echo thread, two 64-byte exchanges per round trip.
    let (mut raw, mut echo_end) = UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while echo_end.read_exact(&mut buf).is_ok() {
            if echo_end.write_all(&buf).is_err() {
                break;
            }
        }
    });

    let (poll_server, mut poll_client, poll_model) =
        socket_setup(&model, &root, &dir.path().join("poll.sock"), true);
    let (sleep_server, mut sleep_client, sleep_model) =
        socket_setup(&model, &root, &dir.path().join("sleep.sock"), false);
    let sock_component = component.clone();

    let mut variants = [
        Variant::new("in-process engine", || {
            let lease = e.acquire(id, &component, LAYER).expect("acquire");
            assert!(lease.is_ready().expect("ready"), "policy none: the layer is resident");
            e.release(lease, ClientDone::Now).expect("release");
        }),
        Variant::new("raw socketpair", || {
            let mut buf = [7u8; 64];
            for _ in 0..2 {
                raw.write_all(&buf).expect("write");
                raw.read_exact(&mut buf).expect("read");
            }
        }),
        Variant::new("over the socket", || {
            socket_round_trip(&mut poll_client, poll_model, &sock_component);
        }),
        Variant::new("  without polling", || {
            socket_round_trip(&mut sleep_client, sleep_model, &sock_component);
        }),
    ];
    // Warm-up (not counted), then the rounds.
    for v in &mut variants {
        for _ in 0..n / 10 {
            (v.round_trip)();
        }
    }
    let per_round = n.div_ceil(ROUNDS);
    for _ in 0..ROUNDS {
        for v in &mut variants {
            v.run(per_round);
        }
    }
    let figures: Vec<(f64, Duration, Duration)> =
        variants.iter_mut().map(|v| v.figures()).collect();
    let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
    drop(variants);

    println!(
        "socket_roundtrip: acquire+release of one resident layer, {} iterations each, \
         interleaved in {ROUNDS} rounds",
        per_round * ROUNDS
    );
    for (name, (rate, p50, p99)) in names.iter().zip(&figures) {
        println!("  {name:<19}{rate:>10.0} round trips/s   p50 {p50:>9.2?}   p99 {p99:>9.2?}");
    }
    let (s_rate, s50, s99) = figures[2];
    for (what, i) in [("engine", 0), ("raw", 1), ("socket without polling", 3)] {
        let (rate, p50, p99) = figures[i];
        println!(
            "  socket / {what}: {:.3}x throughput, p50 {:.2}x, p99 {:.2}x latency",
            s_rate / rate,
            s50.as_secs_f64() / p50.as_secs_f64(),
            s99.as_secs_f64() / p99.as_secs_f64()
        );
    }
    if !bench_mode {
        println!(
            "(smoke run under `cargo test`: a few iterations in a debug build; the figures mean nothing)"
        );
    }

    poll_client.close().expect("goodbye");
    sleep_client.close().expect("goodbye");
    poll_server.shutdown();
    sleep_server.shutdown();
    drop(raw);
    echo.join().expect("echo thread");
}
