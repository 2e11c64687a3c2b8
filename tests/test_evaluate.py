"""`pixeldefend evaluate` end to end on digits, its JSON schema, resume, and BPDA.

Models are trained here for real (a tiny PixelCNN from conftest, a tiny ResNet in a
couple of seconds), so "BPDA beats the oblivious attack" is measured on a classifier and
a purifier that actually work, not on random weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pixeldefend.attacks import ATTACK_COST, parse_eps, run_attack
from pixeldefend.bpda import (
    StraightThroughPurifier,
    bpda_attack,
    default_alpha,
    straight_through_quantise,
)
from pixeldefend.cli import app
from pixeldefend.data import load_images
from pixeldefend.defaults import DEFENCES as DEFAULT_DEFENCES
from pixeldefend.detector import DensityDetector
from pixeldefend.errors import UsageError
from pixeldefend.evaluate import (
    COST,
    SCHEMA,
    EvaluateSettings,
    default_eps_defend_list,
    default_eps_list,
    make_plan,
    run_evaluation,
)
from pixeldefend.evaluation import run as run_mod
from pixeldefend.evaluation.defences import DEFENCES as DEFENCE_REGISTRY
from pixeldefend.evaluation.defences import DefenceSpec
from pixeldefend.models.classifier import (
    ClassifierConfig,
    ResNetClassifier,
    load_classifier,
    predict_logits,
    save_classifier,
    train_classifier,
)
from pixeldefend.purify import PurifiedClassifier, purify
from pixeldefend.train import TrainSettings

LEVELS = 17
EPS2 = parse_eps(2, LEVELS, eps_levels=True)  # 0.125 of the range = 2 levels


@pytest.fixture(scope="module")
def classifier_bundle(tmp_path_factory, digits_train) -> Path:
    """A tiny ResNet trained on digits (about 75% test accuracy in a few seconds)."""
    torch.manual_seed(0)
    val = load_images("digits:val")
    model = ResNetClassifier(ClassifierConfig.from_preset("tiny", 1, 8, 8, 10, LEVELS))
    settings = TrainSettings(epochs=8, batch_size=64, lr=5e-3, lr_decay=0.7, seed=0)
    train_classifier(model, digits_train.images, digits_train.labels, val.images,
                     val.labels, settings, torch.device("cpu"))
    path = tmp_path_factory.mktemp("cls") / "digits-classifier"
    save_classifier(path, model.eval(), {"classes": [str(i) for i in range(10)],
                                         "data": {"test": "digits:test"}})
    return path


@pytest.fixture(scope="module")
def detector(tiny_bundle) -> DensityDetector:
    return DensityDetector.load(tiny_bundle, device="cpu")


@pytest.fixture(scope="module")
def classifier(classifier_bundle):
    return load_classifier(str(classifier_bundle), device="cpu")


ARGS = ["--n", "40", "--attacks", "fgsm,pgd", "--eps", "0.125,0.25", "--eps-defend", "2",
        "--bpda-steps", "5", "--bpda-n", "12", "--seed", "1"]


@pytest.fixture(scope="module")
def cli_run(tiny_bundle, classifier_bundle, tmp_path_factory):
    """One small evaluation through the CLI, as JSON on stdout."""
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("eval") / "report"
    result = CliRunner().invoke(app, ["evaluate", "-m", str(tiny_bundle), "-c",
                                      str(classifier_bundle), *ARGS, "-o", str(out),
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


# ------------------------------------------------------------------------- schema


def check_schema(doc: dict) -> None:
    """The results.json contract documented in `pixeldefend.evaluate`."""
    assert doc["schema"] == SCHEMA and doc["tool"] == "pixeldefend"
    cfg = doc["config"]
    for key in ("model", "classifier", "data", "n", "levels", "attacks", "eps", "eps_defend",
                "defences", "adaptive_attack", "bpda", "seed", "batch_size", "device"):
        assert key in cfg, key
    for e in cfg["eps"]:
        assert set(e) == {"text", "fraction", "levels", "ball"} and e["ball"] >= 1
    keys = [c["key"] for c in doc["columns"]]
    assert keys[0] == "none" and len(set(keys)) == len(keys)
    for c in doc["columns"]:
        assert set(c) == {"key", "defence", "eps_defend", "label"}

    def fractions(d: dict) -> None:
        assert set(d) == set(keys)
        assert all(v is None or 0.0 <= v <= 1.0 for v in d.values())

    thr = doc["threshold"]
    assert {"calibrated", "calibrated_fpr", "calibration_n", "fpr5_clean",
            "fpr5_source"} <= set(thr)
    fractions(doc["clean"]["accuracy"])
    assert doc["clean"]["n"] == cfg["n"]
    for r in doc["rows"]:
        assert r["kind"] in ("oblivious", "adaptive")
        assert 0 <= r["eps"] < len(cfg["eps"]) and r["n"] >= 1
        fractions(r["accuracy"])
        fractions(r["clean_accuracy"])
        assert 0.0 <= r["attack_success"] <= 1.0
    for s in doc["strongest"]:
        fractions(s["accuracy"])
        assert set(s["attack"]) == set(keys)
    for w in doc["worst_case"]:
        fractions(w["accuracy"])
    for d in doc["detection"]:
        for key in ("attack", "kind", "eps", "eps_text", "n", "mean_bpd_clean",
                    "mean_bpd_adv", "auroc", "auroc_fooled", "n_fooled", "tpr_calibrated",
                    "tpr_fpr5", "fpr_calibrated"):
            assert key in d, key
        assert 0.0 <= d["auroc"] <= 1.0
    assert doc["timing"]["seconds_total"] >= 0 and doc["timing"]["stages"]
    assert doc["notes"][0].startswith("A defence evaluated only with oblivious attacks is "
                                      "not evaluated")


def test_cli_end_to_end_files_and_schema(cli_run):
    out, doc = cli_run
    check_schema(doc)
    assert json.loads((out / "results.json").read_text()) == doc
    cfg = doc["config"]
    assert cfg["n"] == 40 and cfg["bpda"]["n"] == 12 and cfg["bpda"]["steps"] == 5
    assert [c["key"] for c in doc["columns"]] == ["none", "purify@2", "adaptive@2"]
    kinds = [(r["attack"], r["eps"], r["kind"]) for r in doc["rows"]]
    assert kinds == [("fgsm", 0, "oblivious"), ("pgd", 0, "oblivious"),
                     ("bpda", 0, "adaptive"), ("fgsm", 1, "oblivious"),
                     ("pgd", 1, "oblivious"), ("bpda", 1, "adaptive")]
    bpda_row = doc["rows"][2]
    assert bpda_row["n"] == 12 and set(bpda_row["summary"]) == {"none", "purify@2",
                                                                 "adaptive@2"}
    # the undefended classifier falls to PGD; purification gives some of it back
    pgd = doc["rows"][1]["accuracy"]
    assert pgd["none"] < doc["clean"]["accuracy"]["none"] - 0.3
    assert pgd["purify@2"] > pgd["none"]
    # adaptive PixelDefend leaves nearly all clean images untouched
    assert abs(doc["clean"]["accuracy"]["adaptive@2"] - doc["clean"]["accuracy"]["none"]) \
        <= 0.1
    # gradient attacks at 2 levels are easy to detect with a trained density model
    assert all(d["auroc"] > 0.9 for d in doc["detection"] if d["kind"] == "oblivious")
    # every figure the issue asks for, and a self-contained HTML
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.html", "results.json", "bpd-hist-eps2.png",
            "examples-eps2.png", "nll-maps.png"} <= names
    assert sorted(doc["figures"]) == sorted(n for n in names if n.endswith(".png"))
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(doc["figures"])
    assert not re.search(r"src=['\"](?!data:)", html)
    md = (out / "report.md").read_text()
    assert "A defence evaluated only with oblivious attacks is not evaluated" in md
    assert "BPDA-5 (adaptive)" in md and "| attack | eps | n |" in md
    for f in doc["figures"]:
        assert f"]({f})" in md


def test_resume_skips_finished_stages(cli_run, tiny_bundle, classifier_bundle, monkeypatch):
    from typer.testing import CliRunner

    out, doc = cli_run
    calls = {"attack": 0, "bpda": 0, "purify": 0}
    real = {"attack": run_mod.run_attack, "bpda": run_mod.bpda_attack,
            "purify": run_mod.purify}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)
        return wrapper

    monkeypatch.setattr(run_mod, "run_attack", counting("attack"))
    monkeypatch.setattr(run_mod, "bpda_attack", counting("bpda"))
    monkeypatch.setattr(run_mod, "purify", counting("purify"))
    # an interrupted run: the last PGD stage and everything after it never got written
    (out / "cache" / "attack-pgd-eps4.npz").unlink()
    (out / "cache" / "bpda-eps4-purify-e2.npz").unlink()
    args = ["evaluate", "-m", str(tiny_bundle), "-c", str(classifier_bundle), *ARGS,
            "-o", str(out), "--format", "json", "--no-figures"]
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    # those two stages run again (the BPDA one ends with one purification to check its
    # images); the attack is seeded, so its purified versions stay valid in the cache
    assert calls == {"attack": 1, "bpda": 1, "purify": 1}
    again = json.loads(result.stdout)
    for key in ("strongest", "detection", "clean", "worst_case"):
        assert again[key] == doc[key], key

    def numbers(rows):  # the attacks' own summaries hold their (new) run times
        return [{k: v for k, v in r.items() if k != "summary"} for r in rows]

    assert numbers(again["rows"]) == numbers(doc["rows"])
    # resuming with everything cached runs nothing at all
    calls.update(attack=0, bpda=0, purify=0)
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0 and calls == {"attack": 0, "bpda": 0, "purify": 0}
    # a changed option re-runs only what it affects (BPDA steps: the BPDA stages)
    changed = [a if a != "5" else "4" for a in args]
    result = CliRunner().invoke(app, [*changed, "--resume"])
    assert result.exit_code == 0 and calls["attack"] == 0 and calls["bpda"] == 6


def test_cli_refuses_foreign_folder_and_bad_eps(tiny_bundle, classifier_bundle, tmp_path,
                                                runner):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    base = ["evaluate", "-m", str(tiny_bundle), "-c", str(classifier_bundle), "--n", "5"]
    result = runner.invoke(app, [*base, "-o", str(foreign)])
    assert result.exit_code == 2 and "refusing" in result.output
    # 8/255 is half a level of 17-level digits: a quantised attack could do nothing
    result = runner.invoke(app, [*base, "--eps", "8/255", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "less than one" in result.output
    result = runner.invoke(app, [*base, "--defences", "purify,magic",
                                 "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "magic" in result.output


def test_defaults_scale_to_the_levels():
    assert [t for t, _ in default_eps_list(256)] == ["8/255", "25/255"]
    assert [b.ball for _, b in default_eps_list(256)] == [8, 25]
    assert [b.ball for _, b in default_eps_list(LEVELS)] == [1, 2]
    assert default_eps_defend_list(256) == [16, 32]
    assert default_eps_defend_list(LEVELS) == [1, 2]
    with pytest.raises(UsageError):
        EvaluateSettings(attacks=("fgsm", "nope")).checked()
    assert EvaluateSettings(defences=("purify",)).checked().defences == ("none", "purify")


def test_adaptive_needs_a_calibration(tiny_bundle, classifier, tmp_path, digits_test):
    det = DensityDetector.load(tiny_bundle, device="cpu")
    det.calibrations = {}
    settings = EvaluateSettings(attacks=("fgsm",), eps=("2",), eps_levels=True,
                                eps_defend=(1,), adaptive_attack=None)
    with pytest.raises(UsageError, match="calibrat"):
        run_evaluation(det, classifier, digits_test.head(4), settings, tmp_path)
    settings.defences = ("none", "purify")
    ev = run_evaluation(det, classifier, digits_test.head(4), settings, tmp_path)
    assert ev.results["threshold"]["calibrated"] is None
    assert ev.results["detection"][0]["tpr_calibrated"] is None


# --------------------------------------------------------------------------- BPDA


def test_straight_through_gradient_flows(detector, classifier, digits_test):
    """Backward through quantisation and purification is the identity: the gradient at
    x equals the classifier's gradient at the purified image."""
    x = (digits_test.images[:6].float() / 16 + 0.01).requires_grad_(True)
    defended = StraightThroughPurifier(detector.model, classifier.model, 2)
    loss = defended(straight_through_quantise(x, LEVELS)).logsumexp(1).sum()
    (grad,) = torch.autograd.grad(loss, x)
    q = torch.round(x.detach() * 16).to(torch.uint8)
    z = (purify(detector, q, 2).images.float() / 16).requires_grad_(True)
    (expected,) = torch.autograd.grad(classifier.model(z).logsumexp(1).sum(), z)
    assert grad.abs().sum() > 0
    assert torch.allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_straight_through_purifier_matches_purified_classifier(detector, classifier,
                                                                digits_test, adaptive):
    """The BPDA target computes exactly what purify.PurifiedClassifier computes."""
    clean = digits_test.images[:10]
    noisy = (clean.long() + torch.randint(-3, 4, clean.shape,
                                          generator=torch.Generator().manual_seed(0)))
    x = torch.cat([clean, noisy.clamp(0, 16).to(torch.uint8)]).float() / 16
    threshold = detector.threshold if adaptive else None
    ours = StraightThroughPurifier(detector.model, classifier.model, 2, threshold)
    theirs = PurifiedClassifier(detector, classifier, 2, adaptive=adaptive)
    assert torch.equal(ours(x), theirs(x))
    if adaptive:
        assert 0 < ours.purified_last < len(x)


