//! The offload table: every residency policy × LoRA mode on one model, with simulated compute,
//! measured against baselines from the same run (`ferryctl bench MODEL | --synthetic ARCH`).
//!
//! For each policy (`none`, `component`, `sequential`, `balanced`) and each LoRA mode (none,
//! backup, fuse; two LoRAs), a fresh engine runs one first pass and `passes` later passes over
//! the model. A *pass* acquires every layer in pipeline order (text encoders, the backbone
//! `steps` times, the VAE), waits until it is on the device, "computes", and releases it.
//!
//! - **Compute** is simulated per layer: a busy loop calibrated at start (iterations per
//!   second), run for `compute_ratio ×` the time the layer's bytes take to copy at the
//!   baseline bandwidth. Ratio 1 is the hardest case for overlap (no slack). On CUDA it is the
//!   same host busy loop: the device API has no GEMM to run over the layer's weights yet.
//! - **Budget**: `none` gets the whole model (it keeps everything); the offloading policies get
//!   `budget_fraction` of it. `balanced` uses it all as its threshold; `sequential` keeps a
//!   window of `lookahead + 1` layers.
//! - **Figures** come from the engine's counters ([`crate::engine::Stats`]) between the end of
//!   the first pass and the end of the last: bytes moved, loads, evictions, stall time, hit
//!   rate; the device peak over the whole row; peak RSS (`VmHWM`, reset per row through
//!   `/proc/self/clear_refs`) and the largest anonymous RSS seen at the end of a pass.
//! - **Copy bandwidth** is what the host backend's copy threads achieved while busy (bytes
//!   over the union of their copy spans in the timeline, [`crate::trace`]), beside the
//!   baseline: `memcpy` of the model's bytes out of its mapping on host, a pinned host-to-device
//!   copy on CUDA, both measured in the same run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::synthetic::{self, Arch};
use crate::device::{Backend, ClientDone, Device, DeviceChoice, DeviceConfig};
use crate::engine::lora_view::LoraMode;
use crate::engine::policy::{PolicySpec, Threshold};
use crate::engine::{Engine, EngineConfig, EngineError, ModelId};
use crate::store::Model;
use crate::trace::{self, Recorder, Trace};

/// Which model to measure.
#[derive(Clone, Debug)]
pub enum ModelChoice {
    /// A synthetic model of `arch`, widths divided by `scale`.
    Synthetic { arch: Arch, scale: usize },
    /// A model on disk (file, index or folder).
    Path(PathBuf),
}

/// How to run the table.
#[derive(Clone, Debug)]
pub struct OffloadConfig {
    pub model: ModelChoice,
    /// Where synthetic models and LoRAs are written (and reused from).
    pub dir: PathBuf,
    pub device: DeviceChoice,
    /// Timed passes after the first (at least 1).
    pub passes: usize,
    /// Backbone passes per pass (denoising steps); 1 for models without a backbone.
    pub steps: usize,
    /// Compute per layer as a multiple of its copy time at the baseline bandwidth.
    pub compute_ratio: f64,
    /// Device budget of the offloading policies, as a fraction of the model's device bytes.
    pub budget_fraction: f64,
    /// `sequential`'s lookahead.
    pub lookahead: usize,
    /// Run the LoRA rows (two synthetic LoRAs over the model's attention projections).
    pub loras: bool,
    /// Copy straight from the mapping (`true`) or through the staging ring.
    pub mapped_reads: bool,
    /// Copy threads of the host backend and I/O threads of the pipeline.
    pub copy_threads: usize,
    pub io_threads: usize,
    /// The engine's `acquire_timeout`: how long an acquire that finds no room waits for a
    /// release before trying again (once) and failing.
    pub acquire_timeout: Duration,
    /// Record the timeline (needed for `copy_gbs` and `--trace`).
    pub timeline: bool,
}

