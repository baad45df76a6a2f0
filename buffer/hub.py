"""The buffer hub: a ZeroMQ ROUTER service holding groups between generators and the learner.

Invariants it keeps:
- No group whose staleness (learner version - behavior_version) exceeds `max_staleness` is ever returned
  by SAMPLE; such groups are evicted and counted (`buffer/evicted_stale`).
- Admission (AReaL's rule, counting live groups; buffer/staleness.py): a generator may start a group only
  while `(max_staleness + v + 1) * batch_groups - (accepted - wasted + running) > 0`, and never more groups
  than the run still needs.
- Nothing acknowledged is lost: every state change is a log record (buffer/durable.py) written before
  the reply that acknowledges it; a hub killed with SIGKILL restarts into the same state.
- Every request is idempotent, so clients simply resend on timeout: PUT by group key, ACQUIRE by
  (generator_id, acquire_seq), SAMPLE by learner_id (an un-acked batch is delivered again), VERSION by number
  (one at or below the hub's is a no-op: a learner retraining replayed steps publishes them again).
- Nothing acked by the learner is lost to a learner crash: a SAMPLE that names its `step` has its batch kept
  after the ack until a CHECKPOINT at a later step; a learner restarted from checkpoint k asks for step k,
  k+1, ... and gets those same batches again (counted in `replayed`, not in `consumed`), then its un-acked
  in-flight batch, then new ones.
- A malformed message gets an ERROR reply and is counted (`buffer/malformed`); it never crashes the hub.

Messages are read by async_rl/protocol.py (one parser per verb). Requests that cannot be served yet (ACQUIRE
with no credit, SAMPLE with too few fresh groups) are parked and answered when they can be. `Hub` is the logic
(testable without sockets; its docstring follows one message through it); buffer/service.py is the loop.
"""
from __future__ import annotations

import itertools
import time
import uuid

from async_rl import config as config_mod
from async_rl import protocol as P
from async_rl import wire
from async_rl.config_rules.buffer import max_staleness_problem
from async_rl.types import PackedGroup
from buffer import priorities
from buffer.durable import DurableLog
from buffer.state import HubState

Reply = tuple[bytes, dict]


