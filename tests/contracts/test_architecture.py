"""docs/architecture.md against the imports: every module of the package is named in the
module table with its layer, imports point down the layers only, the package has at most the
one documented import circle, the algorithm layer never reaches the curvature operators, and
no module outside ``curvature/operator.py`` touches an operator's private attributes.

The graph counts EVERY import: module level, function level and ``TYPE_CHECKING`` blocks (an
annotation-only import still ties two modules' designs together).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

# The source tree this test file belongs to (tests/contracts/ -> the repository root): the
# map and the package sources are read from there, not from the installed copy (CI installs
# a wheel, whose site-packages has no docs/).
ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "hessfast"
DOC = ROOT / "docs" / "architecture.md"

# The one circle allowed: the report draws its figure with plot, which names Report in
# annotations only (TYPE_CHECKING).
ALLOWED_CIRCLES = [{"analysis/plot.py", "analysis/report.py"}]
# The algorithm layer sees operators only through LinearOperator.
ALGORITHMS = ("memory.py", "spectrum.py", "power.py", "condition.py", "density/",
              "estimators/", "lanczos/")
# Names an operator goes by in the library; `X._attr` on one of them outside the operator's
# own module is a reach-in.
OPERATOR_NAMES = {"op", "H", "A", "G", "operator"}


def _modules() -> dict[str, Path]:
    """``{'curvature/plan.py': path, 'lanczos/__init__.py': path, ...}``."""
    return {p.relative_to(PKG).as_posix(): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(rel: str, node: ast.ImportFrom, mods: dict[str, Path]) -> list[str]:
    """The package modules one ``from ... import ...`` statement of module ``rel`` reaches."""
    if node.level == 0:
        if not (node.module or "").startswith("hessfast"):
            return []
        parts = node.module.split(".")[1:]
    else:
        parts = rel.split("/")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        parts += node.module.split(".") if node.module else []
    base = "/".join(parts)
    found = []
    for alias in node.names:
        for cand in (f"{base}/{alias.name}.py" if base else f"{alias.name}.py",
                     f"{base}/{alias.name}/__init__.py" if base else f"{alias.name}/__init__.py"):
            if cand in mods:
                found.append(cand)
                break
        else:
            for cand in (f"{base}.py", f"{base}/__init__.py" if base else "__init__.py"):
                if cand in mods and alias.name != "_C":  # _C: the compiled module
                    found.append(cand)
                    break
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (all imports, anywhere in the file)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for rel, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                graph[rel].update(d for d in _resolve(rel, node, mods) if d != rel)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("hessfast."):
                        sub = alias.name.split(".")[1:]
                        for cand in ("/".join(sub) + ".py", "/".join(sub) + "/__init__.py"):
                            if cand in mods and cand != rel:
                                graph[rel].add(cand)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def documented_layers() -> dict[str, int]:
    """The module table of docs/architecture.md: rows ``| `curvature/plan.py` | 4 | ... |``."""
    rows = re.findall(r"^\| `([\w/]+\.py)` \| (\d+) \|", DOC.read_text(encoding="utf-8"), re.M)
    return {m: int(layer) for m, layer in rows}


def test_the_source_tree_is_read():
    """The checks below read real files: a moved test or doc must fail here, not pass empty."""
    assert (PKG / "__init__.py").is_file() and DOC.is_file(), (PKG, DOC)
    assert len(_modules()) > 50 and len(documented_layers()) > 50


def test_every_module_is_in_the_map_and_nothing_else():
    mods = set(_modules())
    layers = documented_layers()
    missing, stale = sorted(mods - set(layers)), sorted(set(layers) - mods)
    assert not missing, f"modules missing from docs/architecture.md: {missing}"
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"


def test_imports_point_down_the_documented_layers():
    layers = documented_layers()
    up = []
    for src, dsts in import_graph().items():
        for dst in dsts:
            if dst.endswith("__init__.py") and src.startswith(dst[: -len("__init__.py")]):
                continue  # a module of a package importing its own face: counted as a circle below
            if src in layers and dst in layers and layers[dst] > layers[src]:
                up.append(f"{src} (layer {layers[src]}) imports {dst} (layer {layers[dst]})")
    assert not up, "imports up the layers of docs/architecture.md:\n" + "\n".join(sorted(up))


def test_at_most_the_documented_circle():
    circles = [c for c in _circles(import_graph()) if c not in ALLOWED_CIRCLES]
    assert not circles, f"import circles: {[sorted(c) for c in circles]}"


def test_the_algorithm_layer_never_imports_curvature():
    bad = sorted(f"{src} -> {dst}" for src, dsts in import_graph().items()
                 if src.startswith(ALGORITHMS) for dst in dsts if dst.startswith("curvature/"))
    assert not bad, f"algorithms importing curvature: {bad}"


def test_no_private_reach_into_operators():
    found = []
    for rel, path in _modules().items():
        if rel == "curvature/operator.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in OPERATOR_NAMES):
                found.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in OPERATOR_NAMES
                    and isinstance(node.args[1], ast.Constant)
                    and str(node.args[1].value).startswith("_")
                    and not str(node.args[1].value).startswith("__")):
                found.append(f"{rel}:{node.lineno}: {node.func.id}({node.args[0].id}, "
                             f"{node.args[1].value!r})")
    assert not found, ("private attributes of an operator used outside curvature/operator.py:\n"
                       + "\n".join(found))


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The graph code itself: a made-up two-module circle is found, a clean chain is not."""
    assert _circles({"a.py": {"b.py"}, "b.py": {"a.py"}, "c.py": set()}) == [{"a.py", "b.py"}]
    assert _circles({"a.py": {"b.py"}, "b.py": set()}) == []
    graph = import_graph()  # function-level and relative imports are seen
    assert "linop.py" in graph["spectrum.py"]
    assert "curvature/operator.py" in graph["curvature/hessian.py"]
