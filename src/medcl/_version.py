"""medcl's version (one place; the package root, model cards and environment.json read it)."""

__version__ = "0.1.0"
