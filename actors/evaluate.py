"""Evaluation through an engine.

- `evaluate`: the start/end eval of a run: load the given weights, answer each prompt of the first eval set
  once at temperature 0, score it with the run's reward function, and write the greedy accuracy as JSON
  (always greedy, whatever the eval_* sampling knobs say, so start and end stay comparable).
- `evaluate_sets`: the periodic eval (actors/eval_worker.py): every eval set, n_samples_per_eval_prompt
  responses per prompt under the eval_* sampling overrides, reported as mean reward and unbiased pass@k.

A response passes when its reward is >= 1 (as `log_passrate` counts it in the learner).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from actors.engine_client import EngineClient
from actors.rewards import RewardScorer
from async_rl import config as config_mod
from async_rl.config_rules import eval_datasets
from async_rl.data import eval_data_config, load_prompt_data


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with `c` of `n` samples correct: 1 - C(n-c, k) / C(n, k) (Chen et al.
    2021): the chance that k samples drawn without replacement from the n hold at least one correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 0 <= c <= n and 1 <= k <= n")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_ks(correct: list[int], n: int) -> dict[str, float]:
    """pass@k averaged over prompts for k = 1, 2, 4, ... <= n; `correct[i]` = correct samples of prompt i."""
    out, k = {}, 1
    while k <= n:
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
        k *= 2
    return out


def load_eval_set(cfg: config_mod.Config, path: str) -> list[dict]:
    """An eval set with the data section's keys (eval.eval_*_key where set) and chat template, cut to eval_max_prompts."""
    return load_prompt_data(eval_data_config(cfg), cfg.ckpt.hf_checkpoint, path)[:cfg.eval.eval_max_prompts]


def prompt_ids(cfg: config_mod.Config, tokenizer, prompt: dict) -> list[int]:
    # a rendered chat template already holds its special tokens (as the generator tokenizes)
    return tokenizer(prompt["input"], add_special_tokens=not cfg.data.apply_chat_template)["input_ids"]


def score_samples(cfg, engine: EngineClient, tokenizer, scorer: RewardScorer, prompts: list[dict], params: dict,
                  n: int) -> list[list[float]]:
    """rewards[i][j] of the j-th of n responses to prompt i (one /generate call for all of them)."""
    ids = [prompt_ids(cfg, tokenizer, p) for p in prompts for _ in range(n)]
    results = engine.generate(ids, params, return_logprob=False)
    texts = [tokenizer.decode(r.output_ids, skip_special_tokens=True) for r in results]
    return [scorer.score(p["input"], texts[i * n:(i + 1) * n], p["label"])[0] for i, p in enumerate(prompts)]


def max_new_tokens(cfg: config_mod.Config) -> int:
    return cfg.eval.eval_max_response_len or cfg.rollout.rollout_max_response_len


def evaluate(cfg: config_mod.Config, engine: EngineClient, tokenizer, weights: str) -> dict:
    """Greedy accuracy of `weights` on the first eval set (loaded into `engine` unless it already serves them)."""
    name, path = eval_datasets(cfg.eval)[0]
    prompts = load_eval_set(cfg, path)
    info = engine.model_info()
    if str(info.get("model_path")) != str(weights):
        ok, message = engine.update_weights_from_disk(weights, int(info.get("weight_version") or 0))
        if not ok:
            raise RuntimeError(f"eval: engine could not load {weights}: {message}")
    params = {"temperature": 0.0, "max_new_tokens": max_new_tokens(cfg), **_stops(cfg)}
    rewards = score_samples(cfg, engine, tokenizer, RewardScorer(eval_reward_config(cfg)), prompts, params, 1)
    return {"weights": str(weights), "weights_name": Path(weights).name, "dataset": name, "num_prompts": len(prompts),
            "accuracy": sum(r[0] for r in rewards) / len(rewards)}  # mean reward (= accuracy for 0/1 rewards)


def eval_sampling_params(cfg: config_mod.Config) -> dict:
    e = cfg.eval
    return {"temperature": e.eval_temperature, "top_p": e.eval_top_p, "top_k": e.eval_top_k,
            "max_new_tokens": max_new_tokens(cfg), **_stops(cfg)}


def _stops(cfg: config_mod.Config) -> dict:
    r = cfg.rollout
    return {"stop_token_ids": list(r.rollout_stop_token_ids), **({"stop": list(r.rollout_stop)} if r.rollout_stop else {})}


def eval_reward_config(cfg: config_mod.Config):
    """The rollout section evals score with: eval.eval_reward_key in place of reward_key where set."""
    import dataclasses
    return dataclasses.replace(cfg.rollout, reward_key=cfg.eval.eval_reward_key or cfg.rollout.reward_key)


def evaluate_sets(cfg: config_mod.Config, engine: EngineClient, tokenizer, sets: dict[str, list[dict]],
                  scorer: RewardScorer) -> dict[str, dict]:
    """{name: {"reward": mean, "pass@1": ..., "pass@2": ..., "num_prompts": ...}} for the weights the engine
    serves now, n_samples_per_eval_prompt responses per prompt under the eval_* sampling knobs."""
    n, params = cfg.eval.n_samples_per_eval_prompt, eval_sampling_params(cfg)
    out = {}
    for name, prompts in sets.items():
        rewards = score_samples(cfg, engine, tokenizer, scorer, prompts, params, n)
        correct = [sum(1 for r in row if r >= 1.0) for row in rewards]
        out[name] = {"reward": sum(map(sum, rewards)) / (n * len(rewards)), **pass_at_ks(correct, n),
                     "num_prompts": len(prompts)}
    return out


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description="greedy evaluation of one weights version through an engine")
    ap.add_argument("--config", required=True)
    ap.add_argument("--engine-url", required=True)
    ap.add_argument("--weights", required=True, help="HF checkpoint dir to evaluate")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config)
    result = evaluate(cfg, EngineClient(args.engine_url), AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint),
                      args.weights)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
