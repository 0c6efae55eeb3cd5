//! The fuse-mode cache against the engine's RAM budget (`EngineConfig::fuse_cache_bytes`): one
//! budget for every stack and view of an engine, never exceeded, counted in
//! `Stats::lora_cache_bytes`, and tensors that do not fit still stream the right bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::Dtype;
use ferry::device::{ClientDone, DeviceChoice, DeviceConfig};
use ferry::engine::lora_view::LoraMode;
use ferry::engine::policy::PolicySpec;
use ferry::engine::{Engine, EngineConfig, ModelId};
use ferry_tests::{Tensor, write_file};

/// Rows × cols of every weight: 32 × 16 f32 = 2048 bytes.
const ROWS: usize = 32;
const COLS: usize = 16;
const TENSOR: u64 = (ROWS * COLS * 4) as u64;

fn f32_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| f(i).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data }
}

/// Four blocks of one f32 weight each, and a LoRA touching all four.
fn fixtures(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.safetensors");
    let tensors: Vec<Tensor> = (0..4)
        .map(|b| {
            f32_tensor(&format!("blocks.{b}.proj.weight"), &[ROWS, COLS], |i| {
                ((i + b * 5) as f32 * 0.37).cos()
            })
        })
        .collect();
    write_file(&base, &tensors).expect("base");
    let lora = dir.join("lora.safetensors");
    let mut factors = Vec::new();
    for b in 0..4 {
        factors.push(f32_tensor(&format!("blocks.{b}.proj.lora_A.weight"), &[2, COLS], |i| {
            (i as f32 - 8.0) * 0.01
        }));
        factors.push(f32_tensor(&format!("blocks.{b}.proj.lora_B.weight"), &[ROWS, 2], |i| {
            (i as f32 - 16.0) * 0.02 + b as f32
        }));
    }
    write_file(&lora, &factors).expect("lora");
    (base, lora)
}

fn engine(fuse_cache_bytes: u64) -> Engine {
    Engine::new(EngineConfig {
        device: DeviceChoice::Host,
        device_config: DeviceConfig { host_memory: 2 << 20, ..DeviceConfig::default() },
        budget: Some(1 << 20),
        staging_slots: 2,
        staging_slot_bytes: 4096,
        io_threads: 2,
        acquire_timeout: Duration::from_secs(5),
        fuse_cache_bytes: Some(fuse_cache_bytes),
        ..EngineConfig::default()
    })
    .expect("host engine")
}

fn layer_bytes(e: &Engine, id: ModelId, layer: usize) -> Vec<u8> {
    let lease = e.acquire(id, "model", layer).expect("acquire");
    let t = lease.tensors()[0].clone();
    let bytes = e.read_tensor(&lease, &t).expect("read");
    e.release(lease, ClientDone::Now).expect("release");
    bytes
}

/// The merged bytes as the export computes them (the CPU merge every mode shares).
fn exported(base: &Path, lora: &Path, strength: f32, dir: &Path) -> Vec<Vec<u8>> {
    let b = ferry::Model::open(base).expect("base");
    let l = ferry::lora::format::load(lora).expect("lora");
    let out = dir.join(format!("fused-{strength}.safetensors"));
    ferry::lora::export::export_fused(&b, &[(l, strength)], &out).expect("export");
    let fused = ferry::Model::open(&out).expect("fused");
    (0..4)
        .map(|l| {
            let id = fused.find("model", &format!("blocks.{l}.proj.weight")).expect("tensor");
            fused.tensor_bytes(id).expect("bytes").to_vec()
        })
        .collect()
}

#[test]
fn the_cache_never_exceeds_its_budget_and_uncached_tensors_are_still_right() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, lora) = fixtures(dir.path());
    let want = exported(&base, &lora, 0.6, dir.path());
    // Room for two of the four fused tensors (and a bit).
    let limit = 2 * TENSOR + TENSOR / 2;
    let e = engine(limit);
    let id = e.open_model(&base).expect("open");
    e.set_residency(id, None, PolicySpec::None).expect("none");
    e.set_loras(id, &[(lora.clone(), 0.6)], LoraMode::Fuse).expect("fuse");
    for round in 0..3 {
        for (layer, want) in want.iter().enumerate() {
            assert_eq!(&layer_bytes(&e, id, layer), want, "round {round} layer {layer}");
            let cached = e.stats().lora_cache_bytes;
            assert!(cached <= limit, "round {round}: {cached} cached > limit {limit}");
        }
        // The first two tensors filled the cache; the others stream uncached.
        assert_eq!(e.stats().lora_cache_bytes, 2 * TENSOR, "round {round}");
    }
    // Removing the stack gives the budget back.
    e.set_loras(id, &[], LoraMode::Fuse).expect("remove");
    assert_eq!(e.stats().lora_cache_bytes, 0);
    e.set_loras(id, &[(lora, 0.6)], LoraMode::Fuse).expect("again");
    for (layer, want) in want.iter().enumerate() {
        assert_eq!(&layer_bytes(&e, id, layer), want, "after re-adding, layer {layer}");
    }
    assert_eq!(e.stats().lora_cache_bytes, 2 * TENSOR, "the freed budget is usable again");
}

#[test]
fn views_share_one_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, lora) = fixtures(dir.path());
    let strong = exported(&base, &lora, 0.9, dir.path());
    let weak = exported(&base, &lora, 0.2, dir.path());
    // Three tensors' worth for the whole engine.
    let limit = 3 * TENSOR;
    let e = engine(limit);
    let id = e.open_model(&base).expect("open");
    e.set_residency(id, None, PolicySpec::None).expect("none");
    let (a, _) = e.create_view(id, &[(lora.clone(), 0.9)], LoraMode::Fuse).expect("view a");
    let (b, _) = e.create_view(id, &[(lora, 0.2)], LoraMode::Fuse).expect("view b");
    for layer in 0..4 {
        assert_eq!(layer_bytes(&e, a, layer), strong[layer], "view a layer {layer}");
        assert_eq!(layer_bytes(&e, b, layer), weak[layer], "view b layer {layer}");
        let cached = e.stats().lora_cache_bytes;
        assert!(cached <= limit, "layer {layer}: {cached} cached by two views > limit {limit}");
    }
    // Each view alone would have cached all four (4 × 2048 per view): together they hold 3.
    assert_eq!(e.stats().lora_cache_bytes, limit);
    e.close_model(a).expect("close view a");
    // View a's share is free again: view b fills it on its next pass.
    for (layer, want) in weak.iter().enumerate().take(4) {
        assert_eq!(&layer_bytes(&e, b, layer), want, "view b alone, layer {layer}");
    }
    assert!(e.stats().lora_cache_bytes <= limit);
}

#[test]
fn a_zero_budget_caches_nothing_and_streams_the_merge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, lora) = fixtures(dir.path());
    let want = exported(&base, &lora, 1.0, dir.path());
    let e = engine(0);
    let id = e.open_model(&base).expect("open");
    e.set_loras(id, &[(lora, 1.0)], LoraMode::Fuse).expect("fuse");
    for (layer, want) in want.iter().enumerate() {
        assert_eq!(&layer_bytes(&e, id, layer), want, "layer {layer}");
    }
    assert_eq!(e.stats().lora_cache_bytes, 0);
}