impl OffloadConfig {
    /// Defaults for `arch` at `scale` in `dir`.
    pub fn synthetic(arch: Arch, scale: usize, dir: PathBuf) -> OffloadConfig {
        OffloadConfig {
            model: ModelChoice::Synthetic { arch, scale },
            dir,
            device: DeviceChoice::Auto,
            passes: 3,
            steps: 1,
            compute_ratio: 1.0,
            budget_fraction: 0.8,
            lookahead: 1,
            loras: true,
            mapped_reads: true,
            copy_threads: 1,
            io_threads: 1,
            // See `BenchArgs::acquire_timeout`: one lease at a time, so no acquire waits.
            acquire_timeout: Duration::from_secs(30),
            timeline: true,
        }
    }
}

/// Default scale of each synthetic model: 104 MiB (SDXL) to 504 MiB (FLUX), runs of 5–20 s.
pub const DEFAULT_SCALE: usize = 8;

/// Strengths of the two LoRAs.
pub const LORA_STRENGTHS: [f32; 2] = [0.8, 0.5];
/// Their rank (capped by each target's smaller side).
pub const LORA_RANK: usize = 16;

/// One component of the measured model.
#[derive(Clone, Debug, Serialize)]
pub struct ComponentSummary {
    pub name: String,
    pub layers: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// The baseline bandwidth measured in the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// `memcpy` (host) or `pinned H2D` (CUDA).
    pub kind: String,
    pub gbs: f64,
}

/// The LoRAs of the LoRA rows.
#[derive(Clone, Debug, Serialize)]
pub struct LoraSummary {
    pub files: Vec<String>,
    pub strengths: Vec<f32>,
    pub rank: usize,
    /// Base tensors the stack adapts.
    pub adapted_tensors: usize,
    /// Their bytes.
    pub adapted_bytes: u64,
}

/// One policy × LoRA mode.
#[derive(Clone, Debug, Serialize)]
pub struct OffloadRow {
    pub policy: String,
    /// `none`, `backup` or `fuse`.
    pub lora: String,
    /// The engine's device budget for this row.
    pub budget_bytes: u64,
    /// Why the row could not run (a policy that does not fit the budget, for one).
    pub error: Option<String>,
    /// Setting the policy (and the LoRA stack) plus the first pass.
    pub first_pass_s: f64,
    /// Mean of the later passes.
    pub later_pass_s: f64,
    pub passes_per_s: f64,
    /// Over the same policy without LoRA.
    pub lora_overhead_first_s: Option<f64>,
    pub lora_overhead_later_s: Option<f64>,
    /// Bytes copied to the device during the first pass (the policy's initial loads included).
    pub first_pass_bytes: u64,
    /// Bytes copied to the device per later pass.
    pub bytes_per_pass: u64,
    pub loads_per_pass: f64,
    pub evictions_per_pass: f64,
    /// Later passes: acquires that found their layer present.
    pub hit_rate: f64,
    /// Time the client waited for copies or memory, per later pass.
    pub stall_s_per_pass: f64,
    /// The most device bytes allocated at once (never above the budget).
    pub peak_device_bytes: u64,
    /// `VmHWM` over the row: mapped model pages and the host arena count too.
    pub peak_rss_bytes: Option<u64>,
    /// Growth of `RssAnon` over the row: the largest seen at the end of a pass, less what it
    /// was before the row's engine started (the staging ring, the fuse cache, merges; and the
    /// row's share of the timeline buffer, about 200 bytes an event).
    pub anon_rss_bytes: Option<u64>,
    /// Host memory held by fused LoRA layers at the end.
    pub lora_cache_bytes: u64,
    /// Bandwidth of the host copy threads while busy, later passes (`None` on CUDA, or when
    /// nothing was copied).
    pub copy_gbs: Option<f64>,
    /// Layers the policy keeps resident for good, as `component/layer`.
    pub kept_layers: Vec<String>,
    /// LoRA rows: base tensors the stack adapted (matching by the engine), adapters of the
    /// stack that matched nothing.
    pub lora_merged_tensors: Option<usize>,
    pub lora_unmatched: Option<usize>,
}

