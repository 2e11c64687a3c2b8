"""PixelDefend purification (Song et al., ICLR 2018): greedy decoding inside an L-inf box.

Sub-pixels are visited in the model's autoregressive order (raster over pixels, channels
0, 1, 2 inside a pixel). Each is set to the value v in [x - eps, x + eps] ∩ [0, levels - 1]
(a box around the *original* value) that maximises p(v | everything already purified);
ties go to the value closest to the original, then to the lower one.

Two implementations give bit-for-bit identical images:

- `purify_reference`: one full forward pass per sub-pixel, in float64. Short and
  obviously correct; it *defines* the result.
- `purify_fast`: a cached decoder (Ramachandran et al. 2017) that runs the vertical stack
  once per row and the horizontal stack and channel head once per pixel, also in float64,
  with the weights pre-arranged as matrices.

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
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet
from .defaults import DEFAULT_BATCH as DEFAULT_BATCH
from .density import bits_per_dim
from .errors import DataError, UsageError
from .models.pixelcnn import PixelCNN

TIE_TOLERANCE = 1e-8
PIXEL_THREADS = 1  # intra-op threads for the per-pixel loop on the CPU (None: leave as is)

# decide(c, i, j, logits (N, levels), x (N, C, H, W) long, current state) -> values (N,) long
Decide = Callable[[int, int, int, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------- helpers


def scaled(x: torch.Tensor, levels: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Integer levels -> network inputs in [-1, 1], like `PixelCNN.scale` but in `dtype`."""
    return x.to(dtype) * (2.0 / (levels - 1)) - 1.0


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


