//! `ffi_roundtrip`: what daemon mode costs a C caller. `ferry_acquire` + `ferry_release` of
//! one resident layer (policy `none`) through the C ABI, on an in-process engine
//! (`ferry_engine_open`) and on one connected to ferryd (`ferry_connect`), measured in the same
//! run by one C program: round trips per second, p50 and p99 latency, and the ratio.
//!
//! The timing loop is C (`benches/ffi_roundtrip.c`, built here with `cc -O2` against
//! `libferry.a`) rather than Rust calling the exports: the ffi crate builds no rlib (its
//! library is named `ferry` like the daemon crate's, and the two rlibs would collide), and a C
//! program measures what a C caller pays, static library and all. The daemon is a
//! `ferry::server::Server` in this process, serving the same model on the host backend.
//!
//! Run: `cargo bench --bench ffi_roundtrip` (builds `libferry.a` in release first). Under
//! `cargo test` (no `--bench` argument) it builds the debug library and runs a few iterations
//! only. Skipped, with a message, when there is no C compiler `cc`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry::Dtype;
use ferry::server::{Server, ServerConfig};
use ferry_tests::{Tensor, build_ffi, workspace_root as root, write_file};

const LAYERS: usize = 8;

fn compile(lib_dir: &Path) -> PathBuf {
    let exe = lib_dir.join("ffi-roundtrip-bench");
    let output = Command::new("cc")
        .current_dir(root())
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Iinclude"])
        .arg("benches/ffi_roundtrip.c")
        .arg(lib_dir.join("libferry.a"))
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("running cc");
    assert!(
        output.status.success(),
        "compiling benches/ffi_roundtrip.c failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let n = if bench_mode { 100_000 } else { 50 };
    let have_cc = Command::new("cc").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_cc {
        println!("ffi_roundtrip: skipped, no C compiler `cc` on PATH");
        return;
    }
    let exe = compile(&build_ffi(bench_mode));

    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).expect("model root");
    let tensors: Vec<Tensor> = (0..LAYERS)
        .flat_map(|l| {
            [
                Tensor::patterned(format!("blocks.{l}.weight"), Dtype::F16, &[256, 256]),
                Tensor::patterned(format!("blocks.{l}.bias"), Dtype::F16, &[256]),
            ]
        })
        .collect();
    let model = models.join("m.safetensors");
    write_file(&model, &tensors).expect("model");

    // The same engine configuration as the C program's in-process engine.
    let engine = ferry_tests::host_engine(64 << 20, true, Duration::from_secs(10), 1 << 20);
    let socket = dir.path().join("ferryd.sock");
    let mut config = ServerConfig::new(&socket);
    config.model_roots = vec![models.clone()];
    let server = Server::start(engine, config).expect("server starts");

    let output = Command::new(&exe)
        .arg(&model)
        .arg(&socket)
        .arg(n.to_string())
        .output()
        .expect("running the C bench");
    server.shutdown();
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "the C bench failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    if !bench_mode {
        println!(
            "(smoke run under `cargo test`: a few iterations in a debug build; the figures mean nothing)"
        );
    }
}
