"""Data for ``heal``: the user's unlabeled text or token files, turned into the program's inputs.

``read_heal_data(paths)`` reads files up front (so a bad file fails before any loading or capture):

* text: ``.txt``, ``.md``, ``.rst``, ``.text`` (documents split at blank lines) and ``.jsonl`` (one JSON
  object per line with a ``"text"`` field); a directory means every such file under it, sorted;
* tokens: ``.npy`` or ``.pt`` holding an integer array of token ids, 1-D (one stream) or 2-D (rows of
  equal length); a ``.pt`` may instead hold a dict of ``(N, S)`` input tensors (``input_ids``,
  ``attention_mask``, ...) or a list of such dicts, used as they are. ``.pt`` files are read with
  ``weights_only=True``: no pickled code runs.

``HealData.split(program, ...)`` tokenizes and batches for one program: token streams are packed into
windows of ``seq_len`` tokens (causal LMs), or, when the tokenizer has a [CLS] token (BERT-style encoders),
each document is cut into pieces of ``seq_len - 2`` tokens wrapped in [CLS] ... [SEP] and padded per
batch. Inputs the model takes besides the tokens are filled as a tokenizer would: ``attention_mask``
(ones; zeros on padding), ``token_type_ids`` (zeros), ``position_ids`` (0..S-1). A held-back fraction
of the documents (or rows) is split off first for the before/after evaluation, so it is never trained on.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import torch

from .decoder import as_prefill, is_decoder
from .errors import UsageError
from .inputs import Inputs

__all__ = ["HealData", "read_heal_data", "attach_heal_data", "default_tokenizer", "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
TOKEN_SUFFIXES = (".npy", ".pt")
_FILLABLE = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclasses.dataclass
class HealData:
    """What the user gave: documents (text), token rows/streams, or ready input dicts."""

    description: str
    documents: list[str] = dataclasses.field(default_factory=list)
    token_rows: list[torch.Tensor] = dataclasses.field(default_factory=list)  # 1-D int64 each
    input_rows: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)  # one sample each
    tokenizer: object = None

    def split(self, program, *, batch: int, seq_len: int, holdout: float, seed: int,
              device) -> tuple[list[Inputs], list[Inputs]]:
        """(training batches, held-back batches) of the program's inputs.

        Sizes follow what the captured program accepts: a batch or sequence dimension that stayed
        static takes the example's size (sequences are padded to it, incomplete batches dropped), and
        ``seq_len`` is capped at the sequence symbol's upper bound (learned positions).
        """
        fixed_batch, fixed_seq, max_seq = token_shape(program)
        seq_len = fixed_seq or (min(seq_len, max_seq) if max_seq else seq_len)
        batch = fixed_batch or batch
        rows = self._rows(program, seq_len)  # list of samples: dict name -> 1-D tensor
        if len(rows) < 2:
            raise UsageError(f"--heal-data: {self.description} gives {len(rows)} sequence(s) of up to {seq_len} "
                             "tokens; heal needs at least 2 (one to train on, one held back). Give more text.")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_held = min(len(rows) - 1, max(1, round(holdout * len(rows))))
        held = [rows[i] for i in order[:n_held]]
        train = [rows[i] for i in order[n_held:]]
        out = []
        for part, what in ((train, "training"), (held, "held-back")):
            b = _batches(part, batch, program, device, pad_to=fixed_seq)
            if fixed_batch:
                b = [x for x in b if x.flat()[0].shape[0] == fixed_batch]
                if not b:
                    raise UsageError(f"--heal-data: the model was captured with a fixed batch of {fixed_batch}, and "
                                     f"{self.description} gives fewer {what} sequences than that; give more data")
            out.append(b)
        return out[0], out[1]

    # --------------------------------------------------------------------------------------- rows

    def _rows(self, program, seq_len: int) -> list[dict[str, torch.Tensor]]:
        if self.input_rows:
            return list(self.input_rows)
        tok = self.tokenizer
        cls_sep = tok is not None and getattr(tok, "cls_token_id", None) is not None and \
            getattr(tok, "sep_token_id", None) is not None
        streams = list(self.token_rows)
        if self.documents:
            if tok is None:
                raise UsageError(_NEED_TOKENIZER)
            if cls_sep:
                streams = [torch.tensor(tok(d, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
                           for d in self.documents]
            else:  # one stream, documents separated by blank lines, as an LM reads text
                streams = [torch.tensor(tok("\n\n".join(self.documents), add_special_tokens=False, verbose=False)["input_ids"],
                                        dtype=torch.long)]
        if cls_sep:
            piece = max(1, seq_len - 2)
            ids = [torch.cat([torch.tensor([tok.cls_token_id]), s[i:i + piece], torch.tensor([tok.sep_token_id])])
                   for s in streams for i in range(0, len(s), piece) if len(s[i:i + piece])]
        else:
            ids = [s[i:i + seq_len] for s in streams for i in range(0, len(s) - seq_len + 1, seq_len)]
            if not ids and streams:  # shorter than one window: use the streams as they are
                ids = [s for s in streams if len(s) >= 2]
        vocab = max(program.vocab_sizes(), default=None)
        top = max((int(r.max()) for r in ids if r.numel()), default=-1)
        if vocab is not None and top >= vocab:
            raise UsageError(f"--heal-data: token id {top} is outside the model's vocabulary of {vocab}; "
                             "the data was tokenized with another tokenizer (give --tokenizer DIR, or re-tokenize)")
        return [{"input_ids": r} for r in ids]


_NEED_TOKENIZER = ("--heal-data: text needs a tokenizer, and the source is not a Hugging Face directory with "
                   "tokenizer files; give --tokenizer DIR (a directory AutoTokenizer can read), or token ids "
                   "(.npy, or .pt holding an int tensor or a dict of input tensors)")


def token_shape(program) -> tuple[int | None, int | None, int | None]:
    """(fixed batch, fixed sequence length, longest sequence) of the program's token input; None: free."""
    flat = [x for x in Inputs.flat(program.inputs)]
    for leaf, dims in zip(flat, program.dynamic_dims or [{}] * len(flat)):
        if isinstance(leaf, torch.Tensor) and not leaf.is_floating_point() and leaf.dim() >= 2:
            hi = program.symbol_ranges.get(dims[1], (0, None))[1] if 1 in dims else None
            return (None if 0 in dims else int(leaf.shape[0]), None if 1 in dims else int(leaf.shape[1]),
                    None if hi is None else int(hi))
    return None, None, None


