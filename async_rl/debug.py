"""slime's debug modes, in async mode, talking to the hub over the wire like any generator or learner.

- `save_debug_rollout_data`: the learner (or the sink) writes each batch it takes from the hub, one file per
  learner step (`rollout_id`), before training on it: exactly the groups the run trains on, in order.
- `debug_rollout_only`: `python -m async_rl.debug sink` stands in for the learner: it SAMPLEs and acks
  batches at version 0 (weights never move) and logs one metrics row per batch; nothing is trained.
- `debug_train_only`: `python -m async_rl.debug feed` stands in for the generators: it PUTs saved batch k
  once the hub is at the version batch k was trained at and the table is empty, so the learner's step k
  gets exactly batch k (the same groups, keys, behavior versions and so staleness). PUT is idempotent by
  group key, so a restarted feeder resends nothing twice.
- `dump_details`: the learner writes each step's tensors (tokens, mask, rewards, advantages, logprobs,
  TIS weights) to `dump_details/step_{N}.pt`.

Invariant of the sink: every batch is logged once and acked once, also across a restart (the lease of the
last logged batch is in its metrics row and acked first), so the hub's accounting balances as in a real run.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path

from async_rl import config as config_mod
from async_rl import protocol, wire
from async_rl.hub_client import HubClient, HubTimeout
from async_rl.types import Group

BUFFER_KEYS = ("size", "in_flight", "accepted", "consumed", "evicted_stale", "evicted_capacity", "duplicates",
               "running", "dropped_filtered", "reclaimed", "max_staleness")


# ---- rollout files ---------------------------------------------------------------------------------
def rollout_path(spec: str, rollout_id: int) -> Path:
    """`spec` is a template with {rollout_id} or a directory (rollout_{rollout_id}.msgpack in it)."""
    if "{rollout_id}" in spec:
        return Path(spec.format(rollout_id=rollout_id))
    return Path(spec) / f"rollout_{rollout_id}.msgpack"


def save_rollout(spec: str, rollout_id: int, version: int, groups: list[Group]) -> Path:
    path = rollout_path(spec, rollout_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(wire.encode({"rollout_id": rollout_id, "version": version,
                                 "groups": [g.to_wire() for g in groups]}))
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def find_rollouts(spec: str) -> list[tuple[int, Path]]:
    """Every saved rollout of `spec` (a template whose file name holds {rollout_id}, or a directory), by id."""
    template = Path(spec if "{rollout_id}" in spec else str(Path(spec) / "rollout_{rollout_id}.msgpack"))
    head, _, tail = template.name.partition("{rollout_id}")
    pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    if not template.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in template.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def load_rollout(path: Path) -> dict:
    data = wire.decode(path.read_bytes())
    data["groups"] = [Group.from_wire(g) for g in data["groups"]]
    return data


def check_load_data(cfg: config_mod.Config) -> None:
    """debug_train_only needs num_rollout consecutive saved rollouts from 0; ConfigError otherwise."""
    spec, n = cfg.debug.load_debug_rollout_data, cfg.rollout.num_rollout
    ids = [i for i, _ in find_rollouts(spec)]
    if ids[:n] != list(range(n)):
        have = f"rollout ids {ids[:5]}{'...' if len(ids) > 5 else ''}" if ids else "no rollout files"
        raise config_mod.ConfigError(
            f"debug.load_debug_rollout_data={spec!r}: holds {have}; debug_train_only with num_rollout={n} needs "
            f"rollouts 0..{n - 1} (written by a run with save_debug_rollout_data); lower num_rollout or point it "
            f"at that run's files")


# ---- learner hook ----------------------------------------------------------------------------------
def record_step(cfg: config_mod.Config, step: int, version: int, groups: list[Group], batch) -> None:
    """Called by the learner after computing a step: save its groups and/or dump its tensors."""
    d = cfg.debug
    if d.save_debug_rollout_data:
        save_rollout(d.save_debug_rollout_data, step, version, groups)
    if d.dump_details:
        import torch
        out = Path(d.dump_details)
        out.mkdir(parents=True, exist_ok=True)
        fields = ("input_ids", "attention_mask", "targets", "mask", "rollout_logprobs", "token_versions", "rewards",
                  "behavior_versions", "logp_old", "ref_logp", "values", "advantages", "returns", "tis_weights")
        details = {k: getattr(batch, k).detach().cpu() for k in fields if getattr(batch, k, None) is not None}
        details.update(step=step, version=version, keys=[list(g.key) for g in groups],
                       prompt_index=[g.prompt_index for g in groups], labels=[g.label for g in groups])
        torch.save(details, out / f"step_{step}.pt")


# ---- debug_rollout_only: the sink ------------------------------------------------------------------
def run_sink(cfg: config_mod.Config, run_dir: Path, client: HubClient, resume: bool, should_stop) -> int:
    from async_rl.metrics import MetricsWriter, read_metrics
    rows = read_metrics(run_dir) if resume else []
    step, lease = len(rows), (rows[-1].get("lease") if rows else None)
    writer, t_start = MetricsWriter(run_dir, cfg), time.time()
    try:
        while step < cfg.rollout.num_rollout and not should_stop():
            try:
                reply = client.request(protocol.Sample(num_groups=cfg.rollout.rollout_batch_size, ack_lease=lease),
                                       timeout=None, should_stop=should_stop)
            except HubTimeout:
                break
            lease, groups = reply["lease"], [Group.from_wire(g) for g in reply["groups"]]
            if cfg.debug.save_debug_rollout_data:
                save_rollout(cfg.debug.save_debug_rollout_data, step, 0, groups)
            rewards = [t.reward for g in groups for t in g.trajectories]
            stats = reply["stats"]
            writer.log({"step": step, "version": 0, "time": time.time() - t_start, "lease": lease,
                        "reward/mean": sum(rewards) / len(rewards), "staleness/max": 0.0, "staleness/mean": 0.0,
                        "groups": len(groups), "perf/gen_tokens": stats.get("gen_tokens"),
                        **{f"buffer/{k}": stats.get(k) for k in BUFFER_KEYS}})
            step += 1
        if lease:
            client.request(protocol.Ack(lease=lease), timeout=60)
    finally:
        writer.close()
    return 0


# ---- debug_train_only: the feeder ------------------------------------------------------------------
def run_feeder(cfg: config_mod.Config, client: HubClient, should_stop) -> int:
    rollouts = find_rollouts(cfg.debug.load_debug_rollout_data)[:cfg.rollout.num_rollout]
    for rollout_id, path in rollouts:
        data = load_rollout(path)
        need = max([data["version"]] + [g.behavior_version for g in data["groups"]])
        while not should_stop():  # batch k goes in once the learner is at its version and took batch k-1
            stats = client.stats(timeout=cfg.buffer.put_timeout * 6)
            if stats["version"] >= need and stats["size"] == 0:
                break
            time.sleep(0.05)
        if should_stop():
            return 0
        client.put(data["groups"], {}, timeout=None, should_stop=should_stop)
        print(f"feeder: rollout {rollout_id} ({len(data['groups'])} groups, version {data['version']}) in the hub",
              flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="async-rl debug processes: the rollout-only sink, the train-only feeder")
    ap.add_argument("role", choices=["sink", "feed"])
    ap.add_argument("--config", required=True, help="resolved config.yaml of the run")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--hub", required=True, help="hub endpoint")
    ap.add_argument("--keys", default=None, help="CURVE keys dir of the run (none = no auth)")
    ap.add_argument("--resume", action="store_true", help="sink: continue after the last logged batch")
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    client = HubClient(args.hub, identity=protocol.LEARNER_ID if args.role == "sink" else "feeder", keys_dir=args.keys,
                       resend_after=cfg.buffer.put_timeout)
    try:
        if args.role == "sink":
            return run_sink(cfg, Path(args.run_dir), client, args.resume, lambda: bool(stopping))
        return run_feeder(cfg, client, lambda: bool(stopping))
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
