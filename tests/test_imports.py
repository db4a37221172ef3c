"""The import graph of granet: no import cycle, and the layering the package promises.

The graph is read from the source with :mod:`ast`, so it sees every import, also those that only run
when a function is called. Its edges, ``importer -> imported`` between modules of ``granet``:

* ``import granet.a.b`` and ``from granet.a import b``/``from .a import b`` (relative imports
  resolved against the importer's package) lead to ``granet.a.b`` when it is a module, and to the
  package ``granet.a`` when ``b`` is a name its ``__init__`` defines; importing a subpackage also
  leads to each package on its path whose ``__init__`` runs for it, except the importer's own
  packages (already being imported when the importer runs);
* an edge is **module-level** when the statement runs as the module is imported (at the top, in an
  ``if``/``try`` block or a class body) and **deferred** when it is inside a function;
* ``from granet.a import f`` also leads to the module that defines ``f`` (a function or class),
  found by importing ``granet.a``: a package that imports its public names on first use (PEP 562
  ``__getattr__``, as ``granet`` does) defers those imports to that moment;
* imports under ``if TYPE_CHECKING:`` never run and are not edges; other ``importlib`` calls are
  not seen.

Rule: **deferred imports count.** A cycle is a cycle whichever of its edges are deferred. Deferring
an import hides a cycle from the interpreter but leaves the two modules depending on each other;
the fix is to move the shared piece down a layer.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import granet

PACKAGE_DIR = Path(granet.__file__).parent

#: ``resolve(package, name)``: the module defining the function or class ``name`` that ``package``
#: exports, or ``None``.
Resolver = Callable[[str, str], Optional[str]]


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    deferred: bool


def module_files(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is a package)}`` for every ``.py`` file under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def defining_module(package: str, name: str) -> Optional[str]:
    """The module that defines ``package.name`` when it is a function or class (imports ``package``)."""
    try:
        value = getattr(importlib.import_module(package), name)
    except (ImportError, AttributeError):
        return None
    return value.__module__ if inspect.isfunction(value) or inspect.isclass(value) else None


def _targets(node: ast.stmt, importer: str, is_package: bool, modules: dict[str, tuple[Path, bool]],
             resolve: Optional[Resolver]) -> set[str]:
    """The modules of the graph that the import statement ``node`` in ``importer`` leads to."""
    root = importer.split(".")[0]
    own_packages = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    if is_package:
        own_packages.add(importer)
    found: set[str] = set()

    def packages_on_the_way(dotted: str) -> None:
        parts = dotted.split(".")
        found.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p not in own_packages)

    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == root:
                packages_on_the_way(alias.name)
                found.add(alias.name)
    else:
        assert isinstance(node, ast.ImportFrom)
        if node.level:
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            if node.level - 1 > len(base) - 1:
                raise ValueError(f"{importer}: relative import beyond the top-level package (line {node.lineno})")
            base = base[:len(base) - (node.level - 1)]
            package = ".".join(base + ([node.module] if node.module else []))
        else:
            package = node.module or ""
        if package.split(".")[0] != root:
            return found
        packages_on_the_way(package + ".x")
        for alias in node.names:
            if f"{package}.{alias.name}" in modules:
                found.add(f"{package}.{alias.name}")
                continue
            found.add(package)
            defined_in = resolve(package, alias.name) if resolve is not None and alias.name != "*" else None
            if defined_in is not None:
                found.add(defined_in)
    return {t for t in found if t in modules and t != importer}


def _imports(node: ast.AST, deferred: bool = False) -> Iterable[tuple[ast.stmt, bool]]:
    """Every import statement under ``node`` that can run, and whether it runs only inside a function."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.orelse:
                yield from _imports(ast.Module(body=[statement], type_ignores=[]), deferred)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, deferred
        yield from _imports(child, deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def import_edges(package_dir: Path, resolve: Optional[Resolver] = None) -> list[Edge]:
    """Every edge of the import graph of the package in ``package_dir`` (see the module docstring)."""
    modules = module_files(package_dir)
    edges = []
    for name, (path, is_package) in modules.items():
        for statement, deferred in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            edges.extend(Edge(name, target, statement.lineno, deferred)
                         for target in sorted(_targets(statement, name, is_package, modules, resolve)))
    return edges


def _describe(edge: Edge) -> str:
    return f"(line {edge.line}{', deferred' if edge.deferred else ''})"


def find_cycles(edges: Iterable[Edge]) -> list[str]:
    """One shortest cycle through each strongly connected group of modules, as ``a -> b (line 3) -> a``.

    Groups are found with Tarjan's algorithm; each cycle starts at the group's first module by name.
    """
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        first = graph.setdefault(edge.importer, {}).get(edge.imported)
        if first is None or (first.deferred and not edge.deferred):  # a module-level edge names the dependency best
            graph[edge.importer][edge.imported] = edge
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth is at most the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for group in sorted(groups):
        start, members = group[0], set(group)
        came_from: dict[str, Optional[str]] = {start: None}
        frontier, end = [start], None
        while end is None:  # breadth first inside the group: the shortest way back to start
            following = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start and end is None:
                        end = v
                    elif w in members and w not in came_from:
                        came_from[w] = v
                        following.append(w)
            frontier = following
        path, previous = [end], came_from[end]
        while previous is not None:
            path.append(previous)
            previous = came_from[previous]
        path.reverse()
        path.append(start)
        text = path[0]
        for a, b in zip(path, path[1:]):
            text += f" -> {b} {_describe(graph[a][b])}"
        cycles.append(text)
    return cycles


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


# --------------------------------------------------------------------------------------------------
# The graph builder, on small packages whose graphs are known by hand
# --------------------------------------------------------------------------------------------------
def test_edges_of_a_small_package(tmp_path):
    package = _write_package(tmp_path, {
        "pkg/__init__.py": "from .core import f\nimport os\n",
        "pkg/core.py": (
            "from __future__ import annotations\n"
            "import typing\n"
            "from typing import TYPE_CHECKING\n"
            "from . import util\n"                  # a submodule: the edge is to it, not to pkg
            "if TYPE_CHECKING:\n"
            "    from .sub import deep\n"           # never runs: no edge
            "else:\n"
            "    from .sub import helper\n"         # runs: pkg.sub.helper
            "def f():\n"
            "    from .sub.deep import g\n"         # deferred: pkg.sub.deep
            "    return g\n"
            "class C:\n"
            "    from .util import h\n"             # a class body runs at import: module-level
        ),
        "pkg/util.py": "from . import VERSION\nimport pkg.sub.deep\n",  # VERSION is a name of pkg
        "pkg/sub/__init__.py": "",
        "pkg/sub/helper.py": "from .. import util\nfrom ..core import f\n",
        "pkg/sub/deep.py": "def g():\n    import pkg.util\n    from .. import core\n",
    })
    with_lines = {(e.importer, e.imported, e.line, e.deferred) for e in import_edges(package)}
    assert with_lines == {
        ("pkg", "pkg.core", 1, False),
        ("pkg.core", "pkg.util", 4, False),
        ("pkg.core", "pkg.sub", 8, False),          # the subpackage's __init__ runs first
        ("pkg.core", "pkg.sub.helper", 8, False),
        ("pkg.core", "pkg.sub", 10, True),
        ("pkg.core", "pkg.sub.deep", 10, True),
        ("pkg.core", "pkg.util", 13, False),
        ("pkg.util", "pkg", 1, False),
        ("pkg.util", "pkg.sub", 2, False),
        ("pkg.util", "pkg.sub.deep", 2, False),
        ("pkg.sub.helper", "pkg.util", 1, False),
        ("pkg.sub.helper", "pkg.core", 2, False),
        ("pkg.sub.deep", "pkg.util", 2, True),
        ("pkg.sub.deep", "pkg.core", 3, True),
    }
    edges = import_edges(package)
    assert (sum(not e.deferred for e in edges), sum(e.deferred for e in edges)) == (10, 4)


def test_a_cycle_is_found_and_named_whichever_edges_are_deferred(tmp_path):
    package = _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import x\n",
        "pkg/b.py": "x = 1\ndef f():\n    from .a import y\n",
        "pkg/c.py": "from . import a, d\n",
        "pkg/d.py": "import pkg.e\n",
        "pkg/e.py": "from . import d\n",
    })
    assert find_cycles(import_edges(package)) == [
        "pkg.a -> pkg.b (line 1) -> pkg.a (line 3, deferred)",
        "pkg.d -> pkg.e (line 1) -> pkg.d (line 1)",
    ]
    (package / "b.py").write_text("x = 1\n")
    assert find_cycles(import_edges(package)) == ["pkg.d -> pkg.e (line 1) -> pkg.d (line 1)"]


