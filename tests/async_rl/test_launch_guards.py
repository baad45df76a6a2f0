"""What `launch` guards before and around a run: a live run directory cannot be launched or resumed into again
(real second launcher against a real running one), two Ctrl-Cs still end every process and say so in
run.json (real SIGINTs to a real launcher), bad inputs are refused before any process starts, with one line
naming field, value and fix; and the small ones: --resume of a dir that never held a run creates nothing,
`config --doc` into a closed pipe, the progress line on a narrow terminal."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from async_rl.launch import cli
from async_rl.launch.progress import Progress
from async_rl.run_dir import lock_run_dir
from tests.test_e2e import assert_no_orphans, cli as cli_proc, read_rows, write_config


def _wait_steps(proc, run_dir: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and len(read_rows(run_dir)) >= n):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run never got to step {n}: {proc.communicate()[0][-3000:]}")
        time.sleep(0.1)


def _kill_listed(run_dir: Path) -> None:
    manifest = run_dir / "run.json"
    for p in (json.loads(manifest.read_text())["processes"].values() if manifest.exists() else []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p["pid"], signal.SIGKILL)


@pytest.mark.e2e
def test_a_second_launch_or_resume_into_a_live_run_is_refused_and_touches_nothing(tmp_path, tiny_world):
    cfg = write_config(tmp_path, tiny_world, num_rollout=16)
    run_dir = tmp_path / "run"
    first = cli_proc("launch", str(cfg), "--run-dir", str(run_dir))
    try:
        _wait_steps(first, run_dir, 2)
        before = {p.name: p.stat().st_ino for p in [run_dir / "metrics.jsonl", run_dir / "run.json"]}
        hub_files = sorted(p.name for p in (run_dir / "hub").iterdir())
        for extra in ([], ["--resume"]):
            second = cli_proc("launch", str(cfg), "--run-dir", str(run_dir), *extra)
            try:
                said, _ = second.communicate(timeout=60)
            except subprocess.TimeoutExpired:  # (without the lock it clobbers the run and hangs)
                second.kill()
                said = second.communicate()[0]
            assert second.returncode == 2, said
            assert f"launcher pid {first.pid}" in said and "a run is live there" in said, said
        # nothing of the live run was touched: same files, its rows kept, run.json still names the first launcher
        assert {p: (run_dir / p).stat().st_ino for p in before} == before
        assert set(hub_files) <= {p.name for p in (run_dir / "hub").iterdir()}
        assert json.loads((run_dir / "run.json").read_text())["launcher_pid"] == first.pid
        out, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGINT)
            first.communicate(timeout=60)
        _kill_listed(run_dir)  # whatever a launcher that was not refused left there
    assert first.returncode == 0, out[-3000:]
    assert [r["step"] for r in read_rows(run_dir)] == list(range(16))
    events = [json.loads(line)["event"] for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert events == ["launch"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    os.close(lock_run_dir(run_dir))  # the lock went with the launcher: the finished run can be launched again


@pytest.mark.e2e
def test_a_second_ctrl_c_during_shutdown_still_ends_every_process(tmp_path, tiny_world):
    """The second SIGINT comes while the launcher waits for its children to stop (before, it raised
    KeyboardInterrupt inside stop_all: the learner was orphaned and run.json stayed `running`)."""
    cfg = write_config(tmp_path, tiny_world, num_rollout=100000)
    run_dir = tmp_path / "run"
    proc = cli_proc("launch", str(cfg), "--run-dir", str(run_dir), start_new_session=True)
    try:
        _wait_steps(proc, run_dir, 2)
        proc.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        while "stopping every process" not in "".join(proc._chunks):
            assert time.time() < deadline and proc.poll() is None, "".join(proc._chunks)[-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        out, _ = proc.communicate(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if json.loads((run_dir / "run.json").read_text())["status"] != "interrupted":
            _kill_listed(run_dir)  # (the orphans the unfixed launcher left) once the assertions below have read it
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["exit_code"] == 130, manifest
    assert manifest["ended_by"].startswith("SIGINT then SIGINT"), manifest["ended_by"]
    assert took < 20, f"the launcher took {took:.1f}s after the second Ctrl-C"  # not the 10 s grace + a 30 s ACK
    assert_no_orphans(run_dir)


# ---- checks before anything starts (in process: cli.main is the real command) ---------------------------------

def _launch_words(tmp_path: Path, world: dict, *words: str, data: Path | None = None, model: Path | None = None):
    cfg = write_config(tmp_path, world)
    doc = yaml.safe_load(cfg.read_text())
    if data is not None:
        doc["data"]["prompt_data"] = str(data)
    if model is not None:
        doc["ckpt"]["hf_checkpoint"] = str(model)
    cfg.write_text(yaml.safe_dump(doc))
    return ["launch", str(cfg), *words, "--run-dir", str(tmp_path / "run")]


def _refused(capsys, argv: list[str], *needles: str, run_dir: Path) -> str:
    code = cli.main(argv)
    err = capsys.readouterr()
    said = (err.err + err.out).strip()
    assert code == 2, said
    lines = [line for line in said.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in said, said
    for needle in needles:
        assert needle in said, said
    assert not run_dir.exists(), f"{sorted(p.name for p in run_dir.iterdir())} created before the check"
    return said


@pytest.mark.parametrize("case", ["malformed_line", "missing_label", "empty_file"])
def test_bad_prompt_files_are_refused_before_any_process_starts(tmp_path, tiny_world, capsys, case):
    good = Path(tiny_world["train"]).read_text().splitlines()
    data = tmp_path / "bad.jsonl"
    if case == "malformed_line":
        data.write_text(good[0] + "\n" + good[1][:-3] + "\n")
        needles = ("data.prompt_data", ":2:", "not JSON")
    elif case == "missing_label":
        data.write_text(good[0] + "\n" + json.dumps({"input": "1+1="}) + "\n")
        needles = ("data.prompt_data", "no key 'label'", "label_key")
    else:
        data.write_text("\n")
        needles = ("data.prompt_data", "no prompts")
    _refused(capsys, _launch_words(tmp_path, tiny_world, data=data), *needles, run_dir=tmp_path / "run")


def test_chat_template_without_one_in_the_tokenizer_is_refused(tmp_path, tiny_world, capsys):
    _refused(capsys, _launch_words(tmp_path, tiny_world, "apply_chat_template=true"),
             "data.apply_chat_template=true", "no chat template", "apply_chat_template=false",
             run_dir=tmp_path / "run")


def test_a_model_dir_without_weights_is_refused(tmp_path, tiny_world, capsys):
    model = tmp_path / "no_weights"
    shutil.copytree(tiny_world["model_sft"], model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    _refused(capsys, _launch_words(tmp_path, tiny_world, model=model), "ckpt.hf_checkpoint", "no weights",
             run_dir=tmp_path / "run")


def test_a_context_limit_beyond_the_models_positions_is_refused(tmp_path, tiny_world, capsys):
    positions = json.loads((Path(tiny_world["model_sft"]) / "config.json").read_text())["max_position_embeddings"]
    _refused(capsys, _launch_words(tmp_path, tiny_world, f"rollout_max_context_len={positions + 1}"),
             f"rollout.rollout_max_context_len={positions + 1}", f"max_position_embeddings={positions}",
             run_dir=tmp_path / "run")


def test_a_cuda_engine_without_cuda_is_refused(tmp_path, tiny_world, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check has nothing to refuse")
    _refused(capsys, _launch_words(tmp_path, tiny_world, "engine_device=cuda"), "rollout.engine_device='cuda'",
             "no CUDA device", "engine_device=cpu", run_dir=tmp_path / "run")


@pytest.mark.parametrize("knob,package", [("use_wandb", "wandb"), ("use_tensorboard", "tensorboard")])
def test_a_logger_whose_package_is_missing_is_refused(tmp_path, tiny_world, capsys, knob, package):
    import importlib.util
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: the check has nothing to refuse")
    _refused(capsys, _launch_words(tmp_path, tiny_world, f"{knob}=true"), f"logging.{knob}=true", package,
             f"{knob}=false", run_dir=tmp_path / "run")


def test_resume_of_a_dir_that_never_held_a_run_creates_nothing(tmp_path, tiny_world, capsys):
    argv = _launch_words(tmp_path, tiny_world) + ["--resume"]
    code = cli.main(argv)
    said = capsys.readouterr()
    assert code == 2 and "holds no hub state" in said.out + said.err
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # an existing empty dir stays empty
    assert cli.main(argv) == 2 and list((tmp_path / "run").iterdir()) == []


def test_config_doc_into_a_closed_pipe_exits_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "async_rl.launch.cli", "config", "--doc"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has already exited
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err


def _render(run_dir: Path, width: int, resume: bool = False) -> str:
    buf = io.StringIO()
    progress = Progress(run_dir, 1200, console=Console(file=buf, width=width, force_terminal=True,
                                                        color_system=None), resume=resume)
    progress.start()
    progress.refresh()
    progress.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue()).replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-1]


def test_progress_line_keeps_step_version_reward_first_on_narrow_terminals(tmp_path):
    row = {"step": 41, "version": 40, "reward/mean": 0.625, "staleness/max": 2, "staleness/mean": 1.1,
           "tis/weight_mean": 0.98, "perf/train_tokens_per_s": 1234, "perf/gen_tokens_per_s": 4567, "buffer/size": 12}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    for width in (40, 60, 80):
        line = _render(tmp_path, width)
        assert line.startswith("step 42/1200 v40 reward 0.62"), (width, line)
        assert len(line) <= width, (width, line)
    assert "staleness max 2" in _render(tmp_path, 160)


def test_progress_of_a_resumed_run_starts_where_it_resumes(tmp_path):
    rows = [{"step": i, "version": i, "reward/mean": 0.1 * i} for i in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _render(tmp_path, 100, resume=True).startswith("step 5/1200 ")  # nothing replayed, bar at 5
    assert _render(tmp_path, 100).startswith("step 5/1200 v4")  # a fresh Progress reads the rows
    progress = Progress(tmp_path, 10, resume=True)
    progress.refresh()  # plain mode: prints only rows written after the resume
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "version": 5, "reward/mean": 0.5}) + "\n")
    buf = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, buf
    try:
        progress.refresh()
    finally:
        sys.stdout = sys_stdout
    assert buf.getvalue().startswith("step 6/10 v5 reward 0.50"), buf.getvalue()


def test_hurry_cuts_the_grace_period_short_but_still_kills(tmp_path):
    """A child that ignores SIGTERM (as a learner stuck on a dead hub did): stop_all waits out its grace
    period, unless `hurry` is set (a second Ctrl-C), which SIGKILLs it at once."""
    import threading

    from async_rl.launch.procs import ProcessGroup
    procs = ProcessGroup(tmp_path)
    child = procs.start_command("stubborn", [sys.executable, "-c", "import signal, time; "
                                             "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                                             "time.sleep(600)"])
    deadline = time.time() + 30
    while "up" not in child.tail():
        assert time.time() < deadline
        time.sleep(0.05)
    stopper = threading.Thread(target=procs.stop_all, kwargs={"grace": 60})
    t0 = time.time()
    stopper.start()
    time.sleep(0.5)
    assert stopper.is_alive() and child.proc.poll() is None  # SIGTERM ignored: still in the grace period
    procs.hurry = True
    stopper.join(timeout=10)
    assert not stopper.is_alive() and child.proc.poll() == -signal.SIGKILL
    assert time.time() - t0 < 10
