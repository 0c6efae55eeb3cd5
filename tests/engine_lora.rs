//! LoRA stacks applied by the engine: adapted layers carry the merged bytes in both modes,
//! untouched layers stay where they are, and removing the stack restores the file's bytes
//! exactly.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::Dtype;
use ferry::device::ClientDone;
use ferry::engine::lora_view::LoraMode;
use ferry::engine::policy::PolicySpec;
use ferry::engine::{Engine, EngineError, ModelId};
use ferry::lora::math::{self, Delta, Factor};
use ferry_tests::{Tensor, host_engine, write_file};

fn f32_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| f(i).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data }
}

fn bf16_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| half::bf16::from_f32(f(i)).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::BF16, shape: shape.to_vec(), data }
}

/// Three blocks of a 32×16 bf16 weight; a LoRA (rank 2, alpha 1) for block 1 only.
fn fixtures(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.safetensors");
    let mut tensors = Vec::new();
    for b in 0..3 {
        tensors.push(bf16_tensor(&format!("blocks.{b}.proj.weight"), &[32, 16], |i| {
            ((i + b * 7) as f32 * 0.21).sin()
        }));
    }
    write_file(&base, &tensors).expect("base");
    let lora = dir.join("lora.safetensors");
    write_file(
        &lora,
        &[
            f32_tensor("blocks.1.proj.lora_A.weight", &[2, 16], |i| (i as f32 - 8.0) * 0.03),
            f32_tensor("blocks.1.proj.lora_B.weight", &[32, 2], |i| (i as f32 - 16.0) * 0.02),
            f32_tensor("blocks.1.proj.alpha", &[], |_| 1.0),
        ],
    )
    .expect("lora");
    (base, lora)
}

fn layer_bytes(e: &Engine, id: ModelId, layer: usize) -> Vec<u8> {
    let lease = e.acquire(id, "model", layer).expect("acquire");
    let t = lease.tensors()[0].clone();
    let bytes = e.read_tensor(&lease, &t).expect("read");
    e.release(lease, ClientDone::Now).expect("release");
    bytes
}

fn expected_merge(base: &Path, lora: &Path, strength: f32) -> Vec<u8> {
    let b = ferry::Model::open(base).expect("base");
    let l = ferry::Model::open(lora).expect("lora");
    let get = |m: &ferry::Model, n: &str| {
        let id = m.find("model", n).expect(n);
        let t = &m.tensors()[id];
        (t.dtype, t.shape.clone(), m.tensor_bytes(id).expect("bytes").to_vec())
    };
    let (wd, ws, wb) = get(&b, "blocks.1.proj.weight");
    let (ud, us, ub) = get(&l, "blocks.1.proj.lora_B.weight");
    let (dd, dsh, db) = get(&l, "blocks.1.proj.lora_A.weight");
    math::merge(
        "blocks.1.proj.weight",
        Factor { dtype: wd, shape: &ws, bytes: &wb },
        &[Delta {
            up: Factor { dtype: ud, shape: &us, bytes: &ub },
            down: Factor { dtype: dd, shape: &dsh, bytes: &db },
            mid: None,
            scale: math::scale(strength, Some(1.0), 2),
        }],
    )
    .expect("merge")
}

#[test]
fn both_modes_serve_the_merged_bytes_and_removal_restores_the_file_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, lora) = fixtures(dir.path());
    let original = ferry::Model::open(&base).expect("base");
    let file_bytes = |layer: usize| {
        original
            .tensor_bytes(
                original.find("model", &format!("blocks.{layer}.proj.weight")).expect("t"),
            )
            .expect("bytes")
            .to_vec()
    };
    for mapped_reads in [false, true] {
        for mode in [LoraMode::Backup, LoraMode::Fuse] {
            let e = host_engine(1 << 20, mapped_reads, Duration::from_secs(5), 8192);
            let id = e.open_model(&base).expect("open");
            e.set_residency(id, None, PolicySpec::None).expect("none");
            let before: Vec<Vec<u8>> = (0..3).map(|l| layer_bytes(&e, id, l)).collect();
            assert_eq!(before[1], file_bytes(1));

            let report = e.set_loras(id, &[(lora.clone(), 0.7)], mode).expect("apply");
            assert_eq!(report.merged, 1);
            assert!(report.unmatched.iter().all(|(_, u)| u.is_empty()));
            let evictions = e.stats().evictions;
            assert_eq!(layer_bytes(&e, id, 1), expected_merge(&base, &lora, 0.7), "{mode:?}");
            // Untouched layers stayed on the device with their bytes.
            assert_eq!(layer_bytes(&e, id, 0), before[0]);
            assert_eq!(layer_bytes(&e, id, 2), before[2]);
            assert_eq!(e.stats().evictions, evictions, "only the touched layer moves");
            if mode == LoraMode::Fuse {
                assert_eq!(e.stats().lora_cache_bytes, 32 * 16 * 2);
            }

            // A new strength replaces the old one; strength 0 gives the original back.
            e.set_loras(id, &[(lora.clone(), 0.0)], mode).expect("strength 0");
            assert_eq!(layer_bytes(&e, id, 1), file_bytes(1));
            e.set_loras(id, &[(lora.clone(), 0.7)], mode).expect("again");
            assert_eq!(layer_bytes(&e, id, 1), expected_merge(&base, &lora, 0.7));
            // Removal: the file's bytes, exactly.
            e.set_loras(id, &[], mode).expect("remove");
            assert_eq!(layer_bytes(&e, id, 1), file_bytes(1));
            assert_eq!(e.stats().lora_cache_bytes, 0);
        }
    }
}

