"""The package's shape: imports run one way, each thing is defined once, one word per concept, errors in one line."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from stade_cli import compare, console
from stade_cli.errors import StadeError, first_line, library_errors

PACKAGE = Path(__file__).resolve().parent.parent / "stade_cli"
MODULES = {p.stem: ast.parse(p.read_text(encoding="utf8")) for p in sorted(PACKAGE.glob("*.py"))}


def module_imports(tree: ast.Module, lazy: bool = False) -> set[str]:
    """The stade modules a module imports: at its top level, or (lazy) anywhere but under `if TYPE_CHECKING`."""
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree) if lazy else tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in typing_only:
            found |= {node.module} if node.module else {alias.name for alias in node.names} - {"__version__"}
    return found & set(MODULES)


def test_imports_run_one_way() -> None:
    """No cycle, counting the imports inside functions too: every arrow between modules points one way."""
    graph = {name: module_imports(tree, lazy=True) for name, tree in MODULES.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail("import cycle: " + " -> ".join(exc.args[1]))


@pytest.mark.parametrize(
    ("leaf", "allowed"),
    [("errors", set()), ("versions", set()), ("fingerprint", set()), ("layers", {"errors"}), ("files", {"errors"})],
)
def test_leaf_modules_import_no_other_stade_module(leaf: str, allowed: set[str]) -> None:
    assert module_imports(MODULES[leaf]) <= allowed


def test_each_function_and_class_is_defined_once() -> None:
    """A second definition of the same name in another module is a second copy to keep in step."""
    where: dict[str, list[str]] = {}
    for name, tree in MODULES.items():
        if name == "cli" or name.startswith("cmd_"):  # commands carry their stages' names (stade compare -> compare())
            continue
        for node in tree.body:
            # `main` per entry point, and `register`: each stage registry's own decorator (a registry per kind)
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name not in ("main", "register"):
                where.setdefault(node.name, []).append(name)
    assert {n: mods for n, mods in where.items() if len(mods) > 1} == {}


@pytest.mark.parametrize("module", ["compare", "tables", "zeroshot", "evaluate", "perplexity"])
def test_evaluation_numbers_are_results_not_metrics(module: str) -> None:
    """An evaluation number is a 'result' (and a pruning score a 'score', scores.py): 'metric' names neither."""
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
    assert {name: kind.higher_is_better for name, kind in compare.RESULT_KINDS.items()} == {
        "ppl": False,
        "acc": True,
        "acc_norm": True,
    }
    assert not hasattr(compare, "METRICS") and not hasattr(compare, "register_metric")


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
