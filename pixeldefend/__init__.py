"""pixeldefend: density-based anomaly and adversarial-input detection."""

__version__ = "0.1.0"
