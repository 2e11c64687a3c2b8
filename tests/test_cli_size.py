"""The CLI stays thin (issue 12): option parsing and rendering, the work in the library.
A command that needs more than its options, a library call and its output belongs in a
library pipeline (see CONTRIBUTING.md, "A CLI command")."""

from __future__ import annotations

from pathlib import Path

CLI = Path(__file__).resolve().parents[1] / "pixeldefend" / "cli"
LIMIT = 1400  # lines of pixeldefend/cli/*.py, as `wc -l` counts them


def test_cli_is_under_its_line_budget():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines())
             for p in sorted(CLI.glob("*.py"))}
    assert sizes, "no CLI modules found"
    total = sum(sizes.values())
    assert total < LIMIT, (f"pixeldefend/cli/ has {total} lines (limit {LIMIT}): move work "
                           f"into library functions; per module: {sizes}")
