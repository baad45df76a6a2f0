"""No prompt of an epoch is lost with a host: the hub runs on `head` (durable, CURVE), gen1 and gen2 each take
prompts and hold them; gen1 is then lost whole (killed, link down) and gen2 cut off. Once the hub declares
them dead, gen3 (joining then) is granted exactly their prompts first; gen2 heals and delivers its prompts
late, which the hub acks as duplicates and does not store. In the end every prompt dispensed from the cursor
has exactly one stored group, counted against the dispenser's order (no shuffle: slot k is prompt k mod N).
The generators are tests/multihost/hub_peer.py (the protocol without an engine)."""
from __future__ import annotations

import collections
import json
import shutil

import pytest
import yaml

from async_rl import config as config_mod
from async_rl.keys import create_keys
from tests.multihost.hosts import Host, wait_for
from tests.multihost.run_helpers import hub_stats_at

pytestmark = pytest.mark.timeout(300)
N_PROMPTS, HELD = 10, 3


def _events(host: Host) -> list[dict]:
    path = host.workdir / "peer" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _peer(host: Host, hub: str, mode: list[str]):
    (host.workdir / "peer").mkdir(exist_ok=True)
    return host.python(["-m", "tests.multihost.hub_peer", "--hub", hub, "--key", str(host.workdir / "attach.key"),
                        "--gid", host.name, "--dir", str(host.workdir / "peer"), *mode], "peer.log")


def test_a_lost_hosts_prompts_are_granted_again_and_a_late_delivery_is_not_stored(network):
    net = network({"head": [], "gen1": [], "gen2": [], "gen3": []})
    head, gens = net["head"], [net[f"gen{i}"] for i in (1, 2, 3)]
    for g in gens:
        g.hidden.append(head.workdir)
    data = head.workdir / "prompts.jsonl"
    data.write_text("".join(json.dumps({"input": f"{i}+0=", "label": str(i)}) + "\n" for i in range(N_PROMPTS)))
    cfg = config_mod.load(None, [f"prompt_data={data}", "rollout_shuffle=false", "rollout_batch_size=2",
                                 "n_samples_per_prompt=2", "max_staleness=100", "generator_timeout=3"])
    (head.workdir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    keys = create_keys(head.workdir / "keys")
    for g in gens:
        shutil.copy(keys / "attach.key", g.workdir / "attach.key")
    hub_proc = head.python(["-m", "buffer.service", "--config", str(head.workdir / "config.yaml"),
                            "--bind", f"tcp://{head.addr}:5555", "--state-dir", str(head.workdir / "hub"),
                            "--keys", str(keys)], "hub.log")
    hub = f"tcp://{head.addr}:5555"
    logs = [("hub", lambda: head.log("hub.log"))] + [(g.name, lambda g=g: g.log("peer.log")) for g in gens]
    gen1, gen2, gen3 = gens
    holders = [_peer(g, hub, ["--hold", str(HELD)]) for g in (gen1, gen2)]
    wait_for("gen1 and gen2 holding their prompts", lambda: all(_events(g) for g in (gen1, gen2)), 60,
             [hub_proc, *holders], logs)
    lost = [p for g in (gen1, gen2) for p in _events(g)[0]["grant"]]
    assert sorted(lost) == list(range(2 * HELD))

    gen1.kill()
    gen1.link(False)
    gen2.link(False)
    wait_for("the hub to declare gen1 and gen2 lost",
             lambda: hub_stats_at(head, hub, keys).get("reissue_pending") == 2 * HELD, 60, [hub_proc], logs)
    worker = _peer(gen3, hub, ["--work"])
    put = lambda g: [e for e in _events(g) if "put" in e]  # noqa: E731
    wait_for("gen3 delivering the lost prompts and more", lambda: len(put(gen3)) >= 2 * N_PROMPTS, 90,
             [hub_proc, worker], logs)
    grants = [p for e in _events(gen3) if "grant" in e for p in e["grant"]]
    assert sorted(grants[:2 * HELD]) == sorted(lost)  # what the lost hosts held goes out first

    gen2.link(True)
    (gen2.workdir / "peer" / "deliver").touch()
    wait_for("gen2's late deliveries acked", lambda: _events(gen2)[-1].get("done"), 60, [hub_proc], logs)
    assert [e["duplicate"] for e in put(gen2)] == [True] * HELD  # gen3 had delivered them: not stored again
    (gen3.workdir / "peer" / "stop").touch()
    assert worker.wait(timeout=60) == 0, gen3.log("peer.log")[-2000:]

    s = hub_stats_at(head, hub, keys)
    stored = collections.Counter(e["put"] for g in gens for e in put(g) if not e["duplicate"])
    fresh = sum(len(e["grant"]) for g in gens for e in _events(g) if "grant" in e) - s["reissued"]
    assert s["reissued"] == 2 * HELD and s["late_duplicates"] == HELD and s["reissue_pending"] == 0
    assert stored == collections.Counter(k % N_PROMPTS for k in range(fresh)), (stored, fresh)
    assert s["accepted"] == sum(stored.values()) and s["running"] == 0
    assert s["accepted"] == s["consumed"] + s["evicted_stale"] + s["evicted_capacity"] + s["size"] + s["in_flight"]
    hub_proc.terminate()
    assert hub_proc.wait(timeout=30) == 0, head.log("hub.log")[-2000:]
