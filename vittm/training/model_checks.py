"""Every key of a model config checked before anything is built: one table per model family and per component.

``model_config_problems(cfg.model)`` returns one line per problem: ``model.<key>=<value>: <what is allowed>``.
When the value comes from a key the user sets directly (``rw_head: ${rw_head}``, ``in_chans: ${data.in_chans}``),
that key follows in parentheses, as typed: ``model.rw_head.latent_size_scale=0 (rw_head.latent_size_scale): ...``.

Each key is first checked alone (type and range, from the tables below), then, when all pass, the relations between
keys that the model would otherwise find minutes later or never (divisibility, token counts, hidden widths).
``null`` means "not set" for every key but a ``name``: ``create_model`` drops it and the model's default applies.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf

from vittm.core.registry import REGISTRIES, knob_names
from vittm.models import EVAL_HEADS, SIZES, ViTTM, is_vittm
from vittm.models.checks import GLOBAL_POOLS
from vittm.models.factory import VITTM_ONLY_ARGS


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Rule:
    """What one key accepts: ``ok(value)``, and the words that say so (``options``: a choice's values)."""

    ok: Callable[[Any], bool]
    allowed: str
    options: tuple = ()


def integer(low: int, note: str = "") -> Rule:
    return Rule(lambda v: _int(v) and v >= low, f"must be an integer >= {low}{note}")


def positive(note: str = "") -> Rule:
    return Rule(lambda v: _number(v) and v > 0, f"must be a number > 0{note}")


def choice(*options: Any) -> Rule:
    return Rule(lambda v: isinstance(v, str) and v in options, f"must be one of {list(options)}", options)


RATE = Rule(lambda v: _number(v) and 0 <= v < 1, "must be a number in [0, 1)")  # 1 would drop everything
BOOL = Rule(lambda v: isinstance(v, bool), "must be true or false")
FALSE = Rule(lambda v: v is False, "must be false (timm's ViT block does not support it)")
ODD = Rule(lambda v: _int(v) and v >= 1 and v % 2 == 1, "must be an odd integer >= 1 (the conv keeps the token count)")


@dataclass(frozen=True)
class Component:
    """A component spec: a name of the ``family`` registry, or ``{name: ..., knob: ...}`` with its knobs."""

    family: str


# ViTTM's constructor, key by key (the model/*.yaml files, conf/model_common/vittm.yaml, and what `+model.x=` adds).
VITTM_KEYS: dict[str, Rule | Component] = {
    "num_classes": integer(1, " (null: from the data)"),
    "in_chans": integer(1),
    "img_size": integer(1, " (the input is img_size x img_size)"),
    "embed_dim": integer(1),
    "depth": integer(1),
    "num_heads": integer(1),
    "mlp_ratio": positive(" (the ViT blocks' MLP width is embed_dim x mlp_ratio)"),
    "qkv_bias": BOOL,
    "memory_ps": integer(1),
    "process_ps": integer(1),
    "process_tokens": integer(1, " (null: (img_size / process_ps)^2)"),
    "rw_head": Component("rw_head"),
    "read_head": Component("rw_head"),  # null: rw_head
    "write_head": Component("rw_head"),
    "fusion": Component("fusion"),
    "process_embed": Component("process_embed"),
    "memory_block": Component("memory_block"),
    "eval_head": choice(*EVAL_HEADS),
    "drop_rate": RATE,
    "proj_drop_rate": RATE,
    "attn_drop_rate": RATE,
    "drop_path_rate": RATE,
    "global_pool": choice(*GLOBAL_POOLS),
}

# timm's VisionTransformer (the ViT/DeiT baselines): its keywords that a config can hold (not the layer classes).
BASELINE_KEYS: dict[str, Rule] = {
    "num_classes": VITTM_KEYS["num_classes"],
    "in_chans": integer(1),
    "img_size": VITTM_KEYS["img_size"],
    "patch_size": integer(1),
    "global_pool": choice("token", "avg", "avgmax", "max", "map", "prr", ""),
    "embed_dim": integer(1),
    "depth": integer(1),
    "num_heads": integer(1),
    "mlp_ratio": VITTM_KEYS["mlp_ratio"],
    "qkv_bias": BOOL,
    "qk_norm": BOOL,
    "scale_attn_norm": FALSE,
    "scale_mlp_norm": FALSE,
    "proj_bias": BOOL,
    "init_values": positive(" (layer scale's initial value; null: no layer scale)"),
    "class_token": BOOL,
    "pos_embed": choice("learn", "none", ""),
    "no_embed_class": BOOL,
    "reg_tokens": integer(0),
    "pre_norm": BOOL,
    "final_norm": BOOL,
    "fc_norm": BOOL,  # null: timm decides from global_pool
    "pool_include_prefix": BOOL,
    "dynamic_img_size": BOOL,
    "dynamic_img_pad": BOOL,
    "drop_rate": RATE,
    "pos_drop_rate": RATE,
    "patch_drop_rate": RATE,
    "proj_drop_rate": RATE,
    "attn_drop_rate": RATE,
    "drop_path_rate": RATE,
    "weight_init": choice("", "jax", "jax_nlhb", "moco", "reset", "skip"),
    "fix_init": BOOL,
}

# Each registered component's knobs (constructor keywords the model does not own), by family and name.
LATENT_SCALE = integer(1, " (the latent width is embed_dim / latent_size_scale)")
PROCESS_TOKENS = integer(1, " (null: model.process_tokens, else (img_size / process_ps)^2)")
COMPONENT_KEYS: dict[str, dict[str, dict[str, Rule]]] = {
    "rw_head": {
        "lin": {"latent_size_scale": LATENT_SCALE, "eps": positive(" (keeps the denominator away from 0)")},
        "ca": {},
        "lca": {"latent_size_scale": LATENT_SCALE},
        "la": {"latent_size_scale": LATENT_SCALE, "hidden_dim": integer(1)},
        "tl": {},
        "dyna": {"reduced_dim": integer(1)},
    },
    "fusion": {"residual": {}, "erase": {}, "add_erase": {}},
    "process_embed": {
        "patch": {"process_tokens": PROCESS_TOKENS},
        "downsample": {"process_tokens": PROCESS_TOKENS},
        "latent": {"process_tokens": PROCESS_TOKENS},
    },
    "memory_block": {
        "none": {},
        "mlp": {"memory_mlp_ratio": positive(" (the hidden width is embed_dim x memory_mlp_ratio)")},
        "conv": {"depth": integer(1), "kernel_size": ODD},
    },
}


def _close(value: Any, names: list[str]) -> str:
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def interpolation_sources(model_cfg: DictConfig) -> dict[str, str]:
    """Model keys whose value is a plain ``${key}`` interpolation -> that key (``rw_head`` -> ``rw_head``)."""
    raw = OmegaConf.to_container(model_cfg, resolve=False)
    found = {k: re.fullmatch(r"\$\{([\w.]+)\}", v) for k, v in raw.items() if isinstance(v, str)}
    return {k: m.group(1) for k, m in found.items() if m}


class Problems(list):
    """The lines found so far; ``add`` writes one as ``model.<path>=<value> (<source>): <rule>``."""

    def __init__(self, sources: Mapping[str, str]) -> None:
        super().__init__()
        self.sources = sources

    def add(self, path: tuple[str, ...], value: Any, rule: str) -> None:
        source = self.sources.get(path[0])
        where = f" ({'.'.join([source, *path[1:]])})" if source else ""
        self.append(f"model.{'.'.join(path)}={value!r}{where}: {rule}")

    def check(self, path: tuple[str, ...], value: Any, rule: Rule) -> None:
        if not rule.ok(value):
            hint = _close(value, [str(o) for o in rule.options]) if rule.options and isinstance(value, str) else ""
            self.add(path, value, rule.allowed + hint)

    def unknown(self, path: tuple[str, ...], value: Any, owner: str, allowed: list[str]) -> None:
        self.add(path, value, f"not an option of {owner}; its options are {sorted(allowed)}{_close(path[-1], allowed)}")


def model_config_problems(model_cfg: Mapping, sources: Mapping[str, str] | None = None) -> list[str]:
    """One line per problem of a model config (a ``DictConfig``: its interpolations name their sources; a plain,
    resolved mapping: pass ``sources``, model key -> the key it is interpolated from)."""
    if isinstance(model_cfg, DictConfig):
        sources = interpolation_sources(model_cfg) if sources is None else sources
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    problems = Problems(sources or {})
    name, known = model_cfg.get("name"), timm.list_models()
    if not isinstance(name, str) or name not in known:
        problems.add(("name",), name, f"must be a ViTTM model {sorted(SIZES)} or a timm baseline, e.g. "
                                      f"vit_small_patch16_224, deit_small_patch16_224{_close(name, known)}")
        return list(problems)
    table = VITTM_KEYS if is_vittm(name) else BASELINE_KEYS
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, value in model_cfg.items():
        if key == "name" or value is None:
            continue
        rule = table.get(key)
        if rule is None:
            if table is BASELINE_KEYS and key in VITTM_ONLY_ARGS:
                problems.add((key,), value, f"a ViTTM option; model.name={name!r} is a timm baseline and takes none")
            else:
                owner = "ViTTM models" if table is VITTM_KEYS else f"timm's ViT ({name!r})"
                problems.unknown((key,), value, owner, list(table))
        elif isinstance(rule, Component):
            spec = _check_spec(problems, (key,), value, rule.family)
            if spec:
                specs[key] = spec
        else:
            problems.check((key,), value, rule)
    if not problems:  # relations only between values that are each fine
        given = {k: v for k, v in model_cfg.items() if v is not None}
        if table is VITTM_KEYS:
            _vittm_relations(problems, name, given, specs)
        else:
            _baseline_relations(problems, name, given)
    return list(problems)


def _check_spec(problems: Problems, path: tuple[str, ...], spec: Any, family: str) -> tuple[str, dict] | None:
    """A component spec's name and knobs, each checked; (name, knobs) when the name is known."""
    registry = REGISTRIES[family]
    if isinstance(spec, str):
        spec, name_path = {"name": spec}, path
    elif isinstance(spec, Mapping) and "name" in spec:
        name_path = (*path, "name")
    else:
        problems.add(path, spec, f"must be a {family} name {registry.names()} or a mapping with a 'name' key")
        return None
    name = spec["name"]
    if not isinstance(name, str) or name not in registry:
        problems.add(name_path, name, f"must be one of {registry.names()}{_close(name, registry.names())}")
        return None
    # A component registered by user code has no table entry: its constructor's knobs, unchecked in range
    rules = COMPONENT_KEYS[family].get(name, dict.fromkeys(knob_names(registry.get(name)), Rule(lambda v: True, "")))
    knobs = {k: v for k, v in spec.items() if k != "name"}
    for knob, value in knobs.items():
        if knob not in rules:
            problems.unknown((*path, knob), value, f"{family} {name!r}", ["name", *rules])
        elif value is not None:
            problems.check((*path, knob), value, rules[knob])
    return name, {k: v for k, v in knobs.items() if v is not None}


def _defaults(cls: type) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def _vittm_relations(problems: Problems, name: str, given: dict[str, Any],
                     specs: dict[str, tuple[str, dict]]) -> None:
    """What each key allows given the others; ``given`` falls back on the size's and ViTTM's defaults."""
    eff = {**_defaults(ViTTM), **SIZES[name], **given}
    for key in ("rw_head", "fusion", "process_embed", "memory_block"):
        if key not in specs:  # a default spec (a name or a dict, never wrong)
            default = eff[key]
            specs[key] = (default, {}) if isinstance(default, str) else (default["name"], dict(default))
            specs[key][1].pop("name", None)
    D, heads, size = eff["embed_dim"], eff["num_heads"], eff["img_size"]
    if D % heads:
        problems.add(("num_heads",), heads, f"must divide model.embed_dim={D} (each head gets embed_dim / num_heads "
                                            f"channels)")
    if int(D * eff["mlp_ratio"]) < 1:
        problems.add(("mlp_ratio",), eff["mlp_ratio"], f"model.embed_dim={D} x mlp_ratio leaves the MLP no hidden "
                                                       f"unit; must be >= 1/{D}")
    for key in ("memory_ps", "process_ps"):
        if size % eff[key]:
            problems.add(("img_size",), size,
                         f"not divisible by model.{key}={eff[key]}; both patch sizes must divide it")
    for key in ("rw_head", "read_head", "write_head"):
        if key == "rw_head" and "read_head" in specs and "write_head" in specs:
            continue  # both directions overridden: rw_head is never built
        if key in specs:  # (heads that do not divide D were named above: the latent width's split is moot)
            _latent_width(problems, key, *specs[key], D, heads if D % heads == 0 else 1)
    if not problems:
        _process_tokens(problems, eff, specs["process_embed"], size)
    block, knobs = specs["memory_block"]
    if block == "mlp":
        ratio = {**_defaults(REGISTRIES["memory_block"].get("mlp")), **knobs}["memory_mlp_ratio"]
        if int(D * ratio) < 1:
            problems.add(("memory_block", "memory_mlp_ratio"), ratio,
                         f"model.embed_dim={D} x memory_mlp_ratio leaves the memory MLP no hidden unit; "
                         f"must be >= 1/{D}")


def _latent_width(problems: Problems, key: str, head: str, knobs: dict, D: int, heads: int) -> None:
    """c = D / latent_size_scale must be whole, and split over the heads of a multi-head head."""
    cls = REGISTRIES["rw_head"].get(head)
    scale = {**_defaults(cls), **knobs}.get("latent_size_scale")
    if scale is None:
        return
    path = (key, "latent_size_scale")
    if D % scale:
        problems.add(path, scale, f"must divide model.embed_dim={D}")
    elif "num_heads" in inspect.signature(cls).parameters and (D // scale) % heads:
        problems.add(path, scale, f"the latent width model.embed_dim / latent_size_scale = {D}/{scale} = {D // scale} "
                                  f"must be divisible by model.num_heads={heads}")


def _process_tokens(problems: Problems, eff: dict, process_embed: tuple[str, dict], size: int) -> None:
    """The process token count: one place sets it, the patch embedder's is fixed, downsample's must be square."""
    embed, knobs = process_embed
    model_n, knob_n = eff.get("process_tokens"), knobs.get("process_tokens")
    if model_n is not None and knob_n is not None and model_n != knob_n:
        problems.add(("process_tokens",), model_n,
                     f"disagrees with model.process_embed.process_tokens={knob_n}; set one of them")
        return
    n, path = (knob_n, ("process_embed", "process_tokens")) if knob_n is not None else (model_n, ("process_tokens",))
    grid = (size // eff["process_ps"]) ** 2
    if embed == "patch" and n is not None and n != grid:
        problems.add(path, n, f"the patch embedder makes (model.img_size / model.process_ps)^2 = {grid} tokens; "
                              f"leave it null, or choose process_embed=downsample or latent to set the count")
    elif embed == "downsample" and n is not None and math.isqrt(n) ** 2 != n:
        side = math.isqrt(n)
        problems.add(path, n, f"must be a perfect square for the downsample embedder (it pools the memory grid to a "
                              f"square), e.g. {side * side} or {(side + 1) ** 2}")


@functools.cache
def _baseline_defaults(name: str) -> dict[str, Any]:
    """The widths a timm entrypoint picks itself (its model_args are not exposed): read off the model built on the
    meta device, which allocates nothing; empty for a model that is not a ViT."""
    try:
        with torch.device("meta"):
            net = timm.create_model(name, num_classes=0)
        embed = net.patch_embed
        return dict(embed_dim=net.embed_dim, num_heads=net.blocks[0].attn.num_heads, img_size=embed.img_size[0],
                    patch_size=embed.patch_size[0], global_pool=net.global_pool, class_token=net.has_class_token)
    except Exception:  # noqa: BLE001  (another architecture: only the keys the config sets are related)
        return {}


def _baseline_relations(problems: Problems, name: str, given: dict[str, Any]) -> None:
    """The same relations for timm's ViT; ``given`` falls back on what the entrypoint picks."""
    eff = {**_baseline_defaults(name), **given}
    D, heads, size, patch = (eff.get(k) for k in ("embed_dim", "num_heads", "img_size", "patch_size"))
    if D and heads and D % heads:
        problems.add(("num_heads",), heads, f"must divide model.embed_dim={D} (each head gets embed_dim / num_heads "
                                            f"channels)")
    if D and eff.get("mlp_ratio") and int(D * eff["mlp_ratio"]) < 1:
        problems.add(("mlp_ratio",), eff["mlp_ratio"], f"model.embed_dim={D} x mlp_ratio leaves the MLP no hidden "
                                                       f"unit; must be >= 1/{D}")
    if size and patch and size % patch and not eff.get("dynamic_img_pad"):
        problems.add(("img_size",), size, f"not divisible by model.patch_size={patch} (the border would be dropped; "
                                          f"or set model.dynamic_img_pad=true)")
    if eff.get("class_token") is False and eff.get("global_pool") == "token":
        key = "class_token" if "class_token" in given else "global_pool"
        problems.add((key,), eff[key], "token pooling (model.global_pool='token') needs model.class_token=true; "
                                       "set model.global_pool=avg")


def build_problem(message: str, model_cfg: Mapping, sources: Mapping[str, str] | None = None) -> str:
    """A model builder's error as one line that names the model key it mentions first (top-level or a component's
    knob), or the model when it names none."""
    problems = Problems(sources or {})
    paths = [(k,) for k in model_cfg if k != "name"]
    paths += [(k, knob) for k, v in model_cfg.items() if isinstance(v, Mapping) for knob in v if knob != "name"]
    # a component's knob before the component itself ("rw_head 'lin': latent_size_scale=..."), then the first named
    hits = [(-len(p), m.start(), p) for p in paths if (m := re.search(rf"(?<![\w.]){re.escape(p[-1])}\b", message))]
    if not hits:
        return f"model: {message} (model.name={model_cfg.get('name')!r})"
    path = min(hits)[2]
    value = model_cfg[path[0]] if len(path) == 1 else model_cfg[path[0]][path[1]]
    problems.add(path, value, message)
    return problems[0]
