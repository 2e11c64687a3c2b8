"""Attacks against a classifier trained for real on digits: every method lowers its
accuracy, results are quantised and stay inside the eps ball, the CLI writes what it
says and fails cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pixeldefend.attacks import (
    METHODS,
    Eps,
    default_eps,
    make_attack,
    parse_eps,
    quantise,
    run_attack,
)
from pixeldefend.cli import app
from pixeldefend.data import load_images
from pixeldefend.errors import DataError, UsageError
from pixeldefend.models.classifier import ClassifierConfig, ResNetClassifier, save_classifier
from pixeldefend.models.classifier_training import train_classifier
from pixeldefend.models.loading import load_classifier
from pixeldefend.train import TrainSettings

LEVELS = 17
EPS = Eps(3 / 16, 3.0)  # three of the 16 steps between black and white


@pytest.fixture(scope="module")
def clf_bundle(tmp_path_factory, digits_train):
    """A small ResNet trained on digits (about 95% test accuracy), saved as a bundle."""
    torch.manual_seed(0)
    val = load_images("digits:val")
    model = ResNetClassifier(ClassifierConfig.from_preset("tiny", 1, 8, 8, 10, LEVELS))
    settings = TrainSettings(epochs=10, batch_size=64, lr=5e-3, lr_decay=0.75, seed=0)
    train_classifier(model, digits_train.images, digits_train.labels, val.images, val.labels,
                     settings, torch.device("cpu"))
    path = tmp_path_factory.mktemp("attack") / "clf"
    save_classifier(path, model, {"classes": [str(i) for i in range(10)],
                                  "data": {"test": "digits:test"}})
    return path


@pytest.fixture(scope="module")
def loaded(clf_bundle):
    return load_classifier(clf_bundle, device="cpu")


@pytest.fixture(scope="module")
def batch():
    test = load_images("digits:test")
    return test.images[:64], test.labels[:64]


def _check_invariants(result, clean, ball):
    adv = result.adversarial
    assert adv.dtype == torch.uint8 and adv.shape == clean.shape
    assert int(adv.max()) <= LEVELS - 1
    assert int((adv.long() - clean.long()).abs().max()) <= ball
    assert result.summary["max_linf"] <= ball


PARAMS = {
    "rand": {"eps": Eps(6 / 16, 6.0)},  # noise needs a bigger budget to hurt at all
    "fgsm": {},
    "bim": {"steps": 5},
    "pgd": {"steps": 5},
    "cw": {"c": 10.0, "kappa": 5.0, "lr": 0.05, "steps": 30},
    "deepfool": {"overshoot": 0.5, "steps": 10},
    "autoattack": {},
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lowers_accuracy(method, loaded, batch):
    images, labels = batch
    params = dict(PARAMS[method])
    eps = params.pop("eps", EPS)
    n = 24 if method in ("deepfool", "autoattack") else 64
    result = run_attack(loaded, images[:n], labels[:n], LEVELS, method, eps, seed=0, **params)
    s = result.summary
    assert s["clean_accuracy"] > 0.85
    assert s["adversarial_accuracy"] < s["clean_accuracy"] - 0.1, s
    assert s["attack_success_rate"] > 0.1
    assert s["clipped_to_eps_ball"] == (method in ("cw", "deepfool"))
    _check_invariants(result, images[:n], eps.ball)
    assert len(result.records) == n
    assert {"label", "clean_pred", "adv_pred", "linf", "l2"} <= set(result.records[0])


def test_pgd_beats_fgsm_beats_noise(loaded, batch):
    images, labels = batch
    acc = {m: run_attack(loaded, images, labels, LEVELS, m, EPS, steps=10)
           .summary["adversarial_accuracy"] for m in ("rand", "fgsm", "pgd")}
    assert acc["pgd"] <= acc["fgsm"] < acc["rand"]


def test_seeded_and_deterministic(loaded, batch):
    images, labels = batch
    a = run_attack(loaded, images, labels, LEVELS, "pgd", EPS, steps=3, seed=7)
    b = run_attack(loaded, images, labels, LEVELS, "pgd", EPS, steps=3, seed=7)
    assert torch.equal(a.adversarial, b.adversarial)
    state = torch.get_rng_state()
    run_attack(loaded, images, labels, LEVELS, "rand", EPS, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


@pytest.mark.parametrize("method", ["pgd", "rand"])
def test_a_batch_result_does_not_depend_on_the_split(loaded, batch, method):
    """Batch k is seeded from (seed, k) alone: attacking only batch 2 (a torchrun rank's
    share) gives what the one-process run gives for it, and equal images in different
    batches get different random draws."""
    from pixeldefend.attacks import _attack_batches, make_attack

    images, labels = batch
    images, labels = torch.cat([images[:16]] * 3), torch.cat([labels[:16]] * 3)
    attack = make_attack(method, loaded, eps=3 / 16, steps=2, levels=LEVELS)
    args = (attack, images, labels, None, LEVELS, 3, 5, 16, torch.device("cpu"), None)
    whole = _attack_batches(*args)
    alone = _attack_batches(*args, range(2, 3))
    assert len(whole) == 3 and len(alone) == 1
    assert torch.equal(alone[0], whole[2])
    assert not torch.equal(whole[0], whole[1])  # a new random draw per batch
    assert torch.equal(run_attack(loaded, images, labels, LEVELS, method, EPS, steps=2,
                                  seed=5, batch_size=16).adversarial, torch.cat(whole))


def test_targeted_pgd_hits_its_targets(loaded, batch):
    images, labels = batch
    result = run_attack(loaded, images, labels, LEVELS, "pgd", Eps(5 / 16, 5.0), steps=20,
                        targeted=True, seed=3)
    assert result.targets is not None
    assert (result.targets != labels).all()
    hit = (result.adv_pred == result.targets).float().mean()
    assert hit > 0.5 and result.summary["attack_success_rate"] > 0.5
    with pytest.raises(UsageError, match="targeted"):
        run_attack(loaded, images, labels, LEVELS, "deepfool", EPS, targeted=True)


def test_eps_below_one_level_is_a_no_op_with_a_warning(loaded, batch):
    images, labels = batch
    result = run_attack(loaded, images, labels, LEVELS, "fgsm", "8/255")
    assert result.summary["eps_ball_levels"] == 0
    assert torch.equal(result.adversarial, images)
    assert result.summary["warnings"] and "less than one level" in result.summary["warnings"][0]


def test_parse_eps():
    assert parse_eps("8/255", 256) == pytest.approx((8 / 255, 8.0))
    assert parse_eps("8/255", 256).ball == 8
    assert parse_eps("0.03", 256).ball == 7
    assert parse_eps("2", 17, eps_levels=True) == pytest.approx((0.125, 2.0))
    assert parse_eps("0.125", 17).ball == 2
    assert parse_eps(1, 17).ball == 16
    assert default_eps(17).ball == 1 and default_eps(256).ball == 8
    for bad in ("0", "-0.1", "1.5", "abc", "1/0", "nan", "2/1"):
        with pytest.raises(UsageError):
            parse_eps(bad, 256)
    with pytest.raises(UsageError):
        parse_eps("17", 17, eps_levels=True)


def test_quantise_rounds_and_clips():
    torch.manual_seed(0)
    clean = torch.randint(0, LEVELS, (20, 1, 8, 8), dtype=torch.uint8)
    adv = torch.rand(20, 1, 8, 8) * 1.4 - 0.2  # wild values, outside [0, 1] too
    q = quantise(adv, clean, LEVELS, 2)
    assert q.dtype == torch.uint8 and int(q.max()) <= 16
    assert int((q.long() - clean.long()).abs().max()) <= 2
    exact = clean.float() / 16 + 1 / 16
    assert torch.equal(quantise(exact, clean, LEVELS, 1),
                       (clean.long() + 1).clamp(max=16).to(torch.uint8))


def test_make_attack_api(loaded, batch):
    images, labels = batch
    x = images.float() / 16
    attack = make_attack("fgsm", loaded, eps=2 / 16)
    adv = attack(x, labels)
    assert adv.is_floating_point() and (adv - x).abs().max() <= 2 / 16 + 1e-6
    with pytest.raises(UsageError, match="unknown attack"):
        make_attack("nope", loaded, eps=0.1)
    with pytest.raises(UsageError, match="needs eps"):
        make_attack("pgd", loaded)
    with pytest.raises(UsageError, match="float"):
        attack(images, labels)
    # a bare nn.Module works too
    bare = make_attack("pgd", loaded.model, eps=0.1, steps=2)
    assert bare(x[:4], labels[:4]).shape == x[:4].shape


def test_run_attack_rejects_mismatches(loaded, batch):
    images, labels = batch
    with pytest.raises(UsageError, match="labels go up to"):
        run_attack(loaded, images[:4], torch.tensor([1, 2, 3, 40]), LEVELS, "fgsm", EPS)
    with pytest.raises(DataError, match="expects"):
        run_attack(loaded, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), labels[:2], LEVELS,
                   "fgsm", EPS)
    with pytest.raises(DataError, match="trained on 17"):
        run_attack(loaded, images, labels, 256, "fgsm", EPS)
    with pytest.raises(DataError, match="uint8"):
        run_attack(loaded, images.float(), labels, LEVELS, "fgsm", EPS)


# ------------------------------------------------------------------------------- CLI


def test_cli_attack_writes_pngs_manifest_and_npz(runner, clf_bundle, tmp_path):
    out = tmp_path / "adv"
    result = runner.invoke(app, ["attack", "--classifier", str(clf_bundle), "--method", "pgd",
                                 "--eps", "2", "--eps-levels", "--steps", "5", "-n", "30",
                                 "--out", str(out), "--format", "json", "--seed", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing but JSON on stdout
    assert summary["n"] == 30 and summary["eps_ball_levels"] == 2
    assert summary["adversarial_accuracy"] < summary["clean_accuracy"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "pgd" and manifest["seed"] == 4
    assert manifest["params"]["steps"] == 5
    assert len(manifest["images"]) == 30
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 30
    first = manifest["images"][0]
    assert first["file"] in pngs and f"label{first['label']}" in first["file"]
    assert first["name"].startswith("digits:test:")
    # exact reload, also through the data layer (levels are stored)
    with np.load(out / "images.npz") as npz:
        assert int(npz["levels"]) == LEVELS
        assert (np.abs(npz["images"].astype(int) - npz["clean"].astype(int)) <= 2).all()
        adv_pred = npz["adv_pred"]
    reloaded = load_images(str(out / "images.npz"))
    assert reloaded.levels == LEVELS and len(reloaded) == 30
    assert [r["adv_pred"] for r in manifest["images"]] == adv_pred.tolist()
    # a PNG holds the same pixels as the npz
    pngs_back = load_images(str(out / first["file"]), reloaded.spec)
    assert torch.equal(pngs_back.images[0], reloaded.images[0])
    # rerun into the same folder: refused, then with --overwrite replaced whole
    args = ["attack", "--classifier", str(clf_bundle), "--method", "fgsm", "--eps", "0.125",
            "-n", "5", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 2
    again = runner.invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert len(list(out.glob("*.png"))) == 5
    assert "adversarial accuracy" in again.stdout


def test_cli_attack_image_folder_with_labels(runner, clf_bundle, tmp_path):
    from pixeldefend.data import save_image

    test = load_images("digits:test")
    for i in range(12):
        label = int(test.labels[i])
        save_image(tmp_path / "in" / str(label) / f"img{i}.png", test.images[i], LEVELS)
    result = runner.invoke(app, ["attack", str(tmp_path / "in"), "-c", str(clf_bundle),
                                 "--method", "fgsm", "--eps", "3", "--eps-levels",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 12 and summary["labels_from"] == "data"
    assert summary["clean_accuracy"] > 0.7


def test_cli_attack_errors_exit_2(runner, clf_bundle, tmp_path):
    base = ["attack", "--classifier", str(clf_bundle), "-n", "4"]
    cases = [
        (["--method", "nope"], "unknown --method"),
        (["--eps", "0"], "outside (0, 1]"),
        (["--eps", "1.5"], "outside (0, 1]"),
        (["--eps", "40", "--eps-levels"], "levels"),
        (["--method", "deepfool", "--targeted", "--eps", "0.2"], "targeted"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)
    # images that do not fit the classifier
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((3, 1, 28, 28), np.uint8), labels=np.zeros(3, np.int64))
    result = runner.invoke(app, base + ["--data", str(wrong)])
    assert result.exit_code == 2 and "expects" in result.output
    # a classifier whose outputs do not cover the labels
    five = tmp_path / "five"
    save_classifier(five, ResNetClassifier(ClassifierConfig.from_preset("tiny", 1, 8, 8, 5,
                                                                       LEVELS)))
    result = runner.invoke(app, ["attack", "-c", str(five), "--data", "digits:test",
                                 "--method", "fgsm"])
    assert result.exit_code == 2 and "labels go up to 9" in result.output
    # missing classifier; output folder that is not ours
    result = runner.invoke(app, ["attack", "-c", str(tmp_path / "none"), "--data", "digits"])
    assert result.exit_code == 2 and "no such classifier" in result.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = runner.invoke(app, base + ["--out", str(tmp_path / "mine")])
    assert result.exit_code == 2 and "refusing" in result.output
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_cli_help_has_examples(runner):
    for args in (["attack", "--help"], ["classifier", "train", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "pixeldefend" in result.output
        assert "Example" in result.output


def test_cli_attack_fashion_mnist_at_8_over_255(runner, repo):
    """On 256-level images 8/255 is exactly 8 levels; the shipped classifier breaks."""
    bundle = repo / "models" / "fashion-classifier"
    if not bundle.exists():
        pytest.skip("models/fashion-classifier not built")
    try:
        load_images("fashion-mnist:test")
    except DataError:
        pytest.skip("Fashion-MNIST files not installed")
    result = runner.invoke(app, ["attack", "-c", str(bundle), "-n", "48", "--method", "pgd",
                                 "--eps", "8/255", "--steps", "5", "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["data"] == "fashion-mnist:test[:48]" and summary["eps_ball_levels"] == 8
    assert summary["clean_accuracy"] > 0.8 and summary["adversarial_accuracy"] < 0.5


def test_attack_pipeline_from_python(tmp_path):
    """The `attack` pipeline runs without the CLI: labels from the data, the summary the
    CLI prints, and the output folder it writes."""
    import json

    from pixeldefend.attack_pipeline import (
        attack_dataset,
        attack_manifest,
        load_attack_images,
        write_attack_output,
    )
    from pixeldefend.models.loading import as_loaded

    torch.manual_seed(0)
    loaded = as_loaded(ResNetClassifier(ClassifierConfig.from_preset("tiny", 1, 8, 8, 10, 17)))
    images = load_attack_images(loaded, "digits:test", n=4)
    summary, result = attack_dataset(loaded, images, "fgsm", "2", eps_levels=True)
    assert summary["labels_from"] == "data" and summary["n"] == 4
    assert summary["eps_ball_levels"] == 2 and int(result.linf.max()) <= 2
    manifest = attack_manifest(summary, result)
    write_attack_output(tmp_path / "adv", images, result, manifest)
    saved = json.loads((tmp_path / "adv" / "manifest.json").read_text())
    assert [r["file"] for r in saved["images"]] == [r["file"] for r in manifest["images"]]
    assert all((tmp_path / "adv" / r["file"]).is_file() for r in saved["images"])


def test_attack_registry_is_the_one_place():
    """The CLI's choice list is the registry's keys (read without PyTorch: the registry
    module imports none), and every derived table comes from the registry's entries."""
    from pixeldefend import attack_registry, attacks, defaults

    assert tuple(attacks.ATTACKS) == attacks.METHODS == attack_registry.METHODS
    assert attacks.ATTACKS is attack_registry.ATTACKS and not hasattr(defaults, "METHODS")
    assert attacks.TARGETED_METHODS == ("fgsm", "bim", "pgd", "cw")
    assert attacks.L2_METHODS == ("cw", "deepfool")
    assert attacks.DEFAULT_STEPS == {"bim": 10, "pgd": 10, "cw": 50, "deepfool": 50}
    assert set(attacks.ATTACK_COST) == set(attacks.METHODS)
    for name, spec in attacks.ATTACKS.items():
        assert spec.name == name and spec.help and spec.norm in ("linf", "l2")
        assert spec.cost > 0 and set(spec.needs) <= {"eps", "num_classes"}
    with pytest.raises(UsageError, match="choose from"):
        attacks.attack_spec("nope")


# The example of CONTRIBUTING.md "A new attack": the whole change is this factory and
# entry in pixeldefend/attack_registry.py; here they are registered for one test.
def _build_mifgsm(net, p):
    import torchattacks

    from pixeldefend.attack_registry import _step_size

    alpha, steps = _step_size(p), p["steps"]
    return torchattacks.MIFGSM(net, eps=float(p["eps"]), alpha=alpha, steps=steps), \
        {"alpha": alpha, "steps": steps}


def test_a_new_attack_is_one_entry(loaded, batch, monkeypatch):
    from pixeldefend import attack_registry

    spec = attack_registry.AttackSpec("mifgsm", "momentum iterative FGSM (Dong et al. 2018)",
                                      _build_mifgsm, default_steps=10, targeted=True)
    monkeypatch.setitem(attack_registry.ATTACKS, "mifgsm", spec)
    images, labels = batch
    result = run_attack(loaded, images[:64], labels[:64], LEVELS, "mifgsm", EPS, seed=0)
    s = result.summary
    assert s["method"] == "mifgsm" and s["params"]["steps"] == 10
    assert s["adversarial_accuracy"] < s["clean_accuracy"] - 0.1, s
    _check_invariants(result, images[:64], EPS.ball)
