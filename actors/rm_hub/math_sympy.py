"""Symbolic equivalence of two normalized LaTeX answers through sympy, made safe for untrusted model output.

Guarantees: `sympy_equal` never raises and never evaluates arbitrary code. sympy's parser runs `eval` on
its input, so we first translate the small LaTeX subset answers use (`\\frac`, `\\sqrt`, `\\pi`, `\\cdot`,
`^`) into an expression of digits, operators, brackets and whitelisted names (single-letter variables,
`sqrt`, `pi`); anything else, huge exponents (which can hang `simplify`) and long inputs are refused
(answer: not equal). Without sympy installed it answers False, and the string/numeric checks still apply.
"""
from __future__ import annotations

import re

_MAX_LEN = 120
_SIMPLE = {"\\pi": "pi", "\\cdot": "*", "\\times": "*", "\\div": "/", "\\infty": "oo"}
_NAMES = {"sqrt", "pi", "oo"}
_SAFE_CHARS = re.compile(r"[0-9A-Za-z+\-*/(). ]*")


def _read_group(s: str, i: int) -> tuple[str, int] | None:
    """The `{...}` group (or single character) starting at s[i] -> (content, index after it)."""
    if i >= len(s):
        return None
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] == "{") - (s[j] == "}")
        if depth == 0:
            return s[i + 1:j], j + 1
    return None


def latex_to_expr(s: str) -> str | None:
    """Translate a normalized LaTeX answer into a sympy-parsable string, or None if it uses anything else."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num = _read_group(s, i + 5)
            den = num and _read_group(s, num[1])
            if not den:
                return None
            a, b = latex_to_expr(num[0]), latex_to_expr(den[0])
            if a is None or b is None:
                return None
            out.append(f"(({a})/({b}))")
            i = den[1]
        elif s.startswith("\\sqrt", i):
            i += 5
            root = "2"
            if s[i:i + 1] == "[":
                end = s.find("]", i)
                if end < 0:
                    return None
                root, i = s[i + 1:end], end + 1
            arg = _read_group(s, i)
            inner = arg and latex_to_expr(arg[0])
            if not inner or latex_to_expr(root) is None:
                return None
            out.append(f"sqrt({inner})" if root == "2" else f"(({inner})**(1/({latex_to_expr(root)})))")
            i = arg[1]
        elif s[i] == "\\":
            name = next((k for k in _SIMPLE if s.startswith(k, i)), None)
            if name is None:
                return None
            out.append(f" {_SIMPLE[name]} ")
            i += len(name)
        else:
            out.append({"{": "(", "}": ")", "^": "**"}.get(s[i], s[i]))
            i += 1
    return "".join(out)


def _safe(expr: str) -> bool:
    if len(expr) > _MAX_LEN or not _SAFE_CHARS.fullmatch(expr) or "__" in expr:
        return False
    names = re.findall(r"[A-Za-z]+", expr)
    if any(len(name) > 1 and name not in _NAMES for name in names):
        return False
    if len({name for name in names if len(name) == 1}) > 2:  # text, not algebra; simplify would only waste time
        return False
    # 10**100 or nested powers can make simplify run for minutes
    return not re.search(r"\*\*\s*\(?\s*\d{3,}", expr) and expr.count("**") <= 3


def _parse(expr: str):
    import sympy
    from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    # every single letter is a plain symbol: never sympy's E, I, N, S, O, Q functions/constants
    names = {c: sympy.Symbol(c) for c in set(re.findall(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])", expr))}
    names.update(sqrt=sympy.sqrt, pi=sympy.pi, oo=sympy.oo)
    return parse_expr(expr, local_dict=names, global_dict={"__builtins__": {}, **_sympy_globals()},
                      transformations=standard_transformations + (implicit_multiplication_application,))


def _sympy_globals() -> dict:
    import sympy
    return {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational, "Symbol": sympy.Symbol}


def sympy_equal(given: str, truth: str) -> bool:
    """True when sympy simplifies `given - truth` to 0 (or, for constants, to within 1e-9 relative)."""
    a, b = latex_to_expr(given), latex_to_expr(truth)
    if a is None or b is None or not _safe(a) or not _safe(b):
        return False
    try:
        import sympy
        ea, eb = _parse(a), _parse(b)
        diff = sympy.simplify(ea - eb)
        if diff == 0:
            return True
        if diff.free_symbols:
            return False
        scale = max(1.0, abs(float(sympy.N(ea))), abs(float(sympy.N(eb))))
        return abs(complex(sympy.N(diff))) <= 1e-9 * scale
    except Exception:  # ImportError, parse errors, zoo/nan: not provably equal
        return False
