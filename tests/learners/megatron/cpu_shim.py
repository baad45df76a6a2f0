"""TEST-ONLY: let megatron-core run on a CPU (gloo) so CI can check the Megatron learner without a GPU.

Never imported by the production path (`learners/`), which runs on CUDA GPUs. megatron-core assumes
CUDA in three places we meet (../shared/ENVIRONMENT.md):
1. `torch.cuda.current_device()` as the device of buffers, RoPE frequencies and TP gathers -> CPU;
2. `fused_softmax.get_default_causal_mask` builds its mask with a literal device="cuda" (only used by
   the local DotProductAttention; our SDPA core attention never calls it, patched for completeness);
3. the CUDA RNG tracker (`tensor_parallel.random`) -> a tracker whose states are CPU generator states,
   installed before `model_parallel_cuda_manual_seed`; activation recomputation's RNG save/restore too;
4. (PP > 1, tied embeddings) the last stage's embedding copy is moved with `.cuda()` -> a no-op on CPU;
5. (PP > 1) the pipeline schedules count tokens in a `torch.zeros(..., device="cuda")` -> CPU there, and
   the exchange of activation shapes ends with `torch.cuda.synchronize()` -> a no-op.
`install()` is idempotent. `sitecustomize.py` beside it installs it in every process started with
this folder on PYTHONPATH and ASYNC_RL_MEGATRON_CPU_SHIM=1 (the end-to-end test's learner processes).
"""
from __future__ import annotations

import contextlib
import types

import torch

_INSTALLED = False


class CPURNGStatesTracker:
    """Megatron's CudaRNGStatesTracker API over CPU generator states."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized, self.states_, self.seeds_ = False, {}, set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized, self.states_ = True, states

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise Exception(f"rng state {name} / seed {seed} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda._async_rl_cpu_shim = True  # lets the Megatron learner start without a GPU
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random

    def causal_mask(sq: int, sk: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sk, dtype=torch.bool), diagonal=1)
    fused_softmax.get_default_causal_mask = causal_mask
    mp_random.CudaRNGStatesTracker = CPURNGStatesTracker
    mp_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.initialize_rng_tracker = lambda *a, **k: None

    def get_all_states():  # activation recomputation saves and restores these
        return torch.get_rng_state(), None, mp_random._CUDA_RNG_STATE_TRACKER.get_states()

    def set_all_states(cpu_state, _cuda_state, tracker_states):
        torch.set_rng_state(cpu_state)
        mp_random._CUDA_RNG_STATE_TRACKER.set_states(tracker_states)
    mp_random._get_all_rng_states = get_all_states
    mp_random._set_all_rng_states = set_all_states
    from megatron.core.pipeline_parallel import schedules

    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)
    schedules.torch = types.SimpleNamespace(**{**vars(torch), "zeros": zeros})  # that module's `torch` only
    _INSTALLED = True
