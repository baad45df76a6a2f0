"""Where a run's processes go and what they need: the GPUs the local launcher gives engines and learner
(`cluster.engine_gpus`, `cluster.learner_gpus`), and the plan `async-rl launch CONFIG --dry-run` prints
(placement, batch arithmetic, a memory estimate per GPU) without starting or writing anything.

Invariants: `gpu_env` and `plan` read the same assignment (what the dry-run shows is what launch does); the
estimate says where each number comes from (the model's config.json, or a known shape when the checkpoint
is not on this machine) and is an estimate: weights, gradients and optimizer states exactly, activations by
Megatron's per-layer rule (Korthikanti et al. 2022), the engine's KV cache at its full batch and context.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30


@dataclass
class Shape:
    """What the estimate needs of a decoder-only transformer (an HF config.json's fields)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head's q and k

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden // self.heads

    @property
    def params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden + (q + 2 * kv if self.qkv_bias else 0)
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.layers * layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


# the shapes of the models the recipes in configs/ name, for a dry-run where the checkpoint is not at hand
KNOWN = {
    "qwen2.5-0.5b": Shape(896, 24, 14, 2, 4864, 151936, tied=True, qkv_bias=True),
    "qwen2.5-1.5b": Shape(1536, 28, 12, 2, 8960, 151936, tied=True, qkv_bias=True),
    "qwen3-4b": Shape(2560, 36, 32, 8, 9728, 151936, head_dim=128, tied=True, qk_norm=True),
    "qwen3-8b": Shape(4096, 36, 32, 8, 12288, 151936, head_dim=128, qk_norm=True),
}


def model_shape(hf_checkpoint: str) -> tuple[Shape | None, str]:
    """The model's shape and where it came from."""
    path = Path(hf_checkpoint) / "config.json"
    if path.is_file():
        c = json.loads(path.read_text())
        c = c.get("text_config", c)
        shape = Shape(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                      c.get("num_key_value_heads", c["num_attention_heads"]), c["intermediate_size"], c["vocab_size"],
                      c.get("head_dim") or 0, bool(c.get("tie_word_embeddings", False)),
                      c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)),
                      c.get("model_type") == "qwen3")
        return shape, str(path)
    name = Path(hf_checkpoint).name.lower()
    for key, shape in KNOWN.items():
        if name.startswith(key):
            return shape, f"the known shape of {key} ({path} is not on this machine)"
    return None, f"unknown ({path} is not on this machine)"


# ---- GPU assignment (local launcher) --------------------------------------------------------------------------

def engine_count(cfg) -> int:
    r = cfg.rollout
    if r.rollout_external_engine_addrs or cfg.debug.debug_train_only:
        return 0
    if r.rollout_engine == "sglang" and r.rollout_num_gpus:
        return r.rollout_num_gpus // r.rollout_num_gpus_per_engine
    return cfg.cluster.num_engines


def gpus_per_engine(cfg) -> int:
    return cfg.rollout.rollout_num_gpus_per_engine if cfg.rollout.rollout_engine == "sglang" else 1


def learner_gpu_count(cfg) -> int:
    return cfg.train.actor_num_gpus_per_node  # megatron ranks, or the torch learner's FSDP ranks (on this host)


LEARNER_RANKS_ENV = "ASYNC_RL_LEARNER_RANKS"  # set for each rank the Ray launcher starts itself (no torchrun)


def learner_ranks(cfg) -> int:
    """The learner's ranks: train.actor_num_gpus_per_node on each of cluster.actor_num_nodes nodes (more than
    one node only under --cluster ray)."""
    return cfg.cluster.actor_num_nodes * cfg.train.actor_num_gpus_per_node


def learner_is_ranked(cfg) -> bool:
    """Whether the learner runs one process per rank (learners.fsdp.under_torchrun; under torchrun, or one Ray
    actor a rank under --cluster ray, async_rl/launch/ray_ranks.py): megatron
    always; the torch learner at several ranks (FSDP2), or with train.fsdp_cpu_offload (FSDP2 over a group of
    one: the CPU offload is FSDP2's). Otherwise the torch learner is one plain process (learners.torch_backend)."""
    t = cfg.train
    return t.train_backend == "megatron" or learner_ranks(cfg) > 1 or t.fsdp_cpu_offload


