//! Models written by an independent writer: Python's `safetensors` package.
//!
//! The fixtures under `tests/fixtures/py/` were written by `tests/fixtures/make_fixtures.py`
//! (see `tests/fixtures/README.md`), which also recorded in `expected.json` every tensor's
//! name, dtype, shape and the sha256 of the bytes it handed to the package. These tests open the
//! committed files with ferry and compare, so no Python is needed to run them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry::Dtype;
use ferry::store::layout::layer_order;
use ferry::store::{Model, SourceKind, Store};
use serde::Deserialize;
use sha2::{Digest, Sha256};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/py");

/// The models among the fixtures, by the path they are opened with.
const MODELS: &[&str] = &[
    "all_dtypes.safetensors",
    "f4_packed.safetensors",
    "sharded",
    "sd_tiny",
    "sdxl_checkpoint.safetensors",
];

#[derive(Debug, Deserialize)]
struct Expected {
    generator: BTreeMap<String, String>,
    /// Relative path of each safetensors file the script wrote -> what it wrote there.
    files: BTreeMap<String, ExpectedFile>,
}

#[derive(Debug, Deserialize)]
struct ExpectedFile {
    metadata: BTreeMap<String, String>,
    tensors: Vec<ExpectedTensor>,
}

#[derive(Debug, Deserialize)]
struct ExpectedTensor {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    sha256: String,
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

fn fixtures_root() -> PathBuf {
    std::fs::canonicalize(FIXTURES).expect("fixtures directory exists")
}

fn expected() -> Expected {
    let text = std::fs::read_to_string(fixture("expected.json")).expect("read expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn open(rel: &str) -> Model {
    Model::open(fixture(rel)).unwrap_or_else(|e| panic!("opening fixture {rel}: {e}"))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The path of `model`'s file `fi`, relative to the fixtures directory.
fn relative_file(model: &Model, fi: usize) -> String {
    let path = &model.files()[fi].path;
    let root = fixtures_root();
    let rel = path
        .strip_prefix(&root)
        .unwrap_or_else(|_| panic!("{} is not under {}", path.display(), root.display()));
    rel.to_str().expect("fixture paths are UTF-8").to_string()
}

/// Checks every tensor of every file of `model` against what the Python package wrote, and
/// returns the relative paths of the files checked.
fn check_against_expected(rel: &str, model: &Model, expected: &Expected) -> Vec<String> {
    let mut checked = Vec::new();
    for fi in 0..model.files().len() {
        let file = relative_file(model, fi);
        let want = expected
            .files
            .get(&file)
            .unwrap_or_else(|| panic!("{rel}: file {file} is not in expected.json"));

        let metadata: BTreeMap<String, String> =
            model.files()[fi].header.metadata.iter().cloned().collect();
        assert_eq!(metadata, want.metadata, "{file}: __metadata__");
        assert_eq!(
            model.files()[fi].header.metadata.len(),
            want.metadata.len(),
            "{file}: duplicate metadata keys"
        );

        let mine: Vec<usize> =
            (0..model.tensors().len()).filter(|&id| model.tensors()[id].file == fi).collect();
        assert_eq!(mine.len(), want.tensors.len(), "{file}: tensor count");
        let by_name: BTreeMap<&str, usize> =
            mine.iter().map(|&id| (model.tensors()[id].name.as_str(), id)).collect();
        assert_eq!(by_name.len(), mine.len(), "{file}: tensor names are unique");

        for t in &want.tensors {
            let id = *by_name
                .get(t.name.as_str())
                .unwrap_or_else(|| panic!("{file}: tensor {:?} missing", t.name));
            let info = &model.tensors()[id];
            assert_eq!(info.dtype.as_str(), t.dtype, "{file}: {} dtype", t.name);
            assert_eq!(info.shape, t.shape, "{file}: {} shape", t.name);
            let bytes = model
                .tensor_bytes(id)
                .unwrap_or_else(|| panic!("{file}: {} bytes out of range", t.name));
            assert_eq!(bytes.len() as u64, info.len, "{file}: {} length", t.name);
            let elements: u64 = t.shape.iter().product();
            assert_eq!(info.dtype.byte_len(elements), Some(info.len), "{file}: {} size", t.name);
            assert_eq!(sha256_hex(bytes), t.sha256, "{file}: {} bytes", t.name);
        }
        checked.push(file);
    }
    checked
}

/// Structural invariants every opened model must keep: each tensor in exactly one layer of its
/// component, indices consistent, byte counts summed, layer names prefixes of their tensors'
/// local names, and layers sorted by the store's documented automatic order.
fn check_structure(rel: &str, model: &Model) {
    let mut seen = vec![0usize; model.tensors().len()];
    let mut total = 0;
    for (ci, c) in model.components().iter().enumerate() {
        let mut cbytes = 0;
        let mut count = 0;
        for (li, layer) in c.layers.iter().enumerate() {
            assert!(!layer.tensors.is_empty(), "{rel}: {}/{} is empty", c.name, layer.name);
            let mut lbytes = 0;
            for &id in &layer.tensors {
                seen[id] += 1;
                let t = &model.tensors()[id];
                assert_eq!((t.component, t.layer), (ci, li), "{rel}: {} indices", t.name);
                assert!(t.name.starts_with(&c.prefix), "{rel}: {} prefix", t.name);
                let local = model.local_name(id).expect("local name");
                assert_eq!(format!("{}{local}", c.prefix), t.name, "{rel}: local name");
                assert!(
                    local.starts_with(&layer.name),
                    "{rel}: {} not under layer {}",
                    t.name,
                    layer.name
                );
                assert_eq!(model.find(&c.name, local), Some(id), "{rel}: lookup of {local}");
                lbytes += t.len;
            }
            assert!(layer.tensors.windows(2).all(|w| w[0] < w[1]), "{rel}: header order");
            assert_eq!(layer.bytes, lbytes, "{rel}: {}/{} bytes", c.name, layer.name);
            cbytes += lbytes;
            count += layer.tensors.len();
        }
        assert_eq!(c.bytes, cbytes, "{rel}: {} bytes", c.name);
        assert_eq!(c.tensor_count(), count, "{rel}: {} tensor count", c.name);
        for w in c.layers.windows(2) {
            assert_eq!(
                layer_order(&w[0].name, &w[1].name),
                Ordering::Less,
                "{rel}: {} layers out of order: {} then {}",
                c.name,
                w[0].name,
                w[1].name
            );
        }
        total += cbytes;
    }
    assert!(seen.iter().all(|&n| n == 1), "{rel}: every tensor in exactly one layer");
    assert_eq!(model.total_bytes(), total, "{rel}: total bytes");
}

fn component_names(model: &Model) -> Vec<&str> {
    model.components().iter().map(|c| c.name.as_str()).collect()
}

fn layer_names<'m>(model: &'m Model, component: &str) -> Vec<&'m str> {
    let c = model.component(component).unwrap_or_else(|| panic!("no component {component}"));
    c.layers.iter().map(|l| l.name.as_str()).collect()
}

/// Checks `component`'s layers: exactly the names in `all` (in any order), and the names of
/// `runs_in_order` appearing in that order, as a forward pass runs through them.
fn check_layers(model: &Model, component: &str, all: &[&str], runs_in_order: &[&str]) {
    let names = layer_names(model, component);
    let got: BTreeSet<&str> = names.iter().copied().collect();
    let want: BTreeSet<&str> = all.iter().copied().collect();
    assert_eq!(got, want, "{component}: layers (in order: {names:?})");
    assert_eq!(got.len(), names.len(), "{component}: layer names are unique");
    let pos = |l: &str| names.iter().position(|n| *n == l).expect("listed above");
    for w in runs_in_order.windows(2) {
        assert!(
            pos(w[0]) < pos(w[1]),
            "{component}: layer {} should stream before {}; order is {names:?}",
            w[0],
            w[1]
        );
    }
}

fn layer_size(model: &Model, component: &str, layer: &str) -> usize {
    let c = model.component(component).expect("component");
    let l = c.layers.iter().find(|l| l.name == layer).expect("layer");
    l.tensors.len()
}

#[test]
fn every_tensor_matches_what_python_wrote() {
    let expected = expected();
    assert!(expected.generator.contains_key("safetensors"), "writer version recorded");
    assert!(expected.generator.contains_key("numpy"), "numpy version recorded");
    let mut checked = BTreeSet::new();
    for rel in MODELS {
        let model = open(rel);
        check_structure(rel, &model);
        for file in check_against_expected(rel, &model, &expected) {
            assert!(checked.insert(file.clone()), "{file} belongs to two models");
        }
    }
    let listed: BTreeSet<String> = expected.files.keys().cloned().collect();
    assert_eq!(checked, listed, "every file in expected.json is opened by some model");
}

#[test]
fn expected_json_lists_every_safetensors_fixture() {
    fn walk(dir: &Path, out: &mut BTreeSet<String>, root: &Path) {
        for entry in std::fs::read_dir(dir).expect("read fixture dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out, root);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                let rel = path.strip_prefix(root).expect("under root");
                out.insert(rel.to_str().expect("UTF-8").to_string());
            }
        }
    }
    let root = fixtures_root();
    let mut on_disk = BTreeSet::new();
    walk(&root, &mut on_disk, &root);
    let listed: BTreeSet<String> = expected().files.keys().cloned().collect();
    assert_eq!(on_disk, listed);
}