/// The whole table.
#[derive(Clone, Debug, Serialize)]
pub struct OffloadReport {
    /// `sdxl (synthetic, scale 8)` or the model's path.
    pub model: String,
    pub path: String,
    pub backend: String,
    pub device: String,
    pub synthetic: Option<Arch>,
    pub scale: Option<usize>,
    /// Tensor bytes.
    pub model_bytes: u64,
    /// Bytes on the device with every tensor aligned (what `none` needs).
    pub device_bytes: u64,
    pub tensors: usize,
    pub layers: usize,
    pub components: Vec<ComponentSummary>,
    /// The acquires of one pass, as `component/layer`.
    pub pass: Vec<String>,
    pub steps: usize,
    pub passes: usize,
    pub compute_ratio: f64,
    /// Simulated compute per pass.
    pub compute_s_per_pass: f64,
    pub budget_fraction: f64,
    pub baseline: Baseline,
    pub lora: Option<LoraSummary>,
    pub rows: Vec<OffloadRow>,
    /// How to read the figures (what is simulated, what is not measured).
    pub notes: Vec<String>,
}

/// One acquire of a pass.
#[derive(Clone, Debug)]
struct Step {
    component: String,
    layer: usize,
    label: String,
    bytes: u64,
    /// Busy-loop iterations of its simulated compute.
    iters: u64,
}

/// A busy loop standing in for a kernel, calibrated in iterations per second.
#[derive(Clone, Copy, Debug)]
struct Spinner {
    iters_per_s: f64,
}

impl Spinner {
    fn work(iters: u64) {
        let mut x = 0u64;
        for _ in 0..iters {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        std::hint::black_box(x);
    }

    /// The best of a few ~10 ms runs.
    fn calibrate() -> Spinner {
        let mut best = 0f64;
        let mut iters = 1u64 << 14;
        for _ in 0..8 {
            let start = Instant::now();
            Spinner::work(iters);
            let t = start.elapsed().as_secs_f64().max(1e-9);
            best = best.max(iters as f64 / t);
            if t < 0.01 {
                iters = iters.saturating_mul(2);
            }
        }
        Spinner { iters_per_s: best.max(1.0) }
    }
}

/// Reads a `kB` field of `/proc/self/status`, in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    kb.checked_mul(1024)
}

/// Gives the heap's free memory back to the kernel, so that what one row freed (the last
/// engine's staging ring, its fuse cache) is not counted, resident but unused, in the next.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resets `VmHWM` to the current RSS (Linux: `5` into `/proc/self/clear_refs`).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The model's bytes memcpy'd out of its mapping into a reused 64 MiB window, best of 3, GB/s.
fn memcpy_gbs(model: &Model) -> f64 {
    let window = 64usize << 20;
    let mut dst = vec![1u8; window];
    let mut best = 0f64;
    for _ in 0..3 {
        let mut at = 0usize;
        let mut total = 0u64;
        let start = Instant::now();
        for id in 0..model.tensors().len() {
            let Some(mut src) = model.tensor_bytes(id) else { continue };
            while !src.is_empty() {
                if at == window {
                    at = 0;
                }
                let n = src.len().min(window - at);
                dst[at..at + n].copy_from_slice(&src[..n]);
                std::hint::black_box(&dst);
                at += n;
                total += n as u64;
                src = &src[n..];
            }
        }
        best = best.max(total as f64 / start.elapsed().as_secs_f64().max(1e-9) / 1e9);
    }
    best
}

/// Pinned host memory to device through the backend's own copy engine: 64 MiB copied 8 times
/// per run, best of 3, GB/s.
fn h2d_gbs(device: &Device) -> Result<f64, EngineError> {
    let len = 64usize << 20;
    let mut staging = device.alloc_staging(len)?;
    let fill = vec![0x5au8; len];
    staging.write_at(0, &fill);
    let arena = device.alloc_arena(len as u64)?;
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        for _ in 0..8 {
            // SAFETY: the staging buffer and the arena are both `len` bytes, alive and
            // untouched until the event recorded below has completed (waited right after).
            unsafe { device.copy_h2d_async(staging.as_ptr(), arena.base, len)? };
        }
        device.record()?.wait()?;
        best = best.max(8.0 * len as f64 / start.elapsed().as_secs_f64().max(1e-9) / 1e9);
    }
    drop(arena);
    Ok(best)
}

