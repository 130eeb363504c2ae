"""How much memory an inference job needs, before it loads anything, and whether it fits.

A model that does not fit must become a `skipped` verdict that says what it needs and what there
is, not a job the kernel's OOM killer ends with no record (a 7B model under transformers needs
~30 GB in F32). `bytes_needed(artifact, engine)` estimates the peak resident memory of one engine
process over one artifact from the artifact's header alone (tensor shapes and encodings: nothing
is dequantized), and `fits` compares it with what the host (or the job's `mem_mb`) offers.
The estimate is in bytes of host memory; a device-memory check (the gpu backend) can reuse
`bytes_needed` for the weights and compare with the device's free memory instead.

What each engine holds at its peak (measured on SmolLM2-135M and a 1.5B BF16 geometry; see
bench/scale.py and tests/test_memory.py). transformers holds the model in its weights dtype
(convqa.infer.weights_dtype: the source's; bfloat16 for BF16, float16 for F16, else float32) and
computes in float32 a slice of one matrix at a time (convqa.infer.float32_compute: a few MB,
not counted apart; an F16 1.5B run measured 3628 MB against an estimate of 4037 MB):
- transformers, SafeTensors: the model in the weights dtype, plus the file mapped while it is
  upcast when it is stored narrower than that (a file in the weights dtype is loaded in place);
- transformers, GGUF: transformers' GGUF loader dequantizes every tensor and keeps the whole
  state dict in the weights dtype before the model takes it over, while the file is mapped;
- transformers, APR (convqa's loader): the model in the weights dtype plus one tensor's stored
  bytes and one slice of it decoded;
- llama.cpp: the file mapped (weights stay in their encoding), the F32 KV cache and the logits of
  every position (`logits_all`);
plus, for every engine, the logits of a full context and the interpreter with its libraries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from convqa.files import path_size
from convqa.infer.weights_dtype import BYTES_PER_ELEMENT, weights_dtype_of

MIB = 2**20
F32 = 4
# Interpreter, torch/transformers or llama-cpp-python and the tokenizer, resident before any
# weight is loaded (measured RSS of an engine process over a 3 MB model: ~550 MB and ~180 MB).
RUNTIME_BYTES = {"transformers": 500 * MIB, "llama.cpp": 300 * MIB}
# Copies of one context's logits alive at once (the model output and its NumPy copy).
LOGIT_COPIES = 2
DEFAULT_CONTEXT = 512  # the engines' max_context (convqa.infer.engines.base)
# The reference model's job beyond the source's run: measured 4526 MB against 3503 MB on the 1.5B
# BF16 geometry (a Q8_0 reference): 2.3x its largest tensor's stored bytes (445 MiB), with a margin.
REFERENCE_EXTRA_TENSORS = 2.5
# Elements convqa's APR loader (transformers_engine.model_from_artifact) decodes at a time: an F32
# temporary of a whole 151936 x 1536 embedding would be 0.9 GB on top of a BF16 model.
COPY_CHUNK_ELEMENTS = 16 << 20

ENGINES = tuple(RUNTIME_BYTES)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from an artifact: read from its header, no tensor data."""

    file_bytes: int
    parameters: int  # elements over all stored tensors
    largest_tensor: int  # elements of the largest tensor
    vocab_size: int
    num_layers: int
    kv_width: int  # num_kv_heads * head_dim
    format: str
    largest_tensor_bytes: int = 0  # stored bytes of the largest tensor
    first_tensor: int = 0  # elements of the first tensor in file order (a GGUF's token_embd)
    largest_after_first: int = 0  # elements of the largest tensor after it
    weights_dtype: str = "float32"  # the artifact's own (convqa.infer.weights_dtype); a run takes its source's


