//! Why an engine call failed.

use std::path::PathBuf;
use std::time::Duration;

use crate::device::DeviceError;
use crate::engine::policy::PolicyError;
use crate::store::StoreError;

/// Every engine failure, typed, naming what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error("{scope}: {source}")]
    Policy {
        scope: String,
        #[source]
        source: PolicyError,
    },
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("no open model with id {0}")]
    UnknownModel(u64),
    #[error("model {model} has no component {component:?}")]
    UnknownComponent { model: u64, component: String },
    #[error("component {component:?} of model {model} has no layer {layer}")]
    UnknownLayer { model: u64, component: String, layer: String },
    #[error("no lease {lease} is held (already released, or never acquired)")]
    UnknownLease { lease: u64 },
    #[error("lease {lease} belongs to model {owner}, not model {model}")]
    LeaseOfOtherModel { lease: u64, owner: u64, model: u64 },
    #[error("{what}: {leases} lease(s) are still held; release them first")]
    Busy { what: String, leases: u32 },
    #[error(
        "timed out after {waited:?} waiting for device memory for layer {layer:?}: every layer that could make room is leased"
    )]
    Timeout { layer: String, waited: Duration },
    #[error(
        "no room for {bytes} bytes in the device arena ({free} free in total, largest hole {largest}); the arena is fragmented or over-committed"
    )]
    OutOfDeviceMemory { bytes: u64, free: u64, largest: u64 },
    #[error("{}: the file was truncated while mapped; this model can no longer be served", path.display())]
    FileTruncated { path: PathBuf },
    #[error("model {model} failed earlier and no longer serves: {reason}")]
    ModelFailed { model: u64, reason: String },
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl EngineError {
    /// A copy of this error for a second waiter (errors are not `Clone` because of I/O sources).
    pub(crate) fn duplicate(&self) -> EngineError {
        match self {
            EngineError::FileTruncated { path } => {
                EngineError::FileTruncated { path: path.clone() }
            }
            EngineError::Device(d) => EngineError::Device(d.clone()),
            EngineError::ShuttingDown => EngineError::ShuttingDown,
            other => EngineError::ModelFailed { model: 0, reason: other.to_string() },
        }
    }
}
