"""slime's command line: every flag of slime's argument list (the seed's copy of slime/utils/arguments.py's
summary) is accepted under its name or refused with a message that says why and what to use instead; dashed
flags mean what the key=value words mean; a launch needs no YAML."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import yaml

from async_rl.launch import cli
from async_rl import config as config_mod
from async_rl.slime_flags import ALWAYS, EXPLAINED, explain, to_words
from tests.test_e2e import assert_no_orphans, cli as cli_proc, read_rows

SEED = Path("/work/shared/seeds/002_636419ba131021f0.txt")  # slime's argument summary, where it is on disk
# its flag names, kept here for a clone without it (the test reads the seed when it can, so the two stay equal)
NAMES = Path(__file__).with_name("slime_flag_names.txt")


def slime_flags() -> list[str]:
    kept = NAMES.read_text().split()
    if not SEED.exists():
        return kept
    flags = re.findall(r"^- --([a-z0-9-]+):", SEED.read_text(), re.M)
    assert len(flags) > 150, "the seed's format changed: no flag list found"
    assert flags == kept, f"{NAMES.name} differs from {SEED}: copy the flag names again"
    return flags


def test_every_slime_flag_is_accepted_or_explained():
    unexplained = []
    for flag in slime_flags():
        key = flag.replace("-", "_")
        try:
            config_mod.resolve_key(key)
            assert key not in EXPLAINED and key not in ALWAYS, f"{key} is a field and also explained away"
            continue
        except config_mod.ConfigError as exc:
            message = str(exc)
        if key in ALWAYS:
            assert to_words([f"--{flag}"], {}) == []  # accepted, nothing to set
            continue
        why = explain(key)
        if why is None or message != why:
            unexplained.append(f"--{flag}: {message}")
            continue
        # a real explanation: why, and what to use instead, not "unknown key"
        assert "unknown" not in message and len(EXPLAINED[key]) > 30, message
    assert not unexplained, "slime flags neither accepted nor explained:\n" + "\n".join(unexplained)


def test_explanations_name_only_real_fields():
    """An explanation that says `use rollout.x` must name a field that exists."""
    for key, text in EXPLAINED.items():
        for ref in re.findall(r"\b(cluster|ckpt|rollout|data|eval|algo|optimizer|buffer|logging|train|debug)\.(\w+)",
                              text):
            config_mod.resolve_key(".".join(ref))  # raises for a field that does not exist


def test_the_flags_users_miss_first_are_reached_or_explained():
    for key in ("rollout_stop", "rollout_max_context_len", "rollout_skip_special_tokens", "eval_input_key",
                "eval_label_key", "eval_reward_key", "eval_function_path", "load", "save", "start_rollout_id",
                "wandb_group", "wandb_run_id", "wandb_dir", "wandb_team", "wandb_host", "tb_project_name",
                "tb_experiment_name", "use_rollout_entropy", "custom_config_path", "buffer_filter_path",
                "rollout_data_postprocess_path", "distributed_timeout_minutes"):
        try:
            config_mod.resolve_key(key)
        except config_mod.ConfigError as exc:
            assert explain(key) and str(exc) == explain(key), key


def _cfg(*words: str) -> config_mod.Config:
    args = cli.parse_args(["config", *words])
    return config_mod.load(args.config, args.overrides)


def test_dashed_flags_mean_what_key_value_words_mean():
    dashed = _cfg("--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--use-tis", "--tis-clip", "1.5",
                  "--eval-prompt-data", "add", "a.jsonl", "hard", "b.jsonl", "--rollout-top-k", "-1", "--lr", "1e-6",
                  "--apply-chat-template-kwargs", "{enable_thinking: false}", "--disable-rewards-normalization",
                  "--use-kl-loss", "false", "--rollout-stop-token-ids", "3", "7", "--input-key=question")
    words = _cfg("rollout_batch_size=8", "n_samples_per_prompt=4", "use_tis=true", "tis_clip=1.5",
                 "eval_prompt_data=[add, a.jsonl, hard, b.jsonl]", "rollout_top_k=-1", "lr=1e-6",
                 "apply_chat_template_kwargs='{enable_thinking: false}'", "disable_rewards_normalization=true",
                 "use_kl_loss=false", "rollout_stop_token_ids=[3, 7]", "input_key=question")
    assert dashed.to_dict() == words.to_dict()
    assert dashed.rollout.rollout_batch_size == 8 and dashed.data.apply_chat_template_kwargs == "{enable_thinking: false}"
    assert dashed.eval.eval_prompt_data == ["add", "a.jsonl", "hard", "b.jsonl"] and dashed.optimizer.lr == 1e-6
    assert dashed.rollout.rollout_stop_token_ids == [3, 7] and dashed.data.input_key == "question"


def test_a_yaml_file_and_flags_and_words_mix(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  rollout_batch_size: 2\n  n_samples_per_prompt: 2\n")
    cfg = _cfg(str(path), "--n-samples-per-prompt", "4", "max_staleness=5", "--use-hf-config-for-megatron")
    assert (cfg.rollout.rollout_batch_size, cfg.rollout.n_samples_per_prompt, cfg.buffer.max_staleness) == (2, 4, 5)


@pytest.mark.parametrize("words,needle", [
    (["--true-on-policy-mode"], "max_staleness=0"),  # explained, with what to use instead
    (["true_on_policy_mode=true"], "max_staleness=0"),  # the same as a key=value word
    (["--rollout-max-context-len", "100", "--rollout-max-prompt-len", "100"], "at most rollout_max_context_len - 1"),
    (["--rollout-stop", ""], "must be non-empty strings"),
    (["--use-hf-config-for-megatron", "false"], "cannot be turned off"),
    (["--rollout-batchsize", "3"], "did you mean rollout_batch_size"),
    (["--rollout-batch-size"], "needs a value"),
])
def test_refused_flags_say_why(capsys, words, needle):
    assert cli.main(["config", *words]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_launch_with_no_yaml_checks_like_any_launch(tmp_path, tiny_world, capsys):
    argv = ["launch", "--hf-checkpoint", str(tiny_world["model_sft"]), "--prompt-data", str(tmp_path / "none.jsonl"),
            "--rollout-batch-size", "4", "--run-dir", str(tmp_path / "run")]
    assert cli.main(argv) == 2  # past hf_checkpoint (set by the flag) to the prompt file, which is not there
    assert "data.prompt_data=" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_launch_with_no_yaml_runs_as_slimes_run_scripts_do(tmp_path, tiny_world):
    """slime's run scripts have no YAML: defaults plus dashed flags, store_true flags without a value."""
    run_dir = tmp_path / "run"
    proc = cli_proc("launch", "--hf-checkpoint", str(tiny_world["model_sft"]), "--prompt-data", str(tiny_world["train"]),
                    "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--num-rollout", "3",
                    "--rollout-max-response-len", "4", "--use-tis", "--tis-clip", "1.5", "--run-dir", str(run_dir),
                    "max_staleness=1")
    try:
        out, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:  # the launcher stops every process it started
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    assert [r["step"] for r in read_rows(run_dir)] == [0, 1, 2]
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["rollout"]["rollout_batch_size"] == 4 and resolved["algo"]["tis_clip"] == 1.5
    assert resolved["buffer"]["max_staleness"] == 1
    assert_no_orphans(run_dir)


