//! The streaming engine on the host backend: exact bytes, budgets, policies, errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry::Dtype;
use ferry::device::{ClientDone, DeviceChoice};
use ferry::engine::policy::{PolicyError, PolicySpec, Threshold};
use ferry::engine::{Engine, EngineConfig, EngineError, ModelId};
use ferry_tests::{Tensor, write_file};

const KIB: u64 = 1024;

/// An engine on the host backend with a `budget`-byte arena and a small staging ring.
fn engine(budget: u64, mapped_reads: bool) -> Engine {
    ferry_tests::host_engine(budget, mapped_reads, Duration::from_secs(5), 8 * KIB as usize)
}

/// A model of `layers` blocks, each one tensor of `layer_bytes` (plus a small bias), in one file.
fn blocks_model(dir: &Path, name: &str, layers: usize, layer_bytes: usize) -> PathBuf {
    let mut tensors = Vec::new();
    for l in 0..layers {
        tensors.push(Tensor::patterned(format!("blocks.{l}.weight"), Dtype::U8, &[layer_bytes]));
        tensors.push(Tensor::patterned(format!("blocks.{l}.bias"), Dtype::F32, &[3]));
    }
    let path = dir.join(name);
    write_file(&path, &tensors).expect("write model");
    path
}

/// Device bytes of one layer of `blocks_model` (each tensor aligned to 256).
fn layer_bytes_on_device(layer_bytes: u64) -> u64 {
    layer_bytes.div_ceil(256) * 256 + 256
}

/// Acquires every layer of `component` in order, checks its bytes against the file, releases.
fn pass(engine: &Engine, id: ModelId, component: &str) {
    let model = engine.model(id).expect("model");
    let layers = model.component(component).expect("component").layers.len();
    for l in 0..layers {
        let lease = engine.acquire(id, component, l).expect("acquire");
        check_bytes(engine, &lease, id);
        engine.release(lease, ClientDone::Now).expect("release");
    }
}

fn check_bytes(engine: &Engine, lease: &ferry::engine::Lease, id: ModelId) {
    let model = engine.model(id).expect("model");
    for t in lease.tensors() {
        let tid = model.find(lease.component(), &t.name).expect("tensor in model");
        let expected = model.tensor_bytes(tid).expect("bytes");
        let got = engine.read_tensor(lease, t).expect("read back");
        assert_eq!(got, expected, "bytes of {} differ", t.name);
    }
}

#[test]
fn every_policy_delivers_exact_bytes_within_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = blocks_model(dir.path(), "m.safetensors", 6, 20_000);
    let per_layer = layer_bytes_on_device(20_000);
    for mapped_reads in [false, true] {
        for spec in [
            PolicySpec::None,
            PolicySpec::Component,
            PolicySpec::Sequential { lookahead: 1 },
            PolicySpec::Sequential { lookahead: 0 },
            PolicySpec::Balanced { threshold: Threshold::Bytes(4 * per_layer) },
            PolicySpec::Lru { threshold: Threshold::Bytes(3 * per_layer) },
        ] {
            let budget = 8 * per_layer;
            let e = engine(budget, mapped_reads);
            let id = e.open_model(&path).expect("open");
            e.set_residency(id, None, spec).expect("set residency");
            for _ in 0..3 {
                pass(&e, id, "model");
            }
            let s = e.stats();
            assert!(
                s.peak_device_bytes <= budget,
                "{spec:?}: peak {} > {budget}",
                s.peak_device_bytes
            );
            assert_eq!(s.acquires, 18, "{spec:?}");
        }
    }
}