/// Runs the table. Returns the report and, if a recorder could be started, the timeline of
/// the whole run (one track per thread).
pub fn run(cfg: &OffloadConfig) -> Result<(OffloadReport, Option<Trace>), EngineError> {
    let passes = cfg.passes.max(1);
    let steps = cfg.steps.max(1);
    if !(cfg.budget_fraction > 0.0 && cfg.budget_fraction <= 1.0) {
        return Err(EngineError::Config(format!(
            "the budget fraction must be in (0, 1], not {}",
            cfg.budget_fraction
        )));
    }
    if !(cfg.compute_ratio >= 0.0 && cfg.compute_ratio.is_finite()) {
        return Err(EngineError::Config(format!(
            "the compute ratio must be a finite number ≥ 0, not {}",
            cfg.compute_ratio
        )));
    }
    std::fs::create_dir_all(&cfg.dir)
        .map_err(|e| EngineError::Config(format!("creating {}: {e}", cfg.dir.display())))?;
    let (path, label, arch, scale) = match &cfg.model {
        ModelChoice::Synthetic { arch, scale } => (
            synthetic::write(&cfg.dir, *arch, *scale)?,
            format!("{} (synthetic, scale {scale})", arch.name()),
            Some(*arch),
            Some(*scale),
        ),
        ModelChoice::Path(p) => (p.clone(), p.display().to_string(), None, None),
    };
    let model = Model::open(&path)?;
    let device_bytes: u64 = model
        .tensors()
        .iter()
        .map(|t| crate::engine::alloc::align_up(t.len).unwrap_or(t.len))
        .sum();
    if device_bytes == 0 {
        return Err(EngineError::Config(format!(
            "{} has no tensor bytes to stream",
            path.display()
        )));
    }

    // The baseline, on the device the rows will use.
    let probe = Device::open(
        cfg.device,
        &DeviceConfig { host_memory: 256 << 20, host_copy_threads: 1, ..DeviceConfig::default() },
    )?;
    let backend = probe.info().backend;
    let device_name = probe.info().name.clone();
    let baseline = match backend {
        Backend::Host => Baseline { kind: "memcpy".into(), gbs: memcpy_gbs(&model) },
        _ => {
            // The memcpy also warms the page cache, as on host.
            memcpy_gbs(&model);
            Baseline { kind: "pinned H2D".into(), gbs: h2d_gbs(&probe)? }
        }
    };
    drop(probe);
    let bps = (baseline.gbs * 1e9).max(1.0);

    // The pass: pipeline order, the backbone `steps` times.
    let spinner = Spinner::calibrate();
    let mut plan = Vec::new();
    for comp in model.components() {
        let backbone = matches!(comp.name.as_str(), "unet" | "transformer" | "prior");
        for _ in 0..if backbone { steps } else { 1 } {
            for (li, layer) in comp.layers.iter().enumerate() {
                let secs = cfg.compute_ratio * layer.bytes as f64 / bps;
                plan.push(Step {
                    component: comp.name.clone(),
                    layer: li,
                    label: format!("{}/{}", comp.name, layer.name),
                    bytes: layer.bytes,
                    iters: (secs * spinner.iters_per_s) as u64,
                });
            }
        }
    }
    let compute_s_per_pass = plan.iter().map(|s| s.iters as f64).sum::<f64>() / spinner.iters_per_s;

    // LoRAs over the model's attention projections.
    let lora_targets = if cfg.loras { synthetic::lora_targets(&model).len() } else { 0 };
    let lora = if lora_targets > 0 {
        let stem = match (arch, scale) {
            (Some(a), Some(s)) => format!("ferry-synthetic-{}-scale{s}", a.name()),
            _ => format!("ferry-bench-{}", model.key().short_id()),
        };
        let files = synthetic::write_loras(&model, &cfg.dir, &stem, 2, LORA_RANK)?;
        let targets = synthetic::lora_targets(&model);
        let adapted_bytes = targets
            .iter()
            .filter_map(|(c, m, _, _)| model.find(c, &format!("{m}.weight")))
            .filter_map(|t| model.tensor(t))
            .map(|t| t.len)
            .sum();
        Some(LoraSummary {
            files: files.iter().map(|p| p.display().to_string()).collect(),
            strengths: LORA_STRENGTHS.to_vec(),
            rank: LORA_RANK,
            adapted_tensors: targets.len(),
            adapted_bytes,
        })
    } else {
        None
    };
    let stack: Vec<(PathBuf, f32)> = lora
        .iter()
        .flat_map(|l| l.files.iter().zip(&l.strengths))
        .map(|(f, s)| (PathBuf::from(f), *s))
        .collect();

    let offload_budget = crate::engine::alloc::align_up(
        ((device_bytes as f64 * cfg.budget_fraction).ceil() as u64).min(device_bytes),
    )
    .unwrap_or(device_bytes);
    let recorder = if cfg.timeline { Recorder::start(trace::DEFAULT_LIMIT).ok() } else { None };
    trace::set_thread_name("client (compute)");
    let mut rows = Vec::new();
    let policies: [(&str, PolicySpec, u64); 4] = [
        ("none", PolicySpec::None, device_bytes),
        ("component", PolicySpec::Component, offload_budget),
        ("sequential", PolicySpec::Sequential { lookahead: cfg.lookahead }, offload_budget),
        (
            "balanced",
            PolicySpec::Balanced { threshold: Threshold::Bytes(offload_budget) },
            offload_budget,
        ),
    ];
    let modes: Vec<Option<LoraMode>> = if lora.is_some() {
        vec![None, Some(LoraMode::Backup), Some(LoraMode::Fuse)]
    } else {
        vec![None]
    };
    for (name, spec, budget) in policies {
        let mut base: Option<(f64, f64)> = None;
        for &mode in &modes {
            let row_cfg = RowConfig {
                cfg,
                path: &path,
                plan: &plan,
                policy: name,
                spec,
                budget,
                mode,
                stack: &stack,
                passes,
                recorder: recorder.as_ref(),
                host: backend == Backend::Host,
            };
            let mut row = run_row(&row_cfg);
            if row.error.is_none() {
                match (mode, base) {
                    (None, _) => base = Some((row.first_pass_s, row.later_pass_s)),
                    (Some(_), Some((f, l))) => {
                        row.lora_overhead_first_s = Some(row.first_pass_s - f);
                        row.lora_overhead_later_s = Some(row.later_pass_s - l);
                    }
                    (Some(_), None) => {}
                }
            }
            rows.push(row);
        }
    }
    let trace = recorder.map(Recorder::finish);

    let mut notes = Vec::new();
    if cfg.loras && lora_targets == 0 {
        notes.push(
            "no LoRA rows: the model has no attention projection (2-D float `…to_q/q_proj/….weight`) a LoRA could adapt".to_string(),
        );
    }
    notes.extend([
        format!(
            "compute: a calibrated busy loop on the calling thread, {:.2} × each layer's copy time at the baseline ({:.1} ms per pass){}",
            cfg.compute_ratio,
            compute_s_per_pass * 1e3,
            if backend == Backend::Host {
                ""
            } else {
                "; on CUDA too, since the device API has no GEMM yet (a real GEMM over the layer's weights needs cuBLAS in the backend)"
            }
        ),
        format!(
            "budget: `none` {} (the whole model), the offloading policies {} ({:.0}% of the model)",
            crate::units::bytes(device_bytes),
            crate::units::bytes(offload_budget),
            cfg.budget_fraction * 100.0
        ),
        "bytes moved, loads, stall: engine counters over the later passes, per pass".into(),
        "peak RSS (VmHWM, reset per row) counts the mapped model pages the copies read and the host arena; anon RSS is what the row added to the process's own heap (staging ring, fuse cache, merges, the row's timeline events)".into(),
    ]);
    notes.push(match backend {
        Backend::Host => format!(
            "copy GB/s: bytes over the busy time of the host copy threads (timeline spans), beside {} of the model's bytes in the same run",
            baseline.kind
        ),
        _ => "copy GB/s: not measured on CUDA (needs device event timing, not in the device API); the baseline is a pinned host-to-device copy".into(),
    });
    let components = model
        .components()
        .iter()
        .map(|c| ComponentSummary {
            name: c.name.clone(),
            layers: c.layers.len(),
            tensors: c.tensor_count(),
            bytes: c.bytes,
        })
        .collect();
    let report = OffloadReport {
        model: label,
        path: path.display().to_string(),
        backend: backend.to_string(),
        device: device_name,
        synthetic: arch,
        scale,
        model_bytes: model.total_bytes(),
        device_bytes,
        tensors: model.tensors().len(),
        layers: model.components().iter().map(|c| c.layers.len()).sum(),
        components,
        pass: plan.iter().map(|s| s.label.clone()).collect(),
        steps,
        passes,
        compute_ratio: cfg.compute_ratio,
        compute_s_per_pass,
        budget_fraction: cfg.budget_fraction,
        baseline,
        lora,
        rows,
        notes,
    };
    Ok((report, trace))
}

