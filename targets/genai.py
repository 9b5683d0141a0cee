"""GenAI target: an ONNX Runtime GenAI model directory that ``onnxruntime_genai.Model(DIR)`` runs.

The program must be a decoder program (a causal LM captured with its cache, rewriter/decoder.py).
The directory holds

* ``model.onnx`` + ``model.onnx.data`` (external weights): inputs ``input_ids``, ``attention_mask``,
  ``past_key_values.N.key/value`` (and ``position_ids`` where rotary stays outside attention); outputs
  ``logits``, ``present.N.key/value``;
* every attention site one ``com.microsoft.GroupQueryAttention`` taking the new K/V and the past and
  returning the present (``seqlens_k`` and ``total_sequence_length`` derived from the attention mask
  inside the graph, as GenAI's own builder does);
* ``genai_config.json`` (the decoder's names, heads, layers, search defaults from the source's config);
* the tokenizer files copied from the source model directory.

How: attention must be fused first (``prepare`` asks for ``flash``, verified like any pass). Each
``scaled_dot_product_attention`` over ``cat(past, new)`` then becomes one ``evo_rewrite_genai::gqa``
node (this module's operator: the same arithmetic in PyTorch, causal with the past as offset plus the
padding mask; GroupQueryAttention in ONNX through a custom translation); the program is exported by
``torch.onnx`` (dynamo) with the pytorch target's re-export, and cleaned with onnxscript's optimizer
and ORT fusions (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization). ``genai_graph`` then
gives the graph the form of GenAI's own builder (options, all on by default):

* ``rotary``: rotary embedding inside GroupQueryAttention (``do_rotary=1``) with one cos/sin cache pair
  shared by every layer, computed by the graph's own rotary at positions 0..context_length-1; the
  ``position_ids`` input goes (GQA rotates at past length + i, what GenAI feeds);
* ``pack_qkv``: one MatMul with the concatenated Q/K/V weights feeding GQA's packed ``query`` input;
* ``pack_mlp``: one gate/up MatMul and a Split (measured 3% faster decode on CPU, docs/targets/genai.md);
* ``share_buffer``: ``past_present_share_buffer`` in genai_config.json (GenAI keeps one K/V buffer of the
  maximum length that GroupQueryAttention writes in place);

with no Reshape/Transpose left around attention. ``check`` loads the directory in ``onnxruntime_genai``
and requires its greedy tokens for a short prompt to equal the PyTorch program's (``evo_rewrite.generate``).

Not done (yet): fp16/int4, partial rotary inside the operator (kept outside, with a note).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import operator
import shutil
import warnings
from pathlib import Path
from typing import ClassVar

import torch
import torch.fx as fx

from evo_rewrite.attention import SDPA_OPS, find_attention
from evo_rewrite.decoder import PAST, PRESENT, is_decoder, not_causal_lm_message
from evo_rewrite.errors import RewriteError, UsageError, VerificationError
from evo_rewrite.program import Program
from evo_rewrite.target_infra import Target, TargetReport, register_target

__all__ = ["GenAITarget", "GenAIReport", "GENAI_GQA", "TOKENIZER_FILES"]

aten = torch.ops.aten
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
CHECK_PROMPT_TOKENS = 8
CHECK_NEW_TOKENS = 8


# ---- the operator: attention over past + new keys, as GroupQueryAttention computes it -----------------

@torch.library.custom_op("evo_rewrite_genai::gqa", mutates_args=())
def gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
        past_value: torch.Tensor, attention_mask: torch.Tensor, num_heads: int, kv_heads: int,
        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query (B, H, S, D), key/value (B, Hkv, S, D), past (B, Hkv, P, D), attention_mask (B, P+S) ->
    (output (B, H, S, D), present_key, present_value (B, Hkv, P+S, D)). Causal with offset P; masked
    positions (0 in attention_mask) take no weight."""
    k_all, v_all = torch.cat([past_key, key], -2), torch.cat([past_value, value], -2)
    s, t = query.shape[-2], k_all.shape[-2]
    causal = torch.arange(t, device=query.device)[None, :] <= (t - s) + torch.arange(s, device=query.device)[:, None]
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~allowed, torch.finfo(query.dtype).min)
    out = torch.nn.functional.scaled_dot_product_attention(query, k_all, v_all, attn_mask=bias, scale=scale,
                                                           enable_gqa=num_heads != kv_heads)
    return out, k_all, v_all


