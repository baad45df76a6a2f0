"""The embedded engine's wire protocol: SGLang's native HTTP request bodies parsed and validated into
engine work, and engine results formatted as SGLang replies.

Invariant: nothing reaches the scheduler unvalidated. A malformed body raises `BadRequest` whose message
names the field, the value and the fix; the server turns it into HTTP 400 and keeps serving. Replies carry
exactly the fields a real SGLang server returns for the same request (`output_ids`, `meta_info` with
`finish_reason`, `output_token_logprobs` triples, `weight_version` and per-token `weight_versions` spans),
plus `meta_info.token_versions` (one version per output token) which SGLang clients ignore.
"""
from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

import torch

# Output-formatting keys SGLang accepts that change nothing here.
IGNORED_SAMPLING_KEYS = {"skip_special_tokens", "spaces_between_special_tokens"}
PAUSE_MODES = ("abort", "in_place", "retract")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


class BadRequest(ValueError):
    """A client error; its message names the field, the value and the fix."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings (SGLang's `stop`), checked on decoded text
    ignore_eos: bool = False  # as SGLang: also ignores stop_token_ids (not stop strings)
    no_stop_trim: bool = False
    sampling_seed: int | None = None

    def __post_init__(self):
        # looked up for every generated token: a set, so hundreds of stop ids cost no more than one
        self.stop_token_set = frozenset(self.stop_token_ids)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


SAMPLING_RULES = {  # name: (accepts the value?, the rule an error message states)
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 = greedy)"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (off) or an int >= 1"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "stop_token_ids": (lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of token ids (ints)"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) and x for x in v)),
             "a string or a list of non-empty strings"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
    "no_stop_trim": (lambda v: isinstance(v, bool), "true or false"),
    "sampling_seed": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
}


def parse_sampling_params(raw, where: str = "sampling_params") -> SamplingParams:
    if not isinstance(raw, dict):
        raise BadRequest(f"{where}={raw!r}: must be a JSON object of sampling parameters")
    unknown = sorted(set(raw) - set(SAMPLING_RULES) - IGNORED_SAMPLING_KEYS)
    if unknown:
        raise BadRequest(f"{where}: unknown key(s) {unknown}; supported keys are {sorted(SAMPLING_RULES)}")
    values = {}
    for name, value in raw.items():
        if value is None or name in IGNORED_SAMPLING_KEYS:  # SGLang clients send null for "unset"
            continue
        accepts, rule = SAMPLING_RULES[name]
        if not accepts(value):
            raise BadRequest(f"{where}.{name}={value!r}: must be {rule}")
        values[name] = [value] if name == "stop" and isinstance(value, str) else value
    return SamplingParams(**values)


@dataclass
class Sequence:
    """One prompt being generated; its output so far survives a retract (it is re-prefilled from
    `context_ids`) and an abort (returned with finish_reason abort)."""
    prompt_ids: list[int]
    params: SamplingParams
    rid: str
    request: "Request"
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    finish_reason: dict | None = None
    generator: torch.Generator | None = None

    def context_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class Request:
    """One /generate call: its sequences, done when every one of them finished (or the server failed it)."""

    def __init__(self, return_logprob: bool = False, is_batch: bool = False):
        self.return_logprob, self.is_batch = return_logprob, is_batch
        self.sequences: list[Sequence] = []
        self.error: str | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def finish(self, seq: Sequence, reason: dict) -> None:
        seq.finish_reason = reason
        with self._lock:
            if all(s.finish_reason is not None for s in self.sequences):
                self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()


def parse_generate_body(body, vocab_size: int, max_positions: int, device="cpu") -> Request:
    """Validate a /generate body into a Request of Sequences."""
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object with input_ids and sampling_params")
    if "input_ids" not in body:
        raise BadRequest("input_ids: missing; send token ids (text input is not supported by this engine)")
    ids = body["input_ids"]
    is_batch = isinstance(ids, list) and len(ids) > 0 and isinstance(ids[0], list)
    prompts = ids if is_batch else [ids]
    raw_params = body.get("sampling_params") or {}
    if isinstance(raw_params, list) and len(raw_params) != len(prompts):
        raise BadRequest(f"sampling_params: list of {len(raw_params)} for {len(prompts)} prompts; "
                         "send one per prompt or a single object")
    raw_params = raw_params if isinstance(raw_params, list) else [raw_params] * len(prompts)
    return_logprob = body.get("return_logprob", False)
    if not isinstance(return_logprob, bool):
        raise BadRequest(f"return_logprob={return_logprob!r}: must be true or false")
    rids = _request_ids(body.get("rid"), len(prompts), is_batch)
    request = Request(return_logprob, is_batch)
    for i, (prompt, raw) in enumerate(zip(prompts, raw_params)):
        name = f"input_ids[{i}]" if is_batch else "input_ids"
        _check_prompt(prompt, name, vocab_size)
        params = parse_sampling_params(raw, f"sampling_params[{i}]" if is_batch else "sampling_params")
        if len(prompt) + params.max_new_tokens > max_positions:
            raise BadRequest(f"{name}: prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} "
                             f"exceeds the model's max_position_embeddings={max_positions}; "
                             "shorten the prompt or lower max_new_tokens")
        gen = None if params.sampling_seed is None else torch.Generator(device=device).manual_seed(params.sampling_seed)
        request.sequences.append(Sequence(list(prompt), params, rids[i], request, generator=gen))
    return request


def _check_prompt(prompt, name: str, vocab_size: int) -> None:
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest(f"{name}={prompt!r}: must be a non-empty list of token ids")
    for j, tok in enumerate(prompt):
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab_size:
            raise BadRequest(f"{name}[{j}]={tok!r}: must be a token id in [0, vocab_size={vocab_size})")


def _request_ids(rid, n: int, is_batch: bool) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(n)]
    if isinstance(rid, list):
        if len(rid) != n or not all(isinstance(r, (str, int)) for r in rid):
            raise BadRequest(f"rid: list of {len(rid)} for {n} prompts; send one string id per prompt")
        return [str(r) for r in rid]
    if not isinstance(rid, (str, int)):
        raise BadRequest(f"rid={rid!r}: must be a string (or a list of strings, one per prompt)")
    return [f"{rid}_{i}" for i in range(n)] if is_batch else [str(rid)]


def version_spans(versions: list[int]) -> list[dict]:
    """Per-token versions -> SGLang's `meta_info.weight_versions` spans [{version, start, end}]."""
    spans: list[dict] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == str(v):
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": str(v), "start": i, "end": i + 1})
    return spans


