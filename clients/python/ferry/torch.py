"""PyTorch integration: a ``torch.nn.Module``'s weights streamed through ferryd.

Importing this module needs PyTorch; the protocol client (:class:`ferry.Client`) does not.

>>> import torch, ferry.torch
>>> with ferry.torch.empty_weights():                # parameters on "meta", buffers real
...     net = MyNet().eval()
>>> att = ferry.torch.attach(net, "/srv/models/net.safetensors", policy="sequential")
>>> with torch.no_grad():
...     y = net(x)                                    # each layer acquired just before its forward
>>> att.close()

How it works:

* A :class:`Session` is one ferry model (or a LoRA view of it) served to this process: it opens
  the model, sets its residency policy and, if asked, applies a LoRA stack (``apply_lora``),
  then serves every layer through the view.
* :meth:`Session.attach` binds one ferry *component* to one module. Each ferry tensor name is
  mapped to a module parameter or buffer name (``strip`` a leading part of ferry's name, add a
  ``prefix``, or any ``rename`` function), shapes and dtypes are checked, and each layer gets a
  forward pre-hook and a forward hook on the smallest submodule holding all of its tensors (a
  ferry layer such as ``down_blocks.1`` or ``model.layers.3`` is one such submodule). Tied
  weights (one tensor at two module paths) are served at both, and their other owner is hooked
  too.
* Before that submodule's forward, the layer is acquired, waited for, and its tensors are put in
  place of the parameters (``requires_grad=False``); after its forward (also when it raises) the
  parameters are replaced by placeholders again and only then is the lease released, so the
  module never keeps a pointer into memory ferryd may reuse. A tensor in the forward's output
  that still lies in ferry's memory (a module returning a view of its own weight) is cloned
  first. A layer entered twice (a submodule called from within itself, or hooked at two places)
  is acquired once.
* The placeholders are ``meta`` tensors (the default: any use outside a hooked forward fails
  loudly) or, with ``placeholder="cpu"`` (``"cuda"`` on a CUDA ferryd: on the served GPU),
  zero-stride tensors of one element, for code that asks a module for its ``device``
  (diffusers pipelines do). Either way the module's own copy of the weights is dropped at
  attach.

Backends (the piece that turns a lease into tensors is :func:`tensor_source`):

* **host**: tensors are zero-copy views of ferryd's arena (that of the device the model is on,
  ``device=`` when a session opens it), mapped read-only
  (``torch.frombuffer`` with the tensor's dtype, ``BF16`` and ``F16`` included). PyTorch cannot
  mark a tensor read-only: the mapping is ``PROT_READ``, so code that writes into a served
  weight crashes the process rather than corrupting ferry's memory. Forward passes do not write
  weights; a BatchNorm in training mode would update its running statistics, so that is refused
  with :class:`FerryTorchError` before the forward.
* **cuda**: tensors are zero-copy CUDA tensors over ferryd's GPU memory. The session's client
  asks for ``CUDA_IPC`` (a client you pass must be made with ``ferry.Client(..., cuda=True)``),
  maps the arena of the model's device once (:mod:`ferry.cuda`: the GPU with ferryd's UUID,
  in its primary context, which torch uses), and wraps ``base + arena_offset`` in an object
  with ``__cuda_array_interface__`` (one-dimensional ``uint8``), which ``torch.as_tensor``
  takes without copying on ``cuda:N`` (the torch device with the same UUID); the bytes are
  then viewed as the file's dtype and shape. torch needs numpy to read that interface.
  Ordering, because ferryd copies on its own stream: when the connection has ``CUDA_EVENTS``
  (a CUDA ferryd whose config sets ``cuda_events = true`` grants it to
  ``Client(..., cuda=True)``) and ``cuda_sync="stream"`` (the default), each layer is acquired
  with ``acquire_event`` and the current torch stream of that device is made to wait, on the
  GPU, on ferryd's interprocess ready event of the layer
  (``ferry.cuda.ImportedArena.stream_wait``) before its tensors are made: no ``wait_ready``
  round trip, and the host does not wait for the copies. Events need this process in ferryd's
  IPC namespace: the first time one cannot be opened or waited on, that layer is waited for
  with ``wait_ready``, a warning is logged, and every later layer is leased with plain
  ``acquire`` and waited for on the host. Otherwise (no ``CUDA_EVENTS``, or
  ``cuda_sync="device"``, whose forwards may read weights on side streams that never waited on
  the current one) a layer's tensors are made only after ``wait_ready`` answered
  (``Lease.device_ptr`` waits), so its bytes are on the GPU before any kernel is queued. After
  the forward, *before* the lease is released, the current torch stream of that device is
  synchronised (``cuda_sync="stream"``), or the whole device (``cuda_sync="device"``: for
  forwards that run kernels on other streams without joining them back): ferryd may overwrite
  the memory as soon as it acknowledges the release, and it never waits on an event of its
  clients. That synchronisation still blocks the host once per released layer (the price is
  the GPU running dry at each release; events spare the wait before each layer). The mapping may be
  read-only (``ferry.cuda.ImportedArena.read_only``): a kernel writing a served weight then
  faults the CUDA context, like a write to the host arena crashes the process. Attaching
  raises :class:`CudaSharingUnavailable` (before anything is opened or changed) when this
  process cannot map the arena: no ``CUDA_IPC`` on the connection, no numpy, torch without
  CUDA, or no CUDA driver; and after opening (the session is undone) when ferryd's GPU is not
  visible here.

Layers nest: a layer hooked on a module that contains other hooked modules (a bare parameter
of the root, such as ``logit_scale``, is served around the root's whole forward) stays leased
while the inner layers come and go, so the policy must be able to hold that many layers at once
(``sequential`` with ``lookahead=0`` holds one, and ferryd answers ``Timeout`` after its
acquire timeout).

Limits: run forwards under ``torch.no_grad()`` or ``torch.inference_mode()`` (autograd may keep
a weight for a backward pass past the forward's end); CUDA graphs cannot capture a served
forward (each layer's address changes between acquires); one forward at a time per client (a
:class:`ferry.Client` has one request in flight); attach after ``module.to(...)``/``.half()``,
never move an attached module; ``state_dict()`` of an attached module holds placeholders; a
weight read outside its submodule's forward (a parent calling ``F.linear(x, self.fc.weight)``)
is a placeholder there.
"""

