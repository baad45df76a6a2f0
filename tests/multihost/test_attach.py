"""A generator host joins a running job by address and key only: the head (hub, learner, its own engine and
generator) runs in namespace `head`, bound to its address; `async-rl attach --hub --key` runs in `gen1`, which
cannot see the head's run dir or the model. The attached generator pulls the current weights over the
network, its groups are acked and trained on, later versions reach its engine through the weight server,
and the head's engines refuse requests without the run's API key."""
from __future__ import annotations

import json
import re
import sys

import pytest

from tests.multihost.hosts import wait_for
from tests.multihost.run_helpers import (attach, attached_groups, balanced, copy_key, hub_stats, launch_head,
                                         stop_run)

# real runs on simulated hosts: the machine may be shared, so allow more than the suite default
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
FAST = ["put_timeout=2", "generator_timeout=5", "heartbeat_interval=1", "max_staleness=2"]
PROBE = ("import requests,sys; r=requests.get(sys.argv[1]+'/get_model_info', timeout=10); print(r.status_code)")


def test_attach_by_address_pulls_weights_streams_groups_and_follows_versions(network, tiny_world):
    net = network({"head": [], "gen1": [tiny_world["root"]]})
    head, gen1 = net["head"], net["gen1"]
    net.hosts["gen1"].hidden.append(head.workdir)  # gen1 sees neither the model nor the head's run dir
    proc, run_dir, manifest = launch_head(head, tiny_world, *FAST)
    endpoints = manifest["endpoints"]
    assert endpoints["hub"].startswith(f"tcp://{head.addr}:") and endpoints["weights"].startswith(f"tcp://{head.addr}:")
    assert all(u.startswith(f"http://{head.addr}:") for u in endpoints["engines"])
    key = copy_key(run_dir, gen1)
    assert gen1.run(["ls", "-A", str(run_dir)]).stdout.strip() == ""  # really not there for gen1
    # the head's engine is reachable from gen1 but is no open door
    assert gen1.run([sys.executable, "-c", PROBE, endpoints["engines"][0]]).stdout.strip() == "401"

    att = attach(gen1, endpoints["hub"], key)
    record = gen1.workdir / "attach" / "attach.json"
    wait_for("attached generator's first acked group",
             lambda: record.exists() and "first_group_s" in json.loads(record.read_text()), 240, [att, proc],
             [("attach", lambda: gen1.log("attach.log")), ("launch", lambda: head.log("launch.log"))])
    start = json.loads(record.read_text())["version"]
    weights = gen1.workdir / "attach" / "weights"
    # later versions follow, pulled over the network into gen1's own store
    wait_for("a later version pulled by gen1",
             lambda: any(int(p.name[1:]) >= start + 2 for p in weights.glob("v*") if p.name[1:].isdigit()), 240,
             [att, proc], [("attach", lambda: gen1.log("attach.log"))])
    gen_log = "".join(p.read_text() for p in (gen1.workdir / "attach" / "logs").glob("generator*.log"))
    loaded = [int(v) for v in re.findall(r"engines now at versions \[(\d+)\]", gen_log)]
    assert loaded and max(loaded) >= start + 2, gen_log[-2000:]
    stats = hub_stats(head, run_dir)
    assert attached_groups(stats) > 0, stats.get("generators")
    att.terminate()  # detach: it drains and exits
    assert att.wait(timeout=60) == 0, gen1.log("attach.log")[-2000:]
    out = stop_run(head, run_dir, proc)
    assert proc.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["buffer/accepted"] == (last["buffer/consumed"] + last["buffer/evicted_stale"]
                                       + last["buffer/evicted_capacity"] + last["buffer/size"] + last["buffer/in_flight"])
    assert balanced(stats)
