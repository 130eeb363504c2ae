"""SafeTensors: HF model directories (config.json + *.safetensors + tokenizer files).

The file header is parsed here rather than through `safetensors.safe_open`, whose numpy
framework cannot represent BF16, and so that every check is explicit. A `.safetensors` file is

    u64 little-endian N | N bytes of JSON header (space padded) | data region

and the header maps tensor names to `{dtype, shape, data_offsets: [begin, end]}`, offsets
relative to the data region, plus an optional `__metadata__` of string -> string. The checks
are those of the reference Rust implementation (`safetensors/src/tensor.rs`: header size limit,
offsets contiguous from 0 with no gap or overlap, byte size = elements x dtype size, data region
exactly covered) plus duplicate-key and type checks. Tensor bytes are read one tensor at a time
into private memory (convqa.formats.filerange), so peak memory tracks the largest tensor.

Tied embeddings: with `tie_word_embeddings` the canonical view has no `lm_head.weight`. A file
that stores one anyway (some exporters do) has it dropped only when it is byte-identical to the
embedding (recorded in metadata["dropped"]); a different one contradicts config.json, because
transformers would silently replace it with the embedding, so that is a FormatError.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convqa import encodings
from convqa.arch.hf_config import config_from_hf, generation_config_from, hf_config_from
from convqa.files import atomic_dir, write_json
from convqa.formats.canonical import EMBEDDING, LM_HEAD, is_tied_copy
from convqa.formats.filerange import read_file_range
from convqa.errors import ConversionError, FormatError
from convqa.formats.hf_tokenizer import load_json_object, tokenizer_from_hf_dir, write_hf_tokenizer
from convqa.model import LazyTensor, ModelArtifact, WritePlan

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # safetensors' MAX_HEADER_SIZE
HEADER_ALIGNMENT = 8  # the reference writer pads the JSON with spaces to this multiple
METADATA_KEY = "__metadata__"
TENSOR_KEYS = {"dtype", "shape", "data_offsets"}
# Default shard size: below HF's 5 GB default, so shards stay easy to move around.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# Dtypes a weight may have; the rest of safetensors' dtypes exist but no model we carry uses them.
DTYPES = {"F32": encodings.F32, "F16": encodings.F16, "BF16": encodings.BF16, "F64": encodings.F64}
DTYPE_OF_ENCODING = {enc.name: dtype for dtype, enc in DTYPES.items()}
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
OTHER_SAFETENSORS_DTYPES = {
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64",
}  # fmt: skip
# Buffers transformers recomputes and ignores on load; old llama checkpoints store them.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the data region
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # absolute offset of the data region
    entries: tuple[TensorEntry, ...]  # in data order
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a .safetensors header without touching the data region."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(HEADER_LENGTH_BYTES)
            if len(prefix) < HEADER_LENGTH_BYTES:
                raise FormatError(
                    path, f"truncated: {size} bytes, the header length alone needs {HEADER_LENGTH_BYTES}", field="header_length", offset=0
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len < 2 or header_len > MAX_HEADER_BYTES:
                raise FormatError(path, f"header length {header_len} outside 2..{MAX_HEADER_BYTES}", field="header_length", offset=0)
            if HEADER_LENGTH_BYTES + header_len > size:
                raise FormatError(
                    path, f"header length {header_len} runs past the end of the {size}-byte file", field="header_length", offset=0
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror}") from exc

    data_start = HEADER_LENGTH_BYTES + header_len
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"header is not UTF-8: {exc.reason}", field="header", offset=HEADER_LENGTH_BYTES + exc.start) from exc
    if not text.startswith("{"):
        raise FormatError(path, "header does not start with '{'", field="header", offset=HEADER_LENGTH_BYTES)
    try:
        header = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise FormatError(path, f"header is not valid JSON: {exc.msg}", field="header", offset=HEADER_LENGTH_BYTES + exc.pos) from exc
    except _DuplicateKey as exc:
        raise FormatError(path, f"header has the key {exc.args[0]!r} twice", field="header", offset=HEADER_LENGTH_BYTES) from None
    if not isinstance(header, dict):
        raise FormatError(path, "header must be a JSON object", field="header", offset=HEADER_LENGTH_BYTES)

    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(path, "__metadata__ must map strings to strings", field=METADATA_KEY, offset=HEADER_LENGTH_BYTES)

    entries = sorted((_entry(path, name, info) for name, info in header.items()), key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:
        if entry.begin != position:
            what = "overlaps the previous tensor" if entry.begin < position else f"leaves a gap after offset {position}"
            raise FormatError(
                path,
                f"tensor {entry.name!r} starts at {entry.begin} and {what}",
                field=f"{entry.name}.data_offsets",
                offset=data_start + entry.begin,
            )
        position = entry.end
    data_len = size - data_start
    if position != data_len:
        raise FormatError(
            path,
            f"tensors cover {position} bytes of a {data_len}-byte data region"
            + (" (truncated file)" if position > data_len else " (trailing bytes)"),
            field="data_offsets",
            offset=data_start + min(position, data_len),
        )
    return SafetensorsHeader(path, data_start, tuple(entries), dict(metadata))


def read_safetensors(path: str | os.PathLike) -> ModelArtifact:
    """Open an HF model directory, its index.json, or a lone .safetensors beside config.json."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FormatError(directory, f"no {CONFIG_FILE}; a SafeTensors model needs its HF config", field=CONFIG_FILE)
    hf_config = load_json_object(config_path)
    config = config_from_hf(hf_config, config_path)

    shard_files, weight_map = _shards(path, directory)
    headers = [read_header(shard) for shard in shard_files]
    tensors: dict[str, LazyTensor] = {}
    dropped: list[dict] = []
    seen_in: dict[str, Path] = {}
    for header in headers:
        for entry in header.entries:
            if entry.name in seen_in:
                raise FormatError(header.path, f"tensor {entry.name!r} is also in {seen_in[entry.name].name}", field=entry.name)
            seen_in[entry.name] = header.path
            if weight_map is not None and weight_map.get(entry.name) != header.path.name:
                raise FormatError(header.path, f"tensor {entry.name!r} is not listed for this file in {INDEX_FILE}", field=entry.name)
            if entry.name.endswith(IGNORED_SUFFIXES):
                dropped.append({"name": entry.name, "reason": "recomputed buffer transformers ignores"})
                continue
            tensors[entry.name] = LazyTensor(
                name=entry.name,
                shape=entry.shape,
                encoding=DTYPES[entry.dtype],
                load_raw=_range_loader(header, entry),
                stored_name=entry.name,
                stored_shape=entry.shape,
                file_offset=header.data_start + entry.begin,
                stored_in=os.fspath(header.path),
            )
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(seen_in))
        if missing:
            raise FormatError(
                directory / INDEX_FILE,
                f"{len(missing)} indexed tensors are in no shard, first {missing[0]!r} (listed in {weight_map[missing[0]]})",
                field="weight_map",
            )

    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        _drop_tied_head(tensors, dropped, seen_in["lm_head.weight"])

    metadata = {
        "hf_config": hf_config,
        "shards": [shard.name for shard in shard_files],
        "safetensors_metadata": headers[0].metadata if headers else {},
    }
    provenance = metadata["safetensors_metadata"].get("convqa.provenance")
    if provenance is not None:
        try:
            metadata["provenance"] = json.loads(provenance)
        except json.JSONDecodeError as exc:
            raise FormatError(shard_files[0], f"convqa.provenance is not JSON: {exc.msg}", field="__metadata__.convqa.provenance") from exc
    if dropped:
        metadata["dropped"] = dropped
    return ModelArtifact(
        path=os.fspath(path),
        format="safetensors",
        config=config,
        tokenizer=tokenizer_from_hf_dir(directory),
        tensors=tensors,
        metadata=metadata,
    )


