"""The pass manager: runs a pipeline, lints and verifies after every pass, rolls back failures.

It owns the invariants between passes: each pass gets a clone of the program; after it, the
graph is linted, shapes are refreshed, the annotations are kept true to the graph (checkpoint
regions still run, pinned attention backends recorded), and the outputs are compared with the
program before it on every verification input. Heal's teacher — the program before the first
lossy pass of *this* run — is set here, never inherited from an earlier run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import traceback
from typing import Callable

from .errors import RewriteError, UsageError
from .annotations import QualityCheck
from .decoder import is_decoder, run_with_own_cache
from .figures import figures
from .pass_infra import Pass, PassResult
from .program import Program, guard_calls
from .regions import keep_regions
from .report import PassRecord, Report
from .sdpa import record_pins
from .verify import (SHADOW_FACTOR, Thresholds, check, check_against_shadow, compare_outputs, first_divergence,
                     shadow_error, shadow_program, upcast_inputs)

__all__ = ["PassManager"]

LOG = logging.getLogger("evo_rewrite")


def _run_all(program: Program, inputs):
    return [_call(program, i) for i in inputs]


def _call(program: Program, inputs):
    """A decoder program runs with its own cache and is judged on logits (a pass may change the cache)."""
    return run_with_own_cache(program, inputs) if is_decoder(program) else program(inputs)


class _Forward(logging.Handler):
    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.forward = log

    def emit(self, record: logging.LogRecord) -> None:
        self.forward(record.getMessage())


@contextlib.contextmanager
def _progress(log: Callable[[str], None] | None):
    """Passes report progress on the ``evo_rewrite`` logger; a caller's ``log`` callable hears it for the run."""
    if log is None:
        yield
        return
    handler, level = _Forward(log), LOG.level
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    try:
        yield
    finally:
        LOG.removeHandler(handler)
        LOG.setLevel(level)