#[test]
fn all_dtypes_cover_every_dtype_python_can_write() {
    let model = open("all_dtypes.safetensors");
    assert_eq!(model.kind(), SourceKind::SingleFile);
    assert_eq!(component_names(&model), ["model"]);
    let f4 = open("f4_packed.safetensors");
    let written: BTreeSet<Dtype> =
        model.tensors().iter().chain(f4.tensors()).map(|t| t.dtype).collect();
    // Everything but the MXFP6 types, which neither numpy nor ml_dtypes can hand the package.
    let all: BTreeSet<Dtype> =
        Dtype::ALL.into_iter().filter(|d| !matches!(d, Dtype::F6_E2M3 | Dtype::F6_E3M2)).collect();
    assert_eq!(written, all);

    let by_name = |name: &str| {
        let id = model.find("model", name).unwrap_or_else(|| panic!("no tensor {name}"));
        (&model.tensors()[id], model.tensor_bytes(id).expect("in range"))
    };
    // A scalar has shape [] and one element.
    let (t, bytes) = by_name("f64_scalar");
    assert_eq!(t.shape, Vec::<u64>::new());
    let value = f64::from_le_bytes(bytes.try_into().expect("8 bytes"));
    assert_eq!(value, std::f64::consts::PI);
    let (t, bytes) = by_name("i32_scalar");
    assert_eq!(t.shape, Vec::<u64>::new());
    assert_eq!(i32::from_le_bytes(bytes.try_into().expect("4 bytes")), -123_456_789);
    // Zero-size tensors have no bytes.
    for name in ["f32_empty", "i64_empty"] {
        let (t, bytes) = by_name(name);
        assert!(t.shape.contains(&0), "{name}");
        assert_eq!((t.len, bytes.len()), (0, 0), "{name}");
    }
    // The safetensors crate agrees on every tensor, byte for byte.
    let raw = std::fs::read(fixture("all_dtypes.safetensors")).expect("read");
    let theirs = safetensors::SafeTensors::deserialize(&raw).expect("safetensors crate parses it");
    assert_eq!(theirs.len(), model.tensors().len());
    for (id, t) in model.tensors().iter().enumerate() {
        let view = theirs.tensor(&t.name).expect("present for the crate");
        assert_eq!(view.data(), model.tensor_bytes(id).expect("in range"), "{}", t.name);
    }

    // F4 packs two elements a byte: Python was given 2x3 bytes and wrote shape [2, 6].
    let id = f4.find("model", "weight").expect("weight");
    let t = &f4.tensors()[id];
    assert_eq!((t.dtype, t.shape.as_slice(), t.len), (Dtype::F4, &[2u64, 6][..], 6));
}

