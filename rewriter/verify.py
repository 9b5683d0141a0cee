"""Numerical verification of a program against the program before a pass.

Exact passes must agree within the output dtype's tolerance; lossy passes report error metrics
(max abs / rel error, cosine, SQNR; for language-model logits top-1 agreement and KL divergence)
and fail only past the user's thresholds. When a check fails, ``first_divergence`` names the first
module (in execution order) whose output differs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .inputs import Inputs
from .pass_infra import module_paths
from .program import Program

__all__ = ["Thresholds", "AUTO_THRESHOLDS", "compare_outputs", "first_divergence", "record", "TOLERANCE", "tolerance"]

# normalized max error (max |a-b| / max |a|) an exact pass may show, by output dtype
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 6e-2}


# float32 with TF32 matmuls (torch.backends.cuda.matmul.allow_tf32, or float32 matmul precision "high"):
# a 10-bit mantissa, so two correct kernels differ by ~1e-3 relative on a 16-layer model
TF32_TOLERANCE = 5e-3


def tolerance(dtype) -> float:
    """The normalized max error an exact pass may show for outputs of ``dtype`` on this machine's settings."""
    if dtype == torch.float32 and torch.cuda.is_available() and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        return TF32_TOLERANCE
    return TOLERANCE.get(dtype, 1e-4)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Limits a lossy pass must meet (None: report only, never fail)."""

    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    max_kl: float | None = None

    def __post_init__(self):
        for name, flag in (("min_sqnr_db", "--min-sqnr"), ("min_cosine", "--min-cosine"), ("max_kl", "--max-kl")):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v)):
                raise ValueError(f"{name} ({flag}) must be a number, got {v!r}; NaN would switch the quality gate off")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must lie in [-1, 1], got {self.min_cosine}")
        if self.max_kl is not None and self.max_kl < 0:
            raise ValueError(f"max_kl must be >= 0, got {self.max_kl}")

    @property
    def given(self) -> bool:
        """Whether any limit is set."""
        return any(v is not None for v in (self.min_sqnr_db, self.min_cosine, self.max_kl))

    def describe(self) -> str:
        parts = ([f"SQNR >= {self.min_sqnr_db:g} dB"] if self.min_sqnr_db is not None else []) + (
            [f"cosine >= {self.min_cosine:g}"] if self.min_cosine is not None else []) + (
            [f"KL <= {self.max_kl:g}"] if self.max_kl is not None else [])
        return ", ".join(parts) or "no thresholds"


# what a pass that chooses its own strength (gqa kv_heads=auto) holds itself to when the user gave no threshold
AUTO_THRESHOLDS = Thresholds(min_cosine=0.99)


def _leaves(out) -> list[tuple[str, Any]]:
    flat, _ = pytree.tree_flatten_with_path(out)
    return [(pytree.keystr(p), v) for p, v in flat]


def _tensor_metrics(ref: torch.Tensor, new: torch.Tensor, is_logits: bool) -> dict[str, float]:
    a, b = ref.detach().double().flatten(), new.detach().double().flatten()
    m: dict[str, float] = {}
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)) and b.numel():
        m["nonfinite_mismatch"] = 1.0
    a, b = torch.where(finite, a, 0.0), torch.where(torch.isfinite(b), b, 0.0)
    diff = (a - b).abs()
    scale = float(a.abs().max()) if a.numel() else 0.0
    m["max_abs_error"] = float(diff.max()) if diff.numel() else 0.0
    m["max_rel_error"] = m["max_abs_error"] / max(scale, 1e-12)
    na, nb = float(a.norm()), float(b.norm())
    m["cosine"] = float(a @ b) / (na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    noise = float((a - b).norm())
    m["sqnr_db"] = math.inf if noise == 0 else (20 * math.log10(na / noise) if na > 0 else -math.inf)
    if is_logits and ref.dim() >= 2 and ref.shape[-1] > 1:
        r, n = ref.detach().float().reshape(-1, ref.shape[-1]), new.detach().float().reshape(-1, ref.shape[-1])
        m["top1_agreement"] = float((r.argmax(-1) == n.argmax(-1)).float().mean())
        lp, lq = torch.log_softmax(r, -1), torch.log_softmax(n, -1)
        m["kl"] = max(0.0, float((lp.exp() * (lp - lq)).sum(-1).mean()))  # >= 0 up to rounding
    return m


def compare_outputs(ref, new, vocab_sizes=frozenset()) -> tuple[dict[str, float], str | None, torch.dtype | None]:
    """Aggregate metrics over all output tensors (worst case of each).

    A floating output is scored as language-model logits (top-1 agreement, KL) when its key names
    logits or its last dimension is the vocabulary size of the program's token embedding.
    Returns (metrics, structural problem or None, the floating dtype of the outputs).
    """
    rl, nl = _leaves(ref), _leaves(new)
    if [k for k, _ in rl] != [k for k, _ in nl]:
        return {}, f"output structure changed: {[k for k, _ in rl]} -> {[k for k, _ in nl]}", None
    agg: dict[str, float] = {}
    worst = {"max_abs_error": max, "max_rel_error": max, "cosine": min, "sqnr_db": min,
             "top1_agreement": min, "kl": max, "nonfinite_mismatch": max}
    dtype = None
    for (key, a), (_, b) in zip(rl, nl):
        if not isinstance(a, torch.Tensor):
            if a != b:
                return {}, f"non-tensor output {key} changed: {a!r} -> {b!r}", None
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return {}, f"output {key} changed shape: {tuple(a.shape)} -> {tuple(getattr(b, 'shape', ()))}", None
        if not a.is_floating_point():
            if not torch.equal(a, b.to(a.dtype)):
                return {"max_abs_error": float((a.double() - b.double()).abs().max())}, f"integer output {key} differs", None
            continue
        dtype = a.dtype if dtype is None or TOLERANCE.get(a.dtype, 0) > TOLERANCE.get(dtype, 0) else dtype
        for k, v in _tensor_metrics(a, b, "logits" in key or (a.dim() >= 2 and a.shape[-1] in vocab_sizes)).items():
            agg[k] = worst[k](agg[k], v) if k in agg else v
    return agg, None, dtype


def check(metrics: dict[str, float], problem: str | None, dtype, exact: bool, thresholds: Thresholds) -> str | None:
    """The reason the comparison fails, or None when it passes."""
    if problem:
        return problem
    if metrics.get("nonfinite_mismatch"):
        return "outputs have NaN/inf where the program before the pass had finite values (or the reverse)"
    if exact:
        tol = tolerance(dtype)
        if metrics.get("max_rel_error", 0.0) > tol:
            return (f"exact pass changed the outputs: max relative error {metrics['max_rel_error']:.3g} "
                    f"> tolerance {tol:g} for {str(dtype).replace('torch.', '')}")
        return None
    t = thresholds
    if t.min_sqnr_db is not None and metrics.get("sqnr_db", math.inf) < t.min_sqnr_db:
        return f"SQNR {metrics['sqnr_db']:.1f} dB < --min-sqnr {t.min_sqnr_db:g}"
    if t.min_cosine is not None and metrics.get("cosine", 1.0) < t.min_cosine:
        return f"cosine {metrics['cosine']:.4f} < --min-cosine {t.min_cosine:g}"
    if t.max_kl is not None and metrics.get("kl", 0.0) > t.max_kl:
        return f"KL {metrics['kl']:.4g} > --max-kl {t.max_kl:g}"
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, Any] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _module_outputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Module path -> the last node traced inside it (that module's output, in graph order)."""
    last: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        for p in module_paths(n):
            if p:
                last[p] = n
    return last


