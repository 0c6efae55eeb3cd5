//! One test per LoRA rejection the engine and the exporter make, each checking the typed error,
//! what it names, and that nothing changed. (Malformed LoRA files — missing factors, bad
//! alphas, rank mismatches, DoRA, mixed layouts — are covered by `lora::format`'s unit tests
//! and `tests/lora_python.rs`; merge-level byte-length and shape checks by `lora::math`'s.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::Dtype;
use ferry::device::ClientDone;
use ferry::engine::lora_view::LoraMode;
use ferry::engine::{Engine, EngineError, ModelId};
use ferry::lora::LoraError;
use ferry::lora::export::export_fused;
use ferry_tests::{Tensor, host_engine, write_file};

fn tensor(name: &str, dtype: Dtype, shape: &[usize], bytes_per: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n * bytes_per).map(|i| (i * 7 % 251) as u8).collect();
    Tensor { name: name.into(), dtype, shape: shape.to_vec(), data }
}

fn f32_tensor(name: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| (i as f32 * 0.01 - 0.2).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data }
}

/// A PEFT LoRA for module `blocks.0.proj` with a delta of `[out, inner]`.
fn peft_lora(dir: &Path, out: usize, inner: usize) -> PathBuf {
    let path = dir.join(format!("lora_{out}x{inner}.safetensors"));
    write_file(
        &path,
        &[
            f32_tensor("blocks.0.proj.lora_A.weight", &[2, inner]),
            f32_tensor("blocks.0.proj.lora_B.weight", &[out, 2]),
        ],
    )
    .expect("lora");
    path
}

/// Every tensor's bytes as served.
fn served(e: &Engine, id: ModelId) -> Vec<Vec<u8>> {
    let model = e.model(id).expect("model");
    let mut out = Vec::new();
    for c in model.components() {
        for layer in 0..c.layers.len() {
            let lease = e.acquire(id, &c.name, layer).expect("acquire");
            for t in lease.tensors() {
                out.push(e.read_tensor(&lease, t).expect("read"));
            }
            e.release(lease, ClientDone::Now).expect("release");
        }
    }
    out
}

fn engine() -> Engine {
    host_engine(1 << 20, false, Duration::from_secs(5), 4096)
}

/// Checks that `err` is `UnsupportedDtype` naming `tensor` and `dtype`, with the hint.
fn is_refused_dtype(err: &LoraError, tensor: &str, dtype: &str) {
    match err {
        LoraError::UnsupportedDtype { tensor: t, dtype: d } => {
            assert_eq!((t.as_str(), d.as_str()), (tensor, dtype));
            let msg = err.to_string();
            assert!(msg.contains(tensor) && msg.contains("quantized"), "{msg}");
        }
        other => panic!("expected UnsupportedDtype for {tensor}, got {other}"),
    }
}

fn quantized_target_is_refused(dtype: Dtype, shape: &[usize], lora_shape: (usize, usize)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.safetensors");
    write_file(
        &base,
        &[tensor("blocks.0.proj.weight", dtype, shape, 1), f32_tensor("blocks.0.proj.bias", &[8])],
    )
    .expect("base");
    let lora = peft_lora(dir.path(), lora_shape.0, lora_shape.1);
    let name = dtype.as_str();

    let e = engine();
    let id = e.open_model(&base).expect("open");
    let before = served(&e, id);
    for mode in [LoraMode::Backup, LoraMode::Fuse] {
        match e.set_loras(id, &[(lora.clone(), 1.0)], mode) {
            Err(EngineError::Lora(err)) => is_refused_dtype(&err, "blocks.0.proj.weight", name),
            other => panic!("{name} {mode:?}: {other:?}"),
        }
        match e.create_view(id, &[(lora.clone(), 1.0)], mode) {
            Err(EngineError::Lora(err)) => is_refused_dtype(&err, "blocks.0.proj.weight", name),
            other => panic!("{name} {mode:?} view: {other:?}"),
        }
    }
    assert_eq!(served(&e, id), before, "{name}: nothing changed");

    let model = ferry::Model::open(&base).expect("open");
    let l = ferry::lora::format::load(&lora).expect("lora");
    let out = dir.path().join("fused.safetensors");
    let err = export_fused(&model, &[(l, 1.0)], &out).expect_err("export refuses");
    is_refused_dtype(&err, "blocks.0.proj.weight", name);
    assert!(!out.exists(), "{name}: no export written");
}

