"""GGUF reader: the canonical view of a GGUF file (the writer is convqa.formats.gguf_writer).

Reading is two steps. A small explicit parser walks the header, the key/value section and the
tensor infos, checking every length, count, type code, dimension, offset and alignment against
the file size before anything is allocated (gguf-py's GGUFReader trusts the counts: a hostile
file makes it allocate huge arrays or crash inside numpy). Tensor data is then read lazily, one
tensor at a time into private memory (convqa.formats.filerange), when its bytes are asked for.

Reader and writer are separate modules so that each has its own code fingerprint
(convqa.workflow.fingerprint): a fix to the writer reruns the jobs that write GGUF, not the ones
that only read it (a GGUF source imported G->S). What both need is in convqa.formats.gguf_keys.

GGUF conventions undone at this boundary and nowhere else (docs/formats.md GGUF 1-3):
`ne` lists dimensions fastest-first, so the canonical (numpy) shape is `reversed(ne)` and the
bytes are never transposed; llama's q/k projections are row-permuted within each head; gemma's
norms are stored `+ 1`; tensors use llama.cpp names (gguf-py's tables, `convqa.arch.registry`);
`output.weight` is absent when embeddings are tied; architecture-specific hyperparameters are the
registry's `Param` keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUFValueType, Keys, TokenType

from convqa import encodings
from convqa.arch import registry, transforms
from convqa.formats.canonical import canonical_name, name_collision, qk_heads, unpermuted_loader
from convqa.formats.filerange import read_file_range
from convqa.formats.gguf_keys import ARCHITECTURE_KEY, PROVENANCE_KEY, TOKENIZER_PADDING_KEY
from convqa.errors import FormatError
from convqa.model import LazyTensor, ModelArtifact, ModelConfig, TokenizerSpec

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; v2 and v3 share this layout
HEADER_SIZE = 4 + 4 + 8 + 8  # magic, version, tensor_count, kv_count
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # ggml keeps names NUL-terminated in 64 bytes: at most 63 name bytes
LLAMA_CPP_DEFAULT_ROPE_THETA = 10000.0  # what llama.cpp uses when rope.freq_base is absent

# Smallest encodings, used to reject counts that cannot fit in the bytes left.
_STRING_LEN_SIZE = 8
_MIN_KV_SIZE = _STRING_LEN_SIZE + 4 + 1  # empty key, value type, 1-byte value
_MIN_TENSOR_INFO_SIZE = _STRING_LEN_SIZE + 4 + 8 + 4 + 8  # empty name, n_dims, one ne, type, offset

# Fixed-size value types: struct format (little-endian) and size.
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<B",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {vtype: np.dtype(fmt) for vtype, fmt in _SCALAR_FORMATS.items()}
_FLOAT_TYPES = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)

# Arrays longer than this are summarised (type, count, sha256) in the artifact's metadata.
_INLINE_ARRAY_LIMIT = 64

NO_TOKENIZER_MODELS = ("none", "no_vocab")  # llama.cpp's "no vocabulary" escape hatch


# ----------------------------------------------------------------------------------------------
# Parsing


@dataclass
class _KeyValue:
    key: str
    type: GGUFValueType
    value: object  # int/float/bool/str; arrays: list[str] or a numpy array
    elem_type: GGUFValueType | None  # arrays only
    offset: int  # where the key/value pair starts
    value_bytes: tuple[int, int]  # [start, end) of the encoded value (arrays: of the elements)

    @property
    def type_name(self) -> str:
        if self.type == GGUFValueType.ARRAY:
            return f"ARRAY[{self.elem_type.name}]"
        return self.type.name


@dataclass
class _TensorInfo:
    name: str
    ne: tuple[int, ...]
    encoding: encodings.Encoding
    offset: int  # absolute file offset of the data
    nbytes: int
    info_offset: int  # where the tensor info starts in the file


@dataclass
class _ParsedFile:
    version: int
    kvs: dict[str, _KeyValue]
    tensors: list[_TensorInfo]
    alignment: int
    data_offset: int


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file; every error names the offset."""

    def __init__(self, path: str, buf: memoryview) -> None:
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def fail(self, message: str, field: str, offset: int | None = None) -> FormatError:
        return FormatError(self.path, message, field=field, offset=self.pos if offset is None else offset)

    def need(self, n: int, field: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: {field} needs {n} bytes, {self.size - self.pos} left", field)

    def scalar(self, vtype: GGUFValueType, field: str):
        fmt = _SCALAR_FORMATS[vtype]
        n = struct.calcsize(fmt)
        self.need(n, field)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        if vtype == GGUFValueType.BOOL:
            if value > 1:
                raise self.fail(f"bool value {value} is neither 0 nor 1", field)
            value = bool(value)
        self.pos += n
        return value

    def u32(self, field: str) -> int:
        return self.scalar(GGUFValueType.UINT32, field)

    def u64(self, field: str) -> int:
        return self.scalar(GGUFValueType.UINT64, field)

    def string(self, field: str) -> str:
        start = self.pos
        length = self.u64(field + ".length")
        self.need(length, field)
        raw = bytes(self.buf[self.pos : self.pos + length])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"string is not valid UTF-8 ({exc.reason} at byte {exc.start})", field, start) from None
        self.pos += length
        return text