struct RowConfig<'a> {
    cfg: &'a OffloadConfig,
    path: &'a Path,
    plan: &'a [Step],
    policy: &'static str,
    spec: PolicySpec,
    budget: u64,
    mode: Option<LoraMode>,
    stack: &'a [(PathBuf, f32)],
    passes: usize,
    recorder: Option<&'a Recorder>,
    host: bool,
}

fn mode_name(mode: Option<LoraMode>) -> &'static str {
    match mode {
        None => "none",
        Some(LoraMode::Backup) => "backup",
        Some(LoraMode::Fuse) => "fuse",
    }
}

/// One row; an error (a policy that cannot work in the budget) becomes the row's `error`.
fn run_row(r: &RowConfig<'_>) -> OffloadRow {
    let mut row = OffloadRow {
        policy: r.policy.to_string(),
        lora: mode_name(r.mode).to_string(),
        budget_bytes: r.budget,
        error: None,
        first_pass_s: 0.0,
        later_pass_s: 0.0,
        passes_per_s: 0.0,
        lora_overhead_first_s: None,
        lora_overhead_later_s: None,
        first_pass_bytes: 0,
        bytes_per_pass: 0,
        loads_per_pass: 0.0,
        evictions_per_pass: 0.0,
        hit_rate: 0.0,
        stall_s_per_pass: 0.0,
        peak_device_bytes: 0,
        peak_rss_bytes: None,
        anon_rss_bytes: None,
        lora_cache_bytes: 0,
        copy_gbs: None,
        kept_layers: Vec::new(),
        lora_merged_tensors: None,
        lora_unmatched: None,
    };
    let _span = trace::span_with("bench", || {
        (format!("{} / LoRA {}", r.policy, mode_name(r.mode)).into(), vec![])
    });
    if let Err(e) = measure_row(r, &mut row) {
        row.error = Some(e.to_string());
    }
    row
}

