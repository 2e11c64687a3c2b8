"""Running a plan: the stage cache, the resumable stage runner and each stage's work.

Each stage's arrays go to ``<out>/cache/<stage>.npz`` with the key `plan` gave it; with
``resume=True`` a stage whose key matches is loaded instead of run, so an interrupted
evaluation continues where it stopped, and changing one option re-runs only what it
affects. Every file is written atomically.

Stages call `purify.purify_fast` directly (the bits/dim `purify.purify` would compute
first are known already), and BPDA attacks `bpda.StraightThroughPurifier`, the same
computation as `purify.PurifiedClassifier` at half the cost per step.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adaptive import measure_agreement, run_suite, sanity_checks
from ..atomic import atomic_path
from ..attack_pipeline import map_labels
from ..attacks import Eps, run_attack
from ..bpda import StraightThroughPurifier, bpda_attack
from ..data import ImageSet, require_labels
from ..errors import DataError
from ..models.classifier import LoadedClassifier, as_loaded, check_inputs, predict_logits
from ..progress import EvalProgress
from ..purify import purify, purify_fast
from ..sharding import Sharding
from .defences import DEFENCES, column_key, gate
from .plan import (
    SCHEMA,
    EvaluateSettings,
    Plan,
    Stage,
    attack_stage,
    bpda_stage,
    eps_tag,
    make_plan,
    purify_stage,
    set_name,
)
from .results import Evaluation, assemble_results

Arrays = dict[str, Any]


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


# ------------------------------------------------------------------------ runner


@dataclass
class Runner:
    """The models, images and plan one evaluation shares, and the cached stage runner."""

    detector: Any
    loaded: LoadedClassifier
    x: torch.Tensor
    labels: torch.Tensor
    plan: Plan
    cache: StageCache
    progress: EvalProgress
    timing: dict[str, float] = field(default_factory=dict)
    # torchrun: the purification stages split their images over the ranks; every other
    # stage runs on every rank alike (seeded), and rank 0 alone writes the cache
    sharding: Sharding = field(default_factory=Sharding)

    @property
    def settings(self) -> EvaluateSettings:
        return self.plan.settings

    def run_stage(self, name: str, work: Callable[[Stage], tuple[Arrays, dict[str, Any]]]
                  ) -> Arrays:
        """The stage's arrays (and ``__meta__``): from the cache if its key matches, else
        computed by `work(stage)` and stored."""
        stage = self.plan.stages[name]
        hit = self.cache.load(name, stage.key) if self.sharding.writes else None
        hit = self.sharding.agree(hit)  # every rank takes rank 0's decision (and arrays)
        if hit is not None:
            self.timing[name] = float(hit["__meta__"].get("seconds", 0.0))
            self.progress.end(stage, cached=True)
            return hit
        stage.cached = False
        self.progress.begin(stage)
        t0 = time.perf_counter()
        arrays, meta = work(stage)
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        self.timing[name] = meta["seconds"]
        if self.sharding.writes:
            self.cache.save(name, stage.key, arrays, meta)
        self.progress.end(stage, cached=False)
        arrays = dict(arrays)
        arrays["__meta__"] = meta
        return arrays

    def predict(self, imgs: torch.Tensor) -> np.ndarray:
        """The bare classifier's predicted classes."""
        if imgs.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        return predict_logits(self.loaded.model, imgs, self.plan.levels,
                              self.settings.batch_size).argmax(1).numpy()

    def bpd(self, imgs: torch.Tensor) -> np.ndarray:
        return np.asarray(self.detector.anomaly_score(imgs, "bpd"))


# ------------------------------------------------------------------ stage work


def run_clean(r: Runner) -> Arrays:
    def work(stage: Stage) -> tuple[Arrays, dict[str, Any]]:
        bpd = r.detector.anomaly_score(r.x, "bpd")
        r.progress.advance(stage, r.plan.n)
        return {"bpd": np.asarray(bpd, dtype=np.float64), "pred": r.predict(r.x)}, {}

    return r.run_stage("clean", work)


