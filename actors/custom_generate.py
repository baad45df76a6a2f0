"""Custom generate functions (`rollout.custom_generate_function_path`): an async fn(ctx, prompt) -> Trajectory
that drives the engine for one sample (several turns, tool calls, environment feedback).

Contract (checked here, so a plug-in bug fails loudly and names the function): the returned Trajectory's
`response_ids` are everything after the prompt (model turns and tool/environment text), `rollout_logprobs`
and `token_versions` align with them, and `loss_mask` is 1 on model-generated tokens only (tokens the model
did not sample must not be trained on). `ctx.generate` records the model's tokens for you: build the
trajectory with `ctx.trajectory(prompt_ids, pieces)`, where each piece is a GenerateResult (model) or a
list of token ids (tool output, masked out).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from actors.engine_client import EngineClient, GenerateResult
from async_rl.types import Trajectory


class CustomGenerateError(RuntimeError):
    pass


@dataclass
class GenerateContext:
    """What a custom generate function may use: the engine, the tokenizer, the run's sampling params."""
    engine: EngineClient
    tokenizer: object
    sampling_params: dict
    cfg: object
    mask_offpolicy: bool = False

    async def generate(self, input_ids: list[int], sampling_params: dict | None = None) -> GenerateResult:
        """One model turn (blocking HTTP in a worker thread, so many samples run concurrently)."""
        params = {**self.sampling_params, **(sampling_params or {})}
        results = await asyncio.to_thread(self.engine.generate, [list(input_ids)], params, True)
        return results[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def trajectory(self, prompt_ids: list[int], pieces: list, finish_reason: str = "stop") -> Trajectory:
        """Assemble a multi-turn sample: GenerateResult pieces are trained on, token-id lists are not."""
        ids, logprobs, versions, mask = [], [], [], []
        for piece in pieces:
            if isinstance(piece, GenerateResult):
                ids += piece.output_ids
                logprobs += piece.output_logprobs or [0.0] * len(piece.output_ids)
                versions += piece.token_versions
                mask += [1] * len(piece.output_ids)
            else:
                last = versions[-1] if versions else 0  # not sampled: inherits a version, never trained on
                ids += list(piece)
                logprobs += [0.0] * len(piece)
                versions += [last] * len(piece)
                mask += [0] * len(piece)
        mask_arr = np.asarray(mask, np.uint8)
        if self.mask_offpolicy and versions:
            newest = max(v for v, m in zip(versions, mask) if m) if any(mask) else 0
            mask_arr &= (np.asarray(versions) == newest).astype(np.uint8)
        return Trajectory(np.asarray(prompt_ids, np.int32), np.asarray(ids, np.int32),
                          np.asarray(logprobs, np.float32), np.asarray(versions, np.int32),
                          finish_reason=finish_reason,
                          response_text=self.tokenizer.decode(ids, skip_special_tokens=True), loss_mask=mask_arr)


def check_trajectory(traj, where: str) -> Trajectory:
    if not isinstance(traj, Trajectory):
        raise CustomGenerateError(f"{where}: returned {type(traj).__name__}, must return async_rl.types.Trajectory")
    r = len(traj.response_ids)
    if r == 0 or len(traj.rollout_logprobs) != r or len(traj.token_versions) != r:
        raise CustomGenerateError(f"{where}: response_ids ({r}), rollout_logprobs ({len(traj.rollout_logprobs)}) and "
                                  f"token_versions ({len(traj.token_versions)}) must have the same length > 0")
    if traj.loss_mask is None or len(traj.loss_mask) != r:
        raise CustomGenerateError(f"{where}: loss_mask must be set, one entry per response token (1 = model-generated)")
    return traj


def run_custom_generate(fn, generator, engine: EngineClient, prompts: list[dict], n: int) -> list[Trajectory]:
    """n samples of each prompt through `fn`, all concurrently; trajectories in prompt-major order."""
    r = generator.cfg.rollout
    ctx = GenerateContext(engine, generator.tokenizer, generator.sampling_params(), generator.cfg,
                          r.mask_offpolicy_in_partial_rollout)
    return generate_with(fn, ctx, prompts, n, f"rollout.custom_generate_function_path={r.custom_generate_function_path!r}")


def generate_with(fn, ctx: GenerateContext, prompts: list[dict], n: int, where: str) -> list[Trajectory]:
    """n samples of each prompt through `fn` under `ctx`, all concurrently, checked; in prompt-major order.
    `where` names the config field that chose `fn` (in the error a bad trajectory raises)."""
    async def all_samples():
        return await asyncio.gather(*[fn(ctx, prompt) for prompt in prompts for _ in range(n)])
    return [check_trajectory(t, where) for t in asyncio.run(all_samples())]
