"""tensor-parallel: the plan, its checks, the ranks' graphs, and real 2-process runs over gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evo_rewrite
from hf_configs import build
from evo_rewrite.passes.tensor_parallel import TensorParallel, plan_rank
from evo_rewrite.passes.tensor_parallel_ranks import local_shard, simulate
from evo_rewrite import PassNotApplicable, PipelineError, zoo
from evo_rewrite.verify import compare_outputs
from evo_rewrite.targets.parallel import read_plan, shard

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten
LINEAR_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)


@pytest.fixture(scope="module")
def gpt():
    model, inputs = zoo.gpt()
    return evo_rewrite.prepare(model, inputs)


@pytest.fixture(scope="module")
def gpt_tp(gpt):
    """gqa, flash and tensor-parallel with sequence parallelism in one pipeline."""
    return evo_rewrite.rewrite(gpt, "gqa(kv_heads=2),flash,tensor-parallel(degree=2,sequence_parallel=true)", strict=True)


@pytest.fixture(scope="module")
def llama():
    return evo_rewrite.prepare(build("llama"))  # 4 query heads, 2 K/V heads, hidden 32, FFN 64, vocab 128


def _styles(plan):
    return {lin["module"]: lin["style"] for lin in plan["linears"]}


@pytest.mark.slow
def test_plan_names_every_linear_layer_once(gpt, llama):
    for program in (gpt, llama):
        plan, _ = plan_rank(program, 2)
        weights = [n for n in program.graph.nodes if n.op == "call_function" and n.target in LINEAR_OPS
                   and n.args[1].op == "get_attr"]
        assert sorted(lin["node"] for lin in plan["linears"]) == sorted(n.name for n in weights)
        assert len({lin["module"] for lin in plan["linears"]}) == len(plan["linears"])
    styles = _styles(plan_rank(llama, 2)[0])
    assert styles["model.layers.1.self_attn.k_proj"] == styles["model.layers.1.mlp.gate_proj"] == "colwise"
    assert styles["model.layers.1.self_attn.o_proj"] == styles["model.layers.1.mlp.down_proj"] == "rowwise"
    assert styles["lm_head"] == "vocab"
    assert list(styles.values()).count("colwise") == 10 and list(styles.values()).count("rowwise") == 4


def test_plan_placements_and_heads(gpt, llama):
    plan, _ = plan_rank(llama, 2)
    t = plan["tensors"]
    assert t["model.layers.0.self_attn.q_proj.weight"]["placement"] == "Shard(0)"
    assert t["model.layers.0.self_attn.o_proj.weight"]["placement"] == "Shard(1)"
    assert t["model.layers.0.mlp.down_proj.weight"]["placement"] == "Shard(1)"
    assert t["model.embed_tokens.weight"]["placement"] == t["lm_head.weight"]["placement"] == "Shard(0)"
    assert "model.norm.weight" not in t  # replicated
    assert {(a["heads_per_rank"], a["kv_heads_per_rank"]) for a in plan["attention"]} == {(2, 1)}
    plan, _ = plan_rank(gpt, 2)
    c_attn = plan["tensors"]["h.0.attn.c_attn.weight"]
    assert c_attn["segments"] == [[0, 64], [64, 128], [128, 192]]  # fused qkv: q, k and v sharded each
    assert "h.0.attn.c_proj.bias" not in plan["tensors"]  # row-parallel bias: added once, after the all-reduce
    assert plan["weight_bytes_per_rank"] < 0.6 * plan["weight_bytes"]


def test_fused_projection_shards_each_part():
    w = torch.arange(12.0).reshape(12, 1)  # q rows 0-3, k rows 4-7, v rows 8-11
    entry = {"dim": 0, "segments": [[0, 4], [4, 8], [8, 12]]}
    assert local_shard(w, entry, 2, 0).flatten().tolist() == [0, 1, 4, 5, 8, 9]
    assert local_shard(w, entry, 2, 1).flatten().tolist() == [2, 3, 6, 7, 10, 11]
    assert local_shard(w, None, 2, 1) is w  # replicated


@pytest.mark.parametrize("arch,styles", [("gpt2", {"colwise": 4, "rowwise": 4, "vocab": 1}),  # Conv1D (in, out)
                                         ("phi3", {"colwise": 4, "rowwise": 4, "vocab": 1})])  # fused qkv, gate_up
def test_hf_fused_and_conv1d_layouts(arch, styles):
    program = evo_rewrite.prepare(build(arch))
    plan, _ = plan_rank(program, 2)
    got = [lin["style"] for lin in plan["linears"]]
    assert {s: got.count(s) for s in set(got)} == styles
    ref = program(program.inputs)
    for out in simulate(program, 2, False, program.inputs):
        assert compare_outputs(ref, out)[0]["max_rel_error"] < 1e-5


def test_rank_graph_heads_and_collectives(gpt):
    plan, gm = plan_rank(gpt, 2)
    gm.recompile()
    code = gm.code
    assert "split.Tensor(linear, 32, 2)" in code  # q | k | v of this rank: 32 features each
    assert code.count(", 2, 16])") == 12  # 4 layers x q, k, v: 2 heads of 16 per rank
    assert code.count("_c10d_functional.all_reduce") == plan["collectives"]["all_reduce"] == 9  # 8 rows + embedding
    assert code.count("_c10d_functional.all_gather_into_tensor") == plan["collectives"]["all_gather"] == 1  # logits


@pytest.mark.parametrize("degree,sp", [(2, False), (2, True), (4, False), (4, True)])
def test_simulated_ranks_equal_unsharded(gpt, llama, degree, sp):
    for program in (gpt, llama) if degree == 2 else (gpt,):
        for inputs in (program.inputs, program.second_inputs()):
            if sp and inputs.describe() != program.inputs.describe():
                continue  # sequence parallel needs a sequence length the degree divides
            ref = program(inputs)
            outs = simulate(program, degree, sp, inputs)
            assert len(outs) == degree
            for out in outs:
                metrics, problem, _ = compare_outputs(ref, out)
                assert problem is None and metrics["max_rel_error"] < 1e-5


def test_pass_reports_plan_and_runs_after_gqa_and_flash(gpt_tp):
    rec = gpt_tp.report.passes[-1]
    assert rec.verified and rec.rewrites == 17  # 8 column-, 8 row-, 1 vocabulary-parallel layers
    assert rec.notes["heads per rank"] == "2/1 (q/kv)"
    assert rec.notes["collectives per forward"] == "all_gather 10, reduce_scatter 9"  # 2 per block + LM head in/out
    assert "max rel error" in rec.notes["simulated ranks vs unsharded"]
    plan = gpt_tp.program.annotations.tensor_parallel.plan
    assert rec.notes["plan"] == plan and gpt_tp.report.to_dict()["passes"][-1]["notes"]["plan"]["degree"] == 2
    assert plan["tensors"]["h.0.attn.c_attn.weight"]["segments"] == [[0, 64], [64, 96], [96, 128]]  # q | grouped k | v
    assert {a["fused"] for a in plan["attention"]} == {True}  # flash ran first: SDPA sites, sharded by heads


def test_degree_must_divide_heads_with_valid_degrees(llama, gpt):
    with pytest.raises(PassNotApplicable, match=r"site model\.layers\.0\.self_attn: 4 query heads, which 3 does not "
                       r"divide; valid degrees for this model: 1, 2$"):
        evo_rewrite.rewrite(llama, "tensor-parallel(degree=3)")
    with pytest.raises(PassNotApplicable, match=r"2 K/V heads, which 4 does not divide \(a degree above the K/V head "
                       r"count would leave ranks without K/V heads\); valid degrees for this model: 1, 2$"):
        TensorParallel(degree=4).run(llama.clone())
    mqa = evo_rewrite.rewrite(gpt, "gqa(kv_heads=1)").program
    with pytest.raises(PassNotApplicable, match=r"h\.0\.attn: 1 K/V heads, which 2 does not divide.*valid degrees "
                       r"for this model: 1$"):
        TensorParallel(degree=2).run(mqa)  # after MQA there is no K/V head to split
    with pytest.raises(PipelineError, match="degree must be given"):
        evo_rewrite.parse_pipeline("tensor-parallel")


class SubLNAttention(torch.nn.Module):
    """The merged heads are normalised over all heads' features before the output projection (sub-LN)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.sub_norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.softmax(q @ k.transpose(-2, -1) / 8, dim=-1) @ v
        return self.o(self.sub_norm(y.transpose(1, 2).reshape(B, T, C)))


