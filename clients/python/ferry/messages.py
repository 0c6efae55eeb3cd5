"""Every message of ferryd's protocol version 1 (docs/protocol.md, section 6), as dataclasses.

Each message class has ``KIND`` (the header's kind number) and ``NAME`` (the kind's name in
the spec and in the golden vectors); its fields are in wire order, each with its wire type
(see :mod:`ferry.wire`). ``BY_KIND`` and ``BY_NAME`` index them.
"""

import enum
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Type, Union

from .wire import WireEnum, wf

# ---- feature bits (section 5.3) ---------------------------------------------------------

FD_PASSING = 0x01
OPEN_PATH = 0x02
HOST_ARENA = 0x04
LORA = 0x08
CUDA_IPC = 0x10
DEVICES = 0x20  # open_model_on, open_model_fd_on, list_devices, map_arena_on
CUDA_EVENTS = 0x40  # acquire_event: interprocess ready events (offered by CUDA ferryds)
KNOWN_FEATURES = FD_PASSING | OPEN_PATH | HOST_ARENA | LORA | CUDA_IPC | DEVICES | CUDA_EVENTS
# What Client asks for by default: not CUDA_IPC nor CUDA_EVENTS, which ``Client(...,
# cuda=True)`` adds. Mapping a CUDA arena needs the CUDA driver and ferryd's GPU visible in this
# process (ferry.cuda); without the feature a CUDA ferryd answers map_arena with ``unsupported``
# instead of exporting its arena to a client that may not be able to use it. An event is of use
# only to a process that mapped the arena (it is opened in the arena's context), so it goes
# with CUDA_IPC.
DEFAULT_FEATURES = KNOWN_FEATURES & ~(CUDA_IPC | CUDA_EVENTS)

# Model, view and lease ids carry the index of the device they are on in their top 16 bits.
DEVICE_SHIFT = 48


def device_of(ident: int) -> int:
    """The index of the device a model, view or lease id belongs to (``ident >> 48``)."""
    return ident >> DEVICE_SHIFT


# ---- shared types (section 6.2) ---------------------------------------------------------


class Threshold(WireEnum):
    """``Bytes(u64)`` absolute bytes, or ``Fraction(f64)`` of the device's memory."""


@dataclass
class Bytes(Threshold):
    VARIANT: ClassVar[str] = "Bytes"
    TUPLE: ClassVar[bool] = True
    value: int = wf("u64")


@dataclass
class Fraction(Threshold):
    VARIANT: ClassVar[str] = "Fraction"
    TUPLE: ClassVar[bool] = True
    value: float = wf("f64")


Threshold.VARIANTS = (Bytes, Fraction)


class Policy(WireEnum):
    """A residency policy."""


@dataclass
class PolicyNone(Policy):
    """Everything resident, loaded at once (the Rust variant ``None``)."""

    VARIANT: ClassVar[str] = "None"


@dataclass
class PolicyComponent(Policy):
    """Whole components in and out, least recently used first."""

    VARIANT: ClassVar[str] = "Component"


@dataclass
class Sequential(Policy):
    """A window of ``lookahead + 1`` layers."""

    VARIANT: ClassVar[str] = "Sequential"
    lookahead: int = wf("u32", default=1)


@dataclass
class Balanced(Policy):
    """A stable resident set within the threshold; the rest streams."""

    VARIANT: ClassVar[str] = "Balanced"
    threshold: Threshold = wf(Threshold)


@dataclass
class Lru(Policy):
    """Plain LRU within the threshold."""

    VARIANT: ClassVar[str] = "Lru"
    threshold: Threshold = wf(Threshold)


class Preset(enum.IntEnum):
    """SD.Next's offload presets (the ``preset`` of :class:`PolicyPreset`)."""

    LowVram = 0  # = sequential, lookahead 1
    MedVram = 1  # = component
    Model = 2  # = component (SD.Next's "model offload")


@dataclass
class PolicyAuto(Policy):
    """Decided by the server from its device's memory: sequential on small devices, balanced
    above (the Rust variant ``Auto``)."""

    VARIANT: ClassVar[str] = "Auto"


@dataclass
class PolicyPreset(Policy):
    """An SD.Next preset, resolved by the server to the policy it names (the Rust variant
    ``Preset``)."""

    VARIANT: ClassVar[str] = "Preset"
    preset: Preset = wf(Preset)


