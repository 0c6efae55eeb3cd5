//! Quantized checkpoints stream unchanged under every policy: fp8 (E4M3, E5M2 and the FNUZ
//! variants) with their scales, int8 with bitsandbytes' `SCB`, 4-bit weights packed in U8 with
//! `absmax` / `quant_map` / `quant_state` beside them, MX formats (F4, F6, E8M0 scales), and every
//! other safetensors dtype. Each tensor read back from a lease equals the file's bytes as the
//! `safetensors` crate (an independent reader) finds them, with the file's dtype and shape, and
//! every scale travels in the same layer as its weight.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use ferry::Dtype;
use ferry::device::{ClientDone, DeviceChoice, DeviceConfig};
use ferry::engine::policy::{PolicyChoice, PolicySpec, Threshold};
use ferry::engine::{Engine, EngineConfig, ModelId};
use ferry_tests::{Tensor, write_file};

/// A weight and the tensors that must travel with it (full names).
type Unit = Vec<String>;

/// Checkpoint prefixes of the three components, as a single-file SD-style checkpoint has them.
const TEXT: &str = "cond_stage_model.transformer.text_model.encoder.layers";
const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.decoder.up";

/// The checkpoint's tensors, and the units whose members must share a layer.
fn quantized_checkpoint() -> (Vec<Tensor>, Vec<Unit>) {
    let mut tensors = Vec::new();
    let mut units = Vec::new();
    let mut unit = |tensors: &mut Vec<Tensor>, members: Vec<(String, Dtype, Vec<usize>)>| {
        units.push(members.iter().map(|m| m.0.clone()).collect::<Vec<_>>());
        tensors.extend(members.into_iter().map(|(n, d, s)| Tensor::patterned(n, d, &s)));
    };
    // Text encoder: bitsandbytes int8 (I8 weight, F32 row scales `SCB`, a `weight_format` byte).
    for l in 0..3 {
        for proj in ["q_proj", "k_proj"] {
            let w = format!("{TEXT}.{l}.self_attn.{proj}");
            unit(
                &mut tensors,
                vec![
                    (format!("{w}.weight"), Dtype::I8, vec![64, 96]),
                    (format!("{w}.SCB"), Dtype::F32, vec![64]),
                    (format!("{w}.weight_format"), Dtype::U8, vec![]),
                ],
            );
        }
    }
    // UNet: fp8 with per-tensor scales (E4M3) and inverse block scales (E5M2), and bitsandbytes
    // nf4 (U8, two 4-bit values a byte) with its quant state nested under the weight.
    for b in 0..4 {
        let attn = format!("{UNET}input_blocks.{b}.1.transformer_blocks.0.attn1");
        unit(
            &mut tensors,
            vec![
                (format!("{attn}.to_q.weight"), Dtype::F8_E4M3, vec![128, 64]),
                (format!("{attn}.to_q.weight_scale"), Dtype::F32, vec![]),
                (format!("{attn}.to_q.input_scale"), Dtype::F32, vec![]),
            ],
        );
        unit(
            &mut tensors,
            vec![
                (format!("{attn}.to_k.weight"), Dtype::F8_E5M2, vec![128, 64]),
                (format!("{attn}.to_k.weight_scale_inv"), Dtype::F32, vec![1, 1]),
            ],
        );
        let ff = format!("{UNET}input_blocks.{b}.1.transformer_blocks.0.ff.net.2.weight");
        unit(
            &mut tensors,
            vec![
                (ff.clone(), Dtype::U8, vec![4096, 1]),
                (format!("{ff}.absmax"), Dtype::F32, vec![128]),
                (format!("{ff}.quant_map"), Dtype::F32, vec![16]),
                (format!("{ff}.quant_state.bitsandbytes__nf4"), Dtype::U8, vec![117]),
            ],
        );
    }
    // A bare parameter whose own name decides its layer, with its quant state nested under it
    // (it would land in a layer of its own without the companion rule).
    for p in 0..2 {
        let pe = format!("{UNET}pos_embeds.{p}");
        unit(
            &mut tensors,
            vec![
                (pe.clone(), Dtype::U8, vec![512]),
                (format!("{pe}.absmax"), Dtype::F32, vec![16]),
                (format!("{pe}.quant_map"), Dtype::F32, vec![16]),
            ],
        );
    }
    // Middle block: MXFP4 weights (F4, two a byte) with E8M0 block scales, and MXFP6.
    unit(
        &mut tensors,
        vec![
            (format!("{UNET}middle_block.1.proj.weight"), Dtype::F4, vec![96, 64]),
            (format!("{UNET}middle_block.1.proj.weight_scale"), Dtype::F8_E8M0, vec![96, 2]),
        ],
    );
    unit(
        &mut tensors,
        vec![
            (format!("{UNET}middle_block.2.proj.weight"), Dtype::F6_E2M3, vec![96, 64]),
            (format!("{UNET}middle_block.2.proj.weight_scale"), Dtype::F8_E8M0, vec![96, 2]),
        ],
    );
    // VAE: every safetensors dtype once, fp8 FNUZ variants with their scales among them.
    for (i, dtype) in Dtype::ALL.into_iter().enumerate() {
        let w = format!("{VAE}.{}.conv.weight", i % 3);
        let name = format!("{w}_{}", dtype.as_str().to_ascii_lowercase());
        let mut members = vec![(name.clone(), dtype, vec![48, 8])];
        if matches!(dtype, Dtype::F8_E4M3FNUZ | Dtype::F8_E5M2FNUZ) {
            members.push((format!("{name}_scale"), Dtype::F32, vec![48]));
        }
        unit(&mut tensors, members);
    }
    (tensors, units)
}

