"""Start the engine servers the contract suite runs against, as real processes on real sockets:
the embedded engine always; SGLang when its CPU test harness is installed (scripts/sglang_cpu/setup.sh)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from actors.engine_client import EngineClient
from async_rl import tiny

ROOT = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = ROOT / "scripts" / "sglang_cpu" / "python"
SGLANG_VENV = Path(os.environ.get("SGLANG_VENV", ROOT / ".venv-sglang"))


def sglang_missing() -> str:
    """'' when the SGLang CPU harness is installed, else why not (the skip reason)."""
    if not (SGLANG_VENV / "bin" / "python").exists():
        return (f"SGLang CPU harness not installed ({SGLANG_VENV} missing); run bash scripts/sglang_cpu/setup.sh "
                "(.ci/run does)")
    if not list(SGLANG_VENV.glob(".async-rl-harness-*")):
        return f"SGLang CPU harness in {SGLANG_VENV} is incomplete; rerun bash scripts/sglang_cpu/setup.sh"
    return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_checkpoint(out_dir: Path, seed: int, **kwargs) -> Path:
    """A tiny checkpoint with weights drawn wide enough that logits are far from uniform (so greedy
    outputs differ between seeds and top-k/top-p actually cut)."""
    tiny.build_model(out_dir, seed=seed, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3, generator=gen)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def embedded_command(model_path: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "actors.engine.server", "--model-path", str(model_path), "--host", "127.0.0.1",
            "--port", str(port), "--num-threads", "1", *extra]


def sglang_command(model_path: Path, port: int, *extra: str) -> list[str]:
    from actors.engine.sglang import sglang_server_command
    return sglang_server_command(str(SGLANG_PYTHON), str(model_path), "127.0.0.1", port, tp_size=1,
                                 extra_args=["--device", "cpu", "--max-total-tokens", "32768",
                                             "--disable-cuda-graph", "--random-seed", "0", *extra])


def start(kind: str, model_path: Path, log_path: Path, *extra: str, timeout: float = 240) -> tuple[subprocess.Popen, EngineClient]:
    port = free_port()
    cmd = (embedded_command if kind == "embedded" else sglang_command)(model_path, port, *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    client = EngineClient(f"http://127.0.0.1:{port}", timeout=120)
    try:
        client.wait_ready(timeout, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        stop(proc)
        tail = "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{kind} server failed to start: {e}\n{tail}") from None
    return proc, client


def stop(proc: subprocess.Popen) -> None:
    import signal
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference greedy decoding with transformers' own forward and KV cache that, like ignore_eos, neither
    stops nor masks at EOS."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def reference_logprobs(model, prompt, output, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Log-probs of `output` under the sampling distribution, from one full forward pass of the HF model."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1].float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        cut = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(torch.zeros_like(cut).scatter(1, order, cut), float("-inf"))
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(output)[:, None]).squeeze(1)
