//! ferryctl: inspect models and drive ferryd.
//!
//! `inspect`, `export` and `bench` work on files; `status`, `models`, `clients`, `stats`, `top`
//! and `load` talk to a running ferryd over its socket ([`ferry::client`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferry::client::{Client, ClientError};
use ferry::engine::policy::{PolicyChoice, PolicySpec};
use ferry::protocol::{Policy, StatsReply, Threshold, Welcome, features};
use ferry::store::{LayerRule, Store};
use ferry::units::bytes;

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
    /// Measure offloading: `bench MODEL` or `bench --synthetic sdxl|flux|llm-7b` runs every
    /// policy × LoRA mode with simulated compute and prints the table (passes/s, bytes moved,
    /// peak device bytes and RAM, stalls, copy bandwidth beside a same-run baseline); `--trace`
    /// writes the timeline, `--plot` a PNG. Without a model: streaming micro-benchmarks
    /// (throughput vs memcpy, copy/compute overlap, balanced vs the minimum and LRU).
    Bench(Box<ferry::bench::cli::BenchArgs>),
    /// A refreshing view of a running ferryd: residency, bytes/s, hit rate, stalls, models and
    /// clients (`--once` prints one frame).
    Top(ferry::ctl_top::TopArgs),
    /// Ask a running ferryd for its version, device, granted features and counters. Exits 1
    /// when no daemon answers on the socket (a liveness probe).
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// List ferryd's devices: index, UUID, NUMA node, budget and use, or why a device is
    /// unavailable.
    Devices {
        #[command(flatten)]
        conn: Conn,
    },
    /// List the models open in ferryd.
    Models {
        #[command(flatten)]
        conn: Conn,
    },
    /// List the clients connected to ferryd (this one included, marked `*`).
    Clients {
        #[command(flatten)]
        conn: Conn,
    },
    /// ferryd's engine counters.
    Stats {
        #[command(flatten)]
        conn: Conn,
        /// Print Prometheus text exposition format instead.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
    },
    /// Open a model in ferryd (validating it) and show its components and layers; optionally
    /// set its residency policy.
    ///
    /// The daemon closes a connection's models when the connection ends, so a model opened
    /// here stays open only while some client holds it, or when ferryd preloads it
    /// (`ferryd --preload PATH`); a policy set on a preloaded model stays.
    Load {
        /// The model (under one of ferryd's --model-root directories).
        path: PathBuf,
        #[command(flatten)]
        conn: Conn,
        /// Residency policy to set on the whole model: none, component, sequential, balanced,
        /// lru, or a preset: lowvram (= sequential), medvram or model (= component). (A model
        /// whose policy is never set gets ferryd's default, normally auto.)
        #[arg(long, value_name = "POLICY")]
        policy: Option<PolicyChoice>,
        /// Layers loaded ahead of the one in use (sequential, lowvram; default 1).
        #[arg(long, value_name = "N")]
        lookahead: Option<u32>,
        /// Device bytes the resident set may use, as BYTES or a FRACTION of device memory
        /// in [0, 1] (balanced and lru; default 0.75).
        #[arg(long, value_name = "BYTES|FRACTION")]
        threshold: Option<String>,
        /// Stream every layer once (acquire, wait until it is on the device, release) with a
        /// progress bar: warms the page cache and loads what the policy keeps resident.
        #[arg(long)]
        warm: bool,
        /// The device to open it on: ferryd's device index or the device's UUID (see
        /// `ferryctl devices`; default: ferryd's first device).
        #[arg(long, value_name = "INDEX|UUID")]
        device: Option<ferry::devices::DeviceRef>,
    },
    /// Take a model off ferryd's device (manual offload): the whole model, giving back its
    /// memory reservation so another model can use the budget, or one component's layers.
    ///
    /// This acts on the model every client of ferryd shares. ferryd closes a model when its
    /// last client disconnects, so this is for preloaded models or models other clients hold.
    Offload(OffloadTarget),
    /// Bring an offloaded model (or one component) back onto ferryd's device ahead of use.
    ///
    /// Same caveat as `offload`: for preloaded models or models other clients hold.
    Onload(OffloadTarget),
    /// Check LoRA files against a model in ferryd: create a view of MODEL through the stack and
    /// report what matched, every adapter module that matched nothing, and tensors of adapter
    /// kinds ferry does not apply. The view closes when ferryctl exits.
    Lora {
        /// The model (under one of ferryd's --model-root directories).
        model: PathBuf,
        /// A LoRA (under a model root) and its strength, PATH[:STRENGTH] (default 1.0); repeat
        /// to stack.
        #[arg(long = "lora", value_name = "PATH[:STRENGTH]", required = true)]
        loras: Vec<String>,
        /// backup (merged as layers stream, originals restored bit-exactly) or fuse (merged
        /// once and cached).
        #[arg(long, default_value = "backup", value_parser = ["backup", "fuse"])]
        mode: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// How to reach ferryd, and the output format.
#[derive(Debug, Args)]
struct Conn {
    /// ferryd's socket (default: $XDG_RUNTIME_DIR/ferry/ferryd.sock if set, else
    /// /run/ferry/ferryd.sock for root, else /tmp/ferry-$UID/ferryd.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
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

/// What `offload` and `onload` act on.
#[derive(Debug, clap::Args)]
struct OffloadTarget {
    /// The model (under one of ferryd's --model-root directories).
    path: PathBuf,
    /// Only this component (default: the whole model).
    #[arg(long, value_name = "NAME")]
    component: Option<String>,
    /// The device the model is on: ferryd's index or the device's UUID (default: ferryd's
    /// first device).
    #[arg(long, value_name = "INDEX|UUID")]
    device: Option<ferry::devices::DeviceRef>,
    #[command(flatten)]
    conn: Conn,
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Inspect { path, json, tensors, layers } => inspect(path, json, tensors, &layers),
        Command::Export { model, loras, output, json } => export(&model, &loras, &output, json),
        Command::Status { conn } => status(&conn),
        Command::Devices { conn } => devices(&conn),
        Command::Models { conn } => models(&conn),
        Command::Clients { conn } => clients(&conn),
        Command::Stats { conn, prometheus } => stats(&conn, prometheus),
        Command::Load { path, conn, policy, lookahead, threshold, warm, device } => {
            let policy = build_policy(policy, lookahead, threshold.as_deref())?;
            load(&conn, &path, policy, warm, device)
        }
        Command::Offload(target) => manual_offload(target, true),
        Command::Onload(target) => manual_offload(target, false),
        Command::Lora { model, loras, mode, conn } => lora_check(&conn, &model, &loras, &mode),
        Command::Bench(args) => ferry::bench::cli::run(*args),
        Command::Top(args) => ferry::ctl_top::run(args),
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

// ---------------------------------------------------------------------------------------------
// Talking to ferryd

fn out(text: &str) {
    // A closed pipe (`ferryctl models | head`) is not an error worth a message.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn to_json(v: &serde_json::Value) -> Result<String, String> {
    serde_json::to_string_pretty(v).map(|s| s + "\n").map_err(|e| e.to_string())
}

impl Conn {
    fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(ferry::server::default_socket_path)
    }

    /// Connects and completes the handshake; the error names the socket.
    fn connect(&self) -> Result<(Client, PathBuf), String> {
        let socket = self.socket();
        let name = format!("ferryctl {}", ferry::VERSION);
        match Client::connect_with_timeout(&socket, &name, Some(std::time::Duration::from_secs(30)))
        {
            Ok(c) => Ok((c, socket)),
            Err(ClientError::Io(e)) => {
                Err(format!("ferryd is not answering on {}: {e}", socket.display()))
            }
            Err(e) => Err(format!("ferryd at {}: {e}", socket.display())),
        }
    }
}

/// `on {socket}` context for errors after the handshake.
fn ctx(socket: &Path) -> impl Fn(ClientError) -> String + '_ {
    move |e| format!("ferryd at {}: {e}", socket.display())
}

/// The names of the feature bits set in `bits`.
fn feature_names(bits: u64) -> Vec<String> {
    let known = [
        (features::FD_PASSING, "fd_passing"),
        (features::OPEN_PATH, "open_path"),
        (features::HOST_ARENA, "host_arena"),
        (features::LORA, "lora"),
        (features::CUDA_IPC, "cuda_ipc"),
        (features::DEVICES, "devices"),
    ];
    let mut names: Vec<String> =
        known.iter().filter(|(b, _)| bits & b != 0).map(|(_, n)| n.to_string()).collect();
    let rest = bits & !features::KNOWN;
    if rest != 0 {
        names.push(format!("{rest:#x}"));
    }
    names
}

/// Columns two spaces apart; a column whose cells all start with a digit (after the first
/// column) is right-aligned, header included.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    let mut right: Vec<bool> = (0..headers.len()).map(|i| i > 0 && !rows.is_empty()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(headers.len()) {
            widths[i] = widths[i].max(cell.chars().count());
            right[i] &= cell.starts_with(|c: char| c.is_ascii_digit());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.take(headers.len()).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let pad = " ".repeat(widths[i].saturating_sub(cell.chars().count()));
            if right[i] {
                l.push_str(&pad);
                l.push_str(cell);
            } else {
                l.push_str(cell);
                l.push_str(&pad);
            }
        }
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut t = line(&mut headers.iter().copied());
    for row in rows {
        t.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    t
}

