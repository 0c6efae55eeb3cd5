//! Blocking frame I/O over a Unix stream socket, with file descriptors as `SCM_RIGHTS`
//! ancillary data.
//!
//! - [`send_frame`] writes a whole frame with one `sendmsg` (more only if the kernel takes it
//!   in parts); descriptors ride on the first call, i.e. with the frame's first byte.
//! - [`recv_frame`] reads exactly one frame (never a byte of the next), collects every
//!   descriptor that arrives with any of its bytes (received close-on-exec), and checks them
//!   against the header's flag and the kind's rule. On any error every descriptor received
//!   with the frame is closed (they are [`OwnedFd`]s, dropped with the error).
//!
//! After any error from [`recv_frame`] the stream's position within the frame sequence is
//! unknown (a read may have stopped mid-frame): close the connection.

use std::io;
use std::mem::{size_of, size_of_val};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::frame::{FLAG_FDS, FrameHeader, ProtocolError};
use super::messages::{ErrorReply, Message, decode_frame, encode_frame_with};
use super::{HEADER_LEN, MAX_FDS, NO_REQUEST};

/// A frame read from a socket, with the descriptors that came with it.
#[derive(Debug)]
pub struct Received {
    pub header: FrameHeader,
    pub message: Message,
    /// In the order the sender attached them.
    pub fds: Vec<OwnedFd>,
}

/// Sends `msg` as one frame in protocol `version`, with `fds` attached (flag bit 0 is set
/// when there are any). The descriptors must suit the message's kind
/// ([`ProtocolError::BadFds`] otherwise, and nothing is sent).
pub fn send_frame(
    stream: &UnixStream,
    version: u16,
    request_id: u64,
    msg: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds { max: MAX_FDS });
    }
    let flags = if fds.is_empty() { 0 } else { FLAG_FDS };
    let bytes = encode_frame_with(version, flags, request_id, msg)?;
    let header = FrameHeader { version, kind: msg.kind(), flags, body_len: 0, request_id };
    header.check_fds(fds.len())?;
    send_frame_bytes(stream, &bytes, fds)
}

/// Sends raw frame bytes with `fds` attached to the first byte, unchecked (for tests and
/// for forwarding frames already encoded). `bytes` must not be empty when `fds` are given.
pub fn send_frame_bytes(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds { max: MAX_FDS });
    }
    if bytes.is_empty() && !fds.is_empty() {
        return Err(ProtocolError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "descriptors need at least one byte to travel with",
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    let mut attach: &[RawFd] = &raw;
    while sent < bytes.len() {
        let n = sendmsg_once(stream.as_raw_fd(), &bytes[sent..], attach)?;
        if n == 0 {
            return Err(ProtocolError::Io(io::ErrorKind::WriteZero.into()));
        }
        sent += n;
        attach = &[];
    }
    Ok(())
}

/// Reads one frame. `negotiated` is the connection's version once the handshake is done
/// (`None` before: any version but 0 is accepted). A clean end of stream before the frame's
/// first byte is [`ProtocolError::Closed`]; one inside a frame is
/// [`ProtocolError::Truncated`]. Header errors are reported before the body is read.
pub fn recv_frame(stream: &UnixStream, negotiated: Option<u16>) -> Result<Received, ProtocolError> {
    recv_frame_detailed(stream, negotiated).map_err(|f| f.error)
}

/// Why [`recv_frame_detailed`] failed, with the frame's header when it had been decoded (so
/// a server can answer with that frame's request id).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct RecvFailure {
    pub header: Option<FrameHeader>,
    #[source]
    pub error: ProtocolError,
}

impl RecvFailure {
    /// The request id to answer with: the frame's, or [`NO_REQUEST`] when its header could
    /// not be decoded.
    pub fn request_id(&self) -> u64 {
        self.header.map_or(NO_REQUEST, |h| h.request_id)
    }

