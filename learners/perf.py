"""Where a learner step's wall time goes: `perf/phase/*` seconds per step in metrics.jsonl.

Phases: sample_wait (SAMPLE round trip, including waiting for the hub to have a batch), build (the batch
from the groups, onto the device), score (logp_old, reference logprobs, critic values), update (the policy
and critic steps, optimizer included), publish (weight publication; `perf/publish/*` splits it where the
publication mode reports parts) and `perf/compiles` (torch.compile graphs compiled during the step: a
recompile for a new shape shows there). On a GPU each phase ends with a device synchronisation, so a
phase's time is its own device work; the step ends with host reads of its metrics anyway.

`ASYNC_RL_PROFILE_STEP=N` runs learner step N under torch.profiler and prints its table of kernels (by
device time) to the learner's log.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

import torch


class Phases:
    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def take(self) -> dict:
        out = {f"perf/phase/{k}_s": v for k, v in self.seconds.items()}
        self.seconds = {}
        out["perf/compiles"] = compiled_graphs()
        return out


def compiled_graphs() -> int:
    """torch.compile graphs compiled so far in this process (0 when dynamo was never used)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["stats"]["unique_graphs"]) if dynamo is not None else 0


def profile_step(step: int):
    """A torch.profiler context for the step named by ASYNC_RL_PROFILE_STEP, else a no-op context."""
    wanted = os.environ.get("ASYNC_RL_PROFILE_STEP")
    if wanted is None or int(wanted) != step:
        return contextlib.nullcontext()
    return _Profile(step)


class _Profile:
    def __init__(self, step: int):
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        self.cuda = cuda
        self.step = step
        self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(*exc)
        events = self.prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e6 if self.cuda else 0.0
        print(f"PROFILE learner step {self.step}: wall {time.perf_counter() - self.t0:.3f} s (profiled), device "
              f"busy {busy:.3f} s", flush=True)
        print(events.table(sort_by="self_device_time_total" if self.cuda else "self_cpu_time_total", row_limit=25,
                           max_name_column_width=70), flush=True)
        return False
