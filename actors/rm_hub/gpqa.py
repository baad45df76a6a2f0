"""rm_type=gpqa: multiple-choice reward, 1.0 when the response picks the correct option, else 0.0.

Guarantees:
- Only the text after the last `</think>` is read, so options weighed while reasoning never count.
- The chosen letter is, in this order of trust: a boxed letter (`\\boxed{C}`, `\\boxed{(C)}`); the last
  "answer/option/choice is C" or "Answer: (C)"; the last "(C)"; "C is correct"; a response that is just
  the letter ("C", "C.", "C)"). Letters are upper-case only, so the article "a" is never read as option A.
- Valid letters are the options the prompt lists ("A) ...", "(B) ...", "C. ...", "D: ..."), else A-D.
- The label names the correct option as a letter ("C"), an index (2), the option's text (matched to the
  options in the prompt or in the label), or a dict {"answer" | "correct_letter": ..., "choices": [...]}.
- With no letter in the response, it scores 1.0 only if exactly one option's text appears in it and that
  option is the correct one (a response that recites every option earns nothing).
"""
from __future__ import annotations

import re
import string

from actors.rm_hub.math_utils import last_boxed

_DEFAULT_LETTERS = "ABCD"
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[).:]\s+(.+?)\s*$", re.M)
_PATTERNS = [  # later patterns are less specific; within one pattern the last match wins
    re.compile(r"(?i:answer|option|choice)(?:\s*(?i:is))?[\s:*]*\(?([A-J])\b"),  # also markdown **C**
    re.compile(r"\(([A-J])\)"),
    re.compile(r"\b([A-J])\s+(?i:is\s+(?:the\s+)?correct)"),
]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).strip()


def parse_options(prompt: str) -> dict[str, str]:
    """Letter -> option text, from lines such as "A) 12", "(B) 13", "C. 14" (needs at least two options)."""
    options = {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(prompt or "")}
    return options if len(options) >= 2 else {}


def extract_choice(response: str, letters: str) -> str | None:
    """The option letter the response commits to, or None (see module docstring for the order)."""
    text = response.rsplit("</think>", 1)[-1]
    boxed = last_boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\text\{([^{}]*)\}", r"\1", boxed).strip(" ()$.")
        if len(inner) == 1 and inner in letters:
            return inner
    for pattern in _PATTERNS:
        found = [m for m in pattern.findall(text) if m in letters]
        if found:
            return found[-1]
    bare = text.strip().strip("().*: ")
    return bare if len(bare) == 1 and bare in letters else None


def _options(prompt: str, label) -> dict[str, str]:
    choices = (label.get("choices") or label.get("options")) if isinstance(label, dict) else None
    if isinstance(choices, dict):
        return {str(k).strip().upper(): str(v) for k, v in choices.items()}
    if isinstance(choices, (list, tuple)):
        return dict(zip(string.ascii_uppercase, map(str, choices)))
    return parse_options(prompt)


def _correct_letter(label, options: dict[str, str], letters: str) -> str | None:
    if isinstance(label, dict):
        label = next((label[k] for k in ("correct_letter", "answer", "label") if k in label), None)
    if isinstance(label, int) and not isinstance(label, bool):
        return letters[label] if 0 <= label < len(letters) else None
    text = str(label).strip().strip("()").strip() if label is not None else ""
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    matches = [k for k, v in options.items() if _norm(v) == _norm(text)]
    return matches[0] if len(matches) == 1 else None


def gpqa_reward(prompt: str, response: str, label) -> float:
    """rm_type=gpqa: 1.0 when the response's chosen option is the label's option."""
    options = _options(prompt, label)
    letters = "".join(sorted(options)) or _DEFAULT_LETTERS
    correct = _correct_letter(label, options, letters)
    if correct is None:
        return 0.0
    chosen = extract_choice(response, letters)
    if chosen is not None:
        return float(chosen == correct)
    said = f" {_norm(response.rsplit('</think>', 1)[-1])} "
    present = [k for k, v in options.items() if _norm(v) and f" {_norm(v)} " in said]
    return float(present == [correct])
