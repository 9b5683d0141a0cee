"""`share-layers`: ALBERT cross-layer parameter sharing, applied to a trained model.

pattern  the repeated blocks of evo_rewrite.blocks (same structure, same parameter shapes), partitioned
         by ``strategy``: ``all`` (one set for the whole group), ``every`` (runs of k consecutive
         blocks), ``cycle`` (block i uses set i mod k; Takase & Kiyono 2021)
check    a partition needs two blocks; ``what=attention`` needs an attention site in the block
rewrite  the get_attr nodes of the partition's blocks read one shared tensor per name
         (``shared_layers.<container>.<set>.<name>``); the per-block tensors are dropped. The shared
         matrix is the group mean (``init=mean``), the first block's (``init=first``) or the one of least
         activation-weighted error (``init=fit``). ``rank`` keeps a per-block residual U·V (Bae et al.
         2024): ``linear(x, W)`` becomes ``linear(x, W_shared) + linear(linear(x, V), U)``, any other use
         reads ``W_shared + U @ V``; exact when the rank reaches the matrix's smaller dimension.
         ``residual=activation`` fits U·V to the block's inputs (ASVD), ``residual=svd`` to the weights.
         ``bias=fit`` moves each block's own bias by the mean error the tying leaves.

``auto`` (the default of init, residual and bias) is fit / activation / fit when the program carries
calibration inputs (``--calibration``, ``rewrite(calibration=...)``), and mean / svd / keep without: the
example inputs (random token ids, a few dozen tokens) fitted worse than the plain mean on MiniLM. Asked
for explicitly, the fits use the example inputs. The fits are in passes/share_layers_fit.py. ``rank`` is
a rank per matrix (an int) or a parameter budget (a float in (0, 1]: the residual parameters as a
fraction of the shared blocks' parameters), spent where it removes most activation-weighted error.

What is shared: matrices (tensors of two or more dimensions). Vectors (norm weights, biases) stay
per block unless ``vectors=share``: they cost ~0.2% of a block's parameters and keep each block's
scale and offset, which plain sharing would otherwise average away. Buffers are never shared.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from evo_rewrite.attention import attention_sites
from evo_rewrite.blocks import Block, BlockGroup, repeated_blocks
from evo_rewrite.pass_infra import Pass, PassResult, Skip, register_pass
from evo_rewrite.program import Program

from .share_layers_fit import Fit, Problem, collect_input_stats, fit_sets, linear_uses

aten = torch.ops.aten

SHARED_ROOT = "shared_layers"


def partition(n: int, strategy: str, k: int) -> list[list[int]]:
    """Positions 0..n-1 of a group's blocks, split into the sets that share weights."""
    if strategy == "all":
        return [list(range(n))]
    if strategy == "every":
        return [list(range(s, min(s + k, n))) for s in range(0, n, k)]
    return [[p for p in range(n) if p % k == j] for j in range(min(k, n))]  # cycle


def drop_attr(gm: torch.nn.Module, target: str) -> None:
    """Remove the tensor at a module path (a parameter or buffer) from the module tree."""
    *parents, leaf = target.split(".")
    mod = gm
    for p in parents:
        mod = getattr(mod, p)
    mod._parameters.pop(leaf, None)
    mod._buffers.pop(leaf, None)
    if hasattr(mod, leaf):
        delattr(mod, leaf)


def _attention_children(program: Program, block: Block) -> set[str]:
    """The block's direct children that hold an attention site ("attn", "attention", "self_attn")."""
    out = set()
    for s in attention_sites(program.module):
        if s.module.startswith(block.path + "."):
            out.add(s.module[len(block.path) + 1:].split(".")[0])
    return out


@dataclasses.dataclass(frozen=True)
class _Set:
    container: str
    index: int  # the set's number within its group
    blocks: tuple[Block, ...]
    names: tuple[str, ...]  # relative names of the tensors shared

    def describe(self) -> str:
        return f"{self.container}.[{','.join(str(b.index) for b in self.blocks)}]"


