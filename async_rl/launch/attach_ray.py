"""`async-rl attach --hub tcp://HOST:PORT --key FILE --address RAY_HEAD [--node-resource NAME] [--engines N]`:
the no-shared-filesystem attach (async_rl/launch/attach_remote.py), run on the nodes of a Ray cluster.

Ray only places: one ProcessActor per node that advertises NAME runs `async-rl attach --hub` there, with the
key handed over in its environment (never a path of this machine). Everything else happens on the node:
INFO from the hub, weights pulled over the network, engine ports chosen there, its own working dir under
the node's TMPDIR. This process is the Ray driver that owns them; SIGTERM (or its end) drains and removes
them, and a node that dies takes only its own generators (the hub takes their credits back).
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from async_rl.launch.launcher import LaunchError

KEY_ENV = "ASYNC_RL_ATTACH_KEY"  # the attach key's text, for an attach started where the key file is not


def split(engines: int, nodes: int) -> list[int]:
    """Engines per node, as even as they go (nodes beyond `engines` get none)."""
    return [n for n in (engines // nodes + (1 if j < engines % nodes else 0) for j in range(nodes)) if n]


def attach_remote_ray(hub: str, key: str | None, engines: int, address: str, node_resource: str | None) -> int:
    import ray

    from async_rl.launch.ray_launcher import RayProcessGroup, connect, nodes_with
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