    /// The error reply to send before closing (`None` when the peer is gone: nothing can be
    /// sent).
    pub fn reply(&self) -> Option<ErrorReply> {
        match self.error {
            ProtocolError::Closed | ProtocolError::Io(_) => None,
            ref e => Some(ErrorReply::from(e)),
        }
    }
}

/// [`recv_frame`], with the header of a frame that failed after its header was decoded.
pub fn recv_frame_detailed(
    stream: &UnixStream,
    negotiated: Option<u16>,
) -> Result<Received, RecvFailure> {
    let bare = |error| RecvFailure { header: None, error };
    let mut fds = Vec::new();
    let mut head = [0u8; HEADER_LEN];
    let got = recv_exact(stream, &mut head, &mut fds).map_err(bare)?;
    if got == 0 {
        return Err(bare(ProtocolError::Closed));
    }
    if got < HEADER_LEN {
        return Err(bare(ProtocolError::Truncated { what: "header", expected: HEADER_LEN, got }));
    }
    let header = FrameHeader::decode(&head).map_err(bare)?;
    let with = |error| RecvFailure { header: Some(header), error };
    header.check_version(negotiated).map_err(with)?;
    let len = header.body_len as usize;
    // Grown as bytes arrive, so a header announcing a large body costs memory only once the
    // body is actually sent.
    const CHUNK: usize = 1 << 20;
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        let end = len.min(start + CHUNK);
        body.resize(end, 0);
        let got = recv_exact(stream, &mut body[start..end], &mut fds).map_err(with)?;
        if got < end - start {
            return Err(with(ProtocolError::Truncated {
                what: "body",
                expected: len,
                got: start + got,
            }));
        }
    }
    header.check_fds(fds.len()).map_err(with)?;
    let message = decode_frame(&header, &body).map_err(with)?;
    Ok(Received { header, message, fds })
}

/// Fills `buf` unless the stream ends first; returns the bytes read. Descriptors that arrive
/// are appended to `fds`.
fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        let n = recvmsg_once(stream.as_raw_fd(), &mut buf[got..], fds)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Bytes of control buffer for `n` descriptors.
fn rights_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only does arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((n * size_of::<RawFd>()) as libc::c_uint) as usize }
}

/// Room for [`MAX_FDS`] descriptors plus credentials (in case the socket has `SO_PASSCRED`).
fn recv_control_len() -> usize {
    rights_space(MAX_FDS)
        // SAFETY: CMSG_SPACE only does arithmetic on its argument.
        + unsafe { libc::CMSG_SPACE(size_of::<libc::ucred>() as libc::c_uint) as usize }
}

/// A control buffer aligned for `cmsghdr` (u64 alignment is at least `size_t`'s).
fn control_buffer(len: usize) -> Vec<u64> {
    vec![0u64; len.div_ceil(size_of::<u64>())]
}

