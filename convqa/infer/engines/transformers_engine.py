"""The transformers (PyTorch) engine, for all three formats.

- SafeTensors: `AutoModelForCausalLM.from_pretrained(dir)`, the ground truth path.
- GGUF: transformers' own GGUF loader (`from_pretrained(dir, gguf_file=name)`), which dequantizes
  every tensor with gguf-py; an independent reader of the file.
- APR (or any artifact convqa can open): `model_from_artifact`, which builds the same model class
  from the artifact's config and loads its tensors one by one, strictly.

Every loader holds the model's weights in one dtype (convqa.infer.weights_dtype: the ground
truth's: bfloat16 for a BF16 checkpoint, float16 for an F16 one, else float32) and every forward
pass computes in float32 (convqa.infer.float32_compute for 16-bit-held weights), with eager
attention and fixed threads/seeds, so a lossless artifact gives logits bit-identical to the
SafeTensors ground truth, those logits are the float32 model's, and no loader holds an F32 copy
of a 16-bit model.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from convqa.infer.weights_dtype import FLOAT32, WEIGHTS_DTYPES, weights_dtype_for
from convqa.infer.engines.base import Engine
from convqa.infer.memory import COPY_CHUNK_ELEMENTS
from convqa.errors import FormatError
from convqa.formats import detect_format, open_model
from convqa.model import ModelArtifact

SEED = 0
# Eager attention is the plainest kernel path; every loader below uses it so they stay comparable.
ATTN_IMPLEMENTATION = "eager"
TIED_HEAD = "lm_head.weight"
# Encodings whose rows can be decoded independently (a row is whole blocks along the last axis);
# APR's int8/int4 carry one header for the whole tensor.
_ROW_DECODABLE = {"F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def _torch():
    import torch

    return torch


def configure_determinism(threads: int) -> None:
    """Fixed seed and thread count, deterministic kernels, no TF32 (it silently drops mantissa bits)."""
    # cuBLAS needs this set before its first use to run deterministically.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch = _torch()
    torch.manual_seed(SEED)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def torch_dtype(name: str):
    """The torch dtype of a weights dtype name (convqa.infer.weights_dtype)."""
    if name not in WEIGHTS_DTYPES:
        raise ValueError(f"unknown weights dtype {name!r}; expected one of {', '.join(WEIGHTS_DTYPES)}")
    return getattr(_torch(), name)


def model_from_artifact(artifact: ModelArtifact, hf_config: dict | None = None, dtype: str = "float32"):
    """The HF model class for `artifact`, holding the artifact's tensors in `dtype` (a weights
    dtype name: float32, bfloat16 or float16).

    `hf_config` is the config.json dict to build the model from; by default it is derived from
    the artifact's own config and tokenizer (`convqa.arch.hf_config.hf_config_from`). Loading is
    strict: every parameter the model expects must be present with its exact shape, and no
    tensor may be left over. Tied embeddings: the artifact has no `lm_head.weight`, and the model's
    head must share the embedding's storage. Each value is decoded to float32 (a BF16 tensor into a
    bfloat16 model: its bits, as stored) and cast to `dtype` with torch's rounding (to nearest
    even), in slices of rows, so the peak is the model plus one slice.
    """
    torch = _torch()
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    if hf_config is None:
        from convqa.arch.hf_config import hf_config_from

        hf_config = hf_config_from(artifact.config, artifact.tokenizer)
    settings = dict(hf_config)
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    config._attn_implementation = ATTN_IMPLEMENTATION
    # Weights are overwritten right below; random initialisation would only cost time.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))

    targets = model.state_dict()  # views sharing storage with the parameters
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        targets.pop(TIED_HEAD, None)
    values_of = _fused_experts({name: t.to_float32 for name, t in artifact.tensors.items()}, artifact.config)
    missing = sorted(set(targets) - set(values_of))
    unexpected = sorted(set(values_of) - set(targets))
    if missing or unexpected:
        raise FormatError(
            artifact.path,
            f"tensors do not match {type(model).__name__}: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})",
            field="tensors",
        )
    with torch.no_grad():
        for name, load in values_of.items():
            target = targets[name]
            tensor = artifact.tensors.get(name)
            if tensor is not None and tuple(target.shape) != tensor.shape:
                raise FormatError(
                    artifact.path,
                    f"tensor {name} has shape {list(tensor.shape)}, {type(model).__name__} expects {list(target.shape)}",
                    field=name,
                    offset=tensor.file_offset if tensor.file_offset >= 0 else None,
                )
            if tensor is not None and load == tensor.to_float32:  # a plain tensor, not fused experts
                _copy_tensor(target, tensor)
                continue
            values = np.require(load(), dtype=np.float32, requirements=["C", "W"])
            if tuple(target.shape) != values.shape:
                raise FormatError(artifact.path, f"{name}: experts give {list(values.shape)}, {type(model).__name__} expects {list(target.shape)}", field=name)
            target.copy_(torch.from_numpy(values))
            del values
    if tied:
        head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if head.data_ptr() != embedding.data_ptr():
            model.get_output_embeddings().weight = embedding
    return model.eval()


def _copy_tensor(target, tensor) -> None:
    """`tensor` (a LazyTensor of the target's shape) into the model parameter `target`."""
    torch = _torch()
    raw = tensor.raw()
    if tensor.encoding.name == "BF16" and target.dtype == torch.bfloat16:  # the stored bits are the value
        target.copy_(torch.from_numpy(raw.view(np.int16).reshape(tensor.shape)).view(torch.bfloat16))
        return
    rows = tensor.shape[0] if len(tensor.shape) >= 2 and tensor.encoding.name in _ROW_DECODABLE else 1
    per_row = tensor.n_elements // max(1, rows)
    step = max(1, COPY_CHUNK_ELEMENTS // max(1, per_row))
    if rows <= step:
        target.copy_(torch.from_numpy(np.require(tensor.to_float32(), dtype=np.float32, requirements=["C", "W"])))
        return
    stored = raw.reshape(rows, -1)
    for start in range(0, rows, step):
        part = stored[start:start + step]
        values = tensor.encoding.decode(part, (part.shape[0], *tensor.shape[1:]))
        target[start:start + step].copy_(torch.from_numpy(np.require(values, dtype=np.float32, requirements=["C", "W"])))


def _fused_experts(loads: dict, config) -> dict:
    """`loads` (canonical name -> float32 loader) keyed as transformers 5.23's MoE modules hold
    them in memory: per layer one `mlp.experts.gate_up_proj` [E, 2*ff, H] (each expert's gate
    rows, then its up rows) and one `mlp.experts.down_proj` [E, H, ff], expert e at index e.
    (from_pretrained makes the same fusion from a checkpoint's per-expert tensors.)"""
    from convqa.arch import registry

    arch = registry.declared(config.architecture)
    if not arch.expert_roles:
        return loads
    n_expert = int(config.params["num_experts"])
    out = {name: load for name, load in loads.items() if registry.expert_of(arch, name) is None}
    for layer in range(config.num_layers):
        def part(e, suffix, layer=layer):
            return loads[registry.expert_name(layer, e, suffix)]()

        if all(registry.expert_name(layer, e, s) in loads for e in range(n_expert) for s in arch.expert_roles):
            prefix = f"model.layers.{layer}.{registry.EXPERT_PREFIX}"
            out[prefix + "gate_up_proj"] = lambda part=part: np.stack(
                [np.concatenate([part(e, "gate_proj.weight"), part(e, "up_proj.weight")]) for e in range(n_expert)])
            out[prefix + "down_proj"] = lambda part=part: np.stack([part(e, "down_proj.weight") for e in range(n_expert)])
        else:  # leave them as they are: the strict name check reports what is missing
            out |= {n: l for n, l in loads.items() if (f := registry.expert_of(arch, n)) and f[0] == layer}
    return out


@contextmanager
def mapped_pages_dropped_per_tensor():
    """transformers' GGUF loader reads every tensor through gguf-py's memory map of the whole file
    (`GGUFReader`), and mapped pages count toward the process's RSS for as long as the map lives:
    by the last tensor the whole file is resident beside the model built from it (a BF16 GGUF of
    3.1 GB: 3.1 GB more at the peak). While this is active, each `gguf.dequantize` call (the
    loader's per-tensor read) first drops the pages this process holds of the map it reads from
    (MADV_DONTNEED; the map is read-only, so a page read again faults back in from the page
    cache): at most about one tensor's pages stay resident. The loader itself is unchanged."""
    import gguf

    original = gguf.dequantize

    def dequantize(data, qtype):
        _drop_resident_pages(data)
        return original(data, qtype)

    gguf.dequantize = dequantize
    try:
        yield
    finally:
        gguf.dequantize = original


@contextmanager
def gguf_loader_work_shared():
    """transformers' GGUF loader repeats work that gives the same answer every time; while this
    is active, gguf-py answers each repeat from the first answer. Same inputs, same objects out:
    what the loader builds is unchanged, only how often it is built.

    - `GGUFReader(path)` is built twice per load (once for the config, once for the weights),
      and each build parses every metadata field element by element: 5.6 s for SmolLM2's
      49152-token vocabulary on this machine. One reader per file (its path, size and mtime)
      serves both; a reader is a read-only view of the file.
    - `get_tensor_name_map(arch, n_blocks)` is called once per module of the model while the
      loader walks it (405 times for a 30-layer model, 7 s here): the map depends on its two
      arguments only, and the loader only looks names up in it.
    """
    import functools

    import gguf

    original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def shared_reader(path, mode="r"):
        try:
            stat = os.stat(path)
        except (OSError, TypeError, ValueError):  # let the real reader raise its own error
            return original_reader(path, mode)
        key = (os.fspath(path), mode, stat.st_size, stat.st_mtime_ns)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map
        readers.clear()


def _drop_resident_pages(array) -> None:
    """MADV_DONTNEED on the whole memory map `array` views (a numpy memmap), if it is one."""
    import mmap

    mapping = getattr(array, "_mmap", None)
    while mapping is None and getattr(array, "base", None) is not None:
        array = array.base
        mapping = getattr(array, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map or a kernel that refuses: only memory is at stake
            pass


def capture_points(model) -> list[tuple[dict, object]]:
    """(point, module) pairs to hook: the input embedding; per decoder layer every direct child
    module (its norms, self_attn, mlp: the model's own names, so any architecture's sub-layers
    come out as it calls them) and the layer itself (its output, the residual stream); the final
    norm. A point is {"module": qualified name, "layer": index or None, "sublayer": name}."""
    names = {id(module): name for name, module in model.named_modules()}
    base = model.base_model
    pairs = [({"module": names[id(model.get_input_embeddings())], "layer": None, "sublayer": "embedding"},
              model.get_input_embeddings())]
    for index, layer in enumerate(getattr(base, "layers", None) or []):
        for child_name, child in layer.named_children():
            pairs.append(({"module": names[id(child)], "layer": index, "sublayer": child_name}, child))
        pairs.append(({"module": names[id(layer)], "layer": index, "sublayer": "output"}, layer))
    norm = getattr(base, "norm", None)
    if norm is not None:
        pairs.append(({"module": names[id(norm)], "layer": None, "sublayer": "final norm"}, norm))
    return pairs


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, backend: str = "cpu", threads: int = 2, max_context: int = 512, weights_dtype: str | None = None):
        """`weights_dtype` (convqa.infer.weights_dtype): the dtype the model's weights are held in
        (it always computes in float32); None takes it from the artifact being loaded (a run pins
        its source's, so that every artifact of a model is held like its ground truth)."""
        super().__init__(backend=backend, threads=threads, max_context=max_context)
        if weights_dtype is not None:
            torch_dtype(weights_dtype)  # an unknown name fails here, not at load
        self.model = None
        self.device = "cuda" if backend == "gpu" else "cpu"
        self.weights_dtype = weights_dtype

    @classmethod
    def capability(cls, backend: str) -> tuple[bool, str]:
        try:
            torch = _torch()
        except ImportError:
            return False, "torch not installed"
        if backend == "gpu" and not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""

    def _load(self, artifact_path: str) -> None:
        from transformers import AutoModelForCausalLM

        configure_determinism(self.threads)
        path = Path(artifact_path)
        fmt = detect_format(path)
        if self.weights_dtype is None:
            self.weights_dtype = weights_dtype_for(path)
        dtype = torch_dtype(self.weights_dtype)
        if fmt == "safetensors":
            model_dir = path if path.is_dir() else path.parent
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
            )
        elif fmt == "gguf":
            with mapped_pages_dropped_per_tensor(), gguf_loader_work_shared():
                model = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
                )
        else:
            with open_model(path) as artifact:
                model = model_from_artifact(artifact, dtype=self.weights_dtype)
        self._hold(model)

    def _hold(self, model) -> None:
        """Keep `model` for the forward passes: on the device, in eval mode, its 16-bit norms and
        biases upcast for float32 compute (convqa.infer.float32_compute)."""
        from convqa.infer.float32_compute import hold_for_float32_compute

        self.model = model.to(self.device).eval()
        hold_for_float32_compute(self.model)

    def _forward(self, ids: list[int], **kwargs):
        """One forward pass of the model over `ids`, computed in float32."""
        from convqa.infer.float32_compute import float32_compute

        with float32_compute(self.weights_dtype != FLOAT32):
            return self.model(input_ids=self._input(ids), **kwargs)

    def load_artifact(self, artifact: ModelArtifact) -> "TransformersEngine":
        """Load an open artifact, which may live only in memory (convqa.infer.reference_model)."""
        from convqa.infer.weights_dtype import weights_dtype_of

        start = time.perf_counter()
        configure_determinism(self.threads)
        if self.weights_dtype is None:
            self.weights_dtype = weights_dtype_of(artifact)
        self._hold(model_from_artifact(artifact, dtype=self.weights_dtype))
        self.timings.load_s = time.perf_counter() - start
        self.artifact_path = artifact.path
        return self

    def _input(self, ids: list[int]):
        torch = _torch()
        return torch.tensor([list(ids)], dtype=torch.long, device=self.device)

    def teacher_forced_logits(self, ids: list[int]) -> np.ndarray:
        self._check_prompt(ids)
        torch = _torch()
        with torch.inference_mode():
            start = time.perf_counter()
            logits = self._forward(ids, use_cache=False).logits[0]
            logits = logits.float().cpu().numpy()
            self.timings.prefill_s = time.perf_counter() - start
        self.timings.prefill_tokens = len(ids)
        return logits

    def capture_hidden_states(self, ids: list[int]) -> tuple[list[dict], dict[str, np.ndarray]]:
        """(points, arrays): the hidden state after every capture point of one forward pass over
        `ids`, in the order the forward pass reached them (convqa.compare.divergence compares two
        such captures). See `capture_points` for what is captured."""
        self._check_prompt(ids)
        torch = _torch()
        captured: list[tuple[dict, np.ndarray]] = []
        handles = []

        def hook_for(point):
            def hook(module, args, output):
                if point.get("seen"):  # a module called twice (a shared norm) keeps its first output
                    return
                point["seen"] = True
                tensor = output[0] if isinstance(output, (tuple, list)) else output
                captured.append((point, tensor[0].detach().float().cpu().numpy()))
            return hook

        try:
            for point, module in capture_points(self.model):
                handles.append(module.register_forward_hook(hook_for(point)))
            with torch.inference_mode():
                self._forward(ids, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        points, arrays = [], {}
        for index, (point, values) in enumerate(captured):
            point.pop("seen")
            key = f"{index:04d}.{point['module']}"
            points.append({"key": key, **point})
            arrays[key] = np.ascontiguousarray(values, dtype=np.float32)
        return points, arrays

    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Argmax decoding with the KV cache: one prefill pass, then one token per forward."""
        return self.logits_and_generate(ids, max_new_tokens, stop_ids, keep_logits=False)[1]

    def logits_and_generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int],
                            keep_logits: bool = True) -> tuple[np.ndarray | None, list[int]]:
        """One prefill pass gives the teacher-forced logits and the cache the greedy decode
        continues from. A forward that fills the KV cache computes every position's logits bit for
        bit as one without it (checked on qwen2, llama, gemma2, gemma3, mistral, phi3 and qwen3:
        tests/test_engines.py), so this is the two queries' numbers at one prefill's cost (a
        second prefill, and its vocabulary-wide logits at every position, were a third of a 1.5B
        model's run)."""
        self._check_prompt(ids, max_new_tokens)
        torch = _torch()
        generated: list[int] = []
        with torch.inference_mode():
            start = time.perf_counter()
            out = self._forward(ids, use_cache=max_new_tokens > 0)
            logits = out.logits[0].float().cpu().numpy() if keep_logits else None
            if max_new_tokens > 0:
                generated.append(int(torch.argmax(out.logits[0, -1])))
            self.timings.prefill_s = time.perf_counter() - start
            self.timings.prefill_tokens = len(ids)
            start = time.perf_counter()
            while generated and generated[-1] not in stop_ids and len(generated) < max_new_tokens:
                out = self._forward(generated[-1:], past_key_values=out.past_key_values, use_cache=True)
                generated.append(int(torch.argmax(out.logits[0, -1])))
            self.timings.decode_s = time.perf_counter() - start
            self.timings.decode_tokens = max(0, len(generated) - 1)
        return logits, generated

    def close(self) -> None:
        self.model = None
