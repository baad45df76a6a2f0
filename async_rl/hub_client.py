"""Client of the buffer hub, shared by generators, learners and the CLI (they may not import `buffer/`).

Every request carries a request id (`rid`) and the reply echoes it, so a late reply to a request that was
resent is recognised and dropped. `put` is at-least-once: it resends the same group (same key) until the
hub acks it; the hub's idempotent insert turns that into exactly-once storage.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Callable

import zmq

from async_rl import wire


class HubError(RuntimeError):
    """The hub answered with an ERROR reply."""


class HubTimeout(TimeoutError):
    pass


class HubClient:
    def __init__(self, endpoint: str, identity: str | None = None):
        self.endpoint = endpoint
        self.ctx = zmq.Context.instance()
        self._ids = itertools.count()
        self._identity = (identity or f"client-{os.getpid()}").encode()
        self._connect()

    def _connect(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, self._identity + f"-{next(self._ids)}".encode())
        self.sock.connect(self.endpoint)

    def reconnect(self) -> None:
        """A fresh socket: drops anything queued for the old peer (used after a timeout)."""
        self.sock.close()
        self._connect()

    def request(self, msg: dict, timeout: float | None = 10.0,
                should_stop: Callable[[], bool] | None = None) -> dict:
        """Send `msg`, wait for the reply with the same rid; `timeout=None` waits until `should_stop()`."""
        rid = f"{os.getpid()}-{next(self._ids)}"
        self.sock.send(wire.encode({**msg, "rid": rid}))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if should_stop is not None and should_stop():
                raise HubTimeout(f"{msg.get('type')}: stopped while waiting for the hub")
            wait_ms = 200 if deadline is None else max(0, min(200, int((deadline - time.monotonic()) * 1000)))
            if self.sock.poll(wait_ms):
                reply = wire.decode(self.sock.recv())
                if reply.get("rid") not in (rid, None):
                    continue  # a late answer to an earlier, resent request
                if reply.get("type") == "ERROR":
                    raise HubError(reply.get("error", "unknown hub error"))
                return reply
            if deadline is not None and time.monotonic() >= deadline:
                raise HubTimeout(f"{msg.get('type')}: no reply from hub {self.endpoint} in {timeout:.1f}s")

    def put(self, group_wire: dict, stats: dict, timeout: float, max_tries: int = 1_000_000,
            should_stop: Callable[[], bool] | None = None) -> dict:
        """Deliver a group at least once: resend with backoff until acked."""
        backoff = 0.1
        for _ in range(max_tries):
            try:
                return self.request({"type": "PUT", "group": group_wire, "stats": stats},
                                    timeout=timeout, should_stop=should_stop)
            except HubTimeout:
                if should_stop is not None and should_stop():
                    raise
                self.reconnect()
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        raise HubTimeout(f"PUT: hub {self.endpoint} did not ack after {max_tries} tries")

    def stats(self, timeout: float = 2.0) -> dict:
        return self.request({"type": "STATS"}, timeout=timeout)["stats"]

    def close(self) -> None:
        self.sock.close()
