"""`heal`: a short distillation of the rewritten program toward the program before the lossy passes.

The GQA paper uptrains its mean-pooled checkpoints and Relaxed Recursive Transformers uptrain after
tying layers: training-free conversions of trained models lose too much to be used as they are. The
best teacher is the original model, which the pass manager keeps: ``program.annotations.reference``
is the program before the first lossy pass of the pipeline.

pattern  the tensors the lossy passes replaced (by identity: passes build new tensors, never change
         them in place) -- grouped K/V and refitted Q/O projections, shared weights and residuals;
         ``train=all``: every parameter
check    there is a reference and something differs from it; the data (``--heal-data``) fits the
         model's inputs; trained tensors are fp32 (put ``bf16`` after ``heal``)
rewrite  the same graph with new values of those tensors: AdamW on the distillation loss between
         student and teacher outputs on the user's unlabeled text -- KL(teacher || student) of the
         next-token distributions for language models, the normalised squared error of the final
         hidden states otherwise -- plus, with ``layers=w``, w times the normalised error of every
         repeated block's output. bf16 autocast on CUDA (``precision=auto``). A held-back part of the
         data (``holdout``) is scored before and after: KL, top-1 agreement and perplexity against the
         teacher's for language models, token and mean-pooled cosine otherwise.

Structure and parameter count stay as they were: the healed program exports like any other. The
tensors it trains are fresh copies, so the reference (and the user's model, which capture shares
tensors with) is never modified.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from typing import ClassVar, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from evo_rewrite.decoder import PAST, empty_past
from evo_rewrite.errors import PassNotApplicable
from evo_rewrite.inputs import Inputs
from evo_rewrite.pass_infra import Pass, PassResult, Placement, option_error, register_pass
from evo_rewrite.program import Program, copy_graph_module
from evo_rewrite.verify import _module_outputs

__all__ = ["Heal"]


@register_pass
@dataclasses.dataclass(frozen=True)
class Heal(Pass):
    """Distil toward the program before the lossy passes on --heal-data (KL for LMs, hidden-state error otherwise)."""

    name: ClassVar[str] = "heal"
    exact: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"heal_data", "reference"})
    placement: ClassVar[Placement] = Placement(after_lossy=True, not_after=("bf16",))
    summary: ClassVar[str] = ("distil the rewritten model toward the program before the lossy passes on --heal-data "
                              "(trains only what they changed)")

    steps: int = 300
    lr: float = 2e-4
    batch: int = 8
    seq_len: int = 256
    train: Literal["changed", "all"] = "changed"
    layers: float = 0.0  # weight of per-block hidden-state matching; 0: final outputs only
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    holdout: float = 0.1
    warmup: float = 0.05  # fraction of the steps with a linear learning-rate warm-up
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise option_error(self.name, "steps", self.steps, "an integer >= 1")
        if not self.lr > 0:
            raise option_error(self.name, "lr", self.lr, "a learning rate > 0")
        if self.batch < 1:
            raise option_error(self.name, "batch", self.batch, "an integer >= 1")
        if self.seq_len < 4:
            raise option_error(self.name, "seq_len", self.seq_len, "an integer >= 4 (tokens per sequence)")
        if not 0 < self.holdout < 1:
            raise option_error(self.name, "holdout", self.holdout, "a fraction in (0, 1) of the data held back")
        if self.layers < 0:
            raise option_error(self.name, "layers", self.layers, "a weight >= 0")
        if not 0 <= self.warmup < 1:
            raise option_error(self.name, "warmup", self.warmup, "a fraction in [0, 1)")

    def run(self, program: Program) -> PassResult:
        data = program.annotations.heal_data
        if data is None:
            raise PassNotApplicable("heal needs unlabeled data to distil on: give --heal-data FILE|DIR (text or token "
                                    "ids) on the command line, or rewrite(..., heal_data=...) in Python")
        reference: Program | None = program.annotations.reference
        if reference is None:
            return PassResult(program, 0, message="no lossy pass ran before heal: nothing to heal (put heal after "
                                                  "gqa, share-layers or factorize-embeddings)")
        names = self._trainable(program, reference)
        if not names:
            return PassResult(program, 0, message="no tensor differs from the program before the lossy passes: "
                                                  "nothing to heal (use train=all to fine-tune every weight)")
        low = [n for n in names if program.get_tensor(n).dtype != torch.float32]
        if low:
            raise PassNotApplicable(f"heal trains fp32 tensors, but {low[0]} is {program.get_tensor(low[0]).dtype} "
                                    "(a precision pass ran before heal); put bf16 after heal in the pipeline")
        device = next(iter(program.named_tensors().values())).device
        log = logging.getLogger("evo_rewrite").info
        torch.manual_seed(self.seed)
        train, held = data.split(program, batch=self.batch, seq_len=self.seq_len, holdout=self.holdout,
                                 seed=self.seed, device=device)
        for n in names:  # fresh copies: the reference and the user's model keep their tensors
            program.set_tensor(n, program.get_tensor(n).detach().clone(), parameter=True)
        params = [program.get_tensor(n) for n in names]
        blocks = self._block_outputs(reference, program) if self.layers > 0 else []
        teacher = _Flat(reference, [t for t, _ in blocks], trainable=())
        student = _Flat(program, [s for _, s in blocks], trainable=set(names))
        kind, main = _main_output(reference, teacher, held[0])
        bf16 = self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")
        autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

        before = _evaluate(teacher, student, held, kind, main)
        log(f"      heal: {len(names)} tensors ({sum(p.numel() for p in params):,} parameters), {len(train)} "
            f"training / {len(held)} held-back batches, {'bf16' if bf16 else 'fp32'} on {device}")
        opt = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.95), weight_decay=0.0)
        warm = max(1, round(self.warmup * self.steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / self.steps)))))
        rng = random.Random(self.seed)
        order: list[int] = []
        curve, tokens, t0, fallback = [], 0, time.perf_counter(), ""
        every = max(1, self.steps // 10)
        for step in range(self.steps):
            if not order:
                order = list(range(len(train)))
                rng.shuffle(order)
            b = train[order.pop()]
            mask = _mask(b)
            opt.zero_grad(set_to_none=True)
            try:
                loss = self._loss_backward(teacher, student, b, mask, kind, main, len(blocks), autocast)
            except RuntimeError as exc:
                if not (bf16 and step == 0):
                    raise
                # some graphs hold ops whose kernels reject autocast's mixed dtypes (seen on torch 2.11
                # with SmolLM2: "Tensor dtype mismatch"): train in fp32 rather than not at all
                if self.precision == "bf16":
                    raise PassNotApplicable(f"heal(precision=bf16): the graph does not train under bf16 autocast "
                                            f"({str(exc).splitlines()[0]}); use precision=fp32") from None
                bf16, autocast["enabled"] = False, False
                fallback = f"bf16 autocast failed ({str(exc).splitlines()[0][:120]}); trained in fp32"
                log(f"      heal: {fallback}")
                opt.zero_grad(set_to_none=True)
                loss = self._loss_backward(teacher, student, b, mask, kind, main, len(blocks), autocast)
            if not torch.isfinite(loss):
                raise PassNotApplicable(f"heal diverged at step {step + 1} (loss {float(loss)}); lower lr (now {self.lr:g})")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            tokens += int(mask.sum()) if mask is not None else int(b.flat()[0].numel())
            if step % every == 0 or step == self.steps - 1:
                curve.append((step + 1, loss.item()))
                log(f"      heal step {step + 1}/{self.steps}: loss {curve[-1][1]:.4g}")
        for p in params:
            p.grad = None
        seconds = time.perf_counter() - t0
        after = _evaluate(teacher, student, held, kind, main)
        notes = {
            "trained": f"{len(names)} tensors, {sum(p.numel() for p in params):,} parameters ({self.train})",
            "data": f"{data.description}; {len(train)} training and {len(held)} held-back batches of <= {self.batch}",
            "steps": f"{self.steps} steps, {tokens:,} tokens, {seconds:.1f} s on {device} ({'bf16' if bf16 else 'fp32'})",
            "loss": f"{curve[0][1]:.4g} -> {curve[-1][1]:.4g} ({'KL' if kind == 'lm' else 'normalised error'}"
                    f"{' + block outputs' if blocks else ''})",
            "held back": f"before {_describe(before)}; after {_describe(after)}",
            **({"precision": fallback} if fallback else {}),
            "heal": {"trained_tensors": names, "tokens": tokens, "seconds": seconds, "device": str(device),
                     "precision": "bf16" if bf16 else "fp32", "curve": curve, "held_back_before": before,
                     "held_back_after": after, "objective": kind},
        }
        return PassResult(program, len(names), notes=notes)

    def _loss_backward(self, teacher, student, b, mask, kind, main, n_blocks, autocast) -> torch.Tensor:
        """The distillation loss of one batch, back-propagated."""
        with torch.no_grad(), torch.autocast(**autocast):
            t_out = teacher(b)
        with torch.autocast(**autocast):
            s_out = student(b)
        loss = _loss(s_out[main], t_out[main], mask, kind)
        for i in range(n_blocks):
            loss = loss + self.layers / n_blocks * _loss(s_out[-n_blocks + i], t_out[-n_blocks + i], mask, "hidden")
        loss.backward()
        return loss.detach()

    def _trainable(self, program: Program, reference: Program) -> list[str]:
        ref = reference.named_tensors()
        params = dict(program.module.named_parameters())
        out = []
        for name, t in program.named_tensors().items():
            if not t.is_floating_point():
                continue
            if self.train == "all" and name in params:
                out.append(name)
            elif ref.get(name) is not t and name in params:
                out.append(name)
        return out

    @staticmethod
    def _block_outputs(reference: Program, program: Program) -> list[tuple[str, str]]:
        """(teacher node, student node) names of each repeated block's output, in both programs."""
        from evo_rewrite.blocks import repeated_blocks

        lt, ls = _module_outputs(reference.module), _module_outputs(program.module)
        pairs = []
        for g in repeated_blocks(reference):
            for blk in g.blocks:
                if blk.path in lt and blk.path in ls:
                    pairs.append((lt[blk.path].name, ls[blk.path].name))
        if not pairs:
            raise PassNotApplicable("heal(layers=...): the model has no repeated blocks whose outputs could be matched; "
                                    "use layers=0")
        return pairs


