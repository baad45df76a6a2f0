"""A tiny, locally built model, tokenizer and verifiable task for the CPU quickstart and the tests.

Nothing here touches a hub: the tokenizer is built with the `tokenizers` library (character level) and
saved as a normal HF tokenizer, the model is a random-init Qwen2 of a few hundred thousand parameters,
and the tasks are small-number addition (`"17+5="` -> `"22"`, the quickstart) and, harder, three-operand
chains of additions and subtractions (`"12-9+7="` -> `"10"`, answers from -2*max to 3*max), whose answers a
rule checks exactly.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CHARS = list("0123456789+-*= ")
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_tokenizer(out_dir: str | Path):
    """Character-level tokenizer saved as a PreTrainedTokenizerFast in `out_dir`; returns it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    hf.save_pretrained(str(out_dir))
    return hf


def build_model(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                num_kv_heads: int = 2, intermediate_size: int = 192, max_positions: int = 64, seed: int = 0,
                tie_embeddings: bool = True):
    """Random-init Qwen2ForCausalLM plus tokenizer, saved as an HF checkpoint directory; returns the path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def addition_problems(n: int, max_operand: int, seed: int) -> list[dict]:
    """`n` prompts `{"input": "a+b=", "label": "a+b"}` with operands in [0, max_operand]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"input": f"{a}+{b}=", "label": str(a + b)})
    return rows


def chain_problems(n: int, max_operand: int, seed: int) -> list[dict]:
    """`n` prompts `{"input": "a+b-c=", "label": str(result)}`: three operands in [0, max_operand] joined by
    `+` or `-` (each drawn with probability 1/2), evaluated left to right (no precedence question arises)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = (rng.randint(0, max_operand) for _ in range(3))
        op1, op2 = rng.choice("+-"), rng.choice("+-")
        first = a + b if op1 == "+" else a - b
        value = first + c if op2 == "+" else first - c
        rows.append({"input": f"{a}{op1}{b}{op2}{c}=", "label": str(value)})
    return rows


TASKS = {"addition": addition_problems, "chain": chain_problems}


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def build_task(out_dir: str | Path, n_train: int = 4000, n_test: int = 200, max_operand: int = 20,
               seed: int = 0, task: str = "addition") -> dict[str, Path]:
    """Write train/test JSONL prompt sets (`input`/`label` keys) of `task` (see TASKS) under `out_dir`."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: unknown; use one of {sorted(TASKS)}")
    make = TASKS[task]
    out = Path(out_dir)
    return {
        "train": write_jsonl(make(n_train, max_operand, seed), out / "train.jsonl"),
        "test": write_jsonl(make(n_test, max_operand, seed + 1), out / "test.jsonl"),
    }
