//! Every message, its kind number, and the frame encoder and decoder.
//!
//! A message is a plain struct; its body on the wire is the bincode encoding of its fields in
//! declaration order ([`super::body_config`]). Field order and types are the protocol: never
//! reorder, insert or retype a field; a change is a new protocol version. The enums below
//! ([`Policy`], [`Threshold`], [`LoraMode`], [`LoraSource`]) are encoded as a `u32` variant
//! index followed by the variant's fields; new variants are only ever appended.

use serde::{Deserialize, Serialize};

use super::frame::{FLAG_FDS, FrameHeader, ProtocolError};
use super::{ErrorCode, HEADER_LEN, MAX_BODY_LEN, MAX_FDS, PROTOCOL_VERSION, body_config};

/// How many file descriptors a kind of frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdRule {
    None,
    One,
    UpTo(usize),
}

macro_rules! messages {
    ($( $(#[$doc:meta])* $variant:ident($ty:ident) = $code:literal, $name:literal, $fds:expr; )*) => {
        /// A message kind: the `kind` field of the frame header.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum Kind {
            $( $(#[$doc])* $variant = $code, )*
        }

        impl Kind {
            /// Every kind, requests first, in kind-number order.
            pub const ALL: &'static [Kind] = &[$( Kind::$variant, )*];

            /// The kind with this number, if there is one.
            pub fn from_u16(kind: u16) -> Option<Kind> {
                match kind {
                    $( $code => Some(Kind::$variant), )*
                    _ => None,
                }
            }

            /// The kind's name in snake case (`open_model_fd`): used in messages, the spec and
            /// the golden vector file names.
            pub fn name(self) -> &'static str {
                match self {
                    $( Kind::$variant => $name, )*
                }
            }

            /// How many file descriptors a frame of this kind carries.
            pub fn fds(self) -> FdRule {
                match self {
                    $( Kind::$variant => $fds, )*
                }
            }
        }

        /// Any message (one variant per kind).
        #[derive(Clone, Debug, PartialEq)]
        pub enum Message {
            $( $(#[$doc])* $variant($ty), )*
        }

        impl Message {
            /// The kind the frame header carries for this message.
            pub fn kind(&self) -> Kind {
                match self {
                    $( Message::$variant(_) => Kind::$variant, )*
                }
            }

            /// The body: the message's fields, bincode-encoded.
            pub fn encode_body(&self) -> Result<Vec<u8>, ProtocolError> {
                let encoded = match self {
                    $( Message::$variant(m) => bincode::serde::encode_to_vec(m, body_config()), )*
                };
                encoded.map_err(|e| ProtocolError::Body { kind: self.kind(), message: e.to_string() })
            }

            /// Decodes a body of `kind`; returns the message and the bytes its fields took.
            fn decode_body(
                kind: Kind,
                body: &[u8],
            ) -> Result<(Message, usize), bincode::error::DecodeError> {
                Ok(match kind {
                    $( Kind::$variant => {
                        let (m, n) = bincode::serde::decode_from_slice::<$ty, _>(body, body_config())?;
                        (Message::$variant(m), n)
                    } )*
                })
            }
        }

        /// The message's fields alone (no kind), as serde sees them: what the golden vector
        /// index shows as JSON.
        impl Serialize for Message {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $( Message::$variant(m) => m.serialize(s), )*
                }
            }
        }

        $(
            impl From<$ty> for Message {
                fn from(m: $ty) -> Message {
                    Message::$variant(m)
                }
            }
        )*
    };
}

messages! {
    /// Client → server, first frame of every connection.
    Hello(Hello) = 0x0001, "hello", FdRule::None;
    /// Client → server: the client is leaving (answered with `Ack`, then the server closes).
    Goodbye(Goodbye) = 0x0002, "goodbye", FdRule::None;
    /// Open a model by path under one of the server's model roots.
    OpenModel(OpenModel) = 0x0010, "open_model", FdRule::None;
    /// Open a model from a descriptor the client opened (exactly one fd).
    OpenModelFd(OpenModelFd) = 0x0011, "open_model_fd", FdRule::One;
    /// The client no longer uses a model.
    CloseModel(CloseModel) = 0x0012, "close_model", FdRule::None;
    /// Set the residency policy of a model or one component.
    SetResidency(SetResidency) = 0x0013, "set_residency", FdRule::None;
    /// Take a whole model (its memory reservation too) or one component off the device.
    Offload(Offload) = 0x0014, "offload", FdRule::None;
    /// Bring an offloaded model or component back ahead of use.
    Onload(Onload) = 0x0015, "onload", FdRule::None;
    /// Open a model by path on a named device (needs `DEVICES`).
    OpenModelOn(OpenModelOn) = 0x0016, "open_model_on", FdRule::None;
    /// Open a model from a passed descriptor on a named device (needs `DEVICES`).
    OpenModelFdOn(OpenModelFdOn) = 0x0017, "open_model_fd_on", FdRule::One;
    /// Lease a layer.
    Acquire(Acquire) = 0x0020, "acquire", FdRule::None;
    /// Wait until a leased layer's bytes are on the device.
    WaitReady(WaitReady) = 0x0021, "wait_ready", FdRule::None;
    /// Give a lease back.
    Release(Release) = 0x0022, "release", FdRule::None;
    /// Hint that a layer will be acquired soon.
    Prefetch(Prefetch) = 0x0023, "prefetch", FdRule::None;
    /// `Acquire`, answered with the layer's interprocess ready event (needs `CUDA_EVENTS`).
    AcquireEvent(AcquireEvent) = 0x0024, "acquire_event", FdRule::None;
    /// Create a view of a model through a LoRA stack (fds for `LoraSource::Fd` entries).
    ApplyLora(ApplyLora) = 0x0030, "apply_lora", FdRule::UpTo(MAX_FDS);
    /// Drop a view.
    RemoveLora(RemoveLora) = 0x0031, "remove_lora", FdRule::None;
    /// Engine counters.
    Stats(Stats) = 0x0040, "stats", FdRule::None;
    /// The open models.
    ListModels(ListModels) = 0x0041, "list_models", FdRule::None;
    /// The connected clients.
    ListClients(ListClients) = 0x0042, "list_clients", FdRule::None;
    /// List the server's devices, with their counters (needs `DEVICES`).
    ListDevices(ListDevices) = 0x0043, "list_devices", FdRule::None;
    /// Ask how to map the default device's arena (host memfd, or CUDA handle).
    MapArena(MapArena) = 0x0050, "map_arena", FdRule::None;
    /// Ask how to map a named device's arena (needs `DEVICES`).
    MapArenaOn(MapArenaOn) = 0x0051, "map_arena_on", FdRule::None;
    /// Server → client: success without a payload.
    Ack(Ack) = 0x8000, "ack", FdRule::None;
    /// Server → client: the handshake's answer.
    Welcome(Welcome) = 0x8001, "welcome", FdRule::None;
    /// Server → client: answer to `OpenModel` and `OpenModelFd`.
    ModelOpened(ModelOpened) = 0x8010, "model_opened", FdRule::None;
    /// Server → client: answer to `Offload`.
    Offloaded(Offloaded) = 0x8014, "offloaded", FdRule::None;
    /// Server → client: answer to `Acquire`.
    Leased(Leased) = 0x8020, "leased", FdRule::None;
    /// Server → client: answer to `WaitReady`.
    Ready(Ready) = 0x8021, "ready", FdRule::None;
    /// Server → client: answer to `AcquireEvent`.
    LeasedEvent(LeasedEvent) = 0x8024, "leased_event", FdRule::None;
    /// Server → client: answer to `ApplyLora`.
    ViewCreated(ViewCreated) = 0x8030, "view_created", FdRule::None;
    /// Server → client: answer to `Stats`.
    StatsReply(StatsReply) = 0x8040, "stats_reply", FdRule::None;
    /// Server → client: answer to `ListModels`.
    Models(Models) = 0x8041, "models", FdRule::None;
    /// Server → client: answer to `ListClients`.
    Clients(Clients) = 0x8042, "clients", FdRule::None;
    /// Server → client: answer to `ListDevices`.
    Devices(Devices) = 0x8043, "devices", FdRule::None;
    /// Server → client: answer to `MapArena`, with the arena's memfd (exactly one fd).
    ArenaFd(ArenaFd) = 0x8050, "arena_fd", FdRule::One;
    /// Server → client: answer to `MapArena`/`MapArenaOn` on a CUDA device: how to map its
    /// device memory (needs `CUDA_IPC`; a VMM handle's descriptor travels with the frame).
    CudaArena(CudaArena) = 0x8051, "cuda_arena", FdRule::UpTo(1);
    /// Server → client: a request failed (or the connection is being closed).
    Error(ErrorReply) = 0xffff, "error", FdRule::None;
}

impl Kind {
    /// Whether clients send this kind (kind numbers below `0x8000`); servers send the others.
    pub fn is_request(self) -> bool {
        (self as u16) < 0x8000
    }

    /// The reply a successful request of this kind gets (`None` for replies). Any request
    /// may instead get [`Kind::Error`].
    pub fn reply(self) -> Option<Kind> {
        Some(match self {
            Kind::Hello => Kind::Welcome,
            Kind::OpenModel | Kind::OpenModelFd | Kind::OpenModelOn | Kind::OpenModelFdOn => {
                Kind::ModelOpened
            }
            Kind::Acquire => Kind::Leased,
            Kind::AcquireEvent => Kind::LeasedEvent,
            Kind::WaitReady => Kind::Ready,
            Kind::ApplyLora => Kind::ViewCreated,
            Kind::Offload => Kind::Offloaded,
            Kind::Stats => Kind::StatsReply,
            Kind::ListModels => Kind::Models,
            Kind::ListClients => Kind::Clients,
            Kind::ListDevices => Kind::Devices,
            // `CudaArena` on a CUDA device.
            Kind::MapArena | Kind::MapArenaOn => Kind::ArenaFd,
            Kind::Goodbye
            | Kind::CloseModel
            | Kind::SetResidency
            | Kind::Release
            | Kind::Prefetch
            | Kind::RemoveLora
            | Kind::Onload => Kind::Ack,
            _ => return None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// The first frame of a connection. Its layout is the same in every protocol version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The lowest protocol version the client speaks.
    pub min_version: u16,
    /// The highest protocol version the client speaks.
    pub max_version: u16,
    /// The feature bits the client wants ([`super::features`]).
    pub features: u64,
    /// A name for logs and `ListClients` (`"ferry-python 0.1"`).
    pub client_name: String,
}

/// The client is leaving; the server answers `Ack`, releases what the client held and closes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {}

/// Open a model by path. The path must resolve (symlinks followed) under one of the server's
/// model roots. Answered with [`ModelOpened`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenModel {
    /// A `.safetensors` file, a `*.safetensors.index.json`, or a diffusers folder (UTF-8).
    pub path: String,
}

/// Open a model from the descriptor that travels with the frame: a `.safetensors` file, or a
/// directory (opened `O_RDONLY | O_DIRECTORY`) holding a sharded or diffusers model. Answered
/// with [`ModelOpened`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenModelFd {
    /// A display name for logs and `ListModels` (may be empty).
    pub name: String,
}

/// How a request names a device: ferryd's device index (as [`Devices`] lists it) or the
/// device's UUID, its stable identity (`GPU-…`; `HOST-000N` for simulated host devices).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSel {
    Index(u32),
    Uuid(String),
}

/// [`OpenModel`] on a named device. Answered with [`ModelOpened`]; the model's id carries the
/// device's index in its top 16 bits. The same files opened on two devices are two models.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenModelOn {
    pub path: String,
    pub device: DeviceSel,
}

/// [`OpenModelFd`] on a named device. Answered with [`ModelOpened`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenModelFdOn {
    pub name: String,
    pub device: DeviceSel,
}

