"""PixelDefend purification: the fast decoder equals the reference bit for bit, the rule is
the greedy one (checked by brute-force marginalisation), adaptive mode, the BPDA wrapper,
the sampler, and the `purify` / `defend` commands."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from pixeldefend.cli import app
from pixeldefend.data import (
    ImageSpec,
    decode_image_file,
    load_array_file,
    load_digits,
    save_image,
    save_npz,
)
from pixeldefend.detector import DensityDetector
from pixeldefend.errors import DataError, UsageError
from pixeldefend.models.pixelcnn import PixelCNN, PixelCNNConfig
from pixeldefend.purify import (
    PurifiedClassifier,
    box_argmax,
    cached_logits,
    choose,
    float64_copy,
    purify,
    purify_fast,
    purify_reference,
    purify_single_pass,
    sample,
    scaled,
)

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster and immune to a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def random_model(preset: str, c: int, h: int, w: int, levels: int, seed: int = 0) -> PixelCNN:
    torch.manual_seed(seed)
    model = PixelCNN(PixelCNNConfig.from_preset(preset, c, h, w, levels)).eval()
    # random init gives nearly flat conditionals; scale the head so decisions are sharp
    # and varied, like a trained model's
    with torch.no_grad():
        for head in model.channel_out:
            head.weight.mul_(8.0)
    return model


def random_images(n: int, c: int, h: int, w: int, levels: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (n, c, h, w), generator=g, dtype=torch.uint8)


def train_briefly(model: PixelCNN, images: torch.Tensor, steps: int = 80,
                  seed: int = 0) -> PixelCNN:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (64,),
                            generator=torch.Generator().manual_seed(seed + step))
        batch = images[idx]
        loss = F.cross_entropy(model(batch), batch.long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("calib"), load_digits("test")


@pytest.fixture(scope="module")
def trained_digits(digits) -> PixelCNN:
    train, _, _ = digits
    model = PixelCNN(PixelCNNConfig.from_preset("tiny", 1, 8, 8, 17))
    return train_briefly(model, train.images, steps=150)


@pytest.fixture(scope="module")
def trained_colour() -> tuple[PixelCNN, torch.Tensor]:
    """3 channels, non-square 5x6, 9 levels, trained on smooth correlated colour images."""
    g = torch.Generator().manual_seed(3)
    base = torch.rand((400, 1, 5, 6), generator=g).cumsum(3) / 6  # left-to-right ramps
    tint = torch.rand((400, 3, 1, 1), generator=g)
    images = torch.round((0.6 * base + 0.4 * tint).clamp(0, 1) * 8).to(torch.uint8)
    model = PixelCNN(PixelCNNConfig.from_preset("tiny", 3, 5, 6, 9))
    return train_briefly(model, images, steps=100), images


def noisy(images: torch.Tensor, levels: int, amount: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(-amount, amount + 1, images.shape, generator=g)
    return (images.long() + noise).clamp(0, levels - 1).to(torch.uint8)


# ----------------------------------------------------------------- cached decoder


@pytest.mark.parametrize("preset,shape", [
    ("tiny", (1, 5, 7, 17)), ("tiny", (3, 4, 3, 9)), ("small", (2, 3, 4, 5)),
    ("small", (1, 6, 6, 256)), ("base", (3, 3, 5, 5)),
])
def test_cached_logits_equal_full_forward(preset, shape):
    """Teacher-forced, the cached decoder reproduces every logit of the full network."""
    model = random_model(preset, *shape)
    x = random_images(3, *shape)
    with torch.no_grad():
        full = float64_copy(model).logits_from_scaled(scaled(x, shape[3]))
    fast = cached_logits(model, x)
    assert fast.shape == full.shape
    # float64 rounding only: far below the 1e-8 tie tolerance of the exactness guard
    assert (fast - full).abs().max().item() < 1e-12


# -------------------------------------------------------- fast == reference exactly


@pytest.mark.parametrize("preset,shape,eps_values", [
    ("tiny", (1, 5, 7, 17), (0, 1, 2, 17)),
    ("tiny", (3, 4, 3, 9), (1, 2, 9)),
    ("small", (2, 3, 4, 5), (1, 5)),
    ("small", (1, 6, 6, 256), (16,)),
    ("base", (3, 3, 5, 5), (2,)),
])
def test_fast_equals_reference_random_models(preset, shape, eps_values):
    model = random_model(preset, *shape)
    x = random_images(5, *shape)
    for eps in eps_values:
        fast = purify_fast(model, x, eps)
        ref = purify_reference(model, x, eps)
        assert fast.dtype == torch.uint8 and torch.equal(fast, ref), (preset, shape, eps)
        if eps > 0:
            assert not torch.equal(fast, x)  # something was actually decided


def test_decoder_uses_the_callers_thread_count():
    """--threads (torch.set_num_threads) reaches the per-pixel loop: nothing inside the
    decoder overrides it."""
    from pixeldefend.models.decoder import CachedDecoder

    model = random_model("tiny", 1, 3, 3, 5)
    seen = set()

    def decide(c, i, j, logits, x):
        seen.add(torch.get_num_threads())
        return logits.argmax(1)

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        CachedDecoder(model).run(torch.zeros((2, 1, 3, 3), dtype=torch.long), decide)
    finally:
        torch.set_num_threads(old)
    assert seen == {2}


def test_cached_logits_trained_model(trained_digits, digits):
    x = digits[2].images[:8]
    with torch.no_grad():
        full = float64_copy(trained_digits).logits_from_scaled(scaled(x, 17))
    err = (cached_logits(trained_digits, x) - full).abs().max().item()
    assert err < 1e-12 * max(1.0, full.abs().max().item())


def test_dropout_model_in_train_mode_purifies_as_in_eval_mode():
    """Purification always uses inference semantics (dropout off), in both implementations."""
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig.from_preset("tiny", 1, 4, 5, 9, dropout=0.5))
    x = random_images(4, 1, 4, 5, 9)
    model.train()
    fast = purify_fast(model, x, 2)
    assert torch.equal(fast, purify_reference(model, x, 2))
    model.eval()
    assert torch.equal(fast, purify_fast(model, x, 2))


@pytest.mark.parametrize("eps", [1, 2, 17])
def test_fast_equals_reference_trained_digits(trained_digits, digits, eps):
    _, _, test = digits
    x = torch.cat([test.images[:6], noisy(test.images[6:12], 17, 3)])
    stats: dict = {}
    fast = purify_fast(trained_digits, x, eps, stats=stats)
    assert torch.equal(fast, purify_reference(trained_digits, x, eps))
    assert stats["fallbacks"] == 0  # near-ties are rare; see test_ties_* for the fallback


@pytest.mark.parametrize("eps", [1, 3, 9])
def test_fast_equals_reference_trained_colour(trained_colour, eps):
    model, images = trained_colour
    x = torch.cat([images[:4], noisy(images[4:8], 9, 2)])
    assert torch.equal(purify_fast(model, x, eps), purify_reference(model, x, eps))


def test_batch_size_does_not_change_the_result(trained_digits, digits):
    x = noisy(digits[2].images[:10], 17, 2)
    assert torch.equal(purify_fast(trained_digits, x, 2, batch_size=3),
                       purify_fast(trained_digits, x, 2, batch_size=10))


# ------------------------------------------------------------------ the rule itself


def test_eps_zero_is_identity(trained_digits, digits):
    x = noisy(digits[2].images[:5], 17, 4)
    for fn in (purify_fast, purify_reference):
        out = fn(trained_digits, x, 0)
        assert torch.equal(out, x)
    result = purify(trained_digits, x, 0)
    assert torch.equal(result.images, x) and (result.changed == 0).all()


@pytest.mark.parametrize("eps", [1, 2, 5])
def test_result_stays_in_the_box(trained_digits, digits, eps):
    x = noisy(digits[2].images[:16], 17, 6)
    out = purify_fast(trained_digits, x, eps)
    diff = (out.long() - x.long()).abs()
    assert int(diff.max()) <= eps and int(out.max()) <= 16
    assert int(diff.max()) == eps  # the box is used, not just its centre


def test_purification_raises_likelihood(trained_digits, digits):
    x = noisy(digits[2].images[:16], 17, 3)
    result = purify(trained_digits, x, 2)
    assert result.purified.all()
    assert result.bpd_after.mean() < result.bpd_before.mean() - 0.2


def _brute_force_check(model: PixelCNN, x: torch.Tensor, purified: torch.Tensor, eps: int):
    """Each purified value must be the box argmax of p(v | purified past), where that
    conditional is computed by summing p(z) over *every* image z of the tiny space."""
    cfg = model.config
    c_, h_, w_, levels = cfg.channels, cfg.height, cfg.width, cfg.levels
    order = [(c, i, j) for i in range(h_) for j in range(w_) for c in range(c_)]
    grid = torch.tensor(list(itertools.product(range(levels), repeat=len(order))))
    space = torch.zeros((len(grid), c_, h_, w_), dtype=torch.long)
    for pos, (c, i, j) in enumerate(order):
        space[:, c, i, j] = grid[:, pos]
    with torch.no_grad():
        logits = float64_copy(model).logits_from_scaled(scaled(space, levels))
        logp = -F.cross_entropy(logits, space, reduction="none").flatten(1).sum(1)
    checked = 0
    for n in range(x.shape[0]):
        target = purified[n].long()
        prefix = torch.ones(len(space), dtype=torch.bool)
        for c, i, j in order:
            marg = torch.full((levels,), float("-inf"), dtype=torch.float64)
            for v in range(levels):
                sel = prefix & (space[:, c, i, j] == v)
                marg[v] = torch.logsumexp(logp[sel], 0)
            orig = int(x[n, c, i, j])
            inbox = marg[max(0, orig - eps):orig + eps + 1]
            top = inbox.topk(min(2, len(inbox))).values
            if len(top) == 2 and float(top[0] - top[1]) < 1e-9:
                continue  # a tie the brute force cannot resolve more exactly than the model
            expected = int(choose(marg[None], torch.tensor([orig]), eps)[0])
            assert int(target[c, i, j]) == expected, (n, c, i, j)
            checked += 1
            prefix &= space[:, c, i, j] == target[c, i, j]
    return checked


@pytest.mark.parametrize("shape,eps", [((1, 2, 3, 4), 1), ((2, 1, 3, 3), 1), ((1, 2, 2, 5), 2)])
def test_greedy_rule_by_brute_force(shape, eps):
    model = random_model("tiny", *shape, seed=11)
    x = random_images(4, *shape, seed=12)
    out = purify_fast(model, x, eps)
    assert torch.equal(out, purify_reference(model, x, eps))
    assert _brute_force_check(model, x, out, eps) >= x.numel() - 2


def test_ties_go_to_the_closest_then_lower_value():
    """Context-free logits with planted exact ties: every decision goes through the
    fast decoder's fallback and the tie rule; both implementations agree."""
    model = random_model("tiny", 1, 3, 4, 11)
    with torch.no_grad():
        model.channel_out[0].weight.zero_()
        model.channel_out[0].bias.zero_()
        model.channel_out[0].bias[[3, 7]] = 1.0  # two equal maxima
    x = torch.tensor([[0, 4, 5, 6], [9, 10, 2, 8], [1, 3, 7, 5]], dtype=torch.uint8)[None, None]
    x = x.expand(2, 1, 3, 4).clone()
    for eps in (1, 2, 3):
        expected = torch.empty_like(x)
        for idx, v in np.ndenumerate(x.numpy().astype(int)):
            box = list(range(max(0, v - eps), min(10, v + eps) + 1))
            best = [u for u in box if u in (3, 7)] or box
            expected[idx] = min(best, key=lambda u: (abs(u - v), u))
        stats: dict = {}
        fast = purify_fast(model, x, eps, stats=stats)
        assert torch.equal(fast, expected), eps
        assert torch.equal(purify_reference(model, x, eps), expected)
        assert stats["fallbacks"] > 0