#[test]
fn sharded_by_folder_and_by_index_are_one_model() {
    let by_dir = open("sharded");
    let by_index = open("sharded/model.safetensors.index.json");
    assert_eq!(by_dir.kind(), SourceKind::Sharded);
    assert_eq!(by_index.kind(), SourceKind::Sharded);
    assert_eq!(by_dir.key(), by_index.key());
    assert_eq!(by_dir.key().files.len(), 2);
    assert_eq!(by_dir.files().len(), 2);
    let shards: BTreeSet<String> = (0..2).map(|fi| relative_file(&by_dir, fi)).collect();
    let want: BTreeSet<String> =
        ["sharded/model-00001-of-00002.safetensors", "sharded/model-00002-of-00002.safetensors"]
            .map(String::from)
            .into();
    assert_eq!(shards, want);

    // The index says where each tensor lives and how many bytes there are in all.
    let text = std::fs::read_to_string(fixture("sharded/model.safetensors.index.json"))
        .expect("read index");
    let index: serde_json::Value = serde_json::from_str(&text).expect("index parses");
    let total = index["metadata"]["total_size"].as_u64().expect("total_size");
    assert_eq!(by_dir.total_bytes(), total);
    let weight_map = index["weight_map"].as_object().expect("weight_map");
    assert_eq!(weight_map.len(), by_dir.tensors().len());
    for (id, t) in by_dir.tensors().iter().enumerate() {
        let shard = weight_map[&t.name].as_str().expect("shard name");
        assert_eq!(relative_file(&by_dir, t.file), format!("sharded/{shard}"), "{}", t.name);
        assert_eq!(by_index.tensor_bytes(id), by_dir.tensor_bytes(id), "{}", t.name);
    }

    // No checkpoint prefix: one component, one layer per decoder layer, embeddings first and
    // the final norm and head last.
    assert_eq!(component_names(&by_dir), ["model"]);
    let llm = [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.layers.3",
        "model.norm",
        "lm_head",
    ];
    check_layers(&by_dir, "model", &llm, &llm);
    for i in 0..4 {
        assert_eq!(layer_size(&by_dir, "model", &format!("model.layers.{i}")), 9);
    }
    let q3 = by_dir.find("model", "model.layers.3.self_attn.q_proj.weight").expect("q_proj");
    let file = relative_file(&by_dir, by_dir.tensors()[q3].file);
    assert_eq!(file, "sharded/model-00002-of-00002.safetensors");
    let up0 = by_dir.find("model", "model.layers.0.mlp.up_proj.weight").expect("up_proj");
    let file = relative_file(&by_dir, by_dir.tensors()[up0].file);
    assert_eq!(file, "sharded/model-00001-of-00002.safetensors");
    assert_eq!(by_dir.tensors()[up0].shape, [16, 8]);
}