/// The client no longer uses a model (or view). Answered with `Ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseModel {
    pub model: u64,
}

/// Set the residency policy of a whole model (`component` = `None`) or of one component.
/// Answered with `Ack`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetResidency {
    pub model: u64,
    pub component: Option<String>,
    pub policy: Policy,
}

/// A residency policy (design brief §3). Variant indices: `None` 0, `Component` 1,
/// `Sequential` 2, `Balanced` 3, `Lru` 4, `Auto` 5, `Preset` 6; later variants are appended.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Policy {
    /// Everything resident, loaded at once.
    None,
    /// Whole components in and out, least recently used first.
    Component,
    /// A window of `lookahead + 1` layers; every layer streams every pass.
    Sequential { lookahead: u32 },
    /// A stable resident set within `threshold`; the rest streams.
    Balanced { threshold: Threshold },
    /// Plain least-recently-used within `threshold` (a baseline).
    Lru { threshold: Threshold },
    /// Decided by the server from the device's memory: `sequential` on small devices,
    /// `balanced` above (the server's `auto_sequential_max`, 4 GiB by default).
    Auto,
    /// An SD.Next-style preset, resolved by the server to the policy it names.
    Preset { preset: Preset },
}

/// SD.Next's offload presets. Variant indices: `LowVram` 0 (= sequential, lookahead 1),
/// `MedVram` 1 (= component), `Model` 2 (= component).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preset {
    LowVram,
    MedVram,
    Model,
}

