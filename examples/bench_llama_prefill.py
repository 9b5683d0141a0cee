"""Prefill throughput of a Llama-style ~1B model: eager original vs `flash` rewrite vs transformers' sdpa, each also under torch.compile.

    python examples/bench_llama_prefill.py [--batch 8] [--seq 2048] [--layers 16] [--out results.json]

The model (hidden 2048, 16 layers, 32 heads, FFN 5632, bf16, random weights) is built with
attn_implementation="eager", the way the product's users have it. All four variants run in one
process on the same weights and the same input ids (no padding mask, so every variant may use a
causal kernel), each timed as the mean of 5 forward passes after 2 warm-ups, under no_grad.
The torch.compile variants (default mode) are compiled during their warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed(fn, iters=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    import transformers as T

    import evo_rewrite

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, use_cache=False)
    torch.manual_seed(0)
    with dev:  # initialise on the GPU: seconds instead of minutes for 1B parameters
        eager = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="eager")).to(torch.bfloat16).eval()
        sdpa = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="sdpa")).to(torch.bfloat16).eval()
    sdpa.load_state_dict(eager.state_dict())
    params = sum(p.numel() for p in eager.parameters())
    ids = torch.randint(0, 32000, (args.batch, args.seq), device=dev)
    t0 = time.perf_counter()
    result = evo_rewrite.rewrite(eager, "flash", example_inputs={"input_ids": ids[:2, :64].clone()}, device="cuda")
    rewrite_s = time.perf_counter() - t0
    rec = result.report.passes[0]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} transformers {T.__version__}; "
          f"{params / 1e9:.2f}B params; flash: {rec.rewrites} sites, {rec.notes.get('backend')}, "
          f"verified={rec.verified}, rewrite {rewrite_s:.1f}s")
    variants = {
        "eager (original)": lambda: eager(input_ids=ids).logits,
        "evo-rewrite flash": lambda: result.module(input_ids=ids)["logits"],
        "transformers sdpa": lambda: sdpa(input_ids=ids).logits,
    }
    if not args.no_compile:
        c_eager, c_flash, c_sdpa = torch.compile(eager), torch.compile(result.module), torch.compile(sdpa)
        variants["torch.compile(original)"] = lambda: c_eager(input_ids=ids).logits
        variants["torch.compile(evo flash)"] = lambda: c_flash(input_ids=ids)["logits"]
        variants["torch.compile(tf sdpa)"] = lambda: c_sdpa(input_ids=ids).logits
    with torch.no_grad():
        ref = variants["eager (original)"]().float()
        times, errs = {}, {}
        for name, fn in variants.items():
            out = fn().float()
            errs[name] = float((out - ref).abs().max() / ref.abs().max())
            times[name] = timed(fn)
    tokens = args.batch * args.seq
    base = tokens / times["eager (original)"]
    print(f"{'variant':<26} {'ms':>9} {'tokens/s':>11} {'vs eager':>9} {'vs sdpa':>8} {'max rel err':>12}")
    for name, t in times.items():
        tps = tokens / t
        print(f"{name:<26} {t * 1e3:>9.1f} {tps:>11.0f} {tps / base:>8.2f}x {times['transformers sdpa'] / t:>7.2f}x {errs[name]:>12.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": T.__version__,
                       "batch": args.batch, "seq": args.seq, "params": params, "backend": rec.notes.get("backend"),
                       "seconds": times, "max_rel_err": errs}, f, indent=2)


if __name__ == "__main__":
    main()