class _Flat:
    """A training copy of a program's graph module: flat inputs, flat outputs (+ chosen inner nodes).

    Shares the tensors of the program; those not in ``trainable`` are bound as detached buffers, so no
    gradient reaches them (nor the user's model, which may own them).
    """

    def __init__(self, program: Program, extra: list[str], trainable):
        gm = copy_graph_module(program.module)
        g = gm.graph
        by_name = {n.name: n for n in g.nodes}
        out = next(n for n in g.nodes if n.op == "output")
        self.n_main = len(pytree.tree_leaves(out.args[0]))
        g._codegen = fx.graph.CodeGen()
        out.args = (tuple(pytree.tree_leaves(out.args[0]) + [by_name[e] for e in extra]),)
        gm.recompile()
        holder = Program(gm, program.inputs, program.source)
        for name, t in program.named_tensors().items():
            if name not in trainable:
                holder.set_tensor(name, t.detach(), parameter=False)
        self.module = gm
        self.layout = program.annotations.kv_cache

    def __call__(self, inputs):
        past = inputs.kwargs.get(PAST) if self.layout is not None else None
        if past and all(v.shape[2] == 0 for v in past.values()):  # a prefill: the empty past in this program's
            ids = inputs.kwargs["input_ids"]  # own cache layout (the teacher may keep more K/V heads)
            inputs = Inputs(inputs.args, {**inputs.kwargs, PAST: empty_past(self.layout, ids.shape[0], 0,
                                                                             device=ids.device)})
        return self.module(*pytree.tree_leaves((inputs.args, inputs.kwargs)))


