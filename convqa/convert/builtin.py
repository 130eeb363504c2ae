"""The converters between SafeTensors, GGUF and APR, one edge at a time.

Every edge works the same way: open the source as the canonical view, decide per tensor how it
is stored in the target (pass the bytes through, quantize on request, or dequantize because the
target cannot hold the encoding, which is recorded, never silent), and stream the tensors into
the target writer. Format conventions (GGUF dims, llama Q/K permutation, APR's tied lm_head) are
handled by the readers and writers, so this module never touches a layout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convqa import __version__, arch, encodings
from convqa.encodings import QUANT_TARGETS, Encoding
from convqa.errors import ConversionError
from convqa.formats import FORMATS, open_model, write_model
from convqa.formats.filerange import read_file_range
from convqa.model import LazyTensor, ModelArtifact, WritePlan

# Encodings each target format can store.
STORABLE = {
    "safetensors": {"F32", "F16", "BF16", "F64"},
    "gguf": {e.name for e in encodings.ALL if e.ggml_type is not None},
    "apr": {e.name for e in encodings.ALL if e.apr_dtype is not None},
}


@dataclass
class ConversionRecord:
    """What one conversion did; becomes the artifact's sidecar (with hashes and timings added)."""

    source: str
    output: str
    source_format: str
    target_format: str
    quant: str | None
    mutant: str | None
    converter: str = "convqa"
    converter_version: str = __version__
    tensors_written: int = 0
    encodings_written: dict = field(default_factory=dict)
    quantized: list = field(default_factory=list)  # [name, from, to]
    dequantized: list = field(default_factory=list)  # [name, from, to]: target could not hold it
    upcast: list = field(default_factory=list)  # [name, from, "F32"]: lossless, the target's runtime needs F32
    passthrough: int = 0
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def should_quantize(tensor: LazyTensor, target: Encoding) -> bool:
    """llama.cpp's rule: only 2-D `.weight` matrices whose rows split into whole blocks.

    Norms, biases and other 1-D tensors stay F32 because most ggml kernels for them only take
    F32 (convert_hf_to_gguf.py `prepare_tensors`).
    """
    if len(tensor.shape) != 2 or not tensor.name.endswith(".weight") or tensor.name.endswith("norm.weight"):
        return False
    if target.name in ("APR_Q8", "APR_Q4"):
        return True
    return tensor.shape[-1] % target.block_elems == 0


def needs_f32(tensor: LazyTensor, target_format: str) -> bool:
    """Whether the target format's reference runtime only takes this tensor in F32.

    llama.cpp: most ggml kernels that take 1-D tensors or norms (binary ops, rms_norm) have no
    F16/BF16 path for them, and a BF16 norm aborts the process on the first forward pass
    (`binary_op: unsupported types: dst: f32, src0: f32, src1: bf16`). Its converter therefore
    stores every 1-D tensor and every `*_norm.weight` in F32 whatever the output type
    (convert_hf_to_gguf.py `prepare_tensors`). Widening F16/BF16 to F32 is exact, so this is a
    recorded upcast, not a loss; the tensor gates compare values and see no change.
    """
    if target_format != "gguf" or tensor.encoding.name not in ("F16", "BF16"):
        return False
    return gguf_wants_f32(tensor.name, tensor.shape)


def gguf_wants_f32(name: str, shape) -> bool:
    """llama.cpp's convention: 1-D tensors and norms are F32 in a GGUF (F-LAYOUT-003 checks it)."""
    return len(shape) <= 1 or name.endswith("norm.weight")


def reencoded(tensor: LazyTensor, target: Encoding) -> LazyTensor:
    """`tensor` stored in `target`: the bytes of `target.encode(tensor.to_float32())`, made when
    loaded (the reference encoders; convqa.infer.reference_model builds its model with it too)."""

    def load() -> np.ndarray:
        if tensor.stored_in and encodings.transcodes_by_rows(tensor.encoding, tensor.shape, target):
            # Straight from the file a slice of rows at a time: the input tensor is never whole
            # in memory (the 1.5B embedding's BF16 445 MiB, beside its Q8_0 or F32 output).
            row_bytes = tensor.encoding.nbytes((1, tensor.shape[-1]))

            def read_rows(start: int, n: int) -> np.ndarray:
                data = read_file_range(tensor.stored_in, tensor.file_offset + start * row_bytes, n * row_bytes)
                return data.reshape(n, row_bytes)

            return encodings.transcode_rows(read_rows, tensor.encoding, tensor.shape, target)
        return encodings.transcode(tensor.raw(), tensor.encoding, tensor.shape, target)

    return LazyTensor(tensor.name, tensor.shape, target, load)


