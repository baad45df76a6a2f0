"""The embedded engine: an HTTP server speaking the subset of SGLang's native API that async-rl uses.

Run: `python -m actors.engine.server --model-path DIR --host 127.0.0.1 --port PORT [--num-threads N]
[--max-batch-size 64] [--weight-version 0] [--seed 0] [--device cpu] [--dtype auto] [--kv-cache auto]
[--no-cuda-graph]` (the last three: actors/engine/model.py's Engine).

Endpoints (SGLang's names, bodies and status codes): `/generate`, `/health`, `/health_generate`,
`/get_model_info` (`/model_info`), `/flush_cache`, `/pause_generation {mode: abort|in_place|retract}`,
`/continue_generation`, `/abort_request {rid | abort_all}`, `/update_weights_from_disk`,
`/init_weights_update_group`, `/destroy_weights_update_group`, `/begin_weight_update`,
`/update_weights_from_distributed`, `/end_weight_update`, `/update_weights_from_tensor` (handles to a
learner's weights on this machine: async_rl/weight_tensor.py).

Guarantees: the scheduler's (actors/engine/scheduler.py): one thread owns the model, weight changes land
between decode steps, every token carries the version that produced it (`meta_info.token_versions`, and
SGLang's `meta_info.weight_versions` spans). A malformed request gets HTTP 400 with `{"error": ...}` naming
the field, the value and the fix (actors/engine/protocol.py); no request can crash the server.
SIGTERM/SIGINT shut it down cleanly with exit code 0, failing whatever was still in flight.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import transformers

from actors.engine import protocol as proto
from actors.engine.guard import Guard
from actors.engine.model import Engine
from actors.engine.protocol import BadRequest, Request, SamplingParams, Sequence
from actors.engine.scheduler import Scheduler

MAX_BODY_BYTES = 256 * 1024 * 1024
HEALTH_TIMEOUT_S = 20.0  # SGLang's HEALTH_CHECK_TIMEOUT: a paused or wedged engine answers 503 after it


class Handler(BaseHTTPRequestHandler):
    scheduler: Scheduler  # set on the subclass built by `make_server`
    guard: Guard = Guard()  # API key + weight store (actors/engine/guard.py); open by default
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes; with Nagle on, the body waits for the peer's delayed
    # ACK (~40 ms a request on loopback, measured: it made every call 45 ms)
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # the scheduler logs one line a second instead
        pass

    @property
    def engine(self) -> Engine:
        return self.scheduler.engine

    def do_GET(self):
        self._dispatch(self._get_routes(), None)  # GET routes ignore the body

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
        routes = {**self._get_routes(), "/generate": self._generate,
                  "/update_weights_from_disk": self._update_from_disk,
                  "/init_weights_update_group": self._init_group, "/destroy_weights_update_group": self._destroy_group,
                  "/begin_weight_update": self._begin_update, "/end_weight_update": self._end_update,
                  "/update_weights_from_distributed": self._update_from_distributed,
                  "/update_weights_from_tensor": self._update_from_tensor,
                  "/pause_generation": self._pause, "/continue_generation": self._continue,
                  "/abort_request": self._abort}
        self._dispatch(routes, body)

    def _get_routes(self) -> dict:
        return {"/health": self._health, "/health_generate": self._health_generate,
                "/get_model_info": self._model_info, "/model_info": self._model_info,
                "/flush_cache": self._flush_cache}

    def _dispatch(self, routes: dict, body) -> None:
        route = routes.get(self.path.split("?")[0])
        if not self.guard.authorized(self.path.split("?")[0], self.headers.get("Authorization")):
            return self._reply(401, {"error": "Unauthorized: send the run's engine API key as Authorization: Bearer KEY"})
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

    # ---- generation -----------------------------------------------------------------------------------
    def _generate(self, body):
        request = proto.parse_generate_body(body, self.engine.vocab_size, self.engine.max_positions,
                                            self.engine.device)
        self.scheduler.submit(request).done.wait()
        if request.error:
            return 503 if "shutting down" in request.error else 500, {"error": request.error}
        version = self.engine.weight_version
        replies = [proto.generate_reply(s, version, request.return_logprob, self._decode(s.output_ids))
                   for s in request.sequences]
        return 200, replies if request.is_batch else replies[0]

    def _decode(self, ids: list[int]) -> str:
        with self.engine.tokenizer_lock:
            return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def _health(self, _body):
        return 200, {"status": "ok"}

    def _health_generate(self, _body):
        request = Request()
        params = SamplingParams(temperature=0.0, max_new_tokens=1)
        request.sequences = [Sequence([self.engine.pad_id], params, "HEALTH_CHECK", request)]
        self.scheduler.submit(request)
        if not request.done.wait(HEALTH_TIMEOUT_S) or request.error:
            self.scheduler.call(lambda s: s.abort("HEALTH_CHECK"), timeout=5)
            return 503, {"error": request.error or f"no token within {HEALTH_TIMEOUT_S}s (paused or hung)"}
        return 200, {"status": "ok"}

    def _model_info(self, _body):
        return 200, {"model_path": self.engine.model_path, "tokenizer_path": self.engine.model_path,
                     "is_generation": True, "weight_version": str(self.engine.weight_version)}

    # ---- pause / continue / abort / flush -------------------------------------------------------------
    def _pause(self, body):
        mode = proto.parse_pause(body)
        self.scheduler.call(lambda s: s.pause(mode))
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def _continue(self, _body):
        self.scheduler.call(lambda s: s.resume())
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def _abort(self, body):
        rid, abort_all = proto.parse_abort(body)
        n = self.scheduler.call(lambda s: s.abort(rid, abort_all))
        return 200, {"aborted": n}

    def _flush_cache(self, _body):
        ok = self.scheduler.call(lambda s: s.flush_cache())
        return (200, {"success": True, "message": "Cache flushed."}) if ok else \
            (400, {"success": False, "message": "Cache not flushed because there are pending requests."})

    # ---- weights ----------------------------------------------------------------------------------------
    def _weights_reply(self, ok: bool, message: str, **extra):
        # SGLang answers a refused update with HTTP 400 and success=false; the old weights stay
        return (200 if ok else 400), {"success": ok, "message": message, **extra}

    def _write(self, fn):
        """Run a weight write on the scheduler thread (at once when paused, else after in-flight requests)."""
        try:
            return self.scheduler.call(fn, writes_weights=True)
        except RuntimeError as e:
            return False, str(e)

    def _update_from_disk(self, body):
        u = proto.parse_update_from_disk(body)
        refused = self.guard.refuse_path(u.model_path)
        if refused:
            return self._weights_reply(False, refused, num_paused_requests=0)
        if u.abort_all_requests:
            self.scheduler.call(lambda s: s.abort("", abort_all=True))
        ok, message = self._write(lambda s: s.after_update(s.engine.load_weights(u.model_path, u.weight_version),
                                                          u.flush_cache))
        return self._weights_reply(ok, message, num_paused_requests=0)

    def _init_group(self, body):
        g = proto.parse_init_group(body)

        def init(s):
            from async_rl.weight_broadcast import init_custom_process_group
            try:
                s.groups[g.group_name] = init_custom_process_group(
                    g.backend, f"tcp://{g.master_address}:{g.master_port}", g.world_size, g.rank_offset,
                    g.group_name)
            except Exception as e:
                return False, f"Failed to initialize custom process group: {e}."
            return True, "Succeeded to initialize custom process group."
        return self._weights_reply(*self.scheduler.call(init))

    def _destroy_group(self, body):
        name = (body or {}).get("group_name", "weight_update_group")

        def destroy(s):
            if name not in s.groups:
                return False, f"group_name={name!r}: no such group; known: {sorted(s.groups)}"
            torch.distributed.destroy_process_group(s.groups.pop(name))
            return True, "Succeeded to destroy custom process group."
        return self._weights_reply(*self.scheduler.call(destroy))

    def _begin_update(self, _body):
        return self._weights_reply(*self._write(lambda s: (setattr(s, "weight_session", True) or True,
                                                           "weight update session open")))

    def _end_update(self, _body):
        return self._weights_reply(*self._write(lambda s: (setattr(s, "weight_session", False) or True,
                                                           "weight update session closed")))

    def _update_from_distributed(self, body):
        u = proto.parse_update_from_distributed(body)
        if u.abort_all_requests:
            self.scheduler.call(lambda s: s.abort("", abort_all=True))

        def receive(s):
            from async_rl.weight_broadcast import receive_tensors
            if not s.weight_session:
                return False, ("update_weights_from_distributed must run between begin_weight_update() and "
                               "end_weight_update()")
            if u.group_name not in s.groups:
                return False, f"group_name={u.group_name!r}: call /init_weights_update_group first"
            tensors = receive_tensors(s.groups[u.group_name], u.names, u.dtypes, u.shapes, s.engine.device)
            return s.after_update(s.engine.load_named_tensors(tensors, u.weight_version), u.flush_cache)
        return self._weights_reply(*self._write(receive))


    def _update_from_tensor(self, body):
        u = proto.parse_update_from_tensor(body)
        if u.abort_all_requests:
            self.scheduler.call(lambda s: s.abort("", abort_all=True))

        def copy(s):
            from async_rl.weight_tensor import loads
            try:
                named = loads(u.serialized)
            except ValueError as e:
                return False, str(e)
            outcome = s.engine.load_named_tensors(dict(named), u.weight_version)
            if s.engine.device.type == "cuda":  # the learner may overwrite its buffer once we answer
                torch.cuda.synchronize(s.engine.device)
            return s.after_update(outcome, u.flush_cache)
        return self._weights_reply(*self._write(copy))


def make_server(scheduler: Scheduler, host: str, port: int, guard: Guard | None = None) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"scheduler": scheduler, "guard": guard or Guard()})
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
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32) or a dtype name")
    parser.add_argument("--kv-cache", default="auto", choices=["auto", "dynamic", "static"],
                        help="static: preallocated KV arena (actors/engine/static.py); auto: static on CUDA")
    parser.add_argument("--no-cuda-graph", action="store_true", help="static path on CUDA: decode eagerly")
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (SGLang's --api-key)")
    parser.add_argument("--api-key-env", default=None, help="as --api-key, read from this environment variable")
    parser.add_argument("--weight-store", action="append", default=[],
                        help="only load weights from inside this dir (repeat for several; none = anywhere)")
    args = parser.parse_args(argv)
    api_key = args.api_key or (os.environ.get(args.api_key_env) if args.api_key_env else None)
    if args.api_key_env and not api_key:
        parser.error(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size={args.max_batch_size}: must be >= 1")
    transformers.utils.logging.disable_progress_bar()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine = Engine(args.model_path, args.weight_version, args.device, dtype=args.dtype, kv_cache=args.kv_cache,
                    cuda_graph=not args.no_cuda_graph, max_batch_size=args.max_batch_size)
    scheduler = Scheduler(engine, args.max_batch_size)
    server = make_server(scheduler, args.host, args.port, Guard(api_key, args.weight_store))
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
