"""ONNX attention fusion and ONNX Runtime CPU latency: evo-rewrite vs ORT's optimizer vs onnxscript's.

For each model (zoo GPT and encoder, tiny Hugging Face configs from tests/hf_configs.py):

* baseline:   the captured program without passes, ``torch.onnx.export(dynamo=True)`` (default opset)
* ort-opt:    the baseline through ``onnxruntime.transformers.optimizer.optimize_model``
* onnxscript: the baseline through ``onnxscript.rewriter.ort_fusions.optimize_for_ort``
* evo-rewrite: ``save_onnx`` (``flash`` first, then the default ORT contrib operators)

and counts attention blocks fused (attention operators in the graph / attention sites in the model),
checks each model in ORT against the PyTorch program, and times ORT CPU inference of the four side by
side in one process. A first section measures the ONNX ``Attention`` operator against ORT's
``MultiHeadAttention`` / ``GroupQueryAttention`` (the choice of the target's default).

    HF_HUB_OFFLINE=1 python examples/onnx_compare.py [--archs all|gpt2,llama,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import platform
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

import evo_rewrite  # noqa: E402
from evo_rewrite import zoo  # noqa: E402
from evo_rewrite.attention import find_attention  # noqa: E402
from evo_rewrite.targets.onnx import save_onnx  # noqa: E402
from evo_rewrite.targets.pytorch import export_program  # noqa: E402

BIG_ARCHS = ["bert", "gpt2", "llama", "gemma2", "t5", "deberta-v2"]
BIG_SEQ = 128
DEFAULT_ARCHS = ["gpt2", "bert", "distilbert", "llama", "mistral", "qwen2", "phi3", "falcon", "gemma2", "t5", "bart",
                 "deberta-v2", "vit"]
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention"}
THREADS = 2


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 4
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feeds(sess, program, inputs):
    named = {**dict(zip(program.module.graph._codegen.pytree_info.orig_args, inputs.args)), **inputs.kwargs}
    return {i.name: named[i.name].numpy() for i in sess.get_inputs()}


def _time(runs: dict, reps: int) -> dict:
    """Median seconds per call of each callable, interleaved so that machine noise hits all alike."""
    for f in runs.values():
        for _ in range(3):
            f()
    ts = {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in ts.items()}


def _attention_ops(path) -> collections.Counter:
    m = ir.load(path)
    return collections.Counter(n.op_type for n in m.graph if n.op_type in ATTENTION_OPS)


def _rel_err(sess, program, inputs) -> float:
    ref = [t for t in pytree.tree_leaves(program(inputs)) if isinstance(t, torch.Tensor)][0]
    got = torch.from_numpy(sess.run(None, _feeds(sess, program, inputs))[0])
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def _quiet_export(ep, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(ep, (), dynamo=True, verbose=False, **kw)


# ------------------------------------------------------------------------------------------------
# 1. the operator: ONNX Attention vs ORT MultiHeadAttention / GroupQueryAttention
# ------------------------------------------------------------------------------------------------

class _SDPA(torch.nn.Module):
    def __init__(self, causal, gqa):
        super().__init__()
        self.causal, self.gqa = causal, gqa

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, enable_gqa=self.gqa)


def operator_choice(tmp, out, reps):
    out("## 1. Attention operator on ORT CPU: ONNX Attention (opset 23) vs com.microsoft MHA / GQA")
    out(f"median ms per call, {THREADS} intra-op threads, interleaved runs, {reps} reps")
    out("")
    out(f"{'case':<58} {'Attention':>10} {'MHA/GQA':>10} {'ratio':>6}")
    b, h, d, s = 2, 16, 64, 1024
    cases = [("causal, 16 heads", True, 16, False), ("causal, 16 q / 4 kv heads", True, 4, False),
             ("additive mask, 16 heads", False, 16, True), ("additive mask, 16 q / 4 kv heads", False, 4, True)]
    for name, causal, kvh, use_mask in cases:
        g = torch.Generator().manual_seed(0)
        args = (torch.randn(b, h, s, d, generator=g), torch.randn(b, kvh, s, d, generator=g),
                torch.randn(b, kvh, s, d, generator=g)) + ((torch.zeros(b, 1, s, s),) if use_mask else ())
        program = evo_rewrite.prepare(_SDPA(causal, kvh != h), args)
        sess = {}
        for form in ("onnx", "ort"):
            path = os.path.join(tmp, f"op_{form}.onnx")
            save_onnx(program, path, attention=form)
            sess[form] = _session(path)
        feeds = {k: _feeds(v, program, program.inputs) for k, v in sess.items()}
        t = _time({k: (lambda k=k: sess[k].run(None, feeds[k])) for k in sess}, reps)
        label = f"SDPA alone B={b} S={s} D={d}, {name}"
        out(f"{label:<58} {t['onnx'] * 1e3:>10.2f} {t['ort'] * 1e3:>10.2f} {t['onnx'] / t['ort']:>6.2f}")
    import transformers as T

    torch.manual_seed(0)
    models = [
        ("Llama 4L h512 8q/2kv, B=2 S=512, causal", T.LlamaForCausalLM, T.LlamaConfig(
            vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=2048), False),
        ("Llama 4L h512 8q/2kv, B=2 S=512, padding mask", T.LlamaForCausalLM, T.LlamaConfig(
            vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=2048), True),
        ("BERT 4L h512 8 heads, B=2 S=512, padding mask", T.BertModel, T.BertConfig(
            vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            max_position_embeddings=2048), True),
    ]
    for name, cls, cfg, with_mask in models:
        model = cls._from_config(cfg, attn_implementation="eager").eval()
        ids = torch.randint(3, 1000, (2, 512))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if with_mask else {"input_ids": ids}
        program = evo_rewrite.rewrite(model, "flash", example_inputs=inputs).program
        sess = {}
        for form in ("onnx", "ort"):
            path = os.path.join(tmp, f"model_{form}.onnx")
            save_onnx(program, path, attention=form)
            sess[form] = _session(path)
        feeds = {k: _feeds(v, program, program.inputs) for k, v in sess.items()}
        t = _time({k: (lambda k=k: sess[k].run(None, feeds[k])) for k in sess}, max(reps // 2, 5))
        out(f"{name:<58} {t['onnx'] * 1e3:>10.2f} {t['ort'] * 1e3:>10.2f} {t['onnx'] / t['ort']:>6.2f}")
    out("")


# ------------------------------------------------------------------------------------------------
# 2. fusion and latency: evo-rewrite vs ORT transformers optimizer vs onnxscript optimize_for_ort
# ------------------------------------------------------------------------------------------------

def _model(arch):
    if arch in ("zoo-gpt", "zoo-encoder"):
        model, inputs = getattr(zoo, arch[4:])()
        return model, inputs, ("gpt2" if arch == "zoo-gpt" else "bert"), 4, 64
    from hf_configs import HEADS, HIDDEN, build

    model = build(arch)
    kind = "gpt2" if "CausalLM" in type(model).__name__ else "bart" if arch == "bart" else \
        "t5" if arch == "t5" else "vit" if arch == "vit" else "bert"
    return model, None, kind, HEADS, HIDDEN


def _big_model(arch):
    """ARCH at a size where kernels, not per-operator overhead, decide: 4 layers, hidden 512, 8 heads of 64."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=1000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                  num_attention_heads=8, max_position_embeddings=1024)
    cls, cfg, kind = {
        "bert": (T.BertForMaskedLM, T.BertConfig(**common), "bert"),
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=1000, n_positions=1024, n_embd=512, n_layer=4, n_head=8),
                 "gpt2"),
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**common, num_key_value_heads=2), "gpt2"),
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(**common, num_key_value_heads=4, head_dim=64,
                                                       query_pre_attn_scalar=64, sliding_window=64,
                                                       attn_logit_softcapping=50.0), "gpt2"),
        "t5": (T.T5ForConditionalGeneration, T.T5Config(vocab_size=1000, d_model=512, d_kv=64, d_ff=2048, num_layers=4,
                                                         num_heads=8, decoder_start_token_id=0), "t5"),
        "deberta-v2": (T.DebertaV2Model, T.DebertaV2Config(**common, relative_attention=True,
                                                            pos_att_type=["p2c", "c2p"]), "bert"),
    }[arch]
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(3, 1000, (2, BIG_SEQ))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 1000, (2, BIG_SEQ))
    return model, inputs, kind, 8, 512


