//! A tiny engine for tests: owns a policy and the state of one scope, applies the policy's
//! actions and checks every rule of the contract (module docs of `policy`) after each one.
//!
//! Loads complete at once (`Loading` → `Resident`) unless [`Sim::keep_loading`] is set, in
//! which case they stay `Loading` until [`Sim::complete_loads`]: the contract must hold either
//! way, since a loading layer already holds its bytes. A contract break panics with the action
//! and the state, which is what a test wants.
//!
//! The property test at the bottom drives every policy with random traces.

use super::order::total_bytes;
use super::{Action, LayerIdx, Policy, PolicyError, Residency, ScopeLayer, View};

/// What the simulated engine did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub loads: u64,
    pub evictions: u64,
    pub bytes_loaded: u64,
    /// Acquires that found their layer absent.
    pub misses: u64,
}

#[derive(Debug)]
pub(crate) struct Sim {
    policy: Box<dyn Policy>,
    layers: Vec<ScopeLayer>,
    residency: Vec<Residency>,
    leases: Vec<u32>,
    quota: u64,
    keep_loading: bool,
    stats: Stats,
    loads_of: Vec<u64>,
    evictions_of: Vec<u64>,
    log: Vec<Action>,
}

impl Sim {
    /// Plans `policy` over `layers` within `available` bytes. Nothing is loaded yet: call
    /// [`Sim::start`] to apply the policy's initial loads.
    pub fn new(
        mut policy: Box<dyn Policy>,
        layers: Vec<ScopeLayer>,
        available: u64,
    ) -> Result<Sim, PolicyError> {
        let quota = policy.plan(&layers, available)?;
        assert!(
            quota <= available,
            "{}: quota {quota} over the {available} available",
            policy.name()
        );
        let n = layers.len();
        Ok(Sim {
            policy,
            layers,
            residency: vec![Residency::Absent; n],
            leases: vec![0; n],
            quota,
            keep_loading: false,
            stats: Stats::default(),
            loads_of: vec![0; n],
            evictions_of: vec![0; n],
            log: Vec::new(),
        })
    }

    /// Keeps later loads in `Loading` until [`Sim::complete_loads`].
    pub fn keep_loading(&mut self, keep: bool) {
        self.keep_loading = keep;
    }

    /// Applies the policy's initial loads.
    pub fn start(&mut self) -> Vec<Action> {
        let view = View { layers: &self.layers, residency: &self.residency, leases: &self.leases };
        let actions = self.policy.initial(&view);
        self.apply(&actions);
        actions
    }

    /// Acquires layer `i`: asks the policy, applies its actions, and takes a lease when the
    /// layer is then present (a real engine would otherwise wait for a release and ask again).
    pub fn acquire(&mut self, i: LayerIdx) -> Vec<Action> {
        if !self.is_present(i) {
            self.stats.misses += 1;
        }
        let view = View { layers: &self.layers, residency: &self.residency, leases: &self.leases };
        let actions = self.policy.on_acquire(i, &view);
        self.apply(&actions);
        if self.is_present(i) {
            self.leases[i] += 1;
        }
        actions
    }

    /// Drops one lease on `i`; when it was the last, tells the policy. Releasing a layer
    /// without a lease does nothing.
    pub fn release(&mut self, i: LayerIdx) -> Vec<Action> {
        match self.leases.get_mut(i) {
            Some(n) if *n > 0 => *n -= 1,
            _ => return Vec::new(),
        }
        if self.leases[i] > 0 {
            return Vec::new();
        }
        let view = View { layers: &self.layers, residency: &self.residency, leases: &self.leases };
        let actions = self.policy.on_release(i, &view);
        self.apply(&actions);
        actions
    }

    /// A prefetch hint for `i`.
    pub fn prefetch(&mut self, i: LayerIdx) -> Vec<Action> {
        let view = View { layers: &self.layers, residency: &self.residency, leases: &self.leases };
        let actions = self.policy.on_prefetch(i, &view);
        self.apply(&actions);
        actions
    }

    /// Acquires then releases `i` (a client running the layer).
    pub fn touch(&mut self, i: LayerIdx) -> Vec<Action> {
        let mut actions = self.acquire(i);
        actions.extend(self.release(i));
        actions
    }

    /// Every load in flight completes.
    pub fn complete_loads(&mut self) {
        for r in &mut self.residency {
            if *r == Residency::Loading {
                *r = Residency::Resident;
            }
        }
    }

    pub fn is_present(&self, i: LayerIdx) -> bool {
        self.residency.get(i).is_some_and(|r| *r != Residency::Absent)
    }

    pub fn is_leased(&self, i: LayerIdx) -> bool {
        self.leases.get(i).is_some_and(|&n| n > 0)
    }

