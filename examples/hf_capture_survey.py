"""Survey: capture each tiny Hugging Face architecture of tests/hf_configs.py and analyse its attention.

One row per architecture: whether evo-rewrite captures it (and why not), which input dimensions stayed
symbolic, capture time, and attention sites found by ``evo_rewrite.find_attention`` against the number
the architecture has. Under the row, every softmax that was not recognised as attention, with its
module path and the matcher's reason.

    python examples/hf_capture_survey.py [ARCH ...]
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch.utils._pytree as pytree  # noqa: E402

import evo_rewrite  # noqa: E402
from hf_configs import ARCHITECTURES, EXPECTED_ATTENTION_SITES, build  # noqa: E402


def _symbolic_dims(program: evo_rewrite.Program) -> str:
    """e.g. ``input_ids[0,1] attention_mask[0,1] (3 symbols)``."""
    flat, _ = pytree.tree_flatten_with_path((program.inputs.args, program.inputs.kwargs))
    parts, symbols = [], set()
    for (path, _leaf), dims in zip(flat, program.dynamic_dims):
        if not dims:
            continue
        name = pytree.keystr(path[1:]).strip("[]'\"") or "arg"
        parts.append(f"{name}[{','.join(str(d) for d in sorted(dims))}]")
        symbols.update(dims.values())
    if not parts:
        return "none"
    return " ".join(parts) + f" ({len(symbols)} symbol{'s' if len(symbols) != 1 else ''})"


def _heads(sites) -> str:
    pairs = sorted({(s.heads, s.kv_heads, s.head_dim) for s in sites}, key=str)
    return " ".join(f"{h}/{kv}x{d}" for h, kv, d in pairs) or "-"


def survey(archs) -> int:
    header = (f"{'arch':<11} {'captured':<10} {'symbolic dims':<72} {'capture s':>9} "
              f"{'attention':>9} {'expected':>8}  heads/kv x head_dim")
    print(header)
    print("-" * len(header))
    mismatches = 0
    for arch in archs:
        expected = EXPECTED_ATTENTION_SITES[arch]
        model = build(arch)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = evo_rewrite.prepare(model)
        except Exception as exc:  # noqa: BLE001 - a survey reports every failure and moves on
            seconds = time.perf_counter() - t0
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"{arch:<11} {'no':<10} {'-':<72} {seconds:>9.2f} {'-':>9} {expected:>8}")
            print(f"    not captured ({type(exc).__name__}): {reason}")
            mismatches += 1
            continue
        seconds = time.perf_counter() - t0
        # the same self-check rewrite() runs: the program at its example size and at a second size
        try:
            ok = evo_rewrite.rewrite(program, "").report.ok
            captured = "yes" if ok else "no"
            why = "" if ok else "the captured program failed its own verification"
        except Exception as exc:  # noqa: BLE001
            captured, why = "no", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        reports = evo_rewrite.find_attention(program.module)
        sites = [r.site for r in reports if r.site is not None]
        flag = "" if len(sites) == expected else "  <-- mismatch"
        mismatches += bool(flag) or captured != "yes"
        print(f"{arch:<11} {captured:<10} {_symbolic_dims(program):<72} {seconds:>9.2f} "
              f"{len(sites):>9} {expected:>8}  {_heads(sites)}{flag}")
        if why:
            print(f"    {why}")
        for r in reports:
            if r.site is None:
                print(f"    softmax not recognised as attention at {r.module or '?'}: {r.reason}")
    return mismatches


def main(argv: list[str]) -> int:
    archs = argv or ARCHITECTURES
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        print(f"unknown architecture(s) {', '.join(unknown)}; known: {', '.join(ARCHITECTURES)}", file=sys.stderr)
        return 2
    bad = survey(archs)
    print(f"\n{len(archs) - bad} of {len(archs)} architectures captured with every attention site found")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
