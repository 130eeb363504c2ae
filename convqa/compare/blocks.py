"""A quantized tensor against the reference quantizer, block by block (gate F-QUANT-001).

The tensor gates hold a quantized tensor to its encoding's worst-case error against the source,
and real quantizer bugs hide inside that band: a block scale off by 1%, ties rounded the wrong
way, a few elements of one block wrong. But once the converter has chosen a tensor's encoding,
the correct stored bytes are fully determined: the reference quantizer's output for the source
tensor (gguf-py's quantizers, which llama.cpp's own `convert_hf_to_gguf.py` uses; numpy's
F16; BF16 round-to-nearest-even; convqa's APR int8/int4). So a tensor quantized out of a plain
float source is compared with that output byte for byte, and a mismatch is located: how many
blocks differ, the first one with its position and its stored and expected scale, and a map.

Where byte identity is not a fair demand (an encoding with no byte-reproducible reference:
gguf-py has no K-quant quantizer, and llama.cpp's C quantizers differ across machines with FMA
contraction), the check says so and the tensor is held to its encoding's tolerance instead.
"""

from __future__ import annotations

import math

import numpy as np

from convqa.encodings import ENCODING_TOLERANCE, F32, Encoding, transcode

# Block geometry of the plain floats, for counting and mapping: 32 values to a "block".
FLOAT_GROUP = 32
MAP_WIDTH = 64  # characters in the block map: '#' where some block in that stretch differs, '.' where none

# Where each block keeps its scale (an F16 `d` at byte 0). The APR int8 scale is one F32 for the
# whole tensor, in front of the blocks.
_F16_SCALE_AT_0 = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "APR_Q4"}

NOT_REPRODUCIBLE = ("no byte-reproducible reference quantizer for {encoding} (gguf-py has none, and llama.cpp's C "
                    "quantizers differ across machines with FMA contraction; docs/formats.md): held to its tolerance "
                    "{tolerance:g} instead")


def is_quantization(source: Encoding, stored: Encoding) -> bool:
    """`stored` is a lossy re-encoding of a plain-float `source` (the first hop's quantization).

    An upcast (BF16 -> F32) loses nothing and a quantized source (a GGUF's Q8_0 re-stored) is a
    later hop, held to exactness against its own first hop by the edge gates."""
    if source.is_quantized or stored == source:
        return False
    if stored.is_quantized:
        return True
    return stored.block_bytes < source.block_bytes or (stored.block_bytes == source.block_bytes and stored != source)