import importlib
import importlib.util

try:
    torch = importlib.import_module("torch")
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ferry.torch needs PyTorch (pip install torch); the protocol client ferry.Client "
        "works without it"
    ) from e

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import (
    Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union,
)

from . import cuda
from . import errors
from . import messages as m
from .client import Client, DeviceArg, Lease, PolicyArg

nn = torch.nn

__all__ = [
    "Attachment", "CudaSharingUnavailable", "FerryTorchError", "Session", "attach",
    "attach_pipeline", "empty_weights", "name_mapper", "tensor_source", "torch_dtype",
]

ModelArg = Union[str, "os.PathLike[str]", m.ModelOpened]
LoraStack = Sequence[Tuple[Union[str, int], float]]
NameMap = Callable[[str], Optional[str]]


class FerryTorchError(errors.FerryError):
    """A module and a ferry model do not fit together (a name, shape or dtype), or an attached
    module is used in a way ferry cannot serve. Raised by the client (``code`` is ``None``)."""

    name = "torch"


class CudaSharingUnavailable(FerryTorchError):
    """ferryd runs on the CUDA backend and this process cannot map its GPU memory (the message
    says why: no ``CUDA_IPC`` on the connection, no numpy, torch without CUDA, no CUDA driver,
    ferryd's GPU not visible here)."""

    name = "cuda_sharing_unavailable"


# ---- dtypes --------------------------------------------------------------------------------

# safetensors dtype -> torch attribute. F4 and F6_* are packed below a byte per element, which a
# torch tensor over the same bytes cannot express with the file's shape: refused by name.
_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype name (``BF16`` -> ``torch.bfloat16``)."""
    attr = _TORCH_DTYPES.get(name)
    if attr is None:
        raise FerryTorchError(f"safetensors dtype {name} has no torch dtype ferry can serve")
    dt = getattr(torch, attr, None)
    if not isinstance(dt, torch.dtype):
        raise FerryTorchError(
            f"safetensors dtype {name} needs torch.{attr}, which torch {torch.__version__} lacks")
    return dt


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- tensor sources: leases -> torch tensors -----------------------------------------------


def _check_size(desc: m.TensorDesc, dtype: "torch.dtype", shape: Sequence[int],
                device: Any) -> Optional["torch.Tensor"]:
    """Checks that ``desc``'s bytes hold ``shape`` of ``dtype``; for an empty tensor, returns
    it (on ``device``), as there is nothing to map."""
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    if _numel(shape) * itemsize != desc.len:
        raise FerryTorchError(
            f"tensor {desc.name}: {desc.len} bytes for shape {list(shape)} of {desc.dtype}")
    if desc.len == 0:
        return torch.empty(list(shape), dtype=dtype, device=device)
    return None


def _in_range(t: "torch.Tensor", device_type: str, base: int, end: int) -> bool:
    """Whether ``t`` is a strided tensor on ``device_type`` whose storage starts in
    ``[base, end)``."""
    if t.device.type != device_type or t.layout != torch.strided:
        return False
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False
    return base <= ptr < end


class _HostArena:
    """Host backend: each tensor is a zero-copy view of the arena mapped read-only: that of
    the device ``model`` (a model or view id) is on, or the default device's."""

    @staticmethod
    def check(client: Client) -> None:
        """Whether this source can serve ``client`` (it can)."""

    def __init__(self, client: Client, model: Optional[int] = None, sync: str = "stream"):
        # ``sync`` is the CUDA source's; host memory needs no synchronisation.
        self.check(client)
        self.events = False
        self.arena = client.map_arena() if model is None else client.arena_for(model)
        if self.arena.len > 0:
            self.base = self._frombuffer(self.arena.view[0:1], torch.uint8).data_ptr()
        else:
            self.base = 0
        self.end = self.base + self.arena.len

    @staticmethod
    def _frombuffer(buf: memoryview, dtype: "torch.dtype") -> "torch.Tensor":
        # torch warns that it cannot honour a read-only buffer; ferry relies on PROT_READ for
        # that instead (module docs), and never writes through these tensors.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable",
                                    category=UserWarning)
            return torch.frombuffer(buf, dtype=dtype)

    @staticmethod
    def acquire(client: Client, model: int, component: str, index: int) -> Lease:
        """Leases a layer (:meth:`tensor` waits until it is ready)."""
        return client.acquire(model, component, index)

    def tensor(self, lease: Lease, desc: m.TensorDesc, dtype: "torch.dtype",
               shape: Sequence[int]) -> "torch.Tensor":
        empty = _check_size(desc, dtype, shape, "cpu")
        if empty is not None:
            return empty
        buf = lease.view(desc)  # waits until ready, checks the range against the arena
        return self._frombuffer(buf, dtype).view(list(shape))

    def owns(self, t: "torch.Tensor") -> bool:
        """Whether ``t``'s memory lies in the arena (a served weight or a view of one)."""
        return _in_range(t, "cpu", self.base, self.end)


class _DeviceBytes:
    """``nbytes`` of GPU memory at ``ptr`` as ``__cuda_array_interface__`` (version 3) describes
    them: one-dimensional ``uint8``, writable as far as the interface goes (torch refuses
    read-only ones; the mapping itself may be read-only). torch keeps this object, and so
    ``owner`` (the imported arena), alive as long as a tensor over the memory exists. ``stream``
    is None: torch needs to synchronise nothing (the lease waited on the host, or the current
    stream, which the tensor is used on, already waits on ferryd's ready event)."""

    __slots__ = ("ptr", "nbytes", "owner")

    def __init__(self, ptr: int, nbytes: int, owner: Any):
        self.ptr = ptr
        self.nbytes = nbytes
        self.owner = owner

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return {"version": 3, "shape": (self.nbytes,), "typestr": "|u1",
                "data": (self.ptr, False), "strides": None, "stream": None}


def _typed(raw: "torch.Tensor", dtype: "torch.dtype", shape: Sequence[int]) -> "torch.Tensor":
    """One-dimensional ``uint8`` bytes seen as ``dtype`` with ``shape``, without a copy (the
    caller checked that the sizes agree)."""
    t = raw if dtype == torch.uint8 else raw.view(dtype)
    return t.view(list(shape))


