"""Number formatting and colours shared by the figures and tables of the benchmark and of the studies."""

from __future__ import annotations

import math


def significant(value: float, figures: int = 3) -> str:
    """At least ``figures`` significant figures and no exponent: 0.00362, 17.6, 1234 (never fixed decimals, which
    turn a small model's 0.00362 GMACs into 0.004)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, figures - 1 - math.floor(math.log10(abs(value))))}f}"


def colours(labels: list[str]) -> dict[str, tuple]:
    """One colour per configuration, the same in every figure of a report (sorted labels: reruns agree too)."""
    import matplotlib

    names = sorted(set(labels))
    if len(names) <= 20:  # qualitative maps: neighbours clearly distinct
        cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
        return {name: cmap(i) for i, name in enumerate(names)}
    cmap = matplotlib.colormaps["turbo"]
    return {name: cmap(i / (len(names) - 1)) for i, name in enumerate(names)}
