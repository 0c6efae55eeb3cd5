//! What the policies share: the observed pass order, recency stamps, scope arithmetic, and the
//! [`Batch`] ledger every policy builds its actions with.
//!
//! The sections below are independent:
//!
//! 1. [`PassOrder`]: the order layers are acquired in, learned from one full pass.
//! 2. [`Recency`]: least-recently-used stamps (layers for `lru`, groups for `component`).
//! 3. Scope arithmetic: totals, the largest layer, the budget checks of `plan`.
//! 4. [`Batch`]: a copy of the scope's state that each emitted action updates, so that a run of
//!    evictions and loads keeps every rule of the contract (module docs of `policy`) when the
//!    engine applies it in order.

use std::cmp::Reverse;

use super::{Action, LayerIdx, PolicyError, ScopeLayer, View};

// ─── 1. Pass order ──────────────────────────────────────────────────────────────────────────────

/// The order in which a scope's layers are used, learned from the acquires.
///
/// Until a full pass has been seen the order is index order (the engine's pipeline order). A
/// pass is seen when the acquires wrap around: the layer that started the pass being recorded is
/// acquired again after at least two distinct layers were recorded. Repeats within a pass are
/// ignored (the first occurrence counts). The recorded layers, followed by the layers the pass
/// never touched in index order, then become the order, and the next pass is recorded; a later
/// pass that differs replaces the order again, so a client that changes its order is followed
/// one pass later.
///
/// Policies use it to tell which layers come next (prefetch) and which are needed furthest in
/// the future (the best to evict on a cyclic workload).
#[derive(Clone, Debug, Default)]
pub struct PassOrder {
    /// The current order: a permutation of `0..len`.
    order: Vec<LayerIdx>,
    /// `position[i]` is where layer `i` sits in `order`.
    position: Vec<usize>,
    /// The distinct layers of the pass being recorded, in first-acquire order.
    recording: Vec<LayerIdx>,
    /// Whether each layer is in `recording`.
    recorded: Vec<bool>,
    observed: bool,
}

impl PassOrder {
    /// Index order over `len` layers, nothing observed yet.
    pub fn new(len: usize) -> Self {
        PassOrder {
            order: (0..len).collect(),
            position: (0..len).collect(),
            recording: Vec::new(),
            recorded: vec![false; len],
            observed: false,
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The current order.
    pub fn order(&self) -> &[LayerIdx] {
        &self.order
    }

    /// Whether a full pass has been observed (before that, the order is index order).
    pub fn has_observed_pass(&self) -> bool {
        self.observed
    }

    /// Records an acquire of layer `i` (ignored when out of range).
    pub fn observe(&mut self, i: LayerIdx) {
        if i >= self.len() {
            return;
        }
        if self.recording.len() >= 2 && self.recording.first() == Some(&i) {
            self.complete_pass();
        }
        if let Some(seen) = self.recorded.get_mut(i)
            && !*seen
        {
            *seen = true;
            self.recording.push(i);
        }
    }

    /// Where layer `i` sits in the current order.
    pub fn position(&self, i: LayerIdx) -> Option<usize> {
        self.position.get(i).copied()
    }

    /// The layers after `i` in the current order, cyclically, `i` excluded (each once).
    pub fn iter_after(&self, i: LayerIdx) -> impl Iterator<Item = LayerIdx> + '_ {
        let len = self.len();
        self.position(i)
            .into_iter()
            .flat_map(move |start| (1..len).filter_map(move |k| self.order.get((start + k) % len)))
            .copied()
    }

    /// The `k` layers after `i` in the current order, cyclically, `i` excluded, no duplicates
    /// (fewer when the scope has fewer than `k + 1` layers).
    pub fn next_after(&self, i: LayerIdx, k: usize) -> Vec<LayerIdx> {
        self.iter_after(i).take(k).collect()
    }

    /// How many steps forward from `from` (cyclically) layer `to` comes: 0 for `to == from`,
    /// 1 for the next layer, `len - 1` for the one just behind. Out-of-range layers count as 0.
    pub fn distance(&self, from: LayerIdx, to: LayerIdx) -> usize {
        match (self.position(from), self.position(to)) {
            (Some(a), Some(b)) => (b + self.len() - a) % self.len(),
            _ => 0,
        }
    }

    /// `candidates` sorted so that the layer needed furthest in the future, counting from the
    /// layer `from` now in use, comes first: on a cyclic workload, evicting in this order is
    /// Belady's optimal choice (the layer just used goes first, the next one goes last).
    pub fn furthest_first(
        &self,
        from: LayerIdx,
        candidates: impl IntoIterator<Item = LayerIdx>,
    ) -> Vec<LayerIdx> {
        let mut out: Vec<LayerIdx> = candidates.into_iter().collect();
        out.sort_by_key(|&c| (Reverse(self.distance(from, c)), c));
        out
    }

    fn complete_pass(&mut self) {
        let mut order = std::mem::take(&mut self.recording);
        order.extend(self.recorded.iter().enumerate().filter(|(_, seen)| !**seen).map(|(i, _)| i));
        self.set_order(order);
        self.recorded.fill(false);
        self.observed = true;
    }

    fn set_order(&mut self, order: Vec<LayerIdx>) {
        for (pos, &layer) in order.iter().enumerate() {
            if let Some(slot) = self.position.get_mut(layer) {
                *slot = pos;
            }
        }
        self.order = order;
    }
}

// ─── 2. Recency ─────────────────────────────────────────────────────────────────────────────────

/// Least-recently-used bookkeeping over `len` items (layers or groups): a logical clock stamps
/// each use; stamp 0 means never used.
#[derive(Clone, Debug, Default)]
pub struct Recency {
    stamps: Vec<u64>,
    clock: u64,
}

impl Recency {
    pub fn new(len: usize) -> Self {
        Recency { stamps: vec![0; len], clock: 0 }
    }

