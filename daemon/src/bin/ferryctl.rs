//! ferryctl: inspect models and drive ferryd.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry::device::DeviceChoice;
use ferry::store::{LayerRule, Store};

#[derive(Debug, Parser)]
#[command(name = "ferryctl", version = ferry::VERSION, about = "Inspect models and drive ferryd")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Describe a model: components, layers, dtypes and sizes.
    ///
    /// PATH is a .safetensors file, a *.safetensors.index.json, a diffusers pipeline folder
    /// (with model_index.json), or a folder holding one of these.
    Inspect {
        path: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Also list every tensor (name, dtype, shape, offset, bytes, layer).
        #[arg(long)]
        tensors: bool,
        /// Group COMPONENT's layers by these tensor-name prefixes instead of the automatic rule
        /// (COMPONENT=PREFIX,PREFIX,...); may be repeated.
        #[arg(long = "layers", value_name = "COMPONENT=PREFIXES")]
        layers: Vec<String>,
    },
    /// Write MODEL with LoRAs fused in: same tensors, dtypes and layout, adapted weights merged
    /// (f32 accumulation, rounded once to each weight's dtype).
    Export {
        /// The base model (file, index or folder, as for `inspect`).
        model: PathBuf,
        /// A LoRA and its strength, PATH[:STRENGTH] (default 1.0); repeat to stack.
        #[arg(long = "lora", value_name = "PATH[:STRENGTH]", required = true)]
        loras: Vec<String>,
        /// Output: a .safetensors file for a single-file model, else a folder.
        #[arg(short, long)]
        output: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure streaming on a synthetic model, each figure against a baseline from the same run:
    /// throughput vs memcpy, copy/compute overlap, balanced vs the minimum (and LRU).
    Bench {
        /// Layers of the synthetic model.
        #[arg(long, default_value_t = 32)]
        layers: usize,
        /// MiB per layer.
        #[arg(long, default_value_t = 16)]
        layer_mib: usize,
        /// Timed passes per measurement (the best is kept).
        #[arg(long, default_value_t = 5)]
        passes: usize,
        /// Device backend.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Where to write the synthetic model (default: the system's temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Measure LoRA overhead instead (policy × backup/fuse, first and later passes), on
        /// layers of DIM×DIM f16 weights.
        #[arg(long, value_name = "DIM")]
        lora: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ferryctl: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Inspect { path, json, tensors, layers } => inspect(path, json, tensors, &layers),
        Command::Export { model, loras, output, json } => export(&model, &loras, &output, json),
        Command::Bench { layers, layer_mib, passes, device, dir, json, lora } => {
            if layers == 0 || layer_mib == 0 {
                return Err("--layers and --layer-mib must be at least 1".into());
            }
            let layer_bytes = layer_mib
                .checked_mul(1 << 20)
                .ok_or_else(|| format!("--layer-mib {layer_mib} is too large"))?;
            let cfg = ferry::bench::BenchConfig {
                layers,
                layer_bytes,
                dir: dir.unwrap_or_else(std::env::temp_dir),
                device,
                passes,
            };
            if let Some(dim) = lora {
                if dim == 0 || dim > 16384 {
                    return Err(format!("--lora {dim}: the layer size must be 1..=16384"));
                }
                let rows = ferry::bench::lora_table(&cfg, dim).map_err(|e| e.to_string())?;
                let text = if json {
                    serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())? + "\n"
                } else {
                    ferry::bench::render_lora(&rows, layers, dim)
                };
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
                return Ok(());
            }
            let report = ferry::bench::run(&cfg).map_err(|e| e.to_string())?;
            let text = if json {
                serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n"
            } else {
                ferry::bench::render(&report)
            };
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            Ok(())
        }
    }
}

/// `PATH[:STRENGTH]`; a path that itself contains ':' works when no strength follows.
fn parse_lora(spec: &str) -> Result<(PathBuf, f32), String> {
    if let Some((path, strength)) = spec.rsplit_once(':')
        && let Ok(s) = strength.parse::<f32>()
    {
        if !s.is_finite() {
            return Err(format!("--lora {spec:?}: the strength must be a finite number"));
        }
        return Ok((PathBuf::from(path), s));
    }
    Ok((PathBuf::from(spec), 1.0))
}

fn export(
    model: &std::path::Path,
    loras: &[String],
    output: &std::path::Path,
    json: bool,
) -> Result<(), String> {
    let base = ferry::Model::open(model).map_err(|e| e.to_string())?;
    let mut stack = Vec::new();
    for spec in loras {
        let (path, strength) = parse_lora(spec)?;
        let lora = ferry::lora::format::load(&path).map_err(|e| e.to_string())?;
        stack.push((lora, strength));
    }
    let report =
        ferry::lora::export::export_fused(&base, &stack, output).map_err(|e| e.to_string())?;
    let text = if json {
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n"
    } else {
        let mut t = format!(
            "wrote {} file(s) to {}; {} tensor(s) merged\n",
            report.files.len(),
            output.display(),
            report.merged
        );
        for (path, names) in &report.unmatched {
            if !names.is_empty() {
                t.push_str(&format!(
                    "{}: {} adapter(s) matched no tensor of the model: {}\n",
                    path.display(),
                    names.len(),
                    names.join(", ")
                ));
            }
        }
        for (path, names) in &report.unrecognised {
            if !names.is_empty() {
                t.push_str(&format!(
                    "{}: {} tensor(s) of unsupported adapter kinds were not applied: {}\n",
                    path.display(),
                    names.len(),
                    names.join(", ")
                ));
            }
        }
        t
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}

fn inspect(path: PathBuf, json: bool, tensors: bool, layers: &[String]) -> Result<(), String> {
    let store = Store::new();
    let model = store.open(&path).map_err(|e| e.to_string())?;
    let mut report = ferry::inspect::report(&model, tensors);
    for spec in layers {
        let (component, prefixes) = spec
            .split_once('=')
            .ok_or_else(|| format!("--layers {spec:?}: expected COMPONENT=PREFIX,PREFIX,..."))?;
        let rule = LayerRule::Prefixes(prefixes.split(',').map(str::to_string).collect());
        let custom = model.layers_with(component, &rule).map_err(|e| e.to_string())?;
        if let Some(c) = report.components.iter_mut().find(|c| c.name == component) {
            c.layers = custom
                .iter()
                .enumerate()
                .map(|(index, l)| ferry::inspect::LayerReport {
                    index,
                    name: l.name.clone(),
                    tensors: l.tensors.len(),
                    bytes: l.bytes,
                })
                .collect();
        }
    }
    let text = if json {
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())? + "\n"
    } else {
        ferry::inspect::render(&report)
    };
    // A closed pipe (`ferryctl inspect x | head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}
