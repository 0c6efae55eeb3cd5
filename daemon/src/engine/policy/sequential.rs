//! `sequential`: a window of `lookahead + 1` layer slots; every layer streams every pass
//! (sequential offload). Lookahead 1 is double buffering: the layer in use plus the next one
//! copying in; lookahead 0 streams on demand with no prefetch.
//!
//! - **Quota**: `min(available, (lookahead + 1) × largest layer, total)`. Less than the largest
//!   layer is an error: that layer could never load.
//! - **Acquire `i`**: `i` is observed in the [`PassOrder`]. If `i` is absent, non-leased layers
//!   are evicted in *furthest next use* order (on a cyclic pass: the layer just used first, the
//!   upcoming window last) until `i` fits, then `i` loads. If leases block it, nothing is done:
//!   the engine asks again after a release. Then each of the `lookahead` layers after `i` in
//!   pass order that is absent loads, evicting only layers outside `{i} ∪ window`; the first one
//!   that cannot fit stops the prefetch.
//! - **Release**: a lease gone may have freed room, so the prefetch of the window after the last
//!   acquired layer is tried again (only once that layer is present).
//! - **Prefetch hint `j`**: `j` loads if it fits after evicting only layers outside
//!   `{last acquired} ∪ its window ∪ {j}`.
//!
//! Evictions only happen when they make the room asked for (see [`Batch::make_room`]), so a
//! blocked load never costs a layer.

use super::order::{Batch, PassOrder, largest_layer, require_budget, require_layers, total_bytes};
use super::{Action, LayerIdx, Policy, PolicyError, ScopeLayer, View};

/// The `sequential` policy (module docs).
#[derive(Debug)]
pub struct SequentialPolicy {
    lookahead: usize,
    quota: u64,
    order: PassOrder,
    last: Option<LayerIdx>,
}

impl Default for SequentialPolicy {
    /// Lookahead 1: double buffering.
    fn default() -> Self {
        SequentialPolicy::new(1)
    }
}

impl SequentialPolicy {
    pub fn new(lookahead: usize) -> Self {
        SequentialPolicy { lookahead, quota: 0, order: PassOrder::default(), last: None }
    }

    /// The order this policy has learned.
    pub fn pass_order(&self) -> &PassOrder {
        &self.order
    }

    /// The `lookahead` layers after `i` in pass order.
    fn window(&self, i: LayerIdx) -> Vec<LayerIdx> {
        self.order.next_after(i, self.lookahead)
    }

    /// Evictable layers outside `protect`, the one needed furthest after `from` first.
    fn victims(&self, batch: &Batch<'_>, from: LayerIdx, protect: &[LayerIdx]) -> Vec<LayerIdx> {
        self.order.furthest_first(from, batch.evictable_except(protect))
    }

    /// Loads the absent layers of `i`'s window, in order, until one does not fit.
    fn prefetch_window(&self, batch: &mut Batch<'_>, i: LayerIdx) {
        let window = self.window(i);
        let mut protect = window.clone();
        protect.push(i);
        for j in window {
            let victims = self.victims(batch, i, &protect);
            if !batch.bring_in(j, &victims) {
                break;
            }
        }
    }
}