def test_all_flat_logits_leave_images_unchanged():
    model = random_model("tiny", 3, 2, 3, 6)
    with torch.no_grad():
        for head in model.channel_out:
            head.weight.zero_()
            head.bias.zero_()
    x = random_images(3, 3, 2, 3, 6)
    stats: dict = {}
    assert torch.equal(purify_fast(model, x, 2, stats=stats), x)
    assert stats["fallbacks"] == x.numel()


def test_bad_inputs_are_clear_errors(trained_digits):
    with pytest.raises(DataError):
        purify_fast(trained_digits, torch.zeros((1, 1, 7, 8), dtype=torch.uint8), 1)
    with pytest.raises(DataError):
        purify_fast(trained_digits, torch.full((1, 1, 8, 8), 17, dtype=torch.uint8), 1)
    with pytest.raises(UsageError):
        purify_fast(trained_digits, torch.zeros((1, 1, 8, 8), dtype=torch.uint8), -1)
    assert purify_fast(trained_digits, torch.zeros((0, 1, 8, 8), dtype=torch.uint8), 1).shape \
        == (0, 1, 8, 8)


# -------------------------------------------------------------------------- adaptive


@pytest.fixture(scope="module")
def detector(trained_digits, digits) -> DensityDetector:
    det = DensityDetector(preset="tiny", device="cpu", model=trained_digits)
    det.calibrate(digits[1], fpr=0.1)
    return det