#[test]
fn sd_tiny_is_a_diffusers_pipeline_with_sensible_layers() {
    let model = open("sd_tiny");
    assert_eq!(model.kind(), SourceKind::Diffusers);
    // Pipeline order; tokenizer and scheduler have no weights, safety_checker is [null, null].
    assert_eq!(component_names(&model), ["text_encoder", "unet", "vae"]);
    assert!(model.components().iter().all(|c| c.prefix.is_empty()));
    let files: Vec<String> = (0..model.files().len()).map(|fi| relative_file(&model, fi)).collect();
    assert_eq!(
        files,
        [
            "sd_tiny/text_encoder/model.safetensors",
            "sd_tiny/unet/diffusion_pytorch_model.safetensors",
            "sd_tiny/vae/diffusion_pytorch_model.safetensors",
        ]
    );
    for (ci, c) in model.components().iter().enumerate() {
        for l in &c.layers {
            assert!(l.tensors.iter().all(|&id| model.tensors()[id].file == ci), "{}", c.name);
        }
    }

    let clip = [
        "text_model.embeddings",
        "text_model.encoder.layers.0",
        "text_model.encoder.layers.1",
        "text_model.final_layer_norm",
    ];
    check_layers(&model, "text_encoder", &clip, &clip);
    assert_eq!(layer_size(&model, "text_encoder", "text_model.encoder.layers.0"), 16);
    assert_eq!(layer_size(&model, "text_encoder", "text_model.encoder.layers.1"), 16);
    // token and position embeddings plus the int64 position_ids buffer.
    assert_eq!(layer_size(&model, "text_encoder", "text_model.embeddings"), 3);

    check_layers(
        &model,
        "unet",
        &[
            "conv_in",
            "conv_norm_out",
            "conv_out",
            "down_blocks.0",
            "down_blocks.1",
            "mid_block",
            "time_embedding",
            "up_blocks.0",
            "up_blocks.1",
        ],
        &[
            "time_embedding",
            "down_blocks.0",
            "down_blocks.1",
            "mid_block",
            "up_blocks.0",
            "up_blocks.1",
            "conv_norm_out",
            "conv_out",
        ],
    );
    check_layers(&model, "unet", &layer_names(&model, "unet"), &["conv_in", "down_blocks.0"]);
    check_layers(
        &model,
        "unet",
        &layer_names(&model, "unet"),
        &["down_blocks.1", "mid_block", "up_blocks.0"],
    );
    let unet = model.component("unet").expect("unet");
    let q = model
        .find("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")
        .expect("to_q");
    let t = &model.tensors()[q];
    assert_eq!(unet.layers[t.layer].name, "down_blocks.0");
    assert_eq!((t.dtype, t.shape.as_slice()), (Dtype::F16, &[4u64, 4][..]));
    let conv = model.find("unet", "down_blocks.1.resnets.0.conv1.weight").expect("conv1");
    assert_eq!(model.tensors()[conv].shape, [6, 4, 3, 3]);

    check_layers(
        &model,
        "vae",
        &[
            "decoder.conv_in",
            "decoder.conv_norm_out",
            "decoder.conv_out",
            "decoder.mid_block",
            "decoder.up_blocks.0",
            "encoder.conv_in",
            "encoder.conv_norm_out",
            "encoder.conv_out",
            "encoder.down_blocks.0",
            "encoder.mid_block",
            "post_quant_conv",
            "quant_conv",
        ],
        &[
            "encoder.conv_in",
            "encoder.down_blocks.0",
            "encoder.mid_block",
            "encoder.conv_norm_out",
            "encoder.conv_out",
            "quant_conv",
            "post_quant_conv",
            "decoder.conv_in",
            "decoder.mid_block",
            "decoder.up_blocks.0",
            "decoder.conv_norm_out",
            "decoder.conv_out",
        ],
    );
    let qc = model.find("vae", "quant_conv.weight").expect("quant_conv");
    assert_eq!(model.tensors()[qc].dtype, Dtype::F32);
}

