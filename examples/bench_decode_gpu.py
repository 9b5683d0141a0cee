"""GPU decode benchmark (one H200): evo_rewrite.generate on rewritten decoder programs vs transformers' generate.

Llama-style 0.95B MHA model (hidden 2048, 16 layers, 32 heads of 64, FFN 5632, vocab 32000; random weights,
seeded), bf16, batch 32, prompt 1024, +64 greedy tokens. Rows, in one process, side by side:

  transformers eager             model.generate, DynamicCache (SDPA attention)
  transformers static+compile    model.generate(cache_implementation="static"): transformers compiles the step
                                 (mode reduce-overhead, CUDA graphs) and writes the cache in place
  evo flash                      evo_rewrite.generate on the `flash` decoder program, cache="static" (the
                                 in-place step, rewriter/static_cache.py), compile=True (CUDA graphs)
  evo gqa(kv_heads=4),flash      the same on the grouped program (KV cache ÷8; lossy)

ms/step = (time for +new tokens − time for +1 token) / (new − 1), best of --rounds after a warm-up (which
compiles). "tokens equal" compares the new tokens with transformers static+compile's; with random weights the
logits are near-ties in bf16, so agreement is reported too. Each evo row also reports the graphs dynamo compiled
for it (1 = no recompilation) and the CUDA-graph skips (0 = the step ran as CUDA graphs).

A row that fails prints its traceback and "ROW FAILED", the other rows still run, and the script exits 1.

    python examples/bench_decode_gpu.py [--batch 32 --prompt 1024 --new 64 --rounds 3 --skip-eager]
                                        [--rows "evo flash"] [--pipelines "flash;gqa(kv_heads=4),flash"]
                                        [--json examples/results/bench_decode_gpu.json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PIPELINES = ("flash", "gqa(kv_heads=4),flash")
BASE = "transformers static+compile"


def build_model(dtype=torch.bfloat16, tiny=False, device="cuda"):
    import transformers as T

    size = (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=8) if tiny else
            dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=32))
    cfg = T.LlamaConfig(**size, max_position_embeddings=4096,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return T.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, rounds: int, new: int) -> tuple[float, torch.Tensor]:
    """Best ms per decode step over rounds: (t(+new) - t(+1)) / (new - 1)."""
    fn(new)  # warm-up (compilation, CUDA graphs)
    fn(1)
    best, out = float("inf"), None
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        fn(1)
        sync()
        t1 = time.perf_counter()
        out = fn(new)
        sync()
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / (new - 1) * 1e3)
    return best, out


def table(rows: dict, new: int) -> str:
    ref = rows.get(BASE, {})
    lines = [f"{'variant':<30} {'ms/step':>8} {'vs ' + BASE:>36} {'tokens equal':>13} {'agreement':>10} "
             f"{'KV bytes/token':>15} {'graphs':>7} {'cg skips':>9}"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"{name:<30} FAILED: {r['error']}")
            continue
        ms = r["ms_per_step"]
        ratio = f"{ref['ms_per_step'] / ms:.2f}x" if "ms_per_step" in ref else "-"
        eq = r.get("tokens_equal_transformers")
        agree = r.get("token_agreement")
        lines.append(f"{name:<30} {ms:>8.2f} {ratio:>36} {'-' if eq is None else str(eq):>13} "
                     f"{'-' if agree is None else f'{agree:.3f}':>10} {r['kv_bytes_per_token']:>15,} "
                     f"{r.get('compiled_graphs', '-'):>7} {r.get('cudagraph_skips', '-'):>9}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    ap.add_argument("--pipelines", default=";".join(PIPELINES), help="';'-separated pipelines for the evo rows")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model, on the CPU too: a smoke test of the script")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_decode_gpu.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("bench_decode_gpu.py needs CUDA (one GPU); none is visible (--tiny runs a smoke test on the CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    import evo_rewrite
    from evo_rewrite.generate import static_step
    from torch._dynamo.utils import counters

    model = build_model(tiny=args.tiny, device=device)
    cfg = model.config
    mha_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    wanted = None if args.rows is None else {r.strip() for r in args.rows.split(",")}
    rows: dict[str, dict] = {}
    tokens: dict[str, torch.Tensor] = {}
    failed = []

    def row(name, make):
        """Run one row; a failure is printed loudly and recorded, and the next rows still run."""
        if wanted is not None and name not in wanted:
            return
        print(f"--- {name}", flush=True)
        try:
            counters.clear()
            fn, extra = make()
            ms, out = timed(fn, args.rounds, args.new)
            rows[name] = {"ms_per_step": ms, **extra()}
            tokens[name] = out
            print(f"    {ms:.3f} ms/step", flush=True)
        except Exception as exc:  # noqa: BLE001 - the benchmark reports every row, failed or not
            traceback.print_exc()
            print(f"ROW FAILED: {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
            failed.append(name)
        finally:
            sync()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def hf(cache_implementation=None):
        def make():
            def run(n):
                kw = {"cache_implementation": cache_implementation} if cache_implementation else {}
                with torch.no_grad():
                    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, **kw)
            return run, lambda: {"kv_bytes_per_token": mha_bytes}
        return make

    if not args.skip_eager:
        row("transformers eager", hf())
    row(BASE, hf("static"))

    # capture sees attention as ops (eager), as evo-rewrite's own Hugging Face loader sets it
    try:
        model.set_attn_implementation("eager")
    except AttributeError:
        model.config._attn_implementation = "eager"
    rewrite_s = {}
    for pipeline in [p.strip() for p in args.pipelines.split(";") if p.strip()]:
        def make(pipeline=pipeline):
            t0 = time.perf_counter()
            result = evo_rewrite.rewrite(model, pipeline, cache=True, device=device)
            if not result.report.ok:
                raise RuntimeError(f"rewrite {pipeline} failed:\n{result.report.table()}")
            rewrite_s[pipeline] = time.perf_counter() - t0
            program = result.program
            counters.clear()

            def run(n):
                return evo_rewrite.generate(program, ids, max_new_tokens=n, attention_mask=mask, device=device,
                                            cache="static", compile=True, eos_token_id=[])

            def extra():
                return {"kv_bytes_per_token": static_step(program).step.bytes_per_token(),
                        "compiled_graphs": int(counters["stats"]["unique_graphs"]),
                        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
                        "rewrite_seconds": rewrite_s[pipeline]}
            return run, extra
        row(f"evo {pipeline}", make)

    ref = tokens.get(BASE)
    for name, out in tokens.items():
        if ref is not None:
            new_ref, new_out = ref[:, -args.new:], out[:, -args.new:]
            rows[name]["tokens_equal_transformers"] = bool(torch.equal(new_out, new_ref))
            rows[name]["token_agreement"] = float((new_out == new_ref).float().mean())
        if BASE in rows and "ms_per_step" in rows[BASE]:
            rows[name]["speedup_vs_transformers_static_compile"] = rows[BASE]["ms_per_step"] / rows[name]["ms_per_step"]
    import transformers

    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__,
           "batch": args.batch, "prompt": args.prompt, "new": args.new, "dtype": "bfloat16",
           "model": ("tiny Llama (2 layers, hidden 64), smoke test" if args.tiny else
                     "Llama-style 0.95B MHA (hidden 2048, 16 layers, 32 heads, FFN 5632), random weights"),
           "command": "python examples/bench_decode_gpu.py " + " ".join(sys.argv[1:]),
           "rows": rows, "failed_rows": failed}
    print()
    print(table(rows, args.new))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json}")
    if failed:
        print(f"\n{len(failed)} ROW(S) FAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
