//! Streaming benchmarks on a synthetic model, each against a baseline measured in the same run.
//!
//! Shared by `ferryctl bench` and the criterion bench `engine_stream`:
//!
//! - **throughput**: one pass streaming every layer (acquire, wait, release; no compute) from a
//!   warm page cache, against a plain `memcpy` of the same bytes out of the same mapping.
//! - **overlap**: a sequential pass where each layer "computes" (a calibrated busy loop) for as
//!   long as its copy takes, against `max(Σ compute, Σ copy)`: the ratio is 1 when copies hide
//!   entirely behind compute, 2 when nothing overlaps.
//! - **balanced**: bytes moved per pass by `balanced` on a cyclic workload with the model at
//!   1.5× the threshold, against the minimum (model − resident set), with LRU's bytes on the
//!   same trace beside it.
//!
//! The offload table (every policy × LoRA mode on a real or synthetic model, `ferryctl bench
//! MODEL | --synthetic ARCH`) is in [`offload`], its models in [`synthetic`], its plot in
//! [`plot`]; [`cli`] is `ferryctl bench` itself.

pub mod cli;
pub mod offload;
pub mod plot;
pub mod synthetic;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::device::{ClientDone, DeviceChoice, DeviceConfig};
use crate::engine::policy::{PolicySpec, Threshold};
use crate::engine::{Engine, EngineConfig, EngineError, ModelId};

/// The synthetic model and how to stream it.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub layers: usize,
    pub layer_bytes: usize,
    /// Where the model file is written.
    pub dir: PathBuf,
    pub device: DeviceChoice,
    /// Passes timed per measurement (the best is kept).
    pub passes: usize,
}

/// One benchmark's result: ferry's figure, the baseline's, and their ratio.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub name: &'static str,
    pub ferry: f64,
    pub baseline: f64,
    pub unit: &'static str,
    /// `ferry / baseline`.
    pub ratio: f64,
    /// What the ratio should be (`≥` for throughput, `≤` for the others).
    pub target: &'static str,
    pub met: bool,
}

/// All three results.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub backend: String,
    pub model_bytes: u64,
    pub layers: usize,
    /// Copy engine reading the mapping in place (CUDA: registered mmap; host: direct copies).
    pub throughput: Ratio,
    /// Through the pinned staging ring (the fallback path: one more copy).
    pub throughput_staged: Ratio,
    pub overlap: Ratio,
    pub balanced: Ratio,
    /// LRU's bytes per pass on the balanced trace.
    pub lru_bytes_per_pass: u64,
    pub balanced_resident_bytes: u64,
}

/// The header of a model of `layers` U8 tensors `blocks.N.weight` of `layer_bytes` each, laid
/// end to end: the 8-byte length and the JSON, padded so that the data starts 8-aligned. The
/// data (`layers × layer_bytes` bytes) follows.
pub fn uniform_header(layers: usize, layer_bytes: usize) -> Vec<u8> {
    let mut json = String::from("{");
    for l in 0..layers {
        let (b, e) = (l * layer_bytes, (l + 1) * layer_bytes);
        if l > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            r#""blocks.{l}.weight":{{"dtype":"U8","shape":[{layer_bytes}],"data_offsets":[{b},{e}]}}"#
        ));
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

/// Writes the synthetic model (`layers` layers of one U8 tensor each, pseudo-random bytes).
pub fn write_model(dir: &Path, layers: usize, layer_bytes: usize) -> Result<PathBuf, EngineError> {
    let path = dir.join(format!("ferry-bench-{layers}x{layer_bytes}.safetensors"));
    if path.exists() {
        return Ok(path);
    }
    let io = |e: std::io::Error| EngineError::Config(format!("writing the bench model: {e}"));
    let total = layers
        .checked_mul(layer_bytes)
        .ok_or_else(|| EngineError::Config("the bench model's size overflows".into()))?;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        f.write_all(&uniform_header(layers, layer_bytes)).map_err(io)?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = total;
        while left > 0 {
            for b in chunk.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            let n = left.min(chunk.len());
            f.write_all(&chunk[..n]).map_err(io)?;
            left -= n;
        }
        f.flush().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(path)
}

/// An engine for the benchmarks: `budget` bytes, one copy engine and one I/O thread.
pub fn engine(cfg: &BenchConfig, budget: u64, mapped_reads: bool) -> Result<Engine, EngineError> {
    Engine::new(EngineConfig {
        device: cfg.device,
        device_config: DeviceConfig {
            host_memory: budget.saturating_mul(2),
            mapped_reads,
            // One copy engine and one I/O thread: the busy loop of the overlap bench takes
            // the other core of a small machine.
            host_copy_threads: 1,
            ..DeviceConfig::default()
        },
        budget: Some(budget),
        io_threads: 1,
        staging_slots: 4,
        staging_slot_bytes: 8 << 20,
        acquire_timeout: Duration::from_secs(120),
        ..EngineConfig::default()
    })
}