/// A byte budget. Variant indices: `Bytes` 0, `Fraction` 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Threshold {
    /// Absolute bytes.
    Bytes(u64),
    /// A fraction of the device's memory, in `[0, 1]`.
    Fraction(f64),
}

/// Take a whole model (`component` = `None`) or one component off the device. A whole model
/// also gives back its memory reservation, so another model can use the budget; it affects
/// every client of the model (they share it). Fails with `busy` while any of its layers are
/// leased (by any client) or pinned. Answered with [`Offloaded`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offload {
    pub model: u64,
    pub component: Option<String>,
}

/// Bring a model (`component` = `None`) or one component back ahead of use: its layers are
/// prefetched through its policy, and a model offloaded whole reserves its memory again.
/// Answered with `Ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Onload {
    pub model: u64,
    pub component: Option<String>,
}

/// Lease layer `layer` (its index in the component's layer list, as [`ModelOpened`] gave it).
/// Answered with [`Leased`] at once, before the copy has necessarily finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acquire {
    /// A model id, or a view id (views are acquired like models).
    pub model: u64,
    pub component: String,
    pub layer: u32,
}

/// [`Acquire`] on a CUDA device, answered with [`LeasedEvent`]: the lease and an interprocess
/// event the client's stream can wait on instead of sending `WaitReady`. Needs `CUDA_EVENTS`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireEvent {
    pub model: u64,
    pub component: String,
    pub layer: u32,
}

