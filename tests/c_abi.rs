//! Builds `libferry.a` and links the C tests in `tests/c/` against it, with AddressSanitizer
//! (and its LeakSanitizer) and UndefinedBehaviorSanitizer, then runs them: `version.c` (the
//! smoke test), `engine.c` and `lora.c` (the engine end to end, checking bytes against files
//! written here, once in-process and once in daemon mode against a real `ferryd`),
//! `policies.c` (`FERRY_POLICY_AUTO` and the SD.Next presets, in both modes), `misuse.c`
//! (error paths) and `daemon.c` (daemon mode's own failures: bad sockets, a CUDA
//! daemon, the daemon killed while engines are open). Also: the example in `clients/c/` in
//! both modes, and the library installed by `ffi/install.sh` found through pkg-config.
//!
//! Skipped (with a message) only when no C compiler `cc` is installed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use ferry::Dtype;
use ferry::lora::math::{self, Delta, Factor};
use ferry::protocol::socket::{recv_frame, send_frame};
use ferry::protocol::{
    Ack, ArenaFd, ComponentSummary, CudaArena, CudaHandle, ErrorCode, ErrorReply, LayerSummary,
    Leased, Message, ModelOpened, PROTOCOL_VERSION, TensorDesc, features,
};
use ferry_tests::ferryd::{FAKE_GPU_UUID, fake_welcome};
use ferry_tests::{Tensor, build_ffi, cargo_bin, u8_blocks, workspace_root as root, write_file};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Compiles `tests/c/<name>.c` against `include/ferry.h` and `libferry.a` with ASan and UBSan
/// (LeakSanitizer comes with ASan on Linux) and returns the executable.
fn compile(lib_dir: &Path, name: &str) -> PathBuf {
    compile_source(lib_dir, &format!("tests/c/{name}.c"), &format!("c-abi-{name}"))
}

/// Compiles the C file `source` (relative to the repository root) as [`compile`] does, into
/// `<lib_dir>/<exe_name>`, once per test process: tests running in parallel share the program
/// (one compiling it while another runs it would fail with "text file busy").
fn compile_source(lib_dir: &Path, source: &str, exe_name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(exe) = built.get(exe_name) {
        return exe.clone();
    }
    let exe = cc_sanitized(lib_dir, source, exe_name);
    built.insert(exe_name.to_string(), exe.clone());
    exe
}

fn cc_sanitized(lib_dir: &Path, source: &str, exe_name: &str) -> PathBuf {
    let staticlib = lib_dir.join("libferry.a");
    assert!(staticlib.is_file(), "{} was not built", staticlib.display());
    let exe = lib_dir.join(exe_name);
    let output = Command::new("cc")
        .current_dir(root())
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
            "-Iinclude",
            "-Itests/c",
        ])
        .arg(source)
        .arg(&staticlib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("running cc");
    assert!(
        output.status.success(),
        "compiling {source} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// Runs a compiled C test with `args`; fails the test if it does not exit with 0. Returns
/// its standard output.
fn run(exe: &Path, args: &[&Path]) -> String {
    let output = sanitized(exe).args(args).output().expect("running a C test");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}{}",
        exe.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A command running a sanitized C program.
fn sanitized(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    // Leak checking on (the default with ASan on Linux, made explicit); a leak fails.
    cmd.env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env("UBSAN_OPTIONS", "print_stacktrace=1");
    cmd
}

/// The library directory, or `None` (with a message) when there is no C compiler.
fn setup() -> Option<PathBuf> {
    if !have("cc") {
        println!("c_abi: skipped, no C compiler `cc` on PATH");
        return None;
    }
    // Tests run in parallel and each would build; one build, shared.
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    Some(LIB.get_or_init(|| build_ffi(false)).clone())
}

/// The test model: `layers` blocks of three tensors (U8 weight, F32 bias, 2-D F16 proj).
fn model_tensors(layers: usize) -> Vec<Tensor> {
    let mut tensors = Vec::new();
    for l in 0..layers {
        tensors.push(Tensor::patterned(format!("blocks.{l}.weight"), Dtype::U8, &[20_000]));
        tensors.push(Tensor::patterned(format!("blocks.{l}.bias"), Dtype::F32, &[3]));
        tensors.push(Tensor::patterned(format!("blocks.{l}.proj"), Dtype::F16, &[4, 8]));
    }
    tensors
}

/// `ferry_dtype` numbering: the position in safetensors' (and ferry's) dtype order.
fn dtype_code(d: Dtype) -> usize {
    Dtype::ALL.iter().position(|x| *x == d).expect("a known dtype")
}

/// Writes the model, every tensor's bytes (`expected.bin`) and a manifest saying where each
/// is (`manifest.txt`: layer, offset, length, dtype, rank, dims, name).
fn write_model(dir: &Path, layers: usize) -> (PathBuf, PathBuf, PathBuf) {
    let tensors = model_tensors(layers);
    let model = dir.join("model.safetensors");
    write_file(&model, &tensors).expect("writing the model");
    let mut blob = Vec::new();
    let mut manifest = String::new();
    for t in &tensors {
        let layer: usize =
            t.name.split('.').nth(1).and_then(|l| l.parse().ok()).expect("blocks.<n>.");
        let dims: Vec<String> = t.shape.iter().map(ToString::to_string).collect();
        manifest.push_str(&format!(
            "{layer} {} {} {} {} {} {}\n",
            blob.len(),
            t.data.len(),
            dtype_code(t.dtype),
            t.shape.len(),
            dims.join(" "),
            t.name
        ));
        blob.extend_from_slice(&t.data);
    }
    let expected = dir.join("expected.bin");
    let manifest_path = dir.join("manifest.txt");
    std::fs::write(&expected, blob).expect("writing expected.bin");
    std::fs::write(&manifest_path, manifest).expect("writing manifest.txt");
    (model, expected, manifest_path)
}

#[test]
fn c_smoke_test() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "version");
    run(&exe, &[]);
}

