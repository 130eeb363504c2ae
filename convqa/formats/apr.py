"""APR v2, the native format of paiml/aprender: a strict reader and a streaming, atomic writer.

Byte layout (docs/formats.md APR 1-5):

    0                    header, 64 bytes (magic, version, flags, offsets, header CRC32)
    64                   JSON metadata, `metadata_size` bytes, zero-padded to 64
    tensor_index_offset  index entries `<H name_len> name <B dtype> <B ndim> <Q dims..> <Q offset> <Q size>`,
                         sorted by the UTF-8 bytes of the names, zero-padded to 64 as a block
    data_offset          tensor data, each tensor 64-aligned and zero-padded to 64
    EOF-4                footer: CRC32 of every preceding byte (u32 LE)

The writer targets the newest aprender metadata struct ([HDR-NEW]): compact serde_json output,
typed keys in declaration order, `license`/`data_source`/`data_license` always present as null,
f32 fields printed the way ryu prints an f32. The reader checks every count, length, offset,
alignment and dtype against the file size before it touches tensor data, and reports any
problem as a FormatError naming the file, the field and the byte offset.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convqa import encodings
from convqa.arch import HF_ARCHITECTURES, SUPPORTED, registry
from convqa.files import atomic_file
from convqa.encodings import Encoding
from convqa.formats.canonical import EMBEDDING, LM_HEAD, canonical_name, is_tied_copy, name_collision, qk_heads, unpermuted_loader
from convqa.formats.filerange import read_file_range
from convqa.errors import ConversionError, FormatError
from convqa.model import LazyTensor, ModelArtifact, ModelConfig, TokenizerSpec, WritePlan

# --- Header (docs/formats.md APR 2) ----------------------------------------------------------

MAGIC_V2 = b"APR\x00"
MAGIC_V2_LEGACY = b"APR2"  # early v2 spelling; aprender-serve still reads it
MAGIC_V1 = (b"APRN", b"APR1")  # v1 containers: no tensor index, not supported
VERSION_MAJOR = 2
VERSION_MINOR = 0
HEADER_SIZE = 64
ALIGNMENT = 64
FOOTER_SIZE = 4  # CRC32 of every preceding byte
METADATA_OFFSET = HEADER_SIZE  # the writer always puts the metadata right after the header

# magic, version_major, version_minor, flags, tensor_count, metadata_offset, metadata_size,
# tensor_index_offset, data_offset, checksum, reserved
_HEADER = struct.Struct("<4sBBHIQIQQI20s")
_CHECKSUM_AT = 40  # the header CRC covers bytes [0, 40) ++ [44, 64)
_RESERVED_AT = 44
assert _HEADER.size == HEADER_SIZE

# Flags (docs/formats.md APR 2), u16 bit values.
LZ4_COMPRESSED = 0x0001
ZSTD_COMPRESSED = 0x0002
ENCRYPTED = 0x0004
SIGNED = 0x0008
SHARDED = 0x0010
QUANTIZED = 0x0020
HAS_FILTERBANK = 0x0040
HAS_MODEL_CARD = 0x0080
STREAMING = 0x0100
HAS_VOCAB = 0x0200
LAYOUT_ROW_MAJOR = 0x0400
LAYOUT_COLUMN_MAJOR = 0x0800
_KNOWN_FLAGS = 0x0FFF
# Flags whose files this reader cannot interpret faithfully: the bytes after the header are not
# the plain layout (compression, encryption), a signature it cannot check, a shard that is only
# part of a model, or the column-major layout aprender itself rejects (LAYOUT-002).
_REFUSED_FLAGS = {
    LZ4_COMPRESSED: "LZ4-compressed APR files are not supported",
    ZSTD_COMPRESSED: "zstd-compressed APR files are not supported",
    ENCRYPTED: "encrypted APR files are not supported",
    SIGNED: "signed APR files are not supported (no v2 signature scheme exists)",
    SHARDED: "this is one shard of a sharded APR model, not a whole model",
    LAYOUT_COLUMN_MAJOR: "LAYOUT_COLUMN_MAJOR is set; APR v2 data must be row-major (LAYOUT-002)",
}

# --- Tensor index (docs/formats.md APR 4) ----------------------------------------------------

MAX_NDIM = 8  # aprender's writer caps ndim at 8
MAX_TENSOR_NAME_LEN = 256  # aprender truncates longer names, so no valid file has them
_NAME_LEN = struct.Struct("<H")
_DTYPE_NDIM = struct.Struct("<BB")
_DIM = struct.Struct("<Q")
_OFFSET_SIZE = struct.Struct("<QQ")
# Smallest possible entry: name_len, a 1-byte name, dtype, ndim, offset, size.
_MIN_ENTRY_SIZE = _NAME_LEN.size + 1 + _DTYPE_NDIM.size + _OFFSET_SIZE.size

# --- Metadata (docs/formats.md APR 3) --------------------------------------------------------

# Typed keys serialised as Rust f32 (ryu `format32`), not f64.
F32_METADATA_KEYS = ("rope_theta", "rms_norm_eps")
# aprender-serve's serde aliases: a file carrying one of these next to its canonical key loses
# *all* of its metadata in aprender-serve ("duplicate field"), so we never write them.
ALIAS_KEYS = {
    "hidden_size": ("hidden_dim", "d_model", "n_embd"),
    "num_layers": ("n_layers", "num_hidden_layers", "n_layer"),
    "num_heads": ("n_heads", "num_attention_heads", "n_head"),
    "num_kv_heads": ("n_kv_heads", "num_key_value_heads"),
    "vocab_size": ("n_vocab",),
    "intermediate_size": ("ffn_dim", "intermediate_dim", "n_inner"),
    "max_position_embeddings": ("max_seq_len", "context_length", "n_ctx"),
    "rms_norm_eps": ("layer_norm_eps", "norm_eps"),
}
ROPE_TYPE_NORM = 0  # adjacent pairs (llama in llama.cpp)
ROPE_TYPE_NEOX = 2  # split halves (qwen2)
ROPE_TYPES = {
    name: ROPE_TYPE_NEOX if arch.rope == registry.ROPE_NEOX else ROPE_TYPE_NORM for name, arch in registry.ARCHITECTURES.items()
}
_REQUIRED_INT_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "vocab_size",
    "intermediate_size",
    "max_position_embeddings",
)
PROVENANCE_KEY = "convqa.provenance"
# The architecture's registry Params (gemma's sliding window, soft-capping), by name.
ARCH_PARAMS_KEY = "convqa.arch_params"
TIED_EMBEDDINGS_KEY = "tied_embeddings"
EMBEDDING_NAME = EMBEDDING
LM_HEAD_NAME = LM_HEAD

_F32_MAX = float(np.finfo(np.float32).max)
_CRC_CHUNK = 16 << 20  # bytes read per step when checksumming a whole file


def align64(value: int) -> int:
    return (value + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def _padding(length: int) -> bytes:
    return bytes(align64(length) - length)


def header_crc(header: bytes) -> int:
    """CRC32 of a 64-byte header with its checksum field left out."""
    return zlib.crc32(header[_RESERVED_AT:HEADER_SIZE], zlib.crc32(header[:_CHECKSUM_AT]))


@dataclass(frozen=True)
class AprHeader:
    tensor_count: int
    metadata_size: int
    tensor_index_offset: int
    data_offset: int
    flags: int = LAYOUT_ROW_MAJOR
    metadata_offset: int = METADATA_OFFSET
    magic: bytes = MAGIC_V2
    version_major: int = VERSION_MAJOR
    version_minor: int = VERSION_MINOR
    checksum: int = 0  # as read from a file; to_bytes() always computes it afresh
    reserved: bytes = bytes(20)

    def to_bytes(self) -> bytes:
        fields = (
            self.magic,
            self.version_major,
            self.version_minor,
            self.flags,
            self.tensor_count,
            self.metadata_offset,
            self.metadata_size,
            self.tensor_index_offset,
            self.data_offset,
            0,
            self.reserved,
        )
        raw = bytearray(_HEADER.pack(*fields))
        raw[_CHECKSUM_AT:_RESERVED_AT] = struct.pack("<I", header_crc(bytes(raw)))
        return bytes(raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> "AprHeader":
        """Parse 64 bytes; no validation (read_apr checks every field against the file)."""
        magic, major, minor, flags, count, meta_off, meta_size, index_off, data_off, checksum, reserved = (
            _HEADER.unpack(raw[:HEADER_SIZE])
        )
        return cls(
            tensor_count=count,
            metadata_size=meta_size,
            tensor_index_offset=index_off,
            data_offset=data_off,
            flags=flags,
            metadata_offset=meta_off,
            magic=magic,
            version_major=major,
            version_minor=minor,
            checksum=checksum,
            reserved=reserved,
        )

    def as_dict(self) -> dict:
        """JSON-safe view for ModelArtifact.metadata."""
        return {
            "magic": self.magic.decode("latin-1"),
            "version": [self.version_major, self.version_minor],
            "flags": self.flags,
            "row_major": bool(self.flags & LAYOUT_ROW_MAJOR),
            "column_major": bool(self.flags & LAYOUT_COLUMN_MAJOR),
            "tensor_count": self.tensor_count,
            "metadata_offset": self.metadata_offset,
            "metadata_size": self.metadata_size,
            "tensor_index_offset": self.tensor_index_offset,
            "data_offset": self.data_offset,
            "checksum": self.checksum,
        }


@dataclass(frozen=True)
class AprTensorEntry:
    """One index entry; `offset` is relative to data_offset, `size` the unpadded byte length."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    size: int

    def to_bytes(self) -> bytes:
        name = self.name.encode("utf-8")
        return b"".join(
            (
                _NAME_LEN.pack(len(name)),
                name,
                _DTYPE_NDIM.pack(self.dtype, len(self.shape)),
                b"".join(_DIM.pack(d) for d in self.shape),
                _OFFSET_SIZE.pack(self.offset, self.size),
            )
        )


