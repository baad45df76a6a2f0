"""`update_weight_mode=tensor`: each version goes to the engines on the learner's machine as handles to a
staging copy on the learner's device (async_rl/weight_tensor.py), and to disk in a background thread.

Order of one publication (`TensorPublisher.publish`), all inside the learner step except the disk write:
copy the HF-named weights into the staging buffer; pause the engines (per interrupt_mode); each engine
copies the buffer; the learner announces the version to the hub (VERSION, with the path the version will
have on disk); the engines continue. So no token of version v+1 exists before the hub knows v+1 (the hub
refuses groups ahead of its version), and every engine of the run serves v+1 when the next step starts.

The disk copy (evals, restarted engines, late joiners) is written by `DiskWriter` from a host snapshot,
every version, in order. It may lag the announcement: a generator whose engine missed the handover and
finds the announced path not written yet retries (actors/engine_fleet.py). The learner waits for the
writer only when it is `max_pending` versions behind, at checkpoints and at the end of the run.
"""
from __future__ import annotations

import queue
import shutil
import threading
import time
from pathlib import Path

import torch

from async_rl import protocol
from learners.weights import publish


def version_path(run_dir: str | Path, version: int) -> Path:
    """Where `learners.weights.publish` puts `version`."""
    return Path(run_dir) / "weights" / f"v{version}"


class StateExport:
    """What `learners.weights.publish` needs of a model: save_pretrained() writing config + safetensors
    of HF-named CPU tensors."""

    def __init__(self, named: dict[str, torch.Tensor], hf_config, source_dir: str | Path):
        self.named, self.hf_config, self.source_dir = named, hf_config, Path(source_dir)

    def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(str(out))
        generation = self.source_dir / "generation_config.json"
        if generation.exists():
            shutil.copy(generation, out / "generation_config.json")
        # tied weights share storage; safetensors refuses shared tensors, so each gets its own bytes
        save_file({k: v.contiguous() for k, v in self.named.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})


