//! Policy names everywhere: `auto` decided from the device's memory (4 GiB and 80 GiB host
//! "devices"), the presets `lowvram` / `medvram` / `model` resolving to their policies in the
//! engine, through ferryd's flags and config file, and through ferryctl.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry::Dtype;
use ferry::device::{ClientDone, DeviceChoice, DeviceConfig};
use ferry::engine::policy::{Origin, PolicyChoice, PolicySpec, Preset, Threshold};
use ferry::engine::{Engine, EngineConfig, ModelId};
use ferry::protocol::{Policy, Preset as WirePreset, Threshold as WireThreshold};
use ferry_tests::ferryd::ferryctl;
use ferry_tests::{Tensor, cargo_bin, write_file};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A host engine whose "device" has `device_total` bytes, of which the engine uses 8 MiB.
fn engine_on(device_total: u64, config: EngineConfig) -> Engine {
    Engine::new(EngineConfig {
        device: DeviceChoice::Host,
        device_config: DeviceConfig { host_memory: device_total, ..DeviceConfig::default() },
        budget: Some(8 * MIB),
        staging_slots: 2,
        staging_slot_bytes: 64 << 10,
        acquire_timeout: Duration::from_secs(5),
        ..config
    })
    .expect("host engine")
}

/// A checkpoint with three components (text encoder, unet, vae), each of three 16 KiB layers.
fn checkpoint(dir: &Path) -> PathBuf {
    let mut tensors = Vec::new();
    for (prefix, block) in [
        ("cond_stage_model.transformer.text_model.encoder.layers", 3),
        ("model.diffusion_model.input_blocks", 3),
        ("first_stage_model.decoder.up", 3),
    ] {
        for b in 0..block {
            tensors.push(Tensor::patterned(format!("{prefix}.{b}.w.weight"), Dtype::U8, &[16384]));
        }
    }
    let path = dir.join("ckpt.safetensors");
    write_file(&path, &tensors).expect("write checkpoint");
    path
}

/// Acquires and releases every layer of every component once, in pipeline order.
fn pass(e: &Engine, id: ModelId) {
    let model = e.model(id).expect("model");
    for c in model.components() {
        for l in 0..c.layers.len() {
            let lease = e.acquire(id, &c.name, l).expect("acquire");
            lease.wait_ready().expect("ready");
            e.release(lease, ClientDone::Now).expect("release");
        }
    }
}

fn layer_count(e: &Engine, id: ModelId) -> usize {
    e.model(id).expect("model").components().iter().map(|c| c.layers.len()).sum()
}

#[test]
fn auto_is_sequential_on_a_4_gib_device_and_balanced_on_80_gib() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = checkpoint(dir.path());

    // 4 GiB: sequential; nothing kept, at most the double-buffering window on the device.
    let e = engine_on(4 * GIB, EngineConfig::default());
    let small = e.default_policy();
    assert_eq!(small.spec, PolicySpec::Sequential { lookahead: 1 });
    assert_eq!(small.origin, Origin::Auto { device_total: 4 * GIB, auto_sequential_max: 4 * GIB });
    assert_eq!(small.to_string(), "sequential (auto: device 4.0 GiB <= 4.0 GiB; lookahead 1)");
    let id = e.open_model(&path).expect("open");
    let before = e.policies(id).expect("policies");
    assert_eq!((before.model, before.set, before.active), (small, false, false));
    for _ in 0..2 {
        pass(&e, id);
    }
    let after = e.policies(id).expect("policies");
    assert_eq!((after.model, after.set, after.active), (small, false, true));
    assert!(e.kept_layers(id).expect("kept").is_empty());
    assert!(e.resident_layers(id).expect("resident").len() <= 2);
    assert!(e.stats().evictions > 0, "sequential streams: {:?}", e.stats());

    // 80 GiB: balanced at 75% of the device, so this small model stays whole.
    let e = engine_on(80 * GIB, EngineConfig::default());
    let big = e.default_policy();
    assert_eq!(big.spec, PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) });
    assert_eq!(big.alias(), Some("auto"));
    assert_eq!(
        big.to_string(),
        "balanced (auto: device 80.0 GiB > 4.0 GiB; threshold 75% of device)"
    );
    let id = e.open_model(&path).expect("open");
    pass(&e, id);
    assert_eq!(e.policies(id).expect("policies").model, big);
    assert_eq!(e.policies(id).expect("policies").to_string(), big.to_string());
    assert_eq!(e.kept_layers(id).expect("kept").len(), layer_count(&e, id));
    let s = e.stats();
    assert_eq!((s.loads, s.evictions), (layer_count(&e, id) as u64, 0), "{s:?}");

    // The boundary: one byte over 4 GiB is balanced.
    let e = engine_on(4 * GIB + 1, EngineConfig::default());
    assert_eq!(e.default_policy().name(), "balanced");

    // The threshold is configurable: with 100 GiB, an 80 GiB device is "small".
    let e =
        engine_on(80 * GIB, EngineConfig { auto_sequential_max: 100 * GIB, ..Default::default() });
    let r = e.default_policy();
    assert_eq!(r.spec, PolicySpec::Sequential { lookahead: 1 });
    assert_eq!(r.to_string(), "sequential (auto: device 80.0 GiB <= 100.0 GiB; lookahead 1)");
}

