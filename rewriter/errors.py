"""User-facing errors. Each carries the exit code the CLI returns for it.

Exit codes (also in README.md):
    0  success
    1  internal error (a bug in evo-rewrite: please report it)
    2  usage error: bad command line, unknown pass, bad pass option
    3  source or capture error: missing/invalid model file, factory raised, model not capturable
    4  verification failed: a pass was rolled back because its output diverged
    5  output error: the output path cannot be written
"""

from __future__ import annotations

__all__ = [
    "RewriteError",
    "UsageError",
    "PipelineError",
    "SourceError",
    "CaptureError",
    "VerificationError",
    "OutputError",
    "PassNotApplicable",
]


class RewriteError(Exception):
    """Base of every error a user can cause. The message says what was wrong and what to do."""

    exit_code = 1


class UsageError(RewriteError):
    exit_code = 2


class PipelineError(UsageError):
    """Unknown pass or bad pass option in a pipeline text."""


class PassNotApplicable(UsageError):
    """A pass option is valid in itself but cannot apply to this model (e.g. kv_heads that do not divide)."""


class SourceError(RewriteError):
    exit_code = 3


class CaptureError(SourceError):
    pass


class VerificationError(RewriteError):
    exit_code = 4


class OutputError(RewriteError):
    exit_code = 5
