//! Blocking frame I/O over a Unix stream socket, with file descriptors as `SCM_RIGHTS`
//! ancillary data.
//!
//! - [`send_frame`] writes a whole frame with one `sendmsg` (more only if the kernel takes it
//!   in parts); descriptors ride on the first call, i.e. with the frame's first byte.
//! - [`recv_frame`] reads exactly one frame (never a byte of the next), collects every
//!   descriptor that arrives with any of its bytes (received close-on-exec), and checks them
//!   against the header's flag and the kind's rule. On any error every descriptor received
//!   with the frame is closed (they are [`OwnedFd`]s, dropped with the error).
//! - A connection's owner reads with a buffering [`FrameReader`] instead: one `recvmsg` per
//!   frame rather than two (header, then body), and none for frames that arrived together.
//!   [`FrameWriter`] encodes into a buffer it keeps. On a busy connection these system calls
//!   are most of what a round trip costs besides the two thread wake-ups.
//!
//! After any error from [`recv_frame`] the stream's position within the frame sequence is
//! unknown (a read may have stopped mid-frame): close the connection.

use std::collections::VecDeque;
use std::io;
use std::mem::{size_of, size_of_val};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::frame::{FLAG_FDS, FrameHeader, ProtocolError};
use super::messages::{ErrorReply, Message, decode_frame, encode_frame_with};
use super::{HEADER_LEN, MAX_BODY_LEN, MAX_FDS, NO_REQUEST, body_config};

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
    FrameReader::exact().read_frame(stream, negotiated)
}

/// Initial (and, once a large frame is gone, again) size of a buffering [`FrameReader`]'s
/// buffer: room for many small frames, so one `recvmsg` brings whatever the peer has sent.
const READ_BUFFER: usize = 16 << 10;
/// A buffer that grew past this for one large frame is given back once that frame is read.
const KEEP_BUFFER: usize = 1 << 20;
/// Large bodies are read in pieces of at most this, and the buffer grows only as bytes
/// actually arrive, so a header announcing a large body costs memory only once it is sent.
const CHUNK: usize = 1 << 20;

