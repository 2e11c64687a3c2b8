"""Command-line interface. Thin: parse options, call the library, render with Rich.

Each `*_cmds` module registers its commands on `app` when imported.
"""

from __future__ import annotations

from . import (  # noqa: F401
    attack_cmds,  # classifier train, attack
    bench_cmds,  # bench
    density_cmds,  # train, calibrate, score, info, sample
    evaluate_cmds,  # evaluate
    ood_cmds,  # evaluate-ood
    purify_cmds,  # purify, defend
)
from .app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
