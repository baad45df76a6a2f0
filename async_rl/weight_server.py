"""The weight server: serves a run's published weight versions over ZeroMQ, in chunks, to hosts that do not
share the run's filesystem (`async-rl attach --hub ...`; the puller is async_rl/weight_pull.py).

Run: `python -m async_rl.weight_server --root RUN/weights --initial HF_CHECKPOINT --bind tcp://HOST:PORT
[--keys DIR] [--endpoint-file F] [--chunk-bytes N]` (the launcher starts it when cluster.serve_weights asks).

Requests (async_rl/protocol.py: Versions, Manifest, Chunk) are one msgpack frame (async_rl.wire) with a `rid`
echoed in the reply:
- `VERSIONS` -> `{versions: [...], latest}`: what can be pulled now (version 0 is the initial checkpoint).
- `MANIFEST {version}` -> `{version, chunk_bytes, checksum, files: [{name, size, digests: [one per chunk]}]}`.
- `CHUNK {version, name, index}` -> header `{version, name, index, offset, size, digest}` + one raw frame.
- anything else, or a version/file/chunk it does not have -> `{type: ERROR, error}` naming the fix.

Invariants:
- No message carries more than `chunk_bytes` of weights: never a whole model in one message.
- Only files a manifest lists are ever read, by a name taken from that manifest (never a path from the
  request), so a request cannot read outside the weight store.
- A published version is immutable (learners/weights.py renames it into place whole), so a manifest is
  computed once per version and every chunk matches it. A version pruned while a puller is mid-way stays
  readable through the files this server already holds open.
- A malformed request gets an ERROR reply; nothing a peer sends stops the server.

Checksums are xxh3_64 (xxhash, ~10x sha256's speed here: with sha256 the puller's hashing alone doubled a
pull's time over the veth link); without the xxhash package, sha256. The manifest names which, and the
puller checks with that one. They guard against corruption (a torn local copy, a changed file); against a
forger on the wire, CURVE's per-message authentication does.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from collections import OrderedDict
from pathlib import Path

import zmq

from async_rl import protocol, wire

CHUNK_BYTES = 4 * 2**20


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


DIGESTS = {"sha256": _sha256}
try:
    import xxhash
    DIGESTS["xxh3_64"] = xxhash.xxh3_64_hexdigest
    CHECKSUM = "xxh3_64"
except ImportError:  # the slower, always-there fallback
    CHECKSUM = "sha256"
KEEP_OPEN = 4  # versions whose files stay open (a pull in progress survives its version's pruning)


class WeightStore:
    """Published versions under `root` (v{N} dirs), plus the initial checkpoint as version 0."""

    def __init__(self, root: str | Path, initial: str | Path | None, chunk_bytes: int = CHUNK_BYTES):
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes}: must be >= 1")
        self.root, self.initial, self.chunk_bytes = Path(root), Path(initial) if initial else None, chunk_bytes
        self.manifests: OrderedDict[int, dict] = OrderedDict()
        self.files: dict[int, dict[str, int]] = {}  # version -> name -> open fd

    def versions(self) -> list[int]:
        found = {int(p.name[1:]) for p in self.root.glob("v*") if p.name[1:].isdigit() and p.is_dir()}
        if self.initial is not None and self.initial.is_dir():
            found.add(0)
        return sorted(found)

    def path(self, version: int) -> Path:
        published = self.root / f"v{version}"
        if published.is_dir() or version != 0 or self.initial is None:
            return published
        return self.initial

    def manifest(self, version: int) -> dict:
        if version in self.manifests:
            self.manifests.move_to_end(version)
            return self.manifests[version]
        base = self.path(version)
        if not base.is_dir():
            raise KeyError(f"version {version} is not here (have {self.versions()}); ask VERSIONS for the latest")
        files, fds = [], {}
        for p in sorted(q for q in base.rglob("*") if q.is_file()):
            name = p.relative_to(base).as_posix()
            fd = os.open(p, os.O_RDONLY)
            fds[name] = fd
            size = os.fstat(fd).st_size
            files.append({"name": name, "size": size, "digests": self._hashes(fd, size)})
        manifest = {"version": version, "chunk_bytes": self.chunk_bytes, "checksum": CHECKSUM, "files": files}
        self.manifests[version], self.files[version] = manifest, fds
        while len(self.manifests) > KEEP_OPEN:
            old, _ = self.manifests.popitem(last=False)
            for fd in self.files.pop(old).values():
                os.close(fd)
        return manifest

    def warm(self) -> None:
        versions = self.versions()
        if versions and versions[-1] not in self.manifests:
            try:
                self.manifest(versions[-1])
            except (KeyError, OSError):  # pruned or half-renamed meanwhile: the next idle turn tries again
                pass

    def _hashes(self, fd: int, size: int) -> list[str]:
        digest = DIGESTS[CHECKSUM]
        return [digest(os.pread(fd, self.chunk_bytes, off)) for off in range(0, size, self.chunk_bytes)]

    def chunk(self, version: int, name: str, index: int) -> tuple[dict, bytes]:
        entry = next((f for f in self.manifest(version)["files"] if f["name"] == name), None)
        if entry is None:
            raise KeyError(f"file {name!r} is not part of version {version}; names come from its MANIFEST")
        if not (type(index) is int and 0 <= index < len(entry["digests"])):
            raise KeyError(f"index={index!r}: {name} of v{version} has chunks 0..{len(entry['digests']) - 1}")
        offset = index * self.chunk_bytes
        data = os.pread(self.files[version][name], self.chunk_bytes, offset)
        head = {"version": version, "name": name, "index": index, "offset": offset, "size": len(data),
                "digest": entry["digests"][index]}
        return head, data

    def close(self) -> None:
        for fds in self.files.values():
            for fd in fds.values():
                os.close(fd)
        self.files.clear()
        self.manifests.clear()


def handle(store: WeightStore, msg: dict) -> tuple[dict, bytes | None]:
    """The reply to one request (async_rl/protocol.py: VERSIONS, MANIFEST, CHUNK): (header, raw chunk or
    None). Never raises."""
    rid = msg.get("rid") if isinstance(msg, dict) else None
    try:
        req = protocol.parse(msg, protocol.WEIGHT_REQUESTS)
        if isinstance(req, protocol.Versions):
            versions = store.versions()
            return {"rid": rid, "type": "VERSIONS", "versions": versions, "latest": versions[-1] if versions else -1}, None
        if isinstance(req, protocol.Manifest):
            return {"rid": rid, "type": "MANIFEST", **store.manifest(req.version)}, None
        head, data = store.chunk(req.version, req.name, req.index)
        return {"rid": rid, "type": "CHUNK", **head}, data
    except wire.WireError as exc:  # (ProtocolError is one)
        return protocol.error_reply(rid, str(exc)), None
    except KeyError as exc:
        return protocol.error_reply(rid, str(exc.args[0] if exc.args else exc)), None
    except (TypeError, ValueError, OSError) as exc:
        return protocol.error_reply(rid, f"{msg.get('type')}: malformed request ({exc!r})"), None


def serve(store: WeightStore, bind: str, keys_dir: str | None = None, endpoint_file: str | None = None,
          io_threads: int = 2) -> None:
    ctx = zmq.Context(io_threads=io_threads)  # each connection gets the least loaded: parallel pulls en/decrypt in parallel
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # requests are small; a huge one is not a request
    sock.setsockopt(zmq.SNDHWM, 64)
    auth = None
    if keys_dir:
        from async_rl.keys import secure_server
        auth = secure_server(ctx, sock, keys_dir)
    sock.bind(bind)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if endpoint_file:
        tmp = f"{endpoint_file}.tmp"
        Path(tmp).write_text(endpoint)
        os.replace(tmp, endpoint_file)
    print(f"weight server on {endpoint} serving {store.root} (auth {'on' if keys_dir else 'off'})", flush=True)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    sock.setsockopt(zmq.RCVTIMEO, 200)
    while not stopping:
        try:
            frames = sock.recv_multipart()
        except zmq.Again:  # idle: hash the newest version now, so its first puller does not wait for it
            store.warm()
            continue
        if len(frames) != 2:
            continue  # not a DEALER request: nothing sane to reply to
        ident, payload = frames
        try:
            msg = wire.decode(payload)
        except wire.WireError as exc:
            msg = {"type": f"undecodable ({exc})"}
        head, data = handle(store, msg if isinstance(msg, dict) else {})
        try:
            sock.send_multipart([ident, wire.encode(head)] + ([data] if data is not None else []), copy=False)
        except zmq.ZMQError as exc:  # the peer is gone; it asks again after reconnecting
            print(f"weight server: reply dropped ({exc})", flush=True)
    sock.close()
    store.close()
    if auth is not None:
        auth.stop()
    ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl weight server (published versions in chunks over ZeroMQ)")
    ap.add_argument("--root", required=True, help="the run's weight store, run_dir/weights")
    ap.add_argument("--initial", default=None, help="the checkpoint served as version 0 (ckpt.hf_checkpoint)")
    ap.add_argument("--bind", default="tcp://127.0.0.1:*")
    ap.add_argument("--keys", default=None, help="CURVE keys dir of the run (none = no auth)")
    ap.add_argument("--endpoint-file", default=None)
    ap.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES)
    ap.add_argument("--io-threads", type=int, default=2,
                    help="ZeroMQ I/O threads: connections (a puller opens several) are spread over them")
    args = ap.parse_args(argv)
    if args.io_threads < 1:
        ap.error(f"--io-threads {args.io_threads}: must be >= 1")
    Path(args.root).mkdir(parents=True, exist_ok=True)
    bind = args.bind[:-2] + ":*" if args.bind.endswith(":0") else args.bind
    serve(WeightStore(args.root, args.initial, args.chunk_bytes), bind, args.keys, args.endpoint_file, args.io_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
