"""`async-rl attach`: add engines and generators to a job that is already running, from this machine.

They register with the hub by simply asking it for work: the hub hands them prompts and admission
credits, their first grant names the current weights version, which they load before generating, and
their groups are trained on like any other. Nothing in the running job restarts. `async-rl detach`
(SIGTERM to this process) drains them: each generator finishes and delivers the engine call in hand.

With `--address HEAD` the engines and generators are Ray actors (ray_launcher's ProcessActor, the same
command lines) on the nodes of that cluster that advertise `--node-resource NAME` (`ray start
--address=HEAD --resources='{"NAME": 1}'`), engine i and generator i on the same node; the attach process is
the Ray driver that owns them, so detaching (or its end) removes them from the cluster.

Needs the run directory (config, keys, published weights) at the same path where they run; a host without
it attaches by address instead (`attach --hub --key`, async_rl/launch/attach_remote.py).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from async_rl import config as config_mod
from async_rl.launch.launcher import LaunchError, Launcher
from async_rl.launch.procs import ProcessGroup
from async_rl.run_dir import pid_alive, read_manifest


def attach(run_dir: str | Path, engines: int, address: str | None = None, node_resource: str | None = None) -> int:
    run_dir = Path(run_dir)
    if engines < 1:
        print(f"async-rl: --engines {engines}: must be >= 1 (engines to start, one generator each)")
        return 2
    manifest = read_manifest(run_dir)
    if not pid_alive(manifest.get("launcher_pid")) or not manifest["endpoints"].get("hub"):
        print(f"async-rl: run {run_dir} is not running (status {manifest['status']}); nothing to attach to")
        return 1
    cfg = config_mod.load(run_dir / "config.yaml")
    cfg.cluster.num_engines = cfg.cluster.num_generators = engines
    launcher = Launcher(cfg, run_dir)
    launcher.keys_dir = manifest.get("keys")
    launcher.hub_endpoint = manifest["endpoints"]["hub"]
    tag = f"attach-{os.getpid()}"
    (run_dir / "logs" / tag).mkdir(parents=True, exist_ok=True)
    record = run_dir / "attached" / f"{os.getpid()}.json"
    stopping: list[int] = []
    previous = {s: signal.signal(s, lambda *_: stopping.append(1)) for s in (signal.SIGTERM, signal.SIGINT)}
    launcher.procs = None
    try:
        if address:
            from async_rl.launch.attach_ray import attach_group
            launcher.procs = attach_group(address, run_dir, run_dir / "logs" / tag, cfg, engines, node_resource)
            for sig in previous:  # ray.init put its crash handler on SIGTERM (it aborts): detach must drain
                signal.signal(sig, lambda *_: stopping.append(1))
        else:
            launcher.procs = ProcessGroup(run_dir / "logs" / tag)
        launcher.start_engines()
        launcher.start_generators(id_prefix=f"a{os.getpid()}-g")
        record.parent.mkdir(exist_ok=True)
        record.write_text(json.dumps({"pid": os.getpid(), "engines": launcher.engine_urls,
                                      "processes": {n: c.proc.pid for n, c in launcher.procs.children.items()},
                                      **_cluster(launcher.procs, address, node_resource)}))
        print(f"attached {engines} engine(s) + generator(s) to {run_dir}: {launcher.engine_urls}", flush=True)
        gens = [c for n, c in launcher.procs.children.items() if n.startswith("generator")]
        while not stopping and any(c.proc.poll() is None for c in gens) and pid_alive(manifest["launcher_pid"]):
            time.sleep(0.5)
        return 0
    except LaunchError as exc:
        print(f"async-rl: attach failed: {exc}", flush=True)
        return 1
    finally:
        if launcher.procs is not None:
            # generators first, so each delivers the engine call in hand before its engine goes
            for name in [n for n in launcher.procs.children if n.startswith("generator")]:
                launcher.procs.stop(name)
            launcher.procs.stop_all()
        record.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cluster(procs, address: str | None, node_resource: str | None) -> dict:
    """Where each attached process runs, for the record (and `status`): Ray node id and IP per actor."""
    if not address:
        return {}
    actors = {n: {"node_id": c.proc.node_id, "node_ip": c.proc.node_ip} for n, c in procs.children.items()}
    return {"cluster": {"kind": "ray", "address": address, "node_resource": node_resource, "actors": actors}}


def detach(run_dir: str | Path, timeout: float = 60.0) -> int:
    """Drain and remove every attached group of this run."""
    records = list((Path(run_dir) / "attached").glob("*.json"))
    pids = [json.loads(r.read_text())["pid"] for r in records]
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while any(pid_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    print(f"detached {len(pids)} attach process(es)")
    return 0 if not any(pid_alive(p) for p in pids) else 1
