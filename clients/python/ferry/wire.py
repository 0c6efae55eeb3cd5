"""Frames and bodies of ferryd's protocol (docs/protocol.md, sections 3 and 4).

A frame is a 24-byte little-endian header (:data:`HEADER`) and a body encoded with bincode
2.0.1 in its fixed-int, little-endian configuration. The body encoder/decoder here is driven
by schemas: a *wire type* is one of

* a primitive name: ``"u8" "u16" "u32" "u64" "i64" "f32" "f64" "bool" "str" "bytes"``
  (``bytes`` is a ``Vec<u8>``: a u64 length, then the bytes; :class:`bytes` in Python);
* ``("list", T)`` (u64 count, then the elements) or ``("option", T)`` (tag byte 0/1);
* a record: a dataclass whose fields carry ``metadata={"wire": T}`` (fields in order);
* an enum: a subclass of :class:`WireEnum` (u32 variant index, then the variant's fields),
  or an :class:`enum.IntEnum` whose values are the indices (enums of unit variants only).
"""

import dataclasses
import enum
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Tuple

from . import errors

MAGIC = b"FRRY"
HEADER = struct.Struct("<4sHHIIQ")
HEADER_LEN = HEADER.size  # 24
MAX_BODY_LEN = 16 * 1024 * 1024
MAX_FDS = 16
FLAG_FDS = 0x1
PROTOCOL_VERSION = 1

_PRIMS: Dict[str, struct.Struct] = {
    "u8": struct.Struct("<B"),
    "u16": struct.Struct("<H"),
    "u32": struct.Struct("<I"),
    "u64": struct.Struct("<Q"),
    "i64": struct.Struct("<q"),
    "f32": struct.Struct("<f"),
    "f64": struct.Struct("<d"),
}
_U64 = _PRIMS["u64"]
_U32 = _PRIMS["u32"]


def wf(wire_type: Any, **kw: Any) -> Any:
    """A dataclass field with its wire type."""
    return field(metadata={"wire": wire_type}, **kw)


def schema(cls: Any) -> List[Tuple[str, Any]]:
    """The ``(name, wire type)`` list of a record, in wire order."""
    return [(f.name, f.metadata["wire"]) for f in dataclasses.fields(cls)]


class WireEnum:
    """Base of an enum with data. Subclasses list their variants (dataclasses) in
    ``VARIANTS``, in index order. A variant sets ``VARIANT`` (its Rust name) and ``TUPLE``
    (True for a one-value tuple variant like ``Bytes(u64)``, whose single field is ``value``)."""

    VARIANTS: ClassVar[Tuple[type, ...]] = ()
    VARIANT: ClassVar[str] = ""
    TUPLE: ClassVar[bool] = False


# ---- header -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    version: int
    kind: int
    flags: int
    body_len: int
    request_id: int


def pack_header(kind: int, request_id: int, body_len: int, version: int = PROTOCOL_VERSION,
                flags: int = 0) -> bytes:
    if body_len > MAX_BODY_LEN:
        raise errors.FrameTooLarge(f"body of {body_len} bytes is over {MAX_BODY_LEN}")
    return HEADER.pack(MAGIC, version, kind, flags, body_len, request_id)


def unpack_header(data: bytes) -> Header:
    """Decodes and checks a header (the checks of section 3 that need no kind table)."""
    if len(data) != HEADER_LEN:
        raise errors.Truncated(f"header of {len(data)} bytes, expected {HEADER_LEN}")
    magic, version, kind, flags, body_len, request_id = HEADER.unpack(data)
    if magic != MAGIC:
        raise errors.BadMagic(f"frame starts with {magic!r}, not {MAGIC!r}")
    if version == 0:
        raise errors.UnsupportedVersion("frame version 0")
    if flags & ~FLAG_FDS:
        raise errors.ReservedFlags(f"reserved flag bits set: {flags:#x}")
    if body_len > MAX_BODY_LEN:
        raise errors.FrameTooLarge(f"body of {body_len} bytes is over {MAX_BODY_LEN}")
    return Header(version, kind, flags, body_len, request_id)


# ---- encoding ---------------------------------------------------------------------------


def encode_value(t: Any, v: Any, out: bytearray) -> None:
    if isinstance(t, str):
        if t in _PRIMS:
            if t.startswith("f"):
                v = float(v)
            elif isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{t} needs an int, got {v!r}")
            try:
                out += _PRIMS[t].pack(v)
            except struct.error as e:
                raise ValueError(f"{v!r} does not fit {t}") from e
        elif t == "bool":
            if not isinstance(v, bool):
                raise TypeError(f"bool needs a bool, got {v!r}")
            out.append(1 if v else 0)
        elif t == "str":
            b = v.encode("utf-8")
            out += _U64.pack(len(b))
            out += b
        elif t == "bytes":
            if isinstance(v, (int, str)):  # bytes(5) would be five zero bytes
                raise TypeError(f"bytes needs bytes, got {v!r}")
            b = bytes(v)
            out += _U64.pack(len(b))
            out += b
        else:
            raise TypeError(f"unknown wire type {t!r}")
    elif isinstance(t, tuple):
        if t[0] == "list":
            items = list(v)
            out += _U64.pack(len(items))
            for item in items:
                encode_value(t[1], item, out)
        elif t[0] == "option":
            if v is None:
                out.append(0)
            else:
                out.append(1)
                encode_value(t[1], v, out)
        else:
            raise TypeError(f"unknown wire type {t!r}")
    elif isinstance(t, type) and issubclass(t, enum.IntEnum):
        out += _U32.pack(int(t(v)))
    elif isinstance(t, type) and issubclass(t, WireEnum):
        if not isinstance(v, t):
            raise TypeError(f"{t.__name__} needs one of its variants, got {v!r}")
        cls = type(v)
        out += _U32.pack(t.VARIANTS.index(cls))
        encode_fields(cls, v, out)
    elif dataclasses.is_dataclass(t):
        if not isinstance(v, t):
            raise TypeError(f"{t.__name__} needed, got {v!r}")
        encode_fields(t, v, out)
    else:
        raise TypeError(f"unknown wire type {t!r}")


