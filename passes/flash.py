"""`flash`: replace every attention subgraph with one fused ``scaled_dot_product_attention`` call.

pattern  the attention sites of ``evo_rewrite.attention`` (softmax over the key axis of Q·Kᵀ, times V)
check    the score chain is expressible by SDPA: constant scales (literals, 0-d tensors made in
         forward, buffers), additive biases (position biases, tables, padding: any tensor),
         masked_fill/where with a very negative constant fill (a mask), casts; the probabilities feed
         only the product with V; K/V heads equal Q heads or divide them (GQA)
rewrite  SDPA(q, k, v, attn_mask=bias, scale=product of the scales, is_causal when the bias is
         exactly causal and input-independent, enable_gqa instead of a materialised K/V repeat),
         with q/k/v/bias permuted to SDPA's (batch…, S, D) order and the output permuted back to the
         layout the model continues with; 3-D (B·H, S, D) sites as one head of (B·H, 1, S, D)
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from evo_rewrite.attention import (CASTS, DROPOUT, INPLACE, RESHAPES, AttentionSite, data_dependent, find_attention,
                                   untranspose, val)
from evo_rewrite.errors import PassNotApplicable
from evo_rewrite.pass_infra import Pass, PassResult, Skip, register_pass
from evo_rewrite.program import Program
from evo_rewrite.sdpa import CAUSAL_IF_UNPADDED, MASK_FLOOR, is_causal_mask
from evo_rewrite.verify import record

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _share_mask_casts(g: fx.Graph) -> int:
    """Merge the dtype casts of one mask that the rewrite made per site (same input, same dtype) into the
    first of them, so every site reads one tensor: no copy per layer, and a per-call causal check
    (evo_rewrite.sdpa.sdpa_causal_if_unpadded) runs once per forward. Returns how many were merged."""
    first: dict[tuple, fx.Node] = {}
    merged = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not aten._to_copy.default or len(n.args) != 1 \
                or set(n.kwargs) != {"dtype"} or not any(u.target is SDPA for u in n.users):
            continue
        key = (n.args[0], n.kwargs["dtype"])
        if key in first:
            n.replace_all_uses_with(first[key])
            g.erase_node(n)
            merged += 1
        else:
            first[key] = n
    return merged


class _NotExpressible(Exception):
    pass


def _const(x):
    """A Python number for a scalar argument or a tensor node whose every element is one known constant, else None.

    Covers literals, ``torch.tensor(c)`` made in ``forward`` (a lifted constant), 0-d buffers and
    parameters, ``full``/``full_like``/``new_full``/``scalar_tensor``, through casts and detaches.
    """
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function":
        if x.target is aten.full.default:
            return _const(x.args[1])
        if x.target in (aten.full_like.default, aten.new_full.default, aten.fill.Scalar):
            return _const(x.args[1] if x.target is not aten.new_full.default else x.args[2])
        if x.target in (aten.scalar_tensor.default,):
            return float(x.args[0])
        if x.target in (aten.lift_fresh_copy.default, aten.detach.default, aten.detach_.default, *CASTS) and x.args:
            return _const(x.args[0])
    if isinstance(x, fx.Node) and x.op == "get_attr":
        owner = x.graph.owning_module
        t = owner
        for part in x.target.split("."):
            t = getattr(t, part)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.reshape(()))
    return None


_LAYOUT_OPS = {aten.unsqueeze.default, aten.squeeze.dim, aten.transpose.int, aten.permute.default, aten.expand.default,
               aten.slice.Tensor, aten.view.default, aten.reshape.default, aten._unsafe_view.default, *CASTS}


def _name(x) -> str:
    """How a reason names an operand: the op that computed it (``sigmoid``, not the views after it), or its kind."""
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _LAYOUT_OPS and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    if isinstance(x, fx.Node):
        t = x.target
        op = t.overloadpacket.__name__ if hasattr(t, "overloadpacket") else getattr(t, "__name__", str(t))
        return f"{op} ({x.name})" if x.op == "call_function" else f"{x.op} {x.target}"
    return repr(x)


class _Builder:
    """Translates a site's score chain into (scale, additive bias node) by inserting graph nodes."""

    def __init__(self, g: fx.Graph, site: AttentionSite, dtype: torch.dtype, softcap: bool = False):
        self.g, self.site, self.dtype = g, site, dtype
        self.scale, self.bias = 1.0, None
        # tanh capping: None, or c with scores = c·tanh(scale·QKᵀ / c) (+ bias); allowed when softcap is set
        self.allow_softcap, self.softcap = softcap, None
        self.shifted = False  # a constant was added (softmax ignores it, tanh does not)
        self.bias_rank = 0  # rank of the bias (its terms broadcast together)
        self.view_shape = None  # scores reshaped (B·H, Sq, Sk) -> (B, H, Sq, Sk) on the way (DeBERTa, Bloom)

    def start(self, prod: fx.Node) -> None:
        if prod.target is aten.baddbmm.default:  # beta * bias + alpha * (q @ kᵀ)
            beta, alpha = prod.kwargs.get("beta", 1), prod.kwargs.get("alpha", 1)
            self.scale = float(alpha)
            if beta != 0:
                bias = prod.args[0]
                self._add(bias if beta == 1 else self.g.call_function(aten.mul.Tensor, (bias, float(beta))), like=bias)

    def _full(self, bias: fx.Node, scores_val) -> fx.Node:
        """``bias`` expanded to the 3-D scores' shape, with sizes read from q and k — not from the scores
        themselves, so that the Q·Kᵀ product the fused call replaces does not stay alive for its shape."""
        vb = val(bias)
        if vb is not None and tuple(map(str, vb.shape)) == tuple(map(str, scores_val.shape)):
            return bias  # already full (DeBERTa's relative-position terms)
        s = self.site
        k_axis = s.k_perm[-2] if s.k_perm else -1 if s.k_transposed else -2
        sizes = []
        q_axis = s.q_perm[-2] if s.q_perm else -2
        for t, axis, d in ((s.q, 0, scores_val.shape[0]), (s.q, q_axis, scores_val.shape[1]), (s.k, k_axis, scores_val.shape[2])):
            sizes.append(d if isinstance(d, int) else self.g.call_function(aten.sym_size.int, (t, axis)))
        return self.g.call_function(aten.expand.default, (bias, sizes))

    def _add(self, term, like=None):
        """Add ``term`` to the bias; ``like``: a node of the term's rank where the term is new (has no shape)."""
        vt = val(like if like is not None else term)
        self.bias_rank = max(self.bias_rank, vt.dim() if vt is not None else 0)
        self.bias = term if self.bias is None else self.g.call_function(aten.add.Tensor, (self.bias, term))

    def _mask_term(self, cond, fill, negate=False):
        f = _const(fill)
        if f is None or not (f <= MASK_FLOOR or f == -math.inf):
            raise _NotExpressible(f"scores are replaced by {f:g}, which is not a mask fill (<= {MASK_FLOOR:g})"
                                  if f is not None else
                                  f"scores are replaced by a non-constant tensor, {_name(fill)} (not a mask)")
        given = cond
        if negate:
            cond = self.g.call_function(aten.logical_not.default, (cond,))
        zeros = self.g.call_function(aten.zeros_like.default, (cond,), {"dtype": self.dtype})
        self._add(self.g.call_function(aten.masked_fill.Scalar, (zeros, cond, f)), like=given)

    def step(self, n: fx.Node, prev: fx.Node) -> None:
        t = INPLACE.get(n.target, n.target)
        others = [a for a in n.args if a is not prev]
        if t in CASTS:
            return
        if t in RESHAPES:
            vp, vn = val(prev), val(n)
            if vp is not None and vn is not None and tuple(map(str, vp.shape)) == tuple(map(str, vn.shape)):
                return
            if self.view_shape is None and vp is not None and vn is not None and vp.dim() == 3 and vn.dim() == 4:
                self.view_shape = n.args[1]
                if self.bias is not None:  # bring the bias to the scores' full shape, then split the heads
                    self.bias = self.g.call_function(aten.reshape.default, (self._full(self.bias, vp), n.args[1]))
                    self.bias_rank = vn.dim()
                return
            raise _NotExpressible("scores are reshaped in a way SDPA cannot follow")
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            if n.args[0] is not prev and t in (aten.div.Tensor, aten.div.Scalar):
                raise _NotExpressible("scores are a divisor")
            c = _const(others[0]) if others else None
            if c is None:
                raise _NotExpressible(f"scores are scaled by a non-constant tensor, {_name(others[0] if others else prev)} "
                                      "(not a mask or bias)")
            c = c if t in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / c
            self.scale *= c
            if self.softcap is not None:  # d·c·tanh(s·x / c) = (d·c)·tanh((s·d)·x / (d·c))
                self.softcap *= c
            if self.bias is not None:
                self.bias = self.g.call_function(aten.mul.Tensor, (self.bias, c))
            return
        if t in (aten.add.Tensor, aten.sub.Tensor):
            alpha = n.kwargs.get("alpha", 1)
            other = others[0] if others else prev  # x + x
            if other is prev or alpha != 1:
                raise _NotExpressible("scores are added to themselves or with alpha")
            if t is aten.sub.Tensor and n.args[0] is not prev:
                raise _NotExpressible("scores are negated")
            if not isinstance(other, fx.Node):
                self.shifted = True
                return  # a constant shift: softmax ignores it
            if t is aten.sub.Tensor:
                self._add(self.g.call_function(aten.neg.default, (other,)), like=other)
                return
            self._add(other)
            return
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            self._mask_term(n.args[1], n.args[2])
            return
        if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf):
            cond, a, b = n.args[:3]
            if a is prev:
                self._mask_term(cond, b, negate=True)
            else:
                self._mask_term(cond, a)
            return
        if t is aten.tanh.default:
            if not self.allow_softcap:
                raise _NotExpressible("scores are soft-capped with tanh (Gemma2-style); SDPA cannot express it "
                                      "(flash(softcap=true) fuses it into evo_rewrite::softcap_attention)")
            if self.softcap is not None or self.bias is not None or self.shifted:
                raise _NotExpressible("scores are soft-capped with tanh after a bias or shift, or twice")
            self.softcap = 1.0  # tanh(s·x) = 1·tanh(s·x / 1); a following multiply sets the cap
            return
        raise _NotExpressible(f"score op {_name(n)} has no SDPA equivalent")


