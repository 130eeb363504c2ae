"""Per-artifact manifest: what `convqa inspect` prints and what the tensor gates read.

For every tensor: canonical and stored name, canonical and stored shape, encoding, byte size,
sha256 of the stored bytes, and statistics and sha256 of the float32 values. Plus the config, a
tokenizer summary and the format metadata. Tensors are read one at a time.

The values' sha256 and the tokenizer's digests let convqa.compare.manifests decide an exact
comparison of two artifacts from their manifests alone, without the artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from convqa.errors import FormatError
from convqa.files import path_size
from convqa.formats import detect_format, open_model
from convqa.model import LazyTensor, ModelArtifact, TokenizerSpec


# Files a workflow engine adds inside directory outputs; not part of the artifact.
WORKFLOW_MARKERS = {".snakemake_timestamp"}

UNUSED_TOKEN = 5  # llama.cpp's token type of GGUF's vocabulary padding


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, or of a directory's regular files (sorted by relative path)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in WORKFLOW_MARKERS) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\x00")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


# The statistics are float64 sums (a float32 sum of a 233M-value embedding loses digits), taken a
# slice at a time: a float64 copy of the whole tensor, and the temporaries of `std` over it, were
# 4x the tensor's float32 decode at the peak (3.7 GB more for a 1.5B model's embedding).
STATS_SLICE_ELEMENTS = 1 << 18


def _float64_slices(values: np.ndarray):
    for start in range(0, values.size, STATS_SLICE_ELEMENTS):
        yield values[start : start + STATS_SLICE_ELEMENTS].astype(np.float64)


def tensor_stats(values: np.ndarray) -> dict:
    """mean, std (population), min, max, l2 norm and zero fraction of the finite values; the
    counts of NaN and Inf."""
    v = np.asarray(values).reshape(-1)
    n_nan = int(np.count_nonzero(np.isnan(v)))
    n_inf = int(np.count_nonzero(np.isinf(v)))
    fv = v[np.isfinite(v)] if n_nan or n_inf else v
    if fv.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "l2": None, "zero_fraction": None, "nan": n_nan, "inf": n_inf}
    total = squares = 0.0
    for s in _float64_slices(fv):
        total += s.sum()
        squares += np.dot(s, s)
    mean = total / fv.size
    centred = 0.0  # two passes: sum((x - mean)^2) keeps digits that sum(x^2) - n*mean^2 cancels
    for s in _float64_slices(fv):
        s -= mean
        centred += np.dot(s, s)
    return {
        "mean": float(mean),
        "std": float(np.sqrt(centred / fv.size)),
        "min": float(fv.min()),
        "max": float(fv.max()),
        "l2": float(np.sqrt(squares)),
        "zero_fraction": float(np.count_nonzero(fv == 0) / fv.size),
        "nan": n_nan,
        "inf": n_inf,
    }


def values_sha256(values: np.ndarray) -> str:
    """sha256 of float32 values as little-endian bytes in C order, hashed where they lie (no copy)
    when they already are that; else converted a slice at a time."""
    v = np.asarray(values).reshape(-1)  # a view of the C-ordered decode
    h = hashlib.sha256()
    if v.dtype == np.dtype("<f4") and v.flags.c_contiguous:
        h.update(memoryview(v).cast("B"))
    else:
        for start in range(0, v.size, STATS_SLICE_ELEMENTS):
            h.update(np.ascontiguousarray(v[start : start + STATS_SLICE_ELEMENTS], dtype="<f4").tobytes())
    return h.hexdigest()


def tensor_entry(t: LazyTensor, with_stats: bool = True) -> dict:
    raw = t.raw()
    entry = {
        "name": t.name,
        "stored_name": t.stored_name,
        "shape": list(t.shape),
        "stored_shape": list(t.stored_shape),
        "encoding": t.encoding.name,
        "nbytes": int(raw.size),
        "sha256": hashlib.sha256(memoryview(raw)).hexdigest(),
        "file_offset": t.file_offset,
    }
    if with_stats:
        values = t.encoding.decode(raw, t.shape)
        entry["stats"] = tensor_stats(values)
        # An F32 decode is a view of the raw bytes (convqa.encodings), so their sha256 is the values'.
        entry["values_sha256"] = entry["sha256"] if t.encoding.name == "F32" else values_sha256(values)
    return entry


def tokenizer_summary(tok: TokenizerSpec | None) -> dict | None:
    if tok is None:
        return None
    return {
        "model": tok.model,
        "pre": tok.pre,
        "n_tokens": len(tok.tokens),
        "n_merges": len(tok.merges),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "unk_token_id": tok.unk_token_id,
        "pad_token_id": tok.pad_token_id,
        "add_bos_token": tok.add_bos_token,
        "add_eos_token": tok.add_eos_token,
        "chat_template_sha256": hashlib.sha256(tok.chat_template.encode()).hexdigest() if tok.chat_template else None,
        "fingerprint": tok.fingerprint(),
        # What compare_tokenizers compares, as unambiguous digests (the fingerprint joins the
        # tokens with a separator a token may hold, and folds `pre` None into ""). `unpadded`: the
        # vocabulary without its trailing UNUSED (type 5) tokens, which compare_tokenizers ignores
        # when the candidate has them and the reference does not (GGUF's [PAD{i}] rows).
        "n_token_types": len(tok.token_types),
        "tokens_sha256": _list_sha256(tok.tokens),
        "token_types_sha256": _list_sha256(tok.token_types),
        "merges_sha256": _list_sha256(tok.merges),
        "unpadded": _unpadded(tok),
    }


def _list_sha256(items) -> str:
    """sha256 of a list of strings or ints, as JSON (ASCII, so every string encodes)."""
    return hashlib.sha256(json.dumps([x if isinstance(x, str) else int(x) for x in items]).encode()).hexdigest()


def _unpadded(tok: TokenizerSpec) -> dict | None:
    n = len(tok.token_types)
    while n and tok.token_types[n - 1] == UNUSED_TOKEN:
        n -= 1
    if n == len(tok.tokens) == len(tok.token_types):
        return None
    return {"n_tokens": n, "tokens_sha256": _list_sha256(tok.tokens[:n]), "token_types_sha256": _list_sha256(tok.token_types[:n])}


def artifact_manifest(model: ModelArtifact, with_stats: bool = True) -> dict:
    return {
        "path": model.path,
        "format": model.format,
        "config": model.config.as_dict(),
        "tokenizer": tokenizer_summary(model.tokenizer),
        "tensor_count": len(model.tensors),
        "tensors": [tensor_entry(t, with_stats) for t in model],
        "metadata": model.metadata,
    }


def build_manifest(path: str | os.PathLike, with_stats: bool = True) -> dict:
    with open_model(path) as model:
        manifest = artifact_manifest(model, with_stats)
    manifest["file_sha256"] = file_sha256(path)
    manifest["file_size"] = path_size(path, WORKFLOW_MARKERS)
    return manifest


def unreadable_manifest(path: str | os.PathLike, error: Exception) -> dict:
    """The manifest of an artifact the strict reader refuses: no tensors, and `read_error`
    saying why, so the gates fail it (G0-INTEGRITY) instead of the workflow stopping."""
    try:
        fmt = detect_format(path)
    except FormatError:
        fmt = None
    return {
        "path": os.fspath(path),
        "format": fmt,
        "read_error": str(error),
        "config": None,
        "tokenizer": None,
        "tensor_count": 0,
        "tensors": [],
        "metadata": {},
        "file_sha256": file_sha256(path),
        "file_size": path_size(path, WORKFLOW_MARKERS),
        # A failed conversion's placeholder: what failed, for the gates (convqa.formats.no_artifact).
        "no_artifact": getattr(error, "failure", None),
    }
