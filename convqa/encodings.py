"""Tensor encodings: how a tensor's elements are stored, and how to get float32 values back.

One registry serves all three formats. Each encoding knows its GGML type id (GGUF), its APR
dtype byte (docs/formats.md APR 4.1), its block geometry, and how to decode stored bytes
to float32 and (where a pure-Python quantizer exists) encode float32 to stored bytes.
GGML block codecs come from gguf-py (`gguf.quants`); the two APR-native block formats are
implemented here because no library has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType as GGML

from convqa.errors import ConversionError


_DEQUANT_SLICE_BYTES = 8 << 20  # stored bytes dequantized at a time


@dataclass(frozen=True)
class Encoding:
    name: str
    ggml_type: int | None  # GGUF tensor type id, None if GGUF cannot hold it
    apr_dtype: int | None  # APR v2 dtype byte, None if APR cannot hold it
    block_elems: int  # elements per block (1 for plain floats)
    block_bytes: int  # bytes per block
    lossless_float: bool  # a plain IEEE/bfloat type (no quantization error of its own)

    @property
    def is_quantized(self) -> bool:
        return not self.lossless_float

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored size of a tensor of `shape` (numpy order). Blocks run along the last axis."""
        if self.name in ("APR_Q4", "APR_Q8"):
            n = math.prod(shape)
            if self.name == "APR_Q8":
                return 4 + n
            return math.ceil(n / 32) * 18
        if not shape:
            return self.block_bytes
        *rows, cols = shape
        if cols % self.block_elems:
            raise ConversionError(
                f"{self.name} needs the last dimension to be a multiple of {self.block_elems}, got shape {list(shape)}"
            )
        return math.prod(rows) * (cols // self.block_elems) * self.block_bytes

    def decode(self, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Stored bytes (uint8, any shape) -> float32 array of `shape`."""
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        n = math.prod(shape)
        if self.name == "F32":
            return raw.view("<f4").reshape(shape).astype(np.float32, copy=False)
        if self.name == "F16":
            return raw.view("<f2").astype(np.float32).reshape(shape)
        if self.name == "BF16":
            widened = raw.view("<u2").astype(np.uint32)
            widened <<= 16  # in place: `<<` would allocate a second array the size of the decode
            return widened.view(np.float32).reshape(shape)
        if self.name == "F64":
            return raw.view("<f8").astype(np.float32).reshape(shape)
        if self.name == "APR_Q8":
            scale = raw[:4].view("<f4")[0]
            return (raw[4 : 4 + n].view(np.int8).astype(np.float32) * scale).reshape(shape)
        if self.name == "APR_Q4":
            return _apr_q4_decode(raw, n).reshape(shape)
        qtype = GGML(self.ggml_type)
        rows = raw.reshape(-1, self.nbytes(shape) // max(1, math.prod(shape[:-1])) if shape else raw.size)
        # gguf-py's dequantizers make float32 temporaries the size of their input (Q8_0: the int8
        # values widened, then the product), so a 262144-row embedding would peak at 3x its F32
        # size; slices of rows keep the peak at the output plus one slice.
        out = np.empty((rows.shape[0], n // max(1, rows.shape[0])), dtype=np.float32)
        step = max(1, _DEQUANT_SLICE_BYTES // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            out[start : start + step] = quants.dequantize(rows[start : start + step], qtype)
        return out.reshape(shape)

    def decoded_slices(self, raw: np.ndarray, shape: tuple[int, ...], elements: int):
        """The float32 decode of `raw` (stored bytes of a tensor of `shape`) as flat C-ordered
        slices of whole rows, about `elements` each, so that a reader that only folds the values
        (statistics, a digest) never holds the tensor decoded whole. One slice, the whole decode,
        where rows cannot be decoded on their own (APR's Q8/Q4) or there are no rows."""
        if len(shape) < 2 or not self.row_wise:
            yield self.decode(raw, shape).reshape(-1)
            return
        rows, cols = math.prod(shape[:-1]), shape[-1]
        stored = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(rows, -1)
        step = max(1, elements // max(1, cols))
        for start in range(0, rows, step):
            part = stored[start : start + step]
            yield self.decode(part, (part.shape[0], cols)).reshape(-1)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """float32 array -> stored bytes as a flat uint8 array."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.name == "F32":
            return values.reshape(-1).view(np.uint8)
        if self.name == "F16":
            return values.astype("<f2").reshape(-1).view(np.uint8)
        if self.name == "APR_Q8":
            return _apr_q8_encode(values.reshape(-1))
        if self.name == "APR_Q4":
            return _apr_q4_encode(values.reshape(-1))
        if self.ggml_type is None:
            raise ConversionError(f"no encoder for {self.name}")
        try:
            out = quants.quantize(values, GGML(self.ggml_type))
        except (NotImplementedError, quants.QuantError) as exc:
            raise ConversionError(f"cannot encode to {self.name}: {exc}") from exc
        return np.ascontiguousarray(out).reshape(-1).view(np.uint8)

    @property
    def can_encode(self) -> bool:
        return self.name in _ENCODABLE

    @property
    def row_wise(self) -> bool:
        """Each row (the last axis) is stored on its own: plain floats and GGML blocks, which
        run along the last axis. APR's Q8/Q4 share one scale or a block stream across rows."""
        return self.name not in ("APR_Q4", "APR_Q8")


def transcode(raw: np.ndarray, source: Encoding, shape: tuple[int, ...], target: Encoding) -> np.ndarray:
    """Stored bytes in `source` -> stored bytes in `target` (flat uint8), a slice of rows at a
    time where both encodings store rows on their own: the same bytes as
    `target.encode(source.decode(raw, shape))`, without the whole tensor in float32 and
    gguf-py's quantizer temporaries (several float32 copies of its input). Quantizing a
    1.5B model's 151936 x 1536 BF16 embedding to Q8_0 whole peaked at 2.28 GB."""
    if not transcodes_by_rows(source, shape, target):
        return target.encode(source.decode(raw, shape))
    src = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(math.prod(shape[:-1]), -1)
    return transcode_rows(lambda start, n: src[start : start + n], source, shape, target)


def transcodes_by_rows(source: Encoding, shape: tuple[int, ...], target: Encoding) -> bool:
    return len(shape) >= 2 and source.row_wise and target.row_wise


def transcode_rows(read_rows, source: Encoding, shape: tuple[int, ...], target: Encoding) -> np.ndarray:
    """`transcode` with the source bytes read a slice of rows at a time: `read_rows(start, n)`
    gives rows start..start+n as uint8 (n, row bytes). Read from the file, the whole input tensor
    is never in memory either (a converter then holds its output tensor and one slice)."""
    rows, cols = math.prod(shape[:-1]), shape[-1]
    out = np.empty((rows, target.nbytes((1, cols))), dtype=np.uint8)
    step = max(1, _DEQUANT_SLICE_BYTES // max(1, cols * 4))  # float32 bytes per slice
    for start in range(0, rows, step):
        part = read_rows(start, min(step, rows - start))
        out[start : start + step] = target.encode(source.decode(part, (part.shape[0], cols))).reshape(part.shape[0], -1)
    return out.reshape(-1)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    # Rust's f32::round (APR's quantizers) rounds half away from zero; numpy rounds half to even.
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _apr_q8_encode(x: np.ndarray) -> np.ndarray:
    amax = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(amax / 127.0) if amax > 0 else np.float32(1.0)
    q = np.clip(_round_half_away(x / scale), -127, 127).astype(np.int8)
    return np.concatenate([np.array([scale], dtype="<f4").view(np.uint8), q.view(np.uint8)])


def _apr_q4_encode(x: np.ndarray) -> np.ndarray:
    n = x.size
    nblocks = math.ceil(n / 32)
    padded = np.zeros(nblocks * 32, dtype=np.float32)
    padded[:n] = x
    blocks = padded.reshape(nblocks, 32)
    amax = np.max(np.abs(blocks), axis=1)
    scale = np.where(amax > 0, amax / np.float32(7.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(_round_half_away(blocks / scale[:, None]), -8, 7).astype(np.int16) + 8
    nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    out = np.empty((nblocks, 18), dtype=np.uint8)
    out[:, :2] = scale.astype("<f2").view(np.uint8).reshape(nblocks, 2)
    out[:, 2:] = nibbles
    return out.reshape(-1)


def _apr_q4_decode(raw: np.ndarray, n: int) -> np.ndarray:
    nblocks = math.ceil(n / 32)
    blocks = raw[: nblocks * 18].reshape(nblocks, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32).reshape(nblocks)
    # The APR reader zeroes non-finite and subnormal scales (docs/formats.md APR 4.2).
    bad = ~np.isfinite(scale) | ((scale != 0) & (np.abs(scale) < np.finfo(np.float16).tiny))
    scale[bad] = 0.0
    nib = blocks[:, 2:]
    q = np.empty((nblocks, 32), dtype=np.int16)
    q[:, 0::2] = (nib & 0x0F).astype(np.int16) - 8
    q[:, 1::2] = (nib >> 4).astype(np.int16) - 8
    return (q.astype(np.float32) * scale[:, None]).reshape(-1)[:n]


def _enc(name, ggml_type, apr_dtype, block_elems, block_bytes, lossless):
    return Encoding(name, ggml_type, apr_dtype, block_elems, block_bytes, lossless)


F32 = _enc("F32", 0, 0, 1, 4, True)
F16 = _enc("F16", 1, 1, 1, 2, True)
BF16 = _enc("BF16", 30, 30, 1, 2, True)
F64 = _enc("F64", 28, 3, 1, 8, True)
Q4_0 = _enc("Q4_0", 2, None, 32, 18, False)
Q4_1 = _enc("Q4_1", 3, None, 32, 20, False)
Q5_0 = _enc("Q5_0", 6, None, 32, 22, False)
Q5_1 = _enc("Q5_1", 7, None, 32, 24, False)
Q8_0 = _enc("Q8_0", 8, None, 32, 34, False)
Q2_K = _enc("Q2_K", 10, None, 256, 84, False)
Q3_K = _enc("Q3_K", 11, None, 256, 110, False)
Q4_K = _enc("Q4_K", 12, 12, 256, 144, False)
Q5_K = _enc("Q5_K", 13, None, 256, 176, False)
Q6_K = _enc("Q6_K", 14, 14, 256, 210, False)
APR_Q4 = _enc("APR_Q4", None, 128, 32, 18, False)
APR_Q8 = _enc("APR_Q8", None, 129, 1, 1, False)

ALL = (F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, APR_Q4, APR_Q8)
BY_NAME = {e.name: e for e in ALL}
BY_GGML_TYPE = {e.ggml_type: e for e in ALL if e.ggml_type is not None}
# APR dtype bytes 8 and 9 are the legacy (pre-GH-438) ids of APR Q4/Q8, accepted on read.
BY_APR_DTYPE = {e.apr_dtype: e for e in ALL if e.apr_dtype is not None} | {8: APR_Q4, 9: APR_Q8}
_ENCODABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "APR_Q4", "APR_Q8"}

# A quantization names one encoding per target format that has it. APR holds no GGML blocks;
# its own int8/int4 (one scale per tensor / per 32 values) are separate, explicit choices.
QUANT_TARGETS = {
    "f32": {"gguf": "F32", "apr": "F32", "safetensors": "F32"},
    "f16": {"gguf": "F16", "apr": "F16", "safetensors": "F16"},
    "bf16": {"gguf": "BF16", "apr": "BF16", "safetensors": "BF16"},
    "q8_0": {"gguf": "Q8_0"},
    "q4_0": {"gguf": "Q4_0"},
    "q4_1": {"gguf": "Q4_1"},
    "q5_0": {"gguf": "Q5_0"},
    "q5_1": {"gguf": "Q5_1"},
    "apr-int8": {"apr": "APR_Q8"},
    "apr-int4": {"apr": "APR_Q4"},
}

# Normalised max error (max |a - b| / max |a|) allowed when one side is stored in this encoding.
# Each value is the encoding's worst-case rounding error relative to the block/tensor maximum,
# with headroom: Q8_0 rounds to amax_block/127 steps (error <= 0.4%), Q4_1 to (max-min)/15
# (<= 6.7% of amax), APR Q4 to amax/7 (<= 7.2%), F16 2^-11, BF16 2^-8. Q4_0 and Q5_0 scale by the
# signed extreme m (d = m/-8, m/-16) and clip the other end: a value near -m stores 7d (15d), an
# error of |m|/8 = 12.5% (|m|/16 = 6.25%); measured 9.9% and 4.6% on qwen2-tiny, where the
# earlier 8% / 4% failed correct conversions.
ENCODING_TOLERANCE = {
    "F32": 0.0,
    "F64": 0.0,
    "F16": 1e-3,
    "BF16": 5e-3,
    "Q8_0": 5e-3,
    "APR_Q8": 5e-3,
    "Q6_K": 2e-2,
    "Q5_0": 7e-2,
    "Q5_1": 4e-2,
    "Q5_K": 4e-2,
    "Q4_K": 8e-2,
    "Q4_0": 0.13,
    "Q4_1": 8e-2,
    "APR_Q4": 8e-2,
    "Q3_K": 0.15,
    "Q2_K": 0.3,
}


def by_name(name: str) -> Encoding:
    try:
        return BY_NAME[name.upper()]
    except KeyError:
        raise ConversionError(f"unknown encoding {name!r}; known: {', '.join(BY_NAME)}") from None
