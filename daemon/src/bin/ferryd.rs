//! ferryd: the ferry daemon.
//!
//! It starts the streaming engine on the selected device (arena, staging ring, copy threads),
//! opens (and so validates) the models it is told to preload, then serves the client protocol
//! (docs/protocol.md) on a Unix socket ([`ferry::server`]) until SIGTERM or SIGINT, which stop
//! accepting, close every connection (releasing its leases) and exit 0. `--check` exits after
//! start-up without binding the socket. Settings come from flags over the TOML file
//! (`/etc/ferry/ferryd.toml` or `--config`); SIGHUP reads the file again and applies model
//! roots, allow lists and limits to the running server (the rest needs a restart, and is
//! logged as such). Under systemd: Type=notify (READY/STOPPING) and socket activation.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry::config::FerrydConfig;
use ferry::config::NumaMode;
use ferry::device::{self, DeviceChoice, DeviceConfig};
use ferry::devices::{DeviceRef, DeviceSet, DeviceSetConfig, SlotState};
use ferry::engine::policy::PolicyChoice;
use ferry::engine::{EngineConfig, NumaChoice};
use ferry::server::{Server, ServerConfig};
use ferry::service;
use tracing::{error, info};

#[derive(Clone, Debug, Parser)]
#[command(name = "ferryd", version = ferry::VERSION, about = "The ferry weight streaming daemon")]
struct Args {
    /// The configuration file (default: /etc/ferry/ferryd.toml, if it exists). Flags given
    /// here override its keys.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Device backend: auto picks CUDA when a driver is present, else host memory.
    #[arg(long, value_enum)]
    device: Option<DeviceChoice>,
    /// CUDA: the GPUs to serve, comma-separated CUDA indices or UUIDs, in the order ferryd
    /// numbers them (default: every visible GPU).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    devices: Vec<DeviceRef>,
    /// Host backend: how many devices to simulate, each with its own arena of --host-memory
    /// bytes (default 1).
    #[arg(long, value_name = "N")]
    host_devices: Option<u32>,
    /// NUMA placement of each device's staging ring and I/O threads: auto (the node nearest the
    /// device, from sysfs) or off.
    #[arg(long, value_enum)]
    numa: Option<NumaMode>,
    /// A device's NUMA node, overriding --numa: DEVICE=NODE (DEVICE: ferryd index or UUID);
    /// may be repeated.
    #[arg(long = "numa-node", value_name = "DEVICE=NODE", value_parser = parse_numa_node)]
    numa_nodes: Vec<(DeviceRef, u32)>,
    /// Device memory the engine may use on each device, in bytes (default: 75% of the device,
    /// at most what is free).
    #[arg(long)]
    budget: Option<u64>,
    /// Bytes of "device memory" the host backend offers (default 4 GiB).
    #[arg(long)]
    host_memory: Option<u64>,
    /// Residency policy of models whose client sets none: auto (sequential on a device with at
    /// most --auto-sequential-max bytes, else balanced), none, component, sequential, balanced,
    /// lru, or a preset: lowvram (= sequential), medvram or model (= component). Default auto.
    #[arg(long, value_name = "POLICY")]
    default_policy: Option<PolicyChoice>,
    /// Under auto: the most device memory, in bytes, that still gets sequential (default 4 GiB).
    #[arg(long, value_name = "BYTES")]
    auto_sequential_max: Option<u64>,
    /// Models to open at start on the default device (validated, then kept mapped); may be
    /// repeated.
    #[arg(long, value_name = "PATH")]
    preload: Vec<PathBuf>,
    /// A model to open at start on a named device: DEVICE=PATH (DEVICE: ferryd index or UUID);
    /// may be repeated.
    #[arg(long = "preload-on", value_name = "DEVICE=PATH", value_parser = parse_preload_on)]
    preload_on: Vec<(DeviceRef, PathBuf)>,
    /// Log filter (tracing's EnvFilter syntax, default `info`); RUST_LOG overrides it.
    #[arg(long)]
    log: Option<String>,
    /// Exit after start-up instead of serving (for checks and scripts); the socket is not
    /// bound.
    #[arg(long)]
    check: bool,
    /// The socket to listen on (default: $XDG_RUNTIME_DIR/ferry/ferryd.sock if set, else
    /// /run/ferry/ferryd.sock for root, else /tmp/ferry-$UID/ferryd.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// A directory under which clients may open models and LoRA files by path; may be repeated.
    /// Without one, clients cannot open models by path.
    #[arg(long = "model-root", value_name = "DIR")]
    model_roots: Vec<PathBuf>,
    /// A uid allowed to connect; may be repeated. With no --allow-uid/--allow-gid, the daemon's
    /// own uid and root are allowed.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// A (primary) gid allowed to connect; may be repeated.
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gids: Vec<u32>,
    /// Most clients connected at once (default 256).
    #[arg(long)]
    max_clients: Option<usize>,
    /// Most leases one client may hold at once (default 4096).
    #[arg(long)]
    max_leases_per_client: Option<usize>,
    /// Most LoRA views one client may have open at once (default 64).
    #[arg(long)]
    max_views_per_client: Option<usize>,
    /// CUDA: offer clients interprocess ready events (their streams wait on ferryd's copies
    /// without a round trip). Only for clients in ferryd's IPC namespace (not separate
    /// containers); others fall back to waiting through ferryd. Default false.
    #[arg(long, value_name = "BOOL")]
    cuda_events: Option<bool>,
}