def artifact_shape(path: str | os.PathLike) -> Shape:
    """The artifact's sizes from its header. Raises FormatError for an unreadable artifact."""
    from convqa.formats import open_model

    with open_model(path) as artifact:
        counts = [_elements(t.shape) for t in artifact.tensors.values()]
        stored = [t.nbytes for t in artifact.tensors.values()]
        config = artifact.config
        return Shape(
            file_bytes=path_size(path),
            parameters=sum(counts),
            largest_tensor=max(counts, default=0),
            vocab_size=config.vocab_size,
            num_layers=config.num_layers,
            kv_width=config.num_kv_heads * config.head_dim,
            format=artifact.format,
            largest_tensor_bytes=max(stored, default=0),
            first_tensor=counts[0] if counts else 0,
            largest_after_first=max(counts[1:], default=0),
            weights_dtype=weights_dtype_of(artifact),
        )


def shape_from_source(source: str | os.PathLike, artifact_format: str, file_bytes: int) -> Shape:
    """The shape of an artifact converted from `source` whose file is not on disk (deleted after
    use, and restored inside the job that needs it: convqa.workflow.intermediates), from the
    source's header and the artifact's format and size as its sidecar recorded them.

    A conversion keeps every tensor's shape, so the geometry is the source's; what changes is
    the bytes (scaled by the file's size), the tensor order (GGUF writes the token embedding,
    the largest tensor, first) and, in APR, a tied embedding stored a second time as lm_head.
    Raises FormatError when the source cannot be read."""
    from convqa.formats import open_model

    with open_model(source) as model:
        counts = sorted((_elements(t.shape) for t in model.tensors.values()), reverse=True)
        stored = max((t.nbytes for t in model.tensors.values()), default=0)
        config, source_bytes = model.config, path_size(source)
        own_dtype = weights_dtype_of(model)
    largest = counts[0] if counts else 0
    parameters = sum(counts)
    if artifact_format == "apr" and config.tie_word_embeddings:
        parameters += largest
    return Shape(
        file_bytes=file_bytes,
        parameters=parameters,
        largest_tensor=largest,
        vocab_size=config.vocab_size,
        num_layers=config.num_layers,
        kv_width=config.num_kv_heads * config.head_dim,
        format=artifact_format,
        largest_tensor_bytes=int(stored * file_bytes / source_bytes) if source_bytes else stored,
        first_tensor=largest,
        largest_after_first=counts[1] if len(counts) > 1 else 0,
        weights_dtype=own_dtype,
    )


def _elements(shape) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n


def shape_bytes_needed(shape: Shape, engine: str, context: int = DEFAULT_CONTEXT, weights_dtype: str | None = None) -> int:
    """Estimated peak RSS of `engine` over an artifact of this shape (see the module doc).
    `weights_dtype`: what transformers builds the model in (a run passes its source's,
    convqa.infer.weights_dtype); None takes the artifact's own."""
    if engine not in RUNTIME_BYTES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    logits = LOGIT_COPIES * context * shape.vocab_size * F32
    if engine == "llama.cpp":
        kv_cache = 2 * context * shape.num_layers * shape.kv_width * F32
        return shape.file_bytes + kv_cache + logits + RUNTIME_BYTES[engine]
    element = BYTES_PER_ELEMENT[weights_dtype or shape.weights_dtype]
    model = shape.parameters * element
    if shape.format == "gguf":
        # Tensor by tensor, in file order: gguf-py's F32 dequantization, the loader's F32 copy of it
        # and its cast, beside the state dict built so far, which the model then takes over without
        # a copy (the file's mapped pages are dropped per tensor,
        # transformers_engine.mapped_pages_dropped_per_tensor). The first tensor (the embedding)
        # meets an empty state dict.
        per_element = 2 * F32 + element
        loading = max(shape.first_tensor * per_element - model, shape.largest_after_first * per_element)
    elif shape.format == "safetensors":
        # A file stored in the weights dtype is used in place (its mapped pages are the model);
        # one in another dtype (narrower, or an F32 round trip of a BF16 model) stays mapped while cast.
        loading = 0 if abs(shape.file_bytes - model) <= 0.05 * model else shape.file_bytes
    else:
        # convqa's loader: one tensor's stored bytes, and one slice of it decoded to F32.
        loading = shape.largest_tensor_bytes + min(shape.largest_tensor, COPY_CHUNK_ELEMENTS) * F32
    return model + loading + logits + RUNTIME_BYTES[engine]


