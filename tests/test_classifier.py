"""Classifier: training for real on digits, bundles, and the three kinds users bring."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from pixeldefend.bundle import save_bundle
from pixeldefend.cli import app
from pixeldefend.data import load_images
from pixeldefend.errors import BundleError, DataError, UsageError
from pixeldefend.models.classifier import ClassifierConfig, ResNetClassifier, save_classifier
from pixeldefend.models.classifier_training import error_rate, random_shift, train_classifier
from pixeldefend.models.loading import check_inputs, classify, load_classifier
from pixeldefend.pixels import to_float
from pixeldefend.train import TrainSettings

LEVELS = 17


@pytest.fixture(scope="module")
def trained(digits_train):
    """A tiny ResNet trained on digits in a few seconds (not a random model)."""
    torch.manual_seed(0)
    val = load_images("digits:val")
    cfg = ClassifierConfig.from_preset("tiny", 1, 8, 8, 10, LEVELS)
    model = ResNetClassifier(cfg)
    settings = TrainSettings(epochs=8, batch_size=64, lr=5e-3, lr_decay=0.7, seed=0)
    result = train_classifier(model, digits_train.images, digits_train.labels, val.images,
                              val.labels, settings, torch.device("cpu"))
    return model.eval(), result


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("cls") / "digits-classifier"
    save_classifier(path, trained[0], {"classes": [str(i) for i in range(10)],
                                       "data": {"test": "digits:test"}})
    return path


def _logits(model, images):
    with torch.no_grad():
        return model(to_float(images, LEVELS))


def test_forward_shape_and_presets():
    for h, stride in ((8, 1), (28, 2)):
        cfg = ClassifierConfig.from_preset("small", 1, h, h, 7, 256)
        assert cfg.stem_stride == stride
        out = ResNetClassifier(cfg).eval()(torch.rand(3, 1, h, h))
        assert out.shape == (3, 7)
    with pytest.raises(UsageError):
        ClassifierConfig.from_preset("huge", 1, 8, 8, 10, 17)


def test_random_shift_moves_content_but_keeps_shape():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    y = random_shift(x, 1)
    assert y.shape == x.shape
    assert torch.equal(random_shift(x, 0), x)
    assert (y.sum((1, 2, 3)) == 4).all()  # a 1-pixel shift never crops the centre blob
    assert not torch.equal(y, x)


def test_trained_classifier_learns_digits(trained, digits_test):
    model, result = trained
    acc = 1 - error_rate(model, digits_test.images, digits_test.labels, LEVELS)
    assert acc > 0.85, acc
    assert result.best_val < 0.2
    assert len(result.history) == 8


def test_bundle_roundtrip(bundle, trained, digits_test):
    loaded = load_classifier(str(bundle), device="cpu")
    assert loaded.kind == "bundle"
    assert (loaded.num_classes, loaded.input_shape, loaded.levels) == (10, (1, 8, 8), LEVELS)
    assert loaded.classes == [str(i) for i in range(10)]
    assert not loaded.model.training
    images = digits_test.images[:50]
    assert torch.allclose(_logits(loaded.model, images), _logits(trained[0], images), atol=1e-5)
    config = json.loads((bundle / "config.json").read_text())
    assert config["kind"] == "classifier"
    assert config["architecture"]["num_classes"] == 10
    assert not list(bundle.glob("*.pt")) and not list(bundle.glob("*.pkl"))


def test_classify_helper(bundle, digits_test):
    loaded = load_classifier(bundle, device="cpu")
    pred, probs = classify(loaded, digits_test.images, LEVELS, batch_size=64)
    assert pred.shape == (len(digits_test),)
    assert torch.allclose(probs.sum(1), torch.ones(len(digits_test)), atol=1e-5)
    assert (pred == digits_test.labels).float().mean() > 0.85


def test_torchscript_file(tmp_path, trained, digits_test):
    path = tmp_path / "model.pt"
    torch.jit.trace(trained[0], torch.rand(2, 1, 8, 8)).save(str(path))
    loaded = load_classifier(path, device="cpu", input_shape=(1, 8, 8), trust_code=True)
    assert loaded.kind == "torchscript" and loaded.num_classes == 10
    images = digits_test.images[:40]
    assert torch.allclose(_logits(loaded.model, images), _logits(trained[0], images), atol=1e-5)
    # shape unknown up front: found from the data
    lazy = load_classifier(path, device="cpu", trust_code=True)
    assert lazy.num_classes is None
    assert check_inputs(lazy, images, digits_test.labels[:40]) == 10


FACTORY_MODULE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))

def build():
    return Net()

def not_a_model():
    return 42

def broken():
    raise RuntimeError("no GPU here")
"""


@pytest.fixture()
def factory(tmp_path, monkeypatch):
    module = f"user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield module, tmp_path
    sys.modules.pop(module, None)


def test_factory_with_state_dict(factory, digits_train, digits_test):
    module, tmp_path = factory
    net = __import__(module).build()
    # a real (if linear) classifier: a few full-batch steps on digits
    x, y = to_float(digits_train.images, LEVELS), digits_train.labels
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    for loaded in (load_classifier(f"{module}:build", trust_code=True, device="cpu",
                                   factory_weights=weights),
                   load_classifier(f"{module}:build@{weights}", trust_code=True, device="cpu")):
        assert loaded.kind == "factory"
        pred, _ = classify(loaded, digits_test.images, LEVELS)
        assert (pred == digits_test.labels).float().mean() > 0.8


