"""rm_type=deepscaler: DeepScaleR's rule-based reward for reasoning models, 1.0 correct / 0.0 otherwise.

Guarantees: only the text after the last `</think>` counts (the final solution, not the reasoning); a
response without `</think>` (thinking never finished) or without a boxed answer after it scores 0.0; the
boxed answer is graded against the label (or the label's own boxed answer) with `math_equal`.
"""
from __future__ import annotations

from actors.rm_hub.math_utils import last_boxed, math_equal, reference_answer

THINK_END = "</think>"


def deepscaler_reward(prompt: str, response: str, label) -> float:
    """rm_type=deepscaler: 1.0 when the boxed answer after `</think>` is equivalent to the label."""
    if THINK_END not in response:
        return 0.0
    solution = response.rsplit(THINK_END, 1)[1]
    truth = reference_answer(label)
    return float(bool(truth) and math_equal(last_boxed(solution), truth))