# In variant-index order: None 0, Component 1, Sequential 2, Balanced 3, Lru 4, Auto 5,
# Preset 6. New variants are only ever appended.
Policy.VARIANTS = (PolicyNone, PolicyComponent, Sequential, Balanced, Lru, PolicyAuto,
                   PolicyPreset)


class LoraSource(WireEnum):
    """Where an adapter comes from."""


@dataclass
class LoraPath(LoraSource):
    """A path under a model root (the Rust variant ``Path``)."""

    VARIANT: ClassVar[str] = "Path"
    TUPLE: ClassVar[bool] = True
    value: str = wf("str")


@dataclass
class LoraFd(LoraSource):
    """The n-th descriptor attached to the frame (the Rust variant ``Fd``)."""

    VARIANT: ClassVar[str] = "Fd"
    TUPLE: ClassVar[bool] = True
    value: int = wf("u32")


LoraSource.VARIANTS = (LoraPath, LoraFd)


class LoraMode(enum.IntEnum):
    Backup = 0
    Fuse = 1


@dataclass
class LoraRef:
    source: LoraSource = wf(LoraSource)
    scale: float = wf("f32")


@dataclass
class LoraReport:
    unmatched: List[str] = wf(("list", "str"))
    unrecognised: List[str] = wf(("list", "str"))


class DeviceSel(WireEnum):
    """How a request names a device: ferryd's index (as ``list_devices`` gives it) or its
    UUID (``GPU-...``; ``HOST-000N`` for simulated host devices). Variant indices: ``Index``
    0, ``Uuid`` 1."""

    @staticmethod
    def of(device: "Union[DeviceSel, int, str]") -> "DeviceSel":
        """``device`` as a selector: an int is an index, a str a UUID."""
        if isinstance(device, DeviceSel):
            return device
        if isinstance(device, bool) or not isinstance(device, (int, str)):
            raise TypeError("a device is an index (int) or a UUID (str), not "
                            f"{type(device).__name__} {device!r}")
        if isinstance(device, int):
            if not 0 <= device <= 0xFFFFFFFF:
                raise ValueError(f"device index {device} is outside 0..=4294967295")
            return DeviceIndex(device)
        if not device:
            raise ValueError("a device UUID cannot be empty")
        return DeviceUuid(device)


@dataclass
class DeviceIndex(DeviceSel):
    """ferryd's device index (the Rust variant ``Index``)."""

    VARIANT: ClassVar[str] = "Index"
    TUPLE: ClassVar[bool] = True
    value: int = wf("u32")


@dataclass
class DeviceUuid(DeviceSel):
    """The device's UUID (the Rust variant ``Uuid``)."""

    VARIANT: ClassVar[str] = "Uuid"
    TUPLE: ClassVar[bool] = True
    value: str = wf("str")


DeviceSel.VARIANTS = (DeviceIndex, DeviceUuid)


@dataclass
class DeviceSummary:
    backend: str = wf("str")
    name: str = wf("str")
    uuid: str = wf("str")
    total_memory: int = wf("u64")
    budget: int = wf("u64")


@dataclass
class LayerSummary:
    name: str = wf("str")
    bytes: int = wf("u64")
    tensors: int = wf("u32")


@dataclass
class ComponentSummary:
    name: str = wf("str")
    layers: List[LayerSummary] = wf(("list", LayerSummary))


@dataclass
class TensorDesc:
    name: str = wf("str")
    dtype: str = wf("str")
    shape: List[int] = wf(("list", "u64"))
    arena_offset: int = wf("u64")
    len: int = wf("u64")


@dataclass
class ModelInfo:
    model: int = wf("u64")
    path: str = wf("str")
    source: str = wf("str")
    total_bytes: int = wf("u64")
    layers: int = wf("u32")
    resident_layers: int = wf("u32")
    policy: Optional[Policy] = wf(("option", Policy))
    clients: int = wf("u32")


@dataclass
class ClientInfo:
    id: int = wf("u64")
    pid: int = wf("u32")
    uid: int = wf("u32")
    gid: int = wf("u32")
    name: str = wf("str")
    models: int = wf("u32")
    leases: int = wf("u32")


# ---- messages (sections 6.3, 6.4) -------------------------------------------------------


class Message:
    KIND: ClassVar[int] = -1
    NAME: ClassVar[str] = ""
    # "none", "one", "at_most_one" (the body says which: ``fds_expected``) or "some" (0 to 16)
    FDS: ClassVar[str] = "none"


