"""The hub's state as a deterministic state machine over log records.

Every change to what the hub promises (an acked group, a granted prompt, a batch handed to the learner,
a version, a knob) is a record; `apply` is the only way state changes, both live and when replaying the
write-ahead log after a crash, so a restarted hub is exactly the hub that acked what it acked. Sampling
is random (prioritized, uniform), so a `lease` record names the keys that were drawn and replay takes
exactly those (`Table.sample_keys`), whatever the RNG would say now. The staleness gate (buffer/staleness.py:
the bound, which the table shares, and the credits granted and not returned, `running`) is part of this
state: it changes in `apply` only (grant, put, drop, reclaim, set) and is saved with every snapshot.

Accounting identity at every moment (max_times_sampled = 1):
    accepted == consumed + evicted_stale + evicted_capacity + size + in_flight
where in_flight counts groups handed to a learner that has not acked their batch yet, and consumed
counts groups in acked batches.

Trained since checkpoint: a learner that numbers its SAMPLEs (`step`) has each acked batch kept, by step, in
`trained[learner]` until it reports a complete checkpoint at a later step (CHECKPOINT); a learner restarted
from an older checkpoint gets those batches again, in their order (`replay` records count them in `replayed`,
never in `consumed`: a group is consumed once). The log holds at most `ckpt.save_interval` batches.
"""
from __future__ import annotations

import collections
import pickle
import time

from async_rl.types import Group, PackedGroup
from buffer.prompts import PromptDispenser, PromptLeases
from buffer.staleness import Flow, Staleness
from buffer.table import Table, loads as load_table

HUB_COUNTERS = ("consumed", "dropped_filtered", "reclaimed", "malformed", "evicted_in_flight", "replayed",
                "reissued", "late_duplicates")


def gkey(key) -> tuple[str, int]:
    return (str(key[0]), int(key[1]))


