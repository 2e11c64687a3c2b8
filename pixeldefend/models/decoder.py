"""The cached PixelCNN decoder (Ramachandran et al. 2017): one sub-pixel at a time in
autoregressive order, each row's vertical stack once and each pixel's horizontal stack
and channel head once, instead of a full forward pass per sub-pixel.

The arithmetic of each step lives beside the network it mirrors (`PixelCNN.steps()`,
`models.pixelcnn.PixelCNNSteps` / `GatedLayerSteps`); this module holds the loop, the
cached activations, and what runs on the decoder: `cached_logits` (teacher forcing, for
tests) and `sample`. PixelDefend purification (`pixeldefend.purify`) runs on it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..errors import UsageError
from .pixelcnn import PixelCNN

# decide(c, i, j, logits (N, levels), x (N, C, H, W) long) -> values (N,) long
Decide = Callable[[int, int, int, torch.Tensor, torch.Tensor], torch.Tensor]


class CachedDecoder:
    """Runs a `PixelCNN` one sub-pixel at a time with cached activations.

    Per row i (once rows < i are final): the vertical stack of every layer over the whole
    row and all images at once, one matmul per conv tap on contiguous blocks, plus each
    pixel's horizontal `base`. Per pixel, all images at once: the horizontal stack layer
    by layer over the cached columns j-k//2..j, all skip connections in one matmul, the
    trunk, then the channel head channel by channel. Row results go to buffers reused
    from row to row; per-pixel results are written in place into preallocated ones, so
    the loop's cost is its matmuls plus a fixed number of small kernel calls per pixel.
    """

    def __init__(self, model: PixelCNN, dtype: torch.dtype = torch.float64) -> None:
        self.steps = model.steps(dtype)
        self.cfg, self.dtype, self.device = model.config, dtype, self.steps.device

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
        cfg, dt, dev, steps = self.cfg, self.dtype, self.device, self.steps
        n, C, H, W = x.shape
        f, k, k0 = cfg.filters, cfg.kernel, cfg.first_kernel
        r, r0 = k // 2, k0 // 2
        layers = steps.layers
        nl = len(layers)
        tick = _Ticker(timings)
        # network input, channels-last, padded: rows +r0 on top, cols +r0 both sides;
        # only decided pixels are ever read
        xin = torch.zeros((n, H + r0, W + 2 * r0, C + 1), device=dev, dtype=dt)
        xin[:, r0:, r0:r0 + W, C] = 1.0
        # vertical stack inputs per layer: the last r+1 rows only, in a ring (padded row
        # b, i.e. image row b - r, lives in slot b % (r+1); the zeros are the padding above
        # row 0), cols +r each side, laid out (column, image, channel): a conv tap over a
        # row of all images is then one contiguous block (see `GatedLayerSteps.row`), and
        # the working set stays in cache
        vbuf = [torch.zeros((r + 1, W + 2 * r, n, f), device=dev, dtype=dt)
                for _ in range(nl)]
        # horizontal stack inputs (minus accumulated biases) of the current row: cols +r;
        # the r padding columns stay zero
        hbuf = [torch.zeros((n, W + r, f), device=dev, dtype=dt) for _ in range(nl)]
        units = torch.empty((n, (nl + 1) * f), device=dev, dtype=dt)  # [h0, g_0, ..., g_nl-1]
        h0 = units[:, :f]
        gates = [units[:, (li + 1) * f:(li + 2) * f] for li in range(nl)]
        for i in range(H):
            # ---------------- vertical stack for row i (rows < i are final)
            patches = None
            if i > 0:
                patches = xin[:, i - 1:i + r0].unfold(2, k0, 1)  # (n, r0+1, W, C+1, k0)
                patches = patches.permute(2, 0, 1, 4, 3).reshape(W * n, -1)
            v, base0 = steps.input_row(patches, n)
            slots = [b % (r + 1) for b in range(i, i + r + 1)]  # padded rows i..i+r
            vbuf[0][slots[-1], r:r + W] = v.view(W, n, f)
            bases = []
            for li, layer in enumerate(layers):
                v_next = vbuf[li + 1][slots[-1], r:r + W] if li + 1 < nl else None
                bases.append(layer.row([vbuf[li][s] for s in slots],
                                       vbuf[li][slots[-1], r:r + W], v_next))
            tick("rows")
            # ---------------- horizontal stack and head, pixel by pixel
            xrow = xin[:, i + r0]  # (n, W + 2 r0, C + 1)
            for j in range(W):
                window = None if j == 0 else xrow[:, j - 1:j + r0].reshape(n, -1)
                steps.input_pixel(window, base0[j], h0)
                hbuf[0][:, j + r].copy_(h0)
                for li, layer in enumerate(layers):
                    h_next = hbuf[li + 1][:, j + r] if li + 1 < nl else None
                    layer.pixel(hbuf[li][:, j:j + r + 1].reshape(n, -1), bases[li][j],
                                gates[li], hbuf[li][:, j + r], h_next)
                ctx = steps.context(units)
                tick("pixels")
                for c in range(C):
                    logits = steps.channel_logits(ctx, xrow[:, j + r0, :c], c)
                    tick("head")
                    value = decide(c, i, j, logits, x)
                    x[:, c, i, j] = value
                    xrow[:, j + r0, c] = steps.table.index_select(0, value)
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


def cached_logits(model: PixelCNN, images: torch.Tensor,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits (N, levels, C, H, W) of fixed images through the cached decoder (teacher
    forcing): equal to `model(images)` up to rounding. Tests the caching on its own."""
    images = model.check_images(images)
    cfg = model.config
    decoder = CachedDecoder(model, dtype)
    out = torch.empty((images.shape[0], cfg.levels, cfg.channels, cfg.height, cfg.width),
                      dtype=dtype, device=decoder.device)
    target = images.to(decoder.device).long()

    def decide(c: int, i: int, j: int, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out[:, :, c, i, j] = logits
        return target[:, c, i, j]

    decoder.run(target.clone(), decide)
    return out


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
        raise UsageError(f"temperature must be positive, got {temperature}",
                         param="temperature")
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
