"""SumTree: prefix-sum search, growth, batch updates equal to scalar ones, and float drift over millions of
updates (none, by construction; the drift check still repairs a corrupted tree)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from buffer.sum_tree import SumTree


def internal_equals_rebuilt(tree: SumTree) -> bool:
    """True if every internal node is exactly what a fresh bottom-up rebuild gives."""
    twin = SumTree(tree.capacity)
    twin._tree[twin.capacity:] = tree.leaves()
    twin.rebuild()
    return np.array_equal(twin._tree[1:], tree._tree[1:])


def test_update_total_get_and_prefix_search():
    tree = SumTree(8)
    for i, v in enumerate([1.0, 2.0, 3.0, 0.0, 4.0]):
        tree.update(i, v)
    assert tree.total() == 10.0 and tree.get(2) == 3.0 and tree.get(100) == 0.0
    # prefix sums: [0,1) -> 0, [1,3) -> 1, [3,6) -> 2, leaf 3 has no mass, [6,10) -> 4
    for u, leaf in [(0.0, 0), (0.999, 0), (1.0, 1), (2.5, 1), (3.0, 2), (5.99, 2), (6.0, 4), (9.99, 4)]:
        assert tree.find(u) == leaf, u


def test_rejects_bad_priorities_and_indices():
    tree = SumTree(4)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="priority"):
            tree.update(0, bad)
    with pytest.raises(IndexError):
        tree.update(-1, 1.0)
    with pytest.raises(ValueError, match="total is 0"):
        tree.find(0.0)
    with pytest.raises(ValueError):
        SumTree(0)


def test_grows_by_doubling_and_keeps_leaves():
    tree = SumTree(2)
    tree.update(0, 1.5)
    tree.update(1, 2.5)
    tree.update(5, 4.0)
    assert tree.capacity == 8
    assert [tree.get(i) for i in range(8)] == [1.5, 2.5, 0, 0, 0, 4.0, 0, 0]
    assert tree.total() == 8.0 and internal_equals_rebuilt(tree)
    tree.update_many([40], [1.0])
    assert tree.capacity == 64 and tree.total() == 9.0


def test_search_never_lands_on_a_zero_leaf_after_huge_values_are_zeroed():
    # With delta propagation, zeroing 1e15-sized leaves leaves residues of ~0.1 in their ancestors, far
    # above the 1e-6 leaves that remain, and the search would land on zeroed leaves.
    rng = np.random.default_rng(0)
    tree = SumTree(1024)
    tree.update_many(np.arange(1024), rng.uniform(0, 1e15, 1024))
    for i in rng.permutation(1024)[:1000]:
        tree.update(int(i), 0.0)
    alive = [i for i in range(1024) if tree.get(i) > 0]
    for i in alive:
        tree.update(i, 1e-6 * (1 + rng.random()))
    assert internal_equals_rebuilt(tree)
    total = tree.total()
    edges = [0.0, np.nextafter(total, 0.0), total * (1 - 1e-16)] + list(rng.random(5000) * total)
    assert all(tree.get(tree.find(u)) > 0 for u in edges)


def test_update_many_is_exactly_the_scalar_updates_in_order():
    rng = np.random.default_rng(1)
    a, b = SumTree(256), SumTree(256)
    for _ in range(50):
        idx = rng.integers(0, 300, 64)  # repeats, and indices past capacity (growth)
        val = rng.exponential(size=64) * (rng.random(64) > 0.3)
        a.update_many(idx, val)
        for i, v in zip(idx, val):
            b.update(int(i), float(v))
        assert np.array_equal(a._tree, b._tree)


def test_no_drift_over_millions_of_updates():
    """2.2M updates over 6 decades of magnitude: the root stays the correctly rounded sum of the leaves to
    within depth * eps, the tree stays bit-identical to a fresh rebuild, and the drift check never fires."""
    rng = np.random.default_rng(2)
    tree = SumTree(4096, check_every=10_000)
    exponents = (-6.0, 6.0)
    for chunk in range(100):
        for _ in range(10):  # 2,000,000 batched updates
            idx = rng.integers(0, 4096, 2000)
            tree.update_many(idx, 10.0 ** rng.uniform(*exponents, 2000) * (rng.random(2000) > 0.1))
        for i, v in zip(rng.integers(0, 4096, 2000), 10.0 ** rng.uniform(*exponents, 2000)):
            tree.update(int(i), float(v))  # 200,000 scalar updates
        exact = math.fsum(tree.leaves())
        assert abs(tree.total() - exact) <= 13 * np.finfo(float).eps * exact, chunk
    assert tree.updates == 2_200_000
    assert tree.checks == 2_200_000 // 10_000
    assert tree.rebuilds == 0
    assert internal_equals_rebuilt(tree)


def test_drift_check_rebuilds_a_corrupted_tree_within_check_every_updates():
    tree = SumTree(8, check_every=100)
    tree.update_many(np.arange(8), np.arange(1.0, 9.0))
    assert not tree.check_drift()  # restarts the count of updates since the last check
    tree._tree[3] += 1.0  # a bit flip in the right half: updates to leaf 0 never touch node 3
    for k in range(99):
        tree.update(0, float(k))
    assert tree.rebuilds == 0 and tree.total() != math.fsum(tree.leaves())
    tree.update(0, 1.0)  # the 100th update since the last check triggers it
    assert tree.rebuilds == 1 and tree.total() == math.fsum(tree.leaves())
    assert internal_equals_rebuilt(tree)
    assert not tree.check_drift() and tree.rebuilds == 1


def test_drift_check_catches_a_positive_total_over_zero_leaves():
    tree = SumTree(4)
    tree.update(0, 1.0)
    tree.update(0, 0.0)
    tree._tree[1] = 5e-324  # under rtol * the 1e-300 floor, so only the sign test catches it
    assert tree.check_drift() and tree.total() == 0.0


def test_sample_frequencies_match_leaves(chi2):
    rng = np.random.default_rng(3)
    tree = SumTree(16)
    leaves = np.array([0.5, 1, 0, 2, 3, 0, 5, 8, 0.25, 13], dtype=float)
    tree.update_many(np.arange(len(leaves)), leaves)
    counts = np.bincount([tree.sample(rng) for _ in range(30_000)], minlength=len(leaves))
    assert chi2(counts, leaves)
    assert not chi2(counts, leaves ** 1.2)  # negative control: the test can tell a wrong distribution


def test_find_many_walks_exactly_like_find():
    rng = np.random.default_rng(4)
    tree = SumTree(64)
    tree.update_many(np.arange(50), rng.exponential(size=50) * (rng.random(50) > 0.4))
    total = tree.total()
    us = np.concatenate([rng.random(2000) * total, [0.0, np.nextafter(total, 0.0)],
                         np.cumsum([tree.get(i) for i in range(50)])[:-1]])  # every leaf boundary
    assert tree.find_many(us).tolist() == [tree.find(float(u)) for u in us]
    assert tree.find_many([]).tolist() == []
