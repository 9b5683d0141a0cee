"""Where an emitter may write: one check shared by every target and the CLI."""

from __future__ import annotations

import os
from pathlib import Path

from evo_rewrite.errors import OutputError

__all__ = ["check_output_file", "check_reproduces"]


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


def check_reproduces(program, run, what: str) -> None:
    """Raise VerificationError unless ``run(inputs)`` (a written output, reloaded) gives the program's
    outputs on its example inputs and on the second size, within the exact-pass tolerance."""
    import torch

    from evo_rewrite.errors import VerificationError
    from evo_rewrite.verify import compare_outputs, tolerance

    for inputs in [program.inputs, program.second_inputs()]:
        if inputs is None:
            continue
        with torch.no_grad():
            ref, got = program(inputs), run(inputs)
        metrics, problem, dtype = compare_outputs(ref, got)
        if problem or metrics.get("max_rel_error", 0.0) > tolerance(dtype):
            raise VerificationError(f"{what} does not reproduce the program on {inputs.describe()}: "
                                    f"{problem or 'max relative error %.3g' % metrics['max_rel_error']}")
