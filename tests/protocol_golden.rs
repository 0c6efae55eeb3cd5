//! Golden byte vectors of the wire protocol (docs/protocol.md), and bad-frame tests.
//!
//! `tests/fixtures/protocol/<kind_name>.bin` holds one whole frame (header + body) of every
//! message kind, for the example values below, and `<kind_name>.<variant>.bin` further frames
//! of some kinds that show values the main example does not (each `Policy` variant);
//! `index.json` lists them all with their header fields and field values (as JSON) for clients
//! in other languages. The tests decode each
//! committed file and compare it with the example, and re-encode the example and compare
//! bytes. To rewrite the files after a deliberate protocol change (which is a new protocol
//! version):
//!
//! ```sh
//! FERRY_BLESS=1 cargo test --test protocol_golden
//! ```

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::protocol::socket::{recv_frame, recv_frame_detailed, send_frame, send_frame_bytes};
use ferry::protocol::*;
use proptest::prelude::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/protocol");

/// One golden vector: a message with the header fields it travels with.
struct Golden {
    /// `None` for the main example of a kind; else the suffix of a further example's file
    /// name (`set_residency.auto.bin`).
    variant: Option<&'static str>,
    request_id: u64,
    /// Descriptors a real frame of this example carries (flag bit 0 set when > 0).
    fds: usize,
    description: &'static str,
    message: Message,
}

fn g(request_id: u64, fds: usize, description: &'static str, m: impl Into<Message>) -> Golden {
    Golden { variant: None, request_id, fds, description, message: m.into() }
}

/// A further example of a kind, written to `<kind_name>.<variant>.bin`.
fn gx(
    variant: &'static str,
    request_id: u64,
    description: &'static str,
    m: impl Into<Message>,
) -> Golden {
    Golden { variant: Some(variant), request_id, fds: 0, description, message: m.into() }
}

/// The further examples: every `Policy` variant the main examples do not show, in
/// `SetResidency` and in `Models`.
fn variants() -> Vec<Golden> {
    let set = |policy| SetResidency { model: 1, component: None, policy };
    let info = |model, policy| ModelInfo {
        model,
        path: format!("/srv/models/m{model}.safetensors"),
        source: "single_file".into(),
        total_bytes: 4096,
        layers: 3,
        resident_layers: 1,
        policy: Some(policy),
        clients: 1,
    };
    vec![
        gx(
            "component",
            17,
            "Take only component text_encoder_2 of model 1 off the device",
            Offload { model: 1, component: Some("text_encoder_2".into()) },
        ),
        gx(
            "component",
            18,
            "Bring component text_encoder_2 of model 1 back ahead of use",
            Onload { model: 1, component: Some("text_encoder_2".into()) },
        ),
        gx("auto", 6, "The server picks the policy from its device's memory", set(Policy::Auto)),
        gx(
            "ipc",
            16,
            "A cuMemAlloc arena shared by its legacy IPC handle (no descriptor)",
            CudaArena {
                len: 60 << 30,
                device_uuid: "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9".into(),
                handle: CudaHandle::Ipc { handle: (0u8..64).collect() },
            },
        ),
        gx(
            "lowvram",
            6,
            "SD.Next's lowvram preset (= sequential, lookahead 1) for all of model 1",
            set(Policy::Preset { preset: Preset::LowVram }),
        ),
        gx(
            "medvram",
            6,
            "SD.Next's medvram preset (= component) for all of model 1",
            set(Policy::Preset { preset: Preset::MedVram }),
        ),
        gx(
            "model",
            6,
            "SD.Next's model-offload preset (= component) for all of model 1",
            set(Policy::Preset { preset: Preset::Model }),
        ),
        gx(
            "policies",
            14,
            "Models whose policies are each of the other variants, reported as they were set",
            Models {
                models: vec![
                    info(1, Policy::None),
                    info(2, Policy::Component),
                    info(3, Policy::Lru { threshold: Threshold::Bytes(1 << 20) }),
                    info(4, Policy::Auto),
                    info(5, Policy::Preset { preset: Preset::LowVram }),
                    info(6, Policy::Preset { preset: Preset::MedVram }),
                    info(7, Policy::Preset { preset: Preset::Model }),
                ],
            },
        ),
    ]
}

/// Every vector: the main examples, then the further ones.
fn all_vectors() -> Vec<Golden> {
    let mut v = examples();
    v.extend(variants());
    v
}

