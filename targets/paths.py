"""Where an emitter may write: one check shared by every target and the CLI."""

from __future__ import annotations

import os
from pathlib import Path

from rewriter.errors import OutputError

__all__ = ["check_output_file"]


def check_output_file(out: str | os.PathLike, source: str | None = None, *, suffix: str = "", what: str = "another path") -> Path:
    """Raise OutputError unless ``out`` can be written as a new file; return its directory.

    Refuses a directory, a missing or read-only parent directory, and the source itself
    (evo-rewrite never writes over its input).
    """
    out = Path(out)
    if out.is_dir():
        hint = f"; give a file name ending in {suffix}" if suffix else "; give a file name"
        raise OutputError(f"{out} is a directory{hint}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {out}: directory {parent} is not writable; choose {what}")
    if source and Path(source).exists() and out.exists() and os.path.samefile(source, out):
        raise OutputError(f"refusing to overwrite the source {source}; choose {what}")
    return parent
