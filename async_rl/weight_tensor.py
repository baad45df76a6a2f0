"""Weight handover by shared memory (`update_weight_mode=tensor`): the learner hands the engines on its own
machine handles to its weights instead of the weights, and each engine copies them into its parameters,
through the `/update_weights_from_tensor` endpoint (SGLang's name and body: `serialized_named_tensors`, one
base64 string per engine rank, each a pickled list of (name, tensor) pairs). On a GPU shared by learner and
engine the tensors travel as CUDA IPC handles, so a version costs one device-to-device copy of the weights;
on CPUs as shared-memory segments (torch's `file_system` sharing strategy). Lives in `async_rl/` because the
learner may not import `actors/`.

Invariants:
- The learner keeps one staging buffer per run (`Staging`), allocated once: each version is copied into it,
  the copy is finished (device synchronised) before any engine is asked to read it, and the learner writes
  it again only after every engine answered, so an engine never reads a half-written version.
- The engine unpickles with an allowlist (`loads`): only torch's tensor/storage rebuild functions, tensor
  and storage classes, dtypes and sizes; any other global in the payload is refused, so a request to the
  endpoint can name tensors but cannot run code.
- Pausing is the caller's: `TensorUpdater.update` pauses per `pause_mode` before the copy and continues
  after `before_continue()` ran (the learner announces the version to the hub there), so no token of the
  new version is generated before the hub knows that version.
"""
from __future__ import annotations

import base64
import io
import pickle
import threading

import requests
import torch

from async_rl.keys import engine_headers

_REBUILD_MODULE = "torch.multiprocessing.reductions"
_TORCH_CLASSES = {("torch", "Tensor"), ("torch", "Size"), ("torch.storage", "UntypedStorage"),
                  ("torch.storage", "TypedStorage"), ("torch._tensor", "Tensor")}


def dumps(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """(name, tensor) pairs as one base64 string of handles (CUDA IPC on a GPU, shared memory on CPU)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as tmp  # registers torch's reductions with ForkingPickler

    if any(t.device.type == "cpu" for _, t in named_tensors):
        tmp.set_sharing_strategy("file_system")  # a segment by name: an unrelated process can open it
    buf = io.BytesIO()
    ForkingPickler(buf).dump([(str(n), t) for n, t in named_tensors])
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module == _REBUILD_MODULE and name.startswith("rebuild_")) or (module, name) in _TORCH_CLASSES or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in serialized_named_tensors "
                                     "(only torch tensors, storages and dtypes)")


def loads(data: str) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of `dumps`; ValueError naming the problem for anything else."""
    try:
        raw = base64.b64decode(data, validate=True)
        named = _Unpickler(io.BytesIO(raw)).load()
    except Exception as e:  # noqa: BLE001 (a malformed body must never crash the engine)
        raise ValueError(f"serialized_named_tensors: cannot read it ({type(e).__name__}: {e}); send "
                         f"async_rl.weight_tensor.dumps() of (name, tensor) pairs") from None
    if not isinstance(named, list) or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                              and isinstance(p[1], torch.Tensor) for p in named):
        raise ValueError("serialized_named_tensors: must hold a list of (name, tensor) pairs")
    return named


class Staging:
    """The learner's persistent buffer of HF-named weights, one flat tensor per dtype on the learner's
    device (one IPC handle each); `fill(named)` copies a version in and waits until the copy is done."""

    def __init__(self, named_tensors, device, pin: bool = False):
        self.device = torch.device(device)
        specs = [(n, t.shape, t.dtype) for n, t in named_tensors]
        sizes: dict = {}
        for _, shape, dtype in specs:
            sizes[dtype] = sizes.get(dtype, 0) + shape.numel()
        flats = {dt: torch.empty(n, dtype=dt, device=self.device, pin_memory=pin) for dt, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        self.views: dict[str, torch.Tensor] = {}
        for name, shape, dtype in specs:
            n = shape.numel()
            self.views[name] = flats[dtype][offsets[dtype]:offsets[dtype] + n].view(shape)
            offsets[dtype] += n
        self.flats = flats
        self.reads_done = None  # a CUDA event: a copy out of this buffer that a fill must wait for
        self.nbytes = sum(f.numel() * f.element_size() for f in flats.values())

    def matches(self, named_tensors) -> bool:
        named = list(named_tensors)
        return len(named) == len(self.views) and all(
            n in self.views and self.views[n].shape == t.shape and self.views[n].dtype == t.dtype for n, t in named)

    @torch.no_grad()
    def fill(self, named_tensors) -> None:
        if self.reads_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.reads_done)
        for name, t in named_tensors:
            self.views[name].copy_(t, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def named(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.views.items())


class TensorUpdateError(RuntimeError):
    """An engine refused or failed a step of the handover; the message names the engine and its reply."""


class TensorUpdater:
    """Hands `Staging` buffers to engines at `urls` (each on the learner's machine and device)."""

    def __init__(self, urls: list[str], timeout: float = 600.0):
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.sessions = [requests.Session() for _ in self.urls]
        for session in self.sessions:  # the run's engine API key, when engines need one
            session.headers.update(engine_headers())

    def _post_all(self, path: str, body: dict) -> None:
        replies: list = [None] * len(self.urls)

        def post(i):
            try:
                resp = self.sessions[i].post(self.urls[i] + path, json=body, timeout=self.timeout)
                replies[i] = (resp.status_code, resp.json() if resp.content else {})
            except (requests.RequestException, ValueError) as e:
                replies[i] = (None, {"message": str(e)})
        if len(self.urls) == 1:
            post(0)
        else:
            threads = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(len(self.urls))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        bad = [(self.urls[i], r) for i, r in enumerate(replies) if r[0] != 200 or r[1].get("success") is False]
        if bad:
            raise TensorUpdateError(f"{path} failed on {len(bad)} engine(s): {str(bad[:3])[:600]}")

    def update(self, staging: Staging, weight_version: int, pause_mode: str | None, before_continue=None) -> None:
        """Every engine copies the staged weights as `weight_version`. `pause_mode` (in_place|retract|abort)
        pauses generation around the copy; None lets each engine wait for its in-flight requests."""
        payload = dumps(staging.named())
        if pause_mode:
            self._post_all("/pause_generation", {"mode": pause_mode})
        try:
            self._post_all("/update_weights_from_tensor", {
                "serialized_named_tensors": [payload], "weight_version": str(weight_version),
                # a cache cannot be flushed under requests paused in place (SGLang then fails the call)
                "flush_cache": pause_mode != "in_place"})
            if before_continue is not None:
                before_continue()
        finally:
            if pause_mode:
                self._post_all("/continue_generation", {})

    def close(self) -> None:
        for s in self.sessions:
            s.close()
