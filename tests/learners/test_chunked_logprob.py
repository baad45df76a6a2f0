"""The blockwise logprob/entropy (`learners.losses.logprobs_and_entropy`) and its gradient equal the plain
whole-vocabulary computation (float64 log_softmax, autograd through it), for any block size, temperature,
dtype, and for non-contiguous logits (the learners pass `logits[:, :-1]` views)."""
from __future__ import annotations

import pytest
import torch

from learners import losses


def reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """Independent: float64 log_softmax over the whole vocabulary, entropy from its definition."""
    z = logits.double()
    if temperature > 0 and temperature != 1.0:
        z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _case(seed: int, shape=(3, 7, 50), dtype=torch.float32, view=False):
    g = torch.Generator().manual_seed(seed)
    b, t, v = shape
    base = (torch.randn(b, t + 1, v + 3, generator=g, dtype=torch.float64) * 3).to(dtype)
    logits = base[:, :-1, :v] if view else base[:, :t, :v].contiguous()
    targets = torch.randint(0, v, (b, t), generator=g)
    coef = torch.randn(b, t, generator=g, dtype=torch.float64), torch.randn(b, t, generator=g, dtype=torch.float64)
    return logits, targets, coef


@pytest.mark.parametrize("chunk", [50, 150, 1 << 27])  # one position per block, 3 per block, all in one
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("view", [False, True])
def test_blockwise_values_and_gradients_equal_whole_vocabulary(monkeypatch, chunk, temperature, view):
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk)
    logits, targets, (c1, c2) = _case(1, view=view)
    x = logits.detach().requires_grad_(True)
    logp, ent = losses.logprobs_and_entropy(x, targets, temperature)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ((logp.double() * c1).sum() + (ent.double() * c2).sum()).backward()

    ref_x = logits.detach().double().requires_grad_(True)
    ref_logp, ref_ent = reference(ref_x, targets, temperature)
    ((ref_logp * c1).sum() + (ref_ent * c2).sum()).backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_of_one_output_alone(monkeypatch, which):
    """The actor loss detaches entropy unless entropy_coef != 0: the backward must handle a missing grad."""
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 100)
    logits, targets, (c1, _) = _case(2, dtype=torch.float64)
    x = logits.detach().requires_grad_(True)
    out = losses.logprobs_and_entropy(x, targets, 0.9)[0 if which == "logp" else 1]
    (out * c1).sum().backward()
    ref_x = logits.detach().requires_grad_(True)
    ref = reference(ref_x, targets, 0.9)[0 if which == "logp" else 1]
    (ref * c1).sum().backward()
    assert out.dtype == torch.float64
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)


def test_bf16_logits_keep_bf16_gradient_and_float32_results():
    """bf16 logits (the GPU learners'): float32 math, as a float32 log_softmax of them would give."""
    logits, targets, (c1, c2) = _case(3, shape=(2, 5, 300), dtype=torch.bfloat16, view=True)
    x = logits.detach().requires_grad_(True)
    logp, ent = losses.logprobs_and_entropy(x, targets)
    ((logp * c1.float()).sum() + (ent * c2.float()).sum()).backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == logits.shape
    ref_x = logits.detach().requires_grad_(True)
    ref_logp, ref_ent = reference(ref_x, targets, 1.0)
    ((ref_logp * c1).sum() + (ref_ent * c2).sum()).backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    err = (x.grad.double() - ref_x.grad).norm() / ref_x.grad.norm()
    assert err < 1e-2  # the gradient is rounded to bf16 once


def test_no_grad_and_other_shapes():
    """token_logprobs under no_grad (logp_old) and 2-D / 4-D logits give the same numbers."""
    logits, targets, _ = _case(4)
    ref_logp, ref_ent = reference(logits, targets, 0.5)
    with torch.no_grad():
        logp = losses.token_logprobs(logits, targets, 0.5)
        flat_logp, flat_ent = losses.logprobs_and_entropy(logits.reshape(-1, 50), targets.reshape(-1), 0.5)
        deep_logp, _ = losses.logprobs_and_entropy(logits.reshape(3, 7, 1, 50), targets.reshape(3, 7, 1), 0.5)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat_logp.double(), ref_logp.reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat_ent.double(), ref_ent.reshape(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deep_logp.double().reshape(3, 7), ref_logp, rtol=1e-5, atol=1e-5)