def _parse(path: str, buf: memoryview) -> _ParsedFile:
    cur = _Cursor(path, buf)
    cur.need(HEADER_SIZE, "header")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise cur.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}", "magic", 0)
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise cur.fail("big-endian GGUF is not supported", "version", 4)
        raise cur.fail(f"unsupported GGUF version {version}; supported: {SUPPORTED_VERSIONS}", "version", 4)
    tensor_count = cur.u64("tensor_count")
    kv_count = cur.u64("kv_count")
    # Every entry takes some bytes: counts that cannot fit are rejected before any loop runs.
    left = cur.size - cur.pos
    if tensor_count * _MIN_TENSOR_INFO_SIZE > left:
        raise cur.fail(f"{tensor_count} tensor infos cannot fit in the {left} bytes left", "tensor_count", 8)
    if kv_count * _MIN_KV_SIZE + tensor_count * _MIN_TENSOR_INFO_SIZE > left:
        raise cur.fail(f"{kv_count} key/values cannot fit in the {left} bytes left", "kv_count", 16)

    kvs: dict[str, _KeyValue] = {}
    for i in range(kv_count):
        kv = _parse_key_value(cur, i)
        if kv.key in kvs:
            raise cur.fail(f"duplicate key {kv.key!r}", kv.key, kv.offset)
        kvs[kv.key] = kv

    alignment = GGUF_DEFAULT_ALIGNMENT
    if Keys.General.ALIGNMENT in kvs:
        kv = kvs[Keys.General.ALIGNMENT]
        if kv.type != GGUFValueType.UINT32:
            raise cur.fail(f"general.alignment has type {kv.type_name}, expected UINT32", kv.key, kv.offset)
        alignment = kv.value
        if alignment == 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment {alignment} is not a power of two", kv.key, kv.offset)

    infos = [_parse_tensor_info(cur, i, alignment) for i in range(tensor_count)]
    data_offset = -(-cur.pos // alignment) * alignment
    names: set[str] = set()
    for info in infos:
        if info.name in names:
            raise cur.fail(f"duplicate tensor name {info.name!r}", info.name, info.info_offset)
        names.add(info.name)
        info.offset += data_offset
        if info.offset + info.nbytes > cur.size:
            raise cur.fail(
                f"tensor {info.name!r} data [{info.offset}, {info.offset + info.nbytes}) runs past the end of the "
                f"file ({cur.size} bytes)",
                info.name + ".offset",
                info.info_offset,
            )
    by_start = sorted(infos, key=lambda t: t.offset)
    for before, after in zip(by_start, by_start[1:]):
        if after.offset < before.offset + before.nbytes:
            raise cur.fail(
                f"tensor {after.name!r} data at {after.offset} overlaps tensor {before.name!r} "
                f"[{before.offset}, {before.offset + before.nbytes})",
                after.name + ".offset",
                after.info_offset,
            )
    return _ParsedFile(version, kvs, infos, alignment, data_offset)


def _parse_key_value(cur: _Cursor, index: int) -> _KeyValue:
    offset = cur.pos
    key = cur.string(f"kv[{index}].key")
    vtype = _value_type(cur, key)
    start = cur.pos
    if vtype == GGUFValueType.ARRAY:
        elem_type = _value_type(cur, key + "[]")
        if elem_type == GGUFValueType.ARRAY:
            raise cur.fail("nested arrays are not supported", key, cur.pos - 4)
        count_at = cur.pos
        count = cur.u64(key + ".count")
        min_elem = _STRING_LEN_SIZE if elem_type == GGUFValueType.STRING else _ARRAY_DTYPES[elem_type].itemsize
        if count * min_elem > cur.size - cur.pos:
            raise cur.fail(
                f"array of {count} {elem_type.name} cannot fit in the {cur.size - cur.pos} bytes left", key, count_at
            )
        start = cur.pos
        if elem_type == GGUFValueType.STRING:
            value = [cur.string(f"{key}[{i}]") for i in range(count)]
        else:
            dtype = _ARRAY_DTYPES[elem_type]
            value = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos).copy()
            if elem_type == GGUFValueType.BOOL:
                if np.any(value > 1):
                    raise cur.fail("bool array holds a value that is neither 0 nor 1", key, start)
                value = value.astype(bool)
            cur.pos += count * dtype.itemsize
        return _KeyValue(key, vtype, value, elem_type, offset, (start, cur.pos))
    value = cur.string(key) if vtype == GGUFValueType.STRING else cur.scalar(vtype, key)
    return _KeyValue(key, vtype, value, None, offset, (start, cur.pos))


