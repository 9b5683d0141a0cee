"""Decode throughput and KV cache of a Llama-style ~1B MHA model before and after `gqa(kv_heads=4),flash`.

    python examples/bench_gqa_decode.py [--batch 32] [--prompt 1024] [--new 64] [--out results.json]

The original (hidden 2048, 16 layers, 32 heads, 32 K/V heads, FFN 5632, bf16, random weights,
attn_implementation="eager") is rewritten by evo-rewrite and written as a Hugging Face checkpoint
whose config says num_key_value_heads=4; transformers then decodes it with a 4-head KV cache. All
variants run in one process on the same prompt, greedy, exactly NEW tokens each:

* original, eager attention, dynamic cache (what the user has)
* original, sdpa, static cache (transformers compiles the decode step for a static cache)
* gqa(4)+flash checkpoint, sdpa, static cache. transformers' sdpa path materialises the K/V repeat
  (repeat_kv) whenever there is an attention mask, which a static cache always has, so each step
  copies the grouped cache back to 32 heads
* gqa(4)+flash checkpoint, static cache, with a grouped attention function registered through
  transformers' AttentionInterface: the query heads of a group are folded into the query length
  ((B, H, L, D) -> (B, Hkv, H/Hkv·L, D), mask rows repeated), so SDPA reads the 4-head cache as is

Decode time = time(generate NEW tokens) - time(generate 1 token) (so prefill is excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def folded_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA over grouped K/V without repeating them: fold each group's query heads into the query length."""
    import torch.nn.functional as F

    b, h, L, d = query.shape
    hkv = key.shape[1]
    rep = h // hkv
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if rep == 1 or attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             is_causal=attention_mask is None and L > 1, enable_gqa=rep > 1)
    else:
        q = query.reshape(b, hkv, rep * L, d)  # (B, Hkv, rep·L, D): row r·L + l is query head hkv·rep + r at position l
        mask = attention_mask.repeat(1, 1, rep, 1) if attention_mask.shape[2] > 1 else attention_mask
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling).reshape(b, h, L, d)
    return out.transpose(1, 2).contiguous(), None


def gen_time(model, ids, new, static):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    import transformers as T

    import evo_rewrite

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with dev:
        original = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="eager")).to(torch.bfloat16).eval()
    t0 = time.perf_counter()
    result = evo_rewrite.rewrite(original, f"gqa(kv_heads={args.kv_heads}),flash",
                              example_inputs={"input_ids": torch.randint(0, 32000, (2, 64), device=dev)}, device="cuda")
    tmp = tempfile.mkdtemp()
    hf_dir = result.save_hf(os.path.join(tmp, "gqa"))
    rewrite_s = time.perf_counter() - t0
    gqa = T.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev).eval()
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    T.AttentionInterface.register("folded_gqa", folded_gqa_attention)
    AttentionMaskInterface.register("folded_gqa", sdpa_mask)  # same masks as sdpa (None -> causal prefill)
    gqa_folded = T.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="folded_gqa").to(dev).eval()
    original_sdpa = T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation="sdpa"))
    original_sdpa.load_state_dict(original.state_dict())
    original_sdpa = original_sdpa.to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (args.batch, args.prompt), device=dev)
    variants = [("original, eager, dynamic cache", original, False, 32),
                ("original, sdpa, static cache", original_sdpa, True, 32),
                (f"gqa({args.kv_heads})+flash, sdpa, static cache", gqa, True, args.kv_heads),
                (f"gqa({args.kv_heads})+flash, folded GQA, static", gqa_folded, True, args.kv_heads)]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} transformers {T.__version__}; rewrite+checkpoint {rewrite_s:.1f}s; "
          f"{result.report.passes[0].spec}: sites {result.report.passes[0].rewrites}, "
          f"KV bytes/token {result.report.model_before['kv_cache_bytes_per_token']} -> {result.report.model_after['kv_cache_bytes_per_token']}")
    rows = []
    head_dim = 2048 // 32
    for name, model, static, kv in variants:
        gen_time(model, ids[:, :128], 4, static)  # warm-up (and compile, for the static cache)
        gen_time(model, ids, args.new, static)
        t1 = gen_time(model, ids, 1, static)
        tn = gen_time(model, ids, args.new, static)
        decode = tn - t1
        tok_s = args.batch * (args.new - 1) / decode
        kv_gb = 2 * args.layers * kv * head_dim * (args.prompt + args.new) * args.batch * 2 / 1e9
        rows.append({"variant": name, "decode_s": decode, "decode_tok_s": tok_s, "ms_per_step": decode / (args.new - 1) * 1e3,
                     "kv_cache_gb": kv_gb, "prefill_plus_1_s": t1})
        print(f"{name:<40} {decode / (args.new - 1) * 1e3:8.2f} ms/step {tok_s:10.0f} tok/s  KV cache {kv_gb:6.2f} GB", flush=True)
    base = rows[0]["decode_tok_s"]
    for r in rows:
        print(f"{r['variant']:<40} {r['decode_tok_s'] / base:5.2f}x the original's decode throughput")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": T.__version__,
                       "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
