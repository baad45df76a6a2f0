"""Pulling published weights from a run's weight server (async_rl/weight_server.py) into a local store, on a
host that does not share the run's filesystem. Shared by generators (actors/) and the attach command.

`WeightPuller(endpoint, dest, keys).pull(version)` -> `dest/v{version}`, a complete HF checkpoint dir.

Invariants:
- A version appears in `dest` only whole: chunks go into `dest/.v{N}.partial/`, every chunk is checked
  against the manifest's checksum before it is written, and the dir is renamed into place once every chunk is,
  with the manifest beside its files (`.manifest.json`). Nothing is fsynced on the way (the page cache is the
  fast path); instead a version this process did not pull itself (found after a restart, maybe torn by a
  machine crash) is checked against its manifest before it is trusted, and pulled again if it does not match.
- Resumable: each written chunk is journaled (`dest/.v{N}.journal`); a pull cut off (connection dropped,
  server restarted, this process killed) continues from the journal, re-requesting only what is missing
  (journaled chunks are re-checked against the manifest, so a torn write is fetched again).
- No reply within `resend_after` seconds: a fresh socket, and every outstanding chunk asked again; replies
  are matched by request id, so a late duplicate is ignored.
- Pulls of one version by several processes on a host (one per attached generator) take turns on a file
  lock, so the bytes cross the network once.
- Chunks come over `streams` connections at once, each with its own ZeroMQ I/O thread here (and one on the
  server, which gives every connection the least loaded of its `io_threads`), at most `window` requested
  per connection; the I/O threads receive (and with CURVE decrypt) the next ones while this thread checks
  and writes the last. With CURVE the en/decryption, not the link, is what limits one connection
  (docs/BENCHMARKS.md, "Weights between hosts"); several spread it over cores.
"""
from __future__ import annotations

import collections
import fcntl
import itertools
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import zmq

from async_rl import protocol, wire
from async_rl.weight_server import DIGESTS

STREAMS = 2  # connections a pull uses at once (see the module docstring)


class WeightPullError(RuntimeError):
    """The server refused (e.g. the version is gone) or kept sending bytes that do not match the manifest."""


