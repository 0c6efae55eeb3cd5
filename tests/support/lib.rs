//! Test-data writers shared by ferry's integration tests and benchmarks.
//!
//! Models are written with the `safetensors` crate (an independent writer: ferry only reads),
//! with deterministic contents so tests can compare exact bytes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ferry::Dtype;

pub mod ferryd;

/// One tensor to write.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor filled with deterministic bytes derived from its name.
    pub fn patterned(name: impl Into<String>, dtype: Dtype, shape: &[usize]) -> Tensor {
        let name = name.into();
        let elements: u64 = shape.iter().map(|&d| d as u64).product();
        let len = dtype.byte_len(elements).expect("whole bytes") as usize;
        let data = pattern(seed_of(&name), len);
        Tensor { name, dtype, shape: shape.to_vec(), data }
    }
}

impl safetensors::View for &Tensor {
    fn dtype(&self) -> safetensors::Dtype {
        serde_json::from_value(serde_json::Value::String(self.dtype.as_str().to_string()))
            .expect("every ferry dtype is a safetensors dtype")
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A stable 64-bit seed from a string (FNV-1a).
pub fn seed_of(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// `len` pseudo-random bytes from `seed` (xorshift64*), the same on every machine.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `tensors` as one safetensors file.
/// `layers` layers of one U8 tensor each, `blocks.<l>.weight` of `len` bytes, byte `i` of
/// layer `l` being `byte(l, i)` (models whose every byte a test can predict).
pub fn u8_blocks(layers: usize, len: usize, byte: impl Fn(usize, usize) -> u8) -> Vec<Tensor> {
    (0..layers)
        .map(|l| Tensor {
            name: format!("blocks.{l}.weight"),
            dtype: Dtype::U8,
            shape: vec![len],
            data: (0..len).map(|i| byte(l, i)).collect(),
        })
        .collect()
}

pub fn write_file(path: &Path, tensors: &[Tensor]) -> io::Result<()> {
    let meta = HashMap::from([("writer".to_string(), "ferry-tests".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.as_str(), t)), Some(meta), path)
        .map_err(io::Error::other)
}

/// Writes `tensors` split over `shards` files named like Hugging Face's, plus the index, in
/// `dir`; returns the index path.
pub fn write_sharded(
    dir: &Path,
    stem: &str,
    tensors: &[Tensor],
    shards: usize,
) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let shards = shards.max(1);
    let per = tensors.len().div_ceil(shards).max(1);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, shards);
        write_file(&dir.join(&name), chunk)?;
        for t in chunk {
            weight_map.insert(t.name.clone(), serde_json::Value::String(name.clone()));
            total += t.data.len();
        }
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dir.join(format!("{stem}.safetensors.index.json"));
    fs::write(&path, serde_json::to_vec_pretty(&index).map_err(io::Error::other)?)?;
    Ok(path)
}

/// An LLM-like model: `layers` decoder blocks of `per_layer` tensors of `tensor_bytes` each
/// (f16), plus embeddings and head.
pub fn llm_like(layers: usize, per_layer: usize, tensor_bytes: usize) -> Vec<Tensor> {
    let elems = (tensor_bytes / 2).max(1);
    let mut v = vec![Tensor::patterned("model.embed_tokens.weight", Dtype::F16, &[elems])];
    for l in 0..layers {
        for p in 0..per_layer {
            v.push(Tensor::patterned(
                format!("model.layers.{l}.w{p}.weight"),
                Dtype::F16,
                &[elems],
            ));
        }
    }
    v.push(Tensor::patterned("model.norm.weight", Dtype::F16, &[elems]));
    v.push(Tensor::patterned("lm_head.weight", Dtype::F16, &[elems]));
    v
}

/// Writes a small diffusers pipeline folder (text_encoder, unet, vae, plus weightless tokenizer
/// and scheduler) under `root`.
pub fn write_diffusers(root: &Path) -> io::Result<()> {
    fs::create_dir_all(root)?;
    let index = serde_json::json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [null, null],
    });
    fs::write(
        root.join("model_index.json"),
        serde_json::to_vec_pretty(&index).map_err(io::Error::other)?,
    )?;
    let f = |n: &str, shape: &[usize]| Tensor::patterned(n, Dtype::F16, shape);
    let mut unet = vec![f("conv_in.weight", &[8, 4, 3, 3]), f("conv_in.bias", &[8])];
    for b in 0..3 {
        unet.push(f(&format!("down_blocks.{b}.resnets.0.conv1.weight"), &[8, 8, 3, 3]));
        unet.push(f(&format!("down_blocks.{b}.attentions.0.proj_in.weight"), &[8, 8]));
        unet.push(f(&format!("up_blocks.{b}.resnets.0.conv1.weight"), &[8, 8, 3, 3]));
    }
    unet.push(f("mid_block.attentions.0.proj_in.weight", &[8, 8]));
    unet.push(f("conv_out.weight", &[4, 8, 3, 3]));
    let text = vec![
        f("text_model.embeddings.token_embedding.weight", &[16, 8]),
        f("text_model.encoder.layers.0.self_attn.q_proj.weight", &[8, 8]),
        f("text_model.encoder.layers.1.self_attn.q_proj.weight", &[8, 8]),
        f("text_model.final_layer_norm.weight", &[8]),
    ];
    let vae = vec![
        f("encoder.conv_in.weight", &[8, 3, 3, 3]),
        f("encoder.down_blocks.0.resnets.0.conv1.weight", &[8, 8, 3, 3]),
        f("decoder.up_blocks.0.resnets.0.conv1.weight", &[8, 8, 3, 3]),
        f("decoder.conv_out.weight", &[3, 8, 3, 3]),
    ];
    for (dir, file, tensors) in [
        ("unet", "diffusion_pytorch_model.safetensors", unet),
        ("text_encoder", "model.safetensors", text),
        ("vae", "diffusion_pytorch_model.safetensors", vae),
    ] {
        fs::create_dir_all(root.join(dir))?;
        write_file(&root.join(dir).join(file), &tensors)?;
    }
    for dir in ["tokenizer", "scheduler"] {
        fs::create_dir_all(root.join(dir))?;
        fs::write(root.join(dir).join("config.json"), b"{}")?;
    }
    Ok(())
}

