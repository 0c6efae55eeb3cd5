//! A model seen through a LoRA stack: which tensors change, and how their bytes are made.
//!
//! - **backup**: a layer's original bytes are copied as usual; once they have landed, the
//!   adapted tensors are overwritten on the device with the merged values. The source (the file
//!   mapping) never changes, so removing the stack and loading the layer again restores the
//!   original bytes exactly, with no copy of the weights kept anywhere.
//! - **fuse**: each adapted tensor is merged once and the result cached in host memory (up to
//!   the cache limit, counted against the RAM budget); later loads copy the cached bytes as
//!   plain data. Removing the stack drops the cache; the original comes from the mapping again.
//!
//! Both modes produce the same bytes (the merge is deterministic). The merge runs on the CPU on
//! both backends for now: a cuBLAS GEMM on the device for backup mode is not written yet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::error::EngineError;
use crate::lora::LoraFile;
use crate::lora::export::{self, ExportReport};
use crate::store::{Model, TensorId};

/// How a LoRA stack is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraMode {
    Backup,
    Fuse,
}

#[derive(Debug, Default)]
struct FuseCache {
    bytes: HashMap<TensorId, Arc<Vec<u8>>>,
    used: u64,
}

/// A LoRA stack applied to one model.
#[derive(Debug)]
pub(crate) struct LoraState {
    pub mode: LoraMode,
    model: Arc<Model>,
    loras: Vec<(LoraFile, f32)>,
    deltas: export::StackDeltas,
    cache: Mutex<FuseCache>,
    cache_limit: u64,
    /// What matching found (unmatched adapters, unrecognised tensors).
    pub report: ExportReport,
}

impl LoraState {
    pub fn new(
        model: Arc<Model>,
        loras: Vec<(LoraFile, f32)>,
        mode: LoraMode,
        cache_limit: u64,
    ) -> Result<LoraState, EngineError> {
        let mut report = ExportReport::default();
        let deltas = export::stack_deltas(&model, &loras, &mut report).map_err(lora_err)?;
        report.merged = deltas.len();
        Ok(LoraState { mode, model, loras, deltas, cache: Mutex::default(), cache_limit, report })
    }

    /// Whether the stack changes tensor `t`.
    pub fn touches(&self, t: TensorId) -> bool {
        self.deltas.contains_key(&t)
    }

    /// The adapted tensors, for invalidating the layers that hold them.
    pub fn tensors(&self) -> impl Iterator<Item = TensorId> + '_ {
        self.deltas.keys().copied()
    }

    /// The merged bytes of tensor `t`: from the cache in fuse mode (filled on first use while
    /// it has room), computed afresh otherwise.
    pub fn merged(&self, t: TensorId) -> Result<Arc<Vec<u8>>, EngineError> {
        let fuse = self.mode == LoraMode::Fuse;
        if fuse
            && let Some(b) = self.cache.lock().unwrap_or_else(PoisonError::into_inner).bytes.get(&t)
        {
            return Ok(Arc::clone(b));
        }
        let ds = self.deltas.get(&t).map(Vec::as_slice).unwrap_or_default();
        let original = self.model.tensor_bytes(t).ok_or(EngineError::ShuttingDown)?;
        let merged = Arc::new(
            export::merge_one(&self.model, t, original, &self.loras, ds).map_err(lora_err)?,
        );
        if fuse {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            let len = merged.len() as u64;
            if cache.used.saturating_add(len) <= self.cache_limit {
                cache.used += len;
                cache.bytes.insert(t, Arc::clone(&merged));
            }
        }
        Ok(merged)
    }

    /// Bytes held by the fuse cache.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).used
    }
}

fn lora_err(e: crate::lora::LoraError) -> EngineError {
    EngineError::Lora(e)
}
