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
