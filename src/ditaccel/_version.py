"""The library version (its own module so that the core can read it without importing the package root)."""

__version__ = "0.1.0"