def _value_type(cur: _Cursor, field: str) -> GGUFValueType:
    at = cur.pos
    code = cur.u32(field + ".type")
    try:
        return GGUFValueType(code)
    except ValueError:
        raise cur.fail(f"unknown value type {code}", field, at) from None


def _parse_tensor_info(cur: _Cursor, index: int, alignment: int) -> _TensorInfo:
    info_offset = cur.pos
    name = cur.string(f"tensor_info[{index}].name")
    if len(name.encode("utf-8")) >= GGML_MAX_NAME:
        raise cur.fail(f"tensor name {name!r} is longer than {GGML_MAX_NAME - 1} bytes", name, info_offset)
    at = cur.pos
    n_dims = cur.u32(name + ".n_dims")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        raise cur.fail(
            f"tensor {name!r} has {n_dims} dimensions; 1 to {GGML_MAX_DIMS} are allowed", name + ".n_dims", at
        )
    ne_at = cur.pos
    ne = []
    for j in range(n_dims):
        at = cur.pos
        dim = cur.u64(f"{name}.ne[{j}]")
        if dim == 0:
            raise cur.fail(f"tensor {name!r} has an empty dimension ne[{j}] = 0", f"{name}.ne[{j}]", at)
        ne.append(dim)
    at = cur.pos
    ggml_type = cur.u32(name + ".type")
    encoding = encodings.BY_GGML_TYPE.get(ggml_type)
    if encoding is None:
        raise cur.fail(f"tensor {name!r} has unknown or unsupported ggml type {ggml_type}", name + ".type", at)
    if ne[0] % encoding.block_elems:
        raise cur.fail(
            f"tensor {name!r} row length ne[0] = {ne[0]} is not a multiple of the {encoding.name} block size "
            f"{encoding.block_elems}",
            name + ".ne[0]",
            ne_at,
        )
    # Python integers: the product cannot overflow, and the file size bounds it.
    nbytes = math.prod(ne) // encoding.block_elems * encoding.block_bytes
    if nbytes > cur.size:
        raise cur.fail(f"tensor {name!r} needs {nbytes} bytes, more than the whole file", name + ".ne", info_offset)
    at = cur.pos
    offset = cur.u64(name + ".offset")
    if offset % alignment:
        raise cur.fail(
            f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}", name + ".offset", at
        )
    return _TensorInfo(name, tuple(ne), encoding, offset, nbytes, info_offset)