@register_pass
@dataclasses.dataclass(frozen=True)
class ShareLayers(Pass):
    """Make repeated blocks use one set of weights (ALBERT); optionally keep a low-rank residual per block."""

    name: ClassVar[str] = "share-layers"
    exact: ClassVar[bool] = False
    summary: ClassVar[str] = ("tie the weights of repeated blocks (all, every-k, cycle), fitted to calibration inputs; "
                              "optional low-rank residual per block")
    strategy: Literal["all", "every", "cycle"] = "all"
    k: int = 2
    what: Literal["block", "attention", "ffn"] = "block"
    init: Literal["auto", "fit", "mean", "first"] = "auto"
    rank: int | float = 0
    residual: Literal["auto", "activation", "svd"] = "auto"
    bias: Literal["auto", "fit", "keep"] = "auto"
    vectors: Literal["keep", "share"] = "keep"

    def accepts(self) -> frozenset[str]:
        return frozenset({"calibration"})

    def __post_init__(self):
        if self.strategy in ("every", "cycle") and self.k < (2 if self.strategy == "every" else 1):
            raise ValueError(f"k must be >= {2 if self.strategy == 'every' else 1} for strategy={self.strategy}, got {self.k}")
        if isinstance(self.rank, float) and not 0 < self.rank <= 1:
            raise ValueError(f"rank as a fraction of the blocks' parameters must lie in (0, 1], got {self.rank}")
        if isinstance(self.rank, int) and self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0: no per-layer residual), got {self.rank}")

    def run(self, program: Program) -> PassResult:
        groups = repeated_blocks(program)
        if not groups:
            return PassResult(program, 0, message="no repeated blocks (no two blocks with the same structure and parameter shapes)")
        skipped: list[Skip] = []
        sets: list[_Set] = []
        for group in groups:
            names = self._names(program, group)
            if isinstance(names, str):
                skipped.append(Skip(names, group.describe()))
                continue
            for j, positions in enumerate(partition(len(group.blocks), self.strategy, self.k)):
                if len(positions) < 2:
                    skipped.append(Skip(f"no other block to share with (strategy={self.strategy}, k={self.k})",
                                        group.blocks[positions[0]].path))
                    continue
                sets.append(_Set(group.container, j, tuple(group.blocks[p] for p in positions), tuple(names)))
        if not sets:
            return PassResult(program, 0, skipped, message="no set of two or more blocks to share")
        init, residual, bias = self._resolved(program, sets)
        notes = {"shared sets": ", ".join(s.describe() for s in sets),
                 "shared tensors": sum(len(s.names) for s in sets), "what": self.what, "init": init}
        notes.update(self._share(program, sets, init, residual, bias))
        program.graph.eliminate_dead_code()
        program.graph.lint()
        program.module.recompile()
        return PassResult(program, sum(len(s.blocks) for s in sets), skipped, notes)

    # -- what is shared -----------------------------------------------------------------------

    def _names(self, program: Program, group: BlockGroup) -> list[str] | str:
        first = group.blocks[0]
        names = []
        for n in group.names:
            t = program.get_tensor(first.target(n))
            if isinstance(t, torch.nn.Parameter) and t.is_floating_point() and (t.dim() >= 2 or self.vectors == "share"):
                names.append(n)
        if self.what != "block":
            attn = _attention_children(program, first)
            if not attn:
                return f"no attention found in {first.path}, so what={self.what} has nothing to separate"
            in_attn = [n for n in names if n.split(".")[0] in attn]
            names = in_attn if self.what == "attention" else [n for n in names if n not in in_attn]
        return names or f"no {'matrices' if self.vectors == 'keep' else 'parameters'} to share for what={self.what}"

    # -- fit ------------------------------------------------------------------------------------

    def _resolved(self, program: Program, sets: list[_Set]) -> tuple[str, str, str]:
        """init, residual, bias with ``auto`` decided: fitted with calibration data, plain without (the
        example inputs -- random token ids, a few dozen tokens -- fitted worse than the plain mean, measured).
        Without a residual, sets of three or more blocks take the mean (with the bias refit): one matrix of
        least activation-weighted error for many layers fitted worse than their mean on MiniLM."""
        calibrated = program.annotations.calibration is not None
        fit_init = calibrated and (self.rank != 0 or max(len(s.blocks) for s in sets) == 2)
        return ((self.init if self.init != "auto" else "fit" if fit_init else "mean"),
                (self.residual if self.residual != "auto" else "activation" if calibrated else "svd"),
                (self.bias if self.bias != "auto" else "fit" if calibrated else "keep"))

    def _own_bias(self, program: Program, s: _Set, block: Block, name: str) -> str | None:
        """The get_attr target of the block's own (unshared) bias added to ``linear(x, W)``, if any."""
        uses = linear_uses(program.graph, block.target(name))
        biases = {u.args[2].target if len(u.args) > 2 and isinstance(u.args[2], fx.Node) and u.args[2].op == "get_attr"
                  else None for u in uses or ()}
        if len(biases) != 1 or None in biases:
            return None
        (b,) = biases
        return b if b.startswith(block.path + ".") and b[len(block.path) + 1:] not in s.names else None

    def _share(self, program: Program, sets: list[_Set], init: str, residual: str, bias: str) -> dict:
        """Fit and rewrite every set; return the notes on how."""
        notes: dict = {"residual": residual if self.rank else "none", "bias": bias}
        fitted, biases = self._fit(program, sets, init, residual, bias, notes)
        attr_nodes: dict[str, list[fx.Node]] = {}
        for node in program.graph.nodes:
            if node.op == "get_attr":
                attr_nodes.setdefault(node.target, []).append(node)
        added, ranks, moved = 0, [], 0
        for s in sets:
            for name in s.names:
                fit = fitted.get((s, name))
                olds = [program.get_tensor(b.target(name)).detach() for b in s.blocks]
                if fit is None:  # a vector (vectors=share)
                    shared = olds[0] if init == "first" else torch.stack(olds).mean(0)
                    fit = Fit(shared, [None] * len(olds), [None] * len(olds))
                else:
                    ranks += [0 if r is None else r[0].shape[1] for r in fit.residuals]
                shared_node = self._bind_shared(program, attr_nodes, s, name, fit.shared.to(olds[0]))
                for b, old, res, shift in zip(s.blocks, olds, fit.residuals, fit.bias_shift):
                    if res is not None:
                        res = (res[0].to(old).contiguous(), res[1].to(old).contiguous())
                        added += self._add_residual(program, b.target(name), attr_nodes[b.target(name)], shared_node, res)
                    if shift is not None:
                        c = program.get_tensor(biases[b.target(name)]).detach()
                        program.set_tensor(biases[b.target(name)], (c.double() + shift).to(c), parameter=True)
                        moved += 1
                    for node in attr_nodes[b.target(name)]:
                        node.replace_all_uses_with(shared_node)
                        program.graph.erase_node(node)
                    drop_attr(program.module, b.target(name))
        if self.rank:
            notes["residual rank"] = (f"{min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})"
                                      if isinstance(self.rank, float) else self.rank)
            notes["residual parameters"] = added
        if bias == "fit":
            notes["biases refit"] = moved
        return notes

    def _fit(self, program: Program, sets: list[_Set], init: str, residual: str, bias: str, notes: dict):
        """({(set, name): Fit} for every shared matrix, {weight: its block's own bias or None}); notes the
        calibration used."""
        matrices = [(s, n) for s in sets for n in s.names if program.get_tensor(s.blocks[0].target(n)).dim() == 2]
        biases = {b.target(n): self._own_bias(program, s, b, n) if bias == "fit" else None
                  for s, n in matrices for b in s.blocks}
        stats = {}
        if init == "fit" or (self.rank and residual == "activation") or bias == "fit":
            cal = program.annotations.calibration
            calibration = list(cal.batches) if cal else [program.inputs]
            stats = collect_input_stats(program, list(biases), calibration)
            notes["calibration"] = cal.note if cal else "the example inputs"
            notes["calibration tokens"] = max((st.n for st in stats.values()), default=0)
            missing = sum(w not in stats for w in biases)
            thin = sum(not st.enough for st in stats.values())
            if missing:
                notes["matrices without input statistics (not read by aten.linear): plain mean / SVD"] = missing
            if thin:
                notes["matrices with too few calibration tokens (< inputs / 4): plain mean / SVD"] = thin
        problems = [Problem([program.get_tensor(b.target(n)).detach().double() for b in s.blocks],
                            [stats.get(b.target(n)) for b in s.blocks],
                            [biases[b.target(n)] is not None for b in s.blocks])
                    for s, n in matrices]
        budget = 0
        if isinstance(self.rank, float):
            block_params = sum(t.numel() for s in sets for b in s.blocks for t in _block_parameters(program, b))
            budget = int(self.rank * block_params)
            notes["residual budget"] = f"{self.rank:g} x {block_params:,} block parameters = {budget:,}"
        fits = fit_sets(problems, init=init, activation=residual == "activation", rank=self.rank, budget=budget,
                        refit_bias=bias == "fit")
        return dict(zip(matrices, fits)), biases

    # -- rewrite --------------------------------------------------------------------------------

    @staticmethod
    def _bind_shared(program: Program, attr_nodes, s: _Set, name: str, shared: torch.Tensor) -> fx.Node:
        target = f"{SHARED_ROOT}.{s.container}.{s.index}.{name}"
        program.set_tensor(target, shared, parameter=True)
        with program.graph.inserting_before(attr_nodes[s.blocks[0].target(name)][0]):
            return program.graph.get_attr(target)

    def _add_residual(self, program: Program, old_target: str, nodes: list[fx.Node], shared_node: fx.Node,
                      residual: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Make every use of ``nodes`` (the block's old weight) see W_shared + U @ V."""
        graph = program.graph
        u_t, v_t = f"{old_target}_res_u", f"{old_target}_res_v"
        program.set_tensor(u_t, residual[0], parameter=True)  # (out, r)
        program.set_tensor(v_t, residual[1], parameter=True)  # (r, in)
        for node, user in [(node, user) for node in nodes for user in list(node.users)]:
            with graph.inserting_before(user):
                u, v = graph.get_attr(u_t), graph.get_attr(v_t)
            if user.target is aten.linear.default and user.args[1] is node and node not in (user.args[:1] + user.args[2:]):
                x = user.args[0]
                with graph.inserting_after(user):
                    xv = graph.call_function(aten.linear.default, (x, v))  # (…, r)
                with graph.inserting_after(xv):
                    xvu = graph.call_function(aten.linear.default, (xv, u))  # (…, out)
                with graph.inserting_after(xvu):
                    out = graph.call_function(aten.add.Tensor, (user, xvu))
                user.replace_all_uses_with(out, delete_user_cb=lambda n: n is not out)
                new_nodes = (xv, xvu, out)
            else:
                with graph.inserting_before(user):
                    uv = graph.call_function(aten.mm.default, (u, v))  # (out, in)
                    w = graph.call_function(aten.add.Tensor, (shared_node, uv))
                user.replace_input_with(node, w)
                new_nodes = (uv, w)
            for n in new_nodes + (u, v):
                if "nn_module_stack" in user.meta:
                    n.meta["nn_module_stack"] = dict(user.meta["nn_module_stack"])
        return residual[0].numel() + residual[1].numel()


def _block_parameters(program: Program, block: Block) -> list[torch.Tensor]:
    return [t for n in block.names if isinstance(t := program.get_tensor(block.target(n)), torch.nn.Parameter)]
