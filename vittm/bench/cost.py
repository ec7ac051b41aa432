"""Cost meter: what a forward or a training step costs a GPU beyond multiply-adds.

Two counts, taken with a ``TorchDispatchMode`` that sees every ATen op PyTorch dispatches (forward, autograd's
backward and the optimizer alike), on any device:

- **kernels**: ATen ops that do work. Views and other metadata-only ops (``op.is_view``, ``_unsafe_view``,
  ``detach``...) and bare allocations (``empty``...) launch nothing and are not counted; every other op counts as
  one, whatever it does inside (a ``_foreach_*`` op is one call; an op that runs several kernels in C++ still shows
  as one call, which is how a GPU's launch overhead scales too).
- **bytes written by non-matmul ops**: the output bytes of every counted op that is not a matmul, attention or
  convolution (element-wise ops, norms, copies, reductions, the optimizer's updates): the memory traffic that is
  pure overhead once the GEMMs run at speed. In-place and ``out=`` ops count the tensors they overwrite.

``inductor_kernels`` asks inductor how many kernels it generated for a compiled forward (its own metric).
Written by hand: PyTorch's profilers time kernels but give no stable count to compare models by.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# metadata-only ops that op.is_view does not flag, and allocations that launch no kernel
NO_KERNEL = {"_unsafe_view", "detach", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
             "new_empty_strided", "_reshape_alias", "set_", "resize_", "_local_scalar_dense", "is_same_size"}
# the work a GEMM/attention/convolution library does: its output bytes are not overhead
MATMUL_WORDS = ("mm", "matmul", "linear", "convolution", "scaled_dot_product", "attention")


def is_matmul(name: str) -> bool:
    return any(word in name for word in MATMUL_WORDS)


@dataclass
class Cost:
    kernels: int = 0
    bytes: int = 0  # written by non-matmul ops
    by_op: Counter = field(default_factory=Counter)  # op name -> kernels
    bytes_by_op: Counter = field(default_factory=Counter)  # op name -> bytes


def mutated_args(func) -> list[str]:
    """The names of the arguments an op writes (in-place and ``out=`` ops)."""
    return [a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def returns_an_input(func, args, out) -> bool:
    """An op that hands back one of its inputs unchanged (e.g. ``dropout`` in eval mode under inference_mode, where
    composite ops reach the meter before they decompose) did no work; in-place ops are not this case."""
    if mutated_args(func):
        return False
    inputs = {id(t) for t in tree_leaves(args) if isinstance(t, torch.Tensor)}
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(outputs) and all(id(t) in inputs for t in outputs)


def written_tensors(func, args, kwargs, out) -> list[torch.Tensor]:
    """The tensors an op writes: the arguments it mutates (in-place and ``out=`` ops, including ``_foreach_*_``,
    which return nothing), else its outputs."""
    mutated = mutated_args(func)
    if mutated:
        named = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | (kwargs or {})
        leaves = tree_leaves([named[n] for n in mutated if n in named])
    else:
        leaves = tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


class CostMeter(TorchDispatchMode):
    """``with CostMeter() as meter: ...`` then ``meter.cost``."""

    def __init__(self) -> None:
        super().__init__()
        self.cost = Cost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_KERNEL or returns_an_input(func, args, out):
            return out
        self.cost.kernels += 1
        self.cost.by_op[name] += 1
        if not is_matmul(name):
            written = sum(t.numel() * t.element_size() for t in written_tensors(func, args, kwargs, out))
            self.cost.bytes += written
            self.cost.bytes_by_op[name] += written
        return out


def measure(fn: Callable[[], Any]) -> Cost:
    """The cost of one call of ``fn`` (run it once before, so that lazy set-up is not counted)."""
    with CostMeter() as meter:
        fn()
    return meter.cost


def inductor_kernels(fn: Callable[..., Any], *args: Any, **compile_options: Any) -> int:
    """Kernels inductor generates for ``torch.compile(fn)(*args)`` (its ``generated_kernel_count``), compiled afresh:
    the FX-graph caches are switched off, as a cache hit would generate nothing."""
    import torch._dynamo
    from torch._inductor import config, metrics

    torch._dynamo.reset()
    metrics.reset()
    with config.patch(fx_graph_cache=False, autotune_local_cache=False):
        torch.compile(fn, **compile_options)(*args)
    count = metrics.generated_kernel_count
    torch._dynamo.reset()
    return count