def _torch_uuid(props: Any) -> Optional[str]:
    """A torch device's UUID as ``GPU-…``, from ``get_device_properties(i).uuid``: a
    ``_CUuuid`` whose ``bytes`` are the 16 raw bytes and whose ``str`` is the dashed form
    without ``GPU-`` (both are handled; ``None`` when torch gives none)."""
    u = getattr(props, "uuid", None)
    if u is None:
        return None
    raw = getattr(u, "bytes", None)
    if raw is not None and not isinstance(raw, str):
        try:
            b = bytes(raw)
        except (TypeError, ValueError):
            b = b""
        if len(b) == 16:
            return cuda.format_uuid(b)
    return str(u)


def _torch_index(uuid: str) -> int:
    """The index of the torch CUDA device with ``uuid``."""
    want = cuda.normalize_uuid(uuid)
    seen = []
    for i in range(torch.cuda.device_count()):
        u = _torch_uuid(torch.cuda.get_device_properties(i))
        seen.append(u or "?")
        if u is not None and cuda.normalize_uuid(u) == want:
            return i
    raise CudaSharingUnavailable(
        f"ferryd CUDA sharing not available: torch has no CUDA device with UUID {uuid} "
        f"(torch sees: {', '.join(seen) or 'none'})")


def _cuda_unavailable(client: Client) -> Optional[str]:
    """Why this process cannot use ``client``'s CUDA arenas with torch, or ``None``."""
    if not client.features & m.CUDA_IPC:
        return ("this connection has no CUDA_IPC feature: make the client with "
                "ferry.Client(path, cuda=True) (a session given a socket path does)")
    if importlib.util.find_spec("numpy") is None:
        return ("torch reads memory it did not allocate through __cuda_array_interface__, "
                "which needs numpy (pip install numpy)")
    if not torch.cuda.is_available():
        return ("torch has no usable CUDA device (torch.cuda.is_available() is False: a "
                "CPU-only torch build, or no GPU visible to this process)")
    try:
        cuda.driver()
    except errors.CudaUnavailable as e:
        return e.message
    return None


class _CudaArena:
    """CUDA backend: each tensor is a zero-copy CUDA tensor over ferryd's GPU memory, mapped
    into this process once per device (module docs: how, and the ordering rule)."""

    @staticmethod
    def check(client: Client) -> None:
        """Raises :class:`CudaSharingUnavailable` unless this process can map ``client``'s
        CUDA arenas for torch (nothing is sent)."""
        why = _cuda_unavailable(client)
        if why is not None:
            raise CudaSharingUnavailable(
                f"ferryd CUDA sharing not available: ferryd at {client.path} runs on the CUDA "
                f"backend ({client.device.name or 'a GPU'}), but {why}")

    def __init__(self, client: Client, model: Optional[int] = None, sync: str = "stream"):
        if sync not in _SYNCS:
            raise ValueError(f"cuda_sync must be one of {_SYNCS}, not {sync!r}")
        self.check(client)
        self.sync = sync
        # Ready events order only the stream that waits on them: with cuda_sync="device" the
        # forward may read weights on side streams, so the host waits (wait_ready) instead.
        # (uses_events also turns them off once the arena found it cannot use them.)
        self.events = bool(client.features & m.CUDA_EVENTS) and sync == "stream"
        # What the last before_release synchronised: a CUstream, _ALL_STREAMS, or None.
        self._settled: Any = None
        try:
            self.arena = client.map_arena() if model is None else client.arena_for(model)
        except errors.CudaError as e:
            raise CudaSharingUnavailable(
                f"ferryd CUDA sharing not available: {e.message}") from e
        self.index = _torch_index(self.arena.uuid)
        self.device = torch.device("cuda", self.index)
        self.base = self.arena.base
        self.end = self.base + self.arena.len

    def tensor(self, lease: Lease, desc: m.TensorDesc, dtype: "torch.dtype",
               shape: Sequence[int]) -> "torch.Tensor":
        empty = _check_size(desc, dtype, shape, self.device)
        if empty is not None:
            return empty
        # Checks the range against the arena; orders the current stream after the layer's copies
        # on the GPU (a lease with a ready event), else waits on the host until it is ready.
        ptr = lease.device_ptr(desc, stream=self.reading_stream())
        return self._wrap(ptr, desc, dtype, shape)

    def _wrap(self, ptr: int, desc: m.TensorDesc, dtype: "torch.dtype",
              shape: Sequence[int]) -> "torch.Tensor":
        """A CUDA tensor over ``desc.len`` bytes of the arena at ``ptr``, without a copy (the
        one step the tests without a GPU stand in for)."""
        raw = torch.as_tensor(_DeviceBytes(ptr, desc.len, self.arena), device=self.device)
        if raw.data_ptr() != ptr or raw.numel() != desc.len or raw.dtype != torch.uint8:
            # A copy would be served silently and outlive the lease's meaning: refuse.
            raise FerryTorchError(
                f"tensor {desc.name}: torch did not take ferry's GPU memory in place "
                f"(got {raw.numel()} {raw.dtype} at {raw.data_ptr():#x}, gave {desc.len} bytes "
                f"at {ptr:#x})")
        return _typed(raw, dtype, shape)

    @property
    def uses_events(self) -> bool:
        """Whether layers are ordered with ferryd's ready events: the connection has
        ``CUDA_EVENTS``, ``cuda_sync`` is ``stream``, and the arena has not found that this
        process cannot use them (``ImportedArena.events_broken``: then every later layer is
        leased plainly and waited for on the host)."""
        return self.events and not getattr(self.arena, "events_broken", False)

    def acquire(self, client: Client, model: int, component: str, index: int) -> Lease:
        """Leases a layer: with its ready event when this source uses events (the current
        stream will wait on it in :meth:`tensor`), else plainly (:meth:`tensor` waits on the
        host)."""
        if self.uses_events:
            return client.acquire_event(model, component, index)
        return client.acquire(model, component, index)

    def reading_stream(self) -> Optional[int]:
        """The ``CUstream`` the layer's tensors will be read on (the device's current torch
        stream), when this source orders it with events; ``None``: wait on the host."""
        if not self.uses_events:
            return None
        return int(torch.cuda.current_stream(self.device).cuda_stream)

    def before_release(self) -> None:
        """Waits for this process's GPU work that may read the layers being released."""
        self._settled = None
        if self.sync == "device":
            torch.cuda.synchronize(self.device)
            self._settled = _ALL_STREAMS
        else:
            stream = torch.cuda.current_stream(self.device)
            stream.synchronize()
            self._settled = int(stream.cuda_stream)

    def settled(self, lease: Lease) -> None:
        """Tells ``lease`` what :meth:`before_release` synchronised, so that releasing it does
        not synchronise the same stream again (``Lease.mark_synchronized``)."""
        if self._settled is _ALL_STREAMS:
            lease.mark_synchronized()
        elif self._settled is not None:
            lease.mark_synchronized(self._settled)

    def owns(self, t: "torch.Tensor") -> bool:
        """Whether ``t``'s memory lies in the mapped arena (a served weight or a view of one)."""
        return _in_range(t, "cuda", self.base, self.end)


