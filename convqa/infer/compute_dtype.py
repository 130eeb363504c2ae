"""The dtype transformers computes a model in: the dtype of its ground truth's weights.

A lossless conversion is held to bit-identical logits, which needs the same dtype and kernels on
both sides; and a 1.5B BF16 checkpoint upcast to F32 takes twice the file in memory (8.8 GB RSS
measured for a 3.1 GB model, issue 13). So every transformers run of a model (the SafeTensors
ground truth, every artifact converted from it, the reference-quantized model) computes in the
dtype the source stores most of its floating-point elements in:
- BF16 -> bfloat16 (torch has native BF16 CPU kernels where the CPU has avx512_bf16/AMX, and
  correct, slower ones elsewhere);
- F32 -> float32, as before;
- F16 (and anything else) -> float32: torch's CPU float16 matmuls have no native kernels on most
  x86 CPUs (no avx512_fp16) and F16 activations overflow where F32 and BF16 ones do not.
Artifacts are computed in their source's dtype, not their own: a Q8_0 GGUF of a BF16 model runs in
BF16 like its ground truth and its reference model (each dequantized value rounded to BF16,
identically on both sides of the reference comparison), and a round trip that came back in F32
still computes like the model it came from.

Only names and header data here (no torch): convqa.infer.memory sizes jobs with it too.
"""

from __future__ import annotations

import os

BFLOAT16 = "bfloat16"
FLOAT32 = "float32"
COMPUTE_DTYPES = (BFLOAT16, FLOAT32)
BYTES_PER_ELEMENT = {BFLOAT16: 2, FLOAT32: 4}
# Stored encodings that count as a dtype the model is held in (quantized blocks are not one).
_FLOAT_ENCODINGS = {"F32": FLOAT32, "F64": FLOAT32, "F16": FLOAT32, "BF16": BFLOAT16}


def compute_dtype_of(artifact) -> str:
    """The compute dtype for an open artifact (convqa.model.ModelArtifact) taken as the ground
    truth: bfloat16 when most of its floating-point elements are stored as BF16, else float32.
    An artifact with no plain-float tensor (all quantized) computes in float32."""
    elements = {BFLOAT16: 0, FLOAT32: 0}
    for tensor in artifact.tensors.values():
        dtype = _FLOAT_ENCODINGS.get(tensor.encoding.name)
        if dtype is not None:
            elements[dtype] += tensor.n_elements
    return BFLOAT16 if elements[BFLOAT16] > elements[FLOAT32] else FLOAT32


def compute_dtype_for(path: str | os.PathLike) -> str:
    """compute_dtype_of the artifact at `path` (read from its header; raises FormatError)."""
    from convqa.formats import open_model

    with open_model(path) as artifact:
        return compute_dtype_of(artifact)