def bytes_needed(artifact_path: str | os.PathLike, engine: str, context: int = DEFAULT_CONTEXT,
                 weights_dtype: str | None = None, reference: bool = False) -> int:
    """Estimated peak resident bytes of `engine` ("transformers" or "llama.cpp") running the
    artifact at `artifact_path` in `weights_dtype` (None: the artifact's own). `reference`: the
    reference-quantized model built from this source (convqa.infer.reference_model), which also
    holds a tensor's source bytes and its re-encoding while it is loaded. Raises FormatError when
    the artifact cannot be read."""
    shape = artifact_shape(artifact_path)
    extra = REFERENCE_EXTRA_TENSORS * shape.largest_tensor_bytes if reference else 0
    return shape_bytes_needed(shape, engine, context, weights_dtype) + extra


def source_weights_dtype(source: str | os.PathLike | None) -> str | None:
    """The weights dtype a run of `source`'s artifacts takes, None when it cannot be read (the
    estimate then falls back to the artifact's own)."""
    if source is None:
        return None
    from convqa.infer.weights_dtype import weights_dtype_for

    try:
        return weights_dtype_for(source)
    except Exception:  # not there yet (DAG evaluation) or unreadable: the artifact decides
        return None


def host_memory_bytes() -> int | None:
    """The memory this host (or the cgroup the job runs in, where it sets a limit) holds in all,
    None where unknown. Total, not currently free: a verdict must not depend on what other jobs
    happen to hold at the moment (Snakemake's `mem_mb` accounting keeps jobs from overcommitting)."""
    limits = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(cgroup).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            limits.append(int(text))
    return min(limits) if limits else None


def available_bytes(mem_mb: float | None = None) -> tuple[int | None, str]:
    """(bytes the job may use, where that limit comes from): the host's memory, or the job's
    `mem_mb` where that is smaller."""
    limits = []
    host = host_memory_bytes()
    if host is not None:
        limits.append((host, "on this machine"))
    if mem_mb:
        limits.append((int(mem_mb * MIB), "in the job's mem_mb"))
    if not limits:
        return None, "unknown"
    return min(limits)


def too_big(artifact_path: str | os.PathLike, engine: str, mem_mb: float | None = None,
            context: int = DEFAULT_CONTEXT, source: str | os.PathLike | None = None,
            reference: bool = False) -> str | None:
    """The `skipped` reason when the estimate exceeds what the job may use; None when it fits
    or cannot be told (an unreadable artifact: the run itself reports that). `source`: the
    model's ground truth, whose weights dtype the run takes."""
    try:
        needed = bytes_needed(artifact_path, engine, context, source_weights_dtype(source), reference)
    except Exception:  # unreadable (FormatError) or odd: not judged here, the run reports why
        return None
    limit, source = available_bytes(mem_mb)
    if limit is None or needed <= limit:
        return None
    return (f"too big for this machine: {engine} needs about {needed / MIB:,.0f} MB for this artifact "
            f"(estimate, convqa.infer.memory), {limit / MIB:,.0f} MB {source}")


def job_mem_mb(artifact_path: str | os.PathLike, engine: str, attempt: int = 1,
               source: str | os.PathLike | None = None, reference: bool = False,
               recorded: tuple[str, int] | None = None) -> int:
    """The `mem_mb` resource of an inference job: the estimate plus 10%, doubled on a retry.
    `source` as in too_big. `recorded`: the artifact's (format, bytes) as its sidecar has them,
    for an artifact deleted after use: its estimate then comes from the source's geometry
    (shape_from_source). 2000 MB where neither can be read (a dry run before the source exists)."""
    weights_dtype = source_weights_dtype(source)
    try:
        needed = bytes_needed(artifact_path, engine, weights_dtype=weights_dtype, reference=reference)
    except Exception:  # not there yet (DAG evaluation) or unreadable: a resource never fails the DAG
        needed = None
        if recorded and recorded[1] and source is not None and not os.path.exists(artifact_path):
            try:
                needed = shape_bytes_needed(shape_from_source(source, *recorded), engine, weights_dtype=weights_dtype)
            except Exception:
                needed = None
        if needed is None:
            return 2000 * attempt
    return int(needed * 1.1 / MIB * attempt) + 1