def _check_images(model: PixelCNN, images: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or tuple(images.shape[1:]) != (cfg.channels, cfg.height, cfg.width):
        raise DataError(
            f"images are {tuple(images.shape[1:])} (C,H,W), model expects "
            f"{(cfg.channels, cfg.height, cfg.width)}"
        )
    if images.is_floating_point():
        raise DataError("images must hold integer pixel levels (uint8), not floats")
    if images.numel() and (int(images.min()) < 0 or int(images.max()) >= cfg.levels):
        raise DataError(f"pixel values must lie in [0, {cfg.levels - 1}]")
    return images


def _check_eps(eps_defend: int) -> int:
    if int(eps_defend) != eps_defend or eps_defend < 0:
        raise UsageError(f"--eps-defend must be a non-negative integer (levels), got {eps_defend}")
    return int(eps_defend)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- the fast decoder


class CachedDecoder:
    """Runs a `PixelCNN` one sub-pixel at a time with cached activations.

    Mirrors `PixelCNN.context` / `channel_logits` exactly, with pre-arranged weights:

    - per row i (once rows < i are final): the first vertical conv and every layer's
      vertical conv over the whole row as one matmul of unfolded patches; `v_to_h` of each
      layer (and the horizontal conv's bias) is folded into a per-row, per-pixel `base`;
    - per pixel: the first horizontal conv, then per layer one matmul for the horizontal
      conv over the cached columns j-k//2..j, the gate, one matmul for `h_out`; all skip
      connections at once from a concatenated buffer; the trunk; the channel head.

    The horizontal stack keeps h minus its accumulated `h_out` biases (no per-pixel bias
    adds); the constant that removes is added back through `base` (which knows, per
    column, how many conv taps fall on real pixels rather than zero padding).
    """

    def __init__(self, model: PixelCNN, dtype: torch.dtype = torch.float64,
                 pixel_threads: int | None = PIXEL_THREADS) -> None:
        cfg = model.config
        self.cfg, self.dtype, self.device = cfg, dtype, _device(model)
        self.pixel_threads = pixel_threads if self.device.type == "cpu" else None
        f, c = cfg.filters, cfg.channels
        self.r, self.r0 = cfg.kernel // 2, cfg.first_kernel // 2
        r = self.r

        def p(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=self.device, dtype=dtype)

        def conv_matrix(conv: nn.Conv2d) -> torch.Tensor:
            """(out, in, kh, kw) -> (kh * kw * in, out), rows ordered (row, col, channel)."""
            w = p(conv.weight)
            return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous()

        self.w_in_v, self.b_in_v = conv_matrix(model.in_v), p(model.in_v.bias)
        self.w_in_h, self.b_in_h = conv_matrix(model.in_h), p(model.in_h.bias)
        self.w_in_vh, self.b_in_vh = conv_matrix(model.in_v_to_h), p(model.in_v_to_h.bias)
        self.layers = []
        acc_bias = torch.zeros(f, device=self.device, dtype=dtype)  # sum of h_out biases so far
        for layer in model.layers:
            w_h = conv_matrix(layer.conv_h)  # ((r+1) f, 2f), taps t <-> columns j-r+t
            # conv_h over (h~ + acc_bias) with zero padding = conv_h over h~ + per-column
            # constant: acc_bias times the taps that fall on real columns (j - r + t >= 0)
            per_tap = torch.stack([acc_bias @ w_h[t * f:(t + 1) * f] for t in range(r + 1)])
            corr = torch.stack([
                per_tap[max(0, r - j):].sum(0) for j in range(cfg.width)
            ])  # (W, 2f)
            self.layers.append({
                "w_v": conv_matrix(layer.conv_v), "b_v": p(layer.conv_v.bias),
                "w_vout": conv_matrix(layer.v_out), "b_vout": p(layer.v_out.bias),
                "w_vh": conv_matrix(layer.v_to_h),
                "b_base": p(layer.v_to_h.bias) + p(layer.conv_h.bias),
                "corr": corr,
                "w_h": w_h,
                "w_hout": conv_matrix(layer.h_out),
            })
            acc_bias = acc_bias + p(layer.h_out.bias)
        self.w_skip = torch.cat(
            [conv_matrix(model.in_skip)] + [conv_matrix(layer.h_skip) for layer in model.layers]
        )
        self.b_skip = p(model.in_skip.bias) + sum(p(layer.h_skip.bias) for layer in model.layers)
        self.w_trunk, self.b_trunk = conv_matrix(model.trunk), p(model.trunk.bias)
        self.w_cin = [None] + [conv_matrix(model.channel_in[i]) for i in range(1, c)]
        self.w_mid = [conv_matrix(m) for m in model.channel_mid]
        self.b_mid = [p(m.bias) for m in model.channel_mid]
        self.w_out = [conv_matrix(m) for m in model.channel_out]
        self.b_out = [p(m.bias) for m in model.channel_out]
        self.table = scaled(torch.arange(cfg.levels, device=self.device), cfg.levels, dtype)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, decide: Decide,
            on_row: Callable[[int], None] | None = None,
            timings: dict[str, float] | None = None) -> torch.Tensor:
        """Decode in autoregressive order, writing each decision into `x` (long, modified
        in place; its not-yet-decoded entries are whatever the caller put there) and
        conditioning every later sub-pixel on it. Returns `x`.

        `timings`, if given, accumulates seconds per phase: "rows" (vertical stack),
        "pixels" (horizontal stack, skips, trunk), "head" (channel heads), "decide".
        """
        cfg, dt, dev = self.cfg, self.dtype, self.device
        n, C, H, W = x.shape
        f, r, r0, k, k0 = cfg.filters, self.r, self.r0, cfg.kernel, cfg.first_kernel
        nl = len(self.layers)
        tick = _Ticker(timings)
        # network input, channels-last, padded: rows +r0 on top, cols +r0 both sides;
        # only decided pixels are ever read
        xin = torch.zeros((n, H + r0, W + 2 * r0, C + 1), device=dev, dtype=dt)
        xin[:, r0:, r0:r0 + W, C] = 1.0
        # vertical stack inputs per layer, channels-last, padded: rows +r, cols +r each side
        vbuf = [torch.zeros((n, H + r, W + 2 * r, f), device=dev, dtype=dt) for _ in range(nl)]
        # horizontal stack inputs (minus accumulated biases) of the current row: cols +r;
        # the r padding columns stay zero
        hbuf = [torch.zeros((n, W + r, f), device=dev, dtype=dt) for _ in range(nl)]
        g_all = torch.empty((n, (nl + 1) * f), device=dev, dtype=dt)  # [h0, g_0, ..., g_nl-1]
        h0 = g_all[:, :f]
        for i in range(H):
            # ---------------- vertical stack for row i (rows < i are final)
            if i == 0:
                v = torch.zeros((n * W, f), device=dev, dtype=dt)  # down-shift: zeros
            else:
                patches = xin[:, i - 1:i + r0].unfold(2, k0, 1)  # (n, r0+1, W, C+1, k0)
                patches = patches.permute(0, 2, 1, 4, 3).reshape(n * W, -1)
                v = torch.addmm(self.b_in_v, patches, self.w_in_v)
            vbuf[0][:, i + r, r:r + W] = v.view(n, W, f)
            base0 = torch.addmm(self.b_in_vh, v, self.w_in_vh).view(n, W, f)
            base0[:, 1:] += self.b_in_h  # right-shift: column 0 gets no in_h bias
            base0 = base0.transpose(0, 1).contiguous()  # (W, n, f)
            bases = []
            for li, layer in enumerate(self.layers):
                patches = vbuf[li][:, i:i + r + 1].unfold(2, k, 1)  # (n, r+1, W, f, k)
                patches = patches.permute(0, 2, 1, 4, 3).reshape(n * W, -1)
                v_pre = torch.addmm(layer["b_v"], patches, layer["w_v"])  # (n W, 2f)
                if li + 1 < nl:
                    gv = torch.tanh(v_pre[:, :f]) * torch.sigmoid(v_pre[:, f:])
                    out = torch.addmm(layer["b_vout"], gv, layer["w_vout"]).view(n, W, f)
                    torch.add(vbuf[li][:, i + r, r:r + W], out,
                              out=vbuf[li + 1][:, i + r, r:r + W])
                base = torch.addmm(layer["b_base"], v_pre, layer["w_vh"]).view(n, W, 2 * f)
                bases.append((base + layer["corr"]).transpose(0, 1).contiguous())  # (W, n, 2f)
            tick("rows")
            # ---------------- horizontal stack and head, pixel by pixel
            xrow = xin[:, i + r0]  # (n, W + 2 r0, C + 1)
            with _threads(self.pixel_threads):
                for j in range(W):
                    if j == 0:
                        h0.copy_(base0[0])
                    else:
                        window = xrow[:, j - 1:j + r0].reshape(n, -1)  # columns j-1-r0 .. j-1
                        torch.addmm(base0[j], window, self.w_in_h, out=h0)
                    hbuf[0][:, j + r].copy_(h0)
                    for li, layer in enumerate(self.layers):
                        window = hbuf[li][:, j:j + r + 1].reshape(n, -1)  # columns j-r .. j
                        pre = torch.addmm(bases[li][j], window, layer["w_h"])
                        g = g_all[:, (li + 1) * f:(li + 2) * f]
                        torch.mul(torch.tanh(pre[:, :f]), torch.sigmoid(pre[:, f:]), out=g)
                        if li + 1 < nl:
                            torch.addmm(hbuf[li][:, j + r], g, layer["w_hout"],
                                        out=hbuf[li + 1][:, j + r])
                    skip = torch.addmm(self.b_skip, g_all, self.w_skip)
                    ctx = F.elu(torch.addmm(self.b_trunk, F.elu(skip), self.w_trunk))
                    tick("pixels")
                    for c in range(C):
                        z = ctx if c == 0 else torch.addmm(ctx, xrow[:, j + r0, :c],
                                                           self.w_cin[c])
                        z = F.elu(torch.addmm(self.b_mid[c], F.elu(z), self.w_mid[c]))
                        logits = torch.addmm(self.b_out[c], z, self.w_out[c])
                        tick("head")
                        value = decide(c, i, j, logits, x)
                        x[:, c, i, j] = value
                        xrow[:, j + r0, c] = self.table[value]
                        tick("decide")
            if on_row is not None:
                on_row(i)
        return x