class DiskWriter:
    """Writes published versions to disk in a thread, from host snapshots (pinned on a GPU), in order."""

    def __init__(self, run_dir, tokenizer, hf_config, source_dir, keep: int, max_pending: int = 2):
        self.run_dir, self.tokenizer, self.keep = Path(run_dir), tokenizer, keep
        self.hf_config, self.source_dir = hf_config, source_dir
        self.free: queue.Queue = queue.Queue()
        self.todo: queue.Queue = queue.Queue()
        self.max_pending, self.buffers = max_pending, 0
        self.error: BaseException | None = None
        self.written, self.last_seconds = 0, 0.0
        self.thread = threading.Thread(target=self._run, name="disk-writer", daemon=True)
        self.thread.start()

    def _snapshot_buffer(self, staging):
        from async_rl.weight_tensor import Staging

        if self.buffers < self.max_pending:
            self.buffers += 1
            return Staging(staging.named(), "cpu", pin=staging.device.type == "cuda")
        return self.free.get()  # the writer is max_pending versions behind: wait for it

    def submit(self, staging, version: int, pin: bool) -> float:
        """Snapshot `staging` (async_rl.weight_tensor.Staging) as `version`; returns seconds waited."""
        self._raise()
        t0 = time.perf_counter()
        buf = self._snapshot_buffer(staging)
        waited = time.perf_counter() - t0
        event = None
        if staging.device.type == "cuda":  # copied on a side stream: the training stream does not wait for it
            side = self.stream = getattr(self, "stream", None) or torch.cuda.Stream(staging.device)
            side.wait_stream(torch.cuda.current_stream(staging.device))
            with torch.cuda.stream(side):
                for dt, flat in staging.flats.items():
                    buf.flats[dt].copy_(flat, non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            staging.reads_done = event  # the next fill of `staging` waits for this copy
        else:
            for dt, flat in staging.flats.items():
                buf.flats[dt].copy_(flat)
        self.todo.put((buf, version, pin, event))
        return waited

    def _run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            buf, version, pin, event = item
            try:
                if event is not None:
                    event.synchronize()
                t0 = time.perf_counter()
                publish(StateExport(dict(buf.named()), self.hf_config, self.source_dir), self.tokenizer,
                        self.run_dir, version, self.keep, pin=pin)
                self.last_seconds, self.written = time.perf_counter() - t0, self.written + 1
            except BaseException as e:  # noqa: BLE001 (raised in the learner at its next publication)
                self.error = self.error or e
            finally:
                self.free.put(buf)
                self.todo.task_done()

    def flush(self) -> None:
        """Wait until every submitted version is on disk."""
        self.todo.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing a weight version to disk failed: {self.error}") from self.error

    def close(self) -> None:
        self.flush()
        self.todo.put(None)
        self.thread.join(timeout=60)


class TensorPublisher:
    """The learner's side of update_weight_mode=tensor (see the module docstring)."""

    def __init__(self, cfg, run_dir, tokenizer, hf_config, log=None):
        from learners.weights import engine_urls

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.log = log or (lambda m: print(m, flush=True))
        self.urls = engine_urls(cfg, run_dir)
        self.writer = DiskWriter(run_dir, tokenizer, hf_config, cfg.ckpt.hf_checkpoint, cfg.ckpt.keep_weight_versions)
        self.staging = None
        self.updater = None
        self.failures, self.sent = 0, 0
        self.timings: dict[str, float] = {}

    def publish(self, named, version: int, pin: bool, announce) -> bool:
        """Hand `named` (HF name -> tensor) to the engines as `version`, call `announce(path)` while they are
        paused, queue the disk copy; False (nothing announced, nothing queued) when an engine failed: the
        caller then publishes through disk."""
        from async_rl.weight_tensor import Staging, TensorUpdateError, TensorUpdater

        t0 = time.perf_counter()
        named = list(named.items())
        if self.staging is None or not self.staging.matches(named):
            self.staging = Staging(named, named[0][1].device)
        self.staging.fill(named)
        t1 = time.perf_counter()
        path = version_path(self.run_dir, version)
        r = self.cfg.rollout
        try:
            if self.updater is None:
                self.updater = TensorUpdater(self.urls, timeout=max(60.0, self.cfg.cluster.startup_timeout))
            pause = None if r.interrupt_mode == "none" else r.interrupt_mode
            hub_s = []

            def announce_timed():
                t = time.perf_counter()
                announce(path)
                hub_s.append(time.perf_counter() - t)
            self.updater.update(self.staging, version, pause, before_continue=announce_timed)
        except (TensorUpdateError, OSError) as e:
            self.failures += 1
            self.log(f"learner: handing v{version} to the engines failed ({e}); publishing it through disk")
            return False
        t2 = time.perf_counter()
        waited = self.writer.submit(self.staging, version, pin)
        self.sent += 1
        self.timings = {"stage_s": t1 - t0, "engines_s": t2 - t1 - sum(hub_s), "hub_s": sum(hub_s),
                        "disk_wait_s": waited, "snapshot_s": time.perf_counter() - t2 - waited,
                        "disk_write_s": self.writer.last_seconds}
        if self.sent == 1 or self.sent % 100 == 0:
            self.log(f"learner: handed v{version} ({self.staging.nbytes / 2**20:.0f} MiB) to {len(self.urls)} "
                     f"engine(s) in {t2 - t0:.3f}s ({self.sent} versions, {self.failures} failed)")
        return True

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.updater is not None:
            self.updater.close()


def hand_over(learner, named: dict, version: int, hf_config, pin: bool) -> bool:
    """A learner's (learners.torch_learner.TorchLearner's) publication of `version` by tensor handover,
    announcing it to the learner's hub; its TensorPublisher is made at first use (engines.json exists then)."""
    if learner.tensor is None:
        learner.tensor = TensorPublisher(learner.cfg, learner.run_dir, learner.tokenizer, hf_config)

    def announce(path) -> None:
        learner.hub.request(protocol.Version(version=version, weights_path=str(path)), timeout=30)
    return learner.tensor.publish(named, version, pin, announce)
