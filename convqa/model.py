"""The canonical model view every reader yields and every writer consumes.

Canonical means: HF tensor names (`model.layers.0.self_attn.q_proj.weight`), numpy/PyTorch shape
order (`[out, in]`), llama's Q/K rows in HF order (GGUF's permutation already undone), and the
stored encoding kept as it is (raw bytes available unchanged). Layout conventions of a format
(GGUF's reversed `ne`, llama's Q/K permutation, APR's materialised tied `lm_head`) are undone at
the format boundary and nowhere else, so every comparison works on this one view.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np

from convqa.encodings import Encoding


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and hyperparameters, the subset every format must carry."""

    architecture: str  # a convqa.arch.registry name: "qwen2", "llama", "gemma3", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    # Architecture-specific hyperparameters, by convqa.arch.registry.Param name (gemma's
    # sliding_window, soft-capping, ...): every format carries exactly the architecture's set.
    params: dict = field(default_factory=dict)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TokenizerSpec:
    """A tokenizer as GGUF describes one (the richest common denominator of the three formats)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # llama.cpp pre-tokenizer name: "qwen2", "smollm", "llama-bpe", ...
    tokens: list[str]
    token_types: list[int]  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: list[str]  # "left right", byte-level spelling
    scores: list[float] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    # SentencePiece only: llama.cpp prepends a space unless told not to (Gemma is not); None: unstated.
    add_space_prefix: bool | None = None

    def fingerprint(self) -> str:
        """sha256 over everything that changes how text becomes ids (and the chat template)."""
        h = hashlib.sha256()
        for part in (
            self.model,
            self.pre or "",
            "\x00".join(self.tokens),
            ",".join(map(str, self.token_types)),
            "\x00".join(self.merges),
            repr(
                (
                    self.bos_token_id,
                    self.eos_token_id,
                    self.unk_token_id,
                    self.pad_token_id,
                    self.add_bos_token,
                    self.add_eos_token,
                )
            ),
            self.chat_template or "",
            # Only when stated, so that the fingerprints of byte-level tokenizers stay as they were.
            *(() if self.add_space_prefix is None else (f"add_space_prefix={self.add_space_prefix}",)),
        ):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x01")
        return h.hexdigest()


class TensorView(Protocol):
    """One tensor of an open model file, read lazily."""

    name: str  # canonical HF name
    shape: tuple[int, ...]  # numpy order
    encoding: Encoding
    stored_name: str  # the name inside the file
    stored_shape: tuple[int, ...]  # the shape as the file records it (GGUF: reversed ne)
    file_offset: int  # absolute byte offset of the data (for diagnostics)

    def raw(self) -> np.ndarray:
        """Stored bytes in canonical layout, a flat uint8 array (a reader loads it from the file on each call, into private memory)."""

    def to_float32(self) -> np.ndarray:
        """Decoded values in canonical shape and layout."""


@dataclass
class LazyTensor:
    """A TensorView backed by a loader callable; what the readers hand out."""

    name: str
    shape: tuple[int, ...]
    encoding: Encoding
    load_raw: Callable[[], np.ndarray]
    stored_name: str = ""
    stored_shape: tuple[int, ...] = ()
    file_offset: int = -1
    # The file whose bytes at `file_offset` are exactly `raw()` (None when the reader transforms
    # them, or they are not in one file): lets a caller read them a slice at a time.
    stored_in: str | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.stored_name = self.stored_name or self.name
        self.stored_shape = tuple(int(d) for d in (self.stored_shape or self.shape))

    @property
    def nbytes(self) -> int:
        return self.encoding.nbytes(self.shape)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def raw(self) -> np.ndarray:
        return np.ascontiguousarray(self.load_raw()).reshape(-1).view(np.uint8)

    def to_float32(self) -> np.ndarray:
        return self.encoding.decode(self.raw(), self.shape)

    def sha256(self) -> str:
        return hashlib.sha256(memoryview(self.raw())).hexdigest()


@dataclass
class ModelArtifact:
    """An open model in any of the three formats, as the canonical view."""

    path: str
    format: str  # "safetensors" | "gguf" | "apr"
    config: ModelConfig
    tokenizer: TokenizerSpec | None
    tensors: dict[str, LazyTensor]  # canonical name -> tensor, in file order
    metadata: dict = field(default_factory=dict)  # format-level metadata, JSON-safe (provenance, raw keys)

    def __iter__(self) -> Iterator[LazyTensor]:
        return iter(self.tensors.values())

    def close(self) -> None:
        """Nothing to release: readers hold no file open between tensor reads."""

    def __enter__(self) -> "ModelArtifact":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class WriterQuirks:
    """Deliberate deviations from a correct writer, used only by the known-bad mutants.

    The defaults are the correct behaviour; `convqa.convert.mutants` is the only code that changes them,
    so the normal conversion path never carries a bug switch of its own.
    """

    gguf_reverse_dims: bool = True  # False: write numpy shape as `ne` (dims not reversed)
    llama_permute_qk: bool = True  # False: skip llama's Q/K permutation when writing GGUF
    norm_offset_times: int = 1  # how often gemma's +1 norm offset is added when writing GGUF (2: twice)
    apr_dtype_override: dict = field(default_factory=dict)  # canonical name -> dtype byte to write
    # MoE: n_expert -> the expert stacked at each index of a GGUF expert tensor (None: 0..n-1)
    expert_order: Callable[[int], list[int]] | None = None


@dataclass
class WritePlan:
    """Everything a writer needs; tensors are loaded one at a time while writing."""

    config: ModelConfig
    tokenizer: TokenizerSpec | None
    tensors: list[LazyTensor]  # canonical names/shapes/layout; raw() gives the bytes to store
    metadata: dict = field(default_factory=dict)  # provenance: converter, source, records (JSON-safe)
    quirks: WriterQuirks = field(default_factory=WriterQuirks)
