"""The package's layering (docs/architecture.md "Layers"): each unit of pacsai imports only units of lower layers,
torch and MONAI stay in pacsai.learning (and one lazy conversion in imaging.volume), and only the CLI imports the
verbs. Read from the source with ast; imports under ``if TYPE_CHECKING:`` are type hints, not dependencies.
tests/test_pacs_layers.py checks the same inside pacsai.pacs."""

from __future__ import annotations

import ast
from pathlib import Path

import pacsai

PACKAGE = Path(pacsai.__file__).parent

#: Units (a top-level module, or a subpackage as a whole) from the lowest layer up; a unit may import units of
#: lower layers only. Keep in step with docs/architecture.md; a new top-level module or subpackage goes here.
LAYERS: list[set[str]] = [
    {"__init__", "errors", "uids", "privacy", "qa", "mlstore", "lazy"},
    {"config", "structure_sets"},
    {"pacs"},
    {"imaging"},
    {"planning", "viz", "domain", "synthetic", "notebooks"},
    {"tracking"},
    {"cohort"},
    {"learning"},
    {"report", "export"},
    {"watch"},
    {"demo"},
    {"commands"},
    {"cli"},
    {"__main__"},
]
#: Files that may import torch or MONAI (each does so inside functions, on first use).
TORCH_ALLOWED = {"learning", "imaging/volume.py"}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "templates" not in p.relative_to(PACKAGE).parts)


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Modules imported anywhere except inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pacsai":  # from pacsai import tracking / __version__
                found += [f"pacsai.{a.name}" for a in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def _target_unit(module: str) -> str | None:
    """The pacsai unit a module name belongs to (``pacsai.__version__`` → the package's ``__init__``)."""
    parts = module.split(".")
    if parts[0] != "pacsai":
        return None
    if len(parts) == 1 or not ((PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()):
        return "__init__"
    return parts[1]


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in _sources()}
    assert units == set().union(*LAYERS), "place new modules and subpackages in LAYERS (and docs/architecture.md)"


def test_units_import_only_lower_layers():
    layer = {u: i for i, group in enumerate(LAYERS) for u in group}
    upward = set()
    for path in _sources():
        unit = _unit(path)
        for module in _runtime_imports(ast.parse(path.read_text())):
            target = _target_unit(module)
            if target is not None and target != unit and layer[target] >= layer[unit]:
                upward.add(f"{path.relative_to(PACKAGE)} imports {module} (layer {layer[target]} ≥ {layer[unit]})")
    assert sorted(upward) == []


def test_torch_and_monai_stay_in_learning():
    offenders = []
    for path in _sources():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in TORCH_ALLOWED or str(rel) in TORCH_ALLOWED:
            continue
        heavy = [m for m in _runtime_imports(ast.parse(path.read_text())) if m.split(".")[0] in ("torch", "monai")]
        if heavy:
            offenders.append(f"{rel}: {heavy}")
    assert offenders == []


def test_only_the_cli_imports_the_verbs():
    offenders = []
    for path in _sources():
        if _unit(path) in ("commands", "cli", "__main__"):
            continue
        for module in _runtime_imports(ast.parse(path.read_text())):
            if _target_unit(module) in ("commands", "cli"):
                offenders.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert offenders == []
