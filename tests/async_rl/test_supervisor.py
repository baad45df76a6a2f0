"""The launcher's supervisor with real processes: during a short run, SIGKILL one process (a generator, an
engine, the learner, the hub) and check that the run still finishes (exit 0), the process was restarted
once, and the hub's accounting shows no acked group lost or trained twice while the learner's steps and
versions stay contiguous. The restart policy itself (budget, backoff) is checked without processes."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from async_rl.debug import find_rollouts, load_rollout
from async_rl.launch.procs import RestartPolicy
from tests.test_e2e import assert_no_orphans, cli, read_rows, write_config

BATCH = 4  # write_config's rollout_batch_size
STEPS = 20
# fast recovery: clients resend after 2 s, a dead generator's credits return after 5 s, restarts after 0.5 s
FAST = ["save_interval=1", "put_timeout=2", "generator_timeout=5", "heartbeat_interval=1", "restart_backoff=0.5",
        "max_staleness=2"]


def _launch(tmp_path: Path, world: dict, *overrides: str):
    cfg = write_config(tmp_path, world, num_rollout=STEPS)
    run_dir = tmp_path / "run"
    saved = f"save_debug_rollout_data={tmp_path / 'trained'}"  # the groups of every trained step
    proc = cli("launch", str(cfg), *FAST, saved, *overrides, "--run-dir", str(run_dir), start_new_session=True)
    return proc, run_dir


def _wait_rows(proc, run_dir: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and len(read_rows(run_dir)) >= n):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run never got to step {n}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.1)


def assert_exact_accounting(rows: list[dict]) -> None:
    """Every step once and in order; every batch acked once; the hub's books balance."""
    assert [r["step"] for r in rows] == list(range(STEPS)), [r["step"] for r in rows]
    assert [r["version"] for r in rows] == list(range(STEPS))  # one publication per step, none repeated
    last = rows[-1]
    # the stats come with the last batch: every earlier batch acked exactly once, the last one in flight
    assert last["buffer/consumed"] == (STEPS - 1) * BATCH and last["buffer/in_flight"] == BATCH
    assert last["buffer/accepted"] == (last["buffer/consumed"] + last["buffer/evicted_stale"]
                                       + last["buffer/evicted_capacity"] + last["buffer/size"]
                                       + last["buffer/in_flight"])
    assert all(r["staleness/max"] <= 2 for r in rows)


@pytest.mark.e2e
@pytest.mark.parametrize("victim", ["generator0", "engine0", "learner", "hub"])
def test_sigkill_one_process_the_run_finishes_exactly(tmp_path, tiny_world, victim):
    proc, run_dir = _launch(tmp_path, tiny_world)
    try:
        _wait_rows(proc, run_dir, 4)
        pid = json.loads((run_dir / "run.json").read_text())["processes"][victim]["pid"]
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-4000:]
    assert f"{victim} died with exit code -9; restart 1" in out and f"{victim} restarted (restart 1" in out, out[-3000:]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["processes"][victim]["restarts"] == 1
    assert manifest["processes"][victim]["pid"] != pid
    events = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert [e["process"] for e in events if e["process"] == victim] == [victim]
    assert_exact_accounting(read_rows(run_dir))
    trained = [load_rollout(p)["groups"] for _, p in find_rollouts(str(tmp_path / "trained"))]
    assert len(trained) == STEPS and all(len(groups) == BATCH for groups in trained)
    keys = [g.key for groups in trained for g in groups]
    assert len(set(keys)) == len(keys), "a group was trained on in two steps"
    assert_no_orphans(run_dir)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


