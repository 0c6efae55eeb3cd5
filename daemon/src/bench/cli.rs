//! `ferryctl bench`: its arguments and what it prints.
//!
//! - `ferryctl bench MODEL` or `ferryctl bench --synthetic sdxl|flux|llm-7b`: the offload table
//!   ([`super::offload`]), as text, `--json` or `--markdown`, with `--trace out.json` (the
//!   timeline) and `--plot out.png`.
//! - `ferryctl bench` alone: the streaming micro-benchmarks ([`super::run`]: throughput,
//!   overlap, balanced vs LRU); `--lora DIM`: the LoRA overhead table ([`super::lora_table`]).

use std::io::Write as _;
use std::path::PathBuf;

use super::offload::{self, ModelChoice, OffloadConfig};
use super::synthetic::Arch;
use crate::device::DeviceChoice;

/// `ferryctl bench`'s arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Measure the offload table on this model (a .safetensors file, an index, a diffusers
    /// folder): every policy × LoRA mode, against baselines from the same run.
    #[arg(conflicts_with = "synthetic")]
    pub model: Option<PathBuf>,
    /// Measure the offload table on a synthetic model shaped like SDXL, FLUX or a 7B LLM
    /// (real tensor names, shapes and layers; widths divided by --scale).
    #[arg(long, value_enum)]
    pub synthetic: Option<Arch>,
    /// Divide the synthetic model's widths by this; its bytes shrink by about the square
    /// (default 8: SDXL 104 MiB, FLUX 504 MiB, llm-7b 201 MiB).
    #[arg(long, requires = "synthetic")]
    pub scale: Option<usize>,
    /// Backbone (UNet, transformer) runs per pass, like denoising steps.
    #[arg(long, default_value_t = 1)]
    pub steps: usize,
    /// Simulated compute per layer, as a multiple of its copy time at the baseline bandwidth
    /// (0: no compute; 1: compute equals copy, no slack to hide copies behind).
    #[arg(long, default_value_t = 1.0)]
    pub compute_ratio: f64,
    /// Device budget of the offloading policies, as a fraction of the model (`none` always
    /// gets the whole model).
    #[arg(long, default_value_t = 0.8)]
    pub budget: f64,
    /// Layers `sequential` loads ahead.
    #[arg(long, default_value_t = 1)]
    pub lookahead: usize,
    /// Seconds an acquire that finds no room waits for a release before failing (the
    /// engine's acquire_timeout, as ferryd's). The bench holds one lease at a time, so an
    /// acquire never has to wait for one; the limit only turns an engine bug into an error.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    pub acquire_timeout: f64,
    /// Skip the LoRA rows.
    #[arg(long)]
    pub no_lora: bool,
    /// Copy through the staging ring instead of straight from the file mapping.
    #[arg(long)]
    pub staged: bool,
    /// Write the run's timeline (Chrome trace / Perfetto JSON: one track per thread) here.
    #[arg(long, value_name = "OUT.json")]
    pub trace: Option<PathBuf>,
    /// Do not record the timeline (its cost is then zero; copy GB/s is not measured).
    #[arg(long, conflicts_with = "trace")]
    pub no_timeline: bool,
    /// Draw passes per second and device bytes per policy into this PNG.
    #[arg(long, value_name = "OUT.png")]
    pub plot: Option<PathBuf>,
    /// Print the table as Markdown.
    #[arg(long, conflicts_with = "json")]
    pub markdown: bool,

    /// Layers of the micro-benchmarks' synthetic model (default 32).
    #[arg(long)]
    pub layers: Option<usize>,
    /// MiB per layer of the micro-benchmarks' model (default 16).
    #[arg(long)]
    pub layer_mib: Option<usize>,
    /// Timed passes (offload table: later passes, default 3; micro-benchmarks: the best of,
    /// default 5).
    #[arg(long)]
    pub passes: Option<usize>,
    /// Device backend.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Where to write synthetic models and LoRAs (default: the system's temp dir; reused).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measure LoRA overhead on the micro-benchmarks' model instead (policy × backup/fuse,
    /// first and later passes), on layers of DIM×DIM f16 weights.
    #[arg(long, value_name = "DIM")]
    pub lora: Option<usize>,
}

