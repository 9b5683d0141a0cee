"""What every target checks after writing: the reloaded output reproduces the program."""

from __future__ import annotations


__all__ = ["check_reproduces"]


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
