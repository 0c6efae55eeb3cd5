//! One ferryd serving several devices (issue 10), on the host backend simulating three: device 0
//! and 1 serve (device 1 bound to this machine's first NUMA node, when it reports one), device
//! 2 is configured on a NUMA node that does not exist and so fails to open, reported clearly
//! while the others serve.
//!
//! Checked against a real `ferryd`: placement by index and by UUID, the same files on two
//! devices being two models with their own bytes in their own arenas, budgets that are
//! independent (filling one device leaves the other's alone; peaks never pass either budget),
//! and a client stuck waiting for memory on device 0 never holding up a client on device 1.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use ferry::client::{Client, ClientError};
use ferry::protocol::{DeviceSel, ErrorCode, Message, ModelOpened, Policy, Threshold};
use ferry_tests::ferryd::{Ferryd, acquire, ferryctl, release, stdout_ok};
use ferry_tests::{Tensor, u8_blocks, write_file};

const LAYER: usize = 64 << 10;
/// Eight layers' room per device.
const BUDGET: u64 = 8 * LAYER as u64;

struct Setup {
    _dir: tempfile::TempDir,
    ferryd: Ferryd,
    root: PathBuf,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    std::fs::create_dir(&root).expect("models dir");
    let socket = dir.path().join("ferryd.sock");
    let config = dir.path().join("ferryd.toml");
    let node1 = match first_numa_node() {
        Some(n) => format!("\"1\" = {n}, "),
        None => String::new(),
    };
    std::fs::write(
        &config,
        format!(
            "device = \"host\"\nhost_devices = 3\nhost_memory = {}\nbudget = {BUDGET}\n\
             numa_nodes = {{ {node1}\"2\" = 99 }}\nmodel_roots = [{:?}]\n\
             default_policy = \"sequential\"\nlog = \"warn\"\n",
            4 * BUDGET,
            root.to_str().expect("utf-8"),
        ),
    )
    .expect("config");
    let ferryd = Ferryd::start(&socket, ["--config".as_ref(), config.as_os_str()]);
    Setup { _dir: dir, ferryd, root }
}

/// The first NUMA node this machine reports (none in containers that hide sysfs).
fn first_numa_node() -> Option<u32> {
    ferry::numa::Topology::detect().nodes().first().map(|n| n.id)
}

fn connect(s: &Setup) -> Client {
    Client::connect(&s.ferryd.socket, "multi-device test").expect("connect")
}

/// A model of `layers` layers of `LAYER` bytes.
fn model(root: &Path, name: &str, layers: usize, seed: u8) -> (PathBuf, Vec<Tensor>) {
    let tensors =
        u8_blocks(layers, LAYER, |l, i| (i as u8).wrapping_mul(29).wrapping_add(seed ^ l as u8));
    let path = root.join(name);
    write_file(&path, &tensors).expect("write");
    (path, tensors)
}

