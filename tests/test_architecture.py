"""The shape of tunesmith's import graph, read from the source with `ast` (nothing imported but the CLI).

- No import cycle inside tunesmith. Imports inside functions count: they only hide a cycle, they do not remove it.
- `tunesmith --help` starts without torch and the other heavy packages (checked in a fresh interpreter).
- A function-level import of a tunesmith module is there only to keep a heavy package out of a module that loads
  none otherwise; anything else belongs at module level. The CLI module is exempt: each command imports its own
  implementation, so `--help` loads typer and rich only.

Imports under `if TYPE_CHECKING:` are skipped: they serve annotations and never run.
Not checked: that each function-level import of a heavy package carries a one-line reason comment (a convention);
imports made with importlib (the lazy API names in tunesmith/__init__.py) are invisible to `ast`.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"
HEAVY = frozenset({
    "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "gguf", "huggingface_hub", "numpy",
    "bitsandbytes", "galore_torch", "trl", "matplotlib", "fastapi", "uvicorn",
})
COMMAND_LINE = {"tunesmith.cli"}  # imports each command's implementation inside the command, for a fast --help


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # a module of the package, or a third-party top-level package
    path: Path
    line: int
    lazy: bool  # inside a function


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package in `root` (packages named by their __init__)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = [root.name, *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _known_prefix(name: str, known) -> str:
    """The longest prefix of dotted `name` that is a module of the package; else the top-level package."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in known:
            return ".".join(parts[:k])
    return parts[0]


def _targets(node, package: str, known) -> list[str]:
    if isinstance(node, ast.Import):
        return [_known_prefix(a.name, known) for a in node.names]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else _known_prefix(base, known) for a in node.names]


def _type_checking_only(node) -> bool:
    """`if TYPE_CHECKING:` blocks: imports for annotations only, never run."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return isinstance(test, (ast.Name, ast.Attribute)) and (getattr(test, "id", None) or test.attr) == "TYPE_CHECKING"


def imports(root: Path) -> list[Import]:
    """Every import statement of the package, module level and inside functions."""
    known = modules(root)
    found: list[Import] = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node, lazy: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if _type_checking_only(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found.extend(Import(name, t, path, child.lineno, lazy) for t in _targets(child, package, known))
                visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return found


def find_cycle(found: list[Import], package: str) -> list[Import]:
    """One import cycle inside `package` as the imports that close it (empty when there is none)."""
    edges: dict[str, list[Import]] = {}
    for i in found:
        if i.target.split(".")[0] == package and i.target != i.source:
            edges.setdefault(i.source, []).append(i)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Import] = []

    def visit(module: str) -> list[Import]:
        state[module] = 1
        for i in edges.get(module, []):
            if state.get(i.target) == 1:
                start = next((k for k, p in enumerate(path) if p.source == i.target), len(path))
                return [*path[start:], i]
            if i.target not in state:
                path.append(i)
                cycle = visit(i.target)
                if cycle:
                    return cycle
                path.pop()
        state[module] = 2
        return []

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def describe(cycle: list[Import]) -> str:
    return " -> ".join([cycle[0].source, *(i.target for i in cycle)]) + "\n" + "\n".join(
        f"  {i.path}:{i.line}: {i.source} imports {i.target}{' (inside a function)' if i.lazy else ''}" for i in cycle)


def heavy_on_import(module: str, found: list[Import]) -> set[str]:
    """The heavy packages that importing `module` loads: its module-level imports, its packages' and theirs."""
    top: dict[str, list[str]] = {}
    for i in found:
        if not i.lazy:
            top.setdefault(i.source, []).append(i.target)
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            prefix = ".".join(parts[:k])
            if prefix not in seen:
                seen.add(prefix)
                todo.extend(top.get(prefix, []))
    return seen & HEAVY


def test_no_import_cycle_inside_tunesmith():
    cycle = find_cycle(imports(SRC), "tunesmith")
    if cycle:
        pytest.fail("import cycle: " + describe(cycle), pytrace=False)


def test_the_checker_sees_function_level_relative_and_from_package_imports(tmp_path):
    """A cycle closed only by `from . import a` inside a function is still a cycle; `from pkg import name` of a
    plain name resolves to the package, not to a submodule."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("thing = 1\n")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nfrom pkg import thing\nimport torch.nn\n"
                              "if TYPE_CHECKING:\n    from .a import f\n")
    found = imports(pkg)
    cycle = find_cycle(found, "pkg")
    assert [(i.source, i.target, i.line, i.lazy) for i in cycle] == [("pkg.a", "pkg.b", 1, False), ("pkg.b", "pkg.a", 2, True)]
    assert {(i.source, i.target) for i in found if i.source == "pkg.c"} == {("pkg.c", "typing"), ("pkg.c", "pkg"), ("pkg.c", "torch")}
    assert heavy_on_import("pkg.c", found) == {"torch"} and heavy_on_import("pkg.a", found) == set()


def test_command_line_starts_without_heavy_packages():
    code = f"import sys, tunesmith.cli; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if loaded:
        pytest.fail(f"`import tunesmith.cli` loads {loaded}: import them inside the commands that need them", pytrace=False)


def test_function_level_imports_of_tunesmith_modules_keep_a_heavy_package_out():
    found = imports(SRC)
    needless = sorted({
        f"{i.path}:{i.line}: {i.source} imports {i.target} inside a function, but at module level it would load "
        "nothing heavy that it does not load already: move it to the top"
        for i in found
        if i.lazy and i.target.startswith("tunesmith") and i.source not in COMMAND_LINE and i.target != i.source
        and not heavy_on_import(i.target, found) - heavy_on_import(i.source, found)
    })
    if needless:
        pytest.fail("\n".join(needless), pytrace=False)
