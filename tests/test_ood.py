"""The out-of-distribution benchmark: built-in sets, metrics with known answers, the
`evaluate-ood` command's JSON and report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pixeldefend.cli import app
from pixeldefend.data import ImageSet, ImageSpec, load_images
from pixeldefend.detector import DensityDetector
from pixeldefend.errors import DataError
from pixeldefend.ood import (
    BUILTIN_OOD,
    METRICS,
    conform_any,
    evaluate_ood,
    make_ood_set,
    ood_metrics,
    subsample,
)
from pixeldefend.outputs import MARKER


def run(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def in_set() -> ImageSet:
    return load_images("digits:test[:30]")


@pytest.mark.parametrize("name", BUILTIN_OOD)
def test_builtin_sets_have_the_model_shape_and_levels(name, in_set):
    spec = ImageSpec(1, 8, 8, 17)
    out = make_ood_set(name, spec, in_set, 30, seed=0)
    assert out.images.dtype == torch.uint8 and out.images.shape == (30, 1, 8, 8)
    assert int(out.images.max()) <= 16 and out.levels == 17
    assert len(out.names) == 30 and out.source
    again = make_ood_set(name, spec, in_set, 30, seed=0)
    assert torch.equal(out.images, again.images)  # seeded


def test_transforms_of_the_in_distribution_set(in_set):
    spec = in_set.spec
    x = in_set.images
    assert torch.equal(make_ood_set("inverted", spec, in_set, 30).images, 16 - x)
    assert torch.equal(make_ood_set("hflip", spec, in_set, 30).images, x.flip(-1))
    assert torch.equal(make_ood_set("vflip", spec, in_set, 30).images, x.flip(-2))
    shuffled = make_ood_set("shuffled", spec, in_set, 30).images
    assert torch.equal(shuffled.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert not torch.equal(shuffled, x)
    constant = make_ood_set("constant", spec, in_set, 30).images.flatten(1)
    assert (constant == constant[:, :1]).all()


def test_colour_and_size_conversion(in_set):
    spec = ImageSpec(3, 16, 16, 256)
    photos = make_ood_set("photos", spec, in_set, 5)
    assert photos.images.shape == (5, 3, 16, 16)
    digits = make_ood_set("digits", spec, in_set, 5)
    assert digits.images.shape == (5, 3, 16, 16)
    assert torch.equal(digits.images[:, 0], digits.images[:, 1])  # gray made colour
    gray = conform_any(ImageSet(photos.images, 256, photos.names), ImageSpec(1, 8, 8, 17))
    assert gray.images.shape == (5, 1, 8, 8) and int(gray.images.max()) <= 16


def test_a_data_spec_and_a_bad_name(in_set):
    out = make_ood_set("digits:val", in_set.spec, in_set, 20, seed=0)
    assert len(out) == 20 and out.source.startswith("digits:val")
    with pytest.raises(DataError, match="not one of"):
        make_ood_set("no-such-set", in_set.spec, in_set, 5)
    assert len(subsample(in_set, 10, seed=1)) == 10 and subsample(in_set, None) is in_set


def test_metrics_known_answers():
    low, high = np.arange(100.0), np.arange(100.0) + 1000
    perfect = ood_metrics(low, high)
    assert perfect == {"auroc": 1.0, "auprc": 1.0, "fpr_at_95_tpr": 0.0}
    backwards = ood_metrics(high, low)
    assert backwards["auroc"] == 0.0 and backwards["fpr_at_95_tpr"] == 1.0
    same = ood_metrics(low, low)
    assert same["auroc"] == pytest.approx(0.5)
    # fpr at 95% tpr: the 5% least anomalous OOD scores sit above 10% of clean ones
    rng = np.random.default_rng(0)
    clean, ood = rng.normal(0, 1, 20000), rng.normal(3, 1, 20000)
    expected = 1 - 0.5 * (1 + math.erf((3 - 1.6449) / np.sqrt(2)))
    assert ood_metrics(clean, ood)["fpr_at_95_tpr"] == pytest.approx(expected, abs=0.01)


def test_evaluate_ood_library(tiny_bundle_background, in_set):
    det = DensityDetector.load(tiny_bundle_background, device="cpu")
    sets = {name: make_ood_set(name, det.spec, in_set, 30) for name in ("noise", "constant")}
    report = evaluate_ood(det, in_set, sets, model="m")
    assert report.kinds == ["bpd", "complexity", "llr", "typicality", "dose"]
    assert report.out["noise"]["metrics"]["llr"]["auroc"] > 0.95
    assert report.out["constant"]["metrics"]["complexity"]["auroc"] > 0.95
    assert len(report.rows()) == 2 * 5
    # the gate's verdicts at the calibrated thresholds are reported too
    assert set(report.in_flagged) == set(report.kinds)
    assert report.out["noise"]["flagged"]["dose"] == 1.0


def test_evaluate_ood_cli(runner, tiny_bundle_background, tmp_path):
    out = tmp_path / "report"
    result = run(runner, "evaluate-ood", "--model", tiny_bundle_background, "--in", "digits:test",
                 "--out-sets", "digits,noise,digits:val", "--n", "40",
                 "--out", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    kinds = ["bpd", "complexity", "llr", "typicality", "dose"]
    assert doc["kinds"] == kinds and doc["metrics"] == list(METRICS)
    assert doc["in"]["n"] == 40 and set(doc["in"]["mean"]) == set(kinds)
    names = [s["name"] for s in doc["out_sets"]]
    assert names == ["digits", "noise", "digits:val"]
    for entry in doc["out_sets"]:
        assert entry["n"] == 40 and entry["source"]
        for kind in kinds:
            m = entry["metrics"][kind]
            assert set(m) == set(METRICS) and all(0.0 <= v <= 1.0 for v in m.values())
    assert {f.name for f in out.iterdir()} == {"report.md", "results.json", MARKER,
                                               *(f"hist_{k}.png" for k in kinds)}
    assert json.loads((out / "results.json").read_text()) == doc
    report = (out / "report.md").read_text()
    assert "## ROC AUC" in report and "| noise |" in report and "hist_llr.png" in report
    table = run(runner, "evaluate-ood", "--model", tiny_bundle_background, "--out-sets",
                "noise", "--n", "20", "--score", "bpd,complexity")
    assert table.exit_code == 0 and "complexity" in table.stdout and "llr" not in table.stdout


def test_evaluate_ood_cli_errors(runner, tiny_bundle):
    result = run(runner, "evaluate-ood", "--model", tiny_bundle, "--in", "digits:test",
                 "--out-sets", "nope", "--n", "10")
    assert result.exit_code == 2 and "not one of" in result.stderr
    result = run(runner, "evaluate-ood", "--model", tiny_bundle, "--in", "digits:test",
                 "--out-sets", "noise", "--score", "llr")
    assert result.exit_code == 2 and "background model" in result.stderr
    # no background model: llr is left out and said so
    ok = run(runner, "evaluate-ood", "--model", tiny_bundle, "--in", "digits:test",
             "--out-sets", "noise", "--n", "10", "--format", "json")
    doc = json.loads(ok.stdout)
    assert "llr" not in doc["kinds"] and any("llr" in n for n in doc["notes"])


@pytest.mark.parametrize("name", ["characters", "rendered-digits", "strokes", "shapes",
                                  "blobs", "photos", "rot90", "shift", "contrast", "patch"])
def test_new_builtin_sets_are_deterministic_and_dev_differs(name, in_set):
    spec = ImageSpec(1, 28, 28, 256)
    clean = ImageSet(images=torch.from_numpy(np.random.default_rng(0).integers(
        0, 256, (6, 1, 28, 28), dtype=np.uint8)), levels=256, names=list("abcdef"))
    a = make_ood_set(name, spec, clean, 6, seed=0)
    b = make_ood_set(name, spec, clean, 6, seed=0)
    dev = make_ood_set(name + ":dev", spec, clean, 6, seed=0)
    assert a.images.shape == (6, 1, 28, 28) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images)
    if name not in ("rot90", "contrast"):  # deterministic transforms of the same images
        assert not torch.equal(a.images, dev.images)


def test_patch_transform_pastes_white_where_patch_boxes_say():
    from pixeldefend.synthetic import patch_boxes

    spec = ImageSpec(1, 28, 28, 256)
    clean = ImageSet(images=torch.zeros((5, 1, 28, 28), dtype=torch.uint8), levels=256,
                     names=list("abcde"))
    patched = make_ood_set("patch", spec, clean, 5, seed=3).images
    for img, (t, left, b, r) in zip(patched, patch_boxes(spec, 5, 3), strict=True):
        assert (b - t, r - left) == (6, 6)
        assert int(img.sum()) == 36 * 255 and (img[0, t:b, left:r] == 255).all()


def test_ood_types_cover_the_new_categories():
    from pixeldefend.ood import ood_type

    assert ood_type("characters") == "far" and ood_type("characters:dev") == "far"
    assert ood_type("rot90") == "near" and ood_type("patch:dev") == "near"
    assert ood_type("hflip") == "other"