fn measure_row(r: &RowConfig<'_>, row: &mut OffloadRow) -> Result<(), EngineError> {
    trim_heap();
    let rss_reset = reset_peak_rss();
    // The process's own heap before the row (earlier rows' leftovers, the timeline so far).
    let anon_before = status_bytes("RssAnon:");
    let e = Engine::new(EngineConfig {
        device: r.cfg.device,
        device_config: DeviceConfig {
            host_memory: r.budget.saturating_mul(2),
            mapped_reads: r.cfg.mapped_reads,
            host_copy_threads: r.cfg.copy_threads.max(1),
            ..DeviceConfig::default()
        },
        budget: Some(r.budget),
        io_threads: r.cfg.io_threads.max(1),
        staging_slots: 4,
        staging_slot_bytes: 16 << 20,
        acquire_timeout: r.cfg.acquire_timeout,
        ..EngineConfig::default()
    })?;
    let id = e.open_model(r.path)?;
    let mut anon = 0u64;
    let start = Instant::now();
    if let Some(mode) = r.mode {
        let matched = e.set_loras(id, r.stack, mode)?;
        row.lora_merged_tensors = Some(matched.merged);
        row.lora_unmatched = Some(matched.unmatched.iter().map(|(_, u)| u.len()).sum());
    }
    e.set_residency(id, None, r.spec)?;
    run_pass(&e, id, r.plan, 0)?;
    row.first_pass_s = start.elapsed().as_secs_f64();
    anon = anon.max(status_bytes("RssAnon:").unwrap_or(0));
    let s0 = e.stats();
    row.first_pass_bytes = s0.bytes_streamed;
    let t0 = r.recorder.map(Recorder::now_ns);
    let start = Instant::now();
    for p in 0..r.passes {
        run_pass(&e, id, r.plan, p + 1)?;
        anon = anon.max(status_bytes("RssAnon:").unwrap_or(0));
    }
    let later = start.elapsed().as_secs_f64();
    let s1 = e.stats();
    let n = r.passes as f64;
    row.later_pass_s = later / n;
    row.passes_per_s = if later > 0.0 { n / later } else { 0.0 };
    row.bytes_per_pass = (s1.bytes_streamed - s0.bytes_streamed) / r.passes as u64;
    row.loads_per_pass = (s1.loads - s0.loads) as f64 / n;
    row.evictions_per_pass = (s1.evictions - s0.evictions) as f64 / n;
    let acquires = s1.acquires - s0.acquires;
    row.hit_rate = if acquires > 0 { (s1.hits - s0.hits) as f64 / acquires as f64 } else { 0.0 };
    row.stall_s_per_pass = (s1.stall_ns - s0.stall_ns) as f64 / 1e9 / n;
    row.peak_device_bytes = s1.peak_device_bytes;
    row.budget_bytes = s1.budget;
    row.lora_cache_bytes = s1.lora_cache_bytes;
    row.peak_rss_bytes = if rss_reset { status_bytes("VmHWM:") } else { None };
    row.anon_rss_bytes = anon_before.map(|b| anon.saturating_sub(b));
    row.kept_layers = e.kept_layers(id)?.into_iter().map(|(c, l)| format!("{c}/{l}")).collect();
    if let (Some(rec), Some(t0), true) = (r.recorder, t0, r.host && row.bytes_per_pass > 0) {
        let copies: Vec<trace::Event> = rec
            .events_since(t0)
            .into_iter()
            .filter(|ev| ev.cat == "copy" && ev.ts_ns >= t0)
            .collect();
        let bytes: u64 = copies.iter().filter_map(|ev| ev.arg_u64("bytes")).sum();
        let busy = trace::union_ns(copies.iter().map(|ev| (ev.ts_ns.max(t0), ev.end_ns())));
        if bytes > 0 && busy > 0 {
            row.copy_gbs = Some(bytes as f64 / busy as f64);
        }
    }
    Ok(())
}