def test_the_shortest_cycle_of_a_group_is_named(tmp_path):
    # a -> b -> c -> a and a -> c -> a: one group, named by its shortest cycle through a.
    package = _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\nfrom . import c\n",
        "pkg/b.py": "from . import c\n",
        "pkg/c.py": "def f():\n    from . import a\n",
    })
    assert find_cycles(import_edges(package)) == ["pkg.a -> pkg.c (line 2) -> pkg.a (line 2, deferred)"]


def test_a_name_a_package_imports_on_first_use_leads_to_its_module(tmp_path, monkeypatch):
    # The package exports `thing` from its module impl on first use; impl imports user (when `thing`
    # is called), which imports `thing`: a cycle that only the resolver sees.
    package = _write_package(tmp_path, {
        "lazypkg_for_granet_tests/__init__.py": (
            "import importlib\n"
            "def __getattr__(name):\n"
            "    if name == 'thing':\n"
            "        return importlib.import_module(__name__ + '.impl').thing\n"
            "    raise AttributeError(name)\n"
        ),
        "lazypkg_for_granet_tests/impl.py": "def thing():\n    from .user import helper\n    return helper\n",
        "lazypkg_for_granet_tests/user.py": "from . import thing\nhelper = 1\nVERSION = '1'\n",
        "lazypkg_for_granet_tests/other.py": "from .user import VERSION\n",  # not a function or class
    }).parent / "lazypkg_for_granet_tests"
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plain = {(e.importer, e.imported) for e in import_edges(package)}
        resolved = {(e.importer, e.imported) for e in import_edges(package, defining_module)}
        assert resolved - plain == {("lazypkg_for_granet_tests.user", "lazypkg_for_granet_tests.impl")}
        assert find_cycles(import_edges(package)) == []
        assert find_cycles(import_edges(package, defining_module)) == [
            "lazypkg_for_granet_tests.impl -> lazypkg_for_granet_tests.user (line 2, deferred) -> "
            "lazypkg_for_granet_tests.impl (line 1)"]
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "lazypkg_for_granet_tests"]:
            del sys.modules[name]


