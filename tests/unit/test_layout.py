"""The layout the architecture promises (docs/architecture.md, "Layout"), checked from the source:
no import cycle among the project's modules (imports inside functions count too: a lazy import
only hides a cycle), `actors/` never imports `cluster/`, and no package folder holds more than 12
modules directly (a bigger one gets a subpackage)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("actors", "cluster", "protos")
MAX_MODULES_PER_FOLDER = 12


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path, name: str, is_package: bool) -> set[str]:
    """Every module an `import` or `from ... import` names, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports. Importing a.b.c also runs a/__init__ and
    a/b/__init__, so those count as edges when they are not empty."""
    mods = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for target in imported_names(path, name, path.name == "__init__.py"):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in mods and dep != name and (i == len(parts) or mods[dep].stat().st_size):
                    deps.add(dep)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = grey
        stack.append(n)
        for m in sorted(graph[n]):
            if colour[m] == grey:
                return stack[stack.index(m):] + [m]
            if colour[m] == white and (found := visit(m)):
                return found
        stack.pop()
        colour[n] = black
        return None

    for n in sorted(graph):
        if colour[n] == white and (found := visit(n)):
            return found
    return None


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    src = "def f():\n    from actors.experts import placement\n    import cluster.config\nfrom . import x\n"
    p = tmp_path / "m.py"
    p.write_text(src)
    names = imported_names(p, "actors.engine.m", False)
    assert {"actors.experts.placement", "cluster.config", "actors.engine.x"} <= names


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_project_import_names_a_module_that_exists():
    """A module moved or deleted without updating its importers fails here, even where the import
    sits in a function no unit test calls."""
    mods = project_modules()
    generated = ("protos.moge_expert_pb2", "protos.moge_expert_pb2_grpc")  # protos/generate.py writes them
    importers = [*mods.values(), *(p for d in ("tests", "bench", "loadtest") for p in sorted((ROOT / d).rglob("*.py")))]
    stale = []
    for path in importers:
        name = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                targets = [node.module]
            else:
                continue
            for t in targets:
                if t.split(".")[0] in PACKAGES and t not in mods and t not in generated:
                    stale.append(f"{name}: {t}")
    assert not stale, stale


def test_actors_never_import_cluster():
    bad = sorted(f"{m} imports {d}" for m, deps in import_graph().items() if m.startswith("actors")
                 for d in deps if d == "cluster" or d.startswith("cluster."))
    assert not bad, bad


@pytest.mark.parametrize("top", ["actors", "cluster"])
def test_no_folder_holds_more_than_twelve_modules(top):
    for folder in [ROOT / top, *(d for d in (ROOT / top).rglob("*") if d.is_dir())]:
        if folder.name == "__pycache__":
            continue
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_MODULES_PER_FOLDER, f"{folder.relative_to(ROOT)}: {len(modules)} modules"
