"""Hostile outputs and honest reports (issue 15, the output side).

Every user error ends with the documented exit code, exactly one line on stderr without a traceback,
nothing written or left behind in the output directory, and no source byte changed.
"""

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from evo_rewrite.cli import main
from evo_rewrite.errors import OutputError

FACTORY = textwrap.dedent("""\
    from evo_rewrite import zoo


    def make():
        return zoo.gpt(n_layer=1)


    def enc():
        return zoo.encoder(n_layer=1)
    """)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("evo-rewrite: "), err
    return lines[0]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@pytest.fixture
def factory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "models.py"
    f.write_text(FACTORY)
    return f


@pytest.fixture
def hf_dir(tmp_path):
    """Looks like a Hugging Face checkpoint: the output checks refuse before anything is loaded."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


# ---- files are lost ---------------------------------------------------------------------------------

def _refused(capsys, tmp_path, argv, code, pattern, protect):
    before = {p: _digest(p) for p in protect}
    listing = _listing(tmp_path)
    got, out, err = _run(capsys, *argv)
    line = _one_line_error(err)
    assert got == code, err
    import re

    assert re.search(pattern, line), line
    assert _listing(tmp_path) == listing  # nothing written, nothing left behind
    assert {p: _digest(p) for p in protect} == before  # no source byte changed


def test_output_onto_factory_py(capsys, tmp_path, factory):
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", factory], 5, r"refusing to overwrite the source", [factory])


def test_output_onto_safetensors_inside_hf_source(capsys, tmp_path, hf_dir):
    _refused(capsys, tmp_path, [hf_dir, "-o", hf_dir / "model.safetensors"], 5, r"inside the source", [hf_dir])


def test_output_through_symlinked_directory_into_source(capsys, tmp_path, hf_dir):
    link = tmp_path / "link"
    link.symlink_to(hf_dir)
    _refused(capsys, tmp_path, [hf_dir, "-o", link / "model.safetensors"], 5, r"inside the source", [hf_dir])


def test_output_is_a_symlink_to_a_source_file(capsys, tmp_path, hf_dir):
    link = tmp_path / "out.pt2"
    link.symlink_to(hf_dir / "model.safetensors")
    _refused(capsys, tmp_path, [hf_dir, "-o", link], 5, r"inside the source", [hf_dir])


def test_report_json_inside_source(capsys, tmp_path, hf_dir):
    _refused(capsys, tmp_path, [hf_dir, "-o", tmp_path / "o.pt2", "--report-json", hf_dir / "config.json"], 5,
             r"--report-json|inside the source", [hf_dir])


def test_hf_output_onto_source_dir(capsys, tmp_path, hf_dir):
    _refused(capsys, tmp_path, [hf_dir, "-o", tmp_path / "o.pt2", "--hf-output", hf_dir], 5,
             r"refusing to overwrite the source", [hf_dir])


def test_report_json_equal_to_output(capsys, tmp_path, factory):
    out = tmp_path / "m.pt2"
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", out, "--report-json", out], 2,
             r"--report-json and -o are the same path", [factory])


def test_report_json_equal_to_hf_output(capsys, tmp_path, factory):
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", tmp_path / "m.pt2", "--hf-output", tmp_path / "hf.out",
                                "--report-json", tmp_path / "hf.out"], 2, r"--report-json and --hf-output are the same",
             [factory])


def test_report_json_equal_to_default_output(capsys, tmp_path, factory, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, tmp_path, [f"{factory}:make", "--report-json", "make.rewritten.pt2"], 2,
             r"is the default model output", [factory])


def test_output_onto_device_node(capsys, tmp_path, factory):
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", "/dev/null"], 5, r"not a regular file", [factory])


def test_output_onto_fifo(capsys, tmp_path, factory):
    fifo = tmp_path / "pipe.pt2"
    os.mkfifo(fifo)
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", fifo], 5, r"not a regular file", [factory])
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_report_json_onto_fifo(capsys, tmp_path, factory):
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", tmp_path / "m.pt2", "--report-json", fifo], 5,
             r"not a regular file", [factory])


def test_output_onto_directory(capsys, tmp_path, factory):
    (tmp_path / "d.pt2").mkdir()
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", tmp_path / "d.pt2"], 5, r"is a directory", [factory])


def test_hf_output_existing(capsys, tmp_path, factory):
    (tmp_path / "hfo").mkdir()
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", tmp_path / "m.pt2", "--hf-output", tmp_path / "hfo"], 5,
             r"already exists", [factory])


def test_output_in_missing_directory(capsys, tmp_path, factory):
    _refused(capsys, tmp_path, [f"{factory}:make", "--report-json", tmp_path / "no" / "r.json", "-o", tmp_path / "m.pt2"],
             5, r"does not exist", [factory])


def test_output_in_read_only_directory(capsys, tmp_path, factory):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", ro / "m.pt2"], 5, r"not writable", [factory])


@pytest.mark.parametrize("flag,value,pattern", [
    ("--min-sqnr", "nan", r"min_sqnr_db \(--min-sqnr\) must be a number"),
    ("--max-kl", "nan", r"max_kl \(--max-kl\) must be a number"),
    ("--min-cosine", "nan", r"min_cosine \(--min-cosine\) must be a number"),
    ("--max-kl", "-1", r"max_kl must be >= 0"),
    ("--min-sqnr", "abc", r"argument --min-sqnr: invalid float value"),
])
def test_thresholds_refuse_nan(capsys, tmp_path, factory, flag, value, pattern):
    _refused(capsys, tmp_path, [f"{factory}:make", "-o", tmp_path / "m.pt2", flag, value], 2, pattern, [factory])


def test_bf16_then_onnx_refused_before_loading(capsys, tmp_path, factory):
    t0 = time.perf_counter()
    _refused(capsys, tmp_path, [f"{factory}:make", "--passes", "bf16", "--target", "onnx", "-o", tmp_path / "m.onnx"], 2,
             r"pass 'bf16' \(position 1 of 1\) leaves bfloat16 weights, which target 'onnx' cannot run: .*onnx\(dtype=fp16\)",
             [factory])
    assert time.perf_counter() - t0 < 5  # nothing was loaded


def test_bf16_program_refused_by_onnx_target_validate():
    import evo_rewrite
    from evo_rewrite import zoo

    model, inputs = zoo.gpt(n_layer=1)
    result = evo_rewrite.rewrite(model, "bf16", example_inputs=inputs)
    with pytest.raises(evo_rewrite.UsageError, match=r"holds bfloat16 weights \(bf16\)"):
        result.write("/nonexistent/x.onnx", "onnx")


def test_disk_full_precheck_exit_5(capsys, tmp_path, factory, monkeypatch):
    """torch's C++ writer aborts the interpreter on a full disk: the free space is checked before writing."""
    import evo_rewrite.target_infra as ti

    usage = namedtuple("usage", "total used free")
    real = ti.shutil.disk_usage
    monkeypatch.setattr(ti.shutil, "disk_usage",
                        lambda p: usage(10**9, 10**9 - 4096, 4096) if str(Path(p).resolve()).startswith(str(tmp_path))
                        else real(p))
    out = tmp_path / "out"
    out.mkdir()
    _refused(capsys, out, [f"{factory}:make", "-o", out / "m.pt2", "-q"], 5,
             r"cannot write .*m\.pt2: it needs about \d+ MiB and .* has 4,096 bytes free", [factory])


