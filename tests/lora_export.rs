//! `ferryctl export`: LoRAs fused into a base model, byte for byte where nothing is adapted.

use std::path::Path;
use std::process::Command;

use ferry::Dtype;
use ferry::lora::math::{self, Delta, Factor};
use ferry_tests::{Tensor, cargo_bin, write_diffusers, write_file};

fn f32_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| f(i).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data }
}

fn f16_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| half::f16::from_f32(f(i)).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F16, shape: shape.to_vec(), data }
}

/// A base of two 16×8 f16 projections and a bias, and a PEFT LoRA (rank 4) for one of them
/// plus an adapter for a module the base does not have.
fn base_and_lora(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.safetensors");
    write_file(
        &base,
        &[
            f16_tensor("layers.0.q.weight", &[16, 8], |i| (i as f32 * 0.37).sin()),
            f16_tensor("layers.0.k.weight", &[16, 8], |i| (i as f32 * 0.11).cos()),
            f32_tensor("layers.0.q.bias", &[16], |i| i as f32),
        ],
    )
    .expect("base");
    let lora = dir.join("lora.safetensors");
    write_file(
        &lora,
        &[
            f32_tensor("base_model.model.layers.0.q.lora_A.weight", &[4, 8], |i| {
                ((i % 7) as f32 - 3.0) * 0.05
            }),
            f32_tensor("base_model.model.layers.0.q.lora_B.weight", &[16, 4], |i| {
                ((i % 5) as f32 - 2.0) * 0.1
            }),
            f32_tensor("base_model.model.layers.9.v.lora_A.weight", &[4, 8], |_| 0.1),
            f32_tensor("base_model.model.layers.9.v.lora_B.weight", &[16, 4], |_| 0.1),
        ],
    )
    .expect("lora");
    (base, lora)
}

fn ferryctl(args: &[&str]) -> std::process::Output {
    Command::new(cargo_bin("ferryctl")).args(args).output().expect("run ferryctl")
}

#[test]
fn export_merges_adapted_weights_and_copies_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base_path, lora_path) = base_and_lora(dir.path());
    let out = dir.path().join("fused.safetensors");
    let o = ferryctl(&[
        "export",
        base_path.to_str().expect("utf-8"),
        "--lora",
        &format!("{}:0.8", lora_path.display()),
        "-o",
        out.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("1 tensor(s) merged"), "{text}");
    assert!(
        text.contains("1 adapter(s) matched no tensor") && text.contains("layers.9.v"),
        "{text}"
    );

    let base = ferry::Model::open(&base_path).expect("base");
    let fused = ferry::Model::open(&out).expect("fused");
    let lora = ferry::Model::open(&lora_path).expect("lora");
    let find = |m: &ferry::Model, n: &str| m.find("model", n).expect(n);
    // Untouched tensors: the same bytes.
    for n in ["layers.0.k.weight", "layers.0.q.bias"] {
        assert_eq!(fused.tensor_bytes(find(&fused, n)), base.tensor_bytes(find(&base, n)), "{n}");
    }
    // The adapted weight: exactly what the merge computes (alpha absent = rank: scale 0.8).
    let factor = |m: &ferry::Model, n: &str| {
        let id = find(m, n);
        let t = &m.tensors()[id];
        (t.dtype, t.shape.clone(), m.tensor_bytes(id).expect("bytes").to_vec())
    };
    let (wd, ws, wb) = factor(&base, "layers.0.q.weight");
    let (ud, us, ub) = factor(&lora, "base_model.model.layers.0.q.lora_B.weight");
    let (dd, dsh, db) = factor(&lora, "base_model.model.layers.0.q.lora_A.weight");
    let expected = math::merge(
        "layers.0.q.weight",
        Factor { dtype: wd, shape: &ws, bytes: &wb },
        &[Delta {
            up: Factor { dtype: ud, shape: &us, bytes: &ub },
            down: Factor { dtype: dd, shape: &dsh, bytes: &db },
            mid: None,
            scale: math::scale(0.8, None, 4),
        }],
    )
    .expect("merge");
    let got = fused.tensor_bytes(find(&fused, "layers.0.q.weight")).expect("bytes");
    assert_eq!(got, expected.as_slice());
    assert_ne!(got, wb.as_slice(), "the LoRA must change the weight");
}

#[test]
fn strength_zero_reproduces_the_base_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base_path, lora_path) = base_and_lora(dir.path());
    let out = dir.path().join("same.safetensors");
    let base = ferry::Model::open(&base_path).expect("base");
    let lora = ferry::lora::format::load(&lora_path).expect("lora");
    ferry::lora::export::export_fused(&base, &[(lora, 0.0)], &out).expect("export");
    let fused = ferry::Model::open(&out).expect("fused");
    assert_eq!(fused.tensors().len(), base.tensors().len());
    for (id, t) in base.tensors().iter().enumerate() {
        let fid = fused.find("model", &t.name).expect("same names");
        assert_eq!(fused.tensors()[fid].dtype, t.dtype);
        assert_eq!(fused.tensors()[fid].shape, t.shape);
        assert_eq!(fused.tensor_bytes(fid), base.tensor_bytes(id), "{}", t.name);
    }
}

#[test]
fn export_of_a_diffusers_folder_keeps_its_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base_dir = dir.path().join("pipe");
    write_diffusers(&base_dir).expect("pipeline");
    let lora = dir.path().join("kohya.safetensors");
    write_file(
        &lora,
        &[
            f32_tensor(
                "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight",
                &[2, 8],
                |i| i as f32 * 0.01,
            ),
            f32_tensor(
                "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight",
                &[8, 2],
                |i| i as f32 * -0.02,
            ),
            f32_tensor("lora_unet_down_blocks_1_attentions_0_proj_in.alpha", &[], |_| 1.0),
        ],
    )
    .expect("lora");
    let out = dir.path().join("fused");
    let o = ferryctl(&[
        "export",
        base_dir.to_str().expect("utf-8"),
        "--lora",
        lora.to_str().expect("utf-8"),
        "-o",
        out.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(report["merged"], 1);
    assert!(out.join("model_index.json").is_file());
    let fused = ferry::Model::open(&out).expect("the export opens as a pipeline");
    let base = ferry::Model::open(&base_dir).expect("base");
    let names =
        |m: &ferry::Model| m.components().iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fused), names(&base));
    let n = "down_blocks.1.attentions.0.proj_in.weight";
    assert_ne!(
        fused.tensor_bytes(fused.find("unet", n).expect("t")),
        base.tensor_bytes(base.find("unet", n).expect("t"))
    );
}

#[test]
fn export_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base_path, _) = base_and_lora(dir.path());
    let missing = dir.path().join("nope.safetensors");
    let out = dir.path().join("x.safetensors");
    let o = ferryctl(&[
        "export",
        base_path.to_str().expect("utf-8"),
        "--lora",
        missing.to_str().expect("utf-8"),
        "-o",
        out.to_str().expect("utf-8"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nope.safetensors"), "{err}");
    assert!(!out.exists());
}
