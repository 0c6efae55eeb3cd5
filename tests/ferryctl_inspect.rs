//! `ferryctl inspect` end to end: the binary on a diffusers folder, a sharded set and bad input.

use std::process::Command;

use ferry_tests::{cargo_bin, llm_like, write_diffusers, write_sharded};

fn ferryctl(args: &[&str]) -> std::process::Output {
    Command::new(cargo_bin("ferryctl")).args(args).output().expect("run ferryctl")
}

#[test]
fn inspect_diffusers_folder_shows_components_and_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_diffusers(dir.path()).expect("write pipeline");
    let out = ferryctl(&["inspect", dir.path().to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.contains("diffusers pipeline, 3 files"), "{text}");
    for line in [
        "text_encoder (4 layers)",
        "unet (9 layers)",
        "vae (4 layers)",
        "text_model.encoder.layers.1",
        "down_blocks.2",
        "mid_block",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // The components come in pipeline order.
    let pos = |s: &str| text.find(&format!("\n{s} (")).expect(s);
    assert!(pos("text_encoder") < pos("unet") && pos("unet") < pos("vae"));
}

#[test]
fn inspect_json_lists_every_tensor_with_its_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tensors = llm_like(3, 2, 64);
    let index = write_sharded(dir.path(), "model", &tensors, 2).expect("write shards");
    let out = ferryctl(&["inspect", "--json", "--tensors", index.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["kind"], "sharded");
    assert_eq!(v["files"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["tensor_count"], tensors.len());
    let layers: Vec<&str> = v["components"][0]["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        layers,
        [
            "model.embed_tokens",
            "model.layers.0",
            "model.layers.1",
            "model.layers.2",
            "model.norm",
            "lm_head"
        ]
    );
    let listed = v["tensors"].as_array().expect("tensors");
    assert_eq!(listed.len(), tensors.len());
    let q = listed.iter().find(|t| t["name"] == "model.layers.2.w1.weight").expect("tensor listed");
    assert_eq!(q["layer"], "model.layers.2");
    assert_eq!(q["dtype"], "F16");
    assert_eq!(q["bytes"], 64);
}

#[test]
fn inspect_with_declared_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = write_sharded(dir.path(), "model", &llm_like(2, 2, 16), 1).expect("write");
    let out = ferryctl(&[
        "inspect",
        "--json",
        "--layers",
        "model=model.embed_tokens,model.layers.",
        index.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let names: Vec<&str> = v["components"][0]["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["model.embed_tokens", "model.layers.", "model.norm", "lm_head"]);

    let out = ferryctl(&["inspect", "--layers", "model=nope.", index.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("layer prefix \"nope.\" matches no tensor"), "{err}");
}

#[test]
fn inspect_reports_bad_input_without_panicking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"\x05\x00\x00\x00\x00\x00\x00\x00{oops").expect("write");
    let out = ferryctl(&["inspect", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("ferryctl: error: "), "{err}");
    assert!(err.contains("bad.safetensors") && err.contains("not valid JSON"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
