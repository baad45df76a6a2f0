"""Math answers: extract the final `\\boxed{...}` answer and decide whether two answers are equivalent.

Guarantees:
- `last_boxed` returns the content of the *last* `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), matching
  braces so nested `\\frac{1}{2}` stay whole; an unclosed box (a truncated response) gives None.
- `math_equal(given, truth)` is symmetric in spirit and never raises: True when the two strings are equal
  after `normalize_answer` (spaces, `\\left`/`\\right`, `\\text{}`, `$`, trailing period, units such as
  "degrees", `\\dfrac`, `x =` prefixes, thousands commas), or when both are numbers of equal value
  (integers with leading zeros, decimals, `a/b`, `\\frac{a}{b}`), element by element for tuples and
  intervals, or when sympy (if installed) proves the difference is 0 (`\\frac{\\sqrt{2}}{2}` vs
  `\\sqrt{2}/2`).
"""
from __future__ import annotations

import re
from fractions import Fraction

from actors.rm_hub.math_sympy import sympy_equal

_BOX_COMMANDS = ("\\boxed", "\\fbox")

# Words that only ever name a unit after a number; removing them never merges two different answers.
_UNITS = ("degrees?", "units?", "cm", "centimeters?", "meters?", "km", "kilometers?", "inch(?:es)?", "feet",
          "foot", "yards?", "miles?", "mph", "seconds?", "minutes?", "hours?", "days?", "weeks?", "months?",
          "years?", "dollars?", "cents?", "pounds?", "points?", "square", "sq", "ways", "students", "edges")
_UNIT_RE = re.compile(r"(?<=[0-9}\s])\s*(?:" + "|".join(_UNITS) + r")\b(?:\s*\^\s*\{?[0-9]\}?)?", re.I)
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.I)
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, braces balanced; None if absent or unclosed."""
    idx, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if idx < 0:
        return None
    rest = text[idx + len(command):]
    if rest[:1] == " " and not rest.lstrip().startswith("{"):  # `\boxed 5`: the answer is the next word
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return None


def _unwrap_text(s: str) -> str:
    prev = None
    while prev != s:  # nested \text{\textbf{x}} needs more than one pass
        prev, s = s, _TEXT_RE.sub(r"\1", s)
    return s


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _balanced(s[1:-1]):
        s = s[1:-1]
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
    return depth == 0


def normalize_answer(answer: str) -> str:
    """Canonical text of a final answer (see the module docstring for what is removed)."""
    s = str(answer).strip().replace("\n", " ").replace("\u2212", "-")  # unicode minus
    s = _unwrap_text(s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "\\$", "$", "\\%", "%"):
        s = s.replace(token, "")
    s = s.replace("\\ ", " ").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)  # 90^\circ -> 90
    s = re.sub(r"\\(?:dots|ldots|cdots)", "", s)
    s = _UNIT_RE.sub("", s).strip()
    s = s.rstrip(".").strip()
    # "x = 5", "k=5": a short variable name before a single '=' is not part of the answer
    match = re.fullmatch(r"\s*[A-Za-z](?:_\{?\w\}?)?\s*=\s*(.+)", s)
    if match and "=" not in match.group(1):
        s = match.group(1)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)  # \sqrt3 -> \sqrt{3}
    s = _strip_outer_braces(s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    return s


def to_number(s: str) -> Fraction | None:
    """Exact value of a normalized numeric answer (`007`, `-1.50`, `3/4`, `\\frac{3}{4}`), else None."""
    sign = 1
    if s.startswith("-") and s[1:].startswith("\\frac"):
        sign, s = -1, s[1:]
    frac = re.fullmatch(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if frac:
        num, den = _plain_number(frac.group(1)), _plain_number(frac.group(2))
        return sign * num / den if num is not None and den else None
    if s.count("/") == 1:
        num, den = (_plain_number(part) for part in s.split("/"))
        return num / den if num is not None and den else None
    return _plain_number(s)


def _plain_number(s: str) -> Fraction | None:
    if not _NUMBER_RE.fullmatch(s):
        return None
    try:
        return Fraction(s.lstrip("+"))
    except (ValueError, ZeroDivisionError):
        return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    # exact for fractions and finite decimals; the tolerance only forgives long repeating decimals
    return a == b or abs(a - b) <= Fraction(1, 10**9) * max(1, abs(a), abs(b))


def split_tuple(s: str) -> tuple[str, list[str]] | None:
    """`(1,\\frac{1}{2}]` -> ("(]", ["1", "\\frac{1}{2}"]); None when `s` is not a bracketed list of >= 2 items."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(s[1:-1], start=1):
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return None
        if ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:-1])
    return (s[0] + s[-1], parts) if len(parts) >= 2 and depth == 0 else None


def math_equal(given: str | None, truth: str | None) -> bool:
    """Whether the answer `given` is equivalent to the reference answer `truth` (see module docstring)."""
    if given is None or truth is None:
        return False
    g, t = normalize_answer(given), normalize_answer(truth)
    if not g or not t:
        return False
    if g == t or ("\\" not in g + t and g.lower() == t.lower()):
        return True
    gn, tn = to_number(g), to_number(t)
    if gn is not None and tn is not None:
        return _numbers_equal(gn, tn)
    g_tuple, t_tuple = split_tuple(g), split_tuple(t)
    if g_tuple or t_tuple:
        return (g_tuple is not None and t_tuple is not None and g_tuple[0] == t_tuple[0]
                and len(g_tuple[1]) == len(t_tuple[1])
                and all(math_equal(a, b) for a, b in zip(g_tuple[1], t_tuple[1])))
    return sympy_equal(g, t)


def reference_answer(label) -> str:
    """The answer a label states: the boxed content when the label is a boxed solution, else its text."""
    text = str(label).strip() if label is not None else ""
    if any(c in text for c in _BOX_COMMANDS):
        return last_boxed(text) or ""
    return text


def math_reward(prompt: str, response: str, label) -> float:
    """rm_type=math: 1.0 when the response's last boxed answer is equivalent to the label, else 0.0."""
    truth = reference_answer(label)
    return float(bool(truth) and math_equal(last_boxed(response), truth))
