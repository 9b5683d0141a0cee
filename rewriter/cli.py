"""Command line: ``evo-rewrite SOURCE [--passes SPEC] [-o OUT] ...``. Exit codes are in rewriter/errors.py."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path

from .errors import OutputError, RewriteError, UsageError
from .target_infra import Terminated, terminate_as_interrupt, write_text_atomic

EPILOG = """\
sources:  model.pt2 | hf_model_dir/ | file.py:factory | package.module:factory | model.pt (--allow-pickle)
pipeline: comma-separated passes with options, e.g. 'gqa(kv_heads=4),flash'
exit codes: 0 ok, 1 internal error, 2 usage error (bad option, unknown pass), 3 source or capture error,
            4 verification failed (a pass was rolled back; nothing written), 5 output cannot be written,
            130 interrupted (Ctrl-C), 143 terminated (SIGTERM); nothing is left behind
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other usage error (argparse prints usage first)
        raise UsageError(f"{message} (evo-rewrite --help lists the options)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evo-rewrite", description="Rewrite a trained transformer: capture, verified passes, emit.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="the model to rewrite (see 'sources' below)")
    p.add_argument("--passes", default="", metavar="SPEC", help="pipeline text; empty: capture, verify and emit")
    p.add_argument("-o", "--output", metavar="OUT", help="output path (default: <source name>.rewritten.<target's suffix> here)")
    p.add_argument("--target", default="pytorch", metavar="TARGET",
                   help="what to write, with options like a pass: pytorch (.pt2; default), onnx(attention=ort,dtype=fp16), "
                        "hf, safetensors, or an installed package's target (--list-targets)")
    p.add_argument("--onnx-attention", choices=["ort", "onnx"], default=None,
                   help="--target onnx: attention as ORT's MultiHeadAttention/GroupQueryAttention (ort, default) "
                        "or the standard ONNX Attention operator (onnx, opset 23); same as onnx(attention=...)")
    p.add_argument("--onnx-dtype", choices=["fp32", "fp16"], default=None,
                   help="--target onnx: precision (fp16 keeps ops without a CPU fp16 kernel in fp32); same as onnx(dtype=...)")
    p.add_argument("--onnx-external-data", action="store_true",
                   help="--target onnx: weights in <OUT>.data beside the model (automatic above 1.5 GiB)")
    p.add_argument("--inputs", metavar="SPEC", help="example inputs, e.g. 'input_ids:int64[2,16]@0..50257'")
    p.add_argument("--report-json", metavar="PATH", help="also write the report as JSON (schema in rewriter/report.py)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to capture, verify and run passes")
    p.add_argument("--explain", action="store_true", help="list every softmax: attention site or why not; without -o "
                   "it only explains (no pass runs, nothing is written), with -o it explains and then rewrites")
    p.add_argument("--list-passes", action="store_true", help="list the passes, their options and exit")
    p.add_argument("--list-targets", action="store_true", help="list the targets, their options and exit")
    p.add_argument("--hf-output", metavar="DIR", help="also write a Hugging Face checkpoint directory (when the rewrite "
                   "fits the source's config, e.g. gqa -> num_key_value_heads); same as a second run with --target hf")
    p.add_argument("--calibration", metavar="FILE.pt", help="calibration inputs for calibrated passes: a torch.save'd dict of input tensors (or a list of dicts)")
    p.add_argument("--heal-data", nargs="+", metavar="PATH", help="unlabeled data for the heal step: text files "
                   "(.txt .md .rst .jsonl) or directories of them, or token ids (.npy, .pt)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer for --heal-data text (default: the Hugging Face source's own)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading a pickled .pt module (runs code in the file)")
    p.add_argument("--trust-code", action="store_true", help="allow loading a directory of generated source (runs its "
                   "model.py, if unchanged since evo-rewrite wrote it)")
    p.add_argument("--allow-missing-weights", action="store_true", help="load a Hugging Face checkpoint that lacks some "
                   "tensors of its class (they stay randomly initialised)")
    p.add_argument("--min-sqnr", type=float, metavar="DB", help="roll back a lossy pass whose output SQNR falls below DB")
    p.add_argument("--min-cosine", type=float, metavar="X", help="roll back a lossy pass whose output cosine falls below X")
    p.add_argument("--max-kl", type=float, metavar="X", help="roll back a lossy pass whose logits KL exceeds X")
    p.add_argument("--no-cache", action="store_true", help="capture a causal LM without its KV cache (the plain "
                   "forward, for scoring and training); by default it is captured with past/present K/V inputs and "
                   "outputs, except for --target onnx (one cacheless .onnx file)")
    p.add_argument("--generate", metavar="PROMPT", help="after writing, generate from PROMPT with the rewritten program "
                   "(a causal LM) and print the text; the tokenizer is the source's or --tokenizer's")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="--generate: tokens to generate (default 32)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages (nor library progress bars)")
    return p


