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
from rich.console import Console
from rich.table import Table

from ..defaults import DEFAULT_CLASSIFIER, GATE_CHOICES
from ..errors import PixelDefendError, UsageError
from ..progress import ProgressBar as ProgressBar
from ..progress import RichTrainProgress as RichTrainProgress
from ..progress import err_console
from ..rendering import RowWriter, render_text, write_result
from ..scores import SCORES
from ..threads import apply_threads

# results on a pipe or file are not squeezed into 80 columns
out_console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)

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


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


# library parameters whose flag is not `--` plus the dashed name
FLAG_OF_PARAM = {"kind": "--score", "score_kind": "--score", "l2": "--l2",
                 "factory_weights": "--classifier-weights", "in_spec": "--in"}


def option_flag(param: str) -> str:
    """The flag that sets the library parameter `param` (`fpr` -> `--fpr`)."""
    return FLAG_OF_PARAM.get(param, "--" + param.replace("_", "-"))


def cli_text(text: str, params: str | tuple[str, ...] | None = ()) -> str:
    """Library text as the command line says it: each Python parameter in `params`, and
    every `name=True` (an on/off parameter), shown as its flag (`fpr` -> `--fpr`)."""
    text = re.sub(r"(?<![\w-])([a-z][a-z0-9_]*)=True(?![\w-])",
                  lambda m: option_flag(m[1]), text)
    for param in (params,) if isinstance(params, str) else params or ():
        text = re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w-])",
                      lambda _, f=option_flag(param): f, text)
    return text


def cli_message(exc: PixelDefendError) -> str:
    """A library error's message, with the parameters it names (`param`, an output's
    leading `label`) as flags."""
    message, label = str(exc), getattr(exc, "label", None)
    if label and not label.startswith("-") and message.startswith(label + " "):
        message = option_flag(label) + message[len(label):]
    return cli_text(message, getattr(exc, "param", None))


def cli_strings(value: Any) -> Any:
    """`cli_text` on every string of a result document or row (per-file errors, gate
    reasons) before it is shown."""
    if isinstance(value, str):
        return cli_text(value)
    if isinstance(value, dict):
        return {k: cli_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [cli_strings(v) for v in value]
    return value


def speaks() -> bool:
    """Under torchrun rank 0 alone speaks for the job (the environment tells, no torch)."""
    from ..distributed import is_main_process

    return is_main_process()


def warn(message: str) -> None:
    if speaks():
        err_console.print(f"[yellow]warning[/]: {message}", highlight=False)


def log(message: str) -> None:
    if speaks():
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
        try:
            return func(*args, **kwargs)
        except PixelDefendError as exc:
            raise fail(cli_message(exc)) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(EXIT_INTERRUPT) from None

    return wrapper  # type: ignore[return-value]


def emit(fmt: OutputFormat, doc: dict[str, Any], rows: list[dict[str, Any]], columns: list[str],
         table: Callable[[dict[str, Any]], Table | str], output: Path | None = None) -> None:
    """Write results in the chosen format to stdout or, atomically, to `output`; library
    text in them (per-file errors, gate reasons) names flags, not parameters."""
    doc, rows = cli_strings(doc), cli_strings(rows)
    if fmt == OutputFormat.table and output is None:
        out_console.print(table(doc))
        return
    write_result(render_text(fmt.value, doc, rows, columns, table), output)
    if output is not None:
        err_console.print(f"wrote {output}")


class RowStream(RowWriter):
    """`RowWriter` whose rows name flags (`cli_strings`) and which says what it wrote."""

    def __init__(self, fmt: OutputFormat, columns: list[str], output: Path | None) -> None:
        super().__init__(fmt.value, columns, output, prepare=cli_strings)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self.output is not None and exc[0] is None:
            err_console.print(f"wrote {self.output}", highlight=False)


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
