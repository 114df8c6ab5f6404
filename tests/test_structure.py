"""The package's shape, read from the source with ``ast`` (nothing is imported but the two modules named below).

* No import cycle inside ``alignx`` (the top-level ``kernels/`` folder counted as ``alignx.kernels``): the graph of
  the module-level imports (``if TYPE_CHECKING:`` blocks left out) has no strongly connected component of two or
  more modules. An import of ``a.b.c`` also imports the packages ``a.b`` it passes through, unless the importing
  module lives inside them (a package's own submodules run while it initialises).
* No function-level import of alignx's own modules, except in the command-line entry points: the ``cli`` modules
  (``alignx/cli.py``, ``alignx/*/cli.py``) and functions named ``main`` (and what they define inside).
* The values of :mod:`alignx.constants` are written there only, and the data pipeline's list of the recipes that read
  their own records is the recipes' own.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ((REPO / "alignx", "alignx"), (REPO / "kernels", "alignx.kernels"))

# Known exceptions to the function-level rule, as (file, outermost function); each says why.
LOCAL_IMPORT_EXCEPTIONS = {
    # Lazy package attributes: ``import alignx.eval`` must not import torch, transformers or matplotlib, and
    # ``python -m alignx.eval.cli`` must not find its module imported by the package already.
    ("alignx/eval/__init__.py", "__getattr__"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for root, package in ROOTS:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The alignx modules ``node`` (in ``module``) imports, with the packages it passes through."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
    out = []
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in MODULES and not (module == parent or module.startswith(parent + ".")):
                out.append(parent)
        out.append(name)
    return [t for t in out if t in MODULES and t != module]


def _imports(module: str) -> tuple[set[str], list[tuple[int, str, str]]]:
    """(modules imported at module level, [(line, outermost function, module)] imported inside functions)."""
    top: set[str] = set()
    local: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for c in child.orelse:
                    visit_one(c, func)
                continue
            visit_one(child, func)

    def visit_one(child: ast.AST, func: str | None) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            for target in _targets(module, child):
                if func is None:
                    top.add(target)
                else:
                    local.append((child.lineno, func, target))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, func or getattr(child, "name", "<lambda>"))
        else:
            visit(child, func)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")), None)
    return top, local


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _rel(module: str) -> str:
    return MODULES[module].relative_to(REPO).as_posix()


def _is_entry_point(path: str, func: str) -> bool:
    return func == "main" or path == "alignx/cli.py" or (path.startswith("alignx/") and path.endswith("/cli.py"))


def test_the_checker_sees_cycles_and_relative_imports() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    top, _ = _imports("alignx.kernels")  # relative imports of the kernels package
    assert "alignx.kernels.reference" in top and "alignx.kernels.info_nce" in top


def test_no_import_cycle_inside_alignx() -> None:
    graph = {m: _imports(m)[0] for m in MODULES}
    assert _cycles(graph) == []


def test_no_function_level_import_of_alignx_outside_the_entry_points() -> None:
    found, seen = [], set()
    for module in MODULES:
        path = _rel(module)
        for line, func, target in _imports(module)[1]:
            if _is_entry_point(path, func):
                continue
            if (path, func) in LOCAL_IMPORT_EXCEPTIONS:
                seen.add((path, func))
                continue
            found.append(f"{path}:{line} {func}() imports {target}")
    assert found == []
    assert seen == LOCAL_IMPORT_EXCEPTIONS  # an exception that no longer applies is removed from the list


def _literals(path: Path) -> list[object]:
    out: list[object] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            out.append(-node.operand.value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
    return out


def test_constants_are_written_once() -> None:
    from alignx.constants import DEFAULT_INSTRUCTION, IGNORE_INDEX

    where = {
        value: sorted(_rel(m) for m in MODULES if value in _literals(MODULES[m]))
        for value in (IGNORE_INDEX, DEFAULT_INSTRUCTION)
    }
    assert where == {IGNORE_INDEX: ["alignx/constants.py"], DEFAULT_INSTRUCTION: ["alignx/constants.py"]}


def test_recipe_data_kinds_are_the_kinds_with_data_hooks() -> None:
    from alignx.config import ObjectiveConfig, load_config
    from alignx.constants import RECIPE_DATA_KINDS
    from alignx.recipes import data_hooks

    kinds = typing.get_args(typing.get_type_hints(ObjectiveConfig)["kind"])
    with_hooks = [k for k in kinds if data_hooks(load_config(None, {"objective.kind": k})) is not None]
    assert sorted(with_hooks) == sorted(RECIPE_DATA_KINDS)


@pytest.mark.parametrize(
    "module", ["alignx.constants", "alignx.layout", "alignx.errors", "alignx.decoder", "alignx.export"]
)
def test_leaf_modules_import_nothing_of_alignx_at_run_time(module: str) -> None:
    assert _imports(module) == (set(), [])


MAX_FUNCTION_LINES = 60


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (n lines)`` of every function or method longer than ``limit`` lines in ``paths``."""
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    (tmp_path / "short.py").write_text("def short():\n    return 1\n")
    assert long_functions(sorted(tmp_path.glob("*.py"))) == [f"long.py:1 long ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_function_over_60_lines_outside_kernels_and_tests() -> None:
    roots = [REPO / "alignx", REPO / "benchmarks", REPO / "examples"]
    paths = sorted(p for root in roots for p in root.rglob("*.py")) + [REPO / "train.py", REPO / "setup.py"]
    assert long_functions([p for p in paths if p.is_file()]) == []
