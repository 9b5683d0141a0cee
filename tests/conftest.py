import dataclasses
import os
from typing import ClassVar, Literal

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`-n 2`, README's command) each worker gets an equal share of the cores: two workers with
# torch's default of one thread per core would oversubscribe the 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

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


# Heavy tests (> 4 s on the 2-core machine) whose module keeps lighter tests of the same promise in the fast
# subset are `slow`: whole functions by `@pytest.mark.slow` in their module, single parametrizations here, so
# the subset stays under 5 minutes. Test ids as pytest prints them, relative to tests/.
# An entry that names a test of a collected module that no longer exists is an error (no silent drop-out).
HEAVY = {
    "test_heal.py::test_heal_reduces_distillation_loss_and_error_on_held_back_data",  # test_heal: data errors, CUDA
    "test_gqa.py::test_auto_is_the_default_and_chooses_the_fewest_heads_within_the_thresholds",
    "test_gqa.py::test_cli_calibration_file",  # the CLI calibration path: test_cli, test_outputs_hostile
    "test_gqa.py::test_fit_beats_mean",
    "test_gqa.py::test_fit_is_exact_under_rotary_when_nothing_is_merged_away",
    "test_gqa.py::test_hf_checkpoint_output_reloads_with_fewer_kv_heads",
    "test_gqa.py::test_hf_models[gpt2-2-2]",
    "test_gqa.py::test_hf_models[bert-1-2]",
    "test_gqa.py::test_auto_loose_thresholds_go_to_one_head",
    "test_share_layers.py::test_calibration_inputs_are_used_without_padding",
    "test_onnx.py::test_onnx_attention_fully_masked_rows_refused",
    "test_onnx.py::test_cli_target_onnx",  # CLI to ONNX: test_real_sizes' bf16 export
    "test_onnx.py::test_gqa_then_flash_keeps_grouped_heads",
    "test_onnx.py::test_zoo_models[encoder-onnx]",  # gpt-ort stays
    "test_onnx.py::test_zoo_models[encoder-ort]",
    "test_onnx.py::test_zoo_models[gpt-onnx]",
    "test_onnx.py::test_verification_failure_writes_nothing",  # failure paths: test_outputs_hostile
    "test_onnx.py::test_fp16_variant",  # fp16: test_real_sizes::test_bf16_program_exports_to_onnx[fp16]
    "test_tensor_parallel.py::test_degree_must_divide_heads_with_valid_degrees",
    "test_spellings.py::test_issue_bmm_3d_through_onnx[onnx]",
    "test_call_like_original.py::test_wrong_dtype_is_refused_naming_the_input[result]",
    "test_flash_hf.py::test_flash_fuses_every_site[gpt2]",  # [bert] stays; llama: test_decoder, test_generate
    "test_flash_hf.py::test_flash_fuses_every_site[llama]",
    "test_fuse_training.py::test_zoo_llama_sites[gemma-interleaved]",  # [llama] stays
    "test_hostile_suite.py::test_hostile[src-pickled_weight-plain]",  # the other pickled sources stay
    "test_share_layers.py::test_full_rank_residual_is_exact[gpt-32-activation]",  # [bert-16-*] stay
    "test_share_layers.py::test_full_rank_residual_is_exact[llama-16-svd]",  # [llama-16-activation] stays
    "test_share_layers.py::test_full_rank_residual_is_exact[gpt-32-svd]",
    "test_gqa.py::test_hf_models[llama-1-2]",  # gqa on llama: test_decoder::test_gqa_shrinks_the_cache
    "test_spellings.py::test_issue_bmm_3d_through_onnx[ort]",  # ONNX + ORT: test_onnx's softcap spelling
    "test_bf16.py::test_composes[gqa(kv_heads=2),bf16]",  # [flash,bf16] stays
    "test_fuse.py::test_hand_written_spellings[layernorm-fused-gate-up]",  # [llama-*], [gemma-*] stay
    "test_fuse.py::test_hand_written_spellings[plain-geglu-interleaved]",
    "test_call_like_original.py::test_wrong_dtype_is_refused_naming_the_input[loaded]",  # dtypes: test_sources_hostile
    "test_bf16.py::test_dtypes_follow_the_autocast_policy[encoder]",  # [gpt] stays
    "test_capture.py::test_program_runs_under_autocast[hf]",
    "test_onnx.py::test_softcap_spelling_to_onnx[onnx]",  # [ort] stays
    "test_gqa.py::test_zoo_ratios_shapes_and_kv_cache[gpt-2]",  # [gpt-1], [encoder-2] stay
    "test_gqa.py::test_zoo_ratios_shapes_and_kv_cache[encoder-1]",
    "test_flash_hf.py::test_every_layer_reads_one_mask_tensor[flash-dtype1-0]",  # [flash-dtype0-0] (fp32) stays
    "test_flash_hf.py::test_every_layer_reads_one_mask_tensor[bf16,flash-dtype2-1]",
}


# the files that take longest in CI (about 15 and 13 minutes of the 56 a serial run takes on 2 cores)
LONGEST_FILES = ("test_spellings.py", "test_onnx.py")


def pytest_collection_modifyitems(config, items):
    from hf_configs import ARCHITECTURES

    sweep = set(ARCHITECTURES)
    collected = {item.nodeid.split("tests/", 1)[-1] for item in items}
    modules = {n.split("::", 1)[0] for n in collected}
    stale = sorted(h for h in HEAVY if h.split("::", 1)[0] in modules and h not in collected
                   and not any("::" in a for a in config.args) and not config.getoption("keyword")
                   and not config.getoption("deselect"))
    if stale:
        raise pytest.UsageError(f"tests/conftest.py HEAVY names tests that do not exist: {', '.join(stale)}")
    # the longest files first: with `-n 2` (one worker per file) a long file started last would run alone
    rank = {f: i for i, f in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1], len(rank)))
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        arch = params.get("arch")
        fast = FAST_ONNX_ARCHS if item.module.__name__ == "test_onnx" else FAST_ARCHS
        if (isinstance(arch, str) and arch in sweep and arch not in fast) or item.nodeid.split("tests/", 1)[-1] in HEAVY:
            item.add_marker(pytest.mark.slow)