/// tests/c/engine.c: a sequential pass over every layer on the host backend, every byte
/// compared with the file, then stats.
#[test]
fn c_engine_sequential_pass() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "engine");
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, expected, manifest) = write_model(dir.path(), 6);
    run(&exe, &[&model, &expected, &manifest]);
}

/// tests/c/misuse.c: NULL arguments, unknown ids, bad enums, busy, budget, wrong engine.
#[test]
fn c_misuse() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "misuse");
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, _, _) = write_model(dir.path(), 4);
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"this is not a safetensors file at all").expect("writing junk");
    run(&exe, &[&model, &junk]);
}

/// `cpp_compat` is on: the header must also compile as C++.
#[test]
fn header_compiles_as_cpp() {
    if !have("c++") {
        println!("c_abi: skipped, no C++ compiler `c++` on PATH");
        return;
    }
    let output = Command::new("c++")
        .current_dir(root())
        .args(["-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-x", "c++", "include/ferry.h"])
        .output()
        .expect("running c++");
    assert!(
        output.status.success(),
        "include/ferry.h does not compile as C++:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A running `ferryd` (host backend, 1 MiB budget, `root` as its model root) on a socket in
/// `dir`; killed on drop.
struct Ferryd {
    child: Child,
    socket: PathBuf,
}

impl Ferryd {
    fn start(dir: &Path, root: &Path) -> Ferryd {
        Ferryd::start_with(dir, root, &[])
    }

    /// [`Ferryd::start`] with more flags.
    fn start_with(dir: &Path, root: &Path, extra: &[&str]) -> Ferryd {
        let socket = dir.join("ferryd.sock");
        let child = Command::new(cargo_bin("ferryd"))
            .args(["--device", "host", "--budget", "1048576", "--host-memory", "2097152"])
            .args(extra)
            .args(["--log", "warn", "--socket"])
            .arg(&socket)
            .arg("--model-root")
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning ferryd");
        let mut d = Ferryd { child, socket };
        // Connectable, not just present: bind() and listen() are two system calls.
        let start = Instant::now();
        while UnixStream::connect(&d.socket).is_err() {
            assert!(d.child.try_wait().expect("try_wait").is_none(), "ferryd exited at start");
            assert!(start.elapsed() < Duration::from_secs(30), "ferryd's socket never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// SIGKILLs the daemon and reaps it: once this returns its sockets are closed.
    fn kill(&mut self) {
        self.child.kill().expect("killing ferryd");
        self.child.wait().expect("reaping ferryd");
    }
}

impl Drop for Ferryd {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// tests/c/engine.c in daemon mode: the same program as `c_engine_sequential_pass`, its
/// engine a connection to ferryd; every byte read through the mapped arena is compared with
/// the file.
#[test]
fn c_engine_sequential_pass_daemon_mode() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "engine");
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, expected, manifest) = write_model(dir.path(), 6);
    let daemon = Ferryd::start(dir.path(), dir.path());
    let out = run(&exe, &[&model, &expected, &manifest, &daemon.socket]);
    assert!(out.contains("engine.c (daemon mode)"), "{out}");
}

/// tests/c/devices.c: one daemon-mode engine per simulated device (by index and by UUID), each
/// reading its own device's arena; a device that failed to open, an unknown one and a malformed
/// name each fail with their own status.
#[test]
fn c_engines_on_named_devices_daemon_mode() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "devices");
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, _) = write_offload_models(dir.path());
    let daemon =
        Ferryd::start_with(dir.path(), dir.path(), &["--host-devices", "3", "--numa-node", "2=99"]);
    let layer = OFFLOAD_LAYER.to_string();
    let out = run(&exe, &[&base, Path::new(&layer), &daemon.socket]);
    assert!(out.contains("devices.c (daemon mode): ok"), "{out}");
}

