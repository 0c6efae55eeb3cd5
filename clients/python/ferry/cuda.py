"""A CUDA ferryd's arena mapped into this process (the CUDA driver API through ctypes).

On a CUDA ferryd, ``map_arena`` (asked for by a client made with ``Client(..., cuda=True)``,
which requests feature ``CUDA_IPC``) is answered with ``cuda_arena``: the arena's length, the
UUID of its GPU and one of two handles (docs/protocol.md):

* ``PosixFd``: a VMM allocation exported as a POSIX file descriptor, which came with the frame.
  Imported with ``cuMemImportFromShareableHandle``, then ``alloc_len`` bytes of address space
  are reserved (``cuMemAddressReserve``), the allocation is mapped there (``cuMemMap``) and this
  device is granted access (``cuMemSetAccess``: read-only when the driver accepts it, else
  read-write, as ferry's Rust importer does; :attr:`ImportedArena.read_only` says which). The
  imported handle is released and the descriptor closed at once: the mapping alone keeps the
  memory alive, even past ferryd freeing its arena.
* ``Ipc``: a legacy 64-byte IPC handle, opened with ``cuIpcOpenMemHandle_v2`` (lazy peer
  access); it needs this process in ferryd's IPC namespace, and ferryd keeps the arena until it
  is closed (``cuIpcCloseMemHandle``).

The GPU is found by UUID, never by ordinal: ordinals differ between processes
(``CUDA_VISIBLE_DEVICES``). The mapping is made in that device's *primary* context (retained
with ``cuDevicePrimaryCtxRetain`` and made current only around the driver calls, with
push/pop, so whatever context the caller had current is left as it was): the primary context
is the one the CUDA runtime, and so PyTorch, uses, so the addresses are valid in its kernels.

Ordering: ferryd copies on its own stream. Read a leased layer only once it is ready: on the
host (``Lease.wait_ready``, or a ``leased`` reply with ``ready`` set; ``Lease.device_ptr``
waits for it), or on the GPU, by making the stream that reads it wait on the layer's
interprocess ready event (``acquire_event``, feature ``CUDA_EVENTS``:
:meth:`ImportedArena.stream_wait`, or :meth:`ImportedArena.wait_host` for a host thread). And
finish every use of it on the GPU (synchronise the streams that read it) *before* releasing the
lease: ferryd may overwrite the memory as soon as it acknowledges the release, and it never
waits on an event of its clients.

Interprocess events need this process in ferryd's IPC namespace (sharing its ``/dev/shm``):
across container boundaries ``cuIpcOpenEventHandle`` fails (or a wait may never complete).
ferryd offers ``CUDA_EVENTS`` only when its config says ``cuda_events = true``; the client
falls back to host waits (``wait_ready``) the first time an event cannot be opened or waited
on, and remembers that per arena (:attr:`ImportedArena.events_broken`).

Interprocess events: ferryd records them from a fixed ring it reuses and destroys only when it
closes the device, so the same 64-byte handles come back again and again. Each is opened
(``cuIpcOpenEventHandle``, in the arena's context) the first time its handle is seen and kept,
by handle, until the arena is closed, which destroys them (``cuEventDestroy_v2``) before it
unmaps; so at most a ring's worth stays open. A recycled handle names a later recording on the
same in-order copy stream, so a wait on it can only wait longer, never too little. Waiting on
an event of a ferryd that went away is undefined in the driver: close the arena (the client
does, on ``close``) when the connection to its ferryd ends.

Standard library only. ``libcuda.so.1`` is loaded on first use (``$FERRY_LIBCUDA`` names
another file); nothing here needs a GPU until an arena is imported, and every failure is a
:class:`ferry.errors.CudaError` (:class:`ferry.errors.CudaUnavailable` when CUDA cannot be used
at all) naming the call and the driver's error name.
"""

import contextlib
import ctypes
import logging
import os
import re
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import errors
from . import messages as m

__all__ = ["ImportedArena", "driver", "format_uuid", "normalize_uuid", "check_event_handle",
           "check_stream", "LIBCUDA"]

log = logging.getLogger(__name__)

#: The driver library loaded when ``$FERRY_LIBCUDA`` is not set.
LIBCUDA = "libcuda.so.1"

# ---- types and constants (cuda.h, CUDA 12; checked against cudarc 0.19's generated bindings) --

CUresult = ctypes.c_int  # an enum
CUdevice = ctypes.c_int
CUdeviceptr = ctypes.c_uint64  # unsigned long long on every 64-bit platform
CUcontext = ctypes.c_void_p
CUmemGenericAllocationHandle = ctypes.c_uint64  # unsigned long long
CUevent = ctypes.c_void_p  # struct CUevent_st *
CUstream = ctypes.c_void_p  # struct CUstream_st *

