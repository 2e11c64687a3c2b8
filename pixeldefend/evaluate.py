"""`pixeldefend evaluate`: every attack x eps against every defence, on the same images.

A defence is only as good as the strongest attack that knows about it, so the evaluation
runs the oblivious attacks of `pixeldefend.attacks` (which see the bare classifier) *and*
the adaptive BPDA attack of `pixeldefend.bpda` (which sees classifier∘purifier), and
reports both in one table. Columns are defences: none, PixelDefend purification at each
eps_defend, adaptive PixelDefend (purify only images whose bits/dim exceed the model's
calibrated threshold) at each eps_defend. Detection figures (bits/dim of adversarial
against clean images) come from the same runs.

Work is split into stages (score clean images, one attack, one purification, one BPDA
run); each stage's arrays go to ``<out>/cache/<stage>.npz`` with a key describing its
inputs (content hashes of the models and images, and every parameter). With
``resume=True`` a stage whose key matches is loaded instead of run, so an interrupted
evaluation continues where it stopped, and changing one option re-runs only what it
affects. Every file is written atomically.

Adaptive PixelDefend purifies exactly the images above the threshold with the same
purifier, so its results are taken from the purification stage (which purifies every
image when the plain defence is evaluated too, else only those above the threshold);
`test_purify` checks that the purified images are identical either way. Stages call
`purify.purify_fast` directly (the bits/dim `purify.purify` would compute first are known
already), and BPDA attacks `bpda.StraightThroughPurifier`, the same computation as
`purify.PurifiedClassifier` at half the cost per step.

results.json (schema ``pixeldefend.evaluate/1``), every number in the report:

- ``schema``, ``tool``, ``version``, ``created`` (UTC ISO time)
- ``config``: ``model``, ``classifier``, ``data``, ``n``, ``levels``, ``attacks`` (list),
  ``eps`` (list of ``{"text", "fraction", "levels", "ball"}``; ``ball`` = whole pixel levels
  an attack may move), ``eps_defend`` (levels), ``defences``, ``adaptive_attack``
  (``"bpda"`` or null), ``bpda`` (``{"steps", "n", "eot", "eps" (balls it ran at),
  "alpha" ({ball: step size as a fraction of [0, 1]}), "random_start"}``),
  ``seed``, ``batch_size``, ``purify_batch``, ``device``
- ``columns``: list of ``{"key", "defence", "eps_defend", "label"}``; ``key`` is ``"none"``,
  ``"purify@E"`` or ``"adaptive@E"`` and indexes every ``accuracy`` dict below
- ``threshold``: ``{"calibrated", "calibrated_fpr", "calibration_n", "calibration_data",
  "fpr5_clean", "fpr5_source"}``: bits/dim thresholds (calibrated: the model's own
  calibration set; fpr5_clean: 95th percentile of the evaluated clean images)
- ``clean``: ``{"n", "mean_bpd", "accuracy": {column: fraction}, "flagged_calibrated"}``
- ``rows``: one per attack x eps plus one per BPDA eps: ``{"attack", "kind"
  ("oblivious"|"adaptive"), "eps" (index into config.eps), "eps_text", "n", "accuracy":
  {column: fraction}, "clean_accuracy": {column: fraction on the same n images},
  "attack_success": fraction of correctly classified clean images fooled (no defence),
  "summary": the attack's own summary (per column for BPDA)}``
- ``strongest``: per eps ``{"eps", "eps_text", "accuracy": {column: min over oblivious
  attacks}, "attack": {column: which attack}}``
- ``worst_case``: per eps ``{"eps", "eps_text", "n", "accuracy": {column: fraction of
  images classified correctly under every attack listed}, "attacks"}``; computed on the
  BPDA images (the first ``config.bpda.n``) when BPDA ran, so it includes BPDA
- ``detection``: per attack x eps (and BPDA) ``{"attack", "kind", "eps", "eps_text", "n",
  "mean_bpd_clean", "mean_bpd_adv", "auroc", "auroc_fooled", "n_fooled", "tpr_calibrated",
  "tpr_fpr5", "fpr_calibrated"}``; AUROC of bits/dim (adversarial = positive) by
  scikit-learn; auroc_fooled uses only adversarial images that fool the bare classifier
- ``adaptive``: per eps the suite of `pixeldefend.adaptive` (``--adaptive-attack`` other
  than bpda): ``{"eps", "eps_text", "ball", "n", "settings", "columns": {column:
  {"clean", "prior", "attacks": {attack: {"n", "correct", "accuracy", "ci95",
  "ci_method", "summary", ...}}, "worst_case"}}, "agreement", "sanity"}``; the
  ``worst_case`` entry of that eps then covers these attacks too (and gains ``ci95``)
- ``timing``: ``{"seconds_total", "stages": {stage: seconds}}`` (cached stages keep the
  seconds they took when they ran)
- ``notes``: the plain-words caveats printed above the table
- ``figures``: file names of the PNGs written next to the report
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .adaptive import ATTACKS as SUITE_ATTACKS
from .adaptive import SuiteSettings, measure_agreement, run_suite, sanity_checks
from .atomic import atomic_path
from .attacks import DEFAULT_STEPS, METHODS, Eps, parse_eps, run_attack
from .bpda import DEFAULT_STEPS as BPDA_STEPS
from .bpda import StraightThroughPurifier, bpda_attack, default_alpha
from .data import ImageSet
from .defaults import DEFAULT_ATTACKS as DEFAULT_ATTACKS
from .defaults import DEFENCES as DEFENCES
from .errors import DataError, UsageError
from .models.classifier import LoadedClassifier, as_loaded, check_inputs, predict_logits
from .progress import EvalProgress as EvalProgress
from .purify import purify, purify_fast

SCHEMA = "pixeldefend.evaluate/1"
ADAPTIVE_ATTACKS = ("bpda", *SUITE_ATTACKS)  # "all" selects every one
DEFAULT_EPS = ("8/255", "25/255")
DEFAULT_EPS_DEFEND = (16, 32)  # of 255 levels, as in the paper
# cost of one image in units of "purify one image" (attack stages include scoring the
# adversarial images), measured on Fashion-MNIST with one CPU thread; for the ETA only
COST = {"clean": 0.4, "rand": 0.3, "fgsm": 0.35, "bim": 0.4, "pgd": 0.4, "cw": 0.7,
        "deepfool": 7.0, "autoattack": 5.0, "purify": 1.0, "bpda-none": 0.01,
        "bpda-purify": 0.6, "bpda-adaptive": 1.0}
OBLIVIOUS_NOTE = (
    "A defence evaluated only with oblivious attacks is not evaluated. The oblivious "
    "attacks below (rand, fgsm, bim, pgd, cw, deepfool) are computed against the bare "
    "classifier and do not know the purifier exists; only the adaptive rows (BPDA: "
    "projected gradient descent through classifier∘purifier, with the purifier taken "
    "as the identity on the backward pass) say how the defence fares against an "
    "attacker who knows it.")


# ------------------------------------------------------------------------ settings


@dataclass
class EvaluateSettings:
    """What to run. `eps` entries are text for `attacks.parse_eps` (`eps_levels`: whole
    pixel levels); `eps_defend` is in pixel levels of the images."""

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    eps: tuple[str, ...] | None = None  # None: 8/255, 25/255 (at least 1 and 2 levels)
    eps_levels: bool = False
    eps_defend: tuple[int, ...] | None = None  # None: 16, 32 of 255 scaled to the levels
    defences: tuple[str, ...] = DEFENCES
    adaptive_attack: str | None = "bpda"  # comma-separated names of ADAPTIVE_ATTACKS
    bpda_steps: int = BPDA_STEPS
    bpda_n: int | None = None  # BPDA on the first N images (None: all)
    bpda_eps: tuple[str, ...] | None = None  # BPDA at these of the eps (None: all)
    bpda_alpha: float | None = None  # fraction of [0, 1]; None: bpda.default_alpha
    eot: int = 1
    seed: int = 0
    batch_size: int = 128  # attack batches
    purify_batch: int = 256  # purification batches (large batches amortise the decoder)
    resume: bool = False
    suite: SuiteSettings = field(default_factory=SuiteSettings)  # pixeldefend.adaptive
    sanity_n: int = 50  # images for the sanity checks of the adaptive suite (0: none)

    @property
    def adaptive_names(self) -> tuple[str, ...]:
        """The adaptive attacks asked for ('all': every one)."""
        names = [a.strip().lower() for a in (self.adaptive_attack or "").split(",")
                 if a.strip()]
        if "all" in names:
            return ADAPTIVE_ATTACKS
        return tuple(a for a in names if a != "none")

    def checked(self) -> EvaluateSettings:
        for name in self.attacks:
            if name not in METHODS:
                raise UsageError(f"unknown attack {name!r}: choose from {', '.join(METHODS)}")
        if not self.attacks and not self.adaptive_names:
            raise UsageError("nothing to evaluate: give --attacks or --adaptive-attack")
        for d in self.defences:
            if d not in DEFENCES:
                raise UsageError(f"unknown defence {d!r}: choose from {', '.join(DEFENCES)}")
        if "none" not in self.defences:
            self.defences = ("none", *self.defences)  # the baseline column is always there
        for a in self.adaptive_names:
            if a not in ADAPTIVE_ATTACKS:
                raise UsageError(f"unknown adaptive attack {a!r}: choose from "
                                 f"{', '.join(ADAPTIVE_ATTACKS)}, all or none")
        self.suite.attacks = tuple(a for a in SUITE_ATTACKS if a in self.adaptive_names)
        if self.eps_defend is not None and any(int(e) != e or e < 1 for e in self.eps_defend):
            raise UsageError("--eps-defend takes positive whole pixel levels, e.g. 16,32")
        if self.bpda_steps < 1 or self.eot < 1:
            raise UsageError("--bpda-steps and --eot must be at least 1")
        if self.bpda_n is not None and self.bpda_n < 1:
            raise UsageError("--bpda-n must be at least 1")
        if self.batch_size < 1 or self.purify_batch < 1:
            raise UsageError("batch sizes must be at least 1")
        return self


def default_eps_list(levels: int) -> list[tuple[str, Eps]]:
    """8/255 and 25/255 of the range; with few levels (digits: 17) 1 and 2 whole levels,
    because 8/255 is less than one level there and a quantised attack could do nothing."""
    budgets = [(text, parse_eps(text, levels)) for text in DEFAULT_EPS]
    if len({b.ball for _, b in budgets}) == len(budgets) and min(b.ball for _, b in budgets):
        return budgets
    return [(f"{k} level{'s' if k > 1 else ''}", parse_eps(k, levels, eps_levels=True))
            for k in (1, 2)]


def default_eps_defend_list(levels: int) -> list[int]:
    """16 and 32 of 255 levels scaled to the images' levels (at least 1, no repeats)."""
    out: list[int] = []
    for e in DEFAULT_EPS_DEFEND:
        v = max(1, round(e * (levels - 1) / 255))
        if v in out:
            v = out[-1] + 1
        out.append(v)
    return out