def run_attacks(r: Runner, clean: Arrays) -> dict[str, Arrays]:
    """Every oblivious attack at every eps: image set -> images, pred, bpd, summary."""
    sets: dict[str, Arrays] = {"clean": {"images": r.x, "pred": clean["pred"],
                                         "bpd": clean["bpd"]}}
    for a in r.settings.attacks:
        for _, b in r.plan.budgets:
            def work(stage: Stage, a: str = a, b: Eps = b) -> tuple[Arrays, dict[str, Any]]:
                result = run_attack(r.loaded, r.x, r.labels, r.plan.levels, a, b,
                                    seed=r.settings.seed, batch_size=r.settings.batch_size,
                                    progress=lambda k: r.progress.advance(stage, k),
                                    sharding=r.sharding)  # each rank its own batches
                return ({"adversarial": result.adversarial.numpy(),
                         "pred": result.adv_pred.numpy(), "bpd": r.bpd(result.adversarial)},
                        {"summary": result.summary})

            got = r.run_stage(attack_stage(set_name(a, b)), work)
            sets[set_name(a, b)] = {
                "images": torch.from_numpy(np.asarray(got["adversarial"])),
                "pred": got["pred"], "bpd": got["bpd"], "summary": got["__meta__"]["summary"]}
    return sets


def _purify_work(r: Runner, images: torch.Tensor, e: int, select: np.ndarray
                 ) -> Callable[[Stage], tuple[Arrays, dict[str, Any]]]:
    def work(stage: Stage) -> tuple[Arrays, dict[str, Any]]:
        # purify_fast, not purify(): the images' bits/dim are known already
        idx = torch.from_numpy(np.flatnonzero(select))
        stats: dict[str, Any] = {}
        parts = []
        step = r.settings.purify_batch
        block = r.sharding.window(len(idx))  # this rank's images (all of them alone)
        for lo in range(block.start, block.stop, step):
            chunk = images[idx[lo:min(lo + step, block.stop)]]
            parts.append(purify_fast(r.detector.model, chunk, e, step, stats).cpu())
            r.progress.advance(stage, len(chunk))
        mine = (torch.cat(parts) if parts else images[:0], int(stats.get("fallbacks", 0)))
        gathered = r.sharding.dist.gather(mine)  # rank order = image order
        done = torch.cat([images for images, _ in gathered])
        r.progress.advance(stage, r.plan.n - len(block))
        return ({"index": idx.numpy(), "images": done.numpy(),
                 "bpd_after": r.bpd(done) if len(idx) else np.zeros(0),
                 "pred": r.predict(done)},
                {"fallbacks": sum(fallbacks for _, fallbacks in gathered)})

    return work


def run_purification(r: Runner, sets: dict[str, Arrays]) -> dict[str, Arrays]:
    """Every image set purified at every eps_defend: ``set|e`` -> images, pred, bpd."""
    purified: dict[str, Arrays] = {}
    if not r.plan.purifying:
        return purified
    for image_set in r.plan.sets:
        src = sets[image_set]
        for e in r.plan.eps_defend:
            select = np.ones(r.plan.n, dtype=bool) if r.plan.purify_mode == "all" else \
                src["bpd"] > r.plan.threshold
            got = r.run_stage(purify_stage(image_set, e),
                              _purify_work(r, src["images"], e, select))
            idx = np.asarray(got["index"], dtype=np.int64)
            full_pred = np.array(src["pred"], copy=True)
            full_imgs = src["images"].clone()
            full_bpd = np.array(src["bpd"], copy=True)
            full_pred[idx] = got["pred"]
            full_imgs[torch.from_numpy(idx)] = torch.from_numpy(np.asarray(got["images"]))
            full_bpd[idx] = got["bpd_after"]
            purified[f"{image_set}|{e}"] = {"images": full_imgs, "pred": full_pred,
                                           "bpd": full_bpd, "purified": select}
    return purified


