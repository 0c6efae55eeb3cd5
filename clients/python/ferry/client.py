"""A blocking client of ferryd's Unix-socket protocol (docs/protocol.md).

One :class:`Client` is one connection. Calls are synchronous and thread-safe (one request in
flight at a time per client; replies are still matched by request id, so a reply to another
request is kept for its caller). Failures raise the typed exceptions of :mod:`ferry.errors`.
"""

import array
import logging
import mmap
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from . import cuda
from . import errors
from . import messages as m
from . import wire

log = logging.getLogger(__name__)

CLIENT_NAME = "ferry-python 0.1"
MIN_VERSION = 1
MAX_VERSION = 1
DEFAULT_SOCKET = "/run/ferry/ferryd.sock"

# safetensors dtype -> numpy dtype (only those numpy has; others are viewed as raw bytes)
_NUMPY_DTYPES = {
    "BOOL": "bool", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4",
    "I32": "<i4", "U64": "<u8", "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8",
}

PolicyArg = Union[m.Policy, str]
# What map_arena returns: a host arena (mmap) or a CUDA ferryd's arena mapped into this process.
AnyArena = Union["Arena", cuda.ImportedArena]
# A device: ferryd's index (int), its UUID (str), or a selector; None is the server's default.
DeviceArg = Union[int, str, m.DeviceSel, None]


def _threshold(t: Union[m.Threshold, int, float, None]) -> m.Threshold:
    if isinstance(t, m.Threshold):
        return t
    if t is None:
        raise ValueError("this policy needs a threshold (bytes as int, fraction as float)")
    if isinstance(t, bool):
        raise TypeError("threshold must be an int (bytes) or a float (fraction)")
    if isinstance(t, int):
        return m.Bytes(t)
    return m.Fraction(float(t))


# Names ``set_residency`` takes for the policies that need no parameters from the client: the
# server resolves ``auto`` and the presets itself (docs/protocol.md).
_NAMED = {
    "auto": m.PolicyAuto,
    "lowvram": lambda: m.PolicyPreset(m.Preset.LowVram),
    "medvram": lambda: m.PolicyPreset(m.Preset.MedVram),
    "model": lambda: m.PolicyPreset(m.Preset.Model),
}
POLICY_NAMES = ("none", "component", "sequential", "balanced", "lru") + tuple(_NAMED)