def test_bpda_stays_in_the_ball_quantised_and_seeded(detector, classifier, digits_test):
    x, y = digits_test.images[:16], digits_test.labels[:16]
    defended = StraightThroughPurifier(detector.model, classifier.model, 1)
    a = bpda_attack(defended, x, y, LEVELS, EPS2, steps=4, seed=3)
    b = bpda_attack(defended, x, y, LEVELS, EPS2, steps=4, seed=3)
    assert a.adversarial.dtype == torch.uint8 and torch.equal(a.adversarial, b.adversarial)
    assert (a.adversarial.long() - x.long()).abs().max() <= 2
    assert int(a.adversarial.max()) <= LEVELS - 1
    # the kept iterate's defended prediction is what purification + classifier say
    check = purify(detector, a.adversarial, 1).images
    pred = predict_logits(classifier.model, check, LEVELS).argmax(1)
    assert torch.equal(pred, a.defended_pred)
    fooled = a.first_success >= 0
    assert np.array_equal(fooled, (a.defended_pred != y).numpy())
    assert a.summary["eot"] == 1 and a.summary["alpha"] == pytest.approx(
        default_alpha(2 / 16, 4))
    with pytest.raises(UsageError):
        bpda_attack(defended, x, y, LEVELS, EPS2, steps=0)