def test_enospc_during_write_leaves_nothing(capsys, tmp_path, factory, monkeypatch):
    from evo_rewrite.targets.pytorch import PyTorchTarget

    def full(self, program, path):
        path.mkdir()  # a half-written directory output
        (path / "weights.safetensors").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PyTorchTarget, "write", full)
    out = tmp_path / "out"
    out.mkdir()
    _refused(capsys, out, [f"{factory}:make", "-o", out / "m.pt2", "-q"], 5,
             r"cannot write .*m\.pt2: no space left on the device \(\d+ MiB free\)", [factory])


def test_enospc_writing_the_report_leaves_nothing(tmp_path, monkeypatch):
    import evo_rewrite.target_infra as ti

    class Full:
        def __init__(self, fd):
            self.fd = fd

        def __enter__(self):
            return self

        def __exit__(self, *a):
            os.close(self.fd)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ti.os, "fdopen", lambda fd, mode: Full(fd))
    with pytest.raises(OutputError, match=r"no space left on the device") as e:
        ti.write_text_atomic(tmp_path / "r.json", "{}")
    assert e.value.exit_code == 5 and list(tmp_path.iterdir()) == []


def test_report_json_precheck_free_space(tmp_path, monkeypatch):
    import evo_rewrite.target_infra as ti

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ti.shutil, "disk_usage", lambda p: usage(10, 10, 10))
    with pytest.raises(OutputError, match=r"needs about .* has 10 bytes free"):
        ti.write_text_atomic(tmp_path / "r.json", "{}" * 100)
    assert list(tmp_path.iterdir()) == []


