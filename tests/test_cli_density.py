"""The density commands end to end: train (+ resume), calibrate, score gates, info, sample."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixeldefend.cli import app
from pixeldefend.data import load_images, save_image
from pixeldefend.detector import DensityDetector
from pixeldefend.train import TrainSettings


def run(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory, tiny_bundle):
    """5 clean test digits, 3 foreign images, 1 unreadable file."""
    folder = tmp_path_factory.mktemp("samples")
    clean = load_images("digits:test[:5]")
    for k in range(5):
        save_image(folder / f"clean_{k}.png", clean.images[k], 17)
    rng = np.random.default_rng(0)
    save_image(folder / "noise.png", torch.from_numpy(rng.integers(0, 17, (1, 8, 8))), 17)
    save_image(folder / "inverted.png", 16 - clean.images[0], 17)
    save_image(folder / "checker.png", torch.from_numpy((np.indices((8, 8)).sum(0) % 2 * 16)
                                                        [None]), 17)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_version_and_help(runner):
    result = run(runner, "--version")
    assert result.exit_code == 0 and result.stdout.startswith("pixeldefend ")
    for command in ("train", "calibrate", "score", "info", "sample"):
        result = run(runner, command, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout, command


def test_score_json_shape_verdicts_and_exit_code(runner, tiny_bundle, sample_dir):
    result = run(runner, "score", sample_dir, "--model", tiny_bundle, "--format", "json")
    assert result.exit_code == 2  # one unreadable file
    doc = json.loads(result.stdout)
    assert set(doc) >= {"model", "threshold", "results", "summary"}
    assert doc["summary"] == {"n": 9, "clean": doc["summary"]["clean"],
                              "anomalous": doc["summary"]["anomalous"], "errors": 1,
                              "skipped": 0, "hidden_ignored": 0}
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in doc["results"]}
    assert set(rows["clean_0.png"]) >= {"path", "bits_per_dim", "nll_nats", "p_value",
                                        "verdict", "error"}
    broken = rows["broken.png"]
    assert broken["verdict"] == "error" and "not an image" in broken["error"]
    for name in ("noise.png", "inverted.png", "checker.png"):
        assert rows[name]["verdict"] == "anomalous", rows[name]
        assert rows[name]["bits_per_dim"] > doc["threshold"]
    clean_verdicts = [rows[f"clean_{k}.png"]["verdict"] for k in range(5)]
    assert clean_verdicts.count("clean") >= 4
    r = rows["clean_0.png"]
    assert abs(r["nll_nats"] / (64 * np.log(2)) - r["bits_per_dim"]) < 1e-9
    assert 0 < r["p_value"] <= 1


def test_gates(runner, tiny_bundle, sample_dir, tmp_path):
    clean = [sample_dir / f"clean_{k}.png" for k in (1, 2, 3)]
    foreign = [sample_dir / "noise.png"]
    ok = run(runner, "score", *clean, "--model", tiny_bundle, "--fail-on", "anomalous",
             "--format", "csv")
    assert ok.exit_code == 0, ok.stdout
    assert ok.stdout.splitlines()[0].startswith("path,bits_per_dim")
    bad = run(runner, "score", *clean, *foreign, "--model", tiny_bundle, "--fail-on", "anomalous",
              "--format", "jsonl")
    assert bad.exit_code == 1
    assert len([json.loads(line) for line in bad.stdout.splitlines()]) == 4
    frac_ok = run(runner, "score", *clean, *foreign, "--model", tiny_bundle,
                  "--max-anomalous-fraction", "0.3", "--format", "json")
    assert frac_ok.exit_code == 0
    frac_bad = run(runner, "score", *clean, *foreign, "--model", tiny_bundle,
                   "--max-anomalous-fraction", "0.2", "--format", "json")
    assert frac_bad.exit_code == 1 and json.loads(frac_bad.stdout)["gate"]["failed"]
    report = tmp_path / "junit.xml"
    out = tmp_path / "scores.json"
    gated = run(runner, "score", sample_dir, "--model", tiny_bundle, "--junit", report,
                "--format", "json", "--output", out, "--fail-on", "anomalous")
    assert gated.exit_code == 1
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.get("tests") == "10" and suite.get("errors") == "1"  # 9 inputs + the gate
    assert int(suite.get("failures")) >= 4  # >= 3 anomalous images + the gate
    assert len(suite.findall("testcase/failure")) == int(suite.get("failures"))
    assert json.loads(out.read_text())["summary"]["n"] == 9


def test_bad_usage_exits_2_with_a_message(runner, tiny_bundle, tmp_path):
    result = run(runner, "score", "digits:test[:3]", "--model", tmp_path / "nope")
    assert result.exit_code == 2 and "no such model bundle" in result.stderr
    result = run(runner, "score", "digits:test[:3]", "--model", tiny_bundle, "--fail-on", "x")
    assert result.exit_code == 2 and "--fail-on" in result.stderr
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(big)
    result = run(runner, "score", big, "--model", tiny_bundle, "--format", "json")
    assert result.exit_code == 2
    assert "expects 8x8" in json.loads(result.stdout)["results"][0]["error"]
    result = run(runner, "score", big, "--model", tiny_bundle, "--resize", "--format", "json")
    assert result.exit_code == 0


def test_calibrate_info_and_sample(runner, tiny_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    before = DensityDetector.load(bundle).threshold
    result = run(runner, "calibrate", "--model", bundle, "--fpr", "0.2")
    assert result.exit_code == 0, result.stderr
    after = DensityDetector.load(bundle).threshold
    assert after < before  # a higher FPR means a lower threshold
    info = json.loads(run(runner, "info", "--model", bundle, "--format", "json").stdout)
    assert info["calibration"]["bpd"]["fpr"] == 0.2 and info["levels"] == 17
    grid = tmp_path / "grid.png"
    result = run(runner, "sample", "--model", bundle, "-n", "4", "--out", grid,
                 "--npz", tmp_path / "s.npz")
    assert result.exit_code == 0, result.stderr
    assert Image.open(grid).size[0] >= 4 * 8
    drawn = load_images(str(tmp_path / "s.npz"))
    assert drawn.images.shape == (4, 1, 8, 8) and int(drawn.images.max()) <= 16


def test_train_interrupt_and_resume_matches_an_uninterrupted_run(runner, tmp_path):
    """Ctrl-C after epoch 2 loses nothing: --resume ends with the same weights."""
    from pixeldefend import train as train_module

    args = ["train", "--preset", "tiny", "--epochs", "3", "--batch-size", "256",
            "--device", "cpu"]
    full = run(runner, *args, "--out", tmp_path / "full")
    assert full.exit_code == 0, full.stderr
    assert "test bits/dim" in full.stdout

    original = train_module.save_checkpoint
    calls = {"n": 0}

    def interrupt_after_two(*a, **kw):
        original(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    train_module.save_checkpoint = interrupt_after_two
    try:
        cut = run(runner, *args, "--out", tmp_path / "cut")
    finally:
        train_module.save_checkpoint = original
    assert cut.exit_code == 130 and "--resume" in cut.stderr
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.checkpoint").exists()
    resumed = run(runner, *args, "--out", tmp_path / "cut", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut.checkpoint").exists()


def test_resume_refuses_other_settings(tmp_path):
    from pixeldefend.errors import UsageError

    det = DensityDetector(preset="tiny", device="cpu")
    images = load_images("digits:val")
    det.fit(images, settings=TrainSettings(epochs=1, batch_size=256),
            checkpoint_dir=tmp_path / "ck")
    with pytest.raises(UsageError, match="other settings"):
        DensityDetector(preset="tiny", device="cpu").fit(
            images, settings=TrainSettings(epochs=2, batch_size=128),
            checkpoint_dir=tmp_path / "ck", resume=True)
