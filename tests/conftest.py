import dataclasses
import os
from typing import ClassVar, Literal

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

import evo_rewrite  # noqa: E402
from evo_rewrite import Pass, PassResult, Skip, register_pass  # noqa: E402


@register_pass
@dataclasses.dataclass(frozen=True)
class CorruptPass(Pass):
    """Test pass: claims to be exact but scales one weight (must be rolled back)."""

    name: ClassVar[str] = "test-corrupt"
    exact: ClassVar[bool] = True
    target: str = "h.1.attn.c_proj.weight"
    factor: float = 1.5

    def run(self, program):
        t = program.get_tensor(self.target)
        program.set_tensor(self.target, t.detach() * self.factor)
        return PassResult(program, rewrites=1)


@register_pass
@dataclasses.dataclass(frozen=True)
class NoisePass(Pass):
    """Test pass: lossy; adds relative noise of size `scale` to every Linear weight it can find."""

    name: ClassVar[str] = "test-noise"
    exact: ClassVar[bool] = False
    scale: float = 1e-3
    mode: Literal["weights", "none"] = "weights"

    def __post_init__(self):
        if self.scale < 0:
            raise ValueError(f"scale must be >= 0, got {self.scale}")

    def run(self, program):
        if self.mode == "none":
            return PassResult(program, 0, [Skip("mode=none", "", "")], message="mode=none changes nothing")
        g = torch.Generator().manual_seed(0)
        n = 0
        for name, t in program.named_tensors().items():
            if name.endswith("weight") and t.dim() == 2 and t.is_floating_point():
                program.set_tensor(name, t.detach() + self.scale * t.detach().abs().mean() * torch.randn(t.shape, generator=g))
                n += 1
        return PassResult(program, n)


@register_pass
@dataclasses.dataclass(frozen=True)
class CrashPass(Pass):
    """Test pass: raises."""

    name: ClassVar[str] = "test-crash"
    exact: ClassVar[bool] = True

    def run(self, program):
        raise RuntimeError("boom")


@pytest.fixture(scope="session")
def gpt():
    from evo_rewrite import zoo

    return zoo.gpt()


@pytest.fixture(scope="session")
def gpt_program():
    from evo_rewrite import zoo

    model, inputs = zoo.gpt()
    return evo_rewrite.prepare(model, inputs)


@pytest.fixture(scope="session")
def encoder_program():
    from evo_rewrite import zoo

    model, inputs = zoo.encoder()
    return evo_rewrite.prepare(model, inputs)


# ---- the fast subset (pytest -m "not slow") --------------------------------------------------------------
# Architecture sweeps keep three representatives in the fast subset (a decoder with rotary and GQA, an
# encoder, a Conv1D GPT); the other architectures of a sweep are `slow`. CI runs everything.
FAST_ARCHS = {"llama", "bert", "gpt2"}
# ONNX export per architecture takes seconds: architecture sweeps of the ONNX target are all slow
FAST_ONNX_ARCHS: set[str] = set()  # the zoo models cover the ONNX target in the fast subset


def pytest_collection_modifyitems(config, items):
    from hf_configs import ARCHITECTURES

    sweep = set(ARCHITECTURES)
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        arch = params.get("arch")
        fast = FAST_ONNX_ARCHS if item.module.__name__ == "test_onnx" else FAST_ARCHS
        if isinstance(arch, str) and arch in sweep and arch not in fast:
            item.add_marker(pytest.mark.slow)
