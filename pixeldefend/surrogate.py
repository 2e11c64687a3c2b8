"""A differentiable surrogate of the PixelDefend purifier, for adaptive attacks.

The exact purifier (`purify.purify_fast`) is a greedy decoder: each sub-pixel, in raster
order, becomes the value in the eps_defend box around the *input's* value that the PixelCNN
finds most likely given the sub-pixels already purified. It is piecewise constant in its
input, so it has no useful gradient; identity-BPDA then sees only the classifier.

The surrogate replaces the sequential decoder by parallel (teacher-forced) PixelCNN passes:

    z_0 = x;   z_{k+1}[s] = sum_v v * softmax_{v in box(x[s])}(logits_s(z_k) / T)

One pass conditions every sub-pixel on the *unpurified* past; each further pass conditions
on the previous pass's (soft) output. With T -> 0 a pass is the box-restricted argmax (the
purifier's own decision rule, `purify.choose`, ties included), and the hard iteration has a
property worth stating: **any fixed point of it is the greedy decoder's output** (by
induction over the raster order: sub-pixel 0 depends on nothing, so it is decided exactly
at the first pass; sub-pixel s only depends on sub-pixels < s). It reaches that fixed point
in at most C*H*W passes, in practice in a handful, so `hard_fixed_point` is an exact,
parallel purifier and a check on the surrogate, and `agreement` measures how close the
soft, few-pass version is to the exact one.

Gradients flow into x through the context of every pass (the box itself is piecewise
constant in x, like the purifier). `SoftPurifier(..., straight_through=True)` returns the
exact purified image on the forward pass and the surrogate's gradient on the backward pass:
BPDA with this surrogate instead of the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .density import bits_per_dim
from .purify import DEFAULT_BATCH, choose, purify_fast, scaled

DEFAULT_TEMPERATURE = 0.5
DEFAULT_PASSES = 2
DEFAULT_BOX_SOFTNESS = 0.0


def _box(centre: torch.Tensor, eps_defend: int, levels: int) -> torch.Tensor:
    """(N, C, H, W, levels) bool: values within eps_defend of the (integer) centre."""
    v = torch.arange(levels, device=centre.device)
    c = centre.long().unsqueeze(-1)
    return (v >= c - eps_defend) & (v <= c + eps_defend)


def _logits(model: nn.Module, z: torch.Tensor, levels: int) -> torch.Tensor:
    """PixelCNN logits of soft levels z (N, C, H, W) -> (N, C, H, W, levels)."""
    xs = z * (2.0 / (levels - 1)) - 1.0
    return model.logits_from_scaled(xs).permute(0, 2, 3, 4, 1)


def soft_purify_levels(model: nn.Module, u: torch.Tensor, eps_defend: int,
                       temperature: float = DEFAULT_TEMPERATURE,
                       passes: int = DEFAULT_PASSES, start: torch.Tensor | None = None,
                       box_softness: float = DEFAULT_BOX_SOFTNESS) -> torch.Tensor:
    """Soft purification of images `u` given as float *levels* (N, C, H, W), differentiable.

    Each of `passes` teacher-forced passes replaces every sub-pixel by the expected level
    under the box-restricted softmax at `temperature` of the PixelCNN conditioned on the
    last pass, starting from `start` (default: u itself; BPDA-surrogate starts from the
    exact purified image, which the hard pass maps to itself). The box is the purifier's
    [round(u) - eps, round(u) + eps]; with `box_softness` > 0 (in levels) its edges are
    log-sigmoid ramps around u, so the output also depends smoothly on where the box
    sits (the only way the exact purifier depends on x)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    levels = model.config.levels
    centre = torch.round(u.detach()).clamp(0, levels - 1)
    inbox = _box(centre, eps_defend, levels)
    values = torch.arange(levels, device=u.device, dtype=u.dtype)
    edge = None
    if box_softness > 0:
        # the two values just outside the box get a log-sigmoid penalty that shrinks as
        # u moves towards them; values inside get none, so at low temperature the
        # argmax is the purifier's
        uu = u.unsqueeze(-1)
        lo, hi = uu - eps_defend - 0.5, uu + eps_defend + 0.5
        ramp = (F.logsigmoid((values - lo) / box_softness)
                + F.logsigmoid((hi - values) / box_softness))
        edge = torch.where(inbox, torch.zeros_like(ramp), ramp)
        inbox = _box(centre, eps_defend + 1, levels)
    z = u if start is None else start
    for _ in range(max(1, passes)):
        logits = _logits(model, z, levels).to(u.dtype)
        if edge is not None:
            logits = logits + edge
        logits = logits.masked_fill(~inbox, float("-inf"))
        z = (torch.softmax(logits / temperature, dim=-1) * values).sum(-1)
    return z


@torch.no_grad()
def hard_pass(model: nn.Module, z: torch.Tensor, centre: torch.Tensor,
              eps_defend: int) -> torch.Tensor:
    """One teacher-forced pass with the purifier's own rule (`purify.choose`): every
    sub-pixel's box-restricted argmax given z. Integer levels in and out (long)."""
    levels = model.config.levels
    dtype = next(model.parameters()).dtype
    logits = model.logits_from_scaled(scaled(z, levels, dtype))  # (N, L, C, H, W)
    flat = logits.permute(0, 2, 3, 4, 1).reshape(-1, levels)
    return choose(flat, centre.reshape(-1), eps_defend).view_as(z)


