"""Checks `launch` makes before any process starts, of what a config points at: the model dir has weights and a
tokenizer, every prompt file parses and has its keys (and renders, with apply_chat_template), the devices
exist, the optional packages the config switches on are installed.

Invariant: when one of these is wrong, `launch` exits 2 with one line naming the field, the value and the
fix, and has started no process and written nothing into the run directory. (Without them the same faults
surfaced inside a child, behind a traceback, after the hub and engines were up, or burnt learner restarts.)
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from async_rl.config import Config, ConfigError
from async_rl.config_rules import eval_datasets

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def check_before_start(cfg: Config) -> None:
    """Raise ConfigError for the first problem found (check_paths has already seen that the files exist)."""
    _check_model_dir("ckpt.hf_checkpoint", cfg.ckpt.hf_checkpoint)
    _check_context_len(cfg)
    if cfg.ckpt.ref_load:
        _check_model_dir("ckpt.ref_load", cfg.ckpt.ref_load)
    _check_prompts(cfg)
    _check_devices(cfg)
    _check_packages(cfg)


def _check_model_dir(field: str, path: str) -> None:
    root = Path(path)
    if not (root / "config.json").is_file():
        raise ConfigError(f"{field}={path!r}: no config.json there; point it at an HF checkpoint dir")
    if not any(next(root.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ConfigError(f"{field}={path!r}: config.json but no weights (*.safetensors or pytorch_model*.bin); "
                          f"save the model there with save_pretrained, or point {field} at the dir that has them")


def _check_context_len(cfg: Config) -> None:
    import json
    limit, path = cfg.rollout.rollout_max_context_len, Path(cfg.ckpt.hf_checkpoint) / "config.json"
    positions = json.loads(path.read_text()).get("max_position_embeddings") if limit else None
    if positions and limit > positions:
        raise ConfigError(f"rollout.rollout_max_context_len={limit}: more than the model's max_position_embeddings="
                          f"{positions} (ckpt.hf_checkpoint's config.json); set it to at most {positions}")


def _tokenizer(cfg: Config):
    from transformers import AutoTokenizer
    path = cfg.ckpt.hf_checkpoint
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"ckpt.hf_checkpoint={path!r}: no usable tokenizer there ({first}); save the tokenizer "
                          f"with the model (tokenizer.save_pretrained)") from None


def _check_prompts(cfg: Config) -> None:
    from async_rl.data import PromptError, eval_data_config, load_prompt_data
    d = cfg.data
    if d.apply_chat_template or d.rollout_max_prompt_len:
        tokenizer = _tokenizer(cfg)
        if d.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.apply_chat_template=true: the tokenizer in ckpt.hf_checkpoint="
                              f"{cfg.ckpt.hf_checkpoint!r} has no chat template; add one (tokenizer.chat_template "
                              f"in tokenizer_config.json) or set apply_chat_template=false")
    files = [("data.prompt_data", d.prompt_data)]
    files += [(f"eval.eval_prompt_data ({name})", path) for name, path in eval_datasets(cfg.eval)]
    if cfg.debug.debug_train_only:  # trains on saved batches: the prompts are never read
        files = files[1:]
    for field, path in files:
        try:
            load_prompt_data(d if field.startswith("data.") else eval_data_config(cfg), cfg.ckpt.hf_checkpoint, path)
        except PromptError as exc:
            raise ConfigError(f"{field}: {_one_line(exc)}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{field}={path!r}: not UTF-8 text ({exc.reason} at byte {exc.start}); prompt files "
                              f"are JSONL (one JSON object per line) or Parquet") from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _devices(cfg: Config) -> list[tuple[str, str]]:
    """(field, device) of every torch device the run will place a model on."""
    r, t = cfg.rollout, cfg.train
    out = []
    engines_here = r.rollout_engine == "embedded" and not r.rollout_external_engine_addrs
    if engines_here and not cfg.debug.debug_train_only:
        out.append(("rollout.engine_device", r.engine_device))
    if t.train_backend == "torch" and not cfg.debug.debug_rollout_only:
        out.append(("train.learner_device", t.learner_device))
    return out


def _check_devices(cfg: Config) -> None:
    wanted = [(f, d) for f, d in _devices(cfg) if d.startswith("cuda")]
    if not wanted:
        return
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for field, device in wanted:
        index = int(device.split(":")[1]) if ":" in device else 0
        if count == 0:
            raise ConfigError(f"{field}={device!r}: this machine has no CUDA device (torch "
                              f"{torch.__version__}, cuda available: false); set {field}=cpu, or run on a GPU machine")
        if index >= count:
            raise ConfigError(f"{field}={device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:"
                              f"{count - 1}); pick one of them")


def _check_packages(cfg: Config) -> None:
    lg, r = cfg.logging, cfg.rollout
    needs = []
    if lg.use_wandb and lg.wandb_mode != "disabled":
        needs.append(("logging.use_wandb=true", "wandb", "pip install -e '.[wandb]'", "use_wandb=false"))
    if lg.use_tensorboard:
        needs.append(("logging.use_tensorboard=true", "tensorboard", "pip install -e '.[tensorboard]'",
                      "use_tensorboard=false"))
    if cfg.train.train_backend == "megatron" and not cfg.debug.debug_rollout_only:
        needs.append(("train.train_backend=megatron", "megatron", "pip install -e '.[megatron]'",
                      "train_backend=torch"))
    if r.rollout_engine == "sglang" and not r.rollout_external_engine_addrs:
        if r.sglang_python:
            if not Path(r.sglang_python).is_file():
                raise ConfigError(f"rollout.sglang_python={r.sglang_python!r}: no such interpreter; point it at the "
                                  f"python of the venv SGLang is installed in")
        else:
            needs.append(("rollout.rollout_engine=sglang", "sglang", "pip install -e '.[sglang]'",
                          "rollout_engine=embedded (or sglang_python=PATH to SGLang's own venv)"))
    for what, module, install, instead in needs:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{what}: needs the {module} package, which is not installed; {install}, or set "
                              f"{instead}")
