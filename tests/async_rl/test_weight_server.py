"""The weight server and puller with a real server process on loopback: a pull is byte-exact and never
moves more than one chunk per message; a pull cut off (server killed and restarted, or the puller itself
dying) resumes and fetches only what is missing; bytes that fail their checksum are refused; requests for
anything outside a manifest get an error and the server keeps serving; with CURVE keys, a client without
them gets nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from async_rl import protocol, wire
from async_rl.keys import create_keys
from async_rl.weight_pull import WeightPuller, WeightPullError
from async_rl.weight_server import WeightStore, handle

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024


def _store(tmp_path: Path) -> Path:
    """weights/v3 with files of awkward sizes (not multiples of the chunk), plus an initial checkpoint."""
    rng = np.random.default_rng(0)
    weights = tmp_path / "weights"
    for name, size in [("model.safetensors", 37 * CHUNK + 123), ("config.json", 17), ("tok/vocab.txt", CHUNK)]:
        path = weights / "v3" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    (tmp_path / "initial").mkdir()
    (tmp_path / "initial" / "config.json").write_text('{"v": 0}')
    return weights


class Server:
    def __init__(self, tmp_path: Path, keys: Path | None = None, port: int = 0):
        self.tmp_path, self.keys = tmp_path, keys
        self.port = port or _free_port()
        self.start()

    def start(self) -> None:
        ep = self.tmp_path / "ws.endpoint"
        ep.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "async_rl.weight_server", "--root", str(self.tmp_path / "weights"),
               "--initial", str(self.tmp_path / "initial"), "--bind", f"tcp://127.0.0.1:{self.port}",
               "--endpoint-file", str(ep), "--chunk-bytes", str(CHUNK), *(["--keys", str(self.keys)] if self.keys else [])]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while not ep.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "weight server did not start"
            time.sleep(0.05)
        self.endpoint = ep.read_text().strip()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    _store(tmp_path)
    s = Server(tmp_path)
    yield s
    s.kill()


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != ".manifest.json")
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize("streams", [1, 3])
def test_pull_is_exact_and_chunked(server, tmp_path, streams):
    puller = WeightPuller(server.endpoint, tmp_path / "local", resend_after=2, streams=streams)
    assert puller.latest() == 3
    opened = []
    socket = puller._socket
    puller._socket = lambda: opened.append(1) or socket()
    out = puller.pull(3)
    assert len(opened) == 1 + streams  # the MANIFEST's, then the chunks over `streams` connections at once
    _same_tree(tmp_path / "weights" / "v3", out)
    assert puller.stats["max_frame"] == CHUNK  # never more than one chunk per message
    assert puller.stats["chunks"] == 38 + 1 + 1 and puller.stats["reconnects"] == 0
    assert not list((tmp_path / "local").glob(".v3.*[!k]"))  # no partial dir or journal left (only the lock)
    v0 = puller.pull(0)  # version 0 is the run's initial checkpoint
    assert (v0 / "config.json").read_text() == '{"v": 0}'


class KillAt(WeightPuller):
    """Calls `action()` once, when `at` chunks have been written (to cut a pull off at a known point)."""

    def __init__(self, *a, at: int, action, **kw):
        super().__init__(*a, **kw)
        self.at, self.action = at, action

    def _store(self, *args) -> None:
        super()._store(*args)
        if self.stats["chunks"] == self.at and self.action:
            action, self.action = self.action, None
            action()


def test_a_pull_resumes_after_the_server_is_killed_and_restarted(server, tmp_path):
    def restart():
        server.kill()
        time.sleep(1.0)
        server.start()
    puller = KillAt(server.endpoint, tmp_path / "local", resend_after=1.0, window=4, at=10, action=restart)
    out = puller.pull(3, timeout=60)
    _same_tree(tmp_path / "weights" / "v3", out)
    # only what was in flight at the kill is asked again, never the whole model
    assert 40 <= puller.stats["chunks"] <= 40 + 4


def test_a_pull_cut_off_in_a_dead_process_continues_from_its_journal(server, tmp_path):
    class Died(Exception):
        pass

    def die():
        raise Died
    with pytest.raises(Died):
        KillAt(server.endpoint, tmp_path / "local", at=15, action=die).pull(3)
    assert not (tmp_path / "local" / "v3").exists()  # never visible half-pulled
    again = WeightPuller(server.endpoint, tmp_path / "local")
    out = again.pull(3)
    _same_tree(tmp_path / "weights" / "v3", out)
    assert again.stats["resumed_chunks"] == 15 and again.stats["chunks"] == 40 - 15


def test_a_torn_local_copy_found_after_a_restart_is_pulled_again(server, tmp_path):
    WeightPuller(server.endpoint, tmp_path / "local").pull(3)
    local = tmp_path / "local" / "v3" / "model.safetensors"
    data = bytearray(local.read_bytes())
    data[20 * CHUNK:21 * CHUNK] = bytes(CHUNK)  # pages a machine crash never wrote back
    local.write_bytes(bytes(data))
    again = WeightPuller(server.endpoint, tmp_path / "local")  # a new process: it trusts nothing it did not check
    _same_tree(tmp_path / "weights" / "v3", again.pull(3))
    assert again.stats["chunks"] == 40
    assert again.pull(3) and again.stats["chunks"] == 40  # checked once per process, not per call


def test_bytes_that_differ_from_the_manifest_are_refused(server, tmp_path):
    puller = WeightPuller(server.endpoint, tmp_path / "local")
    puller._ask(protocol.Manifest(version=3), 10)  # the server hashes v3 now
    target = tmp_path / "weights" / "v3" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[5 * CHUNK + 7] ^= 0xFF  # corrupted on disk after publication
    target.write_bytes(bytes(data))
    with pytest.raises(WeightPullError, match="chunk 5 of model.safetensors"):
        puller.pull(3)
    assert not (tmp_path / "local" / "v3").exists()


def test_requests_outside_a_manifest_get_errors_and_the_server_keeps_serving(server, tmp_path):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(server.endpoint)
    bad = [{"type": "CHUNK", "version": 3, "name": "../../initial/config.json", "index": 0},
           {"type": "CHUNK", "version": 3, "name": "config.json", "index": 99},
           {"type": "CHUNK", "version": 3, "name": "config.json", "index": "0"},
           {"type": "MANIFEST", "version": 42}, {"type": "MANIFEST"}, {"type": "DELETE"}]
    for i, msg in enumerate(bad):
        sock.send(wire.encode({**msg, "rid": str(i)}))
        assert sock.poll(5000)
        reply = wire.decode(sock.recv_multipart()[0])
        assert reply["type"] == "ERROR" and reply["rid"] == str(i), (msg, reply)
    sock.send(b"\xc1 not msgpack")
    assert sock.poll(5000) and wire.decode(sock.recv_multipart()[0])["type"] == "ERROR"
    sock.close()
    assert WeightPuller(server.endpoint, tmp_path / "local").latest() == 3


def test_store_refuses_names_it_did_not_list(tmp_path):
    store = WeightStore(_store(tmp_path), tmp_path / "initial", CHUNK)
    head, data = handle(store, {"type": "CHUNK", "version": 3, "name": "/etc/passwd", "index": 0, "rid": 1})
    assert head["type"] == "ERROR" and "not part of version 3" in head["error"] and data is None
    store.close()


def test_with_keys_only_a_client_holding_them_is_answered(tmp_path):
    _store(tmp_path)
    keys = create_keys(tmp_path / "keys")
    server = Server(tmp_path, keys=keys)
    try:
        with pytest.raises(TimeoutError):
            WeightPuller(server.endpoint, tmp_path / "nokeys", resend_after=0.5).latest(timeout=2)
        out = WeightPuller(server.endpoint, tmp_path / "local", keys=keys).pull(3)
        _same_tree(tmp_path / "weights" / "v3", out)
    finally:
        server.kill()


@pytest.mark.parametrize("checksum", ["xxh3_64", "sha256"])
def test_manifest_digests_match_an_independent_computation(tmp_path, monkeypatch, checksum):
    import hashlib

    import async_rl.weight_server as ws
    xxhash = pytest.importorskip("xxhash") if checksum == "xxh3_64" else None
    monkeypatch.setattr(ws, "CHECKSUM", checksum)
    store = WeightStore(_store(tmp_path), tmp_path / "initial", CHUNK)
    head, _ = handle(store, {"type": "MANIFEST", "version": 3, "rid": 1})
    data = (tmp_path / "weights" / "v3" / "model.safetensors").read_bytes()
    entry = next(f for f in head["files"] if f["name"] == "model.safetensors")
    ref = [xxhash.xxh3_64(data[o:o + CHUNK]).hexdigest() if xxhash else hashlib.sha256(data[o:o + CHUNK]).hexdigest()
           for o in range(0, len(data), CHUNK)]
    assert head["checksum"] == checksum and entry["digests"] == ref
    store.close()
