"""The package's shape, read from its imports: layers import downward only (model < training < evaluation <
serving and the command line), no module circle, and no private name imported from another package. The
benchmark package beside the library (benchmarks/composed_bench) has no circle either."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "llm_modules"
BENCHMARKS = REPO / "benchmarks" / "composed_bench"
LAYERS = {"model": 0, "training": 1, "evaluation": 2, "serving": 3}


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module in ``package`` (a folder), its subpackages included."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(found: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(importer, imported module, imported name) for every import of this package, lazy ones included."""
    edges = []
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    edges.append((name, full if full in found else module, alias.name))
            elif isinstance(node, ast.Import):
                edges += [(name, alias.name, "") for alias in node.names]
    return [(a, b, n) for a, b, n in edges if b in found and a != b]


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_layers_import_downward_only():
    upward = [f"{a} -> {b}" for a, b, _ in imports(modules())
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not upward, "imports from a lower layer to a higher one: " + "; ".join(upward)


def _circles(edges: list[tuple[str, str, str]]) -> set[tuple[str, str]]:
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)

    def reaches(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    return {tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reaches(b)}


def test_no_module_imports_itself_through_a_circle():
    circles = _circles(imports(modules()))
    assert not circles, f"import circles: {sorted(circles)}"


def test_the_benchmark_package_has_no_circle():
    """The bridge and fusion benchmarks share what both need through modules of their own (they were a circle)."""
    found = modules(BENCHMARKS)
    assert {"composed_bench.bridge", "composed_bench.fusion", "composed_bench.main"} <= set(found)
    edges = imports(found)
    assert ("composed_bench.main", "composed_bench.fusion", "run_fusion") in edges  # the edges are read
    circles = _circles(edges)
    assert not circles, f"import circles: {sorted(circles)}"


def test_no_private_name_crosses_a_package():
    crossing = [f"{a} imports {b}.{n}" if not b.endswith(n) else f"{a} imports {b}"
                for a, b, n in imports(modules())
                if n.startswith("_") and not n.startswith("__") and a.split(".")[:2] != b.split(".")[:2]]
    assert not crossing, "; ".join(crossing)


def test_the_checks_see_a_planted_circle_and_an_upward_import():
    """The checks can fail: a made-up edge list with both defects is caught."""
    edges = [("llm_modules.model.a", "llm_modules.training.b", "x"), ("llm_modules.training.b", "llm_modules.model.a", "y")]
    assert _circles(edges) == {("llm_modules.model.a", "llm_modules.training.b")}
    assert layer("llm_modules.training.b") > layer("llm_modules.model.a")


def test_the_checks_see_a_circle_written_in_files(tmp_path):
    """The shape the old bench.py <-> bench_fusion.py circle had: a module-level relative import one way, a lazy
    one inside a function the other way; a third module importing both is no circle."""
    package = tmp_path / "tools"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bench.py").write_text("def train_model():\n    from .bench_fusion import fusion_model\n    return fusion_model()\n")
    (package / "bench_fusion.py").write_text("from .bench import train_model\n\n\ndef fusion_model():\n    return 1\n")
    (package / "main.py").write_text("from tools import bench\nfrom tools.bench_fusion import fusion_model\n")
    assert _circles(imports(modules(package))) == {("tools.bench", "tools.bench_fusion")}
