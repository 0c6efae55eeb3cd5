//! Residency policies: pure logic, no device code.
//!
//! A policy instance governs one *scope*: the ordered layers of a model (or of one component
//! that has its own policy). It is told about acquires, releases and prefetch hints, sees which
//! layers are absent, loading or resident and which are leased, and answers with [`Action`]s:
//! loads and evictions the engine then carries out. Because it never touches a device, every
//! policy can be driven by a scripted trace and checked exactly (see `sim.rs`).
//!
//! # Contract (checked by the simulator in tests, and by the engine at run time)
//!
//! - Actions apply in order. After each one, the bytes held by the scope (loading + resident)
//!   stay ≤ the quota the policy asked for in [`Policy::plan`]; so evictions come before the
//!   loads they make room for.
//! - `Evict(i)` only for a layer that is loading or resident and has no lease.
//! - `Load(i)` only for an absent layer.
//! - When the acquired layer cannot be made resident because leased layers fill the quota, the
//!   policy returns what it can (possibly nothing); the engine waits for a release and asks
//!   again by calling [`Policy::on_acquire`] once more.

use std::fmt;

pub mod balanced;
pub mod choice;
pub mod component;
pub mod lru;
pub mod none;
pub mod order;
pub mod sequential;
#[cfg(test)]
mod sim;

pub use self::choice::{Origin, PolicyChoice, Preset, Resolved, UnknownPolicy};

/// Index of a layer within its scope (the order the engine gives: pipeline order of components,
/// then each component's layer order).
pub type LayerIdx = usize;

/// What a policy knows about one layer of its scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScopeLayer {
    /// Device bytes the layer occupies when loaded.
    pub bytes: u64,
    /// The component the layer belongs to (an index; consecutive layers of one component share
    /// it). The `component` policy moves whole groups.
    pub group: usize,
}

/// Where a layer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Residency {
    #[default]
    Absent,
    /// A copy is in flight; it already holds its device bytes.
    Loading,
    Resident,
}

/// The engine's state of one scope, as a policy sees it.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub layers: &'a [ScopeLayer],
    pub residency: &'a [Residency],
    /// Leases (and pins) held on each layer; a layer with any cannot be evicted.
    pub leases: &'a [u32],
}

impl View<'_> {
    /// Bytes held by loading and resident layers.
    pub fn used(&self) -> u64 {
        self.layers
            .iter()
            .zip(self.residency)
            .filter(|(_, r)| **r != Residency::Absent)
            .map(|(l, _)| l.bytes)
            .sum()
    }

    pub fn is_present(&self, i: LayerIdx) -> bool {
        self.residency.get(i).is_some_and(|r| *r != Residency::Absent)
    }

    pub fn is_leased(&self, i: LayerIdx) -> bool {
        self.leases.get(i).is_some_and(|&n| n > 0)
    }
}

/// What the engine should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Allocate device memory for the layer and start copying it in.
    Load(LayerIdx),
    /// Free the layer's device memory (once its last copy and last client are done with it).
    Evict(LayerIdx),
}

/// Why a policy cannot serve a scope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "the {policy} policy needs {needed} bytes of device memory for this scope but only {available} are available"
    )]
    BudgetTooSmall { policy: &'static str, needed: u64, available: u64 },
    #[error("the scope has no layers")]
    Empty,
}

/// A residency policy (module docs).
pub trait Policy: Send + fmt::Debug {
    /// The policy's name (`none`, `component`, `sequential`, `balanced`, `lru`).
    fn name(&self) -> &'static str;

    /// Called once, when the policy is set: decides how many device bytes the scope reserves
    /// out of `available`, or why it cannot work in them.
    fn plan(&mut self, layers: &[ScopeLayer], available: u64) -> Result<u64, PolicyError>;

    /// Loads to start right after [`Policy::plan`] (everything for `none`; the resident set for
    /// `balanced`; nothing for the others).
    fn initial(&mut self, view: &View<'_>) -> Vec<Action>;

    /// Layer `i` is being acquired (it may be absent, loading or resident). Returns what to do
    /// so that it is present, plus any prefetches.
    fn on_acquire(&mut self, i: LayerIdx, view: &View<'_>) -> Vec<Action>;

    /// The last lease on layer `i` was released.
    fn on_release(&mut self, i: LayerIdx, view: &View<'_>) -> Vec<Action>;

    /// A client says layer `i` will be wanted soon.
    fn on_prefetch(&mut self, i: LayerIdx, view: &View<'_>) -> Vec<Action>;

    /// Layers kept resident for good (balanced's resident set, everything for `none`); for
    /// stats and tests.
    fn pinned_set(&self) -> Vec<LayerIdx> {
        Vec::new()
    }
}

/// Which policy a client asks for, with its parameters. A name (with presets and `auto`)
/// becomes one through [`PolicyChoice`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "policy", rename_all = "lowercase")]
pub enum PolicySpec {
    /// Everything resident, loaded at once.
    None,
    /// Whole components in and out, least recently used first; the next is prefetched.
    Component,
    /// A window of `lookahead + 1` layers; every layer streams every pass.
    Sequential { lookahead: usize },
    /// A stable resident set within `threshold` bytes; the rest streams.
    Balanced { threshold: Threshold },
    /// Plain least-recently-used within `threshold` bytes, no prefetch (a baseline for benches).
    Lru { threshold: Threshold },
}

/// A byte budget given absolutely or as a fraction of the device's memory.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Threshold {
    Bytes(u64),
    Fraction(f64),
}

impl Default for Threshold {
    fn default() -> Self {
        Threshold::Fraction(0.75)
    }
}

impl Threshold {
    /// The threshold in bytes on a device with `device_total` bytes of memory.
    pub fn bytes(self, device_total: u64) -> u64 {
        match self {
            Threshold::Bytes(b) => b,
            Threshold::Fraction(f) => {
                let f = if f.is_finite() { f.clamp(0.0, 1.0) } else { 0.0 };
                (device_total as f64 * f) as u64
            }
        }
    }
}

impl PolicySpec {
    /// A fresh policy for this spec. `device_total` resolves fractional thresholds.
    pub fn build(self, device_total: u64) -> Box<dyn Policy> {
        match self {
            PolicySpec::None => Box::new(none::NonePolicy::default()),
            PolicySpec::Component => Box::new(component::ComponentPolicy::default()),
            PolicySpec::Sequential { lookahead } => {
                Box::new(sequential::SequentialPolicy::new(lookahead))
            }
            PolicySpec::Balanced { threshold } => {
                Box::new(balanced::BalancedPolicy::new(threshold.bytes(device_total)))
            }
            PolicySpec::Lru { threshold } => {
                Box::new(lru::LruPolicy::new(threshold.bytes(device_total)))
            }
        }
    }
}
