//! ferryd under a service manager: readiness and stop notifications (`sd_notify`), socket
//! activation (a listener passed as descriptor 3), and the configuration file.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::protocol::socket::{recv_frame, send_frame};
use ferry::protocol::{Hello, Message, PROTOCOL_VERSION, features};
use ferry_tests::cargo_bin;

fn wait_exit(child: &mut Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "ferryd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
}

fn handshake(path: &std::path::Path) -> Message {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        features: features::KNOWN,
        client_name: "service-test".into(),
    };
    send_frame(&s, PROTOCOL_VERSION, 1, &hello.into(), &[]).expect("send");
    recv_frame(&s, None).expect("reply").message
}

#[test]
fn ferryd_notifies_ready_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify = dir.path().join("notify");
    let rx = UnixDatagram::bind(&notify).expect("bind notify socket");
    rx.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let config = dir.path().join("ferryd.toml");
    std::fs::write(
        &config,
        format!(
            "device = \"host\"\nhost_memory = 67108864\nsocket = \"{}\"\nmodel_roots = [\"{}\"]\n",
            dir.path().join("s.sock").display(),
            dir.path().display()
        ),
    )
    .expect("config");
    let mut child = Command::new(cargo_bin("ferryd"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferryd");
    let mut buf = [0u8; 128];
    let n = rx.recv(&mut buf).expect("READY=1");
    assert_eq!(&buf[..n], b"READY=1");
    // The socket named by the configuration file is up.
    assert!(matches!(handshake(&dir.path().join("s.sock")), Message::Welcome(_)));
    sigterm(&child);
    let n = rx.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert_eq!(wait_exit(&mut child), 0);
}

#[test]
fn ferryd_serves_a_listener_passed_by_the_service_manager() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("activated.sock");
    let log = dir.path().join("ferryd.log");
    let listener = UnixListener::bind(&path).expect("bind");
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    // LISTEN_PID must be ferryd's own pid: the shell exports its pid, then execs ferryd.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --device host --host-memory 67108864")
        .arg(cargo_bin("ferryd"))
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log file")));
    // SAFETY: between fork and exec only dup2 and fcntl (async-signal-safe) run; they make the
    // listener descriptor 3 in the child, as systemd does. When the listener already is
    // descriptor 3, dup2(3, 3) does nothing, close-on-exec included, so the flag is cleared by
    // hand (otherwise exec would close it: a flaky "connection refused" whenever the test
    // process happened to give the listener descriptor 3).
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn ferryd");
    drop(listener); // the child holds its own copy
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        // Connections queue on the listener before ferryd accepts them.
        if let Ok(m) = std::panic::catch_unwind(|| handshake(&path)) {
            break m;
        }
        // A ferryd that exited explains itself in its log.
        if let Some(status) = child.try_wait().expect("try_wait") {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("ferryd exited ({status}) before serving the passed listener:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "no handshake through the passed listener; ferryd's log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(matches!(reply, Message::Welcome(_)), "{reply:?}");
    sigterm(&child);
    assert_eq!(wait_exit(&mut child), 0);
    // The socket belongs to the service manager: ferryd leaves it in place.
    assert!(path.exists());
}

#[test]
fn a_bad_configuration_file_stops_ferryd_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ferryd.toml");
    std::fs::write(&config, "device = \"host\"\nbudgte = 5\n").expect("config");
    let out = Command::new(cargo_bin("ferryd")).arg("--config").arg(&config).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ferryd.toml") && err.contains("budgte"), "{err}");
}
