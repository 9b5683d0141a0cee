"""Prefill of a Llama-style ~1B model on one GPU and with tensor parallelism on two, side by side in one run.

    torchrun --nproc-per-node 2 examples/bench_tensor_parallel.py [--batch 8] [--seq 2048] [--out results.json]
    torchrun --nproc-per-node 2 examples/bench_tensor_parallel.py --tiny --device cpu     # smoke test (gloo)

The model (LlamaConfig: hidden 2048, 16 layers, 32 heads, FFN 5632, vocab 32000, bf16, random
weights, built on every rank in-process with the same seed) is rewritten with
``flash(backend=default),tensor-parallel(degree=2)`` on every rank (the pass checks the plan and
simulates both ranks against the unsharded program). Then, on the same weights:

* degree 1: the rewritten (unsharded) program on rank 0's GPU alone (rank 1 waits);
* degree 2: ``evo_rewrite.targets.parallel.shard`` — weights placed with DTensor (scattered from rank 0), each
  rank running its graph with NCCL all-reduces;
* degree 2 + sequence parallel: the same with reduce-scatter / all-gather along the sequence.

Each variant is the mean of 5 prefill forward passes after 2 warm-ups, under no_grad, on the same
input ids (broadcast from rank 0). Memory per GPU: bytes of the weights this GPU holds, and the
peak allocated during prefill (``torch.cuda.max_memory_allocated``; weights included). The logits of
each sharded variant are compared with degree 1's (max |Δ| / max |ref|; bf16 tolerance 6e-2).

Also factories for the command line (``evo-rewrite examples/bench_tensor_parallel.py:llama_small_bf16 ...``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
SMALL = dict(FULL, num_hidden_layers=4)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=256, max_position_embeddings=256)


def build_llama(cfg: dict, device="cpu", dtype=torch.bfloat16, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    with torch.device(device):
        model = T.LlamaForCausalLM(T.LlamaConfig(**cfg, use_cache=False, attn_implementation="eager"))
    return model.to(dtype).eval()


def llama_small_bf16():
    """4 layers of the benchmark's model in bf16 and example ids (2, 64): a factory for evo-rewrite."""
    return build_llama(SMALL), {"input_ids": torch.randint(0, SMALL["vocab_size"], (2, 64),
                                                            generator=torch.Generator().manual_seed(0))}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters=5, warmup=2):
    """Mean seconds per call after warm-up; the peak-memory counter covers the timed calls only."""
    for _ in range(warmup):
        fn()
    _free(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def _rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, a batch row at a time (full logits are GBs in fp32)."""
    num = max(float((o.float() - r.float()).abs().max()) for r, o in zip(ref, out))
    return num / max(float(r.float().abs().max()) for r in ref)


def _max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main():
    import transformers as T

    import evo_rewrite
    from evo_rewrite.inputs import Inputs
    from evo_rewrite.verify import TOLERANCE
    from evo_rewrite.targets.parallel import broadcast_inputs, init_mesh, shard

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model, batch 2 x 64 (smoke test)")
    ap.add_argument("--no-sp", action="store_true", help="skip the sequence-parallel variant")
    ap.add_argument("--out", help="write the results as JSON here (rank 0)")
    ap.add_argument("--txt", help="write the printed table here too (rank 0)")
    args = ap.parse_args()
    mesh = init_mesh(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    cfg = dict(TINY) if args.tiny else dict(FULL, num_hidden_layers=args.layers)
    batch, seq = (2, 64) if args.tiny else (args.batch, args.seq)
    out_lines = []

    def say(msg):
        if rank == 0:
            print(msg, flush=True)
            out_lines.append(msg)

    t0 = time.perf_counter()
    model = build_llama(cfg, device)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)
    inputs = broadcast_inputs(Inputs((), {"input_ids": ids}), device)
    pipeline = f"flash(backend=default),tensor-parallel(degree={world})"
    result = evo_rewrite.rewrite(model, pipeline, example_inputs={"input_ids": inputs.kwargs["input_ids"][:2, :64].clone()},
                              device=args.device, strict=True)
    rec = result.report.passes[-1]
    program = result.program
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (gloo)"
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    say(f"{dev_name} x{world}, torch {torch.__version__}, transformers {T.__version__}; Llama-style "
        f"{size} params (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} heads, FFN {cfg['intermediate_size']}), {str(next(model.parameters()).dtype)[6:]}, "
        f"random weights; prefill batch {batch} x {seq} tokens")
    say(f"pipeline {pipeline}: {rec.rewrites} linear layers sharded ({rec.notes['linear layers']}), heads per rank "
        f"{rec.notes['heads per rank']}; {rec.notes['simulated ranks vs unsharded']}; build + rewrite "
        f"{time.perf_counter() - t0:.0f} s")
    dtype = next(model.parameters()).dtype
    del result, model
    tokens = batch * seq
    rows = []

    # degree 1: the unsharded program on rank 0 alone
    _free(device)
    ref = None
    if rank == 0:
        weights = sum(t.numel() * t.element_size() for t in program.named_tensors().values())
        with torch.no_grad():
            fn = lambda: program.module(**inputs.kwargs)["logits"]  # noqa: E731
            ref = fn().cpu()
            for _ in range(2):
                fn()
            _free(device)
            t1 = time.perf_counter()
            for _ in range(5):
                fn()
            _sync(device)
            seconds = (time.perf_counter() - t1) / 5
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        rows.append({"variant": "degree 1 (one GPU)", "gpus": 1, "seconds": seconds, "weight_bytes_per_gpu": weights,
                     "peak_bytes_per_gpu": peak, "max_rel_err": 0.0})
    dist.barrier()
    program.module.to("cpu")  # the full weights stay on the host; each variant takes its shards from them
    _free(device)

    variants = [("degree 2 (tensor parallel)", False)] + ([] if args.no_sp else [("degree 2 + sequence parallel", True)])
    for name, sp in variants:
        sharded = shard(program, mesh, sequence_parallel=sp)
        _free(device)
        local = sharded.local_bytes()
        with torch.no_grad():
            fn = lambda: sharded.module(**inputs.kwargs)["logits"]  # noqa: E731
            out = fn().cpu()
            seconds = timed(fn, device)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        err = _rel_err(ref, out) if rank == 0 else None
        rows.append({"variant": name, "gpus": world, "seconds": _max_over_ranks(seconds, device),
                     "weight_bytes_per_gpu": int(_max_over_ranks(local, device)),
                     "peak_bytes_per_gpu": int(_max_over_ranks(peak, device)) if peak is not None else None,
                     "max_rel_err": err, "collectives": sharded.plan["collectives"]})
        del sharded, fn, out
        _free(device)

    if rank == 0:
        tol = TOLERANCE.get(dtype, 1e-4)
        base = rows[0]["seconds"]
        gb = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
        say("")
        say(f"{'variant':<30} {'GPUs':>4} {'ms':>8} {'tokens/s':>10} {'speedup':>8} {'weights GiB/GPU':>16} "
            f"{'peak GiB/GPU':>13} {'max rel err vs degree 1':>24}")
        for r in rows:
            r["tokens_per_s"] = tokens / r["seconds"]
            say(f"{r['variant']:<30} {r['gpus']:>4} {r['seconds'] * 1e3:>8.1f} {r['tokens_per_s']:>10,.0f} "
                f"{base / r['seconds']:>7.2f}x {gb(r['weight_bytes_per_gpu']):>16} {gb(r['peak_bytes_per_gpu']):>13} "
                f"{r['max_rel_err']:>24.2e}")
        worst = max(r["max_rel_err"] for r in rows)
        say(f"sharded logits vs degree 1: max rel error {worst:.2e} (bf16 tolerance {tol:g}): "
            f"{'ok' if worst <= tol else 'FAILED'}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": dev_name, "gpus": world, "torch": torch.__version__, "transformers": T.__version__,
                           "config": cfg, "params": params, "batch": batch, "seq": seq, "pipeline": pipeline,
                           "plan_notes": {k: v for k, v in rec.notes.items() if k != "plan"}, "variants": rows},
                          f, indent=2)
        if args.txt:
            with open(args.txt, "w") as f:
                f.write("\n".join(out_lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
