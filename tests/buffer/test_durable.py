"""The write-ahead log: records (a PUT's group arrives as a view into its message) are written with the thread's
msgpack Packer, byte for byte what msgpack.packb writes (the reference), and recovery reads every one back."""
from __future__ import annotations

import os

import msgpack

from async_rl import wire
from buffer.durable import DurableLog


def test_records_recover_exactly_and_are_written_as_packb_writes_them(tmp_path):
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
    data = (tmp_path / "wal-000000000001.log").read_bytes()
    reference = msgpack.packb(written[0], default=wire._default, use_bin_type=True)
    assert data[8:8 + len(reference)] == reference  # after the 8-byte length + CRC header