def sort_key(name: str) -> bytes:
    """aprender sorts by Rust String order, i.e. the UTF-8 bytes (`layers.10.` before `layers.2.`)."""
    return name.encode("utf-8")


# --- Metadata JSON --------------------------------------------------------------------------


def format_f32(value: float) -> str:
    """An f32 the way serde_json prints it (ryu `format32`, shortest round-trip digits).

    Thresholds (docs/formats.md APR 3): plain `digits.0` up to 13 integer digits, `0.000ddd` down to
    1e-6, scientific with no `+` and no exponent padding otherwise.
    """
    if not math.isfinite(value) or abs(value) > _F32_MAX:
        raise ConversionError(f"cannot store {value!r} as a finite f32 in APR metadata")
    f32 = np.float32(value)
    if f32 == 0:
        return "-0.0" if np.signbit(f32) else "0.0"
    scientific = np.format_float_scientific(f32, unique=True, trim="-", exp_digits=1)
    sign = "-" if scientific.startswith("-") else ""
    mantissa, exponent = scientific.lstrip("-").split("e")
    digits = mantissa.replace(".", "")
    length = len(digits)
    k = int(exponent) - (length - 1)  # value = digits * 10^k
    kk = length + k  # 10^(kk-1) <= value < 10^kk
    if 0 <= k and kk <= 13:
        text = digits + "0" * k + ".0"
    elif 0 < kk <= 13:
        text = digits[:kk] + "." + digits[kk:]
    elif -6 < kk <= 0:
        text = "0." + "0" * -kk + digits
    elif length == 1:
        text = f"{digits}e{kk - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + text


