"""Benchmark the buffer hub against raw ZeroMQ, side by side in one run, on loopback.

    python scripts/bench_buffer.py                 # ~2 min
    python scripts/bench_buffer.py --seconds 5 --memory-groups 20000
    python scripts/bench_buffer.py --baseline HEAD~3   # also the hub's code at a commit, side by side
    python scripts/bench_buffer.py --cpu               # server CPU and page faults per PUT (+ the hub at capacity)
    python scripts/bench_buffer.py --ab put --baseline HEAD~3 --repeat 30 --seconds 0.25   # one path, A/B
    python scripts/bench_buffer.py --in-process --repeat 7 --baseline HEAD~3   # the hub's own work, no sockets

Every row is measured once per round, all rows back to back, `--repeat` rounds. "vs raw" is the median over
rounds of the row's rate over the raw rate of the same round (paired: a slow spell of the machine, shared
with other jobs, slows both), with the lowest and highest such ratio; msgs/s is the median rate.
`--baseline REF` runs a second hub from the buffer/ and async_rl/{wire,types}.py of commit REF (every
other file as checked out), with the same client, after each hub of the working tree.

Payload: one group of one 2k-token trajectory (100 prompt + 2000 response ids, logprobs, versions:
~25 kB raw). Every path is one request in flight at a time (round-trip bound), client and server pinned
to different cores, the client encoding every message the same way:
- raw: a bare ROUTER that answers every message with a small reply (the floor of the transport); for the
  SAMPLE rows also shaped as SAMPLE: a small request, one group back as a BATCH, decoded by the client
- decode + keep: a bare ROUTER that also cuts out, checks and keeps each group as the hub does (the floor
  of any hub in Python: its own logic, accounting and log excluded)
- PUT+ACK: the hub storing the group (in memory; and with the WAL at each fsync policy)
- SAMPLE+ACK: the hub handing one stored group to a learner and taking the ack of the previous one
- memory: hub RSS growth per stored group vs the group's raw array bytes
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from async_rl import config as C  # noqa: E402
from async_rl import wire  # noqa: E402
from async_rl.hub_client import HubClient  # noqa: E402
from async_rl.types import Group, Trajectory  # noqa: E402

RAW_SERVER = """
import sys, zmq, os
os.sched_setaffinity(0, [0])
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
while True:
    ident, payload = s.recv_multipart()
    s.send_multipart([ident, b"ok" * 32])
"""

# the floor of the SAMPLE path: a small request in, one group (as a BATCH) back, which the client decodes as a
# learner's client does; the reply is encoded once, at start
RAW_BATCH_SERVER = """
import sys, zmq, os
os.sched_setaffinity(0, [0])
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, os.path.join(sys.argv[2], "scripts"))
from async_rl import wire
from bench_buffer import make_group
reply = wire.encode({"type": "BATCH", "rid": "r", "version": 0, "weights_path": "", "lease": "0" * 19,
                     "groups": [make_group(1)], "knob_version": 0, "knobs": {}, "stats": {}})
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
while True:
    ident, payload = s.recv_multipart()
    s.send_multipart([ident, reply])
"""

# the floor of any hub written in Python: receive, cut the group out and check it as the hub does, reply,
# then keep a copy of it (as the hub does: the copy into fresh memory happens after the reply); no table,
# no accounting, no log
KEEP_SERVER = """
import sys, zmq, os
os.sched_setaffinity(0, [0])
sys.path.insert(0, sys.argv[2])
from async_rl import wire
from async_rl.types import PackedGroup
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
kept = []
while True:
    ident, payload = s.recv_multipart()
    group = PackedGroup.from_wire(wire.decode(payload, packed=("groups",))["groups"][0])
    s.send_multipart([ident, b"ok" * 32])
    kept.append(group.own())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_group(seq: int, prompt: int = 100, response: int = 2000) -> dict:
    t = Trajectory(np.arange(prompt, dtype=np.int32), np.arange(response, dtype=np.int32) % 50000,
                   -np.random.rand(response).astype(np.float32), np.zeros(response, np.int32), reward=1.0)
    return Group("bench", seq, seq, "x", [t]).to_wire()


RAW_BYTES = (100 + 2000) * 4 + 2000 * 4 + 2000 * 4


