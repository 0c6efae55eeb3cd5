"""Typed exceptions for ferryd's error codes (docs/protocol.md, section 7).

Every exception raised by the client derives from :class:`FerryError`, which carries the
server's numeric ``code`` (``None`` for conditions detected by the client itself) and its
``message``. Codes map to one subclass each; a code this module does not know maps to the
class of its range (:class:`ProtocolError` 100-199, :class:`RequestError` 200-299,
:class:`ServerError` 300-399).

The connection is gone after :class:`ProtocolError` (fatal, the server closes),
:class:`ConnectionLost` and :class:`ShuttingDown` (which is also a :class:`ConnectionLost`).
"""

from typing import Dict, Optional, Type


class FerryError(Exception):
    """Base of every ferry client error."""

    code: Optional[int] = None
    name: str = "error"

    def __init__(self, message: str = "", code: Optional[int] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        if self.code is None:
            return self.message
        return f"[{self.code} {self.name}] {self.message}"


class ProtocolError(FerryError):
    """100-199: a protocol violation (fatal: the connection is closed). Also raised when the
    client receives a frame it cannot decode."""

    name = "protocol"


class RequestError(FerryError):
    """200-299: the request failed; the connection stays usable."""

    name = "request"


class ServerError(FerryError):
    """300-399: a server condition."""

    name = "server"


class ConnectionLost(FerryError):
    """The connection to ferryd is closed (server gone, socket closed, or the client was
    closed). Every later call on the same client raises it too."""

    name = "connection_lost"


class CudaError(FerryError):
    """A CUDA driver call made by this client (mapping a CUDA ferryd's arena, see
    :mod:`ferry.cuda`) failed. ``call`` names the driver function, ``result`` is its
    ``CUresult`` (``None`` when no call was made) and ``result_name`` the driver's name for it
    (``CUDA_ERROR_...``). Raised by the client (``code`` is ``None``); the connection to
    ferryd stays usable."""

    name = "cuda"

    def __init__(self, message: str = "", call: Optional[str] = None,
                 result: Optional[int] = None, result_name: Optional[str] = None):
        super().__init__(message)
        self.call = call
        self.result = result
        self.result_name = result_name


class CudaUnavailable(CudaError):
    """CUDA cannot be used from this process: the driver library does not load (no NVIDIA
    driver), ``cuInit`` fails (no GPU, a broken driver), the driver lacks a function ferry
    needs, or no visible GPU has the UUID of ferryd's device (``CUDA_VISIBLE_DEVICES`` hides
    it). The message says which. Not a server error: the connection stays usable."""

    name = "cuda_unavailable"


class BadCudaArena(FerryError):
    """A ``cuda_arena`` reply that cannot describe a usable mapping (an allocation smaller than
    the arena, an IPC handle that is not 64 bytes, a descriptor missing or unexpected), found
    before any driver call. Raised by the client; the connection stays usable."""

    name = "bad_cuda_arena"


class BadCudaEvent(FerryError):
    """A CUDA interprocess event handle that is not 64 bytes: in a ``leased_event`` reply (the
    lease is released again) or given to :meth:`ferry.cuda.ImportedArena.stream_wait` /
    ``wait_host``; found before any driver call. Raised by the client; the connection stays
    usable."""

    name = "bad_cuda_event"


class MemoryKindError(FerryError):
    """The memory a layer lies in cannot be used that way: ``Lease.view``/``Lease.array`` on a
    CUDA ferryd (device memory is not readable from the host: use ``Lease.device_ptr``), or
    ``Lease.device_ptr`` on a host arena (use ``Lease.view``). Raised by the client before
    anything is sent."""

    name = "memory_kind"


def _define(code: int, name: str, cls_name: str, base: type, doc: str) -> type:
    return type(cls_name, (base,), {"code": code, "name": name, "__doc__": doc})


BadMagic = _define(100, "bad_magic", "BadMagic", ProtocolError, "The frame did not start with FRRY.")
UnsupportedVersion = _define(
    101, "unsupported_version", "UnsupportedVersion", ProtocolError, "No common protocol version."
)
UnknownKind = _define(102, "unknown_kind", "UnknownKind", ProtocolError, "Unknown message kind.")
ReservedFlags = _define(103, "reserved_flags", "ReservedFlags", ProtocolError, "Reserved flag set.")
FrameTooLarge = _define(104, "frame_too_large", "FrameTooLarge", ProtocolError, "Body over 16 MiB.")
Truncated = _define(105, "truncated", "Truncated", ProtocolError, "Connection ended inside a frame.")
BadBody = _define(106, "bad_body", "BadBody", ProtocolError, "The body does not decode.")
TrailingBytes = _define(
    107, "trailing_bytes", "TrailingBytes", ProtocolError, "Bytes left after the last field."
)
BadFds = _define(108, "bad_fds", "BadFds", ProtocolError, "Descriptors do not match the frame.")
UnexpectedMessage = _define(
    109, "unexpected_message", "UnexpectedMessage", ProtocolError, "A frame not allowed now."
)
BadRequest = _define(200, "bad_request", "BadRequest", RequestError, "A field's value is invalid.")
Unsupported = _define(201, "unsupported", "Unsupported", RequestError, "Feature not granted.")
NotPermitted = _define(
    202, "not_permitted", "NotPermitted", RequestError, "Path outside the model roots, or denied."
)
NotFound = _define(203, "not_found", "NotFound", RequestError, "The path does not exist.")
BadModel = _define(204, "bad_model", "BadModel", RequestError, "Not a model ferry can serve.")
UnknownModel = _define(205, "unknown_model", "UnknownModel", RequestError, "No such model or view.")
UnknownComponent = _define(
    206, "unknown_component", "UnknownComponent", RequestError, "No such component."
)
UnknownLayer = _define(207, "unknown_layer", "UnknownLayer", RequestError, "No such layer index.")
UnknownLease = _define(208, "unknown_lease", "UnknownLease", RequestError, "No such lease held.")
LeaseOfOtherModel = _define(
    209, "lease_of_other_model", "LeaseOfOtherModel", RequestError, "Lease of another model."
)
UnknownView = _define(210, "unknown_view", "UnknownView", RequestError, "No such view.")
Busy = _define(211, "busy", "Busy", RequestError, "Leases are still held.")
Timeout = _define(212, "timeout", "Timeout", RequestError, "Waited too long for device memory.")
OutOfDeviceMemory = _define(
    213, "out_of_device_memory", "OutOfDeviceMemory", RequestError, "No room in the arena."
)
BudgetTooSmall = _define(
    214, "budget_too_small", "BudgetTooSmall", RequestError, "The budget cannot serve the policy."
)
FileTruncated = _define(
    215, "file_truncated", "FileTruncated", RequestError, "A model file was truncated."
)
ModelFailed = _define(216, "model_failed", "ModelFailed", RequestError, "The model failed earlier.")
DeviceError = _define(217, "device", "DeviceError", RequestError, "The device failed.")
BadLora = _define(218, "bad_lora", "BadLora", RequestError, "A LoRA file could not be read.")
LimitExceeded = _define(
    219, "limit_exceeded", "LimitExceeded", RequestError, "A per-client limit was reached."
)
UnknownDevice = _define(
    220, "unknown_device", "UnknownDevice", RequestError, "No device has this index or UUID."
)
DeviceUnavailable = _define(
    221, "device_unavailable", "DeviceUnavailable", RequestError,
    "The named device failed to open (the message says why); the others serve."
)


class ShuttingDown(ServerError, ConnectionLost):
    """300: the server is stopping and closes the connection (also a ConnectionLost)."""

    code = 300
    name = "shutting_down"


Internal = _define(301, "internal", "Internal", ServerError, "A bug in the server.")

BY_CODE: Dict[int, Type[FerryError]] = {
    c.code: c  # type: ignore[misc]
    for c in (
        BadMagic, UnsupportedVersion, UnknownKind, ReservedFlags, FrameTooLarge, Truncated,
        BadBody, TrailingBytes, BadFds, UnexpectedMessage, BadRequest, Unsupported,
        NotPermitted, NotFound, BadModel, UnknownModel, UnknownComponent, UnknownLayer,
        UnknownLease, LeaseOfOtherModel, UnknownView, Busy, Timeout, OutOfDeviceMemory,
        BudgetTooSmall, FileTruncated, ModelFailed, DeviceError, BadLora, LimitExceeded,
        UnknownDevice, DeviceUnavailable, ShuttingDown, Internal,
    )
}


def is_fatal(code: int) -> bool:
    """Whether the server closes the connection after an error with this code."""
    return 100 <= code <= 199 or code == 300


def from_code(code: int, message: str) -> FerryError:
    """The exception for an ``error`` reply."""
    cls = BY_CODE.get(code)
    if cls is None:
        if 100 <= code <= 199:
            cls = ProtocolError
        elif 200 <= code <= 299:
            cls = RequestError
        elif 300 <= code <= 399:
            cls = ServerError
        else:
            cls = FerryError
    return cls(message, code)
