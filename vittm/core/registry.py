"""One small registry class, one instance per family of research components.

timm's own registry names whole models; the pieces *inside* a ViTTM (read/write heads, fusion, process
embedders, memory blocks) are named here, so a config can say ``rw_head: {name: lin, latent_size_scale: 4}``
and the model fills in the dimensions it owns (width, heads, token counts). Written by hand: neither timm nor
Hydra offers a registry that takes a spec as ``name | {name: ..., **knobs} | class`` plus model-owned dims.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

Spec = str | Mapping[str, Any] | type


class Registry:
    """Names -> component classes for one family (``arg`` is the keyword users set, e.g. ``rw_head``)."""

    def __init__(self, arg: str) -> None:
        self.arg = arg
        self._entries: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: ``@RW_HEADS.register("lin")``. A name can be registered once."""

        def add(cls: type) -> type:
            if name in self._entries:
                raise ValueError(f"{self.arg}: {name!r} is already registered (by {self._entries[name].__qualname__})")
            self._entries[name] = cls
            cls.registry_name = name
            return cls

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str, arg: str | None = None) -> type:
        """The class registered as ``name``; an unknown name raises listing the known ones and the closest."""
        if name not in self._entries:
            arg = arg or self.arg
            close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{arg}={name!r} is not a known {self.arg}; choose one of {self.names()}{hint}")
        return self._entries[name]

    def parse(self, spec: Spec, arg: str | None = None) -> tuple[type, dict[str, Any]]:
        """Split a spec into (class, knobs), checking the knobs against the class's constructor."""
        arg = arg or self.arg
        if isinstance(spec, type):
            return spec, {}
        if isinstance(spec, str):
            return self.get(spec, arg), {}
        if isinstance(spec, Mapping):
            knobs = dict(spec)
            if "name" not in knobs:
                raise ValueError(f"{arg}={dict(spec)!r} needs a 'name' key; choose one of {self.names()}")
            cls = self.get(knobs.pop("name"), arg)
            allowed = knob_names(cls)
            unknown = sorted(set(knobs) - set(allowed))
            if unknown:
                raise ValueError(f"{arg}: {cls.registry_name!r} has no option {unknown}; its options are {allowed}")
            return cls, knobs
        raise TypeError(f"{arg} must be a name, a dict with a 'name' key, or a class; got {type(spec).__name__}")

    def build(self, spec: Spec, *, arg: str | None = None, **dims: Any) -> Any:
        """Instantiate ``spec`` with the model-owned ``dims`` plus the spec's own knobs.

        ``arg`` only names the keyword in error messages (e.g. ``read_head`` when it overrides ``rw_head``).
        Dims a component does not name in its constructor are dropped (``**kwargs`` takes none), so each class
        declares just what it needs.
        """
        cls, knobs = self.parse(spec, arg)
        params = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in dims.items() if k in params}
        kwargs.update(knobs)
        return cls(**kwargs)


def spec_name(spec: Spec) -> str | None:
    """The registry name a spec refers to (``None`` for a class that was never registered)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return spec.get("name")
    return getattr(spec, "registry_name", None)


# Constructor arguments every component may receive from the model (never set from a config).
MODEL_DIMS = frozenset(
    {"dim", "num_heads", "num_src", "num_dst", "num_tokens", "in_chans", "img_size", "memory_ps", "process_ps"}
)


def knob_names(cls: type) -> list[str]:
    """The user-settable options of a component: constructor keywords that the model does not own."""
    params = inspect.signature(cls).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in MODEL_DIMS]


RW_HEADS = Registry("rw_head")
FUSIONS = Registry("fusion")
PROCESS_EMBEDS = Registry("process_embed")
MEMORY_BLOCKS = Registry("memory_block")

REGISTRIES: dict[str, Registry] = {r.arg: r for r in (RW_HEADS, FUSIONS, PROCESS_EMBEDS, MEMORY_BLOCKS)}