/// One pass over every layer; `compute` runs between acquire-ready and release.
pub fn pass(
    e: &Engine,
    id: ModelId,
    layers: usize,
    compute: Duration,
) -> Result<Duration, EngineError> {
    let start = Instant::now();
    for l in 0..layers {
        let lease = e.acquire(id, "model", l)?;
        lease.wait_ready()?;
        spin(compute);
        e.release(lease, ClientDone::Now)?;
    }
    Ok(start.elapsed())
}

/// A busy loop standing in for a kernel: it keeps a core busy, as real compute would.
fn spin(d: Duration) {
    if d.is_zero() {
        return;
    }
    let end = Instant::now() + d;
    let mut x = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

/// Best time to `memcpy` the model's bytes out of its mapping into a destination as large as
/// the engine's window (4 layers, reused in turn, touched once before timing), so that both
/// sides write the same amount of memory that the caches cannot hold.
pub fn memcpy_time(
    path: &Path,
    layer_bytes: usize,
    passes: usize,
) -> Result<Duration, EngineError> {
    let model = crate::store::Model::open(path)?;
    let mut window: Vec<Vec<u8>> = (0..4).map(|_| vec![1u8; layer_bytes]).collect();
    let mut best = Duration::MAX;
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        for id in 0..model.tensors().len() {
            if let Some(src) = model.tensor_bytes(id) {
                let dst = &mut window[id % 4];
                dst[..src.len()].copy_from_slice(src);
                std::hint::black_box(&dst);
            }
        }
        best = best.min(start.elapsed());
    }
    Ok(best)
}

fn ratio(
    name: &'static str,
    ferry: f64,
    baseline: f64,
    unit: &'static str,
    target: &'static str,
    met: impl Fn(f64) -> bool,
) -> Ratio {
    let r = if baseline > 0.0 { ferry / baseline } else { f64::NAN };
    Ratio { name, ferry, baseline, unit, ratio: r, target, met: met(r) }
}

/// Runs the three benchmarks.
pub fn run(cfg: &BenchConfig) -> Result<Report, EngineError> {
    let model_bytes = (cfg.layers as u64)
        .checked_mul(cfg.layer_bytes as u64)
        .ok_or_else(|| EngineError::Config("the bench model's size overflows".into()))?;
    let path = write_model(&cfg.dir, cfg.layers, cfg.layer_bytes)?;
    let layer_dev = crate::engine::alloc::align_up(cfg.layer_bytes as u64).unwrap_or(u64::MAX);

    // (a) throughput: sequential, lookahead 2, no compute; through the staging ring too.
    let memcpy = memcpy_time(&path, cfg.layer_bytes, cfg.passes)?;
    let gbs = |d: Duration| model_bytes as f64 / d.as_secs_f64().max(1e-12) / 1e9;
    let best_pass = |e: &Engine, id: ModelId| -> Result<Duration, EngineError> {
        e.set_residency(id, None, PolicySpec::Sequential { lookahead: 2 })?;
        pass(e, id, cfg.layers, Duration::ZERO)?; // warm the page cache, the arena and the ring
        let mut best = Duration::MAX;
        for _ in 0..cfg.passes.max(1) {
            best = best.min(pass(e, id, cfg.layers, Duration::ZERO)?);
        }
        Ok(best)
    };
    let staged = {
        let e = engine(cfg, 4 * layer_dev, false)?;
        let id = e.open_model(&path)?;
        best_pass(&e, id)?
    };
    let throughput_staged = ratio("staged", gbs(staged), gbs(memcpy), "GB/s", "(info)", |_| true);
    let e = engine(cfg, 4 * layer_dev, true)?;
    let backend = e.device_info().backend.to_string();
    let id = e.open_model(&path)?;
    let best = best_pass(&e, id)?;
    let throughput = ratio("throughput", gbs(best), gbs(memcpy), "GB/s", "≥ 0.8", |r| r >= 0.8);

    // (b) overlap: compute per layer = its copy time.
    let copy_per_layer = best / cfg.layers.max(1) as u32;
    e.set_residency(id, None, PolicySpec::Sequential { lookahead: 1 })?;
    pass(&e, id, cfg.layers, copy_per_layer)?;
    let mut pass_time = Duration::MAX;
    for _ in 0..cfg.passes.max(1) {
        pass_time = pass_time.min(pass(&e, id, cfg.layers, copy_per_layer)?);
    }
    let ideal = (copy_per_layer * cfg.layers as u32).max(best);
    let overlap = ratio(
        "overlap",
        pass_time.as_secs_f64() * 1e3,
        ideal.as_secs_f64() * 1e3,
        "ms/pass",
        "≤ 1.1",
        |r| r <= 1.1,
    );
    drop(e);

    // (c) balanced vs LRU, model at 1.5× the threshold.
    let threshold = (cfg.layers as u64 * layer_dev) * 2 / 3;
    let per_pass = |spec: PolicySpec| -> Result<(u64, u64), EngineError> {
        let e = engine(cfg, threshold + 2 * layer_dev, true)?;
        let id = e.open_model(&path)?;
        e.set_residency(id, None, spec)?;
        pass(&e, id, cfg.layers, Duration::ZERO)?;
        let before = e.stats().bytes_streamed;
        let passes = cfg.passes.max(1) as u64;
        for _ in 0..passes {
            pass(&e, id, cfg.layers, Duration::ZERO)?;
        }
        let moved = (e.stats().bytes_streamed - before) / passes;
        let kept = e.kept_layers(id)?.len() as u64;
        Ok((moved, kept))
    };
    let (bal_moved, kept) =
        per_pass(PolicySpec::Balanced { threshold: Threshold::Bytes(threshold) })?;
    // The minimum: every layer outside balanced's resident set, once per pass.
    let minimum = model_bytes - kept * cfg.layer_bytes as u64;
    let (lru_moved, _) = per_pass(PolicySpec::Lru { threshold: Threshold::Bytes(threshold) })?;
    let balanced = ratio(
        "balanced",
        bal_moved as f64 / 1e6,
        minimum as f64 / 1e6,
        "MB/pass",
        "≤ 1.05",
        |r| r <= 1.05,
    );
    Ok(Report {
        backend,
        model_bytes,
        layers: cfg.layers,
        throughput,
        throughput_staged,
        overlap,
        balanced,
        lru_bytes_per_pass: lru_moved,
        balanced_resident_bytes: kept * cfg.layer_bytes as u64,
    })
}

