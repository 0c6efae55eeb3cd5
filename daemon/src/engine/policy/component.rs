//! `component`: whole components (groups of layers) move in and out, least recently used
//! first, and the next component in pipeline order is prefetched (model offload).
//!
//! Groups are the distinct [`ScopeLayer::group`] values; *pipeline order* is the order in which
//! groups first appear in layer index order (the engine's pipeline order of components).
//!
//! - **Quota**: `min(available, total)`; below the largest group's bytes is an error, since that
//!   group could never be whole.
//! - **Acquire `i`** in group `g`: `g` becomes the most recently used group. If any layer of `g`
//!   is absent, whole groups other than `g` are evicted, least recently used first, until the
//!   absent layers of `g` fit; they load in index order. A group with any leased layer is never
//!   evicted. If leases elsewhere keep `g` from fitting whole, `i` alone is loaded if it can be;
//!   otherwise nothing happens until the engine asks again.
//! - **Prefetch**: after the acquire, the next group in pipeline order (cyclic) is loaded if it
//!   fits after evicting least recently used groups, sparing `g` *and the group used just before
//!   `g`*. Components used together in one step (unet and controlnet alternate every step)
//!   would otherwise evict each other every step to make room for the group after them: with
//!   both spared, the prefetch waits and they stay co-resident.
//! - **Prefetch hint `j`**: `j`'s group loads if it fits after evicting least recently used
//!   groups other than the current one (an explicit hint outranks the co-residency guess).
//! - **Release**: nothing.

use super::order::{Batch, Recency, require_budget, require_layers, sum_bytes, total_bytes};
use super::{Action, LayerIdx, Policy, PolicyError, ScopeLayer, View};

/// The `component` policy (module docs).
#[derive(Debug, Default)]
pub struct ComponentPolicy {
    quota: u64,
    groups: Groups,
    recency: Recency,
    /// The group of the last acquire.
    current: Option<usize>,
}

/// The scope's groups, in pipeline order (a group's position here is its index in
/// [`Recency`] and everywhere else in this module).
#[derive(Clone, Debug, Default)]
struct Groups {
    /// The layers of each group, in index order.
    members: Vec<Vec<LayerIdx>>,
    /// `of_layer[i]`: the group of layer `i`.
    of_layer: Vec<usize>,
}

impl Groups {
    fn new(layers: &[ScopeLayer]) -> Self {
        let mut ids: Vec<usize> = Vec::new();
        let mut members: Vec<Vec<LayerIdx>> = Vec::new();
        let mut of_layer = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let g = match ids.iter().position(|&id| id == layer.group) {
                Some(g) => g,
                None => {
                    ids.push(layer.group);
                    members.push(Vec::new());
                    ids.len() - 1
                }
            };
            if let Some(m) = members.get_mut(g) {
                m.push(i);
            }
            of_layer.push(g);
        }
        Groups { members, of_layer }
    }

    fn len(&self) -> usize {
        self.members.len()
    }

    fn of(&self, i: LayerIdx) -> Option<usize> {
        self.of_layer.get(i).copied()
    }

    fn members(&self, g: usize) -> &[LayerIdx] {
        self.members.get(g).map_or(&[], Vec::as_slice)
    }

    fn bytes(&self, g: usize, layers: &[ScopeLayer]) -> u64 {
        sum_bytes(self.members(g).iter().filter_map(|&i| layers.get(i)).map(|l| l.bytes))
    }

    /// The group after `g` in pipeline order, cyclically (`None` with a single group).
    fn next(&self, g: usize) -> Option<usize> {
        let next = (g + 1) % self.len().max(1);
        (next != g).then_some(next)
    }
}

impl ComponentPolicy {
    /// Evictable groups other than `spare`, least recently used first, as layer lists.
    fn victims(&self, batch: &Batch<'_>, spare: &[usize]) -> Vec<&[LayerIdx]> {
        let evictable = (0..self.groups.len())
            .filter(|g| !spare.contains(g))
            .filter(|&g| batch.unit_is_evictable(self.groups.members(g)));
        self.recency
            .least_recent_first(evictable)
            .into_iter()
            .map(|g| self.groups.members(g))
            .collect()
    }

    /// Makes all of group `g` present, evicting whole groups outside `spare`.
    fn bring_in_group(&self, batch: &mut Batch<'_>, g: usize, spare: &[usize]) -> bool {
        let victims = self.victims(batch, spare);
        batch.bring_in_units(self.groups.members(g), &victims)
    }

    /// Prefetches the group after `g`, sparing `g` and the group used just before it.
    fn prefetch_next(&self, batch: &mut Batch<'_>, g: usize) {
        let Some(next) = self.groups.next(g) else { return };
        let mut spare = vec![g, next];
        spare.extend(self.recency.most_recent_except(g));
        self.bring_in_group(batch, next, &spare);
    }
}

