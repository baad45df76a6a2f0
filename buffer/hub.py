"""The buffer hub: a ZeroMQ ROUTER service holding groups between generators and the learner.

Invariants it keeps:
- No group whose staleness (learner version - behavior_version) exceeds `max_staleness` is ever returned
  by SAMPLE; such groups are evicted and counted (`buffer/evicted_stale`).
- Admission (AReaL's rule, counting live groups): a generator may start a group only while
  `(max_staleness + v + 1) * groups_per_version - (accepted - evicted_stale + running) > 0`, and never
  more groups than the run still needs.
- Inserts are idempotent by key (`generator_id`, `seq`): a resent group is acked again, never stored twice.
- Accounting: `accepted == consumed + evicted_stale + size` at every moment.
- A malformed message gets an ERROR reply; it never crashes the hub.

Requests that cannot be served yet (ACQUIRE with no credit, SAMPLE with too few fresh groups) are parked
and answered when they can be. `Hub.handle` is pure logic (testable without sockets); `serve` is the loop.
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import time
from pathlib import Path

from async_rl import config as config_mod
from async_rl import wire
from async_rl.types import Group
from async_rl.data import load_prompts
from buffer.prompts import PromptDispenser

Reply = tuple[bytes, dict]


class Hub:
    def __init__(self, cfg: config_mod.Config, prompts: list[dict]):
        self.cfg = cfg
        self.dispenser = PromptDispenser(prompts, cfg.data.rollout_shuffle, cfg.data.rollout_seed)
        self.version = 0
        self.weights_path = cfg.ckpt.hf_checkpoint
        self.table: collections.deque[Group] = collections.deque()
        self.keys_seen: set[tuple[str, int]] = set()
        self.counters = collections.Counter(accepted=0, consumed=0, evicted_stale=0, duplicates=0, running=0)
        self.generators: dict[str, dict] = {}
        self.parked_acquire: dict[str, tuple[bytes, dict]] = {}
        self.parked_sample: tuple[bytes, dict] | None = None
        self.done = False
        self.started = time.time()

    # ---- admission -------------------------------------------------------------------------------
    @property
    def groups_per_version(self) -> int:
        r = self.cfg.rollout
        return r.rollout_batch_size * r.update_weights_interval

    @property
    def groups_needed(self) -> int:
        return self.cfg.rollout.num_rollout * self.cfg.rollout.rollout_batch_size

    def credits_available(self) -> int:
        c = self.counters
        live = c["accepted"] - c["evicted_stale"] + c["running"]
        cap = (self.cfg.buffer.max_staleness + self.version + 1) * self.groups_per_version - live
        return max(0, min(cap, self.groups_needed - live))

    # ---- dispatch --------------------------------------------------------------------------------
    def handle(self, ident: bytes, msg: dict) -> list[Reply]:
        kind = msg.get("type")
        handler = getattr(self, f"_on_{str(kind).lower()}", None) if isinstance(kind, str) else None
        if handler is None:
            return [(ident, self._error(msg, f"type={kind!r}: unknown message type; expected one of "
                                             f"ACQUIRE, PUT, SAMPLE, VERSION, STATS, STOP"))]
        try:
            return handler(ident, msg)
        except wire.WireError as exc:
            return [(ident, self._error(msg, str(exc)))]
        except (KeyError, TypeError, ValueError) as exc:
            return [(ident, self._error(msg, f"{kind}: malformed message ({exc!r})"))]

    @staticmethod
    def _error(msg: dict, text: str) -> dict:
        return {"type": "ERROR", "rid": msg.get("rid") if isinstance(msg, dict) else None, "error": text}

    def _reply(self, msg: dict, **fields) -> dict:
        return {"rid": msg.get("rid"), "version": self.version, "weights_path": self.weights_path, **fields}

    def _generator(self, gid: str) -> dict:
        return self.generators.setdefault(gid, {"running": 0, "groups": 0, "gen_tokens": 0, "busy_s": 0.0,
                                                "last_seen": time.time()})

    def _on_acquire(self, ident: bytes, msg: dict) -> list[Reply]:
        gid = str(msg["generator_id"])
        self._generator(gid)["last_seen"] = time.time()
        if self.done:
            return [(ident, self._reply(msg, type="DONE"))]
        self.parked_acquire[gid] = (ident, msg)
        return self._serve_acquires()

    def _serve_acquires(self) -> list[Reply]:
        out = []
        for gid, (ident, msg) in list(self.parked_acquire.items()):
            n = min(int(msg.get("max_groups", 1)), self.credits_available())
            if n <= 0 and not self.done:
                continue
            del self.parked_acquire[gid]
            if self.done:
                out.append((ident, self._reply(msg, type="DONE")))
                continue
            prompts = []
            for _ in range(n):
                index, prompt = self.dispenser.next()
                prompts.append({"prompt_index": index, "input": prompt["input"], "label": prompt["label"]})
            self.counters["running"] += n
            self._generator(gid)["running"] += n
            out.append((ident, self._reply(msg, type="GRANT", prompts=prompts)))
        return out

    def _on_put(self, ident: bytes, msg: dict) -> list[Reply]:
        group = Group.from_wire(msg["group"])
        gen = self._generator(group.generator_id)
        gen["last_seen"] = time.time()
        if group.key in self.keys_seen:
            self.counters["duplicates"] += 1
            return [(ident, self._reply(msg, type="ACK", key=list(group.key), duplicate=True))]
        self.keys_seen.add(group.key)
        self.counters["accepted"] += 1
        if gen["running"] > 0:
            gen["running"] -= 1
            self.counters["running"] -= 1
        stats = msg.get("stats") or {}
        gen["groups"] += 1
        gen["gen_tokens"] += int(stats.get("gen_tokens", 0))
        gen["busy_s"] += float(stats.get("busy_s", 0.0))
        self.table.append(group)
        out = [(ident, self._reply(msg, type="ACK", key=list(group.key), duplicate=False))]
        return out + self._serve_sample()

    def _sweep_stale(self, version: int) -> None:
        limit = version - self.cfg.buffer.max_staleness
        if any(g.behavior_version < limit for g in self.table):
            kept = collections.deque(g for g in self.table if g.behavior_version >= limit)
            self.counters["evicted_stale"] += len(self.table) - len(kept)
            self.table = kept

    def _on_sample(self, ident: bytes, msg: dict) -> list[Reply]:
        int(msg["num_groups"])
        self.parked_sample = (ident, msg)
        return self._serve_sample()

    def _serve_sample(self) -> list[Reply]:
        if self.parked_sample is None:
            return []
        ident, msg = self.parked_sample
        # the learner trains at the newest version anyone told us of: a parked request may predate a VERSION
        version = max(int(msg.get("version", self.version)), self.version)
        self._sweep_stale(version)
        n = int(msg["num_groups"])
        if len(self.table) < n:
            return self._serve_acquires()  # eviction may have returned credits
        self.parked_sample = None
        batch = [self.table.popleft() for _ in range(n)]
        self.counters["consumed"] += n
        reply = self._reply(msg, type="BATCH", groups=[g.to_wire() for g in batch], stats=self.stats())
        return [(ident, reply)] + self._serve_acquires()

    def _on_version(self, ident: bytes, msg: dict) -> list[Reply]:
        version = int(msg["version"])
        if version < self.version:
            return [(ident, self._error(msg, f"version={version}: below the hub's {self.version}; versions only grow"))]
        self.version, self.weights_path = version, str(msg["weights_path"])
        self._sweep_stale(version)
        return [(ident, self._reply(msg, type="OK"))] + self._serve_acquires()

    def _on_stats(self, ident: bytes, msg: dict) -> list[Reply]:
        return [(ident, self._reply(msg, type="STATS", stats=self.stats()))]

    def _on_stop(self, ident: bytes, msg: dict) -> list[Reply]:
        self.done = True
        return [(ident, self._reply(msg, type="OK"))] + self._serve_acquires()

    def stats(self) -> dict:
        gens = self.generators.values()
        return {
            "version": self.version, "size": len(self.table), **dict(self.counters),
            "credits_available": self.credits_available(),
            "staleness_hist": dict(collections.Counter(self.version - g.behavior_version for g in self.table)),
            "gen_tokens": sum(g["gen_tokens"] for g in gens), "gen_busy_s": sum(g["busy_s"] for g in gens),
            "num_generators": len(self.generators), "prompt_epoch": self.dispenser.epoch,
            "uptime_s": time.time() - self.started,
        }


def serve(hub: Hub, bind: str, endpoint_file: str | None = None) -> None:
    """Run the ROUTER loop until SIGTERM/SIGINT; writes the bound endpoint to `endpoint_file`."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished peer raises instead of vanishing
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(bind)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if endpoint_file:
        tmp = f"{endpoint_file}.tmp"
        Path(tmp).write_text(endpoint)
        os.replace(tmp, endpoint_file)
    print(f"hub listening on {endpoint}", flush=True)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(1))
    last_log = 0.0
    while not stopping:
        if not sock.poll(200):
            continue
        frames = sock.recv_multipart()
        if len(frames) != 2:
            continue  # not a DEALER request; nothing sane to reply to
        ident, payload = frames
        try:
            msg = wire.decode(payload)
            replies = hub.handle(ident, msg)
        except wire.WireError as exc:
            replies = [(ident, {"type": "ERROR", "rid": None, "error": str(exc)})]
        for peer, reply in replies:
            try:
                sock.send_multipart([peer, wire.encode(reply)])
            except zmq.ZMQError as exc:  # peer gone; it will resend after reconnecting
                print(f"hub: reply to vanished peer dropped ({exc})", flush=True)
        if time.time() - last_log > 10:
            last_log = time.time()
            print(f"hub stats {hub.stats()}", flush=True)
    sock.close()
    ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl buffer hub")
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--bind", default="tcp://127.0.0.1:0", help="ZeroMQ endpoint to bind (port 0 = any)")
    ap.add_argument("--endpoint-file", default=None, help="where to write the bound endpoint")
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config)
    prompts = load_prompts(cfg.data.prompt_data, cfg.data.input_key, cfg.data.label_key)
    serve(Hub(cfg, prompts), args.bind.replace(":0", ":*") if args.bind.endswith(":0") else args.bind,
          args.endpoint_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