fn threshold_text(t: &Threshold) -> String {
    match t {
        Threshold::Bytes(b) => bytes(*b),
        Threshold::Fraction(f) => format!("{:.0}% of device", f * 100.0),
    }
}

fn policy_text(p: Option<&Policy>) -> String {
    match p {
        None => "-".to_string(),
        Some(Policy::None) => "none".to_string(),
        Some(Policy::Component) => "component".to_string(),
        Some(Policy::Sequential { lookahead }) => format!("sequential (lookahead {lookahead})"),
        Some(Policy::Balanced { threshold }) => {
            format!("balanced ({})", threshold_text(threshold))
        }
        Some(Policy::Lru { threshold }) => format!("lru ({})", threshold_text(threshold)),
        Some(Policy::Auto) => "auto".to_string(),
        Some(Policy::Preset { preset }) => {
            ferry::engine::policy::Preset::from(*preset).name().to_string()
        }
    }
}

/// `BYTES` (an integer) or a `FRACTION` in [0, 1] (`0.5`, or `50%`).
fn parse_threshold(s: &str) -> Result<Threshold, String> {
    let s = s.trim();
    if let Ok(b) = s.parse::<u64>() {
        return Ok(Threshold::Bytes(b));
    }
    let fraction = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => s.parse::<f64>(),
    };
    match fraction {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(Threshold::Fraction(f)),
        _ => Err(format!(
            "--threshold {s:?}: expected a byte count or a fraction of device memory in [0, 1]"
        )),
    }
}

