//! `ferry_engine`, in-process or in daemon mode, and the calls on models.

use core::ffi::{CStr, c_char};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ferry::device::DeviceChoice;
use ferry::engine::lora_view::LoraMode;
use ferry::engine::policy::{PolicyChoice, PolicySpec, Preset, Threshold};
use ferry::engine::{Engine, EngineConfig, EngineError, ModelId};
use ferry::protocol;

use crate::error::{FfiError, Result};
use crate::remote::Remote;
use crate::{boundary, ferry_status, ptr};

/// A streaming engine: one device, one memory budget, any number of models.
///
/// Opaque. Either in-process (created by `ferry_engine_open`: the engine runs in this
/// process) or in daemon mode (created by `ferry_connect`: a connection to ferryd, which owns
/// the device; tensor addresses point into the daemon's arena mapped read-only here). The
/// calls on it are the same in both modes. Destroyed by `ferry_engine_close`.
///
/// Every call that takes a `ferry_engine *` is thread-safe: one engine may be used from many
/// threads at once (but `ferry_engine_close` must not run concurrently with any other call on
/// it). In daemon mode the calls on one engine share its one connection and run one at a
/// time: an acquire that waits for device memory delays the engine's other calls until it
/// returns. Connect once per thread for independent traffic.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct ferry_engine {
    _private: [u8; 0],
}

/// The device an engine streams to (`ferry_engine_config.device`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ferry_device {
    /// CUDA if a driver can be loaded, else host memory.
    FERRY_DEVICE_AUTO = 0,
    /// An NVIDIA GPU through the CUDA driver API (ordinal 0).
    FERRY_DEVICE_CUDA = 1,
    /// System memory standing in for device memory: tensor addresses are plain pointers.
    FERRY_DEVICE_HOST = 2,
}

/// A residency policy (`ferry_set_residency`'s `policy`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ferry_policy {
    /// Everything resident, loaded at once.
    FERRY_POLICY_NONE = 0,
    /// Whole components in and out, least recently used first; the next is prefetched.
    FERRY_POLICY_COMPONENT = 1,
    /// A window of `lookahead + 1` layers; every layer streams every pass.
    FERRY_POLICY_SEQUENTIAL = 2,
    /// A stable resident set within a threshold; the rest streams.
    FERRY_POLICY_BALANCED = 3,
    /// Chosen by the engine from the device's memory when the policy is set: sequential
    /// (lookahead 1) on a device of at most 4 GiB (in daemon mode: ferryd's
    /// `auto_sequential_max`), balanced at 75% of the device above.
    FERRY_POLICY_AUTO = 4,
    /// SD.Next's `lowvram` preset: sequential, lookahead 1.
    FERRY_POLICY_LOWVRAM = 5,
    /// SD.Next's `medvram` preset: component.
    FERRY_POLICY_MEDVRAM = 6,
    /// SD.Next's `model` (model offload) preset: component.
    FERRY_POLICY_MODEL = 7,
}

/// How a LoRA stack is applied (`ferry_view_create`'s `mode`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ferry_lora_mode {
    /// Merged on the way to the device; the file's bytes are untouched.
    FERRY_LORA_BACKUP = 0,
    /// Merged once and cached in host memory.
    FERRY_LORA_FUSE = 1,
}

/// How to build an engine. Fill it with `ferry_engine_config_default`, then change fields.
/// A zero in any field other than `device` means "the default".
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ferry_engine_config {
    /// A `ferry_device` value.
    pub device: u32,
    /// Pinned staging slots (default 4).
    pub staging_slots: u32,
    /// Bytes of device memory the engine may use (default: 75% of the device, at most what is
    /// free). Allocated at start; a hard cap.
    pub budget_bytes: u64,
    /// Bytes of "device memory" the host backend reports (default 4 GiB).
    pub host_memory_bytes: u64,
    /// Bytes of each staging slot (default 16 MiB).
    pub staging_slot_bytes: u64,
    /// How long `ferry_acquire` waits for leased layers to be released (default 30000).
    pub acquire_timeout_ms: u64,
}

/// Counters since the engine started (a mirror of the engine's stats), from `ferry_stats`.
/// (Named `ferry_engine_stats` because `ferry_stats` is the function.)
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ferry_engine_stats {
    pub acquires: u64,
    /// Acquires that found the layer present (resident or already loading).
    pub hits: u64,
    /// Acquires that had to start loading the layer.
    pub misses: u64,
    pub loads: u64,
    pub evictions: u64,
    /// Bytes queued for copying to the device.
    pub bytes_streamed: u64,
    /// Nanoseconds clients spent waiting for memory or copies.
    pub stall_ns: u64,
    /// Device bytes allocated now.
    pub device_bytes: u64,
    /// The most device bytes ever allocated at once.
    pub peak_device_bytes: u64,
    /// The arena size: the hard cap.
    pub budget: u64,
    /// Host memory held by fused LoRA layers.
    pub lora_cache_bytes: u64,
}