MEGATRON_SITE = Path(__file__).resolve().parents[1] / "learners" / "megatron" / "cpu_site"


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["torch", "megatron", "torch-dp2"])
def test_a_learner_killed_between_checkpoints_retrains_the_replayed_batches_exactly(tmp_path, tiny_world, backend,
                                                                                     monkeypatch):
    """save_interval=5, SIGKILL the learner at a step that is no checkpoint step: it resumes from the older
    checkpoint, the hub replays the batches it trained since, and the run ends as if never interrupted. The
    megatron learner (one rank under torchrun, on CPU through the test-only shim) and the FSDP2 torch learner
    (two gloo ranks under torchrun) have one rank process killed."""
    extra = ["actor_num_gpus_per_node=2"] if backend == "torch-dp2" else []
    if backend == "megatron":
        monkeypatch.setenv("ASYNC_RL_MEGATRON_CPU_SHIM", "1")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(MEGATRON_SITE), str(Path(__file__).resolve().parents[2]),
                                                          os.environ.get("PYTHONPATH", "")]))
        extra = ["train_backend=megatron"]
    proc, run_dir = _launch(tmp_path, tiny_world, "save_interval=5", *extra)
    trained_dir = tmp_path / "trained"
    try:
        deadline = time.time() + 120

        def rows_now() -> int:
            return len(read_rows(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        while rows_now() % 5 < 2 or rows_now() < 7:  # 2+ steps past checkpoint 5
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the run never got between checkpoints: {proc.communicate()[0][-3000:]}")
            time.sleep(0.05)
        learner = json.loads((run_dir / "run.json").read_text())["processes"]["learner"]["pid"]
        os.kill(_children(learner)[-1] if backend != "torch" else learner, signal.SIGKILL)  # under torchrun: a rank
        logged = rows_now()
        # what the killed learner trained after its checkpoint (its saved rollouts, read before any retraining)
        first = {step: sorted(g.key for g in load_rollout(p)["groups"])
                 for step, p in find_rollouts(str(trained_dir)) if 5 <= step < logged}
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-4000:]
    assert "learner restarted (restart 1" in out, out[-3000:]
    assert len(first) >= 2 and set(first) == set(range(5, logged)), (first.keys(), logged)
    rows = read_rows(run_dir)
    assert_exact_accounting(rows)  # steps and versions 0..19 each once; every group consumed once
    assert rows[-1]["buffer/replayed"] >= BATCH  # at least one acked batch came back from the hub's log
    trained = {step: sorted(g.key for g in load_rollout(p)["groups"]) for step, p in find_rollouts(str(trained_dir))}
    assert sorted(trained) == list(range(STEPS))
    assert {step: trained[step] for step in first} == first  # the replayed steps trained the same batches
    keys = [k for groups in trained.values() for k in groups]
    assert len(set(keys)) == len(keys), "a group was trained on in two steps"
    assert "retraining the batch the hub kept" in (run_dir / "logs" / "learner.log").read_text()
    assert_no_orphans(run_dir)


@pytest.mark.e2e
def test_launch_resume_after_a_crash_replays_the_steps_since_the_checkpoint(tmp_path, tiny_world):
    """The whole run SIGKILLed (launcher and every child) between checkpoints; `launch --resume` continues from
    the older checkpoint with the hub's replay: steps and versions 0..19 each once, books balanced."""
    proc, run_dir = _launch(tmp_path, tiny_world, "save_interval=5", "max_restarts=0")
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(read_rows(run_dir)) % 5 < 2 or len(read_rows(run_dir)) < 7:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # a crash: nobody drains, checkpoints or acks anything
    for p in json.loads((run_dir / "run.json").read_text())["processes"].values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p["pid"], signal.SIGKILL)
    proc.wait()
    cfg = write_config(tmp_path, tiny_world, num_rollout=STEPS)
    resumed = cli("launch", str(cfg), *FAST, f"save_debug_rollout_data={tmp_path / 'trained'}", "save_interval=5",
                  "--run-dir", str(run_dir), "--resume", start_new_session=True)
    try:
        out, _ = resumed.communicate(timeout=240)
    finally:
        if resumed.poll() is None:
            resumed.send_signal(signal.SIGINT)
            resumed.communicate(timeout=60)
    assert resumed.returncode == 0, out[-4000:]
    rows = read_rows(run_dir)
    assert_exact_accounting(rows)
    assert rows[-1]["buffer/replayed"] >= BATCH
    trained = [load_rollout(p)["groups"] for _, p in find_rollouts(str(tmp_path / "trained"))]
    keys = [g.key for groups in trained for g in groups]
    assert len(trained) == STEPS and len(set(keys)) == len(keys), "a group was trained on in two steps"
    assert_no_orphans(run_dir)


@pytest.mark.e2e
def test_stop_while_the_learner_awaits_its_restart_ends_the_run_without_restarting_it(tmp_path, tiny_world):
    """`async-rl stop` while the learner is dead (here SIGKILLed, with a long restart backoff; in the wild, a
    SIGTERM that came before its handler was installed): the stop wins, the learner is not restarted and
    the run ends as stopped (before, the restarted learner never got the stop and trained on)."""
    proc, run_dir = _launch(tmp_path, tiny_world, "restart_backoff=120")
    stop = None
    try:
        _wait_rows(proc, run_dir, 3)
        victim = json.loads((run_dir / "run.json").read_text())["processes"]["learner"]["pid"]
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.5)  # the supervisor (every 0.5 s) has seen it die and scheduled the restart
        stop = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "stop", "--run-dir", str(run_dir),
                               "--timeout", "90"], capture_output=True, text=True, timeout=120)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=60)[0]
    assert stop.returncode == 0 and proc.returncode == 0, (stop.stdout, stop.stderr, out[-3000:])
    assert "the learner exited with code -9 while stopping" in out, out[-3000:]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "stopped" and manifest["processes"]["learner"]["restarts"] == 0
    assert len(read_rows(run_dir)) < STEPS
    assert_no_orphans(run_dir)


def test_restart_policy_budget_and_backoff():
    policy = RestartPolicy(max_restarts=3, backoff=0.5, backoff_max=3.0)
    assert [policy.allows(n) for n in range(5)] == [True, True, True, False, False]
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert not RestartPolicy(0, 1.0).allows(0)
    assert RestartPolicy(-1, 1.0).allows(10 ** 6)


def test_learner_restart_point_and_metrics_rewind(tmp_path):
    """The learner (either backend) resumes at its newest checkpoint; the hub replays the later batches;
    the rows of the steps it trains again are dropped, so steps stay contiguous with none repeated."""
    from async_rl import config as C
    from async_rl.launch.launcher import Launcher

    launcher = Launcher(C.load(None, ["save_interval=1"]), tmp_path)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "version": s}) + "\n" for s in range(6)))

    def checkpoint(step: int, done: bool = True) -> None:
        (tmp_path / "checkpoints" / f"step_{step}").mkdir(parents=True)
        if done:
            (tmp_path / "checkpoints" / f"step_{step}" / "DONE").write_text(str(step))
    checkpoint(3)
    assert launcher._learner_resume_step() == 3  # the hub replays the batches of steps 3..4
    megatron = Launcher(C.load(None, ["save_interval=1", "train_backend=megatron"]), tmp_path)
    assert megatron._learner_resume_step() == 3  # the megatron learner numbers its SAMPLEs too: same replay
    checkpoint(6, done=False)  # killed while writing it: does not count
    checkpoint(5)
    assert launcher._learner_resume_step() == 5
    launcher._rewind_metrics(5)
    assert [r["step"] for r in read_rows(tmp_path)] == [0, 1, 2, 3, 4]
    checkpoint(7)
    assert launcher._learner_resume_step() == 7
