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

import contextlib
import io
import logging
import os
import sys
import warnings

__all__ = [
    "quiet",
    "debug_enabled",
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


def debug_enabled() -> bool:
    """``EVO_REWRITE_DEBUG=1``: keep library logs, warnings and tracebacks (for reporting a bug)."""
    return os.environ.get("EVO_REWRITE_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def quiet():
    """Silence library chatter (logging, warnings, progress bars, prints to stderr) for one attempt.

    Loading and capturing call torch and transformers, which log, warn and draw progress bars on
    their own; a failure must end in one line that says what to do, so their output is dropped for
    the attempt. With ``EVO_REWRITE_DEBUG=1`` nothing is silenced.
    """
    if debug_enabled():
        yield
        return
    previous = logging.root.manager.disable
    bars = []  # (enable function, was enabled)
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None and hasattr(hf_logging, "disable_progress_bar"):
        bars.append((hf_logging.enable_progress_bar, hf_logging.is_progress_bar_enabled()))
        hf_logging.disable_progress_bar()
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None and hasattr(hub, "disable_progress_bars"):
        bars.append((hub.enable_progress_bars, not hub.are_progress_bars_disabled()))
        hub.disable_progress_bars()
    logging.disable(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        for enable, was in bars:
            if was:
                enable()
