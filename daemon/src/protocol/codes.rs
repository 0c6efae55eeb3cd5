//! The stable error codes of [`ErrorReply`](super::ErrorReply). Numbers never change meaning;
//! new codes are added, old ones never reused.

use crate::engine::EngineError;
use crate::engine::policy::PolicyError;
use crate::lora::LoraError;
use crate::store::StoreError;

macro_rules! codes {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $name:literal; )*) => {
        /// A typed error code (the table in docs/protocol.md).
        ///
        /// - `100..=199`: protocol errors. Fatal: the server sends the error and closes the
        ///   connection.
        /// - `200..=299`: the request failed; the connection stays usable.
        /// - `300..`: server conditions (`ShuttingDown` is fatal, `Internal` is not).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant = $code, )*
        }

        impl ErrorCode {
            /// Every code, in number order.
            pub const ALL: &'static [ErrorCode] = &[$( ErrorCode::$variant, )*];

            /// The code with this number, if this implementation knows it.
            pub fn from_u32(code: u32) -> Option<ErrorCode> {
                match code {
                    $( $code => Some(ErrorCode::$variant), )*
                    _ => None,
                }
            }

            /// The code's name in snake case (`unknown_lease`).
            pub fn name(self) -> &'static str {
                match self {
                    $( ErrorCode::$variant => $name, )*
                }
            }
        }
    };
}

codes! {
    /// The frame did not start with `FRRY`.
    BadMagic = 100, "bad_magic";
    /// A frame's version is not the negotiated one, or the handshake found no common version.
    UnsupportedVersion = 101, "unsupported_version";
    /// The header's kind is not a known message kind.
    UnknownKind = 102, "unknown_kind";
    /// Reserved flag bits were set.
    ReservedFlags = 103, "reserved_flags";
    /// The header announced a body above the limit.
    FrameTooLarge = 104, "frame_too_large";
    /// The connection ended inside a frame.
    Truncated = 105, "truncated";
    /// The body did not decode as its kind's message.
    BadBody = 106, "bad_body";
    /// The body had bytes after the message's last field.
    TrailingBytes = 107, "trailing_bytes";
    /// Descriptors missing, unexpected, too many, or the flag disagrees with them.
    BadFds = 108, "bad_fds";
    /// A valid frame the connection's state does not allow: a request before `Hello`, a
    /// second `Hello`, a reply kind sent by a client, request id 0.
    UnexpectedMessage = 109, "unexpected_message";
    /// A field's value is invalid (a fraction outside `[0, 1]`, a non-finite scale, an fd
    /// index with no fd, an attached fd no entry uses, an empty LoRA stack).
    BadRequest = 200, "bad_request";
    /// The request needs a feature that was not agreed, or the server cannot do it.
    Unsupported = 201, "unsupported";
    /// The peer may not do this (path outside every model root, peer not on the allow list).
    NotPermitted = 202, "not_permitted";
    /// The path does not exist.
    NotFound = 203, "not_found";
    /// The files are not a model ferry can serve (the message says which file and why).
    BadModel = 204, "bad_model";
    /// No open model (or view) has this id.
    UnknownModel = 205, "unknown_model";
    /// The model has no component of this name.
    UnknownComponent = 206, "unknown_component";
    /// The component has no layer of this index.
    UnknownLayer = 207, "unknown_layer";
    /// The lease is not held by this client.
    UnknownLease = 208, "unknown_lease";
    /// The lease belongs to another model.
    LeaseOfOtherModel = 209, "lease_of_other_model";
    /// No view has this id.
    UnknownView = 210, "unknown_view";
    /// Leases are still held on what the request would change.
    Busy = 211, "busy";
    /// Timed out waiting for device memory (every layer that could make room is leased).
    Timeout = 212, "timeout";
    /// No room in the device arena.
    OutOfDeviceMemory = 213, "out_of_device_memory";
    /// The budget cannot serve the requested policy.
    BudgetTooSmall = 214, "budget_too_small";
    /// A model file was truncated while mapped; the model no longer serves.
    FileTruncated = 215, "file_truncated";
    /// The model failed earlier and no longer serves.
    ModelFailed = 216, "model_failed";
    /// The device failed.
    Device = 217, "device";
    /// A LoRA file could not be read or understood.
    BadLora = 218, "bad_lora";
    /// A per-client limit was reached (open models, leases, requests in flight).
    LimitExceeded = 219, "limit_exceeded";
    /// No device of the server has this index or UUID.
    UnknownDevice = 220, "unknown_device";
    /// The named device failed to open (the message says why); the others serve.
    DeviceUnavailable = 221, "device_unavailable";
    /// The server is shutting down; it closes the connection after this.
    ShuttingDown = 300, "shutting_down";
    /// A bug or an unexpected failure in the server.
    Internal = 301, "internal";
}