/// One pass over `plan`: acquire, wait until ready, compute, release.
fn run_pass(e: &Engine, id: ModelId, plan: &[Step], n: usize) -> Result<(), EngineError> {
    let _pass = trace::span_with("bench", || (format!("pass {n}").into(), vec![]));
    for step in plan {
        let lease = {
            let _s = trace::span("client", "acquire");
            e.acquire(id, &step.component, step.layer)?
        };
        {
            let _s = trace::span("stall", "wait ready");
            lease.wait_ready()?;
        }
        {
            let _s = trace::span_with("compute", || {
                (step.label.clone().into(), vec![("bytes", step.bytes.into())])
            });
            Spinner::work(step.iters);
        }
        e.release(lease, ClientDone::Now)?;
    }
    Ok(())
}

// ─── Output ───────────────────────────────────────────────────────────────────────────────────

fn secs(v: f64) -> String {
    if v.abs() < 1.0 { format!("{:.1} ms", v * 1e3) } else { format!("{v:.3} s") }
}

fn signed_secs(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 0.0 => format!("+{}", secs(v)),
        Some(v) => format!("−{}", secs(-v)),
    }
}

fn opt_bytes(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), crate::units::bytes)
}

/// The table's header and rows as cells.
fn cells(r: &OffloadReport) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let headers = vec![
        "policy",
        "LoRA",
        "budget",
        "first pass",
        "later pass",
        "passes/s",
        "LoRA +first",
        "LoRA +later",
        "moved/pass",
        "peak device",
        "peak RSS",
        "+anon RSS",
        "stall/pass",
        "copy GB/s",
    ];
    let rows = r
        .rows
        .iter()
        .map(|x| {
            let mut cells =
                vec![x.policy.clone(), x.lora.clone(), crate::units::bytes(x.budget_bytes)];
            if let Some(e) = &x.error {
                cells.push(format!("error: {e}"));
                return cells;
            }
            cells.extend([
                secs(x.first_pass_s),
                secs(x.later_pass_s),
                format!("{:.2}", x.passes_per_s),
                signed_secs(x.lora_overhead_first_s),
                signed_secs(x.lora_overhead_later_s),
                crate::units::bytes(x.bytes_per_pass),
                crate::units::bytes(x.peak_device_bytes),
                opt_bytes(x.peak_rss_bytes),
                opt_bytes(x.anon_rss_bytes),
                secs(x.stall_s_per_pass),
                x.copy_gbs.map_or_else(
                    || "-".into(),
                    |g| format!("{g:.1} ({:.0}%)", 100.0 * g / r.baseline.gbs.max(1e-9)),
                ),
            ]);
            cells
        })
        .collect();
    (headers, rows)
}

