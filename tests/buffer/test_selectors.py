"""Selectors: the shared contract, fifo/lifo/min-priority order, and seeded chi-square tests that sampled
frequencies match priority ** alpha (uniform when every priority is 0)."""
from __future__ import annotations

import collections
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.selectors import Fifo, Lifo, MinPriority, Prioritized, Uniform, make_remover, make_selector

ALL = [Fifo, Lifo, Uniform, Prioritized, MinPriority]
PRIORITIES = np.array([0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0])


def draw(selector, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [selector.sample(rng) for _ in range(n)]


def counts_of(samples: list, keys: list) -> np.ndarray:
    index = {k: i for i, k in enumerate(keys)}
    return np.bincount([index[s] for s in samples], minlength=len(keys))


def test_chi2_critical_matches_tables(chi2_critical_value):
    # tabulated chi-square quantiles at 1 - 0.001 (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.4)
    for df, table in [(4, 18.467), (6, 22.458), (9, 27.877), (19, 43.820), (99, 148.230)]:
        assert table <= chi2_critical_value(df) <= table * 1.015


# ---- the contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_contract(cls):
    sel, rng = cls(), np.random.default_rng(0)
    with pytest.raises(IndexError):
        sel.sample(rng)
    for k in range(5):
        sel.insert(("g", k), float(k + 1))
    assert len(sel) == 5 and ("g", 3) in sel
    with pytest.raises(KeyError):
        sel.insert(("g", 3), 1.0)
    sel.remove(("g", 3))
    with pytest.raises(KeyError):
        sel.remove(("g", 3))
    with pytest.raises(KeyError):
        sel.update(("g", 3), 1.0)
    assert len(sel) == 4 and ("g", 3) not in sel
    assert all(sel.sample(rng) in {("g", 0), ("g", 1), ("g", 2), ("g", 4)} for _ in range(50))
    sel.update(("g", 0), 7.0)
    sel.restore(("g", 3), 2.0)
    assert len(sel) == 5


@pytest.mark.parametrize("cls", [Prioritized, MinPriority])
def test_rejects_bad_priorities(cls):
    sel = cls()
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="priority"):
            sel.insert("k", bad)
        sel.insert("ok", 1.0)
        with pytest.raises(ValueError, match="priority"):
            sel.update("ok", bad)
        sel.remove("ok")


@settings(max_examples=60, deadline=None)
@given(cls=st.sampled_from(ALL),
       ops=st.lists(st.tuples(st.sampled_from(["insert", "remove", "update", "sample"]),
                              st.integers(0, 15), st.floats(0, 10)), max_size=80))
def test_holds_exactly_the_inserted_keys(cls, ops):
    """Random insert/remove/update/sample sequences against a model set."""
    sel, model, rng = cls(), set(), np.random.default_rng(0)
    for op, key, priority in ops:
        if op == "insert" and key not in model:
            sel.insert(key, priority)
            model.add(key)
        elif op == "remove" and key in model:
            sel.remove(key)
            model.discard(key)
        elif op == "update" and key in model:
            sel.update(key, priority)
        elif op == "sample" and model:
            assert sel.sample(rng) in model
        assert len(sel) == len(model) and all(k in sel for k in model)


# ---- order -----------------------------------------------------------------------------------------
def test_fifo_and_lifo_order_and_restore_keeps_place():
    fifo, lifo = Fifo(), Lifo()
    for k in "abcde":
        fifo.insert(k, 1.0)
        lifo.insert(k, 1.0)
    assert fifo.sample() == "a" and lifo.sample() == "e"
    taken = []
    for _ in range(3):  # take a batch out, put it back reversed, as the table does
        taken.append(fifo.sample())
        fifo.remove(taken[-1])
    for k in reversed(taken):
        fifo.restore(k, 1.0)
    assert [fifo.sample()] == ["a"] and len(fifo) == 5
    order = []
    while len(fifo):
        order.append(fifo.sample())
        fifo.remove(order[-1])
    assert order == list("abcde")


def test_min_priority_order_ties_and_updates():
    sel = MinPriority()
    for k, p in [("a", 3.0), ("b", 1.0), ("c", 1.0), ("d", 2.0)]:
        sel.insert(k, p)
    assert sel.sample() == "b"  # tie with c: b came first
    sel.update("b", 5.0)
    assert sel.sample() == "c"
    sel.remove("c")
    assert sel.sample() == "d"
    for i in range(1000):  # heavy churn exercises lazy deletion and compaction
        sel.update("a", float(i % 7))
    assert sel.sample() == "d"  # a ended at 999 % 7 = 5
    sel.update("a", 0.5)
    assert sel.sample() == "a" and len(sel._heap) <= 2 * len(sel) + 64


def test_factories_name_the_field():
    assert isinstance(make_selector("prioritized", alpha=0.5), Prioritized)
    assert isinstance(make_remover("min_priority"), MinPriority)
    with pytest.raises(ValueError, match=r"buffer.selector='heap'.*prioritized"):
        make_selector("heap")
    with pytest.raises(ValueError, match=r"buffer.remover='uniform'"):
        make_remover("uniform")