def generate_reply(seq: Sequence, current_version: int, return_logprob: bool, text: str) -> dict:
    """The SGLang reply for one finished sequence; a matched stop string is trimmed from `text` (not from
    `output_ids`) unless no_stop_trim, as SGLang does."""
    matched = (seq.finish_reason or {}).get("matched")
    if isinstance(matched, str) and not seq.params.no_stop_trim and matched in text:
        text = text[:text.rfind(matched)]
    versions = seq.token_versions
    meta = {"id": seq.rid, "finish_reason": seq.finish_reason, "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(seq.output_ids),
            "weight_version": str(versions[-1] if versions else current_version),
            "weight_versions": version_spans(versions), "token_versions": versions}
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(seq.output_logprobs, seq.output_ids)]
    return {"text": text, "output_ids": seq.output_ids, "meta_info": meta}


# ---- control bodies ------------------------------------------------------------------------------------

def _obj(body, what: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"body: {what} takes a JSON object")
    return body


def parse_pause(body) -> str:
    mode = _obj(body, "/pause_generation").get("mode", "abort")
    if mode not in PAUSE_MODES:
        raise BadRequest(f"mode={mode!r}: must be one of {list(PAUSE_MODES)} (SGLang's pause modes)")
    return mode


def parse_abort(body) -> tuple[str, bool]:
    body = _obj(body, "/abort_request")
    rid, abort_all = body.get("rid", ""), body.get("abort_all", False)
    if not isinstance(abort_all, bool):
        raise BadRequest(f"abort_all={abort_all!r}: must be true or false")
    if not isinstance(rid, str):
        raise BadRequest(f"rid={rid!r}: must be the string id of a request")
    return rid, abort_all


def parse_weight_version(body) -> str | None:
    version = body.get("weight_version")
    if version is not None and not str(version).lstrip("-").isdigit():
        raise BadRequest(f"weight_version={version!r}: must be an integer (or a string of one)")
    return None if version is None else str(version)