@dataclasses.dataclass
class PassManager:
    passes: list[Pass]
    thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)
    log: Callable[[str], None] | None = None

    def _say(self, msg: str) -> None:
        if self.log:
            self.log(msg)

    def run(self, program: Program) -> tuple[Program, Report]:
        with _progress(self.log):
            return self._run(program)

    def _run(self, program: Program) -> tuple[Program, Report]:
        report = Report(pipeline=",".join(p.spec() for p in self.passes), inputs=program.inputs.describe(),
                        static_dims=[dataclasses.asdict(sd) for sd in program.static_dims])
        report.model_before = figures(program).as_dict()
        second = program.second_inputs()
        checks = [program.inputs] + ([second] if second is not None else [])
        # lossy passes are measured on inputs nothing was fitted on: held-out calibration, else random tokens
        # of another seed (the example inputs are what an uncalibrated fit uses)
        cal = program.annotations.calibration
        held = list(cal.held_out) if cal is not None and cal.held_out else []
        if held:
            extra, real = held, True
            quality_note = f"{len(held)} held-out calibration batch(es) ({held[0].describe()})"
        else:
            extra, real = [_another_seed(program.inputs)], False
            quality_note = ("random tokens of another size and seed, not real data" if len(checks) > 1 else
                            "random tokens of another seed, not real data")
        quality_idx = list(range(len(checks), len(checks) + len(extra))) + (
            [] if real else list(range(1, len(checks))))
        checks = checks + extra
        quality = QualityCheck(tuple(checks[i] for i in quality_idx), self.thresholds, quality_note, real)
        tag = " (held out)" if real else " (another seed)"
        report.verify_inputs = [c.describe() + (tag if i >= len(checks) - len(extra) else "") for i, c in enumerate(checks)]
        t0 = time.perf_counter()
        try:
            ref = _run_all(program, checks)
        except Exception as exc:  # noqa: BLE001
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            raise UsageError(f"the captured program does not run on its verification inputs "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}, at "
                               f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}). "
                               "Give example inputs (--inputs) and calibration batches (--calibration) that the "
                               "model accepts.") from None
        report.baseline_seconds = time.perf_counter() - t0
        original, original_out = program, ref
        shadow = self._shadow(program, checks)
        report.notes.append(f"exact passes judged by: {shadow[2]}")
        reference = None  # heal's teacher: the program before the first lossy pass of this run (never an earlier run's)
        for i, p in enumerate(self.passes, 1):
            if not p.exact and "reference" not in p.requirements() and reference is None:
                reference = program
            self._say(f"[{i}/{len(self.passes)}] {p.spec()} ...")
            rec = PassRecord(name=p.name, spec=p.spec(), exact=p.exact)
            t0 = time.perf_counter()
            try:
                work = program.clone()
                work.annotations.reference = reference if "reference" in p.requirements() else None
                work.annotations.quality = quality
                result: PassResult = p.run(work)
                result.program.annotations.reference = None  # served this pass; not carried on
                result.program.annotations.quality = None
            except RewriteError:
                raise
            except Exception as exc:  # noqa: BLE001 - a crashing pass is rolled back, not fatal
                rec.seconds = time.perf_counter() - t0
                rec.rolled_back = True
                rec.verified = False
                rec.failure = f"pass raised {type(exc).__name__}: {exc}"
                rec.traceback = traceback.format_exc(limit=6)
                report.passes.append(rec)
                self._say(f"      rolled back: {rec.failure}")
                continue
            rec.seconds = time.perf_counter() - t0
            rec.rewrites = result.rewrites
            rec.skipped = [dataclasses.asdict(s) for s in result.skipped]
            rec.notes = result.notes
            rec.message = result.message
            if result.rewrites == 0:
                rec.verified = True
                rec.message = result.message or "nothing to rewrite"
                report.passes.append(rec)
                self._say(f"      no rewrites: {rec.message}")
                continue
            new = result.program
            new.applied.append(p.spec())
            t1 = time.perf_counter()
            failure, metrics, dtype, new_out = self._verify(p, new, checks, ref, quality_idx)
            if shadow[0] is not None and new_out is not None and not (failure and not failure.startswith("exact pass")):
                sv = shadow[0]
                new_errs = [shadow_error(sv[i], new_out[i], new.vocab_sizes()) for i in range(len(checks))]
                before_errs = [shadow_error(sv[i], ref[i], new.vocab_sizes()) for i in range(len(checks))]
                if None not in new_errs and None not in before_errs:
                    metrics["error_vs_shadow"] = max(new_errs)
                    metrics["before_vs_shadow"] = max(before_errs)
                    if p.exact:
                        failure = check_against_shadow(new_errs, before_errs, shadow[1])
            if p.exact:
                rec.notes["verification"] = (shadow[2] if "error_vs_shadow" in metrics
                                             else "fixed tolerance against the program before the pass")
            rec.verify_seconds = time.perf_counter() - t1
            rec.metrics = metrics
            if failure:
                rec.verified = False
                rec.rolled_back = True
                rec.failure = failure
                if dtype is not None:
                    rec.diverges_at = first_divergence(program, new, checks[0], dtype)
                where = f" (first diverging module: {rec.diverges_at})" if rec.diverges_at else ""
                self._say(f"      rolled back: {failure}{where}")
            else:
                rec.verified = True
                program, ref = new, new_out
                if not p.exact and shadow[0] is not None:  # a lossy pass changed the math: a shadow of the new program
                    shadow = self._shadow(program, checks)
                err = metrics.get("max_abs_error", 0.0)
                self._say(f"      {result.rewrites} rewrite(s), {len(result.skipped)} skipped, max abs error {err:.3g}")
            if not p.exact:
                rec.measured_on = quality_note
                rec.thresholds = self.thresholds.describe()
                if not real and not any("random tokens" in n for n in report.notes):
                    report.notes.append(RANDOM_DATA_NOTE)
                    self._say(f"      WARNING: {RANDOM_DATA_NOTE}")
            report.passes.append(rec)
        if program is not original and self.passes:
            metrics, problem, _ = _merge([compare_outputs(original_out[i], ref[i], program.vocab_sizes())
                                          for i in quality_idx])
            report.end_to_end = {**metrics, **({"problem": problem} if problem else {})}
        report.model_after = figures(program).as_dict()
        return guard_calls(program), report  # called like the original: inputs checked, named in errors

    def _shadow(self, program: Program, checks):
        """(shadow outputs per verification input or None, program dtype, how exact passes are judged).

        The shadow is the program run once per input in higher precision (fp64 for an fp32 program, fp32 for
        bf16/fp16); where it cannot be built or run, exact passes fall back to the fixed tolerance."""
        try:
            built = shadow_program(program)
            if built is None:
                return None, None, "fixed tolerance (no higher-precision shadow for this program's dtype)"
            sp, low, high = built
            outs = [_call(sp, upcast_inputs(c, low, high)) for c in checks]
            del sp
        except Exception as exc:  # noqa: BLE001 - the shadow is an improvement; never fatal
            return None, None, f"fixed tolerance (the higher-precision shadow failed: {type(exc).__name__}: {_first_line(exc)[:120]})"
        dt = str(high).replace("torch.", "")
        return outs, low, (f"error against a {dt} shadow of the program <= {SHADOW_FACTOR:g} x the error of "
                           f"the program before the pass + a floor")

    def _verify(self, p: Pass, new: Program, checks, ref, quality_idx):
        """(failure, metrics, dtype, outputs): an exact pass is judged on every input; a lossy pass runs on every
        input but its metrics (and thresholds) come from the held-out ones (``quality_idx``)."""
        try:
            new.graph.lint()
            new.refresh_meta()
            keep_regions(new)
            record_pins(new)
        except Exception as exc:  # noqa: BLE001
            return f"rewritten program is not a valid graph ({type(exc).__name__}: {_first_line(exc)})", {}, None, None
        new_out = []
        for i, inputs in enumerate(checks):
            try:
                new_out.append(_call(new, inputs))
            except Exception as exc:  # noqa: BLE001
                which = "the example input" if i == 0 else f"the verification input {inputs.describe()}"
                return f"rewritten program fails to run ({type(exc).__name__}: {_first_line(exc)}) on {which}", {}, None, None
        compared = [compare_outputs(a, b, new.vocab_sizes()) for a, b in zip(ref, new_out)]
        problem = next((c[1] for c in compared if c[1]), None)
        if p.exact or problem:
            metrics, problem, dtype = _merge(compared)
        else:
            metrics, _, dtype = _merge([compared[i] for i in quality_idx])
            nonfinite = any(c[0].get("nonfinite_mismatch") for c in compared)
            if nonfinite:
                metrics["nonfinite_mismatch"] = 1.0
        return check(metrics, problem, dtype, p.exact, self.thresholds), metrics, dtype, new_out


RANDOM_DATA_NOTE = ("lossy passes were measured on random example tokens, not real data: their figures may be far "
                    "from what real text gives; pass --calibration FILE.pt (a dict of input tensors; Python: "
                    "calibration=...) to fit on and measure on held-out real inputs")


def _another_seed(inputs):
    """The example inputs' shapes, dtypes and value ranges, drawn again with another seed."""
    from .inputs import like

    return inputs.map_tensors(lambda t: like(t, tuple(t.shape), seed=1234, pad_last_row=False))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _merge(results):
    """Worst case over the verification inputs."""
    worst = {"cosine": min, "sqnr_db": min, "top1_agreement": min}
    merged: dict[str, float] = {}
    problem, dtype = None, None
    for metrics, prob, dt in results:
        problem = problem or prob
        dtype = dtype or dt
        for k, v in metrics.items():
            merged[k] = worst.get(k, max)(merged[k], v) if k in merged else v
    return merged, problem, dtype


