"""The process side of `--cluster ray`: a ProcessActor (a Ray actor that runs one command as its child), a
RayProc (the part of `subprocess.Popen` the launcher reads, answered by that actor) and a RayProcessGroup
(the local launcher's ProcessGroup, its children ProcessActors placed by `place(name)`).

Invariant: a child never outlives its actor (PR_SET_PDEATHSIG), and `stop_all` ends every actor of the
group (the ranks of a multi-rank learner too, async_rl/launch/ray_ranks.py) before it releases the cluster.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from async_rl.launch.procs import Child, ProcessGroup
from async_rl.launch.supervisor import LaunchError

RESTARTABLE = ("hub", "engine", "generator", "attach")  # their state survives a restart (WAL, new incarnation id)


def _child_setup(cores: list[int], nice: int) -> None:
    """In the child, before exec: die with the actor, pin cores, set priority."""
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if cores:
        os.sched_setaffinity(0, cores)
    if nice:
        try:
            os.nice(nice)
        except PermissionError:
            pass


class ProcessActor:
    """Runs one command as its child (own session, log file, env) and reports on it. With `restart`, a child
    that exits non-zero (not stopped by us) ends this actor's process, so that Ray restarts the actor."""

    def __init__(self, name: str, argv: list[str], log: str, env: dict, cwd: str, cpus: list[int], nice: int,
                 restart: bool):
        self.name, self.log, self.restart = name, Path(log), restart
        self.stopping, self.returncode, self.proc, self.error = False, None, None, ""
        started = threading.Event()
        # the thread that starts the child must outlive it (PR_SET_PDEATHSIG follows the parent thread)
        threading.Thread(target=self._run, args=(argv, env, cwd, cpus, nice, started), daemon=True).start()
        started.wait(60)
        if self.proc is None:
            raise RuntimeError(f"{name}: could not start {argv[:4]}: {self.error or 'timed out'}")

    def _run(self, argv, env, cwd, cpus, nice, started) -> None:
        import ray
        self.log.parent.mkdir(parents=True, exist_ok=True)
        ctx = ray.get_runtime_context()
        try:
            with open(self.log, "ab") as out:
                out.write(f"--- {self.name}: Ray actor {ctx.get_actor_id()[:12]} on node {ctx.get_node_id()[:12]}"
                          f"{' (restarted)' if ctx.was_current_actor_reconstructed else ''} ---\n".encode())
                out.flush()
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env={**os.environ, **env}, cwd=cwd, start_new_session=True,
                                             preexec_fn=lambda: _child_setup(cpus, nice))
        except OSError as exc:
            self.error = str(exc)
        started.set()
        if self.proc is None:
            return
        code = self.proc.wait()
        self.returncode = code
        if code != 0 and self.restart and not self.stopping:
            with open(self.log, "ab") as out:
                out.write(f"--- {self.name} exited with code {code}; its Ray actor ends so Ray restarts it ---\n".encode())
            os._exit(1)

    def state(self) -> dict:
        import ray
        return {"pid": self.proc.pid, "returncode": self.returncode, "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address()}

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.proc.pid, sig)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float) -> int | None:
        """SIGTERM to the child's process group, `grace` seconds, then SIGKILL (grandchildren too)."""
        self.stopping = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.poll()


class PolledProc:
    """`Popen.wait` over a `poll()` that asks Ray (RayProc, ray_ranks.RankedProc)."""

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.name, timeout)
            time.sleep(0.2)
        return self.returncode


class RayProc(PolledProc):
    """The part of `subprocess.Popen` the launcher reads (pid, poll, wait, send_signal, returncode), answered
    by a ProcessActor. While Ray restarts the actor, the process counts as running (poll() is None)."""

    def __init__(self, name: str, actor, on_restart=None):
        self.name, self.actor, self.on_restart = name, actor, on_restart
        self.returncode, self.pid, self.node_ip, self.node_id, self.restarts = None, None, None, None, 0
        self._checked = 0.0
        self._refresh(timeout=60)

    def _refresh(self, timeout: float = 5.0) -> None:
        import ray
        try:
            st = ray.get(self.actor.state.remote(), timeout=timeout)
        except ray.exceptions.ActorDiedError:  # restarts used up, or killed by us
            self.returncode = self.returncode if self.returncode is not None else -signal.SIGKILL
            return
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            return  # being restarted
        old = self.pid
        self.pid, self.node_ip, self.node_id, self.returncode = st["pid"], st["node_ip"], st["node_id"], st["returncode"]
        if old is not None and st["pid"] != old:
            self.restarts += 1
            if self.on_restart:
                self.on_restart(self, old)

    def poll(self) -> int | None:
        if self.returncode is None and time.monotonic() - self._checked > 0.25:
            self._checked = time.monotonic()
            self._refresh()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        import ray
        ray.get(self.actor.send_signal.remote(int(sig)), timeout=30)


class RayChild(Child):
    def tail(self, lines: int = 20) -> str:
        import ray
        if hasattr(self.proc, "tail"):  # the ranked learner: the log of the rank that failed
            return self.proc.tail(lines)
        try:
            return ray.get(self.proc.actor.tail.remote(lines), timeout=10)
        except Exception:  # the actor is gone: the log is on its node (here, with a shared run dir)
            return super().tail(lines)


