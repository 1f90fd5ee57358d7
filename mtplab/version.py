"""The version string, in a module of its own so that any part of mtplab can read it without
importing the package root (pyproject.toml holds the same number)."""

__version__ = "0.1.0"