/// The wire policy for `--policy` (names and presets parsed by [`PolicyChoice`], as ferryd's
/// `--default-policy` is) with its `--lookahead` / `--threshold`.
fn build_policy(
    name: Option<PolicyChoice>,
    lookahead: Option<u32>,
    threshold: Option<&str>,
) -> Result<Option<Policy>, String> {
    let Some(name) = name else {
        if lookahead.is_some() || threshold.is_some() {
            return Err("--lookahead and --threshold need --policy".into());
        }
        return Ok(None);
    };
    let (spec, preset) = match name {
        PolicyChoice::Auto if lookahead.is_some() || threshold.is_some() => {
            return Err("--lookahead and --threshold do not apply to --policy auto (ferryd \
                        picks sequential or balanced from the device's memory)"
                .into());
        }
        PolicyChoice::Auto => return Ok(Some(Policy::Auto)),
        PolicyChoice::Spec { spec, preset } => (spec, preset),
    };
    // A preset without parameters travels as itself; with them, as the policy it names.
    if let Some(p) = preset
        && lookahead.is_none()
        && threshold.is_none()
    {
        return Ok(Some(Policy::Preset { preset: p.into() }));
    }
    if lookahead.is_some() && !matches!(spec, PolicySpec::Sequential { .. }) {
        return Err(format!(
            "--lookahead applies only to --policy sequential or lowvram, not {name} ({})",
            spec.name()
        ));
    }
    if threshold.is_some() && !matches!(spec, PolicySpec::Balanced { .. } | PolicySpec::Lru { .. })
    {
        return Err(format!(
            "--threshold applies only to --policy balanced or lru, not {name} ({})",
            spec.name()
        ));
    }
    let threshold =
        threshold.map(parse_threshold).transpose()?.unwrap_or(Threshold::Fraction(0.75));
    Ok(Some(match spec {
        PolicySpec::None => Policy::None,
        PolicySpec::Component => Policy::Component,
        PolicySpec::Sequential { lookahead: default } => Policy::Sequential {
            lookahead: lookahead.unwrap_or(u32::try_from(default).unwrap_or(u32::MAX)),
        },
        PolicySpec::Balanced { .. } => Policy::Balanced { threshold },
        PolicySpec::Lru { .. } => Policy::Lru { threshold },
    }))
}