def record(gm: fx.GraphModule, inputs: Inputs, wanted: set[str]) -> dict[str, Any]:
    flat = pytree.tree_leaves((inputs.args, inputs.kwargs))
    rec = _Recorder(gm, wanted)
    with torch.no_grad():
        rec.run(*flat, enable_io_processing=False)
    return rec.values


def first_divergence(before: Program, after: Program, inputs: Inputs, dtype=torch.float32) -> str | None:
    """The first module (by where its output is computed) whose output differs between the programs."""
    try:
        lb, la = _module_outputs(before.module), _module_outputs(after.module)
        common = [p for p in lb if p in la]
        vb = record(before.module, inputs, {lb[p].name for p in common})
        va = record(after.module, inputs, {la[p].name for p in common})
    except Exception:  # noqa: BLE001 - divergence is a diagnostic; never mask the real failure
        return None
    order = {n.name: i for i, n in enumerate(before.module.graph.nodes)}
    tol = tolerance(dtype)
    for p in sorted(common, key=lambda p: (order[lb[p].name], -p.count("."))):  # deepest first on ties
        a, b = vb.get(lb[p].name), va.get(la[p].name)
        if a is None or b is None or a.shape != b.shape or not a.is_floating_point():
            continue
        m = _tensor_metrics(a, b.to(a.dtype), False)
        if m["max_rel_error"] > tol or m.get("nonfinite_mismatch"):
            return p
    return None


# ---------------------------------------------------------------------------------------------------
# Precision-aware verification: a higher-precision shadow of the program
# ---------------------------------------------------------------------------------------------------