impl Policy for ComponentPolicy {
    fn name(&self) -> &'static str {
        "component"
    }

    fn plan(&mut self, layers: &[ScopeLayer], available: u64) -> Result<u64, PolicyError> {
        require_layers(layers)?;
        let groups = Groups::new(layers);
        let largest = (0..groups.len()).map(|g| groups.bytes(g, layers)).max().unwrap_or(0);
        require_budget(self.name(), largest, available)?;
        self.quota = available.min(total_bytes(layers));
        self.recency = Recency::new(groups.len());
        self.groups = groups;
        self.current = None;
        Ok(self.quota)
    }

    fn initial(&mut self, _view: &View<'_>) -> Vec<Action> {
        Vec::new()
    }

    fn on_acquire(&mut self, i: LayerIdx, view: &View<'_>) -> Vec<Action> {
        let Some(g) = self.groups.of(i) else { return Vec::new() };
        self.recency.touch(g);
        self.current = Some(g);
        let mut batch = Batch::new(view, self.quota);
        if self.bring_in_group(&mut batch, g, &[g]) {
            self.prefetch_next(&mut batch, g);
        } else {
            let victims = self.victims(&batch, &[g]);
            batch.bring_in_units(&[i], &victims);
        }
        batch.into_actions()
    }

    fn on_release(&mut self, _i: LayerIdx, _view: &View<'_>) -> Vec<Action> {
        Vec::new()
    }

    fn on_prefetch(&mut self, j: LayerIdx, view: &View<'_>) -> Vec<Action> {
        let Some(target) = self.groups.of(j) else { return Vec::new() };
        let mut batch = Batch::new(view, self.quota);
        let mut spare = vec![target];
        spare.extend(self.current);
        self.bring_in_group(&mut batch, target, &spare);
        batch.into_actions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::sim::{Sim, groups};
    use Action::{Evict, Load};

    fn loads(range: std::ops::Range<usize>) -> Vec<Action> {
        range.map(Load).collect()
    }

    fn evicts(range: std::ops::Range<usize>) -> Vec<Action> {
        range.map(Evict).collect()
    }

    fn cat(parts: &[Vec<Action>]) -> Vec<Action> {
        parts.concat()
    }

    /// Two pipelines in one scope: A = te 0–1, unet 2–5, vae 6; B = te 7–8, unet 9–12, vae 13.
    fn two_models() -> Vec<ScopeLayer> {
        groups(&[(0, 2, 10), (1, 4, 10), (2, 1, 10), (3, 2, 10), (4, 4, 10), (5, 1, 10)])
    }

    /// te once, unet for `steps` steps, vae once.
    fn run_pipeline(
        sim: &mut Sim,
        te: std::ops::Range<usize>,
        unet: std::ops::Range<usize>,
        vae: usize,
        steps: usize,
    ) -> Vec<Vec<Action>> {
        let mut out: Vec<Vec<Action>> = te.map(|i| sim.touch(i)).collect();
        for _ in 0..steps {
            out.extend(unet.clone().map(|i| sim.touch(i)));
        }
        out.push(sim.touch(vae));
        out
    }

    #[test]
    fn two_models_alternating_evict_whole_groups_lru_and_prefetch_the_next() {
        let mut sim = Sim::new(Box::new(ComponentPolicy::default()), two_models(), 100).unwrap();
        assert_eq!(sim.quota(), 100);
        assert_eq!(sim.start(), vec![]);
        // Pipeline A, cold: te loads, unet is prefetched with it, vae at unet, B's te at vae.
        let a1 = run_pipeline(&mut sim, 0..2, 2..6, 6, 2);
        assert_eq!(a1[0], cat(&[loads(0..2), loads(2..6)]));
        assert_eq!(a1[2], vec![Load(6)]);
        assert_eq!(a1[10], vec![Load(7), Load(8)]);
        assert_eq!(a1.iter().filter(|a| !a.is_empty()).count(), 3);
        // Pipeline B: unet_B needs 30 more; te_A then unet_A go (least recently used).
        let b1 = run_pipeline(&mut sim, 7..9, 9..13, 13, 2);
        assert_eq!(b1[0], cat(&[evicts(0..6), loads(9..13)]));
        assert_eq!(b1[2], vec![Load(13)]);
        // At vae_B, te_A (next cyclically) fits in the 20 bytes left.
        assert_eq!(b1[10], vec![Load(0), Load(1)]);
        // Pipeline A again: unet_A evicts vae_A, te_B, unet_B (LRU), never te_A or vae_B.
        let a2 = run_pipeline(&mut sim, 0..2, 2..6, 6, 2);
        assert_eq!(a2[0], cat(&[evicts(6..13), loads(2..6)]));
        assert_eq!(a2[2], vec![Load(6)]);
        assert_eq!(a2[10], vec![Load(7), Load(8)]);
        let b2 = run_pipeline(&mut sim, 7..9, 9..13, 13, 2);
        assert_eq!(b2[0], cat(&[vec![Evict(13)], evicts(0..6), loads(9..13)]));
        // From then on every layer is there before it is acquired.
        assert_eq!(sim.stats().misses, 1);
        for _ in 0..3 {
            run_pipeline(&mut sim, 0..2, 2..6, 6, 3);
            run_pipeline(&mut sim, 7..9, 9..13, 13, 3);
        }
        assert_eq!(sim.stats().misses, 1);
    }

    #[test]
    fn co_used_groups_stay_resident_through_the_steps() {
        // te 10, controlnet 30, unet 40, vae 20 under 85: cn + unet + vae do not fit together.
        let layers = groups(&[(0, 1, 10), (1, 1, 30), (2, 1, 40), (3, 1, 20)]);
        let mut sim = Sim::new(Box::new(ComponentPolicy::default()), layers, 85).unwrap();
        let generation = |sim: &mut Sim| {
            let mut out = vec![sim.touch(0)];
            for _ in 0..4 {
                out.push(sim.touch(1));
                out.push(sim.touch(2));
            }
            out.push(sim.touch(3));
            out
        };
        let g1 = generation(&mut sim);
        assert_eq!(g1[0], vec![Load(0), Load(1)]);
        assert_eq!(g1[1], vec![Load(2)]);
        // Prefetching vae would need controlnet's room: it waits.
        assert!(g1[2..9].iter().all(Vec::is_empty), "{g1:?}");
        assert_eq!(g1[9], vec![Evict(0), Evict(1), Load(3), Load(0)]);
        let g2 = generation(&mut sim);
        assert_eq!(g2[0], vec![Evict(2), Load(1)]);
        assert_eq!(g2[1], vec![Evict(3), Load(2)]);
        assert!(g2[2..9].iter().all(Vec::is_empty), "{g2:?}");
        assert_eq!(g2[9], vec![Evict(0), Evict(1), Load(3), Load(0)]);
    }

    #[test]
    fn leased_groups_are_never_evicted_and_the_layer_alone_loads() {
        // Groups of 20, 20, 20 under 50; group 0 held while group 2 is wanted.
        let layers = groups(&[(0, 2, 10), (1, 2, 10), (2, 2, 10)]);
        let mut sim = Sim::new(Box::new(ComponentPolicy::default()), layers, 50).unwrap();
        assert_eq!(sim.acquire(0), vec![Load(0), Load(1), Load(2), Load(3)]);
        assert_eq!(sim.touch(2), vec![]);
        // Layer 4 (group 2): group 1 goes, group 0 is leased; the whole group then fits.
        assert_eq!(sim.acquire(4), vec![Evict(2), Evict(3), Load(4), Load(5)]);
        assert_eq!(sim.release(4), vec![]);
        // Group 1 back: group 2 (LRU, unleased) goes; group 0 is still leased.
        assert_eq!(sim.acquire(2), vec![Evict(4), Evict(5), Load(2), Load(3)]);
        // Hold a layer of group 1 too: now group 2 can only get its one layer in.
        assert_eq!(sim.acquire(5), vec![Load(5)]);
        assert!(!sim.is_present(4));
    }

    #[test]
    fn prefetch_hint_loads_a_group_sparing_the_current_one() {
        let layers = groups(&[(0, 1, 30), (1, 1, 30), (2, 1, 30)]);
        let mut sim = Sim::new(Box::new(ComponentPolicy::default()), layers, 60).unwrap();
        assert_eq!(sim.touch(0), vec![Load(0), Load(1)]);
        assert_eq!(sim.touch(1), vec![]);
        // The hint for group 2 evicts group 0 (LRU), not group 1 (current).
        assert_eq!(sim.prefetch(2), vec![Evict(0), Load(2)]);
        assert_eq!(sim.prefetch(2), vec![]);
    }

    #[test]
    fn budget_below_the_largest_group_is_an_error() {
        let layers = groups(&[(0, 1, 10), (1, 3, 10)]);
        let err = Sim::new(Box::new(ComponentPolicy::default()), layers.clone(), 29).unwrap_err();
        assert_eq!(
            err,
            PolicyError::BudgetTooSmall { policy: "component", needed: 30, available: 29 }
        );
        let sim = Sim::new(Box::new(ComponentPolicy::default()), layers, 1000).unwrap();
        assert_eq!(sim.quota(), 40);
        // A budget below the largest layer is below its group too.
        let err =
            Sim::new(Box::new(ComponentPolicy::default()), groups(&[(0, 1, 50)]), 49).unwrap_err();
        assert!(matches!(err, PolicyError::BudgetTooSmall { needed: 50, .. }));
    }

    #[test]
    fn groups_follow_first_appearance() {
        let g = Groups::new(&groups(&[(7, 2, 1), (3, 1, 1), (9, 2, 1)]));
        assert_eq!(g.members, vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert_eq!(g.next(2), Some(0));
        assert_eq!(Groups::new(&groups(&[(0, 3, 1)])).next(0), None);
    }
}