def _json(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN/Infinity: serde_json cannot read them back
        raise ConversionError(f"APR metadata value is not valid JSON: {exc}") from exc


def encode_metadata(metadata: dict) -> bytes:
    """Compact serde_json-style JSON, keys in the dict's order, f32 keys printed as f32."""
    parts = []
    for key, value in metadata.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = format_f32(value) if key in F32_METADATA_KEYS and is_number else _json(value)
        parts.append(_json(key) + ":" + text)
    return ("{" + ",".join(parts) + "}").encode("utf-8")


# --- Low-level writer -----------------------------------------------------------------------


class AprWriter:
    """Streams an APR v2 file: layout fixed up front, then tensor bytes one at a time.

        with AprWriter(path, metadata, [(name, dtype, shape, size), ...]) as writer:
            for name in writer.names:  # sorted order, the order the data is laid out in
                writer.write_tensor(name, raw_bytes)

    The footer CRC is computed as bytes go out, so nothing is read back. The output appears at
    `path` only if every tensor was written with its declared size (convqa.files).
    """

    def __init__(self, path: str | os.PathLike, metadata: dict, tensors: list[tuple[str, int, tuple[int, ...], int]]):
        self.path = Path(path)
        names = [name for name, *_ in tensors]
        if len(set(names)) != len(names):
            raise ConversionError(f"{self.path}: duplicate tensor names")
        entries = []
        offset = 0
        for name, dtype, shape, size in sorted(tensors, key=lambda t: sort_key(t[0])):
            encoded = name.encode("utf-8")
            if not 0 < len(encoded) <= MAX_TENSOR_NAME_LEN:
                raise ConversionError(f"{self.path}: tensor name {name!r} must be 1..{MAX_TENSOR_NAME_LEN} UTF-8 bytes")
            if len(shape) > MAX_NDIM:
                raise ConversionError(f"{self.path}: tensor {name!r} has {len(shape)} dims, APR allows {MAX_NDIM}")
            entries.append(AprTensorEntry(name, int(dtype), tuple(int(d) for d in shape), offset, int(size)))
            offset += align64(int(size))
        self.entries = entries
        self.names = [e.name for e in entries]
        self._metadata_json = encode_metadata(metadata)
        self._index = b"".join(e.to_bytes() for e in entries)
        index_offset = HEADER_SIZE + align64(len(self._metadata_json))
        self.header = AprHeader(
            tensor_count=len(entries),
            metadata_size=len(self._metadata_json),
            tensor_index_offset=index_offset,
            data_offset=index_offset + align64(len(self._index)),
        )
        self._stack: contextlib.ExitStack | None = None
        self._fh = None
        self._crc = 0
        self._next = 0

    def _write(self, data) -> None:
        self._fh.write(data)
        self._crc = zlib.crc32(data, self._crc)

    def __enter__(self) -> "AprWriter":
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_file(self.path))
            self._fh = stack.enter_context(open(tmp, "wb"))
            self._write(self.header.to_bytes())
            self._write(self._metadata_json + _padding(len(self._metadata_json)))
            self._write(self._index + _padding(len(self._index)))
            self._stack = stack.pop_all()
        return self

    def write_tensor(self, name: str, data) -> None:
        """Write the next tensor (sorted order); `data` is anything exposing its bytes (buffer protocol)."""
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            expected = self.entries[self._next].name if self._next < len(self.entries) else "nothing"
            raise ConversionError(f"{self.path}: tensor {name!r} written out of order, expected {expected}")
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        view = memoryview(data)
        entry = self.entries[self._next]
        if view.nbytes != entry.size:
            raise ConversionError(f"{self.path}: tensor {name!r} has {view.nbytes} bytes, declared {entry.size}")
        self._write(view)
        self._write(_padding(entry.size))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        stack, self._stack = self._stack, None
        incomplete = None
        if exc_type is None and self._next != len(self.entries):
            missing = self.entries[self._next].name
            incomplete = ConversionError(f"{self.path}: closed before tensor {missing!r} was written")
            exc_type, exc, tb = ConversionError, incomplete, None
        if exc_type is None:
            self._fh.write(struct.pack("<I", self._crc))
        # Closes the file, then renames it into place, or (given an exception) removes the temp
        # file; the exception itself propagates from the caller's `with`, or from here.
        stack.__exit__(exc_type, exc, tb)
        if incomplete is not None:
            raise incomplete


