"""PyTorch integration: NOT DONE YET.

The plan is to attach a model's layers to a ``torch.nn.Module`` so that each forward pass
acquires the layer's lease and reads its weights from the mapped arena. Only this stub exists:

* importing ``ferry.torch`` without PyTorch installed raises :class:`ImportError` saying so;
* with PyTorch installed, :func:`attach` raises :class:`NotImplementedError`.
"""

import importlib

try:
    importlib.import_module("torch")
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ferry.torch needs PyTorch (pip install torch); note that the torch integration of "
        "the ferry client is not implemented yet, only the protocol client (ferry.Client) is"
    ) from e


def attach(*args, **kwargs):
    """Would stream a ``torch.nn.Module``'s weights through ferryd. Not implemented yet."""
    raise NotImplementedError(
        "ferry.torch.attach is not done yet: use ferry.Client, Lease.view() / Lease.array() "
        "and copy the bytes into tensors yourself"
    )