/// Bytes of each layer of the offload models: six base layers and five refiner layers each fit
/// the 1 MiB budget alone, not together.
const OFFLOAD_LAYER: usize = 128 << 10;

/// The base (6 layers, seed 1) and refiner (5 layers, seed 7) of tests/c/offload.c: one U8
/// tensor per layer, byte i of layer l = (i * 31 + seed + l) mod 256.
fn write_offload_models(dir: &Path) -> (PathBuf, PathBuf) {
    let write = |name: &str, layers: usize, seed: usize| {
        let tensors = u8_blocks(layers, OFFLOAD_LAYER, |l, i| ((i * 31 + seed + l) & 0xff) as u8);
        let path = dir.join(name);
        write_file(&path, &tensors).expect("writing an offload model");
        path
    };
    (write("base.safetensors", 6, 1), write("refiner.safetensors", 5, 7))
}

/// tests/c/offload.c in-process: base and refiner take turns under one budget through
/// `ferry_offload` / `ferry_onload`, bytes exact; a held lease makes offload `FERRY_ERR_BUSY`.
#[test]
fn c_manual_offload() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "offload");
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, refiner) = write_offload_models(dir.path());
    let layer = PathBuf::from(OFFLOAD_LAYER.to_string());
    let out = run(&exe, &[&base, &refiner, &layer]);
    assert!(out.contains("offload.c (in-process)"), "{out}");
}

/// tests/c/offload.c in daemon mode: the same turns through ferryd (1 MiB budget), bytes read
/// through the mapped arena.
#[test]
fn c_manual_offload_daemon_mode() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "offload");
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, refiner) = write_offload_models(dir.path());
    let daemon = Ferryd::start(dir.path(), dir.path());
    let layer = PathBuf::from(OFFLOAD_LAYER.to_string());
    let out = run(&exe, &[&base, &refiner, &layer, &daemon.socket]);
    assert!(out.contains("offload.c (daemon mode)"), "{out}");
}

/// tests/c/policies.c in-process: FERRY_POLICY_AUTO and the presets resolve like ferryd's
/// (lowvram and auto stream through a two-layer budget with evictions, medvram and model need
/// the whole component and move it at once).
#[test]
fn c_auto_and_presets() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "policies");
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, expected, manifest) = write_model(dir.path(), 3);
    let out = run(&exe, &[&model, &expected, &manifest]);
    assert!(out.contains("policies.c (in-process)"), "{out}");
}

/// tests/c/policies.c in daemon mode: auto and the presets sent to ferryd as themselves.
#[test]
fn c_auto_and_presets_daemon_mode() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "policies");
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, expected, manifest) = write_model(dir.path(), 3);
    let daemon = Ferryd::start(dir.path(), dir.path());
    let out = run(&exe, &[&model, &expected, &manifest, &daemon.socket]);
    assert!(out.contains("policies.c (daemon mode)"), "{out}");
}

fn bf16_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| half::bf16::from_f32(f(i)).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::BF16, shape: shape.to_vec(), data }
}

fn f32_tensor(name: &str, shape: &[usize], f: impl Fn(usize) -> f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n).flat_map(|i| f(i).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), data }
}