def compare(arch, tmp, out, reps, big=False):
    from onnxruntime.transformers.optimizer import optimize_model
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, inputs, kind, heads, hidden = _big_model(arch) if big else _model(arch)
    program = evo_rewrite.prepare(model, inputs)
    sites = sum(1 for r in find_attention(program.module) if r.site is not None)
    paths, fused, notes = {}, {}, {}
    base = os.path.join(tmp, f"{arch}_baseline.onnx")
    _quiet_export(export_program(program)).save(base)
    paths["baseline"] = base
    try:
        opt = optimize_model(base, model_type=kind, num_heads=heads, hidden_size=hidden, opt_level=1, use_gpu=False)
        paths["ort-opt"] = os.path.join(tmp, f"{arch}_ortopt.onnx")
        opt.save_model_to_file(paths["ort-opt"])
    except Exception as exc:  # noqa: BLE001 - report, continue
        notes["ort-opt"] = f"optimizer failed: {type(exc).__name__}"
    try:
        m = ir.load(base)
        m, _counts = optimize_for_ort(m)
        paths["onnxscript"] = os.path.join(tmp, f"{arch}_onnxscript.onnx")
        ir.save(m, paths["onnxscript"])
    except Exception as exc:  # noqa: BLE001
        notes["onnxscript"] = f"optimize_for_ort failed: {type(exc).__name__}"
    try:
        rep = save_onnx(program, os.path.join(tmp, f"{arch}_evo.onnx"))
        paths["evo-rewrite"] = rep.path
    except Exception as exc:  # noqa: BLE001
        notes["evo-rewrite"] = f"{type(exc).__name__}: {str(exc)[:80]}"
    sessions, errs = {}, {}
    for k, p in paths.items():
        fused[k] = _attention_ops(p)
        try:
            sessions[k] = _session(p)
            errs[k] = _rel_err(sessions[k], program, program.inputs)
        except Exception as exc:  # noqa: BLE001
            notes[k] = f"ORT cannot run it: {str(exc).splitlines()[0][:70]}"
            sessions.pop(k, None)
    feeds = {k: _feeds(s, program, program.inputs) for k, s in sessions.items()}
    t = _time({k: (lambda k=k: sessions[k].run(None, feeds[k])) for k in sessions}, reps)
    cols = []
    for k in ("baseline", "ort-opt", "onnxscript", "evo-rewrite"):
        n = sum(fused.get(k, {}).values())
        ops = "+".join(f"{v}" for v in sorted(fused.get(k, {}))) or "-"
        ms = f"{t[k] * 1e3:.3f}" if k in t else "n/a"
        err = f"{errs[k]:.0e}" if k in errs else "-"
        cols.append(f"{f'{n}/{sites}':<5} {ops:<20} {ms:>7} {err:>6}".ljust(42))
    out(f"{arch:<12} " + " | ".join(cols))
    for k, v in notes.items():
        out(f"{'':<12}   {k}: {v}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated hf_configs archs, or 'all'")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--skip-operator", action="store_true", help="skip section 1 (the operator measurement)")
    ap.add_argument("--big-archs", default=",".join(BIG_ARCHS),
                    help=f"section 3 (hidden 512, B=2 S={BIG_SEQ}): comma-separated archs, or '' to skip")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "onnx_compare_cpu.txt"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from hf_configs import ARCHITECTURES

    archs = ["zoo-gpt", "zoo-encoder"] + (ARCHITECTURES if args.archs == "all" else args.archs.split(","))
    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    import onnxscript
    import transformers

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    out("$ HF_HUB_OFFLINE=1 python examples/onnx_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    out(f"machine: {cpu}, {os.cpu_count()} CPUs; ORT {ort.__version__} CPUExecutionProvider, {THREADS} intra-op threads; "
        f"torch {torch.__version__}, onnxscript {onnxscript.__version__}, transformers {transformers.__version__}")
    out("")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_operator:
            operator_choice(tmp, out, args.reps)
        out("## 2. Attention blocks fused (operators / sites, which operators), ORT CPU ms per call at the example")
        out(f"##    inputs (2 x 16 tokens; ViT 2 images; {10 * args.reps} interleaved reps), and max relative error against")
        out("##    the PyTorch program")
        out("##    each column: fused/sites  operators  ms  max-rel-err")
        out(f"{'model':<12} " + " | ".join(f"{k:<42}" for k in ("baseline (torch.onnx)", "ORT transformers optimizer",
                                                                 "onnxscript optimize_for_ort", "evo-rewrite")))
        for arch in archs:
            try:
                compare(arch, tmp, out, 10 * args.reps)  # ~0.1-0.5 ms a call: many reps are cheap
            except Exception as exc:  # noqa: BLE001 - one model's failure must not end the comparison
                out(f"{arch:<12} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        big = [a for a in args.big_archs.split(",") if a]
        if big:
            out("")
            out("## 3. The same at a size where the kernels decide: 4 layers, hidden 512, 8 heads of 64 (Llama 2 K/V")
            out(f"##    heads, Gemma2 4 and softcap 50), FFN 2048, inputs B=2 S={BIG_SEQ}; ms per call, "
                f"{args.reps} reps")
            for arch in big:
                try:
                    compare(arch, tmp, out, args.reps, big=True)
                except Exception as exc:  # noqa: BLE001
                    out(f"{arch:<12} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