def column_key(defence: str, eps_defend: int | None) -> str:
    return "none" if defence == "none" else f"{defence}@{eps_defend}"


def column_label(defence: str, eps_defend: int | None) -> str:
    if defence == "none":
        return "no defence"
    name = "PixelDefend" if defence == "purify" else "adaptive PixelDefend"
    return f"{name} ε_def={eps_defend}"


# ---------------------------------------------------------------------- progress


@dataclass
class Stage:
    """One unit of cached work."""

    name: str  # cache file stem
    label: str  # what the progress display says
    items: int  # images (or image-steps for BPDA) it processes
    weight: float  # cost per item, in "purify one image" units (for the ETA)
    cached: bool = False
    status: str = ""


# ------------------------------------------------------------------------- cache


def tensor_digest(*tensors: torch.Tensor | np.ndarray) -> str:
    """sha256 of array contents (dtype, shape, bytes): the identity of data or weights."""
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else \
            np.ascontiguousarray(t)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict, in name order."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(value).encode())
    return h.hexdigest()[:16]


class StageCache:
    """One .npz per stage under `folder`, each holding its key; read back only when the
    key matches (and `resume` is on). Writes are atomic, so a killed run never leaves a
    stage half-written: it is simply run again."""

    def __init__(self, folder: Path, resume: bool) -> None:
        self.folder = folder
        self.resume = resume

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def has(self, name: str, key: dict[str, Any]) -> bool:
        """True when `load` would return the stage (reads only the stored key)."""
        return self._key_matches(self.path(name), key)

    def _key_matches(self, path: Path, key: dict[str, Any]) -> bool:
        if not self.resume or not path.exists():
            return False
        try:
            with np.load(path, allow_pickle=False) as data:
                return json.loads(str(data["__key__"])) == json.loads(json.dumps(key))
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return False

    def load(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self.path(name)
        if not self._key_matches(path, key):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                out: dict[str, Any] = {k: data[k] for k in data.files if k != "__meta__"}
                out["__meta__"] = json.loads(str(data["__meta__"]))
                return out
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None  # unreadable or from another version: run the stage again

    def save(self, name: str, key: dict[str, Any], arrays: dict[str, Any],
             meta: dict[str, Any]) -> None:
        payload = {k: np.asarray(v) for k, v in arrays.items()}
        payload["__key__"] = np.array(json.dumps(key))
        payload["__meta__"] = np.array(json.dumps(meta))
        with atomic_path(self.path(name), suffix=".npz") as tmp:
            buf = io.BytesIO()
            np.savez_compressed(buf, **payload)
            tmp.write_bytes(buf.getvalue())


# ---------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """The results document plus the arrays the figures are drawn from."""

    results: dict[str, Any]
    clean: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor
    levels: int
    clean_pred: np.ndarray
    clean_bpd: np.ndarray
    adversarial: dict[str, dict[str, Any]] = field(default_factory=dict)  # set -> arrays
    purified: dict[str, dict[str, Any]] = field(default_factory=dict)  # set|e -> arrays
    bpda: dict[str, dict[str, Any]] = field(default_factory=dict)  # eps|column -> arrays
    suite: dict[str, dict[str, Any]] = field(default_factory=dict)  # eps -> adaptive runs


def _eps_tag(eps: Eps) -> str:
    return f"eps{eps.ball}"


def _map_labels(images: ImageSet, loaded: LoadedClassifier) -> torch.Tensor:
    """Data labels in the classifier's class order when both name their classes."""
    if images.labels is None:
        raise DataError(f"{images.source}: evaluate needs labelled images (a built-in data "
                        "set, an .npz with 'labels', or one sub-folder per class)")
    labels = images.labels
    if images.classes and loaded.classes and list(images.classes) != list(loaded.classes) \
            and all(c in loaded.classes for c in images.classes):
        lookup = torch.tensor([loaded.classes.index(c) for c in images.classes])
        labels = lookup[labels]
    return labels


def _auroc(clean: np.ndarray, adv: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score  # lazy: importing it cost every command 1.3 s

    if len(clean) == 0 or len(adv) == 0:
        return None
    y = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    return float(roc_auc_score(y, np.r_[clean, adv]))


def _mean(a: np.ndarray) -> float | None:
    return float(np.mean(a)) if len(a) else None


def _acc(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels)) if len(labels) else math.nan


def run_evaluation(detector: Any, classifier: LoadedClassifier | torch.nn.Module,
                   images: ImageSet, settings: EvaluateSettings, out: Path | str,
                   progress: EvalProgress | None = None,
                   sources: dict[str, str] | None = None) -> Evaluation:
    """Run (or resume) the whole evaluation; returns the results and the arrays.

    `detector`: a `DensityDetector` (its bits/dim calibration, if any, is the adaptive
    threshold). `images`: labelled, already cut to the images to evaluate. `sources`
    names the model, classifier and data for the report.
    """
    settings.checked()
    progress = progress or EvalProgress()
    loaded = as_loaded(classifier)
    out = Path(out)
    cache = StageCache(out / "cache", settings.resume)
    started = time.perf_counter()
    levels = images.levels
    if detector.spec.levels != levels or tuple(detector.spec.shape) != images.spec.shape:
        raise DataError(f"the images are {images.spec.describe()} but the model expects "
                        f"{detector.spec.describe()}")
    if len(images) == 0:
        raise DataError("no images to evaluate")
    labels = _map_labels(images, loaded)
    check_inputs(loaded, images.images, labels)
    x = images.images
    y = labels.numpy()
    n = len(images)

    if settings.eps is None:
        budgets = default_eps_list(levels)
    else:
        budgets = []
        for text in settings.eps:
            budgets.append((f"{text} level{'s' if str(text) != '1' else ''}"
                            if settings.eps_levels else str(text),
                            parse_eps(text, levels, settings.eps_levels)))
    for text, b in budgets:
        if b.ball < 1:
            raise UsageError(f"--eps {text} is {b.levels:.3g} levels of {levels}-level images, "
                             "less than one: a quantised attack cannot change a pixel (use a "
                             "larger --eps, or --eps-levels)")
    if len({b.ball for _, b in budgets}) != len(budgets):
        raise UsageError("two --eps values give the same whole-level ball: "
                         + ", ".join(f"{t} -> {b.ball}" for t, b in budgets))
    eps_defend = list(settings.eps_defend or default_eps_defend_list(levels))
    if any(e >= levels for e in eps_defend):
        raise UsageError(f"--eps-defend must be below {levels} levels")
    cal = detector.calibrations.get("bpd") if hasattr(detector, "calibrations") else None
    threshold = None if cal is None or not math.isfinite(cal.threshold) else cal.threshold
    if "adaptive" in settings.defences and threshold is None:
        raise UsageError("adaptive PixelDefend needs the model's bits/dim calibration: run "
                         "`pixeldefend calibrate`, or leave adaptive out of --defences")
    columns: list[tuple[str, int | None]] = [("none", None)]
    for d in ("purify", "adaptive"):
        if d in settings.defences:
            columns += [(d, e) for e in eps_defend]
    purifying = any(d != "none" for d, _ in columns)
    bpda_n = min(n, settings.bpda_n or n)
    bpda_balls = {b.ball for _, b in budgets}
    if settings.bpda_eps is not None:
        bpda_balls = {parse_eps(t, levels, settings.eps_levels).ball for t in settings.bpda_eps}
        missing = bpda_balls - {b.ball for _, b in budgets}
        if missing:
            raise UsageError("--bpda-eps must be among the --eps values")

    base = {"model": module_digest(detector.model), "threshold": threshold,
            "classifier": module_digest(loaded.model), "images": tensor_digest(x, labels),
            "levels": levels, "version": SCHEMA}

    # ---- plan every stage up front (so the ETA covers the run and resume can skip)
    stages: dict[str, Stage] = {"clean": Stage("clean", "score clean images", n, COST["clean"])}
    for a in settings.attacks:
        for text, b in budgets:
            name = f"attack-{a}-{_eps_tag(b)}"
            stages[name] = Stage(name, f"attack {a} eps {text}", n, COST.get(a, 0.1))
    sets = ["clean"] + [f"{a}-{_eps_tag(b)}" for a in settings.attacks for _, b in budgets]
    if purifying:
        for s in sets:
            for e in eps_defend:
                name = f"purify-{s}-e{e}"
                stages[name] = Stage(name, f"purify {s} ε_def={e}", n, COST["purify"])
    if "bpda" in settings.adaptive_names:
        for text, b in budgets:
            if b.ball not in bpda_balls:
                continue
            for d, e in columns:
                name = f"bpda-{_eps_tag(b)}-{column_key(d, e).replace('@', '-e')}"
                steps = settings.bpda_steps + 1 + (1 if d != "none" else 0)
                weight = COST[f"bpda-{d}"]
                stages[name] = Stage(name, f"BPDA eps {text} vs {column_label(d, e)}",
                                     bpda_n * steps, weight)
    # every stage's key is known before anything runs (purification and BPDA keys name
    # their inputs by the key of the stage that made them), so resume can tell up front
    # what is left and the ETA covers only that
    keys: dict[str, dict[str, Any]] = {"clean": {"stage": "clean", **base}}
    for a in settings.attacks:
        for _, b in budgets:
            keys[f"attack-{a}-{_eps_tag(b)}"] = {
                "stage": "attack", **base, "method": a, "eps_ball": b.ball,
                "seed": settings.seed, "batch_size": settings.batch_size,
                "default_steps": DEFAULT_STEPS.get(a)}
    mode = "all" if "purify" in settings.defences else "above-threshold"
    if purifying:
        for s in sets:
            source = keys["clean" if s == "clean" else f"attack-{s}"]
            for e in eps_defend:
                keys[f"purify-{s}-e{e}"] = {"stage": "purify", "input": source,
                                            "eps_defend": e, "mode": mode}
    alpha_of = {b.ball: settings.bpda_alpha or default_alpha(b.ball / (levels - 1),
                                                             settings.bpda_steps)
                for _, b in budgets}
    if "bpda" in settings.adaptive_names:
        for _, b in budgets:
            if b.ball not in bpda_balls:
                continue
            for d, e in columns:
                ck = column_key(d, e)
                keys[f"bpda-{_eps_tag(b)}-{ck.replace('@', '-e')}"] = {
                    "stage": "bpda", **base, "eps_ball": b.ball, "column": ck,
                    "steps": settings.bpda_steps, "alpha": alpha_of[b.ball],
                    "eot": settings.eot, "n": bpda_n, "seed": settings.seed,
                    **({"restarts": settings.suite.restarts}
                       if settings.suite.restarts > 1 else {})}
    for name, stage in stages.items():
        stage.cached = cache.has(name, keys[name])
    progress.plan(list(stages.values()))
    timing: dict[str, float] = {}

    def run_stage(name: str, key: dict[str, Any], work) -> dict[str, Any]:
        stage = stages[name]
        hit = cache.load(name, key)
        if hit is not None:
            timing[name] = float(hit["__meta__"].get("seconds", 0.0))
            progress.end(stage, cached=True)
            return hit
        stage.cached = False
        progress.begin(stage)
        t0 = time.perf_counter()
        arrays, meta = work(stage)
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        timing[name] = meta["seconds"]
        cache.save(name, key, arrays, meta)
        progress.end(stage, cached=False)
        arrays = dict(arrays)
        arrays["__meta__"] = meta
        return arrays

    def predict(imgs: torch.Tensor) -> np.ndarray:
        if imgs.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        return predict_logits(loaded.model, imgs, levels, settings.batch_size).argmax(1).numpy()

    # ---- clean images
    def clean_work(stage: Stage):
        bpd = detector.anomaly_score(x, "bpd")
        progress.advance(stage, n)
        return {"bpd": np.asarray(bpd, dtype=np.float64), "pred": predict(x)}, {}

    clean = run_stage("clean", keys["clean"], clean_work)
    clean_bpd, clean_pred = clean["bpd"], clean["pred"]
    evaluation = Evaluation({}, x, labels, levels, clean_pred, clean_bpd)

    # ---- oblivious attacks
    adv_sets: dict[str, dict[str, Any]] = {"clean": {"images": x, "pred": clean_pred,
                                                     "bpd": clean_bpd}}
    for a in settings.attacks:
        for _, b in budgets:
            name = f"attack-{a}-{_eps_tag(b)}"

            def attack_work(stage: Stage, a: str = a, b: Eps = b):
                result = run_attack(loaded, x, labels, levels, a, b, seed=settings.seed,
                                    batch_size=settings.batch_size,
                                    progress=lambda k: progress.advance(stage, k))
                bpd = detector.anomaly_score(result.adversarial, "bpd")
                return ({"adversarial": result.adversarial.numpy(),
                         "pred": result.adv_pred.numpy(), "bpd": np.asarray(bpd)},
                        {"summary": result.summary})

            got = run_stage(name, keys[name], attack_work)
            adv_sets[f"{a}-{_eps_tag(b)}"] = {
                "images": torch.from_numpy(np.asarray(got["adversarial"])),
                "pred": got["pred"], "bpd": got["bpd"], "summary": got["__meta__"]["summary"]}
    evaluation.adversarial = {k: v for k, v in adv_sets.items() if k != "clean"}

    # ---- purification of every set at every eps_defend
    for s in sets:
        if not purifying:
            break
        src = adv_sets[s]
        for e in eps_defend:
            name = f"purify-{s}-e{e}"
            select = np.ones(n, dtype=bool) if mode == "all" else src["bpd"] > threshold

            def purify_work(stage: Stage, src=src, e=e, select=select):
                # purify_fast, not purify(): the images' bits/dim are known already
                idx = torch.from_numpy(np.flatnonzero(select))
                stats: dict[str, Any] = {}
                parts = []
                for lo in range(0, len(idx), settings.purify_batch):
                    chunk = src["images"][idx[lo:lo + settings.purify_batch]]
                    parts.append(purify_fast(detector.model, chunk, e,
                                             settings.purify_batch, stats))
                    progress.advance(stage, len(chunk))
                done = torch.cat(parts) if parts else src["images"][:0]
                progress.advance(stage, n - len(idx))
                return ({"index": idx.numpy(), "images": done.numpy(),
                         "bpd_after": detector.anomaly_score(done, "bpd") if len(idx) else
                         np.zeros(0), "pred": predict(done)},
                        {"fallbacks": int(stats.get("fallbacks", 0))})

            got = run_stage(name, keys[name], purify_work)
            full_pred = np.array(src["pred"], copy=True)
            full_imgs = src["images"].clone()
            full_bpd = np.array(src["bpd"], copy=True)
            idx = np.asarray(got["index"], dtype=np.int64)
            full_pred[idx] = got["pred"]
            full_imgs[torch.from_numpy(idx)] = torch.from_numpy(np.asarray(got["images"]))
            full_bpd[idx] = got["bpd_after"]
            evaluation.purified[f"{s}|{e}"] = {"images": full_imgs, "pred": full_pred,
                                              "bpd": full_bpd, "purified": select}

    def column_pred(s: str, d: str, e: int | None) -> np.ndarray:
        src = adv_sets[s]
        if d == "none":
            return src["pred"]
        p = evaluation.purified[f"{s}|{e}"]["pred"]
        if d == "purify":
            return p
        return np.where(src["bpd"] > threshold, p, src["pred"])

    # ---- BPDA
    bpda_rows: list[dict[str, Any]] = []
    if "bpda" in settings.adaptive_names:
        xb, yb = x[:bpda_n], labels[:bpda_n]
        for bi, (text, b) in enumerate(budgets):
            if b.ball not in bpda_balls:
                continue
            per_col: dict[str, dict[str, Any]] = {}
            for d, e in columns:
                ck = column_key(d, e)
                name = f"bpda-{_eps_tag(b)}-{ck.replace('@', '-e')}"
                alpha = alpha_of[b.ball]

                def bpda_work(stage: Stage, d=d, e=e, b=b, alpha=alpha):
                    if d == "none":
                        defended: torch.nn.Module = loaded.model
                    else:
                        defended = StraightThroughPurifier(
                            detector.model, loaded.model, e,
                            threshold if d == "adaptive" else None, settings.purify_batch)
                    spent = 0

                    def tick(attacked: int, active: int) -> None:
                        nonlocal spent
                        spent += attacked
                        progress.advance(stage, attacked, f"{active} not fooled yet")

                    result = bpda_attack(defended, xb, yb, levels, b, steps=settings.bpda_steps,
                                         alpha=alpha, eot=settings.eot, seed=settings.seed,
                                         batch_size=max(settings.purify_batch, 1),
                                         device=loaded.device, progress=tick)
                    for r in range(1, settings.suite.restarts):  # --restarts: the rest again
                        left = np.flatnonzero(result.first_success < 0)
                        if len(left) == 0:
                            break
                        again = bpda_attack(defended, xb[left], yb[left], levels, b,
                                            steps=settings.bpda_steps, alpha=alpha,
                                            eot=settings.eot, seed=settings.seed + r,
                                            batch_size=max(settings.purify_batch, 1),
                                            device=loaded.device)
                        won = left[again.first_success >= 0]
                        result.adversarial[won] = again.adversarial[again.first_success >= 0]
                        result.first_success[won] = again.first_success[
                            again.first_success >= 0]
                    result.summary["restarts"] = settings.suite.restarts
                    adv = result.adversarial
                    if d == "none":
                        final, bpd = predict(adv), detector.anomaly_score(adv, "bpd")
                    else:
                        check = purify(detector, adv, e,
                                       adaptive=threshold if d == "adaptive" else None,
                                       batch_size=settings.purify_batch)
                        final, bpd = predict(check.images), check.bpd_before
                    progress.advance(stage, max(0, stage.items - spent))
                    return ({"adversarial": adv.numpy(), "pred": final,
                             "undefended_pred": predict(adv), "bpd": np.asarray(bpd),
                             "first_success": result.first_success},
                            {"summary": result.summary})

                got = run_stage(name, keys[name], bpda_work)
                per_col[ck] = got
                evaluation.bpda[f"{_eps_tag(b)}|{ck}"] = {
                    "images": torch.from_numpy(np.asarray(got["adversarial"])),
                    "pred": got["pred"], "bpd": got["bpd"]}
            bpda_rows.append({"eps_index": bi, "text": text, "cols": per_col})

    # ---- the adaptive suite (pixeldefend.adaptive), on the BPDA images
    suite_results: list[dict[str, Any]] = []
    if settings.suite.attacks:
        xs, ys = x[:bpda_n], labels[:bpda_n]
        for bi, (text, b) in enumerate(budgets):
            if b.ball not in bpda_balls:
                continue
            prior: dict[str, np.ndarray] = {}  # survivors of the oblivious attacks and BPDA
            for d, e in columns:
                ok = np.ones(bpda_n, dtype=bool)
                for a in settings.attacks:
                    ok &= column_pred(f"{a}-{_eps_tag(b)}", d, e)[:bpda_n] == y[:bpda_n]
                for br in bpda_rows:
                    if br["eps_index"] == bi:
                        ok &= np.asarray(br["cols"][column_key(d, e)]["pred"]) == y[:bpda_n]
                prior[column_key(d, e)] = ok
            suite_key = {**base, "n": bpda_n}
            got, runs = run_suite(detector.model, loaded.model, xs, ys, levels, b.ball,
                                  columns, threshold, settings.suite, prior_correct=prior,
                                  cache=cache, key=suite_key,
                                  log=lambda m: progress.note(m))
            got.update({"eps": bi, "eps_text": text})
            got["agreement"] = measure_agreement(detector.model, loaded.model,
                                                 xs[:settings.sanity_n or bpda_n], columns,
                                                 settings.suite)
            target = next(((d, e) for d, e in columns if d == "purify"), None)
            grad_attack = next((a for a in ("bpda-surrogate", "surrogate-pgd")
                                if a in settings.suite.attacks), None)
            if settings.sanity_n and target is not None and grad_attack is not None:
                got["sanity"] = sanity_checks(
                    detector.model, loaded.model, xs, ys, levels, b.ball, target, threshold,
                    settings.suite, runs, attack=grad_attack, n=settings.sanity_n,
                    cache=cache, key=suite_key, log=lambda m: progress.note(m))
            suite_results.append(got)
            evaluation.suite[_eps_tag(b)] = runs

    # ---- assemble the document
    keys_cols = [column_key(d, e) for d, e in columns]
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "tool": "pixeldefend",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            **(sources or {}),
            "n": n,
            "levels": levels,
            "attacks": list(settings.attacks),
            "eps": [{"text": t, "fraction": b.fraction, "levels": b.levels, "ball": b.ball}
                    for t, b in budgets],
            "eps_defend": eps_defend,
            "defences": list(settings.defences),
            "adaptive_attack": settings.adaptive_attack,
            "bpda": None if "bpda" not in settings.adaptive_names else {
                "steps": settings.bpda_steps, "n": bpda_n, "eot": settings.eot,
                "eps": sorted(bpda_balls),
                "alpha": {str(ball): alpha_of[ball] for ball in sorted(bpda_balls)},
                "random_start": True},
            "seed": settings.seed,
            "batch_size": settings.batch_size,
            "purify_batch": settings.purify_batch,
            "device": str(loaded.device),
            "threads": torch.get_num_threads(),
        },
        "columns": [{"key": column_key(d, e), "defence": d, "eps_defend": e,
                     "label": column_label(d, e)} for d, e in columns],
    }
    fpr5 = float(np.quantile(clean_bpd, 0.95))
    results["threshold"] = {
        "calibrated": threshold,
        "calibrated_fpr": None if cal is None else cal.fpr,
        "calibration_n": None if cal is None else cal.n,
        "calibration_data": None if cal is None else (cal.data or None),
        "fpr5_clean": fpr5,
        "fpr5_source": "95th percentile of the bits/dim of the evaluated clean images",
    }
    results["clean"] = {
        "n": n,
        "mean_bpd": _mean(clean_bpd),
        "accuracy": {k: _acc(column_pred("clean", d, e), y)
                     for k, (d, e) in zip(keys_cols, columns, strict=True)},
        "flagged_calibrated": None if threshold is None else float(np.mean(clean_bpd >
                                                                          threshold)),
    }
    rows: list[dict[str, Any]] = []
    detection: list[dict[str, Any]] = []
    strongest: list[dict[str, Any]] = []
    worst_case: list[dict[str, Any]] = []
    correct_clean = clean_pred == y

    def detect_row(attack: str, kind: str, bi: int, text: str, adv_bpd: np.ndarray,
                   adv_pred: np.ndarray, ref_bpd: np.ndarray, ref_y: np.ndarray
                   ) -> dict[str, Any]:
        fooled = adv_pred != ref_y
        return {
            "attack": attack, "kind": kind, "eps": bi, "eps_text": text, "n": len(adv_bpd),
            "mean_bpd_clean": _mean(ref_bpd), "mean_bpd_adv": _mean(adv_bpd),
            "auroc": _auroc(ref_bpd, adv_bpd),
            "auroc_fooled": _auroc(ref_bpd, adv_bpd[fooled]) if fooled.any() else None,
            "n_fooled": int(fooled.sum()),
            "tpr_calibrated": None if threshold is None else float(np.mean(adv_bpd >
                                                                           threshold)),
            "tpr_fpr5": float(np.mean(adv_bpd > fpr5)),
            "fpr_calibrated": None if threshold is None else float(np.mean(ref_bpd >
                                                                           threshold)),
        }

    for bi, (text, b) in enumerate(budgets):
        eps_rows = []
        for a in settings.attacks:
            s = f"{a}-{_eps_tag(b)}"
            acc = {k: _acc(column_pred(s, d, e), y)
                   for k, (d, e) in zip(keys_cols, columns, strict=True)}
            fooled = correct_clean & (adv_sets[s]["pred"] != y)
            row = {"attack": a, "kind": "oblivious", "eps": bi, "eps_text": text, "n": n,
                   "accuracy": acc, "clean_accuracy": dict(results["clean"]["accuracy"]),
                   "attack_success": float(fooled.sum() / max(1, correct_clean.sum())),
                   "summary": adv_sets[s]["summary"]}
            rows.append(row)
            eps_rows.append(row)
            detection.append(detect_row(a, "oblivious", bi, text, adv_sets[s]["bpd"],
                                        adv_sets[s]["pred"], clean_bpd, y))
        if eps_rows:
            best = {k: min(eps_rows, key=lambda r, k=k: r["accuracy"][k]) for k in keys_cols}
            strongest.append({"eps": bi, "eps_text": text,
                              "accuracy": {k: r["accuracy"][k] for k, r in best.items()},
                              "attack": {k: r["attack"] for k, r in best.items()}})
        for br in bpda_rows:
            if br["eps_index"] != bi:
                continue
            yb_np = y[:bpda_n]
            acc = {k: _acc(np.asarray(br["cols"][k]["pred"]), yb_np) for k in keys_cols}
            clean_sub = {k: _acc(column_pred("clean", d, e)[:bpda_n], yb_np)
                         for k, (d, e) in zip(keys_cols, columns, strict=True)}
            undefended = np.asarray(br["cols"]["none"]["undefended_pred"])
            fooled = correct_clean[:bpda_n] & (undefended != yb_np)
            rows.append({"attack": "bpda", "kind": "adaptive", "eps": bi, "eps_text": text,
                         "n": bpda_n, "accuracy": acc, "clean_accuracy": clean_sub,
                         "attack_success": float(fooled.sum()
                                                 / max(1, correct_clean[:bpda_n].sum())),
                         "summary": {k: br["cols"][k]["__meta__"]["summary"]
                                     for k in keys_cols}})
            # detection of the images BPDA made against the first purifying column
            target = next((k for k in keys_cols if k != "none"), "none")
            col = br["cols"][target]
            row = detect_row(f"bpda vs {target}", "adaptive", bi, text,
                             np.asarray(col["bpd"]), np.asarray(col["undefended_pred"]),
                             clean_bpd[:bpda_n], yb_np)
            detection.append(row)
        # the most honest figure: an image counts only if it survives every attack
        has_bpda = any(br["eps_index"] == bi for br in bpda_rows)
        m = bpda_n if has_bpda else n
        if eps_rows or has_bpda:
            survived = {}
            for k, (d, e) in zip(keys_cols, columns, strict=True):
                ok = np.ones(m, dtype=bool)
                for a in settings.attacks:
                    ok &= column_pred(f"{a}-{_eps_tag(b)}", d, e)[:m] == y[:m]
                for br in bpda_rows:
                    if br["eps_index"] == bi:
                        ok &= np.asarray(br["cols"][k]["pred"]) == y[:m]
                survived[k] = float(ok.mean())
            worst_case.append({"eps": bi, "eps_text": text, "n": m, "accuracy": survived,
                               "attacks": list(settings.attacks)
                               + (["bpda"] if has_bpda else [])})
    for sr in suite_results:  # the worst case now covers every adaptive attack too
        wc = next((w for w in worst_case if w["eps"] == sr["eps"]), None)
        if wc is None:
            wc = {"eps": sr["eps"], "eps_text": sr["eps_text"], "n": bpda_n,
                  "accuracy": {}, "attacks": list(settings.attacks)}
            worst_case.append(wc)
        wc["n"] = bpda_n
        wc["accuracy"].update({k: c["worst_case"]["accuracy"]
                               for k, c in sr["columns"].items()})
        wc["ci95"] = {k: c["worst_case"]["ci95"] for k, c in sr["columns"].items()}
        wc["attacks"] = list(dict.fromkeys(wc["attacks"] + list(settings.suite.attacks)))
    results["adaptive"] = suite_results
    results["rows"] = rows
    results["worst_case"] = worst_case
    results["strongest"] = strongest
    results["detection"] = detection
    notes = [OBLIVIOUS_NOTE]
    if not settings.adaptive_names:
        notes.append("No adaptive attack was run (--adaptive-attack none): this table does "
                     "not evaluate the defence.")
    else:
        notes.append(
            f"BPDA: {settings.bpda_steps} steps of PGD, quantised to {levels} levels and "
            f"clipped to the eps ball like every other attack, on the first {bpda_n} of the "
            f"{n} images, one run per defence column (the none column is plain PGD). "
            "Purification and the classifier are deterministic, so EOT is not needed"
            + (" (1 sample)." if settings.eot == 1 else
               f"; it was run with {settings.eot} samples anyway."))
    if worst_case:
        notes.append("'every attack, per image': the images that no attack at that eps "
                     "(each oblivious one, and BPDA when it ran: then on the BPDA images "
                     "only) managed to misclassify; the strongest attack per image.")
    if any(a in ("cw", "deepfool") for a in settings.attacks):
        notes.append("CW and DeepFool minimise an L2 norm; their images are clipped to the "
                     "L-infinity eps ball, as in the PixelDefend paper.")
    notes.append("Detection: TPR at the calibrated threshold uses the model's own clean "
                 "calibration set; TPR at 5% FPR uses the 95th percentile of the evaluated "
                 "clean images' bits/dim.")
    results["notes"] = notes
    results["timing"] = {"seconds_this_run": round(time.perf_counter() - started, 1),
                         "seconds_total": round(sum(timing.values()), 1),
                         "stages": timing}
    results["figures"] = []
    evaluation.results = results
    return evaluation


def strongest_summary(results: dict[str, Any]) -> list[str]:
    """Plain-words lines: strongest oblivious attack and BPDA per eps, per defence."""
    lines = []
    cols = results["columns"]
    for st in results["strongest"]:
        parts = [f"{c['label']} {100 * st['accuracy'][c['key']]:.1f}% "
                 f"({st['attack'][c['key']]})" for c in cols]
        lines.append(f"eps {st['eps_text']}: strongest oblivious attack: " + "; ".join(parts))
    for r in results["rows"]:
        if r["kind"] == "adaptive":
            parts = [f"{c['label']} {100 * r['accuracy'][c['key']]:.1f}%" for c in cols]
            lines.append(f"eps {r['eps_text']}: BPDA on {r['n']} images: " + "; ".join(parts))
    return lines


def parse_list(text: str | Sequence[str] | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c'] (None stays None)."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    return [s.strip() for s in items if s.strip()]


__all__ = ["DEFENCES", "DEFAULT_ATTACKS", "EvalProgress", "EvaluateSettings", "Evaluation",
           "SCHEMA", "Stage", "StageCache", "default_eps_defend_list", "default_eps_list",
           "run_evaluation", "strongest_summary"]
