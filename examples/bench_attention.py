"""Attention alone: TFLOP/s of the SDPA backend `flash` chooses vs SDPA's default, on one GPU.

    python examples/bench_attention.py [--out results.json]

Head dim 128, 16 heads, bf16, 16k tokens per batch (B = 16384 / S), S = 1k, 4k, 16k, causal and
not; forward and forward+backward. FLOPs: 4·B·H·S²·D forward (half when causal), 2.5× that for
backward. Each number is the mean of 10 timed calls after 3 warm-ups (CUDA events).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from evo_rewrite.passes import flash_backends as fb  # noqa: E402


timed = fb.time_ms  # mean ms of 10 calls after 3 warm-ups, CUDA events: the same timer the pass uses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    H, D, dtype, tokens = 16, 128, torch.bfloat16, 16384
    rows = []
    names = ["default", "cudnn", "flash", "efficient"]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; bf16, H={H}, D={D}, B*S={tokens}; TFLOP/s")
    print(f"{'S':>6} {'causal':>6} {'flash chooses':>13} " + " ".join(f"{'fwd ' + n:>13}" for n in names)
          + f" {'f+b chosen':>11} {'f+b default':>12}")
    for S in (1024, 4096, 16384):
        B = max(1, tokens // S)
        for causal in (False, True):
            sig = fb.Signature(H, H, D, dtype, "causal" if causal else "none", False)
            choice = fb.choose(sig, dev, B, seqs=(S - 3, S))
            q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(B, H, S, D, device=dev, dtype=dtype)
            scale = D ** -0.5
            flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)

            def run(name):
                if name == "default":
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
                return fb.call_pinned(name, q, k, v, None, 0.0, causal, scale)

            fwd = {}
            with torch.no_grad():
                for _ in range(2):  # two rounds, best of each, so order does not favour anyone
                    for name in names:
                        try:
                            t = timed(lambda: run(name))  # noqa: B023
                        except Exception:  # noqa: BLE001 - a backend that cannot run this shape
                            continue
                        fwd[name] = max(fwd.get(name, 0.0), flops / t / 1e9)
            fb_c = 3.5 * flops / timed(lambda: run(choice.backend).backward(g)) / 1e9
            fb_d = 3.5 * flops / timed(lambda: run("default").backward(g)) / 1e9
            row = {"S": S, "B": B, "causal": causal, "chosen": choice.backend, "choose_ms": choice.ms,
                   "rejected": choice.rejected, "fwd_tflops": fwd, "fwdbwd_tflops_chosen": fb_c, "fwdbwd_tflops_default": fb_d}
            rows.append(row)
            print(f"{S:>6} {str(causal):>6} {choice.backend:>13} " + " ".join(f"{fwd.get(n, float('nan')):>13.0f}" for n in names)
                  + f" {fb_c:>11.0f} {fb_d:>12.0f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