def _listing(registry: dict, kind) -> list[str]:
    lines = []
    for name, cls in registry.items():
        doc = (cls.summary or (cls.__doc__ or "").strip().splitlines()[0]).strip()
        lines.append(f"{name:<20} {kind(cls):<6} {doc}")
        for opt, tp, default in cls.options():
            lines.append(f"    {opt} ({tp}, default {default})")
    return lines


def list_passes() -> str:
    from .pass_infra import registered_passes

    lines = _listing(registered_passes(), lambda c: "exact" if c.exact else "lossy")
    return "\n".join(lines) if lines else "(no passes registered)"


def list_targets() -> str:
    from .target_infra import registered_targets

    lines = _listing(registered_targets(), lambda c: c.suffix or "dir/")
    return "\n".join(lines) if lines else "(no targets registered)"


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


def _stem(source: str) -> str:
    s = source.rstrip("/")
    stem = s.rsplit(":", 1)[-1] if (":" in s and not Path(s).exists()) else Path(s).name.split(".")[0]
    return stem or "model"


def _target(args):
    """The --target text with the --onnx-* shorthands folded in (they apply only to the onnx target)."""
    from .target_infra import parse_target

    target = parse_target(args.target)
    onnx_flags = {"attention": args.onnx_attention, "dtype": args.onnx_dtype,
                  "external_data": True if args.onnx_external_data else None}
    given = {k: v for k, v in onnx_flags.items() if v is not None}
    if given and target.name != "onnx":
        raise UsageError("--onnx-attention, --onnx-dtype and --onnx-external-data apply only with --target onnx")
    return dataclasses.replace(target, **given) if given else target


def _silence_libraries() -> None:
    """-q: no progress bars or info logs from transformers, huggingface_hub or tqdm either."""
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    if "transformers" in sys.modules:  # imported already: its settings were read at import
        try:
            from transformers.utils import logging as tlog

            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        except Exception:  # noqa: BLE001 - best effort
            pass
    if "huggingface_hub" in sys.modules:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except Exception:  # noqa: BLE001
            pass


