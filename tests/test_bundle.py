"""Bundles round-trip exactly, never unpickle, and fail clearly when broken."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pixeldefend.bundle import read_config
from pixeldefend.data import load_images
from pixeldefend.detector import DensityDetector
from pixeldefend.errors import BundleError


def test_round_trip_gives_identical_scores(tiny_bundle, tmp_path):
    det = DensityDetector.load(tiny_bundle, device="cpu")
    images = load_images("digits:test[:20]")
    copy = tmp_path / "copy"
    det.save(copy)
    again = DensityDetector.load(copy, device="cpu")
    assert (det.anomaly_score(images) == again.anomaly_score(images)).all()
    assert again.threshold == det.threshold
    assert sorted(p.name for p in copy.iterdir()) == [
        "calibration.json", "config.json", "model.safetensors"]


def test_config_records_what_a_user_needs(tiny_bundle):
    config = read_config(tiny_bundle)
    assert config["kind"] == "pixelcnn" and config["image_shape"] == [1, 8, 8]
    assert config["levels"] == 17 and config["package_version"]
    assert config["architecture"]["filters"] == 16
    cal = json.loads((tiny_bundle / "calibration.json").read_text())
    entry = cal["kinds"]["bpd"]
    assert entry["n"] == len(entry["scores"]) == 180 and entry["fpr"] == 0.05
    assert set(entry) >= {"kind", "threshold", "quantiles", "scores"}


def broken_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_corrupt_files_are_clear_errors(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="no such model bundle"):
        DensityDetector.load(tmp_path / "nothing")
    b = broken_copy(tiny_bundle, tmp_path / "a")
    (b / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="missing model.safetensors"):
        DensityDetector.load(b)
    b = broken_copy(tiny_bundle, tmp_path / "b")
    (b / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(BundleError, match="corrupt weights"):
        DensityDetector.load(b)
    b = broken_copy(tiny_bundle, tmp_path / "c")
    (b / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt JSON"):
        DensityDetector.load(b)
    b = broken_copy(tiny_bundle, tmp_path / "d")
    config = json.loads((b / "config.json").read_text())
    config["format_version"] = 99
    (b / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="version 99"):
        DensityDetector.load(b)
    b = broken_copy(tiny_bundle, tmp_path / "e")
    config = json.loads((b / "config.json").read_text())
    config["architecture"]["filters"] = 32
    (b / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="do not match"):
        DensityDetector.load(b)


def test_loading_never_unpickles(tiny_bundle, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert DensityDetector.load(tiny_bundle, device="cpu").model is not None
