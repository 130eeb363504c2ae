"""llama's Q/K row permutation between HF ("rotate_half", NeoX pairs) and GGUF (Meta pairs).

llama.cpp runs LLM_ARCH_LLAMA with adjacent-pair RoPE, HF with split-half RoPE, so
convert_hf_to_gguf.py permutes the rows of q_proj/k_proj (and their biases) within each head.
The permutation only moves whole rows, so it applies to quantized block rows unchanged: pass
the uint8 row-bytes view of a quantized tensor and blocks move with their rows.
"""

from __future__ import annotations

import numpy as np


def permute_rows_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF order -> GGUF order (llama.cpp `LlamaModel.permute`). `w` has rows on axis 0."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows_from_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF order -> HF order (transformers `_reverse_permute_weights`)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