@gqa.register_fake
def _(query, key, value, past_key, past_value, attention_mask, num_heads, kv_heads, scale):
    return query.new_empty(query.shape), torch.cat([past_key, key], -2), torch.cat([past_value, value], -2)


GENAI_GQA = torch.ops.evo_rewrite_genai.gqa.default


def _register_gqa_schema() -> None:
    """Declare ORT's contrib GroupQueryAttention to the onnx package (onnxscript builds calls from schemas)."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("GroupQueryAttention", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    P = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    inputs = [P("query", "T"), P("key", "T", param_option=opt), P("value", "T", param_option=opt),
              P("past_key", "T", param_option=opt), P("past_value", "T", param_option=opt), P("seqlens_k", "M"),
              P("total_sequence_length", "M"), P("cos_cache", "T", param_option=opt),
              P("sin_cache", "T", param_option=opt)]
    outputs = [P("output", "T"), P("present_key", "T"), P("present_value", "T")]
    A = OpSchema.AttrType
    attrs = [OpSchema.Attribute("num_heads", A.INT, "query heads", required=True),
             OpSchema.Attribute("kv_num_heads", A.INT, "K/V heads", required=True),
             OpSchema.Attribute("scale", A.FLOAT, "scale of Q·Kᵀ", required=False),
             OpSchema.Attribute("do_rotary", A.INT, "rotary inside", required=False),
             OpSchema.Attribute("rotary_interleaved", A.INT, "interleaved rotary", required=False),
             OpSchema.Attribute("local_window_size", A.INT, "sliding window", required=False),
             OpSchema.Attribute("softcap", A.FLOAT, "score cap", required=False)]
    schema = OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float"),
                                        ("M", ["tensor(int32)"], "int32")], attributes=attrs)
    onnx.defs.register_schema(schema)


def _translations() -> dict:
    import onnxscript
    from onnxscript import opset18 as op

    _register_gqa_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)

    def gqa_onnx(query, key, value, past_key, past_value, attention_mask, num_heads: int, kv_heads: int,
                 scale: float):
        q = op.Reshape(op.Transpose(query, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
        k = op.Reshape(op.Transpose(key, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
        v = op.Reshape(op.Transpose(value, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
        seqlens = op.Cast(op.Sub(op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0),
                                 op.Constant(value_int=1)), to=6)  # int32: index of each row's last token
        total = op.Cast(op.Gather(op.Shape(attention_mask), op.Constant(value_int=1), axis=0), to=6)
        out, present_key, present_value = msft.GroupQueryAttention(
            q, k, v, past_key, past_value, seqlens, total, num_heads=num_heads, kv_num_heads=kv_heads, scale=scale,
            _outputs=3)
        out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, num_heads, -1])), perm=[0, 2, 1, 3])
        return out, present_key, present_value

    from evo_rewrite.ops import onnx_translations

    return {GENAI_GQA: gqa_onnx, **onnx_translations()}


# ---- the graph rewrite: SDPA over cat(past, new) -> one gqa node ---------------------------------------

def _cache_concat(n) -> tuple[fx.Node, fx.Node] | None:
    """(past placeholder, new K/V) of ``cat([past, new], -2)``."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.cat.default):
        return None
    parts, dim = n.args[0], (n.args[1] if len(n.args) > 1 else 0)
    if len(parts) != 2 or dim % 4 != 2 or getattr(parts[0], "op", None) != "placeholder":
        return None
    return parts[0], parts[1]