CUDA_SUCCESS = 0
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READ = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103
CU_EVENT_WAIT_DEFAULT = 0
IPC_HANDLE_LEN = 64
_PTR_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1
_SIZE_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_size_t))) - 1


class CUuuid(ctypes.Structure):
    """``CUuuid_st { char bytes[16]; }``."""

    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUipcMemHandle(ctypes.Structure):
    """``CUipcMemHandle_st { char reserved[64]; }``, passed *by value* to
    ``cuIpcOpenMemHandle_v2``."""

    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_LEN)]


class CUipcEventHandle(ctypes.Structure):
    """``CUipcEventHandle_st { char reserved[64]; }``, passed *by value* to
    ``cuIpcOpenEventHandle``."""

    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_LEN)]


class CUmemLocation(ctypes.Structure):
    """``CUmemLocation_st { CUmemLocationType type; int id; }`` (CUDA 13.2 turns ``id`` into a
    union of the same 4 bytes)."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAccessDesc(ctypes.Structure):
    """``CUmemAccessDesc_st { CUmemLocation location; CUmemAccess_flags flags; }`` (12
    bytes)."""

    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


_P = ctypes.POINTER
# name -> argument types. Every function returns CUresult. Names are the entry points cuda.h
# #defines the plain names to (``cuCtxPushCurrent`` -> ``cuCtxPushCurrent_v2``, ...); functions
# without a versioned entry point (``cuMemAddressReserve``, ``cuMemMap``, ...) keep their names.
_SIGNATURES: Dict[str, Sequence[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuDriverGetVersion": [_P(ctypes.c_int)],
    "cuGetErrorName": [CUresult, _P(ctypes.c_char_p)],
    "cuGetErrorString": [CUresult, _P(ctypes.c_char_p)],
    "cuDeviceGetCount": [_P(ctypes.c_int)],
    "cuDeviceGet": [_P(CUdevice), ctypes.c_int],
    "cuDeviceGetUuid_v2": [_P(CUuuid), CUdevice],
    "cuDeviceGetUuid": [_P(CUuuid), CUdevice],
    "cuDeviceGetAttribute": [_P(ctypes.c_int), ctypes.c_int, CUdevice],
    "cuDevicePrimaryCtxRetain": [_P(CUcontext), CUdevice],
    "cuDevicePrimaryCtxRelease_v2": [CUdevice],
    "cuCtxPushCurrent_v2": [CUcontext],
    "cuCtxPopCurrent_v2": [_P(CUcontext)],
    "cuCtxSynchronize": [],
    "cuMemcpyDtoH_v2": [ctypes.c_void_p, CUdeviceptr, ctypes.c_size_t],
    # VMM
    "cuMemImportFromShareableHandle": [_P(CUmemGenericAllocationHandle), ctypes.c_void_p,
                                       ctypes.c_uint],
    "cuMemAddressReserve": [_P(CUdeviceptr), ctypes.c_size_t, ctypes.c_size_t, CUdeviceptr,
                            ctypes.c_ulonglong],
    "cuMemMap": [CUdeviceptr, ctypes.c_size_t, ctypes.c_size_t, CUmemGenericAllocationHandle,
                 ctypes.c_ulonglong],
    "cuMemSetAccess": [CUdeviceptr, ctypes.c_size_t, _P(CUmemAccessDesc), ctypes.c_size_t],
    "cuMemRelease": [CUmemGenericAllocationHandle],
    "cuMemUnmap": [CUdeviceptr, ctypes.c_size_t],
    "cuMemAddressFree": [CUdeviceptr, ctypes.c_size_t],
    # legacy IPC
    "cuIpcOpenMemHandle_v2": [_P(CUdeviceptr), CUipcMemHandle, ctypes.c_uint],
    "cuIpcCloseMemHandle": [CUdeviceptr],
    # interprocess events (acquire_event)
    "cuIpcOpenEventHandle": [_P(CUevent), CUipcEventHandle],
    "cuStreamWaitEvent": [CUstream, CUevent, ctypes.c_uint],
    "cuEventSynchronize": [CUevent],
    "cuEventDestroy_v2": [CUevent],
    # releasing a lease whose event a stream waited on
    "cuStreamSynchronize": [CUstream],
}
# Without these nothing works; the others are checked when a path needs them.
_REQUIRED = ("cuInit", "cuGetErrorName", "cuDeviceGetCount", "cuDeviceGet",
             "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease_v2", "cuCtxPushCurrent_v2",
             "cuCtxPopCurrent_v2", "cuCtxSynchronize")
_VMM = ("cuMemImportFromShareableHandle", "cuMemAddressReserve", "cuMemMap", "cuMemSetAccess",
        "cuMemRelease", "cuMemUnmap", "cuMemAddressFree")
_IPC = ("cuIpcOpenMemHandle_v2", "cuIpcCloseMemHandle")
_EVENTS = ("cuIpcOpenEventHandle", "cuStreamWaitEvent", "cuEventSynchronize",
           "cuEventDestroy_v2")


# ---- UUIDs ---------------------------------------------------------------------------------

_DASHED = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def format_uuid(raw: bytes) -> str:
    """16 bytes as ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` (lower-case hex), the form
    nvidia-smi, NVML and ferryd print."""
    if len(raw) != 16:
        raise ValueError(f"a CUDA UUID has 16 bytes, not {len(raw)}")
    h = bytes(raw).hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def normalize_uuid(uuid: str) -> str:
    """``uuid`` in one form for comparisons: lower case, blanks stripped, and the ``gpu-``
    prefix added to a bare dashed UUID (PyTorch prints device UUIDs without it)."""
    u = str(uuid).strip().lower()
    if _DASHED.match(u):
        u = "gpu-" + u
    return u


# ---- the driver ----------------------------------------------------------------------------


class Driver:
    """``libcuda`` loaded and initialised (:func:`driver`). Thin wrappers that raise
    :class:`ferry.errors.CudaError` naming the call."""

    def __init__(self, path: str):
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise errors.CudaUnavailable(
                f"cannot load the CUDA driver library {path} ({e}): is the NVIDIA driver "
                "installed and visible to this process?") from None
        self.path = path
        self.lib = lib
        self._fns: Dict[str, Any] = {}
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            fn.argtypes = list(argtypes)
            fn.restype = CUresult
            self._fns[name] = fn
        missing = [n for n in _REQUIRED if n not in self._fns]
        if missing:
            raise errors.CudaUnavailable(
                f"the CUDA driver library {path} lacks {', '.join(missing)}")
        if "cuDeviceGetUuid_v2" not in self._fns and "cuDeviceGetUuid" not in self._fns:
            raise errors.CudaUnavailable(f"the CUDA driver library {path} lacks cuDeviceGetUuid")
        rc = self._fns["cuInit"](0)
        if rc != CUDA_SUCCESS:
            raise errors.CudaUnavailable(
                f"cuInit failed: {self.describe(rc)}", "cuInit", rc, self.error_name(rc))

    # -- errors --------------------------------------------------------------------------

    def error_name(self, rc: int) -> str:
        """The driver's name for ``rc`` (``CUDA_ERROR_NO_DEVICE``), else ``CUresult <rc>``."""
        s = ctypes.c_char_p()
        if self._fns["cuGetErrorName"](rc, ctypes.byref(s)) == CUDA_SUCCESS and s.value:
            return s.value.decode("ascii", "replace")
        return f"CUresult {rc}"

    def describe(self, rc: int) -> str:
        """``CUDA_ERROR_X (n): the driver's description``."""
        text = ""
        fn = self._fns.get("cuGetErrorString")
        if fn is not None:
            s = ctypes.c_char_p()
            if fn(rc, ctypes.byref(s)) == CUDA_SUCCESS and s.value:
                text = ": " + s.value.decode("utf-8", "replace")
        return f"{self.error_name(rc)} ({rc}){text}"

    def error(self, call: str, rc: int, what: str = "") -> errors.CudaError:
        where = f" ({what})" if what else ""
        return errors.CudaError(f"{call} failed{where}: {self.describe(rc)}", call, rc,
                                self.error_name(rc))

    def need(self, names: Sequence[str], purpose: str) -> None:
        """Raises :class:`ferry.errors.CudaUnavailable` unless every function is there."""
        missing = [n for n in names if n not in self._fns]
        if missing:
            raise errors.CudaUnavailable(
                f"the CUDA driver library {self.path} lacks {', '.join(missing)}, needed for "
                f"{purpose} (the driver is too old)")

    def call(self, name: str, *args: Any, what: str = "") -> None:
        """Calls ``name``; raises :class:`ferry.errors.CudaError` unless it succeeds."""
        rc = self._fns[name](*args)
        if rc != CUDA_SUCCESS:
            raise self.error(name, rc, what)

    def raw(self, name: str, *args: Any) -> int:
        """Calls ``name`` and returns its ``CUresult``."""
        return int(self._fns[name](*args))

    # -- devices and contexts ------------------------------------------------------------

    def _uuids(self, dev: int) -> List[str]:
        """Every UUID the driver gives ``dev``: ``cuDeviceGetUuid_v2`` (a MIG instance's own)
        first, then ``cuDeviceGetUuid``."""
        out = []
        for name in ("cuDeviceGetUuid_v2", "cuDeviceGetUuid"):
            if name in self._fns:
                u = CUuuid()
                self.call(name, ctypes.byref(u), dev)
                s = format_uuid(bytes(u.bytes))
                if s not in out:
                    out.append(s)
        return out

    def devices(self) -> List[Tuple[int, int, List[str]]]:
        """``(ordinal, CUdevice, UUIDs)`` of every visible device."""
        n = ctypes.c_int(0)
        self.call("cuDeviceGetCount", ctypes.byref(n))
        out = []
        for i in range(n.value):
            dev = CUdevice(0)
            self.call("cuDeviceGet", ctypes.byref(dev), i)
            out.append((i, dev.value, self._uuids(dev.value)))
        return out

    def find(self, uuid: str) -> Tuple[int, int]:
        """``(ordinal, CUdevice)`` of the visible device with ``uuid`` (case-insensitive).
        Raises :class:`ferry.errors.CudaUnavailable` naming the visible ones."""
        want = normalize_uuid(uuid)
        visible = self.devices()
        # The first form (cuDeviceGetUuid_v2) decides; the legacy one only when it is unique.
        for rank in (0, 1):
            hits = [(o, d) for o, d, us in visible
                    if len(us) > rank and normalize_uuid(us[rank]) == want]
            if len(hits) == 1:
                return hits[0]
        names = ", ".join(us[0] for _, _, us in visible if us) or "none"
        raise errors.CudaUnavailable(
            f"no visible CUDA device has UUID {uuid} (visible: {names}); ferryd's GPU must be "
            "visible to this process (check CUDA_VISIBLE_DEVICES)")

    def attribute(self, attr: int, dev: int) -> int:
        v = ctypes.c_int(0)
        self.call("cuDeviceGetAttribute", ctypes.byref(v), attr, dev)
        return v.value

    def retain_primary(self, dev: int) -> int:
        """Retains ``dev``'s primary context (released with :meth:`release_primary`)."""
        ctx = CUcontext()
        self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
        if not ctx.value:
            raise errors.CudaError("cuDevicePrimaryCtxRetain returned no context",
                                   "cuDevicePrimaryCtxRetain")
        return ctx.value

    def release_primary(self, dev: int) -> None:
        self.call("cuDevicePrimaryCtxRelease_v2", dev)

    def current(self, ctx: int) -> "_Current":
        """A context manager making ``ctx`` current on this thread (push, then pop)."""
        return _Current(self, ctx)


class _Current:
    def __init__(self, drv: Driver, ctx: int):
        self.drv = drv
        self.ctx = ctx

    def __enter__(self) -> None:
        self.drv.call("cuCtxPushCurrent_v2", CUcontext(self.ctx))

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        popped = CUcontext()
        rc = self.drv.raw("cuCtxPopCurrent_v2", ctypes.byref(popped))
        if rc != CUDA_SUCCESS:
            err = self.drv.error("cuCtxPopCurrent_v2", rc)
            if exc_type is None:
                raise err
            log.error("%s (while handling another error)", err)


_drivers: Dict[str, Driver] = {}
_load_lock = threading.Lock()


def driver(path: Optional[str] = None) -> Driver:
    """The CUDA driver: ``path``, else ``$FERRY_LIBCUDA``, else ``libcuda.so.1``, loaded and
    initialised once per path (a failure is not remembered: a later call tries again). Raises
    :class:`ferry.errors.CudaUnavailable` saying why it cannot be used."""
    path = path or os.environ.get("FERRY_LIBCUDA") or LIBCUDA
    with _load_lock:
        drv = _drivers.get(path)
        if drv is None:
            drv = Driver(path)
            _drivers[path] = drv
        return drv


# ---- the imported arena --------------------------------------------------------------------


def _check(arena: Any, fd: Optional[int]) -> None:
    """What can be checked without a driver (raises :class:`ferry.errors.BadCudaArena`)."""
    if not isinstance(arena, m.CudaArena):
        raise TypeError(f"expected a ferry.messages.CudaArena, not {type(arena).__name__}")
    if not arena.device_uuid:
        raise errors.BadCudaArena("the cuda_arena reply names no device (empty UUID)")
    if not 0 <= arena.len <= _SIZE_MAX:
        raise errors.BadCudaArena(f"an arena of {arena.len} bytes does not fit this process")
    h = arena.handle
    if isinstance(h, m.CudaPosixFd):
        if fd is None:
            raise errors.BadCudaArena(
                "a PosixFd cuda_arena came without its file descriptor")
        if h.alloc_len == 0 or h.alloc_len < arena.len:
            raise errors.BadCudaArena(
                f"a shared allocation of {h.alloc_len} bytes cannot hold an arena of "
                f"{arena.len} bytes")
        if h.alloc_len > _SIZE_MAX:
            raise errors.BadCudaArena(
                f"a shared allocation of {h.alloc_len} bytes does not fit this process")
    elif isinstance(h, m.CudaIpc):
        if fd is not None:
            raise errors.BadCudaArena("an Ipc cuda_arena came with a file descriptor")
        if len(h.handle) != IPC_HANDLE_LEN:
            raise errors.BadCudaArena(
                f"a CUDA IPC handle has {IPC_HANDLE_LEN} bytes, this one {len(h.handle)}")
        if any(not 0 <= b <= 255 for b in h.handle):
            raise errors.BadCudaArena("a CUDA IPC handle holds bytes (0..=255)")
    else:
        raise errors.BadCudaArena(f"unknown CUDA handle {type(h).__name__}")


class ImportedArena:
    """A CUDA ferryd's arena mapped into this process, in the primary context of the GPU with
    the arena's UUID (module docs). A tensor with ``arena_offset`` and ``len`` lies at device
    address ``base + arena_offset``; valid while its lease is held and once it is ready.

    ``base``: the device address of offset 0; ``len``: the arena's bytes; ``uuid``: its GPU
    (as ferryd names it); ``device_index``: that GPU's ordinal in *this* process (``cuda:N``);
    ``kind``: ``"vmm"`` or ``"ipc"``; ``read_only``: whether the GPU may only read it (a VMM
    mapping the driver granted read-only access); ``backend``: ``"cuda"``; ``device``: the
    selector it was asked for by (set by :meth:`ferry.Client.map_arena`).

    ``stream_wait`` and ``wait_host`` wait on ferryd's interprocess ready events (module
    docs), each opened once per distinct handle and kept (``opened_events`` counts them).
    ``events_broken`` is set (:meth:`disable_events`, by :meth:`ferry.Lease.wait_on_stream`
    when a wait failed) once this process has found it cannot use ferryd's events: later
    leases on the arena wait on the host (``wait_ready``) instead.

    ``synchronize()`` waits for all of this process's work in the arena's context: the client
    calls it before saying goodbye (ferryd then releases every lease of the connection and may
    reuse the memory at once); ``stream_synchronize(stream)`` waits for one stream.

    ``close()`` (also on ``with`` exit and, as a last resort, when collected) first waits for
    all work in the context (``cuCtxSynchronize``: unmapping memory a kernel still reads would
    fault it), destroys the events it opened, then unmaps; it is idempotent, and waits for
    calls of other threads still using the arena (``read``, ``stream_wait``, ``wait_host``).
    """

    backend = "cuda"

    def __init__(self, drv: Driver, ctx: int, dev: int, ordinal: int, base: int, length: int,
                 uuid: str, kind: str, size: int, read_only: bool):
        self._driver = drv
        self._ctx = ctx
        self._dev = dev
        self.device_index = ordinal
        self.base = base
        self.len = length
        self.uuid = uuid
        self.kind = kind
        self.size = size  # bytes mapped (alloc_len) for VMM; the arena's len for IPC
        self.read_only = read_only
        self.device: Optional[m.DeviceSel] = None
        # Guards _closed and _users: close() waits until no call uses the mapping or events.
        self._cond = threading.Condition(threading.Lock())
        self._users = 0
        self._closed = False
        # ferryd's interprocess events opened here, by handle bytes -> CUevent (module docs);
        # the lock is held while opening, so two threads never open one handle twice.
        self._events: Dict[bytes, int] = {}
        self._events_lock = threading.Lock()
        # Set once an event could not be opened or waited on here (disable_events): processes
        # in different IPC namespaces cannot share events, and that does not get better.
        self.events_broken = False

    @classmethod
    def import_(cls, arena: m.CudaArena, fd: Optional[int] = None) -> "ImportedArena":
        """Maps the arena a ``cuda_arena`` reply describes. Takes ``fd`` (the descriptor that
        came with a ``PosixFd`` reply): it is closed on every path, success or failure.

        Errors, all before anything is left mapped: :class:`ferry.errors.BadCudaArena` (the
        reply cannot work: an allocation smaller than the arena, an IPC handle that is not 64
        bytes, a missing or unexpected descriptor; checked before the driver is loaded),
        :class:`ferry.errors.CudaUnavailable` (no driver, ``cuInit`` failing, no visible GPU
        with the UUID, a driver too old), :class:`ferry.errors.CudaError` (a driver call
        refused; what was done is undone)."""
        try:
            _check(arena, fd)
            try:
                return cls._import(arena, fd)
            except errors.CudaError as e:
                e.message = (f"mapping the CUDA arena of {arena.device_uuid} ({arena.len} "
                             f"bytes): {e.message}")
                e.args = (e.message,)
                raise
        finally:
            if isinstance(fd, int) and not isinstance(fd, bool) and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    @classmethod
    def _import(cls, arena: m.CudaArena, fd: Optional[int]) -> "ImportedArena":
        drv = driver()
        h = arena.handle
        if isinstance(h, m.CudaPosixFd):
            drv.need(_VMM, "mapping a VMM allocation (CUDA 10.2 or newer)")
        else:
            drv.need(_IPC, "opening a CUDA IPC handle (CUDA 11 or newer)")
        ordinal, dev = drv.find(arena.device_uuid)
        ctx = drv.retain_primary(dev)
        try:
            with drv.current(ctx):
                if isinstance(h, m.CudaPosixFd):
                    assert fd is not None  # checked by _check
                    base, read_only = _map_fd(drv, dev, fd, h.alloc_len)
                    size, kind = h.alloc_len, "vmm"
                else:
                    base, read_only = _open_ipc(drv, bytes(h.handle)), False
                    size, kind = arena.len, "ipc"
        except BaseException:
            try:
                drv.release_primary(dev)
            except errors.CudaError as e:
                log.error("%s", e)
            raise
        log.debug("arena of %s imported: %s at %#x, %d bytes (cuda:%d)", arena.device_uuid,
                  kind, base, arena.len, ordinal)
        return cls(drv, ctx, dev, ordinal, base, arena.len, arena.device_uuid, kind, size,
                   read_only)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def opened_events(self) -> int:
        """How many of ferryd's interprocess events are open here (one per distinct handle
        seen; at most ferryd's ring)."""
        with self._events_lock:
            return len(self._events)

    @contextlib.contextmanager
    def _use(self) -> Iterator[None]:
        """Marks a call using the mapping or the events: ``close`` waits for it to end."""
        with self._cond:
            if self._closed:
                raise ValueError("the imported arena is closed")
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    self._cond.notify_all()

    def ptr(self, offset: int, length: int) -> int:
        """The device address of ``length`` bytes at ``offset``; ``ValueError`` unless they lie
        within the arena."""
        if self._closed:
            raise ValueError("the imported arena is closed")
        if offset < 0 or length < 0 or offset + length > self.len:
            raise ValueError(f"bytes {offset}..{offset + length} lie outside the arena "
                             f"({self.len} bytes)")
        return self.base + offset

    def read(self, offset: int, length: int) -> bytes:
        """Copies ``length`` bytes at ``offset`` to the host (``cuMemcpyDtoH``, synchronous):
        for tests and tools. Read only layers that are leased and ready."""
        src = self.ptr(offset, length)
        if length == 0:
            return b""
        self._driver.need(("cuMemcpyDtoH_v2",), "reading an imported arena")
        buf = ctypes.create_string_buffer(length)
        with self._use(), self._driver.current(self._ctx):
            self._driver.call("cuMemcpyDtoH_v2", ctypes.cast(buf, ctypes.c_void_p), src, length)
        return buf.raw

    def stream_wait(self, stream: int, handle: bytes) -> None:
        """Makes ``stream`` wait, on the GPU, for ferryd's interprocess event ``handle`` (the
        ``ready_event`` of a ``leased_event`` reply): work queued on ``stream`` after this call
        runs only once every copy ferryd queued before recording the event has landed. The
        host does not wait.

        ``stream``: a ``CUstream`` as an int (``torch.cuda.Stream.cuda_stream``; 0 is the
        legacy default stream) of a context on this arena's GPU; the driver is handed it as
        is. ``handle``: 64 bytes, checked before any driver call
        (:class:`ferry.errors.BadCudaEvent`). The event is opened in the arena's context
        (``cuIpcOpenEventHandle``) the first time its handle is seen and kept until
        :meth:`close`; then ``cuStreamWaitEvent``. A handle the driver refuses is a
        :class:`ferry.errors.CudaError` naming ``cuIpcOpenEventHandle``."""
        raw = check_event_handle(handle)
        s = check_stream(stream)
        with self._use():
            drv = self._driver
            drv.need(_EVENTS, "waiting on ferryd's interprocess events")
            with drv.current(self._ctx):
                ev = self._open_event(raw)
                drv.call("cuStreamWaitEvent", CUstream(s), CUevent(ev), CU_EVENT_WAIT_DEFAULT,
                         what=f"stream {s:#x} on ferryd's ready event")

    def disable_events(self, cause: BaseException) -> bool:
        """Records that ferryd's interprocess events cannot be used with this arena (``cause``:
        the :class:`ferry.errors.CudaError` a wait raised), so that later leases wait on the
        host instead; logs a warning the first time. Returns whether this call disabled
        them."""
        with self._events_lock:
            if self.events_broken:
                return False
            self.events_broken = True
        log.warning(
            "ferryd's interprocess ready events cannot be used in this process (%s): leases "
            "on the arena of %s wait on the host (wait_ready) from now on. Events need this "
            "process in ferryd's IPC namespace (sharing its /dev/shm); "
            "ferry.Client(..., cuda=True, events=False) does not ask for them", cause,
            self.uuid)
        return True

    def synchronize(self) -> None:
        """Waits for all of this process's work in the arena's context (``cuCtxSynchronize``,
        with the context made current around it): once it returns no kernel of this process
        reads the arena any more. :class:`ferry.errors.CudaError` when the driver refuses;
        ``ValueError`` once closed."""
        with self._use():
            drv = self._driver
            with drv.current(self._ctx):
                drv.call("cuCtxSynchronize", what=f"the context of {self.uuid}")

    def stream_synchronize(self, stream: int) -> None:
        """Waits for the work queued on ``stream`` (a ``CUstream`` as an int, as for
        :meth:`stream_wait`; 0: the legacy default stream of the arena's context) to finish
        (``cuStreamSynchronize``, in the arena's context)."""
        s = check_stream(stream)
        with self._use():
            drv = self._driver
            drv.need(("cuStreamSynchronize",), "synchronising a stream")
            with drv.current(self._ctx):
                drv.call("cuStreamSynchronize", CUstream(s), what=f"stream {s:#x}")

    def wait_host(self, handle: bytes) -> None:
        """Blocks this thread until ferryd's interprocess event ``handle`` has completed
        (``cuEventSynchronize``), for callers without a stream. The event is opened and kept
        as by :meth:`stream_wait`, with the same checks and errors. An imported event follows
        the context's scheduling policy (by default the wait may spin)."""
        raw = check_event_handle(handle)
        with self._use():
            drv = self._driver
            drv.need(_EVENTS, "waiting on ferryd's interprocess events")
            with drv.current(self._ctx):
                ev = self._open_event(raw)
                drv.call("cuEventSynchronize", CUevent(ev), what="ferryd's ready event")

    def _open_event(self, raw: bytes) -> int:
        """The event behind ``raw``, opened now if it has not been yet. The caller has made
        the arena's context current and holds ``_use``."""
        with self._events_lock:
            ev = self._events.get(raw)
            if ev is not None:
                return ev
            handle = CUipcEventHandle()
            ctypes.memmove(handle.reserved, raw, IPC_HANDLE_LEN)
            out = CUevent()
            self._driver.call("cuIpcOpenEventHandle", ctypes.byref(out), handle,
                              what="an interprocess event of ferryd")
            if not out.value:
                raise errors.CudaError("cuIpcOpenEventHandle returned no event",
                                       "cuIpcOpenEventHandle")
            self._events[raw] = out.value
            log.debug("interprocess event opened (%d open)", len(self._events))
            return out.value

    def close(self) -> None:
        """Waits for this process's work in the context, unmaps, and releases the primary
        context. Idempotent. A driver failure is raised after every step was tried."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._users:  # another thread is still reading or waiting
                self._cond.wait()
        with self._events_lock:
            events = list(self._events.values())
            self._events.clear()
        drv = self._driver
        failures: List[errors.CudaError] = []

        def attempt(name: str, *args: Any) -> None:
            rc = drv.raw(name, *args)
            if rc != CUDA_SUCCESS:
                failures.append(drv.error(name, rc, f"closing the arena of {self.uuid}"))

        try:
            with drv.current(self._ctx):
                attempt("cuCtxSynchronize")
                # The events go before the mapping, once no stream of ours waits on them (the
                # synchronisation above): nothing of this arena is used after it.
                for ev in events:
                    attempt("cuEventDestroy_v2", CUevent(ev))
                if self.kind == "vmm":
                    attempt("cuMemUnmap", self.base, self.size)
                    attempt("cuMemAddressFree", self.base, self.size)
                else:
                    attempt("cuIpcCloseMemHandle", self.base)
        except errors.CudaError as e:  # the context could not be made current
            failures.append(e)
        attempt("cuDevicePrimaryCtxRelease_v2", self._dev)
        if failures:
            for extra in failures[1:]:
                log.error("%s", extra)
            raise failures[0]

    def __enter__(self) -> "ImportedArena":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # A last resort (close explicitly): never raise from a finaliser, and do nothing if
        # the object was never fully built or the interpreter is tearing modules down.
        if getattr(self, "_closed", True):
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finaliser must not raise
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"base={self.base:#x}"
        return (f"ImportedArena({self.uuid}, cuda:{self.device_index}, {self.kind}, "
                f"len={self.len}, {state})")


def check_event_handle(handle: Any) -> bytes:
    """``handle`` as the 64 bytes of a ``CUipcEventHandle`` (checked before any driver
    call)."""
    if not isinstance(handle, (bytes, bytearray, memoryview)):
        raise TypeError(f"an interprocess event handle is bytes, not {type(handle).__name__}")
    raw = bytes(handle)
    if len(raw) != IPC_HANDLE_LEN:
        raise errors.BadCudaEvent(
            f"a CUDA interprocess event handle has {IPC_HANDLE_LEN} bytes, this one {len(raw)}")
    return raw


def check_stream(stream: Any) -> int:
    """``stream`` as a ``CUstream`` value (an int that fits a pointer)."""
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"a CUDA stream is an int (a CUstream, e.g. torch's "
                        f"Stream.cuda_stream), not {type(stream).__name__}")
    if not 0 <= stream <= _PTR_MAX:
        raise ValueError(f"CUDA stream {stream} is not a pointer value")
    return stream


def _map_fd(drv: Driver, dev: int, fd: int, alloc_len: int) -> Tuple[int, bool]:
    """Imports, reserves, maps and grants access (module docs); releases the imported handle
    whatever happens, and undoes the reservation and mapping on failure. The caller closes
    ``fd``. Returns the address and whether access is read-only."""
    try:
        supported = drv.attribute(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                                  dev)
    except errors.CudaError as e:  # an old driver without the attribute: let the import say
        log.debug("cannot ask whether POSIX descriptors are supported: %s", e)
        supported = 1
    if not supported:
        raise errors.CudaUnavailable(
            "this GPU does not import POSIX file descriptor handles "
            "(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED is 0)")
    handle = CUmemGenericAllocationHandle(0)
    # For POSIX_FILE_DESCRIPTOR handles the OS handle is the descriptor's number cast to a
    # pointer; the driver does not take the descriptor over.
    drv.call("cuMemImportFromShareableHandle", ctypes.byref(handle), ctypes.c_void_p(fd),
             CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
    try:
        return _reserve_map_access(drv, dev, handle.value, alloc_len)
    finally:
        # The mapping (if any) holds the memory now.
        rc = drv.raw("cuMemRelease", handle.value)
        if rc != CUDA_SUCCESS:
            log.warning("%s", drv.error("cuMemRelease", rc, "the imported arena handle"))


def _reserve_map_access(drv: Driver, dev: int, handle: int, size: int) -> Tuple[int, bool]:
    va = CUdeviceptr(0)
    # Alignment 0: the default (the allocation granularity); address 0: no placement hint.
    drv.call("cuMemAddressReserve", ctypes.byref(va), size, 0, 0, 0)
    mapped = False
    try:
        drv.call("cuMemMap", va.value, size, 0, handle, 0)
        mapped = True
        desc = CUmemAccessDesc(CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, dev),
                               CU_MEM_ACCESS_FLAGS_PROT_READ)
        rc = drv.raw("cuMemSetAccess", va.value, size, ctypes.byref(desc), 1)
        read_only = rc == CUDA_SUCCESS
        if not read_only:
            # Some drivers refuse read-only access for a device: read-write, as the Rust
            # importer does (a client never writes weights).
            log.debug("read-only access refused (%s): mapping read-write", drv.describe(rc))
            desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            drv.call("cuMemSetAccess", va.value, size, ctypes.byref(desc), 1)
        return va.value, read_only
    except BaseException:
        if mapped:
            rc = drv.raw("cuMemUnmap", va.value, size)
            if rc != CUDA_SUCCESS:
                log.error("%s", drv.error("cuMemUnmap", rc, "undoing a failed import"))
        rc = drv.raw("cuMemAddressFree", va.value, size)
        if rc != CUDA_SUCCESS:
            log.error("%s", drv.error("cuMemAddressFree", rc, "undoing a failed import"))
        raise


def _open_ipc(drv: Driver, raw: bytes) -> int:
    handle = CUipcMemHandle()
    ctypes.memmove(handle.reserved, raw, IPC_HANDLE_LEN)
    ptr = CUdeviceptr(0)
    drv.call("cuIpcOpenMemHandle_v2", ctypes.byref(ptr), handle,
             CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
             what="needs this process in ferryd's IPC namespace")
    return ptr.value