def test_eval_keys_read_eval_files_with_their_own_keys(tmp_path, tiny_world):
    from actors.evaluate import load_eval_set
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "1+2=", "answer": "3"}\n{"question": "2+2=", "answer": "4"}\n')
    cfg = _cfg(f"--hf-checkpoint={tiny_world['model_sft']}", "--eval-prompt-data", str(path),
               "--eval-input-key", "question", "--eval-label-key", "answer")
    assert load_eval_set(cfg, str(path)) == [{"input": "1+2=", "label": "3"}, {"input": "2+2=", "label": "4"}]
    assert cfg.data.input_key == "input"  # the training data keeps its own keys
    with pytest.raises(Exception, match="no key 'input'"):
        load_eval_set(_cfg(f"--hf-checkpoint={tiny_world['model_sft']}"), str(path))


def test_wandb_and_tensorboard_options_reach_their_loggers(tmp_path):
    from async_rl.metrics import tensorboard_dir, wandb_init_args
    cfg = _cfg("--wandb-group", "sweep1", "--wandb-team", "lab", "--wandb-run-id", "abc123", "--wandb-dir",
               str(tmp_path / "wb"), "--tb-project-name", "math", "--tb-experiment-name", "s4")
    args = wandb_init_args(cfg, tmp_path / "run7")
    assert (args["group"], args["entity"], args["id"], args["resume"]) == ("sweep1", "lab", "abc123", "allow")
    assert args["dir"] == str(tmp_path / "wb") and args["name"] == "run7"
    assert tensorboard_dir(cfg, tmp_path / "run7") == tmp_path / "run7" / "tensorboard" / "math" / "s4"
    assert tensorboard_dir(_cfg(), tmp_path) == tmp_path / "tensorboard"


def test_stop_strings_reach_rollout_and_eval_requests():
    from types import SimpleNamespace

    from actors.evaluate import eval_sampling_params
    from actors.generator import Generator
    cfg = _cfg("--rollout-stop", "</answer>", "Question:", "--rollout-stop-token-ids", "7")
    params = Generator.sampling_params(SimpleNamespace(cfg=cfg))  # what every /generate call of a generator sends
    assert params["stop"] == ["</answer>", "Question:"] and params["stop_token_ids"] == [7]
    assert eval_sampling_params(cfg)["stop"] == ["</answer>", "Question:"]
    assert "stop" not in Generator.sampling_params(SimpleNamespace(cfg=_cfg()))  # none: SGLang's default


def test_eval_reward_key_picks_the_eval_score(tmp_path, monkeypatch):
    from actors.evaluate import eval_reward_config
    from actors.rewards import RewardScorer
    (tmp_path / "dict_rm.py").write_text("def score(prompt, response, label):\n"
                                         "    return {'reward': 0.25, 'acc': float(response == label)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _cfg("--custom-rm-path", "dict_rm.score", "--eval-reward-key", "acc")
    assert RewardScorer(cfg.rollout).score("p", ["7"], "7")[0] == [0.25]  # training reward: rollout.reward_key
    assert RewardScorer(eval_reward_config(cfg)).score("p", ["7", "8"], "7")[0] == [1.0, 0.0]


def test_slimes_sglang_flags_become_sglang_server_args():
    cfg = _cfg("--rollout-engine", "sglang", "--sglang-mem-fraction-static", "0.8", "--sglang-enable-metrics",
               "--sglang-max-running-requests=256", "--sglang-server-concurrency", "32")
    assert cfg.rollout.sglang_server_args == ["--mem-fraction-static 0.8", "--enable-metrics",
                                              "--max-running-requests 256"]
    assert cfg.rollout.sglang_server_concurrency == 32  # our own field of that prefix stays ours


def test_the_yaml_may_come_after_the_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  rollout_batch_size: 2\n  n_samples_per_prompt: 2\n")
    args = cli.parse_args(["launch", "--n-samples-per-prompt", "4", str(path), "max_staleness=5", "--run-dir", "x"])
    assert args.config == str(path) and args.overrides == ["n_samples_per_prompt=4", "max_staleness=5"]
