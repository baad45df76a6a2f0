"""Config loading, overrides and validation: good values load, bad values fail naming field, value and fix."""
from __future__ import annotations

import pytest
import yaml

from async_rl import config as C


def test_defaults_and_derived_batch_sizes():
    cfg = C.load(None, ["rollout_batch_size=4", "n_samples_per_prompt=6", "num_steps_per_rollout=2"])
    assert cfg.rollout.global_batch_size == 12  # 4 * 6 / 2
    assert cfg.rollout.micro_batch_size == 12


def test_dotted_and_bare_overrides_and_types():
    cfg = C.load(None, ["rollout.n_samples_per_prompt=3", "max_staleness=0", "use_tis=false", "lr=5e-4",
                        "cluster.learner_cpus=[1]"])
    assert cfg.rollout.n_samples_per_prompt == 3 and cfg.buffer.max_staleness == 0
    assert cfg.algo.use_tis is False and cfg.optimizer.lr == 5e-4 and cfg.cluster.learner_cpus == [1]


def test_yaml_file_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"rollout": {"rollout_batch_size": 2, "n_samples_per_prompt": 4},
                                    "algo": {"tis_clip": 3.0}}))
    cfg = C.load(path, ["eps_clip=0.1"])
    C.save(cfg, tmp_path / "resolved.yaml")
    again = C.load(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert again.algo.tis_clip == 3.0 and again.algo.eps_clip == 0.1


@pytest.mark.parametrize("words, needle", [
    (["rollout_batch_size=0"], "rollout.rollout_batch_size=0: must be >= 1"),
    (["n_samples_per_prompt=abc"], "rollout.n_samples_per_prompt='abc': must be an integer"),
    (["rollout_batch_size=3", "n_samples_per_prompt=3", "global_batch_size=4"], "must equal global_batch_size"),
    (["rollout_batch_size=3", "n_samples_per_prompt=3", "num_steps_per_rollout=2"], "must divide"),
    (["micro_batch_size=5"], "rollout.micro_batch_size=5: must divide global_batch_size=64"),
    (["max_staleness=-1"], "buffer.max_staleness=-1: must be >= 0"),
    (["tis_clip=0.5", "tis_clip_low=1.0"], "algo.tis_clip=0.5: must be > tis_clip_low=1.0"),
    (["rollout_top_p=0"], "rollout.rollout_top_p=0.0: must be in (0, 1]"),
    (["advantage_estimator=a2c"], "algo.advantage_estimator='a2c': must be one of"),
    (["tensor_model_parallel_size=2"], "train.tensor_model_parallel_size=2: only train_backend=megatron uses it"),
    (["use_tis=maybe"], "must be true or false"),
    (["n_sample_per_prompt=2"], "did you mean"),
    (["nonsense"], "key=value"),
    (["train_backend=megatron", "tensor_model_parallel_size=2"], "train.actor_num_gpus_per_node=1: must be a multiple"),
])
def test_bad_values_name_field_value_and_fix(words, needle):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, words)
    assert needle in str(err.value)


def test_unknown_section_and_field_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rolout:\n  num_rollout: 3\n")
    with pytest.raises(C.ConfigError, match="did you mean rollout"):
        C.load(path)
    path.write_text("rollout:\n  lr: 3\n")
    with pytest.raises(C.ConfigError, match="rollout.lr: unknown config field"):
        C.load(path)


def test_every_field_is_documented():
    import dataclasses
    for sec in dataclasses.fields(C.Config):
        for f in dataclasses.fields(sec.default_factory()):
            assert f.metadata.get("doc"), f"{sec.name}.{f.name} has no doc"


def test_check_paths_names_missing_checkpoint(tmp_path):
    from async_rl.config_rules.paths import check_paths
    cfg = C.load(None, [f"hf_checkpoint={tmp_path}"])
    with pytest.raises(C.ConfigError, match="ckpt.hf_checkpoint=.*no config.json"):
        check_paths(cfg)


def test_docs_config_md_is_current():
    """docs/CONFIG.md is generated from the dataclasses; regenerate it when a knob changes."""
    import contextlib
    import io
    from pathlib import Path

    from async_rl.launch.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["config", "--doc"])
    doc = (Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md").read_text()
    assert buf.getvalue().strip() in doc, "docs/CONFIG.md is stale: regenerate it (see its first line)"


def test_every_enumerated_field_declares_its_choices_and_refuses_others():
    """Choices live on the field (`Literal[...]`): a word outside them fails at parse time, and a value set
    directly on the dataclass fails in finalize, both naming field, value and the allowed values."""
    import dataclasses

    from async_rl.config_rules import field_choices
    cfg = C.Config()
    enumerated = [(sec.name, f.name) for sec in dataclasses.fields(cfg)
                  for f in dataclasses.fields(getattr(cfg, sec.name))
                  if field_choices(type(getattr(cfg, sec.name)), f.name) is not None]
    assert ("algo", "tis_mode") in enumerated and ("buffer", "selector") in enumerated and len(enumerated) >= 15
    for sec, name in enumerated:
        allowed = field_choices(type(getattr(cfg, sec)), name)
        assert getattr(cfg, sec).__dataclass_fields__[name].default in allowed, (sec, name)
        with pytest.raises(C.ConfigError, match=rf"{sec}\.{name}='bogus': must be one of"):
            C.load(None, [f"{sec}.{name}=bogus"])
        direct = C.Config()
        setattr(getattr(direct, sec), name, "bogus")
        with pytest.raises(C.ConfigError) as err:
            C.finalize(direct)
        assert str(err.value) == f"{sec}.{name}='bogus': must be one of {list(allowed)}"


def test_finalize_reaches_every_section_module_in_order(monkeypatch):
    """Each section's rules are `config_rules/<section>.validate`; finalize calls every one of them (a new
    section module that finalize forgets fails here), rollout first (it derives the batch sizes that train
    reads), and every config section without a module is one that has no rules."""
    import importlib
    import pkgutil

    from async_rl import config_rules
    modules = {m.name for m in pkgutil.iter_modules(config_rules.__path__)} - {"base", "paths"}
    assert modules == set(C.SECTIONS) - {"logging"}
    calls = []
    for name in modules:
        mod = importlib.import_module(f"async_rl.config_rules.{name}")
        monkeypatch.setattr(mod, "validate", lambda cfg, name=name, real=mod.validate: (calls.append(name), real(cfg)))
    cfg = C.finalize(C.Config())
    assert sorted(calls) == sorted(modules) and calls[0] == "rollout" and calls.index("train") > calls.index("algo")
    assert cfg.rollout.global_batch_size == 64


def test_rules_package_does_not_import_the_loader():
    """config imports config_rules, never the other way round: validating needs no async_rl.config."""
    import subprocess
    import sys
    code = ("import sys; import async_rl.config_rules, async_rl.config_sections; "
            "print('async_rl.config' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
