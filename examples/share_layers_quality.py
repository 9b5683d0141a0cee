"""Quality of `share-layers` on real weights, no training: all-MiniLM-L6-v2, embedding cosine vs parameters kept.

For each pipeline: the sentence embedding (attention-mask-weighted mean of last_hidden_state) of the
rewritten model against the original on held-out paragraphs of ``pydoc_data.topics``
(tests/real_models.py), the block parameters kept (shared matrices + per-block vectors + residuals, over
the original blocks' parameters) and the share of plain tying's cosine gap that the residual closes::

    python examples/share_layers_quality.py            # writes examples/results/share_layers_quality.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import real_models as rm  # noqa: E402

import rewriter  # noqa: E402

PIPELINES = [
    "share-layers(strategy=every,k=2)",
    "share-layers(strategy=every,k=2,rank=16)",
    "share-layers(strategy=every,k=2,rank=32)",
    "share-layers(strategy=every,k=2,rank=64)",
    "share-layers(strategy=every,k=2,rank=128)",
    "share-layers(strategy=every,k=2,rank=1536)",
    "share-layers(strategy=every,k=2,init=first)",
    "share-layers(strategy=cycle,k=3)",
    "share-layers(strategy=all)",
    "share-layers(strategy=every,k=2,what=attention)",
    "share-layers(strategy=every,k=2,what=ffn)",
    "factorize-embeddings(rank=128)",
    "factorize-embeddings(rank=192)",
]


@torch.no_grad()
def embeddings(fn, batches) -> torch.Tensor:
    out = []
    for b in batches:
        h = fn(**b)["last_hidden_state"].double()
        m = b["attention_mask"].unsqueeze(-1).double()
        out.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paragraphs", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("-o", default=str(Path(__file__).parent / "results" / "share_layers_quality.txt"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, _ = rm.minilm()
    batches = rm.minilm_batches(rm.texts("eval"), batch=16, max_len=args.max_len, limit=args.paragraphs)
    program = rewriter.prepare(model, batches[0])
    ref = embeddings(program.module, batches)
    block_before = sum(t.numel() for k, t in program.named_tensors().items()
                       if ".encoder.layer." in f".{k}" and isinstance(t, torch.nn.Parameter))
    lines = [f"all-MiniLM-L6-v2, {len(ref)} held-out paragraphs (<= {args.max_len} tokens), torch {torch.__version__}",
             f"block parameters before: {block_before:,}", "",
             f"{'pipeline':<50} {'params kept':>11} {'block kept':>10} {'cos mean':>8} {'cos min':>8} {'gap closed':>10} {'s':>5}"]
    plain = None
    for spec in PIPELINES:
        t = time.perf_counter()
        result = rewriter.rewrite(program, spec)
        rec = result.report.passes[0]
        before, after = result.report.model_before["parameters"], result.report.model_after["parameters"]
        new = embeddings(result.module, batches)
        cos = F.cosine_similarity(ref, new, dim=-1)
        block_after = block_before - (before - after) if spec.startswith("share") else block_before
        if spec == "share-layers(strategy=every,k=2)":
            plain = cos.mean().item()
        closed = ("" if plain is None or "rank" not in spec or not spec.startswith("share")
                  else f"{(cos.mean().item() - plain) / (1 - plain):.0%}")
        status = "" if rec.verified and rec.rewrites else f"  [{rec.failure or rec.message}]"
        lines.append(f"{spec:<50} {after / before:>11.3f} {block_after / block_before:>10.3f} {cos.mean().item():>8.4f} "
                     f"{cos.min().item():>8.4f} {closed:>10} {time.perf_counter() - t:>5.1f}{status}")
        print(lines[-1], flush=True)
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.o}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
