//! Running the real `ferryd` and `ferryctl` binaries from tests.

use std::ffi::OsStr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cargo_bin;

/// A `ferryd` child process, killed (if still running) when dropped, however the test ends.
#[derive(Debug)]
pub struct Ferryd {
    pub child: Child,
    pub socket: PathBuf,
}

impl Ferryd {
    /// Starts `ferryd ARGS --socket SOCKET` (stderr shown, stdout dropped) and waits until the
    /// socket accepts connections.
    pub fn start<I, S>(socket: &Path, args: I) -> Ferryd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let child = Command::new(cargo_bin("ferryd"))
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferryd");
        let mut d = Ferryd { child, socket: socket.to_path_buf() };
        // Connectable, not just present: bind() and listen() are two system calls.
        wait_until("ferryd's socket", Duration::from_secs(30), || {
            UnixStream::connect(&d.socket).is_ok() || !d.is_running()
        });
        assert!(d.is_running(), "ferryd exited at start: {:?}", d.child.try_wait());
        d
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Sends `signal` to ferryd.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped (we hold `child`).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal})");
    }
}

impl Drop for Ferryd {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `ferryctl ARGS --socket SOCKET`.
pub fn ferryctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(cargo_bin("ferryctl"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("run ferryctl")
}

/// The stdout of a command that must have succeeded (else a panic with both outputs).
pub fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// Polls `f` every 20 ms until it holds; panics after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `acquire` over the protocol, then `wait_ready` if the layer was not on the device yet.
pub fn acquire(
    c: &mut ferry::client::Client,
    model: u64,
    component: &str,
    layer: u32,
) -> ferry::protocol::Leased {
    use ferry::protocol::{Acquire, Message, WaitReady};
    let l = match c.call(Acquire { model, component: component.into(), layer }.into(), &[]) {
        Ok(Message::Leased(l)) => l,
        other => panic!("expected leased, got {other:?}"),
    };
    if !l.ready {
        match c.call(WaitReady { lease: l.lease }.into(), &[]) {
            Ok(Message::Ready(_)) => {}
            other => panic!("expected ready, got {other:?}"),
        }
    }
    l
}

/// `release` over the protocol, which must be acknowledged.
pub fn release(c: &mut ferry::client::Client, model: u64, lease: u64) {
    use ferry::protocol::{Message, Release};
    match c.call(Release { model, lease }.into(), &[]) {
        Ok(Message::Ack(_)) => {}
        other => panic!("expected ack, got {other:?}"),
    }
}

/// The daemon's host arena, mapped read-only through the descriptor `map_arena` sends.
pub fn map_arena(c: &mut ferry::client::Client) -> memmap2::Mmap {
    let (a, fd) = c.map_arena().expect("map_arena");
    let file = std::fs::File::from(fd);
    // SAFETY: a read-only shared mapping of ferryd's arena memfd; tests read only bytes of
    // layers they hold a ready lease on, which ferryd does not write meanwhile.
    let map = unsafe { memmap2::Mmap::map(&file) }.expect("mmap the arena");
    assert_eq!(map.len() as u64, a.len);
    map
}

/// UUID of the GPU that fake CUDA daemons in tests claim.
pub const FAKE_GPU_UUID: &str = "GPU-00000000-0000-0000-0000-000000000000";

/// The `welcome` of a fake daemon (tests of clients against daemons that lie or cannot be
/// served): `backend` `"host"` (1 MiB of host memory) or `"cuda"` (an 80 GiB "Fake GPU" with
/// UUID [`FAKE_GPU_UUID`]), granting `features`.
pub fn fake_welcome(backend: &str, features: u64) -> ferry::protocol::Welcome {
    use ferry::protocol::{DeviceSummary, MAX_BODY_LEN, MAX_FDS, PROTOCOL_VERSION, Welcome};
    let (name, uuid, total) = match backend {
        "cuda" => ("Fake GPU", FAKE_GPU_UUID, 80u64 << 30),
        _ => ("host memory", "host", 1u64 << 20),
    };
    Welcome {
        version: PROTOCOL_VERSION,
        features,
        client_id: 1,
        server_version: "fake".into(),
        max_body_len: MAX_BODY_LEN,
        max_fds: MAX_FDS as u32,
        device: DeviceSummary {
            backend: backend.into(),
            name: name.into(),
            uuid: uuid.into(),
            total_memory: total,
            budget: total.min(1 << 30),
        },
    }
}