class RayProcessGroup(ProcessGroup):
    """A ProcessGroup whose children are ProcessActors placed by `place(name) -> Ray actor options`."""

    def __init__(self, log_dir: Path, place, max_restarts: int, on_restart=None, on_close=None):
        super().__init__(log_dir)
        self.place, self.max_restarts, self.on_restart, self.on_close = place, max_restarts, on_restart, on_close
        self.actors: dict[str, object] = {}
        self.specs: dict[str, dict] = {}
        self.env: dict[str, str] = {}  # more environment for every child (attach --hub: the key, on the node)
        self.cwd = os.getcwd()  # where children start (attach --hub: a dir every node has)

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every child, then release the cluster (`on_close`): nothing of the run stays on Ray."""
        try:
            super().stop_all(grace)
        finally:
            if self.on_close:
                self.on_close()

    def start(self, name: str, module: str, args: list[str], cpus: list[int] | None = None,
              threads: int = 1, critical: bool = True, nice: int = 0) -> Child:
        return self.start_command(name, [sys.executable, "-m", module, *args], cpus, threads, critical, nice)

    def child_env(self, threads: int) -> dict:
        return {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", **self.env}

    def start_command(self, name: str, argv: list[str], cpus: list | None = None, threads: int = 1,
                      critical: bool = True, nice: int = 0) -> Child:
        import ray
        restart = name.rstrip("0123456789") in RESTARTABLE and self.max_restarts != 0
        env = self.child_env(threads)
        options = {"max_restarts": self.max_restarts if restart else 0, "max_task_retries": -1 if restart else 0,
                   "name": None, **self.place(name)}
        actor = ray.remote(ProcessActor).options(**options).remote(
            name, list(argv), str(self.log_dir / f"{name}.log"), env, self.cwd, [int(c) for c in cpus or []],
            nice, restart)
        self.actors[name] = actor
        self.specs[name] = {"argv": list(argv), "cpus": cpus, "threads": threads, "nice": nice}
        try:
            proc = RayProc(name, actor, self.on_restart)
        except Exception as exc:
            raise LaunchError(f"{name}: its Ray actor did not start: {exc}") from None
        child = RayChild(name, proc, self.log_dir / f"{name}.log", critical)  # type: ignore[arg-type]
        self.children[name] = child
        return child

    def start_ranks(self, name: str, argv: list[str], world: int, threads: int = 1, nice: int = 0,
                    timeout: float = 120.0) -> Child:
        """`argv` as `world` rank actors, rank r named `name` (r = 0) or `name.rank{r}`, each placed by
        `place(that name)` (async_rl/launch/ray_ranks.py); one Child whose proc is their RankedProc."""
        from async_rl.launch.ray_ranks import start_ranks
        try:
            proc = start_ranks(name, argv, world, self.place, self.log_dir, self.child_env(threads), self.cwd, nice,
                               timeout)
        except RuntimeError as exc:
            raise LaunchError(f"{name}: {exc}") from None
        self.actors[name] = proc.actor
        self.specs[name] = {"argv": list(argv), "cpus": [], "threads": threads, "nice": nice, "world": world,
                            "timeout": timeout}
        child = RayChild(name, proc, self.log_dir / f"{name}.log")  # type: ignore[arg-type]
        self.children[name] = child
        return child

    def respawn(self, name: str, extra_args: list[str] = ()) -> Child:
        """A new actor for the dead child `name` (the launcher's supervisor decides when: e.g. the learner,
        which Ray does not restart), with the same command plus `extra_args`; the Child object is kept. A
        ranked learner gets all its ranks anew (and a new MASTER_PORT)."""
        import ray
        child, spec = self.children[name], self.specs[name]
        for part in parts(child.proc):
            ray.kill(part.actor, no_restart=True)
        spec["argv"] = spec["argv"] + [a for a in extra_args if a not in spec["argv"]]
        if "world" in spec:
            fresh = self.start_ranks(name, spec["argv"], spec["world"], spec["threads"], spec["nice"], spec["timeout"])
        else:
            fresh = self.start_command(name, spec["argv"], spec["cpus"], spec["threads"], child.critical, spec["nice"])
        child.proc, child.restarts = fresh.proc, child.restarts + 1
        self.children[name] = child
        return child

    def _stop(self, children: list[Child], grace: float) -> None:
        import ray
        procs = [p for ch in children for p in parts(ch.proc)]
        refs = [p.actor.stop.remote(grace) for p in procs if p.returncode is None]
        try:
            ray.get(refs, timeout=grace + 20)
        except Exception:  # an actor that died meanwhile took its child with it (PR_SET_PDEATHSIG)
            pass
        for p in procs:
            p.poll()
            if p.returncode is None:
                p.returncode = -signal.SIGTERM
            ray.kill(p.actor, no_restart=True)
        for ch in children:  # a ranked learner's code, from its ranks'
            ch.proc.poll()


def parts(proc) -> list[RayProc]:
    """The RayProcs behind a child's proc: its ranks for a ranked learner, else itself."""
    return list(getattr(proc, "ranks", [proc]))


