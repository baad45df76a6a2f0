"""A generator's side of the hub protocol, without an engine, for tests of what the hub promises about prompts
across hosts (tests/multihost/test_reissue.py). It is a real process with a real HubClient (CURVE, resends)
and a Heartbeat, like actors/generator.py; the groups it PUTs carry synthetic trajectories, since what is
under test is which prompts the hub hands out and which groups it keeps, not generation.

`python -m tests.multihost.hub_peer --hub EP --key FILE --gid G --dir D (--hold N | --work)`
- `--hold N`: acquire N prompts and hold them (heartbeating) until the file D/deliver appears, then PUT a
  group for each and exit.
- `--work`: acquire 2 at a time and PUT a group for each at once, until D/stop appears (it PUTs what it
  holds, then exits).
Every grant and ACK is a line of D/events.jsonl: {"grant": [prompt indices]} or {"put": i, "duplicate": b}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from async_rl.hub_client import Heartbeat, HubClient, HubTimeout
from async_rl.types import Group, Trajectory


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hub", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--gid", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--samples", type=int, default=2, help="the run's n_samples_per_prompt")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--hold", type=int)
    mode.add_argument("--work", action="store_true")
    args = ap.parse_args(argv)
    events = open(args.dir / "events.jsonl", "a", buffering=1)
    hub = HubClient(args.hub, identity=args.gid, keys_dir=args.key, resend_after=2.0)
    Heartbeat(args.hub, args.gid, 0.5, args.key).start()
    acquired, seq = 0, 0

    def acquire(n: int) -> list[int]:
        nonlocal acquired
        try:  # (parked while the hub has no credit; --work stops waiting once told to stop)
            reply = hub.request({"type": "ACQUIRE", "generator_id": args.gid, "acquire_seq": acquired,
                                 "max_groups": n}, timeout=None, should_stop=lambda: (args.dir / "stop").exists())
        except HubTimeout:
            return []
        acquired += 1
        got = [p["prompt_index"] for p in reply.get("prompts", [])]
        events.write(json.dumps({"grant": got}) + "\n")
        return got

    def put(index: int) -> None:
        nonlocal seq
        t = Trajectory(np.array([1], np.int32), np.array([2, 3], np.int32), np.zeros(2, np.float32),
                       np.zeros(2, np.int32), reward=1.0)
        seq += 1
        ack = hub.request({"type": "PUT", "groups": [Group(args.gid, seq, index, "0", [t] * args.samples).to_wire()]},
                          timeout=None)
        events.write(json.dumps({"put": index, "duplicate": ack["duplicates"][0]}) + "\n")

    if args.hold is not None:
        held = acquire(args.hold)
        while not (args.dir / "deliver").exists():
            time.sleep(0.1)
        for index in held:
            put(index)
    else:
        while not (args.dir / "stop").exists():
            for index in acquire(2):
                put(index)
    events.write(json.dumps({"done": True}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
