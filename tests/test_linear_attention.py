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


@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.gpu if d == "cuda" else ()) for d in DEVICES])
def test_autocast_matches_the_reference(device):
    """Under bf16 autocast the Function casts its inputs once and keeps the residual in fp32, as autocast does for
    the plain ops: same dtype out, same values and gradients within bf16's precision."""
    tensors, consts, h = head_inputs(torch.float32, device, B=3, N=16, M=8, D=48, c=12)
    with torch.autocast(device, dtype=torch.bfloat16):
        from vittm.models.rw_heads import eager_linear_attention

        ours = eager_linear_attention(tensors[0], tensors[1], True, *tensors[2:], consts, h, 1e-6)
        plain = reference(tensors[0], tensors[1], True, *tensors[2:], h, 1e-6)
    assert ours.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=0.02, atol=0.05)
    for got, want in zip(torch.autograd.grad(ours.sum(), tensors), torch.autograd.grad(plain.sum(), tensors),
                         strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.1 * want.abs().max().item())


def test_model_under_autocast_inference_and_training():
    model = noised(create_model("vittm_test", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = model(x)
        model.train()
        loss = sum(o.float().sum() for o in model.forward_both(x))
    loss.backward()
    torch.testing.assert_close(fast.float(), want, rtol=0.05, atol=0.05)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