def _main_output(program: Program, flat: _Flat, inputs) -> tuple[str, int]:
    """("lm" | "hidden", index of the output to distil on among the flat outputs).

    Runs the training copy, not the program's own module: torch 2.11 attaches export's input check to
    the captured module, which can reject the batch sizes heal uses.
    """
    with torch.no_grad():
        values = flat(inputs)[:flat.n_main]
    spec = getattr(program.module, "_out_spec", None)
    keys = ([pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(list(values), spec))[0]]
            if spec is not None and spec.num_leaves == len(values) else [f"[{i}]" for i in range(len(values))])
    vocab = program.vocab_sizes()
    floating = [(i, key, v) for i, (key, v) in enumerate(zip(keys, values))
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 2]
    for i, key, v in floating:
        if "logits" in key or (v.dim() == 3 and v.shape[-1] in vocab):
            return "lm", i
    for i, key, v in floating:
        if "last_hidden_state" in key:
            return "hidden", i
    if not floating:
        raise PassNotApplicable("heal: the model has no floating-point output with two or more dimensions to distil on")
    return "hidden", floating[0][0]


def _mask(inputs) -> torch.Tensor | None:
    m = inputs.kwargs.get("attention_mask")
    return None if m is None or m.dim() != 2 else m


def _masked_mean(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token values v (B, S) over the tokens the mask keeps."""
    if mask is None or mask.shape != v.shape[:2]:
        return v.mean()
    m = mask.to(v.dtype)
    return (v * m).sum() / m.sum().clamp_min(1)


def _loss(s: torch.Tensor, t: torch.Tensor, mask, kind: str) -> torch.Tensor:
    s, t = s.float(), t.float()
    if kind == "lm":
        lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
        per_token = (lt.exp() * (lt - ls)).sum(-1)
    else:  # scale-free: normalised squared error plus cosine distance, per token
        per_token = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12) + \
            (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1))
    if per_token.dim() == 1:
        per_token = per_token[None]
    return _masked_mean(per_token.reshape(per_token.shape[0], -1), mask)


@torch.no_grad()
def _evaluate(teacher: _Flat, student: _Flat, batches, kind: str, main: int) -> dict[str, float]:
    """Quality of the student against the teacher on held-back batches (fp32)."""
    sums: dict[str, float] = {}
    count = 0.0
    for b in batches:
        t, s = teacher(b)[main].float(), student(b)[main].float()
        mask = _mask(b)
        m = torch.ones(t.shape[:2], device=t.device) if mask is None or mask.shape != t.shape[:2] else mask.float()
        n = float(m.sum())
        count += n
        add = {}
        if kind == "lm":
            lt, ls = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
            add["kl"] = (lt.exp() * (lt - ls)).sum(-1)
            add["top1_agreement"] = (t.argmax(-1) == s.argmax(-1)).float()
            ids = b.kwargs.get("input_ids", b.args[0] if b.args else None)
            if ids is not None and ids.shape == t.shape[:2]:
                nxt = torch.zeros_like(m)
                nxt[:, :-1] = m[:, 1:] * m[:, :-1]
                tgt = ids[:, 1:]
                nll_t = -lt[:, :-1].gather(-1, tgt[..., None])[..., 0]
                nll_s = -ls[:, :-1].gather(-1, tgt[..., None])[..., 0]
                sums["nll_teacher"] = sums.get("nll_teacher", 0.0) + float((nll_t * nxt[:, :-1]).sum())
                sums["nll_student"] = sums.get("nll_student", 0.0) + float((nll_s * nxt[:, :-1]).sum())
                sums["predicted"] = sums.get("predicted", 0.0) + float(nxt.sum())
        else:
            add["token_cosine"] = torch.nn.functional.cosine_similarity(t, s, dim=-1)
            pt, ps = (t * m[..., None]).sum(1), (s * m[..., None]).sum(1)
            pooled = torch.nn.functional.cosine_similarity(pt, ps, dim=-1)
            sums["pooled_cosine"] = sums.get("pooled_cosine", 0.0) + float(pooled.sum())
            sums["samples"] = sums.get("samples", 0.0) + t.shape[0]
            add["normalised_error"] = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)
        for k, v in add.items():
            sums[k] = sums.get(k, 0.0) + float((v.reshape(m.shape) * m).sum())
    out = {k: sums[k] / count for k in ("kl", "top1_agreement", "token_cosine", "normalised_error") if k in sums}
    if sums.get("predicted"):
        out["ppl_teacher"] = math.exp(sums["nll_teacher"] / sums["predicted"])
        out["ppl_student"] = math.exp(sums["nll_student"] / sums["predicted"])
        out["ppl_ratio"] = out["ppl_student"] / out["ppl_teacher"]
    if sums.get("samples"):
        out["pooled_cosine"] = sums["pooled_cosine"] / sums["samples"]
    return out


def _describe(m: dict[str, float]) -> str:
    if "kl" in m:
        s = f"KL {m['kl']:.4g}, top-1 {m['top1_agreement']:.3f}"
        return s + (f", perplexity {m['ppl_student']:.3g} ({m['ppl_ratio']:.3g}x the reference's)" if "ppl_ratio" in m else "")
    return f"pooled cosine {m['pooled_cosine']:.4f}, token cosine {m['token_cosine']:.4f}"
