//! LoRA: low-rank adapters loaded from safetensors files, matched against a base model's own
//! tensor names, and merged as `W' = W + Σ scaleᵢ · (alphaᵢ / rankᵢ) · (upᵢ @ downᵢ)`.
//!
//! - [`format`] reads a LoRA file (kohya / LyCORIS LoCon, PEFT / diffusers layouts) into
//!   [`Adapter`]s: the up, down (and mid) factors and alpha of each adapted module.
//! - [`keys`] matches adapters to the base model's tensors, by the base's own names (flattened
//!   with `_` for kohya) plus the original-SD ↔ diffusers UNet naming conversion, and reports
//!   every adapter that matches nothing.
//! - [`math`] computes merged weights: f32 accumulation, written in the weight's dtype (fp8
//!   weights with deterministic stochastic rounding, [`fp8`]).
//!
//! The engine applies merged layers on the fly (backup and fuse modes); `ferryctl export`
//! writes a fused model.

use std::path::PathBuf;
use std::sync::Arc;

use crate::store::{Model, StoreError, TensorId};

pub mod export;
pub mod format;
pub mod fp8;
pub mod keys;
pub mod math;

/// The layout a LoRA file was written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// kohya-ss / LyCORIS: `lora_unet_…`, `lora_te_…`, `.lora_up.weight`, `.lora_down.weight`,
    /// optional `.lora_mid.weight`, `.alpha`.
    Kohya,
    /// PEFT / diffusers: `….lora_A[.adapter].weight`, `….lora_B[.adapter].weight`, optional
    /// `base_model.model.`, `unet.`, `transformer.`, `text_encoder.` prefixes.
    Peft,
}

/// One adapted module: its factors, as tensors of the LoRA file.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// The module's name as the LoRA file spells it, without the factor suffix
    /// (`lora_unet_down_blocks_0_attentions_0_proj_in`, `unet.down_blocks.0.attentions.0.proj_in`).
    pub name: String,
    /// `up` / `lora_B`: shape `(out, rank)` or `(out, rank, 1, 1)`.
    pub up: TensorId,
    /// `down` / `lora_A`: shape `(rank, in)` or `(rank, in, kh, kw)`.
    pub down: TensorId,
    /// LoCon's CP-decomposed middle factor `(rank, rank, kh, kw)`, if any.
    pub mid: Option<TensorId>,
    /// The file's alpha; `None` means alpha = rank (scale 1).
    pub alpha: Option<f32>,
    pub rank: u64,
}

/// A parsed LoRA file.
#[derive(Debug)]
pub struct LoraFile {
    /// The file, opened (mapped) like any safetensors model.
    pub model: Arc<Model>,
    pub format: Format,
    pub adapters: Vec<Adapter>,
    /// Tensors that belong to no adapter ferry understands (LoHa, LoKr, DoRA scales, ...),
    /// by name: reported, never silently dropped.
    pub unrecognised: Vec<String>,
}

/// Rows `start..start + len` along a weight's first dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Rows {
    pub start: u64,
    pub len: u64,
}

impl Rows {
    /// One past the last row (saturating).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// An adapter matched to a base tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    /// Index into [`LoraFile::adapters`].
    pub adapter: usize,
    /// The base model's tensor the delta adds to.
    pub tensor: TensorId,
    /// The rows of `tensor` the delta adds to, when it adapts one slice of a fused weight (the
    /// q, k or v third of an OpenCLIP `attn.in_proj_weight`); `None`: all of it.
    pub rows: Option<Rows>,
}

/// The result of matching a LoRA file to a base model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matched {
    pub matches: Vec<Match>,
    /// Adapters (by name) that match no tensor of the base model.
    pub unmatched: Vec<String>,
}

/// Everything that can go wrong with a LoRA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}: not a LoRA file: {reason}", path.display())]
    NotALora { path: PathBuf, reason: String },
    #[error("{}: adapter {adapter:?} has no {missing} factor", path.display())]
    IncompleteAdapter { path: PathBuf, adapter: String, missing: &'static str },
    #[error("{}: adapter {adapter:?}: bad alpha: {reason}", path.display())]
    BadAlpha { path: PathBuf, adapter: String, reason: String },
    #[error("adapter {adapter:?}: up {up:?} and down {down:?} do not share a rank")]
    RankMismatch { adapter: String, up: Vec<u64>, down: Vec<u64> },
    #[error(
        "adapter {adapter:?} makes a delta of shape {delta:?} but its target {target:?} is {weight:?}"
    )]
    ShapeMismatch { adapter: String, target: String, delta: Vec<u64>, weight: Vec<u64> },
    #[error("tensor {tensor:?}: LoRA cannot be applied to {dtype} weights{hint}", hint = dtype_hint(dtype))]
    UnsupportedDtype { tensor: String, dtype: String },
    #[error("tensor {tensor:?}: {len} bytes do not hold a {dtype} tensor of shape {shape:?}")]
    ByteLength { tensor: String, dtype: String, shape: Vec<u64>, len: u64 },
    #[error("adapter {adapter:?}: {kind} adapters are not supported yet")]
    UnsupportedAdapter { adapter: String, kind: String },
}

/// Why a dtype cannot take a LoRA, for the ones people try.
fn dtype_hint(dtype: &str) -> &'static str {
    match dtype {
        "I8" => {
            " (int8-quantized: the delta would need the weight's quantization scales; \
             dequantize the model, or apply the LoRA to an unquantized copy)"
        }
        "U8" | "F4" | "F6_E2M3" | "F6_E3M2" => {
            " (packed / 4-bit quantized: the delta cannot be added to packed codes; \
             dequantize the model, or apply the LoRA to an unquantized copy)"
        }
        _ => "",
    }
}
