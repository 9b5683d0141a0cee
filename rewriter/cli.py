"""Command line: ``evo-rewrite SOURCE [--passes SPEC] [-o OUT] ...``. Exit codes are in rewriter/errors.py."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

from .errors import OutputError, RewriteError, UsageError

EPILOG = """\
sources:  model.pt2 | hf_model_dir/ | file.py:factory | package.module:factory | model.pt (--allow-pickle)
pipeline: comma-separated passes with options, e.g. 'gqa(kv_heads=4),flash'
exit codes: 0 ok, 1 internal error, 2 usage error (bad option, unknown pass), 3 source or capture error,
            4 verification failed (a pass was rolled back; nothing written), 5 output cannot be written
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evo-rewrite", description="Rewrite a trained transformer: capture, verified passes, emit.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="the model to rewrite (see 'sources' below)")
    p.add_argument("--passes", default="", metavar="SPEC", help="pipeline text; empty: capture, verify and emit")
    p.add_argument("-o", "--output", metavar="OUT", help="output file (default: <source name>.rewritten.pt2 here)")
    p.add_argument("--target", choices=["pytorch", "onnx"], default="pytorch", help="what to emit (default pytorch: .pt2)")
    p.add_argument("--onnx-attention", choices=["ort", "onnx"], default=None,
                   help="--target onnx: attention as ORT's MultiHeadAttention/GroupQueryAttention (ort, default) "
                        "or the standard ONNX Attention operator (onnx, opset 23)")
    p.add_argument("--onnx-dtype", choices=["fp32", "fp16"], default="fp32",
                   help="--target onnx: precision (fp16 keeps ops without a CPU fp16 kernel in fp32)")
    p.add_argument("--onnx-external-data", action="store_true",
                   help="--target onnx: weights in <OUT>.data beside the model (automatic above 1.5 GiB)")
    p.add_argument("--inputs", metavar="SPEC", help="example inputs, e.g. 'input_ids:int64[2,16]@0..50257'")
    p.add_argument("--report-json", metavar="PATH", help="also write the report as JSON (schema in rewriter/report.py)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to capture, verify and run passes")
    p.add_argument("--explain", action="store_true", help="list every softmax: attention site or why not")
    p.add_argument("--list-passes", action="store_true", help="list the passes, their options and exit")
    p.add_argument("--hf-output", metavar="DIR", help="also write a Hugging Face checkpoint directory (default for a Hugging "
                   "Face source whose rewrite fits its config, e.g. gqa: OUT without .pt2 + '-hf')")
    p.add_argument("--calibration", metavar="FILE.pt", help="calibration inputs for calibrated passes: a torch.save'd dict of input tensors (or a list of dicts)")
    p.add_argument("--heal-data", nargs="+", metavar="PATH", help="unlabeled data for the heal step: text files "
                   "(.txt .md .rst .jsonl) or directories of them, or token ids (.npy, .pt)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer for --heal-data text (default: the Hugging Face source's own)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a pickled .pt module (runs code in the file)")
    p.add_argument("--min-sqnr", type=float, metavar="DB", help="roll back a lossy pass whose output SQNR falls below DB")
    p.add_argument("--min-cosine", type=float, metavar="X", help="roll back a lossy pass whose output cosine falls below X")
    p.add_argument("--max-kl", type=float, metavar="X", help="roll back a lossy pass whose logits KL exceeds X")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    return p


def list_passes() -> str:
    from .pass_infra import registered_passes

    lines = []
    for name, cls in registered_passes().items():
        doc = (cls.summary or (cls.__doc__ or "").strip().splitlines()[0]).strip()
        lines.append(f"{name:<16} {'exact' if cls.exact else 'lossy'}  {doc}")
        for opt, tp, default in cls.options():
            lines.append(f"    {opt} ({tp}, default {default})")
    return "\n".join(lines) if lines else "(no passes registered)"


def explain(program) -> str:
    from .attention import find_attention

    lines = [f"{'module':<40} {'softmax':<14} attention?"]
    for r in find_attention(program.module):
        if r.site:
            s = r.site
            what = (f"yes: {s.layout} heads={s.heads} kv_heads={s.kv_heads} head_dim={s.head_dim}"
                    f" score ops={'/'.join(s.modifiers) or 'none'}{' dropout' if s.dropout else ''}")
        else:
            what = f"no: {r.reason}"
        lines.append(f"{r.module or '<top>':<40} {r.node.name:<14} {what}")
    return "\n".join(lines)


def _default_output(source: str, target: str) -> Path:
    s = source.rstrip("/")
    stem = s.rsplit(":", 1)[-1] if (":" in s and not Path(s).exists()) else Path(s).name.split(".")[0]
    return Path(f"{stem or 'model'}.rewritten.{'onnx' if target == 'onnx' else 'pt2'}")


def _check_output_path(out: Path, source: str) -> None:
    from evo_rewrite.targets.paths import check_output_file

    check_output_file(out, source, suffix=out.suffix or ".pt2", what="another -o")


