"""The cost meter (vittm.bench.cost) on modules whose kernels and bytes are known, and the model's counts pinned per
layer (deterministic: a change that adds kernels to a ViTTM layer shows here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vittm.bench.cost import inductor_kernels, measure
from vittm.models import create_model


def test_meter_counts_kernels_and_non_matmul_bytes():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        cost = measure(lambda: torch.relu(lin(x.view(3, 8))).t())  # view and transpose launch nothing
    assert cost.kernels == 2 and dict(cost.by_op) == {"addmm": 1, "relu": 1}
    assert cost.bytes == 3 * 4 * 4  # only the relu's output: the GEMM's is matmul work


def test_meter_counts_in_place_and_foreach_writes():
    a, b = torch.zeros(5), [torch.zeros(2), torch.zeros(3)]
    cost = measure(lambda: (a.add_(1), torch._foreach_mul_(b, 2.0), a.clone()))
    assert cost.kernels == 3
    assert cost.bytes == 5 * 4 + (2 + 3) * 4 + 5 * 4  # in place: the tensors overwritten, foreach ones included


def test_meter_skips_ops_that_return_their_input():
    x = torch.randn(4, 4)
    with torch.inference_mode():  # here composite ops reach the meter: eval dropout hands back its input
        cost = measure(lambda: F.dropout(x, 0.5, training=False))
    assert cost.kernels == 0 and cost.bytes == 0


def test_inductor_kernel_count():
    assert inductor_kernels(lambda t: (t.sin() + 1).cos(), torch.randn(16)) == 1  # one fused point-wise kernel


def layer_costs(**kwargs) -> tuple[int, int]:
    """(inference kernels, training forward+backward kernels) added by one ViTTM layer (depth 2 minus depth 1)."""
    counts = []
    for depth in (1, 2):
        model = create_model("vittm_test", depth=depth, num_classes=10, **kwargs)
        x = torch.randn(2, 3, *model.img_size)
        model.eval()
        with torch.no_grad():
            infer = measure(lambda m=model, t=x: m(t)).kernels
        model.train()
        train = measure(lambda m=model, t=x: sum(o.sum() for o in m.forward_both(t)).backward()).kernels
        counts.append((infer, train))
    return counts[1][0] - counts[0][0], counts[1][1] - counts[0][1]


def test_kernels_per_vittm_layer_are_pinned():
    # lin x4, residual, inference: read 10 + ViT block 10 + write 10 + one LayerNorm kernel per shared norm over
    # both streams (2). Training (forward and backward) 96. Before the kernel-economy rework: 46.9 and 140.
    assert layer_costs() == (32, 96)
    assert layer_costs(memory_ps=16, process_ps=32)[0] == 32
