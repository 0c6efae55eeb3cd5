//! systemd integration without a systemd library: readiness notification (`sd_notify`) and
//! socket activation (`sd_listen_fds`), both small, documented protocols.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=...`) to the service manager if ferryd runs
/// under one (`$NOTIFY_SOCKET` set); returns whether it was sent. Never fails the caller:
/// readiness notification is best effort.
pub fn notify(state: &str) -> bool {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => notify_to(&path.to_string_lossy(), state).is_ok(),
        None => false,
    }
}

/// Sends `state` to the notification socket at `path` (`@name` is an abstract socket).
pub fn notify_to(path: &str, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

/// The listening socket systemd passed (socket activation), if any: `$LISTEN_PID` must be this
/// process and `$LISTEN_FDS` at least 1; the first descriptor (3) is taken. Returns an error if
/// the variables are set for this process but descriptor 3 is not a listening Unix socket.
pub fn inherited_listener() -> std::io::Result<Option<UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok());
    let fds = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<u32>().ok());
    if pid != Some(std::process::id()) || fds.unwrap_or(0) < 1 {
        return Ok(None);
    }
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a descriptor number writes at most `len` bytes into `accepting`;
    // on a descriptor that is not a socket it fails with ENOTSOCK and writes nothing.
    let rc = unsafe {
        libc::getsockopt(
            LISTEN_FDS_START,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut accepting).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if accepting == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "descriptor 3 from systemd is not a listening socket",
        ));
    }
    // SAFETY: systemd hands descriptor 3 to this process (LISTEN_PID matches) and nothing else
    // in ferryd uses it; it is a listening stream socket (checked above). From here the
    // listener owns it.
    Ok(Some(unsafe { UnixListener::from_raw_fd(LISTEN_FDS_START) }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn notify_reaches_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        super::notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
