//! Manual offload (SD.Next's base/refiner juggling): a base and a refiner that cannot both be
//! reserved under the budget take turns on the device through `offload` / `onload`; bytes stay
//! exact and the budget is never exceeded; leased or pinned layers block an offload.

use std::path::Path;
use std::time::Duration;

use ferry::Dtype;
use ferry::device::ClientDone;
use ferry::engine::policy::PolicySpec;
use ferry::engine::{Engine, EngineError, ModelId};
use ferry_tests::{Tensor, host_engine, write_file};

const LAYER: usize = 64 << 10;

/// A model of `layers` layers of `LAYER` bytes, with bytes that differ per `seed`.
fn model(dir: &Path, name: &str, layers: usize, seed: u8) -> (std::path::PathBuf, Vec<Tensor>) {
    let tensors: Vec<Tensor> = (0..layers)
        .map(|l| {
            let data = (0..LAYER)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed + l as u8))
                .collect();
            Tensor {
                name: format!("blocks.{l}.weight"),
                dtype: Dtype::U8,
                shape: vec![LAYER],
                data,
            }
        })
        .collect();
    let path = dir.join(name);
    write_file(&path, &tensors).expect("write");
    (path, tensors)
}

/// Acquires every layer in turn and checks its bytes against the file.
fn check_all(e: &Engine, id: ModelId, tensors: &[Tensor]) {
    for (l, t) in tensors.iter().enumerate() {
        let lease = e.acquire(id, "model", l).expect("acquire");
        lease.wait_ready().expect("ready");
        let tv = lease.tensors()[0].clone();
        assert_eq!(e.read_tensor(&lease, &tv).expect("read"), t.data, "layer {l}");
        e.release(lease, ClientDone::Now).expect("release");
    }
}

#[test]
fn base_and_refiner_take_turns_under_one_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, base_t) = model(dir.path(), "base.safetensors", 6, 1);
    let (refiner, refiner_t) = model(dir.path(), "refiner.safetensors", 5, 7);
    // Room for one of them whole, not both.
    let budget = (8 * LAYER) as u64;
    let e = host_engine(budget, true, Duration::from_secs(5), 1 << 20);
    let b = e.open_model(&base).expect("base");
    let r = e.open_model(&refiner).expect("refiner");
    e.set_residency(b, None, PolicySpec::None).expect("base resident");
    check_all(&e, b, &base_t);
    // The refiner cannot be reserved while the base holds its memory.
    assert!(matches!(
        e.set_residency(r, None, PolicySpec::None),
        Err(EngineError::OutOfDeviceMemory { .. } | EngineError::Policy { .. })
    ));

    for round in 0..3 {
        // Base out while the refiner runs.
        let freed = e.offload(b, None).expect("base out");
        assert!(freed >= (6 * LAYER) as u64, "round {round}: {freed}");
        assert!(e.resident_layers(b).expect("resident").is_empty());
        e.set_residency(r, None, PolicySpec::None).expect("refiner in");
        check_all(&e, r, &refiner_t);
        // Refiner out, base back in.
        e.offload(r, None).expect("refiner out");
        e.onload(b, None).expect("base back");
        check_all(&e, b, &base_t);
        assert_eq!(e.resident_layers(b).expect("resident").len(), 6, "round {round}");
        let st = e.stats();
        assert!(st.peak_device_bytes <= st.budget, "round {round}: {st:?}");
    }
}

#[test]
fn leased_or_pinned_layers_block_an_offload_and_components_go_out_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, tensors) = model(dir.path(), "m.safetensors", 4, 3);
    let e = host_engine((8 * LAYER) as u64, true, Duration::from_secs(5), 1 << 20);
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, None, PolicySpec::None).expect("none");
    let lease = e.acquire(id, "model", 2).expect("acquire");
    assert!(matches!(e.offload(id, None), Err(EngineError::Busy { leases: 1, .. })));
    assert!(matches!(e.offload(id, Some("model")), Err(EngineError::Busy { leases: 1, .. })));
    assert_eq!(e.resident_layers(id).expect("resident").len(), 4, "nothing changed");
    e.release(lease, ClientDone::Now).expect("release");

    e.pin(id, "model", 0).expect("pin");
    assert!(matches!(e.offload(id, None), Err(EngineError::Busy { .. })));
    e.unpin(id, "model", 0).expect("unpin");

    // One component out: its layers leave, the reservation stays; they stream back on use.
    let freed = e.offload(id, Some("model")).expect("component out");
    assert_eq!(freed, (4 * LAYER) as u64);
    assert!(e.resident_layers(id).expect("resident").is_empty());
    check_all(&e, id, &tensors);
    assert!(matches!(e.offload(id, Some("nope")), Err(EngineError::UnknownComponent { .. })));
    assert!(matches!(e.onload(id, Some("nope")), Err(EngineError::UnknownComponent { .. })));
}
