"""Greedy evaluation through an engine: load the given weights, answer each eval prompt once at
temperature 0, score it with the run's reward function, and write the accuracy as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actors.engine_client import EngineClient
from actors.rewards import RewardScorer
from async_rl import config as config_mod
from async_rl.data import load_prompts


def evaluate(cfg: config_mod.Config, engine: EngineClient, tokenizer, weights: str) -> dict:
    e = cfg.eval
    prompts = load_prompts(e.eval_prompt_data, cfg.data.input_key, cfg.data.label_key)[:e.eval_max_prompts]
    info = engine.model_info()
    if str(info.get("model_path")) != str(weights):
        ok, message = engine.update_weights_from_disk(weights, int(info.get("weight_version") or 0))
        if not ok:
            raise RuntimeError(f"eval: engine could not load {weights}: {message}")
    scorer = RewardScorer(cfg.rollout)
    params = {"temperature": 0.0, "max_new_tokens": e.eval_max_response_len or cfg.rollout.rollout_max_response_len,
              "stop_token_ids": list(cfg.rollout.rollout_stop_token_ids)}
    results = engine.generate([tokenizer(p["input"])["input_ids"] for p in prompts], params, return_logprob=False)
    scores = [scorer.score_one(p["input"], tokenizer.decode(r.output_ids, skip_special_tokens=True), p["label"])
              for p, r in zip(prompts, results)]
    return {"weights": str(weights), "weights_name": Path(weights).name, "num_prompts": len(prompts),
            "accuracy": sum(scores) / len(scores)}  # mean reward (= accuracy for 0/1 rewards)


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
