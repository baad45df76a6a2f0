"""slime's --custom-config-path: a YAML file whose field keys set config fields (after the YAML and the words)
and whose other keys are plug-in settings, read once at launch and carried by the resolved config to every
process, also one that cannot see the file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from async_rl import config as config_mod
from async_rl import plugins
from async_rl.launch import cli

ROOT = Path(__file__).resolve().parents[2]


def _load(*words):
    args = cli.parse_args(["config", *words])
    return config_mod.load(args.config, args.overrides)


def _file(tmp_path, text):
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    return path


def test_field_keys_set_fields_last_and_the_rest_are_plugin_settings(tmp_path):
    path = _file(tmp_path, "lr: 1.0e-5\nalgo: {eps_clip: 0.1}\nrollout.rollout_top_p: 0.9\nmin_len: 7\n"
                           "weights: {a: 1}\n")
    cfg = _load("--custom-config-path", str(path), "lr=1e-3", "eps_clip=0.3")
    assert cfg.optimizer.lr == 1e-5 and cfg.algo.eps_clip == 0.1 and cfg.rollout.rollout_top_p == 0.9  # file wins
    assert plugins.custom_config()["min_len"] == 7 and plugins.custom_config()["weights"] == {"a": 1}
    assert cfg.rollout.custom_config["min_len"] == 7
    plugins.set_custom_config({})
    assert _load().rollout.custom_config == {} and plugins.custom_config() == {}  # none: nothing published


def test_the_file_is_read_once_and_travels_in_the_resolved_config(tmp_path):
    path = _file(tmp_path, "lr: 2.0e-5\nbonus: 0.25\n")
    cfg = _load(f"custom_config_path={path}")
    config_mod.save(cfg, tmp_path / "config.yaml")
    path.unlink()  # a process on another host: the file is not there
    (tmp_path / "bonus_rm.py").write_text("from async_rl.plugins import custom_config\n"
                                          "def score(prompt, response, label):\n"
                                          "    return custom_config()['bonus']\n")
    code = ("import sys; from async_rl import config; from actors.rewards import RewardScorer\n"
            f"cfg = config.load({str(tmp_path / 'config.yaml')!r}, ['custom_rm_path=bonus_rm.score'])\n"
            "print(cfg.optimizer.lr, RewardScorer(cfg.rollout).score('p', ['r'], 'l')[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2e-05", "[0.25]"]


@pytest.mark.parametrize("text,needle", [
    (None, "no such file"),
    ("[1, 2]\n", "must be a map"),
    ("lr: fast\n", "optimizer.lr='fast': must be a number"),
    ("use_routing_replay: true\n", "dense models"),  # a slime option without a meaning here says why
    ("a: [\n", "not YAML"),
])
def test_bad_files_are_refused_naming_the_field(tmp_path, text, needle):
    path = tmp_path / "custom.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(config_mod.ConfigError, match="rollout.custom_config_path") as err:
        _load(f"custom_config_path={path}")
    assert needle in str(err.value)