/// Wait until the leased layer's bytes are on the device. Answered with [`Ready`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitReady {
    pub lease: u64,
}

/// Give a lease back. The client must be done with the memory (its own work on the layer
/// finished) before sending it. Answered with `Ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub model: u64,
    pub lease: u64,
}

/// Hint that a layer will be acquired soon. Answered with `Ack` (the load, if any, goes on in
/// the background).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefetch {
    pub model: u64,
    pub component: String,
    pub layer: u32,
}

/// Create a view of `model` through a stack of LoRA adapters. Answered with [`ViewCreated`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplyLora {
    pub model: u64,
    pub stack: Vec<LoraRef>,
    pub mode: LoraMode,
}

/// One adapter of a stack and its scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    pub source: LoraSource,
    pub scale: f32,
}

/// Where an adapter's file comes from. Variant indices: `Path` 0, `Fd` 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoraSource {
    /// A path under one of the server's model roots.
    Path(String),
    /// The `n`th (from 0) descriptor that came with this frame.
    Fd(u32),
}

/// How merged weights are kept (design brief §6). Variant indices: `Backup` 0, `Fuse` 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoraMode {
    /// Merged as layers stream; the base bytes are never changed.
    Backup,
    /// Merged once and cached in pinned host memory.
    Fuse,
}

/// Drop a view. Answered with `Ack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveLora {
    pub view: u64,
}

/// Ask for the engine's counters. Answered with [`StatsReply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {}

/// Ask for the open models. Answered with [`Models`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListModels {}

