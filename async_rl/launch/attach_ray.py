"""`async-rl attach --hub tcp://HOST:PORT --key FILE --address RAY_HEAD [--node-resource NAME] [--engines N]`:
the no-shared-filesystem attach (async_rl/launch/attach_remote.py), run on the nodes of a Ray cluster.

Ray only places: one ProcessActor per node that advertises NAME runs `async-rl attach --hub` there, with the
key handed over in its environment (never a path of this machine). Everything else happens on the node:
INFO from the hub, weights pulled over the network, engine ports chosen there, its own working dir under
the node's TMPDIR. This process is the Ray driver that owns them; SIGTERM (or its end) drains and removes
them, and a node that dies takes only its own generators (the hub takes their credits back).

Also the placement of `async-rl attach --address HEAD [--node-resource NAME]` (the shared-run-dir attach,
async_rl/launch/attach.py): `nodes_with`, `NodePlacement`, `attach_group`.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from async_rl import config as config_mod
from async_rl.launch.launcher import LaunchError

KEY_ENV = "ASYNC_RL_ATTACH_KEY"  # the attach key's text, for an attach started where the key file is not


def split(engines: int, nodes: int) -> list[int]:
    """Engines per node, as even as they go (nodes beyond `engines` get none)."""
    return [n for n in (engines // nodes + (1 if j < engines % nodes else 0) for j in range(nodes)) if n]


def attach_remote_ray(hub: str, key: str | None, engines: int, address: str, node_resource: str | None) -> int:
    import ray

    from async_rl.launch.ray_launcher import connect
    from async_rl.launch.ray_procs import RayProcessGroup
    try:
        connect(address, Path(tempfile.mkdtemp(prefix="arl-attach-")))
    except LaunchError as exc:
        print(f"async-rl: attach failed: {exc}", flush=True)
        return 1
    nodes = nodes_with(node_resource)
    if not nodes:
        ray.shutdown()
        print(f"async-rl: attach failed: no alive node of the Ray cluster at {address} advertises "
              f"{node_resource!r}; start one with `ray start --address={address} --resources='{{\"{node_resource}\": 1}}'`")
        return 1
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def place(name: str) -> dict:
        node = nodes[int(name[len("node"):])]
        return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)}
    group = RayProcessGroup(Path(tempfile.gettempdir()) / f"async-rl-attach-{os.getpid()}", place, 0,
                            on_close=ray.shutdown)
    group.env = {KEY_ENV: Path(key).read_text()} if key else {}
    group.cwd = "/"  # every node has it; the attach moves to its own TMPDIR
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which put its own handler on SIGTERM
        signal.signal(sig, lambda *_: stopping.append(1))
    try:
        for j, n in enumerate(split(engines, len(nodes))):
            group.start_command(f"node{j}", ["sh", "-c", 'cd "${TMPDIR:-/tmp}" && exec "$@"', "sh", sys.executable,
                                             "-m", "async_rl.launch.cli", "attach", "--hub", hub, "--engines", str(n)])
        print(f"attach: {engines} engine(s) on {len(group.children)} Ray node(s) advertising {node_resource!r}", flush=True)
        while not stopping and any(c.proc.poll() is None for c in group.children.values()):
            time.sleep(0.5)
        return 0
    except LaunchError as exc:
        print(f"async-rl: attach failed: {exc}", flush=True)
        return 1
    finally:
        group.stop_all(grace=30)


# ---- `async-rl attach --run-dir D --address HEAD [--node-resource NAME]`: engines + generators on nodes that joined ----
def nodes_with(resource: str | None) -> list[dict]:
    """The alive Ray nodes that advertise `resource` (`ray start --resources='{"generator": 1}'`), or all alive
    nodes when None, in a stable order (by node id)."""
    import ray
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return sorted([n for n in alive if resource is None or n["Resources"].get(resource, 0) > 0],
                  key=lambda n: n["NodeID"])


class NodePlacement:
    """`place(name)` for an attach: engine i and generator i go to nodes[i % len(nodes)] by hard node
    affinity, so a generator reaches its engine on loopback; an engine takes cluster.engine_num_threads CPUs
    there, a generator none (it waits on its engine)."""

    def __init__(self, cfg: config_mod.Config, nodes: list[dict]):
        self.cfg, self.nodes = cfg, nodes

    def node_of(self, name: str) -> dict:
        digits = name[len(name.rstrip("0123456789")):]
        return self.nodes[int(digits or 0) % len(self.nodes)]

    def __call__(self, name: str) -> dict:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        cpus = self.cfg.cluster.engine_num_threads if name.startswith("engine") else 0
        gpus = self.cfg.rollout.rollout_num_gpus_per_engine if name.startswith("engine") and \
            self.cfg.cluster.num_gpus_per_node > 0 else 0
        return {"num_cpus": cpus, "num_gpus": gpus,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_of(name)["NodeID"], soft=False)}


def attach_group(address: str, run_dir: Path, log_dir: Path, cfg: config_mod.Config, engines: int,
                 node_resource: str | None):
    """Join the cluster at `address` and return the process group an attach starts its engines and
    generators in, placed on the nodes advertising `node_resource`. Raises LaunchError when no node does,
    or when they cannot hold the engines' CPUs (GPUs)."""
    import ray

    from async_rl.launch.ray_launcher import connect
    from async_rl.launch.ray_procs import RayProcessGroup
    connect(address, run_dir)
    nodes = nodes_with(node_resource)
    if not nodes:
        have = sorted({k for n in ray.nodes() if n.get("Alive") for k in n["Resources"] if "node:" not in k})
        ray.shutdown()
        raise LaunchError(f"--node-resource {node_resource}: no alive node of the Ray cluster at {address} advertises "
                          f"it; start one with `ray start --address={address} --resources='{{\"{node_resource}\": 1}}'`"
                          f"{f' (resources there: {have})' if have else ''}") from None
    place = NodePlacement(cfg, nodes)
    for node in nodes:
        mine = sum(1 for i in range(engines) if place.node_of(f"engine{i}") is node)
        need = mine * cfg.cluster.engine_num_threads
        if need > node["Resources"].get("CPU", 0):
            ray.shutdown()
            raise LaunchError(f"--engines {engines}: node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) would "
                              f"hold {mine} engine(s) x cluster.engine_num_threads={cfg.cluster.engine_num_threads} "
                              f"= {need} CPUs but has {node['Resources'].get('CPU', 0):g}; attach fewer engines, "
                              f"lower cluster.engine_num_threads, or add nodes with --node-resource") from None
    return RayProcessGroup(log_dir, place, cfg.cluster.max_restarts, on_close=ray.shutdown)
