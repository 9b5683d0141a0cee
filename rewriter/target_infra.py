"""The target contract: a frozen dataclass of options, one ``write(program, path) -> TargetReport``.

Targets register under a kebab-case ``name`` (``register_target``; built-in ones and any installed
package's through the ``evo_rewrite.targets`` entry-point group) and are chosen by text, like
passes: ``onnx(attention=ort,dtype=fp16)``. A target may ask for a pipeline to run first
(``prepare``: the ONNX target wants attention fused); it runs through the pass manager, verified
like any pass, and its records land in the report.

:func:`emit` is the one way anything is written: it checks the output path before any work (never
the source, nothing inside a source directory, never a non-regular file), lets the target write
into a fresh temporary directory beside the output, has the target check what it wrote by loading
it back, and only then moves it into place. On any error — or SIGTERM, or Ctrl-C — the temporary
directory is removed and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from .errors import OutputError, PipelineError
from .program import Program
from .registry import Registry

__all__ = ["Target", "TargetReport", "register_target", "registered_targets", "get_target", "parse_target", "emit",
           "check_output", "write_text_atomic", "ENTRY_POINT_GROUP", "Terminated", "terminate_as_interrupt",
           "weight_bytes", "check_free_space"]

ENTRY_POINT_GROUP = "evo_rewrite.targets"


@dataclasses.dataclass(kw_only=True)
class TargetReport:
    """What a target wrote: data first (``to_dict``), then terminal lines (``lines``)."""

    target: str = ""
    path: str = ""
    files: list[str] = dataclasses.field(default_factory=list)  # every file or directory written
    bytes: int = 0
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    prepared: list[dict] = dataclasses.field(default_factory=list)  # records of the target's prepare pipeline

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """Terminal lines beyond 'wrote PATH' (targets with findings override this)."""
        return [f"    note: {n}" for n in self.notes]

    def fold_prepared(self, records: list) -> None:
        """Take in the verified records of ``prepare``'s pipeline (PassRecord objects)."""
        self.prepared = [dataclasses.asdict(r) for r in records]


@dataclasses.dataclass(frozen=True)
class Target:
    """Base of every target. Subclasses are frozen dataclasses with class variables ``name`` and ``suffix``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    suffix: ClassVar[str] = ""  # of a file output ("" for a directory)

    def validate(self, program: Program | None, out: Path | None = None) -> None:
        """Refuse (UsageError, OutputError) what this target cannot write, before any work; ``program`` and
        ``out`` are None when the check runs before loading (option combinations only)."""

    def prepare(self, program: Program) -> str:
        """Pipeline text to run (verified) before writing; '' for none."""
        return ""

    def dtype_advice(self, dtype: str) -> str | None:
        """Why this target cannot run weights of ``dtype`` (a torch dtype name such as ``"bfloat16"``) and what
        works instead; None when it can. The face checks every pass's ``weight_dtype`` against this before any
        loading (``pipeline.check_target``); ``validate`` checks the program's tensors before writing."""
        return None

    def estimate_bytes(self, program: Program) -> int:
        """About how many bytes ``write`` puts on disk (checked against the free space before writing): by
        default the program's unique weight bytes plus a margin for the graph and metadata."""
        return weight_bytes(program) + (16 << 20)

    def is_directory(self, program: Program) -> bool:
        """Whether this target writes a directory for ``program`` (default: when it has no file suffix)."""
        return not self.suffix

    def output_name(self, program: Program, stem: str) -> str:
        """The default output name for a source called ``stem``."""
        return f"{stem}.rewritten{self.suffix}"

    def write(self, program: Program, path: Path) -> TargetReport:  # pragma: no cover - abstract
        """Write ``program`` at ``path`` (inside a temporary directory emit made) and return what was written."""
        raise NotImplementedError

    def check(self, program: Program, path: Path, report: TargetReport) -> None:
        """Load what ``write`` wrote at ``path`` and compare it with ``program``; raise VerificationError if it differs."""

    @classmethod
    def can_read(cls, path: Path) -> bool:
        """Whether ``path`` is an output of this target that :meth:`read` turns back into a Program."""
        return False

    @classmethod
    def read(cls, path: Path) -> Program:  # pragma: no cover - only for targets whose can_read says yes
        raise NotImplementedError

    def spec(self) -> str:
        from .pass_infra import spec_text

        return spec_text(self)

    @classmethod
    def options(cls) -> list[tuple[str, str, Any]]:
        from .pass_infra import option_table

        return option_table(cls)


TARGETS: Registry[type[Target]] = Registry("target", Target, ENTRY_POINT_GROUP, "--list-targets")
register_target = TARGETS.register
registered_targets = TARGETS.all
get_target = TARGETS.get


def parse_target(text: str) -> Target:
    """``onnx(attention=ort,dtype=fp16)`` -> an OnnxTarget; options are typed and checked like a pass's."""
    from .pipeline import parse_item

    return parse_item(text.strip(), get_target, "target")


# ---- where a target may write ------------------------------------------------------------------

def _inside(path: Path, directory: Path) -> bool:
    try:
        path.relative_to(directory)
        return True
    except ValueError:
        return False


