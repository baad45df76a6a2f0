"""slime's debug modes with real processes: a run saves the batches it trains on (save_debug_rollout_data)
and dumps each step's tensors (dump_details); debug_train_only on those files trains on exactly the saved
groups, step by step, with no engine or generator; debug_rollout_only stores batches and trains nothing."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from async_rl import config as C
from async_rl.debug import find_rollouts, load_rollout, rollout_path
from tests.test_e2e import assert_no_orphans, cli, read_rows, write_config

pytestmark = pytest.mark.e2e
BATCH, STEPS = 4, 8


def _run(tmp_path: Path, world: dict, name: str, *overrides: str) -> tuple[Path, str]:
    cfg = write_config(tmp_path, world, num_rollout=STEPS)
    run_dir = tmp_path / name
    proc = cli("launch", str(cfg), "use_tis=true", "tis_clip=2.0", *overrides, "--run-dir", str(run_dir))
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert_no_orphans(run_dir)
    return run_dir, out


def _keys(spec: str) -> list[list[tuple[str, int]]]:
    return [[g.key for g in load_rollout(p)["groups"]] for _, p in find_rollouts(spec)]


def test_save_then_train_only_trains_on_exactly_the_saved_groups(tmp_path, tiny_world):
    saved = str(tmp_path / "dbg" / "rollout_{rollout_id}.msgpack")
    dump = tmp_path / "details"
    first, _ = _run(tmp_path, tiny_world, "first", f"save_debug_rollout_data={saved}", f"dump_details={dump}")
    files = find_rollouts(saved)
    assert [i for i, _ in files] == list(range(STEPS))
    keys = _keys(saved)
    assert all(len(k) == BATCH for k in keys)
    flat = [k for step in keys for k in step]
    assert len(flat) == len(set(flat)), "a group was trained on twice"

    # dump_details: the same groups, and TIS weights that match an independent computation from the dump
    for step in range(STEPS):
        d = torch.load(dump / f"step_{step}.pt")
        assert [tuple(k) for k in d["keys"]] == keys[step] and d["step"] == step and d["version"] == step
        saved_rewards = [t.reward for g in load_rollout(files[step][1])["groups"] for t in g.trajectories]
        assert d["rewards"].flatten().tolist() == pytest.approx(saved_rewards)
        mask = d["mask"] > 0
        ratio = np.exp(d["logp_old"].numpy().astype(np.float64) - d["rollout_logprobs"].numpy())
        expected = np.clip(ratio, 0.0, 2.0)
        np.testing.assert_allclose(d["tis_weights"].numpy()[mask.numpy()], expected[mask.numpy()], rtol=1e-5)
        assert d["advantages"].shape == d["mask"].shape

    # debug_train_only: no engines or generators; a feeder replays the files; the learner trains on them
    again = str(tmp_path / "again")
    second, _ = _run(tmp_path, tiny_world, "second", "debug_train_only=true", f"load_debug_rollout_data={saved}",
                     f"save_debug_rollout_data={again}")
    assert not (second / "logs" / "engine0.log").exists() and not (second / "logs" / "generator0.log").exists()
    assert _keys(again) == keys  # the same groups, in the same steps
    rows1, rows2 = read_rows(first), read_rows(second)
    assert [r["step"] for r in rows2] == list(range(STEPS)) and [r["version"] for r in rows2] == list(range(STEPS))
    for a, b in zip(rows1, rows2):  # same start weights, same batches at the same versions, same seed
        assert a["reward/mean"] == b["reward/mean"] and a["staleness/max"] == b["staleness/max"]
        assert math.isclose(a["loss/pg"], b["loss/pg"], rel_tol=1e-4, abs_tol=1e-6)
    assert rows2[-1]["buffer/consumed"] == (STEPS - 1) * BATCH and rows2[-1]["buffer/evicted_stale"] == 0


def test_rollout_only_stores_batches_and_trains_nothing(tmp_path, tiny_world):
    saved = tmp_path / "rollouts"  # a directory: rollout_{rollout_id}.msgpack in it
    run_dir, out = _run(tmp_path, tiny_world, "run", "debug_rollout_only=true", f"save_debug_rollout_data={saved}")
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS)) and all(r["version"] == 0 for r in rows)
    assert not (run_dir / "weights").exists() and not (run_dir / "checkpoints").exists()
    files = find_rollouts(str(saved))
    assert [i for i, _ in files] == list(range(STEPS)) and files[0][1] == rollout_path(str(saved), 0)
    groups = [g for _, p in files for g in load_rollout(p)["groups"]]
    assert len(groups) == STEPS * BATCH and len({g.key for g in groups}) == STEPS * BATCH
    assert all(g.behavior_version == 0 for g in groups)  # weights never moved
    last = rows[-1]
    assert last["buffer/consumed"] == (STEPS - 1) * BATCH and last["buffer/in_flight"] == BATCH
    assert last["buffer/accepted"] == (last["buffer/consumed"] + last["buffer/evicted_stale"]
                                       + last["buffer/evicted_capacity"] + last["buffer/size"] + last["buffer/in_flight"])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_debug_knobs_are_validated(tmp_path):
    with pytest.raises(C.ConfigError, match="debug.load_debug_rollout_data='': read only by, and required by"):
        C.load(None, ["debug_train_only=true"])
    with pytest.raises(C.ConfigError, match="pick one"):
        C.load(None, ["debug_rollout_only=true", "debug_train_only=true", "load_debug_rollout_data=x"])
    with pytest.raises(C.ConfigError, match="must be in the file name"):
        C.load(None, ["save_debug_rollout_data=d/{rollout_id}/x.msgpack"])
    with pytest.raises(C.ConfigError, match="cluster.max_restarts=-2"):
        C.load(None, ["max_restarts=-2"])
    from async_rl.debug import check_load_data
    cfg = C.load(None, ["debug_train_only=true", f"load_debug_rollout_data={tmp_path}", "num_rollout=3"])
    with pytest.raises(C.ConfigError, match="holds no rollout files; debug_train_only with num_rollout=3"):
        check_load_data(cfg)
