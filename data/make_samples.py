"""Regenerate data/samples/: clean held-out digits and obviously foreign 8x8 images.

    python data/make_samples.py

Clean images come from the digits *test* split, which no shipped model was trained or
calibrated on. Written as ordinary 8-bit PNGs (17 digit levels mapped to 0..255), the way
a user's own files would arrive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pixeldefend.data import load_images, save_image

OUT = Path(__file__).resolve().parent / "samples"


def main() -> None:
    test = load_images("digits:test")
    rng = np.random.default_rng(2018)
    clean = OUT / "clean"
    foreign = OUT / "foreign"
    for k in range(8):
        label = int(test.labels[k])
        index = test.names[k].rsplit(":", 1)[-1]
        save_image(clean / f"digit{label}_test{index}.png", test.images[k], 17)
    save_image(foreign / "noise.png", torch.from_numpy(rng.integers(0, 17, (1, 8, 8))), 17)
    save_image(foreign / "blank_white.png", torch.full((1, 8, 8), 16), 17)
    save_image(foreign / "inverted_digit.png", 16 - test.images[8], 17)
    stripes = np.zeros((1, 8, 8), dtype=np.uint8)
    stripes[:, :, ::2] = 16
    save_image(foreign / "stripes.png", torch.from_numpy(stripes), 17)
    print(f"wrote {len(list(OUT.rglob('*.png')))} images to {OUT}")


if __name__ == "__main__":
    main()
