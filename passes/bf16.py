"""`bf16`: bake autocast's bf16 mixed-precision policy into the graph as explicit casts.

pattern  every op of the graph, in order, classed as autocast's CUDA policy classes them
check    the graph has at least one matmul-class op (else there is nothing to gain)
rewrite  matmul-class ops (linear, matmul, mm, bmm, addmm, baddbmm, conv, SDPA) get bf16 inputs;
         softmax, log-softmax, norms, reductions, exp/log/pow/rsqrt and losses get fp32 inputs;
         ops with floating inputs of different precisions get their inputs cast to the widest one
         (autocast's promote policy, which also keeps the graph exportable to runtimes without
         implicit type promotion); every other op runs in the precision its inputs arrive in.
         Weights read only by bf16 ops (directly or through views) are stored as bf16 tensors,
         so no cast runs for them. keep_io=true casts floating outputs back to their old dtype.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import ClassVar

import torch
import torch.fx as fx

from evo_rewrite.pass_infra import Pass, PassResult, register_pass
from evo_rewrite.program import Program

aten = torch.ops.aten
BF16, FP32 = torch.bfloat16, torch.float32
CAST = aten._to_copy.default


def _ops(names: list[str]) -> frozenset:
    """The OpOverloads named ``packet.overload`` (or every overload of ``packet``) that exist here."""
    out = set()
    for name in names:
        packet, _, overload = name.partition(".")
        p = getattr(aten, packet, None)
        if p is None:
            continue
        for o in ([overload] if overload else p.overloads()):
            op = getattr(p, o, None)
            if op is not None:
                out.add(op)
    return frozenset(out)


# autocast's CUDA "lower precision" list (the ones that reach an ATen graph)
LOWER = _ops(["linear", "matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "addr", "mv", "dot",
              "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
              "conv_transpose3d", "conv_tbc", "prelu", "chain_matmul", "linalg_multi_dot",
              "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_native_multi_head_attention"])
# autocast's CUDA fp32 list, plus mean (a reduction) as the spec of this pass asks
FP32_OPS = _ops(["softmax", "_softmax", "log_softmax", "_log_softmax", "layer_norm", "native_layer_norm",
                 "rms_norm", "_fused_rms_norm", "group_norm", "native_group_norm", "batch_norm",
                 "native_batch_norm", "_native_batch_norm_legit_no_training", "instance_norm",
                 "sum", "mean", "prod", "cumsum", "cumprod", "var", "var_mean", "std", "std_mean", "norm",
                 "linalg_vector_norm", "frobenius_norm", "nuclear_norm", "logsumexp", "exp", "exp2", "expm1",
                 "log", "log2", "log10", "log1p", "pow", "rsqrt", "reciprocal", "softplus", "acos", "asin",
                 "cosh", "sinh", "tan", "erfinv", "cosine_similarity", "dist", "cdist", "pdist", "renorm",
                 "cross_entropy_loss", "nll_loss", "nll_loss_forward", "nll_loss2d", "nll_loss2d_forward",
                 "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "binary_cross_entropy",
                 "binary_cross_entropy_with_logits", "poisson_nll_loss", "cosine_embedding_loss",
                 "hinge_embedding_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
                 "triplet_margin_loss", "multi_margin_loss"])
# shape-only ops a weight may pass through on its way to a matmul (x @ W.t())
VIEWS = _ops(["t", "transpose", "permute", "view", "reshape", "_unsafe_view", "expand", "slice", "select",
              "unsqueeze", "squeeze", "contiguous", "flatten", "unflatten", "split", "chunk", "narrow",
              "detach", "alias", "clone"])
# ops whose output dtype the model states explicitly (x.to(...), x.float()); they are left as they are
EXPLICIT = _ops(["_to_copy", "to", "_to_dim_order_copy", "type_as"])
# ops that read tensors without computing floats from them (asserts, size queries)
NON_COMPUTE = _ops(["_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset"])


def _eligible(dt) -> bool:
    """Autocast casts floating tensors other than float64."""
    return isinstance(dt, torch.dtype) and dt.is_floating_point and dt is not torch.float64


def _rank(dt: torch.dtype) -> int:
    return {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}.get(dt, 0)


@register_pass
@dataclasses.dataclass(frozen=True)
class Bf16(Pass):
    """Run matmul-class ops in bf16 and precision-sensitive ops in fp32, with explicit casts."""

    name: ClassVar[str] = "bf16"
    exact: ClassVar[bool] = False
    summary: ClassVar[str] = ("autocast's bf16 policy as explicit casts: matmuls in bf16, softmax/norms/reductions/"
                              "exp/log/losses in fp32, mixed inputs promoted; bf16-only weights stored in bf16")
    weight_dtype: ClassVar[str | None] = "bfloat16"
    keep_io: bool = True  # cast floating outputs back to their dtype before the pass (signature unchanged)

    def __post_init__(self):
        if not isinstance(self.keep_io, bool):
            raise ValueError(f"keep_io must be true or false, got {self.keep_io!r}")

    def run(self, program: Program) -> PassResult:
        g = program.graph
        nodes = list(g.nodes)
        n_lower = sum(1 for n in nodes if n.op == "call_function" and n.target in LOWER)
        if n_lower == 0:
            return PassResult(program, 0, message="no matmul-class op (linear, matmul, bmm, conv, attention) to run in bf16")

        olds = {n: _old_dtype(program, n) for n in nodes}
        # weights read only by bf16 ops (through views at most) are stored in bf16
        by_target: dict[str, list[fx.Node]] = {}
        for n in nodes:
            if n.op == "get_attr":
                by_target.setdefault(n.target, []).append(n)
        bf16_weights, weight_bytes = [], 0
        for target, getters in by_target.items():
            t = program.get_tensor(target)
            if not isinstance(t, torch.Tensor) or t.dtype is not FP32:
                continue
            if all(users and all(_feeds_only_bf16(u, n) for u in users)
                   for n in getters for users in [list(n.users)]):
                program.set_tensor(target, t.detach().to(BF16))
                bf16_weights.append(target)
                weight_bytes += t.numel() * 2

        dtype: dict[fx.Node, torch.dtype | None] = {}
        casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        counts = {"bf16 (matmul-class)": 0, "fp32 (forced)": 0, "promoted": 0, "bf16 (inherited)": 0,
                  "fp32 (inherited)": 0}
        n_casts = 0

        def cast(x: fx.Node, dt: torch.dtype, before: fx.Node) -> fx.Node:
            nonlocal n_casts
            key = (x, dt)
            if key not in casts:
                with g.inserting_before(before):
                    c = g.call_function(CAST, (x,), {"dtype": dt})
                old = x.meta.get("val")
                if isinstance(old, torch.Tensor):
                    try:
                        c.meta["val"] = old.to(dt)
                    except Exception:  # noqa: BLE001 - metadata is refreshed by the manager anyway
                        pass
                for k in ("nn_module_stack", "stack_trace"):
                    if k in before.meta:
                        c.meta[k] = before.meta[k]
                casts[key] = c
                dtype[c] = dt
                n_casts += 1
            return casts[key]

        def float_inputs(n: fx.Node) -> list[fx.Node]:
            out = []
            for a in n.all_input_nodes:
                if _eligible(dtype.get(a)) and a not in out:
                    out.append(a)
            return out

        def recast(n: fx.Node, want) -> None:
            """Replace the floating tensor inputs of n whose dtype is not want(input) by casts."""
            mapping = {}
            for a in float_inputs(n):
                dt = want(a)
                if dt is not None and dtype[a] is not dt:
                    mapping[a] = cast(a, dt, n)
            if mapping:
                n.args = fx.map_arg(n.args, lambda a: mapping.get(a, a))
                n.kwargs = fx.map_arg(n.kwargs, lambda a: mapping.get(a, a))

        for n in nodes:
            old = olds[n]
            if n.op == "placeholder":
                dtype[n] = old
                continue
            if n.op == "get_attr":
                t = program.get_tensor(n.target)
                dtype[n] = t.dtype if isinstance(t, torch.Tensor) else None
                continue
            if n.op == "output":
                if self.keep_io:
                    def back(a):
                        if isinstance(a, fx.Node) and _eligible(dtype.get(a)) and _eligible(olds.get(a)) \
                                and dtype[a] is not olds[a]:
                            return cast(a, olds[a], n)
                        return a
                    n.args = fx.map_arg(n.args, back)
                continue
            if n.op != "call_function":
                dtype[n] = old
                continue
            t = n.target
            if t is operator.getitem:
                src = n.args[0]
                src_old, src_new = olds.get(src), dtype.get(src)
                if _eligible(old) and src_new is not None and src_old is old:
                    dtype[n] = src_new  # split/chunk outputs follow their input
                else:
                    dtype[n] = old  # e.g. native_layer_norm's fp32 statistics
                continue
            if t in NON_COMPUTE:
                if t is aten._assert_tensor_metadata.default and n.kwargs.get("dtype") is not None:
                    src = n.args[0]
                    if isinstance(src, fx.Node) and dtype.get(src) is not None and dtype[src] is not olds.get(src):
                        n.kwargs = {**n.kwargs, "dtype": dtype[src]}  # the asserted tensor changed precision
                dtype[n] = old
                continue
            if t in LOWER:
                recast(n, lambda a: BF16)
                dtype[n] = BF16 if _eligible(old) else old
                counts["bf16 (matmul-class)"] += 1
                continue
            if t in FP32_OPS:
                recast(n, lambda a: FP32)
                dtype[n] = FP32 if _eligible(old) and n.kwargs.get("dtype") is None else old
                counts["fp32 (forced)"] += 1
                continue
            if t in EXPLICIT:
                if t is CAST and n.kwargs.get("dtype") is None:
                    dtype[n] = dtype.get(n.args[0], old)  # a device copy keeps its input's dtype
                elif t is aten.type_as.default or t is getattr(aten.to, "other", None):
                    dtype[n] = dtype.get(n.args[1], old)
                else:
                    dtype[n] = old
                continue
            ins = float_inputs(n)
            if not _eligible(old) or not ins or n.kwargs.get("dtype") is not None:
                dtype[n] = old  # integer/bool results, or floats made from no float input (arange, full)
                continue
            big = [a for a in ins if _ndim(a) != 0] or ins  # 0-dim tensors do not widen tensors (type promotion)
            widest = max((dtype[a] for a in big), key=_rank)
            if any(dtype[a] is not widest for a in ins):
                recast(n, lambda a: widest)
                counts["promoted"] += 1
            dtype[n] = widest
            counts["bf16 (inherited)" if widest is BF16 else "fp32 (inherited)"] += 1

        g.lint()
        program.module.recompile()
        notes = {
            "ops per precision": ", ".join(f"{k}: {v}" for k, v in counts.items()),
            "casts inserted": n_casts,
            "weights stored in bf16": f"{len(bf16_weights)} tensors, {weight_bytes:,} bytes "
                                      f"(saves {weight_bytes:,} bytes against fp32)",
            "io": "floating outputs cast back to their dtype" if self.keep_io else "outputs left in their computed dtype",
        }
        notes["bf16 weight names"] = bf16_weights  # JSON report only (a list)
        return PassResult(program, counts["bf16 (matmul-class)"], notes=notes)


def _old_dtype(program: Program, n) -> torch.dtype | None:
    if not isinstance(n, fx.Node):
        return None
    if n.op == "get_attr":
        t = program.get_tensor(n.target)
        return t.dtype if isinstance(t, torch.Tensor) else None
    v = n.meta.get("val")
    return v.dtype if isinstance(v, torch.Tensor) else None


def _ndim(n: fx.Node):
    v = n.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else None


def _feeds_only_bf16(user: fx.Node, via: fx.Node) -> bool:
    """True when every use of ``via`` through ``user`` ends in a bf16 (matmul-class) op."""
    if user.op != "call_function":
        return False
    if user.target in LOWER:
        return True
    if user.target in VIEWS or user.target is operator.getitem:
        if user.target is not operator.getitem and user.args and user.args[0] is not via:
            return False
        users = list(user.users)
        return bool(users) and all(_feeds_only_bf16(u, user) for u in users)
    return False
