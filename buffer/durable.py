"""Durability of the hub: a write-ahead log of state-changing records plus periodic snapshots.

Promise: a record is in the log (written to the OS, and fsynced per `fsync` policy) before the reply that
acknowledges it leaves the hub, so killing the hub with SIGKILL at any moment loses nothing it acked.
Restart = newest complete snapshot + every log record after it, in order.

Layout under `DIR` (normally `run_dir/hub/`):
- `wal-{first_lsn:012d}.log`: records, each `u32 length | u32 crc32 | msgpack`; a torn or corrupt tail
  (the record being written when the process died) is detected by length/CRC and cut off on recovery.
- `snapshot-{lsn:012d}/state.msgpack` + `DONE`: DONE is written last, so a snapshot without it is ignored;
  the newest `keep_snapshots` complete snapshots are kept, and log segments older than the newest one.

fsync policies (`buffer.fsync`): `always` fsyncs each record; `batch` fsyncs once per hub loop iteration
before its replies go out (group commit); `never` leaves flushing to the OS (safe against a killed hub,
not against a machine crash).
"""
from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Iterator

import msgpack

from async_rl import wire

_HEAD = struct.Struct("<II")


def _pack(record: dict) -> bytes:
    return msgpack.packb(record, default=wire._default, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, ext_hook=wire._ext_hook, raw=False, strict_map_key=False)


class DurableLog:
    def __init__(self, directory: str | Path, fsync: str = "batch", keep_snapshots: int = 2):
        if fsync not in ("always", "batch", "never"):
            raise ValueError(f"buffer.fsync={fsync!r}: must be one of ['always', 'batch', 'never']")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.keep_snapshots = keep_snapshots
        self.lsn = 0  # number of the last record written
        self._file = None
        self._dirty = False
        self.bytes_written = 0

    # ---- recovery --------------------------------------------------------------------------------
    def recover(self) -> tuple[dict | None, list[dict]]:
        """(newest complete snapshot state or None, records after it); positions the log for appending."""
        snap_lsn, state = self._latest_snapshot()
        records, lsn = [], snap_lsn
        for seg in self._segments():
            for rec_lsn, record in self._read_segment(seg):
                if rec_lsn > lsn:
                    records.append(record)
                    lsn = rec_lsn
        self.lsn = lsn
        self._open_segment()
        return state, records

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("wal-*.log"))

    def _read_segment(self, path: Path) -> Iterator[tuple[int, dict]]:
        lsn = int(path.stem.split("-")[1]) - 1
        data = path.read_bytes()
        off = 0
        while off + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, off)
            body = data[off + _HEAD.size: off + _HEAD.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                self._truncate(path, off)  # torn tail: the hub died mid-write, before acking it
                return
            lsn += 1
            off += _HEAD.size + length
            yield lsn, _unpack(body)
        if off != len(data):
            self._truncate(path, off)

    @staticmethod
    def _truncate(path: Path, size: int) -> None:
        with open(path, "r+b") as f:
            f.truncate(size)

    def _latest_snapshot(self) -> tuple[int, dict | None]:
        for snap in sorted(self.dir.glob("snapshot-*"), reverse=True):
            if (snap / "DONE").exists():
                return int(snap.name.split("-")[1]), _unpack((snap / "state.msgpack").read_bytes())
        return 0, None

    # ---- appending -------------------------------------------------------------------------------
    def _open_segment(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.dir / f"wal-{self.lsn + 1:012d}.log", "ab", buffering=0)

    def append(self, record: dict) -> int:
        body = wire.pack_value(record)  # (the thread's Packer: packb would build one, 1 MiB buffer, per record)
        self._file.write(_HEAD.pack(len(body), zlib.crc32(body)) + body)  # one write: never half a header
        self.bytes_written += _HEAD.size + len(body)
        self.lsn += 1
        if self.fsync == "always":
            os.fsync(self._file.fileno())
        else:
            self._dirty = True
        return self.lsn

    def commit(self) -> None:
        """Group commit: make every appended record durable before replies that depend on them go out."""
        if self._dirty and self.fsync == "batch":
            os.fsync(self._file.fileno())
        self._dirty = False

    # ---- snapshots -------------------------------------------------------------------------------
    def snapshot(self, state: dict) -> Path:
        """Write `state` (covering records up to self.lsn), then start a new log segment and prune."""
        self.commit()
        final = self.dir / f"snapshot-{self.lsn:012d}"
        tmp = self.dir / f".tmp-snapshot-{self.lsn:012d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "state.msgpack", "wb") as f:
            f.write(_pack(state))
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(final / "DONE", "w") as f:  # written last: its presence means the snapshot is whole
            f.write(str(self.lsn))
            f.flush()
            os.fsync(f.fileno())
        self._open_segment()
        self._prune()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.dir.glob("snapshot-*") if (p / "DONE").exists())
        for old in complete[:-self.keep_snapshots]:
            shutil.rmtree(old, ignore_errors=True)
        oldest_kept = int(complete[-self.keep_snapshots:][0].name.split("-")[1]) if complete else 0
        segments = self._segments()
        for seg, nxt in zip(segments, segments[1:]):
            # a segment is droppable when every record in it is covered by the oldest kept snapshot
            if int(nxt.stem.split("-")[1]) - 1 <= oldest_kept:
                seg.unlink(missing_ok=True)

    def close(self) -> None:
        self.commit()
        if self._file is not None:
            self._file.close()
            self._file = None
