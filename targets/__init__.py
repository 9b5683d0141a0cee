"""Emitters: write a rewritten Program as files other tools run."""

from .pytorch import save_pt2

__all__ = ["save_pt2"]
