//! End to end: `ferryd` started from its own binary with a config file, two client processes'
//! worth of connections on one model seeing the same shared device bytes, one of them through a
//! LoRA view, then a clean SIGTERM.
//!
//! Values are chosen so every product and sum is exact in f16 and f32 (small multiples of powers
//! of two), so the expected merged bytes are computed here exactly, with no tolerance.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry::Dtype;
use ferry::client::Client;
use ferry::protocol::{ErrorCode, Leased, LoraMode, LoraRef, LoraSource, ModelOpened};
use ferry_tests::ferryd::{Ferryd, acquire, map_arena, release, wait_until};
use ferry_tests::{Tensor, write_file};
use half::f16;

const BLOCKS: usize = 4;
const OUT: usize = 16;
const IN: usize = 8;
const RANK: usize = 2;

fn f16_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| f16::from_f32(f(i)).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F16, shape: shape.to_vec(), data }
}

fn f32_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| f(i).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data }
}

/// Base weight of block `b`: multiples of 1/8 in [-2, 2).
fn base_value(b: usize, i: usize) -> f32 {
    ((i * 7 + b * 3) % 32) as f32 / 8.0 - 2.0
}

/// LoRA factors: `down` (RANK × IN) and `up` (OUT × RANK), values in {-1, -0.5, 0, 0.5, 1}.
fn down_value(i: usize) -> f32 {
    ((i % 5) as f32 - 2.0) * 0.5
}
fn up_value(i: usize) -> f32 {
    ((i * 3 % 5) as f32 - 2.0) * 0.5
}

/// `W + scale · (alpha / rank) · up @ down` for block `b`, as f16 bytes (exact by construction).
fn merged_bytes(b: usize, scale: f32, alpha: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT * IN * 2);
    for o in 0..OUT {
        for i in 0..IN {
            let mut delta = 0.0f32;
            for r in 0..RANK {
                delta += up_value(o * RANK + r) * down_value(r * IN + i);
            }
            let w = base_value(b, o * IN + i) + scale * (alpha / RANK as f32) * delta;
            out.extend_from_slice(&f16::from_f32(w).to_le_bytes());
        }
    }
    out
}

/// Writes, in `dir`, the model (`BLOCKS` f16 blocks) and a PEFT-layout LoRA touching block 1
/// only, alpha 4 (so alpha / rank = 2); returns the model's path, its tensors and the LoRA's
/// path.
fn write_model_and_lora(dir: &Path) -> (std::path::PathBuf, Vec<Tensor>, std::path::PathBuf) {
    std::fs::create_dir_all(dir).expect("model dir");
    let model = dir.join("m.safetensors");
    let blocks: Vec<Tensor> = (0..BLOCKS)
        .map(|b| f16_tensor(&format!("blocks.{b}.proj.weight"), &[OUT, IN], |i| base_value(b, i)))
        .collect();
    write_file(&model, &blocks).expect("model");
    let lora = dir.join("style.safetensors");
    write_file(
        &lora,
        &[
            f32_tensor("blocks.1.proj.lora_A.weight", &[RANK, IN], down_value),
            f32_tensor("blocks.1.proj.lora_B.weight", &[OUT, RANK], up_value),
            f32_tensor("blocks.1.proj.alpha", &[], |_| 4.0),
        ],
    )
    .expect("lora");
    (model, blocks, lora)
}

/// The (component, layer index) of block `b`'s layer.
fn block(m: &ModelOpened, b: usize) -> (String, u32) {
    for c in &m.components {
        for (i, l) in c.layers.iter().enumerate() {
            if l.name.ends_with(&format!("blocks.{b}")) || l.name == b.to_string() {
                return (c.name.clone(), i as u32);
            }
        }
    }
    panic!("no layer for block {b} in {m:?}");
}

/// The bytes a lease's only weight tensor has in the arena, and where.
fn weight_bytes(map: &[u8], l: &Leased) -> (u64, Vec<u8>) {
    let t = l.tensors.iter().find(|t| t.name.ends_with("weight")).expect("a weight tensor");
    let at = t.arena_offset as usize;
    (t.arena_offset, map[at..at + t.len as usize].to_vec())
}

fn start(dir: &Path) -> Ferryd {
    let root = dir.join("models");
    let socket = dir.join("ferryd.sock");
    let config = dir.join("ferryd.toml");
    std::fs::write(
        &config,
        format!(
            "device = \"host\"\nhost_memory = 67108864\nsocket = {:?}\nmodel_roots = [{:?}]\n\
             default_policy = \"balanced\"\nmax_views_per_client = 1\nlog = \"warn\"\n",
            socket.to_str().expect("utf-8"),
            root.to_str().expect("utf-8"),
        ),
    )
    .expect("config");
    // The socket is in the config file; `--socket` names the same path.
    Ferryd::start(&socket, ["--config".as_ref(), config.as_os_str()])
}

