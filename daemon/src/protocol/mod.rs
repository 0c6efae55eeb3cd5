//! The wire protocol of ferryd's Unix socket. `docs/protocol.md` is its specification; this
//! module is the reference implementation, and the golden vectors under
//! `tests/fixtures/protocol/` pin every byte of it.
//!
//! # Shape
//!
//! - Every frame is a fixed 24-byte little-endian header ([`FrameHeader`]: magic `FRRY`,
//!   protocol version, message [`Kind`], flags, body length, request id) followed by a body
//!   of `body_len` bytes: the bincode 2.0.1 encoding ([`body_config`]) of the message
//!   struct the kind names.
//! - The header's kind says which message the body holds; the body holds only its fields.
//!   Requests go client → server, replies (kind ≥ `0x8000`) server → client, carrying the
//!   request's id. Any request may be answered with [`ErrorReply`] (kind `0xffff`).
//! - A connection starts with [`Hello`] → [`Welcome`]: version negotiation ([`negotiate`]) and
//!   feature bits ([`features`]).
//! - File descriptors travel with `SCM_RIGHTS` ancillary data, flagged in the header
//!   ([`FLAG_FDS`]); [`socket`] has blocking send/receive helpers that enforce the rules.
//!
//! Every rejection is a typed [`ProtocolError`] naming what was wrong; nothing here panics on
//! any input (a property test feeds it mutated golden frames).
//!
//! # Who checks what
//!
//! [`FrameHeader::decode`] checks everything a header alone can tell (magic, version ≠ 0, known
//! kind, flags, body length) so a bad frame is rejected before its body is read.
//! [`decode_frame`] checks the body. [`socket::recv_frame`] also checks the negotiated version
//! and the descriptors that came with the frame. What depends on connection state (a request
//! before `Hello`, a reply kind sent by a client, request id 0) is the server's to check; it
//! answers those with [`ErrorCode::UnexpectedMessage`].

mod codes;
mod convert;
pub mod frame;
pub mod messages;
pub mod socket;

pub use self::codes::ErrorCode;
pub use self::frame::{FLAG_FDS, FrameHeader, ProtocolError, RESERVED_FLAGS};
pub use self::messages::*;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"FRRY";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;
/// The highest protocol version this implementation speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The lowest protocol version this implementation speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The largest body a frame may carry (16 MiB). A header announcing more is rejected before
/// the body is read.
pub const MAX_BODY_LEN: u32 = 16 << 20;
/// The most file descriptors one frame may carry.
pub const MAX_FDS: usize = 16;
/// The request id of frames that answer no request (an error sent before closing, when the
/// offending frame's header could not be read). Clients never use it.
pub const NO_REQUEST: u64 = 0;

/// Feature bits, exchanged in [`Hello::features`] and [`Welcome::features`]. The server
/// answers with the bits both sides set; a request that needs a bit that was not agreed is
/// answered with [`ErrorCode::Unsupported`]. Bits not listed here are reserved: a client may
/// set them (a server ignores bits it does not know), a server never answers with them.
pub mod features {
    /// Descriptors may be passed: [`OpenModelFd`](super::OpenModelFd) and
    /// [`LoraSource::Fd`](super::LoraSource::Fd).
    pub const FD_PASSING: u64 = 1 << 0;
    /// Models may be opened by path ([`OpenModel`](super::OpenModel)): the server has at least
    /// one model root.
    pub const OPEN_PATH: u64 = 1 << 1;
    /// The device is the host backend and its arena can be mapped by clients
    /// ([`MapArena`](super::MapArena)).
    pub const HOST_ARENA: u64 = 1 << 2;
    /// LoRA views ([`ApplyLora`](super::ApplyLora), [`RemoveLora`](super::RemoveLora)).
    pub const LORA: u64 = 1 << 3;
    /// CUDA arenas shared with clients: on a CUDA device, [`MapArena`](super::MapArena) and
    /// [`MapArenaOn`](super::MapArenaOn) are answered [`CudaArena`](super::CudaArena).
    pub const CUDA_IPC: u64 = 1 << 4;
    /// Several devices: [`OpenModelOn`](super::OpenModelOn),
    /// [`OpenModelFdOn`](super::OpenModelFdOn), [`ListDevices`](super::ListDevices),
    /// [`MapArenaOn`](super::MapArenaOn). Every ferryd offers it, with one device or more.
    pub const DEVICES: u64 = 1 << 5;
    /// Interprocess ready events on CUDA: [`AcquireEvent`](super::AcquireEvent).
    pub const CUDA_EVENTS: u64 = 1 << 6;
    /// Every bit this implementation knows.
    pub const KNOWN: u64 =
        FD_PASSING | OPEN_PATH | HOST_ARENA | LORA | CUDA_IPC | DEVICES | CUDA_EVENTS;
}

/// The bincode configuration of every body: little-endian, fixed-size integers (`u64` lengths,
/// `u32` enum variant indices), decoding limited to [`MAX_BODY_LEN`] bytes.
pub fn body_config() -> BodyConfig {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_BODY_LEN as usize }>()
}

/// The type of [`body_config`].
pub type BodyConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::Limit<{ MAX_BODY_LEN as usize }>,
>;

/// What a handshake agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub version: u16,
    pub features: u64,
}

/// The server's side of the handshake: the highest version both sides speak, and the feature
/// bits both set. `server_min..=server_max` are the versions the server speaks and
/// `server_features` the bits it offers. Fails with an [`ErrorReply`] of code
/// [`ErrorCode::UnsupportedVersion`] (fatal: the server sends it and closes) when the ranges
/// do not meet or the client's range is empty.
pub fn negotiate(
    hello: &Hello,
    server_min: u16,
    server_max: u16,
    server_features: u64,
) -> Result<Negotiated, ErrorReply> {
    let low = hello.min_version.max(server_min).max(1);
    let high = hello.max_version.min(server_max);
    if hello.min_version > hello.max_version || low > high {
        return Err(ErrorReply::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "no common protocol version: the client speaks {}..={}, the server {}..={}",
                hello.min_version, hello.max_version, server_min, server_max
            ),
        ));
    }
    Ok(Negotiated { version: high, features: hello.features & server_features & features::KNOWN })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u16, max: u16, features: u64) -> Hello {
        Hello { min_version: min, max_version: max, features, client_name: "t".into() }
    }

    #[test]
    fn negotiation_picks_the_highest_common_version_and_common_features() {
        let n = negotiate(&hello(1, 5, u64::MAX), 1, 3, features::FD_PASSING | features::LORA)
            .expect("common version");
        assert_eq!(n, Negotiated { version: 3, features: features::FD_PASSING | features::LORA });
        let n = negotiate(&hello(2, 2, features::LORA), 1, 3, features::FD_PASSING).expect("v2");
        assert_eq!(n, Negotiated { version: 2, features: 0 });
    }

    #[test]
    fn negotiation_fails_without_a_common_version() {
        for h in [hello(2, 4, 0), hello(0, 0, 0), hello(3, 1, 0)] {
            let e = negotiate(&h, 1, 1, 0).expect_err("no common version");
            assert_eq!(e.code, ErrorCode::UnsupportedVersion as u32);
            assert!(e.message.contains("no common protocol version"), "{}", e.message);
        }
    }

    #[test]
    fn unknown_feature_bits_are_never_granted() {
        let n = negotiate(&hello(1, 1, 1 << 40 | 1), 1, 1, u64::MAX).expect("v1");
        assert_eq!(n.features, features::FD_PASSING);
    }
}
