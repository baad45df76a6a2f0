"""`async-rl launch --cluster ray` on a real local Ray cluster (a head plus a second raylet on this machine,
every Ray file inside the test dir): the run-dir contract is the local launcher's, and a generator whose
process is SIGKILLed is restarted by Ray with no acked group lost."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_e2e import Drained

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).with_name("ray"))
KEYS = ["step", "version", "time", "reward/mean", "staleness/max", "staleness/mean", "tis/weight_mean",
        "tis/clipfrac", "loss/pg", "perf/train_tokens_per_s", "perf/gen_tokens_per_s", "buffer/size",
        "buffer/evicted_stale"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_groups(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each node's process group, 8 s, then SIGKILL to whatever is left of them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 8
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head (2 CPUs) and a second raylet (1 CPU + {"generator": 1}), each `ray start --block` in its own
    session and stopped by its process group (never `ray stop`: it kills every Ray process on the host)."""
    root = tmp_path_factory.mktemp("ray")  # short: Ray's unix socket paths must stay under 107 bytes
    env = {**os.environ, "HOME": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=80000000"]
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             f"--temp-dir={root}/t", *common], stdout=open(root / "head.log", "w"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    nodes = [head]
    try:
        deadline = time.time() + 60
        while True:  # the GCS answers on its port once the head is up
            assert head.poll() is None and time.time() < deadline, (root / "head.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.3)
        nodes.append(subprocess.Popen([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                                       '--resources={"generator": 1}', *common], stdout=open(root / "node.log", "w"),
                                      stderr=subprocess.STDOUT, env=env, start_new_session=True))
        deadline = time.time() + 60
        while "Ray runtime started" not in (root / "node.log").read_text():  # the second raylet has joined
            assert nodes[1].poll() is None and time.time() < deadline, (root / "node.log").read_text()
            time.sleep(0.3)
        yield {"address": f"127.0.0.1:{port}", "env": env, "root": root, "node_pid": nodes[1].pid}
    finally:
        _stop_groups(nodes)


def write_config(tmp_path: Path, world: dict, num_rollout: int, **buffer) -> Path:
    cfg = {"ckpt": {"hf_checkpoint": str(world["model_sft"])}, "data": {"prompt_data": str(world["train"])},
           "rollout": {"rollout_batch_size": 4, "n_samples_per_prompt": 4, "num_rollout": num_rollout,
                       "rollout_max_response_len": 4, "groups_per_engine_call": 4},
           "buffer": buffer, "logging": {"progress": True}, "cluster": {"startup_timeout": 90}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(cluster: dict, cfg: Path, run_dir: Path, *extra) -> subprocess.Popen:
    return Drained([sys.executable, "-m", "async_rl.launch.cli", "launch", str(cfg), *extra, "--run-dir", str(run_dir),
                    "--cluster", "ray", "--address", cluster["address"]], env=cluster["env"])


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (ProcessLookupError, OSError):
        return False


def test_ray_launch_keeps_the_run_dir_contract(tmp_path, tiny_world, ray_cluster):
    run_dir = tmp_path / "run"
    proc = launch(ray_cluster, write_config(tmp_path, tiny_world, 12), run_dir,
                  f"eval_prompt_data={tiny_world['test']}", "eval_max_prompts=20")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(12))
    assert all(k in r for r in metrics for k in KEYS) and max(r["staleness/max"] for r in metrics) <= 2
    # the local launcher's outputs (tests/test_e2e.py), made by the same component processes
    for name in ("run.json", "config.yaml", "config_history.jsonl", "summary.md", "summary.json", "reward.png",
                 "eval_start.json", "eval_end.json", "weights/v12/config.json"):
        assert (run_dir / name).exists(), name
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["exit_code"] == 0
    assert set(manifest["processes"]) >= {"hub", "engine0", "generator0", "learner"}
    assert manifest["cluster"]["kind"] == "ray" and manifest["cluster"]["address"] == ray_cluster["address"]
    for name, p in manifest["processes"].items():
        assert not alive(p["pid"]), f"{name} (pid {p['pid']}) still running"
        assert "Ray actor" in (run_dir / "logs" / f"{name}.log").read_text().splitlines()[0]
    end = (run_dir / "eval_end.json").read_text()  # the greedy eval ran on engine0's node, on the last weights
    assert "accuracy" in end and "v12" in end


def test_killed_generator_is_restarted_by_ray_and_no_acked_group_is_lost(tmp_path, tiny_world, ray_cluster):
    run_dir = tmp_path / "run"
    # a short generator_timeout returns the dead incarnation's admission credits quickly
    proc = launch(ray_cluster, write_config(tmp_path, tiny_world, 40, generator_timeout=3.0), run_dir)
    deadline = time.time() + 150
    while len(rows(run_dir)) < 4:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.3)
    victim = json.loads((run_dir / "run.json").read_text())["processes"]["generator0"]["pid"]
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "generator0 died and Ray restarted it" in out
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["processes"]["generator0"]["pid"] != victim
    assert manifest["cluster"]["actors"]["generator0"]["ray_restarts"] == 1
    assert "(restarted)" in (run_dir / "logs" / "generator0.log").read_text()
    last = rows(run_dir)[-1]
    assert [r["step"] for r in rows(run_dir)] == list(range(40))
    # the hub's accounting: every acked group is trained on, evicted, or still held; none vanished
    assert last["buffer/accepted"] == (last["buffer/consumed"] + last["buffer/evicted_stale"]
                                       + last["buffer/evicted_capacity"] + last["buffer/size"] + last["buffer/in_flight"])
    assert last["buffer/consumed"] == 39 * 4


def ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def cli(cluster: dict, *args, timeout: float = 120, **kw):
    return subprocess.run([sys.executable, "-m", "async_rl.launch.cli", *args], capture_output=True, text=True,
                          env=cluster["env"], timeout=timeout, **kw)


def test_attach_on_a_joined_node_streams_groups_that_are_trained_and_detach_removes_it(tmp_path, tiny_world,
                                                                                        ray_cluster):
    from async_rl.debug import find_rollouts, load_rollout
    run_dir, saved = tmp_path / "run", tmp_path / "rollouts"
    proc = launch(ray_cluster, write_config(tmp_path, tiny_world, 2000), run_dir, f"save_debug_rollout_data={saved}")
    attached = None
    try:
        deadline = time.time() + 150
        while len(rows(run_dir)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.3)
        attached = Drained([sys.executable, "-m", "async_rl.launch.cli", "attach", "--run-dir", str(run_dir),
                            "--address", ray_cluster["address"], "--node-resource", "generator"], env=ray_cluster["env"])
        record, prefix = run_dir / "attached" / f"{attached.pid}.json", f"a{attached.pid}-g0-"
        trained: list[int] = []  # learner steps whose batch holds a group of the attached generator
        deadline = time.time() + 150
        while not trained:
            assert attached.poll() is None, attached.communicate()[0]
            assert proc.poll() is None and time.time() < deadline, "the attached generator's groups were never trained on"
            time.sleep(1.0)
            trained = [i for i, path in find_rollouts(str(saved))
                       if any(g.generator_id.startswith(prefix) for g in load_rollout(path)["groups"])]
        where = json.loads(record.read_text())
        gen = where["cluster"]["actors"]["generator0"]
        assert where["cluster"]["actors"]["engine0"]["node_id"] == gen["node_id"]  # it reaches its engine on loopback
        # independently of what attach wrote: Ray's own node table, and the process tree of this machine
        nodes = subprocess.run(
            [sys.executable, "-c", "import json, ray; ray.init(address='%s', log_to_driver=False); print(json.dumps("
             "[n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('generator')]))"
             % ray_cluster["address"]], capture_output=True, text=True, env=ray_cluster["env"], timeout=120)
        assert json.loads(nodes.stdout.strip().splitlines()[-1]) == [gen["node_id"]], nodes.stderr
        gen_pid = where["processes"]["generator0"]
        assert ray_cluster["node_pid"] in ancestors(gen_pid)  # started under the second raylet, not the head
        assert "Ray actor" in (run_dir / "logs" / f"attach-{attached.pid}" / "generator0.log").read_text()
        consumed = rows(run_dir)[-1]["buffer/consumed"]
        detach = cli(ray_cluster, "detach", "--run-dir", str(run_dir))
        assert detach.returncode == 0, detach.stdout + detach.stderr
        out, _ = attached.communicate(timeout=60)
        assert attached.returncode == 0, out
        assert not record.exists() and not alive(gen_pid)
        deadline = time.time() + 60
        while rows(run_dir)[-1]["buffer/consumed"] <= consumed + 8:  # the run goes on without it
            assert proc.poll() is None and time.time() < deadline, "detaching must not disturb the run"
            time.sleep(0.3)
        stop = cli(ray_cluster, "stop", "--run-dir", str(run_dir), "--timeout", "200", timeout=240)
        if stop.returncode != 0:
            masks = [ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ln.startswith("Sig")]
            proc.send_signal(signal.SIGINT)
            pytest.fail(f"stop: {stop.stdout + stop.stderr}\nlauncher signal masks: {masks}\n"
                        f"launcher: {proc.communicate(timeout=60)[0][-4000:]}")
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    finally:
        for p in (attached, proc):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.communicate(timeout=60)
    last = rows(run_dir)[-1]
    assert last["buffer/accepted"] == (last["buffer/consumed"] + last["buffer/evicted_stale"]
                                       + last["buffer/evicted_capacity"] + last["buffer/size"] + last["buffer/in_flight"])


def test_attach_to_a_resource_no_node_advertises_fails_clearly(tmp_path, ray_cluster):
    from async_rl import config as config_mod
    run_dir = tmp_path / "run"
    # a run dir that looks alive (this process as its launcher); the check fails before anything starts
    (run_dir / "logs").mkdir(parents=True)
    config_mod.save(config_mod.load(None, ["hf_checkpoint=x", "prompt_data=y"]), run_dir / "config.yaml")
    (run_dir / "run.json").write_text(json.dumps({"launcher_pid": os.getpid(), "status": "running",
                                                  "endpoints": {"hub": "tcp://127.0.0.1:1", "engines": []}}))
    out = cli(ray_cluster, "attach", "--run-dir", str(run_dir), "--address", ray_cluster["address"],
              "--node-resource", "tpu_pod")
    assert out.returncode == 1 and "--node-resource tpu_pod: no alive node" in out.stdout, out.stdout + out.stderr
    assert "'generator'" in out.stdout  # what the cluster does advertise
    assert not (run_dir / "attached").exists() or not list((run_dir / "attached").iterdir())
    bad = cli(ray_cluster, "attach", "--run-dir", str(run_dir), "--node-resource", "generator")
    assert bad.returncode == 2 and "--node-resource generator: only with --address" in bad.stderr


def _cfg(**cluster):
    from async_rl import config as config_mod
    return config_mod.load(None, [f"cluster.{k}={v}" for k, v in cluster.items()] + ["hf_checkpoint=x", "prompt_data=y"])


@pytest.mark.parametrize("words, message", [
    ({"offload": "true"}, "cluster.offload=true: not supported"),
    ({"actor_num_nodes": 2, "colocate": "true"}, "cluster.actor_num_nodes=2 with colocate=true"),
    ({"actor_num_nodes": 0}, "cluster.actor_num_nodes=0: must be >= 1"),
    ({"colocate": "true", "num_gpus_per_node": 8}, "cluster.colocate=true with num_gpus_per_node=8"),
    ({"num_gpus_per_node": -1}, "cluster.num_gpus_per_node=-1: must be >= 0"),
])
def test_placement_options_that_cannot_be_honoured_fail_clearly(words, message):
    from async_rl.config import ConfigError
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _cfg(**words)


def test_bundles_follow_the_slime_placement_options():
    from async_rl.launch.ray_launcher import bundles
    cfg = _cfg(learner_num_threads=2, engine_num_threads=1)
    assert bundles(cfg, 2) == [{"CPU": 2}, {"CPU": 1}, {"CPU": 1}]  # a CPU cluster asks for no GPU
    cfg = _cfg(num_gpus_per_node=8)
    cfg.train.actor_num_gpus_per_node, cfg.rollout.rollout_num_gpus_per_engine = 4, 2
    assert bundles(cfg, 2) == [{"CPU": 1, "GPU": 4}, {"CPU": 1, "GPU": 2}, {"CPU": 1, "GPU": 2}]
    cfg = _cfg(num_gpus_per_node=8, actor_num_nodes=2, learner_num_threads=4)  # one learner bundle per node, first
    cfg.train.actor_num_gpus_per_node = 2
    assert bundles(cfg, 1) == [{"CPU": 4, "GPU": 2}] * 2 + [{"CPU": 1, "GPU": 1}]


@pytest.mark.parametrize("nodes, per_node, want", [(1, 2, [0, 0]), (2, 1, [0, 1]), (2, 3, [0, 0, 0, 1, 1, 1]),
                                                   (3, 2, [0, 0, 1, 1, 2, 2])])
def test_rank_r_goes_to_learner_bundle_r_div_ranks_per_node(nodes, per_node, want):
    from async_rl.launch.ray_ranks import rank_bundles
    assert rank_bundles(nodes, per_node) == want


def test_rank_envs_name_rank_0s_node_and_each_nodes_interface():
    from async_rl.launch.ray_ranks import rank_envs
    a = {"node_ip": "10.0.0.1", "node_id": "A", "ifname": "eth0", "gpus": ["3"], "port": 4711, "set": []}
    b = {"node_ip": "10.0.0.2", "node_id": "B", "ifname": "ib0", "gpus": ["5"], "port": 0,
         "set": ["NCCL_SOCKET_IFNAME"]}
    envs = rank_envs([a, dict(a, gpus=["1"], port=0), b, dict(b, gpus=["2"])])
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"] and {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"] and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["ASYNC_RL_LEARNER_RANKS"]) for e in envs} == {("10.0.0.1", "4711", "4")}
    assert [e["GLOO_SOCKET_IFNAME"] for e in envs] == ["eth0", "eth0", "ib0", "ib0"]
    assert "NCCL_SOCKET_IFNAME" not in envs[2] and envs[0]["NCCL_SOCKET_IFNAME"] == "eth0"  # the operator's stands
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,1", "3,1", "5,2", "5,2"]  # cuda:LOCAL_RANK is its own


