"""The dtype transformers holds a model's weights in: the dtype of its ground truth's weights.

transformers always computes in float32 (the model a checkpoint means: every BF16 value is exact
in float32); what this chooses is how the weights are *held*. A lossless conversion is held to
bit-identical logits, which needs the same values and kernels on both sides; and a 1.5B BF16
checkpoint held in F32 takes twice the file in memory (8.8 GB RSS measured for a 3.1 GB model,
issue 13). So every transformers run of a model (the SafeTensors ground truth, every artifact
converted from it, the reference-quantized model) holds its weights in the dtype the source
stores most of its floating-point elements in:
- BF16 -> bfloat16 and F16 -> float16, computed in float32 a slice of each matrix at a time
  (convqa.infer.float32_compute): bit-identical to the model upcast to float32, at the 16-bit
  model's memory (F16 overflows in F16 activations, never here: the activations are float32);
- F32 (and F64, anything else) -> float32.
Artifacts are held in their source's dtype, not their own: a Q8_0 GGUF of a BF16 model holds its
dequantized values rounded to BF16 like its reference model (identically on both sides of the
reference comparison), and a round trip that came back in F32 (its values BF16's) is held like
the model it came from.

Only names and header data here (no torch): convqa.infer.memory sizes jobs with it too.
"""

from __future__ import annotations

import os

BFLOAT16 = "bfloat16"
FLOAT16 = "float16"
FLOAT32 = "float32"
WEIGHTS_DTYPES = (BFLOAT16, FLOAT16, FLOAT32)
BYTES_PER_ELEMENT = {BFLOAT16: 2, FLOAT16: 2, FLOAT32: 4}
# Stored encodings that count as a dtype the model is held in (quantized blocks are not one).
_FLOAT_ENCODINGS = {"F32": FLOAT32, "F64": FLOAT32, "F16": FLOAT16, "BF16": BFLOAT16}


def weights_dtype_of(artifact) -> str:
    """The weights dtype for an open artifact (convqa.model.ModelArtifact) taken as the ground
    truth: the dtype most of its floating-point elements are stored in (bfloat16 for BF16,
    float16 for F16, float32 for F32 and F64; float32 on a tie). An artifact with no
    plain-float tensor (all quantized) is held in float32."""
    elements = {FLOAT32: 0, BFLOAT16: 0, FLOAT16: 0}
    for tensor in artifact.tensors.values():
        dtype = _FLOAT_ENCODINGS.get(tensor.encoding.name)
        if dtype is not None:
            elements[dtype] += tensor.n_elements
    return max(elements, key=lambda dtype: (elements[dtype], dtype == FLOAT32))


def weights_dtype_for(path: str | os.PathLike) -> str:
    """weights_dtype_of the artifact at `path` (read from its header; raises FormatError)."""
    from convqa.formats import open_model

    with open_model(path) as artifact:
        return weights_dtype_of(artifact)
