//! What the engine keeps per open model besides residency: the model itself, its device
//! registrations and SIGBUS guards, and whether it has failed. Every placed layer and every
//! pending (evicted, copy maybe in flight) layer holds it by `Arc` until its copy is known to be
//! complete, so mappings and registrations outlive every copy that reads them.

use std::sync::{Arc, Mutex, PoisonError};

use super::error::EngineError;
use super::sigbus;
use crate::device::{Device, Registration};
use crate::store::Model;

/// Fields drop in order: registrations (CUDA syncs, then unregisters) and guards go before the
/// model, whose drop unmaps the files.
#[derive(Debug)]
pub(crate) struct ModelRuntime {
    id: u64,
    /// Per file: the device's registration of its mapping, when the device reads it in place.
    registrations: Vec<Option<Registration>>,
    /// Per file: the SIGBUS guard over its mapping.
    guards: Vec<Option<sigbus::Guard>>,
    failed: Mutex<Option<String>>,
    model: Arc<Model>,
}

impl ModelRuntime {
    pub fn new(id: u64, model: Arc<Model>, device: &Device) -> ModelRuntime {
        let mut registrations = Vec::new();
        let mut guards = Vec::new();
        for f in model.files() {
            let bytes = f.bytes();
            let registration = if bytes.is_empty() {
                None
            } else {
                match device.register_mapping(bytes.as_ptr(), bytes.len()) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::info!(file = %f.path.display(), "mapped reads unavailable, using the staging ring: {e}");
                        None
                    }
                }
            };
            registrations.push(registration);
            let guard = if bytes.is_empty() {
                None
            } else {
                match sigbus::guard(bytes.as_ptr(), bytes.len()) {
                    Ok(g) => Some(g),
                    Err(e) => {
                        tracing::warn!(file = %f.path.display(), "no SIGBUS guard: {e}");
                        None
                    }
                }
            };
            guards.push(guard);
        }
        ModelRuntime { id, registrations, guards, failed: Mutex::new(None), model }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Whether the copy engine reads file `file` in place.
    pub fn mapped_reads(&self, file: usize) -> bool {
        self.registrations.get(file).is_some_and(Option::is_some)
    }

    /// Fails if the model failed, or if a guard saw a truncated file (then it fails for good).
    pub fn check(&self) -> Result<(), EngineError> {
        if let Some(i) = self.guards.iter().position(|g| g.as_ref().is_some_and(|g| g.faulted())) {
            return Err(self.fail_truncated(i));
        }
        match &*self.failed.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(reason) => {
                Err(EngineError::ModelFailed { model: self.id, reason: reason.clone() })
            }
            None => Ok(()),
        }
    }

    /// Marks the model failed because file `file` was truncated; returns the error to report.
    pub fn fail_truncated(&self, file: usize) -> EngineError {
        let path = self.model.files().get(file).map(|f| f.path.clone()).unwrap_or_default();
        let err = EngineError::FileTruncated { path };
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.is_none() {
            tracing::error!(model = self.id, "{err}");
            *failed = Some(err.to_string());
        }
        err
    }
}
