"""The multi-rank learner under `--cluster ray`: one Ray actor per learner rank (the torch learner's FSDP2 ranks,
megatron's ranks), where the local launcher runs one `torchrun --standalone`.

Each rank actor runs `python -m learners.torch_learner` (or learners.megatron.learner) itself, with the
environment torchrun would give it: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (rank 0's
node), MASTER_PORT (free on that node, picked there), plus LEARNER_RANKS_ENV (so the torch learner shards and
joins the process group, learners/fsdp.py) and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME naming the interface
that carries its node's address (a node with several interfaces would otherwise pick one by its hostname).
On GPUs each rank takes one GPU of its node's bundle, and CUDA_VISIBLE_DEVICES lists the GPUs of its node's
ranks in local-rank order, so `cuda:LOCAL_RANK` is its own.

Placement: the learner's bundles come first, one per node (cluster.actor_num_nodes), each holding
train.actor_num_gpus_per_node ranks: rank r is in bundle r // actor_num_gpus_per_node.

`RankedProc` is the part of `subprocess.Popen` the launcher reads, over every rank: it ends when any rank ends
non-zero (then the others are stopped: they would wait in a collective) or when every rank ended 0. Ray
never restarts a rank; the supervisor respawns the whole learner (every rank, a new MASTER_PORT) with --resume.
Logs: run_dir/logs/learner.log for rank 0, learner.rank{r}.log for rank r.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

from async_rl.launch.ray_procs import PolledProc, ProcessActor, RayProc
from async_rl.placement import LEARNER_RANKS_ENV

IFNAME_ENVS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
DONE_GRACE = 60.0  # once rank 0 ended 0, how long the others may take to end too before they are stopped


def rank_name(rank: int) -> str:
    return "learner" if rank == 0 else f"learner.rank{rank}"


def rank_of(name: str) -> int:
    """The rank of a rank actor's name ("learner" is rank 0)."""
    return int(name.rsplit(".rank", 1)[1]) if ".rank" in name else 0


def rank_bundles(nodes: int, per_node: int) -> list[int]:
    """The learner bundle of each rank: `per_node` ranks in each of `nodes` bundles, rank r in r // per_node."""
    return [r // per_node for r in range(nodes * per_node)]


def interface_of(ip: str) -> str | None:
    """The name of this host's interface that has IPv4 address `ip` (None when none has it)."""
    import fcntl
    import socket
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


class RankActor(ProcessActor):
    """A ProcessActor placed before its command is complete: `where()` tells the launcher its node (and, on
    rank 0, a port free there) so that every rank's environment can name rank 0's address; `begin()` starts it."""

    def __init__(self):
        self.proc, self.returncode, self.stopping = None, None, False

    def where(self, port: bool) -> dict:
        import ray

        from async_rl.endpoints import free_port
        ip = ray.util.get_node_ip_address()
        return {"node_ip": ip, "node_id": ray.get_runtime_context().get_node_id(), "ifname": interface_of(ip),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "port": free_port(ip) if port else 0,
                "set": [k for k in IFNAME_ENVS if k in os.environ]}  # the operator's choice stands

    def begin(self, name: str, argv: list[str], log: str, env: dict, cwd: str, nice: int) -> None:
        ProcessActor.__init__(self, name, argv, log, env, cwd, [], nice, False)


def rank_envs(spots: list[dict]) -> list[dict]:
    """Each rank's torch.distributed environment, from where every rank's actor is (`RankActor.where`)."""
    world, master = len(spots), spots[0]
    envs = []
    for r, spot in enumerate(spots):
        local = [q for q in range(world) if spots[q]["node_id"] == spot["node_id"]]
        env = {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local.index(r)),
               "LOCAL_WORLD_SIZE": str(len(local)), "MASTER_ADDR": master["node_ip"],
               "MASTER_PORT": str(master["port"]), LEARNER_RANKS_ENV: str(world)}
        if spot["ifname"]:
            env.update({k: spot["ifname"] for k in IFNAME_ENVS if k not in spot["set"]})
        gpus = [g for q in local for g in spots[q]["gpus"]]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        envs.append(env)
    return envs


def start_ranks(name: str, argv: list[str], world: int, place, log_dir, env: dict, cwd: str, nice: int,
                timeout: float) -> "RankedProc":
    """Start `argv` as `world` rank actors placed by `place(rank name) -> Ray actor options`. Raises
    RuntimeError (with what Ray said) when they cannot be placed within `timeout` seconds."""
    import ray
    names = [name if r == 0 else f"{name}.rank{r}" for r in range(world)]
    actors = [ray.remote(RankActor).options(max_restarts=0, max_task_retries=0, **place(n)).remote() for n in names]
    try:
        spots = ray.get([a.where.remote(r == 0) for r, a in enumerate(actors)], timeout=timeout)
        envs = rank_envs(spots)
        ray.get([a.begin.remote(n, list(argv), str(log_dir / f"{n}.log"), {**env, **e}, cwd, nice)
                 for a, n, e in zip(actors, names, envs)], timeout=90)
        return RankedProc(name, [RayProc(n, a) for n, a in zip(names, actors)])
    except Exception as exc:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise RuntimeError(f"{world} rank actor(s): {exc}") from None


class RankedProc(PolledProc):
    """`subprocess.Popen`'s pid, poll, wait, send_signal and returncode over the ranks (RayProcs) of one
    learner; pid, node_ip and node_id are rank 0's."""

    def __init__(self, name: str, ranks: list[RayProc]):
        self.name, self.ranks, self.returncode, self.restarts = name, ranks, None, 0
        self.actor, self.failed, self._done_at = ranks[0].actor, None, None

    pid = property(lambda self: self.ranks[0].pid)
    node_ip = property(lambda self: self.ranks[0].node_ip)
    node_id = property(lambda self: self.ranks[0].node_id)

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        codes = [p.poll() for p in self.ranks]
        bad = [(p, c) for p, c in zip(self.ranks, codes) if c not in (None, 0)]
        if bad:
            self.failed = bad[0][0]
            self._stop_rest(grace=5.0)
            self.returncode = bad[0][1]
        elif all(c == 0 for c in codes):
            self.returncode = 0
        elif codes[0] == 0:  # rank 0 is done: the others follow at once, or are stopped
            self._done_at = self._done_at or time.monotonic()
            if time.monotonic() - self._done_at > DONE_GRACE:
                self._stop_rest(grace=5.0)
                self.returncode = 0
        return self.returncode

    def _stop_rest(self, grace: float) -> None:
        import ray
        alive = [p for p in self.ranks if p.returncode is None]
        try:
            ray.get([p.actor.stop.remote(grace) for p in alive], timeout=grace + 20)
        except Exception:  # an actor that died meanwhile took its child with it (PR_SET_PDEATHSIG)
            pass
        for p in alive:
            p.poll()
            if p.returncode is None:
                p.returncode = -signal.SIGTERM

    def send_signal(self, sig: int) -> None:
        for p in self.ranks:
            if p.poll() is None:
                p.send_signal(sig)

    def tail(self, lines: int = 20) -> str:
        """The log tail of the rank that failed (rank 0's while none has)."""
        import ray
        rank = self.failed or self.ranks[0]
        try:
            return f"({rank.name})\n" + ray.get(rank.actor.tail.remote(lines), timeout=10)
        except Exception:
            return f"({rank.name}: its actor is gone; see its log)"
