"""`gqa`: convert multi-head attention to grouped-query attention (MQA with one group).

pattern  every attention site whose K and V trace back to linear projections
         (evo_rewrite.projections: separate or fused qkv, rotary, materialised K/V repeats)
check    the new K/V head count divides the current one (else an error naming the site and the
         valid counts); the head-split reshape names its head count as a constant or -1
auto     ``kv_heads=auto`` (the default) tries every count that divides the sites' K/V heads, fewest
         first, measures each on inputs the pass was not fitted on (held-out calibration, else random
         tokens of another seed: the pass manager's ``QualityCheck``) and keeps the fewest whose
         quality stays within the user's thresholds, or ``AUTO_THRESHOLDS`` (cosine >= 0.99) when none
         is given; the notes say what it chose and what the next smaller count would have cost
rewrite  K and V projection heads merged per group of consecutive heads (``method=mean``: the GQA
         paper's mean-pooling; ``method=fit``: calibrated, see passes/gqa_fit.py), the head-split
         reshape and any repeat rewritten for the new count, and attention fed grouped K/V
         (``enable_gqa`` on a fused site, ``repeat_interleave`` otherwise). Rotary embedding acts
         on each head alike, so it commutes with merging heads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from evo_rewrite.attention import AttentionSite, attention_sites, untranspose, val
from evo_rewrite.annotations import QualityCheck
from evo_rewrite.decoder import set_cache_heads
from evo_rewrite.errors import PassNotApplicable
from evo_rewrite.pass_infra import Pass, PassResult, Skip, register_pass
from evo_rewrite.program import Program
from evo_rewrite.projections import HeadPath, trace_projection
from evo_rewrite.verify import AUTO_THRESHOLDS, check, compare_outputs

aten = torch.ops.aten


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass
class _Plan:
    site: AttentionSite
    k_seq: fx.Node  # K (B, Hkv, S, D) before any repeat
    v_seq: fx.Node
    k_path: HeadPath
    v_path: HeadPath
    kv_heads: int
    heads: int
    head_dim: int
    v_head_dim: int


def merge_mean(w: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """(heads·D, in) -> (groups·D, in): mean over consecutive heads of each group."""
    heads = w.shape[0] // head_dim
    return w.reshape(groups, heads // groups, head_dim, *w.shape[1:]).mean(1).reshape(groups * head_dim, *w.shape[1:])


@register_pass
@dataclasses.dataclass(frozen=True)
class GQA(Pass):
    """Group the K/V heads of every attention site (MHA -> GQA; kv_heads=1 is MQA)."""

    name: ClassVar[str] = "gqa"
    exact: ClassVar[bool] = False
    summary: ClassVar[str] = "merge K/V heads into kv_heads groups (mean-pooling or calibrated fit); KV cache shrinks"
    kv_heads: int | Literal["auto"] = "auto"
    method: Literal["mean", "fit"] = "mean"

    def accepts(self) -> frozenset[str]:
        # fit fits on calibration; auto measures its candidates on the held-out part
        return frozenset({"calibration"}) if self.method == "fit" or self.kv_heads == "auto" else frozenset()

    def __post_init__(self):
        if self.kv_heads == "auto":
            return
        if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
            raise ValueError(f"kv_heads must be auto or an integer >= 1 (e.g. gqa(kv_heads=4)), got {self.kv_heads!r}")

    def run(self, program: Program) -> PassResult:
        if self.kv_heads == "auto":
            return self._run_auto(program)
        sites = attention_sites(program.module)
        if not sites:
            return PassResult(program, 0, message="no attention in the model")
        plans, skipped = [], []
        for s in sites:
            plan = self._plan(s)
            if isinstance(plan, str):
                skipped.append(Skip(plan, s.module, s.output.name))
                continue
            if plan.kv_heads % self.kv_heads:
                raise PassNotApplicable(
                    f"gqa(kv_heads={self.kv_heads}): site {s.module} has {plan.kv_heads} K/V heads, which "
                    f"{self.kv_heads} does not divide; valid kv_heads for it: {', '.join(map(str, _divisors(plan.kv_heads)))}")
            if plan.kv_heads == self.kv_heads:
                skipped.append(Skip(f"already has {plan.kv_heads} K/V heads", s.module, s.output.name))
                continue
            plans.append(plan)
        plans, skipped = self._own_weights(program, plans, skipped)
        if not plans:
            already = all(k.reason.startswith("already has") for k in skipped)
            msg = (f"no site needs grouping to {self.kv_heads} K/V heads" if already else
                   f"no site can be grouped to {self.kv_heads} K/V heads (see the skipped sites' reasons)")
            return PassResult(program, 0, skipped, message=msg)
        merged = self._merge_weights(program, plans)
        for plan in plans:
            self._rewrite_graph(program, plan)
        program.graph.eliminate_dead_code()
        program.module.recompile()
        notes = {"method": self.method, "kv_heads": f"{plans[0].kv_heads} -> {self.kv_heads}"}
        caches = [p.cache for plan in plans for p in (plan.k_path, plan.v_path) if p.cache is not None]
        if caches:  # a decoder program: its past/present K/V shrink with the heads
            layout = set_cache_heads(program, caches, self.kv_heads)
            notes["KV cache bytes/token"] = layout.bytes_per_token()
        notes.update(merged)
        return PassResult(program, len(plans), skipped, notes)

    # -- kv_heads=auto -----------------------------------------------------------------------

    def _run_auto(self, program: Program) -> PassResult:
        sites = attention_sites(program.module)
        if not sites:
            return PassResult(program, 0, message="no attention in the model")
        found = [(s, self._plan(s)) for s in sites]
        plans = [p for _, p in found if not isinstance(p, str)]
        if not plans:
            skipped = [Skip(p, s.module, s.output.name) for s, p in found]
            return PassResult(program, 0, skipped, message="no site can be grouped (see the skipped sites' reasons)")
        current = {p.kv_heads for p in plans}
        common = math.gcd(*current)
        candidates = [c for c in _divisors(common) if c < max(current)]
        quality = program.annotations.quality or _fallback_quality(program)
        thresholds = quality.thresholds if quality.thresholds is not None and quality.thresholds.given else AUTO_THRESHOLDS
        limits = thresholds.describe() + ("" if quality.thresholds is not None and quality.thresholds.given
                                          else " (the default for kv_heads=auto)")
        if not candidates:
            return PassResult(program, 0, message=f"kv_heads=auto: every site already has {common} K/V heads, and no "
                                                  "smaller count divides them all")
        before = [program(i) for i in quality.inputs]
        vocab = program.vocab_sizes()
        tried, failed_prev = [], None
        for c in candidates:
            trial = dataclasses.replace(self, kv_heads=c).run(program.clone())
            if not trial.rewrites:
                continue
            after = [trial.program(i) for i in quality.inputs]
            metrics, problem, dtype = _worst([compare_outputs(a, b, vocab) for a, b in zip(before, after)])
            failure = check(metrics, problem, dtype, False, thresholds)
            tried.append(f"{c}: {_brief(metrics)}" + (" (fails)" if failure else " (chosen)"))
            if failure:
                failed_prev = (c, metrics, failure)
                continue
            trial.notes["kv_heads"] = (f"auto: {'/'.join(map(str, sorted(current)))} -> {c}, the fewest K/V heads "
                                       f"within {limits} on {quality.note}")
            trial.notes["auto candidates"] = "; ".join(tried)
            trial.notes["next smaller"] = (
                f"{failed_prev[0]} K/V heads would cost {_brief(failed_prev[1])} ({failed_prev[2]})" if failed_prev
                else f"none: {c} is the fewest count that divides the K/V heads")
            if not quality.real:
                trial.notes["measured on"] = "random tokens, not real data: give --calibration for a choice you can trust"
            return trial
        best = failed_prev
        msg = (f"kv_heads=auto: no grouping stays within {limits} on {quality.note}"
               + (f"; the mildest, {best[0]} K/V heads, gives {_brief(best[1])}" if best else "")
               + "; keeping every head (give kv_heads=N with a looser --min-cosine/--min-sqnr to force one)")
        return PassResult(program, 0, message=msg, notes={"auto candidates": "; ".join(tried)})

    # -- analysis ---------------------------------------------------------------------------

    def _plan(self, s: AttentionSite) -> _Plan | str:
        """Head counts from the head-split reshapes of Q, K and V (any layout: the split makes (B, S, H, D));
        K and V traced back to their projections through transposes, flattening and K/V head repeats."""
        if s.head_dim is None:
            return f"layout {s.layout}: head dim unknown"
        k_in = s.k if s.fused or not s.k_transposed else (untranspose(s.k) or s.k)
        paths = []
        for name, t in (("K", k_in), ("V", s.v)):
            p = trace_projection(t)
            if isinstance(p, str):
                return f"{name} projection not found: {p}"
            if p.head_split is None or p.heads is None:
                return f"{name} has no head-split reshape"
            hd = p.head_split.args[p.shape_arg][p.heads_dim]
            if not (isinstance(hd, int) and hd in (-1, p.heads)):
                return f"{name}'s head-split reshape does not name its head count as a constant"
            paths.append(p)
        k_path, v_path = paths
        kv_heads = k_path.heads
        if v_path.heads != kv_heads or len(k_path.repeats) != len(v_path.repeats):
            return "K and V are split into different head counts or repeated differently"
        heads = s.heads
        if heads is None or s.layout not in ("BHSD", "BSHD"):  # 3-D (B·H, S, D): the query's head split tells
            q_path = trace_projection(s.q)
            heads = q_path.heads if not isinstance(q_path, str) else None
        if heads is None:
            return f"layout {s.layout}: the query's head count is unknown (no head-split reshape found)"
        if s.fused and s.layout == "BHSD" and s.kv_heads not in (None, kv_heads):
            return "K is broadcast over query heads"
        return _Plan(s, k_in, s.v, k_path, v_path, kv_heads, heads, s.head_dim, s.v_head_dim or s.head_dim)

    @staticmethod
    def _own_weights(program: Program, plans: list[_Plan], skipped: list[Skip]):
        """Keep the plans whose K/V projection weights feed only K/V projections of planned sites.

        A weight that also feeds something else (DeBERTa projects its relative-position embeddings with
        the key projection) cannot shrink without breaking that other use.
        """
        ours = {p.node for plan in plans for p in (plan.k_path.projection, plan.v_path.projection)}
        kept = []
        for plan in plans:
            other = None
            for proj in (plan.k_path.projection, plan.v_path.projection):
                for n in program.graph.nodes:
                    if n.op == "get_attr" and n.target in (proj.weight, proj.bias):
                        other = other or next((u for u in _weight_consumers(n) if u not in ours), None)
            if other is not None:
                skipped.append(Skip(f"the K/V projection weight also feeds {other.name} ({_opname(other)}), "
                                    "outside attention's K/V", plan.site.module, plan.site.output.name))
            else:
                kept.append(plan)
        return kept, skipped

    # -- weights ----------------------------------------------------------------------------

    def _merge_weights(self, program: Program, plans: list[_Plan]) -> dict:
        """Replace K/V rows (or columns) of every projection weight and bias; one rebuild per tensor."""
        fitted = None
        if self.method == "fit":
            from .gqa_fit import fit_merges

            fitted = fit_merges(program, plans, self.kv_heads, program.annotations.calibration)
        # segments per weight target: (start, stop, new rows as (rows, in) tensor)
        edits: dict[str, list] = {}
        bias_edits: dict[str, list] = {}
        for plan in plans:
            for role, path, hd in (("k", plan.k_path, plan.head_dim), ("v", plan.v_path, plan.v_head_dim)):
                proj = path.projection
                w = program.get_tensor(proj.weight).detach()
                rows = w[proj.start:proj.stop] if proj.layout == "out_in" else w[:, proj.start:proj.stop].t()
                b = program.get_tensor(proj.bias).detach()[proj.start:proj.stop] if proj.bias else None
                if fitted is not None and (plan.site.module, role) in fitted:
                    new_rows, new_b = fitted[(plan.site.module, role)]
                    new_rows = new_rows.to(rows.device, rows.dtype)
                    new_b = new_b.to(rows.device, rows.dtype) if new_b is not None else None
                else:
                    new_rows = merge_mean(rows, self.kv_heads, hd)
                    new_b = merge_mean(b, self.kv_heads, hd) if b is not None else None
                if any(seg[1] == proj.start for seg in edits.get(proj.weight, [])):
                    continue  # a weight shared by several sites (ALBERT) is merged once
                edits.setdefault(proj.weight, []).append((proj, proj.start, proj.stop, new_rows))
                if proj.bias:
                    bias_edits.setdefault(proj.bias, []).append((proj, proj.start, proj.stop, new_b))
        n_fit = 0
        for plan in plans if fitted else []:
            if (plan.site.module, "q") not in fitted:
                continue
            n_fit += 1
            qproj, new_q = fitted[(plan.site.module, "q")]
            edits.setdefault(qproj.weight, []).append((qproj, qproj.start, qproj.stop, new_q[:, :-1]))
            if qproj.bias:
                bias_edits.setdefault(qproj.bias, []).append((qproj, qproj.start, qproj.stop, new_q[:, -1]))
            oproj, new_o = fitted[(plan.site.module, "o")]
            old_o = program.get_tensor(oproj.weight)
            new_o = (new_o if oproj.layout == "out_in" else new_o.t()).to(old_o.device, old_o.dtype).contiguous()
            program.set_tensor(oproj.weight, new_o.requires_grad_(old_o.requires_grad))
        for target, segs in edits.items():
            self._apply(program, target, segs, is_bias=False)
        for target, segs in bias_edits.items():
            self._apply(program, target, segs, is_bias=True)
        notes = {"projections rewritten": len(edits)}
        if self.method == "fit":
            notes["fitted sites"] = f"{n_fit} of {len(plans)} (others mean-pooled)" if n_fit < len(plans) else f"{n_fit} of {len(plans)}"
            notes["calibration"] = getattr(program.annotations.calibration, "note", "the example inputs")
        return notes

    def _apply(self, program: Program, target: str, segs, is_bias: bool) -> None:
        old = program.get_tensor(target).detach()
        layout = segs[0][0].layout
        feat = old if (is_bias or layout == "out_in") else old.t()
        parts, cursor = [], 0
        for _, start, stop, new in sorted(segs, key=lambda x: x[1]):
            parts.append(feat[cursor:start])
            parts.append(new.to(feat.device, feat.dtype))
            cursor = stop
        parts.append(feat[cursor:])
        new_feat = torch.cat([p for p in parts if p.numel() or p.shape[0]], 0)
        new = new_feat if (is_bias or layout == "out_in") else new_feat.t().contiguous()
        program.set_tensor(target, new.requires_grad_(old.requires_grad) if new.is_floating_point() else new)
        if len(segs) == 1 and segs[0][1] == 0 and segs[0][2] == feat.shape[0]:
            return
        # a fused projection: move the split/slice boundaries that follow the new sizes
        if not is_bias:
            self._resize_fused_outputs(segs, feat.shape[0])

    def _resize_fused_outputs(self, segs, old_total: int) -> None:
        """Rewrite split sizes / slice bounds of a fused qkv output for the new K/V widths."""
        shrink = {(start, stop): stop - start - new.shape[0] for _, start, stop, new in segs}

        def new_pos(pos: int) -> int:
            return pos - sum(d for (a, b), d in shrink.items() if b <= pos)

        proj_node = segs[0][0].node
        new_total = new_pos(old_total)
        for user in _fused_consumers(proj_node):
            if user.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
                shape = list(user.args[1])
                if shape and isinstance(shape[-1], int) and shape[-1] == old_total:
                    shape[-1] = new_total  # GPT-2: view(addmm, [B, S, 3·C])
                    user.args = (user.args[0], shape, *user.args[2:])
            elif user.target is aten.split.Tensor:
                size = int(user.args[1])
                bounds = list(range(0, old_total + 1, size))
                sizes = [new_pos(b) - new_pos(a) for a, b in zip(bounds[:-1], bounds[1:])]
                user.target = aten.split_with_sizes.default
                user.args = (user.args[0], sizes, *user.args[2:])
            elif user.target is aten.split_with_sizes.default:
                bounds = [0]
                for sz in user.args[1]:
                    bounds.append(bounds[-1] + int(sz))
                user.args = (user.args[0], [new_pos(b) - new_pos(a) for a, b in zip(bounds[:-1], bounds[1:])], *user.args[2:])
            elif user.target is aten.slice.Tensor:
                args = list(user.args)
                start = args[2] if len(args) > 2 and args[2] is not None else 0
                end = args[3] if len(args) > 3 else None
                args[2] = new_pos(int(start))
                if end is not None and int(end) < old_total:
                    args[3] = new_pos(int(end))
                user.args = tuple(args)

    # -- graph ------------------------------------------------------------------------------

    def _rewrite_graph(self, program: Program, plan: _Plan) -> None:
        g = program.graph
        n, rep = self.kv_heads, plan.heads // self.kv_heads
        for path in (plan.k_path, plan.v_path):
            hs = path.head_split
            shape = list(hs.args[path.shape_arg])
            if shape[path.heads_dim] != -1:
                shape[path.heads_dim] = n
                args = list(hs.args)
                args[path.shape_arg] = shape
                hs.args = tuple(args)
            for node, axis, _ in path.repeats:  # existing K/V repeats: now by heads / n
                _set_repeat(g, node, axis, n, rep)
        if plan.k_path.repeats or rep == 1:
            return
        s = plan.site
        if s.fused:
            s.output.kwargs = {**s.output.kwargs, "enable_gqa": True}
            return
        # materialise the repeat where attention reads K and V (so `flash` turns it into enable_gqa), or right
        # after the head split where attention reads flattened (B·H, S, D) heads
        if s.layout == "BHSD" and plan.k_seq is not s.k:
            where = [(plan.k_seq, 1), (plan.v_seq, 1)]
        elif s.layout in ("BHSD", "BSHD") and s.k_perm is not None and s.v_perm is not None:
            where = [(plan.k_seq, s.k_perm[1]), (plan.v_seq, s.v_perm[1])]
        else:
            where = [(plan.k_path.head_split, 2), (plan.v_path.head_split, 2)]
        for t, axis in where:
            with g.inserting_after(t):
                r = g.call_function(aten.repeat_interleave.self_int, (t, rep, axis))
            # attention reads the repeated heads; a decoder's present K/V output keeps the grouped ones
            t.replace_all_uses_with(r, delete_user_cb=lambda u, r=r: u is not r and u.op != "output")


def _fallback_quality(program: Program) -> QualityCheck:
    """Outside the pass manager: the program's second-size inputs (never fitted on), else its example inputs."""
    second = program.second_inputs(seed=7)
    inputs = (second,) if second is not None else (program.inputs,)
    return QualityCheck(inputs, None, "random tokens of another size and seed, not real data")