#[test]
fn balanced_moves_only_what_does_not_fit_and_lru_moves_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layers = 12u64;
    let path = blocks_model(dir.path(), "m.safetensors", layers as usize, 10_000);
    let per_layer = layer_bytes_on_device(10_000);
    let model_bytes = layers * per_layer;
    // The model is 1.5× the threshold.
    let threshold = model_bytes * 2 / 3;

    let e = engine(model_bytes, false);
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, None, PolicySpec::Balanced { threshold: Threshold::Bytes(threshold) })
        .expect("balanced");
    let resident_after_plan = e.resident_layers(id).expect("resident").len() as u64;
    pass(&e, id, "model"); // first pass: fills the window
    let before = e.stats();
    pass(&e, id, "model");
    pass(&e, id, "model");
    let after = e.stats();
    let streamed_layers = layers - resident_after_plan;
    // Bytes per pass = layers outside the resident set (file bytes: weight + bias).
    let per_pass = (after.bytes_streamed - before.bytes_streamed) / 2;
    assert_eq!(per_pass, streamed_layers * (10_000 + 12), "resident set: {resident_after_plan}");
    assert!(resident_after_plan >= 5, "resident set too small: {resident_after_plan}");

    let e = engine(model_bytes, false);
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, None, PolicySpec::Lru { threshold: Threshold::Bytes(threshold) })
        .expect("lru");
    pass(&e, id, "model");
    let before = e.stats();
    pass(&e, id, "model");
    let after = e.stats();
    assert_eq!(after.bytes_streamed - before.bytes_streamed, layers * (10_000 + 12));
}

#[test]
fn balanced_evicts_nothing_when_everything_fits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = blocks_model(dir.path(), "m.safetensors", 5, 4_000);
    let e = engine(1 << 20, true);
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, None, PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) })
        .expect("balanced");
    for _ in 0..4 {
        pass(&e, id, "model");
    }
    let s = e.stats();
    assert_eq!(s.evictions, 0);
    assert_eq!(s.loads, 5);
    assert_eq!(s.hits, 20);
}

#[test]
fn sequential_prefetches_the_next_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = blocks_model(dir.path(), "m.safetensors", 4, 8_000);
    let per_layer = layer_bytes_on_device(8_000);
    let e = engine(16 * per_layer, false);
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, None, PolicySpec::Sequential { lookahead: 1 }).expect("sequential");
    let lease = e.acquire(id, "model", 0).expect("acquire");
    let present = e.resident_layers(id).expect("resident");
    assert!(present.contains(&("model".to_string(), "blocks.1".to_string())), "{present:?}");
    e.release(lease, ClientDone::Now).expect("release");
    // The next acquire is a hit: it was prefetched.
    let before = e.stats();
    let lease = e.acquire(id, "model", 1).expect("acquire");
    assert_eq!(e.stats().hits, before.hits + 1);
    drop(lease);
}

#[test]
fn a_budget_smaller_than_the_largest_layer_fails_at_set_residency() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = blocks_model(dir.path(), "m.safetensors", 3, 50_000);
    let e = engine(32 * KIB, false);
    let id = e.open_model(&path).expect("open");
    for spec in [
        PolicySpec::None,
        PolicySpec::Component,
        PolicySpec::Sequential { lookahead: 1 },
        PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) },
    ] {
        let err = e.set_residency(id, None, spec).expect_err("must not fit");
        assert!(
            matches!(err, EngineError::Policy { source: PolicyError::BudgetTooSmall { .. }, .. }),
            "{spec:?}: {err}"
        );
        assert!(err.to_string().contains("model"), "{err}");
    }
    // Acquiring under the default policy fails the same way, instead of hanging.
    let err = e.acquire(id, "model", 0).expect_err("must not fit");
    assert!(matches!(err, EngineError::Policy { .. }), "{err}");
}