def encode_fields(cls: Any, obj: Any, out: bytearray) -> None:
    for name, t in schema(cls):
        encode_value(t, getattr(obj, name), out)


def encode(obj: Any) -> bytes:
    """The body of a record (a message)."""
    out = bytearray()
    encode_fields(type(obj), obj, out)
    return bytes(out)


# ---- decoding ---------------------------------------------------------------------------


class Reader:
    """A cursor over a body; every length is checked against the bytes left."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n > self.left():
            raise errors.BadBody(f"needs {n} bytes at offset {self.pos}, {self.left()} left")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def prim(self, s: struct.Struct) -> Any:
        return s.unpack(self.take(s.size))[0]


def decode_value(t: Any, r: Reader) -> Any:
    if isinstance(t, str):
        if t in _PRIMS:
            return r.prim(_PRIMS[t])
        if t == "bool":
            b = r.take(1)[0]
            if b > 1:
                raise errors.BadBody(f"bool byte {b} at offset {r.pos - 1}")
            return b == 1
        if t in ("str", "bytes"):
            n = r.prim(_U64)
            raw = bytes(r.take(n))
            if t == "bytes":
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise errors.BadBody(f"invalid UTF-8 in a string: {e}") from None
        raise TypeError(f"unknown wire type {t!r}")
    if isinstance(t, tuple):
        if t[0] == "list":
            n = r.prim(_U64)
            if n > r.left():  # no element type here is 0 bytes
                raise errors.BadBody(f"list of {n} elements with {r.left()} bytes left")
            return [decode_value(t[1], r) for _ in range(n)]
        if t[0] == "option":
            tag = r.take(1)[0]
            if tag == 0:
                return None
            if tag == 1:
                return decode_value(t[1], r)
            raise errors.BadBody(f"option tag {tag} at offset {r.pos - 1}")
        raise TypeError(f"unknown wire type {t!r}")
    if isinstance(t, type) and issubclass(t, enum.IntEnum):
        idx = r.prim(_U32)
        try:
            return t(idx)
        except ValueError:
            raise errors.BadBody(f"{t.__name__} has no variant {idx}") from None
    if isinstance(t, type) and issubclass(t, WireEnum):
        idx = r.prim(_U32)
        if idx >= len(t.VARIANTS):
            raise errors.BadBody(f"{t.__name__} has no variant {idx}")
        return decode_fields(t.VARIANTS[idx], r)
    if dataclasses.is_dataclass(t):
        return decode_fields(t, r)
    raise TypeError(f"unknown wire type {t!r}")


def decode_fields(cls: Any, r: Reader) -> Any:
    return cls(**{name: decode_value(t, r) for name, t in schema(cls)})


def decode(cls: Any, body: bytes) -> Any:
    """Decodes a whole body as ``cls``; bytes left over are ``trailing_bytes``."""
    r = Reader(body)
    obj = decode_fields(cls, r)
    if r.left():
        raise errors.TrailingBytes(f"{r.left()} bytes left after {cls.__name__}")
    return obj


# ---- serde's JSON form (index.json of the golden vectors) -----------------------------


def to_json(t: Any, v: Any) -> Any:
    """``v`` as serde_json would write it (records as objects, enums as ``"Unit"`` or
    ``{"Variant": value}``, options as ``null`` or the value)."""
    if isinstance(t, str):
        if t == "bytes":
            return list(v)  # serde_json writes a Vec<u8> as an array of numbers
        return v
    if isinstance(t, tuple):
        if t[0] == "list":
            return [to_json(t[1], x) for x in v]
        return None if v is None else to_json(t[1], v)
    if isinstance(t, type) and issubclass(t, enum.IntEnum):
        return t(v).name
    if isinstance(t, type) and issubclass(t, WireEnum):
        cls = type(v)
        fields = schema(cls)
        if not fields:
            return cls.VARIANT
        if cls.TUPLE:
            return {cls.VARIANT: to_json(fields[0][1], v.value)}
        return {cls.VARIANT: {n: to_json(ft, getattr(v, n)) for n, ft in fields}}
    return {n: to_json(ft, getattr(v, n)) for n, ft in schema(t)}


def from_json(t: Any, j: Any) -> Any:
    """The inverse of :func:`to_json`."""
    if isinstance(t, str):
        if t in ("f32", "f64"):
            return float(j)
        if t == "bytes":
            return bytes(j)
        return j
    if isinstance(t, tuple):
        if t[0] == "list":
            return [from_json(t[1], x) for x in j]
        return None if j is None else from_json(t[1], j)
    if isinstance(t, type) and issubclass(t, enum.IntEnum):
        return t[j]
    if isinstance(t, type) and issubclass(t, WireEnum):
        name, payload = (j, None) if isinstance(j, str) else next(iter(j.items()))
        for cls in t.VARIANTS:
            if cls.VARIANT == name:
                fields = schema(cls)
                if not fields:
                    return cls()
                if cls.TUPLE:
                    return cls(from_json(fields[0][1], payload))
                return cls(**{n: from_json(ft, payload[n]) for n, ft in fields})
        raise ValueError(f"{t.__name__} has no variant {name!r}")
    return t(**{n: from_json(ft, j[n]) for n, ft in schema(t)})
