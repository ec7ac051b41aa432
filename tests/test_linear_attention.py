"""The ``lin`` head's hand-written Function (vittm.models.linear_attention) against its plain-ops reference, and the
model's shared-buffer inference path against the autograd path (same maths, different kernels)."""

from __future__ import annotations

import pytest
import torch

from vittm.models import create_model
from vittm.models.linear_attention import LinearAttention, kernels, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def head_inputs(dtype=torch.float64, device="cpu", B=2, N=5, M=3, D=12, h=3, c=6):
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()  # noqa: E731
    consts = torch.zeros(D // h + 2, dtype=dtype, device=device)
    consts[-2:] = torch.tensor([1e-6, 1.0])
    return (make(B, N, D), make(B, M, D), make(c, D), make(c), make(c + D, D), make(c + D)), consts, h


@pytest.mark.parametrize("residual", [True, False])
def test_function_gradients_are_exact(residual):
    tensors, consts, h = head_inputs()
    assert torch.autograd.gradcheck(lambda *t: LinearAttention.apply(*t, consts, residual, h), tensors)


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu if d == "cuda" else ()) for d in DEVICES])
@pytest.mark.parametrize("residual", [True, False])
def test_function_matches_the_reference(device, residual):
    tensors, consts, h = head_inputs(torch.float32, device, B=3, N=16, M=8, D=48, c=12)
    ours = LinearAttention.apply(*tensors, consts, residual, h)
    grads = torch.autograd.grad(ours.square().sum(), tensors)
    plain = reference(tensors[0], tensors[1], residual, *tensors[2:], h, 1e-6)
    torch.testing.assert_close(ours, plain)
    for got, want in zip(grads, torch.autograd.grad(plain.square().sum(), tensors), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 sums in another order
    with torch.no_grad():  # inference folds φ's "+ 1" into the matmuls, and can write into a given tensor
        out = torch.empty_like(plain)
        kernels(*tensors, consts, residual, h, out=out)
        torch.testing.assert_close(out, plain)


def noised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter moved off its init: with identity norms (γ = 1, β = 0) a norm applied twice or skipped
    would go unnoticed."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu if d == "cuda" else ()) for d in DEVICES])
@pytest.mark.parametrize("kwargs", [{}, {"memory_ps": 4, "process_ps": 4}, {"eval_head": "process"},
                                    {"eval_head": "mean"}])
def test_shared_buffer_inference_matches_autograd_path(device, kwargs):
    model = noised(create_model("vittm_test", num_classes=10, **kwargs)).to(device)
    x = torch.randn(3, 3, 32, 32, device=device)
    assert all(layer.shares_buffer for layer in model.layers)
    with torch.no_grad():
        fast = [model(x), *model.forward_features(x), *model.forward_both(x)]
    slow = [model(x), *model.forward_features(x), *model.forward_both(x)]  # with autograd: no shared buffer
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autocast_runs_the_reference_ops():
    """Under autocast the head runs its plain ops (autocast casts them one by one), with the same result."""
    model = noised(create_model("vittm_test", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.testing.assert_close(out.float(), model(x), rtol=0.05, atol=0.05)