def test_bpda_beats_the_oblivious_attack_on_trained_models(detector, classifier,
                                                           digits_test):
    """On a real classifier and purifier, PGD that ignores the purifier loses much of its
    effect after purification; BPDA, attacking through it, takes it back."""
    x, y = digits_test.images[:60], digits_test.labels[:60]
    eps_defend = 2

    def purified_accuracy(images: torch.Tensor) -> float:
        p = purify(detector, images, eps_defend).images
        return float((predict_logits(classifier.model, p, LEVELS).argmax(1) == y)
                     .float().mean())

    oblivious = run_attack(classifier, x, y, LEVELS, "pgd", EPS2, seed=0)
    assert float((oblivious.adv_pred == y).float().mean()) < 0.15  # PGD works undefended
    acc_oblivious = purified_accuracy(oblivious.adversarial)
    defended = StraightThroughPurifier(detector.model, classifier.model, eps_defend)
    adaptive = bpda_attack(defended, x, y, LEVELS, EPS2, steps=20, seed=0)
    acc_bpda = purified_accuracy(adaptive.adversarial)
    assert acc_bpda == pytest.approx(float((adaptive.defended_pred == y).float().mean()))
    assert acc_bpda <= acc_oblivious - 0.05, (acc_oblivious, acc_bpda)