fn stats_rows(s: &StatsReply) -> Vec<(&'static str, String)> {
    vec![
        ("acquires", s.acquires.to_string()),
        ("hits", s.hits.to_string()),
        ("misses", s.misses.to_string()),
        ("loads", s.loads.to_string()),
        ("evictions", s.evictions.to_string()),
        ("bytes streamed", bytes(s.bytes_streamed)),
        ("stalled", format!("{:.3} s", s.stall_ns as f64 / 1e9)),
        ("device bytes", bytes(s.device_bytes)),
        ("peak device bytes", bytes(s.peak_device_bytes)),
        ("budget", bytes(s.budget)),
        ("LoRA cache", bytes(s.lora_cache_bytes)),
    ]
}

fn key_values(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("  {k:<w$}  {v}\n")).collect()
}

fn welcome_json(w: &Welcome, socket: &Path) -> serde_json::Value {
    serde_json::json!({
        "socket": socket.display().to_string(),
        "server_version": w.server_version,
        "protocol_version": w.version,
        "client_id": w.client_id,
        "max_body_len": w.max_body_len,
        "max_fds": w.max_fds,
        "device": w.device,
        "features": feature_names(w.features),
    })
}

fn status(conn: &Conn) -> Result<(), String> {
    let (mut c, socket) = conn.connect()?;
    let stats = c.stats().map_err(ctx(&socket))?;
    let devices = if c.has_feature(features::DEVICES) {
        c.list_devices().map_err(ctx(&socket))?
    } else {
        Vec::new()
    };
    let w = c.welcome().clone();
    let _ = c.close();
    if conn.json {
        let mut v = welcome_json(&w, &socket);
        v["stats"] = serde_json::to_value(&stats).map_err(|e| e.to_string())?;
        v["devices"] = serde_json::to_value(&devices).map_err(|e| e.to_string())?;
        return to_json(&v).map(|t| out(&t));
    }
    let d = &w.device;
    let granted = feature_names(w.features);
    let mut t =
        format!("ferryd {} on {} (protocol {})\n", w.server_version, socket.display(), w.version);
    t.push_str(&key_values(&[
        ("device", format!("{} ({})", d.name, d.backend)),
        ("uuid", if d.uuid.is_empty() { "-".into() } else { d.uuid.clone() }),
        ("total memory", bytes(d.total_memory)),
        ("budget", bytes(d.budget)),
        ("features", if granted.is_empty() { "-".into() } else { granted.join(", ") }),
        ("devices", {
            let failed = devices.iter().filter(|d| d.error.is_some()).count();
            match (devices.len(), failed) {
                (0, _) => "-".into(),
                (n, 0) => format!("{n} (ferryctl devices)"),
                (n, f) => format!("{n}, {f} unavailable (ferryctl devices)"),
            }
        }),
    ]));
    t.push_str("stats\n");
    t.push_str(&key_values(&stats_rows(&stats)));
    out(&t);
    Ok(())
}

