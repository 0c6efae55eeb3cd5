//! `ferryctl top --once` against the real `ferryd` (host backend, a temporary socket, a
//! preloaded model): one frame with the device, rates, the model's residency and the clients;
//! `--json` parses; a missing daemon is a clear error.

use std::path::Path;
use std::process::{Command, Output};

use ferry_tests::ferryd::{Ferryd, stdout_ok};
use ferry_tests::{cargo_bin, llm_like, write_sharded};

fn top(socket: &Path, args: &[&str]) -> Output {
    Command::new(cargo_bin("ferryctl"))
        .args(["top", "--once", "--interval", "0.1", "--socket"])
        .arg(socket)
        .args(args)
        .output()
        .expect("run ferryctl top")
}

#[test]
fn top_once_shows_one_frame_of_a_running_ferryd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("models");
    let index = write_sharded(&root.join("llm"), "model", &llm_like(3, 2, 4096), 2).expect("llm");
    let socket = dir.path().join("s.sock");

    // No daemon yet: a clear error, exit 1.
    let out = top(&socket, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ferryd is not answering on"), "{err}");

    let _daemon = Ferryd::start(
        &socket,
        [
            "--device".as_ref(),
            "host".as_ref(),
            "--host-memory".as_ref(),
            "67108864".as_ref(),
            "--budget".as_ref(),
            "16777216".as_ref(),
            "--model-root".as_ref(),
            root.as_os_str(),
            "--preload".as_ref(),
            index.as_os_str(),
        ],
    );

    let text = stdout_ok(&top(&socket, &[]));
    let canonical = index.canonicalize().expect("canonical");
    for want in [
        format!("ferryd {} on {}", ferry::VERSION, socket.display()),
        "host memory (host), rates over 0.1 s".to_string(),
        "of 16.0 MiB in use".to_string(),
        "hit rate -".to_string(), // no acquires in the interval
        "MODEL  RESIDENT".to_string(),
        canonical.display().to_string(),
        format!("ferryctl top {}", ferry::VERSION),
    ] {
        assert!(text.contains(&want), "missing {want:?} in\n{text}");
    }
    let header = text.lines().find(|l| l.starts_with("CLIENT")).expect("clients table");
    assert!(header.split_whitespace().eq(["CLIENT", "PID", "MODELS", "LEASES", "NAME"]), "{text}");
    // This connection is marked, and a single frame does not clear the screen.
    assert!(text.lines().any(|l| l.contains('*') && l.contains("ferryctl top")), "{text}");
    assert!(!text.contains('\x1b'), "{text:?}");

    let v: serde_json::Value =
        serde_json::from_str(&stdout_ok(&top(&socket, &["--json"]))).expect("--json parses");
    assert_eq!(v["device"]["backend"], "host");
    assert_eq!(v["stats"]["budget"], 16 << 20);
    assert_eq!(v["models"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["models"][0]["path"], canonical.display().to_string());
    assert!(v["rates"]["seconds"].as_f64().is_some_and(|s| s >= 0.1), "{v}");
    assert!(v["rates"]["hit_rate"].is_null(), "{v}");

    let bad = Command::new(cargo_bin("ferryctl"))
        .args(["top", "--once", "--interval", "0", "--socket"])
        .arg(&socket)
        .output()
        .expect("run ferryctl top");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--interval 0: must be in (0, 3600] seconds"), "{err}");
}
