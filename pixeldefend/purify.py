"""PixelDefend purification (Song et al., ICLR 2018): greedy decoding inside an L-inf box.

Sub-pixels are visited in the model's autoregressive order (raster over pixels, channels
0, 1, 2 inside a pixel). Each is set to the value v in [x - eps, x + eps] ∩ [0, levels - 1]
(a box around the *original* value) that maximises p(v | everything already purified);
ties go to the value closest to the original, then to the lower one.

Two implementations give bit-for-bit identical images:

- `purify_reference`: one full forward pass per sub-pixel, in float64. Short and
  obviously correct; it *defines* the result.
- `purify_fast`: the cached decoder (`models.decoder`, Ramachandran et al. 2017) that
  runs the vertical stack once per row and the horizontal stack and channel head once per
  pixel, also in float64, with the weights pre-arranged as matrices.

Why the results are identical, not merely close: the fast decoder's logits differ from
the reference's only by float64 rounding (measured below 1e-12; see tests). A decision is
the argmax over the box, so it can only differ when the best and second-best logits are
within that rounding. The fast decoder therefore accepts its own argmax only when the
margin exceeds `TIE_TOLERANCE * (1 + |best logit|)` (1e-8: four orders of magnitude above
the observed error); otherwise, for that sub-pixel, it recomputes the logits with exactly
the reference's call (same function, same float64 model, same batch tensor: purified
past, original future) and applies the same tie rule. By induction over sub-pixels both
see the same purified past, so every decision, and hence the output, is identical. The
fallback is rare (exact or 1e-8-near ties) and is counted in `PurifyResult.fallbacks`.
Both implementations must be given the same batches (same `batch_size`) for the
fallback to be bit-exact, which `purify` guarantees.

Why the fast decoder is not float32: a float32 decision could only be trusted where its
margin exceeds a proven bound on the float32 error. The rigorous first-order forward
error bound (`models.error_bound`) is 1e4 (random `small` model) to 1e11 (Fashion-MNIST
model) against measured errors of 2e-7 to 3e-5 and box margins around 3e-2: it certifies
no decision at all (docs/PURIFICATION.md), so every one would fall back to float64.

`purify_single_pass` is IBM ART's one-pass approximation (every sub-pixel decided from
one forward pass on the *unpurified* image): inexact, kept only so `pixeldefend bench`
can show what the exact algorithm costs next to it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import ImageSet
from .defaults import DEFAULT_BATCH as DEFAULT_BATCH
from .density import bits_per_dim
from .errors import UsageError
from .models.decoder import CachedDecoder as CachedDecoder
from .models.decoder import cached_logits as cached_logits
from .models.decoder import sample as sample
from .models.pixelcnn import PixelCNN
from .models.pixelcnn import scaled as scaled
from .pixels import model_device, to_float, to_levels

TIE_TOLERANCE = 1e-8

# ------------------------------------------------------------------------- helpers


def float64_copy(model: PixelCNN) -> PixelCNN:
    """A float64 twin of the model: decisions in float64 make near-ties vanishingly rare."""
    return copy.deepcopy(model).to(torch.float64).eval()


def reference_logits(model64: PixelCNN, x: torch.Tensor, c: int, i: int, j: int) -> torch.Tensor:
    """Logits (N, levels) of sub-pixel (c, i, j) from one full float64 forward pass.

    The single definition of the reference's numbers: the fast decoder calls exactly this
    on near-ties, so both see bit-identical logits there."""
    return model64.logits_from_scaled(scaled(x, model64.config.levels))[:, :, c, i, j]


def box_mask(orig: torch.Tensor, eps: int, levels: int) -> torch.Tensor:
    """(N, levels) bool: which values lie in [orig - eps, orig + eps]."""
    v = torch.arange(levels, device=orig.device)
    o = orig.long().unsqueeze(-1)
    return (v >= o - eps) & (v <= o + eps)


def choose(logits: torch.Tensor, orig: torch.Tensor, eps: int) -> torch.Tensor:
    """The purification rule for one sub-pixel: argmax of the logits inside the box;
    exact ties -> closest to the original value, then the lower value. Returns (N,) long.

    (argmax of p(v | past) is argmax of the logits: the softmax normaliser is shared.)"""
    levels = logits.shape[1]
    orig = orig.long()
    inbox = box_mask(orig, eps, levels)
    masked = logits.masked_fill(~inbox, float("-inf"))
    best = masked.max(dim=1, keepdim=True).values
    v = torch.arange(levels, device=logits.device)
    o = orig.unsqueeze(1)
    key = (v - o).abs() * 2 + (v > o).long()  # distance, then lower first
    key = key.masked_fill(~(inbox & (masked == best)), 4 * levels)
    return key.argmin(dim=1)


def default_eps_defend(levels: int) -> int:
    """The paper's eps_defend = 16 (of 255 levels) scaled to the model's levels, at least 1."""
    return max(1, round(16 * (levels - 1) / 255))


def _check_eps(eps_defend: int) -> int:
    if int(eps_defend) != eps_defend or eps_defend < 0:
        raise UsageError(f"eps_defend must be a non-negative integer (levels), got {eps_defend}",
                         param="eps_defend")
    return int(eps_defend)


# ----------------------------------------------------------------------- purifiers


def _chunks(images: torch.Tensor, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


def reference_steps(model64: PixelCNN, x: torch.Tensor, orig: torch.Tensor,
                    eps: int) -> Iterator[None]:
    """The reference algorithm, one sub-pixel per step: `x` (long, starting as a copy of
    `orig`) is updated in place. A generator so `pixeldefend bench` can time a few steps."""
    cfg = model64.config
    for i in range(cfg.height):
        for j in range(cfg.width):
            for c in range(cfg.channels):
                logits = reference_logits(model64, x, c, i, j)
                x[:, c, i, j] = choose(logits, orig[:, c, i, j], eps)
                yield


@torch.inference_mode()
def purify_reference(model: PixelCNN, images: torch.Tensor, eps_defend: int,
                     batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """Purify by brute force: one full float64 forward pass per sub-pixel. Returns uint8."""
    images = model.check_images(images)
    eps = _check_eps(eps_defend)
    if eps == 0 or images.shape[0] == 0:
        return images.to(torch.uint8).clone()
    model64 = float64_copy(model)
    out = []
    for chunk in _chunks(images, batch_size):
        orig = chunk.to(model_device(model)).long()
        x = orig.clone()
        for _ in reference_steps(model64, x, orig, eps):
            pass
        out.append(x.to(torch.uint8).cpu())
    return torch.cat(out)


class _FastPurifyDecision:
    """The fast decoder's decision: its own argmax when clearly unique, else the
    reference's logits and rule (see the module docstring). Counts the fallbacks.

    Only a window of K = min(2 eps + 1, levels) consecutive values that contains the box
    is looked at (built once per row), so the top-2 search is over K values, not levels.
    """

    def __init__(self, model: PixelCNN, orig: torch.Tensor, eps: int) -> None:
        self.model, self.orig, self.eps = model, orig, eps
        self.levels = model.config.levels
        self.width = min(2 * eps + 1, self.levels)
        self.model64: PixelCNN | None = None
        self.fallbacks = 0
        self._row = -1
        self._start = self._window = torch.empty(0, dtype=torch.long)
        self._outside = torch.empty(0, dtype=torch.bool)
        self._clipped: list[list[bool]] = []

    def _build_row(self, i: int) -> None:
        """Per sub-pixel of row i: the window's first value (C, W, N, 1), its values
        (C, W, N, K) and which of them fall outside the box."""
        o = self.orig[:, :, i, :].permute(1, 2, 0).unsqueeze(-1)  # (C, W, N, 1)
        self._start = (o - self.eps).clamp(0, self.levels - self.width)
        window = self._start + torch.arange(self.width, device=o.device)
        self._outside = (window < o - self.eps) | (window > o + self.eps)
        self._window = window
        # per (c, j): does any image's window reach outside its box (only near 0 and
        # levels - 1)? If not, the mask is skipped
        self._clipped = self._outside.flatten(2).any(2).tolist()
        self._row = i

    def __call__(self, c: int, i: int, j: int, logits: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
        if self._row != i:
            self._build_row(i)
        # best and second best in the box with a few cheap kernels (topk is slower)
        cand = logits.gather(1, self._window[c, j])
        if self._clipped[c][j]:
            cand.masked_fill_(self._outside[c, j], float("-inf"))
        best, pos = cand.max(dim=1, keepdim=True)
        second = cand.scatter_(1, pos, float("-inf")).amax(dim=1, keepdim=True)
        value = (self._start[c, j] + pos).squeeze(1)
        # one conservative test for the whole batch first, the per-image test only if
        # it fails: margin > TIE_TOLERANCE * (1 + |best|) for every image
        gap = best - second
        if float(gap.min()) > TIE_TOLERANCE * (1.0 + float(best.abs().max())):
            return value
        close = (gap <= TIE_TOLERANCE * (1.0 + best.abs())).squeeze(1)
        if self.model64 is None:
            self.model64 = float64_copy(self.model)
        ref = reference_logits(self.model64, x, c, i, j)
        idx = close.nonzero().squeeze(1)
        value[idx] = choose(ref[idx], self.orig[idx, c, i, j], self.eps)
        self.fallbacks += int(idx.numel())
        return value


def purify_fast(model: PixelCNN, images: torch.Tensor, eps_defend: int,
                batch_size: int = DEFAULT_BATCH,
                stats: dict[str, Any] | None = None,
                timings: dict[str, float] | None = None) -> torch.Tensor:
    """Purify with the cached decoder; bit-for-bit equal to `purify_reference` with the
    same `batch_size`. Returns uint8. `stats["fallbacks"]` counts near-tie decisions
    settled by the reference's own computation; `timings` accumulates seconds per phase
    (see `CachedDecoder.run`)."""
    images = model.check_images(images)
    eps = _check_eps(eps_defend)
    fallbacks = 0
    if eps == 0 or images.shape[0] == 0:
        out = images.to(torch.uint8).clone()
    else:
        decoder = CachedDecoder(model, torch.float64)
        parts = []
        for chunk in _chunks(images, batch_size):
            orig = chunk.to(decoder.device).long()
            decision = _FastPurifyDecision(model, orig, eps)
            parts.append(decoder.run(orig.clone(), decision, timings=timings)
                         .to(torch.uint8).cpu())
            fallbacks += decision.fallbacks
        out = torch.cat(parts)
    if stats is not None:
        stats["fallbacks"] = stats.get("fallbacks", 0) + fallbacks
    return out


def box_argmax(logits: torch.Tensor, orig: torch.Tensor, eps: int,
               dim: int = 1) -> torch.Tensor:
    """`choose` for many sub-pixels at once, looking only at the K = min(2 eps + 1,
    levels) values of a window that contains each box: `logits` has the levels along
    `dim`, `orig` is the same shape without it. Same rule, same result as `choose`."""
    levels = logits.shape[dim]
    k = min(2 * eps + 1, levels)
    o = orig.long().unsqueeze(dim)
    shape = [1] * logits.dim()
    shape[dim] = k
    v = (o - eps).clamp(0, levels - k) + torch.arange(k, device=o.device).view(shape)
    inbox = (v - o).abs() <= eps
    cand = logits.gather(dim, v).masked_fill_(~inbox, float("-inf"))
    best = cand.amax(dim, keepdim=True)
    key = ((v - o).abs() * 2 + (v > o).long()).masked_fill_(~(inbox & (cand == best)),
                                                            4 * levels)
    return v.gather(dim, key.argmin(dim, keepdim=True)).squeeze(dim)


@torch.inference_mode()
def purify_single_pass(model: PixelCNN, images: torch.Tensor, eps_defend: int,
                       batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """NOT PixelDefend: the one-pass approximation of IBM ART's `PixelDefend`
    preprocessor, for comparison only (`pixeldefend bench` times it). One forward pass
    of the model on the *unpurified* images, then every sub-pixel independently set to
    the box argmax of its conditional (`choose`'s rule). Each conditional sees the
    original earlier pixels, not the purified ones, so the result differs from
    `purify_reference` wherever an earlier decision changed a value. Returns uint8."""
    images = model.check_images(images)
    eps = _check_eps(eps_defend)
    if eps == 0 or images.shape[0] == 0:
        return images.to(torch.uint8).clone()
    was_training = model.training
    model.eval()  # inference semantics (no dropout), as in the exact purifiers
    try:
        out = []
        for chunk in _chunks(images, batch_size):
            x = chunk.to(model_device(model))
            out.append(box_argmax(model(x), x, eps).to(torch.uint8).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------- high-level API


@dataclass
class PurifyResult:
    """Purified images and what happened to each."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    purified: np.ndarray  # bool (N,): went through the purifier (adaptive may skip some)
    bpd_before: np.ndarray  # float64 (N,)
    bpd_after: np.ndarray  # float64 (N,): equal to bpd_before where not purified
    changed: np.ndarray  # int64 (N,): sub-pixels whose value changed
    threshold: float | None  # adaptive threshold in bits/dim, None when not adaptive
    fallbacks: int = 0  # near-tie decisions settled by the reference computation

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _resolve(model_or_detector: Any) -> tuple[PixelCNN, Any]:
    if isinstance(model_or_detector, PixelCNN):
        return model_or_detector, None
    model = getattr(model_or_detector, "model", None)
    if isinstance(model, PixelCNN):
        return model, model_or_detector
    raise UsageError("purify needs a PixelCNN or a DensityDetector with a model")


def _threshold(detector: Any, adaptive: bool | float | None) -> float | None:
    if adaptive is None or adaptive is False:
        return None
    if adaptive is True:
        threshold = getattr(detector, "bpd_threshold", None) if detector is not None else None
        if threshold is None:
            raise UsageError(
                "adaptive purification needs a calibrated threshold: run "
                "`pixeldefend calibrate` on the model, or pass a threshold in bits/dim"
            )
        return float(threshold)
    return float(adaptive)


def purify(model_or_detector: Any, images: torch.Tensor | np.ndarray | ImageSet,
           eps_defend: int,
           adaptive: bool | float | None = None, fast: bool = True,
           batch_size: int = DEFAULT_BATCH,
           progress: Callable[[int], None] | None = None) -> PurifyResult:
    """PixelDefend: score, purify (all images, or with `adaptive` only those whose bits/dim
    exceed the detector's calibrated threshold (True) or a given threshold (float)), and
    score again.

    `model_or_detector`: a `PixelCNN` or a `DensityDetector`. `images`: uint8 (N, C, H, W)
    in [0, levels-1]. `progress(k)` is called as each batch of k images is done."""
    model, detector = _resolve(model_or_detector)
    if isinstance(images, ImageSet):
        images = images.images
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    images = model.check_images(images).to(torch.uint8).cpu()
    eps = _check_eps(eps_defend)
    threshold = _threshold(detector, adaptive)
    n = images.shape[0]
    score_batch = getattr(detector, "batch_size", 256) if detector is not None else 256
    before = bits_per_dim(model, images, score_batch).numpy() if n else np.zeros(0)
    selected = np.ones(n, dtype=bool) if threshold is None else before > threshold
    out = images.clone()
    after = before.copy()
    stats: dict[str, Any] = {"fallbacks": 0}
    index = torch.from_numpy(np.flatnonzero(selected))
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        chunk = images[idx]
        if fast:
            done = purify_fast(model, chunk, eps, batch_size, stats)
        else:
            done = purify_reference(model, chunk, eps, batch_size)
        out[idx] = done
        if progress is not None:
            progress(len(idx))
    if len(index):
        after[index.numpy()] = bits_per_dim(model, out[index], score_batch).numpy()
    if progress is not None and n > len(index):
        progress(n - len(index))
    changed = (out != images).flatten(1).sum(1).numpy().astype(np.int64) if n else \
        np.zeros(0, dtype=np.int64)
    return PurifyResult(images=out, purified=selected, bpd_before=before, bpd_after=after,
                        changed=changed, threshold=threshold, fallbacks=stats["fallbacks"])


class PurifiedClassifier(nn.Module):
    """A drop-in classifier that purifies its inputs first: PixelDefend as a model, and the
    defended model BPDA attacks (the one class for both; `StraightThroughPurifier` is
    its old BPDA name).

    Takes float images in [0, 1] (N, C, H, W), rounds them to the density model's levels,
    purifies them (with `adaptive`: only images above the detector's calibrated threshold
    (True) or a given threshold in bits/dim (a float)) and returns the classifier's
    logits. `straight_through` (default): forward = classifier(purified), backward =
    identity through rounding and purification, which is BPDA (Athalye et al. 2018), so
    gradient attacks run through it; False stops the gradient at the purifier (the
    obfuscated gradient an oblivious attacker sees).

    `keep_result` (default) runs the full `purify` and keeps its `PurifyResult` (bits/dim
    before and after) in `last_result`; False scores bits/dim only when adaptive
    purification needs them to choose the images, which halves the cost of a step inside
    an attack loop. Both compute the same logits. `purified_last` counts the images the
    last forward pass purified.
    """

    def __init__(self, detector: Any, classifier: Any, eps_defend: int,
                 adaptive: bool | float | None = False, batch_size: int = DEFAULT_BATCH,
                 *, straight_through: bool = True, keep_result: bool = True) -> None:
        super().__init__()
        model, det = _resolve(detector)
        self.detector = det if det is not None else detector
        self.density = model  # registered so .to()/.eval() and parameters() see it
        inner = getattr(classifier, "model", classifier)
        if not isinstance(inner, nn.Module):
            raise UsageError("classifier must be an nn.Module or a LoadedClassifier")
        self.classifier = inner
        self.eps_defend = _check_eps(eps_defend)
        self.adaptive = adaptive
        self.threshold = _threshold(det, adaptive)  # fails early without a threshold
        self.batch_size = batch_size
        self.levels = model.config.levels
        self.straight_through = straight_through
        self.keep_result = keep_result
        self.last_result: PurifyResult | None = None
        self.purified_last: int = 0

    def quantise(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] floats -> uint8 levels: round(x * (levels - 1))."""
        return to_levels(x, self.levels)

    def purify_levels(self, q: torch.Tensor) -> torch.Tensor:
        """uint8 levels (CPU) -> purified uint8 levels (only those above the threshold)."""
        if self.keep_result:
            result = purify(self.detector, q, self.eps_defend, adaptive=self.threshold,
                            batch_size=self.batch_size)
            self.last_result = result
            self.purified_last = int(result.purified.sum())
            return result.images
        out = q.clone()
        if self.threshold is None:
            chosen = torch.arange(q.shape[0])
        else:
            score_batch = getattr(self.detector, "batch_size", 256)
            bpd = bits_per_dim(self.density, q, score_batch)
            chosen = torch.from_numpy(np.flatnonzero(bpd.numpy() > self.threshold))
        if len(chosen):
            out[chosen] = purify_fast(self.density, q[chosen], self.eps_defend,
                                      self.batch_size)
        self.purified_last = int(len(chosen))
        return out

    def purify_floats(self, x: torch.Tensor) -> torch.Tensor:
        """Purified images as floats in [0, 1], no gradient."""
        with torch.no_grad():
            purified = self.purify_levels(self.quantise(x).cpu())
            return to_float(purified, self.levels, x.dtype).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        purified = self.purify_floats(x)
        if not self.straight_through:
            return self.classifier(purified)
        return self.classifier(x + (purified - x).detach())


class StraightThroughPurifier(PurifiedClassifier):
    """The BPDA target under its old name and signature: a `PurifiedClassifier` that
    purifies everything (or, given `threshold` in bits/dim, only the images above it)
    and does not rescore, for attack loops."""

    def __init__(self, model: nn.Module, classifier: nn.Module, eps_defend: int,
                 threshold: float | None = None, batch_size: int = DEFAULT_BATCH) -> None:
        super().__init__(model, classifier, eps_defend, adaptive=threshold,
                         batch_size=batch_size, keep_result=False)