# ---- statistics ------------------------------------------------------------------------------------
def test_uniform_frequencies(chi2):
    sel = Uniform()
    for k in range(10):
        sel.insert(k, float(k))
    counts = counts_of(draw(sel, 20_000, seed=1), list(range(10)))
    assert chi2(counts, np.ones(10))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_prioritized_frequencies_match_priority_pow_alpha(chi2, alpha):
    sel, keys = Prioritized(alpha), [f"k{i}" for i in range(len(PRIORITIES))]
    for k, p in zip(keys, PRIORITIES):
        sel.insert(k, float(p))
    counts = counts_of(draw(sel, 30_000, seed=int(alpha * 10)), keys)
    assert chi2(counts, PRIORITIES ** alpha)
    wrong = PRIORITIES ** (alpha + 0.25)  # negative control: the test has power against a near miss
    assert not chi2(counts, wrong)


def test_prioritized_all_zero_is_uniform_and_zero_is_never_drawn_otherwise(chi2):
    sel, keys = Prioritized(1.0), list(range(6))
    for k in keys:
        sel.insert(k, 0.0)
    assert chi2(counts_of(draw(sel, 12_000, seed=2), keys), np.ones(6))
    sel.update(2, 1.0)
    sel.update(4, 3.0)
    counts = counts_of(draw(sel, 12_000, seed=3), keys)
    assert chi2(counts, [0, 0, 1, 0, 3, 0])  # also asserts the zero cells stayed empty


def test_prioritized_after_churn_matches_a_model(chi2):
    """Random inserts, removals and updates (slot reuse, growth): probabilities equal the model's, and the
    tree never grows past the peak number of held keys."""
    rng, sel, model = np.random.default_rng(4), Prioritized(0.7, initial_capacity=8), {}
    for step in range(5000):
        key = int(rng.integers(0, 300))
        if key in model and rng.random() < 0.5:
            sel.remove(key)
            del model[key]
        elif key in model:
            model[key] = float(rng.exponential())
            sel.update(key, model[key])
        else:
            model[key] = float(rng.exponential()) * (rng.random() > 0.1)
            sel.insert(key, model[key])
    assert sel._tree.capacity <= 512 and len(sel) == len(model)
    expected = {k: p ** 0.7 for k, p in model.items()}
    total = sum(expected.values())
    assert all(math.isclose(sel.probability(k), v / total, rel_tol=1e-9) for k, v in expected.items())
    top = sorted(model, key=lambda k: -model[k])[:8]
    for k in list(model):
        if k not in top:
            sel.remove(k)
    assert chi2(counts_of(draw(sel, 20_000, seed=5), top), [model[k] ** 0.7 for k in top])


def test_set_alpha_reweights_and_is_all_or_nothing(chi2):
    sel, keys = Prioritized(1.0), list(range(len(PRIORITIES)))
    for k, p in zip(keys, PRIORITIES):
        sel.insert(k, float(p))
    sel.remove(3)
    sel.insert(99, 1e200)
    with pytest.raises(ValueError, match="overflows"):
        sel.set_alpha(2.0)  # (1e200) ** 2 does not fit a float64
    assert sel.alpha == 1.0 and math.isclose(sel.probability(0), 0.25 / (PRIORITIES.sum() - 2.0 + 1e200))
    sel.remove(99)
    sel.set_alpha(2.0)
    with pytest.raises(ValueError, match="overflows"):
        sel.insert(99, 1e200)
    assert 99 not in sel
    live = [k for k in keys if k != 3]
    assert chi2(counts_of(draw(sel, 30_000, seed=6), live), PRIORITIES[live] ** 2)
    with pytest.raises(ValueError, match="alpha"):
        sel.set_alpha(-1.0)


def test_prioritized_take_has_the_law_of_successive_sampling(chi2):
    """P(first = i, second = j) = w_i / S * w_j / (S - w_i), for the vectorised batch path."""
    w = np.array([1.0, 2.0, 3.0, 4.0])
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    expected = [w[i] / w.sum() * w[j] / (w.sum() - w[i]) for i, j in pairs]
    rng, counts = np.random.default_rng(7), collections.Counter()
    sel = Prioritized(1.0)
    sel.vectorize_from = 1  # this test is about the vectorised path, which batches of >= 16 take
    for k in range(4):
        sel.insert(k, float(w[k]))
    for _ in range(12_000):
        got = sel.take(rng, 2)
        counts[tuple(got)] += 1
        for k in got:
            sel.insert(k, float(w[k]))
    assert chi2([counts[p] for p in pairs], expected)


def test_prioritized_take_finishes_one_by_one_when_rejection_would_stall():
    rng = np.random.default_rng(8)
    sel = Prioritized(1.0)
    sel.vectorize_from = 1
    sel.insert("heavy", 1e12)  # holds nearly all the mass: rejection alone would need ~1e12 draws
    for k in range(5):
        sel.insert(k, 1.0)
    for k in range(5, 10):
        sel.insert(k, 0.0)  # fewer positive keys than the batch: the rest comes uniformly from these
    got = sel.take(rng, 8)
    assert len(set(got)) == 8 and "heavy" in got and set(range(5)) <= set(got)
    assert len(sel) == 3 and all(k in range(5, 10) for k in sel._slot)
    with pytest.raises(IndexError):
        sel.take(rng, 4)
    sel.remove_many(list(sel._slot))
    assert len(sel) == 0 and sel._tree.total() == 0.0 and len(sel._free) == 11


@pytest.mark.parametrize("cls", ALL)
def test_take_and_remove_many_for_every_selector(cls):
    sel, rng = cls(), np.random.default_rng(9)
    for k in range(10):
        sel.insert(k, float(k))
    got = sel.take(rng, 4)
    assert len(set(got)) == 4 and len(sel) == 6 and not any(k in sel for k in got)
    sel.remove_many([k for k in range(10) if k not in got][:3])
    assert len(sel) == 3
