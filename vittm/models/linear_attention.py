"""The ``lin`` head's computation with the fewest kernels and bytes: one autograd Function, forward and backward
written out (SPEC §4, same maths as ``reference``).

Per head (h heads, batched as B·h): Q = φ(dst W_qᵀ + b_q) (M, c/h), K = φ(kv[:c]) (N, c/h), X = [V | 1] (N, D/h + 1),
S = Kᵀ X (c/h, D/h + 1): [Σ kᵀv | Σ k]; ND = Q S + [0 … 0, eps]: [numerator | denominator]; out = dst + num / den.

Why by hand (autograd's version of the same ops launches about twice the kernels, measured with ``vittm.bench.cost``):
- Inside a Function the forward and backward run without autograd, so element-wise ops can write straight into the
  layout the next matmul wants (``out=`` a permuted view): φ and the per-head layout copy are one kernel, the ones
  column comes with the copy of V (``cat`` with an expanded constant), the eps comes with the second matmul
  (``baddbmm``), and the residual add and the division are one ``addcdiv`` that writes token-major (B, M, D).
- The backward needs no slice/cat/clone bookkeeping: each gradient is written where the next op reads it, φ's
  derivative is ``elu_backward`` writing into the (B, N, c + D) gradient of the fused k/v projection, and the
  residual's gradient joins the dst gradient inside its matmul (``addmm``).
Used in eager mode (fp32/fp64/bf16/fp16, under autocast too: the inputs are cast once to autocast's dtype, the
residual stream keeps its own); TorchScript and ``torch.compile`` (inductor fuses the plain ops itself) run
``reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def reference(src: torch.Tensor, dst: torch.Tensor, residual: bool, q_w: torch.Tensor, q_b: torch.Tensor,
              kv_w: torch.Tensor, kv_b: torch.Tensor, num_heads: int, eps: float) -> torch.Tensor:
    """The same maths in plain differentiable ops (src (B, N, D), dst (B, M, D) -> (B, M, D))."""
    B, N, D = src.shape
    M, h, c = dst.shape[1], num_heads, q_w.shape[0]
    ch, dh = c // h, D // h
    q = F.elu(F.linear(dst, q_w, q_b)) + 1  # φ(q): (B, M, c)
    k, v = F.linear(src, kv_w, kv_b).split([c, D], dim=-1)
    k = F.elu(k) + 1  # φ(k): (B, N, c)
    k_t = k.reshape(B, N, h, ch).permute(0, 2, 3, 1).reshape(B * h, ch, N)
    ones = v.new_ones(()).expand(B, h, N, 1)
    v1 = torch.cat([v.reshape(B, N, h, dh).transpose(1, 2), ones], dim=-1)  # [v | 1]: (B, h, N, D/h + 1)
    state = torch.bmm(k_t, v1.reshape(B * h, N, dh + 1))  # [Σ kᵀv | Σ k]: (B·h, c/h, D/h + 1)
    out = torch.bmm(q.reshape(B, M, h, ch).transpose(1, 2).reshape(B * h, M, ch), state)  # [num | den]
    out = out[..., :dh] / (out[..., dh:] + eps)
    out = out.reshape(B, h, M, dh).transpose(1, 2).reshape(B, M, D)
    return dst + out if residual else out


def kernels(src: torch.Tensor, dst: torch.Tensor, q_w: torch.Tensor, q_b: torch.Tensor, kv_w: torch.Tensor,
            kv_b: torch.Tensor, consts: torch.Tensor, residual: bool, num_heads: int,
            out: torch.Tensor | None = None, save: bool = False,
            base: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The forward without autograd (call it under no_grad, or from the Function): ``(y (B, M, D), saved)``.
    ``out``: where to write y (any (B, M, D) view, e.g. a slice of the model's stream buffer); fresh if None.
    ``base``: the residual, when it is ``dst`` in another dtype (autocast: dst cast for the matmuls, the residual
    stream kept in fp32); y then has its dtype.
    ``consts`` = [0, …, 0, eps, 1] (D/h + 2,): its first D/h + 1 entries are ND's bias, its last X's ones column.
    ``save``: keep φ(q), φ(k) for the backward (otherwise φ's "+ 1" is folded into the matmuls, saving two writes)."""
    B, N, D = src.shape
    M, h, c = dst.shape[1], num_heads, q_w.shape[0]
    ch, dh = c // h, D // h
    src2, dst2 = src.reshape(B * N, D), dst.reshape(B * M, D)
    q = torch.addmm(q_b, dst2, q_w.t())  # (B·M, c), token-major
    kv = torch.addmm(kv_b, src2, kv_w.t())  # (B·N, c + D) = [k | v]
    kv3 = kv.view(B, N, c + D)
    Q = q.new_empty(B, h, M, ch)  # head-major, written by φ itself (φ - 1 = elu when nothing is saved)
    torch._C._nn.elu(q.view(B, M, h, ch).transpose(1, 2), out=Q)
    K = kv.new_empty(B, h, N, ch)
    torch._C._nn.elu(kv3[..., :c].view(B, N, h, ch).transpose(1, 2), out=K)
    X = kv.new_empty(B, h, N, dh + 1)  # [V | 1], head-major
    torch.cat([kv3[..., c:].view(B, N, h, dh).transpose(1, 2), consts[-1:].expand(B, h, N, 1)], dim=-1, out=X)
    Q3, K3, X3 = Q.view(B * h, M, ch), K.view(B * h, N, ch), X.view(B * h, N, dh + 1)
    if save:  # φ = elu + 1 in place: the backward needs φ itself
        Q.add_(1), K.add_(1)
        S = torch.bmm(K3.transpose(1, 2), X3)  # (B·h, c/h, D/h + 1)
        ND = torch.baddbmm(consts[:-1], Q3, S)  # [num | den + eps]
    else:  # inference: the "+ 1" folded into the matmuls' bias, φᵀX = elu(K)ᵀX + 1ᵀX and φS = elu(Q)S + 1ᵀS
        S = torch.baddbmm(X3.sum(1, keepdim=True), K3.transpose(1, 2), X3)
        bias = torch.baddbmm(consts[:-1], consts[-1:].expand(B * h, 1, ch), S)  # 1ᵀS + [0 … eps]: (B·h, 1, ·)
        ND = torch.baddbmm(bias, Q3, S)
    ND = ND.view(B, h, M, dh + 1)
    base2 = dst2 if base is None else base.reshape(B * M, D)
    y = (base2 if residual else q).new_empty(B, M, D) if out is None else out
    y4 = y.view(B, M, h, dh)
    num, den = ND[..., :dh].transpose(1, 2), ND[..., dh:].transpose(1, 2)  # (B, M, h, D/h), (B, M, h, 1)
    if residual:
        torch.addcdiv(base2.view(B, M, h, dh), num, den, out=y4)
    else:
        torch.div(num, den, out=y4)
    return y, (src2, dst2, q_w, kv_w, q, kv, Q, K, X, S, ND, consts)


class LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, dst, q_w, q_b, kv_w, kv_b, consts, residual: bool, num_heads: int,
                dtype: torch.dtype | None = None):
        # dtype: autocast's (the caller turned autocast off): the inputs are cast here, as autocast would cast them
        # for the matmuls, and the residual stays in its own dtype
        base = dst
        if dtype is not None and dtype != src.dtype:
            src, dst, q_w, q_b, kv_w, kv_b, consts = (t.to(dtype) for t in (src, dst, q_w, q_b, kv_w, kv_b, consts))
        y, saved = kernels(src, dst, q_w, q_b, kv_w, kv_b, consts, residual, num_heads, save=True, base=base)
        ctx.save_for_backward(*saved)
        ctx.residual = residual
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        src2, dst2, q_w, kv_w, q, kv, Q, K, X, S, ND, consts = ctx.saved_tensors
        B, h, M, dh1 = ND.shape
        N, ch, dh, c = K.shape[2], K.shape[3], dh1 - 1, q_w.shape[0]
        D = h * dh
        need = ctx.needs_input_grad
        grad2 = grad.reshape(B * M, D)
        grad_c = grad2.to(ND.dtype)  # compute dtype (a no-op unless autocast: the residual's gradient is fp32)
        # gradient of ND = [num | den] (B, h, M, D/h + 1): num gets grad / den, den gets -Σ_j grad_j num_j / den²
        g_nd = ND.new_empty(B, h, M, dh1)
        den = ND[..., dh:]
        torch.div(grad_c.view(B, M, h, dh).transpose(1, 2), den, out=g_nd[..., :dh])
        # Σ_j g_nd_j num_j for every (b, h, m) as one batched (1 x D/h) @ (D/h x 1) matmul (rows D/h + 1 apart)
        rows = B * h * M
        dot = torch.bmm(g_nd.view(rows, 1, dh1)[..., :dh], ND.reshape(rows, dh1, 1)[:, :dh]).view(B, h, M, 1)
        torch.addcdiv(consts[:1], dot, den, value=-1, out=g_nd[..., dh:])  # 0 - dot / den
        g_nd3 = g_nd.view(B * h, M, dh1)
        gS = torch.bmm(Q.view(B * h, M, ch).transpose(1, 2), g_nd3)  # (B·h, c/h, D/h + 1)
        gQ = torch.bmm(g_nd3, S.transpose(1, 2))  # (B·h, M, c/h)
        gq = q.new_empty(B * M, c)  # φ'(q) ⊙ gQ, written token-major for the projection's gradients
        torch.ops.aten.elu_backward.grad_input(
            gQ.view(B, h, M, ch).transpose(1, 2), 1, 1, 1, False, q.view(B, M, h, ch), grad_input=gq.view(B, M, h, ch))
        gK = torch.bmm(X.view(B * h, N, dh1), gS.transpose(1, 2))  # (B·h, N, c/h)
        gkv = kv.new_empty(B, N, c + D)  # [gk | gv], token-major
        torch.ops.aten.elu_backward.grad_input(
            gK.view(B, h, N, ch).transpose(1, 2), 1, 1, 1, False, kv.view(B, N, c + D)[..., :c].view(B, N, h, ch),
            grad_input=gkv[..., :c].view(B, N, h, ch))
        gV = torch.bmm(K.view(B * h, N, ch), gS[..., :dh])  # (B·h, N, D/h)
        gkv[..., c:].view(B, N, h, dh).copy_(gV.view(B, h, N, dh).transpose(1, 2))
        gkv = gkv.view(B * N, c + D)
        g_src = g_dst = g_qw = g_qb = g_kvw = g_kvb = None
        if need[0]:
            g_src = torch.mm(gkv, kv_w).view(B, N, D)
        if need[1]:
            if not ctx.residual:
                g_dst = torch.mm(gq, q_w)
            elif grad2.dtype == gq.dtype:
                g_dst = torch.addmm(grad2, gq, q_w)  # the residual's gradient joins inside the matmul
            else:
                g_dst = grad2 + torch.mm(gq, q_w)
            g_dst = g_dst.view(B, M, D)
        if need[2]:
            g_qw = torch.mm(gq.t(), dst2)
        if need[3]:
            g_qb = gq.sum(0)
        if need[4]:
            g_kvw = torch.mm(gkv.t(), src2)
        if need[5]:
            g_kvb = gkv.sum(0)
        return g_src, g_dst, g_qw, g_qb, g_kvw, g_kvb, None, None, None, None  # (autograd casts to input dtypes)


def fused_applies(src: torch.Tensor, *params: torch.Tensor) -> bool:
    """The Function runs in eager mode when every tensor has one floating dtype on one device (autocast included:
    see ``autocast_dtype``)."""
    if torch.compiler.is_compiling():
        return False
    return src.is_floating_point() and all(p.dtype == src.dtype and p.device == src.device for p in params)


def autocast_dtype(src: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run this head's matmuls in, or None without autocast."""
    device = src.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None
