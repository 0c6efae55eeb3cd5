"""Helpers shared by the tests: the repository root and the package on sys.path."""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(HERE)
if PACKAGE_ROOT not in sys.path:
    sys.path.insert(0, PACKAGE_ROOT)


def repo_root() -> str:
    """$FERRY_REPO, else the first directory above this file holding the golden vectors."""
    env = os.environ.get("FERRY_REPO")
    if env:
        return env
    d = HERE
    while True:
        if os.path.isfile(os.path.join(d, "tests", "fixtures", "protocol", "index.json")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            raise RuntimeError("cannot find the ferry repository: set FERRY_REPO")
        d = parent


def expected_tensors(path: str) -> dict:
    """The bytes the Rust side wrote for each tensor ({"tensors": {name: hex}} at ``path``)."""
    with open(path, encoding="utf-8") as f:
        return {k: bytes.fromhex(v) for k, v in json.load(f)["tensors"].items()}


def find_expected(expected: dict, component: str, name: str) -> str:
    """The file's tensor a leased tensor is (lease names are within the component)."""
    for candidate in (name, f"{component}.{name}"):
        if candidate in expected:
            return candidate
    hits = [k for k in expected if k.endswith("." + name)]
    if len(hits) != 1:
        raise AssertionError(f"tensor {name!r} of {component!r} matches {hits}")
    return hits[0]


def recv_all(conn, n: int) -> bytes:
    """Exactly ``n`` bytes from a socket (EOFError if it closes first)."""
    buf = b""
    while len(buf) < n:
        got = conn.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return buf


def fake_listener(test):
    """A listening Unix socket in a fresh folder for a fake server, both removed when ``test``
    ends; returns its path and the socket."""
    import shutil
    import socket
    import tempfile

    d = tempfile.mkdtemp(prefix="ferry-fake-")
    test.addCleanup(shutil.rmtree, d)
    path = os.path.join(d, "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    test.addCleanup(listener.close)
    return path, listener


def frame(msg, request_id: int) -> bytes:
    """A whole frame (header and body) of ``msg``, for fake servers."""
    from ferry import wire  # the package is on sys.path (above)

    body = wire.encode(msg)
    return wire.pack_header(msg.KIND, request_id, len(body)) + body


# ---- a minimal safetensors writer (an independent writer for ferry's reader) ----------------

_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def write_safetensors(path, tensors):
    """Writes ``[(name, dtype, shape, data bytes)]`` as a safetensors file: the header padded
    with spaces to 8 bytes, tensors packed without gaps, widest dtype first so that every
    tensor's absolute offset is aligned to its dtype (as the ``safetensors`` package does)."""
    import json
    import struct

    order = sorted(tensors, key=lambda t: -_ITEMSIZE[t[1]])  # stable: keeps the given order
    header = {}
    offset = 0
    for name, dtype, shape, data in order:
        n = 1
        for d in shape:
            n *= d
        if n * _ITEMSIZE[dtype] != len(data):
            raise ValueError(f"{name}: {len(data)} bytes for {dtype} {list(shape)}")
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, _, data in order:
            f.write(data)