/// The report as the table `ferryctl bench` prints.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "ferry bench: {} backend, synthetic model of {} layers, {}\n\n",
        r.backend,
        r.layers,
        crate::units::bytes(r.model_bytes)
    );
    out.push_str(&format!(
        "{:<11} {:>18} {:>18} {:>7} {:>7}  {}\n",
        "benchmark", "ferry", "baseline", "ratio", "target", "baseline is"
    ));
    let rows = [
        (&r.throughput, "memcpy of the same bytes"),
        (&r.throughput_staged, "memcpy (staging ring path)"),
        (&r.overlap, "max(Σcompute, Σcopy)"),
        (&r.balanced, "model − resident set"),
    ];
    for (x, what) in rows {
        out.push_str(&format!(
            "{:<11} {:>10.2} {:<7} {:>10.2} {:<7} {:>7.3} {:>7}  {}{}\n",
            x.name,
            x.ferry,
            x.unit,
            x.baseline,
            x.unit,
            x.ratio,
            x.target,
            what,
            if x.met { "" } else { "  (target missed)" }
        ));
    }
    out.push_str(&format!(
        "\nLRU on the balanced trace moves {:.2} MB/pass ({:.2}x balanced).\n",
        r.lru_bytes_per_pass as f64 / 1e6,
        r.lru_bytes_per_pass as f64 / (r.balanced.ferry * 1e6).max(1.0)
    ));
    out
}

// ─── LoRA overhead (the SD.Next table) ────────────────────────────────────────────────────────

/// One row: a policy × LoRA mode, seconds per pass, and the overhead over the same policy
/// without LoRA.
#[derive(Clone, Debug, Serialize)]
pub struct LoraRow {
    pub policy: String,
    pub mode: String,
    pub first_pass_s: f64,
    pub later_pass_s: f64,
    pub first_overhead_s: f64,
    pub later_overhead_s: f64,
}

struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn values(seed: u64, n: usize, amplitude: f32) -> impl Iterator<Item = f32> {
    let mut x = seed | 1;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amplitude
    })
}

fn write_raw(path: &Path, tensors: Vec<(String, RawTensor)>) -> Result<(), EngineError> {
    safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.as_str(), t)), None, path)
        .map_err(|e| EngineError::Config(format!("writing {}: {e}", path.display())))
}

