"""The hub protocol: every request a client sends the buffer hub (and the weight server), defined once.

One verb, one frozen dataclass: constructing it (`Sample(num_groups=4, version=3, step=7)`) is how a client
builds a request, `to_msg()` the map that travels (msgpack, async_rl/wire.py; the client adds `rid`), and
`parse(msg)` is how the hub reads one: the request back, or ProtocolError naming the field, the value and the
fix. Parsers check what every hub would refuse (types, ranges, shape); what depends on the hub's state (a
group's trajectory count, a knob against the selector, a replayed step) stays with the hub's handlers.

Invariants:
- `parse(req.to_msg()) == req` for every request (tests/async_rl/test_protocol.py checks each verb).
- A field left at None is not sent, and a field a message leaves out (or sends as None) takes its default;
  fields the verb does not define are ignored (`schema` and `rid` travel with every message).
- `parse` raises nothing but ProtocolError (a wire.WireError), so a service answers a malformed message with
  an ERROR reply and goes on.
- PUT has one shape: `groups`, a non-empty list of groups (each one's msgpack bytes spliced in as they are).

Replies are maps built by the hub (`rid`, `version`, `weights_path` and a `type`, plus):
  ACQUIRE -> GRANT {prompts, knob_version, knobs} | DONE      PUT -> ACK {keys, duplicates}
  SAMPLE -> BATCH {lease, groups, stats, knob_version, knobs[, replay]}   STATS -> STATS {stats}
  INFO -> INFO {config, endpoints}   SET -> OK {knob_version}   VERSION -> OK [{behind}]   others -> OK
  HEARTBEAT -> none;  anything malformed -> ERROR {error}  (`error_reply`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from async_rl.types import Group, PackedGroup
from async_rl.wire import WireError

LEARNER_ID = "learner"  # the one learner of a run (rank 0 speaks for all of its ranks)
_REQUIRED = object()


class ProtocolError(WireError):
    """A message that does not fit its verb: names the field, the value and the fix."""


# ---- field checkers: (verb, name, value) -> the value as its type, or ProtocolError --------------------
def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(verb: str, name: str, value, must: str):
    raise ProtocolError(f"{verb} {name}={_show(value)}: {must}")


def _get(msg: dict, verb: str, name: str, default=_REQUIRED):
    value = msg.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ProtocolError(f"{verb}: field {name!r} is missing; send it (see async_rl/protocol.py)")
        return default
    return value


def _integer(verb: str, name: str, value, minimum: int | None = None, why: str = "") -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or \
            (minimum is not None and value < minimum):
        _fail(verb, name, value, f"must be an integer{'' if minimum is None else f' >= {minimum}'}{why}")
    return int(value)


def _int(msg: dict, verb: str, name: str, default=_REQUIRED, minimum: int | None = None, why: str = ""):
    value = _get(msg, verb, name, default)
    return None if value is None else _integer(verb, name, value, minimum, why)


def _str(msg: dict, verb: str, name: str, default=_REQUIRED, empty: bool = False):
    value = _get(msg, verb, name, default)
    if value is not None and (not isinstance(value, str) or not (value or empty)):
        _fail(verb, name, value, "must be a string" if empty else "must be a non-empty string")
    return value


def _number(verb: str, name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        _fail(verb, name, value, "must be a number")
    return value


def _map(msg: dict, verb: str, name: str, numbers_only: bool = False) -> dict:
    value = _get(msg, verb, name, {})
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(verb, name, value, "must be a map with string keys")
    if numbers_only:
        for k, v in value.items():
            _number(verb, f"{name}.{k}", v)
    return dict(value)


# ---- requests ---------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Request:
    """A verb's fields; `rid` is the client's request id, echoed in the reply (HubClient sets it)."""
    TYPE: ClassVar[str] = ""
    rid: Any = None

    def to_msg(self) -> dict:
        msg = {"type": self.TYPE}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                msg[f.name] = value
        return msg

    @classmethod
    def parse(cls, msg: dict) -> "Request":  # verbs without fields
        return cls(rid=msg.get("rid"))


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Request):
    """A generator is alive (fire and forget: no reply)."""
    TYPE: ClassVar[str] = "HEARTBEAT"
    generator_id: str

    @classmethod
    def parse(cls, msg: dict) -> "Heartbeat":
        return cls(rid=msg.get("rid"), generator_id=_str(msg, cls.TYPE, "generator_id"))


@dataclass(frozen=True, kw_only=True)
class Acquire(Request):
    """Up to `max_groups` prompts to generate groups for; resent with the same `acquire_seq`, the same grant."""
    TYPE: ClassVar[str] = "ACQUIRE"
    generator_id: str
    acquire_seq: int = -1
    max_groups: int = 1

    @classmethod
    def parse(cls, msg: dict) -> "Acquire":
        v = cls.TYPE
        return cls(rid=msg.get("rid"), generator_id=_str(msg, v, "generator_id"),
                   acquire_seq=_int(msg, v, "acquire_seq", -1, minimum=-1, why=" (-1: resends not recognised)"),
                   max_groups=_int(msg, v, "max_groups", 1, minimum=1, why=" (the prompts to grant at most)"))


@dataclass(frozen=True, kw_only=True)
class Put(Request):
    """Scored groups, stored exactly once by key (generator_id, seq); `stats` (gen_tokens, busy_s) is the
    work they cost, split evenly among them. Groups stay in their wire bytes (PackedGroup)."""
    TYPE: ClassVar[str] = "PUT"
    groups: list[PackedGroup]
    stats: dict = field(default_factory=dict)

    @classmethod
    def of(cls, groups: list[Group], stats: dict | None = None) -> "Put":
        return cls(groups=[PackedGroup.from_group(g) for g in groups], stats=dict(stats or {}))

    def to_msg(self) -> dict:
        return {"type": self.TYPE, "groups": [g.packed() for g in self.groups], "stats": self.stats,
                **({"rid": self.rid} if self.rid is not None else {})}

    @classmethod
    def parse(cls, msg: dict) -> "Put":
        wires = msg.get("groups")
        if not isinstance(wires, list) or not wires:
            _fail(cls.TYPE, "groups", wires, "must be a non-empty list of groups (Group.to_wire maps)")
        groups = []
        for i, w in enumerate(wires):
            try:
                groups.append(PackedGroup.from_wire(w))
            except (WireError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
                raise ProtocolError(f"PUT groups[{i}]: {exc}; send Group.to_wire() maps") from None
        return cls(rid=msg.get("rid"), groups=groups, stats=_map(msg, cls.TYPE, "stats", numbers_only=True))


@dataclass(frozen=True, kw_only=True)
class Drop(Request):
    """The sampling filter dropped group (generator_id, seq): its credit comes back, its work is counted."""
    TYPE: ClassVar[str] = "DROP"
    generator_id: str
    seq: int
    prompt_index: int | None = None
    stats: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, msg: dict) -> "Drop":
        v = cls.TYPE
        return cls(rid=msg.get("rid"), generator_id=_str(msg, v, "generator_id"), seq=_int(msg, v, "seq"),
                   prompt_index=_int(msg, v, "prompt_index", None), stats=_map(msg, v, "stats", numbers_only=True))


@dataclass(frozen=True, kw_only=True)
class Sample(Request):
    """A batch of `num_groups` groups for the learner at `version`, acking `ack_lease` first. With `step`
    the hub keeps the batch for replay until a later CHECKPOINT (and replays an older step's batch)."""
    TYPE: ClassVar[str] = "SAMPLE"
    num_groups: int
    version: int = 0
    learner_id: str = LEARNER_ID
    ack_lease: str | None = None
    step: int | None = None

    @classmethod
    def parse(cls, msg: dict) -> "Sample":
        v = cls.TYPE
        return cls(rid=msg.get("rid"), num_groups=_int(msg, v, "num_groups", minimum=1, why=" (groups per batch)"),
                   version=_int(msg, v, "version", 0, minimum=0), learner_id=_str(msg, v, "learner_id", LEARNER_ID),
                   ack_lease=_str(msg, v, "ack_lease", None, empty=True),
                   step=_int(msg, v, "step", None, minimum=0, why=" (the learner step this batch trains)"))


@dataclass(frozen=True, kw_only=True)
class Ack(Request):
    """The learner trained the batch it holds under `lease`: its groups count as consumed."""
    TYPE: ClassVar[str] = "ACK"
    lease: str
    learner_id: str = LEARNER_ID

    @classmethod
    def parse(cls, msg: dict) -> "Ack":
        return cls(rid=msg.get("rid"), lease=_str(msg, cls.TYPE, "lease", empty=True),
                   learner_id=_str(msg, cls.TYPE, "learner_id", LEARNER_ID))


@dataclass(frozen=True, kw_only=True)
class Checkpoint(Request):
    """The learner's checkpoint at `step` is complete: batches of earlier steps need no replay."""
    TYPE: ClassVar[str] = "CHECKPOINT"
    step: int
    learner_id: str = LEARNER_ID

    @classmethod
    def parse(cls, msg: dict) -> "Checkpoint":
        return cls(rid=msg.get("rid"), step=_int(msg, cls.TYPE, "step", minimum=0, why=" (a checkpoint step)"),
                   learner_id=_str(msg, cls.TYPE, "learner_id", LEARNER_ID))


@dataclass(frozen=True, kw_only=True)
class Priority(Request):
    """Replace held groups' priorities by key: `updates` = [[generator_id, seq, priority], ...]."""
    TYPE: ClassVar[str] = "PRIORITY"
    updates: list[list]

    @classmethod
    def parse(cls, msg: dict) -> "Priority":
        updates = _get(msg, cls.TYPE, "updates")
        if not isinstance(updates, list):
            _fail(cls.TYPE, "updates", updates, "must be a list of [generator_id, seq, priority]")
        rows = []
        for i, u in enumerate(updates):
            if not (isinstance(u, (list, tuple)) and len(u) == 3 and isinstance(u[0], str)):
                _fail(cls.TYPE, f"updates[{i}]", u, "must be [generator_id, seq, priority]")
            seq = _integer(cls.TYPE, f"updates[{i}].seq", u[1])
            p = float(_number(cls.TYPE, f"updates[{i}].priority", u[2]))
            if not (p >= 0 and math.isfinite(p)):
                _fail(cls.TYPE, f"updates[{i}].priority", u[2], "priorities must be finite and >= 0")
            rows.append([u[0], seq, p])
        return cls(rid=msg.get("rid"), updates=rows)


@dataclass(frozen=True, kw_only=True)
class Version(Request):
    """The learner published weights `version` at `weights_path` (one at or below the hub's is a no-op)."""
    TYPE: ClassVar[str] = "VERSION"
    version: int
    weights_path: str

    @classmethod
    def parse(cls, msg: dict) -> "Version":
        return cls(rid=msg.get("rid"),
                   version=_int(msg, cls.TYPE, "version", minimum=0, why=" (versions only grow from 0)"),
                   weights_path=_str(msg, cls.TYPE, "weights_path", empty=True))


@dataclass(frozen=True, kw_only=True)
class Set(Request):
    """Live knobs: the hub's own (`knobs`), and dotted config paths -> values passed on to the learner and
    the generators (already checked against the run's config by `async-rl set`)."""
    TYPE: ClassVar[str] = "SET"
    knobs: dict = field(default_factory=dict)
    learner: dict = field(default_factory=dict)
    generator: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, msg: dict) -> "Set":
        req = cls(rid=msg.get("rid"), **{k: _map(msg, cls.TYPE, k) for k in ("knobs", "learner", "generator")})
        if not (req.knobs or req.learner or req.generator):
            raise ProtocolError("SET: no knobs given; send knobs, learner or generator (e.g. async-rl set KEY=VALUE)")
        return req


