"""Training step: evo-rewrite ``flash,fuse,checkpoint(...)`` vs transformers SDPA (+ gradient checkpointing)
vs transformers SDPA + Liger-Kernel (with and without gradient checkpointing), and the same evo pipelines
on a hand-written Llama (``evo_rewrite.zoo.llama``, which Liger cannot patch), in one process.

    python examples/bench_fuse_training.py --out examples/results/bench_fuse_training_h200.json
    python examples/bench_fuse_training.py --device cpu --hidden 64 --ffn 160 --heads 4 --layers 2 --vocab 256 \
        --batch 2 --seq 32 --steps 1 --rounds 1 --warmup 1      # smoke test (no Liger on the CPU: rows skipped)

Model: Llama-style, default 0.95B (hidden 2048, 16 layers, 32 heads, FFN 5632, vocab 32000), random init on
the device, fp32 weights. Step: forward with the next-token cross-entropy loss, backward, AdamW (fused on
CUDA, lr 1e-5; rows sharing weights share one optimizer), zero_grad(set_to_none). Rows:

- ``evo <pipeline>`` on transformers' eager Llama captured with its loss (``model(input_ids, labels).loss``):
  ``amp:`` pipelines run under ``torch.autocast(bfloat16)`` with fp32 weights, as the transformers rows do;
  ``flash,fuse,bf16,...`` puts the bf16 casts in the graph instead (matmul weights stored in bf16).
  ``fuse`` comes before ``bf16``: after ``bf16`` the norms carry casts the fused operator does not model.
- ``transformers sdpa`` (+ ``gradient_checkpointing_enable(use_reentrant=False)``), under autocast;
- ``transformers sdpa + liger`` (``apply_liger_kernel_to_llama``: RMSNorm, SwiGLU, RoPE, fused linear
  cross-entropy), with and without gradient checkpointing, under autocast;
- ``zoo.llama <pipeline>``: the same evo pipelines on ``evo_rewrite.zoo.llama`` at the same size.

Timing is interleaved: ``--rounds`` rounds, each running every row ``--steps`` times after warm-ups; the
time per row is the median over rounds. Memory per row (CUDA allocator, measured on one extra step):
``activations`` = allocated after the forward minus allocated before the step (what forward keeps for
backward), ``peak`` = max allocated during the step minus allocated before it (gradients and optimizer
temporaries included). Ratios against the Liger rows. ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GB = 1e9
PIPELINES = ("amp:flash,fuse,checkpoint(modules=[{layers}], policy=selective)", "amp:flash,fuse,checkpoint(modules=[{layers}])",
             "amp:flash,fuse", "flash,fuse,bf16,checkpoint(modules=[{layers}], policy=selective)")
# {layers}: the model's decoder layers (a glob over module paths). Named, not found: after `fuse` the first layer
# (a norm without a residual add before it) differs from the others, so block detection leaves it out.


class LossOnly(torch.nn.Module):
    """A causal LM that returns only its loss: the logits are no output, so ``fuse`` can fuse the LM head + loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _loss(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.loss if hasattr(out, "loss") else next(v for v in (out.values() if isinstance(out, dict) else out))


_OPTIMIZERS: dict[tuple[int, ...], torch.optim.Optimizer] = {}


def _optimizer(params, dev):
    """One AdamW per set of parameters: rows that share weights (evo pipelines on one model) share its state."""
    key = tuple(id(p) for p in params)
    if key not in _OPTIMIZERS:
        _OPTIMIZERS[key] = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")
    return _OPTIMIZERS[key]


class Row:
    """One variant: how to compute the loss, its optimizer, the context it runs in, its measurements."""

    def __init__(self, name, call, params, dev, amp, context=contextlib.nullcontext):
        self.name, self.call, self.dev, self.amp, self.context = name, call, dev, amp, context
        self.opt = _optimizer(list(params), dev)
        self.samples: list[float] = []
        self.record: dict = {"variant": name, "autocast_bf16": amp}

    def _forward(self):
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
            return _loss(self.call())

    def step(self):
        with self.context():
            loss = self._forward()
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def measure_memory(self):
        if self.dev.type != "cuda":
            return
        gc.collect()
        _sync(self.dev)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with self.context():
            loss = self._forward()
            _sync(self.dev)
            act = torch.cuda.memory_allocated() - before
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        _sync(self.dev)
        self.record.update(activation_bytes=act, peak_minus_before_bytes=torch.cuda.max_memory_allocated() - before,
                           allocated_before_bytes=before)
        del loss


def main():
    import transformers as T

    import evo_rewrite
    from bench_fuse import liger_variant
    from evo_rewrite import fused_ops, zoo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=3, help="steps per row per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pipelines", default=";".join(PIPELINES),
                    help="';'-separated evo pipelines; 'amp:' runs one under bf16 autocast with fp32 weights")
    ap.add_argument("--no-zoo", action="store_true", help="skip the zoo.llama rows")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmuls left (none in the bf16 paths)
        torch.backends.cudnn.allow_tf32 = True
    cfg = dict(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
               num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
               max_position_embeddings=max(4096, args.seq), use_cache=False)
    B, S = args.batch, args.seq
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (B, S), device=dev)
    shifted = torch.cat((ids[:, 1:], torch.full((B, 1), -100, device=dev)), 1)  # zoo.llama's labels: next token
    log_lines: list[str] = []

    def log(msg=""):
        print(msg, flush=True)
        log_lines.append(msg)

    t_start = time.perf_counter()
    with dev:
        eager = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="eager")).train()
    params = sum(p.numel() for p in eager.parameters())
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    log(f"{name}; torch {torch.__version__}; transformers {T.__version__}; Llama {params / 1e9:.2f}B params "
        f"(hidden {args.hidden}, {args.layers} layers, {args.heads} heads, FFN {args.ffn}, vocab {args.vocab}); "
        f"B={B} x S={S}; liger kernels in the fused ops: {fused_ops.liger_available() and dev.type == 'cuda'}")
    rows: list[Row] = []
    reports, errors = {}, {}

    def attempt(label, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failing row (an OOM, say) is recorded; the run goes on
            errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"  {label} FAILED: {errors[label]}")
            # an exported program inlines a no_grad region as two grad-mode switches: an exception between
            # them leaves grad mode off for every later row
            torch.set_grad_enabled(True)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def evo_rows(prefix, module, example, call_inputs, layers):
        for spec in [p.strip().replace("{layers}", layers) for p in args.pipelines.split(";") if p.strip()]:
            amp = spec.startswith("amp:")
            pipeline = spec[4:] if amp else spec
            t = time.perf_counter()
            r = attempt(f"rewrite {prefix} {pipeline}",
                        lambda: evo_rewrite.rewrite(module, pipeline, example_inputs=example, device=str(dev),
                                                    strict=True))
            if r is None:
                continue
            reports[f"{prefix} {spec}"] = r.report.to_dict()
            for p in r.report.passes:
                notes = "; ".join(f"{k}: {v}" for k, v in p.notes.items() if isinstance(v, (str, int, float))
                                  and len(str(v)) < 160)
                log(f"  {prefix} {p.spec}: {p.rewrites} rewrites, verified={p.verified}" + (f" ({notes})" if notes else ""))
            log(f"  rewrite {prefix} {pipeline}: {time.perf_counter() - t:.1f}s")
            gm = r.module
            rows.append(Row(f"{prefix} {spec}", lambda gm=gm: gm(*call_inputs),
                            [p for p in gm.parameters() if p.requires_grad], dev, amp))

    # ---- (a) evo on transformers' eager Llama, captured with its loss
    small = {"input_ids": ids[:2, :64].clone(), "labels": ids[:2, :64].clone()}
    evo_rows("evo", LossOnly(eager), small, (ids, ids), "model.model.layers.*")

    # ---- (b) transformers sdpa, (c) + liger; the same weights
    def hf(attn):
        with dev:
            m = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation=attn)).train()
        m.load_state_dict(eager.state_dict())
        return m

    sdpa = hf("sdpa")
    rows.append(Row("transformers sdpa", lambda: sdpa(input_ids=ids, labels=ids), list(sdpa.parameters()), dev, True))
    sdpa_gc = hf("sdpa")
    sdpa_gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows.append(Row("transformers sdpa + gradient checkpointing", lambda: sdpa_gc(input_ids=ids, labels=ids),
                    list(sdpa_gc.parameters()), dev, True))
    liger = hf("sdpa") if dev.type == "cuda" else None
    patched = liger_variant(liger) if liger is not None else None
    if patched is not None:
        rows.append(Row("transformers sdpa + liger", lambda: liger(input_ids=ids, labels=ids),
                        list(liger.parameters()), dev, True, patched))
        liger_gc = hf("sdpa")
        patched_gc = liger_variant(liger_gc)
        liger_gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        rows.append(Row("transformers sdpa + liger + gradient checkpointing",
                        lambda: liger_gc(input_ids=ids, labels=ids), list(liger_gc.parameters()), dev, True, patched_gc))
    else:
        log("  liger rows skipped (needs CUDA and liger-kernel)")

    # ---- (d) the same evo pipelines on a hand-written Llama (zoo.llama): Liger has nothing to patch there
    if not args.no_zoo:
        with dev:
            hand, _ = zoo.llama(n_layer=args.layers, d_model=args.hidden, n_head=args.heads, d_ff=args.ffn,
                                vocab_size=args.vocab, seed=0)
        hand = hand.to(dev).train()
        evo_rows("zoo.llama", hand, (ids[:2, :64].clone(), shifted[:2, :64].clone()), (ids, shifted), "blocks.*")

    # ---- warm-up, memory, interleaved timing
    first_loss = {}
    for row in list(rows):
        def warm(row=row):
            for _ in range(args.warmup):
                first_loss.setdefault(row.name, float(row.step()))
            row.measure_memory()
            return True
        if attempt(f"warm-up {row.name}", warm) is None:
            rows.remove(row)
    for _ in range(args.rounds):
        for row in list(rows):
            def timed(row=row):
                _sync(dev)
                t = time.perf_counter()
                for _ in range(args.steps):
                    row.step()
                _sync(dev)
                row.samples.append((time.perf_counter() - t) / args.steps)
                return True
            if attempt(f"step {row.name}", timed) is None:
                rows.remove(row)

    # ---- table
    tokens = B * S
    for row in rows:
        sec = statistics.median(row.samples)
        row.record.update(step_s=sec, tokens_per_s=tokens / sec, samples=row.samples, first_loss=first_loss.get(row.name))
    by = {r.name: r.record for r in rows}
    refs = [n for n in ("transformers sdpa + liger", "transformers sdpa + liger + gradient checkpointing") if n in by]

    def gb(v):
        return f"{v / GB:.2f}" if isinstance(v, (int, float)) else "n/a"

    log(f"\ntraining step B{B}xS{S}, median of {args.rounds} interleaved rounds x {args.steps} steps")
    head = f"{'variant':<62} {'ms':>8} {'tokens/s':>10} {'act GB':>7} {'peak GB':>8} {'loss@1':>7}"
    head += "".join(f" {'vs ' + ('liger+gc' if 'checkpointing' in n else 'liger'):>9}" for n in refs)
    log(head)
    log("-" * len(head))
    for r in by.values():
        line = (f"{r['variant']:<62} {r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>10,.0f} "
                f"{gb(r.get('activation_bytes')):>7} {gb(r.get('peak_minus_before_bytes')):>8} "
                f"{(r['first_loss'] or float('nan')):>7.3f}")
        for n in refs:
            r[f"tokens_per_s_vs {n}"] = r["tokens_per_s"] / by[n]["tokens_per_s"]
            line += f" {r[f'tokens_per_s_vs {n}']:>8.2f}x"
        log(line)
    goals = {}
    for n in refs:  # the goal: >= 1.0x the Liger row's tokens/s at <= its activation memory
        for r in by.values():
            if r["variant"].startswith(("evo", "zoo.llama")) and r.get("activation_bytes") is not None:
                ok = r["tokens_per_s"] >= by[n]["tokens_per_s"] and r["activation_bytes"] <= by[n]["activation_bytes"]
                goals[f"{r['variant']} vs {n}"] = {"tokens_per_s_ratio": r["tokens_per_s"] / by[n]["tokens_per_s"],
                                                   "activation_ratio": r["activation_bytes"] / by[n]["activation_bytes"],
                                                   "goal_met": ok}
    if goals:
        log("\ngoal: >= 1.0x the Liger row's tokens/s at <= its activation memory")
        for k, v in goals.items():
            log(f"  {k}: {v['tokens_per_s_ratio']:.2f}x tokens/s, {v['activation_ratio']:.2f}x activations"
                f" -> {'met' if v['goal_met'] else 'not met'}")
    for label, err in errors.items():
        log(f"{label}: FAILED ({err})")
    log(f"total {time.perf_counter() - t_start:.0f}s")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "transformers": T.__version__, "config": cfg,
                       "params": params, "batch": B, "seq": S, "steps": args.steps, "rounds": args.rounds,
                       "liger_in_fused_ops": fused_ops.liger_available() and dev.type == "cuda",
                       "records": list(by.values()), "goals": goals, "errors": errors, "reports": reports,
                       "log": log_lines}, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
