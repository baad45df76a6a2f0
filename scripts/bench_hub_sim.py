"""Simulate the buffer hub under many generators: its CPU per group and where it saturates.

    python scripts/bench_hub_sim.py                               # 100 and 1,000 generators, ~3 min
    python scripts/bench_hub_sim.py --generators 1000 --rates 0,1000,4000 --seconds 5

A real hub process (`python -m buffer.service`, in memory or with `--state-dir`) on core 0; on core 1,
`--procs` simulator processes multiplex the generators, each with its own DEALER socket (its own ROUTER
peer, with ZMTP heartbeats) that runs the generator's protocol: ACQUIRE credits and prompts, "generate"
for an exponential time that makes all generators together offer `rate` groups/s, PUT the groups (real
payload: `--n-samples` trajectories of `--response-tokens` tokens each, `--groups-per-put` per message),
wait for the ACK, ACQUIRE again; plus a HEARTBEAT every `--heartbeat` seconds. A learner (this process)
SAMPLEs batches of `--batch` groups, acks them and publishes a version per batch, so credits flow as in a
run. Per (generators, offered rate): groups/s the hub accepted, the hub's CPU (utime + stime from /proc,
all its threads) as a share of one core and per group, and PUT->ACK latency seen by the generators.
A level is saturated when the hub accepts < 90% of the offered rate while using > 85% of its core (below
the offered rate with a hub to spare means the simulators, on one core, fell behind); rate 0 = heartbeats
only. The machine's other processes share both cores, so treat the numbers as +-15%.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from async_rl import config as C  # noqa: E402
from async_rl import wire  # noqa: E402
from async_rl.hub_client import HubClient  # noqa: E402
from async_rl.types import Group, Trajectory  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_cpu_s(pid: int) -> float:
    """utime + stime of every thread of `pid` (the hub's ZeroMQ I/O thread included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


# ---- one simulator process ---------------------------------------------------------------------------
def simulate(args) -> None:
    """Run `args.gens` generators until `args.until` (time.time()), then print a JSON summary."""
    os.sched_setaffinity(0, [1])
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, args.gens + 64)
    rng = random.Random(args.seed)
    n, resp, prompt = args.n_samples, args.response_tokens, 64
    traj = Trajectory(np.arange(prompt, dtype=np.int32), np.arange(resp, dtype=np.int32) % 1000,
                      -np.random.default_rng(args.seed).random(resp).astype(np.float32),
                      np.zeros(resp, np.int32), reward=1.0)
    template = Group("", 0, 0, "x", [traj] * n).to_wire()
    packer = msgpack.Packer(use_bin_type=True)
    tail = b"".join(packer.pack(k) + wire.pack_value(template[k]) for k in ("label", "prompt_text", "meta", "trajectories"))

    def group_bytes(gid: str, seq: int, prompt_index: int) -> wire.Packed:
        """The group's wire bytes with its arrays packed once (the simulators' own CPU stays small)."""
        return wire.Packed(packer.pack_map_header(7) + packer.pack("generator_id") + packer.pack(gid) +
                           packer.pack("seq") + packer.pack(seq) + packer.pack("prompt_index") +
                           packer.pack(prompt_index) + tail)
    socks, gens = [], []
    poller = zmq.Poller()
    for i in range(args.gens):
        gid = f"sim{args.proc}-{i}"
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, gid.encode())
        s.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        s.connect(args.endpoint)
        poller.register(s, zmq.POLLIN)
        socks.append(s)
        gens.append({"gid": gid, "seq": 0, "acq": 0, "prompts": [], "sent_at": 0.0, "due": time.time()})
    index = {s: i for i, s in enumerate(socks)}
    per_gen_rate = args.rate / max(1, args.total_gens)
    events: list[tuple[float, int, str]] = []  # (when, generator, what)
    now = time.time()
    for i in range(args.gens):  # start and heartbeat phases spread over one period each
        heapq.heappush(events, (now + rng.random() * min(1.0, args.heartbeat), i, "acquire" if args.rate > 0 else "none"))
        heapq.heappush(events, (now + rng.random() * args.heartbeat, i, "heartbeat"))
    latencies, groups_acked, errors, rid = [], 0, 0, 0
    measure_from = args.measure_from
    while True:
        now = time.time()
        if now >= args.until:
            break
        while events and events[0][0] <= now:
            _, i, what = heapq.heappop(events)
            g, s = gens[i], socks[i]
            rid += 1
            if what == "heartbeat":
                s.send(wire.encode({"type": "HEARTBEAT", "generator_id": g["gid"]}))
                heapq.heappush(events, (now + args.heartbeat, i, "heartbeat"))
            elif what == "acquire":
                s.send(wire.encode({"type": "ACQUIRE", "generator_id": g["gid"], "acquire_seq": g["acq"],
                                    "max_groups": args.groups_per_put, "rid": f"a{rid}"}))
            elif what == "put":
                groups = []
                for p in g["prompts"]:
                    groups.append(group_bytes(g["gid"], g["seq"], p["prompt_index"]))
                    g["seq"] += 1
                g["sent_at"] = now
                s.send(wire.encode({"type": "PUT", "groups": groups, "rid": f"p{rid}",
                                    "stats": {"gen_tokens": n * resp * len(groups), "busy_s": 0.0}}))
        timeout = 50 if not events else max(0, min(50, int((events[0][0] - time.time()) * 1000)))
        for s, _ in poller.poll(timeout):
            i = index[s]
            g = gens[i]
            reply = wire.decode(s.recv())
            kind, t = reply.get("type"), time.time()
            if kind == "GRANT":
                g["acq"] += 1
                g["prompts"] = reply["prompts"]
                # open loop: PUTs are due at exponential intervals from the last due time (not from this
                # GRANT), so all generators together offer args.rate groups/s unless the hub holds them back
                g["due"] = max(t, g["due"] + rng.expovariate(per_gen_rate / len(g["prompts"])))
                heapq.heappush(events, (g["due"], i, "put"))
            elif kind == "ACK":
                if g["sent_at"] >= measure_from:
                    latencies.append(t - g["sent_at"])
                    groups_acked += len(reply["keys"])
                heapq.heappush(events, (t, i, "acquire"))
            elif kind == "ERROR":
                errors += 1
                print(f"sim: hub error {reply.get('error')}", file=sys.stderr, flush=True)
    for s in socks:
        s.close()
    ctx.term()
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    print(json.dumps({"groups_acked": groups_acked, "puts": len(latencies), "errors": errors,
                      "lat_ms": sorted(lat.tolist())}), flush=True)