def test_interface_of_finds_the_loopback_interface():
    from async_rl.launch.ray_ranks import interface_of
    assert interface_of("127.0.0.1") == "lo" and interface_of("192.0.2.77") is None


def test_ranked_proc_ends_when_any_rank_fails_and_stops_the_others(tmp_path, ray_cluster):
    """Real rank actors (ProcessActors) on the test cluster: a rank that exits 3 ends the RankedProc with 3 and
    its other ranks are stopped; ranks that all exit 0 end it with 0; a signal reaches every rank."""
    from async_rl.launch.ray_procs import ProcessActor, RayProc
    from async_rl.launch.ray_ranks import RankedProc
    ray.init(address=ray_cluster["address"], log_to_driver=False, configure_logging=False)
    try:
        def ranked(*commands: str) -> RankedProc:
            procs = []
            for i, cmd in enumerate(commands):
                actor = ray.remote(ProcessActor).options(num_cpus=0).remote(
                    f"r{i}", ["sh", "-c", cmd], str(tmp_path / f"r{i}.log"), {}, str(tmp_path), [], 0, False)
                procs.append(RayProc(f"r{i}", actor))
            return RankedProc("learner", procs)
        failing = ranked("sleep 60", "sleep 0.5; exit 3")
        assert failing.poll() is None
        assert failing.wait(timeout=30) == 3 and failing.failed is failing.ranks[1]
        assert failing.ranks[0].returncode is not None and failing.ranks[0].returncode < 0  # stopped, not left waiting
        done = ranked("sleep 0.3", "true")
        assert done.wait(timeout=30) == 0
        signalled = ranked("sleep 60", "sleep 60")
        signalled.send_signal(signal.SIGTERM)
        assert signalled.wait(timeout=30) == -signal.SIGTERM
        assert [p.returncode for p in signalled.ranks] == [-signal.SIGTERM] * 2
    finally:
        ray.shutdown()


