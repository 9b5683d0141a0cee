"""Hugging Face target: a checkpoint directory when the source was a transformers model and the
rewrite is expressible in its config (GQA -> ``num_key_value_heads``), so transformers and every
runtime that reads HF checkpoints get the smaller KV cache.

The weights come from the rewritten program (named by module path, as in the source model), the
config is the source's with ``num_key_value_heads`` set; the directory is reloaded with
``from_pretrained`` and checked against the program on the example inputs before it is moved into
place (``evo_rewrite.target_infra.emit``). Written only when asked for: ``--target hf`` or
``--hf-output DIR``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar

import torch

from evo_rewrite.attention import attention_sites
from evo_rewrite.decoder import is_decoder, verify_decoder
from evo_rewrite.errors import UsageError, VerificationError, quiet
from evo_rewrite.program import Program
from evo_rewrite.target_infra import Target, TargetReport, emit, register_target
from evo_rewrite.verify import compare_outputs, tolerance

__all__ = ["HuggingFaceTarget", "save_hf", "hf_expressible"]


def _config(program: Program, transformers):
    cls = getattr(transformers, program.source.hf_class)
    config = cls.config_class.from_dict(dict(program.source.hf_config))
    kv = {site.kv_heads for site in attention_sites(program.module) if site.kv_heads}
    if len(kv) == 1 and hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv.pop()
    config.use_cache = True
    return cls, config


def hf_expressible(program: Program) -> str | None:
    """None when the program can be written as an HF checkpoint, else the reason it cannot.

    Decided from the program, not from which passes ran: the source's class, built (on the meta device)
    from the source's config with the program's K/V head count, must take exactly the program's weights
    with their shapes. The written checkpoint is then checked against the program by running it.
    """
    s = program.source
    if not s.hf_config or not s.hf_class:
        return "the source is not a Hugging Face model"
    try:
        import transformers
    except ImportError:
        return "transformers is not installed: pip install 'evo-rewrite[hf]'"
    kv = {site.kv_heads for site in attention_sites(program.module) if site.kv_heads}
    if len(kv) > 1:
        return f"sites have different K/V head counts {sorted(kv)}, which one num_key_value_heads cannot say"
    cls, config = _config(program, transformers)
    heads = getattr(config, "num_attention_heads", None)
    if kv and not hasattr(config, "num_key_value_heads") and kv != {heads}:
        return f"{s.hf_class}'s config has no num_key_value_heads (the program has {kv.pop()} K/V heads, {heads} query heads)"
    with torch.device("meta"):
        model = cls(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(t.shape) for k, t in program.named_tensors().items() if isinstance(t, torch.nn.Parameter)}
    extra = [k for k in have if k not in want]
    if extra:
        return (f"the program has weights {s.hf_class} does not ({', '.join(extra[:3])}"
                f"{' ...' if len(extra) > 3 else ''}): a transformers config cannot express this rewrite")
    wrong = [k for k in have if want[k] != have[k]]
    if wrong:
        return f"weight {wrong[0]} has shape {list(have[wrong[0]])}, {s.hf_class} with this config expects {list(want[wrong[0]])}"
    return None


def _build(program: Program):
    """The transformers model holding the program's weights, ready for save_pretrained."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cls, config = _config(program, transformers)
    tensors = program.named_tensors()
    state = {k: v.detach() for k, v in tensors.items()}
    first = next(t for t in state.values() if t.is_floating_point())
    device, dtype = first.device, first.dtype
    with device:
        model = cls(config).to(dtype)  # real (not meta) init, so buffers the graph never reads exist too
    model.tie_weights()
    # tied weights (embedding and LM head) are one tensor under two names; the program keeps one of them
    # (either, depending on how the source was loaded), which fills both
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    covered = {n for group in names.values() if any(g in state for g in group) for n in group}
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = dict(model.named_buffers())
    # export's lifted constants (lifted_tensor_N) are graph constants, not model weights
    unexpected = [u for u in unexpected if u not in buffers and isinstance(tensors[u], torch.nn.Parameter)]
    if unexpected:
        raise VerificationError(f"the rewritten weights do not fit {cls.__name__} with the new config: unexpected {unexpected[:3]}")
    missing = [m for m in missing if m not in buffers and m not in covered]
    if missing:
        raise VerificationError(f"the rewritten program does not provide {missing[:3]} for {cls.__name__}")
    model.tie_weights()
    return cls, model, dtype, device


@register_target
@dataclasses.dataclass(frozen=True)
class HuggingFaceTarget(Target):
    """A Hugging Face checkpoint directory (config + safetensors) that from_pretrained loads."""

    name: ClassVar[str] = "hf"
    summary: ClassVar[str] = ("a Hugging Face checkpoint directory, when the rewrite fits the source's config "
                              "(GQA -> num_key_value_heads)")
    suffix: ClassVar[str] = ""

    def validate(self, program: Program | None, out: Path | None = None) -> None:
        if program is None:
            return
        reason = hf_expressible(program)
        if reason:
            raise UsageError(f"cannot write a Hugging Face checkpoint: {reason}")

    def output_name(self, program: Program, stem: str) -> str:
        return f"{stem}.rewritten-hf"

    def write(self, program: Program, path: Path) -> TargetReport:
        with quiet():  # transformers draws progress bars while it writes shards
            cls, model, _, _ = _build(program)
            model.save_pretrained(path)
        return TargetReport()

    def check(self, program: Program, path: Path, report: TargetReport) -> None:
        cls = getattr(__import__("transformers"), program.source.hf_class)
        first = next(t for t in program.named_tensors().values() if t.is_floating_point())
        with quiet():
            reloaded = cls.from_pretrained(path, attn_implementation="eager", local_files_only=True,
                                           dtype=first.dtype).to(first.device).eval()
        if is_decoder(program):  # prefill and decode steps, each with its own cache
            ids = next(v for k, v in program.inputs.kwargs.items() if k == "input_ids")
            check = verify_decoder(program, reloaded, ids, steps=2)
            report.notes.append(f"decode steps checked against the reloaded checkpoint: max rel error "
                                f"{check.max_rel_error:.2g}")
            return
        inputs = program.inputs
        with torch.no_grad():
            ref = program(inputs)
            got = reloaded(*inputs.args, **inputs.kwargs, use_cache=False)
        key = next(iter(ref)) if isinstance(ref, dict) else 0  # the first output (logits / last_hidden_state)
        metrics, problem, dtype = compare_outputs(ref[key], got[key])
        if problem or metrics.get("max_rel_error", 0) > tolerance(dtype):
            raise VerificationError(f"the Hugging Face checkpoint does not reproduce the rewritten program: "
                                    f"{problem or 'max relative error %.3g' % metrics['max_rel_error']}")


def save_hf(program: Program, out_dir: str | os.PathLike) -> str:
    """Write, reload and check a Hugging Face checkpoint directory; return its path."""
    return emit(program, HuggingFaceTarget(), out_dir).path