/// An SDXL-shaped synthetic model (`layers` blocks of one `dim`×`dim` f16 weight) and two
/// rank-16 LoRAs over every block; returns the paths.
pub fn write_lora_model(
    dir: &Path,
    layers: usize,
    dim: usize,
) -> Result<(PathBuf, [PathBuf; 2]), EngineError> {
    let base = dir.join(format!("ferry-lora-bench-{layers}x{dim}.safetensors"));
    let weights = (0..layers)
        .map(|l| {
            let data = values(l as u64 + 1, dim * dim, 0.05)
                .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            let t = RawTensor { dtype: safetensors::Dtype::F16, shape: vec![dim, dim], data };
            (format!("blocks.{l}.proj.weight"), t)
        })
        .collect();
    write_raw(&base, weights)?;
    let rank = 16;
    let mut loras = Vec::new();
    for k in 0..2u64 {
        let path = dir.join(format!("ferry-lora-bench-{k}.safetensors"));
        let mut tensors = Vec::new();
        for l in 0..layers {
            for (factor, shape) in [("lora_A", [rank, dim]), ("lora_B", [dim, rank])] {
                let data = values(1000 * (k + 1) + l as u64, shape[0] * shape[1], 0.02)
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                let t = RawTensor { dtype: safetensors::Dtype::F32, shape: shape.to_vec(), data };
                tensors.push((format!("blocks.{l}.proj.{factor}.weight"), t));
            }
        }
        write_raw(&path, tensors)?;
        loras.push(path);
    }
    let [a, b]: [PathBuf; 2] =
        loras.try_into().map_err(|_| EngineError::Config("two LoRAs expected".into()))?;
    Ok((base, [a, b]))
}

/// For each policy × {no LoRA, backup, fuse}: the first pass and the mean of later passes over
/// a synthetic model with two LoRAs, and the overhead over the same policy without LoRA.
pub fn lora_table(cfg: &BenchConfig, dim: usize) -> Result<Vec<LoraRow>, EngineError> {
    use crate::engine::lora_view::LoraMode;
    let (base, [l1, l2]) = write_lora_model(&cfg.dir, cfg.layers, dim)?;
    let layer = (dim * dim * 2) as u64;
    let model = layer * cfg.layers as u64;
    let policies = [
        ("none", PolicySpec::None),
        ("sequential", PolicySpec::Sequential { lookahead: 1 }),
        ("balanced", PolicySpec::Balanced { threshold: Threshold::Bytes(model / 2 + 2 * layer) }),
    ];
    let mut rows = Vec::new();
    for (pname, spec) in policies {
        let mut baseline = (0.0, 0.0);
        for mode in [None, Some(LoraMode::Backup), Some(LoraMode::Fuse)] {
            let e = engine(cfg, model + 4 * layer, true)?;
            let id = e.open_model(&base)?;
            if let Some(m) = mode {
                e.set_loras(id, &[(l1.clone(), 0.8), (l2.clone(), 0.5)], m)?;
            }
            let start = Instant::now();
            e.set_residency(id, None, spec)?;
            pass(&e, id, cfg.layers, Duration::ZERO)?;
            let first = start.elapsed().as_secs_f64();
            let later_passes = cfg.passes.max(1);
            let start = Instant::now();
            for _ in 0..later_passes {
                pass(&e, id, cfg.layers, Duration::ZERO)?;
            }
            let later = start.elapsed().as_secs_f64() / later_passes as f64;
            if mode.is_none() {
                baseline = (first, later);
            }
            rows.push(LoraRow {
                policy: pname.to_string(),
                mode: mode
                    .map_or("no LoRA", |m| match m {
                        LoraMode::Backup => "backup",
                        LoraMode::Fuse => "fuse",
                    })
                    .to_string(),
                first_pass_s: first,
                later_pass_s: later,
                first_overhead_s: first - baseline.0,
                later_overhead_s: later - baseline.1,
            });
        }
    }
    Ok(rows)
}

/// The LoRA table as `ferryctl bench --lora` prints it.
pub fn render_lora(rows: &[LoraRow], layers: usize, dim: usize) -> String {
    let mut out = format!(
        "LoRA overhead: {layers} layers of {dim}x{dim} f16, two rank-16 LoRAs (strengths 0.8, 0.5)\n\n"
    );
    out.push_str(&format!(
        "{:<11} {:<8} {:>12} {:>12} {:>15} {:>15}\n",
        "policy", "lora", "first pass", "later pass", "overhead first", "overhead later"
    ));
    for r in rows {
        out.push_str(&format!(
            "{:<11} {:<8} {:>10.3} s {:>10.3} s {:>13.3} s {:>13.3} s\n",
            r.policy,
            r.mode,
            r.first_pass_s,
            r.later_pass_s,
            r.first_overhead_s,
            r.later_overhead_s
        ));
    }
    out
}