def test_adaptive_passes_clean_images_untouched(detector, digits):
    clean = digits[2].images[:20]
    attacked = noisy(digits[2].images[20:30], 17, 5)
    x = torch.cat([clean, attacked])
    result = purify(detector, x, 2, adaptive=True)
    before = detector.anomaly_score(x)
    assert np.allclose(result.bpd_before, before)
    assert (result.purified == (before > detector.threshold)).all()
    assert result.purified[20:].all() and not result.purified[:20].all()
    keep = ~result.purified
    assert torch.equal(result.images[torch.from_numpy(keep)], x[torch.from_numpy(keep)])
    assert np.array_equal(result.bpd_after[keep], result.bpd_before[keep])
    assert (result.changed[keep] == 0).all()
    # purified ones are exactly what non-adaptive purification gives them
    sel = torch.from_numpy(result.purified)
    assert torch.equal(result.images[sel], purify_fast(detector.model, x[sel], 2))
    # an explicit threshold works the same way; the reference agrees
    explicit = purify(detector.model, x, 2, adaptive=float(detector.threshold), fast=False)
    assert torch.equal(explicit.images, result.images)


def test_adaptive_without_calibration_is_a_usage_error(trained_digits, digits):
    det = DensityDetector(preset="tiny", device="cpu", model=trained_digits)
    with pytest.raises(UsageError):
        purify(det, digits[2].images[:2], 1, adaptive=True)
    with pytest.raises(UsageError):
        purify(trained_digits, digits[2].images[:2], 1, adaptive=True)


