//! ferry: a weight streaming daemon and library.
//!
//! ferry memory-maps safetensors weights and streams their layers into device memory ahead of
//! use. This crate is the engine the daemon (`ferryd`), the command-line tool (`ferryctl`) and
//! the C ABI are built on. See ARCHITECTURE.md for the map.

pub mod bench;
pub mod client;
pub mod config;
pub mod ctl_top;
pub mod device;
pub mod devices;
pub mod engine;
pub mod inspect;
pub mod lora;
pub mod numa;
pub mod protocol;
pub mod server;
pub mod service;
pub mod store;
pub mod sysmem;
pub mod trace;
pub mod units;

pub use store::{Dtype, LayerRule, Model, Store, StoreError};

/// The crate version, shared by every binary and the C ABI.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
