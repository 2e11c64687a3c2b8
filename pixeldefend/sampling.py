"""Draw images from a bundle's PixelCNN and save them for a person to look at: a PNG
grid, and optionally the exact levels as .npz. Sampling shows what the density model
has learnt (a model whose samples look like noise scores nothing well)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def write_samples(model: Path, out: Path, n: int = 16, *, npz: Path | None = None,
                  temperature: float = 1.0, scale: int = 0, seed: int = 0,
                  device: str = "auto", overwrite: bool = False,
                  progress: Callable[[int], None] | None = None,
                  on_total: Callable[[int], None] | None = None) -> float:
    """`n` seeded samples as a PNG grid in `out` (zoom `scale`, 0: about 256 px) and, with
    `npz`, exactly; outputs are checked before any work (`overwrite` replaces only files
    pixeldefend made). `temperature` < 1 tames the softmax. `progress` hears of each
    image row decoded (`on_total`: how many). Returns the samples' mean bits/dim."""
    import torch

    from .data import save_grid, save_npz
    from .detector import DensityDetector
    from .models.decoder import sample
    from .outputs import check_files, input_paths

    check_files((out, "--out"), (npz, "--npz"), inputs=input_paths(model),
                overwrite=overwrite)
    detector = DensityDetector.load(model, device=device)
    spec = detector.spec
    if on_total is not None:
        on_total(spec.height)  # the decoder reports per image row
    images = sample(detector.model, n, torch.Generator().manual_seed(seed),
                    temperature=temperature, batch_size=n, progress=progress)
    save_grid(out, images, spec.levels, scale)
    if npz is not None:
        save_npz(npz, images, spec.levels)
    return float(detector.anomaly_score(images, "bpd").mean())
