"""Per-image summary statistics of a PixelCNN, all from one forward pass.

DoSE (Morningstar et al., AISTATS 2021) scores an input by how typical a *vector* of
model statistics is, instead of thresholding one of them. Each function here turns the
model's per-pixel outputs into one number per image; `ModelPass` holds what one pass
produces (per-pixel NLL, per-pixel predictive entropy, feature norms) so the statistics
cost no extra model evaluations. Everything is in bits, per image, and works on plain
arrays so each statistic has a test with a known answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .density import LN2
from .models.pixelcnn import PixelCNN
from .precision import autocast


@dataclass
class ModelPass:
    """What one PixelCNN pass over N images yields (CPU, float64 except the maps)."""

    nll: torch.Tensor  # (N, C, H, W) per-sub-pixel NLL in nats
    entropy: torch.Tensor  # (N, C, H, W) entropy of the predicted distribution, nats
    feature_norm: np.ndarray  # (N,) mean L2 norm of the per-pixel context features
    images: torch.Tensor | None = None  # (N, C, H, W) the images themselves, in [0, 1]

    @property
    def pixel_bits(self) -> np.ndarray:
        """(N, H, W) NLL in bits per pixel (channels summed)."""
        return self.nll.double().sum(1).numpy() / LN2

    @property
    def surprise_bits(self) -> np.ndarray:
        """(N, H, W) |NLL - predicted entropy| in bits per pixel (channels summed): how far
        each pixel's surprise is from what the model expected, in either direction. A
        pasted patch shows up here (the model is confidently wrong at its edges and
        unexpectedly certain inside) more than in the NLL itself."""
        return (self.nll.double() - self.entropy.double()).abs().sum(1).numpy() / LN2

    @property
    def bits_per_dim(self) -> np.ndarray:
        n = self.nll.shape[0]
        return self.nll.double().reshape(n, -1).mean(1).numpy() / LN2


@torch.no_grad()
def model_pass(model: PixelCNN, images: torch.Tensor, batch_size: int = 256,
               progress: Callable[[int], None] | None = None,
               precision: str = "fp32") -> ModelPass:
    """Per-pixel NLL and entropy plus feature norms, one forward pass per batch.

    The same logits as `density.nll_map`, in the model's fast channels-last layout (the
    levels contiguous) and a few images per pass (`PixelCNN.images_per_pass`); with
    `precision` bf16/fp16 the network runs under autocast and the rest in float32.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, ent, norms, seen = [], [], [], []
    step = max(1, min(batch_size, model.images_per_pass()))
    for start in range(0, images.shape[0], step):
        chunk = images[start : start + step].to(device)
        n, c, h, w = chunk.shape
        xs = model.scale(chunk)
        with autocast(device, precision):
            ctx = model.context_rows(xs)  # (n H W, head)
            xs_rows = xs.permute(0, 2, 3, 1).reshape(-1, c)
            logits = [model.channel_logits_rows(ctx, xs_rows[:, :ch] if ch else None, ch)
                      for ch in range(c)]
        ctx = ctx.float()
        target = chunk.permute(0, 2, 3, 1).reshape(-1, c).long()
        pixel_nll, pixel_ent = [], []
        for ch in range(c):
            logp = F.log_softmax(logits[ch].float(), dim=-1)
            pixel_nll.append(-logp.gather(1, target[:, ch, None]).squeeze(1))
            pixel_ent.append(-(logp.exp() * logp).sum(1))
        nll.append(_to_images(pixel_nll, n, h, w))
        ent.append(_to_images(pixel_ent, n, h, w))
        norms.append(ctx.view(n, h * w, -1).norm(dim=-1).mean(1).double().cpu())
        seen.append(chunk.float().cpu() / (model.config.levels - 1))
        if progress is not None:
            progress(chunk.shape[0])
    model.train(was_training)
    if not nll:
        c, h, w = model.config.channels, model.config.height, model.config.width
        empty = torch.zeros((0, c, h, w))
        return ModelPass(empty, empty.clone(), np.zeros(0), empty.clone())
    return ModelPass(torch.cat(nll), torch.cat(ent), torch.cat(norms).numpy(), torch.cat(seen))


def _to_images(per_channel: list[torch.Tensor], n: int, h: int, w: int) -> torch.Tensor:
    """Per-channel rows [(n H W,)] -> (n, C, H, W) float32 on the CPU."""
    return torch.stack(per_channel, dim=1).view(n, h, w, -1).permute(0, 3, 1, 2).float().cpu()


def surprise_gap(nll: torch.Tensor, entropy: torch.Tensor) -> np.ndarray:
    """Mean (NLL - predictive entropy) in bits/dim: how much more surprised the model is
    than it *expected* to be. ~0 for data like its training data, whatever the image's
    complexity; positive where the model is confidently wrong (a typicality test per
    pixel, Nalisnick et al. 2019, which bits/dim alone cannot do)."""
    n = nll.shape[0]
    return (nll.double() - entropy.double()).reshape(n, -1).mean(1).numpy() / LN2


def pixel_quantile(pixel_bits: np.ndarray, q: float) -> np.ndarray:
    """q-quantile of per-pixel bits in each image."""
    n = pixel_bits.shape[0]
    return np.quantile(pixel_bits.reshape(n, -1), q, axis=1)


