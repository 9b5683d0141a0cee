"""Annotations: what a pass leaves on a Program for later stages, owned by the core.

A pass that decides something a later stage must honour — which blocks recompute their
activations, which fused-attention kernel each site runs, how tensors are split over ranks, how a
decoder's KV cache is laid out — records it here as a typed annotation. Targets read annotations;
they never import a pass. Run-time annotations (calibration batches, heal's data and teacher) live
only in memory; the others are written into every output's metadata by :func:`write_metadata` and
restored by :func:`read_metadata`, so a reloaded program is the program that was saved.

    program.annotations.checkpoint          # CheckpointRegions | None
    program.annotations.attention_backends  # AttentionBackends | None
    program.annotations.tensor_parallel     # TensorParallelPlan | None
    program.annotations.kv_cache            # KVCacheLayout | None
    program.annotations.calibration         # Calibration | None      (run-time only)
    program.annotations.heal_data           # object | None           (run-time only)
    program.annotations.reference           # Program | None          (run-time only)
    program.annotations.quality             # QualityCheck | None     (run-time only)

Cloning a program copies its annotations shallowly: the annotation objects are frozen, so a pass
replaces one (``dataclasses.replace`` or a new object) rather than changing it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .inputs import Inputs
    from .program import Program, SourceInfo

__all__ = ["Annotations", "CheckpointRegions", "AttentionBackends", "TensorParallelPlan", "KVCacheLayout",
           "LayerCache", "Calibration", "QualityCheck", "METADATA_FILE", "write_metadata", "read_metadata", "ProgramMetadata"]

METADATA_FILE = "evo_rewrite.json"  # the metadata entry of a .pt2 and the file of a generated directory
SCHEMA_VERSION = 2


@dataclasses.dataclass(frozen=True)
class CheckpointRegions:
    """Blocks (module paths such as ``h.3``) that run under non-reentrant activation checkpointing.

    ``estimate``: the checkpoint pass's figures (activation bytes saved, blocks chosen by what rule).
    ``policies``: how a region recomputes, by path: ``"selective"`` keeps the outputs of its matmuls and
    attention and recomputes the rest (``regions.SELECTIVE``); a path not listed recomputes everything.
    The in-memory module runs them through :mod:`evo_rewrite.regions`; a ``.pt2`` cannot hold them
    (export inlines checkpointing), so the pytorch target writes generated source instead.
    """

    paths: tuple[str, ...]
    estimate: dict[str, Any] = dataclasses.field(default_factory=dict)
    policies: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class AttentionBackends:
    """The fused-attention kernel pinned at each site, by module path (``{"h.0.attn": "cudnn"}``).

    Outputs carry portable SDPA calls plus this record; loading on CUDA pins them again.
    """

    by_module: dict[str, str]


@dataclasses.dataclass(frozen=True)
class TensorParallelPlan:
    """A checked Megatron-style plan: every linear layer's style, every sharded tensor's placement,
    heads per rank of every site (the dict documented in ``passes/tensor_parallel.py``)."""

    plan: dict[str, Any]

    @property
    def degree(self) -> int:
        return int(self.plan["degree"])


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's KV cache: heads, head dim and dtype of its past/present K and V."""

    kv_heads: int
    head_dim: int
    dtype: str


@dataclasses.dataclass(frozen=True)
class KVCacheLayout:
    """The cache a decoder program takes and returns, one entry per layer (inputs
    ``past_key_values.N.key/value``, outputs ``present.N.key/value``)."""

    layers: tuple[LayerCache, ...]

    def bytes_per_token(self) -> int:
        import torch

        return sum(2 * c.kv_heads * c.head_dim * getattr(torch, c.dtype).itemsize for c in self.layers)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Inputs for calibrated passes (``gqa(method=fit)``, ``share-layers``), and what they are.

    ``batches`` are what passes fit on; ``held_out`` (the last quarter of the batches, or of the rows of a
    single batch) is never given to a pass: the pass manager measures lossy passes on it.
    """

    batches: tuple["Inputs", ...]
    note: str
    held_out: tuple["Inputs", ...] = ()


@dataclasses.dataclass(frozen=True)
class QualityCheck:
    """What a lossy pass is judged on, for a pass that chooses its own strength (``gqa(kv_heads=auto)``):
    inputs it was not fitted on, the user's thresholds (a ``verify.Thresholds``), and what the inputs are.
    ``real``: whether they are the user's data (held-out calibration) rather than random tokens."""

    inputs: tuple["Inputs", ...]
    thresholds: Any
    note: str
    real: bool = False


