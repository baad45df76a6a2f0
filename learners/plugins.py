"""The learner's plug-in points, loaded by dotted path when the learner starts so that a wrong path or
signature stops the run before any training with an error naming the field (see `async_rl.plugins`).

  algo.custom_loss_function_path  fn(logp, batch, algo) -> (loss, metrics)      (learners.objective)
  algo.custom_tis_function_path   fn(logp_old, logp_behavior, mask, algo) -> weights  (learners.offpolicy)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from async_rl.plugins import load_function
from learners.objective import CUSTOM_LOSS_PARAMS

CUSTOM_TIS_PARAMS = 4


@dataclass
class AlgoPlugins:
    custom_loss: Callable | None = None
    custom_tis: Callable | None = None


def load_algo_plugins(algo) -> AlgoPlugins:
    """Import the configured plug-ins; raises async_rl.plugins.PluginError on a bad path or signature."""
    out = AlgoPlugins()
    if algo.custom_loss_function_path:
        out.custom_loss = load_function(algo.custom_loss_function_path, "algo.custom_loss_function_path",
                                        num_params=CUSTOM_LOSS_PARAMS)
    if algo.custom_tis_function_path:
        out.custom_tis = load_function(algo.custom_tis_function_path, "algo.custom_tis_function_path",
                                       num_params=CUSTOM_TIS_PARAMS)
    return out
