"""evo-rewrite: capture a trained transformer as one FX graph, run verified rewrite passes, emit it.

This module is the one place that says what users import::

    import evo_rewrite
    result = evo_rewrite.rewrite(model, "flash", example_inputs=(ids,))
    result.module(ids); result.report.table(); result.save("model.pt2")
"""

from ._version import __version__

from .annotations import (Annotations, AttentionBackends, Calibration, CheckpointRegions, KVCacheLayout, LayerCache,
                          TensorParallelPlan)
from .api import RewriteResult, prepare, rewrite, write
from .attention import AttentionSite, find_attention
from .blocks import repeated_blocks
from .graph_capture import capture
from .errors import (CaptureError, OutputError, PassNotApplicable, PipelineError, RewriteError, SourceError,
                     UsageError, VerificationError)
from .figures import Figures, figures
from .generate import generate
from .inputs import InputError, Inputs, parse_input_spec
from .sources import load
from .manager import PassManager
from .pass_infra import (Pass, PassResult, Placement, Skip, get_pass, module_path, register_pass,
                         registered_passes)
from .pipeline import check_pipeline, format_pipeline, parse_pipeline
from .program import Program, SourceInfo
from . import ops as _ops  # noqa: F401 - registers evo_rewrite:: operators, which .pt2 files may hold
from . import fused_ops as _fused_ops  # noqa: F401 - registers the fuse pass's evo_rewrite:: operators
from .report import PassRecord, Report
from .target_infra import Target, TargetReport, emit, get_target, parse_target, register_target, registered_targets
from .verify import Thresholds

__all__ = [
    "__version__", "rewrite", "prepare", "RewriteResult", "load", "capture", "Program", "SourceInfo", "Inputs",
    "parse_input_spec", "Pass", "PassResult", "Skip", "register_pass", "registered_passes", "get_pass",
    "module_path", "parse_pipeline", "format_pipeline", "PassManager", "Thresholds", "Report", "PassRecord",
    "Figures", "figures", "AttentionSite", "find_attention", "RewriteError", "UsageError", "PipelineError",
    "PassNotApplicable", "SourceError", "CaptureError", "VerificationError", "OutputError", "InputError",
    "repeated_blocks", "write", "Placement", "check_pipeline", "Target", "TargetReport", "register_target",
    "registered_targets", "get_target", "parse_target", "emit", "Annotations", "CheckpointRegions",
    "AttentionBackends", "TensorParallelPlan", "KVCacheLayout", "LayerCache", "Calibration", "generate",
]