def _layout(encoding: Encoding, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(header bytes, bytes per block, elements per block) of a tensor stored in `encoding`."""
    if encoding.name == "APR_Q8":
        return 4, FLOAT_GROUP, FLOAT_GROUP  # an F32 scale, then one int8 per element
    if encoding.name == "APR_Q4":
        return 0, 18, 32
    if encoding.lossless_float:
        return 0, FLOAT_GROUP * encoding.block_bytes, FLOAT_GROUP
    return 0, encoding.block_bytes, encoding.block_elems


def _blocks(raw: np.ndarray, header: int, block_bytes: int) -> np.ndarray:
    body = raw[header:]
    padded = np.zeros(math.ceil(body.size / block_bytes) * block_bytes, dtype=np.uint8)
    padded[: body.size] = body
    return padded.reshape(-1, block_bytes)


def _scale(encoding: Encoding, raw: np.ndarray, block: np.ndarray) -> float | None:
    if encoding.name in _F16_SCALE_AT_0:
        return float(block[:2].copy().view("<f2")[0])
    if encoding.name == "APR_Q8":
        return float(raw[:4].copy().view("<f4")[0])
    return None


def _block_map(differing: np.ndarray) -> str:
    n = differing.size
    per_char = max(1, math.ceil(n / MAP_WIDTH))
    chars = math.ceil(n / per_char)
    padded = np.zeros(chars * per_char, dtype=bool)
    padded[:n] = differing
    return "".join("#" if hit else "." for hit in padded.reshape(chars, per_char).any(axis=1))


def reference_encode(encoding: Encoding, source_values: np.ndarray, shape: tuple) -> np.ndarray:
    """`encoding`'s bytes for `source_values` (float32) by its reference encoder, a slice of rows
    at a time where the encoding allows it (gguf-py's quantizers, BF16's rounding among them, make
    temporaries the size of their input: 3 of 0.9 GB for a 1.5B model's embedding)."""
    stored_f32 = np.ascontiguousarray(source_values, dtype="<f4").reshape(-1).view(np.uint8)
    return np.ascontiguousarray(transcode(stored_f32, F32, shape, encoding)).reshape(-1).view(np.uint8)


def reference_blocks(source_values: np.ndarray, stored) -> dict:
    """`stored` (a LazyTensor) against its encoding's reference quantizer applied to
    `source_values` (the source tensor as float32). Returns the JSON-ready finding."""
    encoding: Encoding = stored.encoding
    finding: dict = {"encoding": encoding.name}
    if not encoding.can_encode:
        tolerance = ENCODING_TOLERANCE.get(encoding.name, 0.0)
        finding.update(byte_exact_demanded=False, fallback_tolerance=tolerance,
                       reason=NOT_REPRODUCIBLE.format(encoding=encoding.name, tolerance=tolerance))
        return finding
    shape = tuple(stored.shape)
    expected = reference_encode(encoding, source_values, shape)
    actual = stored.raw()
    header, block_bytes, block_elems = _layout(encoding, shape)
    finding.update(byte_exact_demanded=True, elements_per_block=block_elems)
    if actual.size != expected.size:
        finding.update(blocks=None, differing_blocks=None,
                       reason=f"{actual.size} stored bytes, the reference quantizer writes {expected.size}")
        return finding
    a_blocks, e_blocks = _blocks(actual, header, block_bytes), _blocks(expected, header, block_bytes)
    header_differs = header > 0 and not np.array_equal(actual[:header], expected[:header])
    differing = (a_blocks != e_blocks).any(axis=1)
    if header_differs:  # a tensor-wide scale: every block dequantizes differently
        differing[:] = True
    count = int(np.count_nonzero(differing))
    finding.update(blocks=int(differing.size), differing_blocks=count)
    if not count:
        return finding
    first = int(np.argmax(differing))
    cols = shape[-1] if shape else 1
    start = first * block_elems
    first_info = {"index": first, "row": start // cols, "cols": [start % cols, min(start % cols + block_elems, cols) - 1]}
    stored_scale, expected_scale = _scale(encoding, actual, a_blocks[first]), _scale(encoding, expected, e_blocks[first])
    if stored_scale is not None:
        first_info.update(stored_scale=stored_scale, expected_scale=expected_scale)
    # Which values of that block decode differently (a scale, a nibble order, a rounding).
    n = math.prod(shape)
    lo, hi = start, min(start + block_elems, n)
    got = stored.to_float32().reshape(-1)[lo:hi]
    want = encoding.decode(expected, shape).reshape(-1)[lo:hi]
    first_info["differing_values"] = int(np.count_nonzero(got != want))
    finding.update(first=first_info, map=_block_map(differing))
    return finding


def describe(name: str, finding: dict) -> str:
    """One line for a gate reason or `convqa diff`."""
    if not finding.get("byte_exact_demanded"):
        return f"{name}: {finding.get('reason', '')}"
    if finding.get("differing_blocks") is None:
        return f"{name} ({finding['encoding']}): {finding.get('reason', 'size differs')}"
    first = finding.get("first") or {}
    text = (f"{name} ({finding['encoding']}): {finding['differing_blocks']} of {finding['blocks']} blocks differ from "
            f"the reference quantizer; first block {first.get('index')} (row {first.get('row')}, cols "
            f"{first.get('cols', ['?', '?'])[0]}..{first.get('cols', ['?', '?'])[1]}, "
            f"{first.get('differing_values')} of {finding.get('elements_per_block')} values differ)")
    if "stored_scale" in first:
        text += f": stored scale {first['stored_scale']:.6g}, expected {first['expected_scale']:.6g}"
    return text
