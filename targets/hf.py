"""Hugging Face target: a checkpoint directory when the source was a transformers model and the
rewrite is expressible in its config (GQA -> ``num_key_value_heads``), so transformers and every
runtime that reads HF checkpoints get the smaller KV cache.

The weights come from the rewritten program (named by module path, as in the source model), the
config is the source's with ``num_key_value_heads`` set; the directory is reloaded with
``from_pretrained``, checked against the program on the example inputs, and only then moved into
place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from evo_rewrite.attention import attention_sites
from evo_rewrite.errors import OutputError, UsageError, VerificationError
from evo_rewrite.program import Program
from evo_rewrite.verify import compare_outputs, tolerance

__all__ = ["save_hf", "hf_expressible"]

# passes whose result a transformers config can describe (flash changes no weight)
_EXPRESSIBLE = {"gqa", "flash"}


def hf_expressible(program: Program) -> str | None:
    """None when the program can be written as an HF checkpoint, else the reason it cannot."""
    s = program.source
    if not s.hf_config or not s.hf_class:
        return "the source is not a Hugging Face model"
    others = [a for a in program.applied if a.split("(")[0] not in _EXPRESSIBLE]
    if others:
        return f"{', '.join(others)} cannot be expressed in a transformers config"
    if any(a.startswith("gqa") for a in program.applied):
        if "num_key_value_heads" not in s.hf_config:
            return f"{s.hf_class}'s config has no num_key_value_heads"
        kv = {site.kv_heads for site in attention_sites(program.module)}
        if len(kv) != 1:
            return f"sites have different K/V head counts {sorted(kv)}"
    return None


def save_hf(program: Program, out_dir: str | os.PathLike) -> str:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    reason = hf_expressible(program)
    if reason:
        raise UsageError(f"cannot write a Hugging Face checkpoint: {reason}")
    out = Path(out_dir)
    if out.exists():
        raise OutputError(f"{out} already exists; choose another directory for the Hugging Face checkpoint")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {out}: directory {parent} is missing or not writable")
    cls = getattr(transformers, program.source.hf_class)
    config = cls.config_class.from_dict(dict(program.source.hf_config))
    if any(a.startswith("gqa") for a in program.applied):
        config.num_key_value_heads = attention_sites(program.module)[0].kv_heads
    config.use_cache = True
    tensors = program.named_tensors()
    state = {k: v.detach() for k, v in tensors.items()}
    first = next(t for t in state.values() if t.is_floating_point())
    device, dtype = first.device, first.dtype
    with device:
        model = cls(config).to(dtype)  # real (not meta) init, so buffers the graph never reads exist too
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = dict(model.named_buffers())
    # export's lifted constants (lifted_tensor_N) are graph constants, not model weights
    unexpected = [u for u in unexpected if u not in buffers and isinstance(tensors[u], torch.nn.Parameter)]
    if unexpected:
        raise VerificationError(f"the rewritten weights do not fit {cls.__name__} with the new config: unexpected {unexpected[:3]}")
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    missing = [m for m in missing if m not in buffers and m not in tied]
    if missing:
        raise VerificationError(f"the rewritten program does not provide {missing[:3]} for {cls.__name__}")
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        model.save_pretrained(tmp)
        reloaded = cls.from_pretrained(tmp, attn_implementation="eager", local_files_only=True, dtype=dtype).to(device).eval()
        inputs = program.inputs
        with torch.no_grad():
            ref = program(inputs)
            got = reloaded(*inputs.args, **inputs.kwargs, use_cache=False)
        key = next(iter(ref)) if isinstance(ref, dict) else 0  # the first output (logits / last_hidden_state)
        ref_t, got_t = ref[key], got[key]
        metrics, problem, dtype = compare_outputs(ref_t, got_t)
        if problem or metrics.get("max_rel_error", 0) > tolerance(dtype):
            raise VerificationError(f"the Hugging Face checkpoint does not reproduce the rewritten program: "
                                    f"{problem or 'max relative error %.3g' % metrics['max_rel_error']}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