def _compiled_run(monkeypatch, compiler):
    """One forward + backward with the block kernels going through `compiler` (as on a GPU)."""
    monkeypatch.setattr(losses, "_compile_on", lambda device: True)
    monkeypatch.setattr(losses, "_compiled", {})
    monkeypatch.setattr(torch, "compile", compiler)
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 200)  # several blocks of different sizes
    logits, targets, (c1, c2) = _case(6, shape=(2, 9, 50), view=True)
    x = logits.detach().requires_grad_(True)
    logp, ent = losses.logprobs_and_entropy(x, targets, 0.8)
    ((logp.double() * c1).sum() + (ent.double() * c2).sum()).backward()
    ref_x = logits.detach().double().requires_grad_(True)
    ref_logp, ref_ent = reference(ref_x, targets, 0.8)
    ((ref_logp * c1).sum() + (ref_ent * c2).sum()).backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-6)


def test_compiled_blocks_equal_the_reference(monkeypatch):
    """The GPU path's torch.compile'd blocks (Inductor's CPU backend here, Triton on a GPU; dynamic shapes)."""
    real_compile = torch.compile
    _compiled_run(monkeypatch, real_compile)
    assert {"fwd_h", "bwd11"} <= set(losses._compiled)


def test_a_failing_compiler_falls_back_to_eager_blocks(monkeypatch, capsys):
    """A machine without a working compiler (simulated: compiled functions raise) still gets right numbers."""
    def broken(fn, **_):
        def run(*args):
            raise RuntimeError("no C compiler")
        return run
    _compiled_run(monkeypatch, broken)
    assert losses._compiled.get("failed") and "using eager blocks" in capsys.readouterr().out


def _loop_step(shapes, seed: int, v: int = 50) -> None:
    """What one learner step hands the kernels: per micro-batch (rows, longest length, the batch's length)
    a logp_old pass (no grad) and a loss pass (forward + backward, entropy detached as by default); logits
    are `[:, :-1]` views, targets cut from the whole batch's wider rows. Checked against the reference."""
    g = torch.Generator().manual_seed(seed)
    for b, t, wide in shapes:
        logits = torch.randn(b, t + 1, v, generator=g)[:, :-1]
        targets = torch.randint(0, v, (b, wide), generator=g)[:, :t]
        coef = torch.randn(b, t, generator=g, dtype=torch.float64)
        with torch.no_grad():
            old = losses.token_logprobs(logits, targets)
        x = logits.detach().requires_grad_(True)
        logp, _ = losses.logprobs_and_entropy(x, targets)
        (logp.double() * coef).sum().backward()
        ref_x = logits.detach().double().requires_grad_(True)
        ref_logp, _ = reference(ref_x, targets, 1.0)
        (ref_logp * coef).sum().backward()
        torch.testing.assert_close(old.double(), ref_logp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-5, atol=1e-6)


def test_compiled_blocks_compile_in_the_first_step_only(monkeypatch):
    """Later steps bring new micro-batch shapes: 1-row micro-batches, new lengths, a row whose last block
    has one position, a batch as wide as its longest micro-batch. Every graph is compiled in the first
    step; before, each such shape compiled another (the 16 x 8 GPU loop: ~10 in its timed steps)."""
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(losses, "_compile_on", lambda device: True)
    monkeypatch.setattr(losses, "_compiled", {})
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 16 * 50)  # blocks of 16 positions
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731
    _loop_step([(3, 40, 44), (5, 21, 44), (8, 9, 44)], seed=0)
    first = graphs()
    _loop_step([(1, 17, 30), (4, 33, 33), (2, 16, 33), (1, 5, 33), (6, 12, 40), (2, 2, 40)], seed=1)
    assert graphs() == first, f"{graphs() - first} graphs compiled after the first step"
    assert first <= 8
