"""Adaptive attacks and the purifier surrogate, on the shipped digits models.

The shipped models (models/digits, models/digits-classifier) are small real models, so
"Square lowers accuracy through the purifier" and "the sanity checks fail on a broken
attack" are measured on a purifier and a classifier that work."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pixeldefend.adaptive import (
    SuiteSettings,
    attack_column,
    cw_binary_search,
    interpolated_bpd,
    run_square,
    sanity_checks,
    wilson,
)
from pixeldefend.bpda import StraightThroughPurifier
from pixeldefend.data import load_images
from pixeldefend.density import bits_per_dim
from pixeldefend.detector import DensityDetector
from pixeldefend.models.classifier import load_classifier
from pixeldefend.purify import float64_copy, purify_fast
from pixeldefend.surrogate import (
    SoftPurifier,
    agreement,
    hard_fixed_point,
    soft_purify_levels,
)

LEVELS = 17


@pytest.fixture(scope="module")
def models(repo):
    det = DensityDetector.load(repo / "models" / "digits")
    cls = load_classifier(str(repo / "models" / "digits-classifier")).model.eval()
    for p in cls.parameters():
        p.requires_grad_(False)
    return det, cls


@pytest.fixture(scope="module")
def batch(models):
    det, _ = models
    imgs = load_images("digits:test", det.spec).head(24)
    return imgs.images, torch.as_tensor(imgs.labels, dtype=torch.long)


def test_surrogate_gradients_finite_and_nonzero(models, batch):
    det, cls = models
    x = (batch[0][:6].float() / (LEVELS - 1)).requires_grad_(True)
    for st in (False, True):
        soft = SoftPurifier(det.model, 1, temperature=0.5, passes=2, straight_through=st,
                            box_softness=1.0)
        loss = torch.nn.functional.cross_entropy(cls(soft(x)), batch[1][:6])
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all()
        assert grad.abs().sum() > 0


def test_straight_through_forward_is_the_exact_purifier(models, batch):
    det, _ = models
    x = batch[0][:8]
    soft = SoftPurifier(det.model, 1, straight_through=True)
    out = soft(x.float() / (LEVELS - 1))
    assert torch.equal(torch.round(out * (LEVELS - 1)).to(torch.uint8),
                       purify_fast(det.model, x, 1))


def test_hard_fixed_point_is_the_greedy_decoder(models, batch):
    """Any fixed point of the parallel argmax pass is the greedy decoder's output."""
    det, _ = models
    model64 = float64_copy(det.model)
    x = batch[0][:16]
    for eps in (1, 2):
        exact = purify_fast(det.model, x, eps)
        fixed, passes = hard_fixed_point(model64, x, eps)
        assert torch.equal(fixed, exact)
        assert 1 < passes <= x[0].numel() + 1


def test_annealed_surrogate_equals_the_purifier(models, batch):
    """Temperature annealed to ~argmax and enough refinement passes: the soft surrogate's
    output is the exact purifier's, sub-pixel for sub-pixel."""
    det, cls = models
    model64 = float64_copy(det.model)
    x = batch[0][:16]
    exact = purify_fast(det.model, x, 1)
    _, passes = hard_fixed_point(model64, x, 1)
    soft = soft_purify_levels(model64, x.double(), 1, temperature=1e-4, passes=passes)
    assert torch.equal(torch.round(soft).to(torch.uint8), exact)
    # and few passes at a moderate temperature are measurably worse (the report's point)
    rough = agreement(det.model, x, 1, temperature=1.0, passes=1, classifier=cls)
    assert rough.subpixels < 1.0


def test_interpolated_bpd_is_exact_at_integer_images(models, batch):
    det, _ = models
    x = batch[0][:5]
    got = interpolated_bpd(det.model, x.float())
    assert torch.allclose(got.double(), bits_per_dim(det.model, x), atol=1e-4)


def test_square_through_the_purifier_lowers_accuracy(models, batch):
    det, cls = models
    x, y = batch
    defended = StraightThroughPurifier(det.model, cls, 1)
    with torch.no_grad():
        clean = (defended(x.float() / (LEVELS - 1)).argmax(1) == y).float().mean()
    run = run_square(defended, x, y, LEVELS, ball=3, queries=60, seed=0)
    assert (run.adversarial.long() - x.long()).abs().max() <= 3
    after = float(1 - run.fooled.mean())
    assert after < float(clean) - 0.1


