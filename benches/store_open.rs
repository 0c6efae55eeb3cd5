//! `store_open`: opening a 1,000-tensor, 8-shard model (header parse + mmap) against a naive
//! loader that reads every file into memory and parses it with the `safetensors` crate.
//! Prints the ratio of the two, measured in the same run.
//!
//! Run: `cargo bench --bench store_open`.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use ferry::Dtype;
use ferry_tests::{Tensor, write_sharded};

const TENSORS: usize = 1000;
const SHARDS: usize = 8;

/// Total time and iterations of each loader over the whole run, for the ratio printed at the end.
static TOTALS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

fn naive_load(index: &Path) -> usize {
    let dir = index.parent().expect("index has a parent");
    let text = std::fs::read_to_string(index).expect("index");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut shards: Vec<&str> =
        v["weight_map"].as_object().expect("map").values().filter_map(|s| s.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    let mut n = 0;
    for s in shards {
        let bytes = std::fs::read(dir.join(s)).expect("read shard");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid");
        n += st.len();
    }
    n
}

fn ferry_open(index: &Path) -> usize {
    ferry::Model::open(index).expect("open").tensors().len()
}

fn timed(name: &'static str, iters: u64, f: impl Fn() -> usize) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        assert_eq!(std::hint::black_box(f()), TENSORS);
    }
    let total = start.elapsed();
    if let Ok(mut t) = TOTALS.lock() {
        match t.iter_mut().find(|(n, ..)| *n == name) {
            Some(entry) => {
                entry.1 += total;
                entry.2 += iters;
            }
            None => t.push((name, total, iters)),
        }
    }
    total
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    // Under `cargo test` the bench runs once on a small model; under `cargo bench`, at 62.5 MiB
    // and 500 MiB, to show that ferry's open time does not grow with the weights.
    let sizes: &[usize] = if bench_mode { &[64 << 10, 512 << 10] } else { &[1 << 10] };
    let mut c = Criterion::default().configure_from_args();
    let mut lines = Vec::new();
    for &tensor_bytes in sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let tensors: Vec<Tensor> = (0..TENSORS)
            .map(|i| {
                let name = format!("model.layers.{}.w{}.weight", i / 10, i % 10);
                Tensor::patterned(name, Dtype::F16, &[tensor_bytes / 2])
            })
            .collect();
        let index = write_sharded(dir.path(), "model", &tensors, SHARDS).expect("write");
        drop(tensors);
        // Warm the page cache so both loaders read from memory, not disk.
        naive_load(&index);
        TOTALS.lock().map(|mut t| t.clear()).unwrap_or_default();

        let mut g = c.benchmark_group("store_open");
        if tensor_bytes > 64 << 10 {
            g.sample_size(10);
        }
        let size = format!("{TENSORS}x{tensor_bytes}");
        g.bench_with_input(BenchmarkId::new("ferry_mmap", &size), &index, |b, index| {
            b.iter_custom(|iters| timed("ferry_mmap", iters, || ferry_open(index)))
        });
        g.bench_with_input(BenchmarkId::new("naive_read_all", &size), &index, |b, index| {
            b.iter_custom(|iters| timed("naive_read_all", iters, || naive_load(index)))
        });
        g.finish();

        let totals = TOTALS.lock().map(|t| t.clone()).unwrap_or_default();
        let get = |n: &str| {
            totals.iter().find(|(k, ..)| *k == n).map(|(_, d, i)| d.div_f64((*i).max(1) as f64))
        };
        if let (Some(f), Some(n)) = (get("ferry_mmap"), get("naive_read_all")) {
            let model_mib = (TENSORS * tensor_bytes) as f64 / (1 << 20) as f64;
            lines.push(format!(
                "store_open: {TENSORS} tensors in {SHARDS} shards ({model_mib:.1} MiB): ferry {:.3} ms, naive read-all {:.3} ms, naive/ferry = {:.1}x",
                f.as_secs_f64() * 1e3,
                n.as_secs_f64() * 1e3,
                n.as_secs_f64() / f.as_secs_f64().max(1e-12)
            ));
        }
    }
    c.final_summary();
    for line in lines {
        println!("{line}");
    }
}