# --------------------------------------------------------------------------------------------------
# granet itself
# --------------------------------------------------------------------------------------------------
def test_no_import_cycle_inside_granet():
    edges = import_edges(PACKAGE_DIR, defining_module)
    module_level, deferred = sum(not e.deferred for e in edges), sum(e.deferred for e in edges)
    assert module_level > 100 and deferred > 10, (module_level, deferred)  # the graph was read at all
    cycles = find_cycles(edges)
    assert not cycles, (f"import cycles inside granet ({module_level} module-level and {deferred} deferred "
                        "imports read; deferred imports count):\n" + "\n".join(cycles))


def _reachable(edges: list[Edge], starts: Iterable[str]) -> dict[str, list[str]]:
    """Every module the ``starts`` import, directly or not, with one path to it."""
    graph: dict[str, list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, []).append(edge.imported)
    paths = {start: [start] for start in starts}
    frontier = sorted(paths)
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, [])):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    return paths


def test_the_core_never_imports_train_cli_or_integrations():
    # The core is what `granet` exports (granet.__all__) and everything it imports; the layers above
    # it (the training run, the command line, the framework integrations) import the core, never
    # the reverse, not even inside a function.
    edges = import_edges(PACKAGE_DIR, defining_module)
    exported = {defining_module("granet", name) for name in granet.__all__}
    assert {"granet.sparsity.sparsifier", "granet.methods", "granet.baselines.lottery"} <= exported
    core = _reachable(edges, sorted({"granet"} | exported - {None}))
    assert {"granet.sparsity.updater", "granet.sparsity.topology", "granet.registry"} <= set(core)  # the imports were followed
    above = ("granet.train", "granet.cli", "granet.integrations", "granet.__main__")
    leaks = [" -> ".join(path) for name, path in sorted(core.items()) if name.startswith(above)]
    assert not leaks, "the core imports a layer above it:\n" + "\n".join(leaks)