def test_mean_std_are_folded_into_the_model(factory):
    module, tmp_path = factory
    net = __import__(module).build().eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    loaded = load_classifier(f"{module}:build", trust_code=True, device="cpu", mean=[0.25],
                             std=[0.5], factory_weights=tmp_path / "w.pt")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net((x - 0.25) / 0.5), atol=1e-6)
    with pytest.raises(UsageError, match="together"):
        load_classifier(f"{module}:build", trust_code=True, mean=[0.5])


def test_factory_errors(factory):
    module, tmp_path = factory
    with pytest.raises(UsageError, match="cannot import"):
        load_classifier("no_such_package_xyz.models:build", trust_code=True)
    with pytest.raises(UsageError, match="no attribute"):
        load_classifier(f"{module}:missing", trust_code=True)
    with pytest.raises(UsageError, match="not a torch.nn.Module"):
        load_classifier(f"{module}:not_a_model", trust_code=True)
    with pytest.raises(UsageError, match="no GPU here"):
        load_classifier(f"{module}:broken", trust_code=True)
    wrong = tmp_path / "wrong.pt"
    torch.save({"other.weight": torch.zeros(3)}, wrong)
    with pytest.raises(BundleError, match="do not fit"):
        load_classifier(f"{module}:build", trust_code=True, factory_weights=wrong)
    with pytest.raises(BundleError, match="no such weights file"):
        load_classifier(f"{module}:build", trust_code=True, factory_weights=tmp_path / "nope.pt")


def test_bundle_and_file_errors(tmp_path, bundle):
    with pytest.raises(BundleError, match="no such classifier"):
        load_classifier(str(tmp_path / "missing"))
    density = tmp_path / "density"
    save_bundle(density, "pixelcnn", {"channels": 1}, {"w": torch.zeros(1)})
    with pytest.raises(BundleError, match="not a classifier"):
        load_classifier(density)
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, state)
    with pytest.raises(BundleError, match="not a TorchScript file"):
        load_classifier(state, trust_code=True)
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(BundleError, match="not a classifier"):
        load_classifier(text)
    with pytest.raises(UsageError, match="takes"):
        load_classifier(bundle, input_shape=(1, 28, 28))


def test_input_and_label_mismatch(bundle):
    loaded = load_classifier(bundle, device="cpu")
    with pytest.raises(DataError, match="expects"):
        check_inputs(loaded, torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(UsageError, match="labels go up to 12"):
        check_inputs(loaded, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([1, 12]))


def test_cli_classifier_train(runner, tmp_path):
    out = tmp_path / "clf"
    result = runner.invoke(app, ["classifier", "train", "--preset", "tiny", "--epochs", "6",
                                 "--lr", "0.01", "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["test_accuracy"] > 0.5 and doc["n_test"] == 359
    config = json.loads((out / "config.json").read_text())
    assert config["metrics"]["test_accuracy"] == doc["test_accuracy"]
    assert config["data"]["test"] == "digits:test"
    assert not out.with_name(out.name + ".checkpoint").exists()
    assert load_classifier(out).num_classes == 10


def test_cli_classifier_train_csv_is_csv(runner, tmp_path):
    """--format csv writes a header and one row of metrics, not a dict repr."""
    import csv
    import io

    result = runner.invoke(app, ["classifier", "train", "--preset", "tiny", "--epochs", "1",
                                 "--out", str(tmp_path / "c"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 1 and rows[0]["bundle"] == str(tmp_path / "c")
    assert 0 <= float(rows[0]["val_accuracy"]) <= 1 and rows[0]["epochs"] == "1"


def test_cli_classifier_train_usage_errors(runner, tmp_path):
    result = runner.invoke(app, ["classifier", "train", "--preset", "huge",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "preset" in result.output
    unlabeled = tmp_path / "u.npz"
    import numpy as np

    np.savez(unlabeled, images=np.zeros((20, 1, 8, 8), np.uint8))
    result = runner.invoke(app, ["classifier", "train", "--data", str(unlabeled),
                                 "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "no labels" in result.output


def test_shipped_digits_classifier(repo):
    path = repo / "models" / "digits-classifier"
    if not path.exists():
        pytest.skip("models/digits-classifier not built")
    config = json.loads((path / "config.json").read_text())
    assert config["metrics"]["test_accuracy"] >= 0.97
    assert sum(f.stat().st_size for f in path.iterdir()) < 5_000_000
    loaded = load_classifier(path, device="cpu")
    test = load_images("digits:test")
    pred, _ = classify(loaded, test.images, test.levels)
    assert (pred == test.labels).float().mean() >= 0.97


def test_shipped_fashion_classifier(repo):
    path = repo / "models" / "fashion-classifier"
    if not path.exists():
        pytest.skip("models/fashion-classifier not built")
    try:
        test = load_images("fashion-mnist:test")
    except DataError:
        pytest.skip("Fashion-MNIST files not installed")
    config = json.loads((path / "config.json").read_text())
    assert config["metrics"]["test_accuracy"] >= 0.91
    assert sum(f.stat().st_size for f in path.iterdir()) < 5_000_000
    loaded = load_classifier(path, device="cpu")
    head = test.head(500)
    pred, _ = classify(loaded, head.images, head.levels)
    assert (pred == head.labels).float().mean() >= 0.9


def test_old_import_paths_still_work():
    """Branches written before the split import these from models.classifier."""
    from pixeldefend.models import classifier, classifier_training, loading

    assert classifier.load_classifier is loading.load_classifier
    assert classifier.LoadedClassifier is loading.LoadedClassifier
    assert classifier.predict_logits is loading.predict_logits
    assert classifier.train_classifier is classifier_training.train_classifier
    with pytest.raises(AttributeError):
        classifier.no_such_name  # noqa: B018
