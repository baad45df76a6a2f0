"""Client of the buffer hub, shared by generators, learners and the CLI (they may not import `buffer/`).

Requests are built with async_rl/protocol.py (`client.request(protocol.Sample(num_groups=4, version=v))`);
replies come back as maps (their fields are listed there).

Delivery: every request carries a request id (`rid`); when no reply comes within `resend_after` seconds
the client reconnects (a fresh socket: a dead TCP connection may hold the old copy) and resends the
same request with the same rid. Every hub request is idempotent (PUT by group key, ACQUIRE by
acquire_seq, SAMPLE by learner id, VERSION by number), so resending turns ZeroMQ's at-most-once into
at-least-once delivery and the hub's dedup makes it exactly-once storage. Replies to other rids (late
answers) are dropped. A hub that is down is simply waited for, with backoff, until `timeout`.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Callable

import zmq

from async_rl import protocol, wire
from async_rl.types import Group


_SOCKETS = itertools.count()


class HubError(RuntimeError):
    """The hub answered with an ERROR reply."""


class HubTimeout(TimeoutError):
    pass


def _socket(ctx: zmq.Context, endpoint: str, identity: bytes, keys_dir: str | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    if keys_dir:
        from async_rl.keys import secure_client
        secure_client(sock, keys_dir)
    sock.connect(endpoint)
    return sock


class HubClient:
    def __init__(self, endpoint: str, identity: str | None = None, keys_dir: str | None = None,
                 resend_after: float = 10.0):
        self.endpoint = endpoint
        self.keys_dir = keys_dir
        self.resend_after = resend_after
        self.ctx = zmq.Context.instance()
        self._ids = itertools.count()
        self._name = (identity or f"client-{os.getpid()}")
        self.sock = self._new_socket()

    def _new_socket(self) -> zmq.Socket:
        # unique per socket, process-wide: two clients with one ROUTER identity steal each other's replies
        identity = f"{self._name}-{os.getpid()}-{next(_SOCKETS)}".encode()
        sock = _socket(self.ctx, self.endpoint, identity, self.keys_dir)
        sock.setsockopt(zmq.RCVTIMEO, 100)  # wait in recv itself (poll + recv costs more syscalls per reply)
        return sock

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = self._new_socket()

    def request(self, req: protocol.Request | dict, timeout: float | None = 30.0,
                should_stop: Callable[[], bool] | None = None) -> dict:
        """Send `req` until the reply with its rid arrives; `timeout=None` waits until `should_stop()`.
        A raw map is sent as it is (tests and benchmarks that send what no constructor would build)."""
        msg = req.to_msg() if isinstance(req, protocol.Request) else req
        rid = f"{self._name}-{os.getpid()}-{next(self._ids)}"
        payload = wire.encode({**msg, "rid": rid})
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 0.0
        while True:
            self.sock.send(payload)
            resend_at = time.monotonic() + self.resend_after + backoff
            while time.monotonic() < resend_at:
                if should_stop is not None and should_stop():
                    raise HubTimeout(f"{msg.get('type')}: stopped while waiting for the hub")
                if deadline is not None and time.monotonic() >= deadline:
                    raise HubTimeout(f"{msg.get('type')}: no reply from hub {self.endpoint} in {timeout:.1f}s")
                try:
                    data = self.sock.recv()
                except zmq.Again:  # nothing within RCVTIMEO: check the clocks and wait again
                    continue
                reply = wire.decode(data)
                if reply.get("rid") != rid:
                    continue  # a late answer to an earlier request
                if reply.get("type") == "ERROR":
                    raise HubError(reply.get("error", "unknown hub error"))
                return reply
            self.reconnect()
            backoff = min(backoff * 2 + 0.1, 5.0)

    def put(self, groups: list[Group], stats: dict, timeout: float | None = None,
            should_stop: Callable[[], bool] | None = None) -> dict:
        """Deliver groups at least once, in one PUT (the hub stores each exactly once); `stats` is the work
        they cost (gen_tokens, busy_s)."""
        return self.request(protocol.Put.of(groups, stats), timeout=timeout, should_stop=should_stop)

    def update_priorities(self, updates: list[list], timeout: float = 30.0) -> dict:
        """Set held groups' priorities by key: `updates` = [[generator_id, seq, priority], ...]. Keys no
        longer held (consumed or evicted) are counted by the hub (`priority_updates_unknown`), not errors."""
        return self.request(protocol.Priority(updates=updates), timeout=timeout)

    def stats(self, timeout: float = 2.0) -> dict:
        return self.request(protocol.Stats(), timeout=timeout)["stats"]

    def close(self) -> None:
        self.sock.close()


class Heartbeat(threading.Thread):
    """Tells the hub every `interval` seconds that `generator_id` is alive, on a socket of its own, so a
    long generation never looks like a dead generator (whose credits the hub would take back)."""

    def __init__(self, endpoint: str, generator_id: str, interval: float, keys_dir: str | None = None):
        super().__init__(daemon=True, name=f"heartbeat-{generator_id}")
        self.endpoint, self.generator_id, self.interval, self.keys_dir = endpoint, generator_id, interval, keys_dir
        self._stop_event = threading.Event()

    def run(self) -> None:
        sock = _socket(zmq.Context.instance(), self.endpoint, f"{self.generator_id}-hb-{os.getpid()}".encode(),
                       self.keys_dir)
        sock.setsockopt(zmq.SNDHWM, 4)  # while the hub is down, keep only a few beats queued
        beat = wire.encode(protocol.Heartbeat(generator_id=self.generator_id).to_msg())
        try:
            while not self._stop_event.wait(self.interval):
                try:
                    sock.send(beat, zmq.NOBLOCK)
                except zmq.Again:
                    pass
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop_event.set()
