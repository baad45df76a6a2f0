"""The engines one generator drives: call slots, weight sync (interruptible or not), health checks, restarts.

Invariants:
- At most `calls_per_engine` engine calls are in flight on an engine at once (sglang_server_concurrency
  samples); a call goes to the healthy engine with the fewest calls in flight.
- `sync(version)` returns only when every healthy engine serves `version` or newer. With interrupt_mode
  `none` an engine drains its in-flight requests first (an unpaused SGLang update waits for them); with
  `in_place` / `retract` / `abort` it pauses in that mode, loads, and continues, so in-flight requests go
  on under the new weights (or come back aborted, to be resubmitted by the caller).
- With fault tolerance, an engine that fails a health check (`/health_generate` within the timeout) while
  not being updated is killed, restarted with the command it was started with, re-synced to the newest
  version, and marked healthy again; callers whose calls failed on it wait for that and retry, so no
  prompt is lost and, since groups are only formed from finished calls, none is generated twice into the
  buffer.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from actors.engine_client import EngineClient, EngineError


@dataclass
class EngineSpec:
    """How an engine was started, so a generator can restart it (written by the launcher)."""
    url: str
    cmd: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    log: str = ""
    pid: int = 0  # process group leader of the first incarnation (the launcher's child)
    owner: str = ""  # the generator (base id) that restarts it; others sharing it wait for it to come back


def load_specs(path: str | Path) -> dict[str, EngineSpec]:
    return {d["url"]: EngineSpec(**d) for d in json.loads(Path(path).read_text())}


class EngineHandle:
    def __init__(self, url: str, calls: int, spec: EngineSpec | None):
        self.url, self.spec = url.rstrip("/"), spec
        self.client = EngineClient(self.url)
        self.in_flight, self.capacity = 0, calls
        self.version = int(self.client.model_info().get("weight_version") or 0)
        self.healthy = threading.Event()
        self.healthy.set()
        self.updating = False
        self.started = time.monotonic()
        self.restarts = 0
        self.proc: subprocess.Popen | None = None  # an incarnation this generator started


class EngineFleet:
    def __init__(self, urls: list[str], rollout_cfg, samples_per_call: int, specs: dict | None = None,
                 latest=None, log=print, owner: str = ""):
        r = rollout_cfg
        calls = max(1, r.sglang_server_concurrency // max(1, samples_per_call))
        self.engines = [EngineHandle(u, calls, (specs or {}).get(u.rstrip("/"))) for u in urls]
        self.mode, self.cfg, self.log, self.owner = r.interrupt_mode, r, log, owner
        self.latest = latest  # () -> (version, path): the hub's newest, when a load finds its version pruned
        self.cond = threading.Condition()
        self.sync_lock = threading.Lock()
        self.target: tuple[int, str] | None = None
        self.stopping = False
        self.interrupted_updates = 0

    # ---- call slots ---------------------------------------------------------------------------------
    def acquire(self, should_stop=lambda: False) -> EngineHandle | None:
        with self.cond:
            while not (self.stopping or should_stop()):
                free = [e for e in self.engines if e.healthy.is_set() and e.in_flight < e.capacity]
                if free:
                    engine = min(free, key=lambda e: e.in_flight)
                    engine.in_flight += 1
                    return engine
                self.cond.wait(0.2)
        return None

    def release(self, engine: EngineHandle) -> None:
        with self.cond:
            engine.in_flight -= 1
            self.cond.notify_all()

    def idle(self) -> bool:
        return all(e.in_flight == 0 for e in self.engines)

    # ---- weights ------------------------------------------------------------------------------------
    def sync(self, version: int, path: str) -> None:
        """Bring every healthy engine to `version` (weights at `path`); newest call wins."""
        with self.sync_lock:
            if self.target is None or version > self.target[0]:
                self.target = (version, path)
            todo = [e for e in self.engines if e.healthy.is_set() and e.version < self.target[0]]
            threads = [threading.Thread(target=self._update, args=(e,), daemon=True) for e in todo]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    def _update(self, engine: EngineHandle) -> None:
        version, path = self.target
        engine.updating = True
        try:
            paused = self.mode != "none" and engine.in_flight > 0
            if paused:
                engine.client.pause_generation(self.mode)
                self.interrupted_updates += 1
            try:
                while version > engine.version:
                    ok, message = engine.client.update_weights_from_disk(path, version,
                                                                         flush_cache=self.mode != "in_place")
                    if ok:
                        engine.version = version
                        break
                    self.log(f"engine {engine.url}: loading v{version} failed ({message}); asking the hub again")
                    if self.latest is None:
                        raise EngineError(message)
                    time.sleep(0.2)  # update_weight_mode=tensor announces a version before its disk copy lands
                    version, path = self.latest()
            finally:
                if paused:
                    engine.client.continue_generation()
        except EngineError as e:
            self.log(f"engine {engine.url}: weight sync failed: {e}")
            if not self.cfg.use_fault_tolerance:
                raise
            engine.healthy.clear()  # the monitor restarts it
        finally:
            engine.updating = False

    # ---- health and restarts ------------------------------------------------------------------------
    def start_monitor(self) -> None:
        if self.cfg.use_fault_tolerance:
            threading.Thread(target=self._monitor, name="engine-health", daemon=True).start()

    def _monitor(self) -> None:
        r = self.cfg
        while not self.stopping:
            for engine in self.engines:
                if self.stopping or engine.updating:
                    continue
                due = time.monotonic() - engine.started >= r.rollout_health_check_first_wait
                if engine.healthy.is_set() and due and not engine.client.health(timeout=r.rollout_health_check_timeout):
                    self.log(f"engine {engine.url}: health check failed; restarting it")
                    engine.healthy.clear()
                if not engine.healthy.is_set():
                    self.restart(engine)
            time.sleep(r.rollout_health_check_interval)

    def restart(self, engine: EngineHandle) -> None:
        """Kill the engine, start it again with its spec, wait for it, re-sync it to the newest weights."""
        spec = engine.spec
        if spec is None or not spec.cmd or (spec.owner and spec.owner != self.owner):
            self.log(f"engine {engine.url}: not restarted by this generator; waiting for it to come back")
            if engine.client.health(timeout=self.cfg.rollout_health_check_timeout):
                engine.version = -1
                self._resync(engine)
            return
        self._kill(engine)
        env = {**os.environ, **engine.spec.env}
        with open(engine.spec.log or os.devnull, "ab") as out:
            # same process group as this generator: whoever stops the generator's group stops this engine too
            engine.proc = subprocess.Popen(engine.spec.cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL)
        engine.restarts += 1
        engine.client.wait_ready(self.cfg.rollout_health_check_timeout * 10, proc=engine.proc)
        engine.version = -1
        self._resync(engine)

    def _resync(self, engine: EngineHandle) -> None:
        engine.version = int(engine.client.model_info().get("weight_version") or 0)
        if self.target is not None and self.target[0] > engine.version:
            self._update(engine)
        engine.started = time.monotonic()
        engine.healthy.set()
        self.log(f"engine {engine.url}: back (restart {engine.restarts}) at v{engine.version}")
        with self.cond:
            self.cond.notify_all()

    def _kill(self, engine: EngineHandle) -> None:
        if engine.proc is not None and engine.proc.poll() is None:
            engine.proc.kill()
            engine.proc.wait(timeout=30)
        elif engine.proc is None and engine.spec.pid:
            try:
                os.killpg(engine.spec.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and engine.client.health(timeout=1.0):
            time.sleep(0.2)  # the old incarnation must have released its port

    def stop(self) -> None:
        self.stopping = True
        for engine in self.engines:
            if engine.proc is not None and engine.proc.poll() is None:
                engine.proc.terminate()