#[test]
fn two_clients_share_device_bytes_and_one_sees_them_through_a_lora_view() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, blocks, lora) = write_model_and_lora(&dir.path().join("models"));

    let mut d = start(dir.path());
    let mut a = Client::connect(&d.socket, "client-a").expect("connect a");
    let mut b = Client::connect(&d.socket, "client-b").expect("connect b");
    let ma = a.open_model(&model).expect("a opens");
    let mb = b.open_model(&model).expect("b opens");
    assert_eq!(ma.model, mb.model, "one model, shared by both clients");
    let map_a = map_arena(&mut a);
    let map_b = map_arena(&mut b);

    // Both clients hold block 0 at once: the same device bytes, equal to the file.
    let (c0, l0) = block(&ma, 0);
    let la = acquire(&mut a, ma.model, &c0, l0);
    let lb = acquire(&mut b, mb.model, &c0, l0);
    let (off_a, bytes_a) = weight_bytes(&map_a, &la);
    let (off_b, bytes_b) = weight_bytes(&map_b, &lb);
    assert_eq!(off_a, off_b, "both clients see one copy on the device");
    assert_eq!(bytes_a, blocks[0].data);
    assert_eq!(bytes_b, blocks[0].data);
    release(&mut a, ma.model, la.lease);
    release(&mut b, mb.model, lb.lease);

    // Client B looks at the model through a LoRA view (backup mode, strength 0.5).
    let stack = vec![LoraRef {
        source: LoraSource::Path(lora.to_str().expect("utf-8").into()),
        scale: 0.5,
    }];
    let v = b.apply_lora(mb.model, stack, LoraMode::Backup, &[]).expect("apply_lora");
    assert_eq!(v.merged, 1, "{v:?}");
    assert!(v.loras.iter().all(|r| r.unmatched.is_empty()), "{v:?}");

    // The touched layer: B sees the merged weight, A (on the base, at the same time) the
    // original, each in its own device memory.
    let (c1, l1) = block(&ma, 1);
    let lb = acquire(&mut b, v.view, &c1, l1);
    let la = acquire(&mut a, ma.model, &c1, l1);
    let (off_view, bytes_view) = weight_bytes(&map_b, &lb);
    let (off_base, bytes_base) = weight_bytes(&map_a, &la);
    assert_ne!(off_view, off_base, "the adapted layer has memory of its own");
    assert_eq!(bytes_view, merged_bytes(1, 0.5, 4.0), "merged weight");
    assert_ne!(bytes_view, blocks[1].data, "the LoRA changes the weight");
    assert_eq!(bytes_base, blocks[1].data, "the base is untouched");
    release(&mut b, v.view, lb.lease);
    release(&mut a, ma.model, la.lease);

    // An untouched layer through the view is the base's own copy: shared, not duplicated.
    let (c2, l2) = block(&ma, 2);
    let lb = acquire(&mut b, v.view, &c2, l2);
    let la = acquire(&mut a, ma.model, &c2, l2);
    let (off_view, bytes_view) = weight_bytes(&map_b, &lb);
    let (off_base, bytes_base) = weight_bytes(&map_a, &la);
    assert_eq!(off_view, off_base, "untouched layers are shared between view and base");
    assert_eq!(bytes_view, blocks[2].data);
    assert_eq!(bytes_base, blocks[2].data);
    release(&mut b, v.view, lb.lease);
    release(&mut a, ma.model, la.lease);

    // Removing the view: the layer comes back bit-exact for B as well.
    b.remove_lora(v.view).expect("remove_lora");
    let lb = acquire(&mut b, mb.model, &c1, l1);
    assert_eq!(weight_bytes(&map_b, &lb).1, blocks[1].data, "bit-exact after removal");
    release(&mut b, mb.model, lb.lease);

    // B leaves; A keeps working.
    drop(b);
    let la = acquire(&mut a, ma.model, &c0, l0);
    assert_eq!(weight_bytes(&map_a, &la).1, blocks[0].data);
    release(&mut a, ma.model, la.lease);
    // B's connection is gone once ferryd has seen its end of stream.
    wait_until("client-b to be gone", Duration::from_secs(10), || {
        a.list_clients().expect("clients").iter().all(|c| c.name != "client-b")
    });
    drop(a);

    // SIGTERM drains and exits 0.
    d.signal(libc::SIGTERM);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "ferryd did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "ferryd exited with {status}");
}

