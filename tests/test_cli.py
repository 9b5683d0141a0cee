"""The command line: exit codes, messages, no partial output, inputs untouched."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from evo_rewrite import zoo
from evo_rewrite.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_passes(capsys):
    code, out, _ = run(capsys, "--list-passes")
    assert code == 0
    assert "test-noise" in out and "lossy" in out and "scale (float, default 0.001)" in out


@pytest.mark.slow
def test_round_trip_writes_pt2_and_report(capsys, tmp_path):
    out_file, rep = tmp_path / "gpt.pt2", tmp_path / "r.json"
    code, out, err = run(capsys, "evo_rewrite.zoo:gpt", "-o", str(out_file), "--report-json", str(rep))
    assert code == 0, err
    assert "attention sites" in out and f"wrote    {out_file}" in out
    assert "capturing GPT" in err  # progress goes to stderr
    ep = torch.export.load(str(out_file))
    x = torch.randint(0, 256, (3, 9))
    model, _ = zoo.gpt()
    torch.testing.assert_close(ep.module()(x), model(x))
    d = json.loads(rep.read_text())
    assert d["outputs"] == [str(out_file)] and d["ok"] and d["model_after"]["attention_sites"] == 4
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_explain_lists_softmaxes(capsys, tmp_path):
    code, out, _ = run(capsys, "evo_rewrite.zoo:gpt", "--explain", "-o", str(tmp_path / "g.pt2"), "-q")
    assert code == 0
    assert out.count("yes: BHSD heads=4 kv_heads=4 head_dim=16") == 4


def test_verification_failure_exit_4_writes_nothing(capsys, tmp_path):
    out_file = tmp_path / "x.pt2"
    code, out, err = run(capsys, "evo_rewrite.zoo:gpt", "--passes", "test-corrupt", "-o", str(out_file), "-q")
    assert code == 4
    assert "ROLLED BACK" in out and "first diverging module: h.1.attn.c_proj" in out
    assert "verification failed for test-corrupt; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_lossy_threshold_from_cli(capsys, tmp_path):
    code, _, err = run(capsys, "evo_rewrite.zoo:gpt", "--passes", "test-noise(scale=0.05)", "--min-cosine", "0.99999999",
                       "-o", str(tmp_path / "x.pt2"), "-q")
    assert code == 4 and "nothing was written" in err


@pytest.mark.parametrize("argv,code,msg", [
    (["evo_rewrite.zoo:gpt", "--passes", "nosuch"], 2, r"unknown pass 'nosuch'"),
    (["evo_rewrite.zoo:gpt", "--passes", "test-noise(scale=x)"], 2, r"option scale='x' is not valid; expected float"),
    (["evo_rewrite.zoo:gpt", "--min-cosine", "3"], 2, r"min_cosine must lie in \[-1, 1\]"),
    (["missing.pt2"], 3, r"missing\.pt2: no such file or directory"),
    (["evo_rewrite.zoo:nosuch"], 3, r"has no callable named 'nosuch'"),
    (["evo_rewrite.zoo:gpt", "--inputs", "idx:int64[2"], 2, r"--inputs: cannot parse"),
    (["evo_rewrite.zoo:gpt", "-o", "/nonexistent-dir/x.pt2"], 5, r"directory /nonexistent-dir does not exist"),
    ([], 2, r"give a SOURCE"),
])
def test_errors(capsys, tmp_path, argv, code, msg):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert err.startswith("evo-rewrite: error: ") and "Traceback" not in err
    import re

    assert re.search(msg, err), err


def test_uncapturable_factory_exit_3(capsys, tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("import torch\n"
                 "class M(torch.nn.Module):\n"
                 "    def forward(self, x):\n"
                 "        return x * 2 if x.sum() > 0 else x\n"
                 "def make():\n"
                 "    return M(), (torch.randn(2, 4),)\n")
    code, _, err = run(capsys, f"{f}:make", "-o", str(tmp_path / "o.pt2"))
    assert code == 3 and "cannot capture M: torch.export failed in module '<root>'" in err
    assert not (tmp_path / "o.pt2").exists()


def test_refuses_to_overwrite_source_and_leaves_it_untouched(capsys, tmp_path):
    model, inputs = zoo.gpt(n_layer=1)
    import evo_rewrite

    src = evo_rewrite.rewrite(model, "", example_inputs=inputs).save(tmp_path / "s.pt2")
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    code, _, err = run(capsys, src, "-o", src)
    assert code == 5 and "refusing to overwrite the source" in err
    assert hashlib.sha256(open(src, "rb").read()).hexdigest() == digest
    # rewriting it to another file works and leaves the source as it was
    code, _, _ = run(capsys, src, "-o", str(tmp_path / "t.pt2"), "-q")
    assert code == 0 and hashlib.sha256(open(src, "rb").read()).hexdigest() == digest


def test_pickle_without_opt_in_exit_3(capsys, tmp_path):
    model, _ = zoo.gpt(n_layer=1)
    torch.save(model, tmp_path / "m.pt")
    code, _, err = run(capsys, str(tmp_path / "m.pt"), "-o", str(tmp_path / "o.pt2"))
    assert code == 3 and "--allow-pickle" in err
    code, _, _ = run(capsys, str(tmp_path / "m.pt"), "--allow-pickle", "-o", str(tmp_path / "o.pt2"), "-q")
    assert code == 0 and (tmp_path / "o.pt2").exists()


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    """The installed entry point, as a user would run it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "evo_rewrite.cli", "evo_rewrite.zoo:encoder", "-q", "-o", str(tmp_path / "e.pt2")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "attention sites" in r.stdout and (tmp_path / "e.pt2").exists()
