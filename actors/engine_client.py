"""Client for an engine speaking SGLang's native HTTP API: SGLang itself or `actors.engine.server`.

Guarantees: it relies only on fields a real SGLang server returns (`output_ids` or, failing that, the token
ids in `meta_info.output_token_logprobs`; `meta_info.finish_reason`; `meta_info.weight_version` and
`meta_info.weight_versions` spans when present), so the same code drives both servers. Every HTTP failure
raises `EngineError` carrying the server's own error message. Every returned token has a logprob (when
asked for) and a weight version: `meta_info.token_versions` (embedded engine), else SGLang's
`weight_versions` spans, else the reply's `weight_version` for each token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import requests

from async_rl.keys import engine_headers


class EngineError(RuntimeError):
    """The engine answered with an HTTP error, or an answer this client cannot read."""


@dataclass
class GenerateResult:
    output_ids: list[int]
    output_logprobs: list[float]  # empty when generate(..., return_logprob=False)
    token_versions: list[int]  # the weight version that produced each output token
    finish_reason: str  # "stop", "length" or "abort" (SGLang's finish_reason.type)
    weight_version: int  # -1 when the server reports a non-numeric version (SGLang's "default")


def _version(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _versions_from_spans(spans, n: int, default: int) -> list[int]:
    """SGLang's `weight_versions` [{version, start, end}] -> one version per output token; tokens no span
    covers get `default` (the reply's weight_version)."""
    versions = [default] * n
    for span in spans or []:
        try:
            v, start, end = _version(span["version"]), int(span["start"]), int(span["end"])
        except (KeyError, TypeError, ValueError):
            continue
        for i in range(max(0, start), min(n, end)):
            versions[i] = v
    return versions


def parse_generate_reply(reply: dict) -> GenerateResult:
    """One element of a /generate reply -> GenerateResult."""
    meta = reply.get("meta_info") or {}
    logprobs = meta.get("output_token_logprobs") or []
    output_ids = reply.get("output_ids")
    if output_ids is None:
        output_ids = [int(entry[1]) for entry in logprobs]
    version = _version(meta.get("weight_version"))
    versions = meta.get("token_versions")
    if versions is None or len(versions) != len(output_ids):
        versions = _versions_from_spans(meta.get("weight_versions"), len(output_ids), version)
    finish = meta.get("finish_reason")
    finish = finish.get("type", "") if isinstance(finish, dict) else str(finish or "")
    return GenerateResult(
        output_ids=[int(t) for t in output_ids],
        output_logprobs=[float(entry[0]) for entry in logprobs],
        token_versions=[int(v) for v in versions],
        finish_reason=finish,
        weight_version=version,
    )


class EngineClient:
    """Talks to one engine at `url` (e.g. "http://127.0.0.1:30000"); one requests.Session, thread-safe
    enough for one caller thread per client."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update(engine_headers())  # the run's engine API key, when engines need one

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
                 ok_statuses: tuple[int, ...] = (200,)):
        try:
            resp = self.session.request(method, self.url + path, json=body, timeout=timeout or self.timeout)
        except requests.RequestException as e:
            raise EngineError(f"{method} {self.url}{path}: request failed: {e}") from e
        if resp.status_code not in ok_statuses:
            raise EngineError(f"{method} {self.url}{path}: HTTP {resp.status_code}: {_error_message(resp)}")
        if not resp.content:
            return {}  # SGLang answers /abort_request with an empty 200
        try:
            return resp.json()
        except ValueError as e:
            raise EngineError(f"{method} {self.url}{path}: reply is not JSON: {resp.text[:200]!r}") from e

    def generate(self, input_ids_batch: list[list[int]], sampling_params: dict | list[dict],
                 return_logprob: bool = True, rid: str | list[str] | None = None) -> list[GenerateResult]:
        """Generate one completion per prompt; `sampling_params` is one dict for all or one per prompt.
        `rid` names the request (one id, or one per prompt) for `abort_request`."""
        if not input_ids_batch:
            return []
        body = {"input_ids": input_ids_batch, "sampling_params": sampling_params,
                "return_logprob": return_logprob}
        if isinstance(rid, str):  # one id per prompt, so both servers name the requests the same way
            rid = [rid] if len(input_ids_batch) == 1 else [f"{rid}_{i}" for i in range(len(input_ids_batch))]
        if rid is not None:
            body["rid"] = rid
        replies = self._request("POST", "/generate", body)
        if not isinstance(replies, list) or len(replies) != len(input_ids_batch):
            raise EngineError(f"POST {self.url}/generate: expected a list of {len(input_ids_batch)} "
                              f"replies, got {str(replies)[:200]}")
        return [parse_generate_reply(r) for r in replies]

    def update_weights_from_disk(self, path: str, weight_version: int | str | None = None,
                                 flush_cache: bool = True) -> tuple[bool, str]:
        """Ask the engine to load the checkpoint at `path`; returns (success, message). A refused update
        (SGLang answers HTTP 400 with success=false) is returned, not raised. Pass flush_cache=False while
        paused in_place with requests running (SGLang fails the call when it cannot flush)."""
        body = {"model_path": str(path), "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        reply = self._request("POST", "/update_weights_from_disk", body, ok_statuses=(200, 400))
        if "success" not in reply:
            raise EngineError(f"POST {self.url}/update_weights_from_disk: {_error_text(reply)}")
        return bool(reply["success"]), str(reply.get("message", ""))

    def _weights_call(self, path: str, body: dict, timeout: float | None = None) -> tuple[bool, str]:
        reply = self._request("POST", path, body, timeout=timeout, ok_statuses=(200, 400))
        if not isinstance(reply, dict) or "success" not in reply:
            raise EngineError(f"POST {self.url}{path}: {_error_text(reply)}")
        return bool(reply["success"]), str(reply.get("message", ""))

    def pause_generation(self, mode: str = "abort") -> None:
        """Pause: `abort` ends in-flight requests (finish_reason abort, partial output returned), `in_place`
        keeps them and their KV cache, `retract` requeues them (KV recomputed on continue)."""
        self._request("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._request("POST", "/continue_generation", {})

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """End the request(s) whose id starts with `rid` (or all); they return finish_reason abort."""
        self._request("POST", "/abort_request", {"rid": rid, "abort_all": abort_all})

    def flush_cache(self) -> bool:
        """True when the server flushed (it refuses, with HTTP 400, while requests are in flight)."""
        try:
            return self.session.post(self.url + "/flush_cache", timeout=self.timeout).status_code == 200
        except requests.RequestException as e:
            raise EngineError(f"POST {self.url}/flush_cache: request failed: {e}") from e

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str = "gloo") -> tuple[bool, str]:
        return self._weights_call("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    def begin_weight_update(self) -> tuple[bool, str]:
        return self._weights_call("/begin_weight_update", {})

    def end_weight_update(self) -> tuple[bool, str]:
        return self._weights_call("/end_weight_update", {})

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        weight_version: int | str | None = None,
                                        group_name: str = "weight_update_group") -> tuple[bool, str]:
        body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return self._weights_call("/update_weights_from_distributed", body)

    def health(self, timeout: float = 10.0) -> bool:
        """True when the engine can generate a token now (GET /health_generate answers 200)."""
        try:
            return self.session.get(self.url + "/health_generate", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def model_info(self) -> dict:
        return self._request("GET", "/get_model_info")

    def wait_ready(self, timeout_s: float, proc=None) -> None:
        """Poll until the engine is healthy; raise RuntimeError if `proc` (a Popen) exits first and
        TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"engine process exited with code {proc.returncode} before {self.url} "
                                   "became ready; see its log")
            if self.health(timeout=min(10.0, max(0.5, deadline - time.monotonic()))):
                return
            time.sleep(0.2)
        raise TimeoutError(f"engine at {self.url} not ready after {timeout_s}s; raise the timeout or check its log")

    def close(self) -> None:
        self.session.close()


def _error_text(payload) -> str:
    """SGLang errors come as {"error": {"message": ...}}, {"message": ...} or {"error": "..."}."""
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("message", payload.get("detail")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)
    return str(payload)[:500]


def _error_message(resp: requests.Response) -> str:
    try:
        return _error_text(resp.json())
    except ValueError:
        return resp.text[:500] or resp.reason