/// One `sendmsg` of `bytes` with `fds` attached; retries on `EINTR`.
fn sendmsg_once(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> Result<usize, ProtocolError> {
    let mut iov =
        libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let space = if fds.is_empty() { 0 } else { rights_space(fds.len()) };
    let mut control = control_buffer(space);
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` zeroed, suitably aligned bytes, which is room
        // for one cmsghdr carrying `fds.len()` descriptors (CMSG_SPACE), so CMSG_FIRSTHDR
        // returns a non-null header inside the buffer and CMSG_DATA points at
        // `fds.len() * size_of::<RawFd>()` writable bytes after it. The writes are unaligned
        // writes of plain integers.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(ProtocolError::Io(io::Error::other("control buffer too small")));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(fds) as libc::c_uint) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, &fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd);
            }
        }
    }
    loop {
        // SAFETY: `msg` points at one iovec describing `bytes` (alive and unaliased for the
        // call; sendmsg only reads it) and at a control buffer that outlives the call.
        // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(ProtocolError::Io(err));
        }
    }
}

/// One `recvmsg` into `buf`; descriptors that come with it are appended to `fds` (more than
/// [`MAX_FDS`] in all, or a truncated control message, is [`ProtocolError::TooManyFds`]).
/// Retries on `EINTR`. Returns the bytes read (0 at end of stream).
fn recvmsg_once(
    socket: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, ProtocolError> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let space = recv_control_len();
    let mut control = control_buffer(space);
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at one iovec describing `buf` (writable, unaliased for the
        // call) and at a control buffer of `space` bytes; both outlive the call. The kernel
        // writes at most those lengths.
        let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(ProtocolError::Io(err));
        }
    };
    // SAFETY: after a successful recvmsg, msg_control/msg_controllen describe the control
    // messages the kernel wrote into `control`; CMSG_FIRSTHDR/CMSG_NXTHDR walk them and stop
    // (null) at the end of that length. For an SCM_RIGHTS message the data holds
    // (cmsg_len - CMSG_LEN(0)) / size_of::<c_int>() descriptors, each newly installed in this
    // process and owned by nobody else, so wrapping each in an OwnedFd (exactly once) is
    // sound. Reads are unaligned reads of plain integers inside the buffer.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let data_len = ((*cmsg).cmsg_len as usize).saturating_sub(header);
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..data_len / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds { max: MAX_FDS });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use super::*;
    use crate::protocol::messages::{Kind, OpenModelFd, Stats, encode_frame};
    use crate::protocol::{PROTOCOL_VERSION, features};

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the 2-element array.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just created and are owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn memfd(contents: &[u8]) -> File {
        // SAFETY: the name is a NUL-terminated string literal.
        let fd = unsafe { libc::memfd_create(c"ferry-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: the descriptor was just created and is owned by nobody else.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.write_all(contents).expect("write memfd");
        f
    }

    #[test]
    fn a_memfd_travels_with_its_frame() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let file = memfd(b"weights");
        let msg = Message::OpenModelFd(OpenModelFd { name: "m".into() });
        send_frame(&a, PROTOCOL_VERSION, 3, &msg, &[file.as_fd()]).expect("send");
        drop(file);
        let r = recv_frame(&b, Some(PROTOCOL_VERSION)).expect("recv");
        assert_eq!(r.message, msg);
        assert_eq!(r.header.request_id, 3);
        assert!(r.header.carries_fds());
        let [fd] = <[OwnedFd; 1]>::try_from(r.fds).expect("one fd");
        let mut f = File::from(fd);
        let mut s = String::new();
        std::io::Seek::rewind(&mut f).expect("seek");
        f.read_to_string(&mut s).expect("read through the passed fd");
        assert_eq!(s, "weights");
    }

    #[test]
    fn unexpected_descriptors_are_rejected_and_closed() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (mut read_end, write_end) = pipe();
        // A Stats frame (no fds allowed) with the pipe's write end attached, flag clear.
        let bytes = encode_frame(1, &Message::Stats(Stats {})).expect("encode");
        send_frame_bytes(&a, &bytes, &[write_end.as_fd()]).expect("send raw");
        drop(write_end);
        let e = recv_frame(&b, None).expect_err("fds on a stats frame");
        assert!(
            matches!(e, ProtocolError::BadFds { kind: Kind::Stats, flagged: false, received: 1 }),
            "{e}"
        );
        // The received copy of the write end was closed: the pipe reads end-of-file.
        let mut buf = [0u8; 1];
        assert_eq!(read_end.read(&mut buf).expect("read"), 0);
    }

    #[test]
    fn a_missing_descriptor_is_rejected() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let msg = Message::OpenModelFd(OpenModelFd { name: String::new() });
        let e = send_frame(&a, 1, 1, &msg, &[]).expect_err("sender checks too");
        assert!(matches!(e, ProtocolError::BadFds { .. }));
        send_frame_bytes(&a, &encode_frame(1, &msg).expect("encode"), &[]).expect("send raw");
        assert!(matches!(
            recv_frame(&b, None),
            Err(ProtocolError::BadFds { kind: Kind::OpenModelFd, flagged: false, received: 0 })
        ));
    }

    #[test]
    fn too_many_descriptors_are_rejected_and_closed() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (mut read_end, write_end) = pipe();
        let dups: Vec<OwnedFd> = (0..MAX_FDS + 1)
            .map(|_| write_end.as_fd().try_clone_to_owned().expect("dup"))
            .collect();
        drop(write_end);
        let borrowed: Vec<BorrowedFd<'_>> = dups.iter().map(AsFd::as_fd).collect();
        let msg = Message::OpenModelFd(OpenModelFd { name: String::new() });
        assert!(matches!(
            send_frame(&a, 1, 1, &msg, &borrowed),
            Err(ProtocolError::TooManyFds { max: MAX_FDS })
        ));
        // Bypass the sender's check: 17 descriptors in one control message.
        let bytes = encode_frame(1, &msg).expect("encode");
        let raw: Vec<RawFd> = dups.iter().map(AsRawFd::as_raw_fd).collect();
        sendmsg_once(a.as_raw_fd(), &bytes, &raw).expect("send 17");
        drop(dups);
        let e = recv_frame(&b, None).expect_err("too many");
        assert!(matches!(e, ProtocolError::TooManyFds { max: MAX_FDS }), "{e}");
        let mut buf = [0u8; 1];
        assert_eq!(read_end.read(&mut buf).expect("read"), 0, "every received copy was closed");
    }

    #[test]
    fn end_of_stream_is_closed_between_frames_and_truncated_inside_one() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        drop(a);
        assert!(matches!(recv_frame(&b, None), Err(ProtocolError::Closed)));

        let (mut a, b) = UnixStream::pair().expect("socketpair");
        a.write_all(&encode_frame(1, &Message::Stats(Stats {})).expect("encode")[..10])
            .expect("write");
        drop(a);
        assert!(matches!(
            recv_frame(&b, None),
            Err(ProtocolError::Truncated { what: "header", expected: 24, got: 10 })
        ));

        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let msg = Message::OpenModel(crate::protocol::OpenModel { path: "/models/x".into() });
        let bytes = encode_frame(1, &msg).expect("encode");
        a.write_all(&bytes[..bytes.len() - 2]).expect("write");
        drop(a);
        let e = recv_frame(&b, None).expect_err("short body");
        assert!(matches!(e, ProtocolError::Truncated { what: "body", .. }), "{e}");
    }

    #[test]
    fn frames_are_read_one_at_a_time_and_versions_checked() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut both = encode_frame(1, &Message::Stats(Stats {})).expect("encode");
        both.extend(encode_frame(2, &Message::Stats(Stats {})).expect("encode"));
        let hello = crate::protocol::Hello {
            min_version: 1,
            max_version: 9,
            features: features::KNOWN,
            client_name: "x".into(),
        };
        both.extend(encode_frame_with(9, 0, 3, &hello.into()).expect("encode"));
        a.write_all(&both).expect("write");
        assert_eq!(recv_frame(&b, Some(1)).expect("first").header.request_id, 1);
        assert_eq!(recv_frame(&b, Some(1)).expect("second").header.request_id, 2);
        assert!(matches!(
            recv_frame(&b, Some(1)),
            Err(ProtocolError::UnsupportedVersion { found: 9, min: 1, max: 1 })
        ));
    }

    #[test]
    fn header_errors_come_before_the_body_is_read() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut h = encode_frame(1, &Message::Stats(Stats {})).expect("encode");
        h[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        // Only the header is ever sent: the receiver must not wait for 4 GiB.
        a.write_all(&h).expect("write");
        assert!(matches!(recv_frame(&b, None), Err(ProtocolError::FrameTooLarge { .. })));
    }
}
