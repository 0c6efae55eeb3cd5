//! The pure-Python client (clients/python): its unittest suites against the golden vectors and
//! against a real `ferryd` serving a model with known bytes, and the torch integration
//! (`test_torch.py`, and `test_diffusers.py` with a real diffusers pipeline) against a real
//! `ferryd` when `python3` has torch (and diffusers, transformers). Skipped (with a message) when
//! `python3` is missing or older than 3.9; the torch suites also when their packages are missing.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::{cargo_bin, llm_like, write_sharded};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether a usable `python3` (3.9 or newer) is on PATH; prints why not.
fn python_ok() -> bool {
    let out = match Command::new("python3")
        .args(["-c", "import sys; print('%d %d' % sys.version_info[:2])"])
        .output()
    {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!("skipping: python3 failed: {}", String::from_utf8_lossy(&out.stderr));
            return false;
        }
        Err(e) => {
            eprintln!("skipping: no python3 ({e})");
            return false;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u32> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if v.len() != 2 || (v[0], v[1]) < (3, 9) {
        eprintln!("skipping: python3 is {}, the client needs 3.9 or newer", text.trim());
        return false;
    }
    true
}

/// `python3 -m unittest discover` over clients/python/tests for files matching `pattern`.
fn unittest(pattern: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.current_dir(repo())
        .args(["-m", "unittest", "discover", "-v", "-s", "clients/python/tests", "-p", pattern])
        .args(extra)
        .env("PYTHONPATH", repo().join("clients/python"))
        .env("FERRY_REPO", repo())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Asserts a unittest run passed, ran at least one test and skipped none.
/// Runs a suite against a live ferryd, shows ferryd's log (at `log`) if it failed, and
/// [`check`]s it.
fn check_live(what: &str, cmd: &mut Command, log: &Path) {
    let out = cmd.output().expect("run python3");
    if !out.status.success() {
        eprintln!("ferryd's log:\n{}", daemon_log(log));
    }
    check(what, &out);
}

fn check(what: &str, out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ran = stderr
        .lines()
        .find_map(|l| l.strip_prefix("Ran ")?.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    let report = format!("{what}: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
    assert!(out.status.success(), "python tests failed: {report}");
    assert!(ran > 0, "no python tests ran: {report}");
    assert!(!stderr.contains("skipped="), "python tests were skipped: {report}");
    eprintln!("{what}: {ran} python tests passed");
}

#[test]
fn python_client_decodes_and_encodes_the_golden_vectors() {
    if !python_ok() {
        return;
    }
    let out = unittest("test_golden.py", &[]).output().expect("run python3");
    check("test_golden.py", &out);
}

/// Kills ferryd if the test panics before stopping it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn daemon_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Starts `ferryd` on the host backend (two devices of 64 MiB) with `root` as its model root;
/// waits for its socket.
fn start_ferryd(root: &Path) -> (Daemon, PathBuf, PathBuf) {
    // Two simulated devices (HOST-0000, HOST-0001) for the LiveDevices suite; device 0 is the
    // default, so the other suites run as on a single-device ferryd.
    start_ferryd_with(
        root,
        &["--device", "host", "--host-memory", "67108864", "--host-devices", "2"],
    )
}

/// Starts `ferryd` with `device_args` and `root` as its model root; waits for its socket.
fn start_ferryd_with(root: &Path, device_args: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let socket = root.join("s.sock");
    let log = root.join("ferryd.log");
    let mut daemon = Daemon(
        Command::new(cargo_bin("ferryd"))
            .args(device_args)
            .arg("--socket")
            .arg(&socket)
            .arg("--model-root")
            .arg(root)
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log"))
            .spawn()
            .expect("spawn ferryd"),
    );
    wait_until("ferryd's socket", 30, || {
        assert!(
            daemon.0.try_wait().expect("try_wait").is_none(),
            "ferryd exited early:\n{}",
            daemon_log(&log)
        );
        UnixStream::connect(&socket).is_ok()
    });
    (daemon, socket, log)
}

/// A sharded LLM-like model with known bytes in `root/llm`, and those bytes (hex, by tensor
/// name) in `root/expected.json` for the Python side; returns both paths.
fn llm_model(root: &Path) -> (PathBuf, PathBuf) {
    let tensors = llm_like(3, 2, 1000);
    let model = write_sharded(&root.join("llm"), "model", &tensors, 2).expect("model");
    let expected: serde_json::Map<String, serde_json::Value> =
        tensors.iter().map(|t| (t.name.clone(), hex(&t.data).into())).collect();
    let expected_path = root.join("expected.json");
    std::fs::write(&expected_path, serde_json::json!({ "tensors": expected }).to_string())
        .expect("expected bytes");
    (model, expected_path)
}

#[test]
fn python_client_against_a_real_ferryd() {
    if !python_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (model, expected_path) = llm_model(root);

    let (mut daemon, socket, log) = start_ferryd(root);

    let live = |cmd: &mut Command| {
        cmd.env("FERRY_SOCKET", &socket)
            .env("FERRY_MODEL", &model)
            .env("FERRY_EXPECTED", &expected_path)
            .env_remove("FERRY_SHUTDOWN_MARKER");
    };
    let mut cmd = unittest("test_live.py", &[]);
    live(&mut cmd);
    check_live("test_live.py", &mut cmd, &log);

    // A Python client holding a lease sees ferryd stop: ConnectionLost on its next call.
    let marker = root.join("connected");
    let mut cmd = unittest("test_live.py", &["-k", "LiveShutdown"]);
    live(&mut cmd);
    let python = cmd
        .env("FERRY_SHUTDOWN_MARKER", &marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut python = Some(python);
    wait_until("the Python client to connect", 60, || {
        marker.exists() || python.as_mut().is_some_and(|p| p.try_wait().ok().flatten().is_some())
    });
    let status =
        Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]).status().expect("kill");
    assert!(status.success(), "kill -TERM ferryd");
    let out = python.take().expect("python").wait_with_output().expect("python output");
    check("test_live.py -k LiveShutdown", &out);

    let start = Instant::now();
    let code = loop {
        if let Some(st) = daemon.0.try_wait().expect("wait") {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "ferryd did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        code.code(),
        Some(0),
        "ferryd exits 0 after SIGTERM: {code:?}\n{}",
        daemon_log(&log)
    );
    assert!(!socket.exists(), "ferryd removed its socket");
}

/// The Python client's CUDA binding without a GPU: typed errors without a driver, the checks of
/// `cuda_arena` replies, and both import paths through a stand-in libcuda the suite compiles
/// with `cc` (call order, struct layouts, clean-up), against fake CUDA ferryds.
#[test]
fn python_client_cuda_binding_without_a_gpu() {
    if !python_ok() {
        return;
    }
    let out = unittest("test_cuda.py", &[]).env_remove("FERRY_LIBCUDA").output().expect("python3");
    check("test_cuda.py", &out);
}

/// The CUDA path against a real ferryd on a GPU (`ferryd --device cuda`): the arena mapped by
/// the Python client, every tensor's bytes read back, and through torch when it has CUDA.
/// Runs only with `FERRY_TEST_CUDA=1`, so that it never runs by accident.
#[test]
fn python_cuda_path_against_a_cuda_ferryd() {
    if std::env::var("FERRY_TEST_CUDA").as_deref() != Ok("1") {
        eprintln!("test_cuda_gpu.py NOT RUN: set FERRY_TEST_CUDA=1 on a machine with a GPU");
        return;
    }
    assert!(python_ok(), "FERRY_TEST_CUDA=1 needs python3 3.9 or newer");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (model, expected_path) = llm_model(root);
    let models = root.join("models");
    std::fs::create_dir(&models).expect("models folder");
    let (mut daemon, socket, log) = start_ferryd_with(
        root,
        &["--device", "cuda", "--budget", "268435456", "--cuda-events", "true"],
    );
    // The torch suite needs torch with CUDA and numpy (for __cuda_array_interface__).
    let torch_cuda = Command::new("python3")
        .args(["-c", "import sys, numpy, torch; sys.exit(0 if torch.cuda.is_available() else 1)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    let mut cmd = if torch_cuda {
        unittest("test_cuda_gpu.py", &[])
    } else {
        eprintln!(
            "test_cuda_gpu.py LiveCudaTorch NOT RUN: python3 has no torch with CUDA, or no numpy"
        );
        unittest("test_cuda_gpu.py", &["-k", "*.LiveCuda.*"])
    };
    cmd.env("FERRY_TEST_CUDA", "1")
        .env("FERRY_SOCKET", &socket)
        .env("FERRY_MODEL", &model)
        .env("FERRY_EXPECTED", &expected_path)
        .env("FERRY_MODEL_ROOT", &models)
        .env_remove("FERRY_LIBCUDA");
    check_live("test_cuda_gpu.py", &mut cmd, &log);
    assert!(daemon.0.try_wait().expect("try_wait").is_none(), "ferryd is still up");
}

/// Whether `python3` can import `modules`; prints that `suite` is not run when it cannot.
fn imports_ok(modules: &str, suite: &str) -> bool {
    let out = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match out {
        Ok(st) if st.success() => true,
        _ => {
            eprintln!(
                "{suite} NOT RUN: python3 cannot import {modules} (pip install what is missing to run it)"
            );
            false
        }
    }
}

#[test]
fn python_torch_integration_against_a_real_ferryd() {
    if !python_ok() || !imports_ok("torch", "test_torch.py") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (mut daemon, socket, log) = start_ferryd(root);
    let models = root.join("models");
    std::fs::create_dir(&models).expect("models folder");
    let with_ferryd = |suite: &str| {
        let mut cmd = unittest(suite, &[]);
        cmd.env("FERRY_SOCKET", &socket).env("FERRY_MODEL_ROOT", &models);
        cmd
    };
    check_live("test_torch.py", &mut with_ferryd("test_torch.py"), &log);

    // A real diffusers pipeline (built from tiny configs, nothing downloaded), when installed.
    if imports_ok("torch, diffusers, transformers", "test_diffusers.py") {
        check_live("test_diffusers.py", &mut with_ferryd("test_diffusers.py"), &log);
    }
    assert!(daemon.0.try_wait().expect("try_wait").is_none(), "ferryd is still up");
}
