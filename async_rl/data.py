"""Prompt files: JSONL with an input key and a label key (slime's `input_key` / `label_key`)."""
from __future__ import annotations

import json
from pathlib import Path


class PromptError(ValueError):
    pass


def load_prompts(path: str | Path, input_key: str, label_key: str) -> list[dict]:
    """Read a JSONL prompt file into `[{"input": ..., "label": ...}]`; errors name the line and the fix."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptError(f"{path}:{lineno}: not JSON ({exc.msg}); each line must be one JSON object") from None
            for key, field in ((input_key, "data.input_key"), (label_key, "data.label_key")):
                if key not in obj:
                    raise PromptError(f"{path}:{lineno}: no key {key!r}; set {field} to the key your data uses "
                                      f"(keys here: {sorted(obj)})")
            rows.append({"input": obj[input_key], "label": obj[label_key]})
    if not rows:
        raise PromptError(f"data.prompt_data={str(path)!r}: file has no prompts")
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a prompt file: JSONL (.jsonl, .json) or Parquet (.parquet, needs pyarrow)."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PromptError(f"data.prompt_data={str(path)!r}: reading Parquet needs pyarrow; pip install pyarrow "
                              "(or convert the file to JSONL)") from None
        return pq.read_table(path).to_pylist()
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PromptError(f"{path}:{lineno}: not JSON ({exc.msg}); each line must be one JSON object") from None
    return rows


def load_prompt_data(data, tokenizer_path: str, path: str | Path | None = None) -> list[dict]:
    """All of `DataConfig`'s options: `[{"input": text, "label", "metadata"?, "tools"?}]`, with the chat
    template applied (data.apply_chat_template) and prompts over data.rollout_max_prompt_len tokens dropped
    (the count is printed). `path` defaults to data.prompt_data (pass the eval file to read that one)."""
    import yaml

    path = Path(path or data.prompt_data)
    rows = read_rows(path)
    tokenizer = None
    if data.apply_chat_template or data.rollout_max_prompt_len:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    kwargs = yaml.safe_load(data.apply_chat_template_kwargs) if data.apply_chat_template_kwargs else {}
    out, too_long = [], 0
    for i, row in enumerate(rows, 1):
        for key, field in ((data.input_key, "data.input_key"), (data.label_key, "data.label_key")):
            if key not in row:
                raise PromptError(f"{path}: row {i}: no key {key!r}; set {field} to the key your data uses "
                                  f"(keys here: {sorted(row)})")
        prompt = {"input": _render(row, data, tokenizer, kwargs, f"{path}: row {i}"), "label": row[data.label_key]}
        for key, name in ((data.metadata_key, "metadata"), (data.tool_key, "tools")):
            if key:
                prompt[name] = row.get(key)
        if data.rollout_max_prompt_len and len(_encode(tokenizer, prompt["input"], data)) > data.rollout_max_prompt_len:
            too_long += 1
            continue
        out.append(prompt)
    if too_long:
        print(f"data: dropped {too_long} of {len(rows)} prompts longer than rollout_max_prompt_len="
              f"{data.rollout_max_prompt_len} tokens ({path})", flush=True)
    if not out:
        raise PromptError(f"data.prompt_data={str(path)!r}: no prompts left (file empty, or all over "
                          f"rollout_max_prompt_len={data.rollout_max_prompt_len})")
    return out


def _render(row: dict, data, tokenizer, kwargs: dict, where: str) -> str:
    value = row[data.input_key]
    if not data.apply_chat_template:
        if not isinstance(value, str):
            raise PromptError(f"{where}: {data.input_key!r} is {type(value).__name__}; a prompt must be text, or "
                              "OpenAI-style messages with data.apply_chat_template=true")
        return value
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise PromptError(f"{where}: {data.input_key!r} must be a string or a list of {{role, content}} messages")
    tools = row.get(data.tool_key) if data.tool_key else None
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)


def _encode(tokenizer, text: str, data) -> list[int]:
    # a rendered chat template already holds its special tokens
    return tokenizer(text, add_special_tokens=not data.apply_chat_template)["input_ids"]


def eval_data_config(cfg):
    """The data section eval sets are read with: data's options, with eval.eval_input_key / eval_label_key /
    eval_tool_key in place of data's keys where they are set."""
    import dataclasses
    e, d = cfg.eval, cfg.data
    return dataclasses.replace(d, input_key=e.eval_input_key or d.input_key, label_key=e.eval_label_key or d.label_key,
                               tool_key=e.eval_tool_key or d.tool_key)
