"""The package's shape: layers import downwards only, each thing is defined once, modules and functions stay short,
one word per concept, errors in one line."""

from __future__ import annotations

import ast
import graphlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stade_cli.base import console
from stade_cli.base.errors import StadeError, first_line, library_errors
from stade_cli.evaluation import compare

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stade_cli"
MODULES = {
    ".".join(p.relative_to(PACKAGE).with_suffix("").parts): ast.parse(p.read_text(encoding="utf8"))
    for p in sorted(PACKAGE.rglob("*.py"))
}
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's check of the contract in `root`/pyproject.toml, on the package in `root`."""
    env = {"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root), "HOME": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, env=env)


def test_layers_import_only_downwards() -> None:
    """pyproject.toml's import contract (also run by `make lint`): cli, planning, evaluation, driver, stages,
    stats, models, data, base, each importing only those below it, lazy imports inside functions included."""
    res = lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_the_contract_catches_an_upward_import(tmp_path: Path) -> None:
    """The contract is not vacuous: one import of the driver from the stages breaks it, and it says where."""
    shutil.copytree(PACKAGE, tmp_path / "stade_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    masks = tmp_path / "stade_cli" / "stages" / "masks.py"
    masks.write_text(masks.read_text() + "\n\ndef _upward() -> None:\n    from stade_cli.driver import prune  # noqa\n")
    res = lint_imports(tmp_path)
    assert res.returncode != 0
    assert "stade_cli.stages.masks -> stade_cli.driver.prune" in res.stdout


def module_imports(tree: ast.Module) -> set[str]:
    """The stade modules a module imports anywhere (inside functions too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stade_cli"):
            sub = node.module.removeprefix("stade_cli").lstrip(".")
            for alias in node.names:
                found.add(f"{sub}.{alias.name}" if f"{sub}.{alias.name}" in MODULES else sub)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("stade_cli.") for a in node.names if a.name.startswith("stade_cli.")}
    return found & set(MODULES)


def test_no_import_cycle_between_modules() -> None:
    graph = {name: module_imports(tree) - {name} for name, tree in MODULES.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail("import cycle: " + " -> ".join(exc.args[1]))


def test_base_imports_no_other_layer() -> None:
    for name, tree in MODULES.items():
        if name.startswith("base."):
            assert {m.split(".")[0] for m in module_imports(tree)} <= {"base"}, name


def test_each_function_and_class_is_defined_once() -> None:
    """A second definition of the same name in another module is a second copy to keep in step."""
    where: dict[str, list[str]] = {}
    for name, tree in MODULES.items():
        if name.startswith("cli."):  # commands carry their stages' names (stade compare -> compare())
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name != "main":
                where.setdefault(node.name, []).append(name)
    assert {n: mods for n, mods in where.items() if len(mods) > 1} == {}


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) else fn.body
    return 0 if not body else (body[-1].end_lineno or 0) - body[0].lineno + 1


def test_modules_and_functions_stay_short() -> None:
    """No module over 400 lines; no function body over 60 (the Typer signatures aside: the body is counted)."""
    long_modules = {n: len(p.read_text().splitlines()) for n, p in ((n, PACKAGE / (n.replace(".", "/") + ".py"))
                    for n in MODULES)}  # fmt: skip
    assert {n: k for n, k in long_modules.items() if k > 400} == {}
    long_functions = {
        f"{name}:{node.name}": _body_lines(node)
        for name, tree in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > 60
    }
    assert long_functions == {}


@pytest.mark.parametrize(
    "module",
    ["evaluation.compare", "cli.tables", "evaluation.zeroshot", "evaluation.evaluate", "evaluation.perplexity"],
)
def test_evaluation_numbers_are_results_not_metrics(module: str) -> None:
    """An evaluation number is a 'result' (and a pruning score a 'score'): 'metric' names neither."""
    names = set()
    for node in ast.walk(MODULES[module]):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    assert sorted(n for n in names if "metric" in n.lower()) == []


def test_result_kinds_know_their_direction() -> None:
    assert {kind.name: kind.higher_is_better for kind in compare.RESULT_KINDS} == {
        "ppl": False,
        "acc": True,
        "acc_norm": True,
    }


def test_console_has_no_unused_helpers() -> None:
    assert not hasattr(console, "track")


def test_library_errors_become_one_line() -> None:
    with pytest.raises(StadeError) as info, library_errors("Could not load 'x'", "try y"):
        raise ValueError("first line\nsecond line\nthird line")
    assert (info.value.message, info.value.hint) == ("Could not load 'x': first line", "try y")
    assert isinstance(info.value.__cause__, ValueError)
    own = StadeError("already explained", "hint")
    with pytest.raises(StadeError) as info, library_errors("Could not load 'x'", "try y"):
        raise own
    assert info.value is own
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("  \n")) == "OSError"
