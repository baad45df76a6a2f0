"""Benchmark weights over the network between two simulated hosts (network namespaces on a bridge, as in
tests/multihost/), side by side in one run; needs root.

    python scripts/bench_multihost.py                    # ~3-5 min on 2 cores
    python scripts/bench_multihost.py --repeat 5 --no-attach

Rows, each measured `--repeat` times, interleaved (a slow spell of the shared machine slows all of them):
- raw TCP: the checkpoint's bytes sent by a bare socket (sendfile) on the head, received and written to a
  file on gen1: the floor of the link.
- pull (no auth) / pull (CURVE): `WeightPuller.pull` on gen1 from the weight server on the head
  (async_rl/weight_server.py): 4 MiB chunks, each checked (xxh3_64), journaled, written to gen1's local store,
  over `weight_pull.STREAMS` connections; "(CURVE, 1 stream)" over one, as before the puller used several.
  The weight server has hashed the version beforehand (it does so for each new version while idle).
"vs raw" is the median over rounds of pull seconds / raw seconds of the same round; "CPU s" the median CPU
seconds the receiver and the sender used together (the load-independent cost: the two "hosts" share cores).
Then (unless --no-attach) attach-to-first-group: a tiny run launched on the head, `async-rl attach --hub
--key` on gen1 (which cannot see the run dir), seconds from the attach command's start to the hub's ack of
its first group, as attach.json records it.
The model: a random Qwen2-shaped checkpoint of ~100M parameters (fp32 safetensors, ~400 MB), built locally.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from async_rl.weight_pull import STREAMS  # noqa: E402
from tests.multihost.hosts import Network, unavailable, wait_for  # noqa: E402

RAW_SERVER = """import os,socket,sys
path=sys.argv[2]; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[3]))); s.listen(4)
while True:
    c,_=s.accept()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), 'rb') as f:
            c.sendfile(f)
    c.close()"""
RAW_CLIENT = """import socket,sys,time
for _ in range(100):
    try: s=socket.create_connection((sys.argv[1], int(sys.argv[3]))); break
    except OSError: time.sleep(0.1)
import resource; r=resource.getrusage(resource.RUSAGE_SELF); c=r.ru_utime+r.ru_stime
t=time.perf_counter(); buf=bytearray(8<<20); m=memoryview(buf); n=0
with open(sys.argv[2], 'wb') as out:
    while True:
        k=s.recv_into(m)
        if not k: break
        out.write(m[:k]); n+=k