/// Where an engine handle's engine runs.
#[derive(Debug)]
pub(crate) enum Mode {
    InProcess(Engine),
    Daemon(Arc<Remote>),
}

/// What a `ferry_engine *` points to.
#[derive(Debug)]
pub(crate) struct EngineHandle {
    pub(crate) mode: Mode,
    /// Addresses of the live `ferry_lease` handles this engine handed out (and owns).
    leases: Mutex<HashSet<usize>>,
    /// In-process: the views created through this handle (`ferry_view_remove` removes only
    /// those). In daemon mode the daemon keeps this list per connection.
    views: Mutex<HashSet<u64>>,
}

impl EngineHandle {
    fn new(mode: Mode) -> Box<EngineHandle> {
        Box::new(EngineHandle {
            mode,
            leases: Mutex::new(HashSet::new()),
            views: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) fn leases(&self) -> MutexGuard<'_, HashSet<usize>> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn views(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.views.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Borrows the engine behind `p` or fails with NULL_ARGUMENT.
///
/// # Safety
///
/// As [`ptr::engine_ref`].
pub(crate) unsafe fn engine_arg<'a>(p: *const ferry_engine) -> Result<&'a EngineHandle> {
    // SAFETY: forwarded to the caller.
    unsafe { ptr::engine_ref(p) }.ok_or_else(|| FfiError::null("engine"))
}

/// Borrows a required UTF-8 string argument.
///
/// # Safety
///
/// As [`ptr::cstr`].
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, arg: &str) -> Result<&'a str> {
    // SAFETY: forwarded to the caller.
    let c = unsafe { ptr::cstr(p) }.ok_or_else(|| FfiError::null(arg))?;
    c.to_str().map_err(|_| FfiError::invalid(format!("argument `{arg}` is not valid UTF-8")))
}

/// A path argument (any bytes on Unix).
fn path_of(c: &CStr) -> Result<PathBuf> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(c.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        c.to_str()
            .map(PathBuf::from)
            .map_err(|_| FfiError::invalid("the path is not valid UTF-8".to_string()))
    }
}

fn config_default() -> ferry_engine_config {
    let d = EngineConfig::default();
    ferry_engine_config {
        device: ferry_device::FERRY_DEVICE_AUTO as u32,
        staging_slots: u32::try_from(d.staging_slots).unwrap_or(u32::MAX),
        budget_bytes: 0,
        host_memory_bytes: d.device_config.host_memory,
        staging_slot_bytes: d.staging_slot_bytes as u64,
        acquire_timeout_ms: d.acquire_timeout.as_millis() as u64,
    }
}

fn engine_config(c: &ferry_engine_config) -> Result<EngineConfig> {
    let device = match c.device {
        d if d == ferry_device::FERRY_DEVICE_AUTO as u32 => DeviceChoice::Auto,
        d if d == ferry_device::FERRY_DEVICE_CUDA as u32 => DeviceChoice::Cuda,
        d if d == ferry_device::FERRY_DEVICE_HOST as u32 => DeviceChoice::Host,
        d => return Err(FfiError::invalid(format!("unknown device {d} (not a ferry_device)"))),
    };
    let mut config = EngineConfig { device, ..EngineConfig::default() };
    if c.budget_bytes > 0 {
        config.budget = Some(c.budget_bytes);
    }
    if c.host_memory_bytes > 0 {
        config.device_config.host_memory = c.host_memory_bytes;
    }
    if c.staging_slots > 0 {
        config.staging_slots = c.staging_slots as usize;
    }
    if c.staging_slot_bytes > 0 {
        config.staging_slot_bytes = usize::try_from(c.staging_slot_bytes)
            .map_err(|_| FfiError::invalid("staging_slot_bytes exceeds the address space"))?;
    }
    if c.acquire_timeout_ms > 0 {
        config.acquire_timeout = Duration::from_millis(c.acquire_timeout_ms);
    }
    Ok(config)
}

