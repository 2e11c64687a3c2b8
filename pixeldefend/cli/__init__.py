"""Command-line interface. Thin: parse options, call the library, render with Rich.

Each `*_cmds` module registers its commands on `app` when imported; the import order
below is the order `pixeldefend --help` lists them in.
"""

from __future__ import annotations

import importlib
import sys

from .app import app

COMMAND_MODULES = (
    "density_cmds",  # train, train-background, calibrate, score, info, sample
    "purify_cmds",  # purify, defend
    "attack_cmds",  # classifier train, attack
    "evaluate_cmds",  # evaluate
    "ood_cmds",  # evaluate-ood
    "bench_cmds",  # bench
)
for _module in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_module}")


def main() -> None:
    try:
        app(prog_name="pixeldefend")
    finally:
        if "torch" in sys.modules:  # `--help` and usage errors never load it
            from ..distributed import shutdown

            shutdown()  # under torchrun: leave the process group cleanly (else a no-op)


__all__ = ["app", "main"]
