"""The single place the version lives, so modules can read it without importing the package root."""

__version__ = "0.1.0"
