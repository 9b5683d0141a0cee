"""Calibrated fits for `share-layers`: input statistics, shared weights, residuals, rank budget, bias refit.

For a set of blocks sharing one matrix, block b computes ``W_b x + c_b`` on inputs x with mean μ_b and
covariance C_b (from calibration data). Tying replaces W_b by W̃_b = W_s + U_b V_b. The error that reaches
the block's output is (W_b − W̃_b)(x − μ_b) plus a constant (W_b − W̃_b) μ_b, which the block's own bias
absorbs exactly (``bias=fit``: c_b += (W_b − W̃_b) μ_b). What is left to minimise is, per block,

    ‖(W_b − W_s − U_b V_b) C_b^{1/2}‖_F²                        (activation-weighted error)

* ``init=fit``: W_s = Σ_b W_b C_b · (Σ_b C_b)⁻¹, the shared matrix of least activation-weighted error.
* ``residual=activation``: U_b V_b from the truncated SVD of (W_b − W_s) C_b^{1/2}, unwhitened by
  C_b^{-1/2} (the ASVD / SVD-LLM idea); exact at full rank like the plain SVD.
* With both, W_s and the residuals are refit in turn a few times (each step lowers the same error).
* A parameter budget (``rank=0.1``) is spent greedily on the rank-one terms, across every matrix of every
  block, with the largest error removed per parameter, the error taken relative to the block's own
  ‖W_b C_b^{1/2}‖² so that matrices of different scale compare.

Covariances are shrunk toward a multiple of the identity by d / (d + n) (d inputs, n tokens), so a few
tokens (the example inputs) give nearly the plain mean and plain SVD, and many tokens the fitted ones.
Without a bias to absorb the mean (Llama), the uncentered second moment is used instead of C_b.
Everything is closed-form in float64 on the CPU: no training.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from rewriter.inputs import Inputs
from rewriter.verify import record

__all__ = ["InputStats", "linear_uses", "collect_input_stats", "Problem", "Fit", "fit_sets", "ITERATIONS"]

aten = torch.ops.aten

ITERATIONS = 3  # alternating refits of W_s and the residuals (init=fit, residual=activation)


@dataclasses.dataclass
class InputStats:
    """Token count, sum and sum of outer products of the inputs a weight multiplies (float64)."""

    n: int
    total: torch.Tensor  # (in,)
    outer: torch.Tensor  # (in, in)

    def metric(self, centered: bool) -> torch.Tensor:
        """The shrunk covariance (centered) or second moment (in, in) that weights the error."""
        d = self.total.shape[0]
        mean = self.total / max(self.n, 1)
        m = self.outer / max(self.n, 1) - (torch.outer(mean, mean) if centered else 0)
        m = (m + m.t()) / 2
        scale = m.diagonal().mean().clamp_min(0)
        eye = torch.eye(d, dtype=m.dtype)
        if not scale > 0:
            return eye
        rho = d / (d + self.n)
        return (1 - rho) * m + rho * scale * eye

    @property
    def enough(self) -> bool:
        """Tokens enough to trust: a quarter of the inputs (on MiniLM, 32 tokens fitted worse than the plain
        mean, 128 tokens better for the 384-wide inputs)."""
        return 4 * self.n >= self.total.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.n, 1)


def linear_uses(graph: fx.Graph, target: str) -> list[fx.Node] | None:
    """The ``aten.linear`` nodes that read the weight at ``target``; None when any use is something else."""
    uses = [u for n in graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]
    ok = all(u.target is aten.linear.default and u.args[1].target == target
             and all(getattr(a, "target", None) != target for a in (u.args[:1] + u.args[2:])) for u in uses)
    return uses if uses and ok else None


def _token_mask(inputs: Inputs) -> torch.Tensor | None:
    mask = inputs.kwargs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def collect_input_stats(program, targets: list[str], calibration: list[Inputs]) -> dict[str, InputStats]:
    """InputStats of every weight in ``targets`` read only by aten.linear, over the calibration batches.

    Tokens where a 2-D ``attention_mask`` input is 0 (padding) are left out.
    """
    graph = program.graph
    x_of: dict[str, list[str]] = {}  # weight -> names of the nodes it multiplies
    for t in targets:
        uses = linear_uses(graph, t)
        if uses:
            x_of[t] = list(dict.fromkeys(u.args[0].name for u in uses))
    wanted = {x for xs in x_of.values() for x in xs}
    per_node: dict[str, InputStats] = {}
    for inputs in calibration:
        mask = _token_mask(inputs)
        vals = record(program.module, inputs, wanted)
        for name, v in vals.items():
            if mask is not None and tuple(v.shape[:2]) == tuple(mask.shape):
                x_ND = v[mask.to(v.device)]
            else:
                x_ND = v.reshape(-1, v.shape[-1])
            x_ND = x_ND.double()
            s = per_node.setdefault(name, InputStats(0, torch.zeros(0), torch.zeros(0)))
            total, outer = x_ND.sum(0).cpu(), (x_ND.t() @ x_ND).cpu()
            s.n += x_ND.shape[0]
            s.total = total if s.total.numel() == 0 else s.total + total
            s.outer = outer if s.outer.numel() == 0 else s.outer + outer
    out = {}
    for t, xs in x_of.items():
        parts = [per_node[x] for x in xs if x in per_node and per_node[x].n]
        if parts:
            out[t] = InputStats(sum(p.n for p in parts), sum(p.total for p in parts), sum(p.outer for p in parts))
    return out


# -- the fit ------------------------------------------------------------------------------------------

def _sqrt_and_inverse(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^{1/2}, M^{-1/2}) of a symmetric positive definite matrix."""
    e, u = torch.linalg.eigh(m)
    e = e.clamp_min(e.max() * 1e-12)
    return (u * e.sqrt()) @ u.t(), (u * e.rsqrt()) @ u.t()


