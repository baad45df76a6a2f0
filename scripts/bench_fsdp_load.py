"""Host memory of loading the FSDP learner's model at N ranks (learners/fsdp.py `sharded_from_pretrained`):
only rank 0 reads the checkpoint (the default) vs every rank reading all of it, side by side in one run.

Builds a random Qwen2 checkpoint of about `--params-m` million parameters (fp32) in a temp dir, then for each
mode starts `torchrun --nproc-per-node N` (gloo, CPU) whose ranks load and shard it and report their peak
resident memory (ru_maxrss) and the load time; prints a table.

    .venv/bin/python scripts/bench_fsdp_load.py [--ranks 2] [--layers 12] [--hidden 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rank_main(model_dir: str, every: bool, out: str) -> None:
    import torch

    from learners import fsdp
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    device = torch.device("cpu")
    rank, world = fsdp.init(device)
    t0 = time.perf_counter()
    model = fsdp.sharded_from_pretrained(model_dir, device, bf16=False, rank0_load=not every)
    torch.distributed.barrier()
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = torch.tensor([peak / 1024, (peak - base) / 1024, took], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(world)]
    torch.distributed.all_gather(rows, row)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters()) * world  # shards' sizes add up to the whole
        Path(out).write_text(json.dumps({"params": n, "rows": [r.tolist() for r in rows]}))
    torch.distributed.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", nargs=3, help=argparse.SUPPRESS)  # model_dir every out: one rank (torchrun)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.rank[0], args.rank[1] == "1", args.rank[2])
        return 0
    from async_rl import tiny
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny.build_model(Path(tmp) / "m", hidden_size=args.hidden, num_layers=args.layers, num_heads=16,
                                 num_kv_heads=4, intermediate_size=4 * args.hidden)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        print(f"checkpoint: {size:.0f} MiB fp32, {args.ranks} ranks (gloo, CPU)")
        print(f"| mode | rank | peak RSS MiB | growth while loading MiB | load s |\n|---|---|---|---|---|")
        result = {}
        for every in (False, True):
            out = Path(tmp) / f"{every}.json"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
                            "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "--rank", str(model),
                            "1" if every else "0", str(out)], check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            data = json.loads(out.read_text())
            result[every] = data["rows"]
            for r, (peak, growth, took) in enumerate(data["rows"]):
                print(f"| {'every rank reads' if every else 'rank 0 reads'} | {r} | {peak:.0f} | {growth:.0f} | "
                      f"{took:.2f} |")
        other = [row[1] for row in result[False][1:]]
        every = [row[1] for row in result[True][1:]]
        print(f"ranks 1..{args.ranks - 1}, growth while loading: rank-0 reads / every rank reads = "
              f"{sum(other) / max(sum(every), 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
