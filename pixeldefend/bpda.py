"""BPDA: the adaptive attack on PixelDefend (Athalye, Carlini & Wagner, ICML 2018).

PixelDefend's purifier is a discrete greedy search, so it has no useful gradient: an
attack that differentiates through it (or ignores it) says nothing about the defence.
Backward Pass Differentiable Approximation replaces the purifier by the identity on the
backward pass only: the forward pass runs the real pipeline, classifier(purify(x)), and
the gradient is the classifier's gradient at the purified image, applied to x. With it,
projected gradient descent (Madry et al. 2018) attacks the defended classifier itself.

`bpda_attack` runs that PGD against any "defended model" (float [0, 1] images -> logits)
whose backward pass is already straight-through: `purify.PurifiedClassifier` (PixelDefend,
adaptive or not; `StraightThroughPurifier` is its old name here), or the bare classifier
(then BPDA is plain PGD). Like every attack in
`pixeldefend.attacks`, iterates are quantised to the images' pixel levels and clipped to
the eps ball in levels: the forward pass always sees the image a PNG would hold (the
rounding is itself passed straight through), so each step's prediction is the defended
prediction on a valid adversarial image. The attack keeps, per image, the first iterate
that fools the defended model (and stops spending purifications on it), else the last.

EOT (Athalye et al. 2018, Expectation over Transformation): with `eot` > 1 the gradient
is averaged over that many forward passes, which only matters when the pipeline is
random. PixelDefend's purifier and our classifiers in eval mode are deterministic, so the
default is 1 and more would repeat the same computation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attacks import Eps, resolve_eps
from .errors import DataError, UsageError
from .pixels import (
    check_images,
    clip_to_ball,
    level_fraction,
    quantise,
    straight_through_round,
    to_float,
)
from .purify import StraightThroughPurifier as StraightThroughPurifier

DEFAULT_STEPS = 100
# the old name, for callers written before `pixels` held the contract
straight_through_quantise = straight_through_round


def default_alpha(eps: float, steps: int) -> float:
    """Step size: 2.5 * eps / steps (Madry et al.), so the iterates can cross the whole
    ball, but at least eps / 10 so that a short run still moves whole pixel levels."""
    return eps * max(2.5 / steps, 0.1)


@dataclass
class BPDAResult:
    """Quantised adversarial images against the defended model, and how the run went."""

    adversarial: torch.Tensor  # uint8 (N, C, H, W), within the eps ball of the inputs
    defended_pred: torch.Tensor  # (N,) defended prediction seen at the kept iterate
    first_success: np.ndarray  # (N,) int: step at which the image was first fooled, -1 never
    summary: dict[str, Any] = field(default_factory=dict)


def _check_inputs(images: torch.Tensor, labels: Any, levels: int, steps: int,
                  eot: int) -> torch.Tensor:
    """The labels as a CPU long tensor, or a DataError / UsageError naming the problem."""
    check_images(images, levels)
    if images.shape[0] == 0:
        raise DataError("no images to attack")
    if steps < 1:
        raise UsageError(f"BPDA needs at least 1 step, got {steps}")
    if eot < 1:
        raise UsageError(f"eot must be at least 1, got {eot}")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.shape != (images.shape[0],):
        raise DataError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    return labels


def _pgd_batch(defended: nn.Module | Callable[[torch.Tensor], torch.Tensor],
               clean_u8: torch.Tensor, y: torch.Tensor, levels: int, ball: int, step: float,
               steps: int, eot: int, random_start: bool, generator: torch.Generator,
               dev: torch.device, progress: Callable[[int, int], None] | None
               ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """BPDA on one batch: (adversarial uint8, predictions, first fooling step or -1,
    forward passes). Images leave the loop as soon as they are fooled."""
    eps_used = level_fraction(ball, levels)
    adv_out = clean_u8.clone()
    pred_out = torch.empty(clean_u8.shape[0], dtype=torch.long)
    first = np.full(clean_u8.shape[0], -1, dtype=np.int64)
    forwards = 0
    x0 = to_float(clean_u8, levels)
    if random_start and ball > 0:
        noise = torch.randint(-ball, ball + 1, x0.shape, generator=generator)
        x = (x0 + to_float(noise, levels)).clamp(0.0, 1.0)
    else:
        x = x0.clone()
    active = torch.arange(x0.shape[0])  # images not fooled yet
    for t in range(steps + 1):
        last = t == steps
        xa = x[active].to(dev).requires_grad_(not last)
        grad = torch.zeros_like(xa)
        with torch.set_grad_enabled(not last):
            for k in range(1 if last else eot):
                logits = defended(straight_through_round(xa, levels))
                forwards += 1
                if k == 0:
                    pred = logits.detach().argmax(1).cpu()
                if not last:
                    loss = F.cross_entropy(logits, y[active].to(dev), reduction="sum")
                    grad += torch.autograd.grad(loss, xa)[0]
        fooled = pred != y[active]
        # keep the fooled iterates (and, at the end, the last one of the rest)
        keep = slice(None) if last else fooled
        idx = active[keep]
        adv_out[idx] = quantise(x[idx], clean_u8[idx], levels, ball)
        pred_out[idx] = pred[keep]
        first[active[fooled].numpy()] = t
        if progress is not None:
            progress(len(active), int((~fooled).sum()))
        active, grad = active[~fooled], grad[~fooled]
        if last or len(active) == 0:
            break
        moved = x[active] + step * grad.sign().cpu()
        x[active] = clip_to_ball(moved, x0[active], eps_used)
    return adv_out, pred_out, first, forwards


def bpda_attack(
    defended: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    levels: int,
    eps: Eps | float | str | None = None,
    *,
    eps_levels: bool = False,
    steps: int = DEFAULT_STEPS,
    alpha: float | None = None,
    eot: int = 1,
    random_start: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> BPDAResult:
    """PGD with straight-through gradients against `defended`, on uint8 `images`.

    `defended` maps float [0, 1] images to logits and must let gradients through (BPDA:
    `PurifiedClassifier` does). `eps` as in `attacks.run_attack`; `alpha` a fraction of
    [0, 1] (default `default_alpha`). `progress(attacked, still_active)` is called after
    every step of every batch: images that step ran on, and how many are not fooled yet.
    Deterministic for a given seed and batch size; the global torch RNG is untouched.
    """
    labels = _check_inputs(images, labels, levels, steps, eot)
    budget = resolve_eps(eps, levels, eps_levels)
    ball = budget.ball
    step = float(alpha) if alpha is not None else \
        default_alpha(level_fraction(ball, levels), steps)
    if not 0 < step <= 1:
        raise UsageError(f"BPDA step size must be in (0, 1], got {step}")
    dev = torch.device(device)
    if isinstance(defended, nn.Module):
        defended.eval()
    n = images.shape[0]
    adv_out = images.clone()
    pred_out = torch.empty(n, dtype=torch.long)
    first = np.full(n, -1, dtype=np.int64)
    forwards = 0
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        adv_out[lo:hi], pred_out[lo:hi], first[lo:hi], used = _pgd_batch(
            defended, images[lo:hi], labels[lo:hi], levels, ball, step, steps, eot,
            random_start, generator, dev, progress)
        forwards += used
    seconds = time.perf_counter() - start
    success = first >= 0
    summary: dict[str, Any] = {
        "method": "bpda",
        "n": int(n),
        "levels": levels,
        "eps": budget.fraction,
        "eps_levels": budget.levels,
        "eps_ball_levels": ball,
        "steps": steps,
        "alpha": step,
        "eot": eot,
        "random_start": random_start,
        "seed": seed,
        "quantised": True,
        "forward_passes": forwards,
        "fooled": int(success.sum()),
        "defended_accuracy": float((pred_out == labels).float().mean()),
        "median_success_step": float(np.median(first[success])) if success.any() else None,
        "seconds": round(seconds, 3),
    }
    return BPDAResult(adv_out, pred_out, first, summary)