    /// Marks item `i` as the most recently used (ignored when out of range).
    pub fn touch(&mut self, i: usize) {
        if let Some(stamp) = self.stamps.get_mut(i) {
            self.clock = self.clock.saturating_add(1);
            *stamp = self.clock;
        }
    }

    /// When item `i` was last used (0: never, or out of range).
    pub fn stamp(&self, i: usize) -> u64 {
        self.stamps.get(i).copied().unwrap_or(0)
    }

    /// The most recently used item other than `except`, if any was ever used.
    pub fn most_recent_except(&self, except: usize) -> Option<usize> {
        (0..self.stamps.len())
            .filter(|&i| i != except && self.stamp(i) > 0)
            .max_by_key(|&i| self.stamp(i))
    }

    /// `candidates` least recently used first (never used first of all; ties by index).
    pub fn least_recent_first(&self, candidates: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut out: Vec<usize> = candidates.into_iter().collect();
        out.sort_by_key(|&c| (self.stamp(c), c));
        out
    }
}

// ─── 3. Scope arithmetic ────────────────────────────────────────────────────────────────────────

/// Sum of `bytes` over `items`, saturating (a scope cannot really reach `u64::MAX`, but a
/// saturated total still compares correctly against any budget).
pub fn sum_bytes(items: impl IntoIterator<Item = u64>) -> u64 {
    items.into_iter().fold(0, u64::saturating_add)
}

/// Total bytes of the scope.
pub fn total_bytes(layers: &[ScopeLayer]) -> u64 {
    sum_bytes(layers.iter().map(|l| l.bytes))
}

/// Bytes of the largest layer (0 for an empty scope).
pub fn largest_layer(layers: &[ScopeLayer]) -> u64 {
    layers.iter().map(|l| l.bytes).max().unwrap_or(0)
}

/// `Err(Empty)` for a scope without layers: no policy can plan one.
pub fn require_layers(layers: &[ScopeLayer]) -> Result<(), PolicyError> {
    if layers.is_empty() { Err(PolicyError::Empty) } else { Ok(()) }
}

/// `Err(BudgetTooSmall)` when `available < needed`.
pub fn require_budget(
    policy: &'static str,
    needed: u64,
    available: u64,
) -> Result<(), PolicyError> {
    if available < needed {
        Err(PolicyError::BudgetTooSmall { policy, needed, available })
    } else {
        Ok(())
    }
}

// ─── 4. Batch ───────────────────────────────────────────────────────────────────────────────────

/// The scope's state as it will be after the actions emitted so far, plus those actions.
///
/// Policies never push an [`Action`] directly: [`Batch::evict`] and [`Batch::load`] refuse
/// anything the contract forbids (evicting an absent or leased layer, loading a present one,
/// going over the quota), and [`Batch::make_room`] evicts only when the evictions will really
/// make the room asked for, so no layer is thrown out for a load that then does not happen.
#[derive(Debug)]
pub struct Batch<'a> {
    layers: &'a [ScopeLayer],
    leases: &'a [u32],
    present: Vec<bool>,
    used: u64,
    quota: u64,
    actions: Vec<Action>,
}

impl<'a> Batch<'a> {
    /// Starts from the engine's view, under `quota` bytes.
    pub fn new(view: &View<'a>, quota: u64) -> Self {
        let present: Vec<bool> = (0..view.layers.len()).map(|i| view.is_present(i)).collect();
        let used =
            sum_bytes(view.layers.iter().zip(&present).filter(|(_, p)| **p).map(|(l, _)| l.bytes));
        Batch {
            layers: view.layers,
            leases: view.leases,
            present,
            used,
            quota,
            actions: Vec::new(),
        }
    }