def make_policy(policy: PolicyArg, lookahead: int = 1,
                threshold: Union[m.Threshold, int, float, None] = None) -> m.Policy:
    """A :class:`ferry.messages.Policy` from a name or an existing one.

    Names (any case, surrounding blanks ignored): ``none``, ``component``, ``sequential``
    (uses ``lookahead``), ``balanced`` and ``lru`` (use ``threshold``: an int is bytes, a float
    a fraction of the device's memory); ``auto`` (the server decides from its device's
    memory); SD.Next's presets ``lowvram`` (= sequential, lookahead 1), ``medvram`` and
    ``model`` (= component). ``lookahead`` and ``threshold`` are ignored by the policies that
    do not use them, ``auto`` and the presets included. An unknown name is a ``ValueError``."""
    if isinstance(policy, m.Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name or a ferry.messages.Policy, not {policy!r}")
    name = policy.strip().lower()
    if name == "none":
        return m.PolicyNone()
    if name == "component":
        return m.PolicyComponent()
    if name == "sequential":
        return m.Sequential(lookahead)
    if name == "balanced":
        return m.Balanced(_threshold(threshold))
    if name == "lru":
        return m.Lru(_threshold(threshold))
    if name in _NAMED:
        return _NAMED[name]()
    raise ValueError(f"unknown policy {policy!r}: expected one of {', '.join(POLICY_NAMES)}")


@dataclass
class Frame:
    header: wire.Header
    message: m.Message
    fds: List[int]


class Arena:
    """A device's host arena, mapped read-only (``map_arena``). ``device`` is the selector it
    was asked for by (``None``: the server's default device)."""

    def __init__(self, map: mmap.mmap, length: int, backend: str,
                 device: Optional[m.DeviceSel] = None):
        self.mmap = map
        self.len = length
        self.backend = backend
        self.device = device
        self.view = memoryview(map)

    def close(self) -> None:
        try:
            self.view.release()
            self.mmap.close()
        except BufferError:
            pass  # views of tensors are still alive; the mapping goes with them


class Lease:
    """A leased layer. Use as a context manager: ``with client.acquire(...) as lease:`` waits
    until the bytes are ready and releases the lease on exit.

    A lease from :meth:`Client.acquire_event` carries ``ready_event``: the 64-byte handle of
    ferryd's interprocess event that completes once the layer's copies have landed (empty when
    the layer was already on the device). Its context manager does not wait on the host: order
    the GPU work that reads the layer with :meth:`wait_on_stream` (or ``device_ptr(t,
    stream=...)``); every host-side accessor still waits with ``wait_ready``. Releasing such
    a lease first synchronises the streams made to wait on its event (unless
    :meth:`mark_synchronized` says the caller did)."""

    def __init__(self, client: "Client", model: int, component: str, index: int,
                 leased: m.Leased, ready_event: Optional[bytes] = None):
        self.client = client
        self.model = model
        self.component = component
        self.index = index
        self.id = leased.lease
        self.layer = leased.layer
        self.ready = leased.ready
        self.tensors: List[m.TensorDesc] = leased.tensors
        self.released = False
        # None: a plain acquire's lease; bytes (maybe empty): acquire_event's.
        self.ready_event: Optional[bytes] = ready_event
        # Streams already made to wait on ready_event (a stream is in order: once is enough).
        self._waited_streams: Set[int] = set()
        # Of those, the ones used since the caller last said their work was finished
        # (mark_synchronized): release() synchronises them before ferryd may reuse the layer.
        self._pending_streams: Set[int] = set()

    @property
    def device(self) -> int:
        """The index of the device the layer is on (its model's, from the model id)."""
        return m.device_of(self.model)

    def arena(self) -> AnyArena:
        """The mapped arena of the device the layer is on (mapped on first use): an
        :class:`Arena` on a host ferryd, a :class:`ferry.cuda.ImportedArena` on a CUDA one."""
        return self.client.arena_for(self.model)

    def _on_cuda(self) -> bool:
        # Every device of a ferryd has the same backend (the welcome's device is one of them).
        return self.client.device.backend == "cuda"

    def wait_ready(self) -> "Lease":
        """Blocks until the layer's bytes are on the device (a ``wait_ready`` round trip,
        unless the lease is known to be ready)."""
        if not self.ready:
            self.client.wait_ready(self.id)
            self.ready = True
        return self

    def wait_on_stream(self, stream: int) -> "Lease":
        """Orders the GPU work queued on ``stream`` (a ``CUstream`` as an int, such as
        ``torch.cuda.current_stream(dev).cuda_stream``; 0 is the legacy default stream) after
        the layer's copies, on a CUDA ferryd.

        With a ``ready_event`` (a lease of :meth:`Client.acquire_event`) the stream waits on
        ferryd's event on the GPU (:meth:`ferry.cuda.ImportedArena.stream_wait`, once per
        stream and lease): the host does not wait and nothing is sent. Without one (a plain
        ``acquire``, or an event left empty though the layer is not ready) it falls back to
        :meth:`wait_ready`, after which any stream may read the layer. A ready layer needs
        nothing.

        Events cannot cross IPC namespaces (containers without a shared ``/dev/shm``): when
        opening or waiting on the event raises :class:`ferry.errors.CudaError`, this lease
        falls back to :meth:`wait_ready` too, a warning is logged once, and the arena
        remembers it (``ImportedArena.events_broken``): later leases on it go straight to
        :meth:`wait_ready` without trying the driver.

        Finish (synchronise) the stream's use of the layer before releasing the lease;
        :meth:`release` synchronises the streams made to wait on the event that
        :meth:`mark_synchronized` was not told about. On a host ferryd:
        :class:`ferry.errors.MemoryKindError`."""
        cuda.check_stream(stream)  # refused even when there is nothing to order
        if self.released:
            raise errors.UnknownLease(f"lease {self.id} was released", None)
        if not self._on_cuda():
            raise errors.MemoryKindError(
                f"layer {self.layer} is in a host arena (ferryd runs on the "
                f"{self.client.device.backend} backend): there is no stream to order; use "
                "Lease.wait_ready")
        if self.ready:
            return self
        if stream in self._waited_streams:
            self._pending_streams.add(stream)  # used on it again: finish it before release
            return self
        if not self.ready_event:
            return self.wait_ready()
        arena = self.arena()
        if not isinstance(arena, cuda.ImportedArena):  # not reachable on a CUDA ferryd
            return self.wait_ready()
        if arena.events_broken:
            return self.wait_ready()
        try:
            arena.stream_wait(stream, self.ready_event)
        except errors.CudaError as e:
            # Opening or waiting failed (another IPC namespace, a driver without events): the
            # protocol lets an acquire_event lease be waited for on the host all the same.
            arena.disable_events(e)
            return self.wait_ready()
        self._waited_streams.add(stream)
        self._pending_streams.add(stream)
        return self

    def mark_synchronized(self, stream: Optional[int] = None) -> None:
        """Tells the lease that this process's GPU work on ``stream`` (``None``: on every
        stream, as after a device-wide synchronise) is finished, so that :meth:`release` does
        not synchronise it again. Work queued on it afterwards must be finished again."""
        if stream is None:
            self._pending_streams.clear()
        else:
            self._pending_streams.discard(cuda.check_stream(stream))

    def _finish_streams(self) -> None:
        """Synchronises the streams made to wait on ``ready_event`` whose work the caller did
        not say was finished (:meth:`mark_synchronized`): ferryd may overwrite the layer as
        soon as it acknowledges the release. A failure raises (the lease stays held)."""
        if not self._pending_streams:
            return
        arena = self.arena()
        if not isinstance(arena, cuda.ImportedArena):  # not reachable: a stream waited on it
            return
        for stream in sorted(self._pending_streams):
            arena.stream_synchronize(stream)
            self._pending_streams.discard(stream)

    def release(self) -> None:
        """Releases the lease (once; later calls do nothing), after synchronising the streams
        that waited on its ready event (:meth:`_finish_streams`)."""
        if not self.released:
            self._finish_streams()
            self.client.release(self.model, self.id)
            self.released = True

    def tensor(self, name: str) -> m.TensorDesc:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def view(self, tensor: Union[m.TensorDesc, str]) -> memoryview:
        """The tensor's bytes in the mapped host arena of the layer's device (maps it on first
        use). Valid only while the lease is held and once it is ready. On a CUDA ferryd the
        bytes are device memory, which the host cannot read: :class:`ferry.errors.
        MemoryKindError` (use :meth:`device_ptr`)."""
        t = self.tensor(tensor) if isinstance(tensor, str) else tensor
        if self.released:
            raise errors.UnknownLease(f"lease {self.id} was released", None)
        if self._on_cuda():
            raise errors.MemoryKindError(
                f"tensor {t.name} is in GPU memory (ferryd runs on CUDA), which the host cannot "
                "read: use Lease.device_ptr (or ferry.torch) instead of view/array")
        self.wait_ready()
        arena = self.arena()
        if t.arena_offset + t.len > arena.len:
            raise errors.ProtocolError(f"tensor {t.name} lies past the arena's end")
        return arena.view[t.arena_offset:t.arena_offset + t.len]

    def array(self, tensor: Union[m.TensorDesc, str]) -> Any:
        """The tensor as a read-only numpy array (needs numpy; dtypes numpy lacks, such as
        BF16, come back as uint8 bytes). Host arenas only, as :meth:`view`."""
        t = self.tensor(tensor) if isinstance(tensor, str) else tensor
        buf = self.view(t)
        import numpy as np

        dt = _NUMPY_DTYPES.get(t.dtype)
        if dt is None:
            return np.frombuffer(buf, dtype="u1")
        return np.frombuffer(buf, dtype=dt).reshape([int(d) for d in t.shape])

    def device_ptr(self, tensor: Union[m.TensorDesc, str], stream: Optional[int] = None) -> int:
        """The tensor's device address in this process, on a CUDA ferryd: the base of the
        arena of the layer's device, mapped into this process (on first use; see
        :meth:`Client.map_arena`), plus the tensor's ``arena_offset``. Without ``stream``,
        waits on the host until the layer is ready; with ``stream`` (a ``CUstream`` as an
        int), orders that stream after the layer's copies instead (:meth:`wait_on_stream`):
        use the address on that stream only. Valid only while the lease is held: finish
        (synchronise) every GPU use of it before releasing. On a host ferryd:
        :class:`ferry.errors.MemoryKindError` (use :meth:`view`)."""
        t = self.tensor(tensor) if isinstance(tensor, str) else tensor
        if stream is not None:
            cuda.check_stream(stream)  # checked before anything is mapped or sent
        if self.released:
            raise errors.UnknownLease(f"lease {self.id} was released", None)
        if not self._on_cuda():
            raise errors.MemoryKindError(
                f"tensor {t.name} is in a host arena (ferryd runs on the "
                f"{self.client.device.backend} backend): use Lease.view")
        arena = self.arena()
        if t.arena_offset + t.len > arena.len:
            raise errors.ProtocolError(
                f"tensor {t.name} (bytes {t.arena_offset}..{t.arena_offset + t.len}) lies "
                f"past the arena's end ({arena.len} bytes)")
        if stream is None:
            self.wait_ready()
        else:
            self.wait_on_stream(stream)
        return arena.base + t.arena_offset

    def __enter__(self) -> "Lease":
        if self.ready_event is not None:
            # acquire_event's lease: the point is not to wait on the host (class docs).
            return self
        try:
            return self.wait_ready()
        except BaseException:
            self._release_quietly()
            raise

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.release()
        else:
            self._release_quietly()

    def _release_quietly(self) -> None:
        try:
            self.release()
        except errors.FerryError:
            pass

    def __repr__(self) -> str:
        return f"Lease(id={self.id}, model={self.model}, layer={self.layer!r})"


class Client:
    """A connection to ferryd: connects and completes the handshake on construction."""

    def __init__(self, path: Optional[str] = None, *, timeout: Optional[float] = None,
                 features: int = m.DEFAULT_FEATURES, client_name: str = CLIENT_NAME,
                 cuda: bool = False, events: bool = True):
        """``cuda=True`` also asks for ``CUDA_IPC`` and, unless ``events=False``,
        ``CUDA_EVENTS`` (added to ``features``): a CUDA ferryd then shares its arenas with
        ``map_arena``, mapped into this process through the CUDA driver (:mod:`ferry.cuda`),
        and, if its config enables them (``cuda_events = true``; off by default), answers
        :meth:`acquire_event` with interprocess ready events. A host ferryd grants neither and
        nothing changes. ``events=False`` never asks for ``CUDA_EVENTS`` (it is taken out of
        ``features`` too): for processes outside ferryd's IPC namespace, where events cannot
        be opened (the client also falls back by itself: :meth:`Lease.wait_on_stream`)."""
        if not isinstance(cuda, bool):
            raise TypeError(f"cuda must be True or False, not {cuda!r}")
        if not isinstance(events, bool):
            raise TypeError(f"events must be True or False, not {events!r}")
        if cuda:
            features |= m.CUDA_IPC | m.CUDA_EVENTS
        if not events:
            features &= ~m.CUDA_EVENTS
        self.path = path or os.environ.get("FERRY_SOCKET") or DEFAULT_SOCKET
        self._lock = threading.RLock()
        self._next_id = 1
        self._stash: Dict[int, Frame] = {}
        self._arena: Optional[AnyArena] = None  # the default device's (plain map_arena)
        # Arenas mapped with map_arena_on, by the selector's value (an index or a UUID).
        self._arenas: Dict[Union[int, str], AnyArena] = {}
        # The index of the device plain open_model/open_model_fd use, once a reply shows it.
        self._default_device: Optional[int] = None
        self._closed = False
        # Set by close() once it has settled the GPU: teardown need not do it again.
        self._settled = False
        self.version = MAX_VERSION
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            self._closed = True
            raise errors.ConnectionLost(f"cannot connect to {self.path}: {e}") from e
        self._handshake = True
        try:
            w = self._call(m.Hello(MIN_VERSION, MAX_VERSION, features, client_name), m.Welcome)
        except BaseException:
            self._shutdown()
            raise
        finally:
            self._handshake = False
        if not MIN_VERSION <= w.version <= MAX_VERSION:
            self._shutdown()
            raise errors.UnsupportedVersion(f"server agreed to version {w.version}", None)
        self.version = w.version
        self.welcome: m.Welcome = w
        self.features = w.features
        self.client_id = w.client_id
        self.device = w.device

    # ---- plumbing ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _cuda_arenas(self) -> List[cuda.ImportedArena]:
        """The CUDA arenas this client mapped and has not closed, each once (one may be cached
        under several selectors)."""
        out: List[cuda.ImportedArena] = []
        for arena in (self._arena, *self._arenas.values()):
            if (isinstance(arena, cuda.ImportedArena) and not arena.closed
                    and all(arena is not known for known in out)):
                out.append(arena)
        return out

    def _settle_gpu(self) -> Optional[errors.CudaError]:
        """Waits for this process's GPU work on every mapped CUDA arena (``cuCtxSynchronize``),
        before the connection ends: ferryd then releases every lease of the connection and
        may overwrite the memory at once, while kernels of this process could still read it.
        Returns the first failure (every arena is tried; the others are logged)."""
        failure: Optional[errors.CudaError] = None
        for arena in self._cuda_arenas():
            try:
                arena.synchronize()
            except errors.CudaError as e:
                if failure is None:
                    failure = e
                else:
                    log.error("%s", e)
            except ValueError:  # closed meanwhile by another thread: nothing runs on it
                pass
        return failure

    def _shutdown(self, settle: bool = True) -> None:
        """Closes the connection (ferryd then releases every lease of it), first settling the
        GPU (:meth:`_settle_gpu`) unless ``settle`` is False: ferryd already ended it, or
        :meth:`close` did so before saying goodbye."""
        if not self._closed:
            if settle and not self._settled:
                failure = self._settle_gpu()
                if failure is not None:
                    log.error("closing the connection to ferryd: %s", failure)
            self._closed = True
            try:
                self._sock.close()
            except OSError:
                pass

    def _lost(self, why: str, cause: Optional[BaseException] = None,
              peer_closed: bool = False) -> errors.ConnectionLost:
        # When ferryd closed or reset the connection its leases are released already, and
        # waiting on the GPU would only wait on events of a ferryd that may be gone; otherwise
        # (a timeout) this side ends it, and settles the GPU first.
        gone = peer_closed or isinstance(
            cause, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError))
        self._shutdown(settle=not gone)
        e = errors.ConnectionLost(why)
        e.__cause__ = cause
        return e

    def _send(self, msg: m.Message, fds: Sequence[int] = ()) -> int:
        if self._closed:
            raise errors.ConnectionLost("the connection is closed")
        if len(fds) > wire.MAX_FDS:
            raise ValueError(f"at most {wire.MAX_FDS} descriptors per frame")
        rid = self._next_id
        self._next_id += 1
        body = wire.encode(msg)
        data = wire.pack_header(msg.KIND, rid, len(body), self.version,
                                wire.FLAG_FDS if fds else 0) + body
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self._sock.sendmsg([data], anc)
                self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
        except OSError as e:  # EPIPE, ECONNRESET, a timeout: the stream is unusable
            raise self._lost(f"sending {msg.NAME}: {e}", e) from e
        return rid

    def _recv_exact(self, n: int, fds: List[int], what: str) -> bytes:
        buf = bytearray()
        flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
        while len(buf) < n:
            try:
                data, got, msg_flags, _ = socket.recv_fds(self._sock, n - len(buf),
                                                          wire.MAX_FDS, flags)
            except OSError as e:
                raise self._lost(f"reading {what}: {e}", e) from e
            fds.extend(got)
            if msg_flags & getattr(socket, "MSG_CTRUNC", 0) or len(fds) > wire.MAX_FDS:
                self._close_fds(fds)
                self._shutdown()
                raise errors.BadFds("too many descriptors with one frame", None)
            if not data:
                self._close_fds(fds)
                if buf or what == "a frame body":
                    raise self._lost(f"the server closed the connection inside {what}",
                                     peer_closed=True)
                raise self._lost("the server closed the connection", peer_closed=True)
            buf += data
        return bytes(buf)

    @staticmethod
    def _close_fds(fds: Iterable[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _recv_frame(self) -> Frame:
        fds: List[int] = []
        try:
            header = wire.unpack_header(self._recv_exact(wire.HEADER_LEN, fds, "a frame header"))
            cls = m.BY_KIND.get(header.kind)
            if cls is None:
                raise errors.UnknownKind(f"unknown kind {header.kind:#06x}", None)
            if m.is_request(header.kind):
                raise errors.UnexpectedMessage(f"the server sent a request ({cls.NAME})", None)
            if not self._handshake and header.version != self.version:
                raise errors.UnsupportedVersion(
                    f"frame version {header.version}, agreed {self.version}", None)
            body = self._recv_exact(header.body_len, fds, "a frame body")
            if bool(header.flags & wire.FLAG_FDS) != bool(fds) or (fds and cls.FDS == "none"):
                raise errors.BadFds(f"{cls.NAME} came with {len(fds)} descriptors", None)
            if cls.FDS == "one" and len(fds) != 1:
                raise errors.BadFds(f"{cls.NAME} came with {len(fds)} descriptors", None)
            msg = wire.decode(cls, body)
            want = getattr(msg, "fds_expected", None)
            if want is not None and len(fds) != want:
                raise errors.BadFds(
                    f"{cls.NAME} came with {len(fds)} descriptors, its body says {want}", None)
        except errors.ProtocolError:
            # The stream cannot be trusted to be at a frame boundary any more.
            self._close_fds(fds)
            self._shutdown()
            raise
        return Frame(header, msg, fds)

    def _roundtrip(self, msg: m.Message, expect: Union[type, Tuple[type, ...]],
                   fds: Sequence[int] = ()) -> Frame:
        with self._lock:
            rid = self._send(msg, fds)
            while True:
                frame = self._stash.pop(rid, None) or self._recv_frame()
                rid_got = frame.header.request_id
                if isinstance(frame.message, m.Error) and rid_got in (0, rid):
                    err = frame.message
                    exc = errors.from_code(err.code, err.message)
                    if rid_got == 0 or errors.is_fatal(err.code):
                        self._shutdown()
                    raise exc
                if rid_got != rid:
                    self._stash[rid_got] = frame
                    continue
                if not isinstance(frame.message, expect):
                    self._close_fds(frame.fds)
                    self._shutdown()
                    raise errors.UnexpectedMessage(
                        f"{msg.NAME} answered with {frame.message.NAME}", None)
                return frame

    def _call(self, msg: m.Message, expect: type, fds: Sequence[int] = ()) -> Any:
        return self._roundtrip(msg, expect, fds).message

    # ---- requests ----------------------------------------------------------------------

    def _opened(self, reply: m.ModelOpened, device: DeviceArg) -> m.ModelOpened:
        if device is None:
            with self._lock:
                self._default_device = reply.device
        return reply

    def open_model(self, path: Union[str, "os.PathLike[str]"],
                   device: DeviceArg = None) -> m.ModelOpened:
        """Opens a model under one of the server's roots (absolute path). ``device``: None for
        the server's default device, else an index (int) or a UUID (str) of ``devices()``
        (needs ``DEVICES``); the model's id then carries that device's index
        (``reply.device``). The same files opened on two devices are two models."""
        path = os.path.abspath(os.fspath(path))
        if device is None:
            msg: m.Message = m.OpenModel(path)
        else:
            msg = m.OpenModelOn(path, m.DeviceSel.of(device))
        return self._opened(self._call(msg, m.ModelOpened), device)

    def open_model_fd(self, fd: int, name: str = "", device: DeviceArg = None) -> m.ModelOpened:
        """Opens a model from a descriptor this process opened (needs ``FD_PASSING``), on the
        default device or on ``device`` (as in :meth:`open_model`)."""
        if device is None:
            msg: m.Message = m.OpenModelFd(name)
        else:
            msg = m.OpenModelFdOn(name, m.DeviceSel.of(device))
        return self._opened(self._call(msg, m.ModelOpened, [fd]), device)

    def close_model(self, model: int) -> None:
        self._call(m.CloseModel(model), m.Ack)

    def set_residency(self, model: int, policy: PolicyArg, component: Optional[str] = None,
                      lookahead: int = 1,
                      threshold: Union[m.Threshold, int, float, None] = None) -> None:
        """Sets the residency policy of ``model`` (or of one ``component``): a name (see
        :func:`make_policy`: the five policies, ``auto``, ``lowvram``, ``medvram``, ``model``)
        or a :class:`ferry.messages.Policy`. A bad name raises ``ValueError`` before anything
        is sent."""
        p = make_policy(policy, lookahead, threshold)
        self._call(m.SetResidency(model, component, p), m.Ack)

    def offload(self, model: int, component: Optional[str] = None) -> int:
        """Takes ``model`` off the device and returns the device bytes freed: the whole model
        (``component`` None), giving back its memory reservation so another model (a refiner)
        can use the budget, or one component's layers. It acts on the model every client of
        ferryd shares. Raises ``BusyError`` while any of its layers is leased, by anyone."""
        return self._call(m.Offload(model, component), m.Offloaded).bytes

    def onload(self, model: int, component: Optional[str] = None) -> None:
        """Brings ``model`` (or one ``component``) back ahead of use: a model offloaded whole
        reserves its memory again, then its layers are prefetched through its policy."""
        self._call(m.Onload(model, component), m.Ack)

    def acquire(self, model: int, component: str, layer: int) -> Lease:
        leased = self._call(m.Acquire(model, component, layer), m.Leased)
        return Lease(self, model, component, layer, leased)

    def acquire_event(self, model: int, component: str, layer: int) -> Lease:
        """``acquire`` with the layer's interprocess ready event (needs ``CUDA_EVENTS``, which
        a CUDA ferryd whose config sets ``cuda_events = true`` grants to ``Client(...,
        cuda=True)``; else ferryd answers ``Unsupported``): a :class:`Lease` whose
        ``ready_event`` is the 64-byte handle of an event ferryd recorded on its copy stream
        after the layer's copies, or empty when the layer is on the device already. Make the
        stream that reads the layer wait on it with :meth:`Lease.wait_on_stream` instead of a
        ``wait_ready`` round trip (it falls back to ``wait_ready`` where events cannot be
        used); the release synchronises that stream first (:meth:`Lease.release`). A handle
        that is not 64 bytes is :class:`ferry.errors.BadCudaEvent` (the lease is released
        again)."""
        reply: m.LeasedEvent = self._call(m.AcquireEvent(model, component, layer),
                                          m.LeasedEvent)
        lease = Lease(self, model, component, layer, reply.leased, bytes(reply.ready_event))
        if len(reply.ready_event) not in (0, cuda.IPC_HANDLE_LEN):
            lease._release_quietly()
            raise errors.BadCudaEvent(
                f"leased_event for layer {reply.leased.layer!r}: a CUDA interprocess event "
                f"handle has {cuda.IPC_HANDLE_LEN} bytes, this one {len(reply.ready_event)}")
        return lease

    def wait_ready(self, lease: int) -> None:
        self._call(m.WaitReady(lease), m.Ready)

    def release(self, model: int, lease: Union[int, Lease]) -> None:
        """Releases a lease (an id, or a :class:`Lease`: first synchronising the streams that
        waited on its ready event, as :meth:`Lease.release` does)."""
        if isinstance(lease, Lease):
            lease._finish_streams()
        lid = lease.id if isinstance(lease, Lease) else lease
        self._call(m.Release(model, lid), m.Ack)
        if isinstance(lease, Lease):
            lease.released = True

    def prefetch(self, model: int, component: str, layer: int) -> None:
        self._call(m.Prefetch(model, component, layer), m.Ack)

    def apply_lora(self, model: int, stack: Sequence[Tuple[Union[str, int], float]],
                   mode: Union[m.LoraMode, str] = m.LoraMode.Backup) -> int:
        """Creates a view of ``model`` through LoRA adapters and returns its id. ``stack``:
        ``(source, strength)`` pairs, where a source is a path (str, under a model root) or
        an open descriptor (int, sent with the frame; needs ``FD_PASSING``). The last reply
        is kept in ``self.last_view``."""
        refs: List[m.LoraRef] = []
        fds: List[int] = []
        for source, scale in stack:
            if isinstance(source, int):
                refs.append(m.LoraRef(m.LoraFd(len(fds)), float(scale)))
                fds.append(source)
            else:
                refs.append(m.LoraRef(m.LoraPath(os.path.abspath(os.fspath(source))),
                                      float(scale)))
        mode = m.LoraMode[mode.capitalize()] if isinstance(mode, str) else m.LoraMode(mode)
        reply: m.ViewCreated = self._call(m.ApplyLora(model, refs, mode), m.ViewCreated, fds)
        self.last_view = reply
        return reply.view

    def remove_lora(self, view: int) -> None:
        self._call(m.RemoveLora(view), m.Ack)

    def stats(self) -> m.StatsReply:
        return self._call(m.Stats(), m.StatsReply)

    def list_models(self) -> List[m.ModelInfo]:
        return self._call(m.ListModels(), m.Models).models

    def list_clients(self) -> List[m.ClientInfo]:
        return self._call(m.ListClients(), m.Clients).clients

    def devices(self) -> List[m.DeviceEntry]:
        """ferryd's devices by index, with their counters (needs ``DEVICES``). A device that
        failed to open is listed with ``error`` set."""
        return self._call(m.ListDevices(), m.Devices).devices

    def map_arena(self, device: DeviceArg = None) -> AnyArena:
        """Maps a device's arena: the default device's (``device`` None), else that of
        ``device``, an index or a UUID (needs ``DEVICES``). Once per client and device; later
        calls return the same object.

        On a host ferryd: an :class:`Arena`, the memfd mapped read-only. On a CUDA ferryd (the
        client must have been made with ``cuda=True``, else ferryd answers ``Unsupported``): a
        :class:`ferry.cuda.ImportedArena`, ferryd's device memory mapped into this process's
        CUDA context of the GPU with the same UUID (read tensors at ``base + arena_offset``,
        or with :meth:`Lease.device_ptr`). Mapping it may raise
        :class:`ferry.errors.CudaUnavailable` (no driver, the GPU not visible here),
        :class:`ferry.errors.CudaError` or :class:`ferry.errors.BadCudaArena`; the descriptor
        that came with the reply is closed whatever happens, and the connection stays
        usable."""
        sel = None if device is None else m.DeviceSel.of(device)
        with self._lock:
            cached = self._arena if sel is None else self._arenas.get(sel.value)
            if cached is not None:
                return cached
            req: m.Message = m.MapArena() if sel is None else m.MapArenaOn(sel)
            frame = self._roundtrip(req, (m.ArenaFd, m.CudaArena))
            if isinstance(frame.message, m.CudaArena):
                imported = self._import_cuda(frame.message, frame.fds, sel)
                self._keep(sel, imported)
                return imported
            reply: m.ArenaFd = frame.message  # type: ignore[assignment]
            (fd,) = frame.fds
            try:
                mp = mmap.mmap(fd, reply.len, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            arena = Arena(mp, reply.len, reply.backend, sel)
            self._keep(sel, arena)
            return arena

    def _keep(self, sel: Optional[m.DeviceSel], arena: AnyArena) -> None:
        if sel is None:
            self._arena = arena
        else:
            self._arenas[sel.value] = arena

    def _import_cuda(self, reply: m.CudaArena, fds: List[int],
                     sel: Optional[m.DeviceSel]) -> cuda.ImportedArena:
        """Maps a ``cuda_arena`` reply, once per GPU: a device named by index and by UUID, or
        by plain ``map_arena`` too, is imported once (``device`` says how it was first asked
        for). Takes ``fds`` (``_recv_frame`` checked their number against the handle): closed
        on every path."""
        want = cuda.normalize_uuid(reply.device_uuid)
        for known in (self._arena, *self._arenas.values()):
            if (isinstance(known, cuda.ImportedArena) and not known.closed
                    and cuda.normalize_uuid(known.uuid) == want and known.len == reply.len):
                self._close_fds(fds)
                return known
        if len(fds) > 1:  # not reachable past _recv_frame; never leak one
            self._close_fds(fds)
            raise errors.BadFds(f"cuda_arena came with {len(fds)} descriptors", None)
        imported = cuda.ImportedArena.import_(reply, fds[0] if fds else None)
        imported.device = sel
        return imported

    def arena_for(self, model: int) -> AnyArena:
        """The mapped arena holding the leased bytes of ``model`` (a model or view id): that of
        the device in the id's top 16 bits. The default device's is mapped with plain
        ``map_arena``, as is every arena when ``DEVICES`` was not agreed (then every model of
        this client is on the default device); another device's with ``map_arena_on``."""
        index = m.device_of(model)
        with self._lock:
            if not self.features & m.DEVICES or index == self._default_device:
                return self.map_arena()
            return self.map_arena(index)

    def close(self) -> None:
        """Says goodbye (if still connected), closes the socket, then closes the mapped
        arenas. On a CUDA ferryd this process's GPU work on every mapped arena is synchronised
        first (``cuCtxSynchronize``), before the goodbye: ferryd then releases every lease of
        the connection and may reuse the memory at once. Then the arenas' events are destroyed
        and their memory unmapped. A CUDA failure is raised once every step was tried."""
        failure: Optional[errors.CudaError] = None
        if not self._closed:
            failure = self._settle_gpu()
            self._settled = True  # a failing goodbye's teardown need not settle again
            try:
                self._call(m.Goodbye(), m.Ack)
            except errors.FerryError:
                pass
            self._shutdown()
        arenas = [self._arena, *self._arenas.values()]
        self._arena = None
        self._arenas.clear()
        for arena in arenas:
            if arena is None:
                continue
            try:
                arena.close()  # idempotent: the same imported arena may be cached twice
            except errors.CudaError as e:  # every arena is still closed; the first is raised
                failure = failure or e
        if failure is not None:
            raise failure

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"client_id={self.client_id}"
        return f"Client({self.path!r}, {state})"