#[test]
fn int8_weights_are_refused_naming_the_tensor() {
    quantized_target_is_refused(Dtype::I8, &[8, 4], (8, 4));
}

#[test]
fn packed_4bit_weights_are_refused_naming_the_tensor() {
    // bitsandbytes-style nf4: two codes a byte, flattened to [n/2, 1]. The dtype is refused
    // before the shape (whose mismatch would say nothing useful).
    quantized_target_is_refused(Dtype::U8, &[16, 1], (8, 4));
}

#[test]
fn a_view_of_a_view_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.safetensors");
    write_file(&base, &[f32_tensor("blocks.0.proj.weight", &[8, 4])]).expect("base");
    let lora = peft_lora(dir.path(), 8, 4);
    let e = engine();
    let id = e.open_model(&base).expect("open");
    let (view, _) = e.create_view(id, &[(lora.clone(), 0.5)], LoraMode::Backup).expect("view");
    let before = served(&e, view);
    match e.create_view(view, &[(lora, 0.5)], LoraMode::Backup) {
        Err(EngineError::Config(msg)) => assert!(msg.contains("is a view"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(served(&e, view), before);
}

#[test]
fn a_view_without_loras_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.safetensors");
    write_file(&base, &[f32_tensor("blocks.0.proj.weight", &[8, 4])]).expect("base");
    let e = engine();
    let id = e.open_model(&base).expect("open");
    match e.create_view(id, &[], LoraMode::Fuse) {
        Err(EngineError::Config(msg)) => assert!(msg.contains("at least one LoRA"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn infinite_strengths_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.safetensors");
    write_file(&base, &[f32_tensor("blocks.0.proj.weight", &[8, 4])]).expect("base");
    let lora = peft_lora(dir.path(), 8, 4);
    let e = engine();
    let id = e.open_model(&base).expect("open");
    let before = served(&e, id);
    for s in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        match e.set_loras(id, &[(lora.clone(), s)], LoraMode::Backup) {
            Err(EngineError::Config(msg)) => {
                assert!(msg.contains("finite") && msg.contains("lora_8x4"), "{msg}")
            }
            other => panic!("{s}: {other:?}"),
        }
        assert!(matches!(
            e.create_view(id, &[(lora.clone(), s)], LoraMode::Fuse),
            Err(EngineError::Config(_))
        ));
    }
    assert_eq!(served(&e, id), before);
}

#[test]
fn a_file_that_is_not_a_lora_is_refused_by_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.safetensors");
    write_file(&base, &[f32_tensor("blocks.0.proj.weight", &[8, 4])]).expect("base");
    let e = engine();
    let id = e.open_model(&base).expect("open");
    // The base itself: a model, no adapter in it.
    match e.set_loras(id, &[(base.clone(), 1.0)], LoraMode::Backup) {
        Err(EngineError::Lora(LoraError::NotALora { path, .. })) => {
            assert!(path.ends_with("base.safetensors"), "{}", path.display())
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_delta_that_does_not_fit_its_row_slice_is_refused() {
    // An OpenCLIP text encoder (d = 4) and a q_proj LoRA of [3, 4].
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("sdxl.safetensors");
    let fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight";
    write_file(
        &base,
        &[f32_tensor(fused, &[12, 4]), f32_tensor("model.diffusion_model.out.2.weight", &[4, 4])],
    )
    .expect("base");
    let lora = dir.path().join("te2.safetensors");
    let module = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
    write_file(
        &lora,
        &[
            f32_tensor(&format!("{module}.lora_down.weight"), &[2, 4]),
            f32_tensor(&format!("{module}.lora_up.weight"), &[3, 2]),
        ],
    )
    .expect("lora");
    let e = engine();
    let id = e.open_model(&base).expect("open");
    match e.set_loras(id, &[(lora, 1.0)], LoraMode::Fuse) {
        Err(EngineError::Lora(LoraError::ShapeMismatch { adapter, target, delta, weight })) => {
            assert_eq!(adapter, module);
            assert_eq!(target, format!("{fused} rows 0..4"));
            assert_eq!((delta, weight), (vec![3, 4], vec![4, 4]));
        }
        other => panic!("{other:?}"),
    }
}
