"""`checkpoint`: run chosen blocks under non-reentrant activation checkpointing (Chen et al. 2016).

pattern  the blocks of the program's layer stacks (``evo_rewrite.blocks.repeated_blocks``: same structure,
         same weight shapes), or the modules whose paths match ``modules`` globs (outermost match)
check    the chosen regions do not interleave; for ``budget``, the activation bytes a training step
         would hold (``checkpoint_memory.profile``, fake tensors at ``batch`` x ``seq``) fall to the budget
rewrite  the graph stays flat; its code generator runs each region through
         ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (``checkpoint_regions``), so every
         later pass still sees every node and ``forward`` recomputes the region during backward

Selection (one of):

* ``every=k``: blocks 0, k, 2k, ... of the layer stacks, in execution order (``every=1``, the default
  when nothing is given, wraps every block);
* ``modules=[glob, ...]``: module paths (``model.layers.*.mlp``, ``h.1``) matched with fnmatch;
* ``budget=SIZE`` (``3e9``, ``12GB``, ``1.5GiB``): the fewest blocks whose recomputation brings the
  estimated activation memory at ``batch`` x ``seq`` (default: the example inputs) to the budget;
  blocks are taken largest saving first, which is the fewest for savings that add up.

Policy (``policy=full`` by default): ``full`` recomputes a whole block in backward, keeping only its
inputs; ``selective`` (Korthikanti et al. 2022) keeps the outputs of the block's matmuls, attention and
fused loss and recomputes only the cheap element-wise and norm ops between them, so backward repeats no
matmul (``regions.SELECTIVE``, PyTorch's selective activation checkpointing). With a budget and
``policy=selective`` the pass chooses per block: blocks become selective (largest saving first) until
the budget is met; when every block selective is still too much, blocks turn to full recomputation,
largest further saving first — selective where it is enough, full only where the memory demands it.

The regions and their estimated savings go to the report and to ``program.annotations.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import ClassVar, Literal

from evo_rewrite.blocks import repeated_blocks
from evo_rewrite.errors import PassNotApplicable
from evo_rewrite.pass_infra import Pass, PassResult, Skip, module_paths, register_pass
from evo_rewrite.program import Program

from evo_rewrite.regions import POLICIES, find_regions, set_regions

from .checkpoint_memory import format_bytes, inputs_at, parse_bytes, profile


@register_pass
@dataclasses.dataclass(frozen=True)
class Checkpoint(Pass):
    """Recompute chosen blocks in backward instead of keeping their activations."""

    name: ClassVar[str] = "checkpoint"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = ("non-reentrant activation checkpointing of chosen blocks: every k-th block, "
                              "by module-path glob, or the fewest blocks that meet an activation-memory budget")
    every: int | None = None  # wrap blocks 0, k, 2k, ... (default 1 when no other selection is given)
    modules: tuple[str, ...] = ()  # fnmatch globs over module paths, e.g. [model.layers.*.mlp]
    budget: str | None = None  # activation memory to reach: bytes or a size with a unit (12GB, 1.5GiB)
    batch: int | None = None  # input size the budget and the estimates are for (default: example inputs)
    seq: int | None = None
    policy: Literal["full", "selective"] = "full"  # selective: keep matmul and attention outputs, recompute the rest

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        chosen = [k for k, v in (("every", self.every), ("modules", self.modules), ("budget", self.budget)) if v]
        if len(chosen) > 1:
            raise ValueError(f"give one of every, modules and budget, not {' and '.join(chosen)}")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every must be >= 1 (wrap every k-th block), got {self.every}")
        for opt in ("batch", "seq"):
            v = getattr(self, opt)
            if v is not None and v < 1:
                raise ValueError(f"{opt} must be >= 1, got {v}")
        if self.budget is not None:
            try:
                parse_bytes(self.budget)
            except ValueError as e:
                raise ValueError(f"budget={self.budget!r} is not a memory size ({e}); give bytes (3e9) or a size "
                                 "with a unit: 512MB, 12GB, 1.5GiB") from None

    def run(self, program: Program) -> PassResult:
        ann = program.annotations.checkpoint
        existing = ann.paths if ann else ()
        policies = dict(ann.policies) if ann else {}
        skipped: list[Skip] = []
        if self.modules:
            candidates = self._matching_modules(program)
        else:
            candidates = [b.path for g in repeated_blocks(program) for b in g.blocks]
            if not candidates:
                return PassResult(program, 0, message="no repeated blocks (a layer stack) to checkpoint; choose "
                                                      "regions by module path with modules=[...]")
        # a region inside a chosen block gives way to the block; a block inside a region stays as it is
        replaced = [e for e in existing if any(e.startswith(p + ".") for p in candidates)]
        existing = tuple(e for e in existing if e not in replaced)
        for p in candidates:
            if p in existing or any(p.startswith(e + ".") for e in existing):
                skipped.append(Skip("already inside a checkpoint region", p))
        candidates = [p for p in candidates if not any(s.module == p for s in skipped)]
        try:
            regions = find_regions(program.graph, list(existing) + candidates)
        except ValueError as e:
            raise PassNotApplicable(f"checkpoint: cannot wrap {', '.join(candidates)}: {e}") from None
        kept = [r for r in regions if r.path in existing]
        wanted = [r for r in regions if r.path not in existing]  # execution order
        try:
            inputs = inputs_at(program, self.batch, self.seq)
        except ValueError as e:
            raise PassNotApplicable(f"checkpoint: {e}") from None
        try:
            prof = profile(program, inputs)
        except Exception as e:  # noqa: BLE001 - fake tensors reject some data-dependent ops: no estimate then
            if self.budget:
                raise PassNotApplicable(f"checkpoint(budget=...): cannot estimate activation memory on "
                                        f"{inputs.describe()} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                        "choose blocks with every= or modules= instead") from None
            prof = None

        kept_sel = {r.path for r in kept if policies.get(r.path) == "selective"}
        if self.budget:
            chosen, selective, budget = self._meet_budget(prof, kept, kept_sel, wanted, inputs.describe())
        else:
            chosen = wanted if self.modules else wanted[::self.every or 1]
            selective, budget = {r.path for r in chosen} if self.policy == "selective" else set(), None
        if not chosen:
            msg = (f"the estimated activation memory {format_bytes(prof.bytes(kept, kept_sel))} on {inputs.describe()} "
                   f"is already within the budget {format_bytes(budget)}" if budget
                   else "every chosen block is already checkpointed")
            return PassResult(program, 0, skipped, message=msg)

        wrap = {r.path for r in kept + chosen}
        paths = tuple(r.path for r in regions if r.path in wrap)
        policies = {p: "selective" for p in paths if p in kept_sel | selective}
        notes, meta = self._describe(prof, kept, kept_sel, chosen, selective, len(wanted), budget, inputs.describe())
        if replaced:
            notes["replaced regions"] = f"{', '.join(replaced)} (inside blocks now checkpointed whole)"
        set_regions(program, paths, meta, policies)
        return PassResult(program, len(chosen), skipped, notes=notes)

    def _matching_modules(self, program: Program) -> list[str]:
        seen: dict[str, None] = {}
        for n in program.graph.nodes:
            if n.op not in ("placeholder", "get_attr", "output"):
                for p in module_paths(n):
                    if p and not p.startswith("_"):
                        seen.setdefault(p)
        matched: list[str] = []
        for p in seen:  # outermost first: a module's path appears before its children's
            if any(fnmatch.fnmatchcase(p, g) for g in self.modules) and not any(p.startswith(m + ".") for m in matched):
                matched.append(p)
        if not matched:
            sample = ", ".join(list(seen)[:6])
            raise PassNotApplicable(f"checkpoint: modules={list(self.modules)} matches no module of the program; "
                                    f"module paths look like: {sample}")
        return matched

    def _meet_budget(self, prof, kept, kept_sel, candidates, at: str):
        """(blocks to wrap, those of them selective, budget): the fewest blocks, and the fewest of them fully recomputed."""
        budget = parse_bytes(self.budget)
        sel = set(kept_sel)
        first = "selective" == self.policy
        base = prof.bytes(kept, sel)

        def cost(chosen, selective):
            return prof.bytes(kept + chosen, selective)

        one = {r.path: {r.path} if first else set() for r in candidates}
        saving = {r.path: base - cost([r], sel | one[r.path]) for r in candidates}
        order = sorted(candidates, key=lambda r: -saving[r.path])  # stable: execution order among equals
        chosen, selective = [], set(sel)
        while cost(chosen, selective) > budget and len(chosen) < len(order):
            r = order[len(chosen)]
            chosen.append(r)
            selective |= one[r.path]
        if first and cost(chosen, selective) > budget:  # every block selective is not enough: some recompute whole
            now = cost(chosen, selective)
            more = {r.path: now - cost(chosen, selective - {r.path}) for r in chosen}
            for r in sorted(chosen, key=lambda r: -more[r.path]):
                if cost(chosen, selective) <= budget:
                    break
                selective.discard(r.path)
        least = cost(chosen, selective)
        if least > budget:
            raise PassNotApplicable(
                f"checkpoint(budget={self.budget}): the budget {format_bytes(budget)} cannot be met on {at}: with all "
                f"{len(order)} blocks checkpointed the estimated activation memory is {format_bytes(least)} (what stays "
                "is the blocks' inputs and the activations outside them: embeddings, final norm, output head). "
                "Raise the budget or lower batch/seq.")
        return chosen, selective - set(kept_sel), budget

    def _describe(self, prof, kept, kept_sel, chosen, selective, n_candidates: int, budget, at: str):
        label = "blocks" if not self.modules else "matching modules"
        notes = {"regions": f"{', '.join(r.path for r in chosen)} ({len(chosen)} of {n_candidates} {label})"}
        if selective or kept_sel:
            full = [r.path for r in chosen if r.path not in selective]
            notes["policy"] = (f"selective: {len(selective)} regions" + (f"; full: {', '.join(full)}" if full else ""))
        meta: dict = {"regions": [r.path for r in chosen]}
        if prof is None:
            notes["activation memory"] = "no estimate (fake-tensor run failed)"
            return notes, meta
        sel = set(kept_sel) | set(selective)
        before, after = prof.bytes(kept, kept_sel), prof.bytes(kept + chosen, sel)
        per = {r.path: before - prof.bytes(kept + [r], set(kept_sel) | ({r.path} & sel)) for r in chosen}
        notes[f"activation memory (estimate, {at})"] = (f"{format_bytes(before)} -> {format_bytes(after)} "
                                                        f"({(after - before) / max(before, 1):+.0%})")
        notes["saved per region (estimate)"] = ", ".join(f"{p} {format_bytes(b)}" for p, b in per.items())
        if budget is not None:
            notes["budget"] = f"{format_bytes(budget)} requested, {format_bytes(after)} estimated"
        meta.update({"at": at, "estimate_bytes_before": before, "estimate_bytes_after": after,
                     "saved_bytes_per_region": per, "budget_bytes": budget})
        return notes, meta