# --- High-level writer ----------------------------------------------------------------------


def _special_tokens(tok: TokenizerSpec) -> dict:
    def token(token_id):
        return tok.tokens[token_id] if token_id is not None and 0 <= token_id < len(tok.tokens) else None

    specials = {
        "bos_token": token(tok.bos_token_id),
        "eos_token": token(tok.eos_token_id),
        "unk_token": token(tok.unk_token_id),
        "pad_token": token(tok.pad_token_id),
        "im_start_token": "<|im_start|>" if "<|im_start|>" in tok.tokens else None,
        "im_end_token": "<|im_end|>" if "<|im_end|>" in tok.tokens else None,
    }
    return {k: v for k, v in specials.items() if v is not None}


def _tokenizer_keys(tok: TokenizerSpec) -> dict:
    keys = {
        "tokenizer.model_type": tok.model,
        "tokenizer.pre_type": tok.pre,
        "tokenizer.vocabulary": list(tok.tokens),
        "tokenizer.vocab_size": len(tok.tokens),
        "tokenizer.merges": list(tok.merges),
        "tokenizer.token_type": [int(t) for t in tok.token_types],
        "tokenizer.scores": None if tok.scores is None else [float(s) for s in tok.scores],
        "tokenizer.bos_token_id": tok.bos_token_id,
        "tokenizer.eos_token_id": tok.eos_token_id,
        "tokenizer.unk_token_id": tok.unk_token_id,
        "tokenizer.padding_token_id": tok.pad_token_id,
        "tokenizer.add_bos_token": bool(tok.add_bos_token),
        "tokenizer.add_eos_token": bool(tok.add_eos_token),
        # Not one of aprender's keys: GGUF's add_space_prefix (SentencePiece; Gemma: false), kept
        # so that A -> G gives llama.cpp the flag back (without it llama.cpp prepends a space).
        "tokenizer.add_space_prefix": tok.add_space_prefix,
    }
    return {k: v for k, v in keys.items() if v is not None}


def build_metadata(plan: WritePlan, tensors: list[tuple[str, int, tuple[int, ...], int]]) -> dict:
    """The metadata dict in [HDR-NEW] declaration order, then the custom keys."""
    config = plan.config
    tok = plan.tokenizer
    meta = {
        "model_type": config.architecture,
        "license": None,
        "data_source": None,
        "data_license": None,
    }
    source_format = plan.metadata.get("source_format")
    if source_format is not None:
        meta["original_format"] = source_format
    meta["total_size"] = sum(size for *_, size in tensors)
    meta["param_count"] = sum(math.prod(shape) for _, _, shape, _ in tensors)
    if tok is not None and tok.chat_template is not None:
        meta["chat_template"] = tok.chat_template
    specials = _special_tokens(tok) if tok is not None else {}
    if specials:
        meta["special_tokens"] = specials
    meta |= {
        "architecture": config.architecture,
        "hf_architecture": HF_ARCHITECTURES[config.architecture],
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "vocab_size": config.vocab_size,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": float(config.rope_theta),
        "rope_type": ROPE_TYPES[config.architecture],
        "rms_norm_eps": float(config.rms_norm_eps),
        "head_dim": config.head_dim,
    }
    # custom keys (flattened to top level after the typed ones)
    meta["tensor_shapes"] = {name: list(shape) for name, _, shape, _ in sorted(tensors, key=lambda t: sort_key(t[0]))}
    if config.tie_word_embeddings:
        meta[TIED_EMBEDDINGS_KEY] = True
    if config.params:
        meta[ARCH_PARAMS_KEY] = dict(sorted(config.params.items()))
    if tok is not None:
        meta |= _tokenizer_keys(tok)
    if plan.metadata:
        meta[PROVENANCE_KEY] = plan.metadata
    return meta


def write_apr(path: str | os.PathLike, plan: WritePlan) -> None:
    """Write `plan` as APR v2 the way `apr import` does: HF names, row-major, flags 0x0400.

    Tied embeddings are materialised as `lm_head.weight` (a byte copy of the embedding) with
    `tied_embeddings: true`, as aprender's importer does. An encoding APR cannot hold raises
    ConversionError; dequantizing is the converter's explicit decision, never done here.
    """
    config = plan.config
    if config.architecture not in SUPPORTED:
        raise ConversionError(f"APR writer: unsupported architecture {config.architecture!r}")
    sources: dict[str, LazyTensor] = {}
    layout: list[tuple[str, int, tuple[int, ...], int]] = []
    for tensor in plan.tensors:
        if tensor.name in sources:
            raise ConversionError(f"APR writer: tensor {tensor.name!r} appears twice in the plan")
        dtype = plan.quirks.apr_dtype_override.get(tensor.name, tensor.encoding.apr_dtype)
        if dtype is None:
            raise ConversionError(
                f"APR has no dtype for {tensor.encoding.name} (tensor {tensor.name!r}); dequantize it explicitly first"
            )
        sources[tensor.name] = tensor
        layout.append((tensor.name, dtype, tensor.shape, tensor.nbytes))
    if config.tie_word_embeddings:
        if LM_HEAD_NAME in sources:
            raise ConversionError(f"APR writer: tie_word_embeddings is set but the plan also has {LM_HEAD_NAME}")
        if EMBEDDING_NAME not in sources:
            raise ConversionError(f"APR writer: tie_word_embeddings is set but the plan has no {EMBEDDING_NAME}")
        _, dtype, shape, size = next(t for t in layout if t[0] == EMBEDDING_NAME)
        sources[LM_HEAD_NAME] = sources[EMBEDDING_NAME]
        layout.append((LM_HEAD_NAME, dtype, shape, size))

    with AprWriter(path, build_metadata(plan, layout), layout) as writer:
        for name in writer.names:
            # One tensor in memory at a time. The tied embedding is loaded twice (once for its
            # lm_head copy) rather than held across other tensors.
            writer.write_tensor(name, sources[name].raw())