fn server_code(r: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(e @ ClientError::Server { .. }) => {
            let code = e.code().expect("known code");
            (code, e.to_string())
        }
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// Maps a device's arena read-only.
fn arena_of(c: &mut Client, device: DeviceSel) -> memmap2::Mmap {
    let (a, fd) = c.map_arena_on(device).expect("map_arena_on");
    let file = std::fs::File::from(fd);
    // SAFETY: a read-only shared mapping of ferryd's arena memfd; only bytes of layers this
    // test holds ready leases on are read, and ferryd does not write those meanwhile.
    let map = unsafe { memmap2::Mmap::map(&file) }.expect("mmap");
    assert_eq!(map.len() as u64, a.len);
    map
}

/// Leases every layer in turn, checks its bytes in `arena` against the file, releases it.
fn check_all(c: &mut Client, arena: &[u8], m: &ModelOpened, tensors: &[Tensor]) {
    for (l, t) in tensors.iter().enumerate() {
        let lease = acquire(c, m.model, "model", l as u32);
        let d = &lease.tensors[0];
        let at = usize::try_from(d.arena_offset).expect("offset");
        assert_eq!(&arena[at..at + LAYER], &t.data[..], "layer {l} of model {}", m.model);
        release(c, m.model, lease.lease);
    }
}

#[test]
fn devices_are_listed_and_the_failed_one_is_reported_while_the_others_serve() {
    let s = start();
    let mut c = connect(&s);
    let devices = c.list_devices().expect("list_devices");
    assert_eq!(devices.len(), 3, "{devices:?}");
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d.index as usize, i);
        assert_eq!(d.uuid, format!("HOST-{i:04}"));
        assert_eq!(d.label, format!("host:{i}"));
    }
    for d in &devices[..2] {
        assert_eq!(d.error, None);
        assert_eq!(d.stats.as_ref().map(|s| s.budget), Some(BUDGET), "{d:?}");
    }
    assert_eq!(devices[1].numa_node, first_numa_node(), "device 1's configured node");
    let failed = &devices[2];
    assert!(failed.stats.is_none());
    let reason = failed.error.as_deref().expect("device 2 failed");
    assert!(reason.contains("NUMA node 99 does not exist"), "{reason}");

    // Requests naming it get that reason, typed; unknown names are a different error.
    let (path, _) = model(&s.root, "m.safetensors", 2, 1);
    let (code, msg) = server_code(c.open_model_on(&path, DeviceSel::Index(2)));
    assert_eq!(code, ErrorCode::DeviceUnavailable);
    assert!(msg.contains("device 2 (host:2) is unavailable") && msg.contains("NUMA node 99"));
    let (code, msg) = server_code(c.open_model_on(&path, DeviceSel::Index(7)));
    assert_eq!(code, ErrorCode::UnknownDevice);
    assert!(msg.contains("there is no device 7 (this server has 3 device(s)"), "{msg}");
    let (code, _) = server_code(c.open_model_on(&path, DeviceSel::Uuid("GPU-nope".into())));
    assert_eq!(code, ErrorCode::UnknownDevice);
    let (code, _) = server_code(c.map_arena_on(DeviceSel::Uuid("HOST-0002".into())));
    assert_eq!(code, ErrorCode::DeviceUnavailable);
    // The connection still serves, on the devices that work.
    let m = c.open_model_on(&path, DeviceSel::Uuid("host-0001".into())).expect("by uuid");
    assert_eq!(m.model >> 48, 1);

    let out = stdout_ok(&ferryctl(&s.ferryd.socket, &["devices"]));
    assert!(out.contains("HOST-0002") && out.contains("NUMA node 99 does not exist"), "{out}");
    let json = stdout_ok(&ferryctl(&s.ferryd.socket, &["devices", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["devices"].as_array().map(Vec::len), Some(3), "{json}");
    assert_eq!(v["devices"][1]["models"], 1, "{json}");
}

#[test]
fn placement_by_index_and_uuid_gives_each_device_its_own_copy() {
    let s = start();
    let (path, tensors) = model(&s.root, "m.safetensors", 4, 7);
    let mut a = connect(&s);
    let mut b = connect(&s);
    let plain = a.open_model(&path).expect("default device");
    let on0 = b.open_model_on(&path, DeviceSel::Index(0)).expect("index 0");
    let on1 = b.open_model_on(&path, DeviceSel::Uuid("HOST-0001".into())).expect("uuid 1");
    assert_eq!(plain.model, on0.model, "same files, same device: one model");
    assert_ne!(on0.model, on1.model, "same files on two devices: two models");
    assert_eq!((on0.model >> 48, on1.model >> 48), (0, 1));

    let arena0 = arena_of(&mut a, DeviceSel::Index(0));
    let arena1 = arena_of(&mut b, DeviceSel::Index(1));
    check_all(&mut a, &arena0, &plain, &tensors);
    check_all(&mut b, &arena1, &on1, &tensors);

    // Each device streamed the model once into its own arena, plus the first layer of the
    // next pass (sequential's lookahead wraps around).
    let devices = a.list_devices().expect("devices");
    let streamed = |i: usize| devices[i].stats.as_ref().map(|s| s.bytes_streamed);
    let pass = (tensors.len() * LAYER + LAYER) as u64;
    assert_eq!(streamed(0), Some(pass));
    assert_eq!(streamed(1), Some(pass));
    // `stats` is the sum over the devices that serve.
    let total = a.stats().expect("stats");
    assert_eq!(total.bytes_streamed, 2 * pass);
    assert_eq!(total.budget, 2 * BUDGET);

    let out = stdout_ok(&ferryctl(&s.ferryd.socket, &["models", "--json"]));
    assert!(out.contains(&on1.model.to_string()), "{out}");

    // By descriptor too: the file as the client opened it, on the device it names.
    let fd = std::fs::File::open(&path).expect("open");
    let by_fd = a
        .open_model_fd_on(std::os::fd::AsFd::as_fd(&fd), "m", DeviceSel::Index(1))
        .expect("fd on 1");
    assert_eq!(by_fd.model >> 48, 1);
    check_all(&mut a, &arena1, &by_fd, &tensors);
}

#[test]
fn budgets_are_per_device() {
    let s = start();
    // Exactly one device's budget.
    let (full, _) = model(&s.root, "full.safetensors", 8, 3);
    let (over, _) = model(&s.root, "over.safetensors", 9, 4);
    let mut c = connect(&s);
    let f0 = c.open_model_on(&full, DeviceSel::Index(0)).expect("full on 0");
    c.set_residency(f0.model, None, Policy::None).expect("reserve all of device 0");
    // Device 0 is full: a second whole-model reservation there cannot fit...
    let o0 = c.open_model_on(&over, DeviceSel::Index(0)).expect("over on 0");
    let (code, _) = server_code(c.set_residency(o0.model, None, Policy::None));
    assert!(matches!(code, ErrorCode::BudgetTooSmall | ErrorCode::OutOfDeviceMemory), "{code:?}");
    // ... while device 1's budget is untouched by it.
    let f1 = c.open_model_on(&full, DeviceSel::Index(1)).expect("full on 1");
    c.set_residency(f1.model, None, Policy::None).expect("reserve all of device 1");
    for l in 0..8 {
        let lease = acquire(&mut c, f1.model, "model", l);
        release(&mut c, f1.model, lease.lease);
    }
    let devices = c.list_devices().expect("devices");
    for d in &devices[..2] {
        let st = d.stats.as_ref().expect("stats");
        assert!(st.peak_device_bytes <= st.budget, "{d:?}");
        assert_eq!(st.budget, BUDGET);
    }
    assert_eq!(devices[1].stats.as_ref().map(|s| s.device_bytes), Some(BUDGET));
}

#[test]
fn a_client_waiting_on_one_device_never_blocks_another_device() {
    let s = start();
    let (big, big_tensors) = model(&s.root, "big.safetensors", 12, 5);
    let (other, other_tensors) = model(&s.root, "other.safetensors", 12, 6);

    // Client A fills device 0 with leases: 8 layers, the whole budget.
    let mut a = connect(&s);
    let m0 = a.open_model_on(&big, DeviceSel::Index(0)).expect("big on 0");
    // LRU within the whole budget: a client may hold as many leases as fit.
    a.set_residency(m0.model, None, Policy::Lru { threshold: Threshold::Bytes(BUDGET) })
        .expect("lru");
    let held: Vec<u64> = (0..8).map(|l| acquire(&mut a, m0.model, "model", l).lease).collect();

    // Client B asks device 0 for a ninth layer: it must wait until A releases.
    let socket = s.ferryd.socket.clone();
    let big_path = big.clone();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut b = Client::connect(&socket, "waiter").expect("connect");
        let m = b.open_model_on(&big_path, DeviceSel::Index(0)).expect("big on 0");
        tx.send("asking").expect("send");
        let r = b.call(
            ferry::protocol::Acquire { model: m.model, component: "model".into(), layer: 8 }.into(),
            &[],
        );
        tx.send(match r {
            Ok(Message::Leased(_)) => "leased",
            _ => "failed",
        })
        .expect("send");
    });
    assert_eq!(rx.recv().expect("waiter started"), "asking");
    // B is waiting inside device 0's engine (its gauge says so) before C starts.
    let waiting_on = |c: &mut Client, i: usize| c.list_devices().expect("devices")[i].waiting;
    ferry_tests::ferryd::wait_until("B waiting on device 0", Duration::from_secs(30), || {
        waiting_on(&mut a, 0) == 1
    });

    // Meanwhile client C streams every layer of another model on device 1, several times
    // over (its budget holds 8 of the 12 layers, so it evicts and reloads), bytes checked.
    let mut c = connect(&s);
    let m1 = c.open_model_on(&other, DeviceSel::Index(1)).expect("other on 1");
    let arena1 = arena_of(&mut c, DeviceSel::Index(1));
    for _ in 0..5 {
        check_all(&mut c, &arena1, &m1, &other_tensors);
    }
    // C is done while B still waits: device 0's full budget held up nobody on device 1.
    assert!(rx.try_recv().is_err(), "B cannot have its layer while A holds device 0");
    assert_eq!(waiting_on(&mut c, 0), 1, "B waited through all of C's passes");
    assert_eq!(waiting_on(&mut c, 1), 0);

    for lease in held {
        release(&mut a, m0.model, lease);
    }
    assert_eq!(rx.recv_timeout(Duration::from_secs(30)).expect("B answered"), "leased");
    waiter.join().expect("waiter thread");
    assert_eq!(waiting_on(&mut a, 0), 0);
    let arena0 = arena_of(&mut a, DeviceSel::Index(0));
    check_all(&mut a, &arena0, &m0, &big_tensors);
    for d in &a.list_devices().expect("devices")[..2] {
        let st = d.stats.as_ref().expect("stats");
        assert!(st.peak_device_bytes <= st.budget, "{d:?}");
    }
}