fn devices(conn: &Conn) -> Result<(), String> {
    let (mut c, socket) = conn.connect()?;
    let devices = c.list_devices().map_err(ctx(&socket))?;
    let _ = c.close();
    if conn.json {
        return to_json(&serde_json::json!({ "devices": devices })).map(|t| out(&t));
    }
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            let dash = || "-".to_string();
            let (budget, used, peak) = match &d.stats {
                Some(s) => (bytes(s.budget), bytes(s.device_bytes), bytes(s.peak_device_bytes)),
                None => (dash(), dash(), dash()),
            };
            vec![
                d.index.to_string(),
                d.label.clone(),
                if d.uuid.is_empty() { dash() } else { d.uuid.clone() },
                d.numa_node.map_or_else(dash, |n| n.to_string()),
                budget,
                used,
                peak,
                d.models.to_string(),
                d.waiting.to_string(),
                match &d.error {
                    Some(e) => format!("unavailable: {e}"),
                    None => d.name.clone(),
                },
            ]
        })
        .collect();
    out(&table(
        &[
            "INDEX",
            "DEVICE",
            "UUID",
            "NUMA",
            "BUDGET",
            "IN USE",
            "PEAK",
            "MODELS",
            "WAITING",
            "NAME / STATE",
        ],
        &rows,
    ));
    Ok(())
}

fn models(conn: &Conn) -> Result<(), String> {
    let (mut c, socket) = conn.connect()?;
    let models = c.list_models().map_err(ctx(&socket))?;
    let _ = c.close();
    if conn.json {
        return to_json(&serde_json::json!({ "models": models })).map(|t| out(&t));
    }
    if models.is_empty() {
        out("no models open\n");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            vec![
                m.model.to_string(),
                ferry::engine::id_prefix_of(m.model).to_string(),
                m.source.clone(),
                bytes(m.total_bytes),
                m.layers.to_string(),
                m.resident_layers.to_string(),
                policy_text(m.policy.as_ref()),
                m.clients.to_string(),
                m.path.clone(),
            ]
        })
        .collect();
    out(&table(
        &["ID", "DEVICE", "SOURCE", "SIZE", "LAYERS", "RESIDENT", "POLICY", "CLIENTS", "PATH"],
        &rows,
    ));
    Ok(())
}

