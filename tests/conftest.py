"""Shared fixtures: small models trained for real on digits, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pixeldefend.data import load_images
from pixeldefend.detector import DensityDetector
from pixeldefend.train import TrainSettings

REPO = Path(__file__).resolve().parents[1]

# one thread: these models are small, and oversubscribed threads are slower on 2 cores;
# the CLI reads PIXELDEFEND_THREADS, so its load-dependent default never varies in tests
torch.set_num_threads(1)
os.environ["PIXELDEFEND_THREADS"] = "1"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def digits_train():
    return load_images("digits:train")


@pytest.fixture(scope="session")
def digits_test():
    return load_images("digits:test")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, digits_train) -> Path:
    """A tiny PixelCNN trained on digits for a few epochs, calibrated, saved as a bundle."""
    det = DensityDetector(preset="tiny", device="cpu")
    det.fit(digits_train, val=load_images("digits:val"),
            settings=TrainSettings(epochs=4, batch_size=64, lr=5e-3, seed=0))
    det.calibrate(load_images("digits:calib"), fpr=0.05, data="digits:calib")
    det.meta["data"] = {"calib": "digits:calib", "train": "digits:train", "n_train": 1078}
    path = tmp_path_factory.mktemp("bundles") / "tiny-digits"
    det.save(path)
    return path


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def tiny_bundle_background(tmp_path_factory, tiny_bundle, digits_train) -> Path:
    """`tiny_bundle` plus a tiny background model (score llr), every kind calibrated."""
    det = DensityDetector.load(tiny_bundle, device="cpu")
    det.fit_background(digits_train, mutation_rate=0.2, val=load_images("digits:val"),
                       settings=TrainSettings(epochs=3, batch_size=64, lr=5e-3, seed=0,
                                              weight_decay=1e-4))
    det.calibrate_all(load_images("digits:calib"), fpr=0.05, data="digits:calib")
    path = tmp_path_factory.mktemp("bundles") / "tiny-digits-background"
    det.save(path)
    return path