/// `--numa-node DEVICE=NODE`.
fn parse_numa_node(s: &str) -> Result<(DeviceRef, u32), String> {
    let (dev, node) =
        s.split_once('=').ok_or_else(|| format!("{s:?}: expected DEVICE=NODE, e.g. 0=1"))?;
    let node = node.trim().parse::<u32>().map_err(|e| format!("NUMA node {node:?}: {e}"))?;
    Ok((dev.parse()?, node))
}

/// `--preload-on DEVICE=PATH` (split at the first `=`: device names have none).
fn parse_preload_on(s: &str) -> Result<(DeviceRef, PathBuf), String> {
    let (dev, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected DEVICE=PATH, e.g. 1=/models/sdxl"))?;
    if path.is_empty() {
        return Err(format!("{s:?}: the path is empty"));
    }
    Ok((dev.parse()?, PathBuf::from(path)))
}

/// The flags, with every value the command line left out taken from the configuration file.
fn merge(mut args: Args, file: FerrydConfig) -> Result<Args, String> {
    args.device = args.device.or(file.device);
    if args.devices.is_empty() {
        args.devices = file.devices;
    }
    args.host_devices = args.host_devices.or(file.host_devices);
    if args.preload_on.is_empty() {
        for (dev, paths) in file.preload_on {
            let dev = dev.parse::<DeviceRef>().map_err(|e| format!("preload_on: {e}"))?;
            args.preload_on.extend(paths.into_iter().map(|p| (dev.clone(), p)));
        }
    }
    args.numa = args.numa.or(file.numa);
    if args.numa_nodes.is_empty() {
        for (dev, node) in file.numa_nodes {
            let dev = dev.parse::<DeviceRef>().map_err(|e| format!("numa_nodes: {e}"))?;
            args.numa_nodes.push((dev, node));
        }
    }
    args.budget = args.budget.or(file.budget);
    args.host_memory = args.host_memory.or(file.host_memory);
    args.default_policy = args.default_policy.or(file.default_policy);
    args.auto_sequential_max = args.auto_sequential_max.or(file.auto_sequential_max);
    args.socket = args.socket.or(file.socket);
    args.log = args.log.or(file.log);
    args.max_clients = args.max_clients.or(file.max_clients);
    args.max_leases_per_client = args.max_leases_per_client.or(file.max_leases_per_client);
    args.max_views_per_client = args.max_views_per_client.or(file.max_views_per_client);
    args.cuda_events = args.cuda_events.or(file.cuda_events);
    for (flag, from_file) in
        [(&mut args.model_roots, file.model_roots), (&mut args.preload, file.preload)]
    {
        if flag.is_empty() {
            *flag = from_file;
        }
    }
    if args.allow_uids.is_empty() && args.allow_gids.is_empty() {
        args.allow_uids = file.allow_uids;
        args.allow_gids = file.allow_gids;
    }
    Ok(args)
}

/// The configuration file the flags name (or the default one, if it exists).
fn load_file(args: &Args) -> Result<FerrydConfig, ferry::config::ConfigError> {
    match &args.config {
        Some(path) => FerrydConfig::load(path, true),
        None => FerrydConfig::load(std::path::Path::new(ferry::config::DEFAULT_PATH), false),
    }
}

/// The server's settings from the merged flags and file.
fn server_config(args: &Args) -> ServerConfig {
    let mut config = ServerConfig {
        model_roots: args.model_roots.clone(),
        allow_uids: args.allow_uids.clone(),
        allow_gids: args.allow_gids.clone(),
        ..ServerConfig::new(args.socket.clone().unwrap_or_else(ferry::server::default_socket_path))
    };
    if let Some(n) = args.max_clients {
        config.max_clients = n;
    }
    if let Some(n) = args.max_leases_per_client {
        config.max_leases_per_client = n;
    }
    if let Some(n) = args.max_views_per_client {
        config.max_views_per_client = n;
    }
    config.cuda_events = args.cuda_events.unwrap_or(false);
    config
}

/// SIGHUP: reads the configuration file again (flags still override it) and applies what a
/// running server can change (model roots, allow lists, limits). Settings that need a restart
/// are logged if they changed. A bad file changes nothing.
fn reload(cli: &Args, running: &Args, server: &Server) {
    let file = match load_file(cli) {
        Ok(f) => f,
        Err(e) => {
            error!("SIGHUP: configuration not reloaded, the running one stays: {e}");
            return;
        }
    };
    let new = match merge(cli.clone(), file) {
        Ok(a) => a,
        Err(e) => {
            error!("SIGHUP: configuration not reloaded, the running one stays: {e}");
            return;
        }
    };
    match server.reload(server_config(&new)) {
        Ok(changed) if changed.is_empty() => info!("SIGHUP: configuration reloaded, no change"),
        Ok(changed) => info!(changed = ?changed, "SIGHUP: configuration reloaded"),
        Err(e) => {
            error!("SIGHUP: configuration not reloaded, the running one stays: {e}");
            return;
        }
    }
    let restart_only = [
        ("device", format!("{:?}", new.device) != format!("{:?}", running.device)),
        ("devices", new.devices != running.devices),
        ("host_devices", new.host_devices != running.host_devices),
        ("numa", new.numa != running.numa),
        ("numa_nodes", new.numa_nodes != running.numa_nodes),
        ("budget", new.budget != running.budget),
        ("host_memory", new.host_memory != running.host_memory),
        (
            "default_policy",
            format!("{:?}", new.default_policy) != format!("{:?}", running.default_policy),
        ),
        ("auto_sequential_max", new.auto_sequential_max != running.auto_sequential_max),
        ("preload", new.preload != running.preload),
        ("preload_on", new.preload_on != running.preload_on),
        ("log", new.log != running.log),
    ];
    for (key, differs) in restart_only {
        if differs {
            tracing::warn!(
                key,
                "SIGHUP: changed in the configuration file; takes effect at restart"
            );
        }
    }
}

fn main() -> ExitCode {
    let cli = Args::parse();
    let file = match load_file(&cli) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ferryd: error: {e}");
            return ExitCode::from(2);
        }
    };
    let args = match merge(cli.clone(), file) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ferryd: error: {e}");
            return ExitCode::from(2);
        }
    };
    let log = args.log.clone().unwrap_or_else(|| "info".to_string());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ferryd: error: log filter {log:?}: {e}");
            return ExitCode::from(2);
        }
    };
    // Plain text when logging to journald or a file; colours only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();

    // Blocked before any thread starts, so every thread inherits the mask and SIGTERM/SIGINT
    // reach only `wait_for_stop` (an unblocked thread would take the default action: die).
    let signals = match block_signals() {
        Ok(s) => s,
        Err(e) => {
            error!("blocking signals failed: {e}");
            return ExitCode::FAILURE;
        }
    };

    let device_choice = args.device.unwrap_or_default();
    let (backend, reason) = match device::select(device_choice) {
        Ok(b) => b,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    info!(version = ferry::VERSION, %backend, reason, "ferryd starting");
    let engine_config = EngineConfig {
        device: device_choice,
        device_config: DeviceConfig {
            host_memory: args.host_memory.unwrap_or(4 << 30),
            ..DeviceConfig::default()
        },
        budget: args.budget,
        default_policy: args.default_policy.unwrap_or_default(),
        auto_sequential_max: args
            .auto_sequential_max
            .unwrap_or(ferry::engine::policy::choice::AUTO_SEQUENTIAL_MAX),
        numa: match args.numa.unwrap_or_default() {
            NumaMode::Auto => NumaChoice::Auto,
            NumaMode::Off => NumaChoice::Off,
        },
        ..EngineConfig::default()
    };
    let devices = match DeviceSet::open(&DeviceSetConfig {
        engine: engine_config,
        select: (!args.devices.is_empty()).then(|| args.devices.clone()),
        host_devices: args.host_devices.unwrap_or(1),
        numa_nodes: args.numa_nodes.clone(),
    }) {
        Ok(d) => d,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for slot in devices.slots() {
        match &slot.state {
            SlotState::Ready(engine) => {
                let dev = engine.device_info();
                info!(
                    index = slot.index,
                    device = %dev.name,
                    uuid = %dev.uuid,
                    total = dev.total_memory,
                    budget = engine.stats().budget,
                    mapped_reads = dev.mapped_reads,
                    numa = %engine.placement(),
                    policy = %engine.default_policy(),
                    "device ready"
                );
            }
            // Logged (as an error, with the reason) when the set opened it.
            SlotState::Failed(_) => {}
        }
    }
    info!(
        asked = %args.default_policy.unwrap_or_default(),
        policy = %devices.default_engine().default_policy(),
        "default residency policy"
    );
    // `--preload` models live on the default device (the first that serves); `--preload-on`
    // ones on the device they name, which must serve.
    let mut wanted: Vec<(Option<DeviceRef>, PathBuf)> =
        args.preload.iter().map(|p| (None, p.clone())).collect();
    wanted.extend(args.preload_on.iter().map(|(d, p)| (Some(d.clone()), p.clone())));
    let mut preloaded = Vec::new();
    for (device, path) in &wanted {
        let engine = match device {
            None => devices.default_engine(),
            Some(d) => match devices.select(d) {
                Ok((_, e)) => e,
                Err(e) => {
                    error!("preloading {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            },
        };
        let opened = engine.open_model(path).and_then(|id| Ok((id, engine.model(id)?)));
        match opened {
            Ok((id, model)) => {
                info!(
                    id,
                    device = engine.id_prefix(),
                    path = %model.root().display(),
                    components = model.components().len(),
                    tensors = model.tensors().len(),
                    bytes = model.total_bytes(),
                    "model opened"
                );
                preloaded.push(id);
            }
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if args.check {
        info!("start-up check passed");
        return ExitCode::SUCCESS;
    }
    let config = server_config(&args);
    // Under systemd socket activation the listener is inherited (descriptor 3).
    let started = match service::inherited_listener() {
        Ok(Some(listener)) => {
            info!("socket activation: using the listener systemd passed");
            Server::start_with_listener(devices, config, listener)
        }
        Ok(None) => Server::start(devices, config),
        Err(e) => {
            error!("socket activation: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match started {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for id in preloaded {
        if let Err(e) = server.adopt_model(id) {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    info!(socket = %server.socket_path().display(), "ready; stop with SIGTERM or Ctrl-C");
    service::notify("READY=1");
    let stopped = wait_for_stop(&signals, || reload(&cli, &args, &server));
    service::notify("STOPPING=1");
    info!("draining connections");
    server.shutdown();
    match stopped {
        Ok(sig) => info!(signal = sig, "stopped"),
        Err(e) => {
            error!("waiting for signals failed: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// Blocks SIGTERM/SIGINT/SIGHUP in this thread (and so in every thread started after);
/// returns the set for [`wait_for_stop`].
fn block_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t; these calls only modify it and this thread's
    // signal mask (called before any other thread starts, so every thread inherits it).
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Waits for SIGTERM or SIGINT (blocked by [`block_signals`]); returns its number. Each SIGHUP
/// on the way runs `on_hup` (reload).
fn wait_for_stop(set: &libc::sigset_t, mut on_hup: impl FnMut()) -> std::io::Result<i32> {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` was initialised by `block_signals` and `sig` is a valid out-pointer.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        if sig == libc::SIGHUP {
            on_hup();
            continue;
        }
        return Ok(sig);
    }
}