fn clients(conn: &Conn) -> Result<(), String> {
    let (mut c, socket) = conn.connect()?;
    let me = c.welcome().client_id;
    let clients = c.list_clients().map_err(ctx(&socket))?;
    let _ = c.close();
    if conn.json {
        return to_json(&serde_json::json!({ "self": me, "clients": clients })).map(|t| out(&t));
    }
    let rows: Vec<Vec<String>> = clients
        .iter()
        .map(|k| {
            let id = if k.id == me { format!("{}*", k.id) } else { k.id.to_string() };
            vec![
                id,
                k.pid.to_string(),
                k.uid.to_string(),
                k.gid.to_string(),
                k.models.to_string(),
                k.leases.to_string(),
                k.name.clone(),
            ]
        })
        .collect();
    out(&table(&["ID", "PID", "UID", "GID", "MODELS", "LEASES", "NAME"], &rows));
    Ok(())
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text exposition format (version 0.0.4).
fn prometheus(w: &Welcome, s: &StatsReply) -> String {
    let metrics: [(&str, &str, &str, String); 12] = [
        ("ferry_acquires_total", "counter", "Layer acquires.", s.acquires.to_string()),
        (
            "ferry_hits_total",
            "counter",
            "Acquires that found the layer present (resident or loading).",
            s.hits.to_string(),
        ),
        (
            "ferry_misses_total",
            "counter",
            "Acquires that had to start a load.",
            s.misses.to_string(),
        ),
        ("ferry_loads_total", "counter", "Layer loads started.", s.loads.to_string()),
        ("ferry_evictions_total", "counter", "Layers evicted.", s.evictions.to_string()),
        (
            "ferry_streamed_bytes_total",
            "counter",
            "Bytes queued for copying to the device.",
            s.bytes_streamed.to_string(),
        ),
        (
            "ferry_stall_seconds_total",
            "counter",
            "Seconds clients spent waiting for memory or copies.",
            format!("{}", s.stall_ns as f64 / 1e9),
        ),
        ("ferry_device_bytes", "gauge", "Device bytes allocated now.", s.device_bytes.to_string()),
        (
            "ferry_peak_device_bytes",
            "gauge",
            "The most device bytes ever allocated at once.",
            s.peak_device_bytes.to_string(),
        ),
        ("ferry_budget_bytes", "gauge", "The engine's device memory budget.", s.budget.to_string()),
        (
            "ferry_lora_cache_bytes",
            "gauge",
            "Host memory held by fused LoRA layers.",
            s.lora_cache_bytes.to_string(),
        ),
        (
            "ferry_device_total_bytes",
            "gauge",
            "Bytes of device memory.",
            w.device.total_memory.to_string(),
        ),
    ];
    let mut t = String::new();
    t.push_str("# HELP ferry_info ferryd's version and device.\n# TYPE ferry_info gauge\n");
    t.push_str(&format!(
        "ferry_info{{version=\"{}\",protocol=\"{}\",backend=\"{}\",device=\"{}\"}} 1\n",
        label(&w.server_version),
        w.version,
        label(&w.device.backend),
        label(&w.device.name)
    ));
    for (name, kind, help, value) in metrics {
        t.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    t
}

fn stats(conn: &Conn, prom: bool) -> Result<(), String> {
    let (mut c, socket) = conn.connect()?;
    let stats = c.stats().map_err(ctx(&socket))?;
    let w = c.welcome().clone();
    let _ = c.close();
    if prom {
        out(&prometheus(&w, &stats));
    } else if conn.json {
        let v = serde_json::to_value(&stats).map_err(|e| e.to_string())?;
        out(&to_json(&v)?);
    } else {
        out(&key_values(&stats_rows(&stats)));
    }
    Ok(())
}

const LOAD_CAVEAT: &str = "ferryd closes a model when the last client holding it disconnects: \
a model opened by `ferryctl load` stays open only while another client holds it, or when \
ferryd preloads it (`ferryd --preload PATH`).";

fn load(
    conn: &Conn,
    path: &Path,
    policy: Option<Policy>,
    warm: bool,
    device: Option<ferry::devices::DeviceRef>,
) -> Result<(), String> {
    // ferryd resolves the path itself, from its own working directory.
    let abs = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut c, socket) = conn.connect()?;
    let err = ctx(&socket);
    let before = c.list_models().map_err(&err)?;
    let opened = match device {
        Some(d) => c.open_model_on(&abs, d.into()),
        None => c.open_model(&abs),
    }
    .map_err(|e| format!("load {}: {e}", abs.display()))?;
    let was_open = before.iter().any(|m| m.model == opened.model);
    if let Some(p) = policy {
        c.set_residency(opened.model, None, p).map_err(&err)?;
    }
    let warmed = if warm { Some(warm_up(&mut c, &opened, conn.json).map_err(&err)?) } else { None };
    let info = c.list_models().map_err(&err)?.into_iter().find(|m| m.model == opened.model);
    let _ = c.close();
    let stays = if was_open {
        "the model was already open (preloaded, or held by another client): it stays open"
    } else {
        "the model was opened for this command only: ferryd closes it now that ferryctl \
         disconnected"
    };
    if conn.json {
        let v = serde_json::json!({
            "socket": socket.display().to_string(),
            "path": abs.display().to_string(),
            "model": opened.model,
            "already_open": was_open,
            "policy": policy,
            "warmed_bytes": warmed,
            "info": info,
            "components": opened.components,
            "note": format!("{LOAD_CAVEAT} {stays}."),
        });
        return to_json(&v).map(|t| out(&t));
    }
    let layers: usize = opened.components.iter().map(|c| c.layers.len()).sum();
    let total: u64 = opened.components.iter().flat_map(|c| &c.layers).map(|l| l.bytes).sum::<u64>();
    let mut t = format!(
        "model {} ({}): {} component(s), {} layer(s), {}\n",
        opened.model,
        abs.display(),
        opened.components.len(),
        layers,
        bytes(total)
    );
    if let Some(p) = &policy {
        t.push_str(&format!("policy: {}\n", policy_text(Some(p))));
    }
    if let Some(b) = warmed {
        t.push_str(&format!("warmed: {} streamed through the device\n", bytes(b)));
    }
    for comp in &opened.components {
        t.push_str(&format!("\n{} ({} layers)\n", comp.name, comp.layers.len()));
        let rows: Vec<Vec<String>> = comp
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                vec![i.to_string(), l.name.clone(), l.tensors.to_string(), bytes(l.bytes)]
            })
            .collect();
        t.push_str(&table(&["#", "LAYER", "TENSORS", "BYTES"], &rows));
    }
    t.push_str(&format!("\nnote: {LOAD_CAVEAT}\n      {stays}.\n"));
    out(&t);
    Ok(())
}

