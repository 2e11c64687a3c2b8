"""`--compile` (compilation.py): the flag reaches torch.compile, the compiled runs compute
what the eager ones do, and bundles and checkpoints do not change. The tests compile with
torch's "eager" backend (TorchDynamo traces the graph, nothing is code-generated), so they
check the plumbing in seconds; inductor's speed is a `bench` matter, not a test's."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from pixeldefend import compilation
from pixeldefend.cli import app
from pixeldefend.data import load_images
from pixeldefend.detector import DensityDetector
from pixeldefend.errors import UsageError
from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig
from pixeldefend.train import TrainSettings, run_training, same_settings


@pytest.fixture()
def eager_backend(monkeypatch):
    """torch.compile with the eager backend, and a record of every call."""
    calls: list[str] = []
    real = torch.compile

    def spy(fn, *args, backend="inductor", **kwargs):
        calls.append(backend)
        return real(fn, *args, backend=backend, **kwargs)

    monkeypatch.setattr(compilation, "BACKEND", "eager")
    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def test_score_compile_gives_the_eager_rows(runner, tiny_bundle, eager_backend):
    args = ["score", "digits:test[:40]", "--model", str(tiny_bundle), "--device", "cpu",
            "--format", "json", "--batch-size", "16"]
    eager = runner.invoke(app, args)
    assert eager_backend == []
    compiled = runner.invoke(app, [*args, "--compile"])
    assert compiled.exit_code == eager.exit_code, compiled.output
    assert eager_backend == ["eager"]  # the flag reached torch.compile, once
    got, want = json.loads(compiled.stdout), json.loads(eager.stdout)
    assert [r["verdict"] for r in got["results"]] == [r["verdict"] for r in want["results"]]
    for g, w in zip(got["results"], want["results"], strict=True):
        assert g["bits_per_dim"] == pytest.approx(w["bits_per_dim"], abs=1e-6)


def test_compiled_scoring_matches_eager_bits_per_dim(tiny_bundle, eager_backend):
    images = load_images("digits:test")
    det = DensityDetector.load(tiny_bundle, device="cpu")
    want = det.model_pass(images).bits_per_dim
    compilation.compile_scoring(det.model)
    assert eager_backend == ["eager"]
    assert abs(det.model_pass(images).bits_per_dim - want).max() < 1e-5


def test_a_machine_that_cannot_compile_gets_one_clear_line(tiny_bundle, monkeypatch):
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\nlong details")

    torch._dynamo.reset()
    det = DensityDetector.load(tiny_bundle, device="cpu")
    with pytest.raises(UsageError, match=r"torch.compile failed on this machine \(.*no C\+\+ "
                                         r"compiler found.*\); run without compile=True"):
        compilation.compile_scoring(det.model, backend=broken)
    assert "context_rows" not in vars(det.model)  # still the eager trunk
    torch._dynamo.reset()


def _train(compile: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig.from_preset("tiny", 1, 4, 4, 5))
    x = torch.randint(0, 5, (40, 1, 4, 4), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(1))
    run_training(model, lambda m, b, _y: F.cross_entropy(m(b).float(), b.long()), x, None,
                 lambda m, block: (1.0 * len(block), len(block)),
                 TrainSettings(epochs=2, batch_size=20, lr=1e-2, compile=compile),
                 torch.device("cpu"), val_size=4)
    return model.state_dict()


def test_compiled_training_takes_the_same_steps_and_saves_plain_keys(eager_backend):
    eager, compiled = _train(False), _train(True)
    assert eager_backend == ["eager"]  # Module.compile calls torch.compile
    assert list(compiled) == list(eager)  # no "_orig_mod." prefix in the state dict
    for key, value in eager.items():
        assert torch.allclose(compiled[key], value, atol=1e-6), key


def test_a_run_resumes_with_or_without_compile():
    recorded = asdict(TrainSettings(compile=True))
    assert same_settings(recorded, TrainSettings(compile=False))
    assert not same_settings(recorded, TrainSettings(compile=False, lr=1.0))


def test_train_on_a_machine_that_cannot_compile_exits_2_in_one_line(runner, tmp_path,
                                                                    monkeypatch):
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(compilation, "BACKEND", broken)
    torch._dynamo.reset()
    result = runner.invoke(app, ["train", "--preset", "tiny", "--epochs", "1", "--device",
                                 "cpu", "--out", str(tmp_path / "bundle"), "--compile"])
    torch._dynamo.reset()
    assert result.exit_code == 2, result.output
    assert "torch.compile failed on this machine (RuntimeError: no C++ compiler found); run " \
           "without --compile" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "bundle").exists()
