import dataclasses
import json
from typing import ClassVar
import math

import pytest
import torch

import evo_rewrite
from evo_rewrite import Thresholds, VerificationError, zoo


def test_no_passes_round_trip(gpt_program):
    program, report = evo_rewrite.PassManager([]).run(gpt_program)
    assert report.ok and report.passes == []
    assert report.model_before == report.model_after
    assert len(report.verify_inputs) == 3  # example size, a second size, the example size with another seed
    assert report.verify_inputs[2].endswith("(another seed)")


def test_wrong_exact_pass_is_rolled_back_and_divergence_named(gpt_program):
    before = gpt_program(gpt_program.inputs)
    program, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-corrupt")).run(gpt_program)
    rec = report.passes[0]
    assert rec.rewrites == 1 and not rec.verified and rec.rolled_back
    assert "exact pass changed the outputs" in rec.failure
    assert rec.diverges_at == "h.1.attn.c_proj"  # the first module whose output differs
    assert program is gpt_program  # rolled back: the program before the pass
    torch.testing.assert_close(program(program.inputs), before)
    assert not report.ok


def test_rollback_then_later_pass_still_runs(gpt_program):
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-corrupt,test-noise(scale=1e-4)")).run(gpt_program)
    assert [p.verified for p in report.passes] == [False, True]
    assert report.passes[1].rewrites > 0


def test_crashing_pass_is_rolled_back(gpt_program):
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-crash")).run(gpt_program)
    rec = report.passes[0]
    assert rec.rolled_back and rec.failure == "pass raised RuntimeError: boom"


def test_lossy_pass_reports_metrics_and_passes_without_threshold(gpt_program):
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-noise(scale=0.05)")).run(gpt_program)
    m = report.passes[0].metrics
    assert report.ok
    assert m["max_abs_error"] > 0 and 0 < m["cosine"] < 1 and math.isfinite(m["sqnr_db"])
    assert 0 <= m["top1_agreement"] <= 1 and m["kl"] >= 0  # GPT outputs are logits
    assert report.end_to_end["max_abs_error"] == pytest.approx(m["max_abs_error"])


def test_lossy_pass_fails_past_threshold(gpt_program):
    _, ok = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-noise(scale=0.05)"), Thresholds(min_sqnr_db=0.0)).run(gpt_program)
    assert ok.ok
    _, bad = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-noise(scale=0.05)"), Thresholds(min_sqnr_db=200.0)).run(gpt_program)
    assert not bad.ok and bad.passes[0].failure.startswith("SQNR") and "--min-sqnr 200" in bad.passes[0].failure


def test_pass_with_nothing_to_do_says_so(gpt_program):
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-noise(mode=none)")).run(gpt_program)
    rec = report.passes[0]
    assert rec.rewrites == 0 and rec.verified and rec.message == "mode=none changes nothing"
    assert rec.skipped == [{"reason": "mode=none", "module": "", "node": ""}]


def test_strict_rewrite_raises_naming_pass_and_module():
    model, inputs = zoo.gpt()
    with pytest.raises(VerificationError, match=r"pass 'test-corrupt' was rolled back: exact pass changed the outputs.*first diverging module: h\.1\.attn\.c_proj"):
        evo_rewrite.rewrite(model, "test-corrupt", example_inputs=inputs, strict=True)


def test_report_json_schema(gpt_program):
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-noise(scale=1e-3)")).run(gpt_program)
    d = json.loads(report.to_json())
    assert d["schema_version"] == 2 and d["ok"] is True and d["targets"] == []
    p = d["passes"][0]
    for key in ("name", "rewrites", "skipped", "verified", "max_abs_error", "rolled_back", "metrics"):
        assert key in p
    for side in ("model_before", "model_after"):
        assert set(d[side]) >= {"parameters", "weight_bytes", "kv_cache_bytes_per_token", "attention_sites"}
    assert d["outputs"] == []
    assert "test-noise" in report.table()


def test_thresholds_validate():
    with pytest.raises(ValueError, match=r"min_cosine must lie in \[-1, 1\], got 2"):
        Thresholds(min_cosine=2)


# ---- annotations and the reference (issue 14) ------------------------------------------------------------

_SEEN_REFERENCES: list = []


@evo_rewrite.register_pass
@dataclasses.dataclass(frozen=True)
class _TeacherProbe(evo_rewrite.Pass):
    """Test pass: records the reference the manager hands it (as heal would get it) and changes nothing."""

    name: ClassVar[str] = "test-teacher-probe"
    exact: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset({"reference"})
    placement: ClassVar[evo_rewrite.Placement] = evo_rewrite.Placement(after_lossy=True)

    def run(self, program):
        _SEEN_REFERENCES.append(program.annotations.reference)
        return evo_rewrite.PassResult(program, 0, message="probe")


def test_a_rewrite_of_a_rewritten_program_gets_a_fresh_reference():
    model, inputs = zoo.gpt(n_layer=1)
    r1 = evo_rewrite.rewrite(model, "test-noise(scale=2e-3)", example_inputs=inputs, strict=True)
    _SEEN_REFERENCES.clear()
    r2 = evo_rewrite.rewrite(r1.program, "test-noise(scale=1e-3),test-teacher-probe", strict=True)
    (ref,) = _SEEN_REFERENCES
    assert ref is not None and ref.applied == ["test-noise(scale=0.002)"]  # r1's program, not the original
    # the reference is handed to the pass that needs it and not carried on
    assert r2.program.annotations.reference is None and r1.program.annotations.reference is None


def test_clone_shares_tensors_and_copies_annotations_shallowly(gpt_program):
    p = gpt_program.clone()
    p.annotations.calibration = evo_rewrite.Calibration((p.inputs,), "one batch")
    q = p.clone()
    assert q.annotations is not p.annotations and q.annotations.calibration is p.annotations.calibration
    assert q.annotations.calibration.batches[0] is p.inputs  # tensors shared, never copied
    name, t = next(iter(p.named_tensors().items()))
    assert q.get_tensor(name) is t
    q.annotations.calibration = None
    assert p.annotations.calibration is not None  # replacing one on the clone leaves the original alone


def test_pipeline_rules_are_checked_before_loading():
    with pytest.raises(evo_rewrite.PipelineError, match=r"pass 'tensor-parallel\(degree=2\)' \(position 1 of 2\) "
                                                        r"must be the last pass: nothing may follow it; move 'flash'"):
        evo_rewrite.check_pipeline(evo_rewrite.parse_pipeline("tensor-parallel(degree=2),flash"))
    with pytest.raises(evo_rewrite.PipelineError, match=r"must not come after 'bf16'; put bf16 after heal"):
        evo_rewrite.check_pipeline(evo_rewrite.parse_pipeline("gqa(kv_heads=2),bf16,heal"), {"heal_data"})
    evo_rewrite.check_pipeline(evo_rewrite.parse_pipeline("gqa(kv_heads=2),heal,bf16"), {"heal_data"})  # fine


@pytest.mark.slow
def test_written_pt2_keeps_the_annotations(tmp_path):
    model, inputs = zoo.gpt(n_layer=2)
    r = evo_rewrite.rewrite(model, "tensor-parallel(degree=2)", example_inputs=inputs, strict=True)
    plan = r.program.annotations.tensor_parallel
    path = r.save(tmp_path / "tp.pt2")
    again = evo_rewrite.load(path).program
    assert again.annotations.tensor_parallel == plan and again.applied == ["tensor-parallel(degree=2)"]