class Hub:
    """The hub's logic, one message at a time. The lifecycle of a message (buffer/service.py runs it):

    1. `handle_early(ident, msg)`: first `settle()` (below), so this message sees every earlier one applied;
       then `protocol.parse(msg)` turns the map into a typed request, or the sender gets an ERROR naming the
       bad field; then the verb's handler `_on_<verb>` runs and returns the replies. A handler changes state
       only through `commit(record)`: the record is appended to the write-ahead log and applied to
       `HubState` (`HubState.apply`, the same code WAL replay runs), except a PUT's records, whose apply is
       deferred (`pending`). A request that cannot be served yet (ACQUIRE without credit, SAMPLE with too few
       fresh groups) is parked and gets no reply now; `_serve_acquires` / `_serve_sample` answer it after
       any change that may unblock it.
    2. `flush()`, before any reply leaves: the log is made durable (one fsync for everything handled since
       the last flush: group commit), and a snapshot is written when one is due. So nothing is acknowledged
       before it would survive a SIGKILL.
    3. The replies are sent.
    4. `settle()`: the deferred PUT records are applied (the groups inserted into the table) while the
       client prepares its next request, and a parked SAMPLE they unblock is answered (back to 2 for it).
       Sending a PUT's ACK before its insert is safe: the ACK needs the record logged and the group checked,
       both done in 1; a hub killed in between replays the record.

    `handle(ident, msg)` is steps 1 and 4 without sockets: every effect applied on return (tests, tools).
    """

    def __init__(self, cfg: config_mod.Config, prompts: list[dict], log: DurableLog | None = None):
        self.cfg = cfg
        self.state = HubState(cfg, prompts)
        self.priority_fn = priorities.resolve(cfg.buffer.priority_fn)
        self.log = log
        self.recovered_records = 0
        if log is not None:
            snap, records = log.recover()
            if snap is not None:
                self.state.load_snapshot(snap)
            for rec in records:
                self.state.apply(rec)
            self.recovered_records = len(records)
            for gen in self.state.generators.values():
                gen["last_seen"] = time.time()  # give every generator a fresh timeout after a restart
        self.advertised: dict[str, str] = {}  # endpoints of the run others should use (INFO), set by the service
        self.parked_acquire: dict[str, tuple[bytes, P.Acquire]] = {}
        self.parked_sample: tuple[bytes, P.Sample] | None = None
        self.pending: list[tuple[dict, PackedGroup]] = []  # PUT records logged and acked, applied by settle()
        self.records_since_snapshot = 0
        self.started = time.time()
        self._handlers = {kind: getattr(self, f"_on_{kind.lower()}") for kind in P.HUB_REQUESTS}
        # lease ids: this hub instance's random prefix + a counter (unique across restarts, no urandom per batch)
        self._lease_prefix, self._leases = uuid.uuid4().hex[:16], itertools.count()

    # ---- durability ------------------------------------------------------------------------------
    def commit(self, rec: dict, live=None, defer: bool = False) -> None:
        """Log `rec`, then apply it (`live`: what the live path already computed, see HubState.apply), or with
        `defer` leave the apply to `settle()`, which runs before any other message is handled."""
        if self.log is not None:
            self.log.append(rec)
            self.records_since_snapshot += 1
        if defer:
            self.pending.append((rec, live))
        else:
            self.state.apply(rec, live)

    def settle(self) -> list[Reply]:
        """Step 4: apply the deferred PUT records (their ACKs may be out already), then serve the SAMPLE they
        may unblock; its replies go through `flush` like any other. The loop calls it right after sending
        replies, so the inserts overlap the client's next request; `handle_early` calls it first, so every
        message sees every earlier one applied."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        for rec, group in pending:
            self.state.apply(rec, group)
        return self._serve_sample()

    def flush(self) -> None:
        """Step 2, before replies go out: group commit (what they acknowledge becomes durable), and a snapshot
        when one is due (never over deferred records: the snapshot must hold everything the log before it holds)."""
        if self.log is None:
            return
        self.log.commit()
        if self.records_since_snapshot >= self.cfg.buffer.snapshot_interval and not self.pending:
            self.log.snapshot(self.state.to_snapshot())
            self.records_since_snapshot = 0

    # ---- admission -------------------------------------------------------------------------------
    def credits_available(self) -> int:
        return self.state.credits()

    # ---- dispatch --------------------------------------------------------------------------------
    def handle(self, ident: bytes, msg: dict) -> list[Reply]:
        """The replies to `msg` (a decoded message map), with every state change it causes applied."""
        out = self.handle_early(ident, msg)
        return out + self.settle()

    def handle_early(self, ident: bytes, msg: dict) -> list[Reply]:
        """Step 1 of the lifecycle (see the class docstring): the replies to `msg`; a PUT's inserts may stay
        deferred to the next `settle()`. Never raises on a malformed message: it gets an ERROR reply."""
        out = self.settle()
        rid = msg.get("rid") if isinstance(msg, dict) else None
        try:
            req = P.parse(msg)
            return out + self._handlers[req.TYPE](ident, req)
        except wire.WireError as exc:  # (ProtocolError is one)
            return out + [(ident, self._error(rid, str(exc)))]
        except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError, RecursionError) as exc:
            return out + [(ident, self._error(rid, f"{msg.get('type')}: malformed message ({exc!r})"))]

    def _error(self, rid, text: str) -> dict:
        self.state.counters["malformed"] += 1
        return P.error_reply(rid, text)

    def _reply(self, req: P.Request, **fields) -> dict:
        return {"rid": req.rid, "version": self.state.version, "weights_path": self.state.weights_path, **fields}

    def _knobs(self, side: str) -> dict:
        return {"knob_version": self.state.knob_version, "knobs": getattr(self.state, f"{side}_knobs")}

    def _seen(self, gid: str) -> None:
        self.state.generator(gid)["last_seen"] = time.time()

    def _on_heartbeat(self, ident: bytes, req: P.Heartbeat) -> list[Reply]:
        self._seen(req.generator_id)
        return []  # fire and forget

    def _on_acquire(self, ident: bytes, req: P.Acquire) -> list[Reply]:
        gid, seq = req.generator_id, req.acquire_seq
        self._seen(gid)
        last = self.state.last_grant.get(gid)
        if last is not None and seq >= 0 and last["acquire_seq"] == seq:
            return [(ident, self._reply(req, type="GRANT", prompts=last["prompts"], **self._knobs("generator")))]
        if self.state.done:
            return [(ident, self._reply(req, type="DONE"))]
        self.parked_acquire[gid] = (ident, req)
        return self._serve_acquires()

    def _serve_acquires(self) -> list[Reply]:
        out = []
        for gid, (ident, req) in list(self.parked_acquire.items()):
            n = min(req.max_groups, self.credits_available())
            if n <= 0 and not self.state.done:
                continue
            del self.parked_acquire[gid]
            if self.state.done:
                out.append((ident, self._reply(req, type="DONE")))
                continue
            again = [p for _, p in self.state.leases.reissue[:n]]  # a lost generator's prompts go first
            prompts = [{"prompt_index": p, **self.state.dispenser.prompts[p]} for p in again]
            for _ in range(n - len(again)):
                index, prompt = self.state.dispenser.next()
                prompts.append({"prompt_index": index, **prompt})  # input, label, and metadata / tools if any
            self.commit({"op": "grant", "gid": gid, "acquire_seq": req.acquire_seq,
                         "prompts": prompts, "cursor": [self.state.dispenser.epoch, self.state.dispenser.position],
                         **({"reissued": len(again)} if again else {})})
            out.append((ident, self._reply(req, type="GRANT", prompts=prompts, **self._knobs("generator"))))
        return out

    def _check_group(self, group: PackedGroup) -> None:
        n = self.cfg.rollout.n_samples_per_prompt
        if group.num_trajectories != n:
            raise ValueError(f"group {group.key}: {group.num_trajectories} trajectories, the run's "
                             f"n_samples_per_prompt is {n}")
        if group.behavior_version > self.state.version:
            raise ValueError(f"group {group.key}: behavior_version {group.behavior_version} is ahead of the "
                             f"hub's version {self.state.version}")

    def _on_put(self, ident: bytes, req: P.Put) -> list[Reply]:
        """PUT carries the groups of a whole engine call (one round trip and one fsync); the whole message is
        checked before anything is logged, so it is stored entirely or not at all. Groups stay in their wire
        bytes (PackedGroup): checked on their headers, logged and handed to the learner as they came. The
        inserts are deferred (see settle): the ACK goes out first."""
        groups = req.groups
        for group in groups:
            self._check_group(group)
        share = {k: v / len(groups) for k, v in req.stats.items()}
        keys, duplicates, here = [], [], set()
        now = time.time()
        resolved: dict[tuple, int] = {}  # (gid, prompt_index) -> groups of this PUT resolving it so far
        tickets: set[int] = set()  # the prompt tickets they resolve (as HubState.apply will, in order)
        for group in groups:
            self.state.generator(group.generator_id)["last_seen"] = now
            duplicate = self.state.seen(group.key) or group.key in here  # (a key twice in one PUT)
            if not duplicate:  # a prompt that already has its group (buffer/prompts.py PromptLeases)
                at = (group.generator_id, group.prompt_index)
                found = self.state.leases.candidates(*at)[resolved.get(at, 0):]
                resolved[at] = resolved.get(at, 0) + 1
                if found:
                    duplicate = found[0][0] in tickets or not self.state.leases.first(found[0][0])
                    tickets.add(found[0][0])
            here.add(group.key)
            priority = 0.0 if duplicate else priorities.compute(self.priority_fn, group, self.state.version)
            self.commit({"op": "put", "blob": group.data, "stats": share, "priority": priority}, group, defer=True)
            keys.append(list(group.key))
            duplicates.append(duplicate)
        return [(ident, self._reply(req, type="ACK", keys=keys, duplicates=duplicates))]

    def _on_drop(self, ident: bytes, req: P.Drop) -> list[Reply]:
        gid, stats = req.generator_id, req.stats
        self._seen(gid)
        self.commit({"op": "drop", "gid": gid, "seq": req.seq,
                     **({"prompt_index": req.prompt_index} if req.prompt_index is not None else {}),
                     "stats": {"gen_tokens": int(stats.get("gen_tokens", 0)), "busy_s": float(stats.get("busy_s", 0.0))}})
        return [(ident, self._reply(req, type="OK"))] + self._serve_acquires()

    def _on_sample(self, ident: bytes, req: P.Sample) -> list[Reply]:
        learner = req.learner_id
        out = self._ack(req.ack_lease, learner)
        if req.step is not None:
            replay = self._replay(ident, req, learner, req.step)
            if replay is not None:
                return out + replay
        self.parked_sample = (ident, req)
        return out + self._serve_sample()

    def _replay(self, ident: bytes, req: P.Sample, learner: str, step: int) -> list[Reply] | None:
        """The batch the learner trained at `step` before it restarted from an older checkpoint, or None
        when `step` is new (or the in-flight one); an ERROR when that batch is no longer kept."""
        entry = self.state.trained_entry(learner, step)
        if entry is None:
            kept = [e["step"] for e in self.state.trained.get(learner, [])]
            flight = self.state.in_flight.get(learner, {}).get("step")
            later = [s for s in kept + ([flight] if flight is not None else []) if s > step]
            if not later:
                return None
            return [(ident, self._error(req.rid, f"step={step}: the learner already trained steps {sorted(later)} but the "
                                             f"hub keeps only steps {kept} since its checkpoint at step "
                                             f"{self.state.checkpointed.get(learner, 0)}; resume it from a checkpoint "
                                             f"at or after step {self.state.checkpointed.get(learner, 0)}"))]
        self.parked_sample = None
        self.commit({"op": "replay", "learner": learner, "step": step})
        reply = self._reply(req, type="BATCH", lease=f"replay-{step}", replay=True,
                            groups=[g.packed() for g in entry["groups"]], **self._knobs("learner"),
                            stats=self.counters())
        return [(ident, reply)]

    def _on_checkpoint(self, ident: bytes, req: P.Checkpoint) -> list[Reply]:
        """The learner's checkpoint at `step` is complete: the batches of earlier steps need no replay."""
        learner, step = req.learner_id, req.step
        if step > self.state.checkpointed.get(learner, 0) or any(e["step"] < step for e in self.state.trained.get(learner, [])):
            self.commit({"op": "checkpoint", "learner": learner, "step": step})
        return [(ident, self._reply(req, type="OK"))]

    def _on_ack(self, ident: bytes, req: P.Ack) -> list[Reply]:
        out = self._ack(req.lease, req.learner_id)
        return [(ident, self._reply(req, type="OK"))] + out

    def _ack(self, lease: str | None, learner: str) -> list[Reply]:
        flight = self.state.in_flight.get(learner)
        if lease and flight is not None and flight["lease"] == lease:
            self.commit({"op": "ack", "learner": learner, "lease": lease})
        return []

    def _serve_sample(self) -> list[Reply]:
        if self.parked_sample is None:
            return []
        ident, req = self.parked_sample
        learner, n = req.learner_id, req.num_groups
        # the learner trains at the newest version anyone told us of: a parked request may predate a VERSION
        version = max(req.version, self.state.version)
        if version > self.state.table.version:
            self.commit({"op": "advance", "version": version})
        flight = self.state.in_flight.get(learner)
        if flight is not None:  # a restarted learner: deliver its un-acked batch again, minus what went stale
            limit = self.state.staleness.limit(version)
            stale = [list(k) for k, g in zip(flight["keys"], flight["groups"]) if g.behavior_version < limit]
            if stale:
                self.commit({"op": "evict_in_flight", "learner": learner, "keys": stale})
        need = max(0, n - (len(flight["keys"]) if flight is not None else 0))
        sampled = self.state.table.sample(need) if need else []
        if need and not sampled:
            return self._serve_acquires()  # too few fresh groups; eviction may have returned credits
        self.parked_sample = None
        lease = flight["lease"] if flight is not None and not sampled else f"{self._lease_prefix}-{next(self._leases)}"
        self.commit({"op": "lease", "learner": learner, "lease": lease, "keys": [list(k) for k, _ in sampled],
                     **({"step": req.step} if req.step is not None else {})}, sampled)
        flight = self.state.in_flight[learner]
        reply = self._reply(req, type="BATCH", lease=lease, groups=[g.packed() for g in flight["groups"]],
                            **self._knobs("learner"),
                            stats=self.counters())
        return [(ident, reply)] + self._serve_acquires()

    def _on_priority(self, ident: bytes, req: P.Priority) -> list[Reply]:
        self.commit({"op": "priorities", "updates": req.updates})
        return [(ident, self._reply(req, type="OK"))]

    def _on_version(self, ident: bytes, req: P.Version) -> list[Reply]:
        version = req.version
        if version < self.state.version:  # a restarted learner retraining replayed steps: the hub is ahead
            return [(ident, self._reply(req, type="OK", behind=True))]
        if version > self.state.version or req.weights_path != self.state.weights_path:
            self.commit({"op": "version", "version": version, "weights_path": req.weights_path})
        return [(ident, self._reply(req, type="OK"))] + self._serve_acquires()

    def _on_set(self, ident: bytes, req: P.Set) -> list[Reply]:
        """Live knobs: `knobs` are the hub's (checked here); `learner` / `generator` map dotted config paths to
        values that `async-rl set` already validated against the run's config, passed on to those processes."""
        error = _check_knobs(req.knobs, self.state.table.alpha is not None) if req.knobs else None
        if error:
            return [(ident, self._error(req.rid, error))]
        self.commit({"op": "set", "knobs": req.knobs, "learner": req.learner, "generator": req.generator})
        return [(ident, self._reply(req, type="OK", knob_version=self.state.knob_version))] + \
            self._serve_sample() + self._serve_acquires()

    def _on_stats(self, ident: bytes, req: P.Stats) -> list[Reply]:
        return [(ident, self._reply(req, type="STATS", stats=self.stats()))]

    def _on_info(self, ident: bytes, req: P.Info) -> list[Reply]:
        """What a host without the run dir needs to join (`async-rl attach --hub`): the run's resolved config
        and the endpoints it advertises (the weight server's, to pull weights from)."""
        return [(ident, self._reply(req, type="INFO", config=self.cfg.to_dict(), endpoints=dict(self.advertised)))]

    def _on_start(self, ident: bytes, req: P.Start) -> list[Reply]:
        """A resumed run: generators may acquire work again after an earlier STOP."""
        if self.state.done:
            self.commit({"op": "start"})
        for gid, gen in self.state.generators.items():  # every generator of the last run is gone
            if gen["running"] > 0 or self.state.leases.held.get(gid):
                self.commit({"op": "reclaim", "gid": gid, "n": gen["running"]})
        return [(ident, self._reply(req, type="OK"))] + self._serve_acquires()

    def _on_stop(self, ident: bytes, req: P.Stop) -> list[Reply]:
        if not self.state.done:
            self.commit({"op": "stop"})
        return [(ident, self._reply(req, type="OK"))] + self._serve_acquires()

    # ---- liveness --------------------------------------------------------------------------------
    def reclaim_silent_generators(self, now: float | None = None) -> list[Reply]:
        """Return the credits of generators silent for longer than buffer.generator_timeout; the prompts they
        held are granted again (buffer/prompts.py PromptLeases)."""
        now = time.time() if now is None else now
        out = self.settle()
        for gid, gen in self.state.generators.items():
            if (gen["running"] > 0 or self.state.leases.held.get(gid)) and \
                    now - gen["last_seen"] > self.cfg.buffer.generator_timeout:
                self.commit({"op": "reclaim", "gid": gid, "n": gen["running"]})
        return out + self._serve_acquires()

    def counters(self) -> dict:
        """What every BATCH carries, for the learner's `buffer/*` metrics: the accounting counters (accepted ==
        consumed + evicted_stale + size + in_flight), admission and the generators' totals. A learner samples
        per step, so this is built per batch: keep it to O(1) work (plus O(generators) for the totals)."""
        s, t = self.state, self.state.table
        out = {**t.counters, **s.counters}
        out["evicted_stale"] = t.counters["evicted_stale"] + s.counters["evicted_in_flight"]
        out["running"] = s.staleness.running
        gen_tokens = gen_busy_s = 0.0
        for g in s.generators.values():
            gen_tokens += g["gen_tokens"]
            gen_busy_s += g["busy_s"]
        out.update(version=s.version, size=len(t), reissue_pending=len(s.leases.reissue), in_flight=sum(len(f["keys"]) for f in s.in_flight.values()),
                   replay_log_batches=sum(len(e) for e in s.trained.values()), max_staleness=s.max_staleness,
                   credits_available=self.credits_available(), gen_tokens=gen_tokens, gen_busy_s=gen_busy_s,
                   num_generators=len(s.generators), done=s.done)
        return out

    def stats(self, per_generator: bool = True) -> dict:
        """Everything STATS (and `async-rl status`) shows: `counters()` plus the table's knobs and staleness
        histogram, the hub's uptime and log position, and (per_generator) each generator's counts."""
        s, t = self.state, self.state.table
        now = time.time()
        out = self.counters()
        out.update(alpha=t.alpha, capacity=t.capacity,
                   staleness_hist={str(k): v for k, v in t.staleness_hist().items()}, prompt_epoch=s.dispenser.epoch,
                   uptime_s=now - self.started, recovered_records=self.recovered_records,
                   wal_lsn=self.log.lsn if self.log else None)
        if per_generator:
            out["generators"] = {gid: {k: g[k] for k in ("groups", "running", "dropped", "gen_tokens")} | {
                "alive": now - g["last_seen"] < self.cfg.buffer.generator_timeout} for gid, g in s.generators.items()}
        return out


def _check_knobs(knobs: dict, prioritized: bool) -> str | None:
    """The error message for a bad live knob, or None (checked before logging: a logged record must apply)."""
    allowed = {"max_staleness", "alpha", "capacity"}
    if set(knobs) - allowed:
        return f"knobs={sorted(knobs)}: the hub's live knobs are {sorted(allowed)}"
    if "max_staleness" in knobs and max_staleness_problem(knobs["max_staleness"]):
        return max_staleness_problem(knobs["max_staleness"])
    v = knobs.get("capacity", 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        return f"capacity={v!r}: must be an integer >= 0 (0 = unbounded)"
    if "alpha" in knobs:
        a = knobs["alpha"]
        if not prioritized:
            return f"alpha={a!r}: only the prioritized selector has an alpha; set buffer.selector=prioritized at launch"
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 <= a < float("inf"):
            return f"alpha={a!r}: must be a finite number >= 0"
    return None
