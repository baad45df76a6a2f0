"""The local launcher's supervisor: a dead hub, engine, generator or learner is started again
(`cluster.max_restarts` times per process, with backoff) in a way that loses no acked group and trains none
twice: the hub from its WAL on the same port, an engine on its port and re-synced to the current weights, a
generator under a new incarnation id (after its engine is up), the learner from its newest checkpoint with
the metrics of the steps it retrains dropped (the hub replays the batches it trained since, in order). A
process that may not be restarted (not supervised, exit code 2, out of restarts) fails the run with the tail
of its log. `Supervision` is the part of async_rl.launch.launcher.Launcher that does this; the Ray launcher
inherits it unchanged.
"""
from __future__ import annotations

import json
import signal
import time

import requests

from async_rl import protocol
from async_rl.launch.procs import ProcessGroup


class LaunchError(RuntimeError):
    pass


def _wait(what: str, ready, procs: ProcessGroup, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name in names:
            child = procs.children[name]
            if child.proc.poll() is not None:
                raise LaunchError(f"{name} exited with code {child.proc.returncode} while starting; "
                                  f"last lines of {child.log}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} not ready after {timeout:.0f}s (cluster.startup_timeout); see "
                              f"{[str(procs.children[n].log) for n in names]}")
        time.sleep(0.1)


def _engine_ready(url: str) -> bool:
    from async_rl.keys import engine_headers
    try:
        return requests.get(f"{url}/health_generate", timeout=5, headers=engine_headers()).status_code == 200
    except requests.RequestException:
        return False


class Supervision:
    """Launcher methods that watch and restart its processes (self.procs, self.cfg, self.run_dir, ...)."""

    def _supervised(self, name: str) -> bool:
        kind = name.rstrip("0123456789")
        if kind == "engine":  # with use_fault_tolerance the engine's generator restarts it
            return not self.cfg.rollout.use_fault_tolerance
        return kind in ("hub", "generator", "learner", "feeder", "weight_server")

    def supervise(self) -> None:
        """Restart each dead supervised process when its backoff is over; raise LaunchError for a dead process
        that may not be restarted (not supervised, a config error (exit code 2), or out of restarts)."""
        now = time.monotonic()
        for name, child in list(self.procs.children.items()):
            code = child.proc.poll()
            if code is None or (code == 0 and name in ("learner", "feeder")):  # alive, or done
                continue
            if not self._supervised(name):
                if child.critical:
                    raise LaunchError(f"{name} died with exit code {code}; last lines of {child.log}:\n{child.tail()}")
                continue
            if code == 2 or not self.restart_policy.allows(child.restarts):
                why = (" (a usage or config error: a restart would not help)" if code == 2 else
                       f" after {child.restarts} restart(s) (cluster.max_restarts={self.restart_policy.max_restarts})")
                raise LaunchError(f"{name} died with exit code {code}{why}; last lines of {child.log}:\n{child.tail()}")
            if name not in self.restart_due:
                delay = self.restart_policy.delay(child.restarts)
                self.restart_due[name] = now + delay
                print(f"async-rl: {name} died with exit code {code}; restart {child.restarts + 1} in {delay:.1f}s",
                      flush=True)
                continue
            engines_down = any(c.proc.poll() is not None for n, c in self.procs.children.items()
                               if n.startswith("engine") and self._supervised(n))
            if now < self.restart_due[name] or (name.startswith("generator") and engines_down):
                continue  # a generator needs its engine up: it reads the engine's version when it starts
            del self.restart_due[name]
            self.restart(name, code)

    def restart(self, name: str, code: int) -> None:
        kind, extra = name.rstrip("0123456789"), []
        if kind == "learner":
            extra = ["--resume"]
            if not self.cfg.debug.debug_rollout_only:
                self._rewind_metrics(self._learner_resume_step())
        if kind == "hub":
            (self.run_dir / "hub.endpoint").unlink(missing_ok=True)
        child = self.procs.respawn(name, extra)
        try:
            if kind == "hub":  # same --bind port and --state-dir: it recovers from its WAL where clients reconnect
                _wait("hub", (self.run_dir / "hub.endpoint").exists, self.procs, ["hub"], self.cfg.cluster.startup_timeout)
            elif kind == "engine":
                url = self.engine_urls[int(name[len("engine"):])]
                _wait(name, lambda: _engine_ready(url), self.procs, [name], self.cfg.cluster.startup_timeout)
                self._resync_engine(url)
        except LaunchError as exc:  # killed, so the next supervise() treats it as one more death
            print(f"async-rl: restarting {name} failed: {exc}", flush=True)
            self.procs._signal(child, signal.SIGKILL)
            child.proc.wait()
        with open(self.run_dir / "restarts.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "process": name, "exit_code": code, "restart": child.restarts,
                                "pid": child.proc.pid}) + "\n")
        print(f"async-rl: {name} restarted (restart {child.restarts}, pid {child.proc.pid})", flush=True)
        self.record("running")

    def _learner_resume_step(self) -> int:
        """The step the restarted learner resumes at: its newest complete checkpoint. The batches of the steps
        after it are replayed by the hub (buffer/hub.py) and retrained exactly, by either backend."""
        done = [int(p.name.split("_")[1]) for p in (self.run_dir / "checkpoints").glob("step_*") if (p / "DONE").exists()]
        return max(done, default=0)

    def _rewind_metrics(self, step: int) -> None:
        """Drop metrics rows of steps the restarted learner trains again (their updates died with it)."""
        from async_rl.metrics import read_metrics
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(self.run_dir) if r.get("step", 0) < step))
        tmp.replace(path)
        progress = getattr(self, "progress", None)
        if progress is not None and hasattr(progress, "_offset"):  # it tails the file by byte offset
            progress._offset = path.stat().st_size

    def _resync_engine(self, url: str) -> None:
        """Load the hub's current weights into a restarted engine (it starts from hf_checkpoint, version 0)."""
        from async_rl.hub_client import HubClient
        client = HubClient(self.hub_endpoint, identity="launcher", keys_dir=self.keys_dir)
        try:
            reply = client.request(protocol.Stats(), timeout=self.cfg.cluster.startup_timeout)
        finally:
            client.close()
        version, path = int(reply["version"]), str(reply["weights_path"])
        if version == 0 or not path:
            return
        from async_rl.keys import engine_headers
        r = requests.post(f"{url}/update_weights_from_disk", timeout=self.cfg.cluster.startup_timeout, headers=engine_headers(),
                          json={"model_path": path, "weight_version": str(version), "flush_cache": True})
        if r.status_code != 200 or not r.json().get("success"):  # pruned meanwhile: the generator syncs it
            print(f"async-rl: re-syncing {url} to v{version} failed ({r.text[:200]}); its generator will", flush=True)

