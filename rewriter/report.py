"""The Report: data first (JSON), then a terminal table.

JSON schema (``--report-json``; ``schema_version`` 2)::

    {
      "schema_version": 2,
      "tool": "evo-rewrite", "version": str, "torch": str,
      "source": str, "source_kind": str, "pipeline": str,
      "inputs": str,                       # example inputs, e.g. "input_ids:int64[2, 16]"
      "verify_inputs": [str],              # every input set each pass is verified on
      "static_dims": [{                    # dimensions capture kept symbolic by default (batch, sequence)
          "input": str, "dim": int,        # that torch.export fixed: which, at what size and why (the
          "size": int, "reason": str       # model line that fixed it); [] when every one stayed symbolic
      }],
      "passes": [{
          "name": str, "spec": str, "exact": bool,
          "rewrites": int,
          "skipped": [{"reason": str, "module": str, "node": str}],
          "verified": bool, "rolled_back": bool,
          "quality": "exact" | "lossy" | "unchanged" | "rolled back",  # lossy: within the thresholds
          "measured_on": str, "thresholds": str,  # lossy passes: held-out inputs of the metrics, limits
          "failure": str | null, "diverges_at": str | null,   # module path of first divergence
          "max_abs_error": float | null,
          "metrics": {"max_abs_error", "max_rel_error", "cosine", "sqnr_db",
                      "top1_agreement"?, "kl"?},             # worst over verify_inputs
          "seconds": float, "verify_seconds": float,
          "notes": {...}, "message": str
      }],
      "end_to_end": {...metrics of the final program against the source...},
      "model_before": {"parameters", "weight_bytes", "kv_cache_bytes_per_token",
                       "attention_sites", "softmaxes"},
      "model_after":  {... same keys ...},
      "outputs": [str],                    # files written
      "targets": [{                        # what each target wrote (TargetReport.to_dict(); the onnx
          "target": str, "path": str,      # target adds attention, dtype, opset, fused operators,
          "files": [str], "bytes": int,    # ORT checks: targets/onnx.py OnnxReport)
          "seconds": float, "notes": [str],
          "prepared": [{...pass record of the target's prepare pipeline...}], ...
      }],
      "ok": bool                           # every pass verified
    }
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

__all__ = ["PassRecord", "Report"]


@dataclasses.dataclass
class PassRecord:
    name: str
    spec: str
    exact: bool
    rewrites: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)
    verified: bool = False
    rolled_back: bool = False
    failure: str | None = None
    diverges_at: str | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    verify_seconds: float = 0.0
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""
    traceback: str | None = None
    measured_on: str = ""  # lossy passes: the inputs their metrics come from (held out, or random tokens)
    thresholds: str = ""  # lossy passes: the limits they were held to

    @property
    def quality(self) -> str:
        """'exact' (verified, exact), 'lossy' (verified within the thresholds), 'unchanged', 'rolled back'."""
        if not self.verified:
            return "rolled back"
        if not self.rewrites:
            return "unchanged"
        return "exact" if self.exact else "lossy"

    @property
    def max_abs_error(self) -> float | None:
        return self.metrics.get("max_abs_error")


@dataclasses.dataclass
class Report:
    pipeline: str = ""
    inputs: str = ""
    source: str = ""
    source_kind: str = ""
    verify_inputs: list[str] = dataclasses.field(default_factory=list)
    static_dims: list[dict] = dataclasses.field(default_factory=list)  # StaticDim as dicts: input, dim, size, reason
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    end_to_end: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_before: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_after: dict[str, Any] = dataclasses.field(default_factory=dict)
    outputs: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    baseline_seconds: float = 0.0
    targets: list[Any] = dataclasses.field(default_factory=list)  # TargetReport of every output written

    @property
    def ok(self) -> bool:
        return all(p.verified for p in self.passes)

    def failed(self) -> list[PassRecord]:
        return [p for p in self.passes if not p.verified]

    def to_dict(self) -> dict:
        import torch

        from ._version import __version__

        passes = []
        for p in self.passes:
            d = dataclasses.asdict(p)
            d["max_abs_error"] = p.max_abs_error
            d["quality"] = p.quality
            d["metrics"] = {k: _finite(v) for k, v in p.metrics.items()}
            passes.append(d)
        return {
            "schema_version": 2, "tool": "evo-rewrite", "version": __version__, "torch": torch.__version__,
            "source": self.source, "source_kind": self.source_kind, "pipeline": self.pipeline,
            "inputs": self.inputs, "verify_inputs": self.verify_inputs, "static_dims": self.static_dims,
            "passes": passes,
            "end_to_end": {k: _finite(v) for k, v in self.end_to_end.items()},
            "model_before": self.model_before, "model_after": self.model_after,
            "outputs": self.outputs, "targets": [t.to_dict() for t in self.targets], "notes": self.notes,
            "ok": self.ok,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def table(self) -> str:
        lines = []
        lines.append(f"source   {self.source} ({self.source_kind})")
        lines.append(f"inputs   {self.inputs}; verified also on: {'; '.join(self.verify_inputs[1:]) or '(no symbolic dims)'}")
        for sd in self.static_dims:
            lines.append(f"static   {sd['input']} dimension {sd['dim']} = {sd['size']}: {sd['reason']}")
        lines.append(f"pipeline {self.pipeline or '(none: capture, verify, emit)'}")
        if self.passes:
            hdr = f"{'pass':<28} {'rewrites':>8} {'skipped':>7} {'verified':>11} {'max abs err':>12} {'SQNR dB':>8} {'time s':>7}"
            lines += ["", hdr, "-" * len(hdr)]
            for p in self.passes:
                state = {"exact": "yes", "unchanged": "yes", "lossy": "lossy", "rolled back": "ROLLED BACK"}[p.quality]
                err = p.metrics.get("max_abs_error")
                sq = p.metrics.get("sqnr_db")
                lines.append(f"{p.spec[:28]:<28} {p.rewrites:>8} {len(p.skipped):>7} {state:>11} "
                             f"{_fmt(err, '.2e'):>12} {_fmt(sq, '.1f'):>8} {p.seconds + p.verify_seconds:>7.2f}")
                if p.quality == "lossy":
                    within = (f"lossy, within your thresholds ({p.thresholds})" if p.thresholds and
                              p.thresholds != "no thresholds" else
                              "lossy, not gated (no --min-cosine/--min-sqnr/--max-kl given)")
                    lines.append(f"    {within}: {_figures(p.metrics)}"
                                 + (f" on {p.measured_on}" if p.measured_on else ""))
                if p.failure:
                    lines.append(f"    failed: {p.failure}" + (f" — first diverging module: {p.diverges_at}" if p.diverges_at else ""))
                if p.message and not p.rewrites:
                    lines.append(f"    {p.message}")
                for s in p.skipped[:8]:
                    lines.append(f"    skipped {s['module'] or s['node'] or '?'}: {s['reason']}")
                if len(p.skipped) > 8:
                    lines.append(f"    ... and {len(p.skipped) - 8} more skipped (see --report-json)")
                for k, v in p.notes.items():
                    if isinstance(v, (str, int, float)):
                        lines.append(f"    {k}: {v}")
        b, a = self.model_before, self.model_after
        if b:
            lines += ["", f"{'model':<26} {'before':>14} {'after':>14} {'ratio':>7}", "-" * 64]
            for key, label in [("parameters", "parameters"), ("weight_bytes", "weight bytes"),
                               ("kv_cache_bytes_per_token", "KV-cache bytes/token"), ("attention_sites", "attention sites")]:
                bv, av = b.get(key), a.get(key, b.get(key))
                ratio = f"{av / bv:.3f}" if isinstance(bv, (int, float)) and isinstance(av, (int, float)) and bv else ""
                lines.append(f"{label:<26} {_fmt(bv, ',d'):>14} {_fmt(av, ',d'):>14} {ratio:>7}")
        if self.end_to_end:
            e = self.end_to_end
            lines.append("")
            lines.append("against the source: " + ", ".join(f"{k} {_fmt(v, '.3g')}" for k, v in e.items() if isinstance(v, (int, float))))
        for t in self.targets:
            lines += ["", f"target   {t.target} -> {t.path} ({t.bytes:,} bytes, {t.seconds:.1f} s)"] + t.lines()
        for o in self.outputs:
            lines.append(f"wrote    {o}")
        for n in self.notes:
            lines.append(f"note     {n}")
        return "\n".join(lines)


def _figures(m: dict) -> str:
    parts = []
    for key, label, spec in (("cosine", "cosine", ".4f"), ("sqnr_db", "SQNR", ".1f"), ("top1_agreement", "top-1", ".3f"),
                             ("kl", "KL", ".3g"), ("max_rel_error", "max rel err", ".2e")):
        if key in m:
            parts.append(f"{label} {_fmt(m[key], spec)}" + (" dB" if key == "sqnr_db" else ""))
    return ", ".join(parts) or "no figures"


def _fmt(v, spec) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    try:
        return format(v, spec)
    except (ValueError, TypeError):
        return str(v)


def _finite(v):
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return v
