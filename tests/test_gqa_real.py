"""`gqa` on real trained weights: the calibrated method must beat mean-pooling (all-MiniLM-L6-v2)."""

import pytest
import torch

import evo_rewrite
import real_models as rm


def _embed(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.slow
def test_fit_beats_mean_on_minilm_12_to_4():
    model, tok = rm.minilm()
    calibration = rm.minilm_batches(rm.texts("calibration"), batch=16, max_len=64, tokenizer=tok, limit=2)
    held = rm.minilm_batches(rm.texts("eval"), batch=16, max_len=64, tokenizer=tok, limit=2)
    with torch.no_grad():
        ref = [_embed(model(**b).last_hidden_state, b["attention_mask"]) for b in held]
    cosine = {}
    for method in ("mean", "fit"):
        result = evo_rewrite.rewrite(model, f"gqa(kv_heads=4,method={method})", example_inputs=dict(calibration[0]),
                                  calibration=[dict(b) for b in calibration])
        assert result.report.model_after["kv_cache_bytes_per_token"] * 3 == result.report.model_before["kv_cache_bytes_per_token"]
        with torch.no_grad():
            got = [_embed(result.module(**b)["last_hidden_state"], b["attention_mask"]) for b in held]
        cosine[method] = float(torch.cat([torch.nn.functional.cosine_similarity(g, r) for g, r in zip(got, ref)]).mean())
    # measured on held-back text (distinct from the calibration text)
    assert cosine["fit"] > cosine["mean"] + 0.15, cosine
    assert cosine["fit"] > 0.75, cosine