/// Ask for the connected clients. Answered with [`Clients`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListClients {}

/// Ask for the host arena's memfd, to map it and read leased tensors at their
/// `arena_offset`. Needs [`super::features::HOST_ARENA`]. Answered with [`ArenaFd`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapArena {}

/// [`MapArena`] for a named device's arena (a tensor's `arena_offset` is relative to the arena
/// of the device its model is on). Answered with [`ArenaFd`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapArenaOn {
    pub device: DeviceSel,
}

/// List the devices. Answered with [`Devices`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDevices {}

// ---------------------------------------------------------------------------------------------
// Replies

/// Success without a payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {}

/// The handshake's answer. Its layout is the same in every protocol version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides now speak; every later frame carries it.
    pub version: u16,
    /// The feature bits granted: the client's bits the server also supports.
    pub features: u64,
    /// The server's id for this connection (as `ListClients` shows it).
    pub client_id: u64,
    /// ferryd's version (`0.1.0`).
    pub server_version: String,
    /// The largest frame body the server accepts.
    pub max_body_len: u32,
    /// The most descriptors the server accepts with one frame.
    pub max_fds: u32,
    pub device: DeviceSummary,
}

/// The device the server streams to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    /// `cuda` or `host`.
    pub backend: String,
    /// Product name (`NVIDIA H100 80GB HBM3`, `host memory`).
    pub name: String,
    /// Stable identity (`GPU-…` on CUDA).
    pub uuid: String,
    /// Bytes of device memory.
    pub total_memory: u64,
    /// Bytes the engine may use (its arena).
    pub budget: u64,
}

/// A model is open: its id and its layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelOpened {
    pub model: u64,
    /// Components in pipeline order.
    pub components: Vec<ComponentSummary>,
}

/// One component: its layers in streaming order (`Acquire::layer` indexes this list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentSummary {
    pub name: String,
    pub layers: Vec<LayerSummary>,
}

/// One layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSummary {
    pub name: String,
    /// Sum of its tensors' lengths.
    pub bytes: u64,
    /// Number of tensors.
    pub tensors: u32,
}

/// What an [`Offload`] freed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offloaded {
    /// Device bytes given back: the model's reservation (whole model) or the bytes of the
    /// component's layers that were on the device (each rounded up to the arena's alignment).
    pub bytes: u64,
}

/// A lease: where the layer's tensors are in the arena.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leased {
    pub lease: u64,
    /// The layer's name.
    pub layer: String,
    /// Whether the bytes were already on the device when the reply was sent; if not, send
    /// `WaitReady` before reading them.
    pub ready: bool,
    /// The layer's tensors, in file header order.
    pub tensors: Vec<TensorDesc>,
}

/// One tensor of a leased layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDesc {
    /// Its name within the component.
    pub name: String,
    /// The safetensors dtype name (`F16`, `BF16`, `F8_E4M3`, ...).
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Offset of its first byte from the start of the arena.
    pub arena_offset: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// A lease and the event its layer's copies complete before (`AcquireEvent`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedEvent {
    pub leased: Leased,
    /// A CUDA interprocess event handle (64 bytes, `cuIpcOpenEventHandle`), recorded on
    /// ferryd's copy stream after the layer's copies: make the stream that reads the layer
    /// wait on it (`cuStreamWaitEvent`). Empty when `leased.ready` is set (nothing to wait
    /// for), or when the driver could not export an event (`leased.ready` unset: send
    /// `WaitReady` as after `Acquire`). ferryd recycles a fixed ring of such events and never destroys them while it
    /// runs, so a client may cache what it opened by these bytes; a recycled event only ever
    /// completes later, never earlier, than the copies it was first recorded after.
    pub ready_event: Vec<u8>,
}

/// The leased layer's bytes are on the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub lease: u64,
}

/// A view exists: acquire its layers with `view` in place of a model id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewCreated {
    pub view: u64,
    /// Base tensors that receive at least one delta.
    pub merged: u64,
    /// One report per stack entry, in stack order.
    pub loras: Vec<LoraReport>,
}