def test_bpda_only_at_the_chosen_eps(detector, classifier, digits_test, tmp_path):
    settings = EvaluateSettings(attacks=("fgsm",), eps=("1", "2"), eps_levels=True,
                                eps_defend=(1,), defences=("purify",), bpda_steps=2,
                                bpda_n=6, bpda_eps=("2",))
    res = run_evaluation(detector, classifier, digits_test.head(10), settings, tmp_path).results
    assert [(r["attack"], r["eps"], r["n"]) for r in res["rows"]] == [
        ("fgsm", 0, 10), ("fgsm", 1, 10), ("bpda", 1, 6)]
    assert [(w["eps"], w["n"], w["attacks"]) for w in res["worst_case"]] == [
        (0, 10, ["fgsm"]), (1, 6, ["fgsm", "bpda"])]
    assert res["config"]["bpda"]["eps"] == [2]
    with pytest.raises(UsageError, match="bpda_eps must be among"):
        run_evaluation(detector, classifier, digits_test.head(10),
                       EvaluateSettings(attacks=("fgsm",), eps=("1",), eps_levels=True,
                                        bpda_eps=("3",)), tmp_path)


# ------------------------------------------------------- plan and defence registry


def test_stage_names_are_unique_and_stable():
    """Stage names are cache file names: --resume needs them the same run after run."""
    settings = EvaluateSettings(attacks=("fgsm", "pgd"), eps=("0.125", "0.25"),
                                eps_defend=(2,), bpda_n=12).checked()
    plan = make_plan(settings, LEVELS, 40, 3.0, {"model": "m"})
    assert list(plan.stages) == [
        "clean", "attack-fgsm-eps2", "attack-fgsm-eps4", "attack-pgd-eps2",
        "attack-pgd-eps4", "purify-clean-e2", "purify-fgsm-eps2-e2", "purify-fgsm-eps4-e2",
        "purify-pgd-eps2-e2", "purify-pgd-eps4-e2", "bpda-eps2-none",
        "bpda-eps2-purify-e2", "bpda-eps2-adaptive-e2", "bpda-eps4-none",
        "bpda-eps4-purify-e2", "bpda-eps4-adaptive-e2"]
    keys = [json.dumps(s.key, sort_keys=True) for s in plan.stages.values()]
    assert len(set(keys)) == len(keys)  # no two stages could share a cache entry
    again = make_plan(settings, LEVELS, 40, 3.0, {"model": "m"})
    assert [s.key for s in again.stages.values()] == [s.key for s in plan.stages.values()]
    # a purification names its input by the key of the attack that made it
    assert plan.stages["purify-pgd-eps4-e2"].key["input"] == \
        plan.stages["attack-pgd-eps4"].key
    assert plan.stages["bpda-eps4-purify-e2"].items == 12 * (settings.bpda_steps + 2)
    assert plan.stages["bpda-eps4-none"].items == 12 * (settings.bpda_steps + 1)