#[test]
fn bad_requests_get_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = blocks_model(dir.path(), "a.safetensors", 2, 1_000);
    let b = blocks_model(dir.path(), "b.safetensors", 2, 1_000);
    let e = engine(1 << 20, false);
    let ia = e.open_model(&a).expect("open a");
    let ib = e.open_model(&b).expect("open b");
    assert!(matches!(e.acquire(ia, "model", 99), Err(EngineError::UnknownLayer { .. })));
    assert!(matches!(e.acquire(ia, "unet", 0), Err(EngineError::UnknownComponent { .. })));
    assert!(matches!(e.acquire(999, "model", 0), Err(EngineError::UnknownModel(999))));

    let lease = e.acquire(ia, "model", 0).expect("acquire");
    let id = lease.id();
    // A lease of model a released as if it were model b's: refused, and the lease stays held.
    assert!(matches!(
        e.release_id(ib, id, ClientDone::Now),
        Err(EngineError::LeaseOfOtherModel { owner, model, .. }) if owner == ia && model == ib
    ));
    e.release(lease, ClientDone::Now).expect("release");
    // Releasing twice.
    assert!(matches!(
        e.release_id(ia, id, ClientDone::Now),
        Err(EngineError::UnknownLease { lease }) if lease == id
    ));
    // Changing residency or closing while a lease is held.
    let held = e.acquire(ia, "model", 1).expect("acquire");
    assert!(matches!(e.set_residency(ia, None, PolicySpec::None), Err(EngineError::Busy { .. })));
    assert!(matches!(e.close_model(ia), Err(EngineError::Busy { .. })));
    drop(held);
    e.close_model(ia).expect("close");
    assert!(matches!(e.acquire(ia, "model", 0), Err(EngineError::UnknownModel(_))));
}

#[test]
fn device_allocation_failure_is_a_clear_error() {
    let err = Engine::new(EngineConfig {
        device: DeviceChoice::Host,
        budget: Some(1 << 62),
        ..EngineConfig::default()
    })
    .expect_err("an arena of 4 EiB cannot exist");
    assert!(matches!(err, EngineError::Device(_)), "{err}");
    assert!(err.to_string().contains("host arena"), "{err}");
}

#[test]
fn leases_hold_layers_and_timeouts_are_typed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = blocks_model(dir.path(), "m.safetensors", 4, 8_000);
    let per_layer = layer_bytes_on_device(8_000);
    let e = Engine::new(EngineConfig {
        device: DeviceChoice::Host,
        budget: Some(2 * per_layer),
        staging_slots: 2,
        staging_slot_bytes: 4096,
        acquire_timeout: Duration::from_millis(200),
        ..EngineConfig::default()
    })
    .expect("engine");
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, None, PolicySpec::Sequential { lookahead: 1 }).expect("sequential");
    let l0 = e.acquire(id, "model", 0).expect("0");
    let l1 = e.acquire(id, "model", 1).expect("1");
    // Both slots are leased: a third layer cannot come in.
    let err = e.acquire(id, "model", 2).expect_err("no room");
    assert!(matches!(err, EngineError::Timeout { .. }), "{err}");
    // The held layers are untouched.
    check_bytes(&e, &l0, id);
    check_bytes(&e, &l1, id);
    e.release(l0, ClientDone::Now).expect("release");
    let l2 = e.acquire(id, "model", 2).expect("room now");
    check_bytes(&e, &l2, id);
    check_bytes(&e, &l1, id);
}