# ---- the driver --------------------------------------------------------------------------------------
def start_hub(tmp: Path, args) -> tuple[subprocess.Popen, str]:
    data = tmp / "p.jsonl"
    data.write_text("".join(f'{{"input": "{i}+1=", "label": "{i + 1}"}}\n' for i in range(100)))
    cfg_path = tmp / "config.yaml"
    C.save(C.load(None, [f"prompt_data={data}", f"rollout_batch_size={args.batch}",
                         f"n_samples_per_prompt={args.n_samples}", f"max_staleness={args.max_staleness}",
                         "num_rollout=100000000", f"fsync={args.fsync}", "snapshot_interval=1000000000",
                         f"heartbeat_interval={args.heartbeat}"]), cfg_path)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "buffer.service", "--config", str(cfg_path), "--bind", endpoint]
    if args.state_dir:
        cmd += ["--state-dir", str(tmp / f"hub-{time.monotonic_ns()}")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            preexec_fn=lambda: os.sched_setaffinity(0, [0]))
    probe = HubClient(endpoint, "probe")
    probe.stats(timeout=60)
    probe.close()
    return proc, endpoint


def run_level(gens: int, rate: float, args, tmp: Path) -> dict:
    proc, endpoint = start_hub(tmp, args)
    learner = HubClient(endpoint, "learner")
    procs_n = max(1, min(args.procs, gens))
    start = time.time() + 1.0 + gens / 500  # time for every simulator to connect its sockets
    measure_from = start + args.warmup
    until = measure_from + args.seconds
    sims = []
    for p in range(procs_n):
        share = gens // procs_n + (1 if p < gens % procs_n else 0)
        cmd = [sys.executable, __file__, "--simulate", "--endpoint", endpoint, "--proc", str(p),
               "--gens", str(share), "--total-gens", str(gens), "--rate", str(rate),
               "--until", str(until + 1.0), "--measure-from", str(measure_from), "--seed", str(p),
               "--n-samples", str(args.n_samples), "--response-tokens", str(args.response_tokens),
               "--groups-per-put", str(args.groups_per_put), "--heartbeat", str(args.heartbeat)]
        sims.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    lease, version, sampled, marks = None, 0, 0, []
    try:
        # the learner; the measured window is [measure_from, until] as this loop sees it (to within 0.1 s
        # + one round trip, and the hub's counters and CPU are read at both ends); the simulators go on a
        # second longer so the window never includes their shutdown
        while time.time() < until + 1.0:
            if len(marks) < 2 and time.time() >= (measure_from, until)[len(marks)]:
                marks.append((hub_cpu_s(proc.pid), learner.stats(timeout=30)["accepted"], time.time()))
            try:  # a batch when there is one, then a new version (credits for the generators)
                reply = learner.request({"type": "SAMPLE", "learner_id": "L", "num_groups": args.batch,
                                         "version": version, "ack_lease": lease}, timeout=0.1)
            except TimeoutError:
                continue
            lease = reply["lease"]
            sampled += len(reply["groups"])
            version += 1
            learner.request({"type": "VERSION", "version": version, "weights_path": "sim"}, timeout=30)
        stats = learner.stats(timeout=30)
        results = [json.loads(s.communicate(timeout=120)[0].strip().splitlines()[-1]) for s in sims]
    finally:
        for s in sims:
            if s.poll() is None:
                s.kill()
        learner.close()
        proc.terminate()
        proc.wait()
    (cpu0, acc0, t0), (cpu1, acc1, t1) = marks
    wall = t1 - t0
    accepted = acc1 - acc0
    lat = np.array(sorted(x for r in results for x in r["lat_ms"])) if any(r["lat_ms"] for r in results) else np.zeros(1)
    return {"generators": gens, "offered": rate, "accepted_per_s": accepted / wall,
            "hub_cpu_frac": (cpu1 - cpu0) / wall, "hub_cpu_us_per_group": (cpu1 - cpu0) / max(accepted, 1) * 1e6,
            "lat_p50_ms": float(np.percentile(lat, 50)), "lat_p99_ms": float(np.percentile(lat, 99)),
            "errors": sum(r["errors"] for r in results), "malformed": stats["malformed"],
            "learner_groups": sampled}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generators", default="100,1000", help="comma-separated generator counts")
    ap.add_argument("--rates", default="0,500,1000,2000,4000,8000", help="offered groups/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--procs", type=int, default=4, help="simulator processes (generators are split among them)")
    ap.add_argument("--n-samples", type=int, default=4, help="trajectories per group")
    ap.add_argument("--response-tokens", type=int, default=512)
    ap.add_argument("--groups-per-put", type=int, default=4, help="groups per ACQUIRE and per PUT")
    ap.add_argument("--batch", type=int, default=64, help="learner batch (groups) = rollout_batch_size")
    ap.add_argument("--max-staleness", type=int, default=1000000, help="large: admission never binds")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="seconds between a generator's heartbeats")
    ap.add_argument("--fsync", default="never")
    ap.add_argument("--state-dir", action="store_true", help="durable hub (WAL) instead of in memory")
    # simulator-process arguments (internal)
    ap.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("endpoint", str), ("proc", int), ("gens", int), ("total-gens", int), ("rate", float),
                       ("until", float), ("measure-from", float), ("seed", int)):
        ap.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.simulate:
        simulate(args)
        return 0
    os.sched_setaffinity(0, [1])
    tmp = Path(tempfile.mkdtemp(prefix="bench_hub_sim-"))
    group_bytes = args.n_samples * ((64 + args.response_tokens) * 4 + args.response_tokens * 8)
    print(f"group: {args.n_samples} x {args.response_tokens}-token trajectories ({group_bytes:,} bytes of arrays); "
          f"{args.groups_per_put} groups per PUT; learner batch {args.batch}; heartbeat every {args.heartbeat:g} s; "
          f"hub {'with WAL, fsync=' + args.fsync if args.state_dir else 'in memory'}\n", flush=True)
    print("| generators | offered groups/s | accepted groups/s | hub CPU (1 core) | hub CPU per group | "
          "PUT->ACK p50 / p99 | |\n|---|---|---|---|---|---|---|", flush=True)
    for gens in [int(g) for g in args.generators.split(",")]:
        for rate in [float(r) for r in args.rates.split(",")]:
            r = run_level(gens, rate, args, tmp)
            short = rate > 0 and r["accepted_per_s"] < 0.9 * rate
            saturated = short and r["hub_cpu_frac"] > 0.85
            note = "saturated (hub)" if saturated else "below offered (simulators)" if short else ""
            per_group = f"{r['hub_cpu_us_per_group']:,.0f} us" if rate > 0 else "-"
            print(f"| {gens:,} | {rate:,.0f} | {r['accepted_per_s']:,.0f} | {r['hub_cpu_frac']:.0%} | {per_group} | "
                  f"{r['lat_p50_ms']:.1f} / {r['lat_p99_ms']:.1f} ms | {note}"
                  f"{' errors ' + str(r['errors']) if r['errors'] else ''} |", flush=True)
            if saturated:
                break  # higher rates only queue more
    return 0


if __name__ == "__main__":
    sys.exit(main())