def check_output(out: str | os.PathLike, sources: list[str | os.PathLike | None] = (), *, suffix: str = "",
                 directory: bool = False, what: str = "another -o") -> Path:
    """Raise OutputError unless ``out`` may be written; return its (existing, writable) parent directory.

    Refused: a path that resolves (symbolic links followed) to a source or into a source directory, a
    source that resolves into it; an existing directory where a file goes, and any existing path where
    a directory goes; an existing special file (device, FIFO, socket); a missing or read-only parent.
    """
    out = Path(out)
    real = Path(os.path.realpath(out))
    for src in sources:
        if not src:
            continue
        s = Path(str(src).rsplit(":", 1)[0] if ":" in str(src) and not Path(str(src)).exists() else str(src))
        if not s.exists():
            continue
        rs = Path(os.path.realpath(s))
        if real == rs:
            raise OutputError(f"refusing to overwrite the source {src} (with {out}); choose {what}")
        if (rs.is_dir() and _inside(real, rs)) or (real.is_dir() and _inside(rs, real)):
            raise OutputError(f"refusing to write {out}: it lies inside the source {src} (or holds it); "
                              f"choose {what} outside it")
    if out.exists() or out.is_symlink():
        if directory:
            raise OutputError(f"{out} already exists; remove it or choose {what}")
        if out.is_dir():
            hint = f"; give a file name ending in {suffix}" if suffix else "; give a file name"
            raise OutputError(f"{out} is a directory{hint}")
        if not out.is_file():
            raise OutputError(f"refusing to write {out}: it is not a regular file (a device, pipe or socket); "
                              f"choose {what}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {out}: directory {parent} is not writable; choose {what}")
    return parent


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) turned into an exception, so every ``finally`` cleanup runs; the CLI exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) while inside, so cleanups run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_modes(entry: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700: give what was written the modes the user's umask asks for."""
    mask = _umask()
    paths = [entry] + (sorted(entry.rglob("*")) if entry.is_dir() and not entry.is_symlink() else [])
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def weight_bytes(program: Program) -> int:
    """Bytes of the program's unique weight storages."""
    seen, total = set(), 0
    for t in program.named_tensors().values():
        try:
            key = (t.untyped_storage().data_ptr(), t.device.type)
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # fake or meta tensors
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def check_free_space(out: Path, need: int, where: Path | None = None) -> None:
    """OutputError (exit 5) when the file system of ``where`` (default: ``out``'s directory) has less than
    ``need`` bytes free. Checked before writing: torch's C++ writer aborts the interpreter on a full disk."""
    where = where or (out.parent if str(out.parent) else Path("."))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if free < need:
        raise OutputError(f"cannot write {out}: it needs about {_mib(need)} and {where} has {_mib(free)} free; "
                          "free some space or write elsewhere")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def emit(program: Program, target: Target, out: str | os.PathLike, *, log=None, directory: bool | None = None,
         check: bool = True) -> TargetReport:
    """Run ``target.prepare``'s pipeline, write to a temporary directory beside ``out``, check, move into place.

    ``directory``: whether ``out`` is a directory (default: ``target.is_directory(program)``). Every file the
    target wrote next to its main output (ONNX external data) moves with it. Returns the TargetReport with
    final paths. Raises OutputError (exit 5) for a path it may not write, UsageError for options the
    program cannot take, VerificationError when the written output does not reproduce the program.
    """
    t0 = time.perf_counter()
    out = Path(out)
    is_dir = target.is_directory(program) if directory is None else directory
    target.validate(program, out)
    parent = check_output(out, [program.source.path], suffix=target.suffix, directory=is_dir)
    records = []
    pipeline = target.prepare(program)
    if pipeline:
        from .manager import PassManager
        from .pipeline import parse_pipeline

        if log:
            log(f"target {target.name}: running {pipeline} first ...")
        prepared, prep_report = PassManager(parse_pipeline(pipeline), log=log).run(program)
        records = prep_report.passes
        program = prepared
    check_free_space(out, target.estimate_bytes(program), parent)
    tmp = None
    try:
        with terminate_as_interrupt():
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
            staged = tmp / out.name
            try:
                report = target.write(program, staged)
                if check:
                    target.check(program, staged, report)
            except OSError as exc:
                raise OutputError(_disk_message(out, exc)) from None
            # files beside the main output (ONNX external data) first, the main output last
            entries = [e for e in tmp.iterdir() if e != staged] + [staged]
            moved = []
            try:
                for entry in entries:
                    _publish_modes(entry)
                for entry in entries:
                    os.replace(entry, parent / entry.name)
                    moved.append(parent / entry.name)
            except OSError as exc:
                raise OutputError(_disk_message(out, exc)) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report.target = report.target or target.name
    report.path = str(out)
    report.files = [str(moved[-1])] + [str(p) for p in moved[:-1]]
    report.bytes = sum(_size(p) for p in moved)
    report.seconds = time.perf_counter() - t0
    report.fold_prepared(records)
    return report


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """A small text output (the JSON report): temporary file beside it, then renamed into place."""
    out = Path(path)
    parent = check_output(out, what="another path")
    data = text.encode()
    check_free_space(out, len(data) + 4096, parent)
    tmp = None
    try:
        with terminate_as_interrupt():
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(_disk_message(out, exc)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)


def _disk_message(out: Path, exc: OSError) -> str:
    import errno

    if exc.errno == errno.ENOSPC:
        free = shutil.disk_usage(out.parent if str(out.parent) else ".").free
        return (f"cannot write {out}: no space left on the device ({free / 2**20:.0f} MiB free); free some space "
                "or write elsewhere")
    return f"cannot write {out}: {exc.strerror or exc}"