impl Policy for SequentialPolicy {
    fn name(&self) -> &'static str {
        "sequential"
    }

    fn plan(&mut self, layers: &[ScopeLayer], available: u64) -> Result<u64, PolicyError> {
        require_layers(layers)?;
        let largest = largest_layer(layers);
        require_budget(self.name(), largest, available)?;
        let slots = u64::try_from(self.lookahead).unwrap_or(u64::MAX).saturating_add(1);
        let window = slots.saturating_mul(largest).min(total_bytes(layers));
        self.quota = available.min(window);
        self.order = PassOrder::new(layers.len());
        self.last = None;
        Ok(self.quota)
    }

    fn initial(&mut self, _view: &View<'_>) -> Vec<Action> {
        Vec::new()
    }

    fn on_acquire(&mut self, i: LayerIdx, view: &View<'_>) -> Vec<Action> {
        if i >= view.layers.len() {
            return Vec::new();
        }
        self.order.observe(i);
        self.last = Some(i);
        let mut batch = Batch::new(view, self.quota);
        let victims = self.victims(&batch, i, &[i]);
        if batch.bring_in(i, &victims) {
            self.prefetch_window(&mut batch, i);
        }
        batch.into_actions()
    }

    fn on_release(&mut self, _i: LayerIdx, view: &View<'_>) -> Vec<Action> {
        let mut batch = Batch::new(view, self.quota);
        if let Some(last) = self.last
            && batch.is_present(last)
        {
            self.prefetch_window(&mut batch, last);
        }
        batch.into_actions()
    }

    fn on_prefetch(&mut self, j: LayerIdx, view: &View<'_>) -> Vec<Action> {
        let mut batch = Batch::new(view, self.quota);
        let from = self.last.unwrap_or(j);
        let mut protect = self.window(from);
        protect.extend([from, j]);
        let victims = self.victims(&batch, from, &protect);
        batch.bring_in(j, &victims);
        batch.into_actions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::sim::{Sim, equal_layers, sizes};
    use Action::{Evict, Load};

    fn sim(lookahead: usize, layers: Vec<ScopeLayer>, available: u64) -> Sim {
        let mut sim =
            Sim::new(Box::new(SequentialPolicy::new(lookahead)), layers, available).unwrap();
        assert_eq!(sim.start(), vec![]);
        sim
    }

    #[test]
    fn double_buffering_over_four_equal_layers() {
        let mut sim = sim(1, equal_layers(4, 10), 1000);
        assert_eq!(sim.quota(), 20);
        assert_eq!(sim.acquire(0), vec![Load(0), Load(1)]);
        assert_eq!(sim.release(0), vec![]);
        assert_eq!(sim.acquire(1), vec![Evict(0), Load(2)]);
        assert_eq!(sim.release(1), vec![]);
        assert_eq!(sim.acquire(2), vec![Evict(1), Load(3)]);
        assert_eq!(sim.release(2), vec![]);
        assert_eq!(sim.acquire(3), vec![Evict(2), Load(0)]);
        assert_eq!(sim.release(3), vec![]);
        // Second pass: every layer moves again, always one ahead.
        assert_eq!(sim.acquire(0), vec![Evict(3), Load(1)]);
        assert_eq!(sim.stats().misses, 1);
        assert_eq!(sim.stats().bytes_loaded, 60);
    }

    #[test]
    fn a_held_lease_delays_the_prefetch_until_release() {
        let mut sim = sim(1, equal_layers(4, 10), 1000);
        assert_eq!(sim.acquire(0), vec![Load(0), Load(1)]);
        // The client still holds 0 while it acquires 1: no room for 2 yet.
        assert_eq!(sim.acquire(1), vec![]);
        assert_eq!(sim.release(0), vec![Evict(0), Load(2)]);
        assert_eq!(sim.release(1), vec![]);
    }

    #[test]
    fn an_acquire_blocked_by_leases_does_nothing_until_retried() {
        let mut sim = sim(0, equal_layers(3, 10), 15);
        assert_eq!(sim.quota(), 10);
        assert_eq!(sim.acquire(0), vec![Load(0)]);
        // 1 cannot fit while 0 is leased; nothing is evicted or loaded.
        assert_eq!(sim.acquire(1), vec![]);
        assert!(!sim.is_present(1));
        assert_eq!(sim.release(0), vec![]);
        assert_eq!(sim.acquire(1), vec![Evict(0), Load(1)]);
    }

    #[test]
    fn lookahead_zero_streams_on_demand() {
        let mut sim = sim(0, equal_layers(3, 10), 1000);
        assert_eq!(sim.quota(), 10);
        assert_eq!(sim.touch(0), vec![Load(0)]);
        assert_eq!(sim.touch(1), vec![Evict(0), Load(1)]);
        assert_eq!(sim.touch(2), vec![Evict(1), Load(2)]);
        assert_eq!(sim.touch(0), vec![Evict(2), Load(0)]);
    }

    #[test]
    fn lookahead_two_keeps_three_slots() {
        let mut sim = sim(2, equal_layers(5, 10), 1000);
        assert_eq!(sim.quota(), 30);
        assert_eq!(sim.touch(0), vec![Load(0), Load(1), Load(2)]);
        assert_eq!(sim.touch(1), vec![Evict(0), Load(3)]);
        assert_eq!(sim.touch(2), vec![Evict(1), Load(4)]);
        assert_eq!(sim.touch(3), vec![Evict(2), Load(0)]);
    }

    #[test]
    fn prefetch_stops_at_the_first_layer_that_does_not_fit() {
        // Quota 2 × 30 = 60: after 0 (10), 1 (30) fits but then 2 (30) does not.
        let mut sim = sim(2, sizes(&[10, 30, 30, 10]), 60);
        assert_eq!(sim.quota(), 60);
        assert_eq!(sim.acquire(0), vec![Load(0), Load(1)]);
        assert_eq!(sim.release(0), vec![]);
        // 1 in use, window {2, 3}: 0 goes (furthest), 2 fits, 3 does not (1 and 2 fill 60).
        assert_eq!(sim.acquire(1), vec![Evict(0), Load(2)]);
    }

    #[test]
    fn prefetches_follow_the_observed_order_on_the_second_pass() {
        let mut sim = sim(1, equal_layers(4, 10), 1000);
        // First pass in the order 3, 1, 0, 2: prefetches still guess index order.
        assert_eq!(sim.touch(3), vec![Load(3), Load(0)]);
        assert_eq!(sim.touch(1), vec![Evict(0), Load(1), Evict(3), Load(2)]);
        assert_eq!(sim.touch(0), vec![Evict(2), Load(0)]);
        assert_eq!(sim.touch(2), vec![Evict(1), Load(2), Evict(0), Load(3)]);
        // Acquiring 3 again closes the pass: the next layer is now 1, not 0.
        assert_eq!(sim.touch(3), vec![Evict(2), Load(1)]);
        assert_eq!(sim.touch(1), vec![Evict(3), Load(0)]);
        assert_eq!(sim.touch(0), vec![Evict(1), Load(2)]);
        assert_eq!(sim.touch(2), vec![Evict(0), Load(3)]);
        let misses = sim.stats().misses;
        for i in [3, 1, 0, 2, 3, 1, 0, 2] {
            sim.touch(i);
        }
        assert_eq!(sim.stats().misses, misses, "every acquire found its layer prefetched");
    }

    #[test]
    fn prefetch_hint_evicts_only_outside_the_window() {
        let mut sim = sim(1, equal_layers(4, 10), 30);
        assert_eq!(sim.quota(), 20);
        assert_eq!(sim.touch(0), vec![Load(0), Load(1)]);
        // 0 (last acquired) and 1 (its window) are protected: no room for 3.
        assert_eq!(sim.prefetch(3), vec![]);
        assert_eq!(sim.prefetch(1), vec![]);
        assert_eq!(sim.touch(1), vec![Evict(0), Load(2)]);
        assert_eq!(sim.prefetch(0), vec![]);
    }

    #[test]
    fn budget_below_the_largest_layer_is_an_error() {
        let err =
            Sim::new(Box::new(SequentialPolicy::default()), sizes(&[5, 40, 5]), 39).unwrap_err();
        assert_eq!(
            err,
            PolicyError::BudgetTooSmall { policy: "sequential", needed: 40, available: 39 }
        );
        // Exactly the largest layer works, single-buffered.
        let sim = Sim::new(Box::new(SequentialPolicy::default()), sizes(&[5, 40, 5]), 40).unwrap();
        assert_eq!(sim.quota(), 40);
    }

    #[test]
    fn quota_never_exceeds_the_model() {
        let sim =
            Sim::new(Box::new(SequentialPolicy::new(usize::MAX)), sizes(&[5, 7]), 1000).unwrap();
        assert_eq!(sim.quota(), 12);
    }
}
