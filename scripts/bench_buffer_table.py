"""Benchmark `buffer.table.Table.sample` in-process (no sockets): SAMPLE latency p50/p99 with 100k items held,
per selector and batch size. Each sample is followed by inserting as many fresh items, so the table stays at
its size. Every `--per-version` samples the version advances and the oldest eighth of the items goes stale:
that sweep is timed apart (`sweep us/item`), as the hub runs it on VERSION, not on SAMPLE.
Target (issue 3): p99 < 2 ms under the prioritized selector.

    python scripts/bench_buffer_table.py                          # 100k items, batches 32 and 256, ~20 s
    python scripts/bench_buffer_table.py --items 200000 --batch 64 --samples 2000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from buffer.table import Table  # noqa: E402


def bench(selector: str, items: int, batch: int, samples: int, per_version: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    versions = 8  # items spread over 8 behavior versions; one version goes stale per bump
    table = Table(selector, max_staleness=versions - 1, alpha=0.6, seed=seed)
    for i in range(items):
        table.insert(i, None, float(rng.random()), behavior_version=i * versions // items)
    version, next_key, lat, sweep_s = versions - 1, items, [], 0.0
    table.advance(version)
    for s in range(samples):
        if s and s % per_version == 0:
            version += 1
            start = time.perf_counter()
            table.advance(version)
            sweep_s += time.perf_counter() - start
        start = time.perf_counter()
        table.sample(batch, version=version)
        lat.append(time.perf_counter() - start)
        for _ in range(items - len(table)):  # refill to `items` (sampling and sweeps removed some)
            table.insert(next_key, None, float(rng.random()), behavior_version=version)
            next_key += 1
    ms, evicted = np.array(lat) * 1e3, table.counters["evicted_stale"]
    return {"selector": selector, "items": items, "batch": batch, "p50_ms": np.percentile(ms, 50),
            "p99_ms": np.percentile(ms, 99), "max_ms": ms.max(), "evicted_stale": evicted,
            "sweep_us_per_item": 1e6 * sweep_s / max(1, evicted)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--per-version", type=int, default=100, help="samples between version bumps")
    ap.add_argument("--selectors", nargs="+", default=["prioritized", "uniform", "fifo"])
    args = ap.parse_args()
    print(f"{'selector':<12} {'items':>8} {'batch':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'evicted':>8} {'sweep us/item':>14}")
    for selector in args.selectors:
        for batch in args.batch:
            r = bench(selector, args.items, batch, args.samples, args.per_version)
            sweep = f"{r['sweep_us_per_item']:.2f}" if r["evicted_stale"] else "-"  # fifo may evict none
            print(f"{r['selector']:<12} {r['items']:>8} {r['batch']:>6} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                  f"{r['max_ms']:>8.3f} {r['evicted_stale']:>8} {sweep:>14}", flush=True)


if __name__ == "__main__":
    main()
