//! The frame header and every way a frame can be rejected.
//!
//! | offset | size | field        | type (little-endian) |
//! | -----: | ---: | ------------ | -------------------- |
//! |      0 |    4 | `magic`      | the bytes `FRRY`     |
//! |      4 |    2 | `version`    | u16                  |
//! |      6 |    2 | `kind`       | u16 ([`Kind`])       |
//! |      8 |    4 | `flags`      | u32                  |
//! |     12 |    4 | `body_len`   | u32                  |
//! |     16 |    8 | `request_id` | u64                  |

use std::io;

use super::codes::ErrorCode;
use super::messages::{FdRule, Kind};
use super::{HEADER_LEN, MAGIC, MAX_BODY_LEN, MAX_FDS, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Flag bit 0: file descriptors travel with this frame (`SCM_RIGHTS`).
pub const FLAG_FDS: u32 = 1 << 0;
/// Every flag bit that must be zero.
pub const RESERVED_FLAGS: u32 = !FLAG_FDS;

/// A decoded frame header (layout in the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// The protocol version the frame is written in (the negotiated one after the handshake).
    pub version: u16,
    pub kind: Kind,
    pub flags: u32,
    /// Bytes of body that follow the header.
    pub body_len: u32,
    /// Chosen by the client for a request, echoed by the reply.
    pub request_id: u64,
}

impl FrameHeader {
    /// The header's 24 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        b
    }

    /// Decodes and checks a header, in this order: magic, version (not 0; which versions are
    /// acceptable depends on the connection, see [`FrameHeader::check_version`]), kind (one
    /// this implementation knows), reserved flag bits, the descriptor flag against the kind,
    /// body length (at most [`MAX_BODY_LEN`]).
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, ProtocolError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version == 0 {
            return Err(ProtocolError::UnsupportedVersion {
                found: 0,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        let raw_kind = u16::from_le_bytes([bytes[6], bytes[7]]);
        let kind = Kind::from_u16(raw_kind).ok_or(ProtocolError::UnknownKind { kind: raw_kind })?;
        let flags = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if flags & RESERVED_FLAGS != 0 {
            return Err(ProtocolError::ReservedFlags { flags });
        }
        if flags & FLAG_FDS != 0 && kind.fds() == FdRule::None {
            return Err(ProtocolError::BadFds { kind, flagged: true, received: 0 });
        }
        let body_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        if body_len > MAX_BODY_LEN {
            return Err(ProtocolError::FrameTooLarge {
                len: u64::from(body_len),
                max: MAX_BODY_LEN,
            });
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[16..24]);
        Ok(FrameHeader { version, kind, flags, body_len, request_id: u64::from_le_bytes(id) })
    }

    /// Whether the header says descriptors come with the frame.
    pub fn carries_fds(&self) -> bool {
        self.flags & FLAG_FDS != 0
    }

    /// Checks the header's version against the connection's: `None` before the handshake
    /// (any version but 0 is accepted, since a `Hello` may come from a newer client), the
    /// negotiated version after it (every frame must carry exactly that).
    pub fn check_version(&self, negotiated: Option<u16>) -> Result<(), ProtocolError> {
        match negotiated {
            Some(v) if v != self.version => {
                Err(ProtocolError::UnsupportedVersion { found: self.version, min: v, max: v })
            }
            _ => Ok(()),
        }
    }

    /// Checks `received` descriptors against the flag and the kind's rule: the flag is set
    /// exactly when descriptors came, and their number is what the kind carries.
    pub fn check_fds(&self, received: usize) -> Result<(), ProtocolError> {
        let flagged = self.carries_fds();
        let count_ok = match self.kind.fds() {
            FdRule::None => received == 0,
            FdRule::One => received == 1,
            FdRule::UpTo(max) => received <= max,
        };
        if flagged != (received > 0) || !count_ok {
            return Err(ProtocolError::BadFds { kind: self.kind, flagged, received });
        }
        Ok(())
    }
}

/// Why a frame was rejected (or could not be read). Each variant names what was wrong;
/// [`ProtocolError::code`] is the [`ErrorCode`] to answer it with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("bad magic {found:02x?}: not a ferry frame (frames start with \"FRRY\")")]
    BadMagic { found: [u8; 4] },
    #[error("protocol version {found} is not supported here (expected {min}..={max})")]
    UnsupportedVersion { found: u16, min: u16, max: u16 },
    #[error("unknown message kind {kind:#06x}")]
    UnknownKind { kind: u16 },
    #[error("reserved flag bits set: flags {flags:#010x} (only bit 0 is defined)")]
    ReservedFlags { flags: u32 },
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u32 },
    #[error("connection ended inside a frame's {what}: {got} of {expected} bytes")]
    Truncated { what: &'static str, expected: usize, got: usize },
    #[error("{} body does not decode: {message}", kind.name())]
    Body { kind: Kind, message: String },
    #[error("{} body has {extra} trailing bytes after its last field", kind.name())]
    TrailingBytes { kind: Kind, extra: usize },
    #[error(
        "{} frame came with {received} file descriptor(s) and flag bit 0 {}; {} frames carry {}",
        kind.name(),
        if *flagged { "set" } else { "clear" },
        kind.name(),
        kind.fds().describe()
    )]
    BadFds { kind: Kind, flagged: bool, received: usize },
    #[error("more than {max} file descriptors came with one frame; the extra ones were dropped")]
    TooManyFds { max: usize },
    #[error("unexpected {} frame: {reason}", kind.name())]
    UnexpectedMessage { kind: Kind, reason: String },
    #[error("the peer closed the connection")]
    Closed,
    #[error("socket I/O failed: {0}")]
    Io(#[from] io::Error),
}

