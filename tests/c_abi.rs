//! Builds `libferry.a` and links the C tests in `tests/c/` against it, with AddressSanitizer
//! (and its LeakSanitizer) and UndefinedBehaviorSanitizer, then runs them: `version.c` (the
//! smoke test), `engine.c` (the in-process engine end to end, checking bytes against a model
//! written here) and `misuse.c` (error paths).
//!
//! Skipped (with a message) only when no C compiler `cc` is installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ferry::Dtype;
use ferry_tests::{Tensor, write_file};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory this test binary was built into (`<target>/<profile>/deps/<exe>`).
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() { dir } else { root().join(dir) };
    }
    let exe = std::env::current_exe().expect("locating the test executable");
    exe.ancestors().nth(3).map(Path::to_path_buf).unwrap_or_else(|| root().join("target"))
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Builds the ffi crate (debug profile) into its own target directory, so that the nested
/// cargo never waits on the lock of the directory the outer `cargo test` uses, and returns the
/// directory holding `libferry.a` and `libferry.so`.
fn build_ffi() -> PathBuf {
    let target = target_dir().join("c-abi");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root())
        .args(["build", "--quiet", "-p", "ferry-ffi", "--target-dir"])
        .arg(&target)
        .status()
        .expect("running cargo build -p ferry-ffi");
    assert!(status.success(), "cargo build -p ferry-ffi failed: {status}");
    target.join("debug")
}

/// Compiles `tests/c/<name>.c` against `include/ferry.h` and `libferry.a` with ASan and UBSan
/// (LeakSanitizer comes with ASan on Linux) and returns the executable.
fn compile(lib_dir: &Path, name: &str) -> PathBuf {
    let staticlib = lib_dir.join("libferry.a");
    assert!(staticlib.is_file(), "{} was not built", staticlib.display());
    let exe = lib_dir.join(format!("c-abi-{name}"));
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
        .arg(format!("tests/c/{name}.c"))
        .arg(&staticlib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("running cc");
    assert!(
        output.status.success(),
        "compiling tests/c/{name}.c failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// Runs a compiled C test with `args`; fails the test if it does not exit with 0.
fn run(exe: &Path, args: &[&Path]) {
    let output = Command::new(exe)
        .args(args)
        // Leak checking on (the default with ASan on Linux, made explicit); a leak fails.
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env("UBSAN_OPTIONS", "print_stacktrace=1")
        .output()
        .expect("running a C test");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}{}",
        exe.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The library directory, or `None` (with a message) when there is no C compiler.
fn setup() -> Option<PathBuf> {
    if !have("cc") {
        println!("c_abi: skipped, no C compiler `cc` on PATH");
        return None;
    }
    // Tests run in parallel and each would build; one build, shared.
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    Some(LIB.get_or_init(build_ffi).clone())
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
