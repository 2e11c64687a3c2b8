"""The `score` pipeline: stream inputs through a detector, row by row, into the CI gate.

Usable from Python without the CLI:

    detector = DensityDetector.load("models/digits")
    run = score_inputs(detector, ["incoming/"], GatePolicy(fail_on_anomalous=True))
    run.result.exit_code, run.summary, run.rows

Rows are handed to `on_rows` as each batch is scored (so JSONL / CSV output and the JUnit
report never hold every row in memory); `keep_rows` keeps them on the result as well.
The gate's decision (`gate.decide`) is made once every input has been seen.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .gate import EXIT_USAGE, GatePolicy, GateResult, JUnitWriter, Tally, decide
from .sharding import Sharding, refuse_when_split

if TYPE_CHECKING:
    from .calibration import Calibration
    from .data import Batch, ImageStream
    from .detector import DensityDetector

# verdicts whose bits/dim count in the batch typicality test
_SCORED = ("clean", "anomalous", "uncalibrated")


@dataclass
class ScoreRun:
    """What one scoring run found: the rows (if kept), their tally, the batch test and
    the gate's decision, and the JSON document the CLI prints."""

    kind: str
    calibration: Calibration | None
    policy: GatePolicy
    tally: Tally = field(default_factory=Tally)
    rows: list[dict[str, Any]] = field(default_factory=list)
    hidden: int = 0
    batch_test: dict[str, Any] | None = None
    batch_line: str = ""
    result: GateResult = field(default_factory=lambda: GateResult(False))
    junit: JUnitWriter | None = None

    @property
    def summary(self) -> dict[str, int]:
        return self.tally.summary(self.policy, self.hidden)

    def document(self, model: Path | str) -> dict[str, Any]:
        from .reporting import score_document

        doc = score_document([], model, self.calibration, self.kind)
        doc["results"] = self.rows
        doc["summary"] = self.summary
        if self.policy.batch_test:
            doc["batch_test"] = self.batch_test
        doc["gate"] = self.result.to_dict()
        return doc

    def summary_lines(self) -> list[str]:
        """The counts and the gate's verdict in one line, plus a hint when unreadable
        inputs decided the exit code."""
        summary, tally, result = self.summary, self.tally, self.result
        extra = []
        if tally.invalid:
            extra.append(f"{tally.invalid} with a non-finite score")
        if self.policy.skip_unreadable and tally.unreadable:
            extra.append(f"{tally.unreadable} unreadable skipped by skip_unreadable=True")
        if self.hidden:
            extra.append(f"{self.hidden} hidden file(s)/folder(s) ignored")
        lines = [f"{summary['n']} input(s): {summary['clean']} clean, {summary['anomalous']} "
                 f"anomalous, {summary['errors']} error(s)"
                 + (f" ({'; '.join(extra)})" if extra else "")
                 + (f"; gate failed: {'; '.join(result.reasons)}" if result.failed else
                    ("; gate passed" if self.policy.active else ""))]
        if result.exit_code == EXIT_USAGE:
            lines.append("some inputs could not be scored (see the error rows); pass "
                         "skip_unreadable=True to accept unreadable ones")
        return lines


def check_gate(detector: DensityDetector, kind: str | None, policy: GatePolicy,
               model: Path | str = "the bundle") -> tuple[str, Calibration | None]:
    """The score kind to use and its calibration; a clear error before any work when the
    bundle cannot serve the gate that was asked for."""
    kind = detector.check_ready(kind or detector.default_kind)
    cal = detector.calibrations.get(kind)
    if cal is None and (policy.per_image or policy.max_anomalous_fraction is not None):
        raise UsageError(f"{model} has no calibration for {kind!r}: run `pixeldefend calibrate`")
    if policy.batch_test and not ({"bpd", "typicality"} & set(detector.calibrations)):
        raise UsageError(f"batch_test: {model} has no clean calibration bits/dim: run "
                         "`pixeldefend calibrate`", param="batch_test")
    return kind, cal


