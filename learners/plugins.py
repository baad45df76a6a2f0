"""The learner's plug-in points, loaded by dotted path when the learner starts so that a wrong path or
signature stops the run before any training with an error naming the field (see `async_rl.plugins`).

  algo.custom_loss_function_path  fn(logp, batch, algo) -> (loss, metrics)      (learners.objective)
  algo.custom_tis_function_path   fn(logp_old, logp_behavior, mask, algo) -> weights  (learners.offpolicy)
  algo.rollout_data_postprocess_path  fn(cfg, step, batch) -> None, edits the step's TrainBatch in place
                                      (`postprocess` below: after advantages, before weights and loss)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from async_rl.plugins import load_function
from learners.objective import CUSTOM_LOSS_PARAMS

CUSTOM_TIS_PARAMS = 4
POSTPROCESS_PARAMS = 3


@dataclass
class AlgoPlugins:
    custom_loss: Callable | None = None
    custom_tis: Callable | None = None
    rollout_data_postprocess: Callable | None = None


def load_algo_plugins(algo) -> AlgoPlugins:
    """Import the configured plug-ins; raises async_rl.plugins.PluginError on a bad path or signature."""
    out = AlgoPlugins()
    if algo.custom_loss_function_path:
        out.custom_loss = load_function(algo.custom_loss_function_path, "algo.custom_loss_function_path",
                                        num_params=CUSTOM_LOSS_PARAMS)
    if algo.custom_tis_function_path:
        out.custom_tis = load_function(algo.custom_tis_function_path, "algo.custom_tis_function_path",
                                       num_params=CUSTOM_TIS_PARAMS)
    if algo.rollout_data_postprocess_path:
        out.rollout_data_postprocess = load_function(algo.rollout_data_postprocess_path,
                                                     "algo.rollout_data_postprocess_path", num_params=POSTPROCESS_PARAMS)
    return out


def postprocess(plugins: AlgoPlugins, cfg, step: int, batch) -> None:
    """Run algo.rollout_data_postprocess_path on the step's batch, once logp_old, ref_logp, values and the
    advantages are filled; the fields it may change (mask, advantages, returns, rewards) must keep their shapes."""
    fn = plugins.rollout_data_postprocess
    if fn is None:
        return
    names = ("mask", "advantages", "returns", "rewards")
    shapes = {n: tuple(getattr(batch, n).shape) for n in names if getattr(batch, n) is not None}
    fn(cfg, step, batch)
    for n, shape in shapes.items():
        got = getattr(batch, n)
        if got is None or tuple(got.shape) != shape:
            raise ValueError(f"algo.rollout_data_postprocess_path={cfg.algo.rollout_data_postprocess_path!r}: it "
                             f"changed batch.{n} from shape {list(shape)} to "
                             f"{None if got is None else list(got.shape)}; edit the tensors in place (same shape)")