HUB_FILES = ("async_rl/wire.py", "async_rl/types.py")  # with buffer/*: what --baseline takes from REF


def baseline_tree(ref: str, tmp: Path) -> Path:
    """A source tree that is the working tree except buffer/ and HUB_FILES, which come from commit `ref`."""
    root = tmp / "baseline"
    for pkg in ("async_rl", "buffer"):
        (root / pkg).mkdir(parents=True)
        for f in (ROOT / pkg).glob("*.py"):
            (root / pkg / f.name).symlink_to(f)
    for pkg in ("actors", "learners"):
        (root / pkg).symlink_to(ROOT / pkg)
    listed = subprocess.run(["git", "ls-tree", "--name-only", ref, "buffer/"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    for rel in [*listed, *HUB_FILES]:
        target = root / rel
        target.unlink(missing_ok=True)
        target.write_bytes(subprocess.run(["git", "show", f"{ref}:{rel}"], cwd=ROOT, check=True,
                                          capture_output=True).stdout)
    return root


def start_hub(tmp: Path, state: str | None, fsync: str, src: Path = ROOT,
              capacity: int = 0) -> tuple[subprocess.Popen, str]:
    data = tmp / "p.jsonl"
    data.write_text('{"input": "1+1=", "label": "2"}\n')
    cfg_path = tmp / f"c-{fsync}.yaml"
    C.save(C.load(None, [f"prompt_data={data}", "rollout_batch_size=1", "n_samples_per_prompt=1", "advantage_estimator=reinforce_plus_plus",
                         "max_staleness=1000000", f"fsync={fsync}", "snapshot_interval=1000000000",
                         "num_rollout=100000000", f"capacity={capacity}"]), cfg_path)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "buffer.service", "--config", str(cfg_path), "--bind", endpoint]
    if state:
        args += ["--state-dir", state]
    proc = subprocess.Popen(args, cwd=src, stdout=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, [0]))
    client = HubClient(endpoint, "probe")
    client.stats(timeout=30)
    client.close()
    return proc, endpoint


COST: dict[str, list[tuple[float, float]]] = {}  # label -> [(server CPU us per message, page faults per message)]


def _usage(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system, all threads) and minor page faults of process `pid` so far."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"), int(f[7])


def rate(fn, seconds: float, max_calls: int | None = None, server: tuple[str, int] | None = None) -> float:
    """Calls of fn per second; with server=(label, pid), also that process's CPU and page faults per call."""
    before = _usage(server[1]) if server else None
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and (max_calls is None or n < max_calls):
        fn(n)
        n += 1
    if server and n:
        cpu, faults = _usage(server[1])
        COST.setdefault(server[0], []).append(((cpu - before[0]) / n * 1e6, (faults - before[1]) / n))
    return n / (time.perf_counter() - t0)