/// The file as the `safetensors` crate reads it: name → (dtype, shape, bytes).
fn oracle(path: &Path) -> HashMap<String, (String, Vec<u64>, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors reads it");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = serde_json::to_value(view.dtype()).expect("dtype");
            let shape = view.shape().iter().map(|&d| d as u64).collect();
            (name, (dtype.as_str().expect("dtype name").to_string(), shape, view.data().to_vec()))
        })
        .collect()
}

/// The full name of `local` in `component` (the checkpoint prefixes above).
fn full_name(component: &str, local: &str) -> String {
    let prefix = match component {
        "text_encoder" => "cond_stage_model.",
        "unet" => UNET,
        "vae" => "first_stage_model.",
        other => panic!("unexpected component {other}"),
    };
    format!("{prefix}{local}")
}

/// Streams every layer of every component `passes` times, checking each tensor against the
/// oracle and each unit against the lease. Returns the names seen.
fn stream_and_check(
    e: &Engine,
    id: ModelId,
    passes: usize,
    file: &HashMap<String, (String, Vec<u64>, Vec<u8>)>,
    units: &[Unit],
    what: &str,
) -> BTreeSet<String> {
    let unit_of: HashMap<&str, &Unit> =
        units.iter().flat_map(|u| u.iter().map(move |n| (n.as_str(), u))).collect();
    let model = e.model(id).expect("model");
    let mut seen = BTreeSet::new();
    for _ in 0..passes {
        for c in model.components() {
            for l in 0..c.layers.len() {
                let lease = e.acquire(id, &c.name, l).expect("acquire");
                let names: BTreeSet<String> =
                    lease.tensors().iter().map(|t| full_name(&c.name, &t.name)).collect();
                for t in lease.tensors() {
                    let name = full_name(&c.name, &t.name);
                    let (dtype, shape, bytes) =
                        file.get(&name).unwrap_or_else(|| panic!("{what}: {name} not in file"));
                    assert_eq!(t.dtype.as_str(), dtype, "{what}: dtype of {name}");
                    assert_eq!(&t.shape, shape, "{what}: shape of {name}");
                    assert_eq!(t.len, bytes.len() as u64, "{what}: length of {name}");
                    let got = e.read_tensor(&lease, t).expect("read back");
                    assert!(
                        got == *bytes,
                        "{what}: bytes of {name} ({dtype}) differ from the file"
                    );
                    let unit = unit_of.get(name.as_str()).expect("every tensor is in a unit");
                    for member in unit.iter() {
                        assert!(
                            names.contains(member),
                            "{what}: {member} is not in the layer of {name} ({}: {names:?})",
                            lease.layer()
                        );
                    }
                    seen.insert(name);
                }
                e.release(lease, ClientDone::Now).expect("release");
            }
        }
    }
    seen
}

/// Device bytes of the model's layers (every tensor aligned to 256 bytes), in total and for
/// its largest component.
fn device_bytes(e: &Engine, id: ModelId) -> (u64, u64) {
    let model = e.model(id).expect("model");
    let per = |c: &ferry::store::Component| -> u64 {
        c.layers
            .iter()
            .flat_map(|l| &l.tensors)
            .map(|&t| model.tensors()[t].len.div_ceil(256).max(1) * 256)
            .sum()
    };
    let total = model.components().iter().map(per).sum();
    let largest = model.components().iter().map(per).max().unwrap_or(0);
    (total, largest)
}

fn host_engine(budget: u64, device_total: u64, mapped_reads: bool) -> Engine {
    Engine::new(EngineConfig {
        device: DeviceChoice::Host,
        device_config: DeviceConfig {
            host_memory: device_total,
            mapped_reads,
            ..DeviceConfig::default()
        },
        budget: Some(budget),
        // Small slots, so big tensors go in several chunks and small ones share a slot.
        staging_slots: 3,
        staging_slot_bytes: 4096,
        io_threads: 2,
        acquire_timeout: Duration::from_secs(10),
        ..EngineConfig::default()
    })
    .expect("host engine")
}