/// The example value of every kind, in kind order.
fn examples() -> Vec<Golden> {
    let layer = |name: &str, bytes, tensors| LayerSummary { name: name.into(), bytes, tensors };
    vec![
        g(
            1,
            0,
            "Handshake: the client speaks version 1 only and asks for features 0-3",
            Hello {
                min_version: 1,
                max_version: 1,
                features: features::FD_PASSING
                    | features::OPEN_PATH
                    | features::HOST_ARENA
                    | features::LORA,
                client_name: "ferry-python 0.1".into(),
            },
        ),
        g(2, 0, "The client leaves", Goodbye {}),
        g(
            3,
            0,
            "Open a diffusers folder under a model root",
            OpenModel { path: "/srv/models/sd_tiny".into() },
        ),
        g(
            4,
            1,
            "Open the file whose descriptor travels with the frame",
            OpenModelFd { name: "sdxl.safetensors".into() },
        ),
        g(5, 0, "Close model 1", CloseModel { model: 1 }),
        g(
            6,
            0,
            "Balanced at half the device's memory for component unet of model 1",
            SetResidency {
                model: 1,
                component: Some("unet".into()),
                policy: Policy::Balanced { threshold: Threshold::Fraction(0.5) },
            },
        ),
        g(
            17,
            0,
            "Take model 1 off the device, its reservation too",
            Offload { model: 1, component: None },
        ),
        g(18, 0, "Bring model 1 back ahead of use", Onload { model: 1, component: None }),
        g(
            19,
            0,
            "Open a model on ferryd's device 1",
            OpenModelOn { path: "/srv/models/sd_tiny".into(), device: DeviceSel::Index(1) },
        ),
        g(
            20,
            1,
            "Open the passed file on the GPU with this UUID",
            OpenModelFdOn {
                name: "sdxl.safetensors".into(),
                device: DeviceSel::Uuid("GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9".into()),
            },
        ),
        g(7, 0, "Lease layer 3 of unet", Acquire { model: 1, component: "unet".into(), layer: 3 }),
        g(8, 0, "Wait for lease 42's bytes", WaitReady { lease: 42 }),
        g(9, 0, "Give lease 42 back", Release { model: 1, lease: 42 }),
        g(
            10,
            0,
            "Layer 4 of unet comes next",
            Prefetch { model: 1, component: "unet".into(), layer: 4 },
        ),
        g(
            23,
            0,
            "Lease layer 3 of unet with its interprocess ready event (CUDA)",
            AcquireEvent { model: 1, component: "unet".into(), layer: 3 },
        ),
        g(
            11,
            1,
            "A two-adapter stack, fused: one by path, one by the frame's first fd",
            ApplyLora {
                model: 1,
                stack: vec![
                    LoraRef {
                        source: LoraSource::Path("/srv/loras/style.safetensors".into()),
                        scale: 0.75,
                    },
                    LoraRef { source: LoraSource::Fd(0), scale: -0.5 },
                ],
                mode: LoraMode::Fuse,
            },
        ),
        g(12, 0, "Drop view 2", RemoveLora { view: 2 }),
        g(13, 0, "Ask for the counters", Stats {}),
        g(14, 0, "Ask for the open models", ListModels {}),
        g(15, 0, "Ask for the connected clients", ListClients {}),
        g(21, 0, "Ask for the devices", ListDevices {}),
        g(16, 0, "Ask for the host arena's memfd", MapArena {}),
        g(
            22,
            0,
            "Ask for the arena of simulated host device 1",
            MapArenaOn { device: DeviceSel::Uuid("HOST-0001".into()) },
        ),
        g(9, 0, "Success without a payload (here: the release of request 9)", Ack {}),
        g(
            1,
            0,
            "Version 1, features 0-2 granted, on the host backend",
            Welcome {
                version: 1,
                features: features::FD_PASSING | features::OPEN_PATH | features::HOST_ARENA,
                client_id: 5,
                server_version: "0.1.0".into(),
                max_body_len: MAX_BODY_LEN,
                max_fds: MAX_FDS as u32,
                device: DeviceSummary {
                    backend: "host".into(),
                    name: "host memory".into(),
                    uuid: "host-4242".into(),
                    total_memory: 4 << 30,
                    budget: 3 << 30,
                },
            },
        ),
        g(
            3,
            0,
            "Model 1: unet with two layers, vae with one",
            ModelOpened {
                model: 1,
                components: vec![
                    ComponentSummary {
                        name: "unet".into(),
                        layers: vec![
                            layer("down_blocks.0.", 1 << 20, 12),
                            layer("mid_block.", 1 << 19, 6),
                        ],
                    },
                    ComponentSummary {
                        name: "vae".into(),
                        layers: vec![layer("decoder.", 65536, 4)],
                    },
                ],
            },
        ),
        g(17, 0, "Model 1's offload freed its 96 MiB reservation", Offloaded { bytes: 96 << 20 }),
        g(
            7,
            0,
            "Lease 42: two tensors, copy still in flight",
            Leased {
                lease: 42,
                layer: "down_blocks.0.".into(),
                ready: false,
                tensors: vec![
                    TensorDesc {
                        name: "down_blocks.0.conv.weight".into(),
                        dtype: "F16".into(),
                        shape: vec![320, 4, 3, 3],
                        arena_offset: 0x10000,
                        len: 23040,
                    },
                    TensorDesc {
                        name: "down_blocks.0.conv.bias".into(),
                        dtype: "F32".into(),
                        shape: vec![320],
                        arena_offset: 0x15a00,
                        len: 1280,
                    },
                ],
            },
        ),
        g(8, 0, "Lease 42 is ready", Ready { lease: 42 }),
        g(
            23,
            0,
            "Lease 43: one tensor, copy in flight; wait on the event before reading",
            LeasedEvent {
                leased: Leased {
                    lease: 43,
                    layer: "down_blocks.0.".into(),
                    ready: false,
                    tensors: vec![TensorDesc {
                        name: "down_blocks.0.conv.bias".into(),
                        dtype: "F16".into(),
                        shape: vec![320],
                        arena_offset: 0x20000,
                        len: 640,
                    }],
                },
                ready_event: (64u8..128).collect(),
            },
        ),
        g(
            11,
            0,
            "View 2: 64 tensors adapted; the first file has an unmatched module and an unrecognised tensor",
            ViewCreated {
                view: 2,
                merged: 64,
                loras: vec![
                    LoraReport {
                        unmatched: vec!["lora_te_text_model_encoder_layers_0_mlp_fc1".into()],
                        unrecognised: vec![
                            "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a".into(),
                        ],
                    },
                    LoraReport { unmatched: vec![], unrecognised: vec![] },
                ],
            },
        ),
        g(
            13,
            0,
            "Counters",
            StatsReply {
                acquires: 100,
                hits: 90,
                misses: 10,
                loads: 12,
                evictions: 2,
                bytes_streamed: 1 << 30,
                stall_ns: 1_500_000,
                device_bytes: 1 << 29,
                peak_device_bytes: 3 << 28,
                budget: 3 << 30,
                lora_cache_bytes: 1 << 20,
            },
        ),
        g(
            14,
            0,
            "Two models: one with a sequential policy, one with none set",
            Models {
                models: vec![
                    ModelInfo {
                        model: 1,
                        path: "/srv/models/sd_tiny".into(),
                        source: "diffusers".into(),
                        total_bytes: 1_638_400,
                        layers: 3,
                        resident_layers: 2,
                        policy: Some(Policy::Sequential { lookahead: 1 }),
                        clients: 2,
                    },
                    ModelInfo {
                        model: 3,
                        path: "sdxl.safetensors".into(),
                        source: "single_file".into(),
                        total_bytes: 123_456,
                        layers: 0,
                        resident_layers: 0,
                        policy: None,
                        clients: 1,
                    },
                ],
            },
        ),
        g(
            15,
            0,
            "One client",
            Clients {
                clients: vec![ClientInfo {
                    id: 5,
                    pid: 4242,
                    uid: 1000,
                    gid: 1000,
                    name: "ferry-python 0.1".into(),
                    models: 1,
                    leases: 1,
                }],
            },
        ),
        g(
            21,
            0,
            "Two GPUs: device 0 serves on NUMA node 1, device 1 failed to open",
            Devices {
                devices: vec![
                    DeviceEntry {
                        index: 0,
                        label: "cuda:0".into(),
                        uuid: "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9".into(),
                        name: "NVIDIA H100 80GB HBM3".into(),
                        total_memory: 80 << 30,
                        numa_node: Some(1),
                        error: None,
                        stats: Some(StatsReply {
                            acquires: 10,
                            hits: 9,
                            misses: 1,
                            loads: 1,
                            evictions: 0,
                            bytes_streamed: 1 << 20,
                            stall_ns: 0,
                            device_bytes: 1 << 20,
                            peak_device_bytes: 1 << 20,
                            budget: 60 << 30,
                            lora_cache_bytes: 0,
                        }),
                        models: 1,
                        waiting: 2,
                    },
                    DeviceEntry {
                        index: 1,
                        label: "cuda:1".into(),
                        uuid: "GPU-ffeeddcc-bbaa-9988-7766-554433221100".into(),
                        name: String::new(),
                        total_memory: 0,
                        numa_node: None,
                        error: Some(
                            "CUDA call cuDevicePrimaryCtxRetain failed: out of memory".into(),
                        ),
                        stats: None,
                        models: 0,
                        waiting: 0,
                    },
                ],
            },
        ),
        g(
            16,
            1,
            "The 3 GiB host arena; its memfd travels with the frame",
            ArenaFd { len: 3 << 30, backend: "host".into() },
        ),
        g(
            16,
            1,
            "A 60 GiB CUDA arena exported as a VMM file descriptor, which travels with the frame",
            CudaArena {
                len: 60 << 30,
                device_uuid: "GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9".into(),
                handle: CudaHandle::PosixFd { alloc_len: 60 << 30 },
            },
        ),
        g(
            9,
            0,
            "Release of an unknown lease",
            ErrorReply {
                code: ErrorCode::UnknownLease as u32,
                message: "no lease 43 is held (already released, or never acquired)".into(),
            },
        ),
    ]
}

