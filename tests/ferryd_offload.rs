//! Manual offload through a real `ferryd`: a base and a refiner that cannot both be reserved
//! under the daemon's budget take turns on the device with `offload` / `onload`, from two
//! client connections; every layer's bytes are checked through the mapped arena, and the
//! daemon's peak device bytes never pass its budget. A whole-model offload acts on the model
//! every client shares, and any client's lease blocks it.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry::client::Client;
use ferry::protocol::{ErrorCode, ModelOpened, Policy};
use ferry_tests::ferryd::{Ferryd, acquire, map_arena, release};
use ferry_tests::{Tensor, cargo_bin, u8_blocks, write_file};

const LAYER: usize = 64 << 10;
/// Room for one model's reservation, not both (base 6 layers, refiner 5).
const BUDGET: u64 = 8 * LAYER as u64;

fn start(dir: &Path) -> Ferryd {
    let root = dir.join("models");
    let socket = dir.join("ferryd.sock");
    let config = dir.join("ferryd.toml");
    std::fs::write(
        &config,
        format!(
            "device = \"host\"\nhost_memory = {}\nbudget = {BUDGET}\nsocket = {:?}\n\
             model_roots = [{:?}]\ndefault_policy = \"balanced\"\nlog = \"warn\"\n",
            4 * BUDGET,
            socket.to_str().expect("utf-8"),
            root.to_str().expect("utf-8"),
        ),
    )
    .expect("config");
    // The socket is in the config file; `--socket` names the same path.
    Ferryd::start(&socket, ["--config".as_ref(), config.as_os_str()])
}

/// A model of `layers` layers of `LAYER` bytes, bytes differing per `seed`.
fn model(root: &Path, name: &str, layers: usize, seed: u8) -> (PathBuf, Vec<Tensor>) {
    let tensors =
        u8_blocks(layers, LAYER, |l, i| (i as u8).wrapping_mul(31).wrapping_add(seed + l as u8));
    let path = root.join(name);
    write_file(&path, &tensors).expect("write");
    (path, tensors)
}

/// Acquires every layer in turn and checks its bytes in the arena against the file.
fn check_all(c: &mut Client, map: &[u8], m: &ModelOpened, tensors: &[Tensor]) {
    assert_eq!(m.components.len(), 1, "{m:?}");
    assert_eq!(m.components[0].layers.len(), tensors.len());
    for (l, t) in tensors.iter().enumerate() {
        let lease = acquire(c, m.model, "model", l as u32);
        let d = &lease.tensors[0];
        let at = d.arena_offset as usize;
        assert_eq!(&map[at..at + d.len as usize], &t.data[..], "model {} layer {l}", m.model);
        release(c, m.model, lease.lease);
    }
}

fn resident(c: &mut Client, model: u64) -> u32 {
    let models = c.list_models().expect("list_models");
    models.iter().find(|i| i.model == model).expect("listed").resident_layers
}

