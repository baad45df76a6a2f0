"""SGLang servers as rollout engines: the command line that starts one, and how many a run starts.

Invariant: what the user configures reaches the server verbatim. `rollout.sglang_server_args` is appended
to `python -m sglang.launch_server --model-path ... --host ... --port ... --tp-size ...` as given (slime's
`--sglang-*` forwarding, as a list), and an option we set ourselves cannot be given twice: a clash is a
config error naming the option, not a server that silently runs with the other value.
"""
from __future__ import annotations

import shlex
import sys

from async_rl.config_rules.rollout import SGLANG_OWNED_OPTIONS as OWNED_OPTIONS  # set by the launcher from other fields


def split_server_args(args: list) -> list[str]:
    """`["--mem-fraction-static 0.8", "--disable-cuda-graph"]` or one word per entry -> argv words."""
    words: list[str] = []
    for entry in args:
        words += shlex.split(str(entry))
    return words


def owned_option_clash(args: list) -> str:
    """'' when `args` sets none of the options the launcher owns, else the message naming the clash."""
    for word in split_server_args(args):
        name = word.split("=", 1)[0]
        if name in OWNED_OPTIONS:
            return (f"rollout.sglang_server_args sets {name}: the launcher sets it from {OWNED_OPTIONS[name]}; "
                    f"remove it from sglang_server_args")
    return ""


def sglang_server_command(python: str, model_path: str, host: str, port: int, tp_size: int = 1,
                          extra_args: list | None = None, weight_version: int = 0) -> list[str]:
    """argv that starts one SGLang server (`python -m sglang.launch_server ...`); `--weight-version` is set
    so token versions are numbers from the start (SGLang's default is the string "default")."""
    return [python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
            "--host", host, "--port", str(port), "--tp-size", str(tp_size), "--weight-version", str(weight_version),
            *split_server_args(extra_args or [])]


def num_sglang_engines(rollout_num_gpus: int, gpus_per_engine: int, default: int) -> int:
    """Engines a run starts: rollout_num_gpus / rollout_num_gpus_per_engine, or `default` when it is 0."""
    return rollout_num_gpus // gpus_per_engine if rollout_num_gpus else default
