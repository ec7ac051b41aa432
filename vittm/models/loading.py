"""Weight files into a ViTTM: every format we know, loaded exactly or refused with one line.

Every path that accepts weights goes through ``load_weights``: timm's ``pretrained=True,
pretrained_cfg_overlay=dict(file=...)`` (the entrypoints set timm's ``custom_load``, so timm calls
``ViTTM.load_pretrained``), ``finetune.from_ckpt=``, ``mode=eval ckpt_path=`` for a weights file, and ``python -m
vittm.models.convert`` (``read_state_dict`` + ``to_vittm_layout``, no model needed).

What a file may hold (read weights-only, or as ``.safetensors``; vittm.core.files):
- a state dict in our layout, the authors' (vittm.models.authors) or a timm ViT's (vittm.models.from_vit: an
  initialisation of the encoder, the rest stays fresh and the load says so);
- wrapped as training tools save them: a Lightning checkpoint (ours: ``net.*``/``ema.module.*``; the authors':
  ``model.*``/``ema_model.module.*``), timm's ``state_dict_ema``/``model_ema``/``state_dict``/``model`` entries,
  DDP's or ``AveragedModel``'s ``module.``, ``torch.compile``'s ``_orig_mod.``, ``AveragedModel``'s ``n_averaged``.
  Where a file holds both live and EMA weights, the EMA weights are taken.

Then the weights must fit the model exactly: the classifier heads are kept when their class count is the model's,
otherwise replaced by fresh zero heads and said so (``heads="require"`` refuses instead, for evaluation); position
tables are resampled to the model's grids and patch kernels' input channels adapted (timm's helpers), and said so;
any other key the model lacks, parameter the file lacks or shape that differs refuses the whole file, naming the
keys. Nothing is loaded before everything fits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv
from torch import nn

from vittm.core.errors import ConfigError
from vittm.core.files import read_weight_file
from vittm.models.authors import convert_authors_state_dict, is_authors_layout
from vittm.models.from_vit import convert_vit_state_dict
from vittm.models.vittm import ViTTM

_logger = logging.getLogger(__name__)

HEADS = ("head.", "process_head.")
# Where training tools keep the weights inside a saved dict (timm's order: EMA first).
CONTAINERS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Prefixes of a model inside a training module's state dict: (prefix, what it holds), EMA first.
SUB_MODELS = (("ema.module.", "EMA weights"), ("ema_model.module.", "EMA weights"), ("net.", "live weights"),
              ("model.", "live weights"))
WRAPPERS = (("module.", "DDP / AveragedModel"), ("_orig_mod.", "torch.compile"))
FORMATS = {"vittm": "this framework's", "authors": "the authors' (EfficientTTMs)", "timm-vit": "a timm ViT's"}
HeadPolicy = Literal["auto", "require"]
# Our read/write heads' sub-modules (rw_heads.py), to name a file's head kind in messages.
HEAD_PARTS = {"lin": {"q", "kv"}, "ca or lca": {"q", "kv", "q_norm", "k_norm", "v_norm", "proj"},
              "la": {"q_norm", "k_norm", "q_mlp", "k_mlp"}, "tl": {"norm", "mlp"},
              "dyna": {"norm", "compress", "generate", "proj"}}


class WeightsError(ConfigError):
    """A weight file that does not fit: unknown format, missing or extra keys, shapes that differ."""


@dataclass
class Weights:
    """A state dict read from a file, in one of FORMATS, with what reading it took off (``notes``, ``dropped``)."""

    state: dict[str, torch.Tensor]
    source: str
    fmt: str = ""
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # why -> keys


@dataclass
class WeightsReport:
    """What ``load_weights`` did; ``str()`` is the one-line summary it logs."""

    source: str
    fmt: str
    loaded: list[str]  # the model's keys whose values came from the file
    notes: list[str]
    dropped: dict[str, list[str]]
    heads: str

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source} ({FORMATS[self.fmt]} key names)"]
        parts += self.notes
        if self.dropped:
            parts.append("dropped " + "; ".join(f"{len(k)} {why} ({', '.join(k[:4])}{', ...' if len(k) > 4 else ''})"
                                               for why, k in self.dropped.items()))
        return "; ".join(parts + [self.heads])


def read_state_dict(source: str | Path | Mapping[str, Any], key: str = "file") -> Weights:
    """The model weights inside ``source`` (a path or an already loaded dict), unwrapped (see the module docstring)."""
    name = repr(str(source)) if isinstance(source, str | Path) else "the given state dict"
    obj = read_weight_file(source, key=key) if isinstance(source, str | Path) else source
    out = Weights(state={}, source=name)
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{key}={name}: holds a {type(obj).__name__}, not a state dict")
    inner = next((k for k in CONTAINERS if isinstance(obj.get(k), Mapping)), None)
    if inner is not None:
        out.notes.append(f"the file's {inner!r} entry")
        obj = obj[inner]
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if others:
        raise WeightsError(f"{key}={name}: not a state dict: entries {others[:5]} are not tensors")
    state = dict(obj)
    counts = [k for k in state if k == "n_averaged" or k.endswith(".n_averaged")]
    if counts:
        out.dropped["AveragedModel update count"] = counts
        state = {k: v for k, v in state.items() if k not in counts}
    for prefix, what in SUB_MODELS:
        chosen = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if chosen:
            left = [k for k in state if not k.startswith(prefix)]
            out.notes.append(f"its {what} ({prefix}*)" + (f", leaving out {len(left)} other tensors" if left else ""))
            if left:
                out.dropped[f"tensors beside the {what}"] = left
            state = chosen
            break
    stripped = True
    while stripped and state:
        stripped = False
        for prefix, tool in WRAPPERS:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                out.notes.append(f"{tool} prefix {prefix!r} removed")
                stripped = True
    out.state = state
    out.fmt = detect_format(state)
    if not out.fmt:
        raise WeightsError(
            f"{key}={name}: not a ViTTM state dict (ours: 'memory_embed.weight', 'layers.N.*'; the authors': "
            f"'memory_embedder.proj.weight', 'read_head.N.*') nor a timm ViT's ('patch_embed.proj.weight', "
            f"'blocks.N.*'); it holds e.g. {sorted(state)[:6]}"
        )
    return out


def detect_format(state: Mapping[str, Any]) -> str:
    if "memory_embed.weight" in state and any(k.startswith("layers.") for k in state):
        return "vittm"
    if is_authors_layout(state):
        return "authors"
    if "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state):
        return "timm-vit"
    return ""


def to_vittm_layout(weights: Weights, key: str = "file") -> Weights:
    """Ours or the authors' -> our key names (model-free; a timm ViT needs a model: ``load_weights``)."""
    if weights.fmt == "authors":
        converted = convert_authors_state_dict(weights.state)
        if converted.unmatched:
            raise WeightsError(
                f"{key}={weights.source}: the authors' layout, but {len(converted.unmatched)} keys fit nothing in a "
                f"ViTTM: {converted.unmatched[:8]}; nothing was loaded"
            )
        weights.state = converted.state
        weights.notes += converted.notes
        weights.dropped.update(converted.dropped)
    elif weights.fmt != "vittm":
        raise WeightsError(f"{key}={weights.source}: a timm ViT's weights, not a ViTTM's; to start a ViTTM from them, "
                           f"load them into one (pretrained_cfg_overlay=dict(file=...) or finetune.from_ckpt=...)")
    return weights


