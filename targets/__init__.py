"""Emitters: write a rewritten Program as files other tools run."""

from .hf import save_hf
from .onnx import OnnxReport, save_onnx
from .pytorch import save_pt2

__all__ = ["save_pt2", "save_onnx", "OnnxReport", "save_hf"]