#[test]
fn a_leased_layer_blocks_a_stack_change_and_bad_loras_are_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, lora) = fixtures(dir.path());
    let e = host_engine(1 << 20, false, Duration::from_secs(5), 8192);
    let id = e.open_model(&base).expect("open");
    let held = e.acquire(id, "model", 1).expect("acquire");
    let err = e.set_loras(id, &[(lora.clone(), 1.0)], LoraMode::Backup).expect_err("busy");
    assert!(matches!(err, EngineError::Busy { .. }), "{err}");
    drop(held);
    // A lease on an untouched layer does not block.
    let other = e.acquire(id, "model", 0).expect("acquire");
    e.set_loras(id, &[(lora.clone(), 1.0)], LoraMode::Backup).expect("untouched lease is fine");
    drop(other);

    let missing = dir.path().join("missing.safetensors");
    let err = e.set_loras(id, &[(missing, 1.0)], LoraMode::Fuse).expect_err("missing file");
    assert!(err.to_string().contains("missing.safetensors"), "{err}");
    let err = e.set_loras(id, &[(lora, f32::NAN)], LoraMode::Fuse).expect_err("NaN strength");
    assert!(matches!(err, EngineError::Config(_)), "{err}");
    // The stack that was set is still in force.
    assert_eq!(
        layer_bytes(&e, id, 1),
        expected_merge(&base, &dir.path().join("lora.safetensors"), 1.0)
    );
}

#[test]
fn views_of_one_base_coexist_and_share_untouched_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, lora) = fixtures(dir.path());
    let original = ferry::Model::open(&base).expect("base");
    let file_layer1 = original
        .tensor_bytes(original.find("model", "blocks.1.proj.weight").expect("t"))
        .expect("bytes")
        .to_vec();
    let e = host_engine(1 << 20, true, Duration::from_secs(5), 8192);
    let id = e.open_model(&base).expect("open");
    e.set_residency(id, None, PolicySpec::None).expect("none");
    let (strong, report) =
        e.create_view(id, &[(lora.clone(), 0.7)], LoraMode::Backup).expect("view");
    assert_eq!(report.merged, 1);
    let (weak, _) = e.create_view(id, &[(lora.clone(), 0.3)], LoraMode::Fuse).expect("view");

    // The touched layer: three different byte sets, all on the device at once.
    let held: Vec<_> =
        [id, strong, weak].iter().map(|&m| e.acquire(m, "model", 1).expect("acquire")).collect();
    let bytes: Vec<Vec<u8>> =
        held.iter().map(|l| e.read_tensor(l, &l.tensors()[0]).expect("read")).collect();
    assert_eq!(bytes[0], file_layer1);
    assert_eq!(bytes[1], expected_merge(&base, &lora, 0.7));
    assert_eq!(bytes[2], expected_merge(&base, &lora, 0.3));
    for l in held {
        e.release(l, ClientDone::Now).expect("release");
    }
    // An untouched layer through a view is the base's own copy: the same device address.
    let addr = |m: ModelId| {
        let l = e.acquire(m, "model", 0).expect("acquire");
        let a = l.tensors()[0].addr;
        // Released through the view's id: allowed, the view serves it from its base.
        let lease_id = l.id();
        std::mem::forget(l);
        e.release_id(m, lease_id, ClientDone::Now).expect("release via the id it was acquired by");
        a
    };
    assert_eq!(addr(strong), addr(id));
    assert_eq!(addr(weak), addr(id));

    // A view's stack is fixed; the base cannot close while views are open.
    assert!(matches!(e.set_loras(strong, &[], LoraMode::Backup), Err(EngineError::Config(_))));
    assert!(matches!(e.close_model(id), Err(EngineError::Busy { .. })));
    e.close_model(strong).expect("close view");
    e.close_model(weak).expect("close view");
    e.close_model(id).expect("close base");
}
