"""`async-rl attach`: add engines and generators to a job that is already running, from this machine.

They register with the hub by simply asking it for work: the hub hands them prompts and admission
credits, their first grant names the current weights version, which they load before generating, and
their groups are trained on like any other. Nothing in the running job restarts. `async-rl detach`
(SIGTERM to this process) drains them: each generator finishes and delivers the engine call in hand.

Needs the run directory (config, keys, published weights) on this machine; pulling weights over the
hub's socket for a node without the shared filesystem is not built yet.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from async_rl import config as config_mod
from async_rl.launcher import LaunchError, Launcher
from async_rl.procs import ProcessGroup
from async_rl.run_dir import pid_alive, read_manifest


def attach(run_dir: str | Path, engines: int) -> int:
    run_dir = Path(run_dir)
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
    launcher.procs = ProcessGroup(run_dir / "logs" / tag)
    record = run_dir / "attached" / f"{os.getpid()}.json"
    stopping: list[int] = []
    previous = {s: signal.signal(s, lambda *_: stopping.append(1)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        launcher.start_engines()
        launcher.start_generators(id_prefix=f"a{os.getpid()}-g")
        record.parent.mkdir(exist_ok=True)
        record.write_text(json.dumps({"pid": os.getpid(), "engines": launcher.engine_urls,
                                      "processes": {n: c.proc.pid for n, c in launcher.procs.children.items()}}))
        print(f"attached {engines} engine(s) + generator(s) to {run_dir}: {launcher.engine_urls}", flush=True)
        gens = [c for n, c in launcher.procs.children.items() if n.startswith("generator")]
        while not stopping and any(c.proc.poll() is None for c in gens) and pid_alive(manifest["launcher_pid"]):
            time.sleep(0.5)
        return 0
    except LaunchError as exc:
        print(f"async-rl: attach failed: {exc}", flush=True)
        return 1
    finally:
        launcher.procs.stop_all()
        record.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