_SYNCS = ("stream", "device")
# before_release synchronised the whole device (cuda_sync="device").
_ALL_STREAMS = object()


_SOURCES = {"host": _HostArena, "cuda": _CudaArena}


def _source_class(client: Client) -> Any:
    """The tensor source class for ``client``'s backend, once it has said it can serve it
    (nothing is mapped or opened yet). Raises as :func:`tensor_source` does."""
    cls = _SOURCES.get(client.device.backend)
    if cls is None:
        raise FerryTorchError(f"ferryd's device backend {client.device.backend!r} is unknown "
                              "to this client")
    cls.check(client)
    return cls


def tensor_source(client: Client, model: Optional[int] = None, sync: str = "stream") -> Any:
    """What turns ``client``'s leases of ``model`` (a model or view id; None: any model on the
    server's default device) into torch tensors, by the server's device backend: ``tensor(lease,
    desc, dtype, shape)`` and ``acquire(client, model, component, index)`` (the lease ``tensor``
    expects: on CUDA with ``CUDA_EVENTS`` and ``sync="stream"``, one with its ready event, which
    ``tensor`` makes the current stream wait on; a plain lease works too, waited for on the
    host); on CUDA also ``before_release()`` (the ``sync`` it was made with: ``stream`` or
    ``device``). Raises :class:`CudaSharingUnavailable` on a CUDA ferryd whose memory this
    process cannot map."""
    return _source_class(client)(client, model, sync)


# ---- building modules without weights ------------------------------------------------------


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (no memory), while
    their buffers stay real: buffers a file does not hold (``position_ids``, rotary tables) are
    computed at construction and ferry cannot serve them. (``torch.device("meta")`` would make
    those meta too; :meth:`Session.attach` refuses a module left with such tensors.)"""
    register = nn.Module.register_parameter

    def on_meta(self: "nn.Module", name: str, param: Optional["nn.Parameter"]) -> None:
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and not p.is_meta:
            kwargs = dict(p.__dict__)
            kwargs["requires_grad"] = p.requires_grad
            self._parameters[name] = type(p)(p.to("meta"), **kwargs)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


# ---- names ---------------------------------------------------------------------------------


def name_mapper(prefix: str = "", strip: str = "",
                rename: Optional[NameMap] = None) -> NameMap:
    """ferry tensor name (local to its component) -> module parameter/buffer name, or
    ``None`` for a tensor that is not the module's. ``strip`` is removed from the front (a
    tensor without it is not the module's), then ``prefix`` added; ``rename`` replaces both."""
    if rename is not None:
        if prefix or strip:
            raise ValueError("give rename, or prefix/strip, not both")
        return rename

    def mapped(name: str) -> Optional[str]:
        if strip:
            if not name.startswith(strip):
                return None
            name = name[len(strip):]
        return prefix + name

    return mapped


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _within(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + ".")


def _common_module(paths: Iterable[str]) -> str:
    """The deepest module path that is, or holds, every path given."""
    common: Optional[List[str]] = None
    for p in paths:
        parts = p.split(".") if p else []
        if common is None:
            common = parts
            continue
        n = 0
        while n < len(common) and n < len(parts) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    return ".".join(common or [])


# ---- binding -------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One place a served tensor goes: ``owner._parameters[attr]`` or ``owner._buffers[attr]``."""

    owner: "nn.Module"
    attr: str
    parameter: bool
    path: str  # the owner's module path

    def set(self, t: "torch.Tensor") -> None:
        if self.parameter:
            self.owner._parameters[self.attr] = t  # type: ignore[assignment]
        else:
            self.owner._buffers[self.attr] = t


@dataclass
class _Served:
    """A ferry tensor and every place it goes (several for tied weights: one object each time,
    so the tie holds for the served tensor and for the placeholder alike)."""

    desc: m.TensorDesc
    dtype: "torch.dtype"
    shape: List[int]
    slots: List[_Slot]
    placeholder: "torch.Tensor"

    def put(self, t: "torch.Tensor") -> None:
        param = None
        for slot in self.slots:
            if slot.parameter:
                param = param if param is not None else nn.Parameter(t, requires_grad=False)
                slot.set(param)
            else:
                slot.set(t)

    def clear(self) -> None:
        for slot in self.slots:
            slot.set(self.placeholder if slot.parameter else self.placeholder.data)


@dataclass
class _Layer:
    component: str
    index: int
    name: str
    served: Dict[str, _Served] = field(default_factory=dict)
    norms: List[Tuple[str, "nn.Module"]] = field(default_factory=list)  # BatchNorm owners
    depth: int = 0
    lease: Optional[Lease] = None


def _placeholder(kind: str, dtype: "torch.dtype", shape: Sequence[int],
                 device: Optional["torch.device"] = None) -> "torch.Tensor":
    """A parameter standing in for a served tensor between forwards (its ``.data`` for
    buffers): ``meta``, or ``cpu``/``cuda`` (on ``device``) with the right shape over one zero
    element."""
    if kind == "meta":
        t = torch.empty(list(shape), dtype=dtype, device="meta")
    else:
        t = torch.zeros((), dtype=dtype, device=device or "cpu").expand(list(shape))
    return nn.Parameter(t, requires_grad=False)


