"""The authors' checkpoints (github.com/pjjajal/EfficientTTMs) in our key names, with no model needed.

Their ViTTM subclasses timm's VisionTransformer, so its state dict keeps the ViT parts a ViTTM never uses, and
names the ViTTM parts its own way (facts read off their code and the fixtures made with it, shared/fixtures/authors):

  theirs                                  ours
  memory_embedder.proj.*                  memory_embed.*             (their timm ``patch_embed`` when memory_ps = 16)
  process_embedder.proj.*                 process_embed.proj.*
  memory_pos_embed, process_pos_embed     the same
  blocks.{i}.*                            layers.{i}.block.*
  read_norm.{i}.*, write_norm.{i}.*       layers.{i}.read_norm.*, layers.{i}.write_norm.*
  read_head.{i}.*, write_head.{i}.*       layers.{i}.read.*, layers.{i}.write.*    (per head kind, see HEAD_KINDS)
  read_fusion.linear.*, write_fusion...   layers.{i}.read_fuse.gate.*, ...    (one add_erase gate per direction, shared
                                                                              by all layers: copied into each)
  mem_blocks.{i}.{norm,mlp}.*             layers.{i}.memory.{norm,mlp}.*
  process_norm, fc_norm, head, process_head   the same;  fc_norm_process -> process_fc_norm

Dropped, and counted: ``cls_token`` and ``pos_embed`` (never used), ``patch_embed.*`` (dead, or the same tensors as
``memory_embedder`` at memory_ps 16), the ``lin`` heads' ``proj.*`` (built, never used: SPEC §4). Anything else
(e.g. a final ``norm.*`` of a model pooled by class token, their ``conv`` memory blocks, which crashed in their code)
is left unmatched for the caller to refuse.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# Keys only the authors' layout has (ours and timm's ViT have none of them).
MARKERS = ("memory_embedder.", "process_embedder.", "read_head.", "write_head.", "read_norm.", "write_norm.",
           "fc_norm_process.", "mem_blocks.")

RENAMES = [  # their key -> ours, for tensors that carry over unchanged
    (r"memory_embedder\.proj\.(weight|bias)", r"memory_embed.\1"),
    (r"process_embedder\.proj\.(weight|bias)", r"process_embed.proj.\1"),
    (r"(memory_pos_embed|process_pos_embed)", r"\1"),
    (r"blocks\.(\d+)\.(.+)", r"layers.\1.block.\2"),
    (r"(read|write)_norm\.(\d+)\.(weight|bias)", r"layers.\2.\1_norm.\3"),
    (r"mem_blocks\.(\d+)\.(norm|mlp\.fc1|mlp\.fc2)\.(weight|bias)", r"layers.\1.memory.\2.\3"),
    (r"(process_norm|fc_norm|head|process_head)\.(weight|bias)", r"\1.\2"),
    (r"fc_norm_process\.(weight|bias)", r"process_fc_norm.\1"),
]

# Their read/write head classes, told apart by their sub-modules: sub-module -> ours (None: dropped); k and v are
# fused into our ``kv`` ([W_k | W_v], as rw_heads.py builds it).
HEAD_KINDS: dict[str, tuple[frozenset[str], dict[str, str | None]]] = {
    "lin": (frozenset({"q", "k", "v", "proj"}), {"q": "q", "proj": None}),
    "ca/lca": (frozenset({"q", "k", "v", "q_norm", "k_norm", "v_norm", "proj"}),
               {"q": "q", "q_norm": "q_norm", "k_norm": "k_norm", "v_norm": "v_norm", "proj": "proj"}),
    "la": (frozenset({"mlp", "mlp2", "norm", "norm_q"}),
           {"mlp": "k_mlp", "mlp2": "q_mlp", "norm": "k_norm", "norm_q": "q_norm"}),
    "tl": (frozenset({"mlp", "norm"}), {"mlp": "mlp", "norm": "norm"}),
    "dyna": (frozenset({"out_proj", "compress", "generate", "norm"}),
             {"out_proj": "proj", "compress": "compress", "generate": "generate", "norm": "norm"}),
}
DEAD_PATCH_EMBED = "the ViT patch embedding their ViTTM inherits and never uses"
DEAD_LIN_PROJ = "the lin heads' output projection, built and never used (SPEC §4)"


def is_authors_layout(keys: object) -> bool:
    return any(str(k).startswith(MARKERS) for k in keys)


@dataclass
class Converted:
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # in our key names
    dropped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # why -> their keys
    unmatched: list[str] = field(default_factory=list)  # their keys that fit nowhere
    notes: list[str] = field(default_factory=list)


def convert_authors_state_dict(state: Mapping[str, torch.Tensor]) -> Converted:
    """Their state dict -> ours (see the module docstring); nothing is dropped without a reason in ``dropped``."""
    out = Converted()
    rest = dict(state)
    for key in ("cls_token", "pos_embed"):
        if rest.pop(key, None) is not None:
            out.dropped["the ViT class token and position table their ViTTM inherits and never uses"].append(key)
    _patch_embed(rest, out)
    for direction in ("read", "write"):
        layers = sorted({int(k.split(".")[1]) for k in rest if re.match(rf"{direction}_head\.\d+\.", k)})
        for i in layers:
            _head(rest, out, direction, i)
    depth = 1 + max((int(k.split(".")[1]) for k in rest if re.match(r"blocks\.\d+\.", k)), default=-1)
    for direction in ("read", "write"):
        for part in ("weight", "bias"):
            gate = rest.pop(f"{direction}_fusion.linear.{part}", None)
            if gate is not None:
                for i in range(depth):
                    out.state[f"layers.{i}.{direction}_fuse.gate.{part}"] = gate.clone()
                if part == "weight":
                    out.notes.append(f"their one {direction} add_erase gate copied into each of the {depth} layers")
    for key in list(rest):
        for pattern, ours in RENAMES:
            if re.fullmatch(pattern, key):
                out.state[re.sub(pattern, ours, key)] = rest.pop(key)
                break
    out.unmatched = sorted(rest)
    return out


def _patch_embed(rest: dict[str, torch.Tensor], out: Converted) -> None:
    """Their timm ``patch_embed`` is the memory embedder when memory_ps equals their patch size 16 (then both names
    hold the same tensors), else a dead ViT stem. A file saved with one name per tensor may keep only patch_embed."""
    has_memory = any(k.startswith("memory_embedder.") for k in rest)
    for part in ("weight", "bias"):
        tensor = rest.pop(f"patch_embed.proj.{part}", None)
        if tensor is None:
            continue
        if not has_memory:
            rest[f"memory_embedder.proj.{part}"] = tensor
            if part == "weight":
                out.notes.append("patch_embed.proj.* taken as the memory embedder (the file has no other memory stem)")
        elif torch.equal(tensor, rest.get(f"memory_embedder.proj.{part}", torch.empty(0))):
            out.dropped["the same tensors as memory_embedder.proj.* (memory_ps 16: one module, two names)"].append(
                f"patch_embed.proj.{part}")
        else:
            out.dropped[DEAD_PATCH_EMBED].append(f"patch_embed.proj.{part}")


def _head(rest: dict[str, torch.Tensor], out: Converted, direction: str, i: int) -> None:
    prefix = f"{direction}_head.{i}."
    keys = [k for k in rest if k.startswith(prefix)]
    modules = frozenset(k[len(prefix):].split(".")[0] for k in keys)
    kind = next((name for name, (mods, _) in HEAD_KINDS.items() if mods == modules), None)
    if kind is None:
        return  # left unmatched: the caller names the keys
    names = HEAD_KINDS[kind][1]
    ours = f"layers.{i}.{direction}."
    for key in keys:
        module, _, rest_key = key[len(prefix):].partition(".")
        if module in ("k", "v"):
            continue
        target = names[module]
        if target is None:
            out.dropped[DEAD_LIN_PROJ].append(key)
            rest.pop(key)
        else:
            out.state[ours + target + "." + rest_key] = rest.pop(key)
    if "k" in modules:
        for part in ("weight", "bias"):
            k, v = rest.pop(f"{prefix}k.{part}", None), rest.pop(f"{prefix}v.{part}", None)
            if k is None or v is None:  # a half head: put back whatever there was, to be named unmatched
                rest.update({f"{prefix}{n}.{part}": t for n, t in (("k", k), ("v", v)) if t is not None})
                continue
            out.state[f"{ours}kv.{part}"] = torch.cat([k, v], dim=0)  # [W_k | W_v]
