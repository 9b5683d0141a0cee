"""The layering of docs/design.md, enforced by import-linter, and the one import package a wheel installs."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _installed_layout(dest: Path) -> Path:
    """The package as an install lays it out (evo_rewrite/, evo_rewrite/passes/, evo_rewrite/targets/).

    import-linter reads packages from disk; an editable install maps three folders onto one package,
    which it cannot follow, so the check runs on the layout a wheel installs.
    """
    pkg = dest / "evo_rewrite"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "rewriter", pkg, ignore=ignore)
    shutil.copytree(ROOT / "passes", pkg / "passes", ignore=ignore)
    shutil.copytree(ROOT / "targets", pkg / "targets", ignore=ignore)
    return dest


def test_import_linter_contracts_hold(tmp_path):
    pytest.importorskip("importlinter", reason="pip install import-linter (the [test] extra installs it)")
    site = _installed_layout(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for contract in ("the core imports no pass and no target", "passes and targets do not import each other",
                     "the core does not import the face"):
        assert f"{contract} KEPT" in out
    assert "Contracts: 3 kept, 0 broken" in out


def test_import_linter_catches_a_core_module_importing_a_pass(tmp_path):
    """The contract is not vacuous: a core module that imports a pass breaks it."""
    pytest.importorskip("importlinter", reason="pip install import-linter (the [test] extra installs it)")
    site = _installed_layout(tmp_path / "site")
    with open(site / "evo_rewrite" / "figures.py", "a") as f:
        f.write("\n\ndef _leak():\n    from evo_rewrite.passes import flash  # noqa: F401\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "the core imports no pass and no target BROKEN" in out
    assert "evo_rewrite.figures -> evo_rewrite.passes.flash" in out


def test_wheel_installs_one_package_evo_rewrite(tmp_path):
    """pip install . puts evo_rewrite (with passes/ and targets/ inside) and no generic top-level names."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("evo_rewrite-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"evo_rewrite"}
    assert {"evo_rewrite/passes/flash.py", "evo_rewrite/targets/onnx.py", "evo_rewrite/cli.py"} <= set(names)
    eps = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(eps).decode()
    assert "[evo_rewrite.passes]" in text and "flash = evo_rewrite.passes.flash:Flash" in text
    assert "[evo_rewrite.targets]" in text and "onnx = evo_rewrite.targets.onnx:OnnxTarget" in text
