"""The built-in tasks: labels are the true results of the prompts (checked by an independent evaluation)."""
import ast
import operator
import re

import pytest

from async_rl import tiny


def _evaluate(expr: str) -> int:
    """Reference: Python's own parser and left-to-right evaluation of + and - on the prompt's expression."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub}

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected node {ast.dump(node)}")
    return walk(ast.parse(expr, mode="eval").body)


@pytest.mark.parametrize("task,operands", [("addition", 2), ("chain", 3)])
def test_labels_are_the_results(task, operands):
    rows = tiny.TASKS[task](500, 12, seed=3)
    for row in rows:
        assert row["input"].endswith("=")
        expr = row["input"][:-1]
        numbers = [int(n) for n in re.findall(r"\d+", expr)]
        assert len(numbers) == operands and all(0 <= n <= 12 for n in numbers)
        assert row["label"] == str(_evaluate(expr))
        assert set(row["input"] + row["label"]) <= set(tiny.CHARS)  # the tokenizer covers every character


def test_chain_uses_both_operators_and_negative_answers():
    rows = tiny.chain_problems(400, 12, seed=0)
    assert any("-" in r["input"] for r in rows) and any(r["input"].count("+") == 2 for r in rows)
    assert any(r["label"].startswith("-") for r in rows)
    assert rows == tiny.chain_problems(400, 12, seed=0)  # deterministic per seed
    assert rows != tiny.chain_problems(400, 12, seed=1)


def test_build_task_names_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="task='mul'.*addition.*chain"):
        tiny.build_task(tmp_path, task="mul")
    paths = tiny.build_task(tmp_path, n_train=10, n_test=5, task="chain")
    assert len(paths["train"].read_text().splitlines()) == 10
