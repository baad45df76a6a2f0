"""rm_type=dapo: DAPO's math reward (Minerva-style answer check), +1.0 correct / -1.0 otherwise.

Guarantees (as DAPO's reference scorer): only the last 300 characters of the response are read; the
prediction is the text after the last `Answer:` (any case) up to the end of its line; prediction and label
go through the same Minerva-style normalization (the last `=` side, `$`, `\\text{}`/`\\boxed{}` wrappers,
`^\\circ`, articles, unit words such as "degrees", spaces, thousands commas, `\\dfrac`) and must then be
equal as strings. A numeric label is compared as an integer string (DAPO's answers are integers), so the
prediction "42" matches the label 42 or "42.0" while the prediction "42.0" does not. No `Answer:` scores
-1.0. One deliberate leniency over DAPO's code: a trailing period ("Answer: 42.") is ignored. The reward
is a dict {"score", "acc", "pred"}; its scalar is `score`.
"""
from __future__ import annotations

import re

from actors.rm_hub.math_utils import last_boxed

_TAIL_CHARS = 300  # DAPO: the longest MATH-500 answer has 159 characters
_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_UNIT_WORDS = re.compile(r"\b(?:square|ways|integers|dollars|mph|inches|hours|km|units|points|feet|minutes|digits"
                         r"|cents|degrees|cm|pounds|meters|edges|students|multiples)\b")
_WRAPPERS = re.compile(r"\\(?:boxed|text|textbf|mbox|mathrm|overline)\s*\{([^{}]*)\}")


def normalize_final_answer(answer: str) -> str:
    """Minerva-style canonical text of a final answer (see the module docstring)."""
    s = str(answer).split("=")[-1]  # "x = 5" -> "5"
    s = re.sub(r"<\|[a-z_]+\|>", "", s)  # chat end tokens the engine may have left in
    prev = None
    while prev != s:  # \boxed{\text{5}} needs two passes
        prev, s = s, _WRAPPERS.sub(r"\1", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = re.sub(r"\\(?:ldots|dots|[;!, ])", "", s)
    s = s.replace("\\$", "").replace("$", "").replace('"', "")
    s = re.sub(r"\b(?:an?|the)\s+", "", s)
    s = _UNIT_WORDS.sub("", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"sqrt([^{])", r"sqrt{\1}", s)
    if re.fullmatch(r"\d{1,3}(,\d{3})+", s):
        s = s.replace(",", "")
    return s


def _label_answer(label) -> str:
    text = str(label)
    if "\\boxed" in text:
        text = last_boxed(text) or text
    gt = normalize_final_answer(text)
    try:
        value = float(gt)
    except ValueError:
        return gt  # non-integer labels are compared as normalized text
    return str(int(value)) if value.is_integer() else gt


def dapo_reward(prompt: str, response: str, label) -> dict:
    """rm_type=dapo: {"score": 1.0 | -1.0, "acc": bool, "pred": normalized prediction}."""
    matches = _ANSWER_RE.findall(response[-_TAIL_CHARS:])
    pred = normalize_final_answer(matches[-1]) if matches else "[INVALID]"
    correct = bool(matches) and pred == _label_answer(label)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