def test_sanity_checks_fail_loudly_on_a_zero_step_attack(models, batch):
    det, cls = models
    x, y = batch[0][:12], batch[1][:12]
    broken = SuiteSettings(steps=8, alpha=0.0, box_softness=1.0)
    runs = {"bpda-surrogate|purify@1": attack_column(
        "bpda-surrogate", det.model, cls, "purify", 1, None, x, y, LEVELS, 2, broken)}
    report = sanity_checks(det.model, cls, x, y, LEVELS, 2, ("purify", 1), None, broken,
                           runs, n=12, multipliers=(8,))
    assert not report["passed"]
    failed = {c["name"] for c in report["checks"] if not c["passed"]}
    assert "loss rises: bpda-surrogate|purify@1" in failed
    assert "gradient steps fool images beyond the random start" in failed
    # the same attack with a real step size passes them
    working = SuiteSettings(steps=8, box_softness=1.0)
    runs = {"bpda-surrogate|purify@1": attack_column(
        "bpda-surrogate", det.model, cls, "purify", 1, None, x, y, LEVELS, 2, working)}
    good = sanity_checks(det.model, cls, x, y, LEVELS, 2, ("purify", 1), None, working,
                         runs, n=12, multipliers=(8,))
    assert {c["name"]: c["passed"] for c in good["checks"]}[
        "accuracy falls to ~0% as eps grows"]


def test_cw_binary_search_finds_a_smaller_c(models, batch):
    """With a generous ball, the search settles on a c far below a large fixed c and
    finds smaller (L2) perturbations than that fixed c does."""
    _, cls = models
    x, y = batch[0][:8], batch[1][:8]
    fixed, c_fixed = cw_binary_search(cls, x, y, LEVELS, ball=16, steps=30, search_steps=1,
                                      c_init=100.0)
    found, c_found = cw_binary_search(cls, x, y, LEVELS, ball=16, steps=30, search_steps=5,
                                      c_init=1.0)
    ok = np.isfinite(c_fixed) & np.isfinite(c_found)
    assert ok.sum() >= 4
    assert (c_found[ok] < 100.0).all()
    l2 = lambda a: (a.float() - x.float()).flatten(1).norm(dim=1).numpy()  # noqa: E731
    assert l2(found)[ok].mean() < l2(fixed)[ok].mean()


def test_detector_attack_reports_the_gate(models, batch):
    det, cls = models
    x, y = batch[0][:10], batch[1][:10]
    thr = det.calibrations["bpd"].threshold
    run = attack_column("detector", det.model, cls, "adaptive", 1, thr, x, y, LEVELS, 2,
                        SuiteSettings(steps=6))
    assert run.passes_gate is not None and run.passes_gate.shape == (10,)
    gate = (bits_per_dim(det.model, run.adversarial) <= thr).numpy()
    assert np.array_equal(gate, run.passes_gate)


def test_wilson_interval():
    lo, hi = wilson(50, 200)
    assert math.isclose(lo, 0.1950, abs_tol=5e-4) and math.isclose(hi, 0.3143, abs_tol=5e-4)
    assert wilson(0, 10)[0] == 0.0


def test_evaluate_cli_runs_the_suite(runner, repo, tmp_path):
    from pixeldefend.cli import app

    out = tmp_path / "ev"
    result = runner.invoke(app, [
        "--threads", "1", "evaluate", "-m", str(repo / "models" / "digits"),
        "-c", str(repo / "models" / "digits-classifier"), "-n", "10", "--attacks", "",
        "--eps", "2", "--eps-levels", "--eps-defend", "1", "--defences", "purify,adaptive",
        "--adaptive-attack", "bpda-surrogate,detector,square,cw-bs", "--adaptive-steps",
        "4", "--queries", "10", "--cw-steps", "10", "--sanity-n", "6", "--out", str(out),
        "--format", "json"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    suite = results["adaptive"][0]
    assert set(suite["columns"]) == {"none", "purify@1", "adaptive@1"}
    assert "detector" in suite["columns"]["adaptive@1"]["attacks"]
    assert "sanity" in suite and suite["sanity"]["checks"]
    wc = next(w for w in results["worst_case"] if w["eps"] == 0)
    assert wc["accuracy"]["purify@1"] == suite["columns"]["purify@1"]["worst_case"]["accuracy"]
    assert (out / "adaptive-loss-curves.png").exists()
    assert "Adaptive attacks" in (out / "report.md").read_text()
    assert "SANITY CHECK FAILED" not in result.output


def test_evaluate_cli_shouts_when_the_attack_is_broken(runner, repo, tmp_path):
    """--adaptive-alpha 0 (a zero step size) must make the sanity checks fail loudly."""
    from pixeldefend.cli import app

    out = tmp_path / "broken"
    result = runner.invoke(app, [
        "--threads", "1", "evaluate", "-m", str(repo / "models" / "digits"),
        "-c", str(repo / "models" / "digits-classifier"), "-n", "10", "--attacks", "",
        "--eps", "2", "--eps-levels", "--eps-defend", "1", "--defences", "purify",
        "--adaptive-attack", "bpda-surrogate", "--adaptive-steps", "4",
        "--adaptive-alpha", "0", "--sanity-n", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "SANITY CHECK FAILED" in result.output
    assert "SANITY CHECK FAILED" in (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["adaptive"][0]["sanity"]["passed"] is False
