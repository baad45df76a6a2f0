"""`async-rl launch CONFIG --cluster ray` with `cluster.shared_run_dir=false`: a Ray cluster whose nodes do not
share the run dir.

Only the node that runs `launch` (the driver's) has the run dir, so every process that reads or writes it runs
there, by hard node affinity and outside the placement group: the hub (its WAL), the weight server, the
learner, evals. The placement group holds one bundle per engine (cluster.engine_num_threads CPUs, GPUs when
cluster.num_gpus_per_node > 0); the actor in bundle i runs `async-rl attach --hub HUB --engines 1` on its node
(async_rl/launch/attach_remote.py): INFO from the hub, the current version pulled from the weight server, its
engine's port chosen there, its generator streaming groups, later versions pulled as they are published; its
working dir is under the node's TMPDIR, the attach key reaches it in its environment (never a path). An attach
that dies is restarted by Ray (cluster.max_restarts) as a new incarnation; the hub takes back the dead one's
credits and grants its prompts again. What stays on a node: its attach's logs (under run_dir/logs there, or
its TMPDIR) and pulled weights.

Refused with the fix named, before anything starts: a loopback cluster.host (the other nodes could not reach
the hub), buffer.auth=false (no attach key), update_weight_mode other than disk, serve_weights=off, external
engines, the debug modes. No engine is the launcher's own, so the start/end evals (which use engine 0) are
skipped; the eval worker (eval.eval_interval) still runs, on the driver's node.
"""
from __future__ import annotations

import sys

from async_rl import config as config_mod
from async_rl.endpoints import is_loopback
from async_rl.launch.launcher import LaunchError
from async_rl.launch.ray_launcher import RayLauncher


def remote_problem(cfg: config_mod.Config) -> str | None:
    """Why this config cannot run with cluster.shared_run_dir=false (None when it can)."""
    c, r, d = cfg.cluster, cfg.rollout, cfg.debug
    why = "with cluster.shared_run_dir=false"
    if is_loopback(c.host):
        return (f"cluster.host={c.host}: {why} the other nodes reach the hub and the weight server at cluster.host; "
                f"set it to this node's address (or 0.0.0.0 plus cluster.advertise_host)")
    if not cfg.buffer.auth:
        return f"buffer.auth=false: {why} each node's attach joins with the run's attach key; set buffer.auth=true"
    if r.update_weight_mode != "disk":
        return (f"rollout.update_weight_mode={r.update_weight_mode}: {why} engines pull each version over the "
                f"network; set update_weight_mode=disk")
    if c.serve_weights == "off":
        return f"cluster.serve_weights=off: {why} the nodes get weights only from the weight server; set it to auto"
    if r.rollout_external_engine_addrs:
        return f"rollout.rollout_external_engine_addrs: {why} engines start on the nodes; leave it empty"
    if c.actor_num_nodes > 1:
        return (f"cluster.actor_num_nodes={c.actor_num_nodes}: {why} the learner runs on this node (every rank writes "
                f"its checkpoint shards into the run dir); set actor_num_nodes=1, or share the run dir (the default)")
    if d.debug_train_only or d.debug_rollout_only:
        return f"debug.debug_train_only / debug_rollout_only: not {why}; use the shared run dir (the default)"
    return None


class RemoteRayLauncher(RayLauncher):
    def prepare(self) -> None:
        problem = remote_problem(self.cfg)
        if problem:
            raise LaunchError(problem)
        super().prepare()

    def _learner_bundles(self) -> int:
        return 0  # the learner runs on this node, by affinity

    def _bundles(self) -> list[dict]:
        import ray
        self.driver_node = ray.get_runtime_context().get_node_id()
        return super()._bundles()[self.cfg.cluster.actor_num_nodes:]  # the engines' only

    def _place(self, name: str) -> dict:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        kind, digits = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")):]
        if kind == "attach":
            index = int(digits) % self.num_bundle_engines
            res = self._bundles()[index]
            return {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0), "scheduling_strategy": self._slot(index)}
        learner = name == "learner" or name.startswith("learner.rank")  # (one process, or each rank's actor)
        gpus = self._learner_share().get("GPU", 0) if learner and self.cfg.cluster.num_gpus_per_node else 0
        return {"num_cpus": 0, "num_gpus": gpus,  # (the run dir is here; Ray need not count their CPUs)
                "scheduling_strategy": NodeAffinitySchedulingStrategy(self.driver_node, soft=False)}

    def start_engines(self) -> None:
        self.engine_urls = []  # each attach starts its own, on its node

    def start_generators(self, id_prefix: str = "g") -> None:
        from async_rl.launch.attach_ray import KEY_ENV
        self.procs.env = {**self.procs.env, KEY_ENV: (self.keys_dir / "attach.key").read_text()}
        cwd, self.procs.cwd = self.procs.cwd, "/"  # every node has it; the attach moves to its own TMPDIR
        try:
            for i in range(self.num_bundle_engines):
                self.procs.start_command(f"attach{i}", [
                    "sh", "-c", 'cd "${TMPDIR:-/tmp}" && exec "$@"', "sh", sys.executable, "-m",
                    "async_rl.launch.cli", "attach", "--hub", self.hub_endpoint, "--engines", "1"])
        finally:
            self.procs.cwd = cwd