# requests


@dataclass
class Hello(Message):
    KIND: ClassVar[int] = 0x0001
    NAME: ClassVar[str] = "hello"
    min_version: int = wf("u16")
    max_version: int = wf("u16")
    features: int = wf("u64")
    client_name: str = wf("str")


@dataclass
class Goodbye(Message):
    KIND: ClassVar[int] = 0x0002
    NAME: ClassVar[str] = "goodbye"


@dataclass
class OpenModel(Message):
    KIND: ClassVar[int] = 0x0010
    NAME: ClassVar[str] = "open_model"
    path: str = wf("str")


@dataclass
class OpenModelFd(Message):
    KIND: ClassVar[int] = 0x0011
    NAME: ClassVar[str] = "open_model_fd"
    FDS: ClassVar[str] = "one"
    name: str = wf("str")


@dataclass
class OpenModelOn(Message):
    """``open_model`` on a named device (needs ``DEVICES``); the model id carries the
    device's index in its top 16 bits."""

    KIND: ClassVar[int] = 0x0016
    NAME: ClassVar[str] = "open_model_on"
    path: str = wf("str")
    device: DeviceSel = wf(DeviceSel)


@dataclass
class OpenModelFdOn(Message):
    """``open_model_fd`` on a named device (needs ``DEVICES``)."""

    KIND: ClassVar[int] = 0x0017
    NAME: ClassVar[str] = "open_model_fd_on"
    FDS: ClassVar[str] = "one"
    name: str = wf("str")
    device: DeviceSel = wf(DeviceSel)


@dataclass
class CloseModel(Message):
    KIND: ClassVar[int] = 0x0012
    NAME: ClassVar[str] = "close_model"
    model: int = wf("u64")


@dataclass
class SetResidency(Message):
    KIND: ClassVar[int] = 0x0013
    NAME: ClassVar[str] = "set_residency"
    model: int = wf("u64")
    component: Optional[str] = wf(("option", "str"))
    policy: Policy = wf(Policy)


@dataclass
class Offload(Message):
    """Take a whole model (``component`` None: its reservation too) or one component off the
    device; acts on the model every client shares."""

    KIND: ClassVar[int] = 0x0014
    NAME: ClassVar[str] = "offload"
    model: int = wf("u64")
    component: Optional[str] = wf(("option", "str"))


@dataclass
class Onload(Message):
    """Bring a model (or one component) back ahead of use."""

    KIND: ClassVar[int] = 0x0015
    NAME: ClassVar[str] = "onload"
    model: int = wf("u64")
    component: Optional[str] = wf(("option", "str"))


@dataclass
class Acquire(Message):
    KIND: ClassVar[int] = 0x0020
    NAME: ClassVar[str] = "acquire"
    model: int = wf("u64")
    component: str = wf("str")
    layer: int = wf("u32")


@dataclass
class WaitReady(Message):
    KIND: ClassVar[int] = 0x0021
    NAME: ClassVar[str] = "wait_ready"
    lease: int = wf("u64")


@dataclass
class Release(Message):
    KIND: ClassVar[int] = 0x0022
    NAME: ClassVar[str] = "release"
    model: int = wf("u64")
    lease: int = wf("u64")


@dataclass
class Prefetch(Message):
    KIND: ClassVar[int] = 0x0023
    NAME: ClassVar[str] = "prefetch"
    model: int = wf("u64")
    component: str = wf("str")
    layer: int = wf("u32")


@dataclass
class AcquireEvent(Message):
    """``acquire`` answered with :class:`LeasedEvent`: the lease and an interprocess event the
    reading stream can wait on instead of sending ``wait_ready`` (needs ``CUDA_EVENTS``)."""

    KIND: ClassVar[int] = 0x0024
    NAME: ClassVar[str] = "acquire_event"
    model: int = wf("u64")
    component: str = wf("str")
    layer: int = wf("u32")


@dataclass
class ApplyLora(Message):
    KIND: ClassVar[int] = 0x0030
    NAME: ClassVar[str] = "apply_lora"
    FDS: ClassVar[str] = "some"
    model: int = wf("u64")
    stack: List[LoraRef] = wf(("list", LoraRef))
    mode: LoraMode = wf(LoraMode)


@dataclass
class RemoveLora(Message):
    KIND: ClassVar[int] = 0x0031
    NAME: ClassVar[str] = "remove_lora"
    view: int = wf("u64")