# an exact pass passes when, on every verification input, its error against the shadow is at most
# SHADOW_FACTOR x the error of the program before it against the same shadow, plus SHADOW_FLOOR[dtype]
# (normalized max error, max |a-b| / max |shadow|): a rewrite closer to the truth is never rolled back,
# one that adds more than a quarter of the rounding error already there (or more than the floor) is
SHADOW_FACTOR = 1.25
# fp32: 5e-5, half the fixed tolerance; fused fp32 Triton kernels (fuse with Liger on CUDA) add ~3e-5 on a
# 16-layer model against fp64, where the program before them is at ~1.6e-5
SHADOW_FLOOR = {torch.float32: 5e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the dtype the shadow runs in, by the program's weight dtype
SHADOW_DTYPE = {torch.float32: torch.float64, torch.bfloat16: torch.float32, torch.float16: torch.float32}


def program_float_dtype(program: Program) -> torch.dtype | None:
    """The floating dtype holding most of the program's weight elements (None: no floating weights)."""
    count: dict[torch.dtype, int] = {}
    for t in program.named_tensors().values():
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else None


def _upcast_arg(a, low, high):
    if isinstance(a, torch.dtype):
        return high if a == low else a
    if isinstance(a, (list, tuple)):
        return type(a)(_upcast_arg(x, low, high) for x in a)
    if isinstance(a, dict):
        return {k: _upcast_arg(v, low, high) for k, v in a.items()}
    return a


def shadow_program(program: Program, *, share_weights: bool = True) -> tuple[Program, torch.dtype, torch.dtype] | None:
    """A copy of ``program`` that computes in higher precision (fp32 -> fp64, bf16/fp16 -> fp32): floating
    inputs are upcast by the caller (:func:`upcast_inputs`) and every dtype the graph names that equals the
    program's dtype is replaced by the higher one. Returns (shadow, low dtype, high dtype), or None when no
    shadow applies (fp64 or non-floating programs). The original program is untouched.

    ``share_weights`` (the default): the shadow reads the program's own weight tensors and upcasts each where
    the graph reads it (an ``aten._to_copy`` after its ``get_attr``), so it holds no second copy of the weights:
    a run keeps one upcast weight alive at a time, and building the shadow of a 7B bf16 program costs no
    memory. ``share_weights=False`` binds upcast copies of the weights instead (a program whose weights are the
    higher dtype, e.g. to export it).
    """
    import copy as _copy

    from .program import copy_graph_module

    low = program_float_dtype(program)
    high = SHADOW_DTYPE.get(low)
    if high is None:
        return None
    gm = copy_graph_module(program.module)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.args = _upcast_arg(n.args, low, high)
            n.kwargs = _upcast_arg(n.kwargs, low, high)
    shadow = dataclasses.replace(program, module=gm, annotations=program.annotations.copy(),
                                 dynamic_dims=[dict(d) for d in program.dynamic_dims])

    def lower(t) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype in (low, torch.float16,
                                                                                    torch.bfloat16)

    done: set[str] = set()
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and share_weights:
            if lower(shadow.get_tensor(n.target)):
                # cast just before each reader, not after the get_attr: an exported graph reads all its weights
                # first, and casting them there would hold every upcast weight for the whole run
                for user in list(n.users):
                    with gm.graph.inserting_before(user):
                        up = gm.graph.call_function(torch.ops.aten._to_copy.default, (n,), {"dtype": high})
                    user.replace_input_with(n, up)
        elif n.op == "get_attr" and n.target not in done:
            done.add(n.target)
            t = shadow.get_tensor(n.target)
            if lower(t):
                shadow.set_tensor(n.target, t.detach().to(high), parameter=isinstance(t, torch.nn.Parameter))
        elif n.op == "call_module":
            *parents, leaf = n.target.split(".")
            mod = gm
            for p in parents:
                mod = getattr(mod, p)
            setattr(mod, leaf, _copy.deepcopy(getattr(mod, leaf)).to(high))
    gm.recompile()
    return shadow, low, high


def upcast_inputs(inputs: Inputs, low: torch.dtype, high: torch.dtype) -> Inputs:
    return inputs.map_tensors(lambda t: t.to(high) if t.is_floating_point() and t.dtype == low else t)


def shadow_error(shadow_out, out, vocab_sizes=frozenset()) -> float | None:
    """Normalized max error of ``out`` against the shadow's outputs (None: not comparable)."""
    m, problem, _ = compare_outputs(shadow_out, out, vocab_sizes)
    if problem or m.get("nonfinite_mismatch"):
        return None
    return m.get("max_rel_error", 0.0)


def check_against_shadow(new_errs: list[float], before_errs: list[float], dtype) -> str | None:
    """The reason an exact pass fails the shadow criterion (per input), or None."""
    floor = SHADOW_FLOOR.get(dtype, 1e-5)
    for i, (e_new, e_before) in enumerate(zip(new_errs, before_errs)):
        limit = SHADOW_FACTOR * e_before + floor
        if e_new > limit:
            return (f"exact pass changed the outputs: max relative error against the higher-precision shadow "
                    f"{e_new:.3g} > {SHADOW_FACTOR:g} x {e_before:.3g} (the program before it) + {floor:g} "
                    f"on verification input {i}")
    return None
