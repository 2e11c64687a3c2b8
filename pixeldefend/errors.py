"""Exceptions the CLI turns into clear messages and exit code 2 (never a traceback)."""


class PixelDefendError(Exception):
    """Base class: a problem the user can fix (bad input, bad usage, bad bundle)."""


class DataError(PixelDefendError):
    """An input could not be read or does not match what the model expects."""


class BundleError(PixelDefendError):
    """A model bundle is missing, corrupt, or from an incompatible version."""


class UsageError(PixelDefendError):
    """Arguments that cannot work together or are out of range."""
