"""The reference-quantized model: what a correct lossy conversion computes, built without it.

A lossy conversion (F16, BF16, Q8_0, ...) changes the function, so its logits are compared with
the ground truth only within a tolerance; a converter that rounds a little differently (BF16
truncated instead of rounded to nearest even) moves the logits about as far as correct rounding
does and hides inside it. But a correct converter is fully determined once the encoding of each
tensor is chosen: every value must be the reference quantizer's output for the source value.
So the expected model is the SafeTensors source with each tensor passed through the reference
encoder (gguf-py's quantizers, numpy's F16, convqa's APR int8/int4) of the encoding the artifact
chose for it, and a correct artifact gives bit-identical logits under the same engine.

The encodings are read from the chain's first-hop artifact (the conversion that left
SafeTensors, where all quantization happens), so the reference follows the converter's choice of
which tensors to quantize (that choice is judged by the ground-truth tolerances) and judges only
whether the chosen encoding was applied correctly. Tensors are re-encoded lazily, one at a time,
and read from the source file a slice of rows at a time (convqa.convert.builtin.reencoded, what
the converter quantizes with).
"""

from __future__ import annotations

from convqa.convert.builtin import reencoded
from convqa.errors import ConversionError
from convqa.model import ModelArtifact


def reference_quantized(source: ModelArtifact, encoded: ModelArtifact) -> ModelArtifact:
    """`source` with every tensor re-encoded in the encoding `encoded` stores it in.

    A tensor `encoded` lacks keeps the source's own encoding (a missing tensor is the contract
    gates' finding, not the reference's). Raises ConversionError, naming the file and tensor, when
    an encoding cannot be reproduced: no reference encoder for it, or the source shape does not
    split into its blocks.
    """
    tensors, counts = {}, {}
    for tensor in source:
        stored = encoded.tensors.get(tensor.name)
        encoding = tensor.encoding if stored is None or stored.encoding == tensor.encoding else stored.encoding
        if encoding != tensor.encoding:
            if not encoding.can_encode:
                raise ConversionError(
                    f"{encoded.path}: tensor {tensor.name} is stored as {encoding.name}, which has no reference encoder"
                )
            try:
                encoding.nbytes(tensor.shape)
            except ConversionError as exc:
                raise ConversionError(f"{encoded.path}: tensor {tensor.name}: {exc}") from exc
            tensors[tensor.name] = reencoded(tensor, encoding)
        else:
            tensors[tensor.name] = tensor
        counts[encoding.name] = counts.get(encoding.name, 0) + 1
    return ModelArtifact(
        path=f"reference({source.path}, encodings of {encoded.path})",
        format=source.format,
        config=source.config,
        tokenizer=source.tokenizer,
        tensors=tensors,
        metadata={"reference_encodings": dict(sorted(counts.items()))},
    )
