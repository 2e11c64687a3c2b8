"""Exceptions the CLI turns into clear messages and exit code 2 (never a traceback)."""


class PixelDefendError(Exception):
    """Base class: a problem the user can fix (bad input, bad usage, bad bundle).

    `param` names the Python parameter (or a tuple of them) the message refers to by
    that name; the CLI shows it as its flag (`rendering.cli_message`)."""

    def __init__(self, message: str = "", param: str | tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.param = param


class DataError(PixelDefendError):
    """An input could not be read or does not match what the model expects."""


class BundleError(PixelDefendError):
    """A model bundle is missing, corrupt, or from an incompatible version."""


class UsageError(PixelDefendError, ValueError):
    """Arguments that cannot work together or are out of range (a ValueError, as
    scikit-learn raises for bad parameters).

    Messages name the Python parameter ("fpr must be between 0 and 1", `param="fpr"`);
    the CLI shows it as its flag ("--fpr must be ...")."""


class CalibrationError(UsageError):
    """Calibration cannot give the asked-for guarantee; names the offending parameter
    (a ValueError too, as scikit-learn raises for bad parameters)."""


class TooFewCalibrationImages(CalibrationError):
    """Fewer clean calibration images than the target false-positive rate needs."""

    def __init__(self, n: int, fpr: float, needed: int) -> None:
        self.n, self.fpr, self.needed = n, fpr, needed
        super().__init__(
            f"fpr={fpr:g} needs at least {needed} clean calibration images, got {n}: "
            f"calibrate on more images, raise fpr, or ask for a conservative threshold "
            f"(the largest calibration score as a finite threshold; its false-positive "
            f"rate is then not guaranteed)", param="fpr")
