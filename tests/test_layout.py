"""The layout the project promises (ARCHITECTURE.md): layers enforced by import contracts, modules
small and split by meaning, no private name used across modules, and ARCHITECTURE.md naming
every module."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradalign as ga

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "gradalign"
MODULES = sorted(p for p in SRC.rglob("*.py"))
PYTHON_TREES = [SRC, ROOT / "tests", ROOT / "benchmarks"]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_import_contracts_are_kept():
    """pyproject.toml [tool.importlinter]: engine < methods < integrations | experiments < cli, the
    experiments' packages and the engine's modules in their order."""
    # in a subprocess: import-linter configures logging and would disable the loggers of later tests
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_modules_and_functions_are_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 400, f"{_rel(path)} has more than 400 lines: split it by meaning"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{_rel(path)}:{node.lineno} {node.name} has {length} lines: split it"


def test_packages_hold_at_most_twelve_modules():
    for package in sorted({p.parent for p in MODULES}):
        modules = [p.name for p in package.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{_rel(package)} holds {len(modules)} modules: group them into packages"


def _private_uses(path: Path) -> list[str]:
    """`from gradalign... import _name`, and `module._name` for a gradalign module imported by name."""
    tree = ast.parse(path.read_text())
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("gradalign", "tests", "benchmarks")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{_rel(path)}:{node.lineno} imports {node.module}.{alias.name}")
                elif alias.name[:1].islower():
                    modules.add(alias.asname or alias.name)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(("gradalign", "tests", "benchmarks")) and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{_rel(path)}:{node.lineno} uses {node.value.id}.{node.attr}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and re.fullmatch(r"gradalign(\.\w+)+\._\w+", node.value):          # monkeypatch targets
            found.append(f"{_rel(path)}:{node.lineno} names {node.value}")
    return found


def test_no_private_name_is_used_across_modules():
    found = [use for tree in PYTHON_TREES for path in sorted(tree.rglob("*.py")) for use in _private_uses(path)]
    assert not found, "private names used from another module (make them public or move them):\n" + "\n".join(found)


def test_architecture_names_every_module():
    """ARCHITECTURE.md is the one map of the code: every module appears in it by its path under
    src/gradalign/ (e.g. `experiments/data/splits.py`)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    missing = [str(p.relative_to(SRC)) for p in MODULES if p.name != "__init__.py" and str(p.relative_to(SRC)) not in text]
    assert not missing, "ARCHITECTURE.md does not name: " + ", ".join(missing)


def test_old_public_names_still_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="ga.reference_gradients"):
        old = ga.per_sample_gradients
    assert old is ga.reference_gradients
    with pytest.raises(AttributeError, match="no_such_name"):
        ga.no_such_name  # noqa: B018
