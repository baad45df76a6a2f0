"""One engine call's samples: generate them through an engine, surviving interruptions by weight updates.

Invariants:
- A sample's tokens, logprobs and versions stay aligned: a sample interrupted by a weight update
  (finish_reason abort) is resubmitted until it finishes, either from its tokens so far (partial_rollout:
  kept with the versions and logprobs that produced them; the engine recomputes their KV) or from scratch
  (everything it had is dropped). The response budget is the same either way: max_new_tokens, cut with
  `max_context_len` (rollout.rollout_max_context_len) so that prompt + response never exceeds it.
- With mask_offpolicy_in_partial_rollout, a trajectory's `loss_mask` is 1 exactly on the tokens of its
  newest version.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors.engine_client import EngineClient, GenerateResult
from async_rl.types import Trajectory


@dataclass
class Sample:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str = ""
    resubmits: int = 0

    def extend(self, res: GenerateResult) -> None:
        self.output_ids += res.output_ids
        self.logprobs += res.output_logprobs
        self.versions += res.token_versions

    def restart(self) -> None:
        self.output_ids, self.logprobs, self.versions = [], [], []


def response_budget(max_new_tokens: int, prompt_len: int, max_context_len: int = 0) -> int:
    """Tokens a response may have: max_new_tokens, and with a context limit (> 0) at most what the prompt leaves
    of it (at least 1: prompts longer than max_context_len - 1 are dropped at load)."""
    if not max_context_len:
        return max_new_tokens
    return max(1, min(max_new_tokens, max_context_len - prompt_len))


def generate_samples(engine: EngineClient, prompts: list[list[int]], params: dict, partial_rollout: bool,
                     max_resubmits: int = 1000, max_context_len: int = 0) -> list[Sample]:
    """One sample per prompt (repeat a prompt for several); `params` are SGLang sampling params."""
    samples = [Sample(list(p)) for p in prompts]
    budgets = [response_budget(int(params["max_new_tokens"]), len(p), max_context_len) for p in prompts]
    pending = list(range(len(samples)))
    while pending:
        inputs = [samples[i].prompt_ids + samples[i].output_ids for i in pending]
        per_sample = [{**params, "max_new_tokens": budgets[i] - len(samples[i].output_ids)} for i in pending]
        results = engine.generate(inputs, per_sample, return_logprob=True)
        again = []
        for i, res in zip(pending, results):
            s = samples[i]
            if res.finish_reason != "abort":
                s.extend(res)
                s.finish_reason = res.finish_reason
                continue
            s.extend(res) if partial_rollout else s.restart()
            s.resubmits += 1
            if len(s.output_ids) >= budgets[i]:
                s.finish_reason = "length"
            elif s.resubmits > max_resubmits:
                raise RuntimeError(f"sample aborted {s.resubmits} times in a row; is something aborting every "
                                   "request on the engine?")
            else:
                again.append(i)
        pending = again
    return samples


def offpolicy_mask(versions: np.ndarray) -> np.ndarray:
    """1 on the tokens of the newest version in `versions`, 0 on older ones."""
    return (versions == versions.max()).astype(np.uint8) if len(versions) else np.zeros(0, np.uint8)


def to_trajectory(sample: Sample, text: str, mask_offpolicy: bool) -> Trajectory:
    versions = np.asarray(sample.versions, np.int32)
    return Trajectory(prompt_ids=np.asarray(sample.prompt_ids, np.int32),
                      response_ids=np.asarray(sample.output_ids, np.int32),
                      rollout_logprobs=np.asarray(sample.logprobs, np.float32), token_versions=versions,
                      finish_reason=sample.finish_reason, response_text=text,
                      loss_mask=offpolicy_mask(versions) if mask_offpolicy else None)