def _check_outputs(args, target) -> None:
    """Every output option, before any work: no two the same (the default -o included), none onto or into the
    source, none onto a directory, device, FIFO or socket, every parent writable."""
    from .api import routes_to_genai
    from .target_infra import check_output

    stem = _stem(args.source)
    named = [("-o", args.output), ("--hf-output", args.hf_output), ("--report-json", args.report_json)]
    named = [(flag, p) for flag, p in named if p]
    if not args.output:  # the default output: a file, or a directory for a program with checkpoint regions
        defaults = {f"{stem}.rewritten{target.suffix}", f"{stem}.rewritten"}
        for flag, p in named:
            if os.path.realpath(p) in {os.path.realpath(d) for d in defaults}:
                raise UsageError(f"{flag} {p} is the default model output (no -o given); give another path")
    for i, (flag, p) in enumerate(named):
        for other, q in named[:i]:
            if os.path.realpath(p) == os.path.realpath(q):
                raise UsageError(f"{flag} and {other} are the same path ({p}); give each output its own path")
        check_output(p, [args.source], suffix=target.suffix if flag == "-o" else "",
                     directory=flag == "--hf-output" or (flag == "-o" and routes_to_genai(target, p)),
                     what=f"another {flag} path")
    if not args.output:
        check_output(f"{stem}.rewritten{target.suffix}", [args.source], suffix=target.suffix, what="an -o path")


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_passes or args.list_targets:
        print("\n\n".join(f() for f, on in ((list_passes, args.list_passes), (list_targets, args.list_targets)) if on))
        return 0
    if not args.source:
        raise UsageError("give a SOURCE (e.g. evo_rewrite.zoo:gpt), or --list-passes")
    if args.quiet:
        _silence_libraries()
    from .api import given_inputs, load_calibration, prepare, rewrite, routes_to_genai
    from .heal_data import read_heal_data
    from .pipeline import check_pipeline, check_target, parse_pipeline
    from .target_infra import get_target
    from .verify import Thresholds

    # everything a user can get wrong is checked before any loading
    passes = parse_pipeline(args.passes)
    check_pipeline(passes, given_inputs(bool(args.calibration), bool(args.heal_data), args.device))
    if args.tokenizer and not (args.heal_data or args.generate):
        raise UsageError("--tokenizer applies only with --heal-data or --generate (it reads their text)")
    if args.generate is not None and args.no_cache:
        raise UsageError("--generate needs the KV cache; drop --no-cache")
    try:
        thresholds = Thresholds(args.min_sqnr, args.min_cosine, args.max_kl)
    except ValueError as e:
        raise UsageError(str(e)) from None
    target = _target(args)
    target.validate(None)
    check_target(passes, target)
    hf = get_target("hf")() if args.hf_output else None
    if hf:
        check_target(passes, hf)
    explain_only = args.explain and not args.output
    if not explain_only:
        _check_outputs(args, target)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is false)")
    heal_data = read_heal_data(args.heal_data) if args.heal_data else None
    calibration = load_calibration(args.calibration) if args.calibration else None
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))

    # --target onnx: one cacheless .onnx file; -o DIR (no .onnx) of a causal LM: a GenAI directory with the cache
    single_onnx = target.name == "onnx" and not routes_to_genai(target, args.output)
    program = prepare(args.source, args.inputs, allow_pickle=args.allow_pickle, trust_code=args.trust_code,
                      allow_missing_weights=args.allow_missing_weights, device=args.device, log=log,
                      cache=not (args.no_cache or single_onnx))
    if args.explain:
        print(explain(program))
        if explain_only:
            return 0
        print()
    # the same function as Python's evo_rewrite.rewrite(...).write(...)
    result = rewrite(program, passes, device=args.device, thresholds=thresholds, calibration=calibration,
                     heal_data=heal_data, tokenizer=args.tokenizer, log=log)
    report = result.report
    report.source = args.source
    if report.ok:
        out = Path(args.output) if args.output else Path(target.output_name(result.program, _stem(args.source)))
        for t, path in [(target, out)] + ([(hf, Path(args.hf_output))] if hf else []):
            result.write(path, t, log=log)
    print(report.table())
    if args.generate is not None and report.ok:
        from .generate import generate_text

        print(generate_text(result.program, args.generate, args.tokenizer or args.source, args.max_new_tokens, args.device))
    if args.report_json:
        try:
            write_text_atomic(args.report_json, report.to_json())
        except OutputError as e:
            kept = f"; the model outputs were written ({', '.join(report.outputs)})" if report.outputs else ""
            raise OutputError(f"{e}{kept}") from None
    if not report.ok:
        bad = report.failed()
        print(f"evo-rewrite: verification failed for {', '.join(p.spec for p in bad)}; nothing was written "
              "(see the report above). Loosen --min-sqnr/--min-cosine/--max-kl for lossy passes, or drop the pass.",
              file=sys.stderr)
        return 4
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        with terminate_as_interrupt():
            code = run(argv)
    except RewriteError as e:
        print(f"evo-rewrite: error: {_one_line(str(e))}", file=sys.stderr)
        code = e.exit_code
    except Terminated as e:
        print(f"evo-rewrite: terminated (signal {e.signum}); nothing was written and no temporary file is left",
              file=sys.stderr)
        code = 128 + e.signum
    except KeyboardInterrupt:
        print("evo-rewrite: interrupted; nothing was written and no temporary file is left", file=sys.stderr)
        code = 130
    except Exception as e:  # noqa: BLE001 - a bug: say so plainly, traceback only on request
        print(f"evo-rewrite: internal error: {type(e).__name__}: {_one_line(str(e))}. This is a bug in evo-rewrite; "
              "rerun with EVO_REWRITE_DEBUG=1 for the traceback and report it.", file=sys.stderr)
        if os.environ.get("EVO_REWRITE_DEBUG"):
            traceback.print_exc()
        code = 1
    return code


def _one_line(msg: str) -> str:
    return " ".join(part.strip() for part in msg.splitlines() if part.strip()) or msg


if __name__ == "__main__":
    sys.exit(main())
