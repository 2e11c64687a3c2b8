"""Names, choices and default values the CLI shows before any work starts.

Plain constants with no heavy imports: `pixeldefend --help`, `--version` and usage
errors read them without loading PyTorch (seconds of start-up). The modules that use
them (`scores`, `attacks`, `models.*`, `evaluate`, `ood`, `bench`, `purify`) import them
from here, so each value is still defined once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path("models/digits")
DEFAULT_CLASSIFIER = Path("models/digits-classifier")

# ------------------------------------------------------------------ models.pixelcnn
PIXELCNN_PRESETS: dict[str, dict[str, int]] = {
    # for tests: builds and runs in milliseconds
    "tiny": {"filters": 16, "layers": 2, "kernel": 3, "first_kernel": 3, "head": 32},
    # the CPU default: trains on Fashion-MNIST in tens of minutes on 2 cores
    "small": {"filters": 32, "layers": 5, "kernel": 3, "first_kernel": 5, "head": 64},
    # for a GPU or a patient CPU
    "base": {"filters": 96, "layers": 8, "kernel": 3, "first_kernel": 7, "head": 192},
}

# ---------------------------------------------------------------- models.classifier
CLASSIFIER_PRESETS: dict[str, dict[str, Any]] = {
    # for tests: trains on digits in a second or two
    "tiny": {"filters": 8, "stages": 2, "blocks": 1},
    # default: 78k parameters (0.3 MB)
    "small": {"filters": 16, "stages": 3, "blocks": 1},
    # 4x the parameters, ~2x the time of small
    "medium": {"filters": 32, "stages": 3, "blocks": 1},
    # wider and deeper, for a GPU or a patient CPU
    "base": {"filters": 32, "stages": 3, "blocks": 2},
}

# --------------------------------------------------------------------------- scores
# the gate's default: robust to the failure modes of raw likelihood (docs/OOD.md); the
# kinds themselves, with their help, are the registry `scores.SCORES`
DEFAULT_SCORE = "dose"
# Ren et al. (2019) found mutation rates of 0.1-0.2 best (with L2 regularisation). 0.2 is
# the upper end of that range on purpose: one sub-pixel in five replaced by noise wipes out
# the shapes (long-range structure) the main model learns, while the local smoothness and
# background-pixel statistics that confound raw likelihood survive, and a background model
# trained for only a few CPU epochs needs the stronger corruption to stop learning shapes.
DEFAULT_MUTATION_RATE = 0.2
# L2 penalty (Adam weight decay) on the background model, as in Ren et al.: it keeps the
# background model from fitting the semantics that the mutations leave behind.
DEFAULT_BACKGROUND_L2 = 1e-4

# ------------------------------------------------------------------------- evaluate
DEFENCES = ("none", "purify", "adaptive")
DEFAULT_ATTACKS = ("rand", "fgsm", "bim", "pgd", "cw", "deepfool")
DEFAULT_BPDA_N = 100  # images BPDA attacks unless told (each step purifies all of them)

# ------------------------------------------------------------------------------ ood
BUILTIN_OOD = ("characters", "rendered-digits", "strokes", "shapes", "blobs", "photos",
               "noise", "constant", "rot90", "shift", "contrast", "patch", "digits",
               "inverted", "hflip", "vflip", "shuffled")

# ---------------------------------------------------------------------------- bench
CASE_NAMES = ("digits", "28x28x1", "32x32x3")

# --------------------------------------------------------------------------- purify
DEFAULT_BATCH = 64
GATE_CHOICES = ("none", "anomalous")  # defend --fail-on
