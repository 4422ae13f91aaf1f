"""The package's import layers (docs/architecture.md): a module imports only its own
layer and the ones below it, and no import cycle exists. Function-level imports count
as much as those at the top of a file: a lazy import hides a cycle, it does not
remove it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bloodcell"

# lowest first. A name covers its sub-modules (bloodcell.cli = the whole cli package).
# Keep in step with docs/architecture.md.
LAYERS = [
    ("base", ["bloodcell.transforms", "bloodcell.tensorops", "bloodcell.segment", "bloodcell.locate",
              "bloodcell.augment", "bloodcell.mixing", "bloodcell.restyle", "bloodcell.differential",
              "bloodcell.tracking", "bloodcell.cpu"]),
    ("data", ["bloodcell.data", "bloodcell.fetch", "bloodcell.inputcheck", "bloodcell.screen",
              "bloodcell.modelfile", "bloodcell.published"]),
    ("model", ["bloodcell.models", "bloodcell.export", "bloodcell.saliency",
               "bloodcell.distributed"]),
    ("inference", ["bloodcell.runtime", "bloodcell.decoding", "bloodcell.predict", "bloodcell.batch",
                   "bloodcell.ray_engine"]),
    ("tasks", ["bloodcell.evaluate", "bloodcell.calibrate", "bloodcell.trainconfig", "bloodcell.distill",
               "bloodcell.train",
               "bloodcell.report"]),
    ("apps", ["bloodcell.study", "bloodcell.serve", "bloodcell.adapt"]),
    ("cli", ["bloodcell.cli", "bloodcell.__main__"]),
]
# The package root holds __version__, CLASSES and a lazy ``bloodcell.Classifier``: any
# module may read it (Python imports it before any sub-module anyway) and it may name
# any layer, so edges to and from it are not layer edges.
ROOT = "bloodcell"


def module_files(src: Path) -> dict[str, Path]:
    pkg = src.name
    mods = {}
    for p in sorted(src.rglob("*.py")):
        parts = [pkg, *p.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def imported_modules(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (top level,
    inside functions, under TYPE_CHECKING)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import data` imports bloodcell.data, `from .data import x` bloodcell.data
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:  # `import a.b.c` names the module a.b.c; keep the known part
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph(src: Path) -> dict[str, set[str]]:
    mods = module_files(src)
    return {m: imported_modules(m, p, mods) for m, p in mods.items()}


def layer_of(module: str, layers=LAYERS) -> int | None:
    best, rank = -1, None
    for i, (_, names) in enumerate(layers):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_problems(graph: dict[str, set[str]], root: str = ROOT, layers=LAYERS) -> list[str]:
    problems = []
    for m in sorted(graph):
        if m == root:
            continue
        if layer_of(m, layers) is None:
            problems.append(f"{m} has no layer: add it to LAYERS in tests/test_layers.py "
                            "and to docs/architecture.md")
            continue
        for d in sorted(graph[m]):
            if d == root or m.startswith(d + "."):
                continue
            ld = layer_of(d, layers)
            if ld is not None and ld > layer_of(m, layers):
                problems.append(f"{m} ({layers[layer_of(m, layers)][0]}) imports {d} "
                                f"({layers[ld][0]}): an upward import")
    return problems


def without_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drops each module's imports of its own parent packages: Python runs a package's
    __init__ before any of its modules anyway, so those edges order nothing."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_package_has_no_import_cycle():
    graph = without_parents(import_graph(SRC))
    graph = {m: {d for d in deps if d != ROOT} for m, deps in graph.items() if m != ROOT}
    assert cycles(graph) == []


def test_package_imports_only_downward():
    assert layer_problems(import_graph(SRC)) == []


def test_no_library_module_imports_the_cli():
    graph = import_graph(SRC)
    cli = len(LAYERS) - 1  # the cli package, and `python -m bloodcell` (bloodcell.__main__)
    offenders = sorted(m for m, deps in graph.items() if layer_of(m) != cli
                       and any(d == "bloodcell.cli" or d.startswith("bloodcell.cli.") for d in deps))
    assert offenders == []


# -- the checker itself finds what it is there to find


@pytest.fixture
def toy(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "ui").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "low.py": "import os\n",
        "mid.py": "from . import low\n",
        "ui/__init__.py": "from ..mid import x\n",
        "ui/args.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    layers = [("low", ["toy.low"]), ("mid", ["toy.mid"]), ("ui", ["toy.ui"])]
    return pkg, layers


def test_checker_accepts_a_clean_package(toy):
    pkg, layers = toy
    graph = import_graph(pkg)
    assert graph["toy.ui"] == {"toy.mid"} and graph["toy.mid"] == {"toy.low"}
    assert cycles(graph) == [] and layer_problems(graph, "toy", layers) == []


def test_checker_finds_a_cycle_hidden_in_a_function(toy):
    pkg, layers = toy
    (pkg / "low.py").write_text("def f():\n    from .mid import g\n    return g\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["toy.low", "toy.mid"]]
    assert layer_problems(graph, "toy", layers) == ["toy.low (low) imports toy.mid (mid): an upward import"]


def test_checker_finds_an_upward_import_into_a_subpackage(toy):
    pkg, layers = toy
    (pkg / "mid.py").write_text("def f():\n    import toy.ui.args\n")
    problems = layer_problems(import_graph(pkg), "toy", layers)
    assert problems == ["toy.mid (mid) imports toy.ui.args (ui): an upward import"]


def test_checker_names_a_module_without_a_layer(toy):
    pkg, layers = toy
    (pkg / "new.py").write_text("")
    assert layer_problems(import_graph(pkg), "toy", layers) == [
        "toy.new has no layer: add it to LAYERS in tests/test_layers.py and to docs/architecture.md"]
