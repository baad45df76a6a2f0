"""The wire format of every ZeroMQ hop: msgpack maps carrying a schema version; numpy arrays travel as
raw little-endian bytes (msgpack ext type 1: dtype, shape, data), never as lists of Python numbers.

`decode` never raises anything but WireError on bad bytes, so a service can answer a malformed message
with an error instead of crashing.
"""
from __future__ import annotations

import math
import struct

import msgpack
import numpy as np

SCHEMA_VERSION = 1
_ARRAY_EXT = 1


class WireError(ValueError):
    """A message that cannot be decoded or lacks what its type needs."""


def _default(obj):
    if isinstance(obj, np.ndarray):
        arr = np.asarray(obj, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        arr = arr.astype(dtype, copy=False)
        dt = dtype.str.encode()
        head = struct.pack("<B", len(dt)) + dt + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}q", *arr.shape)
        return msgpack.ExtType(_ARRAY_EXT, head + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} on the wire")


_DTYPES: dict[bytes, np.dtype] = {}
_SHAPES = {d: struct.Struct(f"<{d}q") for d in range(8)}


def _dtype(raw: bytes) -> np.dtype:
    dtype = _DTYPES.get(raw)
    if dtype is None:
        dtype = np.dtype(raw.decode())
        if dtype.hasobject:
            raise WireError(f"dtype {raw!r}: object arrays are not allowed on the wire")
        if len(_DTYPES) < 64:  # cache the few dtypes peers use; never grow without bound
            _DTYPES[raw] = dtype
    return dtype


def _ext_hook(code: int, data: bytes):
    # hot path of every hub message (4 arrays per trajectory): keep it to table lookups and one frombuffer
    if code != _ARRAY_EXT:
        raise WireError(f"unknown msgpack ext type {code}")
    try:
        n = data[0]
        dtype = _dtype(bytes(data[1:1 + n]))
        ndim = data[1 + n]
        off = 2 + n
        shape = _SHAPES[ndim].unpack_from(data, off)
        off += 8 * ndim
        count = math.prod(shape)  # (np.prod costs ~8 us a call)
        if len(data) - off != count * dtype.itemsize:
            raise WireError("array payload length does not match its dtype and shape")
        return np.frombuffer(data, dtype=dtype, count=count, offset=off).reshape(shape)
    except WireError:
        raise
    except Exception as exc:  # any malformed header
        raise WireError(f"malformed array: {exc}") from None


def encode(msg: dict) -> bytes:
    """Encode a message map, stamping the schema version."""
    return msgpack.packb({**msg, "schema": SCHEMA_VERSION}, default=_default, use_bin_type=True)


def decode(data: bytes) -> dict:
    """Decode bytes into a message map; raises WireError on anything malformed or of another schema."""
    try:
        msg = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"not a msgpack message: {exc}") from None
    if not isinstance(msg, dict):
        raise WireError(f"message must be a map, got {type(msg).__name__}")
    if msg.get("schema") != SCHEMA_VERSION:
        raise WireError(f"schema={msg.get('schema')!r}: this peer speaks schema {SCHEMA_VERSION}; "
                        f"upgrade the older side")
    return msg
