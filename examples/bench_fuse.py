"""Prefill throughput: evo-rewrite ``flash,fuse`` vs transformers SDPA vs transformers SDPA + Liger-Kernel.

    python examples/bench_fuse.py [--batch 8] [--seq 2048] [--layers 16] [--out results.json]
    python examples/bench_fuse.py --device cpu --hidden 64 --ffn 128 --heads 4 --layers 2 --vocab 256 \
        --batch 2 --seq 32 --iters 2 --rounds 1     # smoke test (no Liger on the CPU: that row is skipped)

The model is Llama-style (default 0.95B: hidden 2048, 16 layers, 32 heads, FFN 5632, vocab 32000), random
weights, bf16 on CUDA (fp32 on the CPU), written with ``attn_implementation="eager"`` as users have it.
Three variants share the weights and the input ids (no padding mask) in one process:

- ``evo flash,fuse``: the eager model captured and rewritten by ``flash,fuse`` — SDPA for attention,
  and ``evo_rewrite::`` fused operators (on CUDA Liger-Kernel's Triton kernels) for RMSNorm with the
  residual add, SwiGLU and RoPE;
- ``transformers sdpa``;
- ``transformers sdpa + liger``: the same SDPA model after ``apply_liger_kernel_to_llama(model=...)``.
  Liger patches ``modeling_llama``'s module-level functions and classes too; the benchmark swaps those
  patches in only while the Liger row runs, so the plain SDPA row stays plain.

No ``torch.compile``. Timing is interleaved: ``--rounds`` rounds, each running every variant ``--iters``
times (after warm-ups), so clock and thermal drift fall on all rows alike; the per-variant time is the
median over rounds. Printed: ms per forward, tokens/s, ratios, max relative error of the logits vs the
eager original; ``--out`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _module_state(mod):
    """Module-level names and the class attributes of classes defined in ``mod`` (what a monkey patch changes)."""
    state = {("mod", k): v for k, v in vars(mod).items()}
    for k, v in vars(mod).items():
        if isinstance(v, type) and v.__module__ == mod.__name__:
            state.update({(k, a): b for a, b in vars(v).items()})
    return state


def _apply(mod, state):
    for (owner, name), value in state.items():
        setattr(mod if owner == "mod" else getattr(mod, owner), name, value)


def liger_variant(model):
    """Apply Liger to ``model``; return a context manager that swaps Liger's module-level patches in, or None."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except Exception as exc:  # noqa: BLE001 - not installed / no Triton (CPU smoke test)
        print(f"liger-kernel not available ({type(exc).__name__}): its row is skipped")
        return None
    import transformers.models.llama.modeling_llama as ml

    before = _module_state(ml)
    apply_liger_kernel_to_llama(model=model)
    after = _module_state(ml)
    changed = {k: v for k, v in after.items() if before.get(k) is not v}
    original = {k: before[k] for k in changed if k in before}
    _apply(ml, original)  # the other rows see plain transformers
    print(f"liger patched {len(changed)} module/class attributes of modeling_llama: "
          f"{sorted('.'.join(k[1:]) if k[0] == 'mod' else '.'.join(k) for k in changed)[:8]} ...")

    @contextlib.contextmanager
    def patched():
        _apply(ml, changed)
        try:
            yield
        finally:
            _apply(ml, original)

    return patched


def main():
    import transformers as T

    import evo_rewrite
    from evo_rewrite import fused_ops

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--iters", type=int, default=5, help="forwards per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pipeline", default="flash,fuse")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = dict(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
               max_position_embeddings=max(4096, args.seq), use_cache=False)
    torch.manual_seed(0)
    with dev:  # initialise on the device: seconds instead of minutes for 1B parameters
        eager = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="eager")).to(dtype).eval()
        sdpa = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="sdpa")).to(dtype).eval()
        liger = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="sdpa")).to(dtype).eval()
    sdpa.load_state_dict(eager.state_dict())
    liger.load_state_dict(eager.state_dict())
    params = sum(p.numel() for p in eager.parameters())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)

    t0 = time.perf_counter()
    result = evo_rewrite.rewrite(eager, args.pipeline, example_inputs={"input_ids": ids[:2, :64].clone()},
                                 device=args.device)
    rewrite_s = time.perf_counter() - t0
    passes = {p.name: p for p in result.report.passes}
    fuse = passes.get("fuse")
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'} torch {torch.__version__} "
          f"transformers {T.__version__}; {params / 1e9:.2f}B params, {dtype}; liger kernels in the fused ops: "
          f"{fused_ops.liger_available() and dev.type == 'cuda'}; rewrite {rewrite_s:.1f}s")
    for p in result.report.passes:
        print(f"  {p.spec}: {p.rewrites} rewrites, verified={p.verified} {p.failure or ''} notes={p.notes}")

    patched = liger_variant(liger)
    variants = {
        "eager (original)": lambda: eager(input_ids=ids).logits,
        f"evo {args.pipeline}": lambda: result.module(input_ids=ids)["logits"],
        "transformers sdpa": lambda: sdpa(input_ids=ids).logits,
    }
    if patched is not None:
        def run_liger():
            with patched():
                return liger(input_ids=ids).logits
        variants["transformers sdpa + liger"] = run_liger

    samples = {name: [] for name in variants}
    with torch.no_grad():
        ref = variants["eager (original)"]().float()
        errs = {}
        for name, fn in variants.items():  # warm-up (and Triton autotuning) + error
            out = fn().float()
            errs[name] = float((out - ref).abs().max() / ref.abs().max())
            fn()
        del ref, out
        for _ in range(args.rounds):
            for name, fn in variants.items():
                _sync(dev)
                t = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                _sync(dev)
                samples[name].append((time.perf_counter() - t) / args.iters)
    times = {name: statistics.median(s) for name, s in samples.items()}
    tokens = args.batch * args.seq
    ref_row = "transformers sdpa + liger" if "transformers sdpa + liger" in times else "transformers sdpa"
    print(f"\nprefill B{args.batch}xS{args.seq}, median of {args.rounds} interleaved rounds x {args.iters} forwards")
    print(f"{'variant':<28} {'ms':>9} {'tokens/s':>11} {'vs sdpa':>8} {'vs ' + ('liger' if 'liger' in ref_row else 'sdpa'):>9} "
          f"{'max rel err':>12}")
    for name, t in times.items():
        print(f"{name:<28} {t * 1e3:>9.2f} {tokens / t:>11.0f} {times['transformers sdpa'] / t:>7.2f}x "
              f"{times[ref_row] / t:>8.2f}x {errs[name]:>12.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                       "torch": torch.__version__, "transformers": T.__version__, "dtype": str(dtype),
                       "config": cfg, "batch": args.batch, "seq": args.seq, "params": params,
                       "pipeline": args.pipeline, "liger_in_fused_ops": fused_ops.liger_available(),
                       "fuse_notes": fuse.notes if fuse else None,
                       "verified": {p.spec: p.verified for p in result.report.passes},
                       "seconds": times, "samples": samples, "tokens_per_s": {k: tokens / t for k, t in times.items()},
                       "ratio_vs_reference_row": {k: times[ref_row] / t for k, t in times.items()},
                       "reference_row": ref_row, "max_rel_err": errs}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