/// The engine's choice for a `ferry_policy` value and its parameters. `lookahead` matters to
/// `FERRY_POLICY_SEQUENTIAL` only and the thresholds to `FERRY_POLICY_BALANCED` only; every
/// other policy, `auto` and the presets included, ignores them (they use their defaults), as
/// the header documents.
fn policy_choice(
    policy: u32,
    lookahead: u32,
    threshold_bytes: u64,
    threshold_fraction: f64,
) -> Result<PolicyChoice> {
    Ok(match policy {
        p if p == ferry_policy::FERRY_POLICY_NONE as u32 => PolicySpec::None.into(),
        p if p == ferry_policy::FERRY_POLICY_COMPONENT as u32 => PolicySpec::Component.into(),
        p if p == ferry_policy::FERRY_POLICY_SEQUENTIAL as u32 => {
            PolicySpec::Sequential { lookahead: lookahead as usize }.into()
        }
        p if p == ferry_policy::FERRY_POLICY_BALANCED as u32 => {
            let threshold = match (threshold_bytes, threshold_fraction) {
                (0, 0.0) => Threshold::default(),
                (b, 0.0) => Threshold::Bytes(b),
                (0, f) if f.is_finite() && f > 0.0 && f <= 1.0 => Threshold::Fraction(f),
                (0, f) => {
                    return Err(FfiError::invalid(format!(
                        "threshold_fraction must be in (0, 1], not {f}"
                    )));
                }
                _ => {
                    return Err(FfiError::invalid(
                        "give threshold_bytes or threshold_fraction, not both",
                    ));
                }
            };
            PolicySpec::Balanced { threshold }.into()
        }
        p if p == ferry_policy::FERRY_POLICY_AUTO as u32 => PolicyChoice::Auto,
        p if p == ferry_policy::FERRY_POLICY_LOWVRAM as u32 => Preset::LowVram.into(),
        p if p == ferry_policy::FERRY_POLICY_MEDVRAM as u32 => Preset::MedVram.into(),
        p if p == ferry_policy::FERRY_POLICY_MODEL as u32 => Preset::Model.into(),
        p => return Err(FfiError::invalid(format!("unknown policy {p} (not a ferry_policy)"))),
    })
}

/// Fills `*out` with the default configuration (device AUTO, default budget, the engine's
/// default staging ring and acquire timeout).
///
/// Returns `FERRY_ERR_NULL_ARGUMENT` when `out` is NULL. Thread-safe.
///
/// # Safety
///
/// `out`, if non-NULL, must be valid for a write of a `ferry_engine_config`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_engine_config_default(
    out: *mut ferry_engine_config,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `out`, when non-NULL, is valid for a write.
        let out = unsafe { ptr::out(out) }.ok_or_else(|| FfiError::null("out"))?;
        out.write(config_default());
        Ok(())
    })
}

/// Opens an in-process engine: opens the device, allocates the budget (the arena) and the
/// staging ring, starts the copy threads. `config` NULL means the defaults.
///
/// On success `*out` receives the engine; close it with `ferry_engine_close`. On failure
/// `*out` is set to NULL. Errors: `FERRY_ERR_NULL_ARGUMENT` (`out` NULL),
/// `FERRY_ERR_INVALID_ARGUMENT` (a bad field, e.g. an unknown device or a staging ring too
/// large for this machine), `FERRY_ERR_UNSUPPORTED` (CUDA requested but unavailable),
/// `FERRY_ERR_DEVICE`. Thread-safe.
///
/// # Safety
///
/// `config`, if non-NULL, must point to an initialised `ferry_engine_config`; `out`, if
/// non-NULL, must be valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_engine_open(
    config: *const ferry_engine_config,
    out: *mut *mut ferry_engine,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `out`, when non-NULL, is valid for a write.
        let out = unsafe { ptr::out(out) }.ok_or_else(|| FfiError::null("out"))?;
        out.write(core::ptr::null_mut());
        // SAFETY: the caller guarantees `config`, when non-NULL, is a valid config.
        let config = unsafe { ptr::read(config) }.copied().unwrap_or_else(config_default);
        let engine = Engine::new(engine_config(&config)?)?;
        out.write(ptr::engine_into_raw(EngineHandle::new(Mode::InProcess(engine))));
        Ok(())
    })
}