def check(cfg) -> None:
    """Rules of cluster.engine_gpus / learner_gpus (config_rules/cluster.py calls it); errors name field, value, fix."""
    from async_rl.config_rules import ConfigError
    c, r = cfg.cluster, cfg.rollout
    for name in ("engine_gpus", "learner_gpus"):
        ids = getattr(c, name)
        if not all(isinstance(g, int) and g >= 0 for g in ids) or len(set(ids)) != len(ids):
            raise ConfigError(f"cluster.{name}={ids}: must be distinct GPU ids >= 0, e.g. [0, 1]")
    if c.engine_gpus:
        want = engine_count(cfg) * gpus_per_engine(cfg)
        if r.rollout_engine == "embedded" and not r.engine_device.startswith("cuda"):
            raise ConfigError(f"cluster.engine_gpus={c.engine_gpus}: the engines run on "
                              f"rollout.engine_device={r.engine_device!r}; set engine_device=cuda, or engine_gpus=[]")
        if len(c.engine_gpus) != want:
            raise ConfigError(f"cluster.engine_gpus={c.engine_gpus}: {engine_count(cfg)} engine(s) x "
                              f"{gpus_per_engine(cfg)} GPU(s) each need {want} ids; list {want}, or []")
        if r.engine_device not in ("cuda", "cuda:0") and r.rollout_engine == "embedded":
            raise ConfigError(f"rollout.engine_device={r.engine_device!r} with cluster.engine_gpus: each engine sees "
                              f"only its own GPUs (as cuda:0); set engine_device=cuda")
    if c.learner_gpus:
        want = learner_gpu_count(cfg)
        if len(c.learner_gpus) != want:
            raise ConfigError(f"cluster.learner_gpus={c.learner_gpus}: the learner takes {want} GPU(s) "
                              f"(train.actor_num_gpus_per_node); list {want}, or []")
        if cfg.train.train_backend == "torch" and cfg.train.learner_device not in ("cuda", "cuda:0"):
            raise ConfigError(f"cluster.learner_gpus={c.learner_gpus}: the torch learner runs on train.learner_device="
                              f"{cfg.train.learner_device!r}; set learner_device=cuda, or learner_gpus=[]")


def _device_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def assignment(cfg) -> dict[str, list[int]]:
    """Process name -> physical GPU ids it runs on (absent: CPU)."""
    c, r, t = cfg.cluster, cfg.rollout, cfg.train
    out: dict[str, list[int]] = {}
    k = gpus_per_engine(cfg)
    for i in range(engine_count(cfg)):
        if c.engine_gpus:
            out[f"engine{i}"] = c.engine_gpus[i * k:(i + 1) * k]
        elif r.rollout_engine == "sglang":
            out[f"engine{i}"] = list(range(k))  # SGLang starts at GPU 0 unless told otherwise
        elif r.engine_device.startswith("cuda"):
            out[f"engine{i}"] = [_device_index(r.engine_device)]
    if not cfg.debug.debug_rollout_only:
        if c.learner_gpus:
            out["learner"] = list(c.learner_gpus)
        elif t.train_backend == "megatron":
            out["learner"] = list(range(t.actor_num_gpus_per_node))
        elif t.learner_device.startswith("cuda") and t.actor_num_gpus_per_node > 1:  # FSDP: one GPU a rank
            out["learner"] = list(range(t.actor_num_gpus_per_node))
        elif t.learner_device.startswith("cuda"):
            out["learner"] = [_device_index(t.learner_device)]
    return out


def gpu_env(cfg, name: str) -> dict[str, str]:
    """The environment the local launcher adds for process `name`: CUDA_VISIBLE_DEVICES when the config
    assigns it GPUs (cluster.engine_gpus / learner_gpus); else nothing (it sees every GPU)."""
    c = cfg.cluster
    ids = (c.engine_gpus and name.startswith("engine")) or (c.learner_gpus and name == "learner")
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, assignment(cfg)[name]))} if ids else {}

