"""ferry: a pure-Python client of ferryd's Unix-socket protocol (docs/protocol.md).

>>> from ferry import Client
>>> with Client("/run/ferry/ferryd.sock") as c:
...     model = c.open_model("/srv/models/m.safetensors")
...     comp = model.components[0]
...     with c.acquire(model.model, comp.name, 0) as lease:
...         raw = lease.view(lease.tensors[0])  # memoryview into the mapped arena

On a CUDA ferryd, ``Client(..., cuda=True)`` maps the GPU arena into this process
(:mod:`ferry.cuda`) and ``lease.device_ptr(t)`` gives a tensor's device address.
"""

from . import cuda, errors, messages, wire
from .client import POLICY_NAMES, Arena, Client, Lease, make_policy
from .cuda import ImportedArena
from .errors import (
    BadCudaArena, BadCudaEvent, Busy, ConnectionLost, CudaError, CudaUnavailable, DeviceUnavailable,
    FerryError, MemoryKindError, NotFound, NotPermitted, ProtocolError, RequestError,
    ServerError, ShuttingDown, Timeout, UnknownComponent, UnknownDevice, UnknownLayer,
    UnknownLease, UnknownModel, Unsupported,
)
from .messages import DeviceEntry, DeviceSel, ModelInfo, ModelOpened, TensorDesc

__version__ = "0.1.0"

__all__ = [
    "POLICY_NAMES", "Arena", "BadCudaArena", "BadCudaEvent", "Busy", "Client", "ConnectionLost",
    "CudaError", "CudaUnavailable", "DeviceEntry", "DeviceSel", "DeviceUnavailable",
    "FerryError", "ImportedArena", "Lease", "MemoryKindError", "ModelInfo", "ModelOpened",
    "NotFound", "NotPermitted", "ProtocolError", "RequestError", "ServerError", "ShuttingDown",
    "TensorDesc", "Timeout", "UnknownComponent", "UnknownDevice", "UnknownLayer",
    "UnknownLease", "UnknownModel", "Unsupported", "cuda", "errors", "make_policy", "messages",
    "wire", "__version__",
]
