"""Calibrated K/V head merging for `gqa(method=fit)`: principal subspace per group + refit of Q and O.

Mean-pooling throws away whatever the heads of a group do not share. Here, per group of old K/V
heads and from calibration activations X (inputs of the projections; a ones column carries biases):

* V: the shared value v' spans the top principal subspace of the group's values [v_o]_o, each
  weighted by how much the output projection amplifies it (Σ over the query heads h using o of
  W_o,h W_o,hᵀ). Each old value is then mapped from the new one by least squares, v_o ≈ v'·A_o,
  and A_o is absorbed into the output-projection block of every query head that used o.
* K: the same with keys weighted by their queries' covariance, and A_o absorbed into the query
  projection (q' = A_o q), so q'·k' ≈ q·k_o. With rotary embedding, K and Q dimensions come in
  pairs (i, i + D/2) that rotate together; merging then works per pair with complex coefficients
  (which commute with the rotation), so the result stays exact under rotary at every position.

Everything is closed-form (SVDs and least squares on D×D or g×g systems): no training.
"""

from __future__ import annotations

import torch

from evo_rewrite.annotations import Calibration
from evo_rewrite.projections import Projection, output_projection, trace_projection
from evo_rewrite.verify import record

__all__ = ["fit_merges"]


def _x_node(proj: Projection):
    n = proj.node
    return n.args[1] if n.target is torch.ops.aten.addmm.default else n.args[0]


