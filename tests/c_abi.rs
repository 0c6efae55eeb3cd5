//! Builds `libferry.a` and links the C smoke test `tests/c/version.c` against it, with
//! AddressSanitizer and UndefinedBehaviorSanitizer, then runs it.
//!
//! Skipped (with a message) only when no C compiler `cc` is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

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

#[test]
fn c_smoke_test() {
    if !have("cc") {
        println!("c_abi: skipped, no C compiler `cc` on PATH");
        return;
    }
    let root = root();
    let lib_dir = build_ffi();
    let staticlib = lib_dir.join("libferry.a");
    assert!(staticlib.is_file(), "{} was not built", staticlib.display());

    let exe = lib_dir.join("c-abi-version");
    let output = Command::new("cc")
        .current_dir(&root)
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
            "tests/c/version.c",
        ])
        .arg(&staticlib)
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("running cc");
    assert!(
        output.status.success(),
        "compiling tests/c/version.c failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = Command::new(&exe).output().expect("running the C smoke test");
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "C smoke test failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
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