def _worst(results):
    worst = {"cosine": min, "sqnr_db": min, "top1_agreement": min}
    merged, problem, dtype = {}, None, None
    for metrics, prob, dt in results:
        problem, dtype = problem or prob, dtype or dt
        for k, v in metrics.items():
            merged[k] = worst.get(k, max)(merged[k], v) if k in merged else v
    return merged, problem, dtype


def _brief(m: dict) -> str:
    parts = [f"cosine {m['cosine']:.4f}"] if "cosine" in m else []
    parts += [f"SQNR {m['sqnr_db']:.1f} dB"] if "sqnr_db" in m and math.isfinite(m["sqnr_db"]) else []
    parts += [f"KL {m['kl']:.3g}"] if "kl" in m else []
    return ", ".join(parts) or "no figures"


def _set_repeat(g: fx.Graph, node: fx.Node, axis: int, kv_heads: int, rep: int) -> None:
    """Make a K/V head repeat (repeat_interleave, expand+reshape, or indexing) repeat ``rep`` times."""
    if node.target is aten.repeat_interleave.self_int:
        node.args = (node.args[0], rep, *node.args[2:])
    elif node.target is aten.index.Tensor:
        with g.inserting_before(node):
            r = g.call_function(aten.repeat_interleave.self_int, (node.args[0], rep, axis))
        node.replace_all_uses_with(r)
    else:  # reshape(expand(unsqueeze(x, axis + 1), [..., Hkv, r, ...]))
        e = node.args[0]
        shape = list(e.args[1])
        shape[axis], shape[axis + 1] = kv_heads, rep
        e.args = (e.args[0], shape, *e.args[2:])


def _weight_consumers(w: fx.Node) -> list[fx.Node]:
    """The ops that read a weight, through transposes and casts."""
    out, stack = [], [w]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in (aten.t.default, aten.transpose.int, aten.permute.default,
                                                          aten._to_copy.default, aten.detach.default):
                stack.append(u)
            else:
                out.append(u)
    return out


def _opname(n: fx.Node) -> str:
    t = n.target
    return t.overloadpacket.__name__ if hasattr(t, "overloadpacket") else getattr(t, "__name__", str(t))


def _fused_consumers(proj_node: fx.Node) -> list[fx.Node]:
    """Split/slice nodes reading a fused projection's output (through reshapes)."""
    out, stack, seen = [], [proj_node], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in seen or u.op != "call_function":
                continue
            seen.add(u)
            if u.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor):
                out.append(u)
            elif u.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.add.Tensor):
                out.append(u)
                stack.append(u)
    return out


__all__ = ["GQA", "merge_mean"]