class Attachment:
    """One ferry component bound to one module (see :meth:`Session.attach`)."""

    def __init__(self, session: "Session", module: "nn.Module", component: str,
                 mapper: NameMap, strict: bool, check_dtypes: bool, placeholder: str):
        if placeholder not in ("meta", "cpu", "cuda"):
            raise ValueError(f"placeholder must be 'meta', 'cpu' or 'cuda', not {placeholder!r}")
        self._placeholder_device: Optional["torch.device"] = None
        if placeholder == "cuda":
            self._placeholder_device = getattr(session._source, "device", None)
            if self._placeholder_device is None:
                raise FerryTorchError("placeholder='cuda' is for a CUDA ferryd (this one serves "
                                      "host memory: use 'cpu')")
        self.session = session
        self.module = module
        self.component = component
        self.layers: List[_Layer] = []
        #: ferry tensors the mapping gave no module name (``None``), by layer
        self.foreign: List[str] = []
        #: ferry tensors mapped to a name the module lacks (only kept when ``strict=False``)
        self.missing: List[str] = []
        #: ferry tensors whose module tensor another ferry tensor already serves (tied names)
        self.duplicates: List[str] = []
        #: module parameters and buffers ferry does not serve (they keep their own values)
        self.unserved: List[str] = []
        self.hooked: List[str] = []
        self._hooks: List[Any] = []
        self._frames = threading.local()
        self._closed = False
        self._owns_session = False
        summary = session.opened.component(component)
        descs = session._tensor_lists(component, len(summary.layers))
        self._bind(summary, descs, mapper, strict, check_dtypes, placeholder)

    # -- attach ------------------------------------------------------------------------------

    def _bind(self, summary: m.ComponentSummary, descs: List[List[m.TensorDesc]],
              mapper: NameMap, strict: bool, check_dtypes: bool, placeholder: str) -> None:
        module = self.module
        modules = dict(module.named_modules(remove_duplicate=False))
        # every place a tensor sits: name -> (owner, attr, is parameter, owner path)
        places: Dict[str, Tuple["nn.Module", str, bool, str]] = {}
        aliases: Dict[int, List[str]] = {}  # id(tensor) -> every name it has
        tensors: Dict[str, "torch.Tensor"] = {}
        for path, mod in modules.items():
            for parameter, table in ((True, mod._parameters), (False, mod._buffers)):
                for attr, t in table.items():
                    if t is None:
                        continue
                    name = f"{path}.{attr}" if path else attr
                    places[name] = (mod, attr, parameter, path)
                    tensors[name] = t
                    aliases.setdefault(id(t), []).append(name)

        problems: List[str] = []
        taken: Dict[int, str] = {}  # id(module tensor) -> the ferry tensor serving it
        plan: List[Tuple[_Layer, List[str]]] = []
        for index, (layer_summary, layer_descs) in enumerate(zip(summary.layers, descs)):
            layer = _Layer(self.component, index, layer_summary.name)
            owners: List[str] = []
            for d in layer_descs:
                target = mapper(d.name)
                if target is None:
                    self.foreign.append(d.name)
                    continue
                if target not in places:
                    if strict:
                        problems.append(f"{d.name} -> {target}: no such parameter or buffer")
                    else:
                        self.missing.append(d.name)
                    continue
                try:
                    dtype = torch_dtype(d.dtype)
                except FerryTorchError as e:
                    problems.append(f"{d.name}: {e.message}")
                    continue
                mine = tensors[target]
                shape = [int(x) for x in d.shape]
                if list(mine.shape) != shape:
                    problems.append(f"{d.name} -> {target}: ferry's shape {shape}, the "
                                    f"module's {list(mine.shape)}")
                    continue
                if check_dtypes and mine.dtype != dtype:
                    problems.append(f"{d.name} -> {target}: ferry's dtype {d.dtype} "
                                    f"({dtype}), the module's {mine.dtype}")
                    continue
                if id(mine) in taken:
                    self.duplicates.append(d.name)
                    continue
                taken[id(mine)] = d.name
                slots = []
                for alias in aliases[id(mine)]:
                    owner, attr, parameter, path = places[alias]
                    slots.append(_Slot(owner, attr, parameter, path))
                    bn = getattr(nn.modules.batchnorm, "_NormBase", None)
                    if not parameter and bn is not None and isinstance(owner, bn):
                        layer.norms.append((path, owner))
                layer.served[d.name] = _Served(d, dtype, shape, slots,
                                               _placeholder(placeholder, dtype, shape,
                                                            self._placeholder_device))
                owners.append(places[target][3])
            if layer.served:
                plan.append((layer, owners))
        if problems:
            shown = "; ".join(problems[:10])
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            raise FerryTorchError(
                f"component {self.component!r} of model {self.session.model} does not fit "
                f"{type(module).__name__}: {shown}{more}")

        # Hooks: each layer on the smallest module holding its tensors, plus the owners of
        # tied names outside it.
        by_module: Dict[int, Tuple["nn.Module", str, List[_Layer]]] = {}
        for layer, owners in plan:
            home = _common_module(owners)
            # The layer's own name, when it names a module holding all of its tensors, is the
            # better place: ferry's layers are blocks (`down_blocks.1`), and the tensors' common
            # module may be a container inside one (`down_blocks.1.resnets`).
            named = mapper(layer.name)
            if named is not None and named in modules and _within(home, named):
                home = named
            # A container's forward is never called: hook the module that calls its children.
            while home and isinstance(modules[home], _CONTAINERS):
                home = _parent(home)
            homes = [home]
            for s in layer.served.values():
                for slot in s.slots:
                    if not _within(slot.path, home) and slot.path not in homes:
                        homes.append(slot.path)
            for path in homes:
                mod = modules[path]
                entry = by_module.setdefault(id(mod), (mod, path, []))
                if layer not in entry[2]:
                    entry[2].append(layer)
            self.layers.append(layer)

        served_ids = set(taken)
        self.unserved = [n for n, t in tensors.items() if id(t) not in served_ids]
        empty = [n for n in self.unserved if tensors[n].is_meta]
        if empty:
            msg = (f"{type(module).__name__} has meta tensors that ferry does not serve (not in "
                   f"component {self.component!r}): {empty[:10]}; build the module under "
                   "ferry.torch.empty_weights() so that buffers the file lacks stay real")
            if strict:
                raise FerryTorchError(msg)
            warnings.warn(msg, stacklevel=4)
        self.foreign = sorted(set(self.foreign))
        # Nothing has changed so far; from here the module's own weights are dropped.
        for layer in self.layers:
            for s in layer.served.values():
                s.clear()
        try:
            for mod, path, layers in by_module.values():
                self._hooks.append(mod.register_forward_pre_hook(self._pre_hook(layers),
                                                                 prepend=True))
                self._hooks.append(mod.register_forward_hook(self._post_hook(layers),
                                                             always_call=True))
        except BaseException:
            self._remove_hooks()
            raise
        self.hooked = sorted(path for _, path, _ in by_module.values())

    # -- hooks -------------------------------------------------------------------------------

    def _stack(self, mod: "nn.Module") -> List[List[_Layer]]:
        stacks = getattr(self._frames, "stacks", None)
        if stacks is None:
            stacks = self._frames.stacks = {}
        return stacks.setdefault(id(mod), [])

    def _pre_hook(self, layers: List[_Layer]) -> Callable[..., None]:
        def hook(mod: "nn.Module", args: Any) -> None:
            # The frame is pushed first: the forward hook (always called, also when this one
            # raises) pops it and releases whatever was entered.
            entered: List[_Layer] = []
            self._stack(mod).append(entered)
            for layer in layers:
                for path, norm in layer.norms:
                    if norm.training and getattr(norm, "track_running_stats", False):
                        raise FerryTorchError(
                            f"{path} ({type(norm).__name__}) is in training mode and would "
                            "write its running statistics into ferry's read-only weights; "
                            "call .eval() on the module")
            for layer in layers:
                self.session._enter(layer)
                entered.append(layer)

        return hook

    def _post_hook(self, layers: List[_Layer]) -> Callable[..., Any]:
        def hook(mod: "nn.Module", args: Any, output: Any) -> Any:
            stack = self._stack(mod)
            if not stack:
                return None
            entered = stack.pop()
            try:
                if output is not None:
                    output = self.session._own(output)
            finally:
                self.session._leave(entered)
            return output

        return hook

    # -- detach ------------------------------------------------------------------------------

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def close(self) -> None:
        """Removes the hooks (and closes the session if :func:`attach` made it for this
        module). The module keeps its placeholders: its own weights were dropped at attach.
        Refused while one of its layers is in use (inside a forward)."""
        if not self._closed:
            busy = [layer.name for layer in self.layers if layer.depth > 0]
            if busy:
                raise FerryTorchError(f"cannot detach during a forward: layers {busy} are in use")
            self._remove_hooks()
            self._closed = True
        if self._owns_session:
            self.session.close()

    def detach(self) -> None:
        """Same as :meth:`close`."""
        self.close()

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Attachment(component={self.component!r}, layers={len(self.layers)}, "
                f"module={type(self.module).__name__})")


