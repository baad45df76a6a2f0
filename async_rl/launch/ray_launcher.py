"""`async-rl launch CONFIG --cluster ray [--address HEAD]`: the local launcher's components, each run by a
Ray actor that starts the very command line `Launcher` builds as its child process.

Invariant: the run-directory contract is the local launcher's (run.json, config.yaml, metrics.jsonl, logs/,
weights/, stop by SIGUSR1, exit codes), because `RayLauncher` *is* a `Launcher` whose process group is made
of Ray actors: every start/wait/monitor/stop decision is the shared code's, only where a process runs differs.
A hub, engine or generator whose process dies takes its actor down with it; Ray restarts the actor
(cluster.max_restarts), which runs the same command again. Until those restarts are used up, the launcher
sees that process as running; after, as failed. The learner is never restarted this way: the supervisor
respawns it (--resume), every rank of a multi-rank learner anew.

The multi-rank learner (FSDP2 at train.actor_num_gpus_per_node x cluster.actor_num_nodes > 1 ranks, and
megatron) is one Ray actor per rank, each running the learner module itself with torch.distributed's
environment (async_rl/launch/ray_ranks.py), where the local launcher runs one torchrun.

Placement: bundles 0..N-1 for the learner, one per learner node (N = cluster.actor_num_nodes; rank r in
bundle r // actor_num_gpus_per_node), then bundle N+i for engine i (CPUs, plus GPUs when
cluster.num_gpus_per_node > 0); one placement group, or with N > 1 the learner's own (STRICT_SPREAD) and the
engines'. The hub, generators and evals ride in their engine's bundle, on its node, so a generator reaches
its engine on loopback. The run directory must be at the same path on every node, unless
cluster.shared_run_dir=false (async_rl/launch/ray_remote.py). The attach's placement is in attach_ray.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from async_rl import config as config_mod
from async_rl.launch.launcher import LaunchError, Launcher
from async_rl.launch.procs import Child, ProcessGroup
from async_rl.placement import learner_ranks

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


class RayProc:
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

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.name, timeout)
            time.sleep(0.2)
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


def _short_temp_dir(run_dir: Path) -> str:
    """Ray's temp dir: inside the run dir unless that makes its unix socket paths too long (107 bytes)."""
    path = (run_dir / "ray").resolve()
    if len(str(path)) <= 40:
        path.mkdir(parents=True, exist_ok=True)
        return str(path)
    return tempfile.mkdtemp(prefix="arl-ray-")


def connect(address: str | None, run_dir: Path) -> bool:
    """Join the Ray cluster at `address`, or start a local one (returns True then). Raises LaunchError."""
    import ray
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            return False
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _temp_dir=_short_temp_dir(run_dir), object_store_memory=100 * 2**20)
        return True
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LaunchError(f"--address {address}: cannot join a Ray cluster there ({exc}); start one with "
                          f"`ray start --head`, or leave --address out to start a local one") from None


def bundles(cfg: config_mod.Config, num_engines: int) -> list[dict]:
    """Bundles 0..N-1: the learner, one per node (N = cluster.actor_num_nodes, train.actor_num_gpus_per_node
    ranks in each); bundle N+i: engine i (with its generators, and the hub in engine 0's)."""
    c, gpus = cfg.cluster, cfg.cluster.num_gpus_per_node > 0
    learner = {"CPU": c.learner_num_threads, **({"GPU": cfg.train.actor_num_gpus_per_node} if gpus else {})}
    engine = {"CPU": c.engine_num_threads, **({"GPU": cfg.rollout.rollout_num_gpus_per_engine} if gpus else {})}
    return [dict(learner) for _ in range(c.actor_num_nodes)] + [dict(engine) for _ in range(num_engines)]


