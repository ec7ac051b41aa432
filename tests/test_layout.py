"""The package's rooms depend only downwards (README "Development"): core < models < data < training < tasks <
bench, studies. Checked on the import statements of every module, so a new upward import fails here."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import vittm

# rank: a module may import rooms of a lower rank only (models and data, bench and studies: never each other)
ROOMS = {"core": 0, "models": 1, "data": 1, "training": 2, "tasks": 3, "bench": 4, "studies": 4}


def parse(source: str) -> ast.Module:
    """ast.parse with the garbage collector held off. In CPython 3.11 (CI has 3.11.7) the AST builder keeps its
    recursion-depth counter in state shared by the whole interpreter. A collection in the middle of a build can run
    Python code (finalizers left by earlier tests: numba's raise in theirs), and if that code parses source itself,
    or lets another thread do so, the counter is reset under the outer build, which then raises "SystemError: AST
    constructor recursion depth mismatch" (cpython gh-106905 and its neighbours). Seen once in CI. With the
    collector off, the build runs no Python code, so nothing can interleave."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        if enabled:
            gc.enable()


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vittm."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vittm.")}
    return found


def test_every_room_imports_only_rooms_below_it():
    root = Path(vittm.__file__).parent
    wrong = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 2:  # vittm/__init__.py: the package's front door may import any room
            continue
        room = parts[0]
        for other in imports(path) - {room}:
            if other not in ROOMS:
                wrong.append(f"{path.relative_to(root)} imports vittm.{other}, which is no room")
            elif ROOMS[other] > ROOMS[room] or (ROOMS[other] == ROOMS[room]):
                wrong.append(f"{path.relative_to(root)} ({room}) imports vittm.{other}")
    assert not wrong, "\n".join(wrong)
