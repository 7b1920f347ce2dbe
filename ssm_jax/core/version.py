"""The package version (one place; exports record it)."""

__version__ = "0.1.0"
