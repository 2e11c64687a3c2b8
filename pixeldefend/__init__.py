"""pixeldefend: density-based anomaly and adversarial-input detection.

The public API is loaded on first use (PEP 562), so `import pixeldefend` and the CLI's
`--help` / `--version` do not pay PyTorch's seconds of import time.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "DensityDetector": "detector",
    "PurifiedClassifier": "purify",
    "PurifyResult": "purify",
    "purify": "purify",
    "sample": "purify",
}

__all__ = ["DensityDetector", "PurifiedClassifier", "PurifyResult", "purify", "sample",
           "__version__"]

if TYPE_CHECKING:
    from .detector import DensityDetector
    from .purify import PurifiedClassifier, PurifyResult, purify, sample


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps `pixeldefend.purify` the function, as it was when this package imported it
    eagerly: importing the submodule `pixeldefend.purify` would otherwise bind the
    package attribute of the same name to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