/// Connects to ferryd, the ferry daemon, at the Unix socket `socket_path` (NULL: the default
/// socket, `$XDG_RUNTIME_DIR/ferry/ferryd.sock`, else `/run/ferry/ferryd.sock` for root, else
/// `/tmp/ferry-$UID/ferryd.sock`), and returns an engine in daemon mode through `*out`.
///
/// Every call on the engine is then the same as for an in-process engine, served by the
/// daemon: its device, budget and policies, models shared with its other clients (its stats
/// count all of them). Tensor addresses point into the daemon's host arena, mapped read-only
/// into this process once per engine. Differences: model and LoRA paths must lie under one of
/// the daemon's model roots (relative paths are made absolute here first), and opening the
/// same files twice on one engine gives the same model id. What the engine holds (models,
/// views, leases) is given back by the daemon when the engine is closed or this process ends.
///
/// On failure `*out` is set to NULL. Errors: `FERRY_ERR_NULL_ARGUMENT` (`out` NULL),
/// `FERRY_ERR_INVALID_ARGUMENT` (a path the kernel cannot take for a socket, e.g. longer than
/// 107 bytes), `FERRY_ERR_DISCONNECTED` (no daemon answers at the socket),
/// `FERRY_ERR_NOT_SHAREABLE` (the daemon does not share its device memory with clients, or it
/// streams to a GPU this process cannot map: no CUDA driver here, or no GPU with the daemon's
/// UUID; use `ferry_engine_open`), `FERRY_ERR_NOT_PERMITTED` (the daemon does not
/// serve this process), `FERRY_ERR_UNSUPPORTED` (no common protocol version). Thread-safe.
///
/// # Safety
///
/// `socket_path` must be NULL or a NUL-terminated string; `out` NULL or valid for a write of a
/// pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_connect(
    socket_path: *const c_char,
    out: *mut *mut ferry_engine,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `out`, when non-NULL, is valid for a write.
        let out = unsafe { ptr::out(out) }.ok_or_else(|| FfiError::null("out"))?;
        out.write(core::ptr::null_mut());
        // SAFETY: the caller guarantees `socket_path` is NULL or a NUL-terminated string.
        let socket = match unsafe { ptr::cstr(socket_path) } {
            Some(c) => path_of(c)?,
            None => ferry::server::default_socket_path(),
        };
        let remote = Remote::connect(&socket, None)?;
        out.write(ptr::engine_into_raw(EngineHandle::new(Mode::Daemon(Arc::new(remote)))));
        Ok(())
    })
}

/// `ferry_connect` to one of the daemon's devices: `device` is ferryd's device index
/// (`"1"`) or the device's UUID (`"GPU-…"`, `"HOST-0001"`), as `ferryctl devices` lists them;
/// NULL is the daemon's default device (the same as `ferry_connect`). Models opened on the
/// engine are opened on that device, and tensor addresses point into its arena. Prefer the
/// UUID: indices change with the daemon's configuration. One engine per device; connect once
/// per device for several.
///
/// On failure `*out` is set to NULL. Errors: as for `ferry_connect`, and
/// `FERRY_ERR_INVALID_ARGUMENT` (`device` is neither an index nor a UUID),
/// `FERRY_ERR_NOT_FOUND` (the daemon has no such device), `FERRY_ERR_DEVICE` (the device failed
/// to open in the daemon; the message says why), `FERRY_ERR_UNSUPPORTED` (the daemon predates
/// naming devices). Thread-safe.
///
/// # Safety
///
/// `socket_path` and `device` must be NULL or NUL-terminated strings; `out` NULL or valid for
/// a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_connect_device(
    socket_path: *const c_char,
    device: *const c_char,
    out: *mut *mut ferry_engine,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `out`, when non-NULL, is valid for a write.
        let out = unsafe { ptr::out(out) }.ok_or_else(|| FfiError::null("out"))?;
        out.write(core::ptr::null_mut());
        // SAFETY: the caller guarantees both strings are NULL or NUL-terminated.
        let (socket, device) = unsafe { (ptr::cstr(socket_path), ptr::cstr(device)) };
        let socket = match socket {
            Some(c) => path_of(c)?,
            None => ferry::server::default_socket_path(),
        };
        let device = match device {
            None => None,
            Some(d) => {
                let text = d.to_str().map_err(|_| FfiError::invalid("device is not UTF-8"))?;
                Some(text.parse::<ferry::devices::DeviceRef>().map_err(FfiError::invalid)?)
            }
        };
        let remote = Remote::connect(&socket, device)?;
        out.write(ptr::engine_into_raw(EngineHandle::new(Mode::Daemon(Arc::new(remote)))));
        Ok(())
    })
}