def to_gqa_nodes(program: Program) -> tuple[int, list[str]]:
    """Rewrite every SDPA over the cache into a gqa node in place; return (count, reasons for the rest)."""
    g = program.graph
    mask = next(n for n in program.placeholders() if n.name == "attention_mask")
    done, left = 0, []
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in SDPA_OPS:
            continue
        q, k, v = n.args[:3]
        kc, vc = _cache_concat(k), _cache_concat(v)
        qv, kv_ = q.meta.get("val"), k.meta.get("val")
        if kc is None or vc is None:
            left.append(f"{n.name}: K/V are not cat(past input, new) over the sequence")
            continue
        if n.kwargs.get("is_causal") or (len(n.args) > 5 and n.args[5]):
            pass  # causal is what GroupQueryAttention does anyway
        if (len(n.args) > 4 and n.args[4]) or n.kwargs.get("dropout_p"):
            left.append(f"{n.name}: dropout")
            continue
        heads, kv_heads, d = int(qv.shape[1]), int(kv_.shape[1]), int(qv.shape[-1])
        scale = n.kwargs.get("scale")
        scale = float(scale) if scale is not None else d ** -0.5
        with g.inserting_before(n):
            node = g.call_function(GENAI_GQA, (q, kc[1], vc[1], kc[0], vc[0], mask, heads, kv_heads, scale))
            out = g.call_function(operator.getitem, (node, 0))
            pk = g.call_function(operator.getitem, (node, 1))
            pv = g.call_function(operator.getitem, (node, 2))
        n.replace_all_uses_with(out)
        g.erase_node(n)
        for cat, present in ((k, pk), (v, pv)):
            cat.replace_all_uses_with(present)
            if not cat.users:
                g.erase_node(cat)
        done += 1
    g.eliminate_dead_code()
    program.module.recompile()
    return done, left


# ---- the target -------------------------------------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class GenAIReport(TargetReport):
    group_query_attention: int = 0
    attention_sites: int = 0
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    tokenizer_files: list[str] = dataclasses.field(default_factory=list)
    rotary_inside: int = 0  # GQA sites rotating Q/K themselves (do_rotary=1)
    packed_qkv: int = 0
    packed_mlp: int = 0
    share_buffer: bool = False
    inputs: list[str] = dataclasses.field(default_factory=list)
    genai_version: str = ""
    check_tokens: dict = dataclasses.field(default_factory=dict)  # prompt, genai, pytorch

    def lines(self) -> list[str]:
        top = ", ".join(f"{k} {v}" for k, v in list(self.op_counts.items())[:10])
        lines = [f"    GroupQueryAttention {self.group_query_attention} / attention sites {self.attention_sites}; "
                 f"operators ({sum(self.op_counts.values())}): {top}",
                 f"    rotary inside GQA {self.rotary_inside}, packed QKV {self.packed_qkv}, packed gate/up "
                 f"{self.packed_mlp}, past/present share buffer {'yes' if self.share_buffer else 'no'}",
                 f"    tokenizer files: {', '.join(self.tokenizer_files) or 'none'}"]
        if self.check_tokens:
            lines.append(f"    onnxruntime_genai {self.genai_version}: greedy tokens equal the PyTorch program's "
                         f"({len(self.check_tokens['genai'])} tokens)")
        return lines + [f"    note: {n}" for n in self.notes]


def _context_length(program: Program) -> int:
    return int((program.source.hf_config or {}).get("max_position_embeddings") or 2048)


