"""`pixeldefend evaluate`: attacks x defences table, detection figures, BPDA, report.

Thin: the work is in `pixeldefend.evaluation` (plan, stages, cache, numbers),
`pixeldefend.bpda` (the adaptive attack) and `pixeldefend.report` (tables, figures, files).
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import TaskID
from rich.table import Table

from ..defaults import DEFAULT_ATTACKS, DEFAULT_CLASSIFIER, DEFAULT_MODEL, DEFENCES
from ..errors import UsageError
from ..progress import EvalProgress
from .app import app
from .common import (
    DEVICE_HELP,
    OVERWRITE,
    TRUST_CODE_HELP,
    OutputFormat,
    err_console,
    handle_errors,
    make_progress,
    parse_numbers,
)
from .common import out_console as console

if TYPE_CHECKING:
    from ..adaptive import SuiteSettings
    from ..evaluation.plan import Stage

DEFAULT_BPDA_N = 100


def _default_path(path: Path) -> Path:
    """./models/X, else the one shipped in the source tree."""
    if path.exists():
        return path
    shipped = Path(__file__).resolve().parents[2] / path
    return shipped if shipped.exists() else path


class RichEvalProgress(EvalProgress):
    """Two Rich bars on stderr: the whole run (weighted by estimated cost, with an ETA
    that covers only the stages left to run) and the current stage. Without a terminal,
    one log line per finished stage, with the same ETA."""

    def __init__(self) -> None:
        self.progress = make_progress()
        self.total = 0.0
        self.done = 0.0
        self.count = 0
        self.finished = 0
        self.overall: TaskID | None = None
        self.current: TaskID | None = None
        self.stage_done: dict[str, float] = {}
        self.started = time.perf_counter()

    def __enter__(self) -> RichEvalProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.overall is not None and exc[0] is None:
            self.progress.update(self.overall, completed=100)  # float rounding
        self.progress.__exit__(*exc)

    def plan(self, stages: list[Stage]) -> None:
        todo = [s for s in stages if not s.cached]
        self.total = sum(s.items * s.weight for s in todo)
        self.count = len(stages)
        cached = len(stages) - len(todo)
        err_console.print(f"evaluate: {len(stages)} stages, {len(todo)} to run"
                          f"{f', {cached} from the cache' if cached else ''}", highlight=False)
        # the overall bar counts percent of the estimated cost of what is left to run
        self.overall = self.progress.add_task("evaluate (%)", total=100, status="")
        self.started = time.perf_counter()

    def begin(self, stage: Stage) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.stage_done[stage.name] = 0.0
        self.current = self.progress.add_task(stage.label, total=stage.items, status="")

    def advance(self, stage: Stage, items: float, status: str = "") -> None:
        units = items * stage.weight
        self.stage_done[stage.name] = self.stage_done.get(stage.name, 0.0) + units
        self.done += units
        if self.current is not None:
            self.progress.update(self.current, advance=items, status=status)
        self._overall(units, stage)

    def note(self, message: str) -> None:
        elapsed = (time.perf_counter() - self.started) / 60
        err_console.print(f"adaptive: {message} ({elapsed:.1f} min)", highlight=False)

    def _overall(self, units: float, stage: Stage) -> None:
        if self.overall is not None and self.total > 0:
            self.progress.update(self.overall, advance=100 * units / self.total,
                                 status=f"stage {self.finished + 1}/{self.count}")

    def end(self, stage: Stage, cached: bool) -> None:
        self.finished += 1
        if not cached:
            rest = stage.items * stage.weight - self.stage_done.get(stage.name, 0.0)
            if rest > 0:
                self.done += rest
                self._overall(rest, stage)
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None
        elapsed = time.perf_counter() - self.started
        eta = ""
        if self.done > 0 and self.total > self.done:
            eta = f", eta {(self.total - self.done) * elapsed / self.done / 60:.1f} min"
        if not self.progress.disable or cached:  # the plan line counted the cached ones
            return
        err_console.print(f"[{self.finished}/{self.count}] {stage.label}: "
                          f"{'cached' if cached else 'done'} ({elapsed / 60:.1f} min{eta})",
                          highlight=False)


def _rich_table(table: tuple[list[str], list[list[str]], list[str]], title: str) -> Table:
    header, rows, kinds = table
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i < 3 else "right")
    style = {"adaptive": "bold red", "strongest": "bold", "clean": "green"}
    for row, kind in zip(rows, kinds, strict=True):
        t.add_row(*row, style=style.get(kind))
    return t


def _default_out(data: str) -> Path:
    from ..data import parse_builtin, split_slice

    base, _ = split_slice(data)
    parsed = parse_builtin(base)
    name = f"{parsed[0]}-{parsed[1]}" if parsed else (Path(base.rstrip("/")).stem or "data")
    return Path("reports") / f"evaluate-{name}"


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    values = parse_numbers(text, option, int, "16,32", "whole pixel levels")
    return tuple(values) if values is not None else None


def _command_line() -> str | None:
    """The command as typed (without --resume: same results either way), for the report."""
    if not Path(sys.argv[0]).name.startswith("pixeldefend"):
        return None
    return "pixeldefend " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--resume")


def _suite_settings(temperature: str, adaptive_alpha: str | None, levels: int,
                    on_survivors: str | None, **options: Any) -> SuiteSettings:
    """The adaptive suite's settings from the command line's text options."""
    from ..adaptive import SuiteSettings
    from ..attacks import parse_eps
    from ..evaluation.plan import parse_list

    try:
        t_start, t_end = (float(v) for v in (parse_list(temperature) or []))
    except ValueError as exc:
        raise UsageError("--temperature takes START,END, e.g. 1,0.01") from exc
    if not (t_start > 0 and t_end > 0):
        raise UsageError("--temperature values must be positive")
    alpha = None
    if adaptive_alpha is not None:
        alpha = 0.0 if adaptive_alpha.strip() in ("0", "0.0") else \
            parse_eps(adaptive_alpha, levels).fraction
    return SuiteSettings(alpha=alpha, t_start=t_start, t_end=t_end,
                         on_survivors=tuple(a.lower() for a in parse_list(on_survivors) or []),
                         **options)


def _print_tables(results: dict[str, Any]) -> None:
    """The table format: the first caveat, accuracy, headline, detection, sanity lines."""
    from ..adaptive_report import sanity_lines
    from ..report import accuracy_table, detection_table, headline

    console.print(f"[bold]{results['notes'][0]}[/]", highlight=False)
    console.print(_rich_table(accuracy_table(results),
                              f"accuracy (%) on {results['config']['n']} images"))
    for line in headline(results):
        console.print(f"• {line}", highlight=False)
    console.print(_rich_table(detection_table(results), "detection by bits/dim"))
    for line in sanity_lines(results):
        if not line.startswith("SANITY"):
            console.print(line, highlight=False)


@app.command("evaluate")
@handle_errors
def evaluate(
    model: Path | None = typer.Option(
        None, "--model", "-m", help=f"PixelCNN bundle \\[default: {DEFAULT_MODEL}]."),
    classifier: str | None = typer.Option(
        None, "--classifier", "-c",
        help=f"Classifier bundle, TorchScript file or package.module:factory (these two "
             f"run code: need --trust-code) \\[default: {DEFAULT_CLASSIFIER}]."),
    data: str | None = typer.Option(
        None, "--data", "-d", help="Labelled images \\[default: the classifier's test split]."),
    n: int = typer.Option(1000, "--n", "-n", min=1, help="Evaluate the first N images."),
    attacks: str = typer.Option(",".join(DEFAULT_ATTACKS), "--attacks",
                                help="Oblivious attacks (comma-separated); '' for none."),
    eps: str | None = typer.Option(
        None, "--eps", help="Attack budgets, comma-separated fractions of the pixel range "
                            "\\[default: 8/255,25/255; 1,2 levels for images with fewer than "
                            "33 levels, e.g. digits]."),
    eps_levels: bool = typer.Option(False, "--eps-levels",
                                    help="Read --eps as whole pixel levels."),
    eps_defend: str | None = typer.Option(
        None, "--eps-defend", help="Purification radii in pixel levels, comma-separated "
                                   "\\[default: 16,32 of 255, scaled to the levels]."),
    defences: str = typer.Option(",".join(DEFENCES), "--defences",
                                 help="Columns: none, purify, adaptive (purify only images "
                                      "above the calibrated bits/dim threshold)."),
    adaptive_attack: str = typer.Option(
        "bpda", "--adaptive-attack",
        help="Comma-separated: bpda (PGD, identity backward pass), bpda-surrogate (exact "
             "purifier forward, differentiable surrogate backward), surrogate-pgd (PGD "
             "through the surrogate), square (gradient-free, on the images every other "
             "attack failed on), detector (adaptive PixelDefend: stay under the bits/dim "
             "threshold), cw-bs (CW with binary search over c); all; or none."),
    adaptive_steps: int = typer.Option(50, "--adaptive-steps", min=1,
                                       help="PGD steps of bpda-surrogate, surrogate-pgd and "
                                            "detector."),
    restarts: int = typer.Option(1, "--restarts", min=1,
                                 help="Random restarts of every PGD attack (BPDA included); "
                                      "each restart only attacks the images not fooled yet."),
    queries: int = typer.Option(1000, "--queries", min=1, help="Square Attack queries."),
    square_n: int | None = typer.Option(
        None, "--square-n", min=1,
        help="Run Square on at most the first N survivors of the other attacks (each query "
             r"purifies an image: the CPU budget) \[default: all survivors]."),
    temperature: str = typer.Option(
        "1,0.01", "--temperature",
        help="Surrogate softmax temperature, annealed geometrically START,END over the steps."),
    surrogate_passes: int = typer.Option(1, "--surrogate-passes", min=1,
                                         help="Soft refinement passes of the surrogate."),
    on_survivors: str = typer.Option(
        "square", "--on-survivors",
        help="Adaptive attacks to run only on the images every earlier attack failed on "
             "(the per-image worst case needs no more; saves purifications)."),
    adaptive_alpha: str | None = typer.Option(
        None, "--adaptive-alpha",
        help="Step size of the suite's PGD attacks as a fraction (0 is the deliberately "
             r"broken attack the sanity checks must flag) \[default: eps * max(2.5 / steps, "
             "0.1)]."),
    cw_steps: int = typer.Option(100, "--cw-steps", min=1,
                                 help="Adam steps per binary-search step of cw-bs."),
    sanity_n: int = typer.Option(50, "--sanity-n", min=0,
                                 help="Images for the sanity checks (eps sweep, fewer steps); "
                                      "0 skips them."),
    bpda_steps: int = typer.Option(100, "--bpda-steps", min=1, help="BPDA PGD steps."),
    bpda_n: int | None = typer.Option(
        None, "--bpda-n", min=1,
        help=f"Run BPDA on the first N images: every step purifies them, so it costs "
             f"steps x purifications \\[default: min(--n, {DEFAULT_BPDA_N})]."),
    bpda_eps: str | None = typer.Option(
        None, "--bpda-eps", help="Run BPDA only at these of the --eps values \\[default: all]."),
    bpda_alpha: str | None = typer.Option(
        None, "--bpda-alpha", help="BPDA step size as a fraction (e.g. 1/255) "
                                   "\\[default: eps * max(2.5 / steps, 0.1)]."),
    eot: int = typer.Option(1, "--eot", min=1,
                            help="EOT samples per BPDA step (the pipeline is deterministic: "
                                 "1 is enough)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Report folder \\[default: reports/evaluate-<data>]."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Attack batch size."),
    purify_batch: int = typer.Option(256, "--purify-batch", min=1,
                                     help="Images purified together (bigger is faster on a "
                                          "CPU, up to memory)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    seed: int = typer.Option(0, help="Seed for every attack's random start and noise."),
    resume: bool = typer.Option(False, "--resume",
                                help="Reuse the finished stages cached in --out/cache."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the PNG figures."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f",
                                     help="table (Rich, on stdout) or json (results.json)."),
    data_root: str | None = typer.Option(None, help="Folder holding data set files."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
    overwrite: bool = OVERWRITE,
) -> None:
    """Accuracy under every attack x eps with no defence, PixelDefend and adaptive
    PixelDefend; bits/dim detection (AUROC, TPR); the adaptive BPDA attack; a report.

    Writes report.md, a self-contained report.html, results.json and PNG figures to
    --out; intermediate results go to --out/cache, so an interrupted run continues with
    --resume. Oblivious attacks only see the classifier; BPDA attacks classifier and
    purifier together (PGD, purifier = identity on the backward pass): a defence is not
    evaluated until it has faced it. On a busy or small CPU, `pixeldefend --threads 1
    evaluate ...` is several times faster (the models are small, the operations tiny).

    [bold]Examples[/]

      pixeldefend --threads 1 evaluate -n 200 --bpda-steps 20 --bpda-n 50   [dim]# digits, 1 min[/]

      [dim]# docs/EVALUATION.md: about 33 min on 2 CPU cores[/]
      pixeldefend --threads 1 evaluate -m models/fashion-mnist -c models/fashion-classifier \\
        -d fashion-mnist:test -n 1000 --eps 8/255,25/255 --eps-defend 16,32 \\
        --bpda-n 100 -o reports/fashion-mnist --resume

      pixeldefend evaluate ... --format json | jq '.strongest'
    """
    from ..adaptive_report import sanity_lines
    from ..attacks import parse_eps
    from ..data import ImageSpec, load_images
    from ..detector import DensityDetector
    from ..evaluation import EvaluateSettings, parse_list, run_evaluation
    from ..models.classifier import load_classifier
    from ..outputs import clear_dir, input_paths, prepare_dir
    from ..report import results_json, write_report
    from ..sharding import join

    if fmt not in (OutputFormat.table, OutputFormat.json):
        raise UsageError("--format must be table or json")
    model_path = _default_path(model or DEFAULT_MODEL)
    classifier = classifier or str(_default_path(DEFAULT_CLASSIFIER))
    if out is not None:  # the default folder depends on the data: checked below
        prepare_dir(out, command="evaluate", overwrite=overwrite, resume=resume,
                    can_resume=True, inputs=input_paths(model_path, classifier, data, data_root))
    sharding = join(device, None)  # torchrun: each rank on its own device
    detector = DensityDetector.load(model_path, device=sharding.device)
    loaded = load_classifier(classifier, device=sharding.device, trust_code=trust_code)
    if data is None:
        data = (loaded.config.get("data") or {}).get("test") or "digits:test"
    spec: ImageSpec = detector.spec
    images = load_images(data, spec, data_root=data_root)
    for name, error in images.errors:
        err_console.print(f"[yellow]skipped[/] {name}: {error}", highlight=False)
    images = images.head(n)
    alpha = None
    if bpda_alpha is not None:
        alpha = parse_eps(bpda_alpha, spec.levels).fraction
    adaptive = adaptive_attack.strip().lower()
    suite = _suite_settings(temperature, adaptive_alpha, spec.levels, steps=adaptive_steps,
                            restarts=restarts, queries=queries, passes=surrogate_passes,
                            cw_steps=cw_steps, seed=seed, square_n=square_n,
                            on_survivors=on_survivors, batch_size=purify_batch)
    settings = EvaluateSettings(
        attacks=tuple(a.lower() for a in parse_list(attacks) or []),
        eps=tuple(parse_list(eps)) if eps is not None else None,
        eps_levels=eps_levels,
        eps_defend=_ints(eps_defend, "--eps-defend"),
        defences=tuple(d.lower() for d in parse_list(defences) or ["none"]),
        adaptive_attack=None if adaptive in ("none", "") else adaptive,
        bpda_steps=bpda_steps,
        bpda_n=bpda_n if bpda_n is not None else min(len(images), DEFAULT_BPDA_N),
        bpda_eps=tuple(parse_list(bpda_eps) or []) if bpda_eps is not None else None,
        bpda_alpha=alpha, eot=eot, seed=seed, batch_size=batch_size,
        purify_batch=purify_batch, resume=resume, suite=suite, sanity_n=sanity_n,
    ).checked()
    out = out or _default_out(data)
    out_dir = prepare_dir(out, command="evaluate", overwrite=overwrite, resume=resume,
                          can_resume=True, inputs=input_paths(model_path, classifier, data,
                                                              data_root))
    sharding.dist.barrier()  # every rank has checked the folder before rank 0 writes it
    if not resume and sharding.writes:
        clear_dir(out_dir)  # --overwrite: a fresh run, no stale cache or figures
    if sharding.writes:
        out_dir.mark()
    sources: dict[str, Any] = {"model": str(model_path), "classifier": loaded.source,
                               "data": images.source, "command": _command_line()}
    err_console.print(
        f"evaluate {len(images)} images of {images.source} ({spec.describe()}) with "
        f"{model_path} and {loaded.source} on {detector.device}; report in {out}",
        highlight=False)
    with RichEvalProgress() as progress:
        evaluation = run_evaluation(detector, loaded, images, settings, out, progress,
                                    sources, sharding=sharding)
    if not sharding.writes:
        return
    classes = loaded.classes or images.classes
    written = write_report(evaluation, detector, out, classes, figures=figures)
    err_console.print(f"wrote {', '.join(p.name for p in written)} to {out}", highlight=False)
    results = evaluation.results
    for line in sanity_lines(results):  # on stderr whatever the format: loud
        if line.startswith("SANITY"):
            err_console.print(f"[bold red]{line}[/]", highlight=False)
    if fmt == OutputFormat.json:
        sys.stdout.write(results_json(results))
        sys.stdout.flush()
        return
    _print_tables(results)
    console.print(f"report: {out / 'report.html'}", highlight=False)
