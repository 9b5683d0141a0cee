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
Everything is closed-form, in float64 on the weights' device: no training.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from evo_rewrite.inputs import Inputs
from evo_rewrite.verify import record

__all__ = ["InputStats", "linear_uses", "collect_input_stats", "Problem", "Fit", "fit_sets", "ITERATIONS"]

aten = torch.ops.aten

ITERATIONS = 3  # alternating refits of W_s and the residuals (init=fit, residual=activation)


@dataclasses.dataclass(eq=False)
class InputStats:
    """Token count, sum and sum of outer products of the inputs a weight multiplies (float64).

    Weights that multiply the same input (q, k and v) share one InputStats, so their covariance and its
    square root are computed once.
    """

    n: int
    total: torch.Tensor  # (in,)
    outer: torch.Tensor  # (in, in)
    _memo: dict = dataclasses.field(default_factory=dict, repr=False)

    def metric(self, centered: bool) -> torch.Tensor:
        """The shrunk covariance (centered) or second moment (in, in) that weights the error."""
        if ("metric", centered) not in self._memo:
            d = self.total.shape[0]
            m = self.outer / max(self.n, 1) - (torch.outer(self.mean, self.mean) if centered else 0)
            m = (m + m.t()) / 2
            scale = m.diagonal().mean().clamp_min(0)
            eye = torch.eye(d, dtype=m.dtype, device=m.device)
            rho = d / (d + self.n)
            self._memo["metric", centered] = (1 - rho) * m + rho * scale * eye if scale > 0 else eye
        return self._memo["metric", centered]

    def whitening(self, centered: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(M^{1/2}, M^{-1/2}) of ``metric(centered)``."""
        if ("whitening", centered) not in self._memo:
            e, u = torch.linalg.eigh(self.metric(centered))
            e = e.clamp_min(e.max() * 1e-12)
            self._memo["whitening", centered] = ((u * e.sqrt()) @ u.t(), (u * e.rsqrt()) @ u.t())
        return self._memo["whitening", centered]

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
            total, outer = x_ND.sum(0), x_ND.t() @ x_ND
            s.n += x_ND.shape[0]
            s.total = total if s.total.numel() == 0 else s.total + total
            s.outer = outer if s.outer.numel() == 0 else s.outer + outer
    out, merged = {}, {}
    for t, xs in x_of.items():
        parts = tuple(x for x in xs if x in per_node and per_node[x].n)
        if parts and parts not in merged:
            merged[parts] = per_node[parts[0]] if len(parts) == 1 else InputStats(
                sum(per_node[x].n for x in parts), sum(per_node[x].total for x in parts),
                sum(per_node[x].outer for x in parts))
        if parts:
            out[t] = merged[parts]
    return out


# -- the fit ------------------------------------------------------------------------------------------

Whitening = tuple  # (M^{1/2}, M^{-1/2}) or (None, None): the plain weight metric


def _weighted_mean(ws: list[torch.Tensor], ms: list[torch.Tensor]) -> torch.Tensor:
    """argmin_S Σ_b ‖(W_b − S) M_b^{1/2}‖² = Σ_b W_b M_b (Σ_b M_b)⁻¹ (M symmetric positive definite)."""
    factor = torch.linalg.cholesky(sum(ms))
    return torch.cholesky_solve(sum(w @ m for w, m in zip(ws, ms)).t(), factor).t()


def _svd(d: torch.Tensor, wh: Whitening, rank: int | None = None):
    """(U, S, Vᴴ) of the (whitened) difference: all of it, or the top ``rank`` by a randomized SVD."""
    a = d if wh[0] is None else d @ wh[0]
    if rank is not None and 4 * (rank + 8) < min(a.shape):
        u, sv, v = torch.svd_lowrank(a, q=rank + 8, niter=3)
        return u, sv, v.t()
    return torch.linalg.svd(a, full_matrices=False)


def _residual(svd, rank: int, wh: Whitening) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U (out, r), V (r, in)) minimising ‖(d − U V) M^{1/2}‖, from the SVD of d·M^{1/2}, unwhitened."""
    u, sv, vh = svd
    if rank <= 0 or not sv[:1].sum() > 0:
        return None
    v = vh[:rank] if wh[1] is None else vh[:rank] @ wh[1]
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

    @property
    def fitted(self) -> bool:
        """Every block has statistics of enough tokens (else: the plain mean and SVD for this matrix)."""
        return all(s is not None and s.enough for s in self.stats)

    def metrics(self) -> list[torch.Tensor]:
        return [s.metric(centered=r) for s, r in zip(self.stats, self.refit_bias)]

    def whitenings(self) -> list[Whitening]:
        return [s.whitening(centered=r) for s, r in zip(self.stats, self.refit_bias)]


def _init(p: Problem, init: str) -> torch.Tensor:
    if init == "first":
        return p.weights[0]
    if init == "fit" and p.fitted:
        return _weighted_mean(p.weights, p.metrics())
    return torch.stack(p.weights).mean(0)


def allocate(problems: list[Problem], svds: list[list], whiten: list[list[Whitening]], budget: int) -> list[list[int]]:
    """Ranks per (problem, block): greedy on error removed (relative to ‖W_b M_b^{1/2}‖²) per parameter."""
    gains = []  # (gain per parameter, problem, block, cost)
    for i, (p, svd_b, wh_b) in enumerate(zip(problems, svds, whiten)):
        for b, (w, svd, (sq, _)) in enumerate(zip(p.weights, svd_b, wh_b)):
            scale = float((w if sq is None else w @ sq).pow(2).sum().clamp_min(1e-30))
            cost = sum(w.shape)
            gains += [(float(g) / scale / cost, i, b, cost) for g in svd[1].pow(2)]
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
    plain = (None, None)
    whiten = [p.whitenings() if activation and rank != 0 and p.fitted else [plain] * len(p.weights) for p in problems]
    shared = [_init(p, init) for p in problems]
    svds = [[_svd(w - s, wh) for w, wh in zip(p.weights, whs)] if rank != 0 else None
            for p, s, whs in zip(problems, shared, whiten)]
    if isinstance(rank, float):
        ranks = allocate(problems, svds, whiten, budget)
    else:
        ranks = [[min(rank, *w.shape) for w in p.weights] for p in problems]
    fits = []
    for p, whs, s, svd_b, rs in zip(problems, whiten, shared, svds, ranks):
        res = [_residual(svd, r, wh) for svd, r, wh in zip(svd_b, rs, whs)] if svd_b else [None] * len(rs)
        partial = any(0 < r < min(w.shape) for w, r in zip(p.weights, rs))  # full rank is exact whatever W_s is
        if init == "fit" and activation and p.fitted and partial:
            for _ in range(ITERATIONS):  # W_s and the residuals in turn, each lowering the same error
                s = _weighted_mean([w - _product(r) for w, r in zip(p.weights, res)], p.metrics())
                res = [_residual(_svd(w - s, wh, r), r, wh) for w, r, wh in zip(p.weights, rs, whs)]
        shifts = [(w - s - _product(r)) @ st.mean if refit_bias and own and st is not None and st.enough else None
                  for w, r, st, own in zip(p.weights, res, p.stats, p.refit_bias)]
        fits.append(Fit(s, res, shifts))
    return fits
