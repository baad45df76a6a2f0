"""End to end: `async-rl launch` starts real processes (hub, engine server, generator, learner) over real
sockets; we check the run-dir contract, the staleness invariant, clean shutdown and failure reporting."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

KEYS = ["step", "version", "time", "reward/mean", "staleness/max", "staleness/mean", "tis/weight_mean",
        "tis/clipfrac", "loss/pg", "perf/train_tokens_per_s", "perf/gen_tokens_per_s", "buffer/size",
        "buffer/evicted_stale"]


def write_config(tmp_path: Path, world: dict, **rollout) -> Path:
    cfg = {
        "ckpt": {"hf_checkpoint": str(world["model_sft"])},
        "data": {"prompt_data": str(world["train"])},
        "rollout": {"rollout_batch_size": 4, "n_samples_per_prompt": 4, "num_rollout": 12,
                    "rollout_max_response_len": 4, "groups_per_engine_call": 4, **rollout},
        "logging": {"progress": True},
        "cluster": {"startup_timeout": 60},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Drained(subprocess.Popen):
    """A Popen whose merged stdout/stderr a thread reads as it comes: a test that polls the run dir for minutes
    never lets the pipe fill up, which would block the launcher in print() (its main thread then never gets
    to act on `async-rl stop`). `communicate()` waits (TimeoutExpired as Popen's) and returns the output."""

    def __init__(self, args, **kw):
        super().__init__(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        self._chunks: list[str] = []
        self._reader = threading.Thread(target=lambda: self._chunks.extend(self.stdout), daemon=True)
        self._reader.start()

    def communicate(self, input=None, timeout=None):
        self.wait(timeout)
        self._reader.join(timeout=30)
        return "".join(self._chunks), None


def cli(*args, **kw) -> subprocess.Popen:
    return Drained([sys.executable, "-m", "async_rl.launch.cli", *args], **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that nobody reaped is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def assert_no_orphans(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["processes"], "run.json names no processes"
    for name, p in manifest["processes"].items():
        assert not alive(p["pid"]), f"{name} (pid {p['pid']}) still running"


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_to_end(tmp_path, world, *overrides, eval_data=None) -> tuple[Path, str]:
    cfg = write_config(tmp_path, world)
    run_dir = tmp_path / "run"
    extra = [f"eval_prompt_data={eval_data}", "eval_max_prompts=20"] if eval_data else []
    proc = cli("launch", str(cfg), *overrides, *extra, "--run-dir", str(run_dir))
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return run_dir, out


def test_async_run_contract_and_staleness_bound(tmp_path, tiny_world):
    run_dir, out = run_to_end(tmp_path, tiny_world, "max_staleness=2", eval_data=tiny_world["test"])
    rows = read_rows(run_dir)
    assert len(rows) == 12 and [r["step"] for r in rows] == list(range(12))
    for row in rows:
        assert all(k in row for k in KEYS), set(KEYS) - set(row)
        assert row["staleness/max"] <= 2
        assert row["tis/weight_mean"] is not None and 0 < row["tis/weight_mean"] <= 2.0
    assert [r["version"] for r in rows] == list(range(12))  # one publication per step
    assert max(r["staleness/max"] for r in rows) >= 1, "async run never trained off-policy"
    weights = sorted(p.name for p in (run_dir / "weights").iterdir())
    assert weights == ["v10", "v11", "v12"]  # keep_weight_versions=3
    assert (run_dir / "weights/v12/model.safetensors").exists()
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["exit_code"] == 0
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["buffer"]["max_staleness"] == 2 and resolved["rollout"]["global_batch_size"] == 16
    assert (run_dir / "reward.png").stat().st_size > 1000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and set(summary["eval"]) == {"start", "end"}
    assert "step 12/12" in out and "Run summary" in out
    for name in ("hub", "engine0", "generator0", "learner"):
        assert (run_dir / "logs" / f"{name}.log").exists()
    assert_no_orphans(run_dir)
    st = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "status", "--run-dir", str(run_dir), "--json"],
                        capture_output=True, text=True, check=True)
    status = json.loads(st.stdout)
    assert status["status"] == "completed" and status["last_step"]["step"] == 11


def test_max_staleness_zero_is_synchronous_on_policy(tmp_path, tiny_world):
    run_dir, _ = run_to_end(tmp_path, tiny_world, "max_staleness=0", "num_rollout=8")
    rows = read_rows(run_dir)
    assert len(rows) == 8
    for row in rows:
        assert row["staleness/max"] == 0
        # the engine sampled with exactly the weights the learner recomputes with
        assert row["rollout_logprob_diff/mean_abs"] < 1e-3
        assert abs(row["tis/weight_mean"] - 1.0) < 1e-3
        assert row["buffer/evicted_stale"] == 0
    assert_no_orphans(run_dir)


def _start_and_wait_running(tmp_path, world, *overrides) -> tuple[subprocess.Popen, Path]:
    cfg = write_config(tmp_path, world, num_rollout=100000)
    run_dir = tmp_path / "run"
    proc = cli("launch", str(cfg), *overrides, "--run-dir", str(run_dir), start_new_session=True)
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "run never got to its first step"
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip():
            return proc, run_dir
        time.sleep(0.2)


def test_a_dying_engine_fails_the_run_with_its_log_and_no_orphans(tmp_path, tiny_world):
    proc, run_dir = _start_and_wait_running(tmp_path, tiny_world, "max_restarts=0")  # no supervisor restarts
    manifest = json.loads((run_dir / "run.json").read_text())
    os.kill(manifest["processes"]["engine0"]["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "engine0 died with exit code -9" in out
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert_no_orphans(run_dir)


def test_ctrl_c_stops_every_process(tmp_path, tiny_world):
    proc, run_dir = _start_and_wait_running(tmp_path, tiny_world)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert_no_orphans(run_dir)


def test_stop_works_while_nobody_reads_the_launchers_stdout(tmp_path, tiny_world):
    """stdout is a pipe that is full before the launcher starts and never read: its prints must not block the
    supervisor, so `async-rl stop` still ends the run (async_rl/launch/outstream.py)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"#" * 4096)
    except BlockingIOError:
        os.set_blocking(w, True)
    cfg = write_config(tmp_path, tiny_world, num_rollout=100000)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "async_rl.launch.cli", "launch", str(cfg), "--run-dir", str(run_dir)],
                            stdout=w, stderr=subprocess.STDOUT)
    os.close(w)
    try:
        deadline = time.time() + 120
        while not ((run_dir / "metrics.jsonl").exists() and len(read_rows(run_dir)) >= 3):
            assert proc.poll() is None and time.time() < deadline, "the run never got to step 3"
            time.sleep(0.2)
        stop = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "stop", "--run-dir", str(run_dir),
                               "--timeout", "90"], capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        proc.wait(timeout=60)  # its last lines could not be written: it still exits, after drain's 10 s
    finally:
        if proc.poll() is None:  # (without the fix: blocked in print(), it can neither stop nor clean up)
            proc.kill()
            proc.wait()
            manifest = run_dir / "run.json"
            for p in (json.loads(manifest.read_text())["processes"].values() if manifest.exists() else []):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p["pid"], signal.SIGKILL)
        os.close(r)
    assert proc.returncode == 0
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    assert_no_orphans(run_dir)


def test_stop_then_resume_continues_exactly(tmp_path, tiny_world):
    cfg = write_config(tmp_path, tiny_world, num_rollout=60)
    run_dir = tmp_path / "run"
    proc = cli("launch", str(cfg), "save_interval=4", "--run-dir", str(run_dir))
    deadline = time.time() + 120
    while not ((run_dir / "metrics.jsonl").exists() and len(read_rows(run_dir)) >= 6):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    stop = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "stop", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    out, _ = proc.communicate(timeout=60)
    assert stop.returncode == 0 and proc.returncode == 0, (stop.stdout, stop.stderr, out)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    before = read_rows(run_dir)
    assert 6 <= len(before) < 60
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    assert ckpts[-1].name == f"step_{len(before)}" and (ckpts[-1] / "DONE").exists()
    assert_no_orphans(run_dir)

    resumed = cli("launch", str(cfg), "save_interval=4", "--run-dir", str(run_dir), "--resume")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(60))  # no step lost, none repeated
    assert rows[len(before)]["version"] == before[-1]["version"] + 1  # weights continue where they stopped
    times = [r["time"] for r in rows]
    assert times == sorted(times) and times[len(before)] > before[-1]["time"]  # time continues across the resume
    printed = re.findall(r"^step (\d+)/60 ", out, re.M)  # the display starts where the run resumes
    assert printed and int(printed[0]) == len(before) + 1 and int(printed[-1]) == 60, printed[:3]
    last = rows[-1]
    assert last["buffer/consumed"] == 59 * 4 and last["buffer/in_flight"] == 4  # every batch trained once
    assert last["buffer/accepted"] == (last["buffer/consumed"] + last["buffer/evicted_stale"]
                                       + last["buffer/evicted_capacity"] + last["buffer/size"] + last["buffer/in_flight"])
    history = [json.loads(line)["event"] for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert history == ["launch", "resume"]
    assert_no_orphans(run_dir)


def test_live_knobs_reach_hub_learner_and_generators(tmp_path, tiny_world):
    proc, run_dir = _start_and_wait_running(tmp_path, tiny_world)
    try:
        bad = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "set", "--run-dir", str(run_dir), "n_samples_per_prompt=2"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "not a live knob" in bad.stderr
        bad = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "set", "--run-dir", str(run_dir), "tis_clip=0"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "algo.tis_clip=0.0: must be > tis_clip_low" in bad.stderr
        ok = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "set", "--run-dir", str(run_dir), "max_staleness=0",
                             "tis_clip=1.5", "rollout_temperature=0.7"], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        deadline = time.time() + 60
        while not any(r.get("knob_version", 0) >= 1 for r in read_rows(run_dir)[-3:]):
            assert time.time() < deadline, "the learner never applied the knobs"
            time.sleep(0.2)
        n = len(read_rows(run_dir))
        while len(read_rows(run_dir)) < n + 5:
            assert time.time() < deadline + 60
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    after = [r for r in read_rows(run_dir) if r.get("knob_version", 0) >= 1]
    assert after and all(r["staleness/max"] == 0 for r in after)  # the invariant follows the new bound
    assert all(r["buffer/max_staleness"] == 0 for r in after)
    assert "live knobs v1 applied" in (run_dir / "logs" / "learner.log").read_text()
    assert "'rollout.rollout_temperature': 0.7" in (run_dir / "logs" / "generator0.log").read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["algo"]["tis_clip"] == 1.5
    assert_no_orphans(run_dir)


def test_attach_adds_a_generator_whose_groups_are_trained_and_detach_drains_it(tmp_path, tiny_world):
    proc, run_dir = _start_and_wait_running(tmp_path, tiny_world)
    try:
        attached = cli("attach", "--run-dir", str(run_dir), "--engines", "1")
        deadline = time.time() + 90
        mine = {}
        while not any(g["groups"] > 0 for g in mine.values()):
            assert attached.poll() is None, attached.communicate()[0]
            assert time.time() < deadline, "the attached generator never delivered"
            time.sleep(0.5)
            st = json.loads(subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "status", "--run-dir", str(run_dir),
                                            "--json"], capture_output=True, text=True, check=True).stdout)
            mine = {k: v for k, v in st["hub"]["generators"].items() if k.startswith(f"a{attached.pid}-")}
        consumed_before = read_rows(run_dir)[-1]["buffer/consumed"]
        detach = subprocess.run([sys.executable, "-m", "async_rl.launch.cli", "detach", "--run-dir", str(run_dir)],
                                capture_output=True, text=True, timeout=90)
        assert detach.returncode == 0, detach.stdout + detach.stderr
        attached.communicate(timeout=30)
        assert attached.returncode == 0
        time.sleep(2)
        assert proc.poll() is None, "detaching must not disturb the run"
        assert read_rows(run_dir)[-1]["buffer/consumed"] > consumed_before  # the run goes on without it
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert not list((run_dir / "attached").glob("*.json"))
    assert_no_orphans(run_dir)