class _Ticker:
    """Accumulates wall time between calls into named buckets; free when disabled."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now


@contextlib.contextmanager
def _threads(n: int | None):
    """Run a block with n intra-op threads: the per-pixel ops are tiny, and on a busy
    machine a second thread waiting at every op's barrier costs more than it gives."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cached_logits(model: PixelCNN, images: torch.Tensor,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits (N, levels, C, H, W) of fixed images through the cached decoder (teacher
    forcing): equal to `model(images)` up to rounding. Tests the caching on its own."""
    images = _check_images(model, images)
    cfg = model.config
    out = torch.empty((images.shape[0], cfg.levels, cfg.channels, cfg.height, cfg.width),
                      dtype=dtype, device=_device(model))
    target = images.to(_device(model)).long()

    def decide(c: int, i: int, j: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out[:, :, c, i, j] = logits
        return target[:, c, i, j]

    CachedDecoder(model, dtype).run(target.clone(), decide)
    return out


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
    images = _check_images(model, images)
    eps = _check_eps(eps_defend)
    if eps == 0 or images.shape[0] == 0:
        return images.to(torch.uint8).clone()
    model64 = float64_copy(model)
    out = []
    for chunk in _chunks(images, batch_size):
        orig = chunk.to(_device(model)).long()
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
        self._window = torch.empty(0, dtype=torch.long)
        self._outside = torch.empty(0, dtype=torch.bool)

    def _build_row(self, i: int) -> None:
        """Per sub-pixel of row i: the window's values (C, W, N, K) and which of them
        fall outside the box."""
        o = self.orig[:, :, i, :].permute(1, 2, 0).unsqueeze(-1)  # (C, W, N, 1)
        start = (o - self.eps).clamp(0, self.levels - self.width)
        self._window = start + torch.arange(self.width, device=o.device)
        self._outside = (self._window < o - self.eps) | (self._window > o + self.eps)
        self._row = i

    def __call__(self, c: int, i: int, j: int, logits: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:
        if self._row != i:
            self._build_row(i)
        window = self._window[c, j]
        cand = logits.gather(1, window).masked_fill_(self._outside[c, j], float("-inf"))
        top = cand.topk(2, dim=1)
        best = top.values[:, 0]
        close = (best - top.values[:, 1]) <= TIE_TOLERANCE * (1.0 + best.abs())
        value = window.gather(1, top.indices[:, :1]).squeeze(1)
        if bool(close.any()):
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
    images = _check_images(model, images)
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


# --------------------------------------------------------------------------- sampler


def sample(model: PixelCNN, n: int, generator: torch.Generator | None = None,
           temperature: float = 1.0, batch_size: int = 256,
           progress: Callable[[], None] | None = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw n images (uint8, (n, C, H, W)) from the model with the cached decoder.

    `temperature` < 1 sharpens each conditional; draws use `generator` (a CPU generator)
    so a seed reproduces the images. `progress()` is called after each image row of each
    batch of `batch_size` images (H calls when n <= batch_size)."""
    if n < 0:
        raise UsageError("the number of samples must be non-negative")
    if temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {temperature}")
    cfg = model.config
    decoder = CachedDecoder(model, dtype)

    def decide(c: int, i: int, j: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.double() / temperature, dim=1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(x.device)

    def on_row(_i: int) -> None:
        if progress is not None:
            progress()

    parts = []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        x = torch.zeros((k, cfg.channels, cfg.height, cfg.width), dtype=torch.long,
                        device=decoder.device)
        parts.append(decoder.run(x, decide, on_row=on_row).to(torch.uint8).cpu())
    if not parts:
        return torch.zeros((0, cfg.channels, cfg.height, cfg.width), dtype=torch.uint8)
    return torch.cat(parts)


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
    images = _check_images(model, images).to(torch.uint8).cpu()
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
    """A drop-in classifier that purifies its inputs first (PixelDefend as a model).

    Takes float images in [0, 1] (N, C, H, W), quantises them to the detector's levels,
    purifies them (adaptively if asked) and returns the classifier's logits. Purification
    is a straight-through step: forward = classifier(purified), backward = identity, which
    is BPDA (Athalye et al. 2018), so gradient attacks run through it unchanged.
    """

    def __init__(self, detector: Any, classifier: Any, eps_defend: int,
                 adaptive: bool | float = False, batch_size: int = DEFAULT_BATCH) -> None:
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
        self.batch_size = batch_size
        self.levels = model.config.levels
        self.last_result: PurifyResult | None = None
        _threshold(det, adaptive)  # fail early when adaptive lacks a threshold

    def quantise(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] floats -> uint8 levels: round(x * (levels - 1))."""
        return torch.round(x.detach().clamp(0.0, 1.0) * (self.levels - 1)).to(torch.uint8)

    def purify_floats(self, x: torch.Tensor) -> torch.Tensor:
        """Purified images as floats in [0, 1], no gradient."""
        with torch.no_grad():
            q = self.quantise(x).cpu()
            result = purify(self.detector, q, self.eps_defend, adaptive=self.adaptive,
                            batch_size=self.batch_size)
            self.last_result = result
            return result.images.to(device=x.device, dtype=x.dtype) / (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        purified = self.purify_floats(x)
        return self.classifier(x + (purified - x).detach())
