"""The `evaluate` pipeline before the run: default models, inputs, settings from the
command line's text options, the report folder. Usable from Python as the CLI uses it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..defaults import DEFAULT_BPDA_N, DEFAULT_CLASSIFIER, DEFAULT_MODEL
from ..errors import UsageError
from ..sharding import Sharding
from .plan import EvaluateSettings, parse_list

if TYPE_CHECKING:
    from ..adaptive import SuiteSettings
    from ..data import ImageSet
    from ..detector import DensityDetector
    from ..models.loading import LoadedClassifier


def default_path(path: Path) -> Path:
    """./models/X, else the one shipped in the source tree."""
    if path.exists():
        return path
    shipped = Path(__file__).resolve().parents[2] / path
    return shipped if shipped.exists() else path


def default_out(data: str) -> Path:
    """reports/evaluate-<data set and split, or file name>."""
    from ..data import parse_builtin, split_slice

    base, _ = split_slice(data)
    parsed = parse_builtin(base)
    name = f"{parsed[0]}-{parsed[1]}" if parsed else (Path(base.rstrip("/")).stem or "data")
    return Path("reports") / f"evaluate-{name}"


@dataclass
class EvaluationInputs:
    """The models and images of one evaluation, and where its report goes."""

    detector: DensityDetector
    classifier: LoadedClassifier
    images: ImageSet  # the first n
    model: Path
    data: str
    paths: list[Path] = field(default_factory=list)  # what the report may not overwrite
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files
    sharding: Sharding = field(default_factory=Sharding)  # torchrun's ranks, or one process

    def sources(self, command: str | None = None) -> dict[str, Any]:
        return {"model": str(self.model), "classifier": self.classifier.source,
                "data": self.images.source, "command": command}


def load_inputs(model: Path | None, classifier: str | None, data: str | None, n: int, *,
                out: Path | None = None, device: str = "auto", data_root: str | None = None,
                trust_code: bool = False, overwrite: bool = False,
                resume: bool = False) -> EvaluationInputs:
    """Models (default: the shipped digits ones) and the first `n` labelled images
    (default: the classifier's test split); a given `out` is checked before any loading.
    Under torchrun each rank joins the process group here, on its own device."""
    from ..data import load_images
    from ..detector import DensityDetector
    from ..models.loading import load_classifier
    from ..outputs import input_paths, prepare_dir
    from ..sharding import join

    model = default_path(model or DEFAULT_MODEL)
    classifier = classifier or str(default_path(DEFAULT_CLASSIFIER))
    if out is not None:  # the default folder depends on the data: checked by open_report_dir
        prepare_dir(out, command="evaluate", overwrite=overwrite, resume=resume,
                    can_resume=True, inputs=input_paths(model, classifier, data, data_root))
    sharding = join(device, None)
    detector = DensityDetector.load(model, device=sharding.device)
    loaded = load_classifier(classifier, device=sharding.device, trust_code=trust_code)
    data = data or (loaded.config.get("data") or {}).get("test") or "digits:test"
    images = load_images(data, detector.spec, data_root=data_root)
    return EvaluationInputs(detector, loaded, images.head(n), model, data,
                            input_paths(model, classifier, data, data_root), list(images.errors),
                            sharding)


def open_report_dir(inputs: EvaluationInputs, out: Path | None, *, overwrite: bool = False,
                    resume: bool = False) -> Path:
    """The report folder (default: `default_out`), emptied unless resuming, and marked."""
    from ..outputs import clear_dir, prepare_dir

    out = out or default_out(inputs.data)
    out_dir = prepare_dir(out, command="evaluate", overwrite=overwrite, resume=resume,
                          can_resume=True, inputs=inputs.paths)
    inputs.sharding.dist.barrier()  # every rank has checked the folder before rank 0 writes
    if inputs.sharding.writes:
        if not resume:
            clear_dir(out_dir)  # overwrite: a fresh run, no stale cache or figures
        out_dir.mark()
    return out


def suite_settings(temperature: str, adaptive_alpha: str | None, levels: int,
                   on_survivors: str | None, **options: Any) -> SuiteSettings:
    """The adaptive suite's settings from text: temperature 'START,END', adaptive_alpha a
    fraction ('0': the deliberately broken attack), on_survivors a comma list."""
    from ..adaptive import SuiteSettings
    from ..attacks import parse_eps

    try:
        t_start, t_end = (float(v) for v in (parse_list(temperature) or []))
    except ValueError as exc:
        raise UsageError("temperature takes START,END, e.g. 1,0.01",
                         param="temperature") from exc
    if not (t_start > 0 and t_end > 0):
        raise UsageError("temperature values must be positive", param="temperature")
    alpha = None
    if adaptive_alpha is not None:
        alpha = 0.0 if adaptive_alpha.strip() in ("0", "0.0") else \
            parse_eps(adaptive_alpha, levels).fraction
    return SuiteSettings(alpha=alpha, t_start=t_start, t_end=t_end,
                         on_survivors=tuple(a.lower() for a in parse_list(on_survivors) or []),
                         **options)


def settings_from_text(inputs: EvaluationInputs, *, attacks: str, eps: str | None,
                       eps_defend: list[int] | None, defences: str, adaptive_attack: str,
                       bpda_n: int | None, bpda_eps: str | None, bpda_alpha: str | None,
                       suite: SuiteSettings, **options: Any) -> EvaluateSettings:
    """Checked settings from the command line's comma lists and fractions; `options` are
    the remaining `EvaluateSettings` fields as they are."""
    from ..attacks import parse_eps

    levels = inputs.detector.spec.levels
    adaptive = adaptive_attack.strip().lower()
    return EvaluateSettings(
        attacks=tuple(a.lower() for a in parse_list(attacks) or []),
        eps=tuple(parse_list(eps)) if eps is not None else None,
        eps_defend=tuple(eps_defend) if eps_defend is not None else None,
        defences=tuple(d.lower() for d in parse_list(defences) or ["none"]),
        adaptive_attack=None if adaptive in ("none", "") else adaptive,
        bpda_n=bpda_n if bpda_n is not None else min(len(inputs.images), DEFAULT_BPDA_N),
        bpda_eps=tuple(parse_list(bpda_eps) or []) if bpda_eps is not None else None,
        bpda_alpha=None if bpda_alpha is None else parse_eps(bpda_alpha, levels).fraction,
        suite=suite, **options,
    ).checked()


@dataclass
class EvaluationRun:
    """What `evaluate_to_folder` did: the evaluation (None on torchrun's other ranks,
    which write nothing), its report folder and the files written there."""

    evaluation: Any
    out: Path
    written: list[Path] = field(default_factory=list)


def evaluate_to_folder(model: Path | None, classifier: str | None, data: str | None, n: int,
                       *, out: Path | None = None, device: str = "auto",
                       data_root: str | None = None, trust_code: bool = False,
                       overwrite: bool = False, resume: bool = False, figures: bool = True,
                       suite: dict[str, Any], command: str | None = None,
                       log: Any = print, on_skipped: Any = None, progress: Any = None,
                       **options: Any) -> EvaluationRun:
    """`pixeldefend evaluate` from Python: load the inputs (`load_inputs`), check the
    settings (`suite`: `suite_settings`' arguments; `options`: `settings_from_text`'s),
    run or resume the evaluation in the report folder and write the report there.
    `on_skipped(errors)` hears of unreadable files, `log` gets one line before and one
    after; `progress()` makes the `EvalProgress` context the run reports to."""
    import contextlib

    from ..report import write_report
    from .run import run_evaluation

    inputs = load_inputs(model, classifier, data, n, out=out, device=device,
                         data_root=data_root, trust_code=trust_code, overwrite=overwrite,
                         resume=resume)
    if on_skipped is not None:
        on_skipped(inputs.skipped)
    spec, images, loaded = inputs.detector.spec, inputs.images, inputs.classifier
    settings = settings_from_text(inputs, **options, resume=resume,
                                  suite=suite_settings(levels=spec.levels, **suite))
    out = open_report_dir(inputs, out, overwrite=overwrite, resume=resume)
    log(f"evaluate {len(images)} images of {images.source} ({spec.describe()}) with "
        f"{inputs.model} and {loaded.source} on {inputs.detector.device}; report in {out}")
    with progress() if progress is not None else contextlib.nullcontext() as reports:
        evaluation = run_evaluation(inputs.detector, loaded, images, settings, out, reports,
                                    inputs.sources(command), sharding=inputs.sharding)
    if not inputs.sharding.writes:
        return EvaluationRun(None, out)
    written = write_report(evaluation, inputs.detector, out, loaded.classes or images.classes,
                           figures=figures)
    log(f"wrote {', '.join(p.name for p in written)} to {out}")
    return EvaluationRun(evaluation, out, written)
