"""Loading classifiers, ours or the user's, behind one input contract.

Every classifier takes float images in [0, 1], shape (N, C, H, W), and returns logits
(N, K). A model trained on normalised inputs is wrapped so normalisation happens inside
it (`--mean/--std`); attacks then work in the same [0, 1] pixel space the images live in,
and the eps ball means pixel levels.

Three kinds of classifier spec are accepted by `load_classifier`:

- a pixeldefend classifier bundle directory (`model.safetensors` + `config.json`);
- a TorchScript file (`.pt`, `.ts`, `.pth`, `.jit`), loaded with `torch.jit.load`;
- `package.module:factory` (a callable returning an `nn.Module`) plus a state-dict file
  loaded with `torch.load(..., weights_only=True)`, passed as `factory_weights` or
  appended to the spec as `package.module:factory@weights.pt`.

Trust boundary: a bundle is data (safetensors + JSON, nothing is unpickled or run), but
loading a TorchScript file runs its code and a factory imports a module, so both need
`trust_code=True` (the CLI's `--trust-code`).
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BundleError, DataError, UsageError
from ..pixels import model_device, to_float
from .classifier import KIND, ClassifierConfig, ResNetClassifier


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, levels: int,
                   batch_size: int = 512, device: torch.device | None = None) -> torch.Tensor:
    """Logits for uint8 images, in batches; returns CPU float tensor (N, K)."""
    device = device or model_device(model)
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start : start + batch_size], levels).to(device)
        out.append(model(x).float().cpu())
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out)



class Normalize(nn.Module):
    """(x - mean) / std per channel, so a model trained on normalised inputs takes [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise UsageError(f"mean has {len(mean)} values but std has {len(std)}",
                             param=("mean", "std"))
        if any(s <= 0 for s in std):
            raise UsageError("std values must be positive", param="std")
        as_4d = lambda v: torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer("mean", as_4d(mean))
        self.register_buffer("std", as_4d(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise DataError(f"mean/std give {self.mean.shape[1]} channel(s), images have "
                            f"{x.shape[1]}", param=("mean", "std"))
        return (x - self.mean) / self.std


class WrappedClassifier(nn.Module):
    """[0, 1] images -> (optional normalisation) -> the user's network -> logits."""

    def __init__(self, net: nn.Module, normalize: Normalize | None = None) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:
            x = self.normalize(x)
        out = self.net(x)
        if isinstance(out, tuple | list):  # some models return (logits, extras)
            out = out[0]
        return out


@dataclass
class LoadedClassifier:
    """A classifier ready for inference and attacks (eval mode, on its device)."""

    model: nn.Module  # float [0, 1] (N, C, H, W) -> logits (N, K)
    num_classes: int | None
    input_shape: tuple[int, int, int] | None
    levels: int | None  # pixel levels it was trained on (bundles only)
    source: str
    kind: str = "bundle"  # bundle | torchscript | factory | module
    classes: list[str] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return model_device(self.model)


TORCHSCRIPT_SUFFIXES = {".pt", ".ts", ".pth", ".jit", ".torchscript"}
_FACTORY = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)"
                      r"(?:@(?P<weights>.+))?$")


def _finish(net: nn.Module, device: torch.device, mean: Sequence[float] | None,
            std: Sequence[float] | None) -> nn.Module:
    if (mean is None) != (std is None):
        raise UsageError("mean and std go together: give both or neither", param=("mean", "std"))
    normalize = Normalize(mean, std) if mean is not None and std is not None else None
    model = WrappedClassifier(net, normalize) if normalize is not None else net
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # attacks need input gradients only
    return model


def _load_bundle(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from ..bundle import load_state_into, read_config, read_weights

    config = read_config(path)
    kind = config.get("kind")
    if kind != KIND:
        raise BundleError(
            f"{path}: bundle holds a {kind!r} model, not a classifier (train one with "
            "`pixeldefend classifier train`)")
    try:
        from ..schema import check_classifier_architecture

        cfg = ClassifierConfig.from_dict(check_classifier_architecture(config["architecture"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: config.json has no valid classifier architecture "
                          f"({exc})") from exc
    model = ResNetClassifier(cfg)
    load_state_into(model, read_weights(path), path)
    return model, config


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; users still
            warnings.simplefilter("ignore", FutureWarning)  # ship it, so keep reading it
            return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(
            f"{path}: not a TorchScript file ({first}); for a plain state dict give a "
            "package.module:factory classifier with factory_weights FILE",
            param="factory_weights") from exc


def _import_factory(module_name: str, attr: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as first:
        cwd = str(Path.cwd())
        if cwd in sys.path:
            raise UsageError(f"cannot import {module_name!r} for the classifier factory "
                             f"({first})") from first
        sys.path.insert(0, cwd)  # a console script does not see the current folder
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"cannot import {module_name!r} for the classifier factory "
                             f"({exc})") from exc
        finally:
            if sys.path and sys.path[0] == cwd:
                sys.path.pop(0)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} for the classifier factory "
                         f"({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{module_name} has no attribute {attr!r} (classifier factory)")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{module_name}:{attr} is not callable (expected a function or class "
                         "returning an nn.Module)")
    return obj


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BundleError(f"{path}: no such weights file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; weights_only refuses code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: cannot read a state dict with weights_only=True "
                          f"({first})") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise BundleError(f"{path}: expected a state dict (names -> tensors)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_factory(module_name: str, attr: str, weights: str | None) -> nn.Module:
    factory = _import_factory(module_name, attr)
    try:
        net = factory()
    except Exception as exc:  # the user's code: report whatever it raised
        raise UsageError(f"{module_name}:{attr}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise UsageError(f"{module_name}:{attr}() returned {type(net).__name__}, "
                         "not a torch.nn.Module")
    if weights is not None:
        state = _read_state_dict(Path(weights).expanduser())
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise BundleError(f"{weights}: weights do not fit {module_name}:{attr}() "
                              f"({first})") from exc
    return net


def probe_classifier(model: nn.Module, input_shape: Sequence[int],
                     device: torch.device | None = None) -> int:
    """Run one blank image through the model; return the number of classes or raise a
    DataError saying the model does not take images of this shape."""
    device = device or model_device(model)
    x = torch.full((1, *input_shape), 0.5, device=device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # shape errors surface as RuntimeError, ValueError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the classifier does not accept images of shape "
                        f"{tuple(input_shape)} (C,H,W): {first}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"the classifier returned {shape} for one image; expected logits "
                         "of shape (N, num_classes)")
    return int(out.shape[1])


def _require_trust(trust_code: bool, what: str) -> None:
    if not trust_code:
        raise UsageError(f"{what}: loading it runs code from it; set trust_code if you "
                         "trust it (pixeldefend classifier bundles need no flag)",
                         param="trust_code")


def load_classifier(
    spec: str | Path,
    device: str | torch.device = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_shape: Sequence[int] | None = None,
    factory_weights: str | Path | None = None,
    trust_code: bool = False,
) -> LoadedClassifier:
    """Load a classifier bundle, a TorchScript file or `module:factory` (+ weights).

    TorchScript and factories run code from the file or module: they are refused with a
    UsageError unless `trust_code` is set (bundles never need it).

    `mean`/`std` fold input normalisation into the returned model. `input_shape`
    (C, H, W) lets a TorchScript or factory model be checked (and its number of classes
    found) before any data is seen.
    """
    from ..device import resolve_device

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    text = str(spec)
    path = Path(text).expanduser()
    shape = tuple(int(v) for v in input_shape) if input_shape is not None else None
    if shape is not None and len(shape) != 3:
        raise UsageError(f"input shape must be (C, H, W), got {shape}")
    match = _FACTORY.match(text)
    if path.is_dir():
        if factory_weights is not None:
            raise UsageError("factory_weights is only for module:factory classifiers",
                             param="factory_weights")
        net, config = _load_bundle(path)
        cfg = ClassifierConfig.from_dict(config["architecture"])
        if shape is not None and shape != cfg.input_shape:
            raise UsageError(f"{path}: classifier takes {cfg.input_shape} images, not {shape}")
        model = _finish(net, dev, mean, std)
        return LoadedClassifier(model, cfg.num_classes, cfg.input_shape, cfg.levels, str(path),
                                "bundle", config.get("classes"), config)
    if path.is_file():
        if factory_weights is not None:
            raise UsageError("factory_weights is only for module:factory classifiers",
                             param="factory_weights")
        if path.suffix.lower() not in TORCHSCRIPT_SUFFIXES:
            raise BundleError(f"{path}: not a classifier: expected a bundle directory, a "
                              f"TorchScript file ({', '.join(sorted(TORCHSCRIPT_SUFFIXES))}) "
                              "or package.module:factory")
        _require_trust(trust_code, f"{path} is a TorchScript file")
        model = _finish(_load_torchscript(path), dev, mean, std)
        kind = "torchscript"
    elif match is not None and not path.exists():
        _require_trust(trust_code, f"{text} is a package.module:factory classifier")
        weights = factory_weights if factory_weights is not None else match["weights"]
        if factory_weights is not None and match["weights"]:
            raise UsageError("give the weights either after '@' or with factory_weights, "
                             "not both", param="factory_weights")
        net = _load_factory(match["module"], match["attr"],
                            None if weights is None else str(weights))
        model = _finish(net, dev, mean, std)
        kind = "factory"
    else:
        raise BundleError(f"{text}: no such classifier (expected a bundle directory, a "
                          "TorchScript file, or package.module:factory)")
    num_classes = probe_classifier(model, shape, dev) if shape is not None else None
    return LoadedClassifier(model, num_classes, shape, None, text, kind)


def as_loaded(model: nn.Module | LoadedClassifier) -> LoadedClassifier:
    """Accept a bare module too (library use): eval mode, shape found from the data."""
    if isinstance(model, LoadedClassifier):
        return model
    if not isinstance(model, nn.Module):
        raise UsageError(f"expected an nn.Module or LoadedClassifier, got {type(model).__name__}")
    model.eval()
    cfg = getattr(model, "config", None)
    if isinstance(cfg, ClassifierConfig):
        return LoadedClassifier(model, cfg.num_classes, cfg.input_shape, cfg.levels,
                                type(model).__name__, "module")
    return LoadedClassifier(model, None, None, None, type(model).__name__, "module")


def check_inputs(loaded: LoadedClassifier, images: torch.Tensor,
                 labels: torch.Tensor | None = None) -> int:
    """Check images (and labels) fit the classifier; return its number of classes.

    Raises DataError for images of the wrong shape, UsageError for labels the
    classifier cannot output.
    """
    if images.dim() != 4:
        raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    shape = tuple(int(v) for v in images.shape[1:])
    if loaded.input_shape is not None and shape != tuple(loaded.input_shape):
        raise DataError(f"images are {shape} (C,H,W) but the classifier {loaded.source} "
                        f"expects {tuple(loaded.input_shape)}")
    num_classes = loaded.num_classes
    if num_classes is None:
        num_classes = probe_classifier(loaded.model, shape)
        loaded.num_classes = num_classes
        loaded.input_shape = shape  # type: ignore[assignment]
    if labels is not None and labels.numel():
        top = int(labels.max())
        if int(labels.min()) < 0 or top >= num_classes:
            raise UsageError(f"labels go up to {top} but the classifier {loaded.source} has "
                             f"{num_classes} outputs: classifier and data do not match")
    return num_classes


def classify(loaded: LoadedClassifier | nn.Module, images: torch.Tensor, levels: int,
             batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels and softmax probabilities for uint8 images (x / (levels - 1))."""
    loaded = as_loaded(loaded)
    check_inputs(loaded, images)
    logits = predict_logits(loaded.model, images, levels, batch_size)
    return logits.argmax(1), torch.softmax(logits, 1)
