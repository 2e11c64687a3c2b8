"""The Typer application object; command modules register themselves on it."""

from __future__ import annotations

import typer

from .. import __version__
from ..threads import apply_threads, default_threads

app = typer.Typer(
    name="pixeldefend",
    help=(
        "Density-based anomaly and adversarial-input detection with PixelCNN.\n\n"
        "Train a PixelCNN on clean images, score new images in bits/dim, calibrate a "
        "threshold, gate CI on it, attack a classifier and purify inputs (PixelDefend)."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pixeldefend {__version__}")
        raise typer.Exit()


def _threads(value: int | None) -> int | None:
    """--threads N, else a default that does not oversubscribe a busy machine.

    Applied without importing PyTorch, which `--help` and usage errors never need: the
    count takes effect when a command first loads it (`threads.apply_threads`)."""
    if not value:
        value = default_threads().threads
    apply_threads(value)
    return value


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit.", metavar=""),
    threads: int | None = typer.Option(
        None, "--threads", min=1, envvar="PIXELDEFEND_THREADS", callback=_threads,
        help="CPU threads for PyTorch \\[default: the physical cores available to this "
             "process, less those the load average says are busy, at most 8]. "
             "Oversubscribed threads can be 10x slower."),
) -> None:
    """pixeldefend: is this input something my model was never meant to see?"""
