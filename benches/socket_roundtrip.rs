//! `socket_roundtrip`: what the socket costs. Acquire/release round trips of one resident
//! layer (policy `none`) from one client over ferryd's Unix socket, beside the same
//! acquire/release on an in-process [`Engine`] (host backend, same model), measured in the
//! same run: round trips per second, p50 and p99 latency, and the ratio.
//!
//! Run: `cargo bench --bench socket_roundtrip`. Under `cargo test` (no `--bench` argument) it
//! runs a few iterations only.

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

/// Round trips per second, p50, p99 of `n` timed calls of `f` (after `n / 10` warm-up calls).
fn measure(n: usize, mut f: impl FnMut()) -> (f64, Duration, Duration) {
    for _ in 0..n / 10 {
        f();
    }
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f();
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    (n as f64 / total.as_secs_f64(), pct(0.50), pct(0.99))
}

fn engine() -> Engine {
    ferry_tests::host_engine(64 << 20, true, Duration::from_secs(10), 1 << 20)
}

fn socket_side(model: &Path, root: &Path, socket: &Path, n: usize) -> (f64, Duration, Duration) {
    let mut config = ServerConfig::new(socket);
    config.model_roots = vec![root.to_path_buf()];
    let server = Server::start(engine(), config).expect("server starts");
    let mut c = Client::connect(socket, "socket_roundtrip").expect("connect");
    let m = c.open_model(model).expect("open");
    c.set_residency(m.model, None, Policy::None).expect("policy none");
    let component = m.components[0].name.clone();
    let layer = LAYER as u32;
    // Policy none loads every layer at once, asynchronously: wait for ours before timing.
    let acquire = Acquire { model: m.model, component: component.clone(), layer };
    let Message::Leased(l) = c.call(acquire.into(), &[]).expect("acquire") else {
        panic!("expected leased");
    };
    c.call(WaitReady { lease: l.lease }.into(), &[]).expect("wait_ready");
    c.call(Release { model: m.model, lease: l.lease }.into(), &[]).expect("release");
    let r = measure(n, || {
        let acquire = Acquire { model: m.model, component: component.clone(), layer };
        let lease = match c.call(acquire.into(), &[]).expect("acquire") {
            Message::Leased(l) => {
                assert!(l.ready, "policy none: the layer is resident");
                l.lease
            }
            other => panic!("expected leased, got {other:?}"),
        };
        match c.call(Release { model: m.model, lease }.into(), &[]).expect("release") {
            Message::Ack(_) => {}
            other => panic!("expected ack, got {other:?}"),
        }
    });
    c.close().expect("goodbye");
    server.shutdown();
    r
}

fn engine_side(model: &Path, n: usize) -> (f64, Duration, Duration) {
    let e = engine();
    let id = e.open_model(model).expect("open");
    e.set_residency(id, None, PolicySpec::None).expect("policy none");
    let component = e.model(id).expect("model").components()[0].name.clone();
    // Policy none loads every layer at once, asynchronously: wait for ours before timing.
    let lease = e.acquire(id, &component, LAYER).expect("acquire");
    lease.wait_ready().expect("ready");
    e.release(lease, ClientDone::Now).expect("release");
    measure(n, || {
        let lease = e.acquire(id, &component, LAYER).expect("acquire");
        assert!(lease.is_ready().expect("ready"), "policy none: the layer is resident");
        e.release(lease, ClientDone::Now).expect("release");
    })
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let n = if bench_mode { 100_000 } else { 50 };
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

    let (e_rate, e50, e99) = engine_side(&model, n);
    let (s_rate, s50, s99) = socket_side(&model, &root, &dir.path().join("s.sock"), n);
    println!("socket_roundtrip: acquire+release of one resident layer, {n} iterations each");
    println!(
        "  in-process engine: {e_rate:>10.0} round trips/s   p50 {e50:>9.2?}   p99 {e99:>9.2?}"
    );
    println!(
        "  over the socket:   {s_rate:>10.0} round trips/s   p50 {s50:>9.2?}   p99 {s99:>9.2?}"
    );
    println!(
        "  socket / engine:   {:.3}x throughput, p50 {:.1}x, p99 {:.1}x latency",
        s_rate / e_rate,
        s50.as_secs_f64() / e50.as_secs_f64(),
        s99.as_secs_f64() / e99.as_secs_f64()
    );
    if !bench_mode {
        println!(
            "(smoke run under `cargo test`: a few iterations in a debug build; the figures mean nothing)"
        );
    }
}