    /// Number of layers in the scope.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Device bytes of layer `i` (0 when out of range).
    pub fn bytes(&self, i: LayerIdx) -> u64 {
        self.layers.get(i).map_or(0, |l| l.bytes)
    }

    pub fn is_present(&self, i: LayerIdx) -> bool {
        self.present.get(i).copied().unwrap_or(false)
    }

    pub fn is_leased(&self, i: LayerIdx) -> bool {
        self.leases.get(i).is_some_and(|&n| n > 0)
    }

    /// Present and not leased: the contract allows evicting it.
    pub fn is_evictable(&self, i: LayerIdx) -> bool {
        self.is_present(i) && !self.is_leased(i)
    }

    /// Bytes left under the quota.
    pub fn free(&self) -> u64 {
        self.quota.saturating_sub(self.used)
    }

    /// The evictable layers, in index order, except those in `protect`.
    pub fn evictable_except(&self, protect: &[LayerIdx]) -> Vec<LayerIdx> {
        (0..self.len()).filter(|&l| self.is_evictable(l) && !protect.contains(&l)).collect()
    }

    /// Whether a unit (a layer or a group) can be evicted as a whole: something of it is
    /// present and none of it is leased.
    pub fn unit_is_evictable(&self, unit: &[LayerIdx]) -> bool {
        unit.iter().any(|&l| self.is_present(l)) && !unit.iter().any(|&l| self.is_leased(l))
    }

    /// Emits `Evict(i)` if the contract allows it; returns whether it did.
    pub fn evict(&mut self, i: LayerIdx) -> bool {
        if !self.is_evictable(i) {
            return false;
        }
        if let Some(p) = self.present.get_mut(i) {
            *p = false;
        }
        self.used = self.used.saturating_sub(self.bytes(i));
        self.actions.push(Action::Evict(i));
        true
    }

    /// Emits `Load(i)` if `i` is absent and fits under the quota; returns whether it did.
    pub fn load(&mut self, i: LayerIdx) -> bool {
        let bytes = self.bytes(i);
        if i >= self.len() || self.is_present(i) || bytes > self.free() {
            return false;
        }
        if let Some(p) = self.present.get_mut(i) {
            *p = true;
        }
        self.used = self.used.saturating_add(bytes);
        self.actions.push(Action::Load(i));
        true
    }

    /// Makes `bytes` fit by evicting whole `units`, in the order given, stopping as soon as
    /// they fit. All or nothing: when even evicting every evictable unit would not free enough,
    /// nothing is evicted and `false` comes back.
    pub fn make_room_units<U: AsRef<[LayerIdx]>>(&mut self, bytes: u64, units: &[U]) -> bool {
        if bytes <= self.free() {
            return true;
        }
        if self.free().saturating_add(self.reclaimable(units)) < bytes {
            return false;
        }
        for unit in units {
            if bytes <= self.free() {
                break;
            }
            if self.unit_is_evictable(unit.as_ref()) {
                for &l in unit.as_ref() {
                    self.evict(l);
                }
            }
        }
        bytes <= self.free()
    }

    /// [`Batch::make_room_units`] with single layers as the units.
    pub fn make_room(&mut self, bytes: u64, victims: &[LayerIdx]) -> bool {
        let units: Vec<&[LayerIdx]> = victims.iter().map(std::slice::from_ref).collect();
        self.make_room_units(bytes, &units)
    }

    /// Makes every layer of `targets` present: room for the absent ones is made by evicting
    /// `units` (all or nothing), then they load in the order given. Returns whether all of
    /// `targets` are now present. `units` must not contain any target.
    pub fn bring_in_units<U: AsRef<[LayerIdx]>>(
        &mut self,
        targets: &[LayerIdx],
        units: &[U],
    ) -> bool {
        if targets.iter().any(|&t| t >= self.len()) {
            return false;
        }
        let absent: Vec<LayerIdx> =
            targets.iter().copied().filter(|&t| !self.is_present(t)).collect();
        let needed = sum_bytes(absent.iter().map(|&t| self.bytes(t)));
        if !self.make_room_units(needed, units) {
            return false;
        }
        absent.into_iter().all(|t| self.is_present(t) || self.load(t))
    }

    /// Makes layer `i` present, evicting from `victims` (in order) if needed. Returns whether
    /// `i` is present now.
    pub fn bring_in(&mut self, i: LayerIdx, victims: &[LayerIdx]) -> bool {
        let units: Vec<&[LayerIdx]> = victims.iter().map(std::slice::from_ref).collect();
        self.bring_in_units(&[i], &units)
    }

    /// The actions emitted, in the order the engine must apply them.
    pub fn into_actions(self) -> Vec<Action> {
        self.actions
    }