/// `ferryctl offload` (`offload` true) and `ferryctl onload`: opens MODEL like `load` does and
/// offloads or onloads it (or one component) for every client of ferryd.
fn manual_offload(target: OffloadTarget, offload: bool) -> Result<(), String> {
    let OffloadTarget { path, component, device, conn } = target;
    let (path, component, conn) = (path.as_path(), component.as_deref(), &conn);
    let verb = if offload { "offload" } else { "onload" };
    // ferryd resolves the path itself, from its own working directory.
    let abs = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut c, socket) = conn.connect()?;
    let err = ctx(&socket);
    let before = c.list_models().map_err(&err)?;
    let opened = match device {
        Some(d) => c.open_model_on(&abs, d.into()),
        None => c.open_model(&abs),
    }
    .map_err(|e| format!("{verb} {}: {e}", abs.display()))?;
    let was_open = before.iter().any(|m| m.model == opened.model);
    let what = match component {
        Some(name) => format!("component {name:?} of model {}", opened.model),
        None => format!("model {}", opened.model),
    };
    let freed = if offload {
        Some(c.offload(opened.model, component).map_err(|e| format!("{verb} {what}: {e}"))?)
    } else {
        c.onload(opened.model, component).map_err(|e| format!("{verb} {what}: {e}"))?;
        None
    };
    let info = c.list_models().map_err(&err)?.into_iter().find(|m| m.model == opened.model);
    let _ = c.close();
    let stays = if was_open {
        "the model was already open (preloaded, or held by another client): it stays open, \
         and the change applies to every client of it"
    } else {
        "the model was opened for this command only: ferryd closes it now that ferryctl \
         disconnected, so this had no lasting effect"
    };
    if conn.json {
        let v = serde_json::json!({
            "socket": socket.display().to_string(),
            "path": abs.display().to_string(),
            "model": opened.model,
            "component": component,
            "action": verb,
            "freed_bytes": freed,
            "already_open": was_open,
            "info": info,
            "note": format!("{LOAD_CAVEAT} {stays}."),
        });
        return to_json(&v).map(|t| out(&t));
    }
    let mut t = match freed {
        Some(b) => format!("offloaded {what} ({}): {} freed\n", abs.display(), bytes(b)),
        None => format!("onloaded {what} ({}): its layers are on their way\n", abs.display()),
    };
    if let Some(i) = &info {
        t.push_str(&format!("resident layers: {} of {}\n", i.resident_layers, i.layers));
    }
    t.push_str(&format!("\nnote: {LOAD_CAVEAT}\n      {stays}.\n"));
    out(&t);
    Ok(())
}

