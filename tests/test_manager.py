import json
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