# ---- sessions ------------------------------------------------------------------------------


class Session:
    """One ferry model served to this process for torch modules: opens the model (a path under
    a model root, or an already opened :class:`ferry.messages.ModelOpened`), sets its residency
    policy, and applies a LoRA stack if one is given (every layer is then served through that
    view; the model itself is unchanged for other clients).

    ``client``: a :class:`ferry.Client`, a socket path, or ``None`` for ``$FERRY_SOCKET``; a
    client made here is closed with the session. ``policy``: ``none``, ``component``,
    ``sequential``, ``balanced``, ``lru``, ``auto``, a preset (``lowvram``, ``medvram``,
    ``model``) or a :class:`ferry.messages.Policy` for the whole
    model (``None`` leaves it as it is), ``lookahead``/``threshold`` as in
    :meth:`ferry.Client.set_residency`; ``component_policies`` sets some components apart.
    ``loras``: ``(path, strength)`` pairs; ``lora_mode``: ``backup`` or ``fuse``.
    ``device``: the ferryd device the session opens the model on, an index (int) or a UUID
    (str) as :meth:`ferry.Client.devices` lists them (``None``: the server's default). With an
    already opened model it must be ``None`` or that model's index (``opened.device``):
    tensors are read from the arena of the device the model is on either way.
    ``cuda_sync`` (a CUDA ferryd only): what is waited for after a layer's forward, before its
    lease is released: ``stream`` (the device's current torch stream, the default; with
    ``CUDA_EVENTS`` that stream also waits on each layer's ready event on the GPU instead of a
    ``wait_ready`` on the host) or ``device`` (every stream: forwards that use side streams
    without joining them back; layers are then waited for on the host).
    """

    def __init__(self, model: ModelArg, client: Union[Client, str, None] = None, *,
                 device: DeviceArg = None,
                 policy: Optional[PolicyArg] = "sequential", lookahead: int = 1,
                 threshold: Union[m.Threshold, int, float, None] = None,
                 component_policies: Optional[Mapping[str, PolicyArg]] = None,
                 loras: LoraStack = (), lora_mode: Union[m.LoraMode, str] = "backup",
                 cuda_sync: str = "stream"):
        if cuda_sync not in _SYNCS:
            raise ValueError(f"cuda_sync must be one of {_SYNCS}, not {cuda_sync!r}")
        self._owns_client = not isinstance(client, Client)
        # A client made here asks for CUDA_IPC: a CUDA ferryd then shares its GPU memory (a
        # host ferryd does not grant it, and nothing changes).
        self.client = client if isinstance(client, Client) else Client(client, cuda=True)
        self._owns_model = False
        self.view: Optional[int] = None
        self.lora_report: Optional[m.ViewCreated] = None
        self.attachments: List[Attachment] = []
        self._lock = threading.RLock()
        self._descs: Dict[str, List[List[m.TensorDesc]]] = {}
        self._closed = False
        try:
            # First, so that a CUDA ferryd fails before anything is opened or changed.
            source = _source_class(self.client)
            if isinstance(model, m.ModelOpened):
                if device is not None and m.DeviceSel.of(device) != m.DeviceIndex(model.device):
                    raise FerryTorchError(
                        f"model {model.model} is already open on device {model.device}; "
                        f"device={device!r} applies only to a model the session opens")
                self.opened = model
            else:
                self.opened = self.client.open_model(model, device)
                self._owns_model = True
            self.model = self.opened.model
            # The arena of the device the model is on (its views are on the same device).
            self._source = source(self.client, self.model, cuda_sync)
            if policy is not None:
                self.client.set_residency(self.model, policy, lookahead=lookahead,
                                          threshold=threshold)
            for comp, p in (component_policies or {}).items():
                self.client.set_residency(self.model, p, component=comp, lookahead=lookahead,
                                          threshold=threshold)
            if loras:
                self._apply(loras, lora_mode)
        except BaseException:
            self._teardown()
            raise

    @property
    def serving(self) -> int:
        """The model id layers are acquired from: the LoRA view, else the model."""
        return self.view if self.view is not None else self.model

    def _apply(self, loras: LoraStack, mode: Union[m.LoraMode, str]) -> None:
        view = self.client.apply_lora(self.model, list(loras), mode)
        self.view = view
        self.lora_report = self.client.last_view
        unmatched = sum(len(r.unmatched) for r in self.lora_report.loras)
        if unmatched:
            names = [n for r in self.lora_report.loras for n in r.unmatched][:5]
            warnings.warn(f"{unmatched} LoRA adapters match no tensor of model {self.model} "
                          f"(e.g. {names}); see Session.lora_report", stacklevel=3)

    def set_loras(self, loras: LoraStack, mode: Union[m.LoraMode, str] = "backup") -> None:
        """Replaces the LoRA stack (an empty one serves the model itself): a new view is made,
        then the old one removed. Not during a forward."""
        with self._lock:
            self._check_idle("change the LoRA stack")
            old = self.view
            if loras:
                self._apply(loras, mode)
            else:
                self.view, self.lora_report = None, None
            if old is not None:
                self.client.remove_lora(old)

    def _check_idle(self, what: str) -> None:
        busy = [a.component + ":" + layer.name for a in self.attachments
                for layer in a.layers if layer.depth > 0]
        if busy:
            raise FerryTorchError(f"cannot {what} during a forward: {busy} in use")

    def _tensor_lists(self, component: str, layers: int) -> List[List[m.TensorDesc]]:
        """Every layer's tensor list. The protocol gives it only with a lease, so each layer is
        acquired and released at once (without waiting for its bytes); the policy may start
        loading them. Cached per component."""
        with self._lock:
            got = self._descs.get(component)
            if got is None:
                got = []
                for i in range(layers):
                    lease = self.client.acquire(self.serving, component, i)
                    got.append(lease.tensors)
                    lease.release()
                self._descs[component] = got
            return got

    def attach(self, module: "nn.Module", component: Optional[str] = None, *, prefix: str = "",
               strip: str = "", rename: Optional[NameMap] = None, strict: bool = True,
               check_dtypes: bool = True, placeholder: str = "meta") -> Attachment:
        """Serves ``component`` (optional when the model has one) to ``module``.

        Names: each ferry tensor name (within its component, e.g. ``down_blocks.0.resnets.0.
        conv1.weight``) becomes a module name by ``strip``/``prefix`` or ``rename`` (see
        :func:`name_mapper`). ``strict``: a mapped name the module lacks is an error (else it
        is skipped and listed in ``Attachment.missing``); a shape, or with ``check_dtypes`` a
        dtype, that differs is always an error. Build the module in the file's dtype (e.g.
        under ``torch.device("meta")`` then ``.to(torch.bfloat16)``). ``placeholder``:
        ``meta``, ``cpu`` or, on a CUDA ferryd, ``cuda`` (module docs)."""
        with self._lock:
            if self._closed:
                raise FerryTorchError("this session is closed")
            names = [c.name for c in self.opened.components]
            if component is None:
                if len(names) != 1:
                    raise FerryTorchError(f"model {self.model} has components {names}: name "
                                          "the one to attach")
                component = names[0]
            elif component not in names:
                raise FerryTorchError(f"model {self.model} has no component {component!r} "
                                      f"(it has {names})")
            for a in self.attachments:
                if a.module is module and not a._closed:
                    raise FerryTorchError(f"{type(module).__name__} is already attached "
                                          f"(component {a.component!r})")
            att = Attachment(self, module, component, name_mapper(prefix, strip, rename),
                             strict, check_dtypes, placeholder)
            self.attachments.append(att)
            return att

    def attach_pipeline(self, pipe: Any, components: Optional[Sequence[str]] = None,
                        **kwargs: Any) -> List[Attachment]:
        """Attaches every ferry component that is a ``torch.nn.Module`` attribute of ``pipe``
        of the same name (a diffusers pipeline: ``unet``, ``vae``, ``text_encoder``, …), or
        only ``components``. ``kwargs`` go to :meth:`attach`; ``placeholder`` defaults to
        ``cpu`` here (``cuda`` on a CUDA ferryd), since pipelines ask their modules for a
        device."""
        kwargs.setdefault("placeholder",
                          "cuda" if isinstance(self._source, _CudaArena) else "cpu")
        names = [c.name for c in self.opened.components]
        wanted = list(components) if components is not None else names
        out = []
        for name in wanted:
            mod = getattr(pipe, name, None)
            if not isinstance(mod, nn.Module):
                if components is None:
                    continue  # a component the pipeline does not have as a module
                raise FerryTorchError(f"the pipeline has no torch module {name!r}")
            out.append(self.attach(mod, name, **kwargs))
        if not out:
            raise FerryTorchError(f"none of the model's components {names} is a torch module "
                                  f"of {type(pipe).__name__}")
        return out

    # -- serving (called by the hooks) -------------------------------------------------------

    def _enter(self, layer: _Layer) -> None:
        with self._lock:
            if layer.depth == 0:
                # The source's acquire: on CUDA with events, a lease with its ready event.
                source_acquire = getattr(self._source, "acquire", None)
                if source_acquire is not None:
                    lease = source_acquire(self.client, self.serving, layer.component,
                                           layer.index)
                else:
                    lease = self.client.acquire(self.serving, layer.component, layer.index)
                try:
                    got = {d.name: d for d in lease.tensors}
                    made = []
                    for name, s in layer.served.items():
                        d = got.get(name)
                        if d is None or d.dtype != s.desc.dtype or list(d.shape) != s.shape:
                            raise FerryTorchError(
                                f"layer {lease.layer}: tensor {name} is not as it was at "
                                "attach")
                        made.append((s, self._source.tensor(lease, d, s.dtype, s.shape)))
                except BaseException:
                    lease._release_quietly()
                    raise
                for s, t in made:
                    s.put(t)
                layer.lease = lease
            layer.depth += 1

    def _leave(self, entered: List[_Layer]) -> None:
        with self._lock:
            leaving: List[Lease] = []
            for layer in reversed(entered):
                layer.depth -= 1
                if layer.depth > 0:
                    continue
                # Placeholders first: nothing keeps a pointer into memory ferryd may reuse.
                for s in layer.served.values():
                    s.clear()
                lease, layer.lease = layer.lease, None
                if lease is not None:
                    leaving.append(lease)
            if not leaving:
                return
            # On CUDA, kernels queued by the forward may still be reading the layers, and ferryd
            # may overwrite them as soon as it acknowledges a release: wait for them first.
            settle = getattr(self._source, "before_release", None)
            if settle is not None:
                try:
                    settle()
                except Exception as e:  # noqa: BLE001 - any CUDA failure: keep the leases
                    raise FerryTorchError(
                        "synchronising the GPU before releasing layers "
                        f"{[lease.layer for lease in leaving]} failed ({e}); their leases stay "
                        "held until this client disconnects") from e
                # The leases need not synchronise what was just synchronised (Lease.release
                # would otherwise wait on each stream that waited on a ready event).
                settled = getattr(self._source, "settled", None)
                if settled is not None:
                    for lease in leaving:
                        settled(lease)
            failure: Optional[BaseException] = None
            for lease in leaving:
                try:
                    lease.release()
                except errors.FerryError as e:
                    failure = failure or e
            if failure is not None:
                raise failure

    def _own(self, x: Any) -> Any:
        """``x`` with every tensor lying in ferry's memory cloned (module outputs)."""
        owns = getattr(self._source, "owns", None)
        if owns is None:
            return x
        if isinstance(x, torch.Tensor):
            return x.clone() if owns(x) else x
        if isinstance(x, list):
            for i, v in enumerate(x):
                x[i] = self._own(v)
            return x
        if isinstance(x, tuple):
            items = [self._own(v) for v in x]
            if all(a is b for a, b in zip(items, x)):
                return x
            return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
        if isinstance(x, dict):
            for k in list(x.keys()):
                v = x[k]
                w = self._own(v)
                if w is not v:
                    x[k] = w
            return x
        return x

    # -- closing -----------------------------------------------------------------------------

    def _teardown(self) -> None:
        for closing in (
            lambda: self.client.remove_lora(self.view) if self.view is not None else None,
            lambda: self.client.close_model(self.model) if self._owns_model else None,
        ):
            try:
                closing()
            except (errors.FerryError, AttributeError):
                pass
        self.view = None
        if self._owns_client:
            self.client.close()

    def close(self) -> None:
        """Detaches every module, removes the LoRA view, closes the model if this session
        opened it, and the client if it made it."""
        with self._lock:
            if self._closed:
                return
            self._check_idle("close the session")
            self._closed = True  # first: an attachment that owns this session closes it too
            for a in self.attachments:
                a.close()
            self._teardown()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Session(model={self.model}, view={self.view}, "
                f"attached={[a.component for a in self.attachments]})")


