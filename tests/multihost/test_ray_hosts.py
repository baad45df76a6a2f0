"""Ray across hosts: a Ray head in namespace `head`, a raylet in `gen1` (its own temp dir; gen1 sees neither the
run dir nor the model).
- beside a running job, `async-rl attach --hub --key --address HEAD --node-resource generator` run on the head:
  Ray places the attach on gen1, which pulls weights over the network and streams groups that the hub acks;
  detaching drains it.
- `async-rl launch --cluster ray --address HEAD cluster.shared_run_dir=false` on the head (whose Ray node has no
  CPUs to give, so the engine's bundle can only go to gen1): the hub and learner run on the head, the bundle's
  attach on gen1, and the run trains on gen1's groups and stops cleanly.
- with a shared run dir and cluster.actor_num_nodes=2: one learner rank on each host (one Ray actor a rank)."""
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


def _on(host) -> list[Path]:
    """The records of attaches that ran on `host` (in its TMPDIR) and got a group acked."""
    return [p for p in (host.workdir / "tmp").glob("attach-*/attach.json") if "first_group_s" in json.loads(p.read_text())]


def test_launch_on_ray_without_a_shared_run_dir(network, tiny_world):
    pytest.importorskip("ray")
    net = network({"head": [], "gen1": [tiny_world["root"]]})
    head, gen1 = net["head"], net["gen1"]
    gen1.hidden.append(head.workdir)
    temps = [tempfile.mkdtemp(prefix="arlray", dir="/tmp") for _ in range(2)]
    try:
        _ray_start(head, "--head", "--port=6381", "--include-dashboard=false", f"--temp-dir={temps[0]}", "--num-cpus=0")
        _ray_start(gen1, f"--address={head.addr}:6381", f"--temp-dir={temps[1]}")
        proc, run_dir, manifest = launch_head(head, tiny_world, *FAST, "cluster.shared_run_dir=false",
                                              options=("--cluster", "ray", "--address", f"{head.addr}:6381"))
        wait_for("the run's attach on gen1 streaming", lambda: _on(gen1), 300, [proc],
                 [("launch", lambda: head.log("launch.log"))])
        rows = run_dir / "metrics.jsonl"
        wait_for("the learner training", lambda: rows.exists() and rows.read_text().count("\n") >= 2, 300, [proc],
                 [("launch", lambda: head.log("launch.log"))])
        stats = hub_stats(head, run_dir)
        assert attached_groups(stats, f"a{json.loads(_on(gen1)[0].read_text())['pid']}-") > 0, stats.get("generators")
        actors = json.loads((run_dir / "run.json").read_text())["cluster"]["actors"]
        assert {actors["attach0"]["node_ip"], actors["learner"]["node_ip"], actors["hub"]["node_ip"]} == \
            {gen1.addr, head.addr} and actors["learner"]["node_ip"] == actors["hub"]["node_ip"] == head.addr
        out = stop_run(head, run_dir, proc)
        assert proc.returncode == 0, out[-3000:]
        assert balanced(hub_stats(head, run_dir) or stats)
    finally:
        net.close()
        for d in temps:
            shutil.rmtree(d, ignore_errors=True)


def test_learner_ranks_span_two_hosts_under_ray(network, tiny_world):
    """cluster.actor_num_nodes=2, one torch rank a node, with a shared run dir (gen1 sees every path): the head's
    Ray node has CPUs for one learner bundle and the engine's, gen1's for one learner bundle, so rank 0 runs on
    the head and rank 1 on gen1 (run.json, and each rank's own log); the two join one gloo group across the
    hosts (each over its eth0) and the run trains; the engine, on a non-loopback address, gets the run's API key."""
    pytest.importorskip("ray")
    net = network({"head": [], "gen1": []})
    head, gen1 = net["head"], net["gen1"]
    temps = [tempfile.mkdtemp(prefix="arlray", dir="/tmp") for _ in range(2)]
    try:
        _ray_start(head, "--head", "--port=6382", "--include-dashboard=false", f"--temp-dir={temps[0]}", "--num-cpus=2")
        _ray_start(gen1, f"--address={head.addr}:6382", f"--temp-dir={temps[1]}")
        proc, run_dir, _ = launch_head(head, tiny_world, *FAST, "actor_num_nodes=2",
                                       options=("--cluster", "ray", "--address", f"{head.addr}:6382"))
        rows = run_dir / "metrics.jsonl"
        wait_for("the two-host learner training", lambda: rows.exists() and rows.read_text().count("\n") >= 3, 300,
                 [proc], [("launch", lambda: head.log("launch.log")),
                          ("rank 1", lambda: (run_dir / "logs" / "learner.rank1.log").read_text()
                           if (run_dir / "logs" / "learner.rank1.log").exists() else "")])
        manifest = json.loads((run_dir / "run.json").read_text())
        ranks, actors = manifest["placement"]["learner_ranks"], manifest["cluster"]["actors"]
        assert [(ranks[r]["actor"], ranks[r]["node_ip"]) for r in ("0", "1")] == [("learner", head.addr),
                                                                                  ("learner.rank1", gen1.addr)]
        assert actors["learner.rank1"]["node_ip"] == gen1.addr and actors["engine0"]["node_ip"] == head.addr
        for name, rank in (("learner", 0), ("learner.rank1", 1)):
            log = (run_dir / "logs" / f"{name}.log").read_text()
            assert f"learner: rank {rank} of 2 joined" in log, log[-2000:]
        out = stop_run(head, run_dir, proc)
        assert proc.returncode == 0, out[-3000:]
    finally:
        net.close()
        for d in temps:
            shutil.rmtree(d, ignore_errors=True)


def test_launch_without_a_shared_run_dir_refuses_what_cannot_work():
    from async_rl import config as C
    from async_rl.launch.ray_remote import remote_problem
    base = ["cluster.shared_run_dir=false"]
    assert "cluster.host=127.0.0.1" in remote_problem(C.load(None, base))
    host = base + ["cluster.host=10.0.0.5"]
    assert remote_problem(C.load(None, host)) is None
    assert "update_weight_mode=broadcast" in remote_problem(C.load(None, host + ["update_weight_mode=broadcast"]))
    assert "buffer.auth=false" in remote_problem(C.load(None, host + ["buffer.auth=false"]))
    assert "cluster.actor_num_nodes=2" in remote_problem(C.load(None, host + ["actor_num_nodes=2"]))
