"""No function in pixeldefend/ over 80 lines (issue 12); a CLI command's option
declarations (its signature) do not count, its body does."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pixeldefend"
LIMIT = 80


def test_no_function_over_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            first = node.body[0].lineno if "cli" in path.parts else node.lineno
            if node.end_lineno - first + 1 > LIMIT:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - first + 1} lines)")
    assert not long, "split these: " + ", ".join(long)