/// The files tests/c/lora.c takes: a base of three blocks of a 32×16 bf16 weight, a PEFT LoRA
/// (rank 2, alpha 1) for block 1 only, block 1 merged at strength 0.8 (by `lora::math`, not
/// by the engine the C program goes through), and block 1's bytes in the file.
fn write_lora_files(dir: &Path) -> [PathBuf; 4] {
    let base = dir.join("base.safetensors");
    let tensors: Vec<Tensor> = (0..3)
        .map(|b| {
            bf16_tensor(&format!("blocks.{b}.proj.weight"), &[32, 16], |i| {
                ((i + b * 7) as f32 * 0.21).sin()
            })
        })
        .collect();
    write_file(&base, &tensors).expect("base");
    let up = f32_tensor("blocks.1.proj.lora_B.weight", &[32, 2], |i| (i as f32 - 16.0) * 0.02);
    let down = f32_tensor("blocks.1.proj.lora_A.weight", &[2, 16], |i| (i as f32 - 8.0) * 0.03);
    let lora = dir.join("lora.safetensors");
    write_file(&lora, &[down.clone(), up.clone(), f32_tensor("blocks.1.proj.alpha", &[], |_| 1.0)])
        .expect("lora");
    let w = &tensors[1];
    let merged = math::merge(
        "blocks.1.proj.weight",
        Factor { dtype: w.dtype, shape: &as_u64(&w.shape), bytes: &w.data },
        &[Delta {
            up: Factor { dtype: up.dtype, shape: &as_u64(&up.shape), bytes: &up.data },
            down: Factor { dtype: down.dtype, shape: &as_u64(&down.shape), bytes: &down.data },
            mid: None,
            scale: math::scale(0.8, Some(1.0), 2),
        }],
    )
    .expect("merge");
    let merged_path = dir.join("merged.bin");
    let original = dir.join("original.bin");
    std::fs::write(&merged_path, merged).expect("merged.bin");
    std::fs::write(&original, &w.data).expect("original.bin");
    [base, lora, merged_path, original]
}

fn as_u64(shape: &[usize]) -> Vec<u64> {
    shape.iter().map(|&d| d as u64).collect()
}

/// tests/c/lora.c in-process: backup and fuse views serve the merged bytes, share untouched
/// layers with the base, and removing them leaves the file's bytes.
#[test]
fn c_lora_views() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "lora");
    let dir = tempfile::tempdir().expect("tempdir");
    let [base, lora, merged, original] = write_lora_files(dir.path());
    let out = run(&exe, &[&base, &lora, &merged, &original]);
    assert!(out.contains("lora.c (in-process)"), "{out}");
}

/// tests/c/lora.c in daemon mode: the same program, the views made by ferryd.
#[test]
fn c_lora_views_daemon_mode() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "lora");
    let dir = tempfile::tempdir().expect("tempdir");
    let [base, lora, merged, original] = write_lora_files(dir.path());
    let daemon = Ferryd::start(dir.path(), dir.path());
    let out = run(&exe, &[&base, &lora, &merged, &original, &daemon.socket]);
    assert!(out.contains("lora.c (daemon mode)"), "{out}");
}

/// Releases the lying daemon of [`serve_liar`] was sent.
static LIAR_RELEASES: AtomicUsize = AtomicUsize::new(0);

/// A host daemon that lies about its arena: it claims `arena_len` bytes but passes a file of
/// 4096, and its three layers are leased as a tensor past the end of the arena (layer 0), a
/// tensor of an unknown dtype (layer 1), and 200 good bytes at offset 0 (layer 2).
fn serve_liar(stream: UnixStream, arena_len: u64) {
    let mut version = None;
    while let Ok(r) = recv_frame(&stream, version) {
        let tensor = |dtype: &str, arena_offset| TensorDesc {
            name: "blocks.0.weight".into(),
            dtype: dtype.into(),
            shape: vec![50],
            arena_offset,
            len: 200,
        };
        let reply: Message = match r.message {
            Message::Hello(_) => {
                version = Some(PROTOCOL_VERSION);
                fake_welcome("host", features::OPEN_PATH | features::HOST_ARENA).into()
            }
            Message::MapArena(_) => {
                let file = tempfile::tempfile().expect("arena file");
                file.set_len(4096).expect("arena length");
                let msg = ArenaFd { len: arena_len, backend: "host".into() }.into();
                let fds = [std::os::fd::AsFd::as_fd(&file)];
                if send_frame(&stream, PROTOCOL_VERSION, r.header.request_id, &msg, &fds).is_err() {
                    return;
                }
                continue;
            }
            Message::OpenModel(_) => ModelOpened {
                model: 1,
                components: vec![ComponentSummary {
                    name: "model".into(),
                    layers: (0..3)
                        .map(|l| LayerSummary {
                            name: format!("blocks.{l}"),
                            bytes: 200,
                            tensors: 1,
                        })
                        .collect(),
                }],
            }
            .into(),
            Message::Acquire(a) => Leased {
                lease: 10 + u64::from(a.layer),
                layer: format!("blocks.{}", a.layer),
                ready: true,
                tensors: vec![match a.layer {
                    0 => tensor("F32", 4000),
                    1 => tensor("F99", 0),
                    _ => tensor("F32", 0),
                }],
            }
            .into(),
            Message::Release(_) => {
                LIAR_RELEASES.fetch_add(1, Ordering::SeqCst);
                Ack {}.into()
            }
            _ => ErrorReply::new(ErrorCode::Internal, "the liar does not do that").into(),
        };
        if send_frame(&stream, PROTOCOL_VERSION, r.header.request_id, &reply, &[]).is_err() {
            return;
        }
    }
}