def test_unshardable_op_is_named_and_degree_one_does_nothing():
    with pytest.raises(PassNotApplicable, match=r"tensor-parallel\(degree=2\): cannot shard sub_norm \(node layer_norm\): "
                       r"normalises over a sharded dimension"):
        evo_rewrite.rewrite(SubLNAttention().eval(), "tensor-parallel(degree=2)", example_inputs=(torch.randn(2, 8, 32),))
    model, inputs = zoo.gpt(n_layer=1)
    rec = evo_rewrite.rewrite(model, "tensor-parallel(degree=1)", example_inputs=inputs).report.passes[0]
    assert rec.rewrites == 0 and rec.message == "degree 1: nothing to shard"


class _OneRankMesh:
    """Stands in for a DeviceMesh of one process: shard() checks the plan before any communication."""

    def size(self):
        return 1

    def get_local_rank(self):
        return 0


def test_entry_point_refuses_a_plan_for_another_degree_or_graph(gpt_tp, llama):
    plan = gpt_tp.program.annotations.tensor_parallel.plan
    with pytest.raises(evo_rewrite.UsageError, match=r"the plan is for tensor-parallel degree 2, but 1 processes run; "
                       r"launch with torchrun --nproc-per-node 2"):
        shard(gpt_tp.program, _OneRankMesh(), plan)

    class TwoRanks(_OneRankMesh):
        def size(self):
            return 2

        def get_group(self):
            return type("Group", (), {"group_name": "tp"})()

    with pytest.raises(evo_rewrite.UsageError, match="does not match the program's graph .*put tensor-parallel last"):
        shard(llama, TwoRanks(), plan)


@pytest.mark.slow
def test_two_gloo_processes_match_unsharded(tmp_path, gpt_tp, llama):
    gpt_path, llama_path = tmp_path / "gpt.pt2", tmp_path / "llama.pt2"
    gpt_tp.save(gpt_path)
    evo_rewrite.rewrite(llama, "tensor-parallel(degree=2)", strict=True).save(llama_path)
    assert read_plan(evo_rewrite.load(gpt_path).program) == gpt_tp.program.annotations.tensor_parallel.plan
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "evo_rewrite.targets.parallel", str(gpt_path), str(llama_path), "--check", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in (gpt_path, llama_path):
        for rank in (0, 1):
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"{path} rank {rank}: sharded vs"))
            assert line.endswith(" ok"), line
