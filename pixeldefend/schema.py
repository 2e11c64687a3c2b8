"""Checks for the JSON files a bundle holds (config.json, calibration.json), before any
value is used: a wrongly typed or out-of-range field becomes one clear error instead of a
traceback, a pass-everything gate or a 160 GB allocation.

Hand-written rather than jsonschema/pydantic: neither is a dependency, the rules are a
dozen fields, and each needs a domain check a generic schema cannot say (odd kernels, a
parameter budget, finite thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A PixelCNN's config.json may not describe a network above this many parameters (the
# largest preset has well under 10 M); checked on the meta device, so nothing is allocated.
MAX_MODEL_PARAMETERS = 100_000_000


class SchemaError(ValueError):
    """A field of a JSON document is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Field:
    """One field: its JSON type, whether it must be present, and its allowed range."""

    kind: str  # "int", "number", "str", "bool", "dict", "list", "numbers" (finite list)
    required: bool = True
    low: float | None = None
    high: float | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a complaint or None

    def complaint(self, value: Any) -> str | None:
        if value is None:
            return None if self.nullable else "must not be null"
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "dict": isinstance(value, dict),
            "list": isinstance(value, list),
            "numbers": isinstance(value, list),
        }[self.kind]
        if not ok:
            return f"must be {_NAMES[self.kind]}, got {type(value).__name__} {_short(value)}"
        if self.kind == "number" and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if self.kind == "numbers":
            for item in value:
                if isinstance(item, bool) or not isinstance(item, int | float) \
                        or not math.isfinite(item):
                    return f"must hold finite numbers only, found {_short(item)}"
        if self.kind in ("int", "number"):
            if self.low is not None and value < self.low:
                return f"must be at least {self.low:g}, got {value!r}"
            if self.high is not None and value > self.high:
                return f"must be at most {self.high:g}, got {value!r}"
        return self.check(value) if self.check is not None else None


_NAMES = {"int": "an integer", "number": "a number", "str": "a string", "bool": "true or false",
          "dict": "an object", "list": "a list", "numbers": "a list of numbers"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Schema:
    """Field name -> Field; unknown fields are allowed (newer versions may add some)."""

    fields: dict[str, Field] = field(default_factory=dict)

    def check(self, doc: Any, where: str) -> dict[str, Any]:
        """Return `doc` unchanged if every field is valid, else raise SchemaError."""
        if not isinstance(doc, dict):
            raise SchemaError(f"{where}: must be a JSON object, got {type(doc).__name__}")
        for name, spec in self.fields.items():
            if name not in doc:
                if spec.required:
                    raise SchemaError(f"{where}.{name}: missing")
                continue
            problem = spec.complaint(doc[name])
            if problem:
                raise SchemaError(f"{where}.{name}: {problem}")
        return doc


def _odd(value: int) -> str | None:
    return None if value % 2 == 1 else f"must be odd, got {value}"


# the image an architecture takes, shared by both networks
_IMAGE_FIELDS = {
    "channels": Field("int", low=1, high=4),
    "height": Field("int", low=1, high=1024),
    "width": Field("int", low=1, high=1024),
    "levels": Field("int", low=2, high=256),
    "filters": Field("int", required=False, low=1, high=1024),
}

PIXELCNN_ARCHITECTURE = Schema({
    **_IMAGE_FIELDS,
    "layers": Field("int", required=False, low=1, high=64),
    "kernel": Field("int", required=False, low=1, high=15, check=_odd),
    "first_kernel": Field("int", required=False, low=1, high=15, check=_odd),
    "head": Field("int", required=False, low=1, high=4096),
    "dropout": Field("number", required=False, low=0.0, high=0.99),
})

PIXELCNN_CONFIG = Schema({
    "architecture": Field("dict"),
    "preset": Field("str", required=False),
    "levels": Field("int", required=False, low=2, high=256),
    "image_shape": Field("list", required=False),
    "data": Field("dict", required=False, nullable=True),
    "metrics": Field("dict", required=False, nullable=True),
    "training": Field("dict", required=False, nullable=True),
    "background": Field("dict", required=False, nullable=True),
})

CLASSIFIER_ARCHITECTURE = Schema({
    **_IMAGE_FIELDS,
    "num_classes": Field("int", low=2, high=100_000),
    "stages": Field("int", required=False, low=1, high=8),
    "blocks": Field("int", required=False, low=1, high=32),
    "norm": Field("str", required=False),
    "stem_stride": Field("int", required=False, low=1, high=2),
})

CALIBRATION_ENTRY = Schema({
    "kind": Field("str"),
    "threshold": Field("number"),
    "fpr": Field("number", low=1e-12, high=1 - 1e-12),
    "n": Field("int", low=1),
    "quantiles": Field("dict", required=False),
    "scores": Field("numbers"),
    "unit": Field("str", required=False),
    "data": Field("str", required=False, nullable=True),
    "reference": Field("dict", required=False),
    "conservative": Field("bool", required=False),
})

CALIBRATION_FILE = Schema({
    "version": Field("int"),
    "default_kind": Field("str", required=False),
    "kinds": Field("dict"),
})


def check_pixelcnn_architecture(arch: Any, where: str = "config.json architecture"
                                ) -> dict[str, Any]:
    """Validate a PixelCNN architecture dict, including its parameter budget, before the
    network is built for real."""
    PIXELCNN_ARCHITECTURE.check(arch, where)
    from .models.pixelcnn import PixelCNN, PixelCNNConfig

    known = set(PixelCNNConfig.__dataclass_fields__)
    unknown = sorted(set(arch) - known)
    if unknown:
        raise SchemaError(f"{where}: unknown field(s) {', '.join(unknown)}")
    _check_parameter_budget(lambda: PixelCNN(PixelCNNConfig(**arch)), where)
    return arch


def check_classifier_architecture(arch: Any, where: str = "config.json architecture"
                                  ) -> dict[str, Any]:
    """Validate a classifier architecture dict and its parameter budget (meta device)."""
    CLASSIFIER_ARCHITECTURE.check(arch, where)
    from .models.classifier import ClassifierConfig, ResNetClassifier

    known = set(ClassifierConfig.__dataclass_fields__)
    _check_parameter_budget(
        lambda: ResNetClassifier(ClassifierConfig(**{k: v for k, v in arch.items()
                                                     if k in known})), where)
    return arch


def _check_parameter_budget(build: Any, where: str) -> None:
    """Build the network on torch's meta device (nothing is allocated) and refuse one
    over MAX_MODEL_PARAMETERS, or one the configuration cannot build."""
    import torch

    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in build().parameters())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SchemaError(f"{where}: {exc}") from exc
    if params > MAX_MODEL_PARAMETERS:
        raise SchemaError(f"{where}: describes a network of {params:,} parameters, more than "
                          f"the limit of {MAX_MODEL_PARAMETERS:,}")


def check_calibration_entries(doc: dict[str, Any]) -> None:
    """Every entry under `kinds`; also that `scores` holds `n` values."""
    for kind, entry in doc["kinds"].items():
        CALIBRATION_ENTRY.check(entry, f"kinds.{kind}")
        if len(entry["scores"]) != entry["n"]:
            raise SchemaError(f"kinds.{kind}.scores: holds {len(entry['scores'])} values "
                              f"but n is {entry['n']}")
