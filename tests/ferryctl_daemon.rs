//! `ferryctl status|models|clients|stats|load` end to end against the real `ferryd` (host
//! backend, a temporary socket, a preloaded sharded model), plus the no-daemon and
//! outside-the-root errors, and a clean SIGTERM exit.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ferry_tests::ferryd::{ferryctl, stdout_ok};
use ferry_tests::{Tensor, cargo_bin, llm_like, write_file, write_sharded};

/// Kills ferryd if the test panics before the SIGTERM check.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ferryctl_drives_a_running_ferryd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    let index = write_sharded(&root.join("llm"), "model", &llm_like(3, 2, 4096), 2).expect("llm");
    let single = root.join("single.safetensors");
    let tensors: Vec<Tensor> = (0..3)
        .map(|l| Tensor::patterned(format!("blocks.{l}.weight"), ferry::Dtype::U8, &[2048]))
        .collect();
    write_file(&single, &tensors).expect("single");
    let outside = dir.path().join("outside.safetensors");
    write_file(&outside, &tensors).expect("outside");
    let socket = dir.path().join("s.sock");

    let mut daemon = Daemon(
        Command::new(cargo_bin("ferryd"))
            .args(["--device", "host", "--host-memory", "67108864", "--budget", "16777216"])
            .arg("--socket")
            .arg(&socket)
            .arg("--model-root")
            .arg(&root)
            .arg("--preload")
            .arg(&index)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ferryd"),
    );
    wait_until("ferryd's socket", || {
        socket.exists() || daemon.0.try_wait().ok().flatten().is_some()
    });
    assert!(daemon.0.try_wait().expect("try_wait").is_none(), "ferryd is running");

    // status: human.
    let text = stdout_ok(&ferryctl(&socket, &["status"]));
    let version = format!("ferryd {}", ferry::VERSION);
    for want in [
        version.as_str(),
        "protocol 1",
        "host",
        "budget",
        "16.0 MiB",
        "64.0 MiB",
        "open_path",
        "acquires",
        "evictions",
        "LoRA cache",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    // status --json.
    let v: serde_json::Value =
        serde_json::from_str(&stdout_ok(&ferryctl(&socket, &["status", "--json"])))
            .expect("status json");
    assert_eq!(v["device"]["backend"], "host");
    assert_eq!(v["device"]["budget"], 16 << 20);
    assert_eq!(v["device"]["total_memory"], 64 << 20);
    assert_eq!(v["stats"]["budget"], 16 << 20);
    assert_eq!(v["protocol_version"], 1);
    assert_eq!(v["server_version"], ferry::VERSION);
    assert!(v["features"].as_array().expect("features").iter().any(|f| f == "open_path"), "{v}");

    // models: the preloaded model.
    let canonical = index.canonicalize().expect("canonical");
    let text = stdout_ok(&ferryctl(&socket, &["models"]));
    assert!(text.starts_with("ID"), "{text}");
    assert!(text.contains(canonical.to_str().expect("utf-8")), "{text}");
    assert!(text.contains("sharded"), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout_ok(&ferryctl(&socket, &["models", "--json"])))
            .expect("models json");
    let models = v["models"].as_array().expect("models");
    assert_eq!(models.len(), 1, "{v}");
    assert_eq!(models[0]["path"], canonical.to_str().expect("utf-8"));

    // clients: at least ferryctl itself, marked.
    let text = stdout_ok(&ferryctl(&socket, &["clients"]));
    assert!(text.contains("ferryctl"), "{text}");
    assert!(
        text.lines()
            .skip(1)
            .any(|l| l.split_whitespace().next().is_some_and(|id| id.ends_with('*'))),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&stdout_ok(&ferryctl(&socket, &["clients", "--json"])))
            .expect("clients json");
    let me = v["self"].as_u64().expect("self id");
    assert!(v["clients"].as_array().expect("clients").iter().any(|c| c["id"] == me), "{v}");

    // load: a second model, with a policy; and the preloaded one, which stays open.
    let text = stdout_ok(&ferryctl(
        &socket,
        &["load", single.to_str().expect("utf-8"), "--policy", "sequential", "--lookahead", "2"],
    ));
    assert!(text.contains("3 layer(s)"), "{text}");
    assert!(text.contains("blocks.2"), "{text}");
    assert!(text.contains("sequential (lookahead 2)"), "{text}");
    assert!(text.contains("--preload"), "the caveat: {text}");
    assert!(text.contains("opened for this command only"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&stdout_ok(&ferryctl(
        &socket,
        &[
            "load",
            index.to_str().expect("utf-8"),
            "--policy",
            "balanced",
            "--threshold",
            "0.5",
            "--json",
        ],
    )))
    .expect("load json");
    assert_eq!(v["already_open"], true, "{v}");
    assert_eq!(v["info"]["policy"]["Balanced"]["threshold"]["Fraction"], 0.5, "{v}");
    assert!(v["note"].as_str().expect("note").contains("--preload"), "{v}");
    // The policy stays on the preloaded model; the single-file model was closed.
    let v: serde_json::Value =
        serde_json::from_str(&stdout_ok(&ferryctl(&socket, &["models", "--json"])))
            .expect("models json");
    let models = v["models"].as_array().expect("models");
    assert_eq!(models.len(), 1, "{v}");
    assert!(models[0]["policy"]["Balanced"].is_object(), "{v}");
    let text = stdout_ok(&ferryctl(&socket, &["models"]));
    assert!(text.contains("balanced (50% of device)"), "{text}");

    // load errors: outside the root, and a bad flag combination.
    let out = ferryctl(&socket, &["load", outside.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ferryctl: error: load") && err.contains("outside.safetensors"), "{err}");
    let out = ferryctl(&socket, &["load", single.to_str().expect("utf-8"), "--lookahead", "2"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("need --policy"));

    // stats --prometheus: after one load, and parseable line by line.
    let text = stdout_ok(&ferryctl(&socket, &["stats", "--prometheus"]));
    check_exposition(&text);
    for want in [
        "# HELP ferry_acquires_total ",
        "# TYPE ferry_acquires_total counter",
        "# TYPE ferry_device_bytes gauge",
        "ferry_budget_bytes 16777216",
        "ferry_device_total_bytes 67108864",
        "ferry_info{",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let text = stdout_ok(&ferryctl(&socket, &["stats"]));
    assert!(text.contains("bytes streamed"), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&stdout_ok(&ferryctl(&socket, &["stats", "--json"])))
            .expect("stats json");
    assert_eq!(v["budget"], 16 << 20);

    // No daemon: exit 1, naming the socket.
    let missing = dir.path().join("nobody-home.sock");
    let out = ferryctl(&missing, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(missing.to_str().expect("utf-8")), "{err}");
    assert!(out.stdout.is_empty());

    // SIGTERM: ferryd exits 0.
    let pid = libc::pid_t::try_from(daemon.0.id()).expect("pid");
    // SAFETY: kill has no memory-safety preconditions; pid is our own live child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = daemon.0.try_wait().expect("wait") {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "ferryd did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    let out = ferryctl(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(1), "a stopped daemon fails the probe");
}

/// Every line is a comment (`# HELP name text` / `# TYPE name counter|gauge`) or a sample
/// `name{labels} value` with a float value, and each sample's family was declared first.
fn check_exposition(text: &str) {
    let mut typed: Vec<String> = Vec::new();
    let mut helped: Vec<String> = Vec::new();
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.is_empty(), "{line}");
            helped.push(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            typed.push(name.to_string());
        } else {
            let (series, value) = line.rsplit_once(' ').expect("sample: name value");
            value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name = series.split('{').next().expect("name");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && name.starts_with("ferry_"),
                "{line}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                assert!(
                    labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                    "{line}"
                );
            }
            assert!(typed.iter().any(|t| t == name), "{name} has no TYPE line before it");
            assert!(helped.iter().any(|t| t == name), "{name} has no HELP line before it");
        }
    }
    assert!(typed.len() >= 10, "{text}");
}