#[test]
fn models_and_loras_by_descriptor_are_read_through_the_descriptor_and_views_are_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("models")).expect("root");
    // Outside the model roots: by path it is refused, by descriptor it is the client's to lend.
    let (model, blocks, lora) = write_model_and_lora(&dir.path().join("private"));

    let d = start(dir.path());
    let mut a = Client::connect(&d.socket, "a").expect("connect a");
    let mut b = Client::connect(&d.socket, "b").expect("connect b");
    let err = a.open_model(&model).expect_err("outside the roots by path");
    assert_eq!(err.code(), Some(ErrorCode::NotPermitted), "{err}");

    let fa = File::open(&model).expect("open");
    let ma = a.open_model_fd(fa.as_fd(), "mine").expect("open by descriptor");
    let fb = File::open(&model).expect("open");
    let mb = b.open_model_fd(fb.as_fd(), "theirs").expect("open by descriptor");
    assert_eq!(ma.model, mb.model, "the same file by descriptor is one model");
    let map = map_arena(&mut a);
    let (c0, l0) = block(&ma, 0);
    let l = acquire(&mut a, ma.model, &c0, l0);
    assert_eq!(weight_bytes(&map, &l).1, blocks[0].data);
    release(&mut a, ma.model, l.lease);

    // A LoRA by descriptor (index 0 of the frame's descriptors).
    let lf = File::open(&lora).expect("open lora");
    let stack = vec![LoraRef { source: LoraSource::Fd(0), scale: 0.5 }];
    let v = a.apply_lora(ma.model, stack, LoraMode::Fuse, &[lf.as_fd()]).expect("lora by fd");
    assert_eq!(v.merged, 1, "{v:?}");
    let (c1, l1) = block(&ma, 1);
    let l = acquire(&mut a, v.view, &c1, l1);
    assert_eq!(weight_bytes(&map, &l).1, merged_bytes(1, 0.5, 4.0));
    release(&mut a, v.view, l.lease);

    // max_views_per_client = 1: a second view is refused, typed.
    let stack = vec![LoraRef { source: LoraSource::Fd(0), scale: 1.0 }];
    let err = a.apply_lora(ma.model, stack, LoraMode::Backup, &[lf.as_fd()]).expect_err("cap");
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    a.remove_lora(v.view).expect("remove");

    // A descriptor index beyond those sent, and a descriptor that is not a file.
    let stack = vec![LoraRef { source: LoraSource::Fd(3), scale: 1.0 }];
    let err = a.apply_lora(ma.model, stack, LoraMode::Backup, &[lf.as_fd()]).expect_err("index");
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    let (r, _w) = std::io::pipe().expect("pipe");
    let err = a.open_model_fd(r.as_fd(), "pipe").expect_err("a pipe");
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    assert!(err.to_string().contains("neither a regular file nor a directory"), "{err}");
    // The connection still works.
    let l = acquire(&mut a, ma.model, &c0, l0);
    release(&mut a, ma.model, l.lease);
}

#[test]
fn sighup_reloads_model_roots_and_limits_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dir.path().join("models");
    let second = dir.path().join("more-models");
    std::fs::create_dir_all(&first).expect("root");
    std::fs::create_dir_all(&second).expect("root 2");
    let model = second.join("m.safetensors");
    let blocks: Vec<Tensor> = (0..2)
        .map(|b| f16_tensor(&format!("blocks.{b}.proj.weight"), &[OUT, IN], |i| base_value(b, i)))
        .collect();
    write_file(&model, &blocks).expect("model");
    let mut d = start(dir.path());
    let config = dir.path().join("ferryd.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let hup = |d: &Ferryd| d.signal(libc::SIGHUP);

    let mut c = Client::connect(&d.socket, "c").expect("connect");
    let err = c.open_model(&model).expect_err("not under the first root");
    assert_eq!(err.code(), Some(ErrorCode::NotPermitted), "{err}");

    // A second root in the file, then SIGHUP: the same connection can now open the model.
    let roots = format!(
        "model_roots = [{:?}, {:?}]",
        first.to_str().expect("utf-8"),
        second.to_str().expect("utf-8")
    );
    let old_roots = format!("model_roots = [{:?}]", first.to_str().expect("utf-8"));
    std::fs::write(&config, text.replace(&old_roots, &roots)).expect("rewrite");
    hup(&d);
    wait_until("the reload", Duration::from_secs(10), || c.open_model(&model).is_ok());
    let m = c.open_model(&model).expect("open under the new root");
    let l = acquire(&mut c, m.model, &block(&m, 0).0, block(&m, 0).1);
    release(&mut c, m.model, l.lease);

    // A broken file: logged, nothing changes, the daemon keeps serving.
    std::fs::write(&config, "this is = not [valid toml").expect("break");
    hup(&d);
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.child.try_wait().expect("try_wait").is_none(), "ferryd survived a bad reload");
    let mut c2 = Client::connect(&d.socket, "c2").expect("connect after a bad reload");
    c2.open_model(&model).expect("the reloaded roots are still in force");
    drop(c2);
    drop(c);
}