def load_weights(
    model: nn.Module, source: str | Path | Mapping[str, Any], key: str = "file", heads: HeadPolicy = "auto"
) -> WeightsReport:
    """Load ``source`` into ``model`` exactly, or raise ``WeightsError`` and load nothing; logs the report (a warning
    when the heads were replaced or a ViTTM got a timm ViT's weights, which initialise its encoder only). A baseline
    (a timm ViT or DeiT) takes its own layout, with the same rules for heads and shapes."""
    weights = read_state_dict(source, key)
    if isinstance(model, ViTTM) and weights.fmt == "timm-vit":
        return init_from_vit(model, weights, key)
    if isinstance(model, ViTTM):
        weights = to_vittm_layout(weights, key)
    own = model.state_dict()
    in_file = describe(weights.state)  # before any adapting, for the error message
    state, heads_note, replaced = fit_heads(model, weights, own, key, heads)
    notes = weights.notes + fit_shapes(model, state, own)
    problems = []
    wrong = [f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = sorted(own.keys() - state.keys() - ({k for k in own if k.startswith(HEADS)} if replaced else set()))
    extra = sorted(state.keys() - own.keys())
    for what, keys in (("shapes differ", wrong), ("the model has no", extra), ("the file lacks", missing)):
        if keys:
            problems.append(f"{what} {keys[:5]}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}")
    if problems:
        raise WeightsError(
            f"{key}={weights.source}: does not fit this model ({type(model).__name__} with {describe(own)}; the file: "
            f"{in_file}): {'; '.join(problems)}; nothing was loaded"
        )
    model.load_state_dict({**own, **state}, strict=True)
    report = WeightsReport(weights.source, weights.fmt, sorted(state), notes, weights.dropped, heads_note)
    (_logger.warning if replaced else _logger.info)("%s: %s", key, report)
    return report


def init_from_vit(model: ViTTM, weights: Weights, key: str) -> WeightsReport:
    """A timm ViT's weights start a ViTTM's encoder (vittm.models.from_vit); the load says what stays fresh."""
    state, loaded, skipped = convert_vit_state_dict(weights.state, model)
    model.load_state_dict(state, strict=True)
    if skipped:
        weights.dropped["ViT tensors without a ViTTM counterpart"] = skipped
    report = WeightsReport(weights.source, weights.fmt, loaded, weights.notes, weights.dropped,
                           "read/write heads, their norms, memory blocks and both classifiers start fresh")
    _logger.warning("%s: %s", key, report)
    return report


def fit_heads(model: nn.Module, weights: Weights, own: Mapping[str, torch.Tensor], key: str,
              policy: HeadPolicy) -> tuple[dict[str, torch.Tensor], str, bool]:
    """(state to load, what happened to the heads, whether the model's fresh heads stay)."""
    state = weights.state
    theirs = state["head.weight"].shape[0] if "head.weight" in state else None
    ours = own["head.weight"].shape[0] if "head.weight" in own else 0
    heads, fresh = ("both heads", "fresh zero heads") if isinstance(model, ViTTM) else ("the head", "a fresh head")
    if theirs == ours and ours:
        return state, f"{heads} kept ({ours} classes)", False
    if policy == "require" and ours:
        why = f"its heads are for {theirs} classes" if theirs else "it has no classifier heads"
        raise WeightsError(f"{key}={weights.source}: {why} but the model has {ours}; to start from it on other "
                           f"classes, fine-tune (finetune.from_ckpt=...)")
    without = {k: v for k, v in state.items() if not k.startswith(HEADS)}
    if not ours:
        return without, "no classifier heads (num_classes=0)" + (", the file's left out" if theirs else ""), False
    why = f"the file's are for {theirs} classes" if theirs else "the file has none"
    return without, f"{heads} replaced by {fresh} for {ours} classes ({why})", True


def fit_shapes(model: nn.Module, state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> list[str]:
    """Resample position tables to the model's grids and adapt patch kernels to its input channels (in place);
    returns what was done."""
    notes = []
    for key, grid in (("memory_pos_embed", getattr(model, "memory_grid", None)),
                      ("process_pos_embed", getattr(model, "process_grid", None))):
        table = state.get(key)
        if table is None or key not in own or table.shape == own[key].shape or grid is None:
            continue
        side = math.isqrt(table.shape[1])
        if side * side == table.shape[1] and table.shape[2] == own[key].shape[2] and min(grid) > 1:
            state[key] = resample_abs_pos_embed(table.float(), list(grid), old_size=(side, side),
                                                num_prefix_tokens=0).to(table.dtype)
            notes.append(f"{key} resampled from {side}x{side} to {grid[0]}x{grid[1]}")
    for key in ("memory_embed.weight", "process_embed.proj.weight"):
        kernel = state.get(key)
        if kernel is not None and key in own and kernel.shape[1] != own[key].shape[1] \
                and kernel.shape[2:] == own[key].shape[2:]:
            state[key] = adapt_input_conv(own[key].shape[1], kernel.float()).to(kernel.dtype)
            notes.append(f"{key} adapted from {kernel.shape[1]} to {own[key].shape[1]} input channels")
    return notes


def describe(state: Mapping[str, torch.Tensor]) -> str:
    """What a state dict in our layout says about its model (for error messages and the converter)."""
    if "memory_embed.weight" not in state:
        return "no memory embedding"
    kernel = state["memory_embed.weight"]
    layers = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("layers.")), default=-1)
    text = f"D {kernel.shape[0]}, {layers} layers, memory_ps {kernel.shape[-1]}, {kernel.shape[1]} input channels"
    if "process_embed.proj.weight" in state:
        text += f", process_ps {state['process_embed.proj.weight'].shape[-1]}"
    modules = {k.split(".")[3] for k in state if k.startswith("layers.0.read.")}
    kind = next((name for name, parts in HEAD_PARTS.items() if parts == modules), "unknown")
    width = f" with q width {state['layers.0.read.q.weight'].shape[0]}" if "layers.0.read.q.weight" in state else ""
    text += f", {kind} read heads{width}"
    if "head.weight" in state:
        text += f", {state['head.weight'].shape[0]} classes"
    return text


def weights_filter(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``, used when a state dict (not a file) is handed to timm: load it ourselves,
    exactly, then give timm the model's own state dict, so that timm's later pass (which drops heads whenever the
    class count differs from the config's 1000) changes nothing."""
    load_weights(model, state_dict, key="pretrained_cfg.state_dict")
    return model.state_dict()