class HubState:
    def __init__(self, cfg, prompts: list[dict]):
        b = cfg.buffer
        self.dispenser = PromptDispenser(prompts, cfg.data.rollout_shuffle, cfg.data.rollout_seed)
        self.leases = PromptLeases()  # granted prompts still owed a group; a lost generator's are re-issued
        self.weights_path = cfg.ckpt.hf_checkpoint
        self.staleness = Staleness.from_config(cfg)  # the bound + admission; the table shares it
        self.table = Table(b.selector, b.remover, staleness=self.staleness,
                           max_times_sampled=b.max_times_sampled, capacity=b.capacity or None, alpha=b.alpha,
                           seed=cfg.train.seed)
        self.counters = collections.Counter({c: 0 for c in HUB_COUNTERS})
        self.dropped_keys: set[tuple[str, int]] = set()
        self.generators: dict[str, dict] = {}
        self.last_grant: dict[str, dict] = {}      # gid -> {"acquire_seq", "prompts"} for idempotent ACQUIRE
        self.in_flight: dict[str, dict] = {}       # learner_id -> {"lease", "keys", "groups", "step"}
        self.trained: dict[str, list[dict]] = {}   # learner_id -> [{"step", "keys", "groups"}] acked since its checkpoint
        self.checkpointed: dict[str, int] = {}     # learner_id -> step of its newest complete checkpoint
        self.replaying: dict[str, int] = {}        # learner_id -> step last replayed (a resent SAMPLE counts once)
        self.done = False
        self.knob_version = 0
        self.learner_knobs: dict = {}    # dotted config path -> value, set live by `async-rl set`
        self.generator_knobs: dict = {}

    @property
    def version(self) -> int:
        return self.table.version

    @property
    def max_staleness(self) -> int:
        return self.staleness.max_staleness

    def credits(self) -> int:
        """Groups a generator may start now (buffer/staleness.py)."""
        t = self.table.counters
        wasted = t["evicted_stale"] + self.counters["evicted_in_flight"] + t["evicted_capacity"]
        return self.staleness.credits(self.version, Flow(t["accepted"], wasted))

    # ---- helpers ---------------------------------------------------------------------------------
    def generator(self, gid: str) -> dict:
        gen = self.generators.get(gid)
        if gen is None:
            gen = self.generators[gid] = {"running": 0, "groups": 0, "gen_tokens": 0, "busy_s": 0.0,
                                          "last_seen": time.time(), "dropped": 0}
        return gen

    def seen(self, key) -> bool:
        return self.table.seen(key) or key in self.dropped_keys

    def _release_credits(self, gid: str, n: int) -> int:
        gen = self.generator(gid)
        n = min(n, gen["running"])
        gen["running"] -= n
        self.staleness.release(n)
        return n

    def _gen_stats(self, gid: str, stats: dict | None) -> dict:
        gen = self.generator(gid)
        if stats:
            gen["gen_tokens"] += float(stats.get("gen_tokens", 0))  # a multi-group PUT splits its tokens
            gen["busy_s"] += float(stats.get("busy_s", 0.0))
        return gen

    # ---- the state machine -----------------------------------------------------------------------
    def apply(self, rec: dict, live=None) -> None:
        """Apply a record; `live` carries what the live path already computed (a parsed group, or the
        sampled batch), so work is not done twice. Replay passes nothing."""
        getattr(self, f"_apply_{rec['op']}")(rec, live)

    def _apply_grant(self, rec: dict, _=None) -> None:
        gid, prompts = rec["gid"], rec["prompts"]
        self.dispenser.epoch, self.dispenser.position = rec["cursor"]
        self.dispenser.sync_order()
        self.staleness.grant(len(prompts))
        self.generator(gid)["running"] += len(prompts)
        reissued = int(rec.get("reissued", 0))  # the first ones came from the reissue queue
        self.leases.grant(gid, [int(p["prompt_index"]) for p in prompts], reissued)
        self.counters["reissued"] += reissued
        self.last_grant[gid] = {"acquire_seq": rec["acquire_seq"], "prompts": prompts}

    def _apply_put(self, rec: dict, group: PackedGroup | None = None) -> None:
        if group is None:  # replay; records written before groups were kept packed carry the decoded map
            group = PackedGroup.from_wire(rec["blob"] if "blob" in rec else rec["group"])
        if self.seen(group.key):
            self.table.counters["duplicates"] += 1
            return
        credit, first = self.leases.resolve(group.generator_id, group.prompt_index)
        if credit:
            self._release_credits(group.generator_id, 1)
        if not first:  # its prompt already has a group: a lost generator's late one, or the re-grantee's
            self.dropped_keys.add(group.key)
            self.counters["late_duplicates"] += 1
            return
        self.table.insert(group.key, group.own(), float(rec["priority"]))  # computed before logging: replay never calls user code
        self._gen_stats(group.generator_id, rec.get("stats"))["groups"] += 1

    def _apply_advance(self, rec: dict, _=None) -> None:
        self.table.advance(int(rec["version"]))

    def _apply_evict_in_flight(self, rec: dict, _=None) -> None:
        flight = self.in_flight.get(rec["learner"])
        if flight is None:
            return
        drop = set(map(gkey, rec["keys"]))
        keep = [(k, g) for k, g in zip(flight["keys"], flight["groups"]) if k not in drop]
        self.counters["evicted_in_flight"] += len(flight["keys"]) - len(keep)
        flight["keys"], flight["groups"] = [k for k, _ in keep], [g for _, g in keep]

    def _apply_lease(self, rec: dict, sampled: list | None = None) -> None:
        """Hand `keys` to the learner's in-flight batch (appending to a redelivered one)."""
        if sampled is None:
            sampled = self.table.sample_keys([gkey(k) for k in rec["keys"]])
        flight = self.in_flight.setdefault(rec["learner"], {"lease": rec["lease"], "keys": [], "groups": []})
        flight["lease"] = rec["lease"]
        if rec.get("step") is not None:
            flight["step"] = int(rec["step"])
        for key, group in sampled:
            flight["keys"].append(gkey(key))
            flight["groups"].append(group)

    def _apply_ack(self, rec: dict, _=None) -> None:
        flight = self.in_flight.get(rec["learner"])
        if flight is not None and flight["lease"] == rec["lease"]:
            self.counters["consumed"] += len(flight["keys"])
            del self.in_flight[rec["learner"]]
            step = flight.get("step")
            if step is not None and step >= self.checkpointed.get(rec["learner"], 0):
                kept = self.trained.setdefault(rec["learner"], [])
                kept[:] = [e for e in kept if e["step"] != step]  # a step trained again replaces its entry
                kept.append({"step": step, "keys": flight["keys"], "groups": flight["groups"]})

    def _apply_checkpoint(self, rec: dict, _=None) -> None:
        """The learner's checkpoint at `step` is complete: batches of earlier steps are in its weights."""
        learner, step = rec["learner"], int(rec["step"])
        self.checkpointed[learner] = max(step, self.checkpointed.get(learner, 0))
        kept = [e for e in self.trained.get(learner, []) if e["step"] >= self.checkpointed[learner]]
        self.trained[learner] = kept

    def _apply_replay(self, rec: dict, _=None) -> None:
        learner, step = rec["learner"], int(rec["step"])
        entry = self.trained_entry(learner, step)
        if entry is not None and self.replaying.get(learner) != step:
            self.counters["replayed"] += len(entry["keys"])
        self.replaying[learner] = step

    def trained_entry(self, learner: str, step: int) -> dict | None:
        return next((e for e in self.trained.get(learner, []) if e["step"] == step), None)

    def _apply_priorities(self, rec: dict, _=None) -> None:
        for gid, seq, p in rec["updates"]:
            self.table.update_priority(gkey((gid, seq)), float(p))

    def _apply_version(self, rec: dict, _=None) -> None:
        self.weights_path = str(rec["weights_path"])
        self.table.advance(int(rec["version"]))

    def _apply_drop(self, rec: dict, _=None) -> None:
        key = gkey((rec["gid"], rec["seq"]))
        if self.seen(key):
            return
        self.dropped_keys.add(key)
        credit, first = (True, True) if rec.get("prompt_index") is None else self.leases.resolve(rec["gid"], int(rec["prompt_index"]))
        if credit:
            self._release_credits(rec["gid"], 1)
        if not first:  # its prompt already has a group (or a DROP)
            self.counters["late_duplicates"] += 1
            return
        self.counters["dropped_filtered"] += 1
        self._gen_stats(rec["gid"], rec.get("stats"))["dropped"] += 1

    def _apply_reclaim(self, rec: dict, _=None) -> None:
        self.counters["reclaimed"] += self._release_credits(rec["gid"], int(rec["n"]))
        self.leases.reclaim(rec["gid"])

    def _apply_set(self, rec: dict, _=None) -> None:
        """Live knobs: the hub's own apply here; the learner's and generators' are kept and handed out with
        every BATCH / GRANT (with `knob_version`) until each side has applied them."""
        self.knob_version += 1
        self.learner_knobs.update(rec.get("learner") or {})
        self.generator_knobs.update(rec.get("generator") or {})
        knobs = rec.get("knobs") or {}
        if "max_staleness" in knobs:
            self.table.set_max_staleness(int(knobs["max_staleness"]))
        if "alpha" in knobs:
            self.table.set_alpha(float(knobs["alpha"]))
        if "capacity" in knobs:
            self.table.set_capacity(int(knobs["capacity"]) or None)

    def _apply_stop(self, rec: dict, _=None) -> None:
        self.done = True

    def _apply_start(self, rec: dict, _=None) -> None:
        self.done = False

    # ---- snapshots -------------------------------------------------------------------------------
    def to_snapshot(self) -> dict:
        return {
            "weights_path": self.weights_path, "done": self.done,
            "cursor": [self.dispenser.epoch, self.dispenser.position],
            "table": pickle.dumps(self.table, protocol=pickle.HIGHEST_PROTOCOL),  # our own file in the run dir
            "staleness": self.staleness.state(),
            "dropped_keys": [list(k) for k in self.dropped_keys], "counters": dict(self.counters),
            "generators": self.generators, "last_grant": self.last_grant,
            "knobs": [self.knob_version, self.learner_knobs, self.generator_knobs],
            "in_flight": {lid: {"lease": f["lease"], "step": f.get("step"), **_batch_wire(f)}
                          for lid, f in self.in_flight.items()},
            "trained": {lid: [{"step": e["step"], **_batch_wire(e)} for e in entries]
                        for lid, entries in self.trained.items()},
            "checkpointed": self.checkpointed, "replaying": self.replaying, "leases": self.leases.state(),
        }

    def load_snapshot(self, snap: dict) -> None:
        self.weights_path, self.done = snap["weights_path"], snap["done"]
        self.dispenser.epoch, self.dispenser.position = snap["cursor"]
        self.dispenser.sync_order()
        self.table = load_table(snap["table"])
        # a table pickled before the hub kept groups packed: from here on every held group is a PackedGroup
        self.table.map_groups(lambda g: PackedGroup.from_group(g) if isinstance(g, Group) else g)
        self.dropped_keys = {gkey(k) for k in snap["dropped_keys"]}
        counters = dict(snap["counters"])
        # snapshots from before buffer/staleness.py: the bound in the table, `running` among the counters
        legacy = {"max_staleness": self.table.max_staleness, "running": counters.pop("running", 0)}
        self.staleness.restore(snap.get("staleness", legacy))
        self.table.staleness = self.staleness
        self.counters = collections.Counter(counters)
        self.generators, self.last_grant = snap["generators"], snap["last_grant"]
        self.knob_version, self.learner_knobs, self.generator_knobs = snap.get("knobs", [0, {}, {}])
        self.in_flight = {lid: {"lease": f["lease"], **_batch_from_wire(f),
                                **({"step": f["step"]} if f.get("step") is not None else {})}
                          for lid, f in snap["in_flight"].items()}
        self.trained = {lid: [{"step": e["step"], **_batch_from_wire(e)} for e in entries]
                        for lid, entries in snap.get("trained", {}).items()}
        self.checkpointed, self.replaying = snap.get("checkpointed", {}), snap.get("replaying", {})
        self.leases.restore(snap.get("leases"))


def _batch_wire(batch: dict) -> dict:
    return {"keys": [list(k) for k in batch["keys"]],
            "groups": [g.data for g in batch["groups"]]}


def _batch_from_wire(batch: dict) -> dict:
    return {"keys": [gkey(k) for k in batch["keys"]], "groups": [PackedGroup.from_wire(g) for g in batch["groups"]]}
