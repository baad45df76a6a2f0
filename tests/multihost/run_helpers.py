"""Helpers for multi-host runs: a head host running `async-rl launch`, generator hosts running
`async-rl attach --hub`, and reading a run's state from inside its host (the test's own namespace cannot
reach the simulated hosts' addresses)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tests.multihost.hosts import Host, wait_for
from tests.test_e2e import write_config

CLI = ["-m", "async_rl.launch.cli"]


def launch_head(head: Host, world: dict, *overrides: str, num_rollout: int = 100_000, options: tuple = ()) -> tuple:
    """`async-rl launch` on `head`, bound to its address (`options`: more of launch's flags, e.g. --cluster ray);
    returns (process, run_dir, run.json once running). The run is long: tests end it with `stop_run` once they
    have seen what they came for."""
    cfg = write_config(head.workdir, world, num_rollout=num_rollout)
    run_dir = head.workdir / "run"
    proc = head.python([*CLI, "launch", str(cfg), f"cluster.host={head.addr}", *overrides, "--run-dir", str(run_dir),
                        *options], "launch.log")

    def running() -> bool:
        path = run_dir / "run.json"
        return path.exists() and json.loads(path.read_text()).get("status") == "running"
    wait_for("head run started", running, 120, [proc], [("launch", lambda: head.log("launch.log"))])
    return proc, run_dir, json.loads((run_dir / "run.json").read_text())


def copy_key(run_dir: Path, host: Host) -> Path:
    """What the operator does: copy the run's attach key to the generator host."""
    dest = host.workdir / "attach.key"
    shutil.copy(run_dir / "keys" / "attach.key", dest)
    return dest


def attach(host: Host, hub: str, key: Path, engines: int = 1, log: str = "attach.log"):
    return host.python([*CLI, "attach", "--hub", hub, "--key", str(key), "--engines", str(engines),
                        "--work-dir", str(host.workdir / "attach")], log)


STATS = ("import json,sys; from async_rl.hub_client import HubClient;"
         "c=HubClient(sys.argv[1], identity='test', keys_dir=sys.argv[2]); print(json.dumps(c.stats(timeout=30)))")


def hub_stats_at(head: Host, endpoint: str, keys) -> dict:
    """The STATS (books and generators) of the hub at `endpoint`, asked from the head ({} when it does not
    answer)."""
    out = head.run([sys.executable, "-c", STATS, endpoint, str(keys)], timeout=90)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else {}


def hub_stats(head: Host, run_dir: Path) -> dict:
    """The STATS of the run's hub (run_dir/run.json names it), asked from the head."""
    manifest = json.loads((run_dir / "run.json").read_text())
    return hub_stats_at(head, manifest["endpoints"]["hub"], manifest["keys"])


def attached_groups(stats: dict, prefix: str = "a") -> int:
    return sum(g["groups"] for gid, g in stats.get("generators", {}).items() if gid.startswith(prefix))


def stop_run(head: Host, run_dir: Path, proc) -> str:
    head.run([sys.executable, *CLI, "stop", "--run-dir", str(run_dir), "--timeout", "60"], timeout=90)
    proc.wait(timeout=60)
    return head.log("launch.log")


def balanced(stats: dict) -> bool:
    return stats["accepted"] == (stats["consumed"] + stats["evicted_stale"] + stats["evicted_capacity"]
                                 + stats["size"] + stats["in_flight"])
