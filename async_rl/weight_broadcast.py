"""Weight sync by broadcast: the learner (rank 0) sends its weights straight into engines' memory over a
torch process group (gloo on CPU, NCCL on GPU), through SGLang's `/init_weights_update_group` +
`/begin_weight_update` + `/update_weights_from_distributed` + `/end_weight_update` endpoints (the embedded
engine implements the same ones). Lives in `async_rl/` because the learner may not import `actors/`.

Invariants:
- Weights go in buckets of at most `bucket_bytes` (slime's `--update-weight-buffer-size`); for each bucket
  every engine is asked (HTTP, one thread per engine) before rank 0 broadcasts, and the bucket is done only
  when every engine answered success. The new `weight_version` is sent with the last bucket only, so an
  engine reports the new version only once it holds every tensor of it.
- The group is a private one (`init_custom_process_group`), never the default group, so it coexists with
  the learner's own data-parallel group.

Use (learner side):
    b = WeightBroadcaster(engine_urls, master_address="127.0.0.1", master_port=free_port(), backend="gloo")
    b.connect()
    b.update(model.state_dict().items(), weight_version=v, bucket_bytes=cfg.rollout.update_weight_buffer_size)
"""
from __future__ import annotations

import os
import threading
from datetime import timedelta

import requests
import torch
import torch.distributed as dist

from async_rl.keys import engine_headers


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: float = 600.0):
    """A process group that is not the default one (SGLang's helper of the same name, same rendezvous:
    a TCP store at `init_method`, keys prefixed by `group_name`), so both sides of a weight sync agree."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    delta = timedelta(seconds=timeout)
    # Under torchrun (a multi-rank learner) TORCHELASTIC_USE_AGENT_STORE makes every tcp:// rendezvous a client
    # of torchrun's own store, so rank 0 would never host this group's store and the engines would wait on a
    # port nobody listens on: this group's rendezvous is ours, whoever started the process.
    agent_store = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    try:
        store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=delta))
    finally:
        if agent_store is not None:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = agent_store
    store.set_timeout(delta)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=delta)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def receive_tensors(group, names, dtypes, shapes, device="cpu") -> dict:
    """Engine side of one bucket: one broadcast from rank 0 per tensor, in order."""
    out, handles = {}, []
    for name, dtype, shape in zip(names, dtypes, shapes):
        out[name] = torch.empty(shape, dtype=dtype, device=device)
        handles.append(dist.broadcast(out[name], group_src=0, group=group, async_op=True))
    for h in handles:
        h.wait()
    return out


def buckets(named_tensors, bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of at most `bucket_bytes` each (a bigger tensor goes alone)."""
    out, current, size = [], [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > bucket_bytes:
            out.append(current)
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        out.append(current)
    return out


class WeightSyncError(RuntimeError):
    """An engine refused or failed a step of the weight sync; the message names the engine and its reply."""


class WeightBroadcaster:
    def __init__(self, engine_urls: list[str], master_address: str, master_port: int, backend: str = "gloo",
                 group_name: str = "weight_update_group", ranks_per_engine: int = 1, timeout: float = 600.0):
        self.urls = [u.rstrip("/") for u in engine_urls]
        self.master_address, self.master_port, self.backend = master_address, master_port, backend
        self.group_name, self.ranks_per_engine, self.timeout = group_name, ranks_per_engine, timeout
        self.world_size = 1 + ranks_per_engine * len(self.urls)
        self.group = None

    def _post_all(self, path: str, bodies: list[dict], during=None) -> list[dict]:
        """POST bodies[i] to engine i, all at once (each in its own thread), run `during()` (rank 0's side
        of a collective) while they are open; raise if any engine failed."""
        replies: list = [None] * len(self.urls)

        def post(i):
            try:
                resp = requests.post(self.urls[i] + path, json=bodies[i], timeout=self.timeout,
                                     headers=engine_headers())
                body = resp.json() if resp.content else {}
                replies[i] = (resp.status_code, body)
            except (requests.RequestException, ValueError) as e:
                replies[i] = (None, {"message": str(e)})
        threads = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(len(self.urls))]
        for t in threads:
            t.start()
        if during is not None:
            during()
        for t in threads:
            t.join()
        bad = [(self.urls[i], r) for i, r in enumerate(replies) if r[0] != 200 or r[1].get("success") is False]
        if bad:
            raise WeightSyncError(f"{path} failed on {len(bad)} engine(s): {bad[:3]}")
        return [r[1] for r in replies]

    def connect(self) -> None:
        body = {"master_address": self.master_address, "master_port": self.master_port,
                "world_size": self.world_size, "group_name": self.group_name, "backend": self.backend}
        bodies = [{**body, "rank_offset": 1 + i * self.ranks_per_engine} for i in range(len(self.urls))]
        init = f"tcp://{self.master_address}:{self.master_port}"

        def join():
            self.group = init_custom_process_group(self.backend, init, self.world_size, 0, self.group_name,
                                                   self.timeout)
        self._post_all("/init_weights_update_group", bodies, during=join)

    def update(self, named_tensors, weight_version: int, bucket_bytes: int, pause_mode: str | None = None) -> int:
        """Send every tensor; returns the number of buckets. `pause_mode` (abort|in_place|retract) pauses
        generation around the update (and continues it after); None leaves it to the engines (an unpaused
        SGLang waits for in-flight requests before a weight write)."""
        if self.group is None:
            raise WeightSyncError("update() before connect(): call connect() once first")
        parts = buckets([(n, t.detach()) for n, t in named_tensors], bucket_bytes)
        n = len(self.urls)
        if pause_mode:
            self._post_all("/pause_generation", [{"mode": pause_mode}] * n)
        try:
            self._post_all("/begin_weight_update", [{}] * n)
            for i, part in enumerate(parts):
                body = {"names": [k for k, _ in part], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in part],
                        "shapes": [list(t.shape) for _, t in part], "group_name": self.group_name,
                        # a cache cannot be flushed under requests paused in place (SGLang then fails the call)
                        "flush_cache": i == len(parts) - 1 and pause_mode != "in_place"}
                if i == len(parts) - 1:
                    body["weight_version"] = str(weight_version)
                self._post_all("/update_weights_from_distributed", [body] * n, during=lambda p=part: self._broadcast(p))
            self._post_all("/end_weight_update", [{}] * n)
        finally:
            if pause_mode:
                self._post_all("/continue_generation", [{}] * n)
        return len(parts)

    def _broadcast(self, part) -> None:
        handles = [dist.broadcast(t.contiguous(), group_src=0, group=self.group, async_op=True) for _, t in part]
        for h in handles:
            h.wait()

    def close(self) -> None:
        if self.group is not None:
            try:
                self._post_all("/destroy_weights_update_group", [{"group_name": self.group_name}] * len(self.urls))
            finally:
                dist.destroy_process_group(self.group)
                self.group = None
