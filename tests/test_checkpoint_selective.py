"""`checkpoint(policy=selective)`: outputs and gradients equal to no checkpointing, activations held between
none and full recomputation (measured), no matmul recomputed in backward, per-block choice under a budget,
the policy kept through the program's metadata; a bad policy and a region with nothing to keep."""

import gc

import pytest
import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import evo_rewrite
from evo_rewrite import PipelineError, zoo
from evo_rewrite.annotations import read_metadata, write_metadata
from evo_rewrite.passes.checkpoint_memory import profile
from evo_rewrite.regions import find_regions, policies_of, region_modules

aten = torch.ops.aten
SIZE = dict(n_layer=3, d_model=64, n_head=4, d_ff=160, vocab_size=128)


@pytest.fixture(scope="module")
def llama():
    model, _ = zoo.llama(**SIZE, seed=0)
    model.train()
    ids = torch.randint(0, 128, (2, 24))
    return model, (ids, torch.randint(0, 128, (2, 24)))


class _Watch(TorchDispatchMode):
    """Storages every op makes (weak references, with their sizes) and how many times each op runs."""

    def __init__(self):
        super().__init__()
        self.made, self.calls = {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls[func] = self.calls.get(func, 0) + 1
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.made.setdefault(StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        return out


def _step(module, args):
    """(loss, grads, bytes held for backward after the forward, matmuls run by backward)."""
    module.zero_grad(set_to_none=True)
    weights = {StorageWeakRef(p.untyped_storage()) for p in module.parameters()}
    watch = _Watch()
    with watch:
        loss = module(*args)
    loss = loss if isinstance(loss, torch.Tensor) else pytree.tree_leaves(loss)[0]
    gc.collect()
    held = sum(n for k, n in watch.made.items() if not k.expired() and k not in weights)
    back = _Watch()
    with back:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, held, back.calls.get(aten.mm.default, 0) + back.calls.get(aten.bmm.default, 0)


@pytest.mark.parametrize("pipeline", ["", "flash,fuse"], ids=["unfused", "flash-fuse"])
@pytest.mark.slow
def test_selective_is_exact_and_holds_between_none_and_full(llama, pipeline):
    model, inputs = llama
    base = evo_rewrite.rewrite(model, pipeline, example_inputs=inputs, strict=True).program if pipeline else None
    src = base if base is not None else model
    runs = {}
    for name, ck in (("none", ""), ("full", "checkpoint(modules=[blocks.*])"),
                     ("selective", "checkpoint(modules=[blocks.*], policy=selective)")):
        if ck:
            r = evo_rewrite.rewrite(src, ck, example_inputs=None if base is not None else inputs, strict=True)
            module = r.module
            if name == "selective":
                assert r.report.passes[0].notes["policy"] == "selective: 3 regions"
                assert policies_of(module) == {f"blocks.{i}": "selective" for i in range(3)}
                assert r.program.annotations.checkpoint.policies == policies_of(module)
        else:
            module = base.module if base is not None else evo_rewrite.rewrite(model, "", example_inputs=inputs).module
        runs[name] = _step(module, inputs)
    loss0, g0, held0, mm0 = runs["none"]
    for name in ("full", "selective"):
        loss, g, _, _ = runs[name]
        torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
        assert g.keys() == g0.keys()
        for k in g0:
            torch.testing.assert_close(g[k], g0[k], rtol=0, atol=0, msg=k)
    held_full, held_sel = runs["full"][2], runs["selective"][2]
    assert held_full < held_sel < held0, (held_full, held_sel, held0)
    # full recomputes every forward matmul of the blocks in backward; selective none
    assert runs["selective"][3] == mm0 < runs["full"][3]


def test_estimate_orders_policies_and_budget_mixes_them(llama):
    model, inputs = llama
    program = evo_rewrite.rewrite(model, "", example_inputs=inputs).program
    prof = profile(program)
    regions = find_regions(program.graph, [f"blocks.{i}" for i in range(3)])
    none, full = prof.bytes(), prof.bytes(regions)
    sel = prof.bytes(regions, {r.path for r in regions})
    assert full < sel < none
    budget = (full + sel) // 2  # all selective is too much, all full more than enough
    r = evo_rewrite.rewrite(program, f"checkpoint(budget={budget}, policy=selective)", strict=True)
    rec = r.report.passes[0]
    policies = r.program.annotations.checkpoint.policies
    assert rec.rewrites == 3 and 0 < len(policies) < 3, rec.notes
    assert rec.notes["policy"].startswith(f"selective: {len(policies)} regions; full: ")
    assert r.program.annotations.checkpoint.estimate["estimate_bytes_after"] <= budget
    # enough memory for every block selective: none is recomputed whole
    r2 = evo_rewrite.rewrite(program, f"checkpoint(budget={sel}, policy=selective)", strict=True)
    assert len(r2.program.annotations.checkpoint.policies) == len(r2.program.annotations.checkpoint.paths)


@pytest.mark.slow
def test_policy_survives_metadata_and_later_passes(llama):
    model, inputs = llama
    r = evo_rewrite.rewrite(model, "checkpoint(policy=selective),fuse", example_inputs=inputs, strict=True)
    assert policies_of(r.module) == {f"blocks.{i}": "selective" for i in range(3)}  # re-installed after fuse
    back = read_metadata(write_metadata(r.program), kind="pt2", path=None)
    assert back.annotations.checkpoint.policies == r.program.annotations.checkpoint.policies


def test_bad_policy_is_refused():
    with pytest.raises(PipelineError, match=r"pass 'checkpoint': option policy='lazy' is not valid; allowed: full, selective"):
        evo_rewrite.parse_pipeline("checkpoint(policy=lazy)")


@pytest.mark.slow
def test_region_without_matmul_keeps_what_full_keeps(llama):
    """Negative case: norms only — nothing for selective to keep; it holds exactly what full holds."""
    model, inputs = llama
    program = evo_rewrite.rewrite(model, "", example_inputs=inputs).program
    prof = profile(program)
    regions = find_regions(program.graph, [f"blocks.{i}.ln1" for i in range(3)])
    assert prof.bytes(regions, {r.path for r in regions}) == prof.bytes(regions)
    r = evo_rewrite.rewrite(program, "checkpoint(modules=[blocks.*.ln1], policy=selective)", strict=True)
    loss, grads, _, _ = _step(r.module, inputs)
    loss0, grads0, _, _ = _step(evo_rewrite.rewrite(model, "", example_inputs=inputs).module, inputs)
    torch.testing.assert_close(loss, loss0, rtol=0, atol=0)
    assert set(region_modules(r.module)) == {f"blocks.{i}.ln1" for i in range(3)}
