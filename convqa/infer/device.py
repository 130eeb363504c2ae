"""Free device memory before a gpu run: a `skipped` row with the numbers instead of a CUDA OOM.

An engine that runs out of device memory mid-load dies with a CUDA error (torch) or an abort
(ggml), which would read as the artifact's failure. So before a gpu run loads anything, the job
asks the device how much is free (`torch.cuda.mem_get_info`) and compares it with what the run
needs; too little gives `skipped` with both numbers, like any absent capability.

The estimate is the artifact's tensors as the engine holds them on the device, plus a margin. It is
not convqa.infer.memory's host estimate: that one also counts host-only copies made while loading
and the interpreter with its libraries, which the device never holds.
transformers dequantizes every tensor to its weights dtype (convqa.infer.weights_dtype: the
source's: bfloat16 for BF16, float16 for F16, else float32); llama.cpp keeps the file's
encodings (GGML blocks stay blocks). The margin covers activations, the KV cache of the short
prompt set, cuBLAS workspaces and the caching allocator's rounding; the CUDA context is already
taken when mem_get_info answers, so it is not in it.
"""

from __future__ import annotations

import os
from typing import Callable

MARGIN_FRACTION = 0.2
MARGIN_BYTES = 256 * 2**20
GIB = 2**30


def weight_bytes(artifact_path: str | os.PathLike, engine: str, weights_dtype: str | None = None) -> int:
    """Bytes the engine holds for the artifact's tensors on the device: every element in the
    weights dtype under transformers (None: the artifact's own), the stored encoding's bytes
    under llama.cpp."""
    from convqa.formats import open_model
    from convqa.infer.weights_dtype import BYTES_PER_ELEMENT, weights_dtype_of

    with open_model(artifact_path) as artifact:
        if engine == "llama.cpp":
            return sum(t.nbytes for t in artifact)
        element = BYTES_PER_ELEMENT[weights_dtype or weights_dtype_of(artifact)]
        return sum(t.n_elements for t in artifact) * element


def bytes_needed(weights: int) -> int:
    """The weights plus the margin for activations, KV cache and allocator slack."""
    return int(weights * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def torch_mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the current CUDA device, as torch reports them."""
    import torch

    return torch.cuda.mem_get_info()


def device_memory(needed: int, mem_get_info: Callable[[], tuple[int, int]] | None = None) -> dict | None:
    """{"needed_bytes", "free_bytes", "total_bytes"} of the device, or None when it cannot be asked
    (no CUDA runtime to ask: the capability check already ruled, and the run goes ahead).
    `mem_get_info` returns (free, total) bytes (default: torch.cuda.mem_get_info)."""
    try:
        free, total = (mem_get_info or torch_mem_get_info)()
    except Exception:  # noqa: BLE001 -- torch without CUDA, a driver error: nothing to compare with
        return None
    return {"needed_bytes": int(needed), "free_bytes": int(free), "total_bytes": int(total)}


def skip_reason(memory: dict | None) -> str:
    """'' when the run fits (or the device could not be asked), else the reason with the numbers."""
    if memory is None or memory["free_bytes"] >= memory["needed_bytes"]:
        return ""
    return (f"not enough free GPU memory: the run needs about {memory['needed_bytes'] / GIB:.2f} GiB, "
            f"{memory['free_bytes'] / GIB:.2f} GiB of {memory['total_bytes'] / GIB:.2f} GiB is free")


def check_artifact(artifact_path: str | os.PathLike, engine: str,
                   mem_get_info: Callable[[], tuple[int, int]] | None = None,
                   weights_dtype: str | None = None) -> tuple[str, dict | None]:
    """(skip reason or '', the numbers) for running `artifact_path` under `engine` on the gpu
    (transformers in `weights_dtype`, None: the artifact's own)."""
    memory = device_memory(bytes_needed(weight_bytes(artifact_path, engine, weights_dtype)), mem_get_info)
    return skip_reason(memory), memory