SIGTERM_SCRIPT = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    from evo_rewrite.targets.pytorch import PyTorchTarget
    from evo_rewrite.cli import main

    def slow(self, program, path):
        path.write_bytes(b"partial" * 1000)
        Path(sys.argv[1]).write_text("writing")
        time.sleep(60)

    PyTorchTarget.write = slow
    sys.exit(main(sys.argv[2:]))
    """)


@pytest.mark.slow
def test_sigterm_during_write_leaves_nothing(tmp_path, factory):
    script = tmp_path / "slow.py"
    script.write_text(SIGTERM_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "marker"
    before = _digest(factory)
    proc = subprocess.Popen([sys.executable, str(script), str(marker), f"{factory}:make", "-o", str(out / "m.pt2"),
                             "--report-json", str(out / "r.json"), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "write never started"
        assert any(p.name.startswith(".m.pt2.") for p in out.iterdir())  # the temporary directory exists mid-write
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    line = _one_line_error(err)
    assert "terminated (signal 15)" in line
    assert list(out.iterdir()) == []
    assert _digest(factory) == before


# ---- modes, --explain, -q ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One run with umask 027: a .pt2 and the JSON report (and a lossy pass for the report checks)."""
    d = tmp_path_factory.mktemp("written")
    (d / "models.py").write_text(FACTORY)
    old = os.umask(0o027)
    try:
        code = main([f"{d / 'models.py'}:make", "--passes", "test-noise(scale=0.01)", "-o", str(d / "m.pt2"),
                     "--report-json", str(d / "r.json"), "-q"])
    finally:
        os.umask(old)
    return code, d


def test_outputs_respect_umask(written):
    code, d = written
    assert code == 0
    assert stat.S_IMODE((d / "m.pt2").stat().st_mode) == 0o640
    assert stat.S_IMODE((d / "r.json").stat().st_mode) == 0o640
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_directory_outputs_respect_umask(tmp_path, capsys):
    import evo_rewrite.target_infra as ti

    staged = tmp_path / "dir"
    (staged / "sub").mkdir(parents=True)
    (staged / "sub" / "w.bin").write_bytes(b"1")
    staged.chmod(0o700)
    old = os.umask(0o002)
    try:
        ti._publish_modes(staged)
    finally:
        os.umask(old)
    assert stat.S_IMODE(staged.stat().st_mode) == 0o775
    assert stat.S_IMODE((staged / "sub" / "w.bin").stat().st_mode) == 0o664


def test_lossy_pass_is_not_reported_as_verified_yes(written):
    _, d = written
    rep = json.loads((d / "r.json").read_text())
    noise = rep["passes"][0]
    assert noise["quality"] == "lossy" and noise["verified"] is True
    assert noise["measured_on"] == "random tokens of another size and seed, not real data"
    assert any("random example tokens, not real data" in n for n in rep["notes"])
    assert rep["verify_inputs"][-1].endswith("(another seed)")


