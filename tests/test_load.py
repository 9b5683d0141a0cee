"""Every source kind loads; every bad source fails with one clear SourceError and touches nothing."""

import hashlib
import os
import pickle
import textwrap

import pytest
import torch

import evo_rewrite
from evo_rewrite import sources
from evo_rewrite import SourceError, zoo

FACTORY = textwrap.dedent("""
    import torch
    from evo_rewrite import zoo

    def with_inputs():
        return zoo.gpt(n_layer=2)

    def module_only():
        return zoo.gpt(n_layer=2)[0]

    def raises():
        raise ValueError("checkpoint path not set")

    def not_a_module():
        return 42
""")


@pytest.fixture()
def factory_file(tmp_path):
    f = tmp_path / "models.py"
    f.write_text(FACTORY)
    return f


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_factory_with_inputs(factory_file):
    loaded = evo_rewrite.load(f"{factory_file}:with_inputs")
    assert loaded.source.kind == "factory" and isinstance(loaded.model, zoo.GPT)
    assert loaded.inputs.args[0].shape == (2, 16)


def test_factory_module_only_uses_inputs_spec(factory_file):
    loaded = evo_rewrite.load(f"{factory_file}:module_only", inputs="idx:int64[3,10]")
    ids = loaded.inputs.kwargs["idx"]
    assert ids.shape == (3, 10) and ids.max() < 256  # drawn below the embedding's vocabulary


def test_package_module_factory():
    loaded = evo_rewrite.load("evo_rewrite.zoo:encoder")
    assert set(loaded.inputs.kwargs) == {"input_ids", "attention_mask"}


@pytest.mark.slow
def test_pt2_round_trip(tmp_path):
    model, inputs = zoo.gpt(n_layer=2)
    path = evo_rewrite.rewrite(model, "", example_inputs=inputs).save(tmp_path / "g.pt2")
    loaded = evo_rewrite.load(path)
    assert loaded.source.kind == "pt2" and loaded.program is not None
    x = torch.randint(0, 256, (3, 9))
    torch.testing.assert_close(loaded.program.module(x), model(x))
    # an output is again a source: rewrite it once more and save it elsewhere
    again = evo_rewrite.rewrite(path, "")
    assert again.report.ok and again.program.source.kind == "pt2"
    again.save(tmp_path / "g2.pt2")


def test_hf_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    loaded = evo_rewrite.load(tmp_path / "gpt2")
    assert loaded.source.kind == "hf" and loaded.source.hf_class == "GPT2LMHeadModel"
    assert loaded.model.config._attn_implementation == "eager"  # attention stays visible to the passes
    assert set(loaded.inputs.kwargs) == {"input_ids", "attention_mask"}


def test_hf_encoder_decoder_gets_decoder_inputs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    inputs = sources.hf_example_inputs(transformers.BartForConditionalGeneration(cfg))
    assert {"input_ids", "attention_mask", "decoder_input_ids"} <= set(inputs.kwargs)


def test_pickle_needs_opt_in(tmp_path):
    model, _ = zoo.gpt(n_layer=1)
    path = tmp_path / "m.pt"
    torch.save(model, path)
    with pytest.raises(SourceError, match=r"is a pickled module: loading it runs code stored in the file.*--allow-pickle"):
        evo_rewrite.load(path)
    loaded = evo_rewrite.load(path, allow_pickle=True)
    assert isinstance(loaded.model, zoo.GPT) and loaded.inputs.args[0].dtype == torch.int64


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVO_MARKER']}",))


def test_malicious_pickle_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVO_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(SourceError, match="--allow-pickle"):
        evo_rewrite.load(path)
    assert not marker.exists()


def test_state_dict_is_not_a_module(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(zoo.gpt(n_layer=1)[0].state_dict(), path)
    with pytest.raises(SourceError, match=r"holds .*dict.* not a module.*factory"):
        evo_rewrite.load(path)


def test_missing_path():
    with pytest.raises(SourceError, match=r"nope\.pt2: no such file or directory"):
        evo_rewrite.load("nope.pt2")


def test_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(SourceError, match=r"notes\.txt: not a model evo-rewrite can read"):
        evo_rewrite.load(f)


def test_truncated_pt2(tmp_path):
    model, inputs = zoo.gpt(n_layer=1)
    good = evo_rewrite.rewrite(model, "", example_inputs=inputs).save(tmp_path / "g.pt2")
    data = open(good, "rb").read()
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(data[: len(data) // 2])
    before = _sha(bad)
    with pytest.raises(SourceError, match=r"bad\.pt2: not a readable \.pt2 ExportedProgram .*truncated"):
        evo_rewrite.load(bad)
    assert _sha(bad) == before


def test_hf_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="without config.json is not a Hugging Face model directory"):
        evo_rewrite.load(tmp_path / "empty")


def test_factory_errors(factory_file):
    with pytest.raises(SourceError, match=r"the factory raised ValueError: checkpoint path not set"):
        evo_rewrite.load(f"{factory_file}:raises")
    with pytest.raises(SourceError, match=r"the factory returned int; it must return an nn\.Module"):
        evo_rewrite.load(f"{factory_file}:not_a_module")
    with pytest.raises(SourceError, match=r"has no callable named 'missing'"):
        evo_rewrite.load(f"{factory_file}:missing")
    with pytest.raises(SourceError, match=r"cannot import module .no_such_pkg\.models."):
        evo_rewrite.load("no_such_pkg.models:gpt")


def test_module_without_inputs_asks_for_them():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x

    loaded = sources._guess_inputs
    with pytest.raises(SourceError, match=r"no example inputs for Plain: give them with --inputs"):
        loaded(Plain())


@pytest.mark.parametrize("spec,msg", [
    ("input_ids", r"cannot parse 'input_ids'"),
    ("x:complex[2]", r"unknown dtype 'complex'"),
    ("x:int64[2,0]", "non-positive dimension"),
    ("x:int64[2,3]@5..5", "empty value range"),
])
def test_bad_inputs_spec(spec, msg):
    with pytest.raises(evo_rewrite.UsageError, match=msg):
        evo_rewrite.parse_input_spec(spec)