def _genai_config(program: Program, layout, vocab: int, inputs: list[str], share_buffer: bool) -> dict:
    cfg = program.source.hf_config or {}
    heads = {c.kv_heads for c in layout.layers}
    dims = {c.head_dim for c in layout.layers}
    if len(heads) != 1 or len(dims) != 1:
        raise UsageError("onnxruntime_genai needs one K/V head count and head size for every layer; this program's "
                         f"cache has {sorted(heads)} K/V heads and head sizes {sorted(dims)}")
    eos = cfg.get("eos_token_id", 0)
    ctx = _context_length(program)
    q_heads = int(cfg.get("num_attention_heads") or next(iter(heads)))
    return {
        "model": {
            "bos_token_id": cfg.get("bos_token_id", 0), "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx", "head_size": next(iter(dims)),
                "hidden_size": int(cfg.get("hidden_size") or q_heads * next(iter(dims))),
                "inputs": {**{k: k for k in ("input_ids", "attention_mask", "position_ids") if k in inputs},
                           "past_key_names": f"{PAST}.%d.key", "past_value_names": f"{PAST}.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": f"{PRESENT}.%d.key",
                            "present_value_names": f"{PRESENT}.%d.value"},
                "num_attention_heads": q_heads, "num_hidden_layers": len(layout.layers),
                "num_key_value_heads": next(iter(heads)),
            },
            "eos_token_id": eos, "pad_token_id": cfg.get("pad_token_id") if cfg.get("pad_token_id") is not None else
            (eos[0] if isinstance(eos, list) else eos),
            "type": cfg.get("model_type", "llama"), "vocab_size": vocab,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": share_buffer, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _tokenizer_dir(program: Program) -> Path | None:
    for cand in (program.source.path, (program.source.hf_config or {}).get("_name_or_path")):
        if cand and Path(str(cand)).is_dir() and any((Path(str(cand)) / f).is_file() for f in TOKENIZER_FILES[:2]):
            return Path(str(cand))
    return None


@register_target
@dataclasses.dataclass(frozen=True)
class GenAITarget(Target):
    """An ONNX Runtime GenAI model directory (model.onnx with past/present K/V, genai_config.json, tokenizer)."""

    name: ClassVar[str] = "genai"
    summary: ClassVar[str] = ("ONNX Runtime GenAI directory: model.onnx with GroupQueryAttention over past/present K/V, "
                              "genai_config.json, tokenizer files; checked by generating in onnxruntime_genai")
    suffix: ClassVar[str] = ""

    tokenizer: str = ""  # directory to copy tokenizer files from (default: the source model directory)
    rotary: bool = True  # rotary embedding inside GroupQueryAttention, one shared cos/sin cache
    pack_qkv: bool = True  # one Q/K/V MatMul feeding GroupQueryAttention's packed input
    pack_mlp: bool = True  # one gate/up MatMul + Split (measured a little faster on CPU)
    share_buffer: bool = True  # past and present K/V in one buffer (past_present_share_buffer)

    def validate(self, program: Program | None, out: Path | None = None) -> None:
        if program is not None and not is_decoder(program):
            raise UsageError(not_causal_lm_message("--target genai", "this program (captured without its cache: "
                                                   "drop --no-cache)"))
        if out is not None and out.suffix == ".onnx":
            raise UsageError(f"--target genai writes a directory; give a path without .onnx (e.g. {out.with_suffix('')})")

    def prepare(self, program: Program) -> str:
        pending = [r for r in find_attention(program.module) if r.site is not None and not r.site.fused]
        return "flash" if pending else ""

    def output_name(self, program: Program, stem: str) -> str:
        return f"{stem}.genai"

    def write(self, program: Program, path: Path) -> GenAIReport:
        import onnx_ir as ir
        import onnxscript.optimizer
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        from .genai_graph import GraphOptions, rewrite_for_genai
        from .onnx_rules import rms_norm_to_ort
        from .pytorch import export_program

        work = program.clone()
        sites = sum(1 for r in find_attention(work.module) if r.site is not None)
        count, left = to_gqa_nodes(work)
        if left:
            raise RewriteError("cannot write a GenAI model: attention not over the cache at " + "; ".join(left[:3]))
        ep = export_program(work)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                onnx_program = torch.onnx.export(ep, (), dynamo=True, opset_version=23, optimize=True, verbose=False,
                                                 report=False, verify=False, custom_translation_table=_translations())
            except Exception as exc:  # noqa: BLE001
                import os
                if os.environ.get("EVO_REWRITE_DEBUG"):
                    raise
                msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise RewriteError(f"torch.onnx.export cannot export this decoder program: {msg}") from None
        model = onnx_program.model
        rms_norm_to_ort(model)
        onnxscript.optimizer.optimize(model)
        model, _ = optimize_for_ort(model)
        onnxscript.optimizer.optimize(model)
        # GenAI's names: inputs in placeholder order, outputs in the program's output order
        names_in = ["input_ids", "attention_mask", "position_ids"] + [
            f"{PAST}.{k}" for k in program.inputs.kwargs[PAST]]
        for v, name in zip(model.graph.inputs, names_in):
            v.name = name
        with torch.no_grad():
            out_names = list(program(program.inputs).keys())
        for v, name in zip(model.graph.outputs, out_names):
            v.name = name
        counts = rewrite_for_genai(model, GraphOptions(rotary=self.rotary, pack_qkv=self.pack_qkv,
                                                       pack_mlp=self.pack_mlp, context_length=_context_length(program)))
        presents = {v.name for v in model.graph.outputs if v.name.startswith(PRESENT)}
        share = self.share_buffer and all(
            (p := v.producer()) is not None and p.op_type == "GroupQueryAttention"
            for v in model.graph.outputs if v.name in presents)
        model.producer_name = "evo-rewrite"
        path.mkdir()
        ir.save(model, path / "model.onnx", external_data="model.onnx.data")
        vocab = int(program(program.inputs)["logits"].shape[-1])
        inputs = [v.name for v in model.graph.inputs]
        (path / "genai_config.json").write_text(json.dumps(
            _genai_config(program, program.annotations.kv_cache, vocab, inputs, share), indent=4))
        copied = []
        src = Path(self.tokenizer) if self.tokenizer else _tokenizer_dir(program)
        if src is not None:
            for f in TOKENIZER_FILES:
                if (src / f).is_file():
                    shutil.copy2(src / f, path / f)
                    copied.append(f)
        ops = collections.Counter(n.op_type for n in model.graph)
        notes = [] if copied else ["no tokenizer files found (give genai(tokenizer=DIR)); onnxruntime_genai needs them "
                                   "to tokenize text, not to run on token ids"]
        if self.share_buffer and not share:
            notes.append("past/present not in one buffer: a present K/V output is not GroupQueryAttention's own")
        return GenAIReport(group_query_attention=ops.get("GroupQueryAttention", 0), attention_sites=sites,
                           op_counts=dict(ops.most_common()), tokenizer_files=copied, notes=notes + counts.notes,
                           rotary_inside=counts.rotary_inside, packed_qkv=counts.packed_qkv,
                           packed_mlp=counts.packed_mlp, share_buffer=share, inputs=inputs)

    def check(self, program: Program, path: Path, report: GenAIReport) -> None:
        report.check_tokens, report.genai_version = check_genai(program, path)


def genai_greedy(path: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from ``onnxruntime_genai`` for one prompt (token ids in, new token ids out)."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new_tokens, min_length=0)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(prompt_ids):]]


def check_genai(program: Program, path: Path) -> tuple[dict, str]:
    """Raise VerificationError unless onnxruntime_genai's greedy tokens equal the PyTorch program's."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise UsageError("checking a GenAI directory needs onnxruntime-genai: pip install 'evo-rewrite[genai]'") from None
    from evo_rewrite.generate import generate

    vocab = int(program(program.inputs)["logits"].shape[-1])
    prompt = torch.randint(3, max(4, min(vocab, 1000)), (1, CHECK_PROMPT_TOKENS),
                           generator=torch.Generator().manual_seed(0))
    cfg = program.source.hf_config or {}
    eos = cfg.get("eos_token_id")
    ref = generate(program, prompt, CHECK_NEW_TOKENS, device=_device(program))[0, CHECK_PROMPT_TOKENS:].tolist()
    try:
        got = genai_greedy(path, prompt[0].tolist(), CHECK_NEW_TOKENS)
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"onnxruntime_genai {og.__version__} cannot run the written directory: "
                                f"{(str(exc).splitlines() or [''])[0][:400]}") from None
    n = min(len(got), len(ref))
    if got[:n] != ref[:n] or (n < len(ref) and not (eos is not None and got and got[-1] in
                                                    (eos if isinstance(eos, list) else [eos]))):
        raise VerificationError(f"onnxruntime_genai's greedy tokens {got} differ from the PyTorch program's {ref} "
                                f"for prompt {prompt[0].tolist()}; nothing was written")
    return {"prompt": prompt[0].tolist(), "genai": got, "pytorch": ref}, og.__version__


def _device(program: Program):
    for t in program.module.parameters():
        return t.device
    return "cpu"