/// What matching found for one adapter file of a stack: nothing is dropped silently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoraReport {
    /// Adapter modules that match no tensor of the model.
    pub unmatched: Vec<String>,
    /// Tensors of adapter kinds ferry does not apply (LoHa, LoKr, DoRA scales, ...).
    pub unrecognised: Vec<String>,
}

/// The engine's counters since it started (mirrors `ferry::engine::Stats`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReply {
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
    /// Host memory held by fused LoRA layers (fuse mode).
    pub lora_cache_bytes: u64,
}

/// The open models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Models {
    pub models: Vec<ModelInfo>,
}

/// One open model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub model: u64,
    /// The path it was opened by (or the display name of an fd-opened model).
    pub path: String,
    /// `single_file`, `sharded` or `diffusers`.
    pub source: String,
    pub total_bytes: u64,
    /// Layers in all components.
    pub layers: u32,
    /// Layers on the device now (loading or loaded).
    pub resident_layers: u32,
    /// The model-wide policy, if one was set.
    pub policy: Option<Policy>,
    /// Connections that have the model open.
    pub clients: u32,
}

/// The server's devices, by index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    pub devices: Vec<DeviceEntry>,
}

/// One device. A device that failed to open is listed with `error` set (and no `stats`);
/// requests naming it get `device_unavailable` with that reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// ferryd's device index (the top 16 bits of the ids of models on it).
    pub index: u32,
    /// `cuda:0`, `host:1`: backend and ordinal.
    pub label: String,
    /// Stable identity (empty if the device could not be identified).
    pub uuid: String,
    /// Product name (empty for a failed device).
    pub name: String,
    pub total_memory: u64,
    /// The NUMA node its staging ring and I/O threads are bound to, if any.
    pub numa_node: Option<u32>,
    /// Why the device does not serve.
    pub error: Option<String>,
    /// Its engine's counters (`budget` is its arena).
    pub stats: Option<StatsReply>,
    /// Models (and views) open on it.
    pub models: u32,
    /// Acquires waiting for its memory right now (clients stalled on it at this moment).
    pub waiting: u32,
}

/// The connected clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clients {
    pub clients: Vec<ClientInfo>,
}

/// One connection, with the credentials the kernel reported for it (`SO_PEERCRED`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub id: u64,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// `Hello::client_name`.
    pub name: String,
    /// Models it has open.
    pub models: u32,
    /// Leases it holds.
    pub leases: u32,
}

/// The host arena's memfd travels with this frame. Map `len` bytes of it from offset 0
/// (`PROT_READ`, `MAP_SHARED`); a tensor's bytes are at its `arena_offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaFd {
    pub len: u64,
    /// `host`.
    pub backend: String,
}

/// A CUDA device's arena, for a client process to map into its own context once (on the
/// device with `device_uuid`: ordinals differ between processes). A tensor's device address
/// in the client is the mapping's base plus its `arena_offset`.
///
/// ferryd's copies into the arena are ordered on its own stream: read a leased layer only
/// after `wait_ready` (or a `leased` reply with `ready` set), and synchronise your own work on
/// it before `release` (the memory may be reused as soon as the release is acknowledged).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaArena {
    /// Bytes of the arena: every `arena_offset + len` is within it.
    pub len: u64,
    /// The device's UUID (`GPU-…`).
    pub device_uuid: String,
    pub handle: CudaHandle,
}

/// How a CUDA arena is shared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CudaHandle {
    /// A VMM allocation exported as a POSIX file descriptor, which travels with the frame
    /// (exactly one): `cuMemImportFromShareableHandle`, `cuMemAddressReserve(alloc_len)`,
    /// `cuMemMap`, `cuMemSetAccess`; `alloc_len` (a multiple of the allocation granularity,
    /// at least `len`) is the size to reserve and map.
    PosixFd { alloc_len: u64 },
    /// A legacy IPC memory handle (`cuIpcOpenMemHandle`; 64 bytes); no descriptor. Needs the
    /// client in ferryd's IPC namespace.
    Ipc { handle: Vec<u8> },
}