/// Closes an engine: releases and frees every lease still held on it (their `ferry_lease *`
/// become invalid), closes its models, waits for copies in flight, frees its device memory.
/// In daemon mode: frees the leases, unmaps the arena and closes the connection, after which
/// the daemon gives back what the engine held. NULL is allowed (does nothing).
///
/// Not thread-safe with respect to the engine: no other call may use `engine` (or one of its
/// leases) during or after this one.
///
/// # Safety
///
/// `engine`, if non-NULL, must come from `ferry_engine_open` and not have been closed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_engine_close(engine: *mut ferry_engine) {
    boundary::guard_or((), || {
        // SAFETY: the caller guarantees `engine` is NULL or a live engine used by no one else.
        let Some(handle) = (unsafe { ptr::engine_from_raw(engine) }) else { return };
        let addrs: Vec<usize> = handle.leases().drain().collect();
        for addr in addrs {
            // SAFETY: every address in the set came from `lease_into_raw` and is removed from
            // the set before being freed, so each is taken back once; no call uses the lease
            // concurrently (the caller's contract).
            drop(unsafe { ptr::lease_from_addr(addr) });
        }
        drop(handle);
    });
}

/// Opens a model (a `.safetensors` file, a sharded checkpoint's index, or a diffusers folder)
/// and returns its id through `*model_out`. Nothing is copied yet.
///
/// Errors: `FERRY_ERR_NULL_ARGUMENT`, `FERRY_ERR_IO`, `FERRY_ERR_INVALID_MODEL`. Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `path` NULL or a NUL-terminated string;
/// `model_out` NULL or valid for a write of a `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_model_open(
    engine: *const ferry_engine,
    path: *const c_char,
    model_out: *mut u64,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (h, path, out) = unsafe {
            (
                engine_arg(engine)?,
                ptr::cstr(path).ok_or_else(|| FfiError::null("path"))?,
                ptr::out(model_out).ok_or_else(|| FfiError::null("model_out"))?,
            )
        };
        let path = path_of(path)?;
        out.write(match &h.mode {
            Mode::InProcess(e) => e.open_model(path)?,
            Mode::Daemon(r) => r.open_model(&path)?,
        });
        Ok(())
    })
}

/// Closes a model (or a view): its layers leave the device and its memory is returned. In
/// daemon mode the engine stops using it; the daemon closes it once no client uses it.
///
/// Errors: `FERRY_ERR_NOT_FOUND` (unknown id), `FERRY_ERR_BUSY` (a layer is leased, or views
/// of it are open). Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_model_close(
    engine: *const ferry_engine,
    model: u64,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `engine` is NULL or live.
        let h = unsafe { engine_arg(engine) }?;
        match &h.mode {
            Mode::InProcess(e) => {
                e.close_model(model)?;
                h.views().remove(&model);
            }
            Mode::Daemon(r) => r.close_model(model)?,
        }
        Ok(())
    })
}

/// Sets the residency policy of a whole model (`component` NULL) or of one component.
///
/// `policy` is a `ferry_policy` value, passed as an integer and checked. `lookahead` is used
/// by `FERRY_POLICY_SEQUENTIAL` only. `FERRY_POLICY_BALANCED` keeps a resident set within
/// `threshold_bytes` (if non-zero) or `threshold_fraction` of the device's memory (if non-zero,
/// in (0, 1]), or the default 0.75 when both are zero; the other policies ignore both.
/// `FERRY_POLICY_AUTO` and the presets (`FERRY_POLICY_LOWVRAM`, `FERRY_POLICY_MEDVRAM`,
/// `FERRY_POLICY_MODEL`) ignore `lookahead` and both thresholds: they resolve to their policy
/// with its default parameters, exactly as ferryd resolves them (in daemon mode they are sent
/// to ferryd as `auto` or the preset, and ferryd resolves them against its device).
///
/// Errors: `FERRY_ERR_INVALID_ARGUMENT` (unknown policy, bad threshold), `FERRY_ERR_NOT_FOUND`
/// (model or component), `FERRY_ERR_BUSY` (a layer of the model is leased),
/// `FERRY_ERR_BUDGET` (the budget cannot serve the policy). Nothing changes on failure.
/// Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `component` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_set_residency(
    engine: *const ferry_engine,
    model: u64,
    component: *const c_char,
    policy: u32,
    lookahead: u32,
    threshold_bytes: u64,
    threshold_fraction: f64,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `engine` is NULL or live.
        let h = unsafe { engine_arg(engine) }?;
        // SAFETY: the caller guarantees `component` is NULL or a NUL-terminated string.
        let component = match unsafe { ptr::cstr(component) } {
            None => None,
            Some(c) => Some(c.to_str().map_err(|_| FfiError::invalid("component is not UTF-8"))?),
        };
        let choice = policy_choice(policy, lookahead, threshold_bytes, threshold_fraction)?;
        match &h.mode {
            Mode::InProcess(e) => e.set_residency(model, component, choice)?,
            // `auto` and presets travel as themselves (`Policy::Auto`, `Policy::Preset`).
            Mode::Daemon(r) => r.set_residency(model, component, protocol::Policy::from(choice))?,
        }
        Ok(())
    })
}

