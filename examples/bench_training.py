"""Training step of a Llama-style ~1B model: fp32 original, `bf16`, `checkpoint` rewrites, transformers' own
gradient checkpointing, and a `checkpoint(budget=...)` run, side by side in one process.

    PYTHONPATH=$PWD python examples/bench_training.py --out   # GPU; writes examples/results/bench_training_h200.{json,txt}
    PYTHONPATH=$PWD python examples/bench_training.py --tiny  # CPU smoke test of every code path (tiny model)

Model: transformers LlamaConfig(hidden 2048, 16 layers, 32 heads, 32 K/V heads, intermediate 5632,
vocab 32000), random init on the device, attn_implementation="eager" (what users have), no
downloads. The rewrites are captured once from that model at 2 x 64 tokens and share its weights.

Step: forward (B x S token ids), fp32 cross-entropy on the next token, backward, AdamW step (fused on
CUDA, lr 1e-5), zero_grad(set_to_none). Each variant: 2 warm-up steps, one step for memory, then
the mean of --steps timed steps. TF32: the fp32 original runs twice, with TF32 matmuls off and on;
everything after runs with TF32 on (it only touches the fp32 ops the rewrites keep: norms, softmax).

Variants:
  fp32 original (TF32 off / on)       the transformers model as built, fp32 weights
  bf16                                evo-rewrite `bf16`: autocast's policy as casts in the graph; matmul weights bf16
  bf16,checkpoint                     ... plus `checkpoint` (every block recomputed in backward)
  bf16,checkpoint(budget=...)         ... the fewest blocks that meet a budget (--budget-fraction of bf16's estimate)
  flash(backend=default),bf16,checkpoint  fused attention too (backend=default: the dispatcher picks the kernel for
                                      the bf16 inputs it gets; `auto` would time backends on the fp32 graph, before bf16)
  transformers gradient checkpointing the same model in bf16 (model.to(bfloat16)), eager attention,
                                      gradient_checkpointing_enable(use_reentrant=False); and with sdpa attention

Memory (CUDA allocator): static = allocated before the step (weights, optimizer state); activations =
allocated after the model's forward minus static (what forward keeps for backward, outputs included:
what `checkpoint` acts on and what its estimate predicts); peak = max allocated during the step minus
static. The fp32 weights of the original stay resident for every variant (the rewrites share them).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GB = 1e9
FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _allocated(dev):
    return torch.cuda.memory_allocated() if dev.type == "cuda" else None


def train(name, module, call, ids, dev, steps, warmup, estimate=None, log=print):
    """Time and measure one variant's training step; returns its record."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")
    vocab = None

    def loss_of(logits):
        nonlocal vocab
        vocab = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))

    def step():
        loss = loss_of(call(module))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first = float(step())
    for _ in range(warmup - 1):
        step()
    _sync(dev)
    gc.collect()
    static = _allocated(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    logits = call(module)
    _sync(dev)
    act = _allocated(dev) - static if static is not None else None
    loss = loss_of(logits)
    del logits
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(dev)
    peak = torch.cuda.max_memory_allocated() - static if static is not None else None
    del loss
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(dev)
    sec = (time.perf_counter() - t0) / steps
    rec = {"variant": name, "step_s": sec, "tokens_per_s": ids.numel() / sec, "first_loss": first,
           "static_bytes": static, "activation_bytes": act, "activation_estimate_bytes": estimate,
           "peak_minus_static_bytes": peak, "peak_bytes": (peak + static) if peak is not None else None}
    log(f"  {name}: {sec * 1e3:.1f} ms/step, {ids.numel() / sec:,.0f} tokens/s"
        + (f", activations {act / GB:.2f} GB, peak-static {peak / GB:.2f} GB" if act is not None else ""))
    del opt, params
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def estimate(program, batch, seq):
    """The checkpoint pass's estimate of activation bytes at batch x seq (regions included), or None."""
    from evo_rewrite.passes.checkpoint_memory import inputs_at, profile
    from evo_rewrite.regions import find_regions, regions_of

    try:
        prof = profile(program, inputs_at(program, batch, seq))
        return prof.bytes(find_regions(program.graph, regions_of(program.module)))
    except Exception as e:  # noqa: BLE001 - an estimate is a bonus in this table
        print(f"  (no estimate: {type(e).__name__}: {str(e)[:120]})")
        return None


def main():
    import transformers as T

    import evo_rewrite

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, B=2, S=64")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-fraction", type=float, default=0.5,
                    help="checkpoint(budget=...) asks for this fraction of bf16's estimated activation memory")
    ap.add_argument("--out", nargs="?", const="examples/results/bench_training_h200", metavar="PREFIX",
                    help="write PREFIX.json and PREFIX.txt (default prefix examples/results/bench_training_h200)")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = dict(TINY if args.tiny else FULL)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    B, S = args.batch or (2 if args.tiny else 4), args.seq or (64 if args.tiny else 2048)
    steps, warmup = (2, 1) if args.tiny else (args.steps, 2)
    lines: list[str] = []

    def log(msg=""):
        print(msg, flush=True)
        lines.append(msg)

    t_start = time.perf_counter()
    torch.manual_seed(0)
    with dev:
        model = T.LlamaForCausalLM(T.LlamaConfig(**cfg, use_cache=False, attn_implementation="eager")).train()
        hf_bf16 = copy.deepcopy(model).to(torch.bfloat16)  # the same weights, for transformers' own checkpointing
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg["vocab_size"], (B, S), device=dev)
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    log(f"{gpu}; torch {torch.__version__}; transformers {T.__version__}; Llama {params / 1e9:.2f}B params "
        f"(hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads, "
        f"FFN {cfg['intermediate_size']}), random init, eager attention; step = fwd + fp32 CE loss + bwd + AdamW; "
        f"B={B} x S={S} ({B * S} tokens); {steps} timed steps after {warmup} warm-up")
    records, reports = [], {}

    def hf_call(m):
        return m(input_ids=ids).logits

    def graph_call(m):
        return m(input_ids=ids)["logits"]

    errors = {}

    def attempt(label, fn):
        """Run one part; a failure (an OOM, say) is logged and recorded, and the run goes on."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"  {label} FAILED: {errors[label]}")
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def variant(name, module, call, est=None):
        rec = attempt(name, lambda: train(name, module, call, ids, dev, steps, warmup, est, log))
        if rec is not None:
            records.append(rec)
        return rec

    # ---- fp32 original
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        variant(f"fp32 original (TF32 {'on' if tf32 else 'off'})", model, hf_call)
    # TF32 stays on from here

    # ---- rewrites: capture once, passes on the captured program (weights shared with the model)
    t0 = time.perf_counter()
    example = {"input_ids": ids[:2, :64].clone()}
    captured = evo_rewrite.prepare(model, example, device=str(dev))
    log(f"captured in {time.perf_counter() - t0:.1f}s")

    def rewrite(program, pipeline):
        t = time.perf_counter()
        r = evo_rewrite.rewrite(program, pipeline, strict=True)
        reports[",".join(r.program.applied)] = r.report.to_dict()
        for p in r.report.passes:
            notes = "; ".join(f"{k}: {v}" for k, v in p.notes.items() if isinstance(v, (str, int, float)))
            log(f"  {p.spec}: {p.rewrites} rewrites, verified={p.verified}" + (f" ({notes})" if notes else ""))
        log(f"  rewrite {pipeline}: {time.perf_counter() - t:.1f}s")
        return r

    bf16 = rewrite(captured, "bf16")
    variant("bf16", bf16.module, graph_call, estimate(bf16.program, B, S))
    ck = attempt("rewrite bf16,checkpoint", lambda: rewrite(bf16.program, "checkpoint"))
    if ck is not None:
        variant("bf16,checkpoint", ck.module, graph_call, estimate(ck.program, B, S))
    del ck

    # ---- budget: a fraction of what bf16 would hold
    from evo_rewrite.passes.checkpoint_memory import inputs_at, profile

    unbounded = profile(bf16.program, inputs_at(bf16.program, B, S)).bytes()
    budget = int(args.budget_fraction * unbounded)
    bud = attempt("rewrite budget", lambda: rewrite(bf16.program, f"checkpoint(budget={budget}, batch={B}, seq={S})"))
    if bud is not None:
        meta = bud.program.annotations.checkpoint.estimate
        rec = variant(f"bf16,checkpoint(budget={budget / GB:.3g}GB)", bud.module, graph_call,
                      meta["estimate_bytes_after"])
        if rec is not None:
            rec.update(budget_bytes=budget, regions=meta["regions"], unbounded_estimate_bytes=unbounded)
    del bud, bf16
    gc.collect()

    fl = attempt("rewrite flash,bf16,checkpoint", lambda: rewrite(captured, "flash(backend=default),bf16,checkpoint"))
    if fl is not None:
        variant("flash,bf16,checkpoint", fl.module, graph_call, estimate(fl.program, B, S))
    del fl, captured
    gc.collect()

    # ---- transformers' own gradient checkpointing, bf16 weights
    hf_bf16.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    variant("transformers bf16 eager + gradient_checkpointing", hf_bf16, hf_call)

    def to_sdpa():
        if hasattr(hf_bf16, "set_attn_implementation"):
            hf_bf16.set_attn_implementation("sdpa")
        else:
            hf_bf16.config._attn_implementation = "sdpa"
        return True

    if attempt("switch to sdpa", to_sdpa):
        variant("transformers bf16 sdpa + gradient_checkpointing", hf_bf16, hf_call)

    # ---- table and goals
    by = {r["variant"]: r for r in records}
    base = by.get("fp32 original (TF32 on)")

    def gb(v):
        return f"{v / GB:.2f}" if isinstance(v, (int, float)) else "n/a"

    log("")
    hdr = (f"{'variant':<50} {'ms/step':>8} {'tokens/s':>9} {'vs TF32':>7} {'act GB':>7} {'est GB':>7} "
           f"{'peak-static':>11} {'peak GB':>8} {'loss@1':>7}")
    log(hdr)
    log("-" * len(hdr))
    for r in records:
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:>6.2f}x" if base else "    n/a"
        log(f"{r['variant']:<50} {r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>9,.0f} {rel} "
            f"{gb(r['activation_bytes']):>7} {gb(r['activation_estimate_bytes']):>7} "
            f"{gb(r['peak_minus_static_bytes']):>11} {gb(r['peak_bytes']):>8} {r['first_loss']:>7.3f}")
    for label, err in errors.items():
        log(f"{label}: FAILED ({err})")
    b, c = by.get("bf16"), by.get("bf16,checkpoint")
    bud_rec = next((r for r in records if "budget_bytes" in r), None)
    goals = {}
    if b and base:
        goals["bf16 step vs fp32 TF32 (goal >= 1.8x)"] = b["tokens_per_s"] / base["tokens_per_s"]
    if b and c:
        goals["checkpoint throughput cost vs bf16 (goal <= 25%)"] = 1 - c["tokens_per_s"] / b["tokens_per_s"]
        if b["activation_bytes"]:
            goals["checkpoint activation cut vs bf16 (goal >= 75%)"] = 1 - c["activation_bytes"] / b["activation_bytes"]
            goals["checkpoint peak-static cut vs bf16"] = 1 - c["peak_minus_static_bytes"] / b["peak_minus_static_bytes"]
    log("")
    if bud_rec:
        if bud_rec["activation_bytes"]:
            goals["budget: measured vs requested (goal within +-10%)"] = bud_rec["activation_bytes"] / budget - 1
            goals["budget: measured vs estimated"] = bud_rec["activation_bytes"] / bud_rec["activation_estimate_bytes"] - 1
        log(f"budget run: requested {gb(budget)} GB ({args.budget_fraction:g} x bf16's estimate {gb(unbounded)} GB), "
            f"{len(bud_rec['regions'])} regions ({', '.join(bud_rec['regions'])}), estimated "
            f"{gb(bud_rec['activation_estimate_bytes'])} GB, measured {gb(bud_rec['activation_bytes'])} GB")
    for k, v in goals.items():
        log(f"{k}: {v:.2f}x" if k.startswith("bf16 step") else f"{k}: {v:+.1%}")
    log(f"total {time.perf_counter() - t_start:.0f}s")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"device": gpu, "torch": torch.__version__, "transformers": T.__version__, "config": cfg,
                       "params": params, "batch": B, "seq": S, "steps": steps, "warmup": warmup,
                       "tf32": "fp32 original measured with TF32 off and on; TF32 on for everything after",
                       "records": records, "goals": goals, "errors": errors, "reports": reports}, f, indent=1,
                      default=str)
        with open(args.out + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}.json and {args.out}.txt")


if __name__ == "__main__":
    main()
