"""The four methods. Each is one module whose loss reads like the paper's pseudo-code."""

from fastdense.methods.base import Method

__all__ = ["Method"]