@dataclass(frozen=True, kw_only=True)
class Stats(Request):
    """Everything `async-rl status` shows."""
    TYPE: ClassVar[str] = "STATS"


@dataclass(frozen=True, kw_only=True)
class Info(Request):
    """What a host without the run dir needs to join: the run's config and advertised endpoints."""
    TYPE: ClassVar[str] = "INFO"


@dataclass(frozen=True, kw_only=True)
class Start(Request):
    """A resumed run: generators may acquire work again after an earlier STOP."""
    TYPE: ClassVar[str] = "START"


@dataclass(frozen=True, kw_only=True)
class Stop(Request):
    """The run is over: every ACQUIRE gets DONE."""
    TYPE: ClassVar[str] = "STOP"


HUB_REQUESTS: dict[str, type[Request]] = {c.TYPE: c for c in (
    Acquire, Put, Drop, Sample, Ack, Priority, Version, Set, Stats, Stop, Start, Heartbeat, Checkpoint, Info)}


# ---- the weight server's requests (async_rl/weight_server.py) ------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Versions(Request):
    """The weight versions that can be pulled now (0 is the initial checkpoint)."""
    TYPE: ClassVar[str] = "VERSIONS"


@dataclass(frozen=True, kw_only=True)
class Manifest(Request):
    """Version `version`'s files, sizes and per-chunk digests."""
    TYPE: ClassVar[str] = "MANIFEST"
    version: int

    @classmethod
    def parse(cls, msg: dict) -> "Manifest":
        return cls(rid=msg.get("rid"), version=_int(msg, cls.TYPE, "version", minimum=0))