def _permute(g: fx.Graph, t: fx.Node, perm) -> tuple[fx.Node, list | None]:
    """``t`` permuted by ``perm`` (no node for the identity; the transposed input for a transpose of the
    last two axes) and the result's shape, or None where unknown."""
    vt = val(t)
    shape = list(vt.shape) if vt is not None else None
    if perm is None or list(perm) == list(range(len(perm))):
        return t, shape
    shape = [shape[i] for i in perm] if shape is not None and len(shape) == len(perm) else None
    rank = len(perm)
    if list(perm) == list(range(rank - 2)) + [rank - 1, rank - 2]:
        src = untranspose(t)
        if src is not None:
            return src, shape
        return g.call_function(aten.transpose.int, (t, -2, -1)), shape
    return g.call_function(aten.permute.default, (t, list(perm))), shape


@register_pass
@dataclasses.dataclass(frozen=True)
class Flash(Pass):
    """Fuse every attention subgraph into one scaled_dot_product_attention call."""

    name: ClassVar[str] = "flash"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "fuse matmul-softmax-matmul attention into scaled_dot_product_attention (is_causal, GQA-native)"
    causal: bool = True  # turn an input-independent, exactly causal mask into is_causal=True
    # SDPA backend to pin on CUDA: auto measures per site signature; default leaves the choice to PyTorch per call
    backend: Literal["auto", "default", "cudnn", "flash", "efficient"] = "auto"
    # shapes the program will see: fixed (prefill/training lengths repeat) or varying (a new length every call)
    regime: Literal["fixed", "varying"] = "fixed"
    # fuse tanh soft-capped sites (Gemma2) into evo_rewrite::softcap_attention (rewriter/ops.py): one node the
    # ONNX target lowers to Attention(softcap) / GroupQueryAttention(softcap); unfused arithmetic in PyTorch
    softcap: bool = False

    def run(self, program: Program) -> PassResult:
        g = program.graph
        skipped, fused, capped, causal_candidates, already = [], [], [], [], 0
        for r in find_attention(program.module):
            if r.site is None:
                skipped.append(Skip(r.reason, r.module, r.node.name))
                continue
            if r.site.fused:
                already += 1
                continue
            try:
                node, bias = self._rewrite(g, r.site, self.softcap)
            except _NotExpressible as e:
                skipped.append(Skip(str(e), r.module, r.node.name))
                continue
            if node.target is not SDPA:
                capped.append((r.site.module, node))
                continue
            fused.append((r.site.module, node))
            if self.causal and bias is not None and not r.site.cross:
                causal_candidates.append((node, bias))
        g.eliminate_dead_code()
        program.module.recompile()
        n_causal, padded = self._use_is_causal(program, causal_candidates)
        if _share_mask_casts(g):  # one cast of a shared mask, not one per site: one tensor for every layer
            program.module.recompile()
        notes = {"causal sites": n_causal} if fused else {}
        if padded:  # chosen per call on CUDA (see _choose_backends); on CPU the masked kernel serves them
            notes["causal when unpadded"] = len(padded)
        if fused:
            notes.update(self._choose_backends(program, fused, padded))
        if capped:
            notes["soft-capped sites"] = f"{len(capped)} as evo_rewrite::softcap_attention (unfused arithmetic in PyTorch)"
        if not fused and not capped:
            msg = ("no attention site can be fused" if skipped else
                   f"all {already} attention sites are already fused" if already else "no attention in the model")
            return PassResult(program, 0, skipped, message=msg)
        return PassResult(program, len(fused) + len(capped), skipped, notes)

    def _rewrite(self, g: fx.Graph, s: AttentionSite, softcap: bool = False):
        vq = val(s.q)
        dtype = vq.dtype if vq is not None else torch.float32
        dropout_p = 0.0
        for n in s.after:
            if n.target in DROPOUT and (n.args[2] if len(n.args) > 2 else n.kwargs.get("train", False)):
                dropout_p = float(n.args[1])
        gqa = False
        with g.inserting_before(s.output):
            b = _Builder(g, s, dtype, softcap=softcap)
            b.start(s.scores)
            prev = s.scores
            for n in s.chain:
                b.step(n, prev)
                prev = n
            # q, k, v in SDPA's (batch…, S, D) order, with their shapes
            q, q_shape = _permute(g, s.q, s.q_perm)
            if s.kv_repeat is not None:
                k_src, v_src, _ = s.kv_repeat
                k, k_shape = _permute(g, k_src, None if s.k_transposed else s.k_perm)
                v, v_shape = _permute(g, v_src, s.v_perm)
                gqa = True
            else:
                k, k_shape = _permute(g, s.k, s.k_perm)
                v, v_shape = _permute(g, s.v, s.v_perm)
            bias = b.bias
            if bias is not None and s.scores_perm is not None and list(s.scores_perm) != sorted(s.scores_perm):
                rank = len(s.scores_perm)  # the bias follows the scores' layout: bring it to SDPA's
                for _ in range(rank - b.bias_rank):
                    bias = g.call_function(aten.unsqueeze.default, (bias, 0))
                bias = g.call_function(aten.permute.default, (bias, list(s.scores_perm)))
            three_d = b.view_shape is None and q_shape is not None and len(q_shape) == 3
            if b.view_shape is not None:  # 3-D (B·H, S, D) operands, 4-D mask: split the heads for SDPA
                lead, (sq, sk) = list(b.view_shape[:2]), b.view_shape[2:4]
                dq, dv = int(q_shape[-1]), int(v_shape[-1])
                shapes = [lead + [sq, dq], lead + [sk, dq], lead + [sk, dv]]
                if any(sum(1 for x in sh if isinstance(x, int) and x == -1) > 1 for sh in shapes):
                    raise _NotExpressible("cannot tell the head split of 3-D scores")
                q, k, v = (g.call_function(aten.reshape.default, (t, sh)) for t, sh in zip((q, k, v), shapes))
                q_shape = k_shape = None
            elif three_d:  # (B·H, S, D): one head of (B·H, 1, S, D), the 4-D form every runtime takes
                q, k, v = (g.call_function(aten.unsqueeze.default, (t, 1)) for t in (q, k, v))
                if bias is not None and b.bias_rank == 3:
                    bias = g.call_function(aten.unsqueeze.default, (bias, 1))
                q_shape = k_shape = None
            if q_shape is not None and k_shape is not None and len(q_shape) == 4 and len(k_shape) == 4 and not gqa:
                hq, hk = q_shape[1], k_shape[1]
                if str(hq) != str(hk):
                    if isinstance(hk, int) and isinstance(hq, int) and hq % hk == 0:
                        gqa = True  # K/V broadcast over query heads (multi-query)
                    else:
                        raise _NotExpressible(f"K/V heads ({hk}) do not divide query heads ({hq})")
            if q_shape is not None and k_shape is not None and str(q_shape[0]) != str(k_shape[0]):
                raise _NotExpressible("K/V are broadcast over the batch")
            if bias is not None and getattr(bias.meta.get("val"), "dtype", None) != dtype:
                bias = g.call_function(aten._to_copy.default, (bias,), {"dtype": dtype})
            if b.softcap is not None:
                if b.softcap == 0 or dropout_p:
                    raise _NotExpressible("soft-capped scores " + ("with dropout" if dropout_p else "capped at 0"))
                from evo_rewrite.ops import SOFTCAP_ATTENTION

                node = g.call_function(SOFTCAP_ATTENTION, (q, k, v, bias, b.scale, abs(b.softcap), gqa))
            else:
                kwargs = {"scale": b.scale}
                if gqa:
                    kwargs["enable_gqa"] = True
                node = g.call_function(SDPA, (q, k, v, bias, dropout_p, False), kwargs)
            result = node
            if b.view_shape is not None:  # back to the (B·H, Sq, Dv) the model continues with
                result = g.call_function(aten.flatten.using_ints, (node, 0, 1))
            elif three_d:
                result = g.call_function(aten.squeeze.dim, (node, 1))
            if s.out_perm is not None and list(s.out_perm) != sorted(s.out_perm):  # the layout the product had
                result = g.call_function(aten.permute.default, (result, list(s.out_perm)))
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in s.softmax.meta:
                node.meta[key] = s.softmax.meta[key]
        if result is node:
            node.meta["val"] = s.output.meta.get("val")
        s.output.replace_all_uses_with(result)
        for n in [s.output, *reversed(s.after), s.softmax, *reversed(s.chain), s.scores]:
            for u in list(n.users):
                if u.op == "call_function" and u.target is aten._assert_tensor_metadata.default:
                    g.erase_node(u)
            if not n.users:
                g.erase_node(n)
        return node, bias

    def _choose_backends(self, program: Program, fused, padded: frozenset = frozenset()) -> dict:
        """Pin an SDPA backend per site on CUDA (measured for auto); report the backend per site.

        ``padded``: sites whose mask is causal AND a padding mask from an input (exactly causal on the example
        inputs): with ``auto`` they choose per call (evo_rewrite.sdpa.sdpa_causal_if_unpadded) — the causal
        kernel, which skips the upper triangle, for a batch without padding; the masked one otherwise."""
        from . import flash_backends as fb

        device = next((t.device for t in program.named_tensors().values()), torch.device("cpu"))
        if device.type != "cuda" or self.backend == "default":
            where = "CPU" if device.type != "cuda" else "CUDA"
            return {"backend": f"default (PyTorch's dispatcher per call, on {where})"}
        batch = next((t.shape[0] for t in program.inputs.flat() if isinstance(t, torch.Tensor) and t.dim()), 1)
        per_site, measured = {}, {}
        for module, node in fused:
            sig = fb.signature(node)
            if sig is None:
                per_site[module] = "default (3-D or dynamic heads: not pinned)"
                continue
            if self.backend == "auto" and node in padded:
                fb.pin(program.graph, node, CAUSAL_IF_UNPADDED)
                per_site[module] = CAUSAL_IF_UNPADDED
                continue
            if self.backend == "auto":
                choice = fb.choose(sig, device, int(batch), regime=self.regime)
                backend = choice.backend
                measured[str(sig)] = {"ms": choice.ms, "rejected": choice.rejected, "chosen": backend}
            else:
                backend = self.backend
                _, takes_mask = fb.PINNED[backend]
                if (sig.mask in ("key-padding", "full") and not takes_mask) or sig.gqa:
                    raise PassNotApplicable(f"flash(backend={backend}) cannot serve site {module}: "
                                            f"{'it has an attention mask' if not sig.gqa else 'it has grouped K/V heads'}; "
                                            "use backend=auto or backend=default")
            fb.pin(program.graph, node, backend)
            per_site[module] = backend
        program.module.recompile()
        counts = {}
        for b in per_site.values():
            counts[b.split(" ")[0]] = counts.get(b.split(" ")[0], 0) + 1
        return {"backend": ", ".join(f"{b}: {n} sites" for b, n in counts.items()), "backend_per_site": per_site,
                "backend_measurements": measured}

    def _use_is_causal(self, program: Program, candidates) -> tuple[int, frozenset]:
        """Replace masks that are exactly causal at two sizes (and depend on no input) by is_causal; return their
        count and the sites whose mask depends on an input (padding) and is exactly causal on an example input."""
        if not candidates:
            return 0, frozenset()
        second = program.second_inputs()
        checks = [program.inputs] + ([second] if second is not None else [])
        names = {b.name for _, b in candidates}
        try:
            values = [record(program.module, i, names) for i in checks]
        except Exception:  # noqa: BLE001 - fall back to the explicit mask
            return 0, frozenset()
        n, padded = 0, set()
        for node, bias in candidates:
            causal = [bias.name in vals and is_causal_mask(vals[bias.name]) for vals in values]
            if data_dependent(bias):  # exact either way (checked per call): worth choosing if causal on an example
                if any(causal):
                    padded.add(node)
                continue
            if all(causal):
                args = list(node.args)
                args[3], args[5] = None, True
                node.args = tuple(args)
                n += 1
        program.graph.eliminate_dead_code()
        program.module.recompile()
        return n, frozenset(padded)
