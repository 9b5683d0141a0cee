"""Scale benchmark: rewrite a Llama model at real size on one GPU; times, memory, and prefill speed of the result.

    python examples/bench_scale.py [--shape 7b|1b] [--pipelines "flash;gqa(kv_heads=8,method=fit),flash"]
                                   [--batch 4 --seq 2048] [--json examples/results/bench_scale_h200.json]
    python examples/bench_scale.py --device cpu --shape tiny --batch 2 --seq 64      # smoke test
    python examples/bench_scale.py --checkpoint /work/ckpt/llama-1b --device cpu \
        --runs "flash;gqa(kv_heads=2,method=fit);=>onnx(dtype=fp32);=>onnx(dtype=fp16)" \
        --json examples/results/bench_scale_cpu.json        # memory at real size on the CPU (see below)

Random bf16 weights (seeded) in the shape asked for (7b: Llama-2-7B, hidden 4096, 32 layers, 32 heads, FFN
11008; 1b: TinyLlama, hidden 2048, 22 layers, 32 heads / 4 K/V heads, FFN 5632), written with eager
attention. For each pipeline: capture + passes + verification time (from the report: every pass is
verified against a higher-precision shadow of the original), whether every pass verified, peak host
(RSS) and GPU memory, then prefill tokens/s of the rewritten module next to the eager original and
transformers' SDPA model on the same weights, interleaved (median of --rounds). One process.

With ``--checkpoint DIR`` (a Hugging Face directory, e.g. one examples/make_checkpoint.py wrote) it measures what
the CLI does with a checkpoint instead: for each run ``PIPELINE[=>TARGET]`` (target pytorch by default), a fresh
subprocess loads the checkpoint in its stored dtype, captures it (with its KV cache for the pytorch target, as the
CLI does), runs the pipeline with verification, and writes and checks the output; it reports the seconds of each
stage, the peak resident memory of that process (getrusage's ru_maxrss, which counts weights read from
memory-mapped files too) against the goal 1.5 x the checkpoint's bytes + 1 GiB, and the bytes written. Calibration
for ``method=fit``: 4 batches of 2 x 64 random tokens (seeded), on a program captured without the KV cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_checkpoint import SHAPES  # noqa: E402 - the shapes the checkpoint script writes


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _child(ckpt: str, spec: str, out_dir: str) -> dict:
    """One run in this (fresh) process: load + capture, passes + verification, write + check; times and peak RSS."""
    import evo_rewrite

    pipeline, _, target = spec.partition("=>")
    pipeline, target = pipeline.strip(), (target.strip() or "pytorch")
    rec = {"run": spec, "pipeline": pipeline, "target": target}
    t = time.perf_counter()
    # the pytorch target gets the KV cache, as in the CLI; a calibrated pass takes cacheless calibration batches
    program = evo_rewrite.prepare(ckpt, cache=not target.startswith("onnx") and "method=fit" not in pipeline)
    rec["capture_s"] = time.perf_counter() - t
    rec["rss_after_capture_gib"] = _rss_gb()
    calibration = None
    if "method=fit" in pipeline:
        vocab = json.load(open(os.path.join(ckpt, "config.json")))["vocab_size"]
        g = torch.Generator().manual_seed(1)
        calibration = [{"input_ids": torch.randint(0, vocab, (2, 64), generator=g),
                        "attention_mask": torch.ones(2, 64, dtype=torch.long)} for _ in range(4)]
    t = time.perf_counter()
    result = evo_rewrite.rewrite(program, pipeline, calibration=calibration)
    rec["passes_and_verify_s"] = time.perf_counter() - t
    rep = result.report
    rec["baseline_and_shadow_s"] = rep.baseline_seconds
    rec["passes"] = [{"spec": p.spec, "rewrites": p.rewrites, "verified": p.verified, "failure": p.failure,
                      "seconds": p.seconds, "verify_seconds": p.verify_seconds,
                      "metrics": {k: v for k, v in p.metrics.items() if isinstance(v, (int, float))}}
                     for p in rep.passes]
    rec["ok"] = rep.ok
    rec["rss_after_passes_gib"] = _rss_gb()
    suffix = ".onnx" if target.startswith("onnx") else ".pt2"
    out = os.path.join(out_dir, "out" + suffix)
    t = time.perf_counter()
    written = result.write(out, target)
    rec["write_and_check_s"] = time.perf_counter() - t
    rec["written_bytes"] = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    rec["written_files"] = sorted(os.listdir(out_dir))
    rec["target_notes"] = list(getattr(written, "notes", []))
    rec["max_rel_error_vs_program"] = getattr(written, "max_rel_error", None)
    rec["peak_rss_gib"] = _rss_gb()
    rec["write_gb_per_s"] = rec["written_bytes"] / 1e9 / rec["write_and_check_s"]
    if suffix == ".pt2":  # the save goal's yardstick: torch.export.save alone, of the program just written
        ep = torch.export.load(out)
        t = time.perf_counter()
        torch.export.save(ep, os.path.join(out_dir, "plain.pt2"))
        rec["torch_export_save_s"] = time.perf_counter() - t
        del ep
        os.remove(os.path.join(out_dir, "plain.pt2"))
    return rec


def checkpoint_main(args) -> int:
    """--checkpoint: each run in a fresh subprocess (peaks do not mix), results as text and JSON."""
    import platform
    import subprocess
    import tempfile

    import transformers as T

    ckpt_bytes = sum(os.path.getsize(os.path.join(args.checkpoint, f)) for f in os.listdir(args.checkpoint))
    goal = 1.5 * ckpt_bytes / 2**30 + 1
    cfg = json.load(open(os.path.join(args.checkpoint, "config.json")))
    lines = [f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM); torch {torch.__version__}; "
             f"transformers {T.__version__}; checkpoint {args.checkpoint} ({ckpt_bytes / 2**30:.2f} GiB, "
             f"{cfg.get('torch_dtype')}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers); goal: peak RSS "
             f"<= 1.5 x checkpoint + 1 GiB = {goal:.2f} GiB",
             "command: python " + " ".join(sys.argv)]
    print("\n".join(lines), flush=True)
    runs = []
    for spec in [r.strip() for r in args.runs.split(";") if r.strip()]:
        with tempfile.TemporaryDirectory(dir=args.out_dir) as out_dir:
            proc = subprocess.run([sys.executable, __file__, "--child", args.checkpoint, spec, out_dir],
                                  capture_output=True, text=True)
            try:
                rec = json.loads(proc.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                rec = {"run": spec, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300],
                       "returncode": proc.returncode}
        rec["within_goal"] = rec.get("peak_rss_gib", float("inf")) <= goal
        runs.append(rec)
        if "error" in rec:
            line = f"  {spec}: FAILED ({rec['returncode']}): {rec['error']}"
        else:
            verified = all(p["verified"] for p in rec["passes"])
            line = (f"  {spec}: capture {rec['capture_s']:.0f}s, passes + verify {rec['passes_and_verify_s']:.0f}s "
                    f"(baseline + shadow {rec['baseline_and_shadow_s']:.0f}s), write + check {rec['write_and_check_s']:.0f}s; "
                    f"verified={verified}; peak RSS {rec['peak_rss_gib']:.2f} GiB (after capture "
                    f"{rec['rss_after_capture_gib']:.2f}, after passes {rec['rss_after_passes_gib']:.2f}); "
                    f"{'within' if rec['within_goal'] else 'OVER'} goal; wrote {', '.join(rec['written_files'])} "
                    f"({rec['written_bytes'] / 2**30:.2f} GiB)"
                    + (f"; vs program max rel err {rec['max_rel_error_vs_program']:.2e}"
                       if rec.get("max_rel_error_vs_program") is not None else "")
                    + (f"; write + check {rec['write_gb_per_s']:.2f} GB/s, torch.export.save alone "
                       f"{rec['torch_export_save_s']:.0f}s ({rec['write_and_check_s'] / rec['torch_export_save_s']:.2f}x)"
                       if rec.get("torch_export_save_s") else ""))
        lines.append(line)
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "checkpoint_bytes": ckpt_bytes, "config": cfg,
                       "goal_peak_rss_gib": goal, "torch": torch.__version__, "transformers": T.__version__,
                       "cpu_count": os.cpu_count(), "command": " ".join(sys.argv), "runs": runs}, f, indent=1, default=str)
        with open(os.path.splitext(args.json)[0] + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.json}")
    return 0 if all("error" not in r and r.get("ok") for r in runs) else 1


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(_child(*sys.argv[2:5]), default=str))
        return 0
    import transformers as T

    import evo_rewrite

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--pipelines", default="flash;gqa(kv_heads=8,method=fit),flash")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    ap.add_argument("--checkpoint", help="measure rewriting this Hugging Face checkpoint directory (see above)")
    ap.add_argument("--runs", default="flash;gqa(kv_heads=2,method=fit);=>onnx(dtype=fp32);=>onnx(dtype=fp16)",
                    help="with --checkpoint: PIPELINE[=>TARGET] runs separated by ';'")
    ap.add_argument("--out-dir", default=None, help="with --checkpoint: where outputs are written (then removed)")
    args = ap.parse_args()
    if args.checkpoint:
        return checkpoint_main(args)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = SHAPES[args.shape]
    def build(attn):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # made in the dtype directly: no fp32 copy of 7B weights
        try:
            with dev:
                return T.LlamaForCausalLM(T.LlamaConfig(**cfg, attn_implementation=attn)).eval()
        finally:
            torch.set_default_dtype(old)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    eager = build("eager")
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in eager.parameters())
    sdpa = build("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), generator=g).to(dev)
    n = min(128, args.seq)
    example = {"input_ids": ids[:2, :n].clone(), "attention_mask": torch.ones(2, n, dtype=torch.long, device=dev)}
    calibration = [{"input_ids": torch.randint(0, cfg["vocab_size"], (2, n), generator=g).to(dev),
                    "attention_mask": torch.ones(2, n, dtype=torch.long, device=dev)} for _ in range(4)]
    log = print
    log(f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}; torch {torch.__version__}; "
        f"transformers {T.__version__}; Llama {args.shape} ({params / 1e9:.2f}B params, {dtype}); "
        f"built in {build_s:.1f}s; prefill B{args.batch}xS{args.seq}")

    mask = torch.ones_like(ids)
    rows = {"eager (original)": lambda: eager(input_ids=ids, attention_mask=mask).logits,
            "transformers sdpa": lambda: sdpa(input_ids=ids, attention_mask=mask).logits}
    pipelines = {}
    for spec in [p.strip() for p in args.pipelines.split(";") if p.strip()]:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fit = "method=fit" in spec
        try:
            r = evo_rewrite.rewrite(eager, spec, example_inputs=example, device=str(dev),
                                    calibration=calibration if fit else None)
        except Exception as exc:  # noqa: BLE001 - a row that cannot run is reported, not fatal
            pipelines[spec] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log(f"  {spec}: FAILED {pipelines[spec]['error']}")
            continue
        secs = time.perf_counter() - t
        rec = {"seconds": secs, "ok": r.report.ok, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30
               if dev.type == "cuda" else None, "peak_rss_gb": _rss_gb(),
               "passes": [{"spec": p.spec, "rewrites": p.rewrites, "verified": p.verified, "failure": p.failure,
                           "seconds": p.seconds, "verify_seconds": p.verify_seconds,
                           "metrics": {k: v for k, v in p.metrics.items() if isinstance(v, (int, float))},
                           "verification": p.notes.get("verification")} for p in r.report.passes],
               "kv_cache_bytes_per_token": r.report.model_after.get("kv_cache_bytes_per_token")}
        pipelines[spec] = rec
        for p in rec["passes"]:
            m = p["metrics"]
            log(f"  {p['spec']}: {p['rewrites']} rewrites, verified={p['verified']} "
                f"(vs shadow {m.get('error_vs_shadow', float('nan')):.3g}, before vs shadow "
                f"{m.get('before_vs_shadow', float('nan')):.3g}; {p['seconds']:.1f}s + verify {p['verify_seconds']:.1f}s)"
                + (f" FAILED: {p['failure']}" if p["failure"] else ""))
        log(f"  {spec}: {secs:.1f}s in all, peak GPU {rec['peak_gpu_gb'] or 0:.1f} GiB, peak RSS {rec['peak_rss_gb']:.1f} GiB")
        module = r.module
        rows[f"evo {spec}"] = lambda module=module: module(input_ids=ids, attention_mask=mask)["logits"]

    samples = {k: [] for k in rows}
    with torch.no_grad():
        for fn in rows.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in rows.items():
                _sync(dev)
                t = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                _sync(dev)
                samples[name].append((time.perf_counter() - t) / args.iters)
    tokens = args.batch * args.seq
    base = statistics.median(samples["transformers sdpa"])
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": T.__version__, "shape": args.shape, "config": cfg, "params": params,
              "dtype": str(dtype), "batch": args.batch, "seq": args.seq, "pipelines": pipelines, "prefill": {},
              "command": " ".join(sys.argv)}
    log(f"\n{'variant':<44} {'ms':>9} {'tokens/s':>10} {'vs sdpa':>8}")
    for name, s in samples.items():
        sec = statistics.median(s)
        result["prefill"][name] = {"ms": sec * 1e3, "tokens_per_s": tokens / sec, "vs_sdpa": base / sec}
        log(f"{name:<44} {sec * 1e3:>9.2f} {tokens / sec:>10,.0f} {base / sec:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
