"""Quality of grouped-query attention rewrites on real pretrained weights.

For all-MiniLM-L6-v2 (12 heads) at kv_heads 6,4,3,2,1 and SmolLM2-135M-Instruct (9 query / 3 K/V heads) at
kv_heads 1, and every method in --methods, this rewrites the model with

    evo_rewrite.rewrite(model, "gqa(kv_heads=N, method=M)", example_inputs=<first calibration batch>,
                     calibration=<calibration batches>)        # calibration= only where rewrite() takes it

and measures on held-out text (tests/real_models.py: texts("eval"), disjoint from the calibration text):

* MiniLM: cosine similarity between the original and the rewritten sentence embedding (attention-mask-
  weighted mean of last_hidden_state, as sentence-transformers pools it), mean and min over paragraphs.
* SmolLM2: token-level perplexity of the original and the rewritten model on consecutive 128-token windows,
  plus mean KL(original || rewritten) per token and top-1 next-token agreement.

    python examples/gqa_quality.py                      # the study; writes examples/results/gqa_quality.txt
    python examples/gqa_quality.py --methods mean,svd   # several methods
    python examples/gqa_quality.py --pipelines ""       # identity: cosine 1, perplexity unchanged
    python examples/gqa_quality.py --pipelines "" --standin key-noise=0.05,kv-mean
                                                        # validate the metric code with local lossy stand-ins

--pipelines is a ';'-separated list of pipeline templates; {n} is replaced by each kv_heads value and {m}
by each method (a template without {n} runs once per model, without {m} once per method set). Stand-ins
(--standin) change a deep copy of the model's weights here, outside evo-rewrite, then run the identity
pipeline on it; they only check that the metrics move the right way and are never the gqa pass:
  key-noise=S  adds Gaussian noise of S x (std of the weight) to every key projection weight;
  kv-mean=N    (kv-mean alone: each of the model's kv_heads values) averages the K and V projection weights
               (and biases) of each group of consecutive K/V heads
               down to N groups, keeping the head count: the weight-space meaning of "mean-pooled K/V
               heads" (an oracle for gqa(kv_heads=N, method=mean), whose numbers it should reproduce).
Stand-in and identity runs write no results file unless --output is given.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import evo_rewrite  # noqa: E402
import real_models as rm  # noqa: E402

DEFAULT_PIPELINE = "gqa(kv_heads={n}, method={m})"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "gqa_quality.txt"


# ----------------------------------------------------------------------------------------- inputs

def calibration_inputs(model_name: str, batches: int = 4, batch: int = 8, seq_len: int = 128) -> list[dict]:
    """Calibration token batches (list of {"input_ids", "attention_mask"}) from texts("calibration").

    MiniLM: `batches` x `batch` paragraphs, padded to the longest (<= seq_len). SmolLM2: `batches` x `batch`
    consecutive windows of exactly seq_len tokens. The first one is the example input of the capture."""
    cal = rm.texts("calibration")
    if model_name == "minilm":
        return rm.minilm_batches(cal, batch=batch, max_len=seq_len, limit=batches * batch)
    if model_name == "smollm2":
        return rm.lm_batches(cal, batch=batch, seq_len=seq_len, max_sequences=batches * batch)
    raise ValueError(f"unknown model {model_name!r}")


def eval_inputs(model_name: str, args) -> list[dict]:
    ev = rm.texts("eval")
    if model_name == "minilm":
        return rm.minilm_batches(ev, batch=16, max_len=args.minilm_max_len, limit=args.minilm_paragraphs)
    return rm.lm_batches(ev, batch=8, seq_len=args.lm_seq_len, max_sequences=args.lm_sequences)


# ---------------------------------------------------------------------------------------- metrics

def _out(o, key):
    return o[key] if isinstance(o, dict) else getattr(o, key)


@torch.no_grad()
def embeddings(fn, batches) -> torch.Tensor:
    """Mean-pooled (attention-mask-weighted) last_hidden_state per sequence, fp64, (N, hidden)."""
    embs = []
    for b in batches:
        h = _out(fn(**b), "last_hidden_state").double()
        m = b["attention_mask"].unsqueeze(-1).double()
        embs.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(embs)


def embedding_cosine(ref: torch.Tensor, new: torch.Tensor) -> dict:
    cos = F.cosine_similarity(ref, new, dim=-1)
    return {"cos_mean": cos.mean().item(), "cos_min": cos.min().item(), "n": len(cos)}


@torch.no_grad()
def lm_reference(fn, batches) -> list[torch.Tensor]:
    """Next-token log-probabilities of the original model per batch, fp32 (B, S-1, vocab): computed once and
    compared against every rewrite (32 x 128 tokens of SmolLM2 keep about 0.8 GB)."""
    return [F.log_softmax(_out(fn(**b), "logits")[:, :-1].float(), -1) for b in batches]


@torch.no_grad()
def lm_eval(ref: list[torch.Tensor], new_fn, batches) -> dict:
    """Token-level perplexity of the original (from `ref`, see lm_reference) and the rewritten model (every
    position but the last predicts the next token), mean KL(original || rewritten) per predicted token, and
    top-1 next-token agreement. new_fn=None evaluates the original against itself."""
    nll_ref = nll_new = kl = agree = 0.0
    count = 0
    for lr, b in zip(ref, batches, strict=True):
        target = b["input_ids"][:, 1:].unsqueeze(-1)
        lr = lr.double()
        ln = lr if new_fn is None else lm_reference(new_fn, [b])[0].double()
        nll_ref -= lr.gather(-1, target).sum().item()
        nll_new -= ln.gather(-1, target).sum().item()
        kl += (lr.exp() * (lr - ln)).sum().item()
        agree += (lr.argmax(-1) == ln.argmax(-1)).sum().item()
        count += target.numel()
    return {"ppl_ref": math.exp(nll_ref / count), "ppl_new": math.exp(nll_new / count), "kl": kl / count,
            "top1": agree / count, "tokens": count}


# -------------------------------------------------------------------------------------- stand-ins

def _attention_projections(model):
    """[(k Linear, v Linear, number of K/V heads, head_dim)] for BERT and Llama attention layers."""
    out = []
    for mod in model.modules():
        if hasattr(mod, "key") and hasattr(mod, "value") and hasattr(mod, "num_attention_heads"):  # BertSelfAttention
            out.append((mod.key, mod.value, mod.num_attention_heads, mod.attention_head_size))
        elif hasattr(mod, "k_proj") and hasattr(mod, "v_proj") and hasattr(mod, "head_dim"):  # LlamaAttention
            out.append((mod.k_proj, mod.v_proj, mod.k_proj.out_features // mod.head_dim, mod.head_dim))
    if not out:
        raise ValueError(f"no attention projections found in {type(model).__name__}")
    return out


@torch.no_grad()
def standin_model(model, spec: str):
    """A deep copy of `model` with the stand-in perturbation `spec` (key-noise=S or kv-mean=N) applied."""
    kind, _, value = spec.partition("=")
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for k, v, kv_heads, head_dim in _attention_projections(model):
        if kind == "key-noise":
            k.weight += float(value) * k.weight.std() * torch.randn(k.weight.shape, generator=g)
        elif kind == "kv-mean":
            groups = int(value)
            if kv_heads % groups:
                raise ValueError(f"kv-mean={groups}: {kv_heads} K/V heads do not split into {groups} groups")
            for lin in (k, v):
                for p in (lin.weight, lin.bias):
                    if p is None:
                        continue
                    heads = p.view(groups, kv_heads // groups, head_dim, *p.shape[1:])
                    heads.copy_(heads.mean(1, keepdim=True).expand_as(heads))
        else:
            raise ValueError(f"unknown stand-in {spec!r} (key-noise=S or kv-mean=N)")
    return model


# ------------------------------------------------------------------------------------------- study

def _rewrite(model, pipeline: str, calibration: list[dict]):
    kwargs = {}
    if "calibration" in inspect.signature(evo_rewrite.rewrite).parameters:
        kwargs["calibration"] = calibration
    t = time.perf_counter()
    result = evo_rewrite.rewrite(copy.deepcopy(model), pipeline, example_inputs=calibration[0], **kwargs)
    return result, time.perf_counter() - t


def _status(result) -> tuple[str, str]:
    rep = result.report
    if not rep.passes:
        return "ok", "-"
    bad = rep.failed()
    if bad:
        return f"ROLLED BACK ({bad[0].name}: {bad[0].failure})", "-"
    rewrites = sum(p.rewrites for p in rep.passes)
    return ("ok" if rewrites else "NO REWRITES"), str(rewrites)


def _kv_bytes(result) -> str:
    a = result.report.model_before.get("kv_cache_bytes_per_token")
    b = result.report.model_after.get("kv_cache_bytes_per_token")
    return f"{a}->{b}" if a is not None and b is not None else "-"


def runs(model_name: str, kv_list: list[int], args) -> list[tuple[str, str, str]]:
    """(label, pipeline text, stand-in spec or '') for every row of one model."""
    out = []
    for template in args.pipelines:
        ns = kv_list if "{n}" in template else [None]
        ms = args.methods if "{m}" in template else [None]
        for n in ns:
            for m in ms:
                text = template.replace("{n}", str(n)).replace("{m}", str(m))
                out.append((text or "(identity)", text, ""))
    for spec in args.standin:
        for s in ([f"kv-mean={n}" for n in kv_list] if spec == "kv-mean" else [spec]):
            out.append((f"stand-in {s}", "", s))
    return out


def _rewritten(model, run_list, cal, lines, log):
    """Yield (label, result, rewrite seconds, status, rewrites) per run; a failing run becomes an ERROR line."""
    for label, pipeline, standin in run_list:
        try:
            src = standin_model(model, standin) if standin else model
            result, t_rw = _rewrite(src, pipeline, cal)
        except (evo_rewrite.RewriteError, ValueError) as e:
            lines.append(f"{label:<34} ERROR: {type(e).__name__}: {e}")
            log(lines[-1])
            continue
        yield (label, result, t_rw, *_status(result))


def study_minilm(args, log) -> list[str]:
    t = time.perf_counter()
    model, _ = rm.minilm()
    log(f"minilm: loaded in {time.perf_counter() - t:.1f} s")
    cal = calibration_inputs("minilm", args.calibration_batches, 8, args.minilm_max_len)
    ev = eval_inputs("minilm", args)
    t = time.perf_counter()
    ref = embeddings(model, ev)
    t_ref = time.perf_counter() - t
    n_tok = sum(int(b["attention_mask"].sum()) for b in ev)
    lines = [f"MiniLM (all-MiniLM-L6-v2, 12 heads): {len(ref)} eval paragraphs, {n_tok} tokens (<= {args.minilm_max_len} "
             f"per paragraph); original model eval {t_ref:.1f} s",
             f"{'run':<34} {'status':<12} {'rewrites':>8} {'cos mean':>10} {'cos min':>10} {'KV B/token':>14} "
             f"{'rewrite s':>9} {'eval s':>7}"]
    for label, result, t_rw, status, rewrites in _rewritten(model, runs("minilm", args.minilm_kv, args), cal, lines, log):
        t = time.perf_counter()
        m = embedding_cosine(ref, embeddings(result.module, ev))
        t_ev = time.perf_counter() - t
        lines.append(f"{label:<34} {status:<12} {rewrites:>8} {m['cos_mean']:>10.6f} {m['cos_min']:>10.6f} "
                     f"{_kv_bytes(result):>14} {t_rw:>9.1f} {t_ev:>7.1f}")
        log(lines[-1])
    return lines


def study_smollm2(args, log) -> list[str]:
    t = time.perf_counter()
    model, _ = rm.smollm2()
    log(f"smollm2: loaded in {time.perf_counter() - t:.1f} s")
    cal = calibration_inputs("smollm2", args.calibration_batches, 4, args.lm_seq_len)
    ev = eval_inputs("smollm2", args)
    t = time.perf_counter()
    ref = lm_reference(model, ev)
    base = lm_eval(ref, None, ev)
    t_ref = time.perf_counter() - t
    n_seq = sum(len(b["input_ids"]) for b in ev)
    lines = [f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32; 9 query / 3 K/V heads): {n_seq} eval windows "
             f"x {args.lm_seq_len} tokens, {base['tokens']} predicted tokens",
             f"original perplexity {base['ppl_ref']:.4f} (eval {t_ref:.1f} s)",
             f"{'run':<34} {'status':<12} {'rewrites':>8} {'ppl orig':>9} {'ppl new':>9} {'KL/token':>10} "
             f"{'top-1':>7} {'KV B/token':>14} {'rewrite s':>9} {'eval s':>7}"]
    for label, result, t_rw, status, rewrites in _rewritten(model, runs("smollm2", args.smollm2_kv, args), cal, lines, log):
        t = time.perf_counter()
        m = lm_eval(ref, result.module, ev)
        t_ev = time.perf_counter() - t
        lines.append(f"{label:<34} {status:<12} {rewrites:>8} {m['ppl_ref']:>9.4f} {m['ppl_new']:>9.4f} "
                     f"{m['kl']:>10.3e} {m['top1']:>7.4f} {_kv_bytes(result):>14} {t_rw:>9.1f} {t_ev:>7.1f}")
        log(lines[-1])
        del result
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {platform.system()} {platform.release()}"


def git_revision() -> str:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,smollm2", help="comma list of minilm, smollm2")
    ap.add_argument("--methods", default="mean", help="comma list of gqa methods (default: mean)")
    ap.add_argument("--pipelines", default=DEFAULT_PIPELINE,
                    help=f"';'-separated pipeline templates with {{n}} and {{m}} (default: {DEFAULT_PIPELINE!r}; "
                         "'' is the identity)")
    ap.add_argument("--standin", default="", help="comma list of local lossy stand-ins: key-noise=S, kv-mean=N, kv-mean")
    ap.add_argument("--minilm-kv", default="6,4,3,2,1", type=_ints)
    ap.add_argument("--smollm2-kv", default="1", type=_ints)
    ap.add_argument("--calibration-batches", type=int, default=4)
    ap.add_argument("--minilm-max-len", type=int, default=128)
    ap.add_argument("--minilm-paragraphs", type=int, default=None, help="first N eval paragraphs (default: all)")
    ap.add_argument("--lm-seq-len", type=int, default=128)
    ap.add_argument("--lm-sequences", type=int, default=32)
    ap.add_argument("--output", default=None,
                    help="results file (default: examples/results/gqa_quality.txt "
                         "for the default gqa pipelines without stand-ins; none otherwise)")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.pipelines = [p.strip() for p in args.pipelines.split(";")] if args.pipelines.strip() else [""]
    args.standin = [s.strip() for s in args.standin.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in ("minilm", "smollm2"):
            ap.error(f"unknown model {m!r} (minilm, smollm2)")
    output = args.output
    if output is None and args.pipelines == [DEFAULT_PIPELINE] and not args.standin:
        output = str(DEFAULT_OUTPUT)

    import transformers

    torch.manual_seed(0)
    header = [
        "gqa quality on real weights (examples/gqa_quality.py)",
        "command: " + " ".join(shlex.quote(a) for a in ["python", "examples/gqa_quality.py", *(sys.argv[1:] if argv is None else argv)]),
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {machine()}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"evo-rewrite {evo_rewrite.__version__} (git {git_revision()})",
        f"text: pydoc_data.topics (Python {platform.python_version()}); calibration {len(rm.texts('calibration'))} "
        f"paragraphs crc {rm.text_fingerprint('calibration')}, eval {len(rm.texts('eval'))} paragraphs crc "
        f"{rm.text_fingerprint('eval')} (disjoint)",
        f"calibration: {args.calibration_batches} batches (the first is example_inputs); passed as calibration=: "
        f"{'yes' if 'calibration' in inspect.signature(evo_rewrite.rewrite).parameters else 'no (rewrite() has no such parameter)'}",
        "",
    ]
    for line in header:
        print(line, flush=True)
    body = []
    t0 = time.perf_counter()
    for m in models:
        lines = (study_minilm if m == "minilm" else study_smollm2)(args, lambda s: print(s, flush=True))
        body += lines + [""]
        print(flush=True)
    body.append(f"total {time.perf_counter() - t0:.0f} s")
    text = "\n".join(header + body) + "\n"
    print("=" * 40 + " results\n" + "\n".join(body))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
