"""Shared CLI plumbing: error handling, output formats, progress bars, common options.

Exit codes (DESIGN.md): 0 success / gate passed, 1 gate failed, 2 bad usage or
unreadable input, 130 interrupted by Ctrl-C. Results go to stdout, everything else to
stderr.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..atomic import write_text
from ..defaults import GATE_CHOICES, SCORE_HELP, SCORE_KINDS
from ..errors import PixelDefendError, UsageError
from ..threads import apply_threads

err_console = Console(stderr=True, soft_wrap=True)
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


OVERWRITE = typer.Option(False, "--overwrite", help=OVERWRITE_HELP, metavar="")

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
ScoreChoice = Enum("ScoreChoice", {k: k for k in SCORE_KINDS}, type=str)  # type: ignore[misc]
GateChoice = Enum("GateChoice", {c: c for c in GATE_CHOICES}, type=str)  # type: ignore[misc]
SCORE_OPTION_HELP = "Score kind: " + "; ".join(f"{k} = {v}" for k, v in SCORE_HELP.items()) + "."


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
                 "factory_weights": "--classifier-weights"}


def option_flag(param: str) -> str:
    """The flag that sets the library parameter `param` (`fpr` -> `--fpr`)."""
    return FLAG_OF_PARAM.get(param, "--" + param.replace("_", "-"))


def cli_message(exc: PixelDefendError) -> str:
    """A library error's message, with the Python parameter it names (`param`) shown as
    the command's flag."""
    message, params = str(exc), getattr(exc, "param", None) or ()
    for param in (params,) if isinstance(params, str) else params:
        flag_text = option_flag(param)
        message = re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w-])", lambda _, f=flag_text: f,
                         message)
    return message


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


def make_progress(transient: bool = False) -> Progress:
    """A Rich progress bar on stderr with count, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=not err_console.is_terminal and not _force_progress(),
    )


def _force_progress() -> bool:
    import os

    return os.environ.get("PIXELDEFEND_PROGRESS") == "1"


def json_safe(value: Any) -> Any:
    """NaN / inf -> None so the output is strict JSON."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps(doc: Any) -> str:
    return json.dumps(json_safe(doc), indent=2) + "\n"


def rows_to_csv(rows: Iterable[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


def field_rows(doc: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """A nested document as `field,value` rows for CSV (`calibration.bpd.threshold`);
    lists of plain values become one space-separated value."""
    rows: list[dict[str, Any]] = []
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(field_rows(value, name + "."))
        elif isinstance(value, list | tuple) and not any(isinstance(v, dict | list)
                                                          for v in value):
            rows.append({"field": name, "value": " ".join(str(v) for v in value)})
        elif isinstance(value, list | tuple):
            rows.extend(field_rows({str(i): v for i, v in enumerate(value)}, name + "."))
        else:
            rows.append({"field": name, "value": json_safe(value)})
    return rows


def emit(fmt: OutputFormat, doc: dict[str, Any], rows: list[dict[str, Any]], columns: list[str],
         table: Callable[[], Table | str], output: Path | None = None) -> None:
    """Write results in the chosen format to stdout or, atomically, to `output`."""
    from ..outputs import OutputError

    if fmt == OutputFormat.json:
        text = dumps(doc)
    elif fmt == OutputFormat.jsonl:
        text = "".join(json.dumps(json_safe(r)) + "\n" for r in rows)
    elif fmt == OutputFormat.csv:
        text = rows_to_csv(rows, columns)
    else:
        rendered = table()
        if output is None:
            out_console.print(rendered)
            return
        buf = io.StringIO()
        Console(file=buf, width=160, soft_wrap=True).print(rendered)
        text = buf.getvalue()
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            write_text(output, text)
        except OSError as exc:  # checked up front; this is a disk that filled up since
            raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
        err_console.print(f"wrote {output}")


class RowStream:
    """Writes JSONL / CSV result rows as they come, to stdout or (atomically, published
    when the run ends) to `output`, so memory does not grow with the number of rows."""

    def __init__(self, fmt: OutputFormat, columns: list[str], output: Path | None) -> None:
        import contextlib

        from ..atomic import atomic_path

        self.fmt, self.columns, self.output = fmt, columns, output
        self._stack = contextlib.ExitStack()
        if output is None:
            self.fh: Any = sys.stdout
        else:
            tmp = self._stack.enter_context(atomic_path(output))
            self.fh = self._stack.enter_context(open(tmp, "w", encoding="utf-8", newline=""))
        self.writer = None
        if fmt == OutputFormat.csv:
            self.writer = csv.DictWriter(self.fh, fieldnames=columns, extrasaction="ignore",
                                         lineterminator="\n")
            self.writer.writeheader()

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            if self.writer is not None:
                self.writer.writerow({k: ("" if row.get(k) is None else row.get(k))
                                      for k in self.columns})
            else:
                self.fh.write(json.dumps(json_safe(row)) + "\n")
        self.fh.flush()

    def __enter__(self) -> RowStream:
        return self

    def __exit__(self, *exc: object) -> None:
        from ..outputs import OutputError

        try:
            self._stack.__exit__(*exc)  # on success the file is published, else removed
        except OSError as error:  # checked up front; a disk that filled up since
            raise OutputError(f"cannot write {self.output}: {error.strerror or error}") \
                from None
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


def parse_floats(text: str | None, option: str) -> list[float] | None:
    return parse_numbers(text, option)


def fmt_float(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


class RichTrainProgress:
    """Renders the training loop's reports (`train.TrainProgress`): a Rich bar on stderr
    plus one line per epoch. Subclasses change only how the metrics are worded."""

    def __init__(self, label: str = "train") -> None:
        self.progress = make_progress()
        self.label = label
        self.task: Any = None
        self.epochs = 0
        self.last_val = float("nan")

    def __enter__(self) -> RichTrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def batch_status(self, loss: float) -> str:
        return f"loss {loss:.3f} bits/dim  val {self.last_val:.3f}"

    def epoch_summary(self, train_metric: float, val_metric: float) -> str:
        return f"train {train_metric:.4f}  val {val_metric:.4f} bits/dim"

    def start(self, total_epochs: int, batches_per_epoch: int, first_epoch: int) -> None:
        self.epochs = total_epochs
        self.task = self.progress.add_task(
            self.label, total=total_epochs * batches_per_epoch,
            completed=first_epoch * batches_per_epoch, status="")

    def batch(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, status=self.batch_status(loss))

    def epoch(self, epoch: int, train_metric: float, val_metric: float, best: bool) -> None:
        self.last_val = val_metric
        err_console.print(
            f"epoch {epoch + 1:>3}/{self.epochs}  {self.epoch_summary(train_metric, val_metric)}"
            f"{' *' if best else ''}", highlight=False)
