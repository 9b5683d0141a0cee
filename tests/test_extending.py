"""docs/extending.md's pass and target, exactly as printed there, run from the CLI through entry points.

The two ```python blocks of the page become a package in a temporary directory with a ``.dist-info``
that declares the entry points, the way ``pip install`` would leave it; the CLI runs in a fresh process
with that directory on its path, so nothing but the entry points tells evo-rewrite about them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _blocks() -> list[str]:
    text = (ROOT / "docs" / "extending.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _install(site: Path) -> None:
    pass_src, target_src = _blocks()
    pkg = site / "my_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "gelu_tanh.py").write_text(pass_src)
    (pkg / "graph_text.py").write_text(target_src)
    info = site / "my_evo_ext-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-evo-ext\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[evo_rewrite.passes]\ngelu-tanh = my_pkg.gelu_tanh:GeluTanh\n\n"
                                           "[evo_rewrite.targets]\ngraph-text = my_pkg.graph_text:GraphText\n")


def _cli(site: Path, cwd: Path, *args):
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evo_rewrite.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_page_has_one_pass_and_one_target():
    blocks = _blocks()
    assert len(blocks) == 2 and "register_pass" in blocks[0] and "register_target" in blocks[1]
    assert all(len(b.strip().splitlines()) <= 45 for b in blocks)  # "about 30 lines each"


@pytest.mark.slow
def test_third_party_pass_and_target_run_from_the_cli(tmp_path):
    site = tmp_path / "site"
    _install(site)
    listed = _cli(site, tmp_path, "--list-passes", "--list-targets")
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"^gelu-tanh\s+lossy", listed.stdout, re.M) and re.search(r"^graph-text\s+\.txt", listed.stdout, re.M)
    assert "    modules (list of str, default ())" in listed.stdout

    run = _cli(site, tmp_path, "evo_rewrite.zoo:gpt", "--passes", "flash,gelu-tanh", "--target", "graph-text",
               "-o", "gpt.txt", "-q")
    assert run.returncode == 0, run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith("gelu-tanh"))
    assert row.split()[1] == "4"  # four GELUs rewritten
    text = (tmp_path / "gpt.txt").read_text()
    assert text.startswith("# pipeline: flash,gelu-tanh")
    assert text.count("target=torch.ops.aten.scaled_dot_product_attention") == 4
    assert text.count("kwargs = {approximate: tanh}") == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt.txt", "site"]  # nothing else left behind

    # the option of the pass, and a pass that does not fire where it must not
    run = _cli(site, tmp_path, "evo_rewrite.zoo:gpt", "--passes", "gelu-tanh(modules=[h.0.*])", "-o", "g.pt2", "-q")
    assert run.returncode == 0, run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith("gelu-tanh"))
    assert row.split()[1:3] == ["1", "3"]  # one rewrite, three GELUs skipped outside h.0

    bad = _cli(site, tmp_path, "evo_rewrite.zoo:gpt", "--target", "graph-text(colour=red)", "-o", "x.txt")
    assert bad.returncode == 2 and "target 'graph-text' has no option 'colour'" in bad.stderr