class RayLauncher(Launcher):
    spans_nodes = True

    def __init__(self, cfg: config_mod.Config, run_dir: str | Path, resume: bool = False, address: str | None = None):
        super().__init__(cfg, run_dir, resume)
        self.address, self.started_ray, self.pg = address, False, None
        self.pgs: list = []  # every placement group of the run (self.pg: the first)
        self.slots: list[tuple] = []  # bundle index -> (placement group, its index there)

    def prepare(self) -> None:
        if self.cfg.cluster.engine_gpus or self.cfg.cluster.learner_gpus:
            raise LaunchError(f"cluster.engine_gpus={self.cfg.cluster.engine_gpus}, learner_gpus="
                              f"{self.cfg.cluster.learner_gpus}: GPUs of the local launcher; under --cluster ray, Ray "
                              f"gives each bundle its GPUs (cluster.num_gpus_per_node); set both to []")
        super().prepare()
        self.started_ray = connect(self.address, self.run_dir)
        try:
            self._placement_groups()
        except LaunchError:
            import ray
            ray.shutdown()
            raise
        self.procs = RayProcessGroup(self.run_dir / "logs", self._place, self.cfg.cluster.max_restarts,
                                     self._restarted, self._release)
        from async_rl.keys import ENGINE_KEY_ENV
        if os.environ.get(ENGINE_KEY_ENV):  # (Launcher.prepare set it here; a Ray worker has its raylet's env)
            self.procs.env[ENGINE_KEY_ENV] = os.environ[ENGINE_KEY_ENV]

    def _placement_groups(self) -> None:
        """One placement group of every bundle (PACK, or STRICT_PACK with cluster.colocate); with
        cluster.actor_num_nodes > 1, the learner's bundles in one of their own, one node each (STRICT_SPREAD),
        and the engines' in a second (PACK)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        self.num_bundle_engines = 0 if self.cfg.rollout.rollout_external_engine_addrs else self._num_engines()
        wanted, n = self._bundles(), self._learner_bundles()
        if n > 1:
            split = [(wanted[:n], "STRICT_SPREAD"), (wanted[n:], "PACK")]
        else:
            split = [(wanted, "STRICT_PACK" if self.cfg.cluster.colocate else "PACK")]
        timeout, self.pgs = self.cfg.cluster.startup_timeout, []
        try:
            for b, how in split:  # in turn: the learner's nodes are chosen before the engines take their share
                if b:
                    self.pgs.append(placement_group(b, strategy=how))
                    ray.get(self.pgs[-1].ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            for pg in self.pgs:
                remove_placement_group(pg)
            raise LaunchError(
                f"the Ray cluster cannot place {wanted} ({', '.join(how for b, how in split if b)}; learner: "
                f"cluster.actor_num_nodes={self.cfg.cluster.actor_num_nodes} bundle(s) of cluster.learner_num_threads, "
                f"train.actor_num_gpus_per_node, one node each; one per engine: cluster.engine_num_threads, "
                f"rollout.rollout_num_gpus_per_engine; colocate={self.cfg.cluster.colocate}) within {timeout:.0f}s "
                f"(cluster.startup_timeout); it has {ray.available_resources()}; add nodes or ask for less") from None
        self.pg = self.pgs[0]
        self.slots = [(pg, i) for pg in self.pgs for i in range(pg.bundle_count)]
        if n > 1:  # rank 0 (the hub's client, MASTER_ADDR) on this node when one of the learner's nodes is it
            here = ray.get_runtime_context().get_node_id()
            on = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
            self.slots[:n] = sorted(self.slots[:n], key=lambda slot: on[slot[1]] != here)

    def _learner_bundles(self) -> int:
        return self.cfg.cluster.actor_num_nodes

    def _bundles(self) -> list[dict]:
        return bundles(self.cfg, self.num_bundle_engines)

    def _ranked(self) -> bool:
        """Whether the learner runs as one actor per rank (ray_ranks.py) rather than as one process."""
        t = self.cfg.train
        return not self.cfg.debug.debug_rollout_only and (t.train_backend == "megatron" or learner_ranks(self.cfg) > 1)

    def _learner_share(self) -> dict:
        """What one learner process takes of its bundle: all of it, or a rank's share (one GPU)."""
        res = bundles(self.cfg, 0)[0]
        if not self._ranked():
            return res
        per_node = self.cfg.train.actor_num_gpus_per_node
        return {"CPU": res["CPU"] / per_node, **({"GPU": 1} if "GPU" in res else {})}

    def _slot(self, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        pg, i = self.slots[index]
        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

    def _place(self, name: str) -> dict:
        from async_rl.launch.ray_ranks import rank_of
        kind, digits = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")):]
        nodes, res = self._learner_bundles(), {}
        index = 0
        if self.num_bundle_engines:
            index = nodes + (int(digits) % self.num_bundle_engines if digits and kind != "hub" else 0)
        if name == "learner" or name.startswith("learner.rank"):
            index, res = rank_of(name) // self.cfg.train.actor_num_gpus_per_node, self._learner_share()
        elif kind == "engine":
            res = bundles(self.cfg, max(self.num_bundle_engines, 1))[index]
        return {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0), "scheduling_strategy": self._slot(index)}

    def start_ranked_learner(self, entry: str, args: list[str]) -> None:
        """One Ray actor per learner rank (async_rl/launch/ray_ranks.py), in the learner's bundles."""
        c = self.cfg.cluster
        self.procs.start_ranks("learner", [sys.executable, "-m", entry, *args], learner_ranks(self.cfg),
                               threads=c.learner_num_threads, timeout=c.startup_timeout)

    def _restarted(self, proc: RayProc, old_pid: int) -> None:
        """Ray restarted `proc`'s actor: count it, re-sync a restarted engine to the current weights, record."""
        from async_rl.launch.supervisor import _engine_ready, _wait
        child = self.procs.children[proc.name]
        child.restarts = getattr(child, "restarts", 0) + 1
        print(f"async-rl: {proc.name} died and Ray restarted it (pid {old_pid} -> {proc.pid}, restart "
              f"{child.restarts}, cluster.max_restarts={self.cfg.cluster.max_restarts})", flush=True)
        if proc.name.startswith("engine") and hasattr(self, "_resync_engine"):
            url = self.engine_urls[int(proc.name[len("engine"):])]
            _wait(proc.name, lambda: _engine_ready(url), self.procs, [proc.name], self.cfg.cluster.startup_timeout)
            self._resync_engine(url)
        self.record(self.manifest.data.get("status", "running"))

    def record(self, status: str, **extra) -> None:
        actors = {p.name: {"node_ip": p.node_ip, "node_id": p.node_id, "ray_restarts": p.restarts, "pid": p.pid}
                  for ch in self.procs.children.values() for p in parts(ch.proc)}  # learner, learner.rank1, ...
        learner = self.procs.children.get("learner")
        ranks = {str(r): {"actor": p.name, "node_ip": p.node_ip, "node_id": p.node_id}
                 for r, p in enumerate(getattr(learner.proc, "ranks", []))} if learner else {}
        super().record(status, cluster={"kind": "ray", "address": self.address or "local", "actors": actors},
                       **({"placement": {"learner_ranks": ranks}} if ranks else {}), **extra)

    def _release(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group
        try:
            for pg in self.pgs:
                remove_placement_group(pg)
        finally:
            ray.shutdown()  # disconnects; also ends the cluster when this launcher started it