/// Streams every layer of `opened` once, in pipeline order (acquire, wait until ready,
/// release), with a progress bar on stderr (hidden for `--json` or when stderr is not a
/// terminal). Returns the bytes streamed.
fn warm_up(
    c: &mut Client,
    opened: &ferry::protocol::ModelOpened,
    quiet: bool,
) -> Result<u64, ClientError> {
    use ferry::protocol::{Acquire, Message, Release, WaitReady};
    let total: u64 = opened.components.iter().flat_map(|c| &c.layers).map(|l| l.bytes).sum();
    let bar =
        if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:24!} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut done = 0u64;
    for comp in &opened.components {
        for (i, layer) in comp.layers.iter().enumerate() {
            bar.set_message(format!("{}/{}", comp.name, layer.name));
            let acquire = Acquire {
                model: opened.model,
                component: comp.name.clone(),
                layer: u32::try_from(i).unwrap_or(u32::MAX),
            };
            let leased = match c.call(acquire.into(), &[])? {
                Message::Leased(l) => l,
                other => return Err(unexpected_reply("leased", &other)),
            };
            if !leased.ready {
                c.call(WaitReady { lease: leased.lease }.into(), &[])?;
            }
            c.call(Release { model: opened.model, lease: leased.lease }.into(), &[])?;
            done += layer.bytes;
            bar.set_position(done);
        }
    }
    bar.finish_and_clear();
    Ok(done)
}

fn unexpected_reply(expected: &str, got: &ferry::protocol::Message) -> ClientError {
    ClientError::Protocol(ferry::protocol::ProtocolError::UnexpectedMessage {
        kind: got.kind(),
        reason: format!("expected {expected}"),
    })
}

/// `ferryctl lora`: creates a view through the stack and reports what matching found.
fn lora_check(conn: &Conn, model: &Path, loras: &[String], mode: &str) -> Result<(), String> {
    use ferry::protocol::{LoraMode, LoraRef, LoraSource};
    let abs = std::path::absolute(model).map_err(|e| format!("{}: {e}", model.display()))?;
    let mut stack = Vec::with_capacity(loras.len());
    let mut files = Vec::with_capacity(loras.len());
    for spec in loras {
        let (path, scale) = parse_lora(spec)?;
        let path = std::path::absolute(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = path.to_str().ok_or_else(|| format!("{}: not UTF-8", path.display()))?;
        stack.push(LoraRef { source: LoraSource::Path(text.to_string()), scale });
        files.push((text.to_string(), scale));
    }
    let mode = if mode == "fuse" { LoraMode::Fuse } else { LoraMode::Backup };
    let (mut c, socket) = conn.connect()?;
    let err = ctx(&socket);
    let opened = c.open_model(&abs).map_err(|e| format!("open {}: {e}", abs.display()))?;
    let view = c
        .apply_lora(opened.model, stack, mode, &[])
        .map_err(|e| format!("apply LoRA to {}: {e}", abs.display()))?;
    let _ = c.remove_lora(view.view).map_err(&err);
    let _ = c.close();
    if conn.json {
        let reports: Vec<serde_json::Value> = files
            .iter()
            .zip(&view.loras)
            .map(|((f, s), r)| {
                serde_json::json!({
                    "file": f, "strength": s,
                    "unmatched": r.unmatched, "unrecognised": r.unrecognised,
                })
            })
            .collect();
        let v = serde_json::json!({
            "model": abs.display().to_string(),
            "merged_tensors": view.merged,
            "loras": reports,
        });
        return to_json(&v).map(|t| out(&t));
    }
    let mut t = format!("{}: {} tensor(s) receive a delta\n", abs.display(), view.merged);
    for ((f, s), r) in files.iter().zip(&view.loras) {
        t.push_str(&format!(
            "\n{f} (strength {s}): {} unmatched, {} unrecognised\n",
            r.unmatched.len(),
            r.unrecognised.len()
        ));
        for u in &r.unmatched {
            t.push_str(&format!("  unmatched: {u}\n"));
        }
        for u in &r.unrecognised {
            t.push_str(&format!("  unrecognised: {u}\n"));
        }
    }
    out(&t);
    Ok(())
}
