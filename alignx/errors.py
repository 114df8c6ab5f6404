"""The error every configuration check raises: a leaf, so that any module can raise it without importing the schema."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem, reported before any model or data is loaded."""
