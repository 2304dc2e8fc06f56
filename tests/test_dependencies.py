"""The dependency rules of docs/ARCHITECTURE.md, checked on the imports of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megdet"

# What each part may import from megdet besides itself (megdet.config is the bottom layer): a part, or
# one module of a part (data.layout: the COCO layout's plain facts, no data pipeline).
ALLOWED = {
    "files": set(),
    "config": set(),
    "distributed": {"config"},
    "checkpoint": {"files"},
    "layers": {"config"},
    "data": {"config", "files"},
    "modeling": {"config", "files", "checkpoint", "layers", "data.layout"},
    "evaluation": {"config", "files", "distributed", "checkpoint", "data", "layers", "modeling"},
    "engine": {"config", "files", "distributed", "checkpoint", "data", "layers", "modeling", "evaluation"},
}


def _imported_modules(path: Path) -> set[str]:
    """The megdet modules ``path`` imports, without the ``megdet.`` prefix (``data.layout``, ``config``)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            packages = ("megdet", "megdet.data")  # "from megdet.data import layout": the module named
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module in packages else [node.module]
        modules |= {n.removeprefix("megdet.") for n in names if n.startswith("megdet.")}
    return modules


def _allowed(module: str, part: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in (*ALLOWED[part], part))


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_it_may(part: str) -> None:
    files = sorted((PACKAGE / part).rglob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / f"{part}.py"]
    assert files
    for path in files:
        extra = sorted(m for m in _imported_modules(path) if not _allowed(m, part))
        assert not extra, f"{path.relative_to(PACKAGE.parent)} imports megdet.{extra}"
