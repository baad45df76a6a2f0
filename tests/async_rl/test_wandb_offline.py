"""slime's W&B options (--wandb-host, --wandb-key, group, team, run id, dir) reach wandb.init, tested without a
network: the arguments always; a real wandb.init in offline mode where the wandb package is installed."""
from __future__ import annotations

import json

import pytest

from async_rl import config as config_mod
from async_rl.launch import cli
from async_rl.metrics import MetricsWriter, wandb_init_args

HOST, KEY = "http://wandb.example.internal:8080", "k" * 40


def _cfg(*words):
    args = cli.parse_args(["config", *words])
    return config_mod.load(args.config, args.overrides)


def test_host_and_key_reach_wandb_settings_and_the_key_is_not_uploaded(tmp_path):
    args = wandb_init_args(_cfg("--wandb-host", HOST, "--wandb-key", KEY, "--use-wandb"), tmp_path / "run")
    assert args["settings"] == {"base_url": HOST, "api_key": KEY} and args["mode"] == "offline"
    assert KEY not in json.dumps(args["config"]) and args["config"]["logging"]["wandb_host"] == HOST
    assert "settings" not in wandb_init_args(_cfg(), tmp_path)  # neither set: wandb's own defaults


def test_disabled_wandb_is_never_started(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail: it is not imported at all
    writer = MetricsWriter(tmp_path, _cfg("use_wandb=true", "wandb_mode=disabled", f"wandb_key={KEY}"))
    writer.log({"step": 0, "reward": 0.5})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward"] == 0.5


def test_an_offline_run_gets_the_settings_and_logs_to_the_run_dir(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb not installed (pip install -e '.[wandb]')")
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    cfg = _cfg("use_wandb=true", "wandb_mode=offline", f"wandb_host={HOST}", f"wandb_key={KEY}",
               "wandb_group=sweep1", "wandb_run_id=abc123", "wandb_project=p1")
    writer = MetricsWriter(tmp_path, cfg)
    try:
        run = writer._wandb
        assert run.settings.base_url == HOST and run.settings.api_key == KEY and run.settings.mode == "offline"
        assert (run.id, run.group, run.project) == ("abc123", "sweep1", "p1")
        assert run.config["logging"]["wandb_key"] == "(set)"
        writer.log({"step": 1, "reward": 0.25})
    finally:
        writer.close()
    assert wandb.run is None
    assert list((tmp_path / "wandb").glob("offline-run-*-abc123")), sorted(p.name for p in (tmp_path / "wandb").iterdir())