def test_local_launcher_refuses_a_learner_spanning_nodes(tmp_path):
    world = {"model_sft": tmp_path / "none", "train": tmp_path / "none.jsonl"}  # refused before paths are read
    for extra in ([], ["--dry-run"]):
        out = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "launch", str(write_config(tmp_path, world, 2)),
                              "actor_num_nodes=2", "--run-dir", str(tmp_path / "run"), *extra], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "cluster.actor_num_nodes=2: the local launcher" in out.stderr, out.stderr
        assert "--cluster ray" in out.stderr and not (tmp_path / "run").exists()


def test_local_launcher_refusal_names_the_field_and_the_fix(tmp_path):
    from async_rl.launch.launcher import LaunchError, Launcher
    with pytest.raises(LaunchError, match=r"cluster.actor_num_nodes=2: the local launcher .* --cluster ray .* "
                                          r"set actor_num_nodes=1"):
        Launcher(_cfg(actor_num_nodes=2), tmp_path / "run").prepare()


def test_fsdp_learner_runs_one_ray_actor_per_rank_and_a_dead_rank_respawns_every_rank(tmp_path, tiny_world,
                                                                                        ray_cluster):
    """train_backend torch at actor_num_gpus_per_node=2 (two gloo ranks): two rank actors, not one torchrun;
    rank 1 joins the group of 2 and logs to learner.rank1.log; the run trains and publishes. SIGKILL of rank
    1's process: the supervisor respawns the learner (both ranks, --resume) and the run ends with every step
    once."""
    run_dir, steps = tmp_path / "run", 16
    proc = launch(ray_cluster, write_config(tmp_path, tiny_world, steps), run_dir, "actor_num_gpus_per_node=2",
                  "save_interval=3")
    try:
        deadline = time.time() + 150
        while len(rows(run_dir)) < 5:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.3)
        manifest = json.loads((run_dir / "run.json").read_text())
        actors, ranks = manifest["cluster"]["actors"], manifest["placement"]["learner_ranks"]
        assert {"learner", "learner.rank1"} <= set(actors) and [ranks[r]["actor"] for r in "01"] == ["learner", "learner.rank1"]
        assert "torch.distributed.run" not in Path(f"/proc/{actors['learner']['pid']}/cmdline").read_text()
        for name, rank in (("learner", 0), ("learner.rank1", 1)):
            cmdline = Path(f"/proc/{actors[name]['pid']}/cmdline").read_bytes().split(b"\0")
            assert b"learners.torch_learner" in cmdline, cmdline
            assert f"learner: rank {rank} of 2 joined" in (run_dir / "logs" / f"{name}.log").read_text()
        assert list((run_dir / "weights").glob("v*")), "no version published"
        victim = actors["learner.rank1"]["pid"]
        os.kill(victim, signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-4000:]
    assert "learner restarted (restart 1" in out, out[-3000:]
    manifest = json.loads((run_dir / "run.json").read_text())
    actors = manifest["cluster"]["actors"]
    assert actors["learner.rank1"]["pid"] != victim and manifest["processes"]["learner"]["restarts"] == 1
    assert (run_dir / "logs" / "learner.rank1.log").read_text().count("learner: rank 1 of 2 joined") == 2
    assert "learner: resumed from" in (run_dir / "logs" / "learner.log").read_text()
    assert [r["step"] for r in rows(run_dir)] == list(range(steps))  # every step once, past the kill
    assert (run_dir / "weights" / f"v{steps}").exists()
    for a in actors.values():
        assert not alive(a["pid"])


def test_address_without_cluster_ray_is_a_usage_error(tmp_path):
    world = {"model_sft": tmp_path / "none", "train": tmp_path / "none.jsonl"}  # refused before paths are read
    out = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "launch", str(write_config(tmp_path, world, 2)),
                          "--address", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--address 127.0.0.1:1: only for --cluster ray" in out.stderr