@dataclass(frozen=True, kw_only=True)
class Chunk(Request):
    """Chunk `index` of file `name` (a name from the version's MANIFEST) of `version`."""
    TYPE: ClassVar[str] = "CHUNK"
    version: int
    name: str
    index: int

    @classmethod
    def parse(cls, msg: dict) -> "Chunk":
        v = cls.TYPE
        return cls(rid=msg.get("rid"), version=_int(msg, v, "version", minimum=0), name=_str(msg, v, "name"),
                   index=_int(msg, v, "index", minimum=0, why=" (chunk numbers come from the MANIFEST)"))


WEIGHT_REQUESTS: dict[str, type[Request]] = {c.TYPE: c for c in (Versions, Manifest, Chunk)}


def parse(msg: dict, verbs: dict[str, type[Request]] = HUB_REQUESTS) -> Request:
    """The request `msg` carries, checked; ProtocolError for an unknown type or a malformed field."""
    kind = msg.get("type") if isinstance(msg, dict) else None
    cls = verbs.get(kind) if type(kind) is str else None
    if cls is None:
        raise ProtocolError(f"type={_show(kind)}: unknown message type; expected one of {list(verbs)}")
    return cls.parse(msg)


def error_reply(rid, text: str) -> dict:
    """The ERROR reply every service sends for a request it cannot serve (HubClient raises HubError)."""
    return {"type": "ERROR", "rid": rid, "error": text}