/// Serves sockets in `dir` that are not a usable host daemon, for tests/c/daemon.c:
/// `cuda.sock` answers the handshake as a daemon on a CUDA device, `hangup.sock` closes every
/// connection at once, `garbage.sock` answers with bytes that are not a frame, `liar.sock`
/// and `short-arena.sock` misdescribe their arena ([`serve_liar`]); `not-a-socket` is a plain
/// file. The threads serve until the test process exits.
fn fake_daemons(dir: &Path) {
    std::fs::write(dir.join("not-a-socket"), b"just a file").expect("not-a-socket");
    let serve = |name: &str, f: fn(UnixStream)| {
        let listener = UnixListener::bind(dir.join(name)).expect("binding a fake daemon");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                f(stream);
            }
        });
    };
    serve("cuda.sock", |stream| {
        let Ok(r) = recv_frame(&stream, None) else { return };
        let Message::Hello(hello) = r.message else { return };
        // A CUDA daemon never grants HOST_ARENA; this one shares nothing.
        let granted = features::FD_PASSING | features::OPEN_PATH | features::LORA;
        let welcome = fake_welcome("cuda", hello.features & granted);
        if send_frame(&stream, PROTOCOL_VERSION, r.header.request_id, &welcome.into(), &[]).is_ok()
        {
            // Until the client hangs up.
            let mut buf = [0u8; 256];
            while (&stream).read(&mut buf).is_ok_and(|n| n > 0) {}
        }
    });
    serve("cuda-ipc.sock", |stream| {
        let mut version = None;
        while let Ok(r) = recv_frame(&stream, version) {
            let id = r.header.request_id;
            let sent = match r.message {
                Message::Hello(hello) => {
                    version = Some(PROTOCOL_VERSION);
                    let granted = features::OPEN_PATH | features::CUDA_IPC | features::DEVICES;
                    let welcome = fake_welcome("cuda", hello.features & granted);
                    send_frame(&stream, PROTOCOL_VERSION, id, &welcome.into(), &[])
                }
                Message::MapArena(_) => {
                    let stand_in = tempfile::tempfile().expect("stand-in descriptor");
                    let msg = CudaArena {
                        len: 1 << 30,
                        device_uuid: FAKE_GPU_UUID.into(),
                        handle: CudaHandle::PosixFd { alloc_len: 1 << 30 },
                    };
                    let fds = [std::os::fd::AsFd::as_fd(&stand_in)];
                    send_frame(&stream, PROTOCOL_VERSION, id, &msg.into(), &fds)
                }
                _ => return,
            };
            if sent.is_err() {
                return;
            }
        }
    });
    serve("hangup.sock", drop);
    serve("liar.sock", |stream| serve_liar(stream, 4096));
    serve("short-arena.sock", |stream| serve_liar(stream, 1 << 20));
    serve("garbage.sock", |mut stream| {
        let mut buf = [0u8; 256];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
}

/// tests/c/daemon.c: bad sockets, a CUDA daemon (FERRY_ERR_NOT_SHAREABLE), misuse against a
/// real ferryd (paths outside its roots, leases released twice or on the wrong engine), then
/// ferryd SIGKILLed while two engines are open and leases held: every call reports
/// FERRY_ERR_DISCONNECTED, held tensors stay readable, closing frees everything.
#[test]
fn c_daemon_failures() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile(&lib_dir, "daemon");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    let fakes = dir.path().join("fakes");
    std::fs::create_dir_all(&root).expect("root");
    std::fs::create_dir_all(&fakes).expect("fakes");
    let (model, _, _) = write_model(&root, 4);
    let outside = dir.path().join("outside.safetensors");
    std::fs::copy(&model, &outside).expect("outside");
    fake_daemons(&fakes);
    let mut daemon = Ferryd::start(dir.path(), &root);

    let mut child = sanitized(&exe)
        .args([&daemon.socket, &model, &outside, &fakes])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running daemon.c");
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = Vec::new();
    let mut killed = false;
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("reading daemon.c's output");
        if line == "kill-daemon" {
            daemon.kill();
            killed = true;
            stdin.write_all(b"killed\n").expect("answering daemon.c");
        }
        lines.push(line);
    }
    drop(stdin);
    let status = child.wait().expect("waiting for daemon.c");
    let errors = errors.join().expect("stderr reader");
    println!("{}", lines.join("\n"));
    assert!(status.success(), "daemon.c failed ({status}):\n{}\n{errors}", lines.join("\n"));
    assert!(killed, "daemon.c never asked for the daemon to be killed");
    assert_eq!(lines.last().map(String::as_str), Some("daemon.c: passed"));
    // The two leases the lying daemon misdescribed were given back, as was the good one.
    assert_eq!(LIAR_RELEASES.load(Ordering::SeqCst), 3);
}