#[test]
fn models_preload_onto_the_device_they_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, tensors) = model(dir.path(), "pre.safetensors", 3, 9);
    let socket = dir.path().join("ferryd.sock");
    let on = format!("HOST-0001={}", path.display());
    let budget = BUDGET.to_string();
    let ferryd = Ferryd::start(
        &socket,
        [
            "--device",
            "host",
            "--host-devices",
            "2",
            "--budget",
            &budget,
            "--log",
            "warn",
            "--model-root",
            dir.path().to_str().expect("utf-8"),
            "--preload-on",
            &on,
        ],
    );
    let mut c = Client::connect(&ferryd.socket, "preload test").expect("connect");
    let models = c.list_models().expect("models");
    assert_eq!(models.len(), 1, "{models:?}");
    assert_eq!(models[0].model >> 48, 1, "preloaded on device 1");
    // Opening the same path on that device shares the preloaded model.
    let m = c.open_model_on(&path, DeviceSel::Index(1)).expect("open on 1");
    assert_eq!(m.model, models[0].model);
    let arena = arena_of(&mut c, DeviceSel::Index(1));
    check_all(&mut c, &arena, &m, &tensors);
    drop(c);

    // A device that does not serve cannot take a preload: ferryd says so and exits.
    let out = std::process::Command::new(ferry_tests::cargo_bin("ferryd"))
        .args(["--device", "host", "--host-devices", "2", "--check", "--preload-on"])
        .arg(format!("5={}", path.display()))
        .output()
        .expect("ferryd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("there is no device 5"), "{err}");
}