#[test]
fn base_and_refiner_take_turns_through_ferryd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).expect("root");
    let (base, base_t) = model(&root, "base.safetensors", 6, 1);
    let (refiner, refiner_t) = model(&root, "refiner.safetensors", 5, 7);

    let d = start(dir.path());
    // The pipeline's client holds both models; a second client shares the base.
    let mut a = Client::connect(&d.socket, "pipeline").expect("connect a");
    let mut other = Client::connect(&d.socket, "other").expect("connect other");
    let map = map_arena(&mut a);
    let b = a.open_model(&base).expect("base");
    let r = a.open_model(&refiner).expect("refiner");
    let b2 = other.open_model(&base).expect("other opens base");
    assert_eq!(b.model, b2.model, "one shared base model");
    assert_eq!(a.stats().expect("stats").budget, BUDGET);

    a.set_residency(b.model, None, Policy::None).expect("base resident");
    check_all(&mut a, &map, &b, &base_t);
    assert_eq!(resident(&mut a, b.model), 6);
    // The refiner cannot be reserved while the base holds its memory.
    let e = a.set_residency(r.model, None, Policy::None).expect_err("no room for the refiner");
    assert!(
        matches!(e.code(), Some(ErrorCode::OutOfDeviceMemory | ErrorCode::BudgetTooSmall)),
        "{e}"
    );

    // Another client's lease on the base blocks the offload; nothing changes.
    let held = acquire(&mut other, b.model, "model", 2);
    let e = a.offload(b.model, None).expect_err("busy");
    assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}");
    let e = a.offload(b.model, Some("model")).expect_err("busy");
    assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}");
    assert_eq!(resident(&mut a, b.model), 6, "nothing changed");
    release(&mut other, b.model, held.lease);

    for round in 0..3 {
        // Base out (for every client of it) while the refiner runs.
        let freed = a.offload(b.model, None).expect("base out");
        assert_eq!(freed, 6 * LAYER as u64, "round {round}: the base's whole reservation");
        assert_eq!(resident(&mut other, b.model), 0, "round {round}: off for everyone");
        assert_eq!(a.offload(b.model, None).expect("again"), 0, "round {round}: already off");
        a.set_residency(r.model, None, Policy::None).expect("refiner in");
        check_all(&mut a, &map, &r, &refiner_t);
        // Refiner out, base back in ahead of use.
        let freed = a.offload(r.model, None).expect("refiner out");
        assert_eq!(freed, 5 * LAYER as u64, "round {round}");
        a.onload(b.model, None).expect("base back");
        check_all(&mut a, &map, &b, &base_t);
        // The other client reads the same bytes again.
        check_all(&mut other, &map, &b2, &base_t);
        assert_eq!(resident(&mut a, b.model), 6, "round {round}");
        let st = a.stats().expect("stats");
        assert!(st.peak_device_bytes <= st.budget, "round {round}: {st:?}");
    }

    // One component out: its layers leave, they come back with onload (or on use).
    let freed = a.offload(b.model, Some("model")).expect("component out");
    assert_eq!(freed, 6 * LAYER as u64);
    assert_eq!(resident(&mut a, b.model), 0);
    a.onload(b.model, Some("model")).expect("component back");
    check_all(&mut a, &map, &b, &base_t);

    // Typed errors for bad input.
    let e = a.offload(b.model, Some("nope")).expect_err("no such component");
    assert_eq!(e.code(), Some(ErrorCode::UnknownComponent), "{e}");
    let e = a.onload(b.model, Some("nope")).expect_err("no such component");
    assert_eq!(e.code(), Some(ErrorCode::UnknownComponent), "{e}");
    let e = other.offload(r.model, None).expect_err("not open on that connection");
    assert_eq!(e.code(), Some(ErrorCode::UnknownModel), "{e}");
    let e = a.onload(9999, None).expect_err("no such model");
    assert_eq!(e.code(), Some(ErrorCode::UnknownModel), "{e}");

    let st = a.stats().expect("stats");
    assert!(st.peak_device_bytes <= st.budget, "{st:?}");
    a.close().expect("close a");
    other.close().expect("close other");
}

/// `ferryctl offload` / `onload` on a model another client holds: the change is the shared
/// model's, and the JSON says what was freed.
#[test]
fn ferryctl_offloads_and_onloads_a_model_another_client_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).expect("root");
    let (base, base_t) = model(&root, "base.safetensors", 6, 1);
    let d = start(dir.path());
    let mut a = Client::connect(&d.socket, "holder").expect("connect");
    let map = map_arena(&mut a);
    let b = a.open_model(&base).expect("base");
    a.set_residency(b.model, None, Policy::None).expect("resident");
    check_all(&mut a, &map, &b, &base_t);

    let ctl = |args: &[&str]| {
        let o = Command::new(cargo_bin("ferryctl"))
            .args(args)
            .arg(&base)
            .arg("--socket")
            .arg(&d.socket)
            .arg("--json")
            .output()
            .expect("run ferryctl");
        assert!(o.status.success(), "ferryctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let v = ctl(&["offload"]);
    assert_eq!(v["freed_bytes"], 6 * LAYER as u64, "{v}");
    assert_eq!(v["already_open"], true, "{v}");
    assert_eq!(resident(&mut a, b.model), 0);
    let v = ctl(&["onload"]);
    assert_eq!(v["freed_bytes"], serde_json::Value::Null, "{v}");
    check_all(&mut a, &map, &b, &base_t);
    assert_eq!(resident(&mut a, b.model), 6);
    let v = ctl(&["offload", "--component", "model"]);
    assert_eq!(v["freed_bytes"], 6 * LAYER as u64, "{v}");

    // A bad component is a clear error and a failure exit.
    let o = Command::new(cargo_bin("ferryctl"))
        .args(["offload", "--component", "nope"])
        .arg(&base)
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .expect("run ferryctl");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown_component"), "{err}");
    a.close().expect("close");
}
