"""The fast implementation against a plain reference written from SPEC §2-5: per-head loops, no fused projections,
explicit formulas, the same weights. Both the heads alone and whole models must agree within float tolerance."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import vittm  # noqa: F401
from vittm.core.registry import RW_HEADS


def phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def ref_head(head, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """SPEC §4, one head at a time."""
    name, D = head.registry_name, src.shape[-1]
    if name == "lin":
        c, h = head.c, head.num_heads
        wk, wv = head.kv.weight[:c], head.kv.weight[c:]
        bk, bv = head.kv.bias[:c], head.kv.bias[c:]
        q, k, v = phi(head.q(dst)), phi(F.linear(src, wk, bk)), F.linear(src, wv, bv)
        outs = []
        for i in range(h):
            qi, ki = q[..., i * c // h:(i + 1) * c // h], k[..., i * c // h:(i + 1) * c // h]
            vi = v[..., i * D // h:(i + 1) * D // h]
            kv = ki.transpose(1, 2) @ vi  # Σ_n k_nᵀ v_n
            outs.append((qi @ kv) / (qi @ ki.sum(1, keepdim=True).transpose(1, 2) + head.eps))
        return torch.cat(outs, -1)
    if name in ("ca", "lca"):
        h = head.num_heads
        c = D if name == "ca" else head.c
        k_lin, v_lin = F.linear(src, head.kv.weight[:c], head.kv.bias[:c]), F.linear(src, head.kv.weight[c:],
                                                                                       head.kv.bias[c:])
        q, k, v = head.q_norm(head.q(dst)), head.k_norm(k_lin), head.v_norm(v_lin)
        outs = []
        for i in range(h):
            qi, ki = q[..., i * c // h:(i + 1) * c // h], k[..., i * c // h:(i + 1) * c // h]
            vi = v[..., i * D // h:(i + 1) * D // h]
            if name == "ca":
                outs.append(torch.softmax(qi @ ki.transpose(1, 2) / (D // h) ** 0.5, -1) @ vi)
            else:
                outs.append(qi.softmax(-1) @ (ki.softmax(1).transpose(1, 2) @ vi))
        return head.proj(torch.cat(outs, -1))
    if name == "la":
        a_dst = head.q_mlp(head.q_norm(dst)).softmax(-1)
        a_src = head.k_mlp(head.k_norm(src)).transpose(1, 2).softmax(-1)
        return a_dst @ (a_src @ src)
    if name == "tl":
        z = torch.cat([src, dst], 1)
        return head.mlp(head.norm(z)).transpose(1, 2).softmax(-1) @ z
    if name == "dyna":
        z = head.norm(torch.cat([src, dst], 1))
        B, L, _ = z.shape
        h, r, M = head.num_heads, head.reduced_dim, head.num_dst
        codes = head.compress(z)  # (B, L, h·r)
        outs = []
        for i in range(h):
            mix = head.generate(codes[..., i * r:(i + 1) * r].reshape(B, L * r)).view(B, M, L).softmax(-1)
            outs.append(mix @ z[..., i * D // h:(i + 1) * D // h])
        return head.proj(torch.cat(outs, -1))
    raise AssertionError(name)


@pytest.mark.parametrize("name", RW_HEADS.names())
def test_each_head_matches_its_reference(name):
    head = RW_HEADS.build(name, dim=32, num_heads=4, num_src=10, num_dst=7)
    src, dst = torch.randn(3, 10, 32), torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(src, dst), ref_head(head, src, dst), rtol=1e-4, atol=1e-5)


def ref_embed(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §1: the patch embeddings as the convolutions they are, plus the position tables (built size only)."""
    m = model.memory_embed(x).permute(0, 2, 3, 1)  # (B, h, w, D)
    proj = getattr(model.process_embed, "proj", None)
    p = proj(x).permute(0, 2, 3, 1) if proj is not None else model.process_embed(x, m, None)
    return m.flatten(1, 2) + model.memory_pos_embed, p.flatten(1, 2) + model.process_pos_embed


def ref_forward(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §1-3 written out: embed, then per layer norm / read / fuse / block / norm / write / fuse / memory."""
    m, p = ref_embed(model, x)
    for layer in model.layers:
        m, p = layer.read_norm(m), layer.read_norm(p)
        p = layer.read_fuse(ref_head(layer.read, m, p), p)
        skip, m = m, layer.memory.encode(m)
        p = layer.block(p)
        m, p = layer.write_norm(m), layer.write_norm(p)
        m = layer.memory.decode(layer.write_fuse(ref_head(layer.write, p, m), m), skip)
    p = model.process_norm(p)
    return model.head(model.fc_norm(m.mean(1))), model.process_head(model.process_fc_norm(p.mean(1)))


@pytest.mark.parametrize("kwargs", [
    {}, {"rw_head": "ca", "fusion": "add_erase", "memory_block": "mlp"},
    {"read_head": "lca", "write_head": "dyna", "memory_block": "conv"},
    {"read_head": "tl", "write_head": "la", "fusion": "erase", "process_embed": "downsample"},
    {"memory_ps": 8, "process_ps": 8}, {"process_embed": "latent"},
], ids=["published", "ca-add_erase-mlp", "lca-dyna-conv", "tl-la-erase-downsample", "shared-patches", "latent"])
def test_whole_model_matches_the_reference(kwargs):
    model = timm.create_model("vittm_test", num_classes=5, **kwargs).eval()
    for head in (model.head, model.process_head):
        torch.nn.init.normal_(head.weight, std=0.02)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_both(x), ref_forward(model, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", RW_HEADS.names())
def test_each_head_gradients_match_the_reference(name):
    head = RW_HEADS.build(name, dim=32, num_heads=4, num_src=10, num_dst=7).double()
    src, dst = torch.randn(3, 10, 32, dtype=torch.double), torch.randn(3, 7, 32, dtype=torch.double)
    weight = torch.randn(3, 7, 32, dtype=torch.double)
    grads = []
    for fn in (head, lambda s, d: ref_head(head, s, d)):
        s, d = src.clone().requires_grad_(), dst.clone().requires_grad_()
        head.zero_grad()
        (fn(s, d) * weight).sum().backward()
        grads.append([s.grad, d.grad] + [p.grad.clone() for p in head.parameters()])
    for fast, ref in zip(*grads, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-7, atol=1e-9)
