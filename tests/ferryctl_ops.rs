//! `ferryctl load --warm` and `ferryctl lora` against the real ferryd (host backend).

use ferry::Dtype;
use ferry_tests::ferryd::{Ferryd, ferryctl, stdout_ok};
use ferry_tests::{Tensor, write_file};

fn f32_tensor(name: &str, shape: &[usize], v: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|_| v.to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data }
}

#[test]
fn load_warm_streams_every_layer_and_lora_reports_unmatched_modules_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).expect("root");
    let model = root.join("m.safetensors");
    let tensors: Vec<Tensor> =
        (0..4).map(|b| f32_tensor(&format!("blocks.{b}.proj.weight"), &[8, 4], 0.5)).collect();
    write_file(&model, &tensors).expect("model");
    let lora = root.join("l.safetensors");
    write_file(
        &lora,
        &[
            f32_tensor("blocks.1.proj.lora_A.weight", &[2, 4], 0.25),
            f32_tensor("blocks.1.proj.lora_B.weight", &[8, 2], 0.25),
            f32_tensor("blocks.9.nowhere.lora_A.weight", &[2, 4], 0.25),
            f32_tensor("blocks.9.nowhere.lora_B.weight", &[8, 2], 0.25),
        ],
    )
    .expect("lora");
    let socket = dir.path().join("s.sock");
    let _daemon = Ferryd::start(
        &socket,
        [
            "--device".as_ref(),
            "host".as_ref(),
            "--host-memory".as_ref(),
            "16777216".as_ref(),
            "--model-root".as_ref(),
            root.as_os_str(),
            "--preload".as_ref(),
            model.as_os_str(),
        ],
    );

    // load --warm: every layer streamed once; the bytes match the layer table.
    let m = model.to_str().expect("utf-8");
    let v: serde_json::Value =
        serde_json::from_str(&stdout_ok(&ferryctl(&socket, &["load", m, "--warm", "--json"])))
            .expect("json");
    let total: u64 = v["components"]
        .as_array()
        .expect("components")
        .iter()
        .flat_map(|c| c["layers"].as_array().expect("layers").iter())
        .map(|l| l["bytes"].as_u64().expect("bytes"))
        .sum();
    assert_eq!(total, 4 * 8 * 4 * 4);
    assert_eq!(v["warmed_bytes"], total, "{v}");
    let text = stdout_ok(&ferryctl(&socket, &["load", m, "--warm"]));
    assert!(text.contains("warmed: 512 B streamed through the device"), "{text}");
    let stats: serde_json::Value =
        serde_json::from_str(&stdout_ok(&ferryctl(&socket, &["stats", "--json"])))
            .expect("stats json");
    assert!(stats["acquires"].as_u64().expect("acquires") >= 8, "{stats}");

    // lora: the matched module merges one tensor; the other is reported by name.
    let spec = format!("{}:0.5", lora.to_str().expect("utf-8"));
    let v: serde_json::Value = serde_json::from_str(&stdout_ok(&ferryctl(
        &socket,
        &["lora", m, "--lora", &spec, "--json"],
    )))
    .expect("lora json");
    assert_eq!(v["merged_tensors"], 1, "{v}");
    assert_eq!(v["loras"][0]["strength"], 0.5, "{v}");
    let unmatched = v["loras"][0]["unmatched"].as_array().expect("unmatched");
    assert_eq!(unmatched.len(), 1, "{v}");
    assert!(unmatched[0].as_str().expect("name").contains("blocks.9.nowhere"), "{v}");
    let text = stdout_ok(&ferryctl(&socket, &["lora", m, "--lora", &spec, "--mode", "fuse"]));
    assert!(text.contains("1 tensor(s) receive a delta"), "{text}");
    assert!(text.contains("unmatched: blocks.9.nowhere"), "{text}");

    // A LoRA outside the model roots is refused, naming it.
    let outside = dir.path().join("outside.safetensors");
    std::fs::copy(&lora, &outside).expect("copy");
    let out = ferryctl(&socket, &["lora", m, "--lora", outside.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outside.safetensors"), "{err}");
}