def test_cache_files_are_the_planned_stages(cli_run):
    out, doc = cli_run
    settings = EvaluateSettings(attacks=("fgsm", "pgd"), eps=("0.125", "0.25"),
                                eps_defend=(2,), bpda_n=12).checked()
    plan = make_plan(settings, LEVELS, 40, 3.0, {})
    assert {p.stem for p in (out / "cache").glob("*.npz")} == set(plan.stages)


def test_defence_registry_is_the_one_place():
    assert tuple(DEFENCE_REGISTRY) == DEFAULT_DEFENCES
    assert COST["bpda-purify"] == DEFENCE_REGISTRY["purify"].bpda_cost
    assert COST["pgd"] == ATTACK_COST["pgd"]


def test_a_registered_defence_appears_in_the_table(detector, classifier, digits_test,
                                                   tmp_path, monkeypatch):
    """One registry entry is a whole new column: accuracy, BPDA, worst case, labels."""
    reject = DefenceSpec("reject", "refuse images above the threshold (counted wrong)",
                         "reject flagged",
                         lambda undefended, purified, flagged: np.where(flagged, -1, undefended),
                         purifies=False, gated=True, bpda_cost=0.01)
    monkeypatch.setitem(DEFENCE_REGISTRY, "reject", reject)
    settings = EvaluateSettings(attacks=("fgsm",), eps=("2",), eps_levels=True,
                                eps_defend=(1,), defences=("reject",), bpda_steps=2, bpda_n=6)
    ev = run_evaluation(detector, classifier, digits_test.head(10), settings, tmp_path)
    res = ev.results
    assert [(c["key"], c["label"]) for c in res["columns"]] == [
        ("none", "no defence"), ("reject", "reject flagged")]
    flagged = ev.clean_bpd > res["threshold"]["calibrated"]
    y = ev.labels.numpy()
    expected = float(np.mean(np.where(flagged, -1, ev.clean_pred) == y))
    assert res["clean"]["accuracy"]["reject"] == pytest.approx(expected)
    bpda = [r for r in res["rows"] if r["attack"] == "bpda"]
    assert len(bpda) == 1 and set(bpda[0]["accuracy"]) == {"none", "reject"}
    assert set(res["worst_case"][0]["accuracy"]) == {"none", "reject"}
    assert (tmp_path / "cache" / "bpda-eps2-reject.npz").exists()
    from pixeldefend.report import accuracy_table, markdown_table

    assert "reject flagged" in markdown_table(accuracy_table(res))