#[test]
fn many_threads_acquiring_at_once_never_exceed_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = blocks_model(dir.path(), "m.safetensors", 10, 6_000);
    let per_layer = layer_bytes_on_device(6_000);
    let budget = 6 * per_layer;
    let e = engine(budget, false);
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, None, PolicySpec::Balanced { threshold: Threshold::Bytes(budget) })
        .expect("balanced");
    let e = Arc::new(e);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let e = Arc::clone(&e);
            std::thread::spawn(move || {
                for i in 0..40usize {
                    let layer = (i * 7 + t * 3) % 10;
                    let lease = e.acquire(id, "model", layer).expect("acquire");
                    check_bytes(&e, &lease, id);
                    e.release(lease, ClientDone::Now).expect("release");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let s = e.stats();
    assert!(s.peak_device_bytes <= budget);
    assert_eq!(s.acquires, 160);
}

#[test]
fn component_policy_moves_whole_components() {
    let dir = tempfile::tempdir().expect("tempdir");
    ferry_tests::write_diffusers(dir.path()).expect("pipeline");
    let e = engine(64 * KIB, false);
    let id = e.open_model(dir.path()).expect("open");
    e.set_residency(id, None, PolicySpec::Component).expect("component");
    pass(&e, id, "text_encoder");
    let resident = e.resident_layers(id).expect("resident");
    let model = e.model(id).expect("model");
    let te_layers = model.component("text_encoder").expect("te").layers.len();
    assert!(resident.iter().filter(|(c, _)| c == "text_encoder").count() == te_layers);
    pass(&e, id, "unet");
    pass(&e, id, "vae");
    assert!(e.stats().peak_device_bytes <= 64 * KIB);
}

#[test]
fn a_truncated_model_fails_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = blocks_model(dir.path(), "a.safetensors", 4, 30_000);
    let b = blocks_model(dir.path(), "b.safetensors", 4, 30_000);
    for mapped_reads in [false, true] {
        let e = engine(1 << 20, mapped_reads);
        let ia = e.open_model(&a).expect("open a");
        let ib = e.open_model(&b).expect("open b");
        e.set_residency(ia, None, PolicySpec::Sequential { lookahead: 1 }).expect("seq a");
        e.set_residency(ib, None, PolicySpec::Sequential { lookahead: 1 }).expect("seq b");
        pass(&e, ib, "model");
        // Another process truncates a's file while it is mapped.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&a)
            .and_then(|f| f.set_len(100))
            .expect("truncate");
        let failed = (0..4).find_map(|l| {
            let lease = match e.acquire(ia, "model", l) {
                Ok(lease) => lease,
                Err(err) => return Some(err),
            };
            lease.wait_ready().err()
        });
        let err = failed.expect("a truncated model must fail");
        assert!(err.to_string().contains("a.safetensors"), "{err}");
        // b keeps streaming, bytes exact.
        pass(&e, ib, "model");
        // a is failed for good.
        assert!(e.acquire(ia, "model", 0).and_then(|l| l.wait_ready()).is_err());
        // Restore the file for the next round.
        blocks_model(dir.path(), "a.safetensors", 4, 30_000);
    }
}

#[test]
fn dropping_the_engine_or_closing_a_model_with_copies_in_flight_is_safe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = blocks_model(dir.path(), "m.safetensors", 8, 4 << 20);
    for mapped_reads in [false, true] {
        for close_first in [false, true] {
            let e = engine(64 << 20, mapped_reads);
            let id = e.open_model(&path).expect("open");
            // `none` queues every layer at once; nothing waits for the copies.
            e.set_residency(id, None, PolicySpec::None).expect("none");
            if close_first {
                e.close_model(id).expect("close");
            }
            drop(e);
        }
    }
}

#[test]
fn leases_belong_to_their_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = blocks_model(dir.path(), "m.safetensors", 3, 1_000);
    let e = engine(1 << 20, false);
    let id = e.open_model(&path).expect("open");
    // Three leases at once: a policy that keeps every layer (the default, auto, streams on a
    // device this small).
    e.set_residency(id, None, PolicySpec::None).expect("policy");
    let a = e.acquire_as(7, id, "model", 0).expect("acquire");
    let b = e.acquire_as(7, id, "model", 1).expect("acquire");
    let c = e.acquire_as(8, id, "model", 2).expect("acquire");
    // Another owner cannot release them.
    assert!(matches!(
        e.release_as(8, id, a.id(), ClientDone::Now),
        Err(EngineError::UnknownLease { .. })
    ));
    // A client that goes away releases all it holds, and only that.
    std::mem::forget(a);
    std::mem::forget(b);
    assert_eq!(e.release_owner(7), 2);
    assert_eq!(e.release_owner(7), 0);
    assert!(matches!(
        e.set_residency(id, None, PolicySpec::None),
        Err(EngineError::Busy { leases: 1, .. })
    ));
    e.release(c, ClientDone::Now).expect("release");
    e.set_residency(id, None, PolicySpec::None).expect("no leases left");
}
