//! ferryd: the ferry daemon.
//!
//! This version starts the streaming engine on the selected device (arena, staging ring, copy
//! threads), opens (and so validates) the models it is told to preload, and runs until SIGTERM
//! or SIGINT. The client protocol arrives in a later version (see the README's status section).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry::device::{self, DeviceChoice, DeviceConfig};
use ferry::engine::{Engine, EngineConfig};
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(name = "ferryd", version = ferry::VERSION, about = "The ferry weight streaming daemon")]
struct Args {
    /// Device backend: auto picks CUDA when a driver is present, else host memory.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Device memory the engine may use, in bytes (default: 75% of the device, at most what is
    /// free).
    #[arg(long)]
    budget: Option<u64>,
    /// Bytes of "device memory" the host backend offers.
    #[arg(long, default_value_t = 4 << 30)]
    host_memory: u64,
    /// Models to open at start (validated, then kept mapped); may be repeated.
    #[arg(long, value_name = "PATH")]
    preload: Vec<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log: String,
    /// Exit after start-up instead of serving (for checks and scripts).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ferryd: error: --log {:?}: {e}", args.log);
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

    let (backend, reason) = match device::select(args.device) {
        Ok(b) => b,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    info!(version = ferry::VERSION, %backend, reason, "ferryd starting");
    let engine = match Engine::new(EngineConfig {
        device: args.device,
        device_config: DeviceConfig { host_memory: args.host_memory, ..DeviceConfig::default() },
        budget: args.budget,
        ..EngineConfig::default()
    }) {
        Ok(e) => e,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let dev = engine.device_info();
    info!(
        device = %dev.name,
        uuid = %dev.uuid,
        total = dev.total_memory,
        budget = engine.stats().budget,
        mapped_reads = dev.mapped_reads,
        "device ready"
    );

    for path in &args.preload {
        let opened = engine.open_model(path).and_then(|id| Ok((id, engine.model(id)?)));
        match opened {
            Ok((id, model)) => {
                info!(
                    id,
                    path = %model.root().display(),
                    components = model.components().len(),
                    tensors = model.tensors().len(),
                    bytes = model.total_bytes(),
                    "model opened"
                );
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
    info!("ready; stop with SIGTERM or Ctrl-C");
    match wait_for_stop() {
        Ok(sig) => info!(signal = sig, "stopping"),
        Err(e) => {
            error!("waiting for signals failed: {e}");
            return ExitCode::FAILURE;
        }
    }
    drop(engine);
    ExitCode::SUCCESS
}

/// Blocks SIGTERM/SIGINT/SIGHUP and waits for one; returns its number. SIGHUP (reload) has
/// nothing to reload yet and is logged and ignored.
fn wait_for_stop() -> std::io::Result<i32> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t; these calls only modify it and this thread's
    // signal mask (no other thread has been started, so the mask applies process-wide).
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` was initialised above and `sig` is a valid out-pointer.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        if sig == libc::SIGHUP {
            info!("SIGHUP: nothing to reload yet");
            continue;
        }
        return Ok(sig);
    }
}