def write_safetensors(path: str | os.PathLike, plan: WritePlan, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write an HF model directory at `path`, atomically, one tensor in memory at a time.

    Tensors go to model.safetensors, or to model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json once their total exceeds `max_shard_bytes` (a tensor larger
    than that gets a shard of its own). Quantized encodings are refused: dequantizing is the
    converter's decision, recorded there, never a silent step of this writer.
    """
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    entries = []
    for tensor in plan.tensors:
        dtype = DTYPE_OF_ENCODING.get(tensor.encoding.name)
        if dtype is None:
            raise ConversionError(
                f"{tensor.name}: SafeTensors cannot hold {tensor.encoding.name}; dequantize it first (allowed: {', '.join(DTYPES)})"
            )
        entries.append((tensor, dtype, tensor.encoding.nbytes(tensor.shape)))
    if len({tensor.name for tensor, _, _ in entries}) != len(entries):
        raise ConversionError("the plan lists a tensor name twice")
    shards = _split_into_shards(entries, max_shard_bytes)
    # Mixed encodings load as float32 (nothing is lost); a single one loads as itself.
    dtypes = {dtype for _, dtype, _ in entries}
    torch_dtype = TORCH_DTYPE_NAMES[dtypes.pop()] if len(dtypes) == 1 else "float32"
    file_metadata = {"format": "pt", "convqa.provenance": json.dumps(plan.metadata, sort_keys=True, separators=(",", ":"))}

    with atomic_dir(path) as tmp:
        write_json(tmp / CONFIG_FILE, hf_config_from(plan.config, plan.tokenizer, dtype=torch_dtype), sort_keys=False, ensure_ascii=False)
        write_json(tmp / GENERATION_CONFIG_FILE, generation_config_from(plan.tokenizer), sort_keys=False, ensure_ascii=False)
        if plan.tokenizer is not None:
            write_hf_tokenizer(
                tmp, plan.tokenizer, model_max_length=plan.config.max_position_embeddings, architecture=plan.config.architecture
            )
        if len(shards) == 1:
            _write_file(tmp / SINGLE_FILE, shards[0], file_metadata)
            return
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            _write_file(tmp / name, shard, file_metadata)
        index = {
            "metadata": {"total_size": sum(nbytes for _, _, nbytes in entries)},
            "weight_map": {tensor.name: name for name, shard in zip(names, shards) for tensor, _, _ in shard},
        }
        write_json(tmp / INDEX_FILE, index, sort_keys=False, ensure_ascii=False)


def _write_file(path: Path, entries: list, metadata: dict[str, str]) -> None:
    header: dict = {METADATA_KEY: metadata}
    offset = 0
    for tensor, dtype, nbytes in entries:
        header[tensor.name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for tensor, _, nbytes in entries:
            data = tensor.raw()
            if data.nbytes != nbytes:
                raise ConversionError(
                    f"{tensor.name}: {data.nbytes} bytes for {tensor.encoding.name} {list(tensor.shape)}, expected {nbytes}"
                )
            fh.write(memoryview(data))
        fh.flush()
        os.fsync(fh.fileno())


def _split_into_shards(entries: list, max_shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[2] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[2]
    return shards


def _shards(path: Path, directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The .safetensors files to read and, for a sharded model, the index's weight map."""
    if path.is_file() and path.suffix == ".safetensors":
        return [path], None
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = load_json_object(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(index_path, "weight_map must be a non-empty object of tensor -> file", field="weight_map")
        for name, file_name in weight_map.items():
            # Plain file names only: an index must not point outside its directory.
            if not isinstance(file_name, str) or Path(file_name).name != file_name or not file_name.endswith(".safetensors"):
                raise FormatError(
                    index_path,
                    f"tensor {name!r} maps to {file_name!r}, not a .safetensors file in this directory",
                    field=f"weight_map.{name}",
                )
            if not (directory / file_name).is_file():
                raise FormatError(index_path, f"shard {file_name!r} (for {name!r}) does not exist", field=f"weight_map.{name}")
        return [directory / name for name in sorted(set(weight_map.values()))], weight_map
    if path.is_file():
        raise FormatError(path, "expected a model directory, a .safetensors file or model.safetensors.index.json")
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE], None
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found, None
    if not found:
        raise FormatError(directory, "no .safetensors file in the model directory")
    raise FormatError(directory, f"{len(found)} .safetensors files but no {INDEX_FILE} to say which tensors they hold")


def _entry(path: Path, name: str, info) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != TENSOR_KEYS:
        raise FormatError(path, f"tensor {name!r} must have exactly dtype, shape and data_offsets, got {info!r}", field=name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        known = "a safetensors dtype no weight of a carried model uses" if dtype in OTHER_SAFETENSORS_DTYPES else "not a safetensors dtype"
        raise FormatError(path, f"tensor {name!r} has dtype {dtype!r}: {known}; expected one of {', '.join(DTYPES)}", field=f"{name}.dtype")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatError(path, f"tensor {name!r} has invalid shape {shape!r}", field=f"{name}.shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets) or offsets[0] > offsets[1]:
        raise FormatError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}", field=f"{name}.data_offsets")
    expected = math.prod(shape) * DTYPES[dtype].block_bytes
    if offsets[1] - offsets[0] != expected:
        raise FormatError(
            path,
            f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs {expected}",
            field=f"{name}.data_offsets",
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _range_loader(header: SafetensorsHeader, entry: TensorEntry):
    def load_raw() -> np.ndarray:
        return read_file_range(header.path, header.data_start + entry.begin, entry.end - entry.begin)

    return load_raw


def _drop_tied_head(tensors: dict[str, LazyTensor], dropped: list[dict], file: Path) -> None:
    if not is_tied_copy(tensors[LM_HEAD], tensors.get(EMBEDDING)):
        raise FormatError(
            file,
            "config.json says tie_word_embeddings but lm_head.weight differs from model.embed_tokens.weight; "
            "transformers would silently use the embedding",
            field="lm_head.weight",
        )
    del tensors["lm_head.weight"]
    dropped.append({"name": "lm_head.weight", "reason": "tied: byte-identical to model.embed_tokens.weight"})


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out