def _bpda_work(r: Runner, d: str, e: int | None, b: Eps
               ) -> Callable[[Stage], tuple[Arrays, dict[str, Any]]]:
    s, levels, m = r.settings, r.plan.levels, r.plan.bpda_n
    xb, yb = r.x[:m], r.labels[:m]
    alpha, thr = r.plan.alpha_of[b.ball], gate(d, r.plan.threshold)

    def work(stage: Stage) -> tuple[Arrays, dict[str, Any]]:
        defended: torch.nn.Module = r.loaded.model if not DEFENCES[d].purifies else \
            StraightThroughPurifier(r.detector.model, r.loaded.model, e, thr, s.purify_batch)
        spent = 0

        def tick(attacked: int, active: int) -> None:
            nonlocal spent
            spent += attacked
            r.progress.advance(stage, attacked, f"{active} not fooled yet")

        def attack(xs: torch.Tensor, ys: torch.Tensor, seed: int, **kw: Any) -> Any:
            return bpda_attack(defended, xs, ys, levels, b, steps=s.bpda_steps, alpha=alpha,
                               eot=s.eot, seed=seed, batch_size=max(s.purify_batch, 1),
                               device=r.loaded.device, **kw)

        result = attack(xb, yb, s.seed, progress=tick)
        for k in range(1, s.suite.restarts):  # --restarts: the rest again
            left = np.flatnonzero(result.first_success < 0)
            if len(left) == 0:
                break
            again = attack(xb[left], yb[left], s.seed + k)
            won = again.first_success >= 0
            result.adversarial[left[won]] = again.adversarial[won]
            result.first_success[left[won]] = again.first_success[won]
        result.summary["restarts"] = s.suite.restarts
        adv, spec = result.adversarial, DEFENCES[d]
        undefended = r.predict(adv)
        if not spec.purifies:
            purified, bpd = undefended, r.bpd(adv)
        else:
            check = purify(r.detector, adv, e, adaptive=thr, batch_size=s.purify_batch)
            purified, bpd = r.predict(check.images), np.asarray(check.bpd_before)
        flagged = bpd > r.plan.threshold if r.plan.threshold is not None else \
            np.zeros(len(bpd), dtype=bool)
        r.progress.advance(stage, max(0, stage.items - spent))
        return ({"adversarial": adv.numpy(), "pred": spec.combine(undefended, purified, flagged),
                 "undefended_pred": undefended, "bpd": bpd,
                 "first_success": result.first_success}, {"summary": result.summary})

    return work


def run_bpda(r: Runner, evaluation: Evaluation) -> list[dict[str, Any]]:
    """BPDA at each of its eps against each column: one row per eps, arrays per column."""
    rows: list[dict[str, Any]] = []
    for bi, text, b in r.plan.bpda_budgets():
        per_col: dict[str, Arrays] = {}
        for d, e in r.plan.columns:
            got = r.run_stage(bpda_stage(b, d, e), _bpda_work(r, d, e, b))
            per_col[column_key(d, e)] = got
            evaluation.bpda[f"{eps_tag(b)}|{column_key(d, e)}"] = {
                "images": torch.from_numpy(np.asarray(got["adversarial"])),
                "pred": got["pred"], "bpd": got["bpd"]}
        rows.append({"eps_index": bi, "text": text, "cols": per_col})
    return rows


def run_adaptive_suite(r: Runner, evaluation: Evaluation, bpda_rows: list[dict[str, Any]],
                       base: dict[str, Any]) -> list[dict[str, Any]]:
    """The suite of `pixeldefend.adaptive` on the BPDA images, per BPDA eps."""
    s, plan, m = r.settings, r.plan, r.plan.bpda_n
    if not s.suite.attacks:
        return []
    xs, ys = r.x[:m], r.labels[:m]
    out: list[dict[str, Any]] = []
    for bi, (text, b) in enumerate(plan.budgets):
        if b.ball not in plan.bpda_balls:
            continue
        prior = {column_key(d, e): evaluation.survivors(plan, bi, d, e, bpda_rows, m)
                 for d, e in plan.columns}  # survivors of the oblivious attacks and BPDA
        key = {**base, "n": m}
        got, runs = run_suite(r.detector.model, r.loaded.model, xs, ys, plan.levels, b.ball,
                              plan.columns, plan.threshold, s.suite, prior_correct=prior,
                              cache=r.cache, key=key, log=r.progress.note)
        got.update({"eps": bi, "eps_text": text})
        got["agreement"] = measure_agreement(r.detector.model, r.loaded.model,
                                             xs[:s.sanity_n or m], plan.columns, s.suite)
        target = next(((d, e) for d, e in plan.columns if d == "purify"), None)
        grad_attack = next((a for a in ("bpda-surrogate", "surrogate-pgd")
                            if a in s.suite.attacks), None)
        if s.sanity_n and target is not None and grad_attack is not None:
            got["sanity"] = sanity_checks(
                r.detector.model, r.loaded.model, xs, ys, plan.levels, b.ball, target,
                plan.threshold, s.suite, runs, attack=grad_attack, n=s.sanity_n,
                cache=r.cache, key=key, log=r.progress.note)
        out.append(got)
        evaluation.suite[eps_tag(b)] = runs
    return out


