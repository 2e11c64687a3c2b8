"""Score kinds with known answers: complexity, likelihood ratio, typicality; their
calibrations round-trip through the bundle; the CLI's --score, --batch-test, --heatmap,
train --background and train-background."""

from __future__ import annotations

import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixeldefend.bundle import read_config
from pixeldefend.cli import app
from pixeldefend.data import load_images, save_image, save_npz
from pixeldefend.detector import DensityDetector
from pixeldefend.errors import UsageError
from pixeldefend.localise import heatmap_name, pixel_bits
from pixeldefend.ood import subsample
from pixeldefend.scores import (
    DEFAULT_CODEC,
    SCORE_KINDS,
    codec_bits_per_dim,
    complexity_score,
    llr_score,
    mutate,
    png_bits_per_dim,
    typicality_score,
    typicality_test,
)


def run(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------ complexity


def test_png_bits_per_dim_is_the_png_size_and_tiny_for_a_constant_image():
    rng = np.random.default_rng(0)
    constant = np.full((1, 1, 28, 28), 200, dtype=np.uint8)
    noise = rng.integers(0, 256, (1, 1, 28, 28)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise[0, 0]).save(buf, format="PNG", compress_level=9)
    assert png_bits_per_dim(noise, 256)[0] == pytest.approx(8 * len(buf.getvalue()) / 784)
    flat, random = png_bits_per_dim(np.concatenate([constant, noise]), 256)
    assert flat < 1.0 < 8.0 < random  # a flat image compresses to almost nothing
    # the container is a constant: every constant image of one shape costs the same
    other = np.full((1, 1, 28, 28), 3, dtype=np.uint8)
    assert png_bits_per_dim(other, 256)[0] == flat
    # fewer levels are mapped to 8 bits first, colour images are compressed as RGB
    assert png_bits_per_dim(np.full((2, 3, 8, 8), 16, dtype=np.uint8), 17).shape == (2,)


def test_complexity_is_model_bits_minus_compressor_bits(tiny_bundle):
    det = DensityDetector.load(tiny_bundle, device="cpu")
    x = load_images("digits:test[:12]")
    expected = det.anomaly_score(x, "bpd") - codec_bits_per_dim(x.images, 17, DEFAULT_CODEC)
    assert np.allclose(det.anomaly_score(x, "complexity"), expected)
    assert np.allclose(complexity_score(np.array([3.0]), np.array([1.25])), [1.75])


# ------------------------------------------------------------------ likelihood ratio


def test_llr_is_zero_when_the_background_equals_the_model(tiny_bundle):
    det = DensityDetector.load(tiny_bundle, device="cpu")
    assert "llr" not in det.available_kinds
    with pytest.raises(UsageError, match="background model"):
        det.anomaly_score(load_images("digits:test[:2]"), "llr")
    det.background = copy.deepcopy(det.model)
    x = torch.cat([load_images("digits:test[:8]").images,
                   torch.randint(0, 17, (8, 1, 8, 8), dtype=torch.uint8)])
    assert np.array_equal(det.anomaly_score(x, "llr"), np.zeros(16))
    assert np.allclose(llr_score(np.array([2.0, 1.0]), np.array([1.5, 1.5])), [0.5, -0.5])


def test_mutation_rate_is_respected():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros((200, 1, 16, 16), dtype=torch.uint8)
    assert torch.equal(mutate(x, 0.0, 17, gen), x)
    all_noise = mutate(x, 1.0, 17, gen)
    counts = torch.bincount(all_noise.flatten().long(), minlength=17).float()
    assert counts.min() / counts.max() > 0.8  # uniform over the 17 levels
    changed = (mutate(x, 0.2, 17, gen) != 0).float().mean().item()
    assert changed == pytest.approx(0.2 * 16 / 17, abs=0.01)  # 1/17 draw the same level
    with pytest.raises(ValueError):
        mutate(x, 1.5, 17)


def test_background_model_is_trained_on_mutated_images(tiny_bundle_background):
    det = DensityDetector.load(tiny_bundle_background, device="cpu")
    assert det.background_meta["mutation_rate"] == 0.2
    clean = load_images("digits:test")
    noise = torch.randint(0, 17, (100, 1, 8, 8), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    bg_clean = DensityDetector(model=det.background, device="cpu").anomaly_score(clean)
    # the background model saw noise, so it explains clean digits worse than the main one
    assert bg_clean.mean() > det.anomaly_score(clean).mean()
    assert det.anomaly_score(noise, "llr").min() > np.median(det.anomaly_score(clean, "llr"))


# ------------------------------------------------------------------------ typicality


def test_typicality_batch_test_known_answers():
    rng = np.random.default_rng(0)
    reference = rng.normal(3.0, 0.3, size=2000)
    same = rng.normal(3.0, 0.3, size=100)
    shifted = rng.normal(3.15, 0.3, size=100)  # half a standard deviation higher
    ok = typicality_test(same, reference, alpha=0.05, resamples=1000, seed=0)
    bad = typicality_test(shifted, reference, alpha=0.05, resamples=1000, seed=0)
    assert ok.p_value > 0.2 and not ok.anomalous
    assert bad.p_value < 0.01 and bad.anomalous
    assert bad.p_value >= 1 / 1001  # never zero: (1 + count) / (resamples + 1)
    # two-sided: *more* likely than clean data is atypical too
    assert typicality_test(same - 0.15, reference, seed=0).anomalous
    again = typicality_test(shifted, reference, alpha=0.05, resamples=1000, seed=0)
    assert again == bad  # seeded bootstrap
    assert typicality_test(same, reference, seed=1).threshold != ok.threshold
    assert np.allclose(typicality_score(np.array([2.5, 3.5]), 3.0), [0.5, 0.5])
    with pytest.raises(ValueError):
        typicality_test(np.array([]), reference)


def test_typicality_per_image_and_batch_on_the_detector(tiny_bundle_background):
    det = DensityDetector.load(tiny_bundle_background, device="cpu")
    cal = det.calibrations["typicality"]
    mean = cal.reference["mean_bpd"]
    assert len(cal.reference["bpd_scores"]) == cal.n == 180
    x = load_images("digits:test[:20]")
    assert np.allclose(det.anomaly_score(x, "typicality"),
                       np.abs(det.anomaly_score(x, "bpd") - mean))
    # a random subset: the head of digits:test comes from a few writers and *is* atypical
    assert not det.batch_test(subsample(load_images("digits:test"), 60, seed=0)).anomalous
    noise = torch.randint(0, 17, (20, 1, 8, 8), dtype=torch.uint8)
    assert det.batch_test(noise).p_value < 0.01


# -------------------------------------------------------------- calibration storage


def test_every_kind_is_calibrated_stored_and_reloaded(tiny_bundle_background, tmp_path):
    det = DensityDetector.load(tiny_bundle_background, device="cpu")
    assert set(det.calibrations) == set(SCORE_KINDS) == set(det.available_kinds)
    x = load_images("digits:test[:30]")
    before = {k: det.anomaly_score(x, k) for k in SCORE_KINDS}
    det.calibrate(load_images("digits:calib"), fpr=0.1, kind="complexity")
    assert det.default_kind == "complexity" and det.threshold == det.calibrations[
        "complexity"].threshold
    det.save(tmp_path / "b")
    again = DensityDetector.load(tmp_path / "b", device="cpu")
    assert again.default_kind == "complexity"
    for kind in SCORE_KINDS:
        assert again.calibrations[kind] == det.calibrations[kind]
        assert np.array_equal(again.anomaly_score(x, kind), before[kind])
    # one weights file, background under its prefix, config beside the main one
    tensors = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert any(k.startswith("background.") for k in tensors)
    config = read_config(tmp_path / "b")
    assert config["background"]["architecture"]["filters"] == 16
    assert config["background"]["mutation_rate"] == 0.2
    doc = json.loads((tmp_path / "b" / "calibration.json").read_text())
    assert set(doc["kinds"]) == set(SCORE_KINDS)
    assert "reference" not in doc["kinds"]["bpd"]  # older readers see the same entries


def test_flags_known_foreign_images(tiny_bundle_background):
    det = DensityDetector.load(tiny_bundle_background, device="cpu")
    noise = torch.randint(0, 17, (50, 1, 8, 8), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    constant = torch.full((10, 1, 8, 8), 16, dtype=torch.uint8)
    assert det.is_anomalous(noise, "llr").mean() > 0.9
    assert det.is_anomalous(constant, "complexity").all()  # all-white compresses to nothing
    assert det.is_anomalous(noise, "typicality").mean() > 0.9


def test_heatmap_names_and_bits():
    taken: set[str] = set()
    assert heatmap_name("in/a/cat.png", taken) == "cat.heatmap.png"
    assert heatmap_name("in/b/cat.png", taken) == "cat-2.heatmap.png"
    assert heatmap_name("x.npz[3]", taken) == "x.npz_3.heatmap.png"
    assert heatmap_name("digits:test:5", taken) == "digits_test_5.heatmap.png"
    nll = torch.full((3, 2, 2), np.log(2.0))
    assert np.allclose(pixel_bits(nll), 3.0)  # 1 bit per channel, summed


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    clean = load_images("digits:test[:4]")
    for k in range(4):
        save_image(folder / f"clean_{k}.png", clean.images[k], 17)
    noise = torch.randint(0, 17, (1, 8, 8), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(3))
    save_image(folder / "noise.png", noise, 17)
    return folder


def test_cli_score_kinds(runner, tiny_bundle_background, mixed_dir):
    det = DensityDetector.load(tiny_bundle_background, device="cpu")
    x = load_images(str(mixed_dir), det.spec)
    for kind in SCORE_KINDS:
        result = run(runner, "score", mixed_dir, "--model", tiny_bundle_background, "--score",
                     kind, "--format", "json")
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["score_kind"] == kind
        assert doc["threshold"] == pytest.approx(det.calibrations[kind].threshold)
        scores = {r["path"]: r["score"] for r in doc["results"]}
        expected = det.anomaly_score(x, kind)
        assert np.allclose([scores[name] for name in x.names], expected)
        noise_row = next(r for r in doc["results"] if r["path"].endswith("noise.png"))
        if kind != "complexity":  # the PNG of 64 noisy pixels is as big as the model's bits
            assert noise_row["verdict"] == "anomalous", kind
    table = run(runner, "score", mixed_dir, "--model", tiny_bundle_background, "--score", "llr")
    assert table.exit_code == 0 and "llr" in table.stdout


def test_cli_score_kind_errors(runner, tiny_bundle, mixed_dir):
    result = run(runner, "score", mixed_dir, "--model", tiny_bundle, "--score", "llr")
    assert result.exit_code == 2 and "background model" in result.stderr
    result = run(runner, "score", mixed_dir, "--model", tiny_bundle, "--score", "nope")
    assert result.exit_code == 2 and "--score" in result.stderr


def test_cli_batch_test_gate(runner, tiny_bundle_background, tmp_path):
    clean = tmp_path / "clean.npz"
    sample = subsample(load_images("digits:test"), 80, seed=0)
    save_npz(clean, sample.images, 17)
    ok = run(runner, "score", clean, "--model", tiny_bundle_background,
             "--batch-test", "--fail-on", "anomalous", "--format", "json")
    assert ok.exit_code == 0, ok.stderr
    doc = json.loads(ok.stdout)
    batch = doc["batch_test"]
    assert batch["verdict"] == "typical" and batch["n"] == 80 and batch["resamples"] == 1000
    assert batch["p_value"] > 0.05 and not doc["gate"]["failed"]
    assert doc["summary"]["n"] == 80  # per-image rows are still there
    npz = tmp_path / "noise.npz"
    save_npz(npz, torch.randint(0, 17, (30, 1, 8, 8), dtype=torch.uint8), 17)
    junit = tmp_path / "j.xml"
    bad = run(runner, "score", npz, "--model", tiny_bundle_background, "--batch-test",
              "--fail-on", "anomalous", "--format", "json", "--junit", junit)
    assert bad.exit_code == 1
    doc = json.loads(bad.stdout)
    assert doc["batch_test"]["verdict"] == "anomalous" and doc["gate"]["failed"]
    assert doc["batch_test"]["p_value"] < 0.01
    assert "batch typicality test" in junit.read_text()
    table = run(runner, "score", "digits:test[:40]", "--model", tiny_bundle_background,
                "--batch-test")
    assert table.exit_code == 0 and "p-value" in table.stdout


def test_cli_heatmap_for_flagged_images_only(runner, tiny_bundle, mixed_dir, tmp_path):
    out = tmp_path / "maps"
    result = run(runner, "score", mixed_dir, "--model", tiny_bundle, "--heatmap", out,
                 "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    flagged = [r for r in rows if r["verdict"] == "anomalous"]
    assert any(r["path"].endswith("noise.png") for r in flagged)
    written = sorted(p.name for p in out.iterdir() if p.name != ".pixeldefend-output.json")
    assert written == sorted(f"{r['path'].rsplit('/', 1)[-1][:-4]}.heatmap.png"
                             for r in flagged)
    for r in rows:
        assert (r["heatmap"] is not None) == (r["verdict"] == "anomalous")
    with Image.open(out / "noise.heatmap.png") as img:
        assert img.width >= 400 and img.mode in ("RGB", "RGBA")  # upscaled, in colour


def test_cli_train_background_calibrate_and_info(runner, tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    before = load_file(str(bundle / "model.safetensors"))
    result = run(runner, "train-background", "--model", bundle, "--data", "digits", "--epochs", "1",
                 "--batch-size", "256", "--mutation-rate", "0.25", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    after = load_file(str(bundle / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # main model untouched
    assert any(k.startswith("background.") for k in after)
    assert not (tmp_path / "b.background.checkpoint").exists()
    info = json.loads(run(runner, "info", "--model", bundle, "--format", "json").stdout)
    assert info["background"]["mutation_rate"] == 0.25
    assert set(info["calibration"]) == set(SCORE_KINDS) and info["default_score"] == "bpd"
    result = run(runner, "calibrate", "--model", bundle, "--score", "llr", "--fpr", "0.1")
    assert result.exit_code == 0, result.stderr
    det = DensityDetector.load(bundle, device="cpu")
    assert det.default_kind == "llr" and det.calibrations["llr"].fpr == 0.1
    assert det.calibrations["bpd"].fpr == 0.05  # the other kinds are left alone


def test_cli_train_with_background(runner, tmp_path):
    result = run(runner, "train", "--preset", "tiny", "--epochs", "1", "--batch-size", "256",
                 "--background", "--background-preset", "tiny", "--score", "llr",
                 "--device", "cpu", "--out", tmp_path / "m")
    assert result.exit_code == 0, result.stderr
    det = DensityDetector.load(tmp_path / "m", device="cpu")
    assert det.background is not None and det.default_kind == "llr"
    assert set(det.calibrations) == set(SCORE_KINDS)
    assert not (tmp_path / "m.background.checkpoint").exists()
    result = run(runner, "train", "--preset", "tiny", "--score", "llr", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "--background" in result.stderr


def test_cli_heatmap_draws_the_local_map_with_a_dose_calibration(runner, tiny_bundle_background,
                                                                 mixed_dir, tmp_path):
    out = tmp_path / "maps"
    result = run(runner, "score", mixed_dir, "--model", tiny_bundle_background, "--score",
                 "dose", "--heatmap", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)["results"]
    noise = next(r for r in rows if r["path"].endswith("noise.png"))
    assert noise["verdict"] == "anomalous" and noise["heatmap"] is not None
    with Image.open(noise["heatmap"]) as img:
        assert img.width >= 400


def test_cli_calibrate_with_too_few_images_for_dose_falls_back_to_bpd_loudly(
        runner, repo, tmp_path):
    bundle = tmp_path / "digits"
    shutil.copytree(repo / "models" / "digits", bundle)
    result = run(runner, "calibrate", "--model", bundle, "--data", "digits:calib[:30]")
    assert result.exit_code == 0, result.stderr
    assert "too few to calibrate score 'dose'" in result.stderr
    det = DensityDetector.load(bundle, device="cpu")
    assert det.default_kind == "bpd" and "dose" not in det.calibrations
    result = run(runner, "calibrate", "--model", bundle, "--data", "digits:calib")
    det = DensityDetector.load(bundle, device="cpu")
    assert det.default_kind == "bpd" and "dose" in det.calibrations  # restore: --score dose
    run(runner, "calibrate", "--model", bundle, "--data", "digits:calib", "--score", "dose")
    assert DensityDetector.load(bundle, device="cpu").default_kind == "dose"
