"""The write-ahead log writes a record's large values (a PUT's group) from where they lie, with writev: what it
writes must be exactly what msgpack.packb writes (the reference), and recovery must read back every record."""
from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer import durable
from buffer.durable import DurableLog

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
# sizes around the splice threshold and the msgpack bin8 / bin16 / bin32 boundaries
BLOB_SIZES = st.sampled_from([0, 1, 255, 256, durable._SPLICE - 1, durable._SPLICE, 65535, 65536, 70000])


@st.composite
def records(draw):
    rec = draw(st.dictionaries(st.text(min_size=1, max_size=10), VALUES, max_size=5))
    for i in range(draw(st.integers(0, 3))):
        size = draw(BLOB_SIZES)
        data = bytes(draw(st.integers(0, 255)) for _ in range(4)) * (size // 4) + b"x" * (size % 4)
        rec[f"blob{i}"] = memoryview(data)[0:] if draw(st.booleans()) else data
    if draw(st.booleans()):
        rec["array"] = np.arange(draw(st.integers(0, 50)), dtype=np.int32)  # through wire's default hook
    return rec


@settings(max_examples=200, deadline=None)
@given(rec=records())
def test_the_pieces_are_byte_identical_to_packb_and_large_values_are_not_copied(rec):
    parts = durable._pack_parts(rec)
    assert b"".join(parts) == durable._pack(rec)
    large = [v for v in rec.values() if isinstance(v, (bytes, memoryview)) and len(v) >= durable._SPLICE]
    assert sum(1 for p in parts if any(p is v for v in large)) == len(large)  # written from where they lie


def test_records_with_spliced_groups_recover_exactly(tmp_path):
    log = DurableLog(tmp_path, "never")
    log.recover()
    payload = os.urandom(100_000)
    written = [{"op": "put", "blob": memoryview(payload)[10:30_010], "stats": {}, "priority": 1.0},
               {"op": "lease", "learner": "L", "keys": [["g", 1]]},
               {"op": "put", "blob": payload[:5000], "stats": {"gen_tokens": 3.0}, "priority": 0.5}]
    for rec in written:
        log.append(rec)
    log.close()
    _, records = DurableLog(tmp_path, "never").recover()
    assert records == [{k: bytes(v) if isinstance(v, memoryview) else v for k, v in r.items()} for r in written]
    assert log.bytes_written == (tmp_path / "wal-000000000001.log").stat().st_size


def test_a_short_write_is_continued_until_every_byte_is_written(tmp_path, monkeypatch):
    """A regular file takes less than all of a writev only when the disk fills or a signal lands, which cannot
    be provoked here, so os.writev is wrapped to take at most 7 bytes a call (the only stand-in in this file);
    the bytes on disk must still be the whole record, in order."""
    real = os.writev
    calls = []

    def short(fd, buffers):
        calls.append(1)
        return real(fd, [bytes(b"".join(bytes(b) for b in buffers)[:7])])
    monkeypatch.setattr(durable.os, "writev", short)
    path = tmp_path / "f"
    blob = os.urandom(durable._SPLICE + 13)
    with open(path, "ab", buffering=0) as f:
        durable._write_all(f.fileno(), [b"head", memoryview(blob), b"tail"])
    assert path.read_bytes() == b"head" + blob + b"tail" and len(calls) == -(-(len(blob) + 8) // 7)
