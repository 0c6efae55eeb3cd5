//! `engine_stream`: streaming on the host backend against baselines from the same run.
//!
//! Criterion times one sequential pass over a synthetic model (acquire, wait, release every
//! layer) and a plain memcpy of the same bytes; then the full `ferry::bench` report prints the
//! three ratios the engine is held to: throughput vs memcpy (≥ 0.8), a pass with compute equal
//! to copy time vs max(Σcompute, Σcopy) (≤ 1.1), balanced's bytes per pass vs the minimum
//! (≤ 1.05) with LRU's beside it.
//!
//! Run: `cargo bench --bench engine_stream`. `ferryctl bench` prints the same report.

use std::time::Duration;

use criterion::Criterion;
use ferry::bench::{self, BenchConfig};
use ferry::device::DeviceChoice;
use ferry::engine::policy::PolicySpec;

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().expect("tempdir");
    // Under `cargo test` the bench runs once on a small model.
    let (layers, layer_bytes) = if bench_mode { (32, 16 << 20) } else { (8, 256 << 10) };
    let cfg = BenchConfig {
        layers,
        layer_bytes,
        dir: dir.path().to_path_buf(),
        device: DeviceChoice::Host,
        passes: if bench_mode { 5 } else { 1 },
    };
    let path = bench::write_model(&cfg.dir, layers, layer_bytes).expect("model");
    let layer_dev = ferry::engine::alloc::align_up(layer_bytes as u64).expect("size");

    let mut c = Criterion::default().configure_from_args();
    {
        let e = bench::engine(&cfg, 4 * layer_dev, true).expect("engine");
        let id = e.open_model(&path).expect("open");
        e.set_residency(id, None, PolicySpec::Sequential { lookahead: 2 }).expect("policy");
        let mut g = c.benchmark_group("engine_stream");
        g.sample_size(10);
        g.throughput(criterion::Throughput::Bytes((layers * layer_bytes) as u64));
        g.bench_function("sequential_pass", |b| {
            b.iter(|| bench::pass(&e, id, layers, Duration::ZERO).expect("pass"))
        });
        g.bench_function("memcpy_baseline", |b| {
            b.iter_custom(|iters| {
                (0..iters).map(|_| bench::memcpy_time(&path, layer_bytes, 1).expect("memcpy")).sum()
            })
        });
        g.finish();
    }
    c.final_summary();

    let report = bench::run(&cfg).expect("bench");
    println!("\n{}", bench::render(&report));
    if !bench_mode {
        println!(
            "(smoke run under `cargo test`: a 2 MiB model in a debug build; the figures mean nothing)"
        );
    }
}
