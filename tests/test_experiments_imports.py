"""The PyTorch side of `experiments.parity` runs where only torch, numpy and safetensors are installed.

Its scripts, and every module and package `__init__` they import, are read (not imported: torch is not
a dependency of the package) and must import nothing but the standard library, those three and
`experiments` itself; `experiments.parity.compare` is the JAX side.
"""

import ast
import sys
from pathlib import Path

from helpers import REPO

EXPERIMENTS = REPO / "experiments"
PYTORCH_SIDE_DEPENDENCIES = {"numpy", "safetensors", "torch"}
JAX_SIDE = {"compare"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def imported_names(path: Path) -> set[str]:
    """Every module name a source file imports, function-local imports included; `from a import b` gives `a` and
    `a.b` (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def experiments_sources(name: str) -> list[Path]:
    """The files Python runs to import `name` of the experiments package: each package's `__init__`, the module."""
    parts = name.split(".")
    sources = [REPO.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts) + 1)]
    return [path for path in [*sources, REPO.joinpath(*parts).with_suffix(".py")] if path.is_file()]


def outside_imports(script: Path) -> dict[str, set[str]]:
    """{file: the imports it makes beyond the standard library and the PyTorch side's dependencies}, over the
    script and every experiments source it imports, transitively."""
    found, todo, seen = {}, [script, *experiments_sources(module_name(script))], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            top = name.partition(".")[0]
            if top == "experiments":
                todo += experiments_sources(name)
            elif top not in sys.stdlib_module_names and top not in PYTORCH_SIDE_DEPENDENCIES:
                found.setdefault(str(path.relative_to(REPO)), set()).add(name)
    return found


def test_pytorch_side_imports_only_torch_numpy_and_safetensors():
    parity = sorted((EXPERIMENTS / "parity").glob("*.py"))
    scripts = [path for path in parity if path.stem not in {"__init__", *JAX_SIDE}]
    assert {path.stem for path in scripts} >= {"torch_reference", "reference_checkpoint", "make_case"}
    for script in scripts:
        assert outside_imports(script) == {}, script.name


def test_the_check_sees_the_jax_side():
    assert outside_imports(EXPERIMENTS / "parity" / "compare.py").keys() == {"experiments/parity/compare.py"}


def test_package_inits_import_nothing():
    inits = sorted(EXPERIMENTS.rglob("__init__.py"))
    assert {path.parent.name for path in inits} == {"experiments", "parity", "compile", "bench", "studies"}
    for path in inits:
        assert imported_names(path) == set(), path
