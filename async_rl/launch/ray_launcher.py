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
cluster.shared_run_dir=false (async_rl/launch/ray_remote.py). The actors and their process group are in
ray_procs.py, the attach's placement in attach_ray.py.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from async_rl import config as config_mod
from async_rl.launch.launcher import LaunchError, Launcher
from async_rl.launch.ray_procs import RayProc, RayProcessGroup, parts
from async_rl.placement import learner_is_ranked, learner_ranks


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
        return not self.cfg.debug.debug_rollout_only and learner_is_ranked(self.cfg)

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
