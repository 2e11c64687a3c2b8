"""Adversarial attacks on a classifier, with results a real image file can carry.

`make_attack(name, model, **params)` builds an attack callable on float images in
[0, 1]; `run_attack(...)` runs it on uint8 images, *quantises* the result to the images'
pixel levels (round, clip to the eps ball in levels, clip to [0, levels-1]) and reports
accuracy on the quantised images, because that is what a saved PNG holds.

The attacks themselves are the registry in `attack_registry.py` (re-exported here):
every attack torchattacks has comes from torchattacks (FGSM, BIM, PGD, CW, DeepFool,
AutoAttack); only `rand` (uniform integer noise, a baseline) is written there. CW and
DeepFool minimise L2 and are not L-infinity bounded: like the PixelDefend paper, their
output is clipped to the eps ball, and the summary says so (`clipped_to_eps_ball`).

Eps and levels: eps is a fraction of the [0, 1] range; the usable ball is
floor(eps * (levels - 1)) whole levels. With 17-level digits, eps = 8/255 is half a
level and the quantised attack cannot change a single pixel: use `eps=2, eps_levels=True`
(= 0.125) or larger there.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .attack_registry import ATTACK_COST as ATTACK_COST
from .attack_registry import ATTACKS as ATTACKS
from .attack_registry import DEFAULT_STEPS as DEFAULT_STEPS
from .attack_registry import L2_METHODS as L2_METHODS
from .attack_registry import METHODS as METHODS
from .attack_registry import TARGETED_METHODS, attack_spec
from .attack_registry import AttackSpec as AttackSpec
from .errors import DataError, UsageError
from .models.loading import LoadedClassifier, as_loaded, check_inputs, predict_logits
from .pixels import check_images, clip_to_ball, to_float
from .pixels import quantise as quantise
from .sharding import Sharding


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """torchattacks prints progress and mode changes: send them to stderr so that
    `--format json` on stdout stays parseable."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ------------------------------------------------------------------------------ eps


class Eps(NamedTuple):
    """An eps budget: as a fraction of [0, 1] and in pixel levels."""

    fraction: float
    levels: float

    @property
    def ball(self) -> int:
        """Whole levels a quantised image may move: floor(eps * (levels - 1))."""
        return int(math.floor(self.levels + 1e-6))


_NUMBER = r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*"
_EPS = re.compile(rf"^(?P<num>{_NUMBER})(?:/(?P<den>{_NUMBER}))?$")


