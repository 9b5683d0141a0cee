"""Hostile sources (issue 15, the source side): no code runs without consent, every error is one line.

Each case runs the command line on a payload from ``hostile_payloads`` and asserts the exit code,
that stderr is exactly one line without "Traceback", that nothing was written (the output folder
stays empty, no temporary left), that no byte of the source changed, and that no payload ran (the
payloads touch a marker file when they run).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import evo_rewrite
import hostile_payloads as hp
from evo_rewrite import SourceError, UsageError
from evo_rewrite.cli import main


@pytest.fixture(scope="module")
def pay(tmp_path_factory):
    """One folder of payloads for the module; every payload touches pay / "MARKER" if it runs."""
    d = tmp_path_factory.mktemp("payloads")
    return d


def marker_of(d: Path) -> Path:
    return d / "MARKER"


def refused(capsys, tmp_path, argv, code, *needles, source=None, marker=None):
    """Run the CLI; assert exit ``code``, one stderr line holding ``needles``, nothing written, source unchanged."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = hp.tree_digest(source) if source is not None else None
    capsys.readouterr()  # what building the payload printed is not the command's
    got = main([*argv, "-o", str(out_dir / "x.pt2"), "-q"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert got == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("evo-rewrite: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert list(out_dir.iterdir()) == [], "something was written"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary was left behind"
    if source is not None:
        assert hp.tree_digest(source) == before, "the source changed"
    if marker is not None:
        assert not Path(marker).exists(), "the payload ran"
    return lines[0]


# ---- .pt2: pickled entries, code in the graph, damage ---------------------------------------------

PT2_PICKLED = [
    ("pt2_pickled_weight", "data/weights/weight_pickled (weight wte.weight, marked use_pickle)"),
    ("pt2_pickled_constant", "data/constants/tensor_pickled"),
    ("pt2_pickled_sample_inputs", "data/sample_inputs/model.pt"),
]


@pytest.mark.parametrize("builder,entry", PT2_PICKLED)
def test_pt2_pickled_entry_refused(pay, tmp_path, capsys, builder, entry):
    src = getattr(hp, builder)(pay, marker_of(pay))
    refused(capsys, tmp_path, [str(src)], 3, entry, "is pickled", "--allow-pickle", source=src, marker=marker_of(pay))


@pytest.mark.parametrize("builder,needle", [
    ("pt2_sympy_payload", "a shape expression that torch.export does not write"),
])
def test_pt2_code_in_shape_expression_refused(pay, tmp_path, capsys, builder, needle):
    src = getattr(hp, builder)(pay, marker_of(pay))
    refused(capsys, tmp_path, [str(src)], 3, needle, source=src, marker=marker_of(pay))


@pytest.mark.parametrize("builder,needle", [
    ("pt2_target_payload", "a node target that torch.export does not write ('torch.os.system'"),
    ("pt2_aoti_entry", "is compiled code"),
    ("pt2_truncated", "not a readable .pt2 ExportedProgram"),
    ("pt2_bad_crc", "fails its CRC check"),
])
def test_pt2_refused(pay, tmp_path, capsys, builder, needle):
    src = getattr(hp, builder)(pay)
    refused(capsys, tmp_path, [str(src)], 3, needle, source=src)


def test_pt2_truncated_anywhere_is_one_line(pay, tmp_path, capsys):
    for keep in (0.1, 0.9, 0.999):
        src = hp.pt2_truncated(pay, name=f"trunc{keep}.pt2", keep=keep)
        refused(capsys, tmp_path, [str(src)], 3, "not a readable .pt2 ExportedProgram", source=src)


@pytest.mark.parametrize("text,needle", [
    ("[1, 2]", "holds a list, not an object"),
    ("{", "not evo-rewrite metadata"),
    ('"text"', "holds a str, not an object"),
    ('{"annotations": "x"}', "not evo-rewrite metadata"),
    ('{"annotations": {"checkpoint": {"paths": 3}}}', "not evo-rewrite metadata"),
])
def test_pt2_metadata_not_an_object(pay, tmp_path, capsys, text, needle):
    src = hp.pt2_metadata(pay, text, name=f"meta{abs(hash(text))}.pt2")
    refused(capsys, tmp_path, [str(src)], 3, needle, source=src)


@pytest.mark.slow
def test_pt2_guards_are_not_executed(pay, tmp_path, capsys):
    """Export guards are Python source that ep.module() executes: the loader drops them."""
    marker = tmp_path / "guard-marker"
    src = hp.pt2_guards_payload(tmp_path, marker)
    before = hp.tree_digest(src)
    code = main([str(src), "-o", str(tmp_path / "out.pt2"), "-q"])
    assert code == 0, capsys.readouterr().err
    assert not marker.exists() and hp.tree_digest(src) == before


def test_pt2_pickled_entry_python_api(pay):
    src = hp.pt2_pickled_weight(pay, marker_of(pay))
    with pytest.raises(SourceError, match=r"marked use_pickle.*allow_pickle=True"):
        evo_rewrite.load(src)
    assert not marker_of(pay).exists()


def test_good_pt2_still_loads(pay):
    loaded = evo_rewrite.load(hp.good_pt2(pay))
    assert loaded.program is not None and loaded.source.kind == "pt2"
    evo_rewrite.sources.check_pt2_archive(hp.good_pt2(pay))  # the checker accepts what evo-rewrite writes


# ---- generated source: consent and digest ----------------------------------------------------------

def test_generated_dir_needs_trust_code(pay, tmp_path, capsys):
    src = hp.generated_dir_redigested(pay, marker_of(pay))  # consistent digest: only consent stops it
    refused(capsys, tmp_path, [str(src)], 3, "directory of generated source", "--trust-code", "trust_code=True",
            source=src, marker=marker_of(pay))


@pytest.mark.parametrize("builder", ["generated_dir_tampered", "generated_dir_disguised"])
def test_generated_dir_tampered_refused_even_with_consent(pay, tmp_path, capsys, builder):
    src = getattr(hp, builder)(pay, marker_of(pay))
    refused(capsys, tmp_path, [str(src), "--trust-code"], 3, "model.py was changed after evo-rewrite wrote it",
            source=src, marker=marker_of(pay))
    refused(capsys, tmp_path, [str(src)], 3, "--trust-code", source=src, marker=marker_of(pay))


def test_generated_dir_without_digest_refused(pay, tmp_path, capsys):
    import json

    src = hp._copy_fresh(hp.generated_dir(pay), pay / "nodigest")
    meta = json.loads((src / "evo_rewrite.json").read_text())
    del meta["model_sha256"]
    (src / "evo_rewrite.json").write_text(json.dumps(meta))
    refused(capsys, tmp_path, [str(src), "--trust-code"], 3, "records no digest of model.py", source=src)


def test_generated_dir_loads_with_consent(pay):
    src = hp.generated_dir(pay)
    with pytest.raises(SourceError, match="--trust-code"):
        evo_rewrite.load(src)
    loaded = evo_rewrite.load(src, trust_code=True)
    assert loaded.source.kind == "generated" and loaded.program.annotations.checkpoint is not None


# ---- Hugging Face checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("builder,needles", [
    ("hf_missing_tensors", ["lacks 2 tensor(s) of BertModel", "encoder.layer.0.output.dense.weight",
                            "pooler.dense.bias", "--allow-missing-weights"]),
    ("hf_extra_head", ["lacks 2 tensor(s) of BertForSequenceClassification", "classifier.weight"]),
    ("hf_tokenizer_architecture", ["architectures names BertTokenizer, which is not a model class"]),
    ("hf_wrong_shapes", ["shapes do not match config.json"]),
])
def test_hf_checkpoint_refused(pay, tmp_path, capsys, builder, needles):
    pytest.importorskip("transformers")
    src = getattr(hp, builder)(pay)
    refused(capsys, tmp_path, [str(src)], 3, *needles, source=src)


def test_hf_missing_tensors_on_request(pay):
    pytest.importorskip("transformers")
    src = hp.hf_missing_tensors(pay)
    loaded = evo_rewrite.load(src, allow_missing_weights=True)
    assert loaded.source.hf_class == "BertModel"


# ---- factories and pickled modules ----------------------------------------------------------------

def test_factory_sys_exit(tmp_path, capsys):
    src = hp.factory_sys_exit(tmp_path)
    refused(capsys, tmp_path, [src], 3, "called sys.exit(0) instead of returning a module")


def test_factory_sys_exit_at_import(tmp_path, capsys):
    path = tmp_path / "exits_on_import.py"
    path.write_text("import sys\nsys.exit(0)\n\ndef make():\n    pass\n")
    refused(capsys, tmp_path, [f"{path}:make"], 3, "called sys.exit(0)", "if __name__ == '__main__'")


@pytest.mark.slow
def test_factory_sys_exit_command_exit_code(tmp_path):
    """The real command: a factory's sys.exit(0) must not end the run with exit 0 and nothing written."""
    src = hp.factory_sys_exit(tmp_path)
    out = tmp_path / "o.pt2"
    r = subprocess.run([sys.executable, "-c", "import sys; from evo_rewrite.cli import main; sys.exit(main())",
                        src, "-o", str(out), "-q"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 3, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_uncapturable_factory_names_the_users_line(tmp_path, capsys):
    src = hp.factory_uncapturable(tmp_path)
    line = refused(capsys, tmp_path, [src], 3, "cannot capture Branchy", "uncapturable.py:11: if y.sum().item() > 0")
    assert "module.py" not in line


def test_pickled_module_needs_consent(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    src = hp.pickled_module_cwd(tmp_path, marker)
    refused(capsys, tmp_path, [str(src)], 3, "is a pickled module", "--allow-pickle", source=src, marker=marker)


def test_pickled_module_from_cwd_mentions_pythonpath(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    src = hp.pickled_module_cwd(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    here = {"", ".", str(tmp_path), os.getcwd()}
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in here])  # as for the evo-rewrite command
    refused(capsys, tmp_path, ["model.pt", "--allow-pickle"], 3, "No module named 'mygpt_cwd'", "PYTHONPATH=.",
            source=src, marker=marker)


# ---- --inputs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,needles", [
    ("ids:int64[2,16]", ["--inputs names ids, but GPT.forward takes idx"]),
    ("idx:int64[2,16]@0..100000", ["outside embedding 'wte' (256 rows", "@0..256"]),
    ("idx:int64[2,16]@-5..3", ["outside embedding 'wte'"]),
    ("idx:int64[2,16]@0..99999999999999999999", ["does not fit int64"]),
    ("idx:int32[2,16]@0..3000000000", ["does not fit int32"]),
    ("idx:int64[100000,100000]", ["74.5 GiB", "EVO_REWRITE_MAX_INPUT_BYTES"]),
    ("idx:int64[99999999999999999999,2]", ["EVO_REWRITE_MAX_INPUT_BYTES"]),
    ("idx:int64[2,16],idx:int64[2,16]", ["'idx' is given twice"]),
    ("idx:float32[2,16]@0..3", ["applies only to integer inputs"]),
])
def test_bad_inputs_exit_2(tmp_path, capsys, spec, needles):
    refused(capsys, tmp_path, ["evo_rewrite.zoo:gpt", "--inputs", spec], 2, *needles)


def test_inputs_byte_limit_is_configurable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVO_REWRITE_MAX_INPUT_BYTES", "100")
    refused(capsys, tmp_path, ["evo_rewrite.zoo:gpt", "--inputs", "idx:int64[2,16]"], 2, "above the limit of 100 bytes")
    monkeypatch.setenv("EVO_REWRITE_MAX_INPUT_BYTES", "lots")
    refused(capsys, tmp_path, ["evo_rewrite.zoo:gpt", "--inputs", "idx:int64[2,16]"], 2, "EVO_REWRITE_MAX_INPUT_BYTES='lots'")


def test_pt2_inputs_checked_too(pay, tmp_path, capsys):
    src = hp.good_pt2(pay)
    refused(capsys, tmp_path, [str(src), "--inputs", "ids:int64[2,16]"], 2, "forward takes idx", source=src)
    refused(capsys, tmp_path, [str(src), "--inputs", "idx:int64[2,16]@0..1000"], 2, "fall outside", source=src)


def test_inputs_limit_python_api(monkeypatch):
    monkeypatch.setenv("EVO_REWRITE_MAX_INPUT_BYTES", "1000")
    with pytest.raises(UsageError, match="above the limit"):
        evo_rewrite.parse_input_spec("x:float32[100,100]")
