"""`heal`: distillation toward the program before the lossy passes (tiny models on CPU, plus MiniLM on real text)."""

import json

import numpy as np
import pytest
import torch

import evo_rewrite
from evo_rewrite import UsageError, PipelineError, zoo
from evo_rewrite.cli import main

# A tiny causal LM and token data: gqa(kv_heads=1) loses accuracy that heal wins back.
STEPS = 40


def _gpt():
    model, inputs = zoo.gpt(n_layer=2, d_model=64, n_head=4)
    return model, inputs


def _tokens(n=6000, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _heal(model, inputs, pipeline, data=None, **kw):
    return evo_rewrite.rewrite(model, pipeline, inputs, heal_data=_tokens() if data is None else data, **kw)


def _heal_record(result):
    rec = [p for p in result.report.passes if p.name == "heal"][0]
    assert rec.verified and not rec.rolled_back, rec.failure
    return rec


@pytest.fixture(scope="module")
def healed():
    model, inputs = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grouped = evo_rewrite.rewrite(model, "gqa(kv_heads=1)", inputs)
    result = _heal(model, inputs, f"gqa(kv_heads=1),heal(steps={STEPS},lr=3e-3,seq_len=32,batch=8)")
    return model, inputs, before, grouped, result


def test_heal_reduces_distillation_loss_and_error_on_held_back_data(healed):
    model, inputs, _, grouped, result = healed
    rec = _heal_record(result)
    info = rec.notes["heal"]
    assert rec.rewrites == len(info["trained_tensors"]) > 0
    b, a = info["held_back_before"], info["held_back_after"]
    assert info["objective"] == "lm"
    assert a["kl"] < 0.7 * b["kl"], (b, a)  # the distillation loss on data it never trained on
    assert info["tokens"] == STEPS * 8 * 32
    # and on fresh inputs, against the original model, the healed program is closer than the unhealed one
    x = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = torch.log_softmax(model(x), -1)
        kl = {name: float((ref.exp() * (ref - torch.log_softmax(r.module(x), -1))).sum(-1).mean())
              for name, r in (("grouped", grouped), ("healed", result))}
    assert kl["healed"] < 0.8 * kl["grouped"], kl


@pytest.mark.slow
def test_heal_trains_only_what_the_lossy_pass_changed(healed):
    model, _, before, grouped, result = healed
    rec = _heal_record(result)
    trained = set(rec.notes["heal"]["trained_tensors"])
    # gqa replaced the fused qkv projections (weight and bias) of both blocks: those, nothing else
    assert trained == {f"h.{i}.attn.c_attn.{w}" for i in range(2) for w in ("weight", "bias")}
    g, h = grouped.program.named_tensors(), result.program.named_tensors()
    assert g.keys() == h.keys()
    changed = {k for k in g if not torch.equal(g[k], h[k])}
    assert changed == trained
    # the user's model is untouched (capture shares its tensors)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # same structure and parameter count as the unhealed rewrite
    assert result.report.model_after["parameters"] == grouped.report.model_after["parameters"]
    assert [n.op for n in result.program.graph.nodes] == [n.op for n in grouped.program.graph.nodes]


@pytest.mark.slow
def test_healed_program_reloads(healed, tmp_path):
    _, _, _, _, result = healed
    path = result.save(tmp_path / "healed.pt2")
    loaded = evo_rewrite.load(path).program
    x = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), result.module(x))


@pytest.mark.slow
def test_train_all_changes_every_parameter_and_is_deterministic():
    model, inputs = _gpt()
    runs = [_heal(model, inputs, "gqa(kv_heads=2),heal(steps=3,train=all,seq_len=16,seed=5)") for _ in range(2)]
    rec = _heal_record(runs[0])
    params = dict(runs[0].program.module.named_parameters())
    assert set(rec.notes["heal"]["trained_tensors"]) == set(params)
    a, b = runs[0].program.named_tensors(), runs[1].program.named_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same result


