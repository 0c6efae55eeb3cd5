//! `lru`: plain least-recently-used within a byte threshold, no prefetch.
//!
//! The baseline the benchmarks compare `balanced` against: on a cyclic pass larger than the
//! quota it evicts exactly the layer needed next, so it moves the whole model every pass.
//!
//! - **Quota**: `min(threshold, available, total)`; below the largest layer is an error.
//! - **Acquire `i`**: if absent, evict the least recently acquired non-leased layers (never
//!   acquired first, ties by index) until `i` fits, then load it; if leases block it, nothing
//!   is done until the engine asks again.
//! - **Release, prefetch hints**: nothing.

use super::order::{Batch, Recency, largest_layer, require_budget, require_layers, total_bytes};
use super::{Action, LayerIdx, Policy, PolicyError, ScopeLayer, View};

/// The `lru` policy (module docs).
#[derive(Debug)]
pub struct LruPolicy {
    threshold: u64,
    quota: u64,
    recency: Recency,
}

impl LruPolicy {
    pub fn new(threshold: u64) -> Self {
        LruPolicy { threshold, quota: 0, recency: Recency::default() }
    }
}

impl Policy for LruPolicy {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn plan(&mut self, layers: &[ScopeLayer], available: u64) -> Result<u64, PolicyError> {
        require_layers(layers)?;
        let quota = self.threshold.min(available);
        require_budget(self.name(), largest_layer(layers), quota)?;
        self.quota = quota.min(total_bytes(layers));
        self.recency = Recency::new(layers.len());
        Ok(self.quota)
    }

    fn initial(&mut self, _view: &View<'_>) -> Vec<Action> {
        Vec::new()
    }

    fn on_acquire(&mut self, i: LayerIdx, view: &View<'_>) -> Vec<Action> {
        if i >= view.layers.len() {
            return Vec::new();
        }
        self.recency.touch(i);
        let mut batch = Batch::new(view, self.quota);
        let victims = self.recency.least_recent_first(batch.evictable_except(&[i]));
        batch.bring_in(i, &victims);
        batch.into_actions()
    }

    fn on_release(&mut self, _i: LayerIdx, _view: &View<'_>) -> Vec<Action> {
        Vec::new()
    }

    fn on_prefetch(&mut self, _i: LayerIdx, _view: &View<'_>) -> Vec<Action> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::sim::{Sim, equal_layers, sizes};
    use Action::{Evict, Load};

    #[test]
    fn evicts_the_least_recently_acquired() {
        let mut sim = Sim::new(Box::new(LruPolicy::new(30)), equal_layers(4, 10), 100).unwrap();
        assert_eq!(sim.quota(), 30);
        assert_eq!(sim.start(), vec![]);
        assert_eq!(sim.touch(0), vec![Load(0)]);
        assert_eq!(sim.touch(1), vec![Load(1)]);
        assert_eq!(sim.touch(2), vec![Load(2)]);
        assert_eq!(sim.touch(0), vec![]);
        assert_eq!(sim.touch(3), vec![Evict(1), Load(3)]);
        assert_eq!(sim.touch(1), vec![Evict(2), Load(1)]);
        assert_eq!(sim.prefetch(2), vec![]);
        assert_eq!(sim.stats().misses, 5);
    }

    #[test]
    fn leased_layers_are_skipped_and_a_blocked_acquire_waits() {
        let mut sim = Sim::new(Box::new(LruPolicy::new(20)), sizes(&[10, 10, 20]), 100).unwrap();
        assert_eq!(sim.acquire(0), vec![Load(0)]);
        assert_eq!(sim.touch(1), vec![Load(1)]);
        // 2 needs both slots but 0 is leased: nothing happens.
        assert_eq!(sim.acquire(2), vec![]);
        assert_eq!(sim.release(0), vec![]);
        assert_eq!(sim.acquire(2), vec![Evict(0), Evict(1), Load(2)]);
    }

    #[test]
    fn budget_below_the_largest_layer_is_an_error() {
        let err = Sim::new(Box::new(LruPolicy::new(1000)), sizes(&[10, 25]), 24).unwrap_err();
        assert_eq!(err, PolicyError::BudgetTooSmall { policy: "lru", needed: 25, available: 24 });
        let err = Sim::new(Box::new(LruPolicy::new(24)), sizes(&[10, 25]), 1000).unwrap_err();
        assert_eq!(err, PolicyError::BudgetTooSmall { policy: "lru", needed: 25, available: 24 });
    }
}
