"""What every reader does to reach the canonical view, whatever the format.

- Names: a tensor stored under its llama.cpp name (GGUF; APR files `apr` converted from GGUF)
  gets its HF name; two stored names with one canonical name make the file unreadable.
- Q/K rows: llama's q/k projections (and biases) stored in GGUF order are row-permuted back to
  HF order within each head; whole rows move, so quantized blocks move with their rows.
- Norm offset: gemma's RMSNorm weights, stored as `w + 1` in GGUF, read back as `w`.
  (Which tensor gets which transform: convqa.arch.transforms, from the registry's flags.)
- Tied head: a file that stores a tied `lm_head.weight` (SafeTensors, APR) must store a byte copy
  of the embedding; the canonical view then holds the embedding only.

Each reader reports a violation in its own words (FormatError field and offset), so these
helpers say *what* is wrong and leave the reporting to the reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from convqa.arch import registry
from convqa.arch.permute import unpermute_rows_from_gguf
from convqa.arch.transforms import qk_heads  # noqa: F401  (re-exported: the readers' one import)
from convqa.formats.filerange import read_file_range
from convqa.model import LazyTensor

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_COMPARE_CHUNK = 1 << 24  # bytes compared at a time (no second full-size temporary)


@dataclass(frozen=True)
class NameCollision:
    """Two stored tensors that map to one canonical name; `index` is the second one's position."""

    first: str
    second: str
    canonical: str
    index: int

    @property
    def message(self) -> str:
        return f"tensors {self.first!r} and {self.second!r} both map to {self.canonical!r}"


def canonical_name(stored: str, architecture: str) -> str:
    """The HF name of a tensor stored under its llama.cpp name for `architecture`; any other name is kept."""
    return registry.gguf_to_hf(registry.get(architecture), stored) or stored


def name_collision(stored: Iterable[str], architecture: str) -> NameCollision | None:
    """The first pair of stored names with one canonical name, in order (None: all distinct)."""
    first_of: dict[str, str] = {}
    for index, name in enumerate(stored):
        canonical = canonical_name(name, architecture)
        if canonical in first_of:
            return NameCollision(first_of[canonical], name, canonical, index)
        first_of[canonical] = name
    return None


def unpermuted_loader(load: Callable[[], np.ndarray], rows: int, n_head: int) -> Callable[[], np.ndarray]:
    """`load` (stored bytes, rows in GGUF order) with the rows back in HF order, flat uint8.

    Whole rows move, so the uint8 row view is exact for quantized blocks too."""

    def load_unpermuted() -> np.ndarray:
        return unpermute_rows_from_gguf(load().reshape(rows, -1), n_head).reshape(-1)

    return load_unpermuted


def is_tied_copy(head: LazyTensor, embedding: LazyTensor | None) -> bool:
    """Whether a stored `lm_head.weight` is a byte copy of the embedding (same shape, encoding, bytes).

    Compared a slice at a time from the file where both lie as stored (`stored_in`): every open
    of a tied APR or SafeTensors model does this, and loading both whole held twice the largest
    tensor (1.9 GB for a 1.5B model's F32 embedding: the peak of every conversion from one)."""
    if embedding is None or head.shape != embedding.shape or head.encoding != embedding.encoding:
        return False
    if head.stored_in and embedding.stored_in:
        size = head.nbytes
        for start in range(0, size, _COMPARE_CHUNK):
            n = min(_COMPARE_CHUNK, size - start)
            if not np.array_equal(read_file_range(head.stored_in, head.file_offset + start, n),
                                  read_file_range(embedding.stored_in, embedding.file_offset + start, n)):
                return False
        return True
    a, b = head.raw(), embedding.raw()
    if a.size != b.size:
        return False
    return all(np.array_equal(a[i : i + _COMPARE_CHUNK], b[i : i + _COMPARE_CHUNK]) for i in range(0, a.size, _COMPARE_CHUNK))
