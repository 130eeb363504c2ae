"""Float32 arithmetic on weights held in 16 bits: the ground truth's numbers without an F32 copy.

A BF16 (F16) checkpoint is held in bfloat16 (float16) (convqa.infer.weights_dtype: an F32 copy
of a 1.5B model is 8.8 GB of RSS), but computing in bfloat16 rounds every activation to 8
significant bits. That made convqa's own ground truth the least exact engine in the room: at
1.5B, llama.cpp (which multiplies BF16 weights with F32 activations) agreed on the top-1 token at
0.891 of positions with the bfloat16-computed ground truth and at 0.976 with a float32-computed
one, and the bfloat16 ground truth agreed with the float32 one at only 0.914 (issue 13,
measured). Every BF16 and F16 value is exact in float32, so the model a checkpoint *means* is the
float32 computation over its weights; this module computes exactly that, holding the weights as
stored:

- `F.linear` with a 16-bit weight upcasts `ROWS_PER_SLICE` rows of it at a time and multiplies
  them in float32, so one slice (a few MB, cache-resident) is the only F32 copy alive. Each
  output column's sum is the one the whole upcast weight gives (only the columns are split). On
  this project's CPU (no avx512_bf16) it is also faster than torch's bfloat16 kernels: at 1.5B a
  32-token prefill took 1.8 s against 9.4 s, a decode step 0.5-0.6 s against 0.35 s.
- `F.embedding` gathers 16-bit rows and returns them in float32 (exact).
- any other op that meets a 16-bit tensor next to a float32 one upcasts it (exact), and a cast of
  a float32 activation to a 16-bit dtype (code that believes the model computes in its
  parameters' dtype) keeps float32.
- parameters and buffers of fewer than two dimensions (norms, biases, scales: a few MB) are
  upcast once by `hold_for_float32_compute`.

Measured: the logits (prefill, and a decode step from the KV cache) are bit-identical to those
of the same checkpoint loaded in float32, on the nine architectures tests/test_float32_compute.py
builds and on the 1.5B bench model, while every matrix stays in 16 bits.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

# Rows of a 16-bit weight upcast per matmul: 256 x 8960 columns in F32 is 9 MB. Measured at 1.5B
# on 1 thread: 256 rows 1.76 s prefill / 0.49 s per decoded token; 32 rows 2.62 / 1.16, 1024 rows
# 3.20 / 1.14, the whole weight at once 5.6 s prefill. A slice splits only the output columns, so
# its size changes the speed, not the bits (tests/test_float32_compute.py).
ROWS_PER_SLICE = 256
_CASTS = {torch.Tensor.to, torch.Tensor.type}
# The dtypes weights can be held in for float32 compute: every value of either is exact in float32.
HELD_DTYPES = (torch.bfloat16, torch.float16)


def _is_held(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in HELD_DTYPES


def _upcast(value):
    return value.float() if _is_held(value) else value


def sliced_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in float32 for a 16-bit `weight`, upcast a slice of rows at a time."""
    x = _upcast(x)
    out = x.new_empty(x.shape[:-1] + (weight.shape[0],))
    for start in range(0, weight.shape[0], ROWS_PER_SLICE):
        stop = min(start + ROWS_PER_SLICE, weight.shape[0])
        out[..., start:stop] = F.linear(x, weight[start:stop].float(), None if bias is None else _upcast(bias[start:stop]))
    return out


def _float32_target(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A cast's arguments with a held dtype as the target dtype replaced by float32."""
    def swap(value):
        return torch.float32 if isinstance(value, torch.dtype) and value in HELD_DTYPES else value
    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}


class Float32Compute(TorchFunctionMode):
    """While active, torch computes in float32 over 16-bit-held weights (see the module's doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if _is_held(weight):
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return sliced_linear(x, weight, bias)
        if func is F.embedding:
            return _upcast(func(*args, **kwargs))
        if func in _CASTS and args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float32:
            args, kwargs = _float32_target(args, kwargs)
            return func(*args, **kwargs)
        if func in (torch.Tensor.bfloat16, torch.Tensor.half) and args[0].dtype == torch.float32:
            return args[0]
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.dtype in HELD_DTYPES for t in tensors) and any(t.dtype == torch.float32 for t in tensors):
            args, kwargs = tree_map(_upcast, args), tree_map(_upcast, kwargs)
        return func(*args, **kwargs)


def hold_for_float32_compute(model) -> None:
    """Upcast the model's 16-bit parameters and buffers of fewer than two dimensions (norm
    weights, biases, scales) to float32 once; the matrices stay as they are held."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype in HELD_DTYPES and param.ndim < 2:
                setattr(module, name, torch.nn.Parameter(param.float(), requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dtype in HELD_DTYPES and buffer.ndim < 2:
                module.register_buffer(name, buffer.float(), persistent=name not in module._non_persistent_buffers_set)


@contextmanager
def float32_compute(enabled: bool = True):
    """Float32Compute for the forward passes inside, when `enabled` (a model held in 16 bits)."""
    if not enabled:
        yield
        return
    with Float32Compute():
        yield
