"""Shared CLI plumbing: error handling, output formats, progress bars, common options.

Exit codes (DESIGN.md): 0 success / gate passed, 1 gate failed, 2 bad usage or
unreadable input, 130 interrupted by Ctrl-C. Results go to stdout, everything else to
stderr.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..defaults import DEFAULT_CLASSIFIER, GATE_CHOICES
from ..errors import PixelDefendError, UsageError
from ..progress import ProgressBar as ProgressBar
from ..progress import RichTrainProgress as RichTrainProgress
from ..progress import err_console
from ..ranks import follower_rank, leave_together, silence_stdout
from ..rendering import RowStream as RowStream
from ..rendering import cli_message as cli_message
from ..rendering import cli_strings as cli_strings
from ..rendering import cli_text as cli_text
from ..rendering import emit as emit
from ..rendering import out_console as out_console
from ..scores import SCORES
from ..threads import apply_threads

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INTERRUPT = 0, 1, 2, 130

F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


DEVICE_HELP = "auto (CUDA if available, else CPU), cpu, cuda or cuda:N."
FORMAT_HELP = "Output format for results on stdout (or --output)."
OVERWRITE_HELP = (
    "Replace outputs that already exist. Only files and folders pixeldefend created "
    "are ever replaced (output folders carry a .pixeldefend-output.json marker; "
    "bundles a pixeldefend config.json), never a folder it did not create, never an "
    "input of the same call.")
TRUST_CODE_HELP = (
    "Allow classifiers that run code when loaded: TorchScript files (torch.jit.load) and "
    "package.module:factory specs. Only for files and modules you trust. Classifier "
    "bundles need no flag.")


def flag(*decls: str, help: str) -> Any:  # noqa: A002 (Typer's own keyword)
    """An on/off option shown without a `<bool>` type (it takes no value)."""
    return typer.Option(*decls, help=help, metavar="")


# Options several commands share, declared once: `device: Device = "auto"`.
ImagePaths = Annotated[list[str], typer.Argument(
    help="Images, folders, .npz/.npy files or built-in data specs such as digits:test.")]
Device = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
ModelBundle = Annotated[Path, typer.Option("--model", "-m", help="Model bundle directory.")]
Format = Annotated[OutputFormat, typer.Option("--format", "-f", help=FORMAT_HELP)]
StdoutFormat = Annotated[OutputFormat, typer.Option(
    "--format", "-f", help="Output format for results on stdout.")]
DataRoot = Annotated[str | None, typer.Option("--data-root",
                                              help="Folder holding data set files.")]
Download = Annotated[bool, flag("--download",
                                help="Let torchvision download the data set if missing.")]
Resize = Annotated[bool, flag("--resize", help="Resize images to the model's size.")]
Grayscale = Annotated[bool, flag("--grayscale", help="Convert colour/gray to match.")]
Overwrite = Annotated[bool, flag("--overwrite", help=OVERWRITE_HELP)]
TrustCode = Annotated[bool, flag("--trust-code", help=TRUST_CODE_HELP)]
Resume = Annotated[bool, flag("--resume",
                              help="Continue an interrupted run from its last checkpoint.")]
Output = Annotated[Path | None, typer.Option("--output", "-o", help="Write results here.")]
CLASSIFIER_HELP = ("Classifier bundle directory, TorchScript file or package.module:factory "
                   "(these two run code: need --trust-code)")
Classifier = Annotated[str | None, typer.Option(
    "--classifier", "-c", help=f"{CLASSIFIER_HELP} \\[default: {DEFAULT_CLASSIFIER}].")]
Mean = Annotated[str | None, typer.Option(
    help="Per-channel mean the classifier expects, e.g. 0.4914,0.4822,0.4465.")]
Std = Annotated[str | None, typer.Option(help="Per-channel std the classifier expects.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per batch.")]
StepBatch = Annotated[int, typer.Option(min=1, help="Images per optimisation step.")]
EpsLevels = Annotated[bool, flag("--eps-levels", help="Read --eps as whole pixel levels.")]


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PRECISION_HELP = (
    "Precision of the network's forward pass: fp32 (exact), bf16 or fp16 (mixed precision, "
    "torch.autocast; fp16 needs CUDA and scales the loss). Losses and scores are computed "
    "in float32 from the logits whatever is chosen; calibration always runs in fp32.")
Precision = Annotated[PrecisionChoice, typer.Option("--precision", help=PRECISION_HELP)]
Compile = Annotated[bool, flag("--compile", help=(
    "Run the network through torch.compile (for GPUs; on a CPU it rarely pays for its "
    "compile time). Scores are the same to float32 rounding; purification never compiles."))]


# choices Typer lists in --help and checks: --score, --fail-on
ScoreChoice = Enum("ScoreChoice", {k: k for k in SCORES}, type=str)  # type: ignore[misc]
GateChoice = Enum("GateChoice", {c: c for c in GATE_CHOICES}, type=str)  # type: ignore[misc]
SCORE_OPTION_HELP = "Score kind: " + "; ".join(f"{k} = {v.help}" for k, v in SCORES.items()) + "."


def _command_threads(value: int | None) -> int | None:
    if value:
        apply_threads(value)
    return value


# a command's own --threads: the same as the global `pixeldefend --threads N <command>`
Threads = Annotated[int | None, typer.Option(
    "--threads", min=1, callback=_command_threads,
    help="CPU threads for PyTorch; the same as the global `pixeldefend --threads N` "
         "\\[default: the global setting].")]


SHARD_HELP = (
    "Process only block I of N of the inputs (0-based, contiguous, in input order), e.g. "
    "0/4 in the first task of a job array; `pixeldefend merge` joins score's outputs. "
    "Under torchrun every rank already takes its block: no --shard needed.")
Shard = Annotated[str | None, typer.Option("--shard", metavar="I/N", help=SHARD_HELP)]
ShardedScore = Annotated[int | None, typer.Option(
    "--sharded-score", min=1, metavar="N", help="Instead of the cases: score N images of the "
    "first case split over the ranks (run under torchrun) and print each rank's "
    "throughput and the total.")]
Workers = Annotated[int, typer.Option(
    "--workers", min=0, help="Processes decoding image files ahead of the model (a torch "
    "DataLoader; order and per-file error rows are kept); 0 decodes in this process.")]


# the gate of `score`, given again to `merge` (JSONL / CSV shard outputs do not store it)
FailOn = Annotated[GateChoice, typer.Option(
    "--fail-on", help="Gate: 'anomalous' exits 1 if any image is flagged.")]
MaxAnomalousFraction = Annotated[float | None, typer.Option(
    "--max-anomalous-fraction", min=0.0, max=1.0,
    help="Gate: exit 1 if more than this fraction of images is flagged.")]
SkipUnreadable = Annotated[bool, flag(
    "--skip-unreadable", help="Let unreadable inputs (corrupt, wrong size, unsupported files) "
    "pass the gate; they are still listed as error rows and counted as skipped. Without it "
    "any unreadable input fails a gate (exit 1), or exits 2 when no gate is set.")]
BatchTest = Annotated[bool, flag(
    "--batch-test", help="Gate on the whole-set typicality test (needs --model).")]


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    rank = follower_rank()
    if rank is not None:  # its console is silent; an error must still be seen
        sys.stderr.write(f"error (rank {rank}): {message}\n")
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning[/]: {message}", highlight=False)


def log(message: str) -> None:
    err_console.print(message, highlight=False)


def report_skipped(errors: list[tuple[str, str]], summary: bool = True) -> None:
    """List the unreadable files a command left out (with --skip-unreadable: a count)."""
    for name, error in errors:
        err_console.print(f"[yellow]skipped[/] {name}: {cli_text(error)}", highlight=False)
    if errors and summary:
        err_console.print(f"[yellow]skipped {len(errors)} unreadable file(s)[/] "
                          "(--skip-unreadable)", highlight=False)


def interrupted(checkpoint: Path) -> None:
    err_console.print(f"[yellow]interrupted[/]: continue with the same command plus "
                      f"--resume (checkpoint in {checkpoint})")


def handle_errors(func: F) -> F:
    """Turn library errors into a one-line message and exit code 2; Ctrl-C into 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if follower_rank() is not None:  # results and progress come from rank 0 alone
            out_console.quiet = err_console.quiet = True
            silence_stdout()
        try:
            result = func(*args, **kwargs)
        except typer.Exit as done:  # the command ran to its end (on every torchrun rank)
            leave_together(done.exit_code)
            raise
        except PixelDefendError as exc:
            raise fail(cli_message(exc)) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPT) from None
        leave_together(EXIT_OK)
        return result

    return wrapper  # type: ignore[return-value]


def parse_numbers(text: str | None, option: str, convert: Callable[[str], Any] = float,
                  example: str = "0.485,0.456,0.406", what: str = "numbers") -> list | None:
    """A comma- or space-separated list of numbers for `option` (None when not given)."""
    if text is None:
        return None
    try:
        values = [convert(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError as exc:
        raise UsageError(f"{option} takes comma-separated {what}, e.g. {example}") from exc
    if not values:
        raise UsageError(f"{option} needs at least one value")
    return values