fn out(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn json(v: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| e.to_string())
}

/// Runs `ferryctl bench`.
pub fn run(a: BenchArgs) -> Result<(), String> {
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let table = a.model.is_some() || a.synthetic.is_some();
    if !table {
        for (set, flag) in [
            (a.trace.is_some(), "--trace"),
            (a.plot.is_some(), "--plot"),
            (a.markdown, "--markdown"),
            (a.no_lora, "--no-lora"),
            (a.staged, "--staged"),
            (a.no_timeline, "--no-timeline"),
        ] {
            if set {
                return Err(format!("{flag} needs a model: MODEL or --synthetic sdxl|flux|llm-7b"));
            }
        }
        return micro(&a, dir);
    }
    if a.lora.is_some() || a.layers.is_some() || a.layer_mib.is_some() {
        return Err("--lora, --layers and --layer-mib belong to the micro-benchmarks (no MODEL, \
                    no --synthetic)"
            .into());
    }
    let model = match (&a.model, a.synthetic) {
        (Some(p), _) => ModelChoice::Path(p.clone()),
        (None, Some(arch)) => {
            let scale = a.scale.unwrap_or(offload::DEFAULT_SCALE);
            if scale == 0 || scale > 4096 {
                return Err(format!("--scale {scale}: must be 1..=4096"));
            }
            ModelChoice::Synthetic { arch, scale }
        }
        (None, None) => return Err("a model is needed".into()),
    };
    if !(a.acquire_timeout > 0.0 && a.acquire_timeout <= 3600.0) {
        return Err(format!(
            "--acquire-timeout {}: must be in (0, 3600] seconds",
            a.acquire_timeout
        ));
    }
    let passes = a.passes.unwrap_or(3);
    if passes == 0 || a.steps == 0 {
        return Err("--passes and --steps must be at least 1".into());
    }
    let cfg = OffloadConfig {
        model,
        dir,
        device: a.device,
        passes,
        steps: a.steps,
        compute_ratio: a.compute_ratio,
        budget_fraction: a.budget,
        lookahead: a.lookahead,
        loras: !a.no_lora,
        mapped_reads: !a.staged,
        copy_threads: 1,
        io_threads: 1,
        acquire_timeout: std::time::Duration::from_secs_f64(a.acquire_timeout),
        timeline: !a.no_timeline,
    };
    let (report, trace) = offload::run(&cfg).map_err(|e| e.to_string())?;
    if let Some(path) = &a.trace {
        let trace =
            trace.ok_or("--trace: another timeline recording was running in this process")?;
        trace.write(path, "ferryctl bench").map_err(|e| e.to_string())?;
    }
    if let Some(path) = &a.plot {
        super::plot::write_png(&report, path).map_err(|e| e.to_string())?;
    }
    let text = if a.json {
        json(&report)?
    } else if a.markdown {
        offload::render_markdown(&report)
    } else {
        offload::render(&report)
    };
    out(&text);
    Ok(())
}

/// The micro-benchmarks and the LoRA overhead table (no model given).
fn micro(a: &BenchArgs, dir: PathBuf) -> Result<(), String> {
    let layers = a.layers.unwrap_or(32);
    let layer_mib = a.layer_mib.unwrap_or(16);
    if layers == 0 || layer_mib == 0 {
        return Err("--layers and --layer-mib must be at least 1".into());
    }
    let layer_bytes = layer_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| format!("--layer-mib {layer_mib} is too large"))?;
    let cfg = super::BenchConfig {
        layers,
        layer_bytes,
        dir,
        device: a.device,
        passes: a.passes.unwrap_or(5),
    };
    if let Some(dim) = a.lora {
        if dim == 0 || dim > 16384 {
            return Err(format!("--lora {dim}: the layer size must be 1..=16384"));
        }
        let rows = super::lora_table(&cfg, dim).map_err(|e| e.to_string())?;
        let text = if a.json { json(&rows)? } else { super::render_lora(&rows, layers, dim) };
        out(&text);
        return Ok(());
    }
    let report = super::run(&cfg).map_err(|e| e.to_string())?;
    let text = if a.json { json(&report)? } else { super::render(&report) };
    out(&text);
    Ok(())
}