fn file_name(gv: &Golden) -> String {
    match gv.variant {
        None => format!("{}.bin", gv.message.kind().name()),
        Some(v) => format!("{}.{v}.bin", gv.message.kind().name()),
    }
}

fn encode(gv: &Golden) -> Vec<u8> {
    let flags = if gv.fds > 0 { FLAG_FDS } else { 0 };
    encode_frame_with(PROTOCOL_VERSION, flags, gv.request_id, &gv.message).expect("encodes")
}

fn index_json(examples: &[Golden]) -> String {
    let entries: Vec<serde_json::Value> = examples
        .iter()
        .map(|gv| {
            let kind = gv.message.kind();
            let bytes = encode(gv);
            serde_json::json!({
                "file": file_name(gv),
                "kind": kind as u16,
                "kind_name": kind.name(),
                "variant": gv.variant,
                "version": PROTOCOL_VERSION,
                "flags": if gv.fds > 0 { FLAG_FDS } else { 0 },
                "fds": gv.fds,
                "request_id": gv.request_id,
                "body_len": bytes.len() - HEADER_LEN,
                "description": gv.description,
                "fields": gv.message,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "protocol_version": PROTOCOL_VERSION,
        "header_len": HEADER_LEN,
        "max_body_len": MAX_BODY_LEN,
        "max_fds": MAX_FDS,
        "note": "Each file is one whole frame (24-byte header + bincode body) of the example \
                 message whose field values are under `fields` (serde's JSON form: enums are \
                 {\"Variant\": value} or \"Variant\"). See docs/protocol.md.",
        "vectors": entries,
    });
    serde_json::to_string_pretty(&doc).expect("json") + "\n"
}

fn bless() -> bool {
    std::env::var_os("FERRY_BLESS").is_some_and(|v| v == "1")
}

fn path(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

#[test]
fn every_kind_has_exactly_one_example() {
    let kinds: Vec<Kind> = examples().iter().map(|gv| gv.message.kind()).collect();
    assert_eq!(kinds, Kind::ALL, "one example per kind, in kind order");
    assert!(examples().iter().all(|gv| gv.variant.is_none()));
    let names: BTreeSet<String> = all_vectors().iter().map(file_name).collect();
    assert_eq!(names.len(), all_vectors().len(), "file names are unique");
    for gv in all_vectors() {
        let rule = gv.message.kind().fds();
        let ok = match rule {
            FdRule::None => gv.fds == 0,
            FdRule::One => gv.fds == 1,
            FdRule::UpTo(n) => gv.fds <= n,
        };
        assert!(ok, "{}: {} fds against {:?}", gv.message.kind().name(), gv.fds, rule);
    }
}

#[test]
fn golden_vectors_decode_to_their_examples_and_reencode_to_their_bytes() {
    let examples = all_vectors();
    if bless() {
        std::fs::create_dir_all(FIXTURES).expect("fixtures dir");
        for gv in &examples {
            std::fs::write(path(&file_name(gv)), encode(gv)).expect("write");
        }
        std::fs::write(path("index.json"), index_json(&examples)).expect("write index");
    }
    for gv in &examples {
        let kind = gv.message.kind();
        let name = file_name(gv);
        let bytes = std::fs::read(path(&name))
            .unwrap_or_else(|e| panic!("{name}: {e} (run with FERRY_BLESS=1 to write it)"));
        let (header, message) =
            decode_frame_bytes(&bytes).unwrap_or_else(|e| panic!("{name} does not decode: {e}"));
        assert_eq!(header.kind, kind, "{name}");
        assert_eq!(header.version, PROTOCOL_VERSION, "{name}");
        assert_eq!(header.request_id, gv.request_id, "{name}");
        assert_eq!(header.carries_fds(), gv.fds > 0, "{name}");
        assert_eq!(header.body_len as usize, bytes.len() - HEADER_LEN, "{name}");
        header.check_fds(gv.fds).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(message, gv.message, "{name} decodes to another value");
        assert_eq!(encode(gv), bytes, "{name}: the encoder's bytes differ from the committed ones");
    }
    let index = std::fs::read_to_string(path("index.json")).expect("index.json");
    assert_eq!(index, index_json(&examples), "index.json is stale (FERRY_BLESS=1 rewrites it)");
    // No stray vectors.
    let expected: BTreeSet<String> = examples.iter().map(file_name).collect();
    let found: BTreeSet<String> = std::fs::read_dir(FIXTURES)
        .expect("fixtures dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    assert_eq!(found, expected);
}

/// The worked examples of docs/protocol.md, byte for byte.
#[test]
fn the_specs_worked_examples_match_the_vectors() {
    let acquire = std::fs::read(path("acquire.bin")).expect("acquire.bin");
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x46, 0x52, 0x52, 0x59, 0x01, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00,
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x75, 0x6e, 0x65, 0x74, 0x03, 0x00, 0x00, 0x00,
    ];
    assert_eq!(acquire, expected);
    let set = std::fs::read(path("set_residency.bin")).expect("set_residency.bin");
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x46, 0x52, 0x52, 0x59, 0x01, 0x00, 0x13, 0x00, 0x00, 0x00, 0x00, 0x00, 0x25, 0x00, 0x00, 0x00,
        0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x01, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x75, 0x6e, 0x65, 0x74, 0x03, 0x00, 0x00,
        0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe0, 0x3f,
    ];
    assert_eq!(set, expected);
}

/// `Auto` and the presets, byte for byte, written out by hand rather than by the encoder:
/// `model` u64 1, `component` None (tag 0), `Policy` variant index u32 (`Auto` 5, `Preset` 6),
/// then for `Preset` its `Preset` variant index u32 (`LowVram` 0, `MedVram` 1, `Model` 2).
#[test]
fn auto_and_preset_vectors_match_hand_written_bytes() {
    #[rustfmt::skip]
    let header = |body_len: u8| -> Vec<u8> {
        vec![
            0x46, 0x52, 0x52, 0x59, 0x01, 0x00, 0x13, 0x00, 0x00, 0x00, 0x00, 0x00, body_len, 0, 0, 0,
            0x06, 0, 0, 0, 0, 0, 0, 0,
        ]
    };
    let model_none = [1u8, 0, 0, 0, 0, 0, 0, 0, 0];
    let cases: [(&str, &[u8]); 4] = [
        ("auto", &[5, 0, 0, 0]),
        ("lowvram", &[6, 0, 0, 0, 0, 0, 0, 0]),
        ("medvram", &[6, 0, 0, 0, 1, 0, 0, 0]),
        ("model", &[6, 0, 0, 0, 2, 0, 0, 0]),
    ];
    for (name, policy) in cases {
        let mut expected = header((model_none.len() + policy.len()) as u8);
        expected.extend_from_slice(&model_none);
        expected.extend_from_slice(policy);
        let file = format!("set_residency.{name}.bin");
        assert_eq!(std::fs::read(path(&file)).expect("vector"), expected, "{file}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad frames: every rejection, from crafted bytes.

fn golden(kind: Kind) -> Vec<u8> {
    let gv = examples().into_iter().find(|gv| gv.message.kind() == kind).expect("example");
    encode(&gv)
}

fn reject(bytes: &[u8]) -> ProtocolError {
    decode_frame_bytes(bytes).expect_err("must be rejected")
}

#[test]
fn every_header_rejection_from_crafted_bytes() {
    let good = golden(Kind::Acquire);

    let mut b = good.clone();
    b[..4].copy_from_slice(b"HTTP");
    let e = reject(&b);
    assert!(matches!(e, ProtocolError::BadMagic { found } if &found == b"HTTP"), "{e}");
    assert_eq!(e.code(), ErrorCode::BadMagic);

    let mut b = good.clone();
    b[4..6].copy_from_slice(&0u16.to_le_bytes());
    let e = reject(&b);
    assert!(matches!(e, ProtocolError::UnsupportedVersion { found: 0, .. }), "{e}");
    assert_eq!(e.code(), ErrorCode::UnsupportedVersion);

    let mut b = good.clone();
    b[6..8].copy_from_slice(&0x0099u16.to_le_bytes());
    let e = reject(&b);
    assert!(matches!(e, ProtocolError::UnknownKind { kind: 0x99 }), "{e}");
    assert_eq!(e.to_string(), "unknown message kind 0x0099");
    assert_eq!(e.code(), ErrorCode::UnknownKind);

    let mut b = good.clone();
    b[8..12].copy_from_slice(&0x0000_0004u32.to_le_bytes());
    let e = reject(&b);
    assert!(matches!(e, ProtocolError::ReservedFlags { flags: 4 }), "{e}");
    assert_eq!(e.code(), ErrorCode::ReservedFlags);

    let mut b = good.clone();
    b[8..12].copy_from_slice(&FLAG_FDS.to_le_bytes());
    let e = reject(&b);
    assert!(matches!(e, ProtocolError::BadFds { kind: Kind::Acquire, flagged: true, .. }), "{e}");
    assert_eq!(e.code(), ErrorCode::BadFds);

    let mut b = good.clone();
    b[12..16].copy_from_slice(&(MAX_BODY_LEN + 1).to_le_bytes());
    let e = reject(&b);
    assert!(matches!(e, ProtocolError::FrameTooLarge { max: MAX_BODY_LEN, .. }), "{e}");
    assert_eq!(e.code(), ErrorCode::FrameTooLarge);

    let e = reject(&good[..HEADER_LEN - 1]);
    assert!(matches!(e, ProtocolError::Truncated { what: "header", got: 23, .. }), "{e}");
    assert_eq!(e.code(), ErrorCode::Truncated);

    let e = reject(&good[..good.len() - 1]);
    assert!(matches!(e, ProtocolError::Truncated { what: "body", .. }), "{e}");

    // A mismatch with the negotiated version.
    let (h, _) = decode_frame_bytes(&good).expect("valid");
    let e = h.check_version(Some(2)).expect_err("v1 frame on a v2 connection");
    assert!(matches!(e, ProtocolError::UnsupportedVersion { found: 1, min: 2, max: 2 }), "{e}");
}

#[test]
fn every_body_rejection_from_crafted_bytes() {
    // Acquire: model u64 | component String | layer u32.
    let good = golden(Kind::Acquire);

    // body_len one short of the fields: the last field runs out.
    let mut b = good.clone();
    b[12] -= 1;
    b.pop();
    let e = reject(&b);
    assert!(matches!(e, ProtocolError::Body { kind: Kind::Acquire, .. }), "{e}");
    assert!(e.to_string().starts_with("acquire body does not decode"), "{e}");
    assert_eq!(e.code(), ErrorCode::BadBody);

    // A string length past the body's end.
    let mut b = good.clone();
    b[HEADER_LEN + 8] = 0xff;
    assert!(matches!(reject(&b), ProtocolError::Body { .. }));

    // A string that is not UTF-8.
    let mut b = good.clone();
    b[HEADER_LEN + 16] = 0xc3;
    assert!(matches!(reject(&b), ProtocolError::Body { .. }));

    // One byte more than the fields, counted in body_len.
    let mut b = good.clone();
    b[12] += 1;
    b.push(0);
    let e = reject(&b);
    assert!(matches!(e, ProtocolError::TrailingBytes { kind: Kind::Acquire, extra: 1 }), "{e}");
    assert_eq!(e.code(), ErrorCode::TrailingBytes);

    // Bytes after the frame.
    let mut b = good.clone();
    b.extend_from_slice(&[0, 0]);
    assert!(matches!(reject(&b), ProtocolError::TrailingBytes { extra: 2, .. }));

    // An enum variant index that does not exist (policy 7), an Option tag of 2, a bool of 2.
    let mut b = golden(Kind::SetResidency);
    b[HEADER_LEN + 8] = 2;
    assert!(matches!(reject(&b), ProtocolError::Body { kind: Kind::SetResidency, .. }));
    let mut b = golden(Kind::SetResidency);
    b[HEADER_LEN + 21] = 7;
    assert!(matches!(reject(&b), ProtocolError::Body { .. }));
    // A preset index that does not exist (3).
    let mut b = std::fs::read(path("set_residency.lowvram.bin")).expect("lowvram vector");
    b[HEADER_LEN + 13] = 3;
    assert!(matches!(reject(&b), ProtocolError::Body { kind: Kind::SetResidency, .. }));
    let mut b = golden(Kind::Leased);
    let ready_at = HEADER_LEN + 8 + 8 + "down_blocks.0.".len();
    assert_eq!(b[ready_at], 0);
    b[ready_at] = 2;
    assert!(matches!(reject(&b), ProtocolError::Body { kind: Kind::Leased, .. }));

    // Empty messages take no body at all.
    let mut b = golden(Kind::Stats);
    b[12] = 1;
    b.push(0);
    assert!(matches!(reject(&b), ProtocolError::TrailingBytes { kind: Kind::Stats, extra: 1 }));
}

#[test]
fn a_huge_claimed_length_fails_without_allocating_it() {
    // Vec<TensorDesc> claiming 2^62 entries, and a string claiming 2^40 bytes.
    let mut b = golden(Kind::Leased);
    let count_at = HEADER_LEN + 8 + 8 + "down_blocks.0.".len() + 1;
    assert_eq!(b[count_at], 2);
    b[count_at..count_at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(matches!(reject(&b), ProtocolError::Body { .. }));
    let mut b = golden(Kind::OpenModel);
    b[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(reject(&b), ProtocolError::Body { .. }));
}

// ---------------------------------------------------------------------------------------------
// Over a socket: descriptors, end of stream, I/O errors.

fn tempfile_with(contents: &[u8]) -> File {
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(contents).expect("write");
    f
}

#[test]
fn a_file_descriptor_travels_over_a_socketpair() {
    let (client, server) = UnixStream::pair().expect("socketpair");
    let file = tempfile_with(b"safetensors bytes");
    let msg = golden_message(Kind::OpenModelFd);
    send_frame(&client, PROTOCOL_VERSION, 4, &msg, &[file.as_fd()]).expect("send");
    drop(file);
    let r = recv_frame(&server, Some(PROTOCOL_VERSION)).expect("receive");
    assert_eq!(r.message, msg);
    assert_eq!(r.fds.len(), 1);
    let mut f = File::from(r.fds.into_iter().next().expect("fd"));
    f.rewind().expect("rewind");
    let mut s = String::new();
    f.read_to_string(&mut s).expect("read through the received descriptor");
    assert_eq!(s, "safetensors bytes");

    // The golden bytes themselves, sent raw with a descriptor, are received the same way.
    let file = tempfile_with(b"x");
    send_frame_bytes(&client, &golden(Kind::OpenModelFd), &[file.as_fd()]).expect("send raw");
    let r = recv_frame(&server, None).expect("receive golden");
    assert_eq!(r.message, msg);
    assert_eq!(r.fds.len(), 1);
}

#[test]
fn descriptors_spread_over_a_frame_are_counted_together() {
    let (client, server) = UnixStream::pair().expect("socketpair");
    let file = tempfile_with(b"x");
    let dups: Vec<File> = (0..MAX_FDS + 1).map(|_| file.try_clone().expect("dup")).collect();
    let fds: Vec<BorrowedFd<'_>> = dups.iter().map(AsFd::as_fd).collect();
    // 16 with the header, one more with the body: 17 for one frame.
    let bytes = golden(Kind::ApplyLora);
    send_frame_bytes(&client, &bytes[..HEADER_LEN], &fds[..MAX_FDS]).expect("header");
    send_frame_bytes(&client, &bytes[HEADER_LEN..], &fds[MAX_FDS..]).expect("body");
    let e = recv_frame(&server, None).expect_err("17 descriptors");
    assert!(matches!(e, ProtocolError::TooManyFds { max: MAX_FDS }), "{e}");
    assert_eq!(e.code(), ErrorCode::BadFds);
}

#[test]
fn the_arena_fd_reply_needs_its_descriptor() {
    let (server, client) = UnixStream::pair().expect("socketpair");
    // Flag set but nothing attached.
    send_frame_bytes(&server, &golden(Kind::ArenaFd), &[]).expect("send");
    let e = recv_frame(&client, None).expect_err("missing fd");
    assert!(
        matches!(e, ProtocolError::BadFds { kind: Kind::ArenaFd, flagged: true, received: 0 }),
        "{e}"
    );
    assert!(e.to_string().contains("exactly 1 file descriptor"), "{e}");
}

#[test]
fn closed_truncated_and_io_errors_over_a_socket() {
    let (client, server) = UnixStream::pair().expect("socketpair");
    drop(client);
    assert!(matches!(recv_frame(&server, None), Err(ProtocolError::Closed)));

    let (client, server) = UnixStream::pair().expect("socketpair");
    let bytes = golden(Kind::Hello);
    send_frame_bytes(&client, &bytes[..bytes.len() - 3], &[]).expect("send");
    drop(client);
    assert!(matches!(
        recv_frame(&server, None),
        Err(ProtocolError::Truncated { what: "body", .. })
    ));

    let (_client, server) = UnixStream::pair().expect("socketpair");
    server.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
    let e = recv_frame(&server, None).expect_err("nothing to read");
    assert!(matches!(e, ProtocolError::Io(_)), "{e}");
    assert_eq!(e.code(), ErrorCode::Internal);
}

#[test]
fn a_bad_frame_leaves_other_connections_alone() {
    let (bad_client, bad_server) = UnixStream::pair().expect("socketpair");
    let (good_client, good_server) = UnixStream::pair().expect("socketpair");
    let mut garbage = golden(Kind::Stats);
    garbage[0] = 0;
    send_frame_bytes(&bad_client, &garbage, &[]).expect("send");
    send_frame_bytes(&good_client, &golden(Kind::Stats), &[]).expect("send");
    let e = recv_frame(&bad_server, None).expect_err("bad magic");
    // The server answers with a typed error (request id 0: the header was not trusted)...
    let reply = ErrorReply::from(&e);
    send_frame(&bad_server, PROTOCOL_VERSION, NO_REQUEST, &reply.clone().into(), &[])
        .expect("reply");
    let r = recv_frame(&bad_client, Some(PROTOCOL_VERSION)).expect("error reply");
    assert_eq!(r.message, Message::Error(reply));
    assert!(ErrorCode::BadMagic.is_fatal());
    // ...while the other connection is served.
    let r = recv_frame(&good_server, Some(PROTOCOL_VERSION)).expect("good frame");
    assert_eq!(r.message, Message::Stats(Stats {}));

    // A frame whose header decoded is answered with its own request id.
    let mut bad_body = golden(Kind::Acquire);
    bad_body[HEADER_LEN + 8] = 0xff;
    send_frame_bytes(&good_client, &bad_body, &[]).expect("send");
    let f = recv_frame_detailed(&good_server, Some(PROTOCOL_VERSION)).expect_err("bad body");
    assert_eq!(f.request_id(), 7);
    assert!(matches!(f.error, ProtocolError::Body { kind: Kind::Acquire, .. }), "{f}");
    assert_eq!(f.reply().expect("reply").error_code(), Some(ErrorCode::BadBody));
    let mut garbage = golden(Kind::Acquire);
    garbage[6] = 0x99;
    send_frame_bytes(&good_client, &garbage, &[]).expect("send");
    let f = recv_frame_detailed(&good_server, None).expect_err("unknown kind");
    assert_eq!(f.request_id(), NO_REQUEST);
    assert_eq!(f.reply().expect("reply").error_code(), Some(ErrorCode::UnknownKind));
    // (The rest of that frame is still unread: the stream is no longer at a frame boundary,
    // which is why every protocol error closes the connection.)
    let (client, server) = UnixStream::pair().expect("socketpair");
    drop(client);
    let f = recv_frame_detailed(&server, None).expect_err("stream ends");
    assert!(matches!(f.error, ProtocolError::Closed));
    assert!(f.reply().is_none(), "nothing to answer on a closed connection");
}

fn golden_message(kind: Kind) -> Message {
    examples().into_iter().find(|gv| gv.message.kind() == kind).expect("example").message
}

// ---------------------------------------------------------------------------------------------
// Mutations of golden frames never panic.

#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Xor(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    /// Overwrites 8 bytes with a little-endian u64 (lengths, counts, ids).
    SetU64(usize, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        (any::<usize>(), 1u8..).prop_map(|(i, v)| Mutation::Xor(i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), prop_oneof![Just(u64::MAX), Just(1 << 40), 0u64..512, any::<u64>()])
            .prop_map(|(i, v)| Mutation::SetU64(i, v)),
    ]
}

fn mutate(mut b: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if b.is_empty() {
            break;
        }
        let len = b.len();
        match m {
            Mutation::Set(i, v) => b[i % len] = *v,
            Mutation::Xor(i, v) => b[i % len] ^= *v,
            Mutation::Truncate(i) => b.truncate(i % len),
            Mutation::Insert(i, v) => {
                let at = i % (len + 1);
                b.splice(at..at, v.iter().copied());
            }
            Mutation::SetU64(i, v) => {
                let at = i % len;
                let end = (at + 8).min(len);
                b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
        }
    }
    b
}

/// Keeps the header's body_len in step with the bytes after it, so mutations reach the body
/// decoder instead of stopping at a length mismatch.
fn fix_len(mut b: Vec<u8>) -> Vec<u8> {
    if b.len() >= HEADER_LEN {
        let body = (b.len() - HEADER_LEN) as u32;
        b[12..16].copy_from_slice(&body.to_le_bytes());
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn mutated_golden_frames_decode_or_fail_typed(
        which in 0..Kind::ALL.len(),
        mutations in proptest::collection::vec(mutation(), 1..6),
        keep_len in any::<bool>(),
    ) {
        let original = golden(Kind::ALL[which]);
        let mut b = mutate(original, &mutations);
        if keep_len {
            b = fix_len(b);
        }
        match decode_frame_bytes(&b) {
            Ok((header, msg)) => {
                // Whatever decodes re-encodes to the same bytes (the encoding is canonical).
                prop_assert_eq!(header.kind, msg.kind());
                let again = encode_frame_with(header.version, header.flags, header.request_id, &msg)
                    .expect("re-encodes");
                prop_assert_eq!(again, b);
            }
            Err(e) => {
                // Typed, with a message and a code.
                prop_assert!(!e.to_string().is_empty());
                prop_assert!((100..200).contains(&(e.code() as u32)));
            }
        }
    }

    #[test]
    fn random_bodies_of_every_kind_decode_or_fail_typed(
        which in 0..Kind::ALL.len(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let kind = Kind::ALL[which];
        let header = FrameHeader {
            version: PROTOCOL_VERSION,
            kind,
            flags: 0,
            body_len: body.len() as u32,
            request_id: 1,
        };
        if let Ok(msg) = decode_frame(&header, &body) {
            prop_assert_eq!(msg.encode_body().expect("re-encodes"), body);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn mutated_frames_over_a_socket_never_hang_or_panic(
        which in 0..Kind::ALL.len(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let kind = Kind::ALL[which];
        let b = mutate(golden(kind), &mutations);
        let (client, server) = UnixStream::pair().expect("socketpair");
        let file = tempfile_with(b"x");
        let fds: Vec<BorrowedFd<'_>> =
            if kind.fds() == FdRule::None || b.is_empty() { vec![] } else { vec![file.as_fd()] };
        send_frame_bytes(&client, &b, &fds).expect("send");
        drop(client);
        let _ = recv_frame(&server, None);
        // Whatever happened, the stream ends cleanly or with a typed error.
        loop {
            match recv_frame(&server, None) {
                Ok(_) => continue,
                Err(ProtocolError::Closed) => break,
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    break;
                }
            }
        }
    }
}