/// What `ferryctl inspect tests/fixtures/py/sd_tiny` prints: every component and every layer,
/// components in pipeline order.
#[test]
fn inspect_report_of_sd_tiny_lists_components_and_layers() {
    let model = open("sd_tiny");
    let text = ferry::inspect::render(&ferry::inspect::report(&model, false));
    let mut at = 0;
    for c in model.components() {
        let found = text[at..]
            .find(&format!("{} (", c.name))
            .unwrap_or_else(|| panic!("no section for {} after byte {at}:\n{text}", c.name));
        at += found;
        for l in &c.layers {
            let found = text[at..].find(&l.name).unwrap_or_else(|| {
                panic!("{}: layer {} missing or out of order:\n{text}", c.name, l.name)
            });
            at += found + l.name.len();
        }
    }
    assert_eq!(component_names(&model), ["text_encoder", "unet", "vae"]);
}

#[test]
fn store_shares_one_sd_tiny() {
    let store = Store::new();
    let a = store.open(fixture("sd_tiny")).expect("open folder");
    let b = store.open(fixture("sd_tiny")).expect("open folder again");
    let c = store.open(fixture("sd_tiny/model_index.json")).expect("open model_index.json");
    assert!(Arc::ptr_eq(&a, &b));
    assert!(Arc::ptr_eq(&a, &c));
    assert_eq!(store.open_count(), 1);
    let sharded = store.open(fixture("sharded")).expect("open sharded");
    let by_index = store.open(fixture("sharded/model.safetensors.index.json")).expect("open index");
    assert!(Arc::ptr_eq(&sharded, &by_index));
    assert_eq!(store.open_count(), 2);
    drop((a, b, c, sharded, by_index));
    assert_eq!(store.open_count(), 0);
}

