"""Weight publication: version v is written as a complete HF checkpoint (safetensors + config + tokenizer)
to `run_dir/weights/v{v}`, atomically (written to a temp dir, then renamed), so a reader never sees a
half-written version. Only the newest `keep` versions stay on disk, except pinned ones.

Pins: a version due for evaluation (a multiple of eval.eval_interval) is published with a pin file
`weights/pins/v{v}`, created before the version becomes visible; pruning never deletes a pinned version, and
the eval worker (actors/eval_worker.py) deletes the pin once it has evaluated it. So an eval never loses its
weights to `keep_weight_versions`, however far it falls behind.

With update_weight_mode=broadcast, `BroadcastPublisher` also sends each version straight into the run's
engines (async_rl.weight_broadcast) before it is written to disk; the disk copy stays the source for
evals, restarted engines and generators that attach later. `send(model, v)` sends an HF model's state dict (the
torch learner); `send_tensors(named, v, device)` sends HF-named tensors (the Megatron learner's rank 0, after
the TP/PP gather), staging each bucket onto `device` when the tensors sit on the host and the group is NCCL.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path


def pin_path(root: Path, version: int) -> Path:
    """`weights/pins/v{version}` (a folder of its own, so readers that list weights/v* never see pins)."""
    return Path(root) / "pins" / f"v{version}"


def publish(model, tokenizer, run_dir: str | Path, version: int, keep: int, pin: bool = False) -> Path:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per version floods the learner's log
    root = Path(run_dir) / "weights"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version}"
    tmp = root / f".v{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if pin:
        pin_path(root, version).parent.mkdir(exist_ok=True)
        pin_path(root, version).write_text(json.dumps({"pinned_by": "learner", "time": time.time()}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep)
    return final


class HFExport:
    """What `publish` needs of a model, for HF-named tensors (the Megatron gather, a tensor handover's host
    snapshot): save_pretrained() writing config.json (+ the source's generation_config.json) and safetensors."""

    def __init__(self, state_dict: dict, hf_config, source_dir: str | Path):
        self.state_dict, self.hf_config, self.source_dir = state_dict, hf_config, Path(source_dir)

    def save_pretrained(self, path: str, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.hf_config.save_pretrained(str(out))
        generation = self.source_dir / "generation_config.json"
        if generation.exists():
            shutil.copy(generation, out / "generation_config.json")
        # tied weights share storage; safetensors refuses shared tensors, so each gets its own bytes
        save_file({k: v.contiguous() for k, v in self.state_dict.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` versions; pinned versions stay (and do not count against `keep`)."""
    versions = sorted((int(p.name[1:]), p) for p in root.glob("v*") if p.name[1:].isdigit())
    for version, path in versions[:-keep]:
        if not pin_path(root, version).exists():
            shutil.rmtree(path, ignore_errors=True)


def eval_pin(cfg, version: int) -> bool:
    """Is `version` one the eval worker will evaluate (so it must outlive keep_weight_versions)?"""
    interval = cfg.eval.eval_interval
    return bool(interval) and version % interval == 0


def engine_urls(cfg, run_dir: str | Path) -> list[str]:
    """The engines of the run: rollout_external_engine_addrs, else those the launcher wrote to engines.json."""
    addrs = cfg.rollout.rollout_external_engine_addrs
    if addrs:
        return [(a if str(a).startswith("http") else f"http://{a}").rstrip("/") for a in addrs]
    specs = Path(run_dir) / "engines.json"
    if not specs.exists():
        raise FileNotFoundError(f"update_weight_mode=broadcast: {specs} is missing (the launcher writes it when it "
                                f"starts the engines); set rollout.rollout_external_engine_addrs, or use "
                                f"update_weight_mode=disk")
    return [d["url"].rstrip("/") for d in json.loads(specs.read_text())]


def _staging(base, device):
    """`base` (a WeightBroadcaster class) whose buckets are copied onto `device` right before each broadcast."""
    class Staging(base):
        def _broadcast(self, part) -> None:
            super()._broadcast([(name, t.to(device)) for name, t in part])
    return Staging


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BroadcastPublisher:
    """The learner's side of update_weight_mode=broadcast. Joins the engines' process group on first use; a
    failed update (an engine died or was restarted) is logged, the group is dropped, and the next version
    forms a new one: meanwhile the version still reaches disk, and generators load it from there for any
    engine that missed the broadcast."""

    def __init__(self, cfg, run_dir: str | Path, log=None, timeout: float | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        # seconds an engine call or a collective may take (a broadcast to an engine that died waits this long)
        self.timeout = timeout or max(60.0, cfg.cluster.startup_timeout)
        self.log = log or (lambda m: print(m, flush=True))
        self.broadcaster = None
        self.attempt = 0
        self.failures = 0
        self.sent = 0
        self.last_seconds = 0.0
        self.last_buckets = 0  # buckets of the last successful broadcast

    def _connect(self, backend: str, stage_on=None):
        from async_rl.weight_broadcast import WeightBroadcaster
        from async_rl.endpoints import advertised_host
        host = advertised_host(self.cfg.cluster)  # engines on other hosts rendezvous here
        self.attempt += 1
        cls = WeightBroadcaster if stage_on is None else _staging(WeightBroadcaster, stage_on)
        b = cls(engine_urls(self.cfg, self.run_dir), host, _free_port(self.cfg.cluster.host), backend=backend,
                group_name=f"learner_weights_{os.getpid()}_{self.attempt}",
                ranks_per_engine=self.cfg.rollout.rollout_num_gpus_per_engine, timeout=self.timeout)
        b.connect()
        return b

    def send(self, model, version: int) -> bool:
        """Broadcast `model`'s weights as `version` to every engine; True when all of them hold it."""
        return self.send_tensors(model.state_dict().items(), version)

    def send_tensors(self, named_tensors, version: int, device=None) -> bool:
        """Broadcast (HF name, tensor) pairs as `version` to every engine, in update_weight_buffer_size
        buckets; True when all of them hold it. `device`: where the collective runs (a CUDA device: NCCL,
        each bucket copied there just before it is sent, so at most one bucket is on the device at a time);
        None: where the tensors are."""
        import torch

        from async_rl.weight_broadcast import WeightSyncError
        r = self.cfg.rollout
        params = list(named_tensors)
        if not params:
            raise ValueError(f"broadcast of v{version}: no tensors to send")
        held = params[0][1].device
        device = held if device is None else torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        stage_on = device if device != held and device.type == "cuda" else None
        t0 = time.perf_counter()
        try:
            if self.broadcaster is None:
                self.broadcaster = self._connect(backend, stage_on)
            pause = None if r.interrupt_mode == "none" else r.interrupt_mode
            n_buckets = self.broadcaster.update(params, weight_version=version,
                                                bucket_bytes=r.update_weight_buffer_size, pause_mode=pause)
        except (WeightSyncError, RuntimeError, OSError) as e:
            self.failures += 1
            self.log(f"learner: broadcast of v{version} failed ({e}); engines get it from disk, the next "
                     f"version forms a new group")
            self.close()
            return False
        self.last_seconds = time.perf_counter() - t0
        self.last_buckets = n_buckets
        self.sent += 1
        if self.sent == 1 or self.sent % 100 == 0:
            self.log(f"learner: broadcast v{version} to {len(self.broadcaster.urls)} engine(s) in "
                     f"{self.last_seconds:.3f}s ({self.sent} broadcasts, {self.failures} failed)")
        return True

    def close(self) -> None:
        if self.broadcaster is not None:
            try:
                self.broadcaster.close()
            except Exception:  # noqa: BLE001  (an engine may be gone; the group is dropped either way)
                pass
            self.broadcaster = None
