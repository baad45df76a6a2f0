"""Shared helpers of the buffer tests: a chi-square goodness-of-fit check without scipy (not installed).

The critical value is the Wilson–Hilferty approximation of the chi-square quantile,
`df * (1 - 2/(9 df) + z * sqrt(2/(9 df)))**3`, with z the standard normal quantile of the significance
level. At p = 0.001 it is within 1.4% of tabulated values for df >= 4 (df=4: 18.72 vs 18.47; df=9: 28.06
vs 27.88; df=99: 148.29 vs 148.23) and always slightly above them, i.e. a hair conservative;
`test_selectors.test_chi2_critical_matches_tables` pins that. The tests are seeded, so they are
deterministic; p = 0.001 is the margin that keeps a correct sampler passing under any reasonable seed
while still rejecting a sampler that is off by a few percent at the sample sizes used (checked by the
tests' negative controls).
"""
from __future__ import annotations

import contextlib
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

Z_P001 = 3.090232306167813  # standard normal quantile at 1 - 0.001


def chi2_critical(df: int, z: float = Z_P001) -> float:
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(counts, probs) -> tuple[float, int]:
    """Pearson's statistic of observed `counts` against `probs`; cells of probability 0 must be empty
    (they are checked exactly, not statistically) and are left out of the degrees of freedom."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()
    zero = probs == 0
    assert counts[zero].sum() == 0, f"sampled a zero-probability cell: {counts[zero]}"
    expected = counts.sum() * probs[~zero]
    assert expected.min() >= 5, "too few draws for a chi-square test (expected count < 5 in some cell)"
    stat = float(((counts[~zero] - expected) ** 2 / expected).sum())
    return stat, int((~zero).sum()) - 1


def frequencies_match(counts, probs) -> bool:
    stat, df = chi2_statistic(counts, probs)
    return stat < chi2_critical(df)


@pytest.fixture
def chi2():
    """`chi2(counts, probs)` -> True when the counts fit the probabilities at p = 0.001."""
    return frequencies_match


@pytest.fixture
def chi2_critical_value():
    """`chi2_critical_value(df)`: the p = 0.001 critical value used by `chi2`."""
    return chi2_critical


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def hub_service(tmp_path: Path, cfg_path: Path, keys: Path | None = None):
    """A real hub process (`python -m buffer.service`) on a fixed port and state dir: yields (start, endpoint);
    `start()` (re)starts it (after a SIGKILL it recovers from its WAL) and waits for its endpoint file. Every
    process started is killed on exit."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "buffer.service", "--config", str(cfg_path), "--bind", endpoint,
           "--state-dir", str(tmp_path / "hub"), "--endpoint-file", str(tmp_path / "ep"),
           *(["--keys", str(keys)] if keys else [])]
    procs = []

    def start():
        (tmp_path / "ep").unlink(missing_ok=True)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 30
        while not (tmp_path / "ep").exists():
            assert procs[-1].poll() is None and time.time() < deadline
            time.sleep(0.05)
        return procs[-1]
    try:
        yield start, endpoint
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