def _write_json_atomic(path: str, text: str) -> None:
    """Write the report (its path was checked with -o's before any work)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, p)


def _write_hf(program, args, out: Path, report, log) -> None:
    """The Hugging Face checkpoint beside the .pt2: asked for, or by default for HF sources when it fits."""
    from evo_rewrite.targets.hf import hf_expressible, save_hf

    reason = hf_expressible(program)
    if args.hf_output is None and (program.source.kind != "hf" or reason or not program.applied):
        if program.source.kind == "hf" and program.applied and reason:
            report.notes.append(f"no Hugging Face checkpoint written: {reason}")
        return
    if reason:
        raise UsageError(f"--hf-output: cannot write a Hugging Face checkpoint: {reason}")
    target = Path(args.hf_output) if args.hf_output else out.with_name(out.stem + "-hf")
    if log:
        log(f"writing {target} (Hugging Face checkpoint, reload and check) ...")
    report.outputs.append(save_hf(program, target))


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_passes:
        print(list_passes())
        return 0
    if not args.source:
        raise UsageError("give a SOURCE (e.g. evo_rewrite.zoo:gpt), or --list-passes")
    from .api import prepare
    from .manager import PassManager
    from .pipeline import parse_pipeline
    from .verify import Thresholds

    passes = parse_pipeline(args.passes)  # bad pipelines fail before any loading
    from .api import check_heal_data
    from .heal_data import attach_heal_data, read_heal_data

    check_heal_data(passes, bool(args.heal_data), "--heal-data")
    if args.tokenizer and not args.heal_data:
        raise UsageError("--tokenizer applies only with --heal-data (it reads heal's text)")
    heal_data = read_heal_data(args.heal_data) if args.heal_data else None
    try:
        thresholds = Thresholds(args.min_sqnr, args.min_cosine, args.max_kl)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.target != "onnx" and (args.onnx_attention or args.onnx_dtype != "fp32" or args.onnx_external_data):
        raise UsageError("--onnx-attention, --onnx-dtype and --onnx-external-data apply only with --target onnx")
    out = Path(args.output) if args.output else _default_output(args.source, args.target)
    _check_output_path(out, args.source)
    if args.report_json:
        _check_output_path(Path(args.report_json), args.source)
    hf_out = Path(args.hf_output) if args.hf_output else (out.with_name(out.stem + "-hf") if Path(args.source).is_dir() else None)
    if hf_out is not None and hf_out.exists():
        raise OutputError(f"{hf_out} already exists; remove it or choose another --hf-output")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is false)")
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    from .api import load_calibration, set_calibration

    calibration = load_calibration(args.calibration) if args.calibration else None
    program = prepare(args.source, args.inputs, allow_pickle=args.allow_pickle, device=args.device, log=log)
    set_calibration(program, calibration, args.device)
    attach_heal_data(program, heal_data, args.tokenizer)
    if args.explain:
        print(explain(program))
        print()
    program, report = PassManager(passes, thresholds, log=log).run(program)
    report.source, report.source_kind = args.source, program.source.kind
    if report.ok and args.target == "onnx":
        from evo_rewrite.targets.onnx import DEFAULT_ATTENTION, save_onnx

        if log:
            log(f"writing {out} (ONNX export, check in ONNX Runtime at two sizes) ...")
        onnx_report = save_onnx(program, out, attention=args.onnx_attention or DEFAULT_ATTENTION,
                                dtype=args.onnx_dtype, external_data=True if args.onnx_external_data else None, log=log)
        report.onnx = onnx_report.to_dict()
        report.outputs += [onnx_report.path] + ([onnx_report.external_data] if onnx_report.external_data else [])
    elif report.ok:
        from evo_rewrite.passes.checkpoint_regions import regions_of
        from evo_rewrite.targets.pytorch import save_pt2
        from evo_rewrite.targets.source import save_source

        if regions_of(program.module):  # a .pt2 would drop checkpoint regions: generated source + safetensors
            src_dir = out.with_suffix("") if args.output is None else out  # default: <name>.rewritten/
            if log:
                log(f"writing {src_dir}/ (generated source + safetensors: the program has checkpoint regions; "
                    "reload and check at two sizes) ...")
            report.outputs.append(save_source(program, src_dir))
        else:
            if log:
                log(f"writing {out} (re-export, reload and check at two sizes) ...")
            report.outputs.append(save_pt2(program, out))
        _write_hf(program, args, out, report, log)
    print(report.table())
    if args.report_json:
        _write_json_atomic(args.report_json, report.to_json())
    if not report.ok:
        bad = report.failed()
        print(f"evo-rewrite: verification failed for {', '.join(p.spec for p in bad)}; nothing was written "
              "(see the report above). Loosen --min-sqnr/--min-cosine/--max-kl for lossy passes, or drop the pass.",
              file=sys.stderr)
        return 4
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = run(argv)
    except RewriteError as e:
        print(f"evo-rewrite: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("evo-rewrite: interrupted; nothing was written", file=sys.stderr)
        code = 130
    except Exception as e:  # noqa: BLE001 - a bug: say so plainly, traceback only on request
        print(f"evo-rewrite: internal error: {type(e).__name__}: {e}\nThis is a bug in evo-rewrite; rerun with "
              "EVO_REWRITE_DEBUG=1 for the traceback and report it.", file=sys.stderr)
        if os.environ.get("EVO_REWRITE_DEBUG"):
            traceback.print_exc()
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
