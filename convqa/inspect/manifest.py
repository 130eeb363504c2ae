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
# 4x the tensor's float32 decode at the peak (3.7 GB more for a 1.5B model's embedding). A tensor
# is decoded a slice of rows at a time too, and every statistic and the values' digest are taken
# from the slice while it is in the CPU's cache: one read of the stored bytes instead of a
# decode written whole and read eight times (NaN, Inf, two float64 passes, min, max, zeros, the
# digest). Measured at 1.5B: the BF16 source's manifest 20.5 -> 13.6 s and 2.3 -> 0.5 GB RSS, its
# Q8_0 GGUF's 21.8 -> 13.9 s and 1.5 -> 0.3 GB, the same digests, std within 2e-14.
STATS_SLICE_ELEMENTS = 1 << 18


class RunningStats:
    """tensor_stats over values given a slice at a time (`add`), in float64."""

    def __init__(self):
        self.nan = self.inf = self.count = self.zeros = 0
        self.total = self.squares = self.mean = self.centred = 0.0
        self.low, self.high = np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values).reshape(-1)
        for start in range(0, v.size, STATS_SLICE_ELEMENTS):
            self._add_slice(v[start : start + STATS_SLICE_ELEMENTS].astype(np.float64))

    def _add_slice(self, s: np.ndarray) -> None:
        finite = np.isfinite(s)
        if not finite.all():
            self.nan += int(np.count_nonzero(np.isnan(s)))
            self.inf += int(np.count_nonzero(np.isinf(s)))
            s = s[finite]
        if s.size == 0:
            return
        part_total = s.sum()
        self.total += part_total
        self.squares += np.dot(s, s)
        self.low, self.high = min(self.low, s.min()), max(self.high, s.max())
        self.zeros += int(np.count_nonzero(s == 0))
        # The slice's squared deviations from its own mean, merged into the running ones (Chan et
        # al.): no sum(x^2) - n*mean^2 to cancel the digits of a tight spread around a large mean.
        part_mean = part_total / s.size
        s -= part_mean
        merged = self.count + s.size
        delta = part_mean - self.mean
        self.centred += np.dot(s, s) + delta * delta * self.count * s.size / merged
        self.mean += delta * s.size / merged
        self.count = merged

    def result(self) -> dict:
        if self.count == 0:
            return {"mean": None, "std": None, "min": None, "max": None, "l2": None, "zero_fraction": None,
                    "nan": self.nan, "inf": self.inf}
        return {
            "mean": float(self.total / self.count),
            "std": float(np.sqrt(self.centred / self.count)),
            "min": float(self.low),
            "max": float(self.high),
            "l2": float(np.sqrt(self.squares)),
            "zero_fraction": float(self.zeros / self.count),
            "nan": self.nan,
            "inf": self.inf,
        }


def tensor_stats(values: np.ndarray) -> dict:
    """mean, std (population), min, max, l2 norm and zero fraction of the finite values; the
    counts of NaN and Inf."""
    stats = RunningStats()
    stats.add(values)
    return stats.result()


def _update_with_values(h, values: np.ndarray) -> None:
    """Feed float32 values to a sha256 as little-endian bytes in C order, where they lie (no
    copy) when they already are that; else converted a slice at a time."""
    v = np.asarray(values).reshape(-1)  # a view of the C-ordered decode
    if v.dtype == np.dtype("<f4") and v.flags.c_contiguous:
        h.update(memoryview(v).cast("B"))
    else:
        for start in range(0, v.size, STATS_SLICE_ELEMENTS):
            h.update(np.ascontiguousarray(v[start : start + STATS_SLICE_ELEMENTS], dtype="<f4").tobytes())


def values_sha256(values: np.ndarray) -> str:
    """sha256 of float32 values as little-endian bytes in C order."""
    h = hashlib.sha256()
    _update_with_values(h, values)
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
        stats, digest = RunningStats(), hashlib.sha256()
        for values in t.encoding.decoded_slices(raw, t.shape, STATS_SLICE_ELEMENTS):
            stats.add(values)
            if t.encoding.name != "F32":
                _update_with_values(digest, values)
        entry["stats"] = stats.result()
        # An F32 decode is a view of the raw bytes (convqa.encodings), so their sha256 is the values'.
        entry["values_sha256"] = entry["sha256"] if t.encoding.name == "F32" else digest.hexdigest()
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