def _batches(rows, batch: int, program, device, pad_to: int | None = None) -> list[Inputs]:
    """Batches in the program's input structure; a decoder program's are prefill steps (empty past)."""
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        if is_decoder(program):
            ids, mask = _ids_and_mask(chunk, pad_to)
            extra = sorted(set(chunk[0]) - {"input_ids", "attention_mask"})
            if extra:
                raise UsageError(f"--heal-data: a model captured with its cache takes input_ids and attention_mask; "
                                 f"the data also gives {', '.join(extra)}")
            mask = torch.stack([r["attention_mask"] for r in chunk]).long() if "attention_mask" in chunk[0] else mask
            out.append(as_prefill(program, Inputs((), {"input_ids": ids, "attention_mask": mask})).to(device))
        else:
            out.append(_assemble(chunk, program.inputs, pad_to).to(device))
    return out


def _ids_and_mask(chunk: list[dict[str, torch.Tensor]], pad_to: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right to one length, and the mask of the real tokens."""
    longest = pad_to or max(len(r["input_ids"]) for r in chunk)
    ids = torch.zeros(len(chunk), longest, dtype=torch.long)
    mask = torch.zeros(len(chunk), longest, dtype=torch.long)
    for j, r in enumerate(chunk):
        n = len(r["input_ids"])
        ids[j, :n] = r["input_ids"]
        mask[j, :n] = 1
    return ids, mask


def _assemble(chunk: list[dict[str, torch.Tensor]], example: Inputs, pad_to: int | None = None) -> Inputs:
    """One batch in the example inputs' structure: pad ids (right), fill what tokens imply."""
    ids, mask = _ids_and_mask(chunk, pad_to)
    longest = ids.shape[1]
    given: dict[str, torch.Tensor] = {}
    for name in chunk[0]:
        if name not in ("input_ids",):
            given[name] = torch.stack([r[name] for r in chunk])
    if "attention_mask" in given:
        mask = given["attention_mask"].long()

    def value(name: str, like: torch.Tensor) -> torch.Tensor:
        if name in given:
            return given[name].to(like.dtype)
        if name == "input_ids":
            return ids.to(like.dtype)
        if name == "attention_mask":
            return mask.to(like.dtype)
        if name == "token_type_ids":
            return torch.zeros_like(ids).to(like.dtype)
        if name == "position_ids":
            return torch.arange(longest).expand(len(chunk), longest).to(like.dtype)
        raise UsageError(f"--heal-data: the model also takes '{name}', which token data cannot provide; give "
                         f"--heal-data as a .pt file of input dicts with '{name}' (like --calibration)")

    kwargs = {k: value(k, v) for k, v in example.kwargs.items() if isinstance(v, torch.Tensor)}
    args = []
    for i, a in enumerate(example.args):
        if isinstance(a, torch.Tensor) and not a.is_floating_point() and i == 0:
            args.append(ids.to(a.dtype))
        elif isinstance(a, torch.Tensor):
            raise UsageError(f"--heal-data: the model's positional input {i} ({a.dtype}) is not token ids; give "
                             "--heal-data as a .pt file of input dicts")
        else:
            args.append(a)
    return Inputs(tuple(args), {**example.kwargs, **kwargs})


# ------------------------------------------------------------------------------------------- reading

def read_heal_data(paths, tokenizer=None) -> HealData:
    """Read --heal-data files (see the module docstring); UsageError naming the file on any problem."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + TOKEN_SUFFIXES)
            if not found:
                raise UsageError(f"--heal-data {p}: the directory holds no {', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"--heal-data {p}: no such file or directory")
    data = HealData(description="", tokenizer=tokenizer)
    for f in files:
        if f.suffix in (".txt", ".md", ".rst", ".text"):
            data.documents += _documents(_read_text(f))
        elif f.suffix == ".jsonl":
            data.documents += _jsonl(f)
        elif f.suffix in TOKEN_SUFFIXES:
            _read_tokens(f, data)
        else:
            raise UsageError(f"--heal-data {f}: unknown file type '{f.suffix}'; give text ({', '.join(TEXT_SUFFIXES)}) "
                             "or tokens (.npy, .pt)")
    kinds = [k for k, v in (("documents", data.documents), ("token sequences", data.token_rows),
                            ("input rows", data.input_rows)) if v]
    if not kinds:
        raise UsageError(f"--heal-data {', '.join(map(str, paths))}: no text or tokens found (empty files?)")
    if len(kinds) > 1:
        raise UsageError(f"--heal-data: mixes {' and '.join(kinds)}; give text files, or token files, not both")
    n = len(data.documents) or len(data.token_rows) or len(data.input_rows)
    data.description = f"{len(files)} file(s), {n} {kinds[0]}"
    return data


def _read_text(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--heal-data {f}: not UTF-8 text") from None


def _documents(text: str) -> list[str]:
    parts = [" ".join(line.strip() for line in block.splitlines() if line.strip()) for block in text.split("\n\n")]
    return [p for p in parts if p]


def _jsonl(f: Path) -> list[str]:
    docs = []
    for i, line in enumerate(_read_text(f).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"--heal-data {f}:{i}: not a JSON object (expected one {{\"text\": ...}} per line)") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UsageError(f"--heal-data {f}:{i}: expected an object with a string \"text\" field")
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs


def _int_rows(arr: torch.Tensor, f: Path) -> list[torch.Tensor]:
    if arr.is_floating_point() or arr.dtype == torch.bool or arr.dim() not in (1, 2) or arr.numel() == 0:
        raise UsageError(f"--heal-data {f}: expected integer token ids, 1-D or 2-D; got {arr.dtype} of shape "
                         f"{tuple(arr.shape)}")
    if int(arr.min()) < 0:
        raise UsageError(f"--heal-data {f}: negative token ids")
    arr = arr.long()
    return [arr] if arr.dim() == 1 else list(arr)


def _read_tokens(f: Path, data: HealData) -> None:
    if f.suffix == ".npy":
        try:
            arr = np.load(f, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"--heal-data {f}: not a numpy .npy array ({type(exc).__name__})") from None
        data.token_rows += _int_rows(torch.from_numpy(np.ascontiguousarray(arr)), f)
        return
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--heal-data {f}: not a tensor file ({type(exc).__name__}); save token ids or a dict of input "
                         "tensors with torch.save") from None
    if isinstance(obj, torch.Tensor):
        data.token_rows += _int_rows(obj, f)
        return
    dicts = obj if isinstance(obj, list) else [obj]
    for d in dicts:
        if not isinstance(d, dict) or "input_ids" not in d or not all(isinstance(v, torch.Tensor) for v in d.values()):
            raise UsageError(f"--heal-data {f}: expected token ids, or a dict of (N, S) input tensors with 'input_ids' "
                             "(or a list of such dicts)")
        n = d["input_ids"].shape[0]
        if any(v.dim() == 0 or v.shape[0] != n for v in d.values()):
            raise UsageError(f"--heal-data {f}: the input tensors differ in their first (batch) dimension")
        data.input_rows += [{k: v[i] for k, v in d.items()} for i in range(n)]


def default_tokenizer(program, tokenizer=None):
    """The tokenizer to read text with: the one given (a directory or an object), else the HF source's own."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    where = tokenizer or (program.source.path if program.source.kind == "hf" else None)
    if where is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(where))
    except Exception as exc:  # noqa: BLE001
        if tokenizer is None:
            return None
        raise UsageError(f"--tokenizer {tokenizer}: cannot load a tokenizer there ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def attach_heal_data(program, heal_data, tokenizer=None) -> None:
    """Give ``heal`` its data (``program.annotations.heal_data``): paths (text or token files), a HealData,
    a list of strings (documents), or a tensor of token ids. Text is read with ``tokenizer`` (a directory
    or a tokenizer object), by default the Hugging Face source's own."""
    if heal_data is None:
        return
    if isinstance(heal_data, HealData):
        data = heal_data
    elif isinstance(heal_data, torch.Tensor):
        data = HealData(description=f"token ids {tuple(heal_data.shape)}",
                        token_rows=_int_rows(heal_data, Path("<tensor>")))
    elif isinstance(heal_data, (list, tuple)) and heal_data and all(isinstance(d, str) for d in heal_data) \
            and not all(Path(d).exists() for d in heal_data):
        data = HealData(description=f"{len(heal_data)} documents", documents=list(heal_data))
    else:
        data = read_heal_data(heal_data)
    if data.documents and data.tokenizer is None:
        data.tokenizer = default_tokenizer(program, tokenizer)
        if data.tokenizer is None:
            raise UsageError(_NEED_TOKENIZER)
    elif data.tokenizer is None and tokenizer is not None:
        data.tokenizer = default_tokenizer(program, tokenizer)
    program.annotations.heal_data = data