def _weighted_mean(ws: list[torch.Tensor], ms: list[torch.Tensor]) -> torch.Tensor:
    """argmin_S Σ_b ‖(W_b − S) M_b^{1/2}‖² = Σ_b W_b M_b (Σ_b M_b)⁻¹."""
    total = sum(ms)
    return torch.linalg.solve(total, sum(w @ m for w, m in zip(ws, ms)).t()).t()  # M symmetric


def _truncated(d: torch.Tensor, rank: int, s, s_inv) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U (out, r), V (r, in)) minimising ‖(d − U V) s‖; s None: the plain SVD."""
    if rank <= 0 or not d.abs().max() > 0:
        return None
    u, sv, vh = torch.linalg.svd(d if s is None else d @ s, full_matrices=False)
    v = vh[:rank] if s is None else vh[:rank] @ s_inv
    return u[:, :rank] * sv[:rank], v


def _product(r: tuple[torch.Tensor, torch.Tensor] | None):
    return 0 if r is None else r[0] @ r[1]


@dataclasses.dataclass
class Fit:
    """One shared matrix of one set: the shared tensor, per block (U, V) or None, and per block bias shift."""

    shared: torch.Tensor
    residuals: list[tuple[torch.Tensor, torch.Tensor] | None]
    bias_shift: list[torch.Tensor | None]


@dataclasses.dataclass
class Problem:
    """The weights of one (set, name) and, per block, the statistics of its inputs (None: none recorded)."""

    weights: list[torch.Tensor]  # (out, in) float64, per block
    stats: list[InputStats | None]
    refit_bias: list[bool]  # per block: the block has its own bias for this weight

    def metrics(self, activation: bool) -> list[torch.Tensor | None]:
        if not activation or any(s is None or not s.enough for s in self.stats):
            return [None] * len(self.weights)
        return [s.metric(centered=r) for s, r in zip(self.stats, self.refit_bias)]


def _init(p: Problem, init: str, ms: list[torch.Tensor | None]) -> torch.Tensor:
    if init == "first":
        return p.weights[0]
    if init == "fit" and all(m is not None for m in ms):
        return _weighted_mean(p.weights, ms)
    return torch.stack(p.weights).mean(0)


def allocate(problems: list[Problem], shared: list[torch.Tensor], whiten: list[list], budget: int) -> list[list[int]]:
    """Ranks per (problem, block): greedy on error removed (relative to ‖W_b M_b^{1/2}‖²) per parameter."""
    gains = []  # (gain per parameter, problem, block, cost)
    for i, (p, s, wh) in enumerate(zip(problems, shared, whiten)):
        for b, (w, (sq, _)) in enumerate(zip(p.weights, wh)):
            d = w - s
            if not d.abs().max() > 0:
                continue
            sv2 = torch.linalg.svdvals(d if sq is None else d @ sq).pow(2)
            scale = (w if sq is None else w @ sq).pow(2).sum().clamp_min(1e-30)
            cost = sum(w.shape)
            gains += [(float(g) / float(scale) / cost, i, b, cost) for g in sv2]
    gains.sort(key=lambda g: -g[0])
    ranks = [[0] * len(p.weights) for p in problems]
    spent = 0
    for _, i, b, cost in gains:
        if spent + cost <= budget:
            ranks[i][b] += 1
            spent += cost
    return ranks


def fit_sets(problems: list[Problem], *, init: str, activation: bool, rank: int | float, budget: int,
             refit_bias: bool) -> list[Fit]:
    """Shared tensors, residuals (uniform ``rank``, or ranks from a parameter ``budget`` when rank is a
    fraction) and bias shifts for every (set, name) problem."""
    metrics = [p.metrics(activation or init == "fit") for p in problems]
    residual = activation and rank != 0
    whiten = [[_sqrt_and_inverse(m) if (m is not None and residual) else (None, None) for m in ms] for ms in metrics]
    shared = [_init(p, init, ms) for p, ms in zip(problems, metrics)]
    if isinstance(rank, float):
        ranks = allocate(problems, shared, whiten, budget)
    else:
        ranks = [[min(rank, *w.shape) for w in p.weights] for p in problems]
    fits = []
    for p, ms, wh, s, rs in zip(problems, metrics, whiten, shared, ranks):
        res = [_truncated(w - s, r, sq, si) for w, r, (sq, si) in zip(p.weights, rs, wh)]
        alternate = init == "fit" and activation and any(r is not None for r in res) and all(m is not None for m in ms)
        for _ in range(ITERATIONS if alternate else 0):
            s = _weighted_mean([w - _product(r) for w, r in zip(p.weights, res)], ms)
            res = [_truncated(w - s, r, sq, si) for w, r, (sq, si) in zip(p.weights, rs, wh)]
        shifts = []
        for w, r, st, own in zip(p.weights, res, p.stats, p.refit_bias):
            if refit_bias and own and st is not None and st.enough:
                shifts.append((w - s - _product(r)) @ st.mean)
            else:
                shifts.append(None)
        fits.append(Fit(s, res, shifts))
    return fits