@dataclass
class Stats(Message):
    KIND: ClassVar[int] = 0x0040
    NAME: ClassVar[str] = "stats"


@dataclass
class ListModels(Message):
    KIND: ClassVar[int] = 0x0041
    NAME: ClassVar[str] = "list_models"


@dataclass
class ListClients(Message):
    KIND: ClassVar[int] = 0x0042
    NAME: ClassVar[str] = "list_clients"


@dataclass
class ListDevices(Message):
    """Needs ``DEVICES``; answered with :class:`Devices`."""

    KIND: ClassVar[int] = 0x0043
    NAME: ClassVar[str] = "list_devices"


@dataclass
class MapArena(Message):
    KIND: ClassVar[int] = 0x0050
    NAME: ClassVar[str] = "map_arena"


@dataclass
class MapArenaOn(Message):
    """``map_arena`` for a named device's arena (needs ``HOST_ARENA`` and ``DEVICES``): a
    tensor's ``arena_offset`` is relative to the arena of the device its model is on."""

    KIND: ClassVar[int] = 0x0051
    NAME: ClassVar[str] = "map_arena_on"
    device: DeviceSel = wf(DeviceSel)


# replies


@dataclass
class Ack(Message):
    KIND: ClassVar[int] = 0x8000
    NAME: ClassVar[str] = "ack"


@dataclass
class Welcome(Message):
    KIND: ClassVar[int] = 0x8001
    NAME: ClassVar[str] = "welcome"
    version: int = wf("u16")
    features: int = wf("u64")
    client_id: int = wf("u64")
    server_version: str = wf("str")
    max_body_len: int = wf("u32")
    max_fds: int = wf("u32")
    device: DeviceSummary = wf(DeviceSummary)


@dataclass
class ModelOpened(Message):
    KIND: ClassVar[int] = 0x8010
    NAME: ClassVar[str] = "model_opened"
    model: int = wf("u64")
    components: List[ComponentSummary] = wf(("list", ComponentSummary))

    @property
    def device(self) -> int:
        """The index of the device the model is on (the top 16 bits of its id)."""
        return device_of(self.model)

    def component(self, name: str) -> ComponentSummary:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass
class Offloaded(Message):
    KIND: ClassVar[int] = 0x8014
    NAME: ClassVar[str] = "offloaded"
    bytes: int = wf("u64")


@dataclass
class Leased(Message):
    KIND: ClassVar[int] = 0x8020
    NAME: ClassVar[str] = "leased"
    lease: int = wf("u64")
    layer: str = wf("str")
    ready: bool = wf("bool")
    tensors: List[TensorDesc] = wf(("list", TensorDesc))


@dataclass
class Ready(Message):
    KIND: ClassVar[int] = 0x8021
    NAME: ClassVar[str] = "ready"
    lease: int = wf("u64")


@dataclass
class LeasedEvent(Message):
    """Answer to ``acquire_event``: ``leased`` (the fields of a ``leased`` reply, nested) and
    ``ready_event``, a 64-byte CUDA interprocess event handle recorded on ferryd's copy stream
    after the layer's copies, or empty when ``leased.ready`` is set. ferryd re-records a fixed
    ring of such events and never destroys them while it runs, so a client may keep the events
    it opened by handle bytes (:meth:`ferry.cuda.ImportedArena.stream_wait` does)."""

    KIND: ClassVar[int] = 0x8024
    NAME: ClassVar[str] = "leased_event"
    leased: Leased = wf(Leased)
    ready_event: bytes = wf("bytes")


@dataclass
class ViewCreated(Message):
    KIND: ClassVar[int] = 0x8030
    NAME: ClassVar[str] = "view_created"
    view: int = wf("u64")
    merged: int = wf("u64")
    loras: List[LoraReport] = wf(("list", LoraReport))


@dataclass
class StatsReply(Message):
    KIND: ClassVar[int] = 0x8040
    NAME: ClassVar[str] = "stats_reply"
    acquires: int = wf("u64")
    hits: int = wf("u64")
    misses: int = wf("u64")
    loads: int = wf("u64")
    evictions: int = wf("u64")
    bytes_streamed: int = wf("u64")
    stall_ns: int = wf("u64")
    device_bytes: int = wf("u64")
    peak_device_bytes: int = wf("u64")
    budget: int = wf("u64")
    lora_cache_bytes: int = wf("u64")