def attach(module: "nn.Module", model: ModelArg, client: Union[Client, str, None] = None, *,
           component: Optional[str] = None, device: DeviceArg = None,
           policy: Optional[PolicyArg] = "sequential",
           lookahead: int = 1, threshold: Union[m.Threshold, int, float, None] = None,
           loras: LoraStack = (), lora_mode: Union[m.LoraMode, str] = "backup",
           prefix: str = "", strip: str = "", rename: Optional[NameMap] = None,
           strict: bool = True, check_dtypes: bool = True,
           placeholder: str = "meta", cuda_sync: str = "stream") -> Attachment:
    """Serves one module from ferryd: a :class:`Session` of its own (closed with the returned
    :class:`Attachment`: ``att.close()`` or ``with``) and :meth:`Session.attach`. ``device``:
    the ferryd device to open the model on, ``cuda_sync`` (see :class:`Session`)."""
    session = Session(model, client, device=device, policy=policy, lookahead=lookahead,
                      threshold=threshold, loras=loras, lora_mode=lora_mode,
                      cuda_sync=cuda_sync)
    try:
        att = session.attach(module, component, prefix=prefix, strip=strip, rename=rename,
                             strict=strict, check_dtypes=check_dtypes, placeholder=placeholder)
    except BaseException:
        session.close()
        raise
    att._owns_session = True
    return att


def attach_pipeline(pipe: Any, model: ModelArg, client: Union[Client, str, None] = None, *,
                    components: Optional[Sequence[str]] = None, device: DeviceArg = None,
                    policy: Optional[PolicyArg] = "sequential", lookahead: int = 1,
                    threshold: Union[m.Threshold, int, float, None] = None,
                    component_policies: Optional[Mapping[str, PolicyArg]] = None,
                    loras: LoraStack = (), lora_mode: Union[m.LoraMode, str] = "backup",
                    cuda_sync: str = "stream", **kwargs: Any) -> Session:
    """Serves a pipeline's modules (a diffusers pipeline folder opened as one ferry model):
    a :class:`Session` with :meth:`Session.attach_pipeline`. Close the session when done.
    ``device``: the ferryd device to open the model on, ``cuda_sync`` (see
    :class:`Session`)."""
    session = Session(model, client, device=device, policy=policy, lookahead=lookahead,
                      threshold=threshold, component_policies=component_policies, loras=loras,
                      lora_mode=lora_mode, cuda_sync=cuda_sync)
    try:
        session.attach_pipeline(pipe, components, **kwargs)
    except BaseException:
        session.close()
        raise
    return session
