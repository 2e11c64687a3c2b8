"""No dead code: every public top-level function, class and constant defined in
pixeldefend/ is used somewhere in pixeldefend/ or tests/ (a vulture-style check by name,
from the syntax tree: nothing is imported or run).

A name counts as used when it is loaded (`name`, `module.name`) or imported anywhere
other than its own definition. CLI commands registered by decorator (`@app.command`,
`@app.callback`) are used by Typer. Public API in an `__all__` and the few names used
from outside the code (below) are allowed explicitly.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pixeldefend"

# Used from outside pixeldefend/ and tests/, or kept on purpose. Every entry says why.
ALLOWED = {
    "main",  # cli.main: the `pixeldefend` console script (pyproject.toml [project.scripts])
}


def _python_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py"))


def _public_api(package: Path = PACKAGE) -> set[str]:
    names: set[str] = set()
    for path in _python_files(package):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                names |= {elt.value for elt in node.value.elts}  # type: ignore[attr-defined]
    return names


def _registered(node: ast.AST) -> bool:
    """Decorated as a Typer command or callback: Typer calls it, not our code."""
    for deco in getattr(node, "decorator_list", []):
        func = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(func, ast.Attribute) and func.attr in ("command", "callback"):
            return True
    return False


def public_definitions(package: Path = PACKAGE) -> dict[str, list[str]]:
    """Public top-level names defined in the package -> where (file:line)."""
    defined: dict[str, list[str]] = {}
    for path in _python_files(package):
        for node in ast.parse(path.read_text()).body:
            names: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if not _registered(node):
                    names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            for name in names:
                if not name.startswith("_"):
                    defined.setdefault(name, []).append(
                        f"{path.relative_to(package.parent)}:{node.lineno}")
    return defined


def used_names(*roots: Path) -> set[str]:
    used: set[str] = set()
    for path in _python_files(*(roots or (PACKAGE, REPO / "tests"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom):
                used |= {alias.name for alias in node.names}
    return used


def dead_definitions(package: Path, *roots: Path, allowed: set[str] = ALLOWED
                     ) -> dict[str, list[str]]:
    used = used_names(*roots) | _public_api(package) | allowed
    return {name: where for name, where in public_definitions(package).items()
            if name not in used}


def test_no_dead_public_definitions():
    dead = dead_definitions(PACKAGE, PACKAGE, REPO / "tests")
    assert not dead, "defined but never used (remove, or allow with a reason): " + ", ".join(
        f"{name} ({', '.join(where)})" for name, where in sorted(dead.items()))


def test_allow_list_has_no_stale_entries():
    defined = public_definitions()
    assert not [name for name in ALLOWED if name not in defined]


def test_the_check_finds_dead_code(tmp_path):
    """The check itself can fail: an unused definition is reported; a used one, a Typer
    command and a name in `__all__` are not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__all__ = ["api"]\n')
    (pkg / "lib.py").write_text(
        "LIMIT = 3\n\ndef api():\n    pass\n\ndef helper():\n    return LIMIT\n\n"
        "def forgotten():\n    pass\n\n@app.command()\ndef cmd():\n    helper()\n")
    (pkg / "other.py").write_text("from .lib import api\n")
    assert set(dead_definitions(pkg, pkg, allowed=set())) == {"forgotten"}