def _rows(program, proj: Projection) -> torch.Tensor:
    """(features, in + 1) augmented weight rows of a projection slice (bias as the last column)."""
    w = program.get_tensor(proj.weight).detach().double().cpu()
    rows = w[proj.start:proj.stop] if proj.layout == "out_in" else w[:, proj.start:proj.stop].t()
    b = program.get_tensor(proj.bias).detach().double().cpu()[proj.start:proj.stop] if proj.bias else torch.zeros(rows.shape[0], dtype=torch.float64)
    return torch.cat([rows, b[:, None]], 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    e, u = torch.linalg.eigh((m + m.t()) / 2)
    return u @ torch.diag(e.clamp_min(0).sqrt()) @ u.t()


def _merge_real(blocks, weights, d):
    """Shared basis M (g·d × d) and maps A_o (d × d) with block_o ≈ shared·A_o.

    blocks: [T × d] activations of the old heads; weights: [d × d] importance square roots.
    Returns (M, [A_o]) where the new head's activation is concat(blocks) @ M.
    """
    cat = torch.cat([b @ w for b, w in zip(blocks, weights)], 1)  # T × g·d, importance-weighted
    _, _, vh = torch.linalg.svd(cat, full_matrices=False)
    top = vh[:d].t()  # g·d × d
    m = torch.block_diag(*weights) @ top
    shared = torch.cat(blocks, 1) @ m  # T × d
    gram = shared.t() @ shared + 1e-8 * torch.eye(d, dtype=shared.dtype) * shared.pow(2).mean()
    maps = [torch.linalg.solve(gram, shared.t() @ b) for b in blocks]
    return m, maps


def _merge_rotary(blocks, energy, d):
    """Per rotary pair (i, i + d/2): complex combination of the old heads, complex maps back.

    Returns (M, [A_o]) in the same real form as _merge_real (A_o acting on a d-vector commutes
    with the rotation because it is a complex scalar per pair).
    """
    g, half = len(blocks), d // 2
    m = torch.zeros(g * d, d, dtype=blocks[0].dtype)
    maps = [torch.zeros(d, d, dtype=blocks[0].dtype) for _ in range(g)]
    for p in range(half):
        z = torch.stack([torch.complex(b[:, p], b[:, p + half]) for b in blocks], 1)  # T × g
        w = torch.stack([e[p].clamp_min(1e-12).sqrt() for e in energy]).to(z.dtype)
        _, _, vh = torch.linalg.svd(z * w, full_matrices=False)
        c = w * vh[0].conj()  # g coefficients: z' = z @ c
        zp = z @ c
        denom = (zp.conj() * zp).real.sum().clamp_min(1e-12)
        for o in range(g):
            a = (zp.conj() * z[:, o]).sum() / denom  # z_o ≈ a · z'
            # real form of z' = Σ_o c_o z_o on the (p, p + half) coordinates
            cr, ci = c[o].real, c[o].imag
            m[o * d + p, p], m[o * d + half + p, p] = cr, -ci
            m[o * d + p, half + p], m[o * d + half + p, half + p] = ci, cr
            ar, ai = a.real, a.imag
            maps[o][p, p], maps[o][p, half + p] = ar, ai
            maps[o][half + p, p], maps[o][half + p, half + p] = -ai, ar
    return m, maps


def fit_merges(program, plans, kv_heads: int, calibration: Calibration | None = None) -> dict:
    """New augmented rows for every K/V (and the matching Q and O blocks), per (site, role).

    Returns {(module, "k"|"v"): (rows (N·d × in), bias or None), (module, "q"): ..., (module, "o"): ...}.
    """
    batches = list(calibration.batches) if calibration is not None else [program.inputs]
    # the query and output projections of each site, traced once
    qo = {id(plan): (trace_projection(plan.site.q), output_projection(plan.site)) for plan in plans}
    want = {}
    for plan in plans:
        for path in (plan.k_path, plan.v_path):
            want[_x_node(path.projection).name] = None
        qp = qo[id(plan)][0]
        if not isinstance(qp, str):
            want[_x_node(qp.projection).name] = None
    acts: dict[str, list[torch.Tensor]] = {k: [] for k in want}
    for inputs in batches:
        vals = record(program.module, inputs, set(want))
        for k, v in vals.items():
            acts[k].append(v.detach().cpu().reshape(-1, v.shape[-1]))  # kept in the program's dtype until its site's fit
        del vals
    x = {k: torch.cat(v) for k, v in acts.items() if v}
    del acts
    out = {}
    uses: dict[str, int] = {}
    for plan in plans:  # a weight shared by several sites (ALBERT) cannot take per-site fits
        qp, op = qo[id(plan)]
        targets = {plan.k_path.projection.weight, plan.v_path.projection.weight}
        targets |= {qp.projection.weight} if not isinstance(qp, str) else set()
        targets |= {op.weight} if op is not None else set()
        for t in targets:
            uses[t] = uses.get(t, 0) + 1
    for plan in plans:
        qp, op = qo[id(plan)]
        if isinstance(qp, str) or op is None or any(uses.get(t, 0) > 1 for t in
                                                     (plan.k_path.projection.weight, qp.projection.weight, op.weight)):
            continue
        res = _fit_site(program, plan, kv_heads, x, qp, op)
        if res is not None:
            out.update(res)
    return out


def _fit_site(program, plan, n_new: int, x, qpath, oproj) -> dict | None:
    s = plan.site
    if qpath.head_split is None:
        return None
    d, dv, hq, hkv = plan.head_dim, plan.v_head_dim, plan.heads, plan.kv_heads
    g, q_per_kv = hkv // n_new, hq // hkv
    xk, xv, xq = (x.get(_x_node(p.projection).name) for p in (plan.k_path, plan.v_path, qpath))
    if xk is None or xv is None or xq is None:
        return None
    # the fit runs on the CPU in float64, one site at a time: only this layer's weights and activations are upcast
    xk, xv, xq = (torch.cat([t.double(), torch.ones(t.shape[0], 1, dtype=torch.float64)], 1) for t in (xk, xv, xq))
    wk, wv, wq = _rows(program, plan.k_path.projection), _rows(program, plan.v_path.projection), _rows(program, qpath.projection)
    wo_full = program.get_tensor(oproj.weight).detach().double().cpu()
    wo = wo_full if oproj.layout == "out_in" else wo_full.t()  # (hidden, H·dv): block h = columns
    keys = (xk @ wk.t()).reshape(-1, hkv, d)  # T × Hkv × d (before rotary)
    vals = (xv @ wv.t()).reshape(-1, hkv, dv)
    qs = (xq @ wq.t()).reshape(-1, hq, d)
    rotary = plan.k_path.rotary and d % 2 == 0
    new_k, new_v, new_q, new_o = [], [], wq.clone(), wo.clone()
    for j in range(n_new):
        olds = list(range(j * g, (j + 1) * g))
        kblocks = [keys[:, o] for o in olds]
        vblocks = [vals[:, o] for o in olds]
        users = {o: list(range(o * q_per_kv, (o + 1) * q_per_kv)) for o in olds}
        if rotary:
            energy = []
            for o in olds:
                qq = torch.cat([qs[:, h] for h in users[o]])
                energy.append(qq[:, : d // 2].pow(2).mean(0) + qq[:, d // 2:].pow(2).mean(0))
            mk, ak = _merge_rotary(kblocks, energy, d)
        else:
            kw = [_sqrt_psd(sum(qs[:, h].t() @ qs[:, h] for h in users[o]) / qs.shape[0]) for o in olds]
            mk, ak = _merge_real(kblocks, kw, d)
        vw = [_sqrt_psd(sum(wo[:, h * dv:(h + 1) * dv].t() @ wo[:, h * dv:(h + 1) * dv] for h in users[o])) for o in olds]
        mv, av = _merge_real(vblocks, vw, dv)
        wk_g = torch.cat([wk[o * d:(o + 1) * d] for o in olds])  # g·d × (in+1)
        wv_g = torch.cat([wv[o * dv:(o + 1) * dv] for o in olds])
        new_k.append(mk.t() @ wk_g)
        new_v.append(mv.t() @ wv_g)
        for i, o in enumerate(olds):
            for h in users[o]:
                # q' = A q (row form q' = q Aᵀ) and o-block' = A o-block
                new_q[h * d:(h + 1) * d] = ak[i] @ wq[h * d:(h + 1) * d]
                new_o[:, h * dv:(h + 1) * dv] = wo[:, h * dv:(h + 1) * dv] @ av[i].t()
    # back to each weight's stored dtype now, so a model's fitted layers never sit in float64 together
    def stored(t: torch.Tensor, like: str) -> torch.Tensor:
        return t.to(program.get_tensor(like).dtype)

    k_rows, v_rows = stored(torch.cat(new_k), plan.k_path.projection.weight), stored(torch.cat(new_v), plan.v_path.projection.weight)
    res = {
        (s.module, "k"): (k_rows[:, :-1], k_rows[:, -1] if plan.k_path.projection.bias else None),
        (s.module, "v"): (v_rows[:, :-1], v_rows[:, -1] if plan.v_path.projection.bias else None),
        (s.module, "q"): (qpath.projection, stored(new_q, qpath.projection.weight)),
        (s.module, "o"): (oproj, stored(new_o, oproj.weight)),
    }
    return res
