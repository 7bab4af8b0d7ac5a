"""The layout is the architecture: every module imports only its own layer or the layers below it, no import
cycle exists (imports inside functions count), and no product function is longer than 120 lines.

Read from the source with :mod:`ast`, so the rules hold for imports that run late (inside a function) too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "db", "worker", "migrations")
MAX_FUNCTION_LINES = 120

# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernel", ("pipeline.errors", "pipeline.records", "pipeline.settings", "pipeline.assets", "pipeline.progress",
                "pipeline.logs")),
    ("io", ("pipeline.io",)),
    ("models", ("pipeline.models",)),
    ("inference", ("pipeline.inference",)),
    ("evaluation", ("pipeline.evaluation",)),
    ("training", ("pipeline.training",)),
    ("db", ("db", "migrations")),
    ("jobs", ("pipeline.sorting", "pipeline.jobs", "pipeline.feedback", "pipeline.webhooks", "pipeline.recategorize",
              "pipeline.attributes")),
    ("bench", ("pipeline.bench",)),
    ("front doors", ("worker",)),
]
# db and the job service sit beside the model layers, not above them: db may import only the kernel, the job
# service only the kernel, io, models, inference and db.
ALLOWED: dict[str, set[str]] = {
    "kernel": {"kernel"},
    "io": {"kernel", "io"},
    "models": {"kernel", "io", "models"},
    "inference": {"kernel", "io", "models", "inference"},
    "evaluation": {"kernel", "io", "models", "inference", "evaluation"},
    "training": {"kernel", "io", "models", "inference", "evaluation", "training"},
    "db": {"kernel", "db"},
    "jobs": {"kernel", "io", "models", "inference", "db", "jobs"},
    "bench": {"kernel", "io", "models", "inference", "db", "jobs", "bench"},
    "front doors": {name for name, _ in LAYERS},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    if module == "pipeline":  # the package's __init__: a docstring
        return "kernel"
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS in {__file__}")
    return best


def _imports(module: str, path: Path) -> set[str]:
    """Our modules that ``module`` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # the longest prefix that is one of our modules (``from pipeline.io import storage`` names a module)
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                found.add(name)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_module_imports_only_its_layer_or_below() -> None:
    wrong = []
    for module, deps in sorted(GRAPH.items()):
        layer = _layer(module)
        for dep in sorted(deps):
            if _layer(dep) not in ALLOWED[layer]:
                wrong.append(f"{module} ({layer}) imports {dep} ({_layer(dep)})")
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_kernel_imports_nothing_of_ours_but_the_kernel() -> None:
    for module in ("pipeline.errors", "pipeline.records"):
        assert GRAPH[module] == set(), f"{module} imports {GRAPH[module]}"
    assert GRAPH["pipeline.settings"] <= {"pipeline.errors"}


def test_no_import_cycle() -> None:
    # Tarjan's strongly connected components would name every cycle; a DFS that reports the first one is enough.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("migrations.versions")))
def test_no_function_longer_than_the_limit(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    long = [
        f"{node.name} (line {node.lineno}, {node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module}: functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


def test_the_readme_architecture_section_matches_the_tree() -> None:
    """Every package of pipeline/ and every module in it is named in the README's tree, and nothing more."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    tree = section.split("```", 2)[1]
    packages = {p.parent.name + "/" for p in (ROOT / "pipeline").glob("*/__init__.py")}
    modules = {p.name for p in (ROOT / "pipeline").rglob("*.py") if p.name != "__init__.py"}
    named_files = set(re.findall(r"\b(\w+\.py)\b", tree))
    named_packages = set(re.findall(r"^ +(\w+/)", tree, flags=re.MULTILINE))
    assert packages - named_packages == set(), f"packages missing from the README's tree: {packages - named_packages}"
    stale_packages = named_packages - packages
    assert not stale_packages, f"packages in the README's tree that do not exist: {stale_packages}"
    missing = {m for m in modules if m not in named_files and m.removesuffix(".py") + ".py" not in tree}
    assert not missing, f"modules missing from the README's tree: {sorted(missing)}"
    stale = {f for f in named_files if f not in modules and not any((ROOT / "worker").rglob(f))  # worker/web/ too
             and not (ROOT / "db" / f).exists()}
    assert not stale, f"files named in the README's tree that do not exist: {sorted(stale)}"