@dataclass
class DiskUpdate:
    model_path: str
    weight_version: str | None
    abort_all_requests: bool
    flush_cache: bool


def parse_update_from_disk(body) -> DiskUpdate:
    body = _obj(body, "/update_weights_from_disk")
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
        raise BadRequest(f"model_path={path!r}: must be the path of an HF checkpoint dir")
    return DiskUpdate(path, parse_weight_version(body), bool(body.get("abort_all_requests", False)),
                      bool(body.get("flush_cache", True)))


@dataclass
class InitGroup:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "gloo"


def parse_init_group(body) -> InitGroup:
    body = _obj(body, "/init_weights_update_group")
    for name in ("master_address", "master_port", "rank_offset", "world_size"):
        if name not in body:
            raise BadRequest(f"{name}: missing; /init_weights_update_group needs master_address, master_port, "
                             "rank_offset, world_size (and optionally group_name, backend)")
    g = InitGroup(**{k: body[k] for k in ("master_address", "master_port", "rank_offset", "world_size",
                                          "group_name", "backend") if k in body})
    if not _is_int(g.master_port) or not 0 < g.master_port < 65536:
        raise BadRequest(f"master_port={g.master_port!r}: must be a TCP port in [1, 65535]")
    if not _is_int(g.world_size) or g.world_size < 2:
        raise BadRequest(f"world_size={g.world_size!r}: must be an int >= 2 (the sender is rank 0)")
    if not _is_int(g.rank_offset) or not 1 <= g.rank_offset < g.world_size:
        raise BadRequest(f"rank_offset={g.rank_offset!r}: must be in [1, world_size) (rank 0 is the sender)")
    if g.backend not in ("gloo", "nccl"):
        raise BadRequest(f"backend={g.backend!r}: must be gloo (CPU) or nccl (GPU)")
    return g


@dataclass
class DistributedUpdate:
    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[list[int]]
    group_name: str
    weight_version: str | None
    abort_all_requests: bool
    flush_cache: bool


def parse_update_from_distributed(body) -> DistributedUpdate:
    body = _obj(body, "/update_weights_from_distributed")
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BadRequest(f"names={names!r}: must be a non-empty list of parameter names")
    if not isinstance(dtypes, list) or len(dtypes) != len(names):
        raise BadRequest(f"dtypes: must be a list of {len(names)} dtype names, one per entry of names")
    if not isinstance(shapes, list) or len(shapes) != len(names):
        raise BadRequest(f"shapes: must be a list of {len(names)} shapes, one per entry of names")
    for i, (dt, shape) in enumerate(zip(dtypes, shapes)):
        if str(dt).replace("torch.", "") not in DTYPES:
            raise BadRequest(f"dtypes[{i}]={dt!r}: must be one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise BadRequest(f"shapes[{i}]={shape!r}: must be a list of non-negative ints")
    return DistributedUpdate(names, [DTYPES[str(d).replace("torch.", "")] for d in dtypes], shapes,
                             str(body.get("group_name", "weight_update_group")), parse_weight_version(body),
                             bool(body.get("abort_all_requests", False)), bool(body.get("flush_cache", True)))


@dataclass
class TensorUpdate:
    serialized: str
    weight_version: str | None
    abort_all_requests: bool
    flush_cache: bool


def parse_update_from_tensor(body) -> TensorUpdate:
    """SGLang's /update_weights_from_tensor body: `serialized_named_tensors` holds one string per engine
    rank (this engine has one); only the default load_format (pickled (name, tensor) pairs) is served."""
    body = _obj(body, "/update_weights_from_tensor")
    data = body.get("serialized_named_tensors")
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], str):
        raise BadRequest("serialized_named_tensors: must be a list of one string (this engine has one rank), "
                         "e.g. [async_rl.weight_tensor.dumps(named_tensors)]")
    if body.get("load_format") not in (None, "direct"):
        raise BadRequest(f"load_format={body.get('load_format')!r}: this engine reads only the default "
                         "format; leave it out")
    return TensorUpdate(data[0], parse_weight_version(body), bool(body.get("abort_all_requests", False)),
                        bool(body.get("flush_cache", True)))