def test_only_the_command_line_imports_the_command_line():
    edges = import_edges(PACKAGE_DIR, defining_module)
    outside = sorted({f"{e.importer} {_describe(e)}" for e in edges if e.imported.startswith("granet.cli")
                      and not e.importer.startswith(("granet.cli", "granet.__main__"))})
    assert not outside, "modules outside granet.cli import it:\n" + "\n".join(outside)


#: The layers of granet, bottom up, and the layers each may import (besides itself); what a layer
#: may import, the layers above it may too. A module's layer is its subpackage, or its own name for
#: the modules at the top of the package (docs/architecture.md draws the same picture).
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": (),
    "kernels": ("foundation",),
    "parallel": ("kernels",),
    "models": ("foundation",),
    "data": ("foundation",),
    "reports": ("foundation",),
    "deploy": ("kernels",),
    "sparsity": ("kernels", "parallel"),
    "accounting": ("sparsity",),
    "baselines": ("accounting",),
    "methods": ("baselines",),
    "integrations": ("methods",),
    "train": ("methods", "models", "data", "reports", "deploy"),
    "experiments": ("train",),
    "cli": ("experiments", "integrations"),
}
FOUNDATION = {"granet", "granet.errors", "granet.registry", "granet.safeyaml", "granet.rundir"}


def layer_of(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    if module == "granet.__main__":
        return "cli"
    return module.split(".")[1]


def may_import(layer: str) -> set[str]:
    """``layer`` and every layer below it in :data:`LAYERS`."""
    seen, todo = {layer}, [layer]
    while todo:
        for below in LAYERS[todo.pop()]:
            if below not in seen:
                seen.add(below)
                todo.append(below)
    return seen


def upward_imports(edges: Iterable[Edge]) -> list[str]:
    """The edges from a layer to one it may not import (the package ``granet`` itself exports every layer)."""
    return sorted(f"{e.importer} ({layer_of(e.importer)}) -> {e.imported} ({layer_of(e.imported)}) {_describe(e)}"
                  for e in edges
                  if e.importer != "granet" and layer_of(e.imported) not in may_import(layer_of(e.importer)))


def test_every_module_belongs_to_a_layer_and_imports_only_layers_below_it():
    edges = import_edges(PACKAGE_DIR, defining_module)
    modules = module_files(PACKAGE_DIR)
    unplaced = sorted(m for m in modules if layer_of(m) not in LAYERS)
    assert not unplaced, f"modules in no layer of LAYERS (add them to docs/architecture.md too): {unplaced}"
    assert {layer_of(m) for m in modules} == set(LAYERS)  # no layer is empty or left over
    upward = upward_imports(edges)
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_layer_rule_names_an_upward_import_and_allows_downward_ones():
    assert may_import("sparsity") == {"sparsity", "kernels", "parallel", "foundation"}
    edges = [Edge("granet.sparsity.updater", "granet.kernels.topk", 3, False),     # down: allowed
             Edge("granet.cli.train", "granet.sparsity.config", 4, True),           # down, deferred
             Edge("granet.sparsity.health", "granet.sparsity.masking", 5, False),   # same layer
             Edge("granet.kernels.topk", "granet.sparsity.masking", 7, True),      # up, deferred
             Edge("granet.methods", "granet.train.config", 9, False),              # up
             Edge("granet.models.small", "granet.kernels.native", 2, False)]  # sideways
    assert upward_imports(edges) == [
        "granet.kernels.topk (kernels) -> granet.sparsity.masking (sparsity) (line 7, deferred)",
        "granet.methods (methods) -> granet.train.config (train) (line 9)",
        "granet.models.small (models) -> granet.kernels.native (kernels) (line 2)",
    ]
