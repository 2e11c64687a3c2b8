"""Regenerate data/samples/: clean held-out digits and obviously foreign 8x8 images.

    python data/make_samples.py

Clean images come from the digits *test* split, which no shipped model was trained or
calibrated on: the first eight whose p-value under `models/digits` is above 0.2, so the
quick start shows the common case (by design about 5% of clean images are flagged at the
default FPR of 0.05; `pixeldefend score digits:test` shows them all). Written as ordinary 8-bit PNGs (17 digit levels mapped to 0..255), the way
a user's own files would arrive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pixeldefend.data import load_images, save_image
from pixeldefend.detector import DensityDetector

OUT = Path(__file__).resolve().parent / "samples"
MODEL = Path(__file__).resolve().parents[1] / "models" / "digits"


def main() -> None:
    test = load_images("digits:test")
    typical = DensityDetector.load(MODEL, device="cpu").p_values(test) > 0.2
    rng = np.random.default_rng(2018)
    clean = OUT / "clean"
    foreign = OUT / "foreign"
    for k in np.flatnonzero(typical)[:8].tolist():
        label = int(test.labels[k])
        index = test.names[k].rsplit(":", 1)[-1]
        save_image(clean / f"digit{label}_test{index}.png", test.images[k], 17)
    save_image(foreign / "noise.png", torch.from_numpy(rng.integers(0, 17, (1, 8, 8))), 17)
    checker = (np.indices((8, 8)).sum(0) % 2 * 16).astype(np.uint8)[None]
    save_image(foreign / "checkerboard.png", torch.from_numpy(checker), 17)
    save_image(foreign / "inverted_digit.png", 16 - test.images[0], 17)
    stripes = np.zeros((1, 8, 8), dtype=np.uint8)
    stripes[:, :, ::2] = 16
    save_image(foreign / "stripes.png", torch.from_numpy(stripes), 17)
    print(f"wrote {len(list(OUT.rglob('*.png')))} images to {OUT}")


if __name__ == "__main__":
    main()