    /// Bytes held by loading and resident layers.
    pub fn used(&self) -> u64 {
        self.layers
            .iter()
            .zip(&self.residency)
            .filter(|(_, r)| **r != Residency::Absent)
            .map(|(l, _)| l.bytes)
            .sum()
    }

    pub fn quota(&self) -> u64 {
        self.quota
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn loads_of(&self, i: LayerIdx) -> u64 {
        self.loads_of[i]
    }

    pub fn evictions_of(&self, i: LayerIdx) -> u64 {
        self.evictions_of[i]
    }

    /// Every action applied so far, in order.
    pub fn log(&self) -> &[Action] {
        &self.log
    }

    pub fn pinned(&self) -> Vec<LayerIdx> {
        self.policy.pinned_set()
    }

    pub fn layers(&self) -> &[ScopeLayer] {
        &self.layers
    }

    fn apply(&mut self, actions: &[Action]) {
        for &action in actions {
            self.apply_one(action);
            assert!(
                self.used() <= self.quota,
                "{}: {action:?} takes the scope to {} bytes, over its quota {} ({:?})",
                self.policy.name(),
                self.used(),
                self.quota,
                self.residency
            );
            self.log.push(action);
        }
    }

    fn apply_one(&mut self, action: Action) {
        let name = self.policy.name();
        match action {
            Action::Load(i) => {
                assert!(i < self.layers.len(), "{name}: {action:?} out of range");
                assert!(!self.is_present(i), "{name}: {action:?} of a present layer");
                self.residency[i] =
                    if self.keep_loading { Residency::Loading } else { Residency::Resident };
                self.stats.loads += 1;
                self.stats.bytes_loaded += self.layers[i].bytes;
                self.loads_of[i] += 1;
            }
            Action::Evict(i) => {
                assert!(i < self.layers.len(), "{name}: {action:?} out of range");
                assert!(self.is_present(i), "{name}: {action:?} of an absent layer");
                assert!(!self.is_leased(i), "{name}: {action:?} of a leased layer");
                self.residency[i] = Residency::Absent;
                self.stats.evictions += 1;
                self.evictions_of[i] += 1;
            }
        }
    }
}

/// Layers of the given sizes, all in group 0.
pub(crate) fn sizes(bytes: &[u64]) -> Vec<ScopeLayer> {
    bytes.iter().map(|&bytes| ScopeLayer { bytes, group: 0 }).collect()
}

/// `n` layers of `bytes` each, all in group 0.
pub(crate) fn equal_layers(n: usize, bytes: u64) -> Vec<ScopeLayer> {
    vec![ScopeLayer { bytes, group: 0 }; n]
}

/// Layers given as `(group, layer count, bytes per layer)`, in order.
pub(crate) fn groups(spec: &[(usize, usize, u64)]) -> Vec<ScopeLayer> {
    spec.iter()
        .flat_map(|&(group, count, bytes)| std::iter::repeat_n(ScopeLayer { bytes, group }, count))
        .collect()
}

/// Bytes the whole scope holds.
pub(crate) fn model_bytes(layers: &[ScopeLayer]) -> u64 {
    total_bytes(layers)
}

mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::engine::policy::{PolicySpec, Threshold};

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Acquire(usize),
        Release(usize),
        Prefetch(usize),
        Complete,
    }

    fn arb_layers() -> impl Strategy<Value = Vec<ScopeLayer>> {
        prop::collection::vec((0u64..=64, prop::bool::weighted(0.3)), 1..10).prop_map(|v| {
            let mut group = 0;
            v.into_iter()
                .enumerate()
                .map(|(i, (bytes, new_group))| {
                    if new_group && i > 0 {
                        group += 1;
                    }
                    ScopeLayer { bytes, group }
                })
                .collect()
        })
    }

    fn arb_spec() -> impl Strategy<Value = PolicySpec> {
        prop_oneof![
            Just(PolicySpec::None),
            Just(PolicySpec::Component),
            (0usize..4).prop_map(|lookahead| PolicySpec::Sequential { lookahead }),
            (0u64..700).prop_map(|b| PolicySpec::Balanced { threshold: Threshold::Bytes(b) }),
            (0u64..700).prop_map(|b| PolicySpec::Lru { threshold: Threshold::Bytes(b) }),
        ]
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<usize>().prop_map(Op::Acquire),
            5 => any::<usize>().prop_map(Op::Release),
            2 => any::<usize>().prop_map(Op::Prefetch),
            1 => Just(Op::Complete),
        ]
    }

    /// Runs one op; for an acquire, checks that the layer ended up present whenever no other
    /// layer held a lease (then everything else could be evicted, and every policy's quota
    /// holds its largest layer).
    fn run_op(sim: &mut Sim, op: Op) -> Result<(), TestCaseError> {
        let n = sim.layers().len();
        match op {
            Op::Acquire(i) => {
                let i = i % n;
                let others_leased = (0..n).any(|l| l != i && sim.is_leased(l));
                sim.acquire(i);
                prop_assert!(
                    others_leased || sim.is_present(i),
                    "acquire({i}) left it absent with nothing else leased"
                );
            }
            Op::Release(i) => {
                sim.release(i % n);
            }
            Op::Prefetch(i) => {
                sim.prefetch(i % n);
            }
            Op::Complete => sim.complete_loads(),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_policy_keeps_the_contract(
            layers in arb_layers(),
            spec in arb_spec(),
            available in 0u64..700,
            keep_loading in any::<bool>(),
            ops in prop::collection::vec(arb_op(), 0..80),
        ) {
            let policy = spec.build(available);
            let name = policy.name();
            let total = model_bytes(&layers);
            let sim = Sim::new(policy, layers, available);
            let mut sim = match sim {
                Ok(sim) => sim,
                Err(PolicyError::BudgetTooSmall { needed, available: a, .. }) => {
                    prop_assert!(needed > a);
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(format!("{name}: {e}"))),
            };
            let largest = sim.layers().iter().map(|l| l.bytes).max().unwrap_or(0);
            prop_assert!(sim.quota() >= largest, "{name}: quota below the largest layer");
            prop_assert!(sim.quota() <= total.max(largest), "{name}: quota over the model");
            sim.keep_loading(keep_loading);
            sim.start();
            for op in ops {
                run_op(&mut sim, op)?;
            }
            for p in sim.pinned() {
                prop_assert_eq!(sim.evictions_of(p), 0, "{}: pinned layer {} evicted", name, p);
            }
            if name == "none" {
                prop_assert_eq!(sim.stats().evictions, 0);
            }
            if name == "balanced" && sim.pinned().len() == sim.layers().len() {
                prop_assert_eq!(sim.stats().evictions, 0, "balanced evicted with all resident");
            }
        }
    }

    /// Layer sizes and a pass order (a permutation) for cyclic workloads.
    fn arb_cyclic() -> impl Strategy<Value = (Vec<ScopeLayer>, Vec<LayerIdx>)> {
        prop::collection::vec(1u64..=64, 2..12).prop_flat_map(|bytes| {
            let n = bytes.len();
            (Just(sizes(&bytes)), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        })
    }

    /// Bytes loaded and misses over `passes` passes of `order`.
    fn run_passes(sim: &mut Sim, order: &[LayerIdx], passes: usize) -> (u64, u64) {
        let before = sim.stats();
        for _ in 0..passes {
            for &i in order {
                sim.touch(i);
            }
        }
        let after = sim.stats();
        (after.bytes_loaded - before.bytes_loaded, after.misses - before.misses)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Balanced on a cyclic workload, once the order is learned: each pass moves at most the
        /// streamed bytes, never touches the resident set, and with a double-buffered window
        /// every layer is there before its acquire.
        #[test]
        fn balanced_streams_at_most_the_non_resident_bytes(
            (layers, order) in arb_cyclic(),
            extra in 0u64..400,
        ) {
            let largest = layers.iter().map(|l| l.bytes).max().unwrap_or(0);
            let threshold = largest + extra;
            let policy = PolicySpec::Balanced { threshold: Threshold::Bytes(threshold) }.build(0);
            let mut sim = Sim::new(policy, layers.clone(), u64::MAX).unwrap();
            sim.start();
            let pinned = sim.pinned();
            let resident: u64 = pinned.iter().map(|&p| layers[p].bytes).sum();
            let streamed_max = (0..layers.len())
                .filter(|i| !pinned.contains(i))
                .map(|i| layers[i].bytes)
                .max()
                .unwrap_or(0);
            let double_buffered = resident + 2 * streamed_max <= sim.quota();
            run_passes(&mut sim, &order, 2);
            let (bytes, misses) = run_passes(&mut sim, &order, 3);
            prop_assert!(bytes <= 3 * (model_bytes(&layers) - resident), "{} > 3 × streamed", bytes);
            if double_buffered {
                prop_assert_eq!(misses, 0);
            }
            for p in pinned {
                prop_assert_eq!(sim.evictions_of(p), 0);
            }
        }

        /// Sequential with room for two of its largest layer never misses once the order is
        /// learned, and never moves more than the model per pass.
        #[test]
        fn sequential_prefetches_every_layer_in_time(
            (layers, order) in arb_cyclic(),
            lookahead in 1usize..4,
        ) {
            let policy = PolicySpec::Sequential { lookahead }.build(0);
            let mut sim = Sim::new(policy, layers.clone(), u64::MAX).unwrap();
            run_passes(&mut sim, &order, 2);
            let (bytes, misses) = run_passes(&mut sim, &order, 3);
            prop_assert_eq!(misses, 0);
            prop_assert!(bytes <= 3 * model_bytes(&layers));
        }
    }
}