t=time.perf_counter()-t; r=resource.getrusage(resource.RUSAGE_SELF); print(n, r.ru_utime+r.ru_stime-c, t)"""
PULL = """import resource,shutil,sys,time
from async_rl.weight_pull import WeightPuller
dest=sys.argv[2]; shutil.rmtree(dest, ignore_errors=True)
p=WeightPuller(sys.argv[1], dest, sys.argv[3] or None, streams=int(sys.argv[4]))
r=resource.getrusage(resource.RUSAGE_SELF); c=r.ru_utime+r.ru_stime
t=time.perf_counter(); p.pull(0); s=time.perf_counter()-t
r=resource.getrusage(resource.RUSAGE_SELF); print(p.stats['bytes'], r.ru_utime+r.ru_stime-c, s)"""


def build_model(out: Path) -> int:
    from async_rl import tiny
    tiny.build_model(out, hidden_size=768, num_layers=16, num_heads=12, num_kv_heads=4, intermediate_size=2048,
                     max_positions=512)
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(host, script: list[str], server_pid: int) -> tuple[int, float, float]:
    """(bytes, wall seconds, CPU seconds of the receiver and the sender together) of one transfer."""
    before = cpu_of(server_pid)
    out = host.run([sys.executable, "-c", *script], timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    n, cpu, seconds = out.stdout.split()[-3:]
    return int(n), float(seconds), float(cpu) + cpu_of(server_pid) - before


# rows: (name, port, CURVE?, streams of the puller); "(1 stream)" is the puller before it opened several
PULLS = [("pull (no auth)", 7102, False, STREAMS), ("pull (CURVE, 1 stream)", 7101, True, 1),
         ("pull (CURVE)", 7101, True, STREAMS)]


def bench_pull(net, model: Path, keys: Path, repeat: int) -> dict:
    head, gen1 = net["head"], net["gen1"]
    raw = head.python(["-c", RAW_SERVER, head.addr, str(model), "7100"], "raw.log")
    servers = {}
    for port, curve in {(port, curve) for _, port, curve, _ in PULLS}:
        ep_file = head.workdir / f"ws{port}.endpoint"
        proc = head.python(["-m", "async_rl.weight_server", "--root", str(head.workdir / "weights"), "--initial",
                            str(model), "--bind", f"tcp://{head.addr}:{port}", "--endpoint-file", str(ep_file),
                            *(["--keys", str(keys)] if curve else [])], f"ws{port}.log")
        wait_for("weight server", ep_file.exists, 60, [proc])
        servers[port] = proc
    time.sleep(3)  # the servers hash version 0 while idle
    rows: dict[str, list[tuple[float, float]]] = {"raw TCP": [], **{p[0]: [] for p in PULLS}}
    size = 0
    for _ in range(repeat):
        size, *r = measure(gen1, [RAW_CLIENT, head.addr, str(gen1.workdir / "raw.bin"), "7100"], raw.pid)
        rows["raw TCP"].append(r)
        for name, port, curve, streams in PULLS:
            n, *r = measure(gen1, [PULL, f"tcp://{head.addr}:{port}", str(gen1.workdir / "pulled"),
                                   str(keys if curve else ""), str(streams)], servers[port].pid)
            assert n == size, (name, n, size)
            rows[name].append(r)
    out = {"bytes": size}
    for name, runs in rows.items():
        ratios = [s / r[0] for (s, _), r in zip(runs, rows["raw TCP"])]
        secs = statistics.median(s for s, _ in runs)
        out[name] = {"median_s": secs, "MB_per_s": size / secs / 1e6, "vs_raw": statistics.median(ratios),
                     "vs_raw_range": [min(ratios), max(ratios)], "cpu_s": statistics.median(c for _, c in runs)}
    return out


def bench_attach(root: Path) -> dict:
    from async_rl import tiny
    from tests.multihost.run_helpers import attach, copy_key, launch_head
    world = {"model_sft": root / "tiny", "train": tiny.build_task(root / "data", n_train=200, n_test=10)["train"]}
    tiny.build_model(world["model_sft"])
    net = Network(root / "attach-net", {"head": [], "gen1": [root / "tiny", root / "attach-net" / "head"]})
    try:
        proc, run_dir, manifest = launch_head(net["head"], world, num_rollout=400)
        key = copy_key(run_dir, net["gen1"])
        att = attach(net["gen1"], manifest["endpoints"]["hub"], key)
        record = net["gen1"].workdir / "attach" / "attach.json"
        wait_for("first attached group", lambda: record.exists() and "first_group_s" in json.loads(record.read_text()),
                 300, [att, proc])
        return json.loads(record.read_text())
    finally:
        net.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-attach", action="store_true")
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint dir to pull instead of building one")
    args = ap.parse_args()
    why = unavailable()
    if why:
        print(f"bench_multihost: {why}")
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-multihost-"))
    from async_rl.keys import create_keys
    model = args.model or root / "model100m"
    size = sum(p.stat().st_size for p in model.iterdir() if p.is_file()) if args.model else build_model(model)
    keys = create_keys(root / "keys")
    net = Network(root / "net", {"head": [], "gen1": [model]})
    try:
        pull = bench_pull(net, model, keys, args.repeat)
    finally:
        net.close()
    print(f"\nweights over the veth link: {size / 1e6:.0f} MB checkpoint, {args.repeat} rounds")
    print(f"{'row':<24}{'median s':>10}{'MB/s':>8}{'vs raw':>8}{'CPU s':>7}  range")
    for name in ("raw TCP", *(p[0] for p in PULLS)):
        r = pull[name]
        print(f"{name:<24}{r['median_s']:>10.2f}{r['MB_per_s']:>8.0f}{r['vs_raw']:>8.2f}{r['cpu_s']:>7.2f}  "
              f"{r['vs_raw_range'][0]:.2f}-{r['vs_raw_range'][1]:.2f}")
    if not args.no_attach:
        rec = bench_attach(root)
        print(f"\nattach --hub on gen1: v{rec['version']} pulled in {rec['pull_s']:.2f}s, first group acked "
              f"{rec['first_group_s']:.1f}s after `attach` started")
    return 0


if __name__ == "__main__":
    sys.exit(main())
