"""The shape of pacsai.pacs: an acyclic import graph in data-flow order, every module importable alone, and no
branching on the back end outside the factory (read from the source with ast, no PACS needed)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pacsai.pacs

PACKAGE = Path(pacsai.pacs.__file__).parent

#: Modules in data-flow order: a module may import only modules of earlier layers (the package's __init__, which
#: re-exports, comes last). A new module must be placed here. The ``pacsai pacs`` verb is pacsai.commands.pacs.
LAYERS: list[set[str]] = [
    {"address", "dicomjson", "transport", "cache", "query", "storeindex", "orthanc"},
    {"credentials", "store", "multipart", "retrieve"},
    {"base", "wado"},
    {"dicomweb", "embedded"},
    {"factory"},
    {"__init__"},
]


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _imports(module: str) -> set[str]:
    """pacsai.pacs modules ``module`` imports anywhere (top level, functions, TYPE_CHECKING blocks alike)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "pacsai.pacs":
                found.add("__init__")
            elif name.startswith("pacsai.pacs.") and name.split(".")[2] in _modules():
                found.add(name.split(".")[2])
    found.discard(module)
    return found


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(_modules()) == placed, "place new modules in LAYERS (data-flow order)"


def test_imports_only_go_to_earlier_layers():
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    upward = {
        (module, dep)
        for module in _modules()
        for dep in _imports(module)
        if layer[dep] >= layer[module]
    }
    assert upward == set(), f"imports that point up or sideways (a cycle in the making): {sorted(upward)}"


def test_import_graph_has_no_cycle():
    graph = {m: _imports(m) for m in _modules()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, node, dep])}"
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_leaves_import_nothing_from_the_package():
    leaves = {m for m in LAYERS[0]}
    assert {m: _imports(m) for m in leaves} == {m: set() for m in leaves}


def test_each_module_imports_alone():
    # One interpreter; before each module every pacsai module is forgotten, so each import starts from nothing
    # of pacsai's (a cycle or a missing import shows as ImportError / AttributeError).
    script = (
        "import importlib, sys\n"
        f"for name in {[m for m in _modules() if m != '__init__']!r}:\n"
        "    for loaded in [k for k in sys.modules if k == 'pacsai' or k.startswith('pacsai.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module('pacsai.pacs.' + name)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_no_back_end_branching_outside_the_factory():
    # The back end is chosen once, by connect(); the rest of the package works through the protocol.
    offenders: list[str] = []
    for module in _modules():
        if module == "factory":
            continue
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("is_embedded", "is_dicomweb"):
                offenders.append(f"{module}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                kinds = ast.unparse(node.args[1])
                if "EmbeddedPacs" in kinds or "DicomWebPacs" in kinds:
                    offenders.append(f"{module}:{node.lineno} isinstance(..., {kinds})")
            if isinstance(node, ast.Compare) and "session" in ast.unparse(node.left):
                if any(isinstance(c, ast.Constant) and c.value is None for c in node.comparators):
                    offenders.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    assert offenders == []


def test_both_back_ends_implement_the_protocol(tmp_path):
    from pacsai.pacs import DicomWebPacs, EmbeddedPacs, Pacs, connect

    web = connect("http://127.0.0.1:9/dicom-web", cache_dir=tmp_path / "c")
    store = connect(str(tmp_path / "store"), cache_dir=tmp_path / "c")
    assert isinstance(web, DicomWebPacs) and isinstance(web, Pacs)
    assert isinstance(store, EmbeddedPacs) and isinstance(store, Pacs)
    verbs = ("ping", "search", "search_studies", "search_series", "search_instances", "retrieve_series",
             "retrieve_study", "store", "close")
    for conn in (web, store):
        assert all(callable(getattr(conn, verb)) for verb in verbs)
        assert conn.cache.root == tmp_path / "c"