/// Takes `model` off the device (manual offload, e.g. a base model while its refiner runs).
///
/// `component` NULL: the whole model, and its memory reservation is given back so another
/// model can use the budget; otherwise only that component's layers leave the device (the
/// reservation stays and they stream back on use). Stores the device bytes freed in
/// `*bytes_out` unless it is NULL. In daemon mode this acts on the model ferryd shares among
/// all of its clients: it goes off the device for every one of them.
///
/// Errors: `FERRY_ERR_NOT_FOUND` (model or component), `FERRY_ERR_BUSY` (a layer concerned is
/// leased, by anyone, or pinned), `FERRY_ERR_INVALID_ARGUMENT` (component not UTF-8). Nothing
/// changes on failure. Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `component` NULL or a NUL-terminated string;
/// `bytes_out` NULL or valid for a write of a `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_offload(
    engine: *const ferry_engine,
    model: u64,
    component: *const c_char,
    bytes_out: *mut u64,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (h, component, out) =
            unsafe { (engine_arg(engine)?, optional_str(component)?, ptr::out(bytes_out)) };
        let freed = match &h.mode {
            Mode::InProcess(e) => e.offload(model, component)?,
            Mode::Daemon(r) => r.offload(model, component)?,
        };
        if let Some(out) = out {
            out.write(freed);
        }
        Ok(())
    })
}

/// Brings `model` (`component` NULL) or one component back ahead of use, undoing
/// `ferry_offload`: a model offloaded whole reserves its memory again, then its layers are
/// prefetched through its policy. Returns once the copies are queued; acquiring waits for them.
///
/// Errors: `FERRY_ERR_NOT_FOUND` (model or component), `FERRY_ERR_BUDGET` (another model holds
/// the memory: offload it first), `FERRY_ERR_INVALID_ARGUMENT`. Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `component` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_onload(
    engine: *const ferry_engine,
    model: u64,
    component: *const c_char,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (h, component) = unsafe { (engine_arg(engine)?, optional_str(component)?) };
        match &h.mode {
            Mode::InProcess(e) => e.onload(model, component)?,
            Mode::Daemon(r) => r.onload(model, component)?,
        }
        Ok(())
    })
}

/// A string argument that may be NULL (meaning "none").
///
/// # Safety
///
/// `p` must be NULL or a NUL-terminated string that outlives `'a`.
unsafe fn optional_str<'a>(p: *const c_char) -> Result<Option<&'a str>> {
    // SAFETY: the caller guarantees `p` is NULL or a NUL-terminated string.
    match unsafe { ptr::cstr(p) } {
        None => Ok(None),
        Some(c) => Ok(Some(c.to_str().map_err(|_| FfiError::invalid("component is not UTF-8"))?)),
    }
}

/// Stores the number of layers of `component` of `model` in `*out`.
///
/// A single-file checkpoint has one component, `"model"`. Errors: `FERRY_ERR_NULL_ARGUMENT`,
/// `FERRY_ERR_NOT_FOUND` (model or component). Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `component` NULL or a NUL-terminated string; `out`
/// NULL or valid for a write of a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_layer_count(
    engine: *const ferry_engine,
    model: u64,
    component: *const c_char,
    out: *mut usize,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (h, component, out) = unsafe {
            (
                engine_arg(engine)?,
                str_arg(component, "component")?,
                ptr::out(out).ok_or_else(|| FfiError::null("out"))?,
            )
        };
        out.write(match &h.mode {
            Mode::InProcess(e) => {
                let m = e.model(model)?;
                let c = m.component(component).ok_or_else(|| EngineError::UnknownComponent {
                    model,
                    component: component.to_string(),
                })?;
                c.layers.len()
            }
            Mode::Daemon(r) => r.layer_count(model, component)?,
        });
        Ok(())
    })
}

/// Stores the index (streaming order) of the layer named `layer_name` of `component` in
/// `*out`.
///
/// Errors: `FERRY_ERR_NULL_ARGUMENT`, `FERRY_ERR_NOT_FOUND`. Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `component` and `layer_name` NULL or
/// NUL-terminated strings; `out` NULL or valid for a write of a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_layer_index(
    engine: *const ferry_engine,
    model: u64,
    component: *const c_char,
    layer_name: *const c_char,
    out: *mut usize,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (h, component, name, out) = unsafe {
            (
                engine_arg(engine)?,
                str_arg(component, "component")?,
                str_arg(layer_name, "layer_name")?,
                ptr::out(out).ok_or_else(|| FfiError::null("out"))?,
            )
        };
        out.write(match &h.mode {
            Mode::InProcess(e) => e.layer_index(model, component, name)?,
            Mode::Daemon(r) => r.layer_index(model, component, name)?,
        });
        Ok(())
    })
}

