"""rm_type=f1: token-level F1 between the response and the label, with SQuAD's answer normalization.

Guarantees (SQuAD v2's official scorer): both texts are lower-cased, stripped of punctuation and of the
articles a/an/the, and split on whitespace; F1 = 2PR/(P+R) over the multiset of shared tokens; when either
side has no tokens the score is 1.0 if both are empty else 0.0. A list label holds several gold answers and
the best F1 among them counts. The result lies in [0, 1].
"""
from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)


def normalize_text(text: str) -> str:
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, gold: str) -> tuple[float, float, float]:
    """(f1, precision, recall) of `prediction` against one gold answer."""
    pred, ref = normalize_text(prediction).split(), normalize_text(gold).split()
    if not pred or not ref:
        same = float(pred == ref)
        return same, same, same
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall), precision, recall


def f1_reward(prompt: str, response: str, label) -> float:
    """rm_type=f1: best token F1 of the response against the label (or any label of a list)."""
    golds = label if isinstance(label, (list, tuple)) else [label]
    return max((f1_score(response, str(gold))[0] for gold in golds), default=0.0)
