"""--precision: mixed-precision training and scoring; calibration stays fp32-exact."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixeldefend import precision as precision_module
from pixeldefend.cli import app
from pixeldefend.data import load_images
from pixeldefend.detector import DensityDetector
from pixeldefend.errors import UsageError
from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig
from pixeldefend.precision import check_precision
from pixeldefend.train import TrainSettings, run_training, same_settings


@pytest.mark.parametrize("command", [["train", "--data", "digits"],
                                     ["score", "digits:test[:4]"],
                                     ["classifier", "train"]])
def test_fp16_on_the_cpu_is_a_clear_usage_error(runner, tiny_bundle, tmp_path, command):
    extra = ["--model", str(tiny_bundle)] if command[0] == "score" else \
        ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*command, *extra, "--device", "cpu", "--precision", "fp16"])
    assert result.exit_code == 2, result.output
    assert "--precision fp16 needs a CUDA device" in result.output
    assert "Traceback" not in result.output


def test_unknown_precision_is_refused():
    with pytest.raises(UsageError, match="precision must be one of fp32, bf16, fp16"):
        check_precision("fp8", torch.device("cpu"))
    assert check_precision("bf16", torch.device("cpu")) == "bf16"


def test_bf16_scoring_is_close_and_calibration_stays_fp32(tiny_bundle):
    det = DensityDetector.load(tiny_bundle, device="cpu")
    images = load_images("digits:test")
    exact, exact_pass = det.compute_scores(images, ["bpd"]), det.model_pass(images)
    det.precision = "bf16"
    mixed, mixed_pass = det.compute_scores(images, ["bpd"]), det.model_pass(images)
    diff = mixed["bpd"] - exact["bpd"]
    assert 0 < np.abs(diff).max() < 0.05  # bf16 did run, and stays within a few 0.01 bits
    assert abs(diff.mean()) < 0.01
    assert mixed_pass.nll.dtype == torch.float32  # the statistics pass (dose) too
    assert np.abs(mixed_pass.bits_per_dim - exact_pass.bits_per_dim).max() < 0.05
    # calibration ignores the scoring precision: the same thresholds as in fp32
    calib = load_images("digits:calib")
    fp32 = DensityDetector.load(tiny_bundle, device="cpu").calibrate_all(calib, fpr=0.05)
    bf16 = det.calibrate_all(calib, fpr=0.05)
    assert {k: c.threshold for k, c in bf16.items()} == {k: c.threshold for k, c in fp32.items()}
    assert det.precision == "bf16"  # restored for the scoring that follows


def test_bf16_training_learns_and_is_recorded(digits_train):
    det = DensityDetector(preset="tiny", device="cpu")
    det.fit(digits_train, val=load_images("digits:val"),
            settings=TrainSettings(epochs=2, batch_size=64, lr=5e-3, precision="bf16"))
    history = det.meta["training"]["history"]
    assert history[1]["val"] < history[0]["val"] < 4.1  # 4.09 bits/dim = uniform, 17 levels
    assert det.meta["training"]["settings"]["precision"] == "bf16"


def test_fp16_training_scales_the_loss_and_resumes(tmp_path, monkeypatch):
    """The GradScaler path (CUDA's in real use; allowed on the CPU here, tiny model)."""
    monkeypatch.setattr(precision_module, "FP16_DEVICES", ("cuda", "cpu"))

    def problem():
        torch.manual_seed(0)
        model = PixelCNN(PixelCNNConfig.from_preset("tiny", 1, 4, 4, 5))
        x = torch.randint(0, 5, (40, 1, 4, 4), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
        return model, x

    def loss(m, x, _y):
        return F.cross_entropy(m(x).float(), x.long())

    def val(m, block):
        return 1.0 * len(block), len(block)

    class StopInSecondEpoch:  # Ctrl-C once epoch 0's checkpoint is written
        def __init__(self):
            self.batches = 0

        def start(self, *args):
            pass

        def batch(self, _loss):
            self.batches += 1
            if self.batches == 3:
                raise KeyboardInterrupt

        def epoch(self, *args):
            pass

    settings = TrainSettings(epochs=2, batch_size=20, lr=1e-2, precision="fp16")

    def train(checkpoint=None, resume=False, progress=None):
        model, x = problem()
        run_training(model, loss, x, None, val, settings, torch.device("cpu"),
                     checkpoint_dir=checkpoint, resume=resume, progress=progress,
                     val_size=4)
        return model.state_dict()

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "ckpt", progress=StopInSecondEpoch())
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert meta["epoch"] == 0 and meta["grad_scaler"]["scale"] > 1  # the loss scale kept
    resumed, straight = train(tmp_path / "ckpt", resume=True), train()
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())


def test_checkpoints_made_before_precision_existed_resume_as_fp32():
    old = {k: v for k, v in asdict(TrainSettings()).items() if k != "precision"}
    assert same_settings(old, TrainSettings())
    assert not same_settings(old, TrainSettings(precision="bf16"))
    assert not same_settings(None, TrainSettings())