def prepare_score(inputs: Sequence[str], model: Path, *, output: Path | None = None,
                  junit: Path | None = None, heatmaps: Path | None = None,
                  overwrite: bool = False, device: str = "auto", shard: str | None = None,
                  batch_size: int = 256, precision: str = "fp32", compile: bool = False
                  ) -> tuple[DensityDetector, Sharding]:
    """Before `score_inputs`: check every output (never an input, never a file
    pixeldefend did not make unless `overwrite` may replace it), join torchrun's ranks or
    take `shard` ("I/N"), load the detector in `precision` (`compile`: its network
    through torch.compile, compilation.py), and give the process that writes a fresh,
    marked `heatmaps` folder."""
    from .detector import DensityDetector
    from .outputs import check_files, clear_dir, input_paths, prepare_dir
    from .precision import check_precision
    from .sharding import join

    paths = input_paths(list(inputs), model)
    check_files((output, "--output"), (junit, "--junit"), inputs=paths, overwrite=overwrite)
    heatmap_dir = None if heatmaps is None else prepare_dir(
        heatmaps, command="score --heatmap", inputs=paths, overwrite=overwrite,
        option="--heatmap")
    sharding = join(device, shard)  # torchrun's ranks meet here, after every output check
    detector = DensityDetector.load(model, device=sharding.device, batch_size=batch_size)
    detector.precision = check_precision(precision, detector.device)
    if compile:
        from .compilation import compile_scoring

        compile_scoring(detector.model)
    if heatmap_dir is not None and sharding.writes:
        clear_dir(heatmap_dir)
        heatmap_dir.mark()
    return detector, sharding


def score_inputs(detector: DensityDetector, inputs: Sequence[str],
                 policy: GatePolicy | None = None, *, kind: str | None = None,
                 model: Path | str = "the bundle", batch_size: int = 256,
                 resize: bool = False, grayscale: bool = False, data_root: str | None = None,
                 heatmaps: Path | None = None, junit: Path | None = None,
                 resamples: int = 1000, seed: int = 0, keep_rows: bool = True,
                 on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
                 progress: Callable[[int], None] | None = None,
                 on_total: Callable[[int], None] | None = None,
                 sharding: Sharding | None = None, workers: int = 0) -> ScoreRun:
    """Score every input (images, folders, array files, data specs) and decide the
    gate. `sharding`: score only this process's block (`--shard I/N`, torchrun ranks);
    under torchrun rank 0 gets every rank's rows in input order and alone writes JUnit;
    every rank gets the same decision. `heatmaps`: a folder (already prepared) that
    receives a heat map PNG per flagged image; `junit`: a JUnit XML report that agrees
    with the exit code; `on_total` learns the number of inputs before scoring,
    `progress` each batch done; `workers` processes decode image files."""
    from .data import ImageStream
    from .outputs import OutputError

    policy = policy or GatePolicy()
    kind, cal = check_gate(detector, kind, policy, model)
    stream = ImageStream(list(inputs), detector.spec, resize=resize, grayscale=grayscale,
                         data_root=data_root, workers=workers)
    if len(stream) == 0:
        raise UsageError(f"no images found in {', '.join(inputs)}")
    sharding = sharding or Sharding()
    if heatmaps is not None:
        refuse_when_split(sharding, "score --heatmap")
    sharding.split(stream)
    if on_total is not None:
        on_total(len(sharding.part_range(stream.total)) if sharding.active else len(stream))
    junit = junit if sharding.writes else None
    run = ScoreRun(kind, cal, policy, junit=JUnitWriter(junit, kind, policy) if junit else None)
    bpd = _stream_rows(detector, stream, run, batch_size=batch_size, heatmaps=heatmaps,
                       keep_rows=keep_rows, on_rows=on_rows, progress=progress,
                       sharding=sharding)
    run.hidden = stream.hidden
    batch_anomalous, batch_reason = None, ""
    if policy.batch_test and len(bpd) and sharding.writes:
        batch_anomalous, batch_reason = _batch_test(detector, run, bpd, resamples, seed)
    run.result = decide(run.tally, policy, batch_anomalous, batch_reason)
    run.tally, run.result, run.batch_test, run.batch_line = sharding.agree(
        (run.tally, run.result, run.batch_test, run.batch_line))
    if run.junit is not None:
        try:
            run.junit.close(run.result, run.batch_test, run.batch_line)
        except OSError as exc:  # checked up front; a disk that filled up since
            raise OutputError(f"cannot write {junit}: {exc.strerror or exc}") from None
    return run