@pytest.mark.slow
def test_encoder_heal_with_block_matching_lifts_cosine():
    model, inputs = zoo.encoder(n_layer=2)
    result = evo_rewrite.rewrite(model, "share-layers,heal(steps=20,lr=3e-3,seq_len=16,layers=1.0)", inputs,
                              heal_data=_tokens(4000))
    rec = _heal_record(result)
    info = rec.notes["heal"]
    assert info["objective"] == "hidden"
    b, a = info["held_back_before"], info["held_back_after"]
    assert a["pooled_cosine"] > b["pooled_cosine"] and a["normalised_error"] < 0.8 * b["normalised_error"], (b, a)
    assert "held back: before pooled cosine" in result.report.table()


def test_heal_without_a_lossy_pass_is_refused_at_parse_time():
    model, inputs = _gpt()
    with pytest.raises(PipelineError, match=r"pass 'heal\(steps=2\)' \(position 2 of 2\) must come after a lossy pass"):
        _heal(model, inputs, "flash,heal(steps=2)")


def test_heal_on_bf16_weights_is_refused():
    model, inputs = _gpt()
    with pytest.raises(UsageError, match="put bf16 after heal"):
        _heal(model, inputs, "gqa(kv_heads=2),bf16,heal(steps=2)")


@pytest.mark.parametrize("opt, match", [
    ("steps=0", "steps=0 is not valid"),
    ("holdout=1.5", "holdout=1.5 is not valid"),
    ("train=some", "allowed: changed, all"),
    ("lr=-1", "lr=-1.0 is not valid"),
])
def test_bad_options(opt, match):
    with pytest.raises(PipelineError, match=match):
        evo_rewrite.parse_pipeline(f"gqa(kv_heads=2),heal({opt})")


@pytest.mark.slow
def test_data_errors(tmp_path):
    model, inputs = _gpt()
    with pytest.raises(UsageError, match=r"pass 'heal' \(position 2 of 2\) needs unlabeled data to distil on"):
        evo_rewrite.rewrite(model, "gqa(kv_heads=2),heal", inputs)
    with pytest.raises(UsageError, match="unlabeled data to distil on was given, but no pass in the pipeline takes it"):
        evo_rewrite.rewrite(model, "gqa(kv_heads=2)", inputs, heal_data=_tokens())
    with pytest.raises(UsageError, match="outside the model's vocabulary of 256"):
        _heal(model, inputs, "gqa(kv_heads=2),heal(steps=1)", data=torch.arange(1000))
    with pytest.raises(UsageError, match="needs a tokenizer"):
        _heal(model, inputs, "gqa(kv_heads=2),heal(steps=1)", data=["some text", "more text"])
    bad = tmp_path / "x.csv"
    bad.write_text("a,b")
    with pytest.raises(UsageError, match="unknown file type '.csv'"):
        _heal(model, inputs, "gqa(kv_heads=2),heal(steps=1)", data=[str(bad)])
    with pytest.raises(UsageError, match="at least 2"):
        _heal(model, inputs, "gqa(kv_heads=2),heal(steps=1,seq_len=16)", data=torch.randint(0, 256, (20,)))