/// Hints that layer `layer` of `component` will be acquired soon; the policy may start
/// loading it. Errors: `FERRY_ERR_NULL_ARGUMENT`, `FERRY_ERR_NOT_FOUND`. Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `component` NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_prefetch(
    engine: *const ferry_engine,
    model: u64,
    component: *const c_char,
    layer: usize,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (h, component) = unsafe { (engine_arg(engine)?, str_arg(component, "component")?) };
        match &h.mode {
            Mode::InProcess(e) => e.prefetch(model, component, layer)?,
            Mode::Daemon(r) => r.prefetch(model, component, layer)?,
        }
        Ok(())
    })
}

/// Stores the engine's counters in `*out` (in daemon mode, the daemon's: every client's work
/// counts; those of the engine's device for `ferry_connect_device`, else summed over the
/// daemon's devices). Errors: `FERRY_ERR_NULL_ARGUMENT`. Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; `out` NULL or valid for a write of a
/// `ferry_engine_stats`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_stats(
    engine: *const ferry_engine,
    out: *mut ferry_engine_stats,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (h, out) =
            unsafe { (engine_arg(engine)?, ptr::out(out).ok_or_else(|| FfiError::null("out"))?) };
        let s = match &h.mode {
            Mode::InProcess(e) => protocol::StatsReply::from(&e.stats()),
            Mode::Daemon(r) => r.stats()?,
        };
        out.write(ferry_engine_stats {
            acquires: s.acquires,
            hits: s.hits,
            misses: s.misses,
            loads: s.loads,
            evictions: s.evictions,
            bytes_streamed: s.bytes_streamed,
            stall_ns: s.stall_ns,
            device_bytes: s.device_bytes,
            peak_device_bytes: s.peak_device_bytes,
            budget: s.budget,
            lora_cache_bytes: s.lora_cache_bytes,
        });
        Ok(())
    })
}

/// Creates a view: model `model` seen through a stack of `n` LoRA files (`lora_paths[i]` at
/// strength `strengths[i]`, applied in order) with `mode` (a `ferry_lora_mode`). The view has
/// its own model id (stored in `*view_out`), used like any model id; layers the stack does not
/// touch are shared with the base. Remove it with `ferry_view_remove` (or `ferry_model_close`)
/// before closing the base.
///
/// Errors: `FERRY_ERR_NULL_ARGUMENT`, `FERRY_ERR_INVALID_ARGUMENT` (n == 0, unknown mode,
/// non-finite strength, the base is itself a view), `FERRY_ERR_NOT_FOUND`,
/// `FERRY_ERR_IO` / `FERRY_ERR_INVALID_MODEL` (a LoRA file). Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine; when `n > 0`, `lora_paths` and `strengths` must be
/// NULL or point to `n` elements, each path a NUL-terminated string; `view_out` NULL or valid
/// for a write of a `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_view_create(
    engine: *const ferry_engine,
    model: u64,
    lora_paths: *const *const c_char,
    strengths: *const f32,
    n: usize,
    mode: u32,
    view_out: *mut u64,
) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller's contract above covers each pointer.
        let (h, paths, strengths, out) = unsafe {
            (
                engine_arg(engine)?,
                ptr::slice(lora_paths, n).ok_or_else(|| FfiError::null("lora_paths"))?,
                ptr::slice(strengths, n).ok_or_else(|| FfiError::null("strengths"))?,
                ptr::out(view_out).ok_or_else(|| FfiError::null("view_out"))?,
            )
        };
        let mode = match mode {
            m if m == ferry_lora_mode::FERRY_LORA_BACKUP as u32 => LoraMode::Backup,
            m if m == ferry_lora_mode::FERRY_LORA_FUSE as u32 => LoraMode::Fuse,
            m => return Err(FfiError::invalid(format!("unknown LoRA mode {m}"))),
        };
        let mut stack = Vec::with_capacity(n);
        for (i, (&p, &s)) in paths.iter().zip(strengths).enumerate() {
            // SAFETY: the caller guarantees each non-NULL element is a NUL-terminated string.
            let c = unsafe { ptr::cstr(p) }
                .ok_or_else(|| FfiError::null(&format!("lora_paths[{i}]")))?;
            stack.push((path_of(c)?, s));
        }
        let view = match &h.mode {
            Mode::InProcess(e) => {
                let (view, _report) = e.create_view(model as ModelId, &stack, mode)?;
                h.views().insert(view);
                view
            }
            Mode::Daemon(r) => r.create_view(model, &stack, mode.into())?,
        };
        out.write(view);
        Ok(())
    })
}