impl ProtocolError {
    /// The code to answer this rejection with. Every protocol error is fatal to its
    /// connection: the server sends an [`ErrorReply`](super::ErrorReply) with this code and
    /// closes. (`Closed` and `Io` map to `Truncated` and `Internal`, though nothing can be sent
    /// on a connection that is gone.)
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::BadMagic { .. } => ErrorCode::BadMagic,
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::UnknownKind { .. } => ErrorCode::UnknownKind,
            ProtocolError::ReservedFlags { .. } => ErrorCode::ReservedFlags,
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::Truncated { .. } | ProtocolError::Closed => ErrorCode::Truncated,
            ProtocolError::Body { .. } => ErrorCode::BadBody,
            ProtocolError::TrailingBytes { .. } => ErrorCode::TrailingBytes,
            ProtocolError::BadFds { .. } | ProtocolError::TooManyFds { .. } => ErrorCode::BadFds,
            ProtocolError::UnexpectedMessage { .. } => ErrorCode::UnexpectedMessage,
            ProtocolError::Io(_) => ErrorCode::Internal,
        }
    }
}

impl FdRule {
    /// `no file descriptors`, `exactly 1 file descriptor`, `0 to 16 file descriptors`.
    pub fn describe(self) -> String {
        match self {
            FdRule::None => "no file descriptors".to_string(),
            FdRule::One => "exactly 1 file descriptor".to_string(),
            FdRule::UpTo(max) => format!("0 to {max} file descriptors"),
        }
    }
}

const _: () = assert!(MAX_FDS > 0);

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: Kind) -> FrameHeader {
        FrameHeader { version: 1, kind, flags: 0, body_len: 3, request_id: 0x0102_0304_0506_0708 }
    }

    #[test]
    fn header_round_trips_with_fields_at_their_offsets() {
        let h = FrameHeader { flags: FLAG_FDS, ..header(Kind::OpenModelFd) };
        let b = h.encode();
        assert_eq!(&b[0..4], b"FRRY");
        assert_eq!(b[4..6], [1, 0]);
        assert_eq!(b[6..8], [0x11, 0x00]);
        assert_eq!(b[8..12], [1, 0, 0, 0]);
        assert_eq!(b[12..16], [3, 0, 0, 0]);
        assert_eq!(b[16..24], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(FrameHeader::decode(&b).expect("valid"), h);
    }

    #[test]
    fn each_header_field_is_checked() {
        let good = header(Kind::Stats).encode();
        let mut b = good;
        b[0] = b'X';
        assert!(
            matches!(FrameHeader::decode(&b), Err(ProtocolError::BadMagic { found }) if &found == b"XRRY")
        );
        let mut b = good;
        b[4] = 0;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtocolError::UnsupportedVersion { found: 0, .. })
        ));
        let mut b = good;
        b[6..8].copy_from_slice(&0x7777u16.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtocolError::UnknownKind { kind: 0x7777 })
        ));
        let mut b = good;
        b[11] = 0x80;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtocolError::ReservedFlags { flags: 0x8000_0000 })
        ));
        let mut b = good;
        b[8] = 1;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtocolError::BadFds { kind: Kind::Stats, flagged: true, received: 0 })
        ));
        let mut b = good;
        b[12..16].copy_from_slice(&(MAX_BODY_LEN + 1).to_le_bytes());
        let e = FrameHeader::decode(&b).expect_err("too large");
        assert!(
            matches!(e, ProtocolError::FrameTooLarge { len, max: MAX_BODY_LEN } if len == u64::from(MAX_BODY_LEN) + 1)
        );
        assert_eq!(e.code(), ErrorCode::FrameTooLarge);
        let mut b = good;
        b[12..16].copy_from_slice(&MAX_BODY_LEN.to_le_bytes());
        assert!(FrameHeader::decode(&b).is_ok(), "exactly the limit is allowed");
    }

    #[test]
    fn version_is_checked_against_the_connection() {
        let h = FrameHeader { version: 7, ..header(Kind::Hello) };
        assert!(h.check_version(None).is_ok());
        assert!(matches!(
            h.check_version(Some(1)),
            Err(ProtocolError::UnsupportedVersion { found: 7, min: 1, max: 1 })
        ));
        assert!(header(Kind::Hello).check_version(Some(1)).is_ok());
    }

    #[test]
    fn descriptor_counts_follow_the_kind() {
        let fd = FrameHeader { flags: FLAG_FDS, ..header(Kind::OpenModelFd) };
        assert!(fd.check_fds(1).is_ok());
        assert!(fd.check_fds(0).is_err());
        assert!(fd.check_fds(2).is_err());
        assert!(header(Kind::OpenModelFd).check_fds(0).is_err(), "the fd is required");
        assert!(header(Kind::Stats).check_fds(0).is_ok());
        let e = header(Kind::Stats).check_fds(1).expect_err("no fds allowed");
        assert!(e.to_string().contains("flag bit 0 clear"), "{e}");
        let lora = FrameHeader { flags: FLAG_FDS, ..header(Kind::ApplyLora) };
        assert!(lora.check_fds(MAX_FDS).is_ok());
        assert!(lora.check_fds(0).is_err(), "flag set without fds");
        assert!(header(Kind::ApplyLora).check_fds(0).is_ok());
    }
}
