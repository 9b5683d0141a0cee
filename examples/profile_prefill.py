"""Where a prefill spends its GPU time: the rewritten program next to transformers' SDPA model, kernel by kernel.

    python examples/profile_prefill.py [--shape 7b] [--pipeline flash] [--batch 4 --seq 2048] [--top 15]

A diagnostic for examples/bench_scale.py's prefill rows (same shapes, same random bf16 weights): one
torch.profiler pass over --iters forwards of each model, the kernels sorted by total CUDA time, and the
sum per model, so a gap between the two rows can be traced to the kernels that make it.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scale import SHAPES  # noqa: E402


def main() -> int:
    import transformers as T
    from torch.profiler import ProfilerActivity, profile

    import evo_rewrite

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--pipeline", default="flash")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_prefill.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    cfg = SHAPES[args.shape]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(0)
    with dev:
        eager = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="eager")).eval()
        sdpa = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="sdpa")).eval()
    torch.set_default_dtype(old)
    sdpa.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    example = {"input_ids": ids[:2, :128].clone(), "attention_mask": mask[:2, :128].clone()}
    r = evo_rewrite.rewrite(eager, args.pipeline, example_inputs=example, device="cuda")
    print(r.report.table())
    del eager
    rows = {"transformers sdpa": lambda: sdpa(input_ids=ids, attention_mask=mask).logits,
            f"evo {args.pipeline}": lambda: r.module(input_ids=ids, attention_mask=mask)["logits"]}
    with torch.no_grad():
        for name, fn in rows.items():
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.iters):
                    fn()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
            events.sort(key=lambda e: -e.self_device_time_total)
            total = sum(e.self_device_time_total for e in events) / args.iters / 1e3
            print(f"\n== {name}: {total:.2f} ms GPU per forward; top kernels (ms per forward, calls per forward)")
            for e in events[:args.top]:
                print(f"  {e.self_device_time_total / args.iters / 1e3:9.3f} ms  {e.count // args.iters:5d}x  {e.key[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