/// Path of one of the workspace's binaries (`ferryd`, `ferryctl`), built on first use with the
/// profile the tests run under. Integration tests of the root package cannot name another
/// package's binaries through `CARGO_BIN_EXE_*`, so they build them here.
pub fn cargo_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // tests run from target/<profile>/deps/<test>-<hash>
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("test binary is not under target/<profile>/deps")?
            .to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q", "-p", "ferry", "--bins"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().map_err(|e| format!("running cargo: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build of the ferry binaries failed: {status}"));
        }
        Ok(profile_dir)
    });
    match dir {
        Ok(dir) => dir.join(name),
        Err(e) => panic!("{e}"),
    }
}

/// An engine on the host backend with a `budget`-byte arena, a 3-slot staging ring of
/// `slot_bytes` slots (small, so copies go through several slots) and two I/O threads.
pub fn host_engine(
    budget: u64,
    mapped_reads: bool,
    acquire_timeout: std::time::Duration,
    slot_bytes: usize,
) -> ferry::engine::Engine {
    use ferry::device::{DeviceChoice, DeviceConfig};
    ferry::engine::Engine::new(ferry::engine::EngineConfig {
        device: DeviceChoice::Host,
        device_config: DeviceConfig {
            host_memory: budget * 2,
            mapped_reads,
            ..DeviceConfig::default()
        },
        budget: Some(budget),
        staging_slots: 3,
        staging_slot_bytes: slot_bytes,
        io_threads: 2,
        acquire_timeout,
        ..ferry::engine::EngineConfig::default()
    })
    .expect("host engine")
}

/// The workspace root (where `Cargo.toml`, `include/` and `tests/c/` are).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory the running test or bench was built into
/// (`<target>/<profile>/deps/<exe>`), honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() { dir } else { workspace_root().join(dir) };
    }
    let exe = std::env::current_exe().expect("locating the test executable");
    exe.ancestors().nth(3).map(Path::to_path_buf).unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds the ffi crate into `<target>/c-abi` (its own target directory, so the nested cargo
/// never waits on the lock of the one the outer `cargo test` uses) and returns the directory
/// holding `libferry.a` and `libferry.so`.
pub fn build_ffi(release: bool) -> PathBuf {
    let target = target_dir().join("c-abi");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "ferry-ffi", "--target-dir"])
        .arg(&target);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build -p ferry-ffi");
    assert!(status.success(), "cargo build -p ferry-ffi failed: {status}");
    target.join(if release { "release" } else { "debug" })
}