@dataclasses.dataclass
class Annotations:
    checkpoint: CheckpointRegions | None = None
    attention_backends: AttentionBackends | None = None
    tensor_parallel: TensorParallelPlan | None = None
    kv_cache: KVCacheLayout | None = None
    # run-time only: never written
    calibration: Calibration | None = None
    heal_data: Any = None
    reference: "Program | None" = None
    quality: QualityCheck | None = None  # set by the pass manager for the pass it runs

    def copy(self) -> "Annotations":
        return dataclasses.replace(self)


# ---- metadata: the one writer and the one reader ---------------------------------------------------

def _dump_annotations(a: Annotations) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if a.checkpoint is not None:
        out["checkpoint"] = {"paths": list(a.checkpoint.paths), "estimate": a.checkpoint.estimate,
                             "policies": dict(a.checkpoint.policies)}
    if a.attention_backends is not None:
        out["attention_backends"] = dict(a.attention_backends.by_module)
    if a.tensor_parallel is not None:
        out["tensor_parallel"] = a.tensor_parallel.plan
    if a.kv_cache is not None:
        out["kv_cache"] = [dataclasses.asdict(c) for c in a.kv_cache.layers]
    return out


def _load_annotations(d: dict[str, Any]) -> Annotations:
    a = Annotations()
    if d.get("checkpoint"):
        a.checkpoint = CheckpointRegions(tuple(d["checkpoint"]["paths"]), dict(d["checkpoint"].get("estimate") or {}),
                                         dict(d["checkpoint"].get("policies") or {}))
    if d.get("attention_backends"):
        a.attention_backends = AttentionBackends(dict(d["attention_backends"]))
    if d.get("tensor_parallel"):
        a.tensor_parallel = TensorParallelPlan(d["tensor_parallel"])
    if d.get("kv_cache"):
        a.kv_cache = KVCacheLayout(tuple(LayerCache(**c) for c in d["kv_cache"]))
    return a


def write_metadata(program: "Program", **extra: Any) -> str:
    """The JSON every output carries: where the program came from, what was applied, its annotations.

    ``extra``: a target's own layout facts (generated source records tensor names and specs).
    """
    import torch

    from ._version import __version__

    s = program.source
    meta = {"tool": "evo-rewrite", "version": __version__, "torch": torch.__version__, "schema_version": SCHEMA_VERSION,
            "source_kind": s.kind, "source": s.path, "model_class": s.model_class, "hf_class": s.hf_class,
            "hf_config": s.hf_config, "applied": list(program.applied), "dynamic_dims": program.dynamic_dims,
            "annotations": _dump_annotations(program.annotations), **extra}
    return json.dumps(meta, indent=1, default=str)


@dataclasses.dataclass
class ProgramMetadata:
    source: "SourceInfo"
    applied: list[str]
    annotations: Annotations
    raw: dict[str, Any]  # everything written, including a target's own facts


def read_metadata(text: str | bytes | None, *, kind: str, path: str | None) -> ProgramMetadata:
    """Parse what :func:`write_metadata` wrote (tolerating files of schema 1 and files without it).

    Raises ValueError when the text is not a JSON object; the loader turns that into a SourceError.
    """
    from .program import SourceInfo

    meta = json.loads(text) if text else {}
    if not isinstance(meta, dict):
        raise ValueError(f"{METADATA_FILE} holds a {type(meta).__name__}, not an object")
    if "annotations" in meta:
        annotations = _load_annotations(meta["annotations"] or {})
    else:  # schema 1: the facts sat at the top level
        annotations = _load_annotations({"attention_backends": meta.get("sdpa_backends"),
                                         "tensor_parallel": meta.get("tensor_parallel"),
                                         "checkpoint": ({"paths": meta["regions"], "estimate": meta.get("checkpoint") or {}}
                                                        if meta.get("regions") else None)})
    info = SourceInfo(kind=kind, path=path, model_class=meta.get("model_class"), hf_config=meta.get("hf_config"),
                      hf_class=meta.get("hf_class"))
    return ProgramMetadata(info, list(meta.get("applied") or []), annotations, meta)