#[test]
fn auto_can_be_asked_for_and_replaces_an_explicit_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = checkpoint(dir.path());
    let e = engine_on(80 * GIB, EngineConfig::default());
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, None, PolicySpec::Sequential { lookahead: 0 }).expect("sequential");
    let p = e.policies(id).expect("policies");
    assert_eq!((p.model.origin, p.set, p.active), (Origin::Explicit, true, true));
    assert_eq!(p.to_string(), "sequential (lookahead 0)");
    e.set_residency(id, None, PolicyChoice::Auto).expect("auto");
    let p = e.policies(id).expect("policies");
    assert_eq!(p.model.spec, PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) });
    assert!(matches!(p.model.origin, Origin::Auto { .. }));
    // Set explicitly, so it is in force already: balanced loads its resident set at once.
    assert_eq!(e.kept_layers(id).expect("kept").len(), layer_count(&e, id));
}

#[test]
fn a_default_policy_other_than_auto_applies_to_models_without_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = checkpoint(dir.path());
    let e = engine_on(
        80 * GIB,
        EngineConfig { default_policy: "lowvram".parse().expect("lowvram"), ..Default::default() },
    );
    assert_eq!(e.default_policy().to_string(), "sequential (preset lowvram; lookahead 1)");
    let id = e.open_model(&path).expect("open");
    pass(&e, id);
    assert!(e.kept_layers(id).expect("kept").is_empty());
    assert!(e.resident_layers(id).expect("resident").len() <= 2);
}

#[test]
fn presets_resolve_to_their_policies_in_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = checkpoint(dir.path());
    let cases = [
        ("lowvram", PolicySpec::Sequential { lookahead: 1 }, Some("lowvram")),
        ("medvram", PolicySpec::Component, Some("medvram")),
        ("model", PolicySpec::Component, Some("model")),
        ("LowVRAM", PolicySpec::Sequential { lookahead: 1 }, Some("lowvram")),
        ("sequential", PolicySpec::Sequential { lookahead: 1 }, None),
        ("component", PolicySpec::Component, None),
        ("none", PolicySpec::None, None),
        ("balanced", PolicySpec::Balanced { threshold: Threshold::Fraction(0.75) }, None),
        ("lru", PolicySpec::Lru { threshold: Threshold::Fraction(0.75) }, None),
    ];
    for (name, spec, alias) in cases {
        let e = engine_on(80 * GIB, EngineConfig::default());
        let id = e.open_model(&path).expect("open");
        let choice: PolicyChoice = name.parse().expect(name);
        e.set_residency(id, None, choice).expect(name);
        let p = e.policies(id).expect("policies");
        assert_eq!((p.model.spec, p.model.alias()), (spec, alias), "{name}");
        assert!(p.set && p.active, "{name}");
        pass(&e, id);
        let resident = e.resident_layers(id).expect("resident");
        match spec {
            // Whole components: after a pass the last component (vae) is there, all of it.
            PolicySpec::Component => {
                assert!(resident.iter().filter(|(c, _)| c == "vae").count() == 3, "{name}");
            }
            PolicySpec::Sequential { .. } => assert!(resident.len() <= 2, "{name}: {resident:?}"),
            _ => assert_eq!(resident.len(), 9, "{name}"),
        }
    }

    // A preset for one component: shown beside the model's own.
    let e = engine_on(80 * GIB, EngineConfig::default());
    let id = e.open_model(&path).expect("open");
    e.set_residency(id, Some("vae"), Preset::LowVram).expect("vae lowvram");
    e.set_residency(id, None, "medvram".parse::<PolicyChoice>().expect("medvram"))
        .expect("medvram");
    let p = e.policies(id).expect("policies");
    assert_eq!(p.components.len(), 1);
    assert_eq!(p.components[0].0, "vae");
    assert_eq!(p.components[0].1.spec, PolicySpec::Sequential { lookahead: 1 });
    assert_eq!(
        p.to_string(),
        "component (preset medvram); vae: sequential (preset lowvram; lookahead 1)"
    );
    pass(&e, id);
}

