//! `balanced`: a stable resident set `R` within the threshold; only the other layers stream,
//! through a double-buffered window (balanced offload).
//!
//! LRU on a cyclic pass larger than its cache evicts exactly the layer needed next and moves the
//! whole model every pass. Instead, `R` is chosen once and never evicted, so in the steady state
//! a pass moves the streamed layers once each: `model − sum(R)` bytes, the minimum for the
//! budget (never more; when spare window room lets a streamed layer survive, less).
//!
//! # Choosing `R` (exact rule)
//!
//! `quota = min(threshold, available)`. If the whole scope fits (`total ≤ quota`), `R` is every
//! layer, nothing is ever evicted, and the scope reserves only `total`. Otherwise, with `b = 2`
//! buffers (double buffering):
//!
//! 1. For each candidate `W` in `{0} ∪ {distinct layer sizes}` (`W` bounds the streamed layers):
//!    every layer larger than `W` is forced into `R`; the candidate is infeasible when
//!    `sum(forced) + b·W > quota`. Otherwise the room left, `quota − b·W − sum(forced)`, is
//!    filled with the layers of size ≤ `W`, largest first (ties: lower index first), each one
//!    taken if it still fits.
//! 2. The feasible candidate with the largest `sum(R)` wins; ties go to the smaller `W`.
//! 3. If no candidate is feasible (the quota cannot hold two copies of what must stream), step
//!    1–2 run again with `b = 1`: a single-buffered window, no overlap of copy and compute.
//! 4. If the quota is below the largest layer, the plan fails with
//!    `BudgetTooSmall { needed: largest layer, available: quota }`.
//!
//! Streamed layers use whatever the quota leaves beside `R` (at least `b·W`).
//!
//! # Runtime
//!
//! - `initial`: load `R` (index order).
//! - Acquire `i`: observed in the [`PassOrder`]. If absent, streamed (non-`R`), non-leased layers
//!   are evicted, needed furthest in the future first, until `i` fits; `i` loads. Then the next
//!   streamed layer after `i` in pass order (skipping `R`) is prefetched the same way, sparing
//!   `i`. `R` layers are never evicted.
//! - Release: the prefetch after the last acquired layer is tried again (a lease gone may have
//!   made room).
//! - Prefetch hint `j`: loads `j`, sparing the last acquired layer and its prefetch.

use super::order::{Batch, PassOrder, largest_layer, require_budget, require_layers, total_bytes};
use super::{Action, LayerIdx, Policy, PolicyError, ScopeLayer, View};

/// The `balanced` policy (module docs).
#[derive(Debug)]
pub struct BalancedPolicy {
    threshold: u64,
    quota: u64,
    /// `resident[i]`: layer `i` is in `R`.
    resident: Vec<bool>,
    /// Bytes kept for streamed layers (`b·W` of the chosen candidate; 0 when all fits).
    window: u64,
    order: PassOrder,
    last: Option<LayerIdx>,
}

/// One feasible choice of `R`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Choice {
    resident: Vec<bool>,
    resident_bytes: u64,
    window: u64,
}

impl BalancedPolicy {
    pub fn new(threshold: u64) -> Self {
        BalancedPolicy {
            threshold,
            quota: 0,
            resident: Vec::new(),
            window: 0,
            order: PassOrder::default(),
            last: None,
        }
    }

    /// Bytes of the resident set (after [`Policy::plan`]).
    pub fn resident_bytes(&self, layers: &[ScopeLayer]) -> u64 {
        super::order::sum_bytes(
            layers.iter().zip(&self.resident).filter(|(_, r)| **r).map(|(l, _)| l.bytes),
        )
    }

    /// Bytes kept for the streaming window (`b·W`; 0 when everything is resident).
    pub fn window_bytes(&self) -> u64 {
        self.window
    }

    fn is_resident(&self, i: LayerIdx) -> bool {
        self.resident.get(i).copied().unwrap_or(false)
    }

    /// Streamed, evictable layers outside `protect`, the one needed furthest after `from` first.
    fn victims(&self, batch: &Batch<'_>, from: LayerIdx, protect: &[LayerIdx]) -> Vec<LayerIdx> {
        let streamed =
            batch.evictable_except(protect).into_iter().filter(|&l| !self.is_resident(l));
        self.order.furthest_first(from, streamed)
    }

    /// The first streamed layer after `i` in pass order.
    fn next_streamed(&self, i: LayerIdx) -> Option<LayerIdx> {
        self.order.iter_after(i).find(|&l| !self.is_resident(l))
    }

