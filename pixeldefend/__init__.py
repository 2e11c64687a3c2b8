"""pixeldefend: density-based anomaly and adversarial-input detection."""

__version__ = "0.1.0"

from .detector import DensityDetector  # noqa: E402
from .purify import PurifiedClassifier, PurifyResult, purify, sample  # noqa: E402

__all__ = ["DensityDetector", "PurifiedClassifier", "PurifyResult", "purify", "sample",
           "__version__"]