# ----------------------------------------------------------------------------------------------
# Reading: the canonical view


def read_gguf(path: str | os.PathLike) -> ModelArtifact:
    """Open a GGUF file as the canonical view. Raises FormatError for anything malformed."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise FormatError(path, f"cannot open: {exc.strerror}") from exc
    if size < HEADER_SIZE:
        raise FormatError(
            path, f"truncated: {size} bytes is shorter than the {HEADER_SIZE}-byte header", field="header", offset=0
        )
    try:
        # Only the header, key/values and tensor infos are read through this map; tensor data is
        # read per tensor into private memory (convqa.formats.filerange) so peak RSS tracks the
        # largest tensor, not the file.
        header_map = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as exc:
        raise FormatError(path, f"cannot map: {exc.strerror}") from exc
    parsed = _parse(path, memoryview(header_map))
    kvs = parsed.kvs

    gguf_arch = _get(path, kvs, Keys.General.ARCHITECTURE, GGUFValueType.STRING)
    architecture = _registry_architecture(path, kvs, gguf_arch)

    metadata: dict = {
        "gguf_version": parsed.version,
        "alignment": parsed.alignment,
        "data_offset": parsed.data_offset,
        "tensor_types": dict(Counter(info.encoding.name for info in parsed.tensors)),
        "kv": {key: _json_value(header_map, kv) for key, kv in kvs.items()},
        "kv_types": {key: kv.type_name for key, kv in kvs.items()},
        "unmapped_tensors": [],
        "defaults_applied": [],
    }
    if PROVENANCE_KEY in kvs:
        text = _get(path, kvs, PROVENANCE_KEY, GGUFValueType.STRING)
        try:
            metadata["provenance"] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(
                path, f"provenance is not JSON: {exc.msg}", field=PROVENANCE_KEY, offset=kvs[PROVENANCE_KEY].offset
            ) from None

    collision = name_collision((info.name for info in parsed.tensors), architecture)
    if collision is not None:
        info = parsed.tensors[collision.index]
        raise FormatError(path, collision.message, field=info.name, offset=info.info_offset)
    arch = registry.get(architecture)
    metadata["unmapped_tensors"] = [
        info.name for info in parsed.tensors
        if registry.gguf_to_hf(arch, info.name) is None and registry.stacked_to_hf(arch, info.name) is None
    ]  # fmt: skip
    names = {canonical_name(info.name, architecture): info for info in parsed.tensors}

    tokenizer = _read_tokenizer(path, kvs, metadata)
    config = _read_config(path, kvs, architecture, gguf_arch, names, metadata)
    tensors = {}
    for canonical, info in names.items():
        stacked = registry.stacked_to_hf(arch, info.name) if arch.expert_roles else None
        if stacked is None:
            tensors[canonical] = _lazy_tensor(path, canonical, info, config)
        else:
            tensors.update(_expert_tensors(path, info, *stacked, config))
    return ModelArtifact(
        path=path,
        format="gguf",
        config=config,
        tokenizer=tokenizer,
        tensors=tensors,
        metadata=metadata,
    )


def _registry_architecture(path: str, kvs: dict, gguf_arch: str) -> str:
    """The registry name for a file whose general.architecture is `gguf_arch` (and hint key)."""
    kv = kvs[Keys.General.ARCHITECTURE]
    default = registry.BY_GGUF_NAME.get(gguf_arch)
    if default is None:
        raise FormatError(
            path, f"unsupported architecture {gguf_arch!r}; supported: {registry.SUPPORTED}", field=kv.key, offset=kv.offset
        )
    hint = _get(path, kvs, ARCHITECTURE_KEY, GGUFValueType.STRING, required=False)
    if hint is None:
        return default.name
    if hint not in registry.ARCHITECTURES or registry.ARCHITECTURES[hint].gguf_name != gguf_arch:
        raise FormatError(
            path, f"{ARCHITECTURE_KEY} {hint!r} is not an architecture written as {gguf_arch!r}",
            field=ARCHITECTURE_KEY, offset=kvs[ARCHITECTURE_KEY].offset,
        )
    return hint


def _lazy_tensor(path: str, canonical: str, info: _TensorInfo, config: ModelConfig) -> LazyTensor:
    shape = tuple(reversed(info.ne))

    def load_stored() -> np.ndarray:
        return read_file_range(path, info.offset, info.nbytes)

    load_raw = load_stored
    stored_in = path  # raw() is the file's bytes unless a transform below applies
    n_head = qk_heads(config, canonical)
    if n_head is not None:
        _check_permutable(path, info, shape, n_head)
        load_raw = unpermuted_loader(load_stored, shape[0], n_head)
        stored_in = None
    offset = transforms.norm_offset(config, canonical)
    if offset:
        if not transforms.can_offset(info.encoding):
            raise FormatError(
                path, f"{info.name}: a {info.encoding.name} norm cannot carry {config.architecture}'s +1 offset exactly",
                field=info.name, offset=info.info_offset,
            )
        load_raw = transforms.offset_loader(load_raw, info.encoding, shape, -offset)
        stored_in = None

    return LazyTensor(
        name=canonical,
        shape=shape,
        encoding=info.encoding,
        load_raw=load_raw,
        stored_name=info.name,
        stored_shape=info.ne,
        file_offset=info.offset,
        stored_in=stored_in,
    )


def _expert_tensors(path: str, info: _TensorInfo, layer: int, suffix: str, config: ModelConfig) -> dict[str, LazyTensor]:
    """A stacked MoE tensor [n_expert, rows, cols] split back into its per-expert canonical
    tensors, expert e from index e (convqa.arch.transforms.expert_loader), each read lazily."""
    shape = tuple(reversed(info.ne))
    n_expert = int(config.params.get("num_experts", 0))
    if len(shape) != 3 or shape[0] != n_expert:
        raise FormatError(
            path, f"{info.name}: shape {list(shape)} is not [{n_expert} experts, rows, cols]", field=info.name, offset=info.info_offset
        )

    def load_stacked() -> np.ndarray:
        return read_file_range(path, info.offset, info.nbytes)

    size = info.nbytes // n_expert
    return {
        (name := registry.expert_name(layer, e, suffix)): LazyTensor(
            name=name, shape=shape[1:], encoding=info.encoding, load_raw=transforms.expert_loader(load_stacked, e, n_expert),
            stored_name=info.name, stored_shape=info.ne, file_offset=info.offset + e * size,
        )
        for e in range(n_expert)
    }


def _check_permutable(path: str, info: _TensorInfo, shape: tuple[int, ...], n_head: int) -> None:
    if len(shape) == 1 and info.encoding.block_elems != 1:
        raise FormatError(
            path,
            f"{info.name}: a 1-D {info.encoding.name} tensor cannot be row-permuted",
            field=info.name,
            offset=info.info_offset,
        )
    if n_head <= 0 or shape[0] % (2 * n_head):
        raise FormatError(
            path,
            f"{info.name}: {shape[0]} rows do not split into {n_head} heads of rotary pairs",
            field=info.name,
            offset=info.info_offset,
        )


def _get(
    path: str,
    kvs: dict[str, _KeyValue],
    key: str,
    vtype: GGUFValueType,
    default=None,
    *,
    required: bool = True,
    elem_type=None,
):
    """The value of `key`, which must have exactly the type llama.cpp expects."""
    kv = kvs.get(key)
    if kv is None:
        if required:
            raise FormatError(path, f"key not found in model: {key}", field=key)
        return default
    if kv.type != vtype or (elem_type is not None and kv.elem_type != elem_type):
        expected = f"ARRAY[{elem_type.name}]" if elem_type is not None else vtype.name
        raise FormatError(
            path, f"key {key} has wrong type {kv.type_name} but expected type {expected}", field=key, offset=kv.offset
        )
    return kv.value


def _f32(value: float) -> float:
    """The shortest decimal that round-trips through float32: 1e-5 stays 1e-05."""
    return float(str(np.float32(value)))


def _read_config(
    path: str, kvs: dict[str, _KeyValue], architecture: str, arch: str, tensors: dict[str, _TensorInfo], metadata: dict
) -> ModelConfig:
    def u32(name: str, default=None, required=True):
        return _get(path, kvs, f"{arch}.{name}", GGUFValueType.UINT32, default, required=required)

    def f32(name: str, default=None, required=True):
        return _get(path, kvs, f"{arch}.{name}", GGUFValueType.FLOAT32, default, required=required)

    hidden = u32("embedding_length")
    heads = u32("attention.head_count")
    if heads == 0:
        raise FormatError(
            path,
            "attention.head_count is 0",
            field=f"{arch}.attention.head_count",
            offset=kvs[f"{arch}.attention.head_count"].offset,
        )
    kv_heads = u32("attention.head_count_kv", heads, required=False)
    rope_theta = f32("rope.freq_base", required=False)
    if rope_theta is None:
        rope_theta = LLAMA_CPP_DEFAULT_ROPE_THETA
        metadata["defaults_applied"].append("rope_theta")
    head_dim = u32("attention.key_length", required=False)
    if head_dim is None:
        head_dim = u32("rope.dimension_count", hidden // heads, required=False)

    vocab_size = u32("vocab_size", required=False)
    tokens = _get(path, kvs, Keys.Tokenizer.LIST, GGUFValueType.ARRAY, required=False, elem_type=GGUFValueType.STRING)
    if vocab_size is None and tokens is not None:
        vocab_size = len(tokens)
    if vocab_size is None and "model.embed_tokens.weight" in tensors:
        vocab_size = tensors["model.embed_tokens.weight"].ne[-1]
    if vocab_size is None:
        raise FormatError(
            path, "no vocabulary size: no vocab_size key, token list or token_embd.weight", field=f"{arch}.vocab_size"
        )

    params = {}
    for param in registry.get(architecture).params:
        key = param.gguf_key.format(arch=arch)
        vtype = GGUFValueType.UINT32 if param.kind == "u32" else GGUFValueType.FLOAT32
        value = _get(path, kvs, key, vtype, required=False)
        if value is None:
            value = _PARAM_DEFAULTS.get((arch, param.name))
            if value is None:
                raise FormatError(path, f"key not found in model: {key}", field=key)
            metadata["defaults_applied"].append(param.name)
        params[param.name] = _f32(value) if param.kind == "f32" else int(value)

    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=u32("feed_forward_length"),
        num_layers=u32("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=u32("context_length"),
        rope_theta=_f32(rope_theta),
        rms_norm_eps=_f32(f32("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="lm_head.weight" not in tensors,
        params=params,
    )


# What llama.cpp (src/llama-model.cpp) uses when a file lacks an optional architecture key.
_PARAM_DEFAULTS = {("gemma3", "rope_local_theta"): 10000.0}


def _read_tokenizer(path: str, kvs: dict[str, _KeyValue], metadata: dict) -> TokenizerSpec | None:
    T = Keys.Tokenizer
    model = _get(path, kvs, T.MODEL, GGUFValueType.STRING, required=False)
    if model is None or model in NO_TOKENIZER_MODELS:
        return None
    tokens = _get(path, kvs, T.LIST, GGUFValueType.ARRAY, elem_type=GGUFValueType.STRING)
    token_types = _get(path, kvs, T.TOKEN_TYPE, GGUFValueType.ARRAY, required=False, elem_type=GGUFValueType.INT32)
    if token_types is None:
        token_types = [int(TokenType.NORMAL)] * len(tokens)
        metadata["defaults_applied"].append("token_types")
    else:
        token_types = token_types.tolist()
    scores = _get(path, kvs, T.SCORES, GGUFValueType.ARRAY, required=False, elem_type=GGUFValueType.FLOAT32)
    for key, values in ((T.TOKEN_TYPE, token_types), (T.SCORES, scores)):
        if values is not None and len(values) != len(tokens):
            raise FormatError(
                path, f"{key} has {len(values)} entries for {len(tokens)} tokens", field=key, offset=kvs[key].offset
            )
    scores = [_f32(s) for s in scores.tolist()] if scores is not None else None

    padded = _get(path, kvs, TOKENIZER_PADDING_KEY, GGUFValueType.UINT32, 0, required=False)
    if padded:
        keep = len(tokens) - padded
        pads_ok = keep >= 0 and all(
            tokens[i] == f"[PAD{i}]" and token_types[i] == TokenType.UNUSED for i in range(max(keep, 0), len(tokens))
        )
        if not pads_ok:
            kv = kvs[TOKENIZER_PADDING_KEY]
            raise FormatError(
                path,
                f"the last {padded} tokens are not the writer's [PAD{{i}}] padding",
                field=kv.key,
                offset=kv.offset,
            )
        tokens, token_types = tokens[:keep], token_types[:keep]
        scores = scores[:keep] if scores is not None else None
        metadata["tokenizer_padding"] = padded

    def token_id(key: str):
        return _get(path, kvs, key, GGUFValueType.UINT32, required=False)

    return TokenizerSpec(
        model=model,
        pre=_get(path, kvs, T.PRE, GGUFValueType.STRING, required=False),
        tokens=tokens,
        token_types=token_types,
        merges=_get(path, kvs, T.MERGES, GGUFValueType.ARRAY, [], required=False, elem_type=GGUFValueType.STRING),
        scores=scores,
        bos_token_id=token_id(T.BOS_ID),
        eos_token_id=token_id(T.EOS_ID),
        unk_token_id=token_id(T.UNK_ID),
        pad_token_id=token_id(T.PAD_ID),
        add_bos_token=_get(path, kvs, T.ADD_BOS, GGUFValueType.BOOL, False, required=False),
        add_eos_token=_get(path, kvs, T.ADD_EOS, GGUFValueType.BOOL, False, required=False),
        chat_template=_get(path, kvs, T.CHAT_TEMPLATE, GGUFValueType.STRING, required=False),
        add_space_prefix=_get(path, kvs, T.ADD_PREFIX, GGUFValueType.BOOL, required=False),
    )


def _json_scalar(value, vtype: GGUFValueType):
    if vtype in _FLOAT_TYPES:
        value = float(value)
        if not math.isfinite(value):
            return repr(value)  # JSON has no NaN/Infinity
        return _f32(value) if vtype == GGUFValueType.FLOAT32 else value
    if vtype == GGUFValueType.BOOL:
        return bool(value)
    if isinstance(value, str):
        return value
    return int(value)


def _json_value(header: np.ndarray, kv: _KeyValue):
    if kv.type != GGUFValueType.ARRAY:
        return _json_scalar(kv.value, kv.type)
    if len(kv.value) > _INLINE_ARRAY_LIMIT:
        start, end = kv.value_bytes
        digest = hashlib.sha256(memoryview(header[start:end])).hexdigest()
        return {"type": kv.type_name, "count": len(kv.value), "sha256": digest}
    return [_json_scalar(v, kv.elem_type) for v in kv.value]