    /// Prefetches the next streamed layer after `i`, sparing `i` and `spare`.
    fn prefetch_after(&self, batch: &mut Batch<'_>, i: LayerIdx, spare: &[LayerIdx]) {
        let Some(next) = self.next_streamed(i) else { return };
        let mut protect = vec![i, next];
        protect.extend_from_slice(spare);
        let victims = self.victims(batch, i, &protect);
        batch.bring_in(next, &victims);
    }
}

/// The resident set for `layers` under `quota` (module docs, "Choosing `R`").
fn choose(layers: &[ScopeLayer], quota: u64) -> Result<Choice, PolicyError> {
    let largest = largest_layer(layers);
    require_budget("balanced", largest, quota)?;
    best_choice(layers, quota, 2).or_else(|| best_choice(layers, quota, 1)).ok_or(
        PolicyError::BudgetTooSmall { policy: "balanced", needed: largest, available: quota },
    )
}

/// Steps 1–2 of the rule with `buffers` copies of the window.
fn best_choice(layers: &[ScopeLayer], quota: u64, buffers: u64) -> Option<Choice> {
    let mut widths: Vec<u64> = layers.iter().map(|l| l.bytes).chain([0]).collect();
    widths.sort_unstable();
    widths.dedup();
    let mut by_size: Vec<LayerIdx> = (0..layers.len()).collect();
    by_size.sort_by_key(|&i| (std::cmp::Reverse(layers[i].bytes), i));
    let mut best: Option<Choice> = None;
    // Ascending widths with a strict comparison: ties keep the smaller `W`.
    for w in widths {
        if let Some(c) = candidate(layers, &by_size, quota, w, buffers)
            && best.as_ref().is_none_or(|b| c.resident_bytes > b.resident_bytes)
        {
            best = Some(c);
        }
    }
    best
}

/// Step 1 for one width `w`: `None` when infeasible.
fn candidate(
    layers: &[ScopeLayer],
    by_size: &[LayerIdx],
    quota: u64,
    w: u64,
    buffers: u64,
) -> Option<Choice> {
    let window = w.checked_mul(buffers)?;
    let forced =
        layers.iter().filter(|l| l.bytes > w).try_fold(0u64, |acc, l| acc.checked_add(l.bytes))?;
    let mut room = quota.checked_sub(window)?.checked_sub(forced)?;
    let mut resident: Vec<bool> = layers.iter().map(|l| l.bytes > w).collect();
    let mut resident_bytes = forced;
    for &i in by_size {
        let bytes = layers.get(i).map_or(0, |l| l.bytes);
        if bytes <= w && bytes <= room && !resident[i] {
            room -= bytes;
            resident_bytes += bytes;
            resident[i] = true;
        }
    }
    Some(Choice { resident, resident_bytes, window })
}