// ---- ferryd: --default-policy, --auto-sequential-max, and the config file ----

/// Runs `ferryd --check` on a host device of `host_memory` bytes; returns its output.
fn ferryd_check(config: &Path, host_memory: u64, extra: &[&str]) -> Output {
    Command::new(cargo_bin("ferryd"))
        .args(["--check", "--device", "host", "--budget", "16777216", "--log", "info"])
        .arg("--host-memory")
        .arg(host_memory.to_string())
        .arg("--config")
        .arg(config)
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ferryd")
}

/// The resolved default policy ferryd logged at start-up.
fn logged_default(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferryd --check failed ({:?}):\n{err}", out.status);
    let line = err
        .lines()
        .find(|l| l.contains("default residency policy"))
        .unwrap_or_else(|| panic!("no default policy line in\n{err}"));
    let (_, policy) = line.split_once(" policy=").unwrap_or_else(|| panic!("{line}"));
    policy.trim().to_string()
}

#[test]
fn ferryd_resolves_its_default_policy_from_flags_and_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").expect("write");

    let cases: [(u64, &[&str], &str); 8] = [
        (80 * GIB, &[], "balanced (auto: device 80.0 GiB > 4.0 GiB; threshold 75% of device)"),
        (4 * GIB, &[], "sequential (auto: device 4.0 GiB <= 4.0 GiB; lookahead 1)"),
        (
            80 * GIB,
            &["--default-policy", "auto"],
            "balanced (auto: device 80.0 GiB > 4.0 GiB; threshold 75% of device)",
        ),
        (80 * GIB, &["--default-policy", "lowvram"], "sequential (preset lowvram; lookahead 1)"),
        (4 * GIB, &["--default-policy", "medvram"], "component (preset medvram)"),
        (80 * GIB, &["--default-policy", "model"], "component (preset model)"),
        (80 * GIB, &["--default-policy", "none"], "none"),
        (
            80 * GIB,
            &["--auto-sequential-max", "107374182400"],
            "sequential (auto: device 80.0 GiB <= 100.0 GiB; lookahead 1)",
        ),
    ];
    for (memory, flags, want) in cases {
        let out = ferryd_check(&empty, memory, flags);
        assert_eq!(logged_default(&out), want, "{flags:?} on {memory}");
    }

    // The config file, and a flag over it.
    let config = dir.path().join("ferryd.toml");
    std::fs::write(&config, "default_policy = \"medvram\"\nauto_sequential_max = 1073741824\n")
        .expect("write");
    assert_eq!(logged_default(&ferryd_check(&config, 80 * GIB, &[])), "component (preset medvram)");
    assert_eq!(
        logged_default(&ferryd_check(&config, 2 * GIB, &["--default-policy", "auto"])),
        "balanced (auto: device 2.0 GiB > 1.0 GiB; threshold 75% of device)"
    );

    // Unknown names: a usage error naming the value and the choices, from the flag and the file.
    let out = ferryd_check(&empty, 80 * GIB, &["--default-policy", "turbo"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"turbo\"") && err.contains("lowvram") && err.contains("medvram"),
        "{err}"
    );
    std::fs::write(&config, "default_policy = \"lowram\"\n").expect("write");
    let out = ferryd_check(&config, 80 * GIB, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ferryd.toml") && err.contains("\"lowram\"") && err.contains("lowvram"),
        "{err}"
    );
}