/// Removes a view made by `ferry_view_create` on this engine: the base is seen without the
/// stack again (its layers were never changed: backup mode keeps the file's bytes, fuse mode
/// drops its cache).
///
/// Errors: `FERRY_ERR_NULL_ARGUMENT`, `FERRY_ERR_NOT_FOUND` (`view` is not a view created on
/// this engine, e.g. a model id, or removed already), `FERRY_ERR_BUSY` (a layer is leased
/// through the view). Thread-safe.
///
/// # Safety
///
/// `engine` must be NULL or a live engine.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferry_view_remove(engine: *const ferry_engine, view: u64) -> ferry_status {
    boundary::call(|| {
        // SAFETY: the caller guarantees `engine` is NULL or live.
        let h = unsafe { engine_arg(engine) }?;
        match &h.mode {
            Mode::InProcess(e) => {
                if !h.views().contains(&view) {
                    return Err(FfiError::new(
                        ferry_status::FERRY_ERR_NOT_FOUND,
                        format!("{view} is not a view created on this engine"),
                    ));
                }
                e.close_model(view)?;
                h.views().remove(&view);
            }
            Mode::Daemon(r) => r.remove_view(view)?,
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_checked() {
        let spec = |spec| Ok::<_, ()>(PolicyChoice::from(spec));
        let ok = |p, l, b, f| policy_choice(p, l, b, f).map_err(|_| ());
        assert_eq!(ok(0, 0, 0, 0.0), spec(PolicySpec::None));
        assert_eq!(ok(2, 3, 0, 0.0), spec(PolicySpec::Sequential { lookahead: 3 }));
        assert_eq!(
            ok(3, 0, 10, 0.0),
            spec(PolicySpec::Balanced { threshold: Threshold::Bytes(10) })
        );
        for (bytes, f) in [(1, 0.5), (0, -0.5), (0, 1.5), (0, f64::NAN)] {
            let e = policy_choice(3, 0, bytes, f).expect_err("bad threshold");
            assert_eq!(e.status, ferry_status::FERRY_ERR_INVALID_ARGUMENT);
        }
        let e = policy_choice(99, 0, 0, 0.0).expect_err("unknown policy");
        assert_eq!(e.status, ferry_status::FERRY_ERR_INVALID_ARGUMENT);
        let e = policy_choice(8, 0, 0, 0.0).expect_err("one past the last policy");
        assert_eq!(e.status, ferry_status::FERRY_ERR_INVALID_ARGUMENT);
    }

    #[test]
    fn auto_and_presets_map_like_ferryd_and_ignore_parameters() {
        let cases = [
            (ferry_policy::FERRY_POLICY_AUTO, PolicyChoice::Auto, protocol::Policy::Auto),
            (
                ferry_policy::FERRY_POLICY_LOWVRAM,
                Preset::LowVram.into(),
                protocol::Policy::Preset { preset: protocol::Preset::LowVram },
            ),
            (
                ferry_policy::FERRY_POLICY_MEDVRAM,
                Preset::MedVram.into(),
                protocol::Policy::Preset { preset: protocol::Preset::MedVram },
            ),
            (
                ferry_policy::FERRY_POLICY_MODEL,
                Preset::Model.into(),
                protocol::Policy::Preset { preset: protocol::Preset::Model },
            ),
        ];
        for (p, choice, wire) in cases {
            // Parameters that do not apply are ignored, even values BALANCED would reject.
            for (l, b, f) in [(0, 0, 0.0), (7, 4096, 0.5), (1, 0, f64::NAN)] {
                let got = policy_choice(p as u32, l, b, f).expect("accepted");
                assert_eq!(got, choice, "{p:?}");
                // Daemon mode sends what ferryd turns back into the same choice.
                assert_eq!(protocol::Policy::from(got), wire, "{p:?}");
                assert_eq!(wire.to_choice(), Ok(choice), "{p:?}");
            }
        }
    }

    #[test]
    fn default_config_round_trips() {
        let c = config_default();
        let e = engine_config(&c).expect("default config");
        assert_eq!(e.staging_slots, EngineConfig::default().staging_slots);
        let bad = ferry_engine_config { device: 7, ..c };
        assert!(engine_config(&bad).is_err());
    }
}
