"""`async-rl launch CONFIG --dry-run`: the resolved placement, the batch arithmetic and a memory estimate per
GPU of a validated config, and what this machine lacks to run it. Starts nothing and writes nothing.

`estimate(cfg)` returns the numbers (tests check recipes against them); `plan(cfg)` the text. The estimate
is per process: the learner's weights, gradients and optimizer states by backend and precision, its
activations for one micro-batch (Megatron's rule: s*b*h*(10 + 24/tp) bytes per layer, 2*s*b*h with full
recomputation, plus the fp32 logits), the engine's weights and its KV cache at engine_max_batch_size rows of
prompt + response tokens.
"""
from __future__ import annotations

from async_rl.placement import (GiB, Shape, assignment, engine_count, gpus_per_engine, learner_is_ranked,
                                learner_ranks, model_shape)

ASSUMED_PROMPT_LEN = 512  # tokens, when data.rollout_max_prompt_len does not bound it


def _seq_len(cfg) -> tuple[int, str]:
    prompt = cfg.data.rollout_max_prompt_len
    note = "" if prompt else f" (prompt length assumed {ASSUMED_PROMPT_LEN}: set data.rollout_max_prompt_len)"
    total = (prompt or ASSUMED_PROMPT_LEN) + cfg.rollout.rollout_max_response_len
    if cfg.rollout.rollout_max_context_len:  # prompt + response never exceeds it
        return min(total, cfg.rollout.rollout_max_context_len), ""
    return total, note


def _parallel(cfg) -> tuple[int, int, int]:
    t = cfg.train
    if t.train_backend != "megatron":
        return 1, 1, learner_ranks(cfg)  # FSDP ranks
    mp = t.tensor_model_parallel_size * t.pipeline_model_parallel_size * t.context_parallel_size
    return t.tensor_model_parallel_size, t.pipeline_model_parallel_size, learner_ranks(cfg) // mp


def learner_bytes(cfg, shape: Shape) -> dict[str, float]:
    """Per learner GPU: states (weights + grads + optimizer), activations of one micro-batch, logits."""
    t, a = cfg.train, cfg.algo
    tp, pp, dp = _parallel(cfg)
    n = shape.params / (tp * pp)
    if t.train_backend == "megatron" and t.bf16:  # bf16 weights, fp32 grads, fp32 main weights + Adam (sharded over dp)
        states = n * (2 + 4 + 12 / dp)
    elif t.fsdp_cpu_offload:  # states on the host; on the GPU one layer's gathered weights and gradients at a time
        states = n / shape.layers * 4 * 2
    else:  # fp32 weights, grads and AdamW moments (torch at several ranks: FSDP shards all of them)
        states = n * 16 / (dp if t.train_backend == "torch" else 1)
    if a.use_kl_loss or a.kl_coef:
        states += n * (2 if t.bf16 else 4)  # the reference model, forward only
    if a.advantage_estimator == "ppo":
        states *= 2  # a critic of the same size with its own optimizer
    seq, _ = _seq_len(cfg)
    if t.use_dynamic_batch_size:
        tokens = t.max_tokens_per_gpu
    else:
        tokens = cfg.rollout.micro_batch_size * seq / (dp if t.train_backend == "megatron" else 1)
    per_layer = tokens * shape.hidden * (2 if t.recompute_granularity == "full" else 10 + 24 / tp)
    act = per_layer * shape.layers / pp
    if t.recompute_granularity == "full":
        act += tokens * shape.hidden * (10 + 24 / tp)  # the layer being recomputed
    logits = tokens * shape.vocab / tp * 4
    return {"states": states, "activations": act, "logits": logits, "tokens": tokens}


def engine_bytes(cfg, shape: Shape) -> dict[str, float]:
    """Per engine GPU: weights and the KV cache at full batch and context (SGLang sizes its own pool)."""
    r = cfg.rollout
    k = gpus_per_engine(cfg)
    dtype = 4 if r.rollout_engine == "embedded" and (r.engine_dtype == "float32" or
                                                     (r.engine_dtype == "auto" and r.engine_device == "cpu")) else 2
    seq, _ = _seq_len(cfg)
    rows = r.engine_max_batch_size if r.rollout_engine == "embedded" else r.sglang_server_concurrency
    return {"weights": shape.params * dtype / k, "kv": rows * seq * shape.kv_bytes_per_token(dtype) / k,
            "rows": rows}