    /// Bytes that evicting every evictable unit would free (a layer listed twice counts once).
    fn reclaimable<U: AsRef<[LayerIdx]>>(&self, units: &[U]) -> u64 {
        let mut counted = vec![false; self.len()];
        let mut total = 0u64;
        for unit in units.iter().map(AsRef::as_ref).filter(|u| self.unit_is_evictable(u)) {
            for &l in unit {
                if let Some(seen) = counted.get_mut(l)
                    && !*seen
                    && self.is_present(l)
                {
                    *seen = true;
                    total = total.saturating_add(self.bytes(l));
                }
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::Residency;

    fn order_of(p: &PassOrder) -> Vec<LayerIdx> {
        p.order().to_vec()
    }

    #[test]
    fn index_order_until_a_pass_is_observed() {
        let mut p = PassOrder::new(4);
        assert!(!p.has_observed_pass());
        assert_eq!(p.next_after(1, 2), vec![2, 3]);
        assert_eq!(p.next_after(3, 2), vec![0, 1]);
        for i in [2, 0, 3] {
            p.observe(i);
        }
        assert!(!p.has_observed_pass());
        assert_eq!(order_of(&p), vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_wrapped_pass_replaces_the_order() {
        let mut p = PassOrder::new(5);
        // Duplicates within the pass keep their first occurrence; 4 is never acquired.
        for i in [2, 0, 0, 3, 1, 3] {
            p.observe(i);
        }
        assert!(!p.has_observed_pass());
        p.observe(2);
        assert!(p.has_observed_pass());
        assert_eq!(order_of(&p), vec![2, 0, 3, 1, 4]);
        assert_eq!(p.position(3), Some(2));
        assert_eq!(p.next_after(1, 3), vec![4, 2, 0]);
        // A later, different pass replaces it again.
        for i in [0, 1, 3, 4] {
            p.observe(i);
        }
        assert_eq!(order_of(&p), vec![2, 0, 3, 1, 4], "pass not complete until 2 comes back");
        p.observe(2);
        assert_eq!(order_of(&p), vec![2, 0, 1, 3, 4]);
    }

    #[test]
    fn one_layer_repeated_is_not_a_pass() {
        let mut p = PassOrder::new(3);
        p.observe(1);
        p.observe(1);
        assert!(!p.has_observed_pass());
        p.observe(7); // out of range: ignored
        assert_eq!(order_of(&p), vec![0, 1, 2]);
    }

    #[test]
    fn next_after_is_cyclic_and_bounded() {
        let p = PassOrder::new(3);
        assert_eq!(p.next_after(2, 10), vec![0, 1]);
        assert_eq!(p.next_after(0, 0), Vec::<LayerIdx>::new());
        assert_eq!(p.next_after(9, 2), Vec::<LayerIdx>::new());
        assert_eq!(PassOrder::new(1).next_after(0, 3), Vec::<LayerIdx>::new());
    }

    #[test]
    fn furthest_first_puts_the_layer_just_used_first() {
        let p = PassOrder::new(5);
        assert_eq!(p.distance(3, 2), 4);
        assert_eq!(p.furthest_first(3, [4, 0, 2, 1]), vec![2, 1, 0, 4]);
    }

    #[test]
    fn recency_orders_never_used_first() {
        let mut r = Recency::new(4);
        r.touch(2);
        r.touch(0);
        r.touch(9); // ignored
        assert_eq!(r.least_recent_first([0, 1, 2, 3]), vec![1, 3, 2, 0]);
        assert_eq!(r.most_recent_except(0), Some(2));
        assert_eq!(Recency::new(2).most_recent_except(0), None);
    }

    #[test]
    fn make_room_is_all_or_nothing() {
        let layers = [ScopeLayer { bytes: 10, group: 0 }; 3];
        let residency = [Residency::Resident, Residency::Loading, Residency::Resident];
        let leases = [0, 0, 1];
        let view = View { layers: &layers, residency: &residency, leases: &leases };
        let mut b = Batch::new(&view, 30);
        assert_eq!(b.free(), 0);
        // Only 0 and 1 are evictable: 20 bytes, not 25.
        assert!(!b.make_room(25, &[0, 1, 2]));
        assert!(b.make_room(15, &[1, 0, 2]));
        assert_eq!(b.into_actions(), vec![Action::Evict(1), Action::Evict(0)]);
    }

    #[test]
    fn batch_refuses_what_the_contract_forbids() {
        let layers = [ScopeLayer { bytes: 10, group: 0 }; 2];
        let residency = [Residency::Resident, Residency::Absent];
        let leases = [1, 0];
        let view = View { layers: &layers, residency: &residency, leases: &leases };
        let mut b = Batch::new(&view, 15);
        assert!(!b.evict(0), "leased");
        assert!(!b.evict(1), "absent");
        assert!(!b.load(0), "present");
        assert!(!b.load(1), "over quota");
        assert!(!b.load(5), "out of range");
        assert!(!b.bring_in(5, &[]));
        assert!(b.into_actions().is_empty());
    }
}