# ------------------------------------------------------------- PurifiedClassifier


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(x.flatten(1) * 3))


def test_purified_classifier_forward_and_straight_through_gradient(detector, digits):
    net = TinyNet()
    wrapped = PurifiedClassifier(detector, net, eps_defend=2)
    x = (noisy(digits[2].images[:6], 17, 3).float() / 16).requires_grad_(True)
    logits = wrapped(x)
    purified = purify_fast(detector.model, torch.round(x.detach() * 16).to(torch.uint8), 2)
    xp = (purified.float() / 16).requires_grad_(True)
    direct = net(xp)
    assert torch.allclose(logits, direct, atol=1e-6)
    logits.square().sum().backward()
    direct.square().sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, xp.grad, atol=1e-6)
    assert wrapped.last_result is not None and wrapped.last_result.purified.all()
    adaptive = PurifiedClassifier(detector, net, eps_defend=2, adaptive=True)
    clean = digits[2].images[:4].float() / 16
    assert torch.allclose(adaptive(clean), net(clean), atol=1e-6) or \
        adaptive.last_result.purified.any()


# --------------------------------------------------------------------------- sampler


def test_sampler_shapes_seeds_and_greedy_limit(trained_digits):
    a = sample(trained_digits, 5, generator=torch.Generator().manual_seed(0))
    b = sample(trained_digits, 5, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.uint8 and int(a.max()) <= 16
    assert torch.equal(a, b)  # a seed reproduces the draw
    rows = []
    sample(trained_digits, 3, progress=lambda: rows.append(1), batch_size=2)
    assert len(rows) == 16  # 8 rows per batch, 2 batches
    # temperature -> 0 is greedy decoding, which is purification with an all-covering box
    cold = sample(trained_digits, 2, generator=torch.Generator().manual_seed(1),
                  temperature=1e-7, dtype=torch.float64)
    greedy = purify_fast(trained_digits, torch.zeros((2, 1, 8, 8), dtype=torch.uint8), 17)
    assert torch.equal(cold, greedy)


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, detector) -> tuple[Path, Path]:
    from pixeldefend.models.classifier import ClassifierConfig, ResNetClassifier, save_classifier

    root = tmp_path_factory.mktemp("purify-bundles")
    detector.save(root / "density")
    torch.manual_seed(0)
    clf = ResNetClassifier(ClassifierConfig.from_preset("tiny", 1, 8, 8, 10, 17)).eval()
    save_classifier(root / "classifier", clf, meta={"classes": [str(d) for d in range(10)]})
    return root / "density", root / "classifier"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digits) -> Path:
    root = tmp_path_factory.mktemp("purify-inputs")
    test = digits[2]
    for k in range(3):
        save_image(root / "folder" / str(k % 2) / f"img{k}.png", test.images[k], 17)
    save_image(root / "photo.jpg", test.images[3], 17)
    save_npz(root / "arrays.npz", noisy(test.images[4:9], 17, 4), 17, test.labels[4:9])
    (root / "broken.png").write_bytes(b"not a png")
    return root


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_purify_writes_images_and_manifest(bundles, inputs, tmp_path):
    density, _ = bundles
    out = tmp_path / "out"
    result = invoke("purify", inputs / "folder", inputs / "photo.jpg", inputs / "arrays.npz",
                    "--model", density, "--eps-defend", 2, "--out", out, "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["summary"] == {**doc["summary"], "n": 9, "purified": 9, "errors": 0}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        ".pixeldefend-output.json", "0/img0.png", "0/img2.png", "1/img1.png", "arrays.npz",
        "manifest.json", "photo.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["eps_defend"] == 2 and len(manifest["images"]) == 9
    row = manifest["images"][0]
    assert {"path", "output", "bits_per_dim_before", "bits_per_dim_after", "purified"} <= set(row)
    # written images are exactly the library's purification, within the box
    arrays = load_array_file(out / "arrays.npz", None)
    source = load_array_file(inputs / "arrays.npz", None)
    assert arrays.levels == 17 and torch.equal(arrays.labels, source.labels)
    assert torch.equal(arrays.images, purify_fast(load_model(density), source.images, 2))
    spec = ImageSpec(1, 8, 8, 17)
    png = torch.from_numpy(decode_image_file(out / "0" / "img0.png", spec))
    orig = torch.from_numpy(decode_image_file(inputs / "folder" / "0" / "img0.png", spec))
    assert torch.equal(png[None], purify_fast(load_model(density), orig[None], 2))


def load_model(path: Path) -> PixelCNN:
    return DensityDetector.load(path, device="cpu").model


def test_cli_purify_adaptive_and_unreadable_input(bundles, inputs, tmp_path):
    density, _ = bundles
    out = tmp_path / "out"
    result = invoke("purify", inputs / "folder", inputs / "arrays.npz", inputs / "broken.png",
                    "--model", density, "--eps-defend", 1, "--adaptive", "--out", out,
                    "--format", "json")
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    verdicts = {r["path"]: r for r in doc["images"]}
    assert verdicts[str(inputs / "broken.png")]["verdict"] == "error"
    for r in doc["images"]:
        if r["error"] is None:
            assert r["purified"] == (r["verdict"] == "anomalous")
            if not r["purified"]:
                assert r["changed"] == 0 and r["bits_per_dim_after"] == r["bits_per_dim_before"]
    assert (out / "manifest.json").exists() and (out / "arrays.npz").exists()


def test_cli_defend_json_gate_and_errors(bundles, inputs):
    density, classifier = bundles
    base = ["--model", density, "--classifier", classifier, "--eps-defend", 1]
    result = invoke("defend", inputs / "arrays.npz", "digits:test[:4]", *base, "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["summary"]["n"] == 9 and doc["summary"]["labelled"] == 9
    row = doc["images"][0]
    for key in ("bits_per_dim_before", "bits_per_dim_after", "purified", "pred", "prob",
                "label", "verdict", "pred_before"):
        assert key in row
    assert 0.0 <= row["prob"] <= 1.0 and isinstance(row["pred"], int)
    # noisy arrays are anomalous: the gate fails with exit code 1
    gated = invoke("defend", inputs / "arrays.npz", *base, "--fail-on", "anomalous",
                   "--format", "jsonl")
    lines = [json.loads(line) for line in gated.stdout.splitlines()]
    assert len(lines) == 5
    assert gated.exit_code == (1 if any(r["verdict"] == "anomalous" for r in lines) else 0)
    assert any(r["verdict"] == "anomalous" for r in lines)
    broken = invoke("defend", inputs / "broken.png", inputs / "folder", *base, "--format", "csv")
    assert broken.exit_code == 2
    assert broken.stdout.splitlines()[0].startswith("path,label,bits_per_dim_before")
    missing = invoke("defend", inputs / "folder", "--model", density, "--classifier",
                     inputs / "nope")
    assert missing.exit_code == 2


def test_cli_help_has_examples():
    for command in ("purify", "defend", "bench"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Example" in result.stdout, command


def test_defend_pipeline_from_python(detector, digits):
    """The `defend` pipeline runs without the CLI: one row per input, errors kept in
    place, the anomalous gate on the calibrated threshold."""
    from pixeldefend.data import Batch
    from pixeldefend.defend import defend
    from pixeldefend.models.classifier import ClassifierConfig, ResNetClassifier
    from pixeldefend.models.loading import as_loaded

    test = digits[2]
    torch.manual_seed(0)
    clf = as_loaded(ResNetClassifier(ClassifierConfig.from_preset("tiny", 1, 8, 8, 10, 17)))
    batches = [Batch(["a", "b", "bad"], [None, None, "unreadable"], test.images[:2],
                     test.labels[:2]),
               Batch(["noisy"], [None], noisy(test.images[2:3], 17, 8), test.labels[2:3])]
    seen: list[int] = []
    result = defend(detector, clf, batches, 1, fail_on="anomalous", progress=seen.append)
    assert [r["path"] for r in result.rows] == ["a", "b", "bad", "noisy"]
    assert seen == [3, 1] and result.rows[2]["verdict"] == "error"
    assert result.summary["n"] == 4 and result.summary["errors"] == 1
    assert result.summary["labelled"] == 3 and result.summary["purified"] == 3
    anomalous = result.summary["anomalous"]
    assert result.gate_failed == (anomalous > 0)
    assert anomalous == sum(r["verdict"] == "anomalous" for r in result.rows)
    with pytest.raises(UsageError):
        defend(detector, clf, [], fail_on="sometimes")


# ------------------------------------------------- the single-pass approximation


def test_box_argmax_is_choose_for_every_sub_pixel():
    """The windowed, batched rule equals `choose`, planted exact ties included."""
    g = torch.Generator().manual_seed(0)
    levels = 12
    logits = torch.randint(0, 4, (40, levels), generator=g).double()  # many exact ties
    orig = torch.randint(0, levels, (40,), generator=g)
    for eps in (0, 1, 3, 20):
        assert torch.equal(box_argmax(logits, orig, eps), choose(logits, orig, eps)), eps
    # levels along another axis, as in the model's (N, levels, C, H, W) output
    stacked = logits.view(5, 8, levels).permute(0, 2, 1)
    assert torch.equal(box_argmax(stacked, orig.view(5, 8), 2),
                       choose(logits, orig, 2).view(5, 8))


def test_single_pass_is_the_box_argmax_of_one_forward_pass(trained_digits, digits):
    x = noisy(digits[2].images[:6], 17, 3)
    out = purify_single_pass(trained_digits, x, 2)
    with torch.no_grad():
        logits = trained_digits(x)  # (N, levels, C, H, W), conditioned on the input
    flat = logits.movedim(1, -1).reshape(-1, 17)
    expected = choose(flat, x.reshape(-1), 2).view(x.shape)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), expected)
    # inexact: later pixels see unpurified earlier pixels, so it is not PixelDefend
    assert not torch.equal(out, purify_reference(trained_digits, x, 2))


def test_single_pass_is_exact_when_conditionals_ignore_the_past():
    """With context-free logits there is nothing to condition on: one pass is exact."""
    model = random_model("tiny", 1, 3, 4, 11)
    with torch.no_grad():
        model.channel_out[0].weight.zero_()
        model.channel_out[0].bias.copy_(torch.linspace(0, 1, 11) ** 2)
    x = random_images(3, 1, 3, 4, 11)
    assert torch.equal(purify_single_pass(model, x, 2), purify_reference(model, x, 2))


def test_near_tie_below_the_tolerance_goes_to_the_reference_and_is_counted():
    """A margin of 1e-9 (not a tie, but under the fast decoder's 1e-8 tolerance): every
    such decision is recomputed by the reference's own float64 pass, counted, and the
    strictly larger value wins (the tie rule would pick the closer one)."""
    model = random_model("tiny", 1, 2, 3, 11)
    with torch.no_grad():
        model.channel_out[0].weight.zero_()
        model.channel_out[0].bias.fill_(-1.0)
        model.channel_out[0].bias[3] = 0.0
        model.channel_out[0].bias[7] = 1e-9
    x = torch.tensor([[4, 5, 4], [2, 9, 5]], dtype=torch.uint8)[None, None].repeat(2, 1, 1, 1)
    stats: dict = {}
    out = purify_fast(model, x, 3, stats=stats)
    assert torch.equal(out, purify_reference(model, x, 3))
    both = ((x.long() - 3).abs() <= 3) & ((x.long() - 7).abs() <= 3)  # 4, 5 see 3 and 7
    assert torch.equal(out[both], torch.full_like(out[both], 7))
    assert stats["fallbacks"] == int(both.sum())


def test_purify_to_folder_and_write_samples_work_from_python(tiny_bundle, tmp_path):
    """The library functions behind `purify` and `sample`, without the CLI."""
    import json

    from pixeldefend.defend import purify_to_folder
    from pixeldefend.sampling import write_samples

    run = purify_to_folder(["digits:test[:3]"], tmp_path / "pur", tiny_bundle, eps_defend=1)
    assert run.errors == 0 and run.document is not None and len(run.rows) == 3
    manifest = json.loads((tmp_path / "pur" / "manifest.json").read_text())
    assert manifest["summary"]["n"] == 3 and manifest["eps_defend"] == 1
    bpd = write_samples(tiny_bundle, tmp_path / "grid.png", 2, npz=tmp_path / "s.npz")
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "s.npz").exists()
    assert bpd > 0