def _stream_rows(detector: DensityDetector, stream: ImageStream, run: ScoreRun, *,
                 batch_size: int, heatmaps: Path | None, keep_rows: bool,
                 on_rows: Callable[[list[dict[str, Any]]], None] | None,
                 progress: Callable[[int], None] | None, sharding: Sharding) -> array:
    """Score batch by batch; returns the clean-or-flagged bits/dim for the batch test."""
    from .reporting import score_rows

    bpd_values = array("d")
    taken: set[str] = set()

    def scored() -> Iterator[list[dict[str, Any]]]:  # this process's share, batch by batch
        for batch in stream.batches(batch_size):
            rows = score_rows(detector, batch, run.kind)
            if heatmaps is not None:
                write_heatmaps(detector, batch, rows, run.kind, heatmaps, taken)
            yield rows

    for rows in sharding.in_order(scored()):  # every rank's rows, in input order
        for row in rows:
            run.tally.add(row)
            if run.junit is not None:
                run.junit.add(row)
            if run.policy.batch_test and row["verdict"] in _SCORED:
                bpd_values.append(row["bits_per_dim"])
        if on_rows is not None:
            on_rows(rows)
        if keep_rows:
            run.rows.extend(rows)
        if progress is not None:
            progress(len(rows))
    return bpd_values


def _batch_test(detector: DensityDetector, run: ScoreRun, bpd: array, resamples: int,
                seed: int) -> tuple[bool, str]:
    import numpy as np

    from .reporting import batch_test_entry, batch_test_line

    test = detector.batch_test(bpd=np.asarray(bpd), resamples=resamples, seed=seed)
    run.batch_test = batch_test_entry(test)
    run.batch_line = batch_test_line(run.batch_test)
    return test.anomalous, f"batch is atypical (p-value {test.p_value:.4f} <= {test.alpha:g})"


def write_heatmaps(detector: DensityDetector, batch: Batch, rows: list[dict[str, Any]],
                   kind: str, folder: Path, taken: set[str]) -> None:
    """A heat map PNG for every flagged image of the batch; its path goes into the row."""
    from .localise import heatmap_name, write_heatmap

    readable = [r for r in rows if r.get("error_kind") != "read"]  # rows with an image
    flagged = [k for k, r in enumerate(readable) if r["verdict"] == "anomalous"]
    for r in rows:
        r["heatmap"] = None
    if not flagged:
        return
    images = batch.images[flagged]
    local = None
    if "dose" in detector.calibrations:  # the local-anomaly map (localise.py)
        from .localise import local_map

        model_run = detector.model_pass(images)
        nll, local = model_run.nll, local_map(model_run, detector.dose_model())
    else:
        nll = detector.nll_map(images)
    for j, k in enumerate(flagged):
        r = readable[k]
        path = folder / heatmap_name(r["path"], taken)
        p = r["p_value"]
        title = (f"{r['path']}\nbits/dim {r['bits_per_dim']:.3f}"
                 + (f"   {kind} {r['score']:.3f}" if kind != "bpd" else "")
                 + (f"   p-value {p:.3f}" if p is not None else ""))
        write_heatmap(path, images[j], detector.spec.levels, nll[j], title,
                      None if local is None else local[j])
        r["heatmap"] = str(path)
