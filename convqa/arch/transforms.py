"""The intentional HF <-> GGUF tensor transforms, as small functions the format boundary calls.

Which tensor gets which transform is decided here from the registry's flags, once, so the GGUF
writer, the readers (canonical view) and the comparator's diagnoses agree:
- Q/K permutation (`permute_qk`): q/k projections and their biases, rows moved within each head;
  whole rows move, so quantized blocks move with their rows (`convqa.arch.permute`).
- Norm offset (`norm_offset`): every RMSNorm weight is `w + 1` in GGUF. It changes values, so it
  applies to float encodings only (F-LAYOUT-003 keeps norms F32 anyway); float32 arithmetic, as
  llama.cpp's converter and transformers' GGUF loader (`weights - 1`) do it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from convqa.arch.registry import Architecture, declared
from convqa.encodings import Encoding
from convqa.model import ModelConfig

NORM_OFFSET = 1.0
_FLOAT_ENCODINGS = ("F32", "F16", "BF16")


def arch_of(config: ModelConfig) -> Architecture:
    return declared(config.architecture)


def is_qk_projection(name: str) -> tuple[bool, bool]:
    """(is a q_proj tensor, is a k_proj tensor) for a canonical name."""
    return ".self_attn.q_proj." in name, ".self_attn.k_proj." in name


def qk_heads(config: ModelConfig, canonical: str) -> int | None:
    """The head count whose rotary pairs a GGUF-order `canonical` tensor has permuted, or None
    when its rows are stored in HF order (not a q/k projection, or an architecture llama.cpp
    does not permute)."""
    is_q, is_k = is_qk_projection(canonical)
    if arch_of(config).permute_qk and (is_q or is_k):
        return config.num_heads if is_q else config.num_kv_heads
    return None


def is_norm(canonical: str) -> bool:
    return canonical.endswith("norm.weight")


def norm_offset(config: ModelConfig, canonical: str) -> float:
    """What GGUF adds to `canonical`'s values (gemma norms: 1.0), else 0.0."""
    return NORM_OFFSET if arch_of(config).norm_offset and is_norm(canonical) else 0.0


def can_offset(encoding: Encoding) -> bool:
    return encoding.name in _FLOAT_ENCODINGS


def offset_raw(raw: np.ndarray, encoding: Encoding, shape: tuple[int, ...], delta: float) -> np.ndarray:
    """Stored bytes of `encoding` with `delta` added to every value, flat uint8 (float32 sum)."""
    values = encoding.decode(raw, shape).astype(np.float32) + np.float32(delta)
    return np.ascontiguousarray(encoding.encode(values)).reshape(-1).view(np.uint8)


def offset_loader(load: Callable[[], np.ndarray], encoding: Encoding, shape: tuple[int, ...], delta: float):
    """`load` with `delta` added to its values (the reader passes -1 for gemma norms)."""

    def load_offset() -> np.ndarray:
        return offset_raw(load(), encoding, shape, delta)

    return load_offset


# MoE expert stacking (`Architecture.expert_roles`): GGUF holds one [n_expert, rows, cols] tensor
# per layer and projection where HF holds n_expert 2-D tensors, expert e at index e (llama.cpp's
# convert_hf_to_gguf.py: `datas = [experts[f"...experts.{xid}..."] for xid in range(n_experts)]`,
# `np.stack(datas)`). Each expert's rows are whole rows of the stack, so the stacked bytes are the
# experts' stored bytes one after another, exact for quantized blocks too.


def expert_order(n_expert: int) -> list[int]:
    """The stacking order: expert e at index e, numerically (never sorted as strings)."""
    return list(range(n_expert))


def stack_experts(loads: list[Callable[[], np.ndarray]]) -> np.ndarray:
    """The stored bytes of one stacked expert tensor, flat uint8, from each expert's loader in
    stacking order; one group in memory at a time (the writer streams group by group)."""
    return np.concatenate([np.ascontiguousarray(load()).reshape(-1).view(np.uint8) for load in loads])


def expert_loader(load_stacked: Callable[[], np.ndarray], expert: int, n_expert: int) -> Callable[[], np.ndarray]:
    """Expert `expert`'s stored bytes (flat uint8) out of a stacked tensor's loader: its equal
    share of the stack, expert e at index e."""

    def load_expert() -> np.ndarray:
        raw = load_stacked().reshape(-1)
        if raw.size % n_expert:
            raise ValueError(f"{raw.size} stacked bytes do not split into {n_expert} experts")
        size = raw.size // n_expert
        return raw[expert * size : (expert + 1) * size]

    return load_expert