def parse_eps(text: str | float | int, levels: int, eps_levels: bool = False) -> Eps:
    """'8/255' or '0.03' (a fraction of the [0, 1] range) or, with `eps_levels`, a number
    of whole pixel levels ('2' = 2 / (levels - 1)). Out of (0, 1] is a UsageError."""
    if levels < 2:
        raise UsageError(f"images need at least 2 levels, got {levels}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        match = _EPS.match(str(text))
        if match is None:
            raise UsageError(f"eps {text!r} is not a number or fraction such as 8/255 or 0.03",
                             param="eps")
        value = float(match["num"])
        if match["den"] is not None:
            den = float(match["den"])
            if den == 0:
                raise UsageError(f"eps {text!r} divides by zero", param="eps")
            value /= den
    if not math.isfinite(value):
        raise UsageError(f"eps {text!r} is not finite", param="eps")
    if eps_levels:
        if not 0 < value <= levels - 1:
            raise UsageError(f"eps {text} with eps_levels must be between 0 (exclusive) and "
                             f"{levels - 1} levels for {levels}-level images",
                             param=("eps", "eps_levels"))
        return Eps(value / (levels - 1), value)
    if not 0 < value <= 1:
        raise UsageError(f"eps {text} is outside (0, 1]: a fraction of the pixel range (e.g. "
                         "8/255); for whole pixel levels set eps_levels",
                         param=("eps", "eps_levels"))
    return Eps(value, value * (levels - 1))


def default_eps(levels: int) -> Eps:
    """8/255 of the range, but at least one whole level (8/255 is half a digits level)."""
    eps = Eps(8 / 255, 8 / 255 * (levels - 1))
    return eps if eps.ball >= 1 else Eps(1 / (levels - 1), 1.0)


def resolve_eps(eps: Eps | str | float | None, levels: int, eps_levels: bool = False) -> Eps:
    """An attack's budget from whatever the caller has: None (the default), an `Eps`, or
    text / a number for `parse_eps`."""
    if eps is None:
        return default_eps(levels)
    if isinstance(eps, Eps):
        return eps
    return parse_eps(eps, levels, eps_levels)


# ---------------------------------------------------------------------- quantisation


def perturbation_norms(adv: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Per-image L-infinity and L2 norms of (adv - clean), in pixel levels."""
    delta = (adv.long() - clean.long()).flatten(1).float()
    if delta.shape[1] == 0:
        zero = torch.zeros(delta.shape[0])
        return zero, zero
    return delta.abs().amax(1), delta.norm(dim=1)


# --------------------------------------------------------------------------- attacks


@dataclass
class Attack:
    """A ready attack: call it on float [0, 1] images and labels (and targets when
    targeted); returns float [0, 1] adversarial images within the eps ball."""

    name: str
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    eps: float | None
    targeted: bool = False
    clipped_to_eps_ball: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
        if not images.is_floating_point():
            raise UsageError("attacks take float images in [0, 1]; convert uint8 levels with "
                             "x / (levels - 1) first (or use run_attack)")
        if self.targeted and targets is None:
            raise UsageError(f"{self.name}: targeted attack needs target labels")
        goal = targets if self.targeted else labels
        assert goal is not None
        with quiet_stdout():
            adv = self.run(images, goal)
        adv = adv.detach()
        if self.eps is not None:  # clip L2 attacks (a no-op for the L-infinity ones)
            return clip_to_ball(adv, images, self.eps)
        return adv.clamp(0.0, 1.0)


_PARAMS = {"eps", "alpha", "steps", "c", "kappa", "lr", "overshoot", "targeted", "seed",
           "levels", "num_classes", "random_start"}


def make_attack(name: str, model: nn.Module | LoadedClassifier, **params: Any) -> Attack:
    """Build attack `name` against `model` (float [0, 1] images -> logits).

    Parameters (all optional except those the method `needs`, e.g. eps for the
    L-infinity methods): eps (fraction of [0, 1]), alpha, steps, c, kappa, lr, overshoot,
    targeted, seed, levels (for rand), num_classes (for autoattack), random_start (pgd).
    """
    loaded = as_loaded(model)
    spec = attack_spec(name)
    unknown = set(params) - _PARAMS
    if unknown:
        raise UsageError(f"unknown attack parameter(s): {', '.join(sorted(unknown))}")
    eps = params.get("eps")
    targeted = bool(params.get("targeted", False))
    if eps is None and "eps" in spec.needs:
        raise UsageError(f"{spec.name} needs eps")
    if eps is not None and not 0 <= float(eps) <= 1:
        raise UsageError(f"eps must be in [0, 1], got {eps}")
    if targeted and not spec.targeted:
        raise UsageError(f"targeted attacks are supported by {', '.join(TARGETED_METHODS)}, "
                         f"not {spec.name}")
    steps = int(params.get("steps") or spec.default_steps or 1)
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")
    alpha = params.get("alpha")
    if alpha is not None and not 0 < float(alpha) <= 1:
        raise UsageError(f"alpha must be in (0, 1], got {alpha}")
    settings = {**params, "steps": steps, "seed": int(params.get("seed", 0)),
                "num_classes": params.get("num_classes") or loaded.num_classes}
    with quiet_stdout():
        run, used = spec.factory(loaded.model, settings)
        if hasattr(run, "set_device"):  # a torchattacks attack
            run.set_device(loaded.device)
            if targeted:
                run.set_mode_targeted_by_label(quiet=True)
    return Attack(name=spec.name, run=run, eps=None if eps is None else float(eps),
                  targeted=targeted, clipped_to_eps_ball=spec.norm == "l2",
                  params={"eps": eps, **used})


# ----------------------------------------------------------------------------- run


@dataclass
class AttackResult:
    """Quantised adversarial images plus what happened to each one."""

    adversarial: torch.Tensor  # uint8 (N, C, H, W), same levels as the input
    labels: torch.Tensor
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    targets: torch.Tensor | None
    linf: torch.Tensor  # per image, in levels
    l2: torch.Tensor  # per image, in levels
    records: list[dict[str, Any]]
    summary: dict[str, Any]


def random_targets(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A seeded random target label != the true label, for every image."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels.cpu() + shift) % num_classes


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _check_attack_inputs(loaded: LoadedClassifier, images: torch.Tensor, labels: Any,
                         levels: int) -> tuple[torch.Tensor, int]:
    """(labels as a CPU long tensor, the classifier's number of classes), or a DataError."""
    check_images(images, levels)
    if loaded.levels is not None and loaded.levels != levels:
        raise DataError(f"images have {levels} levels but the classifier {loaded.source} was "
                        f"trained on {loaded.levels}")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.shape != (images.shape[0],):
        raise DataError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise DataError("no images to attack")
    return labels, check_inputs(loaded, images, labels)


def _records(labels: torch.Tensor, clean_pred: torch.Tensor, adv_pred: torch.Tensor,
             targets: torch.Tensor | None, success: torch.Tensor, linf: torch.Tensor,
             l2: torch.Tensor, names: list[str] | None) -> list[dict[str, Any]]:
    """One record per image: labels, predictions, success and perturbation norms."""
    records = []
    for i in range(int(labels.shape[0])):
        rec: dict[str, Any] = {
            "index": i, "name": names[i] if names else str(i),
            "label": int(labels[i]), "clean_pred": int(clean_pred[i]),
            "adv_pred": int(adv_pred[i]), "success": bool(success[i]),
            "linf": int(linf[i]), "l2": round(float(l2[i]), 4),
        }
        if targets is not None:
            rec["target"] = int(targets[i])
        records.append(rec)
    return records


def batch_seed(seed: int, batch: int) -> int:
    """The torch seed of global batch `batch` (0, 1, ... over the whole input at the run's
    batch size): numpy's SeedSequence mixes (seed, batch) into one 63-bit seed, so every
    batch's random starts and noise depend only on the seed and the batch's position,
    never on which batches ran before it in the same process (a torchrun split of the
    batches gives the one-process result)."""
    entropy = np.random.SeedSequence([seed & (2**64 - 1), batch])
    return int(entropy.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _attack_batches(attack: Any, images: torch.Tensor, labels: torch.Tensor,
                    targets: torch.Tensor | None, levels: int, ball: int, seed: int,
                    batch_size: int, device: torch.device,
                    progress: Callable[[int], None] | None,
                    batches: range | None = None) -> list[torch.Tensor]:
    """Run `attack` on global batches `batches` (default: all), each under its own seed
    (`batch_seed`) in a forked RNG; quantise each result to the image levels inside the
    eps ball. One tensor per batch."""
    if batches is None:
        batches = range(math.ceil(images.shape[0] / batch_size))
    adv_parts = []
    with torch.random.fork_rng(devices=[]):
        for k in batches:
            torch.manual_seed(batch_seed(seed, k))
            lo = k * batch_size
            clean = images[lo : lo + batch_size]
            x = to_float(clean, levels).to(device)
            y = labels[lo : lo + batch_size].to(device)
            t = None if targets is None else targets[lo : lo + batch_size].to(device)
            adv_parts.append(quantise(attack(x, y, t), clean, levels, ball))
            if progress is not None:
                progress(clean.shape[0])
    return adv_parts


def attack_all_batches(attack: Any, images: torch.Tensor, labels: torch.Tensor,
                       targets: torch.Tensor | None, levels: int, ball: int, seed: int,
                       batch_size: int, device: torch.device,
                       progress: Callable[[int], None] | None,
                       sharding: Sharding | None = None) -> torch.Tensor:
    """Every batch's adversarial images, in input order, on every rank: under torchrun
    each rank attacks its contiguous block of whole batches (`Dist.shard` over the batch
    count) and the blocks are gathered in rank order; with per-batch seeds the result is
    the one-process result, bit for bit."""
    sharding = sharding or Sharding()
    mine = sharding.dist.shard(math.ceil(images.shape[0] / batch_size))

    def attack_mine() -> torch.Tensor:
        parts = _attack_batches(attack, images, labels, targets, levels, ball, seed,
                                batch_size, device, progress, mine)
        return (torch.cat(parts) if parts else images[:0]).cpu()

    parts = sharding.all_parts(attack_mine)
    adversarial = torch.cat(parts)
    if progress is not None and sharding.dist.active:  # the other ranks' images, done too
        progress(adversarial.shape[0] - parts[sharding.dist.rank].shape[0])
    return adversarial


def _figures(labels: torch.Tensor, adv_pred: torch.Tensor, correct: torch.Tensor,
             success: torch.Tensor, linf: torch.Tensor, l2: torch.Tensor) -> dict[str, Any]:
    """The summary's accuracies and perturbation sizes, over all images."""
    return {
        "clean_accuracy": float(correct.float().mean()),
        "adversarial_accuracy": float((adv_pred == labels).float().mean()),
        "attack_success_rate": _rate(int((correct & success).sum()), int(correct.sum())),
        "mean_linf": float(linf.mean()),
        "max_linf": int(linf.max()),
        "mean_l2": float(l2.mean()),
        "max_l2": float(l2.max()),
        "n_changed": int((linf > 0).sum()),
    }


def run_attack(
    classifier: nn.Module | LoadedClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    levels: int,
    method: str,
    eps: Eps | float | str | None = None,
    *,
    eps_levels: bool = False,
    steps: int | None = None,
    alpha: float | None = None,
    c: float = 1.0,
    kappa: float = 0.0,
    lr: float = 0.01,
    overshoot: float = 0.02,
    targeted: bool = False,
    seed: int = 0,
    batch_size: int = 128,
    names: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    sharding: Sharding | None = None,
) -> AttackResult:
    """Attack uint8 images (values in [0, levels-1]) and evaluate the quantised result.

    `eps` is an `Eps`, a fraction of [0, 1], or text for `parse_eps` (None: 8/255, at
    least one level). `alpha` is a fraction of [0, 1] (default eps / 4). Deterministic for
    a given seed and batch size (each batch has its own seed, `batch_seed`), however the
    batches are split over torchrun's ranks (`sharding`: every rank gets the whole
    result); the global torch RNG is left as it was.
    """
    loaded = as_loaded(classifier)
    method = attack_spec(method).name
    labels, num_classes = _check_attack_inputs(loaded, images, labels, levels)
    budget = resolve_eps(eps, levels, eps_levels)
    ball = budget.ball
    eps_used = ball / (levels - 1)  # attack inside the ball a quantised image can reach
    warnings: list[str] = []
    if ball == 0:
        warnings.append(
            f"eps = {budget.levels:.3g} levels is less than one level of {levels}-level "
            "images: the quantised images cannot change (use a larger eps, or eps_levels=True)")
    attack = make_attack(method, loaded, eps=eps_used, alpha=alpha, steps=steps, c=c,
                         kappa=kappa, lr=lr, overshoot=overshoot, targeted=targeted,
                         seed=seed, levels=levels, num_classes=num_classes)
    targets = random_targets(labels, num_classes, seed) if targeted else None
    start = time.perf_counter()
    adversarial = attack_all_batches(attack, images, labels, targets, levels, ball, seed,
                                     batch_size, loaded.device, progress, sharding)
    seconds = time.perf_counter() - start
    clean_pred = predict_logits(loaded.model, images, levels, batch_size).argmax(1)
    adv_pred = predict_logits(loaded.model, adversarial, levels, batch_size).argmax(1)
    linf, l2 = perturbation_norms(adversarial, images)
    correct = clean_pred == labels
    success = (adv_pred == targets) if targets is not None else (adv_pred != labels)
    n = int(images.shape[0])
    records = _records(labels, clean_pred, adv_pred, targets, correct & success, linf, l2,
                       names)
    params = {k: v for k, v in attack.params.items() if k != "eps"}
    summary: dict[str, Any] = {
        "method": method,
        "n": n,
        "levels": levels,
        "eps": budget.fraction,
        "eps_levels": budget.levels,
        "eps_ball_levels": ball,
        "targeted": targeted,
        "seed": seed,
        "params": params,
        "clipped_to_eps_ball": attack.clipped_to_eps_ball,
        "quantised": True,
        **_figures(labels, adv_pred, correct, success, linf, l2),
        "seconds": round(seconds, 3),
        "warnings": warnings,
    }
    return AttackResult(adversarial, labels, clean_pred, adv_pred, targets, linf, l2,
                        records, summary)