@dataclass
class Models(Message):
    KIND: ClassVar[int] = 0x8041
    NAME: ClassVar[str] = "models"
    models: List[ModelInfo] = wf(("list", ModelInfo))


@dataclass
class Clients(Message):
    KIND: ClassVar[int] = 0x8042
    NAME: ClassVar[str] = "clients"
    clients: List[ClientInfo] = wf(("list", ClientInfo))


@dataclass
class DeviceEntry:
    """One device of ferryd. A device that failed to open has ``error`` set and no ``stats``;
    requests naming it get :class:`ferry.errors.DeviceUnavailable`."""

    index: int = wf("u32")  # the top 16 bits of the ids of models on it
    label: str = wf("str")  # backend and ordinal: ``cuda:0``, ``host:1``
    uuid: str = wf("str")  # empty if the device could not be identified
    name: str = wf("str")  # product name (empty for a failed device)
    total_memory: int = wf("u64")
    numa_node: Optional[int] = wf(("option", "u32"))
    error: Optional[str] = wf(("option", "str"))
    stats: Optional[StatsReply] = wf(("option", StatsReply))  # ``budget`` is its arena
    models: int = wf("u32")  # models and views open on it
    waiting: int = wf("u32", default=0)  # acquires waiting for its memory right now


@dataclass
class Devices(Message):
    KIND: ClassVar[int] = 0x8043
    NAME: ClassVar[str] = "devices"
    devices: List[DeviceEntry] = wf(("list", DeviceEntry))


@dataclass
class ArenaFd(Message):
    KIND: ClassVar[int] = 0x8050
    NAME: ClassVar[str] = "arena_fd"
    FDS: ClassVar[str] = "one"
    len: int = wf("u64")
    backend: str = wf("str")


class CudaHandle(WireEnum):
    """How a CUDA arena is shared. Variant indices: ``PosixFd`` 0, ``Ipc`` 1."""


@dataclass
class CudaPosixFd(CudaHandle):
    """A VMM allocation exported as a POSIX descriptor, which travels with the frame; reserve
    and map ``alloc_len`` bytes (the Rust variant ``PosixFd``)."""

    VARIANT: ClassVar[str] = "PosixFd"
    alloc_len: int = wf("u64")


@dataclass
class CudaIpc(CudaHandle):
    """A legacy IPC memory handle (64 bytes; no descriptor) (the Rust variant ``Ipc``)."""

    VARIANT: ClassVar[str] = "Ipc"
    handle: List[int] = wf(("list", "u8"))


CudaHandle.VARIANTS = (CudaPosixFd, CudaIpc)


@dataclass
class CudaArena(Message):
    """Answer to ``map_arena``/``map_arena_on`` on a CUDA device (needs ``CUDA_IPC``):
    ``Client.map_arena`` maps it with :meth:`ferry.cuda.ImportedArena.import_`."""

    KIND: ClassVar[int] = 0x8051
    NAME: ClassVar[str] = "cuda_arena"
    FDS: ClassVar[str] = "at_most_one"
    len: int = wf("u64")
    device_uuid: str = wf("str")
    handle: CudaHandle = wf(CudaHandle)

    @property
    def fds_expected(self) -> int:
        """One descriptor with a ``PosixFd`` handle, none with ``Ipc``."""
        return 1 if isinstance(self.handle, CudaPosixFd) else 0


@dataclass
class Error(Message):
    KIND: ClassVar[int] = 0xFFFF
    NAME: ClassVar[str] = "error"
    code: int = wf("u32")
    message: str = wf("str")


ALL: List[Type[Message]] = [
    Hello, Goodbye, OpenModel, OpenModelFd, CloseModel, SetResidency, Offload, Onload,
    OpenModelOn, OpenModelFdOn, Acquire, WaitReady, Release, Prefetch, AcquireEvent, ApplyLora,
    RemoveLora, Stats, ListModels, ListClients, ListDevices, MapArena, MapArenaOn, Ack, Welcome,
    ModelOpened, Offloaded, Leased, Ready, LeasedEvent, ViewCreated, StatsReply, Models,
    Clients, Devices, ArenaFd, CudaArena, Error,
]
BY_KIND: Dict[int, Type[Message]] = {m.KIND: m for m in ALL}
BY_NAME: Dict[str, Type[Message]] = {m.NAME: m for m in ALL}


def is_request(kind: int) -> bool:
    return kind < 0x8000
