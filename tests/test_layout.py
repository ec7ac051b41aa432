"""The package's rooms depend only downwards (README "Development"): core < models < data < training < tasks <
bench, studies. Checked on the import statements of every module, so a new upward import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import vittm

# rank: a module may import rooms of a lower rank only (models and data, bench and studies: never each other)
ROOMS = {"core": 0, "models": 1, "data": 1, "training": 2, "tasks": 3, "bench": 4, "studies": 4}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