def bench_raw_batched(seconds: float, per_msg: int) -> float:
    """Raw round trips carrying `per_msg` groups each (the generator's multi-group PUT), in groups/s."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER, endpoint])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    groups = [make_group(i) for i in range(64)]

    def one(i):
        sock.send(wire.encode({"type": "PUT", "groups": [{**groups[(i + j) % 64], "seq": i * per_msg + j}
                                                         for j in range(per_msg)], "stats": {}, "rid": str(i)}))
        sock.recv()
    try:
        rate(one, 0.5)
        return rate(one, seconds) * per_msg
    finally:
        sock.close()
        proc.kill()


def bench_hub_batched(seconds: float, per_msg: int, tmp: Path, src: Path = ROOT) -> float:
    proc, endpoint = start_hub(tmp, None, "never", src)
    client = HubClient(endpoint, "bench")
    groups = [make_group(i) for i in range(64)]

    def one(i):
        client.request({"type": "PUT", "groups": [{**groups[(i + j) % 64], "seq": i * per_msg + j}
                                                  for j in range(per_msg)], "stats": {}}, timeout=30)
    try:
        return rate(one, seconds) * per_msg
    finally:
        client.close()
        proc.terminate()
        proc.wait()


def bench_raw(seconds: float) -> float:
    """The raw round trip on a server of its own (the WAL rounds' reference)."""
    run = running_raw(RAW_SERVER)
    try:
        return rate(run.put, seconds)
    finally:
        run.close()


def bench_hub(seconds: float, state: str, fsync: str, tmp: Path, src: Path = ROOT) -> tuple[float, float]:
    """PUT+ACK, then SAMPLE+ACK of what was stored, on a hub of its own (the WAL rows)."""
    shutil.rmtree(state, ignore_errors=True)
    run = running_hub(tmp, src, state=state, fsync=fsync)
    try:
        put = alternate({f"PUT {fsync}": (run, "put")}, 1, seconds)[f"PUT {fsync}"][0]
        return put, alternate({f"SAMPLE {fsync}": (run, "sample")}, 1, seconds)[f"SAMPLE {fsync}"][0]
    finally:
        run.close()


class Running:
    """A server kept running through every round, with the client calls the rounds time."""

    def __init__(self, proc: subprocess.Popen, put, sample=None, close=None):
        self.proc, self.put, self.sample, self._close = proc, put, sample, close
        self.calls = {"put": 0, "sample": 0}  # PUT keys count on across bursts; a hub's SAMPLE never outruns PUT
        self.holds = False  # a hub: SAMPLE takes what PUT stored

    def close(self) -> None:
        if self._close:
            self._close()
        self.proc.terminate()
        self.proc.wait()


def running_raw(server: str) -> Running:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", server, endpoint, str(ROOT)])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    groups = [make_group(i) for i in range(64)]

    def put(i):  # the same client work as a hub PUT (encode the group), minus the hub
        sock.send(wire.encode({"type": "PUT", "groups": [{**groups[i % 64], "seq": i}], "stats": {}, "rid": str(i)}))
        sock.recv()

    def sample(i):  # the same client work as a learner's SAMPLE (encode the request, decode the batch)
        sock.send(wire.encode({"type": "SAMPLE", "learner_id": "L", "num_groups": 1, "version": 0, "ack_lease": None,
                               "rid": str(i)}))
        wire.decode(sock.recv())
    run = Running(proc, put, sample, close=sock.close)
    rate(sample if server is RAW_BATCH_SERVER else put, 0.5)  # connected and warm
    return run


def running_hub(tmp: Path, src: Path, capacity: int = 0, state: str | None = None, fsync: str = "never") -> Running:
    proc, endpoint = start_hub(tmp, state, fsync, src, capacity)
    client = HubClient(endpoint, "bench")
    groups = [make_group(i) for i in range(64)]
    lease = None

    def sample(_):
        nonlocal lease
        reply = client.request({"type": "SAMPLE", "learner_id": "L", "num_groups": 1, "version": 0,
                                "ack_lease": lease}, timeout=30)
        lease = reply["lease"]
    def put(i):  # a raw map, as running_raw sends (HubClient.put would also build the Group's map)
        client.request({"type": "PUT", "groups": [{**groups[i % 64], "seq": i}], "stats": {}}, timeout=30)
    run = Running(proc, put, sample, client.close)
    run.holds = True
    return run


def alternate(rows: dict[str, tuple[Running, str]], rounds: int, burst: float) -> dict[str, list[float]]:
    """Rate of each row's call ("put" or "sample" of its server) in `rounds` bursts of `burst` seconds, the
    rows taking turns (a rotated order each round), every server running throughout: a row and the raw
    row of the same round see the same machine. PUT keys keep counting up across bursts."""
    runs: dict[str, list[float]] = {label: [] for label in rows}
    labels = list(rows)
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            server, call = rows[label]
            start = server.calls[call]
            left = server.calls["put"] - server.calls["sample"] if call == "sample" and server.holds else None

            def one(i, server=server, call=call, fn=getattr(server, call)):
                fn(start + i)
                server.calls[call] = start + i + 1
            if left == 0:  # a SAMPLE row whose hub has handed out all it stored: no rate this round
                runs[label].append(float("nan"))
                continue
            runs[label].append(rate(one, burst, max_calls=left, server=(label, server.proc.pid)))
    return runs


RAW_SAMPLE = "raw round trip shaped as SAMPLE (small request, one group back, decoded)"


def in_memory_rows(args, tmp: Path, hubs: list[tuple[str, Path]]) -> dict[str, list[float]]:
    """The in-memory rows, measured by `alternate` (PUT rows first, then SAMPLE from what they stored)."""
    servers = {"raw": running_raw(RAW_SERVER), "keep": running_raw(KEEP_SERVER),
               "raw batch": running_raw(RAW_BATCH_SERVER)}
    try:
        put = {"raw DEALER/ROUTER round trip": (servers["raw"], "put"),
               "server that only decodes, checks and keeps each group (no hub logic)": (servers["keep"], "put")}
        sample = {"raw DEALER/ROUTER round trip": (servers["raw"], "put"), RAW_SAMPLE: (servers["raw batch"], "sample")}
        for tag, src in hubs:
            servers[tag] = running_hub(tmp, src)
            servers["cap" + tag] = running_hub(tmp, src, capacity=1000)
            put[f"hub, in memory: PUT+ACK{tag}"] = (servers[tag], "put")
            put[f"hub at capacity 1000 (memory reused): PUT+ACK{tag}"] = (servers["cap" + tag], "put")
            sample[f"hub, in memory: SAMPLE+ACK{tag}"] = (servers[tag], "sample")
        runs = alternate(put, args.repeat, args.seconds)
        for label, values in alternate(sample, args.repeat, args.seconds).items():
            runs.setdefault(label, []).extend(values)  # raw: paired with each SAMPLE round as well
        return runs
    finally:
        for server in servers.values():
            server.close()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_memory(n_groups: int, tmp: Path, src: Path = ROOT) -> float:
    proc, endpoint = start_hub(tmp, None, "never", src)
    client = HubClient(endpoint, "mem")
    try:
        before = rss_kb(proc.pid)
        for i in range(n_groups):
            client.request({"type": "PUT", "groups": [make_group(i)], "stats": {}}, timeout=30)
        time.sleep(0.5)
        return (rss_kb(proc.pid) - before) * 1024 / n_groups / RAW_BYTES
    finally:
        client.close()
        proc.terminate()
        proc.wait()


def ab_table(args, tmp: Path, hubs: list[tuple[str, Path]]) -> int:
    """Only raw, this hub and the --baseline hub, on one path: PUT into a growing table (--ab put), PUT at
    capacity 1000 (--ab put-capacity), PUT with the WAL at fsync=never (--ab put-wal) or SAMPLE (--ab sample: after PUT rounds that fill the tables; raw is
    then the SAMPLE-shaped round trip)."""
    if len(hubs) != 2:
        raise SystemExit("--ab needs --baseline REF: it compares this hub with the one at REF")
    capacity = 1000 if args.ab == "put-capacity" else 0
    wal = (lambda name: str(tmp / name)) if args.ab == "put-wal" else (lambda name: None)
    servers = {"raw": running_raw(RAW_BATCH_SERVER if args.ab == "sample" else RAW_SERVER),
               "after": running_hub(tmp, hubs[0][1], capacity, wal("wal-after")),
               "before" + hubs[1][0]: running_hub(tmp, hubs[1][1], capacity, wal("wal-before"))}
    try:
        call = "sample" if args.ab == "sample" else "put"
        if call == "sample":  # fill the hubs
            alternate({k: (v, "put") for k, v in servers.items() if k != "raw"}, args.repeat, args.seconds * 1.5)
        runs = alternate({k: (v, call) for k, v in servers.items()}, args.repeat, args.seconds)
    finally:
        for server in servers.values():
            server.close()
    print(f"--ab {args.ab}: {args.repeat} rounds of {args.seconds} s\n\n| server | msgs/s | vs raw (median, range) |"
          f"\n|---|---|---|")
    for label, values in runs.items():
        print(f"| {label} | {statistics.median(values):,.0f} | {paired(values, runs['raw'])} |")
    before = [v for k, v in runs.items() if k.startswith("before")][0]
    print(f"\nafter / before, per round: {paired(runs['after'], before)}")
    return 0


def cost_table(args, tmp: Path, hubs: list[tuple[str, Path]]) -> int:
    runs = in_memory_rows(args, tmp, hubs)
    print(f"{args.repeat} rounds of {args.seconds} s; server CPU (user + system, all threads) and minor page "
          f"faults per message, median over rounds\n")
    print("| server | msgs/s | vs raw (median, range) | CPU per message | page faults per message |\n"
          "|---|---|---|---|---|")
    for label, values, ratio in with_refs(runs, args.repeat):
        cpu = statistics.median(c for c, _ in COST[label.split(" [vs")[0]])
        faults = statistics.median(f for _, f in COST[label.split(" [vs")[0]])
        print(f"| {label} | {statistics.median(v for v in values if v == v):,.0f} | {ratio} | "
              f"{cpu:.0f} us | {faults:.2f} |")
    return 0


def with_refs(runs: dict[str, list[float]], rounds: int):
    """(label, values, ratio to the raw row it is measured against) for every row. A SAMPLE row is shown
    against the SAMPLE-shaped raw round trip (same bytes, same client decode) and against the PUT-shaped one."""
    raw, raw8 = runs["raw DEALER/ROUTER round trip"], runs.get("raw, 8 groups per message (groups/s)")
    for label, values in runs.items():
        if label == RAW_SAMPLE:
            yield label + " [vs the PUT-shaped raw]", values, paired(values, raw[rounds:])
        elif "in memory: SAMPLE" in label:
            yield label, values, paired(values, runs[RAW_SAMPLE])
            yield label + " [vs the PUT-shaped raw]", values, paired(values, raw[rounds:])
        else:
            ref = (raw8 if "8 groups" in label else runs.get("raw DEALER/ROUTER round trip (WAL rounds)")
                   if "WAL" in label else raw)
            yield label, values, paired(values, ref)


def paired(values: list[float], raw: list[float]) -> str:
    """Median of the per-round ratios to raw, and their range."""
    ratios = [v / r for v, r in zip(values, raw) if v == v]  # (nan: a round without this row)
    return f"{statistics.median(ratios):.0%} ({min(ratios):.0%}-{max(ratios):.0%})"


IN_PROCESS = """
import sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from async_rl import config as C, wire
from buffer.durable import DurableLog
from buffer.hub import Hub
from bench_buffer import make_group
tmp = Path(tempfile.mkdtemp())
(tmp / "p.jsonl").write_text('{"input": "1+1=", "label": "2"}\\n')
N, pc = 2500, time.perf_counter


def hub(capacity, wal=False):
    cfg = C.load(None, [f"prompt_data={tmp / 'p.jsonl'}", "rollout_batch_size=1", "n_samples_per_prompt=1", "advantage_estimator=reinforce_plus_plus",
                        "max_staleness=1000000", "num_rollout=100000000", "snapshot_interval=1000000000",
                        f"capacity={capacity}"])
    log = DurableLog(tempfile.mkdtemp(dir=tmp), "never") if wal else None
    if log is not None:
        log.recover()
    return Hub(cfg, [{"input": "1+1=", "label": "2"}], log)


puts = [wire.encode({"type": "PUT", "groups": [{**make_group(i % 64), "seq": i}], "stats": {}, "rid": str(i)})
        for i in range(N)]
sample = wire.encode({"type": "SAMPLE", "learner_id": "L", "num_groups": 1, "version": 0, "rid": "r"})


def put_round(h):  # what the hub loop does per PUT: decode, handle, flush, encode (ACK sent), then settle
    early = total = 0.0
    for p in puts:
        t0 = pc()
        out = [wire.encode(r) for _, r in h.handle_early(b"g", wire.decode(p, packed=("groups",)))]
        h.flush()
        t1 = pc()
        h.settle()
        early, total = early + t1 - t0, total + pc() - t0
    return early / N * 1e6, total / N * 1e6


def sample_round(h):
    lease, t = None, 0.0
    for _ in range(N - 10):
        t0 = pc()
        msg = wire.decode(sample, packed=("groups",))
        msg["ack_lease"] = lease
        replies = h.handle_early(b"l", msg)
        out = [wire.encode(r) for _, r in replies]
        h.settle()
        t += pc() - t0
        lease = replies[0][1]["lease"]
    return t / (N - 10) * 1e6


best = {}
for _ in range(int(sys.argv[3])):
    early, total = put_round(hub(1000))
    filled = hub(0)
    put_round(filled)
    wal = put_round(hub(1000, wal=True))[1]
    for k, v in {"PUT before its ACK": early, "PUT in all": total, "PUT in all, WAL fsync=never": wal,
                 "SAMPLE+ACK": sample_round(filled)}.items():
        best[k] = min(best.get(k, 1e9), v)
print(repr(best))
"""


def in_process_table(args, hubs: list[tuple[str, Path]]) -> int:
    """The hub's server-side work per message, driven in process (no sockets): the best of --repeat runs of
    2,500 messages (capacity 1000 for PUT, so memory is reused), each hub's code in a process of its own."""
    import ast
    res = {tag: ast.literal_eval(subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(src), str(ROOT / "scripts"), str(args.repeat)], check=True,
        capture_output=True, text=True).stdout) for tag, src in hubs}
    print(f"in process, best of {args.repeat} runs of 2,500 messages, us per message\n")
    print("| work | " + " | ".join(f"hub{tag}" for tag in res) + " |\n|---|" + "---|" * len(res))
    for key in res[""]:
        print(f"| {key} | " + " | ".join(f"{r[key]:.1f}" for r in res.values()) + " |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--memory-groups", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3, help="rounds: every row once per round")
    ap.add_argument("--wal-rounds", type=int, default=3,
                    help="rounds of the rows that start a hub per measurement (WAL, 8 groups per message)")
    ap.add_argument("--baseline", default=None, help="git ref: also bench the hub's code at that commit")
    ap.add_argument("--cpu", action="store_true",
                    help="only the single-group PUT paths, with the server's CPU and page faults per message "
                         "(also the hub at capacity 1000, where each PUT evicts one group and memory is reused)")
    ap.add_argument("--ab", choices=("put", "put-capacity", "put-wal", "sample"), default=None,
                    help="only raw, this hub and the --baseline hub on one path, for a tighter comparison")
    ap.add_argument("--in-process", action="store_true",
                    help="the hub's own work per PUT / SAMPLE, driven in process without sockets (best of --repeat)")
    ap.add_argument("--quick", action="store_true",
                    help="only raw, decode+keep and the in-memory hub (no WAL rows, no 8-group rows, no memory)")
    args = ap.parse_args()
    os.sched_setaffinity(0, [1])
    tmp = Path(tempfile.mkdtemp(prefix="bench_buffer-"))
    hubs = [("", ROOT)] + ([(f" [{args.baseline}]", baseline_tree(args.baseline, tmp))] if args.baseline else [])
    runs: dict[str, list[float]] = {}

    def keep(label: str, value: float) -> None:
        runs.setdefault(label, []).append(value)

    paths = (("hub, in memory", None, "never"), ("hub + WAL, fsync=never", "never", "never"),
             ("hub + WAL, fsync=batch", "batch", "batch"), ("hub + WAL, fsync=always", "always", "always"))
    if args.in_process:
        return in_process_table(args, hubs)
    if args.ab:
        return ab_table(args, tmp, hubs)
    if args.cpu:
        return cost_table(args, tmp, hubs)
    runs.update(in_memory_rows(args, tmp, hubs))
    if not args.quick:
        for _ in range(args.wal_rounds):
            keep("raw, 8 groups per message (groups/s)", bench_raw_batched(args.seconds, 8))
            for tag, src in hubs:
                for label, state, fsync in paths[1:]:
                    put, sample = bench_hub(args.seconds, str(tmp / state), fsync, tmp, src)
                    keep(f"{label}: PUT+ACK{tag}", put)
                    keep(f"{label}: SAMPLE+ACK{tag}", sample)
                keep(f"hub, in memory: PUT of 8 groups per message, as generators send (groups/s){tag}",
                     bench_hub_batched(args.seconds, 8, tmp, src))
            keep("raw DEALER/ROUTER round trip (WAL rounds)", bench_raw(args.seconds))
    mem = {} if args.quick else {tag: bench_memory(args.memory_groups, tmp, src) for tag, src in hubs}
    print(f"payload: 1 trajectory, 2k tokens, {RAW_BYTES} raw bytes; one request in flight; {args.repeat} rounds "
          f"of {args.seconds} s ({args.wal_rounds} of the WAL and 8-group rows)\n")
    print("| path | msgs/s | vs raw (median, range) |\n|---|---|---|")
    for label, values, ratio in with_refs(runs, args.repeat):
        print(f"| {label} | {statistics.median(v for v in values if v == v):,.0f} | {ratio} |")
    for tag, m in mem.items():
        print(f"\nhub{tag} memory per stored group: {m:.2f}x its raw array bytes ({args.memory_groups} groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