# -------------------------------------------------------------------- the whole run


def _labels(detector: Any, images: ImageSet, loaded: LoadedClassifier) -> torch.Tensor:
    """The images' labels in the classifier's class order, after checking the images fit."""
    levels = images.levels
    if detector.spec.levels != levels or tuple(detector.spec.shape) != images.spec.shape:
        raise DataError(f"the images are {images.spec.describe()} but the model expects "
                        f"{detector.spec.describe()}")
    if len(images) == 0:
        raise DataError("no images to evaluate")
    require_labels(images, "evaluated")
    labels = map_labels(images, loaded)
    assert labels is not None
    check_inputs(loaded, images.images, labels)
    return labels


def run_evaluation(detector: Any, classifier: LoadedClassifier | torch.nn.Module,
                   images: ImageSet, settings: EvaluateSettings, out: Path | str,
                   progress: EvalProgress | None = None,
                   sources: dict[str, str] | None = None,
                   sharding: Sharding | None = None) -> Evaluation:
    """Run (or resume) the whole evaluation; returns the results and the arrays.

    `detector`: a `DensityDetector` (its bits/dim calibration, if any, is the adaptive
    threshold). `images`: labelled, already cut to the images to evaluate. `sources`
    names the model, classifier and data for the report. `sharding`: under torchrun the
    purification stages split their images over the ranks; rank 0 alone writes the cache.
    """
    settings.checked()
    progress = progress or EvalProgress()
    loaded = as_loaded(classifier)
    started = time.perf_counter()
    labels = _labels(detector, images, loaded)
    x = images.images
    cal = detector.calibrations.get("bpd") if hasattr(detector, "calibrations") else None
    threshold = None if cal is None or not math.isfinite(cal.threshold) else cal.threshold
    base = {"model": module_digest(detector.model), "threshold": threshold,
            "classifier": module_digest(loaded.model), "images": tensor_digest(x, labels),
            "levels": images.levels, "version": SCHEMA}
    plan = make_plan(settings, images.levels, len(images), threshold, base)
    cache = StageCache(Path(out) / "cache", settings.resume)
    for name, stage in plan.stages.items():
        stage.cached = cache.has(name, stage.key)
    progress.plan(list(plan.stages.values()))
    r = Runner(detector, loaded, x, labels, plan, cache, progress,
               sharding=sharding or Sharding())

    clean = run_clean(r)
    evaluation = Evaluation({}, x, labels, plan.levels, clean["pred"], clean["bpd"],
                            threshold=threshold)
    sets = run_attacks(r, clean)
    evaluation.adversarial = {k: v for k, v in sets.items() if k != "clean"}
    evaluation.purified = run_purification(r, sets)
    bpda_rows = run_bpda(r, evaluation)
    suite = run_adaptive_suite(r, evaluation, bpda_rows, base)
    evaluation.results = assemble_results(evaluation, plan, bpda_rows, suite, cal, sources,
                                          str(loaded.device))
    evaluation.results["timing"] = {
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "seconds_total": round(sum(r.timing.values()), 1), "stages": r.timing}
    evaluation.results["figures"] = []
    return evaluation
