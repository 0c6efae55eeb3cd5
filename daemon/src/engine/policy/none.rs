//! `none`: everything resident, loaded at once, never evicted (no offload).
//!
//! The quota is the scope's total size; a budget smaller than that is an error at plan time
//! rather than a slow surprise later. All layers load in index order right after the plan; an
//! acquire (or prefetch hint) of a layer that is somehow absent loads it again.

use super::order::{Batch, require_budget, require_layers, total_bytes};
use super::{Action, LayerIdx, Policy, PolicyError, ScopeLayer, View};

/// The `none` policy (module docs).
#[derive(Debug, Default)]
pub struct NonePolicy {
    quota: u64,
    len: usize,
}

impl NonePolicy {
    /// Loads `i` if it is absent; room is always there, since nothing else ever exceeds the
    /// total.
    fn ensure(&self, i: LayerIdx, view: &View<'_>) -> Vec<Action> {
        let mut batch = Batch::new(view, self.quota);
        batch.bring_in(i, &[]);
        batch.into_actions()
    }
}

impl Policy for NonePolicy {
    fn name(&self) -> &'static str {
        "none"
    }

    fn plan(&mut self, layers: &[ScopeLayer], available: u64) -> Result<u64, PolicyError> {
        require_layers(layers)?;
        let total = total_bytes(layers);
        require_budget(self.name(), total, available)?;
        self.quota = total;
        self.len = layers.len();
        Ok(total)
    }

    fn initial(&mut self, view: &View<'_>) -> Vec<Action> {
        let mut batch = Batch::new(view, self.quota);
        for i in 0..batch.len() {
            batch.bring_in(i, &[]);
        }
        batch.into_actions()
    }

    fn on_acquire(&mut self, i: LayerIdx, view: &View<'_>) -> Vec<Action> {
        self.ensure(i, view)
    }

    fn on_release(&mut self, _i: LayerIdx, _view: &View<'_>) -> Vec<Action> {
        Vec::new()
    }

    fn on_prefetch(&mut self, i: LayerIdx, view: &View<'_>) -> Vec<Action> {
        self.ensure(i, view)
    }

    fn pinned_set(&self) -> Vec<LayerIdx> {
        (0..self.len).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::sim::{Sim, equal_layers, sizes};
    use Action::{Evict, Load};

    #[test]
    fn loads_everything_at_once_and_never_evicts() {
        let mut sim = Sim::new(Box::new(NonePolicy::default()), sizes(&[10, 20, 30]), 100).unwrap();
        assert_eq!(sim.quota(), 60);
        assert_eq!(sim.start(), vec![Load(0), Load(1), Load(2)]);
        for _ in 0..3 {
            for i in 0..3 {
                assert_eq!(sim.acquire(i), vec![]);
                assert_eq!(sim.release(i), vec![]);
                assert_eq!(sim.prefetch(i), vec![]);
            }
        }
        assert_eq!(sim.stats().evictions, 0);
        assert_eq!(sim.stats().bytes_loaded, 60);
        assert_eq!(sim.pinned(), vec![0, 1, 2]);
    }

    #[test]
    fn an_absent_layer_is_loaded_on_acquire() {
        // Without `initial` (an engine that skipped it), acquires load on demand.
        let mut sim = Sim::new(Box::new(NonePolicy::default()), equal_layers(2, 5), 10).unwrap();
        assert_eq!(sim.acquire(1), vec![Load(1)]);
        assert_eq!(sim.prefetch(0), vec![Load(0)]);
        assert!(!sim.log().contains(&Evict(0)));
    }

    #[test]
    fn budget_below_the_total_is_an_error() {
        let err = Sim::new(Box::new(NonePolicy::default()), sizes(&[10, 20]), 29).unwrap_err();
        assert_eq!(err, PolicyError::BudgetTooSmall { policy: "none", needed: 30, available: 29 });
        let err = Sim::new(Box::new(NonePolicy::default()), sizes(&[40]), 39).unwrap_err();
        assert!(matches!(err, PolicyError::BudgetTooSmall { needed: 40, .. }));
        let err = Sim::new(Box::new(NonePolicy::default()), Vec::new(), 39).unwrap_err();
        assert_eq!(err, PolicyError::Empty);
    }
}