impl Policy for BalancedPolicy {
    fn name(&self) -> &'static str {
        "balanced"
    }

    fn plan(&mut self, layers: &[ScopeLayer], available: u64) -> Result<u64, PolicyError> {
        require_layers(layers)?;
        let quota = self.threshold.min(available);
        let choice = choose(layers, quota)?;
        // When everything is resident, reserve only the model: the rest of the budget is
        // other scopes'.
        self.quota = quota.min(total_bytes(layers));
        self.resident = choice.resident;
        self.window = choice.window;
        self.order = PassOrder::new(layers.len());
        self.last = None;
        Ok(self.quota)
    }

    fn initial(&mut self, view: &View<'_>) -> Vec<Action> {
        let mut batch = Batch::new(view, self.quota);
        for r in (0..batch.len()).filter(|&l| self.is_resident(l)) {
            let victims = self.victims(&batch, r, &[]);
            batch.bring_in(r, &victims);
        }
        batch.into_actions()
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
            self.prefetch_after(&mut batch, i, &[]);
        }
        batch.into_actions()
    }

    fn on_release(&mut self, _i: LayerIdx, view: &View<'_>) -> Vec<Action> {
        let mut batch = Batch::new(view, self.quota);
        if let Some(last) = self.last
            && batch.is_present(last)
        {
            self.prefetch_after(&mut batch, last, &[]);
        }
        batch.into_actions()
    }

    fn on_prefetch(&mut self, j: LayerIdx, view: &View<'_>) -> Vec<Action> {
        let mut batch = Batch::new(view, self.quota);
        let from = self.last.unwrap_or(j);
        let mut protect = vec![from, j];
        protect.extend(self.next_streamed(from));
        let victims = self.victims(&batch, from, &protect);
        batch.bring_in(j, &victims);
        batch.into_actions()
    }

    fn pinned_set(&self) -> Vec<LayerIdx> {
        (0..self.resident.len()).filter(|&i| self.is_resident(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::lru::LruPolicy;
    use crate::engine::policy::sim::{Sim, equal_layers, model_bytes, sizes};
    use Action::{Evict, Load};

    fn plan(sizes_: &[u64], quota: u64) -> (Vec<LayerIdx>, u64) {
        let mut p = BalancedPolicy::new(quota);
        p.plan(&sizes(sizes_), u64::MAX).unwrap();
        (p.pinned_set(), p.window_bytes())
    }

    /// Runs `passes` cyclic passes (acquire + release of every layer in order) and returns the
    /// bytes loaded during each.
    fn bytes_per_pass(sim: &mut Sim, order: &[LayerIdx], passes: usize) -> Vec<u64> {
        (0..passes)
            .map(|_| {
                let before = sim.stats().bytes_loaded;
                for &i in order {
                    sim.touch(i);
                }
                sim.stats().bytes_loaded - before
            })
            .collect()
    }

    #[test]
    fn resident_set_rule() {
        // Everything fits: all resident, no window.
        assert_eq!(plan(&[10, 20, 30], 60), (vec![0, 1, 2], 0));
        // 12 × 10 under 80: W = 10, window 20, six layers (lowest indices) resident.
        assert_eq!(plan(&[10; 12], 80), ((0..6).collect(), 20));
        // One big layer: W = 10 forces 50 in; room 10 takes layer 1.
        assert_eq!(plan(&[50, 10, 10, 10, 10, 10, 10, 10], 80), (vec![0, 1], 20));
        // [10, 2, 2, 2] under 14: keeping 10 and double-buffering the 2s (W = 2) beats
        // streaming everything through two 10-byte buffers.
        assert_eq!(plan(&[10, 2, 2, 2], 14), (vec![0], 4));
        // Mixed sizes where only W = largest is feasible: nothing resident.
        assert_eq!(plan(&[40, 10, 10, 30, 10, 20], 80), (vec![], 80));
        // Greedy fill is largest first, skipping what does not fit: W = 40 leaves 25 of room,
        // 40s do not fit, 20 does, 10 does not, 5 does.
        assert_eq!(plan(&[5, 20, 10, 40, 40], 105), (vec![0, 1], 80));
    }

    #[test]
    fn single_buffered_fallback_and_error() {
        // 3 × 10 under 15: two buffers of 10 do not fit; one does.
        assert_eq!(plan(&[10, 10, 10], 15), (vec![], 10));
        let err =
            Sim::new(Box::new(BalancedPolicy::new(9)), sizes(&[10, 10, 10]), 100).unwrap_err();
        assert_eq!(
            err,
            PolicyError::BudgetTooSmall { policy: "balanced", needed: 10, available: 9 }
        );
        let err = Sim::new(Box::new(BalancedPolicy::new(100)), sizes(&[10, 50]), 49).unwrap_err();
        assert_eq!(
            err,
            PolicyError::BudgetTooSmall { policy: "balanced", needed: 50, available: 49 }
        );
    }

    #[test]
    fn cyclic_passes_move_only_the_streamed_bytes() {
        let layers = equal_layers(12, 10); // 120 bytes, 1.5 × the quota
        let mut sim = Sim::new(Box::new(BalancedPolicy::new(80)), layers.clone(), 1000).unwrap();
        assert_eq!(sim.quota(), 80);
        assert_eq!(sim.start(), (0..6).map(Load).collect::<Vec<_>>());
        let resident: Vec<LayerIdx> = sim.pinned();
        assert_eq!(resident, (0..6).collect::<Vec<_>>());
        // First pass, exactly: 6 is prefetched by the first acquire, then one ahead.
        assert_eq!(sim.touch(0), vec![Load(6)]);
        for i in 1..6 {
            assert_eq!(sim.touch(i), vec![]);
        }
        assert_eq!(sim.touch(6), vec![Load(7)]);
        assert_eq!(sim.touch(7), vec![Evict(6), Load(8)]);
        assert_eq!(sim.touch(8), vec![Evict(7), Load(9)]);
        assert_eq!(sim.touch(9), vec![Evict(8), Load(10)]);
        assert_eq!(sim.touch(10), vec![Evict(9), Load(11)]);
        assert_eq!(sim.touch(11), vec![Evict(10), Load(6)]);
        let order: Vec<LayerIdx> = (0..12).collect();
        let streamed = model_bytes(&layers) - 60;
        assert_eq!(bytes_per_pass(&mut sim, &order, 5), vec![streamed; 5]);
        for r in resident {
            assert_eq!(sim.evictions_of(r), 0);
            assert_eq!(sim.loads_of(r), 1);
        }
        // Once per pass; 6 once more, prefetched by the first acquire of the first pass.
        assert_eq!(sim.loads_of(6), 7);
        for s in 7..12 {
            assert_eq!(sim.loads_of(s), 6, "layer {s} once per pass");
        }
        assert_eq!(sim.stats().misses, 0, "every streamed layer arrived before its acquire");
    }

    #[test]
    fn lru_moves_the_whole_model_every_pass_on_the_same_trace() {
        let layers = equal_layers(12, 10);
        let mut sim = Sim::new(Box::new(LruPolicy::new(80)), layers.clone(), 1000).unwrap();
        sim.start();
        let order: Vec<LayerIdx> = (0..12).collect();
        let per_pass = bytes_per_pass(&mut sim, &order, 4);
        assert_eq!(per_pass, vec![model_bytes(&layers); 4]);
    }

    #[test]
    fn cyclic_passes_with_mixed_sizes_never_exceed_the_streamed_bytes() {
        let layers = sizes(&[50, 10, 10, 10, 10, 10, 10, 10]);
        let mut sim = Sim::new(Box::new(BalancedPolicy::new(80)), layers.clone(), 1000).unwrap();
        sim.start();
        assert_eq!(sim.pinned(), vec![0, 1]);
        let order: Vec<LayerIdx> = (0..8).collect();
        let per_pass = bytes_per_pass(&mut sim, &order, 4);
        assert_eq!(per_pass[1..], [60, 60, 60]);
        assert_eq!(sim.evictions_of(0) + sim.evictions_of(1), 0);
    }

    #[test]
    fn streaming_follows_the_observed_order() {
        // Pass order 5, 4, ..., 0 over 6 × 10 under 40: R = {0, 1}, streamed {2..5}.
        let mut sim =
            Sim::new(Box::new(BalancedPolicy::new(40)), equal_layers(6, 10), 100).unwrap();
        sim.start();
        assert_eq!(sim.pinned(), vec![0, 1]);
        let order: Vec<LayerIdx> = (0..6).rev().collect();
        bytes_per_pass(&mut sim, &order, 2);
        let misses = sim.stats().misses;
        assert_eq!(bytes_per_pass(&mut sim, &order, 3), vec![40; 3]);
        assert_eq!(sim.stats().misses, misses, "prefetches follow the reversed order");
    }

    #[test]
    fn everything_fits_means_no_eviction_ever() {
        let layers = sizes(&[10, 30, 20, 5]);
        let mut sim = Sim::new(Box::new(BalancedPolicy::new(500)), layers, 1000).unwrap();
        assert_eq!(sim.quota(), 65);
        assert_eq!(sim.start(), vec![Load(0), Load(1), Load(2), Load(3)]);
        for i in [3, 1, 0, 2, 2, 1, 0, 3, 1] {
            assert_eq!(sim.touch(i), vec![]);
            assert_eq!(sim.prefetch(i), vec![]);
        }
        assert_eq!(sim.stats().evictions, 0);
    }

    #[test]
    fn held_lease_delays_the_prefetch_until_release() {
        let mut sim =
            Sim::new(Box::new(BalancedPolicy::new(40)), equal_layers(6, 10), 100).unwrap();
        assert_eq!(sim.start(), vec![Load(0), Load(1)]);
        assert_eq!(sim.touch(2), vec![Load(2), Load(3)]);
        assert_eq!(sim.acquire(3), vec![Evict(2), Load(4)]);
        // 3 and 4 fill the window; 4 acquired while 3 is held: no room for 5.
        assert_eq!(sim.acquire(4), vec![]);
        assert_eq!(sim.release(3), vec![Evict(3), Load(5)]);
        assert_eq!(sim.release(4), vec![]);
    }

    #[test]
    fn prefetch_hint_spares_the_current_layer_and_its_successor() {
        let mut sim =
            Sim::new(Box::new(BalancedPolicy::new(40)), equal_layers(6, 10), 100).unwrap();
        sim.start();
        assert_eq!(sim.touch(2), vec![Load(2), Load(3)]);
        assert_eq!(sim.prefetch(5), vec![]);
        assert_eq!(sim.touch(3), vec![Evict(2), Load(4)]);
        assert_eq!(sim.prefetch(0), vec![]);
    }
}
