"""Built-in tool-use example: a calculator for the arithmetic task, as a custom generate function.

Set `rollout.custom_generate_function_path: actors.tools.calculator_generate`. Protocol (fits the tiny
character tokenizer): the model writes an arithmetic expression and `=`; generation stops there (stop string
`=`), the calculator appends the value and a space as tool output (never trained on: loss_mask 0), and the
model continues. At most `MAX_TOOL_CALLS` calls; the response budget (rollout_max_response_len) counts
model and tool tokens together. A turn that ends without a valid expression before its `=` ends the sample.
"""
from __future__ import annotations

import ast
import operator
import re

MAX_TOOL_CALLS = 2
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_EXPR = re.compile(r"([0-9+\-* ]+)=$")


def calculate(expression: str) -> int | None:
    """Value of an expression of integers, +, - and *; None when it is not one (or too big to be useful)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(ast.dump(node))
    try:
        result = value(tree.body)
    except (ValueError, RecursionError):
        return None
    return result if abs(result) < 10**12 else None


def tool_call(text: str) -> int | None:
    """The calculator's answer for a model turn ending in `EXPR=`, else None."""
    match = _EXPR.search(text)
    return calculate(match.group(1)) if match and match.group(1).strip() else None


async def calculator_generate(ctx, prompt: dict):
    """One sample with calculator calls; see the module docstring."""
    prompt_ids = ctx.encode(prompt["input"]) if "input_ids" not in prompt else list(prompt["input_ids"])
    budget = int(ctx.sampling_params["max_new_tokens"])
    pieces, used, finish = [], 0, "length"
    for turn in range(MAX_TOOL_CALLS + 1):
        context = prompt_ids + [t for p in pieces for t in (p.output_ids if hasattr(p, "output_ids") else p)]
        params = {"max_new_tokens": budget - used, **({"stop": ["="]} if turn < MAX_TOOL_CALLS else {})}
        res = await ctx.generate(context, params)
        pieces.append(res)
        used += len(res.output_ids)
        finish = res.finish_reason
        answer = tool_call(ctx.tokenizer.decode(res.output_ids, skip_special_tokens=True))
        if finish != "stop" or answer is None or used >= budget:
            break
        tool_ids = ctx.encode(f"{answer} ")[:budget - used]
        pieces.append(tool_ids)
        used += len(tool_ids)
        if used >= budget:
            finish = "length"
            break
    return ctx.trajectory(prompt_ids, pieces, finish_reason=finish)
