"""Gated PixelCNN with an exact categorical likelihood over discrete pixel levels.

Autoregressive order: pixels in raster order (row by row, left to right), and inside a
pixel the channels in order (R, then G, then B). The model factorises

    p(x) = prod_{i,j} prod_c p(x[c,i,j] | pixels before (i,j), channels < c of (i,j))

and is built in two parts so that each factor's dependencies are explicit:

1. A *context* network computes, for every pixel, a feature vector that depends only on
   strictly earlier pixels. It has two stacks (van den Oord et al. 2016, "Conditional
   Image Generation with PixelCNN Decoders"): a vertical stack whose features at row i
   see only rows < i (down-shifted convolutions), and a horizontal stack whose features at
   (i, j) see only columns < j of row i plus the vertical stack: together no blind spot.
   Layers are gated (tanh * sigmoid) with residual and skip connections.
2. A per-pixel *channel head* turns the context into logits for channel c, conditioned on
   the values of channels < c of the same pixel (1x1 convolutions only), giving R->G->B.

All convolutions are unpadded `nn.Conv2d` with explicit `F.pad`, so a fast decoder can
re-run single rows or single pixels with the same weights (see `pixeldefend.purify`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..defaults import PIXELCNN_PRESETS as PRESETS


@dataclass(frozen=True)
class PixelCNNConfig:
    """Everything needed to rebuild the network; stored in the bundle's config.json."""

    channels: int
    height: int
    width: int
    levels: int
    filters: int = 64
    layers: int = 5
    kernel: int = 3
    first_kernel: int = 5
    head: int = 128
    dropout: float = 0.0  # on the gated units while training; no effect at inference

    def __post_init__(self) -> None:
        for name in ("kernel", "first_kernel"):
            if getattr(self, name) % 2 != 1 or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive odd number")
        if self.levels < 2:
            raise ValueError("levels must be at least 2")

    @classmethod
    def from_preset(cls, preset: str, channels: int, height: int, width: int,
                    levels: int, **overrides: float) -> PixelCNNConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
        return cls(channels, height, width, levels, **{**PRESETS[preset], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move features one row down (row 0 becomes zeros): row i then sees rows < i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move features one column right: column j then sees columns < j."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks.

    vertical:   v_pre = conv_v(rows i-k//2..i of v)         v <- v + v_out(gate(v_pre))
    horizontal: h_pre = conv_h(cols j-k//2..j of h) + v_to_h(v_pre)
                g = gate(h_pre); skip = h_skip(g);          h <- h + h_out(g)

    v at row i already depends only on rows < i, so v_pre may feed h without a shift.
    """

    def __init__(self, filters: int, kernel: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.k = kernel
        self.dropout = nn.Dropout(dropout)
        self.conv_v = nn.Conv2d(filters, 2 * filters, (kernel // 2 + 1, kernel))
        self.conv_h = nn.Conv2d(filters, 2 * filters, (1, kernel // 2 + 1))
        self.v_to_h = nn.Conv2d(2 * filters, 2 * filters, 1)
        self.v_out = nn.Conv2d(filters, filters, 1)
        self.h_out = nn.Conv2d(filters, filters, 1)
        self.h_skip = nn.Conv2d(filters, filters, 1)

    def forward(self, v: torch.Tensor, h: torch.Tensor):
        r = self.k // 2
        v_pre = self.conv_v(F.pad(v, (r, r, r, 0)))
        h_pre = self.conv_h(F.pad(h, (r, 0, 0, 0))) + self.v_to_h(v_pre)
        g = self.dropout(gate(h_pre))
        return v + self.v_out(gate(v_pre)), h + self.h_out(g), self.h_skip(g)


class PixelCNN(nn.Module):
    """Gated PixelCNN over uint8 images with `levels` values per sub-pixel.

    `forward(x)` takes integer images (N, C, H, W) and returns logits (N, levels, C, H, W),
    so `F.cross_entropy(logits, x.long(), reduction="none")` is the per-sub-pixel NLL.
    """

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__()
        self.config = config
        c, f, k0 = config.channels, config.filters, config.first_kernel
        # input: C scaled values + a constant-one channel, so zero padding is distinguishable
        # from a pixel whose scaled value is 0
        self.in_v = nn.Conv2d(c + 1, f, (k0 // 2 + 1, k0))
        self.in_h = nn.Conv2d(c + 1, f, (1, k0 // 2 + 1))
        self.in_v_to_h = nn.Conv2d(f, f, 1)
        self.layers = nn.ModuleList(
            GatedLayer(f, config.kernel, config.dropout) for _ in range(config.layers))
        self.in_skip = nn.Conv2d(f, f, 1)
        self.trunk = nn.Conv2d(f, config.head, 1)
        # channel head: channel c sees the context and channels < c of the same pixel
        self.channel_in = nn.ModuleList(
            nn.Conv2d(i, config.head, 1, bias=False) if i > 0 else nn.Identity()
            for i in range(c)
        )
        self.channel_mid = nn.ModuleList(nn.Conv2d(config.head, config.head, 1) for _ in range(c))
        self.channel_out = nn.ModuleList(nn.Conv2d(config.head, config.levels, 1) for _ in range(c))

    # ---------------------------------------------------------------- building blocks

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Integer levels -> floats in [-1, 1]."""
        return x.float() * (2.0 / (self.config.levels - 1)) - 1.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integer images -> network input: scaled values plus a constant-one channel."""
        xs = self.scale(x)
        return torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1)

    def context(self, x_in: torch.Tensor) -> torch.Tensor:
        """Per-pixel features (N, head, H, W) that depend only on strictly earlier pixels."""
        r = self.config.first_kernel // 2
        v = down_shift(self.in_v(F.pad(x_in, (r, r, r, 0))))
        h = right_shift(self.in_h(F.pad(x_in, (r, 0, 0, 0)))) + self.in_v_to_h(v)
        skip = self.in_skip(h)
        for layer in self.layers:
            v, h, s = layer(v, h)
            skip = skip + s
        return F.elu(self.trunk(F.elu(skip)))

    def channel_logits(self, ctx: torch.Tensor, xs_prev: torch.Tensor | None,
                       c: int) -> torch.Tensor:
        """Logits (N, levels, ...) of channel c from the context and the scaled values of
        channels < c at the same positions (`xs_prev`: (N, c, ...), None for c = 0).

        Works on any trailing spatial shape, e.g. (N, head, 1, 1) for a single pixel.
        """
        z = ctx
        if c > 0:
            z = z + self.channel_in[c](xs_prev)
        z = F.elu(self.channel_mid[c](F.elu(z)))
        return self.channel_out[c](z)

    # ------------------------------------------------------------------------ full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_scaled(self.scale(x))

    def logits_from_scaled(self, xs: torch.Tensor) -> torch.Tensor:
        """Forward pass on scaled float inputs (N, C, H, W): differentiable in the input,
        which the causality test and gradient-based attacks use."""
        x_in = torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1)
        ctx = self.context(x_in)
        logits = [
            self.channel_logits(ctx, xs[:, :c] if c > 0 else None, c)
            for c in range(self.config.channels)
        ]
        return torch.stack(logits, dim=2)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sub-pixel negative log-likelihood in nats, (N, C, H, W)."""
        return F.cross_entropy(self(x), x.long(), reduction="none")

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) in nats, one value per image."""
        return -self.nll(x).flatten(1).sum(1)