impl ErrorCode {
    /// Whether the server closes the connection after sending this code.
    pub fn is_fatal(self) -> bool {
        matches!(self as u32, 100..=199) || self == ErrorCode::ShuttingDown
    }
}

/// Every engine error has a code (no catch-all: a new `EngineError` variant must be given one
/// here).
impl From<&EngineError> for ErrorCode {
    fn from(e: &EngineError) -> ErrorCode {
        match e {
            EngineError::Store(s) => store_code(s, ErrorCode::BadModel),
            EngineError::Lora(LoraError::Store(s)) => store_code(s, ErrorCode::BadLora),
            EngineError::Lora(_) => ErrorCode::BadLora,
            EngineError::Config(_) => ErrorCode::BadRequest,
            EngineError::Device(_) => ErrorCode::Device,
            EngineError::Policy { source: PolicyError::BudgetTooSmall { .. }, .. } => {
                ErrorCode::BudgetTooSmall
            }
            EngineError::Policy { source: PolicyError::Empty, .. } => ErrorCode::BadRequest,
            EngineError::UnknownModel(_) => ErrorCode::UnknownModel,
            EngineError::UnknownComponent { .. } => ErrorCode::UnknownComponent,
            EngineError::UnknownLayer { .. } => ErrorCode::UnknownLayer,
            EngineError::UnknownLease { .. } => ErrorCode::UnknownLease,
            EngineError::LeaseOfOtherModel { .. } => ErrorCode::LeaseOfOtherModel,
            EngineError::Busy { .. } => ErrorCode::Busy,
            EngineError::Timeout { .. } => ErrorCode::Timeout,
            EngineError::OutOfDeviceMemory { .. } => ErrorCode::OutOfDeviceMemory,
            EngineError::FileTruncated { .. } => ErrorCode::FileTruncated,
            EngineError::ModelFailed { .. } => ErrorCode::ModelFailed,
            EngineError::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }
}

/// `NotFound` / `NotPermitted` for those I/O errors, else `otherwise`.
fn store_code(e: &StoreError, otherwise: ErrorCode) -> ErrorCode {
    match e {
        StoreError::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => ErrorCode::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorCode::NotPermitted,
            _ => otherwise,
        },
        _ => otherwise,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_classified() {
        let mut names = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u32(c as u32), Some(c));
            assert!(names.insert(c.name()));
        }
        assert!(ErrorCode::BadMagic.is_fatal());
        assert!(ErrorCode::UnexpectedMessage.is_fatal());
        assert!(ErrorCode::ShuttingDown.is_fatal());
        assert!(!ErrorCode::UnknownLease.is_fatal());
        assert!(!ErrorCode::Internal.is_fatal());
        assert_eq!(ErrorCode::from_u32(0), None);
    }

    #[test]
    fn engine_errors_map_to_their_codes() {
        let io = |kind| {
            EngineError::Store(StoreError::Io {
                path: "/m".into(),
                source: std::io::Error::from(kind),
            })
        };
        assert_eq!(ErrorCode::from(&io(std::io::ErrorKind::NotFound)), ErrorCode::NotFound);
        assert_eq!(
            ErrorCode::from(&io(std::io::ErrorKind::PermissionDenied)),
            ErrorCode::NotPermitted
        );
        assert_eq!(ErrorCode::from(&EngineError::UnknownModel(3)), ErrorCode::UnknownModel);
        assert_eq!(
            ErrorCode::from(&EngineError::Policy {
                scope: "model 1".into(),
                source: PolicyError::BudgetTooSmall { policy: "none", needed: 2, available: 1 },
            }),
            ErrorCode::BudgetTooSmall
        );
        assert_eq!(ErrorCode::from(&EngineError::Config("x".into())), ErrorCode::BadRequest);
        let lora = EngineError::Lora(LoraError::NotALora { path: "/l".into(), reason: "x".into() });
        assert_eq!(ErrorCode::from(&lora), ErrorCode::BadLora);
    }
}
