"""The package's version (pyproject.toml says the same): part of a tuned table's device key."""
__version__ = "0.1.0"
