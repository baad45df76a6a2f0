"""Ray across hosts: a Ray head in namespace `head` (beside a running job), a raylet advertising
{"generator": 1} in `gen1` (its own temp dir; gen1 sees neither the run dir nor the model), and
`async-rl attach --hub --key --address HEAD --node-resource generator` run on the head: Ray places the attach on
gen1, which pulls weights over the network and streams groups that the hub acks; detaching drains it."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.multihost.hosts import wait_for
from tests.multihost.run_helpers import CLI, attached_groups, balanced, hub_stats, launch_head, stop_run

# real runs on simulated hosts: the machine may be shared, so allow more than the suite default
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
FAST = ["put_timeout=2", "generator_timeout=5", "heartbeat_interval=1", "max_staleness=2"]
RAY = str(Path(sys.executable).parent / "ray")


def _ray_start(host, *args: str) -> None:
    out = host.run([RAY, "start", f"--node-ip-address={host.addr}", "--num-cpus=1", "--disable-usage-stats", *args],
                   timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_ray_places_a_network_attach_on_the_second_host(network, tiny_world):
    pytest.importorskip("ray")
    net = network({"head": [], "gen1": [tiny_world["root"]]})
    head, gen1 = net["head"], net["gen1"]
    gen1.hidden.append(head.workdir)
    temps = [tempfile.mkdtemp(prefix="arlray", dir="/tmp") for _ in range(2)]  # short: Ray's socket paths
    try:
        proc, run_dir, manifest = launch_head(head, tiny_world, *FAST)
        _ray_start(head, "--head", "--port=6380", "--include-dashboard=false", f"--temp-dir={temps[0]}")
        _ray_start(gen1, f"--address={head.addr}:6380", '--resources={"generator": 1}', f"--temp-dir={temps[1]}")
        driver = head.python([*CLI, "attach", "--hub", manifest["endpoints"]["hub"], "--key",
                              str(run_dir / "keys" / "attach.key"), "--address", f"{head.addr}:6380",
                              "--node-resource", "generator"], "driver.log")

        def on_gen1() -> list[Path]:  # the attach's own record, in gen1's TMPDIR: it ran there
            return [p for p in (gen1.workdir / "tmp").glob("attach-*/attach.json")
                    if "first_group_s" in json.loads(p.read_text())]
        wait_for("the Ray-placed attach's first acked group on gen1", on_gen1, 300, [driver, proc],
                 [("driver", lambda: head.log("driver.log"))])
        record = json.loads(on_gen1()[0].read_text())
        stats = hub_stats(head, run_dir)
        assert attached_groups(stats, f"a{record['pid']}-") > 0, stats.get("generators")
        driver.terminate()  # detach: the attach on gen1 drains, then Ray lets go of it
        assert driver.wait(timeout=90) == 0, head.log("driver.log")[-2000:]
        out = stop_run(head, run_dir, proc)
        assert proc.returncode == 0, out[-3000:]
        assert balanced(hub_stats(head, run_dir) or stats)
    finally:
        net.close()
        for d in temps:
            shutil.rmtree(d, ignore_errors=True)