def estimate(cfg) -> dict:
    """GPU id -> [(process, bytes)], and the model's shape and its source."""
    shape, source = model_shape(cfg.ckpt.hf_checkpoint)
    gpus: dict[int, list[tuple[str, float]]] = {}
    if shape is not None:
        learner, engine = learner_bytes(cfg, shape), engine_bytes(cfg, shape)
        for name, ids in assignment(cfg).items():
            need = sum(v for k, v in (learner if name == "learner" else engine).items() if k not in ("tokens", "rows"))
            for g in ids:
                gpus.setdefault(g, []).append((name, need))
    return {"shape": shape, "source": source, "gpus": gpus}


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def placement_lines(cfg) -> list[str]:
    c, r, t = cfg.cluster, cfg.rollout, cfg.train
    where = assignment(cfg)
    gpu = lambda name: f"GPU {','.join(map(str, where[name]))}" if name in where else "CPU"  # noqa: E731
    cpus = lambda ids: f" cores {ids}" if ids else ""  # noqa: E731
    lines = [f"placement (local launcher, endpoints on {c.host}):",
             f"  hub          CPU{cpus(c.engine_cpus)}, port {c.hub_port or 'picked at launch'}"]
    if r.rollout_external_engine_addrs:
        lines.append(f"  engines      external: {r.rollout_external_engine_addrs}")
    for i in range(engine_count(cfg)):
        kind = (f"sglang, tp {gpus_per_engine(cfg)}" if r.rollout_engine == "sglang" else
                f"embedded, {r.engine_device}, dtype {r.engine_dtype}, kv cache {r.engine_kv_cache}, "
                f"max batch {r.engine_max_batch_size}")
        lines.append(f"  engine{i:<7}{gpu(f'engine{i}')} ({kind})")
    n_eng = max(1, engine_count(cfg) or len(r.rollout_external_engine_addrs))
    for i in range(0 if cfg.debug.debug_train_only else c.num_generators):
        lines.append(f"  generator{i:<4}CPU{cpus(c.engine_cpus)} -> engine{i % n_eng}")
    if not cfg.debug.debug_rollout_only:
        tp, pp, dp = _parallel(cfg)
        how = (f"megatron under torchrun, {learner_ranks(cfg)} rank(s): TP {tp} x PP {pp} x DP {dp}"
               if t.train_backend == "megatron" else f"torch, {t.learner_device}" +
               (f", FSDP2 over {dp} rank{'s' if dp > 1 else ''} under torchrun" if learner_is_ranked(cfg) else "") +
               (", parameters, gradients and AdamW states on the host (fsdp_cpu_offload)" if t.fsdp_cpu_offload else ""))
        lines.append(f"  learner      {gpu('learner')} ({how}{', bf16' if t.bf16 else ''})")
    if cfg.eval.eval_interval:
        lines.append(f"  eval_worker  own embedded engine on {r.engine_device} (pass@k every {cfg.eval.eval_interval} versions)")
    return lines


def batch_lines(cfg) -> list[str]:
    r, b = cfg.rollout, cfg.buffer
    samples = r.rollout_batch_size * r.n_samples_per_prompt
    micro = r.global_batch_size // r.micro_batch_size
    seq, note = _seq_len(cfg)
    steps = f"{r.num_rollout} learner steps = {r.num_rollout * samples:,} samples" if r.num_rollout else \
        f"num_epoch={r.num_epoch} passes over the prompts (steps counted at launch)"
    return ["batch:",
            f"  per learner step: rollout_batch_size {r.rollout_batch_size} prompts x n_samples_per_prompt "
            f"{r.n_samples_per_prompt} = {samples} samples, up to {seq} tokens each{note}",
            f"  num_steps_per_rollout {r.num_steps_per_rollout} optimizer step(s) of global_batch_size "
            f"{r.global_batch_size}, in {micro} micro-batch(es) of micro_batch_size {r.micro_batch_size}",
            f"  run: {steps}; weights published every {r.update_weights_interval} step(s)",
            f"  off-policy: max_staleness {b.max_staleness} (at most (max_staleness + 1) x rollout_batch_size = "
            f"{(b.max_staleness + 1) * r.rollout_batch_size} groups ahead of the learner), use_tis "
            f"{cfg.algo.use_tis} (tis_clip {cfg.algo.tis_clip}, {cfg.algo.tis_level}, {cfg.algo.tis_mode})"]


def memory_lines(cfg, est: dict) -> list[str]:
    shape = est["shape"]
    lines = [f"memory estimate (model shape: {est['source']}):"]
    if shape is None:
        return lines + ["  none: the model's config.json is needed for an estimate"]
    lines.append(f"  model: {shape.params / 1e9:.2f} B parameters ({shape.layers} layers, hidden {shape.hidden}, "
                 f"{shape.heads} heads / {shape.kv_heads} KV, vocab {shape.vocab})")
    if not cfg.debug.debug_rollout_only:
        m = learner_bytes(cfg, shape)
        lines.append(f"  learner per GPU: weights+grads+optimizer {_gib(m['states'])}, activations "
                     f"{_gib(m['activations'])} + logits {_gib(m['logits'])} for a micro-batch of "
                     f"{m['tokens']:,.0f} tokens")
    if engine_count(cfg):
        e = engine_bytes(cfg, shape)
        kv = ("SGLang sizes its KV pool to its --mem-fraction-static of the GPU; at "
              f"{e['rows']} samples in flight it needs {_gib(e['kv'])}" if cfg.rollout.rollout_engine == "sglang"
              else f"KV cache {_gib(e['kv'])} at {e['rows']} rows")
        lines.append(f"  engine per GPU: weights {_gib(e['weights'])}, {kv}")
    for g, users in sorted(est["gpus"].items()):
        lines.append(f"  GPU {g}: {' + '.join(f'{n} {_gib(b)}' for n, b in users)} = {_gib(sum(b for _, b in users))}")
    return lines


def machine_lines(cfg) -> list[str]:
    """What launch's checks would refuse on this machine (a recipe is often checked away from its GPUs)."""
    from async_rl.config import ConfigError
    from async_rl.config_rules.paths import check_paths
    from async_rl.launch.preflight import check_before_start
    try:
        check_paths(cfg)
        check_before_start(cfg)
    except ConfigError as exc:
        return ["on this machine: launch would stop here:", f"  {exc}"]
    return ["on this machine: every launch check passes"]


def plan(cfg) -> str:
    est = estimate(cfg)
    return "\n".join([*placement_lines(cfg), *batch_lines(cfg), *memory_lines(cfg, est), *machine_lines(cfg)])