/// A request failed: a typed code ([`ErrorCode`], the table in docs/protocol.md) and a
/// message for people. Its layout is the same in every protocol version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: u32,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply { code: code as u32, message: message.into() }
    }

    /// The code, if this implementation knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u32(self.code)
    }
}

impl From<&ProtocolError> for ErrorReply {
    fn from(e: &ProtocolError) -> ErrorReply {
        ErrorReply::new(e.code(), e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Frames

/// A whole frame (header and body) for `msg`, in the current [`PROTOCOL_VERSION`], with the
/// descriptor flag clear. Fails only if the body would exceed [`MAX_BODY_LEN`].
pub fn encode_frame(request_id: u64, msg: &Message) -> Result<Vec<u8>, ProtocolError> {
    encode_frame_with(PROTOCOL_VERSION, 0, request_id, msg)
}

/// A whole frame with an explicit version and flags (set [`FLAG_FDS`] when descriptors go
/// with it; the socket helpers do).
pub fn encode_frame_with(
    version: u16,
    flags: u32,
    request_id: u64,
    msg: &Message,
) -> Result<Vec<u8>, ProtocolError> {
    let body = msg.encode_body()?;
    let body_len = u32::try_from(body.len())
        .ok()
        .filter(|&n| n <= MAX_BODY_LEN)
        .ok_or(ProtocolError::FrameTooLarge { len: body.len() as u64, max: MAX_BODY_LEN })?;
    let header = FrameHeader { version, kind: msg.kind(), flags, body_len, request_id };
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&header.encode());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes the body of a frame whose header is `header`. `body` must be exactly
/// `header.body_len` bytes; the message's fields must use all of them.
pub fn decode_frame(header: &FrameHeader, body: &[u8]) -> Result<Message, ProtocolError> {
    let expected = header.body_len as usize;
    if body.len() < expected {
        return Err(ProtocolError::Truncated { what: "body", expected, got: body.len() });
    }
    if body.len() > expected {
        return Err(ProtocolError::TrailingBytes {
            kind: header.kind,
            extra: body.len() - expected,
        });
    }
    let (msg, used) = Message::decode_body(header.kind, body)
        .map_err(|e| ProtocolError::Body { kind: header.kind, message: e.to_string() })?;
    if used != body.len() {
        return Err(ProtocolError::TrailingBytes { kind: header.kind, extra: body.len() - used });
    }
    Ok(msg)
}

/// Decodes a whole frame held in memory: header checks ([`FrameHeader::decode`]), then the
/// body. Bytes after the frame's end are [`ProtocolError::TrailingBytes`].
pub fn decode_frame_bytes(bytes: &[u8]) -> Result<(FrameHeader, Message), ProtocolError> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(ProtocolError::Truncated {
            what: "header",
            expected: HEADER_LEN,
            got: bytes.len(),
        });
    };
    let header = FrameHeader::decode(head)?;
    let body = &bytes[HEADER_LEN..];
    let msg = decode_frame(&header, body)?;
    Ok((header, msg))
}

const _: () = assert!(FLAG_FDS == 1);

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: impl Into<Message>) -> Vec<u8> {
        encode_frame(9, &msg.into()).expect("encodes")
    }

    #[test]
    fn kinds_are_unique_named_and_directed() {
        let mut names = std::collections::HashSet::new();
        for &k in Kind::ALL {
            assert_eq!(Kind::from_u16(k as u16), Some(k));
            assert!(names.insert(k.name()), "duplicate name {}", k.name());
            assert_eq!(k.reply().is_some(), k.is_request(), "{}", k.name());
            if let Some(r) = k.reply() {
                assert!(!r.is_request());
            }
        }
        assert_eq!(Kind::from_u16(0), None);
        assert_eq!(Kind::from_u16(0x7fff), None);
    }

    #[test]
    fn encoding_follows_the_documented_rules() {
        // Acquire { model: u64, component: String, layer: u32 }
        let b = frame(Acquire { model: 1, component: "unet".into(), layer: 3 });
        assert_eq!(
            b[HEADER_LEN..],
            [1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, b'u', b'n', b'e', b't', 3, 0, 0, 0]
        );
        // Option tag, enum index (u32), nested enum, f64.
        let b = frame(SetResidency {
            model: 2,
            component: None,
            policy: Policy::Balanced { threshold: Threshold::Fraction(0.5) },
        });
        assert_eq!(
            b[HEADER_LEN..],
            [2, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xe0, 0x3f]
        );
        // Empty messages have empty bodies.
        assert_eq!(frame(Stats {}).len(), HEADER_LEN);
        // bool is one byte, Vec a u64 count.
        let b = frame(Leased { lease: 1, layer: String::new(), ready: true, tensors: vec![] });
        assert_eq!(
            b[HEADER_LEN..],
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn bodies_are_checked() {
        let b = frame(WaitReady { lease: 5 });
        let (h, m) = decode_frame_bytes(&b).expect("valid");
        assert_eq!(m, Message::WaitReady(WaitReady { lease: 5 }));
        assert_eq!(h.request_id, 9);

        assert!(matches!(
            decode_frame(&h, &b[HEADER_LEN..HEADER_LEN + 3]),
            Err(ProtocolError::Truncated { what: "body", expected: 8, got: 3 })
        ));
        let mut longer = b.clone();
        longer.push(0);
        assert!(matches!(
            decode_frame_bytes(&longer),
            Err(ProtocolError::TrailingBytes { kind: Kind::WaitReady, extra: 1 })
        ));
        // A body_len that covers more than the message's fields.
        let mut padded = b.clone();
        padded[12] = 9;
        padded.push(0);
        assert!(matches!(
            decode_frame_bytes(&padded),
            Err(ProtocolError::TrailingBytes { kind: Kind::WaitReady, extra: 1 })
        ));
        // A body_len shorter than the fields.
        let mut short = b.clone();
        short[12] = 4;
        short.truncate(HEADER_LEN + 4);
        let e = decode_frame_bytes(&short).expect_err("short body");
        assert!(matches!(e, ProtocolError::Body { kind: Kind::WaitReady, .. }), "{e}");
        assert!(matches!(
            decode_frame_bytes(&b[..10]),
            Err(ProtocolError::Truncated { what: "header", expected: 24, got: 10 })
        ));
    }

    #[test]
    fn invalid_values_are_typed_body_errors() {
        // Option tag 2.
        let mut b = frame(SetResidency { model: 1, component: None, policy: Policy::None });
        b[HEADER_LEN + 8] = 2;
        let e = decode_frame_bytes(&b).expect_err("bad tag");
        assert!(matches!(e, ProtocolError::Body { kind: Kind::SetResidency, .. }), "{e}");
        // Policy variant 9.
        let mut b = frame(SetResidency { model: 1, component: None, policy: Policy::None });
        b[HEADER_LEN + 9] = 9;
        assert!(matches!(decode_frame_bytes(&b), Err(ProtocolError::Body { .. })));
        // bool 2.
        let mut b = frame(Leased { lease: 1, layer: String::new(), ready: true, tensors: vec![] });
        b[HEADER_LEN + 16] = 2;
        assert!(matches!(decode_frame_bytes(&b), Err(ProtocolError::Body { .. })));
        // Invalid UTF-8.
        let mut b = frame(OpenModel { path: "ab".into() });
        b[HEADER_LEN + 8] = 0xff;
        let e = decode_frame_bytes(&b).expect_err("not UTF-8");
        assert!(e.to_string().starts_with("open_model body does not decode"), "{e}");
        // A string length far past the body, and past the limit.
        for len in [1000u64, u64::MAX, u64::from(MAX_BODY_LEN) + 1] {
            let mut b = frame(OpenModel { path: "ab".into() });
            b[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&len.to_le_bytes());
            assert!(matches!(decode_frame_bytes(&b), Err(ProtocolError::Body { .. })));
        }
    }

    #[test]
    fn error_replies_carry_protocol_error_codes() {
        let e = ProtocolError::UnknownKind { kind: 0x1234 };
        let r = ErrorReply::from(&e);
        assert_eq!(r.error_code(), Some(ErrorCode::UnknownKind));
        assert_eq!(r.message, "unknown message kind 0x1234");
    }
}