/// The example in clients/c/, compiled with -Werror against the header, run in-process and
/// against ferryd.
#[test]
fn c_example_runs_in_both_modes() {
    let Some(lib_dir) = setup() else { return };
    let exe = compile_source(&lib_dir, "clients/c/example.c", "c-abi-example");
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, _, _) = write_model(dir.path(), 3);
    let budget = Path::new("1048576");
    let local = run(&exe, &[&model, Path::new("--budget"), budget]);
    let daemon = Ferryd::start(dir.path(), dir.path());
    let remote = run(&exe, &[Path::new("--socket"), &daemon.socket, &model]);
    for out in [&local, &remote] {
        assert!(out.contains("model: 3 layers, 9 tensors"), "{out}");
    }
    assert!(local.contains("in-process engine"), "{local}");
    assert!(remote.contains("connected to ferryd"), "{remote}");
}

/// `ffi/install.sh` into a temporary prefix, then a program built with
/// `pkg-config --cflags --libs ferry` against the shared library, and run.
#[test]
fn installed_library_is_found_by_pkg_config() {
    let Some(lib_dir) = setup() else { return };
    if !have("pkg-config") {
        println!("c_abi: skipped, no pkg-config on PATH");
        return;
    }
    let prefix = tempfile::tempdir().expect("tempdir");
    let status = Command::new("sh")
        .current_dir(root())
        .arg("ffi/install.sh")
        .arg(prefix.path())
        .env("FERRY_BUILD_DIR", &lib_dir)
        .env_remove("DESTDIR")
        .status()
        .expect("running ffi/install.sh");
    assert!(status.success(), "ffi/install.sh failed: {status}");
    for f in ["lib/libferry.so", "lib/libferry.a", "include/ferry.h", "lib/pkgconfig/ferry.pc"] {
        assert!(prefix.path().join(f).is_file(), "{f} was not installed");
    }
    let pkg_config = |args: &[&str]| {
        let out = Command::new("pkg-config")
            .args(args)
            .arg("ferry")
            .env("PKG_CONFIG_PATH", prefix.path().join("lib/pkgconfig"))
            .output()
            .expect("running pkg-config");
        assert!(
            out.status.success(),
            "pkg-config {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(pkg_config(&["--modversion"]), env!("CARGO_PKG_VERSION"));
    assert!(pkg_config(&["--static", "--libs"]).contains("-lpthread"));
    let flags = pkg_config(&["--cflags", "--libs"]);
    let exe = prefix.path().join("version");
    let output = Command::new("cc")
        .current_dir(root())
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "tests/c/version.c", "-o"])
        .arg(&exe)
        .args(flags.split_whitespace())
        .output()
        .expect("running cc");
    assert!(output.status.success(), "cc {flags}: {}", String::from_utf8_lossy(&output.stderr));
    let ran = Command::new(&exe)
        .env("LD_LIBRARY_PATH", prefix.path().join("lib"))
        .output()
        .expect("running the program");
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
}
