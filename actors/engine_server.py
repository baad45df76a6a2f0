"""The embedded engine: an HTTP server speaking the subset of SGLang's native API that async-rl uses.

Run: `python -m actors.engine_server --model-path DIR --host 127.0.0.1 --port PORT [--num-threads N]
[--max-batch-size 64] [--weight-version 0] [--seed 0] [--device cpu]`.

Guarantees:
- One scheduler thread owns the model; every forward pass and every weight load runs on it, in the order
  the requests arrived. A weight update therefore lands between decode batches, never inside one, and a
  failed update leaves the old weights, `model_path` and `weight_version` untouched.
- Each generated token carries the log-probability of the token under the distribution it was sampled from
  (raw logits for greedy; logits/temperature, top-k, top-p, renormalized otherwise) and the weight version
  that produced it (`meta_info.token_versions`).
- A malformed request gets HTTP 400 with `{"error": ...}` naming the field, the value and the fix; no
  request can crash the server. SIGTERM/SIGINT shut it down cleanly with exit code 0.
"""
from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import transformers

MAX_BODY_BYTES = 256 * 1024 * 1024
# Output-formatting keys SGLang accepts that change nothing here (no text stop strings are trimmed).
IGNORED_SAMPLING_KEYS = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}


class BadRequest(ValueError):
    """A client error; its message names the field, the value and the fix."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    sampling_seed: int | None = None


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
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
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
        values[name] = value
    return SamplingParams(**values)


@dataclass
class Sequence:
    """One prompt being generated; filled in by the scheduler."""
    prompt_ids: list[int]
    params: SamplingParams
    rid: str
    work: "Work"
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    finish_reason: dict | None = None


class Work:
    """A unit queued to the scheduler: sequences to generate, or a control call to run between batches."""

    def __init__(self, control=None):
        self.control, self.result, self.error = control, None, None
        self.sequences: list[Sequence] = []
        self.remaining = 0
        self.done = threading.Event()

    def finish_one(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0:
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()


def parse_generate_body(body, vocab_size: int, max_positions: int) -> tuple[Work, bool, bool]:
    """Validate a /generate body; returns (work, is_batch, return_logprob)."""
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
    work = Work()
    for i, (prompt, raw) in enumerate(zip(prompts, raw_params)):
        name = f"input_ids[{i}]" if is_batch else "input_ids"
        _check_prompt(prompt, name, vocab_size)
        params = parse_sampling_params(raw, f"sampling_params[{i}]" if is_batch else "sampling_params")
        if len(prompt) + params.max_new_tokens > max_positions:
            raise BadRequest(f"{name}: prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} "
                             f"exceeds the model's max_position_embeddings={max_positions}; "
                             "shorten the prompt or lower max_new_tokens")
        work.sequences.append(Sequence(list(prompt), params, rids[i], work))
    work.remaining = len(work.sequences)
    return work, is_batch, return_logprob


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
        if len(rid) != n:
            raise BadRequest(f"rid: list of {len(rid)} for {n} prompts; send one id per prompt")
        return [str(r) for r in rid]
    return [f"{rid}_{i}" for i in range(n)] if is_batch else [str(rid)]


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """Log-probs of the sampling distribution per row: raw log_softmax where temperature == 0, else
    logits/temperature, then top-k (k > 0), then top-p (p < 1), renormalized."""
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & ~greedy, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k < vocab).any()):
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    p = torch.where(greedy, torch.ones_like(top_p), top_p)
    if bool((p < 1).any()):
        probs, order = scaled.softmax(-1).sort(dim=-1, descending=True)
        drop_sorted = (probs.cumsum(-1) - probs) > p[:, None]  # the top token is never dropped
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


class BatchSampler:
    """Per-sequence sampling parameters of a decode batch, as tensors; rows are pruned with `select`."""

    def __init__(self, seqs: list[Sequence], device):
        self.seqs = seqs
        self.temperature = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=device)
        self.top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=device)
        self.generators = [_seeded(s.params.sampling_seed, device) for s in seqs]

    def select(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, device=self.temperature.device)
        self.temperature, self.top_k, self.top_p = self.temperature[idx], self.top_k[idx], self.top_p[idx]
        self.seqs = [self.seqs[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]

    def sample(self, logits: torch.Tensor) -> tuple[list[int], list[float]]:
        logprobs = process_logits(logits.float(), self.temperature, self.top_k, self.top_p)
        tokens = logprobs.argmax(-1)
        sampled = self.temperature > 0
        if bool(sampled.any()):
            drawn = torch.multinomial(logprobs.exp(), 1).squeeze(1)
            tokens = torch.where(sampled, drawn, tokens)
            for row, gen in enumerate(self.generators):
                if gen is not None and bool(sampled[row]):
                    tokens[row] = torch.multinomial(logprobs[row].exp(), 1, generator=gen)[0]
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        return tokens.tolist(), chosen.tolist()


def _seeded(seed: int | None, device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


class Engine:
    """The model, its weights' identity (`model_path`, `weight_version`) and a batched decode loop."""

    def __init__(self, model_path: str, weight_version: int, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.model_path, self.weight_version = str(model_path), int(weight_version)
        self.tokenizer, self.tokenizer_lock = AutoTokenizer.from_pretrained(self.model_path), threading.Lock()
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.vocab_size, self.max_positions = cfg.vocab_size, cfg.max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], should_stop) -> int:
        """Generate every sequence to completion in one batch; returns the number of tokens generated."""
        from transformers import DynamicCache

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[row, width - len(s.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, sampler, generated = DynamicCache(config=self.model.config), BatchSampler(seqs, self.device), 0
        while sampler.seqs and not should_stop():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            tokens, logprobs = sampler.sample(logits)
            keep = [row for row, s in enumerate(sampler.seqs) if not self._append(s, tokens[row], logprobs[row])]
            generated += len(tokens)
            if len(keep) < len(tokens):
                if not keep:
                    break
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
                sampler.select(keep)
                mask, positions = mask[keep], positions[keep]
                tokens = [tokens[r] for r in keep]
            ids = torch.tensor(tokens, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        return generated

    def _append(self, seq: Sequence, token: int, logprob: float) -> bool:
        """Record one token; returns True (and resolves the sequence) when it finished."""
        seq.output_ids.append(token)
        seq.output_logprobs.append(logprob)
        seq.token_versions.append(self.weight_version)
        if (token in self.eos_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids:
            seq.finish_reason = {"type": "stop", "matched": token}
        elif len(seq.output_ids) >= seq.params.max_new_tokens:
            seq.finish_reason = {"type": "length", "length": seq.params.max_new_tokens}
        else:
            return False
        seq.work.finish_one()
        return True

    @torch.inference_mode()
    def load_weights(self, model_path: str, weight_version) -> tuple[bool, str]:
        """Load the safetensors weights of an HF checkpoint dir in place; all-or-nothing."""
        from safetensors.torch import load_file

        files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
        if not files:
            return False, f"model_path={model_path!r}: no *.safetensors files there; pass an HF checkpoint dir"
        try:
            state = {}
            for f in files:
                state.update(load_file(str(f)))
        except Exception as e:  # a corrupt file must not take the server down
            return False, f"model_path={model_path!r}: could not read safetensors: {e}"
        current = self.model.state_dict()
        tied = self.model.config.tie_word_embeddings and "model.embed_tokens.weight" in state
        if tied and "lm_head.weight" in current and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        bad_shape = [k for k in current if k in state and state[k].shape != current[k].shape]
        if missing or unexpected or bad_shape:
            return False, (f"model_path={model_path!r}: weights do not match the served model (missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]})")
        self.model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
        old = self.weight_version
        self.weight_version = old + 1 if weight_version is None else int(weight_version)
        self.model_path = str(model_path)
        return True, f"loaded {len(files)} file(s) from {model_path}; weight_version {old} -> {self.weight_version}"


class Scheduler(threading.Thread):
    """Drains the queue in arrival order: control calls run alone, generation is batched."""

    def __init__(self, engine: Engine, max_batch_size: int):
        super().__init__(name="scheduler", daemon=True)
        self.engine, self.max_batch_size = engine, max_batch_size
        self.inbox: queue.Queue[Work] = queue.Queue()
        self.pending: list = []  # Work (control) or Sequence, in arrival order
        self.stopping = threading.Event()
        self._last_log, self._unlogged = 0.0, [0, 0, 0, 0, 0.0]

    def submit(self, work: Work) -> Work:
        if self.stopping.is_set():
            work.fail("server is shutting down")
        else:
            self.inbox.put(work)
        return work

    def run(self) -> None:
        while not self.stopping.is_set():
            self._drain(block=not self.pending)
            self._flush_log()
            if not self.pending:
                continue
            if isinstance(self.pending[0], Work):
                self._run_control(self.pending.pop(0))
            else:
                self._run_batch()
        self._flush_log(force=True)
        for item in self.pending:
            (item if isinstance(item, Work) else item.work).fail("server is shutting down")
        while not self.inbox.empty():
            self.inbox.get_nowait().fail("server is shutting down")

    def _drain(self, block: bool) -> None:
        try:
            work = self.inbox.get(timeout=0.2) if block else self.inbox.get_nowait()
            while True:
                self.pending.extend([work] if work.control else work.sequences)
                work = self.inbox.get_nowait()
        except queue.Empty:
            return

    def _run_control(self, work: Work) -> None:
        try:
            work.result = work.control(self.engine)
            work.done.set()
        except Exception as e:
            work.fail(f"{type(e).__name__}: {e}")

    def _run_batch(self) -> None:
        batch = []
        while self.pending and isinstance(self.pending[0], Sequence) and len(batch) < self.max_batch_size:
            batch.append(self.pending.pop(0))
        batch = [s for s in batch if s.work.error is None]
        if not batch:
            return
        start = time.monotonic()
        try:
            generated = self.engine.decode(batch, self.stopping.is_set)
        except Exception as e:  # a failing batch fails its requests, not the server
            for s in batch:
                s.work.fail(f"generation failed: {type(e).__name__}: {e}")
            return
        for s in batch:
            if s.finish_reason is None:  # interrupted by shutdown
                s.work.fail("server is shutting down")
        self._log(len(batch), sum(len(s.prompt_ids) for s in batch), generated, time.monotonic() - start)

    def _log(self, seqs: int, prompt_tokens: int, new_tokens: int, seconds: float) -> None:
        u = self._unlogged
        u[0], u[1], u[2], u[3], u[4] = u[0] + 1, u[1] + seqs, u[2] + prompt_tokens, u[3] + new_tokens, u[4] + seconds
        self._flush_log()

    def _flush_log(self, force: bool = False) -> None:
        """At most one line a second; a line sums the batches since the previous one."""
        u, now = self._unlogged, time.monotonic()
        if u[0] and (force or now - self._last_log >= 1.0):
            print(f"[engine] batches={u[0]} seqs={u[1]} prompt_tokens={u[2]} new_tokens={u[3]} "
                  f"seconds={u[4]:.3f} weight_version={self.engine.weight_version}", flush=True)
            self._last_log, self._unlogged = now, [0, 0, 0, 0, 0.0]


def generate_reply(seq: Sequence, engine: Engine, return_logprob: bool) -> dict:
    meta = {"id": seq.rid, "finish_reason": seq.finish_reason, "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(seq.output_ids),
            "weight_version": str(seq.token_versions[-1] if seq.token_versions else engine.weight_version),
            "token_versions": seq.token_versions}
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(seq.output_logprobs, seq.output_ids)]
    with engine.tokenizer_lock:  # handler threads share one Rust tokenizer
        text = engine.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
    return {"text": text, "output_ids": seq.output_ids, "meta_info": meta}


class Handler(BaseHTTPRequestHandler):
    scheduler: Scheduler  # set on the subclass built by `make_server`
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes; with Nagle on, the body waits for the peer's delayed
    # ACK (~40 ms a request on loopback, measured: it made every call 45 ms)
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # one line per batch is logged instead
        pass

    def do_GET(self):
        routes = {"/health": self._health, "/health_generate": self._health_generate,
                  "/get_model_info": self._model_info}
        self._dispatch(routes, None)  # GET routes ignore the body

    def do_POST(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_BODY_BYTES:
                raise BadRequest(f"Content-Length={length}: must be in [0, {MAX_BODY_BYTES}]")
            body = json.loads(self.rfile.read(length) or b"{}")
        except BadRequest as e:
            return self._reply(400, {"error": str(e)})
        except (ValueError, UnicodeDecodeError) as e:
            return self._reply(400, {"error": f"body: not valid JSON ({e}); send a JSON object"})
        self._dispatch({"/generate": self._generate, "/update_weights_from_disk": self._update_weights}, body)

    def _dispatch(self, routes: dict, body) -> None:
        route = routes.get(self.path.split("?")[0])
        if route is None:
            return self._reply(404, {"error": f"path {self.path!r}: not found; known: {sorted(routes)}"})
        try:
            status, payload = route(body)
        except BadRequest as e:
            status, payload = 400, {"error": str(e)}
        except Exception as e:
            status, payload = 500, {"error": f"{type(e).__name__}: {e}"}
        self._reply(status, payload)

    def _reply(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _wait(self, work: Work, timeout: float | None = None) -> bool:
        self.scheduler.submit(work)
        return work.done.wait(timeout)

    def _generate(self, body):
        engine = self.scheduler.engine
        work, is_batch, return_logprob = parse_generate_body(body, engine.vocab_size, engine.max_positions)
        self._wait(work)
        if work.error:
            return 503 if "shutting down" in work.error else 500, {"error": work.error}
        replies = [generate_reply(s, engine, return_logprob) for s in work.sequences]
        return 200, replies if is_batch else replies[0]

    def _update_weights(self, body):
        path = body.get("model_path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise BadRequest(f"model_path={path!r}: must be the path of an HF checkpoint dir")
        version = body.get("weight_version")
        if version is not None and not str(version).lstrip("-").isdigit():
            raise BadRequest(f"weight_version={version!r}: must be an integer (or a string of one)")
        work = Work(control=lambda engine: engine.load_weights(path, version))
        self._wait(work)
        ok, message = (False, work.error) if work.error else work.result
        # SGLang answers a refused update with HTTP 400 and success=false; the old weights stay.
        return 200 if ok else 400, {"success": ok, "message": message, "num_paused_requests": 0}

    def _health(self, _body):
        return 200, {"status": "ok"}

    def _health_generate(self, _body):
        work = Work()
        params = SamplingParams(temperature=0.0, max_new_tokens=1)
        work.sequences, work.remaining = [Sequence([self.scheduler.engine.pad_id], params, "health", work)], 1
        if not self._wait(work, timeout=60.0) or work.error:
            return 503, {"error": work.error or "health generation timed out"}
        return 200, {"status": "ok"}

    def _model_info(self, _body):
        engine = self.scheduler.engine
        return 200, {"model_path": engine.model_path, "tokenizer_path": engine.model_path,
                     "is_generation": True, "weight_version": str(engine.weight_version)}


def make_server(scheduler: Scheduler, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"scheduler": scheduler})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="HF checkpoint dir (model + tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="most sequences in one decode batch")
    parser.add_argument("--weight-version", type=int, default=0, help="version of the weights at model-path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling RNG")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size={args.max_batch_size}: must be >= 1")
    transformers.utils.logging.disable_progress_bar()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    scheduler = Scheduler(Engine(args.model_path, args.weight_version, args.device), args.max_batch_size)
    server = make_server(scheduler, args.host, args.port)
    scheduler.start()
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    print(f"[engine] serving {args.model_path} on http://{args.host}:{args.port} "
          f"weight_version={args.weight_version}", flush=True)
    while not stop.wait(0.5):
        pass
    print("[engine] shutting down", flush=True)
    scheduler.stopping.set()
    server.shutdown()
    scheduler.join(timeout=10)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
