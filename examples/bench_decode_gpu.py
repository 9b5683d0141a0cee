"""GPU decode benchmark (one H200): evo_rewrite.generate on rewritten decoder programs vs transformers' generate.

Llama-style 0.95B MHA model (hidden 2048, 16 layers, 32 heads of 64, FFN 5632, vocab 32000; random weights,
seeded), bf16, batch 32, prompt 1024, +64 greedy tokens. Rows, in one process:

  transformers eager        model.generate, DynamicCache (SDPA attention)
  transformers static+compile   model.generate(cache_implementation="static") (transformers compiles the step)
  evo flash                 evo_rewrite.generate on the `flash` decoder program, static cache, compile=True
  evo gqa(kv_heads=4),flash the same on the grouped program (KV cache ÷8; lossy: tokens are not compared)

ms/step = (time for +64 tokens − time for +1 token) / 63, best of --rounds after a warm-up.

    python examples/bench_decode_gpu.py [--batch 32 --prompt 1024 --new 64 --rounds 3]
                                        [--json examples/results/bench_decode_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def build_model(dtype=torch.bfloat16):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).cuda().eval()
    return model


def timed(fn, rounds: int, new: int) -> tuple[float, torch.Tensor]:
    """Best ms per decode step over rounds: (t(+new) - t(+1)) / (new - 1)."""
    fn(new)  # warm-up (compilation, CUDA graphs)
    fn(1)
    best, out = float("inf"), None
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(1)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        out = fn(new)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / (new - 1) * 1e3)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_decode_gpu.json"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"

    import evo_rewrite

    model = build_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (args.batch, args.prompt), generator=g).cuda()
    mask = torch.ones_like(ids)
    rows, tokens = {}, {}

    def hf(cache_implementation=None):
        def run(n):
            kw = {"cache_implementation": cache_implementation} if cache_implementation else {}
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        return run

    with torch.no_grad():
        if not args.skip_eager:
            rows["transformers eager"], tokens["transformers eager"] = timed(hf(), args.rounds, args.new)
        rows["transformers static+compile"], tokens["transformers static+compile"] = timed(
            hf("static"), args.rounds, args.new)

    # capture sees attention as ops (eager), as evo-rewrite's own Hugging Face loader sets it
    try:
        model.set_attn_implementation("eager")
    except AttributeError:
        model.config._attn_implementation = "eager"
    programs = {}
    for pipeline in ("flash", "gqa(kv_heads=4),flash"):
        t0 = time.perf_counter()
        result = evo_rewrite.rewrite(model, pipeline, cache=True, device="cuda")
        assert result.report.ok, result.report.table()
        programs[pipeline] = (result.program, time.perf_counter() - t0)

    for pipeline, (program, build_s) in programs.items():
        def run(n, program=program):
            return evo_rewrite.generate(program, ids, max_new_tokens=n, attention_mask=mask, device="cuda",
                                        cache="static", compile=True, eos_token_id=[])
        name = f"evo {pipeline}"
        rows[name], tokens[name] = timed(run, args.rounds, args.new)

    base = rows["transformers static+compile"]
    ref = tokens["transformers static+compile"]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
           "prompt": args.prompt, "new": args.new, "dtype": "bfloat16",
           "model": "Llama-style 0.95B MHA (hidden 2048, 16 layers, 32 heads, FFN 5632), random weights",
           "command": "python examples/bench_decode_gpu.py " + " ".join(sys.argv[1:]),
           "ms_per_step": rows, "speedup_vs_transformers_static_compile": {k: base / v for k, v in rows.items()},
           "kv_cache_bytes_per_token": {p: prog.annotations.kv_cache.bytes_per_token() for p, (prog, _) in programs.items()},
           "rewrite_seconds": {p: s for p, (_, s) in programs.items()},
           "tokens_equal_transformers": {k: bool(torch.equal(v[:, -args.new:], ref[:, -args.new:]))
                                         for k, v in tokens.items()},
           "token_agreement": {k: float((v[:, -args.new:] == ref[:, -args.new:]).float().mean())
                               for k, v in tokens.items()}}
    print(json.dumps(out, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
