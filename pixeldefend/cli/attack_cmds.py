"""CLI commands (registered on import)."""

from .app import app  # noqa: F401
