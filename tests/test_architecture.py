"""The module map of docs/ARCHITECTURE.md is true: every module is on it, no module imports from a
row below its own, and a long file says at its top why it is long."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "drasclr_lib"
MAP = ROOT / "docs" / "ARCHITECTURE.md"
ANYWHERE = {"testing", "runner", "cli"}  # the last rows: they may import anything
MAX_LINES = 350


def map_rows() -> list[list[str]]:
    """The module names of each row of the map, in order (``.x`` completes the row's first name's
    package; ``pkg`` and ``pkg.*`` stand for every module of ``pkg`` not named on its own)."""
    rows, inside = [], False
    for line in MAP.read_text(encoding="utf-8").splitlines():
        if line.startswith("## Map"):
            inside = True
        elif inside and line.startswith("## "):
            break
        elif inside and line.startswith("| `"):
            names, package = [], ""
            for name in re.findall(r"`([\w.*]+)`", line.split("|")[1]):
                if name.startswith("."):
                    name = package + name
                else:
                    package = name.rsplit(".", 1)[0] if "." in name else name
                names.append(name)
            rows.append(names)
    return rows


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def row_of(module: str, rows: list[list[str]]) -> int | None:
    """The row of the most specific map entry naming ``module``: itself, or a package above it
    (``pkg`` or ``pkg.*``)."""
    best, best_len = None, -1
    for i, names in enumerate(rows):
        for name in names:
            name = name[:-2] if name.endswith(".*") else name
            if module == name or module.startswith(name + "."):
                if len(name) > best_len:
                    best, best_len = i, len(name)
    return best


def imports_of(path: Path) -> set[str]:
    """The ``drasclr_lib`` modules a file imports (at any depth, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("drasclr_lib."):
            found.add(node.module[len("drasclr_lib."):])
        elif isinstance(node, ast.Import):
            found.update(a.name[len("drasclr_lib."):] for a in node.names if a.name.startswith("drasclr_lib."))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_the_map_parses():
    rows = map_rows()
    assert len(rows) > 15 and ["utils", "intensity"] in rows and any("preprocess.pipeline" in r for r in rows)


def test_every_module_is_on_the_map():
    rows = map_rows()
    missing = [module_name(p) for p in MODULES if row_of(module_name(p), rows) is None]
    assert not missing, f"modules missing from the map in {MAP.name}: {missing}"


def _nearest_row(module: str, rows) -> int | None:
    """Row of an imported module, or of the package it names (``drasclr_lib.data.patch_store``)."""
    while module:
        row = row_of(module, rows)
        if row is not None:
            return row
        candidates = [row_of(module_name(p), rows) for p in MODULES if module_name(p).startswith(module + ".")]
        candidates = [c for c in candidates if c is not None]
        if candidates:
            return min(candidates)
        module = module.rsplit(".", 1)[0] if "." in module else ""
    return None


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_module_imports_from_a_later_row(path):
    rows = map_rows()
    me = module_name(path)
    if me in ANYWHERE:
        return
    mine = row_of(me, rows)
    upward = [m for m in imports_of(path) if (r := _nearest_row(m, rows)) is not None and r > mine]
    assert not upward, f"{me} (map row {mine}) imports {upward}, listed later in {MAP.name}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_long_files_say_why(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert re.search(r"\blines\b", doc), f"{path.name} has {lines} lines and its docstring does not say why"