fn preamble(r: &OffloadReport) -> Vec<String> {
    let comps: Vec<String> = r
        .components
        .iter()
        .map(|c| format!("{} {} ({} layers)", c.name, crate::units::bytes(c.bytes), c.layers))
        .collect();
    let mut lines = vec![
        format!(
            "ferry bench: {} on {} ({}), {} in {} tensors, {} layers",
            r.model,
            r.device,
            r.backend,
            crate::units::bytes(r.model_bytes),
            r.tensors,
            r.layers
        ),
        format!("components: {}", comps.join(", ")),
        format!(
            "pass: every layer in pipeline order{}; {} later passes timed after the first",
            if r.steps > 1 { format!(", the backbone {} times", r.steps) } else { String::new() },
            r.passes
        ),
        format!("baseline: {} {:.2} GB/s (same run)", r.baseline.kind, r.baseline.gbs),
    ];
    if let Some(l) = &r.lora {
        lines.push(format!(
            "LoRA: {} rank-{} PEFT LoRAs (strengths {}) over {} attention projections ({})",
            l.files.len(),
            l.rank,
            l.strengths.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
            l.adapted_tensors,
            crate::units::bytes(l.adapted_bytes)
        ));
    }
    lines.extend(r.notes.iter().map(|n| format!("note: {n}")));
    lines
}

/// The table as text (what `ferryctl bench` prints).
pub fn render(r: &OffloadReport) -> String {
    let mut out = preamble(r).join("\n");
    out.push_str("\n\n");
    let (headers, rows) = cells(r);
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        if row.len() == headers.len() {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let w = widths.get(i).copied().unwrap_or(0);
            let pad = " ".repeat(w.saturating_sub(c.chars().count()));
            if i < 2 || cells.len() < headers.len() && i == cells.len() - 1 {
                l.push_str(c);
                l.push_str(&pad);
            } else {
                l.push_str(&pad);
                l.push_str(c);
            }
        }
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    out.push_str(&line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>()));
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

/// The table as Markdown (for docs and the README).
pub fn render_markdown(r: &OffloadReport) -> String {
    let mut out = String::new();
    for l in preamble(r) {
        out.push_str(&format!("- {}\n", l.replace('|', "\\|")));
    }
    out.push('\n');
    let (headers, rows) = cells(r);
    out.push_str(&format!("| {} |\n", headers.join(" | ")));
    out.push_str(&format!("|{}\n", " --- |".repeat(headers.len())));
    for mut row in rows {
        row.resize(headers.len(), String::new());
        let row: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}