@torch.no_grad()
def hard_fixed_point(model: nn.Module, images: torch.Tensor, eps_defend: int,
                     max_passes: int | None = None) -> tuple[torch.Tensor, int]:
    """Iterate `hard_pass` from the input until nothing changes: the greedy decoder's
    output (see the module docstring), computed in parallel. Returns (uint8 images,
    passes run). `max_passes` (default C*H*W, the worst case) caps the iteration; then the
    result is exact only for a prefix of the raster order."""
    cap = max_passes or int(images[0].numel()) + 1
    centre = images.long()
    z = centre.clone()
    for k in range(1, cap + 1):
        new = hard_pass(model, z, centre, eps_defend)
        if torch.equal(new, z):
            return new.to(torch.uint8), k
        z = new
    return z.to(torch.uint8), cap


class SoftPurifier(nn.Module):
    """Float [0, 1] images -> purified float [0, 1] images, differentiable (the surrogate).

    `straight_through=True`: forward is the *exact* purifier (`purify_fast`, optionally
    only above a bits/dim `threshold`, i.e. adaptive PixelDefend), backward is the
    surrogate's gradient (BPDA with a learned-model relaxation instead of the identity).
    """

    def __init__(self, model: nn.Module, eps_defend: int,
                 temperature: float = DEFAULT_TEMPERATURE, passes: int = DEFAULT_PASSES,
                 straight_through: bool = False, batch_size: int = DEFAULT_BATCH,
                 threshold: float | None = None,
                 box_softness: float = DEFAULT_BOX_SOFTNESS) -> None:
        super().__init__()
        self.density = model
        self.eps_defend = int(eps_defend)
        self.temperature = temperature
        self.passes = passes
        self.straight_through = straight_through
        self.batch_size = batch_size
        self.threshold = threshold
        self.box_softness = box_softness
        self.levels = model.config.levels
        for p in model.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x * (self.levels - 1)
        if not self.straight_through:
            soft = soft_purify_levels(self.density, u, self.eps_defend, self.temperature,
                                      self.passes, box_softness=self.box_softness)
            return soft / (self.levels - 1)
        with torch.no_grad():
            q = torch.round(u.detach().clamp(0, self.levels - 1)).to(torch.uint8).cpu()
            exact = q.clone()
            chosen = torch.arange(q.shape[0])
            if self.threshold is not None:
                bpd = bits_per_dim(self.density, q, max(self.batch_size, 1))
                chosen = torch.nonzero(bpd > self.threshold).flatten()
            if len(chosen):
                exact[chosen] = purify_fast(self.density, q[chosen], self.eps_defend,
                                            self.batch_size)
            exact = exact.to(device=x.device, dtype=x.dtype)
            self.purified_last = chosen
        # the context starts at the exact output (a fixed point of the hard pass), with
        # the identity from it back to x, so the forward agrees with the purifier
        start = u + (exact - u).detach()
        soft = soft_purify_levels(self.density, u, self.eps_defend, self.temperature,
                                  self.passes, start=start, box_softness=self.box_softness)
        if self.threshold is not None:  # images under the threshold pass untouched
            mask = torch.zeros(u.shape[0], dtype=torch.bool, device=u.device)
            mask[chosen.to(u.device)] = True
            soft = torch.where(mask.view(-1, 1, 1, 1), soft, u)
        return (soft + (exact - soft).detach()) / (self.levels - 1)


@dataclass
class Agreement:
    """How close the surrogate is to the exact purifier on some images."""

    subpixels: float  # fraction of sub-pixels where round(surrogate) == exact
    changed_subpixels: float  # same, among sub-pixels the exact purifier changed
    classifier: float | None  # fraction of images with the same predicted class
    passes: int
    temperature: float
    n: int
    anchored: bool = False

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


def agreement(model: nn.Module, images: torch.Tensor, eps_defend: int,
              temperature: float = DEFAULT_TEMPERATURE, passes: int = DEFAULT_PASSES,
              classifier: nn.Module | None = None, exact: torch.Tensor | None = None,
              batch_size: int = DEFAULT_BATCH, anchored: bool = False,
              box_softness: float = DEFAULT_BOX_SOFTNESS) -> Agreement:
    """Compare round(soft surrogate) with the exact purifier on uint8 `images`.
    `anchored`: the passes start from the exact output (the BPDA-surrogate forward)
    rather than from the input (the full-gradient surrogate)."""
    levels = model.config.levels
    if exact is None:
        exact = purify_fast(model, images, eps_defend, batch_size)
    parts = []
    with torch.no_grad():
        for lo in range(0, images.shape[0], batch_size):
            u = images[lo:lo + batch_size].float()
            start = exact[lo:lo + batch_size].float() if anchored else None
            parts.append(torch.round(soft_purify_levels(
                model, u, eps_defend, temperature, passes, start=start,
                box_softness=box_softness)).to(torch.uint8))
    soft = torch.cat(parts)
    same = soft == exact
    changed = exact != images
    cls = None
    if classifier is not None:
        with torch.no_grad():
            a = classifier(soft.float() / (levels - 1)).argmax(1)
            b = classifier(exact.float() / (levels - 1)).argmax(1)
        cls = float((a == b).float().mean())
    return Agreement(
        subpixels=float(same.float().mean()),
        changed_subpixels=float(same[changed].float().mean()) if changed.any() else 1.0,
        classifier=cls, passes=passes, temperature=temperature, n=int(images.shape[0]),
        anchored=anchored)