def test_report_table_says_lossy(capsys, factory, tmp_path):
    code, out, err = _run(capsys, f"{factory}:make", "--passes", "test-noise(scale=0.01),flash", "--min-cosine", "0.5",
                          "-o", tmp_path / "m.pt2")
    assert code == 0, err
    row = next(ln for ln in out.splitlines() if ln.startswith("test-noise"))
    assert " lossy " in row and " yes " not in row
    assert "lossy, within your thresholds (cosine >= 0.5): cosine 0." in out
    assert next(ln for ln in out.splitlines() if ln.startswith("flash")).split()[3] == "yes"  # exact: yes
    assert "WARNING: lossy passes were measured on random example tokens" in err


def test_explain_without_output_writes_nothing(capsys, tmp_path, factory, monkeypatch):
    monkeypatch.chdir(tmp_path)
    listing = _listing(tmp_path)
    code, out, err = _run(capsys, f"{factory}:make", "--explain", "-q")
    assert code == 0 and "attention?" in out and out.count("yes: BHSD") == 1
    assert _listing(tmp_path) == listing


def test_quiet_silences_library_progress(capsys, tmp_path, factory, monkeypatch):
    for k in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(k, raising=False)
    code, out, err = _run(capsys, f"{factory}:make", "--explain", "-q")
    assert code == 0 and err == ""
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"


# ---- calibration ------------------------------------------------------------------------------------

def _calib(path: Path, order, rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"input_ids": torch.randint(0, 256, (rows, 16), generator=g), "attention_mask": torch.ones(rows, 16, dtype=torch.long)}
    torch.save({k: t[k] for k in order}, path)
    return path


@pytest.mark.slow
def test_calibration_matched_by_name_not_order(capsys, tmp_path, factory):
    figures = []
    for order in (("input_ids", "attention_mask"), ("attention_mask", "input_ids")):
        cal = _calib(tmp_path / f"{order[0]}.pt", order)
        rep = tmp_path / f"{order[0]}.json"
        code, out, err = _run(capsys, f"{factory}:enc", "--passes", "gqa(kv_heads=2,method=fit)", "--calibration", cal,
                              "-o", tmp_path / f"{order[0]}.pt2", "--report-json", rep, "-q")
        assert code == 0, err
        p = json.loads(rep.read_text())["passes"][0]
        assert p["measured_on"].startswith("1 held-out calibration batch(es) (input_ids:int64[2, 16]")
        figures.append(p["metrics"]["cosine"])
    assert figures[0] == pytest.approx(figures[1], abs=1e-9)


@pytest.mark.parametrize("names,pattern", [
    (("input_ids", "attention_mask", "ids"), r"calibration batch 1 has input\(s\) ids that the model's forward does not "
                                             r"take here; it takes: input_ids, attention_mask"),
    (("input_ids",), r"calibration batch 1 lacks input\(s\) attention_mask; the captured model takes: input_ids, "
                     r"attention_mask"),
])
def test_calibration_unknown_or_missing_names(capsys, tmp_path, factory, names, pattern):
    t = {n: torch.randint(0, 2, (4, 16)) for n in names}
    torch.save(t, tmp_path / "c.pt")
    _refused(capsys, tmp_path, [f"{factory}:enc", "--passes", "gqa(kv_heads=2,method=fit)", "--calibration",
                                tmp_path / "c.pt", "-o", tmp_path / "m.pt2", "-q"], 2, pattern, [factory])


def test_calibration_split_holds_back_the_last_quarter():
    from evo_rewrite.api import split_held_out
    from evo_rewrite.inputs import Inputs

    batches = [Inputs((), {"x": torch.full((2, 3), i)}) for i in range(8)]
    fit, held, how = split_held_out(batches)
    assert len(fit) == 6 and [int(b.kwargs["x"][0, 0]) for b in held] == [6, 7] and "last 2 held out" in how
    fit, held, how = split_held_out([Inputs((), {"x": torch.arange(8)[:, None]})])
    assert fit[0].kwargs["x"].shape[0] == 6 and held[0].kwargs["x"].flatten().tolist() == [6, 7]
    fit, held, how = split_held_out([Inputs((), {"x": torch.zeros(1, 4)})])
    assert held == [] and "random tokens" in how