#[test]
fn quantized_weights_stream_bit_exactly_under_every_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("quantized.safetensors");
    let (tensors, units) = quantized_checkpoint();
    write_file(&path, &tensors).expect("write");
    let file = oracle(&path);
    assert_eq!(file.len(), tensors.len());
    let all: BTreeSet<String> = file.keys().cloned().collect();

    // Sizes, from an engine large enough for anything.
    let (total, largest_component) = {
        let e = host_engine(64 << 20, 128 << 20, true);
        let id = e.open_model(&path).expect("open");
        let m = e.model(id).expect("model");
        let names: Vec<&str> = m.components().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["text_encoder", "unet", "vae"]);
        device_bytes(&e, id)
    };
    let slack = 64 << 10;
    let roomy = total + slack;
    let half = Threshold::Bytes(total / 2);
    // (name, policy, budget, device memory, whether it must evict to fit)
    let cases: Vec<(&str, Option<PolicyChoice>, u64, u64, bool)> = vec![
        ("none", Some(PolicySpec::None.into()), roomy, 2 * roomy, false),
        // The budget holds one component at a time: components move.
        (
            "component",
            Some(PolicySpec::Component.into()),
            largest_component + slack,
            2 * roomy,
            true,
        ),
        (
            "sequential",
            Some(PolicySpec::Sequential { lookahead: 1 }.into()),
            roomy,
            2 * roomy,
            true,
        ),
        (
            "sequential/0",
            Some(PolicySpec::Sequential { lookahead: 0 }.into()),
            roomy,
            2 * roomy,
            true,
        ),
        ("balanced", Some(PolicySpec::Balanced { threshold: half }.into()), roomy, 2 * roomy, true),
        ("lru", Some(PolicySpec::Lru { threshold: half }.into()), roomy, 2 * roomy, true),
        ("lowvram", Some("lowvram".parse().expect("preset")), roomy, 2 * roomy, true),
        (
            "medvram",
            Some("medvram".parse().expect("preset")),
            largest_component + slack,
            2 * roomy,
            true,
        ),
        (
            "model",
            Some("model".parse().expect("preset")),
            largest_component + slack,
            2 * roomy,
            true,
        ),
        // No policy set: auto on a small device is sequential ...
        ("auto (small device)", None, roomy, 2 * roomy, true),
        // ... and on an 80 GiB one balanced at 75% of it: everything stays.
        ("auto (80 GiB)", None, roomy, 80 << 30, false),
        ("auto (asked)", Some(PolicyChoice::Auto), roomy, 2 * roomy, true),
    ];
    for mapped_reads in [false, true] {
        for (name, choice, budget, device, evicts) in &cases {
            let what = format!("{name}, mapped_reads {mapped_reads}");
            let e = host_engine(*budget, *device, mapped_reads);
            let id = e.open_model(&path).expect("open");
            if let Some(choice) = choice {
                e.set_residency(id, None, *choice).unwrap_or_else(|err| panic!("{what}: {err}"));
            }
            let seen = stream_and_check(&e, id, 2, &file, &units, &what);
            assert_eq!(seen, all, "{what}: every tensor streamed");
            let s = e.stats();
            assert!(
                s.peak_device_bytes <= s.budget,
                "{what}: peak {} > {}",
                s.peak_device_bytes,
                s.budget
            );
            assert_eq!(
                s.evictions > 0,
                *evicts,
                "{what}: {s:?} under {}",
                e.policies(id).expect("p")
            );
            e.close_model(id).expect("close");
        }
    }
}

#[test]
fn declared_layers_keep_scales_with_their_weights() {
    // Layers declared by prefix: a scale nested under a weight goes where the weight goes, and
    // a sibling scale goes where its module goes.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.safetensors");
    let tensors = vec![
        Tensor::patterned("blocks.0", Dtype::U8, &[256]),
        Tensor::patterned("blocks.0.absmax", Dtype::F32, &[4]),
        Tensor::patterned("blocks.1.weight", Dtype::F8_E4M3, &[256]),
        Tensor::patterned("blocks.1.weight_scale", Dtype::F32, &[]),
    ];
    write_file(&path, &tensors).expect("write");
    let store = ferry::store::Store::new();
    let m = store.open(&path).expect("open");
    let rule = ferry::store::LayerRule::Prefixes(vec!["blocks.1".into(), "blocks.0".into()]);
    let layers = m.layers_with(m.components()[0].name.as_str(), &rule).expect("declared");
    let names: Vec<(String, BTreeSet<&str>)> = layers
        .iter()
        .map(|l| {
            (l.name.clone(), l.tensors.iter().map(|&t| m.tensors()[t].name.as_str()).collect())
        })
        .collect();
    assert_eq!(
        names,
        [
            ("blocks.1".to_string(), BTreeSet::from(["blocks.1.weight", "blocks.1.weight_scale"])),
            ("blocks.0".to_string(), BTreeSet::from(["blocks.0", "blocks.0.absmax"])),
        ]
    );
    // The automatic rule: `blocks.0` is in layer `blocks`, and so is its absmax.
    let auto = m.layers_with(m.components()[0].name.as_str(), &ferry::store::LayerRule::Auto);
    let auto = auto.expect("auto");
    let of = |n: &str| {
        auto.iter()
            .find(|l| l.tensors.iter().any(|&t| m.tensors()[t].name == n))
            .map(|l| l.name.clone())
    };
    assert_eq!(of("blocks.0"), Some("blocks".to_string()));
    assert_eq!(of("blocks.0.absmax"), Some("blocks".to_string()));
    assert_eq!(of("blocks.1.weight_scale"), of("blocks.1.weight"));
}