class WeightPuller:
    def __init__(self, endpoint: str, dest: str | Path, keys: str | Path | None = None, window: int = 4,
                 resend_after: float = 5.0, keep: int = 3, streams: int = STREAMS):
        if window < 1 or keep < 1 or streams < 1:
            raise ValueError(f"window={window}, keep={keep}, streams={streams}: each must be >= 1")
        self.endpoint, self.dest, self.keys = endpoint, Path(dest), keys
        self.window, self.resend_after, self.keep, self.streams = window, resend_after, keep, streams
        self._ctx = zmq.Context(io_threads=streams)  # its own: one I/O thread per connection
        self.dest.mkdir(parents=True, exist_ok=True)
        self._rids = itertools.count()
        self._trusted: set[int] = set()  # versions pulled, or checked, by this process
        self.stats = {"chunks": 0, "bytes": 0, "reconnects": 0, "bad_chunks": 0, "resumed_chunks": 0,
                      "max_frame": 0, "seconds": 0.0}

    # ---- the socket ------------------------------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"pull-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode())
        sock.setsockopt(zmq.RCVHWM, 4 * self.window)
        if self.keys:
            from async_rl.keys import secure_client
            secure_client(sock, self.keys)
        sock.connect(self.endpoint)
        return sock

    def _ask(self, req: protocol.Request, timeout: float) -> dict:
        """One small request, resent on a fresh socket until answered or `timeout`."""
        msg = req.to_msg()
        deadline = time.monotonic() + timeout
        rid = f"{os.getpid()}-{next(self._rids)}"
        while time.monotonic() < deadline:
            sock = self._socket()
            try:
                sock.send(wire.encode({**msg, "rid": rid}))
                if sock.poll(int(1000 * min(self.resend_after, max(0.1, deadline - time.monotonic())))):
                    frames = sock.recv_multipart()
                    reply = wire.decode(frames[0])
                    if reply.get("rid") == rid:
                        if reply.get("type") == "ERROR":
                            raise WeightPullError(f"weight server {self.endpoint}: {reply.get('error')}")
                        return reply
            finally:
                sock.close()
            self.stats["reconnects"] += 1
        raise TimeoutError(f"{msg['type']}: no answer from the weight server {self.endpoint} in {timeout:.0f}s")

    def latest(self, timeout: float = 60.0) -> int:
        return int(self._ask(protocol.Versions(), timeout)["latest"])

    # ---- a pull ----------------------------------------------------------------------------------
    def pull(self, version: int, timeout: float = 600.0) -> Path:
        """`dest/v{version}`, pulled unless already here; raises WeightPullError / TimeoutError."""
        final = self.dest / f"v{version}"
        if version in self._trusted and final.is_dir():
            return final
        with open(self.dest / f".v{version}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another generator of this host may be pulling it now
            if final.is_dir() and not self._intact(final):
                shutil.rmtree(final)
            if not final.is_dir():
                t0 = time.monotonic()
                self._pull(version, final, time.monotonic() + timeout)
                self.stats["seconds"] = time.monotonic() - t0
                self.prune(version)
        self._trusted.add(version)
        return final

    @staticmethod
    def _intact(path: Path) -> bool:
        """Does the version dir at `path` match the manifest it was pulled with?"""
        try:
            manifest = json.loads((path / ".manifest.json").read_text())
            step, digest = manifest["chunk_bytes"], DIGESTS[manifest["checksum"]]
            for f in manifest["files"]:
                with open(path / f["name"], "rb") as fh:
                    if any(digest(fh.read(step)) != h for h in f["digests"]) or fh.read(1):
                        return False
            return True
        except (OSError, ValueError, KeyError):
            return False

    def _pull(self, version: int, final: Path, deadline: float) -> None:
        manifest = self._ask(protocol.Manifest(version=version), max(1.0, deadline - time.monotonic()))
        partial, journal = self.dest / f".v{version}.partial", self.dest / f".v{version}.journal"
        entries = {f["name"]: f for f in manifest["files"]}
        if manifest.get("checksum") not in DIGESTS:
            raise WeightPullError(f"weight server {self.endpoint}: checksum {manifest.get('checksum')!r} is unknown "
                                  f"here (have {sorted(DIGESTS)}); pip install xxhash")
        self._digest = DIGESTS[manifest["checksum"]]
        fds = {}
        try:
            for name, f in entries.items():
                path = partial / name
                path.parent.mkdir(parents=True, exist_ok=True)
                fds[name] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                os.ftruncate(fds[name], f["size"])
            done = self._resume(journal, entries, fds, manifest["chunk_bytes"])
            todo = collections.deque((n, i) for n, f in entries.items() for i in range(len(f["digests"]))
                                     if (n, i) not in done)
            with open(journal, "a") as log:
                self._fetch(version, todo, entries, fds, log, deadline)
        finally:
            for fd in fds.values():
                os.close(fd)
        (partial / ".manifest.json").write_text(json.dumps(manifest))
        os.replace(partial, final)
        journal.unlink(missing_ok=True)

    def _resume(self, journal: Path, entries: dict, fds: dict, chunk_bytes: int) -> set:
        """Chunks an earlier, cut-off pull already wrote and that still match the manifest."""
        done = set()
        if not journal.exists():
            return done
        for line in journal.read_text().splitlines():
            name, _, index = line.rpartition("\t")
            if name in entries and index.isdigit() and int(index) < len(entries[name]["digests"]):
                data = os.pread(fds[name], chunk_bytes, int(index) * chunk_bytes)
                if self._digest(data) == entries[name]["digests"][int(index)]:
                    done.add((name, int(index)))
        self.stats["resumed_chunks"] += len(done)
        return done

    def _fetch(self, version: int, todo: collections.deque, entries: dict, fds: dict, log, deadline: float) -> None:
        socks = [self._socket() for _ in range(self.streams)]
        outstanding: list[dict] = [{} for _ in socks]  # per connection: rid -> (name, index)
        retries = collections.Counter()
        poller = zmq.Poller()
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        try:
            while todo or any(outstanding):
                for sock, asked in zip(socks, outstanding):
                    while todo and len(asked) < self.window:
                        name, index = todo.popleft()
                        rid = f"{os.getpid()}-{next(self._rids)}"
                        sock.send(wire.encode(protocol.Chunk(version=version, name=name, index=index,
                                                             rid=rid).to_msg()))
                        asked[rid] = (name, index)
                if time.monotonic() > deadline:
                    missing = len(todo) + sum(map(len, outstanding))
                    raise TimeoutError(f"pull of v{version} from {self.endpoint}: {missing} chunk(s) still missing "
                                       f"at the deadline")
                ready = dict(poller.poll(int(1000 * self.resend_after)))
                if not ready:
                    # silence: the connections may be dead; fresh sockets, and ask for everything outstanding again
                    for i, sock in enumerate(socks):
                        poller.unregister(sock)
                        sock.close()
                        socks[i] = self._socket()
                        poller.register(socks[i], zmq.POLLIN)
                        todo.extendleft(reversed(list(outstanding[i].values())))
                        outstanding[i].clear()
                    self.stats["reconnects"] += 1
                    continue
                for sock, asked in zip(socks, outstanding):
                    if sock not in ready:
                        continue
                    frames = sock.recv_multipart(copy=False)
                    head = wire.decode(frames[0].bytes)
                    key = asked.pop(head.get("rid"), None)
                    if key is None:
                        continue  # a late answer to a request asked again since
                    if head.get("type") == "ERROR":
                        raise WeightPullError(f"weight server {self.endpoint}: {head.get('error')}")
                    self._store(key, head, frames[1].buffer if len(frames) > 1 else b"", entries, fds, log,
                                retries, todo)
        finally:
            for sock in socks:
                sock.close()

    def _store(self, key, head, data, entries, fds, log, retries, todo) -> None:
        name, index = key
        expected = entries[name]["digests"][index]
        self.stats["max_frame"] = max(self.stats["max_frame"], len(data))
        if self._digest(data) != expected or head.get("digest") != expected:
            self.stats["bad_chunks"] += 1
            retries[key] += 1
            if retries[key] > 3:
                raise WeightPullError(f"chunk {index} of {name} (v{head.get('version')}) failed its checksum "
                                      f"{retries[key]} times: the server's copy differs from its manifest")
            todo.append(key)
            return
        os.pwrite(fds[name], data, int(head["offset"]))
        log.write(f"{name}\t{index}\n")
        log.flush()
        self.stats["chunks"] += 1
        self.stats["bytes"] += len(data)

    def prune(self, newest: int) -> None:
        """Keep the newest `keep` complete versions here (never `newest`, the one just pulled)."""
        versions = sorted(int(p.name[1:]) for p in self.dest.glob("v*") if p.name[1:].isdigit())
        for v in versions[:-self.keep]:
            if v != newest:
                shutil.rmtree(self.dest / f"v{v}", ignore_errors=True)