#[test]
fn sdxl_checkpoint_splits_into_components_by_prefix() {
    let model = open("sdxl_checkpoint.safetensors");
    assert_eq!(model.kind(), SourceKind::SingleFile);
    let comps: Vec<(&str, &str)> =
        model.components().iter().map(|c| (c.name.as_str(), c.prefix.as_str())).collect();
    assert_eq!(
        comps,
        [
            ("text_encoder", "conditioner.embedders.0."),
            ("text_encoder_2", "conditioner.embedders.1."),
            ("unet", "model.diffusion_model."),
            ("vae", "first_stage_model."),
            ("extra", ""),
        ]
    );

    check_layers(
        &model,
        "unet",
        &[
            "input_blocks.0",
            "input_blocks.1",
            "label_emb.0",
            "middle_block.0",
            "middle_block.1",
            "middle_block.2",
            "out.0",
            "out.2",
            "output_blocks.2",
            "time_embed.0",
            "time_embed.2",
        ],
        &[
            "time_embed.0",
            "time_embed.2",
            "input_blocks.0",
            "input_blocks.1",
            "middle_block.0",
            "middle_block.1",
            "middle_block.2",
            "output_blocks.2",
            "out.0",
            "out.2",
        ],
    );
    let unet = model.component("unet").expect("unet");
    let id = model.find("unet", "input_blocks.1.0.in_layers.2.weight").expect("in_layers.2");
    assert_eq!(
        model.tensors()[id].name,
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    );
    assert_eq!(model.local_name(id), Some("input_blocks.1.0.in_layers.2.weight"));
    assert_eq!(unet.layers[model.tensors()[id].layer].name, "input_blocks.1");
    assert_eq!(layer_size(&model, "unet", "input_blocks.1"), 3);

    // The encoder layer is a layer of its own; how the embeddings and the final norm around it
    // are grouped is checked by a test below.
    assert!(
        layer_names(&model, "text_encoder").contains(&"transformer.text_model.encoder.layers.0")
    );
    let id = model
        .find("text_encoder", "transformer.text_model.encoder.layers.0.mlp.fc1.weight")
        .expect("fc1");
    assert_eq!(
        model.tensors()[id].name,
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    );
    // open_clip names: `text_projection` is a parameter directly under the `model` wrapper, so it
    // is a layer of its own. (Their order is checked by a test below.)
    check_layers(
        &model,
        "text_encoder_2",
        &["model.ln_final", "model.text_projection", "model.transformer.resblocks.0"],
        &[],
    );
    let id = model
        .find("text_encoder_2", "model.transformer.resblocks.0.attn.in_proj_weight")
        .expect("in_proj");
    assert_eq!(
        model.tensors()[id].name,
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    );
    assert_eq!(model.tensors()[id].shape, [24, 8]);

    let vae = ["encoder.conv_in", "encoder.mid_block", "quant_conv", "decoder.conv_out"];
    check_layers(&model, "vae", &vae, &vae);
    // Tensors outside every known prefix keep their full names in `extra`.
    check_layers(&model, "extra", &["alphas_cumprod", "denoiser"], &[]);
    let sigmas = model.find("extra", "denoiser.sigmas").expect("sigmas");
    assert_eq!(model.local_name(sigmas), Some("denoiser.sigmas"));
    assert_eq!(model.tensors()[sigmas].dtype, Dtype::F32);
}

/// SDXL's second text encoder (open_clip) runs its resblocks, then `ln_final`, then multiplies
/// by `text_projection`: the automatic order must stream them in that order (regression: once
/// `ln_final` sorted first and the bare `text_projection` fell into a layer named `model`).
#[test]
fn sdxl_text_encoder_2_streams_in_execution_order() {
    let model = open("sdxl_checkpoint.safetensors");
    let names = layer_names(&model, "text_encoder_2");
    check_layers(
        &model,
        "text_encoder_2",
        &names,
        &["model.transformer.resblocks.0", "model.ln_final"],
    );
}

/// In a single-file checkpoint the CLIP text encoder's local names keep a `transformer.` segment
/// (`conditioner.embedders.0.transformer.text_model.…`, and `cond_stage_model.transformer.
/// text_model.…` in SD 1.x). Embeddings and the final norm must still be separate layers, in
/// pass order around the encoder layers (regression: they once shared `transformer.text_model`).
#[test]
fn sdxl_text_encoder_final_norm_streams_after_the_encoder_layers() {
    let model = open("sdxl_checkpoint.safetensors");
    let layer_of = |local: &str| {
        let id = model.find("text_encoder", local).expect("tensor");
        let c = model.component("text_encoder").expect("text_encoder");
        c.layers[model.tensors()[id].layer].name.clone()
    };
    let embeddings = layer_of("transformer.text_model.embeddings.token_embedding.weight");
    let encoder = layer_of("transformer.text_model.encoder.layers.0.mlp.fc1.weight");
    let final_norm = layer_of("transformer.text_model.final_layer_norm.weight");
    assert_ne!(embeddings, final_norm, "embeddings and final norm share a layer");
    check_layers(
        &model,
        "text_encoder",
        &layer_names(&model, "text_encoder"),
        &[&embeddings, &encoder, &final_norm],
    );
}
