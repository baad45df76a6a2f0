"""The embedded engine's scheduler: one thread owns the model and runs continuous batching, with SGLang's
pause/continue/abort and weight-update semantics.

Invariants (the same as SGLang's, checked by tests/actors/test_engine_contract.py against both servers):
- Every forward pass and weight change runs on this thread, between decode steps, never inside one.
- A control call (pause, continue, abort, flush, weight-group setup) runs at the next step boundary.
- A weight write (`/update_weights_from_disk`, `/update_weights_from_distributed`, `/begin|end_weight_update`)
  runs at once while generation is paused; otherwise it waits until every request admitted before it has
  finished, and requests arriving meanwhile wait behind it (SGLang's model-update writer lock).
- Paused: no decode step runs and no new request is admitted; `abort` mode first finishes every admitted
  request with finish_reason abort (partial output kept), `retract` moves running requests back to the
  waiting queue (their KV is recomputed, under the new weights, on continue), `in_place` keeps them and
  their KV cache as they are.
- Every request ends exactly once: finished, aborted, or failed with an error (on shutdown or a failing
  forward pass); no request is ever left waiting.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

from actors.engine.model import Batch, Engine
from actors.engine.protocol import Request, Sequence

ABORT_REASON = {"type": "abort", "message": "Abort by request"}
PAUSE_ABORT_REASON = {"type": "abort", "message": "Abort by pause_generation(mode=abort)"}


class Control:
    """A call the scheduler runs between steps: `fn(scheduler) -> result`."""

    def __init__(self, fn, writes_weights: bool = False):
        self.fn, self.writes_weights = fn, writes_weights
        self.result, self.error = None, None
        self.done = threading.Event()


class Scheduler(threading.Thread):
    def __init__(self, engine: Engine, max_batch_size: int):
        super().__init__(name="scheduler", daemon=True)
        self.engine, self.max_batch_size = engine, max_batch_size
        self.inbox: queue.Queue = queue.Queue()
        self.held: collections.deque[Request] = collections.deque()  # arrived, not admitted yet
        self.waiting: collections.deque[Sequence] = collections.deque()  # admitted, not in the batch
        self.barrier: collections.deque[Control] = collections.deque()  # weight writes waiting for idle
        self.batch: Batch | None = None
        self.paused = False
        self.weight_session = False  # between /begin_weight_update and /end_weight_update
        self.groups: dict = {}  # group_name -> torch process group for /update_weights_from_distributed
        self.stopping = threading.Event()
        self._last_log, self._unlogged = 0.0, [0, 0, 0, 0.0, 0.0, 0]
        self._paused_at, self.paused_s = None, 0.0  # total seconds paused (weight updates), for the log

    # ---- called from HTTP handler threads -----------------------------------------------------------
    def submit(self, item):
        if self.stopping.is_set():
            self._fail(item, "server is shutting down")
        else:
            self.inbox.put(item)
        return item

    def call(self, fn, writes_weights: bool = False, timeout: float | None = None):
        """Run `fn(self)` on the scheduler thread; returns its result or raises RuntimeError."""
        control = self.submit(Control(fn, writes_weights))
        if not control.done.wait(timeout):
            raise RuntimeError(f"engine did not run the call within {timeout}s")
        if control.error:
            raise RuntimeError(control.error)
        return control.result

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping.is_set():
            self._drain(block=self._idle())
            if self.barrier and self.in_flight() == 0:
                while self.barrier:
                    self._run_control(self.barrier.popleft())
            if not self.paused:
                self._admit(admit_held=not self.barrier)
                self._step()
            self._flush_log()
        self._shutdown()

    def in_flight(self) -> int:
        return len(self.waiting) + (len(self.batch) if self.batch else 0)

    def _idle(self) -> bool:
        return self.paused or (self.in_flight() == 0 and not self.held)

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
            while True:
                if isinstance(item, Request):
                    self.held.append(item)
                elif item.writes_weights and not self.paused:
                    self.barrier.append(item)
                else:
                    self._run_control(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return

    def _run_control(self, control: Control) -> None:
        try:
            control.result = control.fn(self)
        except Exception as e:
            control.error = f"{type(e).__name__}: {e}"
        control.done.set()

    def _admit(self, admit_held: bool) -> None:
        while admit_held and self.held:
            self.waiting.extend(s for s in self.held.popleft().sequences if s.finish_reason is None)
        room = self.max_batch_size - (len(self.batch) if self.batch else 0)
        if not self.waiting or room <= 0:
            return
        seqs = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        self._forward(seqs, lambda: self.engine.prefill(seqs), prompt=True)

    def _step(self) -> None:
        if self.batch is not None:
            batch = self.batch
            self.batch = None
            self._forward(batch.seqs, lambda: self.engine.step(batch), prompt=False)

    def _forward(self, seqs: list[Sequence], run, prompt: bool) -> None:
        start = time.monotonic()
        try:
            batch, tokens = run()
        except Exception as e:  # a failing forward fails its requests, not the server
            for s in seqs:
                s.request.fail(f"generation failed: {type(e).__name__}: {e}")
            return
        if batch is not None:
            if self.batch is None:
                self.batch = batch
            else:
                self.batch.merge(batch)
        self._log(len(seqs) if prompt else 0, tokens, time.monotonic() - start, prompt)

    # ---- controls (run on this thread via `call`) ---------------------------------------------------
    def pause(self, mode: str) -> None:
        if mode == "abort":
            self.abort("", abort_all=True, reason=PAUSE_ABORT_REASON)
        elif mode == "retract" and self.batch is not None:
            self.waiting.extendleft(reversed(self.batch.seqs))
            self.batch = None
        self.paused = True
        self._paused_at = self._paused_at or time.monotonic()

    def resume(self) -> None:
        self.paused = False
        if self._paused_at is not None:
            self.paused_s += time.monotonic() - self._paused_at
            self._paused_at = None

    def abort(self, rid: str, abort_all: bool = False, reason: dict = ABORT_REASON) -> int:
        """Finish every admitted or held sequence whose rid starts with `rid` (SGLang matches prefixes, so a
        batch request's id aborts all its prompts); returns how many were aborted."""
        if not abort_all and not rid:
            return 0
        hit = lambda s: abort_all or s.rid.startswith(rid)  # noqa: E731
        aborted = [s for s in self.waiting if hit(s)]
        self.waiting = collections.deque(s for s in self.waiting if not hit(s))
        if self.batch is not None:
            keep = [row for row, s in enumerate(self.batch.seqs) if not hit(s)]
            aborted += [s for s in self.batch.seqs if hit(s)]
            if not keep:
                self.batch = None
            elif len(keep) < len(self.batch):
                self.batch.select(keep)
        if not abort_all:  # pause(abort) leaves requests that arrived after it waiting, as SGLang does
            for request in self.held:
                aborted += [s for s in request.sequences if hit(s) and s.finish_reason is None]
            self.held = collections.deque(r for r in self.held if not all(hit(s) for s in r.sequences))
        for s in aborted:
            s.request.finish(s, dict(reason))
        return len(aborted)

    def after_update(self, outcome: tuple[bool, str], flush_cache: bool) -> tuple[bool, str]:
        """SGLang flushes the cache after a successful weight update when asked (the default) and reports the
        update failed when it cannot (requests still running: an in_place pause); the weights stay loaded."""
        ok, message = outcome
        if ok and flush_cache and not self.flush_cache():
            return False, ("Weights were updated, but the cache was not flushed because requests are still "
                           "running or queued. Retract or finish them, then call /flush_cache.")
        return ok, message

    def flush_cache(self) -> bool:
        """SGLang flushes only when idle (waiting requests ignored while paused); there is no prefix cache
        here, so success just reports that state."""
        return self.batch is None and (self.paused or not self.waiting)

    # ---- shutdown and logging -----------------------------------------------------------------------
    @staticmethod
    def _fail(item, message: str) -> None:
        if isinstance(item, Request):
            item.fail(message)
        else:
            item.error = message
            item.done.set()

    def _shutdown(self) -> None:
        self._flush_log(force=True)
        leftovers = list(self.held) + list(self.barrier) + [s.request for s in self.waiting]
        leftovers += [s.request for s in self.batch.seqs] if self.batch else []
        while not self.inbox.empty():
            leftovers.append(self.inbox.get_nowait())
        for item in leftovers:
            self._fail(item, "server is shutting down")

    def _log(self, new_seqs: int, new_tokens: int, seconds: float, prompt: bool = False) -> None:
        u = self._unlogged
        u[0], u[1], u[2], u[3] = u[0] + 1, u[1] + new_seqs, u[2] + new_tokens, u[3] + seconds
        if prompt:
            u[4] += seconds
        else:
            u[5] += 1

    def _flush_log(self, force: bool = False) -> None:
        """At most one line a second; a line sums the forward passes since the previous one."""
        u, now = self._unlogged, time.monotonic()
        if u[0] and (force or now - self._last_log >= 1.0):
            static = self.engine.static
            graphs = f" graphs={len(static.graphs)} captures={static.captures} capture_s={static.capture_s:.3f}" \
                if static is not None and static.cuda_graph else ""
            # decode_rows / decodes = mean decode batch; prefill_s is inside seconds; paused_s is cumulative
            print(f"[engine] forwards={u[0]} new_seqs={u[1]} new_tokens={u[2]} seconds={u[3]:.3f} "
                  f"prefill_s={u[4]:.3f} decodes={u[5]} running={len(self.batch) if self.batch else 0} "
                  f"waiting={len(self.waiting)} paused={self.paused} paused_s={self.paused_s:.3f}{graphs} "
                  f"weight_version={self.engine.weight_version} t={time.time():.3f}", flush=True)
            self._last_log, self._unlogged = now, [0, 0, 0, 0.0, 0.0, 0]