def pixel_spread(pixel_bits: np.ndarray) -> np.ndarray:
    """Standard deviation of per-pixel bits in each image."""
    n = pixel_bits.shape[0]
    return pixel_bits.reshape(n, -1).std(axis=1)


def location_stats(pixel_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-location mean and standard deviation (H, W) of clean per-pixel bits; the std
    is floored at 0.05 bits (a location that is always exactly predictable must not turn
    a tiny deviation into an infinite z-score)."""
    mean = pixel_bits.mean(axis=0)
    std = np.maximum(pixel_bits.std(axis=0), 0.05)
    return mean, std


def window_map(pixel_bits: np.ndarray, mean: np.ndarray, std: np.ndarray,
               k: int) -> np.ndarray:
    """(N, H-k+1, W-k+1) mean z-score of per-pixel bits over every k x k window, where
    z = (bits - clean mean at that location) / clean std at that location."""
    z = (np.asarray(pixel_bits, dtype=np.float64) - mean) / std
    pooled = F.avg_pool2d(torch.from_numpy(z)[:, None], kernel_size=k, stride=1)
    return pooled[:, 0].numpy()


def window_max(pixel_bits: np.ndarray, mean: np.ndarray, std: np.ndarray, k: int) -> np.ndarray:
    """Largest k x k window mean z-score per image: a small local anomaly (a pasted patch,
    a scratch) raises it even when the image's total likelihood barely moves."""
    n = pixel_bits.shape[0]
    return window_map(pixel_bits, mean, std, k).reshape(n, -1).max(axis=1)


def hottest_window(pixel_bits: np.ndarray, mean: np.ndarray, std: np.ndarray,
                   k: int) -> np.ndarray:
    """(N, 4) box (top, left, bottom, right; exclusive ends) of each image's hottest window."""
    wm = window_map(pixel_bits, mean, std, k)
    n, _, ww = wm.shape
    flat = wm.reshape(n, -1).argmax(axis=1)
    top, left = flat // ww, flat % ww
    return np.stack([top, left, top + k, left + k], axis=1)


def grid_means(pixel_bits: np.ndarray, cells: int) -> np.ndarray:
    """(N, cells * cells) mean per-pixel bits in each cell of a cells x cells grid (row by
    row; adaptive pooling, so any image size works): where in the frame the model is
    surprised."""
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(np.asarray(pixel_bits, np.float64))[:, None],
                                   cells)
    return pooled.reshape(len(pixel_bits), -1).numpy()


def mass_moments(mass: np.ndarray) -> np.ndarray:
    """(N, 4) layout of each image's mass map (e.g. per-pixel bits), read as a distribution
    over pixel positions: log(vertical / horizontal variance), the correlation of row and
    column, and the skewness along rows (y) and along columns (x). A 90 degree rotation
    swaps the two variances, flips the correlation's sign and moves the skewness from one
    axis to the other, which the per-cell grid means barely see when the item is
    centred. Positions are in [0, 1]; negative mass is not allowed."""
    m = np.asarray(mass, dtype=np.float64)
    n, h, w = m.shape
    m = m + 1e-12  # an all-zero map is a uniform distribution, not a division by zero
    total = m.sum(axis=(1, 2))
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    py, px = m.sum(2) / total[:, None], m.sum(1) / total[:, None]
    dy, dx = ys[None] - (py @ ys)[:, None], xs[None] - (px @ xs)[:, None]
    var_y, var_x = (py * dy ** 2).sum(1), (px * dx ** 2).sum(1)
    cov = np.einsum("nhw,nh,nw->n", m, dy, dx) / total
    return np.stack([np.log(var_y / var_x), cov / np.sqrt(var_y * var_x),
                     (py * dy ** 3).sum(1) / var_y ** 1.5,
                     (px * dx ** 3).sum(1) / var_x ** 1.5], axis=1)


def principal_subspace(images: torch.Tensor | np.ndarray,
                       rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and the top `rank` principal directions (rank, D) of clean images,
    flattened (D = C * H * W), by SVD: the low-dimensional layout clean images share."""
    flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    mean = flat.mean(axis=0)
    rank = max(0, min(rank, flat.shape[0] - 1, flat.shape[1]))
    _, _, directions = np.linalg.svd(flat - mean, full_matrices=False)
    return mean, directions[:rank]


def residual_window_max(images: torch.Tensor | np.ndarray, mean: np.ndarray,
                        directions: np.ndarray, k: int) -> np.ndarray:
    """Largest k x k window mean of what the clean principal subspace does not explain
    (image minus its projection, channels averaged), signed so that *brighter* than
    explained is positive: a pasted bright patch or object leaves a local excess that no
    combination of clean layouts accounts for, while the model's per-pixel likelihood
    inside a flat patch is unremarkable."""
    x = np.asarray(images, dtype=np.float64)
    n = x.shape[0]
    flat = x.reshape(n, -1) - mean
    resid = (flat - (flat @ directions.T) @ directions).reshape(x.shape).mean(axis=1)
    pooled = F.avg_pool2d(torch.from_numpy(resid)[:, None], kernel_size=k, stride=1)
    return pooled.reshape(n, -1).max(dim=1).values.numpy()
