//! The weight store: safetensors models memory-mapped read-only and described as components and
//! ordered layers.
//!
//! Opening a model reads only headers; tensor bytes stay in the page cache behind the mappings
//! and are exposed as zero-copy byte slices. A [`Store`] shares one [`Model`] among everyone who
//! opens the same files, by file identity (device, inode, size, mtime).

pub mod dtype;
pub mod error;
pub mod file;
pub mod header;
pub mod layout;
pub mod model;
pub mod source;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};

pub use dtype::Dtype;
pub use error::{HeaderError, StoreError};
pub use file::FileIdentity;
pub use header::Limits;
pub use layout::LayerRule;
pub use model::{Component, Layer, Model, ModelKey, TensorId, TensorInfo};
pub use source::SourceKind;

/// Opens models and shares them: the same files opened twice are one [`Model`].
#[derive(Debug, Default)]
pub struct Store {
    limits: Limits,
    open: Mutex<HashMap<ModelKey, Weak<Model>>>,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// A store whose headers are held to `limits`.
    pub fn with_limits(limits: Limits) -> Store {
        Store { limits, open: Mutex::default() }
    }

    /// Opens the model at `path`, or returns the already open model with the same files.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Arc<Model>, StoreError> {
        self.open_plan(source::resolve(path.as_ref())?)
    }

    /// Opens a model from a descriptor the caller opened (a `.safetensors` file or a model
    /// folder; see [`source`]'s `resolve_descriptor`); `name` labels it in messages. The same
    /// files opened by path and by descriptor are one [`Model`] (identity is by inode).
    pub fn open_file(&self, file: std::fs::File, name: &str) -> Result<Arc<Model>, StoreError> {
        self.open_plan(source::resolve_descriptor(file, name)?)
    }

    fn open_plan(&self, plan: source::Plan) -> Result<Arc<Model>, StoreError> {
        let key = Model::key_of(&plan);
        if let Some(model) = self.lookup(&key) {
            return Ok(model);
        }
        // Parse outside the lock: headers of large sharded models take a while.
        let model = Arc::new(Model::build(plan, &self.limits)?);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        open.retain(|_, m| m.strong_count() > 0);
        open.insert(key, Arc::downgrade(&model));
        Ok(model)
    }

    fn lookup(&self, key: &ModelKey) -> Option<Arc<Model>> {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(key).and_then(Weak::upgrade)
    }

    /// Number of models currently open through this store.
    pub fn open_count(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.values().filter(|m| m.strong_count() > 0).count()
    }
}