// ---- ferryctl: --policy names and presets ----

/// Kills ferryd when the test ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `ferryctl load MODEL --json ARGS`: the policy ferryd now reports for the model.
fn load_policy(socket: &Path, model: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["load", model.to_str().expect("utf-8"), "--json"];
    all.extend_from_slice(args);
    let out = ferryctl(socket, &all);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["policy"], v["info"]["policy"], "sent and reported: {v}");
    v["policy"].clone()
}

fn wire(p: Policy) -> serde_json::Value {
    serde_json::to_value(p).expect("policy json")
}

#[test]
fn ferryctl_sends_presets_and_auto_over_the_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).expect("mkdir");
    let model = checkpoint(&root);
    let socket = dir.path().join("s.sock");
    let mut daemon = Daemon(
        Command::new(cargo_bin("ferryd"))
            .args(["--device", "host", "--host-memory", "67108864", "--budget", "16777216"])
            .arg("--config")
            .arg("/dev/null")
            .arg("--socket")
            .arg(&socket)
            .arg("--model-root")
            .arg(&root)
            .arg("--preload")
            .arg(&model)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ferryd"),
    );
    let start = Instant::now();
    while !socket.exists() {
        assert!(daemon.0.try_wait().expect("try_wait").is_none(), "ferryd exited");
        assert!(start.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    let seq = |lookahead| wire(Policy::Sequential { lookahead });
    let preset = |preset| wire(Policy::Preset { preset });
    let cases: [(&[&str], serde_json::Value); 9] = [
        (&["--policy", "lowvram"], preset(WirePreset::LowVram)),
        (&["--policy", "LOWVRAM", "--lookahead", "3"], seq(3)),
        (&["--policy", "medvram"], preset(WirePreset::MedVram)),
        (&["--policy", "model"], preset(WirePreset::Model)),
        (&["--policy", "auto"], wire(Policy::Auto)),
        (&["--policy", "sequential"], seq(1)),
        (&["--policy", "none"], wire(Policy::None)),
        (
            &["--policy", "balanced", "--threshold", "0.5"],
            wire(Policy::Balanced { threshold: WireThreshold::Fraction(0.5) }),
        ),
        (&["--policy", "lru"], wire(Policy::Lru { threshold: WireThreshold::Fraction(0.75) })),
    ];
    for (args, want) in cases {
        assert_eq!(load_policy(&socket, &model, args), want, "{args:?}");
    }

    let m = model.to_str().expect("utf-8");
    let fails = |args: &[&str], code: i32, wants: &[&str]| {
        let mut all = vec!["load", m];
        all.extend_from_slice(args);
        let out = ferryctl(&socket, &all);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for w in wants {
            assert!(err.contains(w), "{args:?}: missing {w:?} in {err}");
        }
    };
    fails(&["--policy", "medvram", "--lookahead", "2"], 1, &["--lookahead", "medvram"]);
    fails(&["--policy", "lowvram", "--threshold", "0.5"], 1, &["--threshold", "lowvram"]);
    fails(&["--policy", "auto", "--lookahead", "2"], 1, &["auto", "sequential or balanced"]);
    fails(&["--policy", "turbo"], 2, &["\"turbo\"", "lowvram", "medvram"]);
    // The last policy set stays: lru.
    assert_eq!(
        load_policy(&socket, &model, &["--policy", "lru"]),
        wire(Policy::Lru { threshold: WireThreshold::Fraction(0.75) })
    );
}