def plan_tensors(source: ModelArtifact, target_format: str, quant: str | None, record: ConversionRecord) -> list[LazyTensor]:
    """Decide, tensor by tensor, how each is stored in the target. Loads no data."""
    storable = STORABLE[target_format]
    quant_target = None
    if quant:
        if quant not in QUANT_TARGETS:
            raise ConversionError(f"unknown quantization {quant!r}; known: {', '.join(QUANT_TARGETS)}")
        name = QUANT_TARGETS[quant].get(target_format)
        if name is None:
            raise ConversionError(f"{target_format} cannot hold {quant}; known there: "
                                  + ", ".join(q for q, t in QUANT_TARGETS.items() if target_format in t))
        quant_target = encodings.by_name(name)
    planned = []
    for tensor in source:
        enc = tensor.encoding
        if quant_target is not None and should_quantize(tensor, quant_target) and enc != quant_target:
            if enc.is_quantized:
                raise ConversionError(f"{tensor.name} is already {enc.name}; re-quantizing to {quant_target.name} would stack errors")
            planned.append(reencoded(tensor, quant_target))
            record.quantized.append([tensor.name, enc.name, quant_target.name])
        elif needs_f32(tensor, target_format):
            planned.append(reencoded(tensor, encodings.F32))
            record.upcast.append([tensor.name, enc.name, "F32"])
        elif enc.name in storable:
            planned.append(tensor)
            record.passthrough += 1
        else:
            planned.append(reencoded(tensor, encodings.F32))
            record.dequantized.append([tensor.name, enc.name, "F32"])
    return planned


def check_complete(source: ModelArtifact) -> None:
    """Refuse to write a model that lacks tensors its architecture needs.

    llama.cpp loads a qwen2 GGUF without its q/k/v biases silently and computes another model
    (docs/formats.md GGUF 2), so a converter must stop here rather than downstream.
    """
    expected = arch.expected_tensors(source.config)
    missing = [n for n in expected if n not in source.tensors]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"{source.path}: {len(missing)} expected tensors missing: {', '.join(missing[:5])}{more}")
    wrong = [(n, source.tensors[n].shape, s) for n, s in expected.items() if source.tensors[n].shape != s]
    if wrong:
        n, got, want = wrong[0]
        raise ConversionError(f"{source.path}: tensor {n} has shape {list(got)}, config implies {list(want)}")


def build_plan(source: ModelArtifact, target_format: str, quant: str | None, record: ConversionRecord) -> WritePlan:
    tensors = plan_tensors(source, target_format, quant, record)
    provenance = {"converter": "convqa", "converter_version": __version__}
    if record.dequantized:
        provenance["dequantized"] = _count_by_source(record.dequantized)
    if record.quantized:
        provenance["quantized"] = _count_by_source(record.quantized)
    if record.upcast:
        provenance["upcast"] = _count_by_source(record.upcast)
    return WritePlan(config=source.config, tokenizer=source.tokenizer, tensors=tensors, metadata=provenance)


def _count_by_source(rows: list) -> dict:
    counts: dict[str, int] = {}
    for _, src, dst in rows:
        key = f"{src}->{dst}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str | None = None,
    *,
    quant: str | None = None,
    mutant: str | None = None,
) -> ConversionRecord:
    """Convert `src` into `dst` (format from `to`, else from dst's extension). Atomic and streaming."""
    started = time.perf_counter()
    dst = Path(dst)
    target_format = to or _format_from_path(dst)
    if target_format not in FORMATS:
        raise ConversionError(f"unknown target format {target_format!r}; expected one of {', '.join(FORMATS)}")
    with open_model(src) as source:
        record = ConversionRecord(
            source=os.fspath(src), output=os.fspath(dst), source_format=source.format,
            target_format=target_format, quant=quant, mutant=mutant,
        )
        check_complete(source)
        plan = build_plan(source, target_format, quant, record)
        if mutant is not None:
            from convqa.convert.mutants import apply_mutant

            plan, dst = apply_mutant(mutant, plan, source, target_format, Path(src), dst)
            record.output = os.fspath(dst)
        write_model(dst, plan, target_format)
        record.tensors_written = len(plan.tensors)
        for t in plan.tensors:
            record.encodings_written[t.encoding.name] = record.encodings_written.get(t.encoding.name, 0) + 1
    record.wall_s = round(time.perf_counter() - started, 4)
    return record


def _format_from_path(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    if path.suffix == ".apr":
        return "apr"
    if path.suffix in ("", ".safetensors") or path.is_dir():
        return "safetensors"
    raise ConversionError(f"cannot tell the target format from {path}; pass --to gguf|apr|safetensors")


__all__ = ["convert", "ConversionRecord", "STORABLE"]