@pytest.mark.slow
def test_cli_heal_with_token_file(capsys, tmp_path):
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, _tokens(3000).numpy())
    out, rep = tmp_path / "gpt.pt2", tmp_path / "r.json"
    code = main(["evo_rewrite.zoo:gpt", "--passes", "gqa(kv_heads=1),heal(steps=4,seq_len=16)", "--heal-data", str(tokens),
                 "-o", str(out), "--report-json", str(rep)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "heal step 4/4" in err and "held back: before KL" in stdout
    heal = [p for p in json.loads(rep.read_text())["passes"] if p["name"] == "heal"][0]
    assert heal["notes"]["heal"]["tokens"] == 4 * 8 * 16 and out.is_file()


def test_cli_heal_errors(capsys, tmp_path):
    code = main(["evo_rewrite.zoo:gpt", "--passes", "gqa(kv_heads=2),heal", "-o", str(tmp_path / "a.pt2")])
    _, err = capsys.readouterr()
    assert code == 2 and "needs unlabeled data to distil on (--heal-data PATH" in err
    code = main(["evo_rewrite.zoo:gpt", "--passes", "gqa(kv_heads=2),heal", "--heal-data", str(tmp_path / "missing.txt"),
                 "-o", str(tmp_path / "a.pt2")])
    _, err = capsys.readouterr()
    assert code == 2 and "missing.txt: no such file or directory" in err
    code = main(["evo_rewrite.zoo:gpt", "--passes", "gqa(kv_heads=2)", "--tokenizer", str(tmp_path), "-o", str(tmp_path / "a.pt2")])
    _, err = capsys.readouterr()
    assert code == 2 and "--tokenizer applies only with --heal-data" in err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_minilm_grouped_heal_on_real_text(tmp_path):
    """Real weights, real text, text files through the tokenizer of the HF source: heal lifts the cosine."""
    import real_models as rm

    rm.minilm_dir()  # the MiniLM package is a test dependency: missing, this fails with its install command
    train = tmp_path / "train.txt"
    train.write_text("\n\n".join(rm.texts("calibration")[:60]))
    result = evo_rewrite.rewrite(str(rm.minilm_dir()), "gqa(kv_heads=2),heal(steps=40,lr=1e-3,seq_len=64,batch=8)",
                              heal_data=[str(train)])
    info = _heal_record(result).notes["heal"]
    b, a = info["held_back_before"], info["held_back_after"]
    assert a["pooled_cosine"] > b["pooled_cosine"] + 0.08 and a["token_cosine"] > b["token_cosine"] + 0.08, (b, a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_heal_on_cuda_uses_bf16_autocast_and_still_heals():
    model, inputs = _gpt()
    result = evo_rewrite.rewrite(model, "gqa(kv_heads=1),heal(steps=40,lr=3e-3,seq_len=32)", inputs,
                              heal_data=_tokens(), device="cuda")
    info = _heal_record(result).notes["heal"]
    assert info["precision"] == "bf16" and info["device"].startswith("cuda")
    assert info["held_back_after"]["kl"] < 0.7 * info["held_back_before"]["kl"], info


def test_bf16_autocast_failure_is_explained(monkeypatch):
    from evo_rewrite.passes.heal import Heal

    real = Heal._loss_backward

    def picky(self, *args):
        if args[-1]["enabled"]:
            raise RuntimeError("Tensor dtype mismatch! Expected: Float, Got: c10::BFloat16")
        return real(self, *args)

    monkeypatch.setattr(Heal, "_loss_backward", picky)
    model, inputs = _gpt()
    with pytest.raises(UsageError, match="does not train under bf16 autocast .*use precision=fp32"):
        _heal(model, inputs, "gqa(kv_heads=2),heal(steps=2,precision=bf16,seq_len=16)")


@pytest.mark.slow
def test_heal_on_a_decoder_program_trains_on_prefill_steps_and_keeps_the_smaller_cache():
    """A causal LM captured with its KV cache: heal's batches are prefill steps (empty past), the teacher
    runs with its own (larger) cache, and the healed program keeps gqa's cache layout."""
    import hf_configs
    from evo_rewrite import decoder as D

    model = hf_configs.build("llama")
    ids = torch.randint(3, hf_configs.VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
    result = evo_rewrite.rewrite(model, "gqa(kv_heads=1),heal(steps=30,lr=3e-3,seq_len=16,batch=4)", cache=True,
                                 heal_data=ids)
    rec = _heal_record(result)
    info = rec.notes["heal"]
    assert info["objective"] == "lm" and 0.9 * 30 * 4 * 16 <= info["tokens"] <= 30 * 4 * 16
    assert info["held_back_after"]["kl"] < info["held_back_before"]["kl"], info
    assert all(".k_proj." in n or ".v_proj." in n for n in info["trained_tensors"]), info["trained_tensors"]
    assert {c.kv_heads for c in result.program.annotations.kv_cache.layers} == {1}
    # the healed program still runs a prefill and a decode step from its own cache
    prompt = torch.randint(3, hf_configs.VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    out = result.program.module(**D.step_inputs(prompt, mask, D.empty_past(result.program.annotations.kv_cache, 2)).kwargs)
    assert out["logits"].shape == (2, 5, hf_configs.VOCAB)
    assert out["present.0.key"].shape == (2, 1, 5, result.program.annotations.kv_cache.layers[0].head_dim)