# --- Strict reader --------------------------------------------------------------------------


class _Checker:
    """Raises FormatError naming the file being read; one per read_apr call."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, message: str, field: str | None = None, offset: int | None = None):
        raise FormatError(self.path, message, field=field, offset=offset)


def _read_exact(fh, offset: int, length: int) -> bytes:
    fh.seek(offset)
    return fh.read(length)


def _file_crc(fh, end: int) -> int:
    crc = 0
    fh.seek(0)
    remaining = end
    while remaining:
        chunk = fh.read(min(_CRC_CHUNK, remaining))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        remaining -= len(chunk)
    return crc


def _check_header(check: _Checker, raw: bytes, file_size: int) -> AprHeader:
    magic = raw[:4]
    if magic in MAGIC_V1:
        check.fail(f"APR v1 container {magic!r} holds no tensor index; only APR v2 is supported", "magic", 0)
    if magic not in (MAGIC_V2, MAGIC_V2_LEGACY):
        check.fail(f"not an APR v2 file, magic bytes {magic!r}", "magic", 0)
    header = AprHeader.from_bytes(raw)
    if header.checksum != header_crc(raw):
        check.fail(
            f"header checksum mismatch: stored {header.checksum:#010x}, computed {header_crc(raw):#010x}",
            "checksum",
            _CHECKSUM_AT,
        )
    if header.version_major != VERSION_MAJOR:
        check.fail(f"unsupported APR major version {header.version_major}", "version_major", 4)
    if header.reserved != bytes(len(header.reserved)):
        check.fail("reserved header bytes are not zero", "reserved", _RESERVED_AT)
    for flag, message in _REFUSED_FLAGS.items():
        if header.flags & flag:
            check.fail(f"{message} (flags {header.flags:#06x})", "flags", 6)
    if header.flags & ~_KNOWN_FLAGS:
        check.fail(f"undefined flag bits {header.flags & ~_KNOWN_FLAGS:#06x}", "flags", 6)

    data_end = file_size - FOOTER_SIZE
    if header.metadata_offset != METADATA_OFFSET:
        check.fail(f"metadata_offset is {header.metadata_offset}, must be {METADATA_OFFSET}", "metadata_offset", 12)
    metadata_end = header.metadata_offset + header.metadata_size
    if metadata_end > data_end:
        check.fail(
            f"metadata [{header.metadata_offset}, {metadata_end}) runs past the data end {data_end}",
            "metadata_size",
            20,
        )
    index_off = header.tensor_index_offset
    if index_off % ALIGNMENT or not metadata_end <= index_off <= data_end:
        check.fail(
            f"tensor_index_offset {index_off} must be a multiple of {ALIGNMENT} in [{metadata_end}, {data_end}]",
            "tensor_index_offset",
            24,
        )
    data_off = header.data_offset
    if data_off % ALIGNMENT or not index_off <= data_off <= data_end:
        check.fail(
            f"data_offset {data_off} must be a multiple of {ALIGNMENT} in [{index_off}, {data_end}]", "data_offset", 32
        )
    # Every entry takes at least _MIN_ENTRY_SIZE bytes, so a bigger count cannot fit the index
    # region; checking here stops a hostile count from driving a huge loop or allocation.
    if header.tensor_count * _MIN_ENTRY_SIZE > data_off - index_off:
        check.fail(
            f"tensor_count {header.tensor_count} cannot fit in the {data_off - index_off}-byte index region",
            "tensor_count",
            8,
        )
    return header


def _parse_index(check: _Checker, index: bytes, header: AprHeader, data_end: int) -> list[AprTensorEntry]:
    base = header.tensor_index_offset
    pos = 0
    entries: list[AprTensorEntry] = []
    previous: bytes | None = None

    def need(n: int, field: str) -> None:
        if pos + n > len(index):
            check.fail(
                f"tensor index entry {len(entries)} runs past the index end {header.data_offset}", field, base + pos
            )

    for i in range(header.tensor_count):
        start = pos
        need(_NAME_LEN.size, "name_len")
        (name_len,) = _NAME_LEN.unpack_from(index, pos)
        if not 0 < name_len <= MAX_TENSOR_NAME_LEN:
            check.fail(f"tensor {i}: name length {name_len} not in 1..{MAX_TENSOR_NAME_LEN}", "name_len", base + pos)
        pos += _NAME_LEN.size
        need(name_len, "name")
        name_bytes = index[pos : pos + name_len]
        try:
            name = name_bytes.decode("utf-8")
        except UnicodeDecodeError:
            check.fail(f"tensor {i}: name is not valid UTF-8: {name_bytes!r}", "name", base + pos)
        pos += name_len
        if previous is not None and name_bytes <= previous:
            what = "duplicate tensor name" if name_bytes == previous else "tensor index not sorted by name"
            check.fail(f"{what}: {name!r} after {previous.decode('utf-8')!r}", "name", base + start)
        previous = name_bytes
        need(_DTYPE_NDIM.size, "dtype")
        dtype, ndim = _DTYPE_NDIM.unpack_from(index, pos)
        encoding = encodings.BY_APR_DTYPE.get(dtype)
        if encoding is None:
            check.fail(f"tensor {name!r}: unknown dtype byte {dtype}", "dtype", base + pos)
        if ndim > MAX_NDIM:
            check.fail(f"tensor {name!r}: ndim {ndim} exceeds {MAX_NDIM}", "ndim", base + pos + 1)
        pos += _DTYPE_NDIM.size
        need(ndim * _DIM.size + _OFFSET_SIZE.size, "dims")
        shape = struct.unpack_from(f"<{ndim}Q", index, pos)
        # Python ints do not overflow; a product this large is simply impossible data.
        if math.prod(shape) >= 1 << 63:
            check.fail(f"tensor {name!r}: element count of shape {list(shape)} overflows u64", "dims", base + pos)
        pos += ndim * _DIM.size
        offset, size = _OFFSET_SIZE.unpack_from(index, pos)
        try:
            expected = encoding.nbytes(shape)
        except ConversionError as exc:
            check.fail(f"tensor {name!r}: {exc}", "dims", base + pos - ndim * _DIM.size)
        if size != expected:
            check.fail(
                f"tensor {name!r}: size {size} but {encoding.name} {list(shape)} needs {expected} bytes",
                "size",
                base + pos + 8,
            )
        if offset % ALIGNMENT:
            check.fail(f"tensor {name!r}: offset {offset} is not a multiple of {ALIGNMENT}", "offset", base + pos)
        if header.data_offset + offset + size > data_end:
            check.fail(
                f"tensor {name!r}: data [{header.data_offset + offset}, {header.data_offset + offset + size}) "
                f"runs past the data end {data_end}",
                "offset",
                base + pos,
            )
        pos += _OFFSET_SIZE.size
        entries.append(AprTensorEntry(name, dtype, tuple(shape), offset, size))

    # Data may be laid out in any order (the streaming writer uses insertion order), but no two
    # tensors may share bytes.
    placed = sorted((e for e in entries if e.size), key=lambda e: e.offset)
    for before, after in zip(placed, placed[1:]):
        if after.offset < before.offset + before.size:
            check.fail(
                f"tensors {before.name!r} and {after.name!r} overlap in the data section",
                "offset",
                header.data_offset + after.offset,
            )
    return entries


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _parse_metadata(check: _Checker, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
        metadata = json.loads(
            text, parse_constant=_reject_constant
        )  # duplicate keys: last wins, like serde_json::Value
    except UnicodeDecodeError as exc:
        check.fail(f"metadata is not valid UTF-8: {exc.reason}", "metadata", METADATA_OFFSET + exc.start)
    except json.JSONDecodeError as exc:
        check.fail(
            f"metadata is not valid JSON: {exc.msg}", "metadata", METADATA_OFFSET + len(text[: exc.pos].encode())
        )
    except (ValueError, RecursionError) as exc:
        check.fail(f"metadata is not valid JSON: {exc}", "metadata", METADATA_OFFSET)
    if not isinstance(metadata, dict):
        check.fail(f"metadata must be a JSON object, got {type(metadata).__name__}", "metadata", METADATA_OFFSET)
    for canonical, aliases in ALIAS_KEYS.items():
        clash = [alias for alias in aliases if alias in metadata]
        if clash and canonical in metadata:
            check.fail(
                f"metadata has both {canonical!r} and its alias {clash[0]!r}; aprender-serve drops all metadata on this",
                clash[0],
                METADATA_OFFSET,
            )
    return metadata


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _canonical_f32(value: float) -> float:
    """The shortest decimal that round-trips through float32 (so 1e-6 stays 1e-06)."""
    return float(str(np.float32(value)))


def _config_from_metadata(check: _Checker, meta: dict, tied: bool) -> ModelConfig:
    def field(key: str):
        if key not in meta or meta[key] is None:
            check.fail(f"metadata lacks required key {key!r}", key, METADATA_OFFSET)
        return meta[key]

    architecture = field("architecture")
    if architecture not in SUPPORTED:
        check.fail(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED)}",
            "architecture",
            METADATA_OFFSET,
        )
    ints = {}
    for key in _REQUIRED_INT_KEYS:
        value = field(key)
        if not _is_int(value) or value <= 0:
            check.fail(f"metadata {key!r} must be a positive integer, got {value!r}", key, METADATA_OFFSET)
        ints[key] = value
    floats = {}
    for key in F32_METADATA_KEYS:
        value = field(key)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not 0 < value <= _F32_MAX:
            check.fail(f"metadata {key!r} must be a positive finite f32, got {value!r}", key, METADATA_OFFSET)
        floats[key] = _canonical_f32(value)
    head_dim = meta.get("head_dim")
    if head_dim is None:
        head_dim = ints["hidden_size"] // ints["num_heads"]  # aprender's default when absent
    elif not _is_int(head_dim) or head_dim <= 0:
        check.fail(f"metadata 'head_dim' must be a positive integer, got {head_dim!r}", "head_dim", METADATA_OFFSET)
    rope_type = meta.get("rope_type")
    if rope_type is not None and rope_type != ROPE_TYPES[architecture]:
        check.fail(
            f"rope_type {rope_type!r} does not match {architecture} (expects {ROPE_TYPES[architecture]})",
            "rope_type",
            METADATA_OFFSET,
        )
    params = meta.get(ARCH_PARAMS_KEY, {})
    declared = registry.get(architecture).params
    if not isinstance(params, dict) or set(params) != {p.name for p in declared}:
        check.fail(
            f"metadata {ARCH_PARAMS_KEY!r} must name exactly {architecture}'s parameters {[p.name for p in declared]}, got {params!r}",
            ARCH_PARAMS_KEY, METADATA_OFFSET,
        )
    for p in declared:
        value = params[p.name]
        ok = _is_int(value) and value > 0 if p.kind == "u32" else isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok:
            check.fail(f"metadata {ARCH_PARAMS_KEY}.{p.name} must be a positive number, got {value!r}", ARCH_PARAMS_KEY, METADATA_OFFSET)
    params = {p.name: (int(params[p.name]) if p.kind == "u32" else _canonical_f32(params[p.name])) for p in declared}
    return ModelConfig(
        architecture=architecture,
        vocab_size=ints["vocab_size"],
        hidden_size=ints["hidden_size"],
        intermediate_size=ints["intermediate_size"],
        num_layers=ints["num_layers"],
        num_heads=ints["num_heads"],
        num_kv_heads=ints["num_kv_heads"],
        head_dim=head_dim,
        max_position_embeddings=ints["max_position_embeddings"],
        rope_theta=floats["rope_theta"],
        rms_norm_eps=floats["rms_norm_eps"],
        tie_word_embeddings=tied,
        params=params,
    )


def _tokenizer_from_metadata(check: _Checker, meta: dict) -> TokenizerSpec | None:
    def typed(key: str, ok, what: str, default=None):
        value = meta.get(key)
        if value is None:
            return default
        if not ok(value):
            check.fail(f"metadata {key!r} must be {what}", key, METADATA_OFFSET)
        return value

    def str_list(v):
        return isinstance(v, list) and all(isinstance(s, str) for s in v)

    tokens = typed("tokenizer.vocabulary", str_list, "a list of strings")
    if tokens is None:
        return None
    n = len(tokens)

    def token_id(key: str):
        return typed(key, lambda v: _is_int(v) and 0 <= v < n, f"a token id in [0, {n})")

    declared = typed("tokenizer.vocab_size", _is_int, "an integer")
    if declared is not None and declared != n:
        check.fail(
            f"tokenizer.vocab_size {declared} != {n} vocabulary entries", "tokenizer.vocab_size", METADATA_OFFSET
        )
    merges = typed("tokenizer.merges", str_list, "a list of strings", [])
    token_types = typed(
        "tokenizer.token_type",
        lambda v: isinstance(v, list) and len(v) == n and all(_is_int(t) for t in v),
        f"a list of {n} integers",
        [1] * n,  # no types stored (aprender's SafeTensors path): every token is a normal one
    )
    scores = typed(
        "tokenizer.scores",
        lambda v: isinstance(v, list)
        and len(v) == n
        and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in v),
        f"a list of {n} numbers",
    )
    model = typed("tokenizer.model_type", lambda v: isinstance(v, str), "a string")
    model = model or typed("tokenizer.model", lambda v: isinstance(v, str), "a string")
    model = model or ("gpt2" if merges else "llama")
    chat_template = typed("chat_template", lambda v: isinstance(v, str), "a string")
    if chat_template is None:
        chat_template = typed("tokenizer.chat_template", lambda v: isinstance(v, str), "a string")
    return TokenizerSpec(
        model=model,
        pre=typed("tokenizer.pre_type", lambda v: isinstance(v, str), "a string"),
        tokens=list(tokens),
        token_types=list(token_types),
        merges=list(merges),
        scores=None if scores is None else [float(s) for s in scores],
        bos_token_id=token_id("tokenizer.bos_token_id"),
        eos_token_id=token_id("tokenizer.eos_token_id"),
        unk_token_id=token_id("tokenizer.unk_token_id"),
        pad_token_id=token_id("tokenizer.padding_token_id"),
        add_bos_token=typed("tokenizer.add_bos_token", lambda v: isinstance(v, bool), "a boolean", False),
        add_eos_token=typed("tokenizer.add_eos_token", lambda v: isinstance(v, bool), "a boolean", False),
        chat_template=chat_template,
        add_space_prefix=typed("tokenizer.add_space_prefix", lambda v: isinstance(v, bool), "a boolean"),
    )


def read_apr(path: str | os.PathLike) -> ModelArtifact:
    """Open an APR v2 file as the canonical view, checking every structure before any data."""
    path = Path(path)
    check = _Checker(path)
    try:
        file_size = path.stat().st_size
        fh = open(path, "rb")
    except OSError as exc:
        raise FormatError(path, f"cannot open: {exc.strerror}") from exc
    with fh:
        if file_size < HEADER_SIZE + FOOTER_SIZE:
            check.fail(f"file is {file_size} bytes, shorter than a header and footer", "header", 0)
        header = _check_header(check, _read_exact(fh, 0, HEADER_SIZE), file_size)
        data_end = file_size - FOOTER_SIZE
        metadata = _parse_metadata(check, _read_exact(fh, header.metadata_offset, header.metadata_size))
        index = _read_exact(fh, header.tensor_index_offset, header.data_offset - header.tensor_index_offset)
        entries = _parse_index(check, index, header, data_end)
        (stored_crc,) = struct.unpack("<I", _read_exact(fh, data_end, FOOTER_SIZE))
        computed_crc = _file_crc(fh, data_end)
        if stored_crc != computed_crc:
            check.fail(
                f"footer checksum mismatch: stored {stored_crc:#010x}, computed {computed_crc:#010x}",
                "footer",
                data_end,
            )

    def file_bytes(start: int, size: int):
        def load() -> np.ndarray:
            return read_file_range(path, start, size)

        return load

    tied_flag = metadata.get(TIED_EMBEDDINGS_KEY, False)
    if not isinstance(tied_flag, bool):
        check.fail(f"metadata {TIED_EMBEDDINGS_KEY!r} must be a boolean", TIED_EMBEDDINGS_KEY, METADATA_OFFSET)
    config = _config_from_metadata(check, metadata, tied_flag)

    # Canonical names: files converted by `apr` from a llama GGUF keep GGUF names.
    stored = {e.name: e for e in entries}
    arch = registry.get(config.architecture)
    name_style = "gguf" if any(registry.gguf_to_hf(arch, name) for name in stored) else "hf"
    collision = name_collision(stored, config.architecture)
    if collision is not None:
        check.fail(collision.message, "name", header.tensor_index_offset)
    canonical_of = {name: canonical_name(name, config.architecture) for name in stored}
    tokenizer = _tokenizer_from_metadata(check, metadata)

    tensors: dict[str, LazyTensor] = {}
    for entry in entries:  # index order = sorted stored names
        canonical = canonical_of[entry.name]
        encoding: Encoding = encodings.BY_APR_DTYPE[entry.dtype]
        load = file_bytes(header.data_offset + entry.offset, entry.size)
        stored_in = os.fspath(path)
        n_head = qk_heads(config, canonical) if name_style == "gguf" else None
        if n_head is not None:
            _check_unpermutable(check, entry, encoding, n_head, header.data_offset)
            load = unpermuted_loader(load, entry.shape[0], n_head)
            stored_in = None  # raw() is the rows unpermuted, not the file's bytes
        tensors[canonical] = LazyTensor(
            name=canonical,
            shape=entry.shape,
            encoding=encoding,
            load_raw=load,
            stored_name=entry.name,
            stored_shape=entry.shape,
            file_offset=header.data_offset + entry.offset,
            stored_in=stored_in,
        )

    if tied_flag and LM_HEAD_NAME in tensors:
        # aprender materialises a tied lm_head as a copy of the embedding; the canonical view
        # drops it, after making sure it really is that copy.
        head = tensors[LM_HEAD_NAME]
        if not is_tied_copy(head, tensors.get(EMBEDDING_NAME)):
            check.fail(
                f"{TIED_EMBEDDINGS_KEY} is true but {head.stored_name!r} is not a byte copy of the embedding",
                TIED_EMBEDDINGS_KEY,
                head.file_offset,
            )
        del tensors[LM_HEAD_NAME]

    artifact_metadata = {
        "apr": metadata,
        "apr_header": header.as_dict(),
        "name_style": name_style,
    }
    if PROVENANCE_KEY in metadata:
        artifact_metadata["provenance"] = metadata[PROVENANCE_KEY]

    return ModelArtifact(
        path=str(path),
        format="apr",
        config=config,
        tokenizer=tokenizer,
        tensors=tensors,
        metadata=artifact_metadata,
    )


def _check_unpermutable(check: _Checker, entry: AprTensorEntry, encoding: Encoding, n_head: int, data_offset: int) -> None:
    """Whether llama's GGUF Q/K row permutation can be undone on `entry` (rows move whole)."""
    rows = entry.shape[0] if entry.shape else 0
    if rows == 0 or rows % (2 * n_head):
        check.fail(
            f"tensor {entry.name!r}: {rows} rows cannot be un-permuted for {n_head} heads",
            "dims",
            data_offset + entry.offset,
        )
    # Rows can move as byte ranges only if each row is stored on its own (not APR Q8's shared
    # scale, not blocks that straddle rows).
    row_bytes = encoding.nbytes(entry.shape[1:])
    if row_bytes * rows != entry.size:
        check.fail(
            f"tensor {entry.name!r}: {encoding.name} {list(entry.shape)} does not store rows separately, cannot un-permute",
            "dtype",
            data_offset + entry.offset,
        )