/// Reads frames from a stream, keeping what it has read beyond the current frame.
///
/// A buffering reader ([`FrameReader::new`]) asks the kernel for as much as it has with each
/// `recvmsg`, so a frame (header and body) usually takes one system call, and frames a peer
/// sent back to back take one between them. It blocks only while the frame it is reading is
/// incomplete, never to wait for a later one. An exact reader ([`FrameReader::exact`], what
/// [`recv_frame`] uses) never reads a byte past the frame it is reading, at the cost of two
/// calls per frame: use it where someone else reads the same stream afterwards.
///
/// Descriptors: the kernel ends a `recvmsg` right after the bytes of the `sendmsg` that carried
/// descriptors (it never appends later writes to them), so descriptors belong to the frame
/// that holds the last byte of the read that brought them. That is the frame whose bytes the
/// carrying `sendmsg` held, provided that `sendmsg` held no bytes of a *later* frame
/// (docs/protocol.md, section 8): every frame's descriptors travel with that frame's own
/// bytes, as [`send_frame`] sends them. The exact reader attributes them the same way.
///
/// After any error the stream's position within the frame sequence is unknown: close the
/// connection (the reader drops every descriptor it held).
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes read and not yet handed out: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]` (bytes handed out so far).
    offset: u64,
    /// Descriptors not yet handed out, each group with the stream offset of the last byte of
    /// the read that brought it (increasing).
    pending: VecDeque<(u64, Vec<OwnedFd>)>,
    /// Never read past the current frame.
    exact: bool,
    /// How long to poll for a frame before blocking for it (zero: block at once).
    spin: Duration,
    /// Shared with other readers: how many may poll at once.
    spin_limit: Option<Arc<SpinLimit>>,
    /// Whether the current (or last) [`FrameReader::read_frame`] polls.
    polling: bool,
    /// Whether the last [`FrameReader::read_frame`] went to sleep in a blocking read.
    slept: bool,
    backoff: Backoff,
}

/// When a [`FrameReader`] polls (see [`FrameReader::set_spin`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Backoff {
    /// Polls in a row that ended in sleep anyway. One alone does not back off: on a virtual
    /// machine the odd poll fails when the host preempts a vCPU.
    failed: u32,
    /// Frames to read without polling after a failed poll (doubles with each, up to
    /// [`Backoff::MAX`]; a poll that finds its frame resets it).
    backoff: u32,
    /// Frames still to read without polling.
    skip: u32,
}

impl Backoff {
    const MAX: u32 = 64;

    /// Whether the next read polls.
    fn polls(&self) -> bool {
        self.skip == 0
    }

    /// After a read that polled (or not) and slept (or not).
    fn after(&mut self, polled: bool, slept: bool) {
        if !polled {
            self.skip = self.skip.saturating_sub(1);
        } else if !slept {
            *self = Backoff::default();
        } else {
            self.failed += 1;
            if self.failed >= 2 {
                self.backoff = (self.backoff * 2).clamp(1, Self::MAX);
                self.skip = self.backoff;
            }
        }
    }
}

/// How many threads may poll at once (shared by the readers that have it), so that waiting
/// connections never take more than that many cores polling.
#[derive(Debug)]
pub struct SpinLimit {
    active: AtomicUsize,
    max: usize,
}

impl SpinLimit {
    pub fn new(max: usize) -> SpinLimit {
        SpinLimit { active: AtomicUsize::new(0), max }
    }

    /// Half the cores this process may use (at least one).
    pub fn half_the_cores() -> SpinLimit {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        SpinLimit::new((cores / 2).max(1))
    }

    fn enter(&self) -> bool {
        let mut n = self.active.load(Ordering::Relaxed);
        loop {
            if n >= self.max {
                return false;
            }
            match self.active.compare_exchange_weak(n, n + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
    }

    fn leave(&self) {
        self.active.fetch_sub(1, Ordering::Release);
    }
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &(self.end - self.start))
            .field("capacity", &self.buf.len())
            .field("offset", &self.offset)
            .field("pending_fds", &self.pending.iter().map(|(_, g)| g.len()).sum::<usize>())
            .field("exact", &self.exact)
            .field("spin", &self.spin)
            .finish()
    }
}

impl Default for FrameReader {
    fn default() -> FrameReader {
        FrameReader::new()
    }
}

impl FrameReader {
    /// A buffering reader (type docs).
    pub fn new() -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            offset: 0,
            pending: VecDeque::new(),
            exact: false,
            spin: Duration::ZERO,
            spin_limit: None,
            polling: false,
            slept: false,
            backoff: Backoff::default(),
        }
    }

    /// A reader that never reads past the frame it is reading (type docs).
    pub fn exact() -> FrameReader {
        FrameReader { exact: true, ..FrameReader::new() }
    }

    /// Before sleeping until a frame's bytes arrive, poll for them (non-blocking reads) for up
    /// to `spin`. A peer answering within that time is read without this thread going to
    /// sleep and being woken again, which costs far more than the polls on a virtual machine
    /// (tens of microseconds to wake an idle vCPU). Zero (the default) sleeps at once.
    ///
    /// Polling adapts: after two polls in a row that ended in sleep anyway (a peer that is
    /// slow to answer, or a machine so busy that the peer did not get a CPU in time) the
    /// reader sleeps at once for the next 1, 2, 4, ... 64 frames (doubling with each further
    /// failed poll), and polls every time again after a poll that found its frame. A slow peer or a busy machine so costs a poll now and then, not
    /// one per frame. The polls never call `sched_yield`: on Linux (EEVDF) every yield while
    /// other threads wait pushes the caller's deadline back a whole time slice, and a thread
    /// that yields in a loop then waits milliseconds for a CPU once it sleeps and wakes.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
        self.backoff = Backoff::default();
    }

    /// The poll time set with [`FrameReader::set_spin`].
    pub fn spin(&self) -> Duration {
        self.spin
    }

    /// Polls only while `limit` lets it (shared with other readers); otherwise blocks at once.
    pub fn set_spin_limit(&mut self, limit: Arc<SpinLimit>) {
        self.spin_limit = Some(limit);
    }

    /// Whether the last [`FrameReader::read_frame`] had to sleep in a blocking read (its
    /// frame was neither buffered nor arrived while it polled).
    pub fn slept(&self) -> bool {
        self.slept
    }

    /// Whether the last [`FrameReader::read_frame`] polled before sleeping (or would have,
    /// had it needed to wait).
    pub fn polled(&self) -> bool {
        self.polling
    }

    /// Bytes read from the stream and not yet returned as part of a frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Reads one frame, like [`recv_frame_detailed`]: `negotiated` is the connection's
    /// version once the handshake is done; end of stream before a frame's first byte is
    /// [`ProtocolError::Closed`], inside one [`ProtocolError::Truncated`]; header errors come
    /// before the body is waited for.
    pub fn read_frame(
        &mut self,
        stream: &UnixStream,
        negotiated: Option<u16>,
    ) -> Result<Received, RecvFailure> {
        self.slept = false;
        self.polling = !self.spin.is_zero() && self.backoff.polls();
        let r = self.read_frame_inner(stream, negotiated);
        self.backoff.after(self.polling, self.slept);
        if r.is_err() {
            // The stream cannot be trusted any more: close every descriptor held.
            self.pending.clear();
        }
        r
    }

    fn read_frame_inner(
        &mut self,
        stream: &UnixStream,
        negotiated: Option<u16>,
    ) -> Result<Received, RecvFailure> {
        let bare = |error| RecvFailure { header: None, error };
        let got = self.fill(stream, HEADER_LEN).map_err(bare)?;
        if got == 0 {
            return Err(bare(ProtocolError::Closed));
        }
        if got < HEADER_LEN {
            return Err(bare(ProtocolError::Truncated {
                what: "header",
                expected: HEADER_LEN,
                got,
            }));
        }
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        let header = FrameHeader::decode(&head).map_err(bare)?;
        let with = |error| RecvFailure { header: Some(header), error };
        header.check_version(negotiated).map_err(with)?;
        let len = header.body_len as usize;
        let total = HEADER_LEN + len;
        let got = self.fill(stream, total).map_err(with)?;
        if got < total {
            return Err(with(ProtocolError::Truncated {
                what: "body",
                expected: len,
                got: got - HEADER_LEN,
            }));
        }
        let frame_end = self.offset + total as u64;
        let mut fds = Vec::new();
        while let Some((last, _)) = self.pending.front()
            && *last < frame_end
        {
            if let Some((_, group)) = self.pending.pop_front() {
                fds.extend(group);
            }
        }
        if fds.len() > MAX_FDS {
            return Err(with(ProtocolError::TooManyFds { max: MAX_FDS }));
        }
        header.check_fds(fds.len()).map_err(with)?;
        let body = &self.buf[self.start + HEADER_LEN..self.start + total];
        let message = decode_frame(&header, body).map_err(with)?;
        self.consume(total);
        Ok(Received { header, message, fds })
    }

    /// Hands out `n` buffered bytes; gives back a buffer that grew for a large frame.
    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP_BUFFER {
                self.buf = Vec::new();
            }
        }
    }

    /// Reads until `need` bytes are buffered or the stream ends; returns the bytes buffered
    /// (less than `need` only at the end of the stream).
    fn fill(&mut self, stream: &UnixStream, need: usize) -> Result<usize, ProtocolError> {
        while self.end - self.start < need {
            let have = self.end - self.start;
            // Room for the rest of the frame, at most one chunk more than is here already,
            // and (buffering) a whole read buffer.
            let mut room = need.min(have + CHUNK);
            if !self.exact {
                room = room.max(READ_BUFFER);
            }
            if self.buf.len() - self.start < room {
                self.buf.copy_within(self.start..self.end, 0);
                self.start = 0;
                self.end = have;
                if self.buf.len() < room {
                    self.buf.resize(room, 0);
                }
            }
            let limit =
                if self.exact { self.start + need.min(have + CHUNK) } else { self.buf.len() };
            let mut fds = Vec::new();
            let n = self.recv(stream, self.end..limit, &mut fds)?;
            if n == 0 {
                break;
            }
            self.end += n;
            if !fds.is_empty() {
                let last = self.offset + (self.end - self.start) as u64 - 1;
                self.pending.push_back((last, fds));
            }
        }
        Ok(self.end - self.start)
    }

    /// One read into `buf[range]`, polling first for up to the spin time.
    fn recv(
        &mut self,
        stream: &UnixStream,
        range: std::ops::Range<usize>,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<usize, ProtocolError> {
        let socket = stream.as_raw_fd();
        let buf = &mut self.buf[range];
        let limit = self.spin_limit.as_deref();
        if self.polling && limit.is_none_or(SpinLimit::enter) {
            let start = Instant::now();
            let polled = loop {
                match recvmsg_once(socket, buf, fds, libc::MSG_DONTWAIT) {
                    Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    r => break Some(r),
                }
                if start.elapsed() >= self.spin {
                    break None;
                }
                std::hint::spin_loop();
            };
            if let Some(limit) = limit {
                limit.leave();
            }
            if let Some(r) = polled {
                return r;
            }
        }
        self.slept = true;
        recvmsg_once(socket, buf, fds, 0)
    }
}

/// Encodes frames into a buffer kept between them, and sends each with one `sendmsg`.
#[derive(Debug, Default)]
pub struct FrameWriter {
    buf: Vec<u8>,
}

impl FrameWriter {
    pub fn new() -> FrameWriter {
        FrameWriter::default()
    }

    /// [`send_frame`], without allocating once the buffer has grown to the largest frame.
    pub fn send(
        &mut self,
        stream: &UnixStream,
        version: u16,
        request_id: u64,
        msg: &Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        self.encode(version, request_id, msg, fds.len())?;
        let r = send_frame_bytes(stream, &self.buf, fds);
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        r
    }

    /// The frame's bytes in `self.buf`: the same bytes as [`encode_frame_with`], encoded in
    /// place.
    fn encode(
        &mut self,
        version: u16,
        request_id: u64,
        msg: &Message,
        fds: usize,
    ) -> Result<(), ProtocolError> {
        if fds > MAX_FDS {
            return Err(ProtocolError::TooManyFds { max: MAX_FDS });
        }
        let flags = if fds == 0 { 0 } else { FLAG_FDS };
        let mut header = FrameHeader { version, kind: msg.kind(), flags, body_len: 0, request_id };
        header.check_fds(fds)?;
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; HEADER_LEN]);
        // `Message` serialises as its fields alone, exactly like `Message::encode_body`.
        bincode::serde::encode_into_std_write(msg, &mut self.buf, body_config())
            .map_err(|e| ProtocolError::Body { kind: msg.kind(), message: e.to_string() })?;
        let body = self.buf.len() - HEADER_LEN;
        header.body_len = u32::try_from(body)
            .ok()
            .filter(|&n| n <= MAX_BODY_LEN)
            .ok_or(ProtocolError::FrameTooLarge { len: body as u64, max: MAX_BODY_LEN })?;
        self.buf[..HEADER_LEN].copy_from_slice(&header.encode());
        Ok(())
    }
}

/// Reads and drops, without blocking, whatever the peer sent that was not read (descriptors
/// that came with it are closed). Closing a Unix stream socket with unread bytes makes the
/// peer read ECONNRESET, after whatever was sent to it, where it would read the end of the
/// stream: call this after `shutdown(Both)` (which stops the peer from sending more, so it
/// ends) and before closing.
pub fn discard_input(stream: &UnixStream) {
    let mut buf = [0u8; 4096];
    // A bound in case the socket was not shut down and the peer keeps sending.
    for _ in 0..4096 {
        let mut fds = Vec::new();
        match recvmsg_once(stream.as_raw_fd(), &mut buf, &mut fds, libc::MSG_DONTWAIT) {
            Ok(0) | Err(ProtocolError::Io(_)) => break,
            // Bytes read (and any descriptor closed): more may be waiting.
            Ok(_) | Err(_) => {}
        }
    }
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

/// One `sendmsg` of `bytes` with `fds` attached (a plain `send` when there are none: the
/// kernel then has no message header to copy in); retries on `EINTR`.
fn sendmsg_once(socket: RawFd, bytes: &[u8], fds: &[RawFd]) -> Result<usize, ProtocolError> {
    if fds.is_empty() {
        loop {
            // SAFETY: `bytes` is a valid, initialised buffer of `bytes.len()` bytes for the
            // call; send only reads it. MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(socket, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL)
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(ProtocolError::Io(err));
            }
        }
    }
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

/// Words of the control buffer every `recvmsg` gets, on the stack: more than
/// [`recv_control_len`] needs (checked by a test).
const RECV_CONTROL_WORDS: usize = 32;

/// One `recvmsg` into `buf` with `flags` (`MSG_DONTWAIT` to poll); descriptors that come with
/// it are appended to `fds` (more than [`MAX_FDS`] in all, or a truncated control message,
/// is [`ProtocolError::TooManyFds`]). Retries on `EINTR`. Returns the bytes read (0 at end
/// of stream).
fn recvmsg_once(
    socket: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    flags: libc::c_int,
) -> Result<usize, ProtocolError> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // A u64 array is aligned for `cmsghdr`; no allocation per read.
    let mut control = [0u64; RECV_CONTROL_WORDS];
    let space = recv_control_len().min(size_of_val(&control));
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
        let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
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

    fn stats(id: u64) -> Vec<u8> {
        encode_frame(id, &Message::Stats(Stats {})).expect("encode")
    }

    #[test]
    fn the_receive_control_buffer_has_room_for_every_descriptor() {
        assert!(recv_control_len() <= RECV_CONTROL_WORDS * size_of::<u64>());
    }

    #[test]
    fn the_frame_writer_sends_the_bytes_of_encode_frame() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let file = memfd(b"x");
        let msgs: Vec<(Message, bool)> = vec![
            (Message::Stats(Stats {}), false),
            (
                Message::Acquire(crate::protocol::Acquire {
                    model: 7,
                    component: "unet".into(),
                    layer: 3,
                }),
                false,
            ),
            (Message::OpenModelFd(OpenModelFd { name: "model".into() }), true),
            (
                Message::Error(ErrorReply::new(crate::protocol::ErrorCode::Busy, "é".repeat(5000))),
                false,
            ),
            (Message::Stats(Stats {}), false),
        ];
        let mut w = FrameWriter::new();
        let mut expected = Vec::new();
        for (i, (msg, fd)) in msgs.iter().enumerate() {
            let fds = if *fd { vec![file.as_fd()] } else { vec![] };
            w.send(&a, PROTOCOL_VERSION, i as u64 + 1, msg, &fds).expect("send");
            let flags = if *fd { FLAG_FDS } else { 0 };
            expected.extend(
                encode_frame_with(PROTOCOL_VERSION, flags, i as u64 + 1, msg).expect("encode"),
            );
        }
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read");
        assert_eq!(got, expected);
        // The sender's checks are the same as send_frame's.
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let e = w.send(&a, 1, 1, &msgs[2].0, &[]).expect_err("the fd is required");
        assert!(matches!(e, ProtocolError::BadFds { kind: Kind::OpenModelFd, .. }), "{e}");
    }

    #[test]
    fn a_buffering_reader_returns_frames_sent_together_one_by_one() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut all = Vec::new();
        for id in 1..=50 {
            all.extend(stats(id));
        }
        // A body larger than the read buffer, between small frames.
        let big = Message::OpenModel(crate::protocol::OpenModel { path: "p".repeat(100_000) });
        all.extend(encode_frame(51, &big).expect("encode"));
        all.extend(stats(52));
        a.write_all(&all).expect("write");
        drop(a);
        let mut r = FrameReader::new();
        for id in 1..=50 {
            let f = r.read_frame(&b, Some(PROTOCOL_VERSION)).expect("frame");
            assert_eq!(f.header.request_id, id);
            assert_eq!(f.message, Message::Stats(Stats {}));
        }
        assert!(r.buffered() > 0, "later frames came with the first read");
        let f = r.read_frame(&b, Some(PROTOCOL_VERSION)).expect("big frame");
        assert_eq!((f.header.request_id, f.message), (51, big));
        let f = r.read_frame(&b, Some(PROTOCOL_VERSION)).expect("frame");
        assert_eq!(f.header.request_id, 52);
        assert!(matches!(r.read_frame(&b, None).map_err(|f| f.error), Err(ProtocolError::Closed)));
    }

    #[test]
    fn an_exact_reader_never_reads_past_its_frame() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut both = stats(1);
        both.extend(stats(2));
        a.write_all(&both).expect("write");
        let mut r = FrameReader::exact();
        assert_eq!(r.read_frame(&b, None).expect("first").header.request_id, 1);
        assert_eq!(r.buffered(), 0);
        let mut rest = vec![0u8; both.len() / 2];
        (&b).read_exact(&mut rest).expect("the second frame is still in the socket");
        assert_eq!(rest, stats(2));
    }

    #[test]
    fn descriptors_go_to_their_frame_when_frames_arrive_together() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let file = memfd(b"seven");
        let fd_msg = Message::OpenModelFd(OpenModelFd { name: "m".into() });
        // Each frame its own sendmsg, as every sender does; the kernel may hand several to
        // one read.
        send_frame(&a, 1, 1, &Message::Stats(Stats {}), &[]).expect("send");
        send_frame(&a, 1, 2, &fd_msg, &[file.as_fd()]).expect("send");
        send_frame(&a, 1, 3, &Message::Stats(Stats {}), &[]).expect("send");
        send_frame(&a, 1, 4, &fd_msg, &[file.as_fd()]).expect("send");
        send_frame(&a, 1, 5, &fd_msg, &[file.as_fd()]).expect("send");
        send_frame(&a, 1, 6, &Message::Stats(Stats {}), &[]).expect("send");
        let mut r = FrameReader::new();
        for id in 1..=6 {
            let f = r.read_frame(&b, Some(1)).expect("frame");
            assert_eq!(f.header.request_id, id);
            let want = usize::from(matches!(id, 2 | 4 | 5));
            assert_eq!(f.fds.len(), want, "frame {id}");
            for fd in f.fds {
                let mut s = String::new();
                let mut f = File::from(fd);
                std::io::Seek::rewind(&mut f).expect("seek");
                f.read_to_string(&mut s).expect("read");
                assert_eq!(s, "seven");
            }
        }
    }

    #[test]
    fn a_buffering_reader_counts_descriptors_spread_over_a_frame_together() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (mut read_end, write_end) = pipe();
        let dups: Vec<OwnedFd> = (0..MAX_FDS + 1)
            .map(|_| write_end.as_fd().try_clone_to_owned().expect("dup"))
            .collect();
        drop(write_end);
        let fds: Vec<BorrowedFd<'_>> = dups.iter().map(AsFd::as_fd).collect();
        let lora = Message::ApplyLora(crate::protocol::ApplyLora {
            model: 1,
            stack: vec![],
            mode: crate::protocol::LoraMode::Backup,
        });
        let bytes = encode_frame_with(1, FLAG_FDS, 1, &lora).expect("encode");
        send_frame_bytes(&a, &bytes[..HEADER_LEN], &fds[..MAX_FDS]).expect("header");
        send_frame_bytes(&a, &bytes[HEADER_LEN..], &fds[MAX_FDS..]).expect("body");
        drop(dups);
        let e = FrameReader::new().read_frame(&b, None).expect_err("17 descriptors").error;
        assert!(matches!(e, ProtocolError::TooManyFds { max: MAX_FDS }), "{e}");
        let mut buf = [0u8; 1];
        assert_eq!(read_end.read(&mut buf).expect("read"), 0, "every received copy was closed");
    }

    #[test]
    fn a_buffering_reader_rejects_what_the_exact_one_rejects() {
        // Descriptors on a frame that takes none.
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (_read_end, write_end) = pipe();
        send_frame(&a, 1, 1, &Message::Stats(Stats {}), &[]).expect("send");
        send_frame_bytes(&a, &stats(2), &[write_end.as_fd()]).expect("send raw");
        let mut r = FrameReader::new();
        assert_eq!(r.read_frame(&b, None).expect("first").fds.len(), 0);
        let e = r.read_frame(&b, None).expect_err("fds on stats");
        assert_eq!(e.request_id(), 2);
        assert!(
            matches!(
                e.error,
                ProtocolError::BadFds { kind: Kind::Stats, flagged: false, received: 1 }
            ),
            "{e}"
        );
        // Truncation in the header and in the body; a header error before the body.
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        a.write_all(&stats(1)[..10]).expect("write");
        drop(a);
        let e = FrameReader::new().read_frame(&b, None).expect_err("short header").error;
        assert!(
            matches!(e, ProtocolError::Truncated { what: "header", expected: 24, got: 10 }),
            "{e}"
        );
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let msg = Message::OpenModel(crate::protocol::OpenModel { path: "/models/x".into() });
        let bytes = encode_frame(1, &msg).expect("encode");
        a.write_all(&bytes[..bytes.len() - 2]).expect("write");
        drop(a);
        let e = FrameReader::new().read_frame(&b, None).expect_err("short body").error;
        let body = bytes.len() - HEADER_LEN;
        assert!(
            matches!(e, ProtocolError::Truncated { what: "body", expected, got }
                if expected == body && got == body - 2),
            "{e}"
        );
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut h = stats(1);
        h[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        a.write_all(&h).expect("write");
        let e = FrameReader::new().read_frame(&b, None).expect_err("too large").error;
        assert!(matches!(e, ProtocolError::FrameTooLarge { .. }), "{e}");
        // The negotiated version.
        let (a, b) = UnixStream::pair().expect("socketpair");
        send_frame(&a, 2, 1, &Message::Stats(Stats {}), &[]).expect("send");
        let e = FrameReader::new().read_frame(&b, Some(1)).expect_err("version").error;
        assert!(matches!(e, ProtocolError::UnsupportedVersion { found: 2, min: 1, max: 1 }));
    }

    #[test]
    fn polling_backs_off_after_polls_that_end_in_sleep_and_resumes_after_one_that_does_not() {
        let mut b = Backoff::default();
        assert!(b.polls());
        // Polls keep finding their frames: every read polls.
        for _ in 0..10 {
            b.after(true, false);
            assert!(b.polls());
        }
        // One poll that ends in sleep: no back-off yet. A second one in a row, and after it
        // and each further one the next 1, 2, 4, ... 64 reads do not poll.
        b.after(true, true);
        assert!(b.polls());
        for skipped in [1u32, 2, 4, 8, 16, 32, 64, 64] {
            assert!(b.polls());
            b.after(true, true);
            for _ in 0..skipped {
                assert!(!b.polls(), "skipping {skipped}");
                b.after(false, true);
            }
        }
        // One poll that finds its frame, and every read polls again.
        assert!(b.polls());
        b.after(true, false);
        assert_eq!(b, Backoff::default());
        // A lone failure between successes never backs off.
        for _ in 0..5 {
            b.after(true, true);
            assert!(b.polls());
            b.after(true, false);
            assert!(b.polls());
        }
    }

    #[test]
    fn a_spinning_reader_gets_frames_sent_before_and_after_it_starts_waiting() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let mut r = FrameReader::new();
        r.set_spin(Duration::from_micros(50));
        let sender = std::thread::spawn(move || {
            for id in 1..=20u64 {
                send_frame(&a, 1, id, &Message::Stats(Stats {}), &[]).expect("send");
                // Some arrive while the reader spins, some after it has gone to sleep.
                std::thread::sleep(Duration::from_micros(id * 20));
            }
        });
        for id in 1..=20 {
            assert_eq!(r.read_frame(&b, Some(1)).expect("frame").header.request_id, id);
        }
        sender.join().expect("sender");
        assert!(matches!(r.read_frame(&b, None).map_err(|f| f.error), Err(ProtocolError::Closed)));
    }

    #[test]
    fn discarding_input_lets_the_peer_read_the_end_of_the_stream() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        a.write_all(&stats(1)).expect("unread request");
        send_frame(&b, 1, 0, &Message::Stats(Stats {}), &[]).expect("last frame");
        b.shutdown(std::net::Shutdown::Both).expect("shutdown");
        discard_input(&b);
        drop(b);
        assert_eq!(recv_frame(&a, None).expect("last frame").header.request_id, 0);
        assert!(matches!(recv_frame(&a, None), Err(ProtocolError::Closed)), "not ECONNRESET");
    }
}
