"""The wire format of every ZeroMQ hop: msgpack maps carrying a schema version; numpy arrays travel as
raw little-endian bytes (msgpack ext type 1: dtype, shape, data), never as lists of Python numbers.

`decode` never raises anything but WireError on bad bytes, so a service can answer a malformed message
with an error instead of crashing.

Hot path of the hub: `decode(data, packed=("groups",))` leaves those top-level values as `Packed`
(their exact msgpack bytes, cut out without decoding them: a read-only view into `data`, not a copy), and
`encode` splices `Packed` values back verbatim, so a group travels generator -> hub -> learner without its
arrays being decoded or re-encoded.
"""
from __future__ import annotations

import math
import struct
import threading
from collections.abc import Mapping

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
    if isinstance(obj, Packed):  # nested deeper than encode splices: decoded and encoded again
        return obj.value
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


def array_header(dtype) -> bytes:
    """The first bytes of a 1-D array's ext payload (dtype string and ndim), before its 8-byte length."""
    dt = np.dtype(dtype).str.encode()
    return struct.pack("<B", len(dt)) + dt + b"\x01"


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


class Packed(Mapping):
    """A value kept in its wire form: `data` is its msgpack bytes (no schema stamp; from `decode`, a read-only
    memoryview into the message, which it keeps alive: `bytes(data)` to keep it apart). `encode` splices it
    verbatim where it stands as a top-level value or an item of a top-level list; reading it like a map
    decodes it once (arrays as numpy), so in-process callers see what a remote peer would."""
    __slots__ = ("data", "_value")

    def __init__(self, data: bytes):
        self.data = data
        self._value = None

    @property
    def value(self):
        if self._value is None:
            self._value = decode_value(self.data)
        return self._value

    def _map(self) -> dict:
        if not isinstance(self.value, dict):
            raise TypeError(f"packed value is a {type(self.value).__name__}, not a map")
        return self.value

    def __getitem__(self, key):
        return self._map()[key]

    def __iter__(self):
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())

    def __repr__(self) -> str:
        return f"Packed({len(self.data)} bytes)"


_local = threading.local()


def _packer() -> msgpack.Packer:
    """One Packer per thread (msgpack.packb builds one, with a 1 MiB buffer, on every call)."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(default=_default, use_bin_type=True)
    return packer


def pack_value(value) -> bytes:
    """msgpack bytes of one value (arrays as ext type 1, no schema stamp): what `Packed.data` holds."""
    return _packer().pack(value)


def decode_value(data: bytes):
    """The inverse of `pack_value`; raises WireError on bad bytes."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"not a msgpack value: {exc}") from None


def peek_value(data: bytes):
    """Decode `data` leaving every ext value as `slice(ext_code, ext_bytes)`, unchecked (a C-level hook:
    no Python call per array); the caller checks the ones it uses. Raises WireError on bad bytes."""
    try:
        return msgpack.unpackb(data, ext_hook=slice, raw=False, strict_map_key=False)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"not a msgpack value: {exc}") from None


def encode(msg: dict) -> bytes:
    """Encode a message map, stamping the schema version; Packed values are spliced in as they are."""
    msg = {**msg, "schema": SCHEMA_VERSION}
    packer = _packer()
    for value in msg.values():  # splice when a value is Packed or a list that starts with one
        if type(value) is Packed or (type(value) is list and value and type(value[0]) is Packed):
            break
    else:
        return packer.pack(msg)  # (a Packed elsewhere is decoded and encoded again by _default)
    parts = [packer.pack_map_header(len(msg))]
    for key, value in msg.items():
        parts.append(packer.pack(key))
        if type(value) is Packed:
            parts.append(value.data)
        elif type(value) is list and value and type(value[0]) is Packed:
            parts.append(packer.pack_array_header(len(value)))
            parts.extend(x.data if type(x) is Packed else packer.pack(x) for x in value)
        else:
            parts.append(packer.pack(value))
    return b"".join(parts)


_ARRAY_MARKERS = frozenset(range(0x90, 0xa0)) | {0xdc, 0xdd}


_UNPACKER_BUFFER = 1 << 20  # one per thread, reused: a fresh buffer per message costs page faults on the hot path


def _unpacker(size: int) -> msgpack.Unpacker:
    """The thread's reused Unpacker for a message of `size` bytes, or a new one for a message larger than its
    buffer. Its limits (lengths of strings, arrays, maps) are its buffer size, as unpackb's are the data's."""
    if size > _UNPACKER_BUFFER:
        return msgpack.Unpacker(None, ext_hook=_ext_hook, raw=False, strict_map_key=False, max_buffer_size=size)
    up = getattr(_local, "unpacker", None)
    if up is None:
        up = _local.unpacker = msgpack.Unpacker(None, ext_hook=_ext_hook, raw=False, strict_map_key=False,
                                                max_buffer_size=_UNPACKER_BUFFER, read_size=64 << 10)
    return up


def _unpack_packed(data: bytes, packed: tuple) -> dict:
    """Walk the top-level map; values under `packed` keys are cut out as Packed (a list: each item).
    The thread's Unpacker is reused (its buffer stays allocated); it is dropped after a message it could not
    consume whole."""
    up = _unpacker(len(data))
    base = up.tell()  # (tell() counts from the Unpacker's creation)
    view = memoryview(data)  # Packed values are views: the copy of a stored group is made where it is stored
    try:
        up.feed(data)
        msg = {}
        for _ in range(up.read_map_header()):
            key = up.unpack()
            if key in packed:
                start = up.tell() - base
                if start < len(data) and data[start] in _ARRAY_MARKERS:
                    items = []
                    for _ in range(up.read_array_header()):
                        start = up.tell() - base
                        up.skip()
                        items.append(Packed(view[start:up.tell() - base]))
                    msg[key] = items
                else:
                    up.skip()
                    msg[key] = Packed(view[start:up.tell() - base])
            else:
                msg[key] = up.unpack()
        if up.tell() - base != len(data):
            raise ValueError(f"{len(data) - (up.tell() - base)} bytes of extra data after the message")
    except BaseException:
        _local.unpacker = None  # it may hold the rest of this message
        raise
    return msg


def decode(data: bytes, packed: tuple = ()) -> dict:
    """Decode bytes into a message map; raises WireError on anything malformed or of another schema.
    Top-level values under a key in `packed` come back as Packed (a list of them for a list value)."""
    try:
        if packed and data[:1] and (0x80 <= data[0] <= 0x8f or data[0] in (0xde, 0xdf)):  # a map
            msg = _unpack_packed(data, packed)
        else:
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
