"""GGUF writer: GGUF files from a WritePlan, that llama.cpp and transformers load.

Writing goes through gguf-py's GGUFWriter, streaming: every tensor info is declared first, then
header, key/values and tensor infos are written, then each tensor's bytes one at a time.

The conventions the reader (convqa.formats.gguf) undoes are applied here: `ne` lists dimensions
fastest-first, llama's q/k projections are row-permuted within each head, gemma's norms get + 1
(convqa.arch.transforms), tensors use llama.cpp names (convqa.arch.registry), `output.weight` is
left out when embeddings are tied, architecture Params are written as their GGUF keys
(docs/formats.md GGUF 1-3).
A module of its own so that its code fingerprint covers only the jobs that write GGUF.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_VERSION, GGUFValueType, Keys, LlamaFileType, TokenType

from convqa.arch import registry, transforms
from convqa.arch.permute import permute_rows_for_gguf
from convqa.files import atomic_file
from convqa.formats.gguf_keys import ARCHITECTURE_KEY, PROVENANCE_KEY, TOKENIZER_PADDING_KEY
from convqa.errors import ConversionError
from convqa.model import LazyTensor, ModelConfig, WritePlan

# general.name when the plan names no model. Neutral on purpose: consumers key special cases on
# the name. transformers 5.23's GGUF loader takes a llama file named exactly "mistral" for
# gguf-py's (absent) mistral tables and refuses it; llama.cpp 0.3.36 gives any model whose name
# contains "phi3" Phi-3's token attributes, looking up "</s>", "<s>" and "<unk>" (and fails on a
# vocabulary without them: "error loading model vocabulary: unordered_map::at").
DEFAULT_NAME = "convqa model"

FILE_TYPE_BY_ENCODING = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q2_K": LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": LlamaFileType.MOSTLY_Q3_K_M,
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
}

# gguf-py converts a uint8 shape from bytes to elements; any other dtype means "shape in elements".
_ELEMENT_SHAPE_DTYPE = np.dtype(np.float32)


def write_gguf(path: str | os.PathLike, plan: WritePlan) -> None:
    """Write `plan` as a GGUF file llama.cpp and transformers load, atomically and streaming."""
    config = plan.config
    if config.architecture not in registry.ARCHITECTURES and config.architecture not in registry.EXPERIMENTAL:
        raise ConversionError(f"GGUF writer: unsupported architecture {config.architecture!r}; supported: {registry.SUPPORTED}")
    arch = registry.declared(config.architecture)
    entries = _entries(plan)
    gguf_names = _gguf_names(plan, entries)
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, arch.gguf_name)
        try:
            _add_general(writer, plan)
            if arch.name != arch.gguf_name:
                writer.add_string(ARCHITECTURE_KEY, arch.name)
            _add_hyperparameters(writer, config)
            _add_tokenizer(writer, plan)
            for entry, name in zip(entries, gguf_names):
                _add_tensor_info(writer, name, entry, plan)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for entry in entries:  # one tensor, or one stacked expert group, in memory at a time
                writer.write_tensor_data(_stored_bytes(entry, plan))
        finally:
            writer.close()


@dataclass(frozen=True)
class _ExpertStack:
    """The per-expert tensors of one layer and projection, stacked into one GGUF tensor
    [n_expert, rows, cols] (convqa.arch.transforms.stack_experts), in stacking order."""

    name: str  # the stacked GGUF name
    experts: list  # LazyTensor per stacked index

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.experts), *self.experts[0].shape)

    @property
    def encoding(self):
        return self.experts[0].encoding

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.experts)


def _entries(plan: WritePlan) -> list:
    """The plan's tensors as the GGUF file holds them: each tensor as itself, except MoE experts,
    grouped per layer and projection into one `_ExpertStack` where the group's first expert was."""
    arch = registry.declared(plan.config.architecture)
    if not arch.expert_roles:
        return list(plan.tensors)
    groups: dict[tuple[int, str], dict[int, LazyTensor]] = {}
    entries: list = []
    for tensor in plan.tensors:
        found = registry.expert_of(arch, tensor.name)
        if found is None:
            entries.append(tensor)
            continue
        layer, expert, suffix = found
        if (layer, suffix) not in groups:
            groups[(layer, suffix)] = {}
            entries.append((layer, suffix))
        groups[(layer, suffix)][expert] = tensor
    n_expert = int(plan.config.params.get("num_experts", 0))
    order = plan.quirks.expert_order(n_expert) if plan.quirks.expert_order else transforms.expert_order(n_expert)
    stacked = []
    for entry in entries:
        if not isinstance(entry, tuple):
            stacked.append(entry)
            continue
        layer, suffix = entry
        experts = groups[entry]
        if sorted(experts) != list(range(n_expert)):
            raise ConversionError(
                f"GGUF writer: layer {layer} {suffix} has experts {sorted(experts)}, expected 0..{n_expert - 1}"
            )
        members = [experts[e] for e in order]
        if len({(t.shape, t.encoding) for t in members}) != 1:
            raise ConversionError(f"GGUF writer: layer {layer} {suffix} experts differ in shape or encoding")
        stacked.append(_ExpertStack(registry.stacked_gguf_name(arch, layer, suffix), members))
    return stacked


def _gguf_names(plan: WritePlan, entries: list) -> list[str]:
    names = []
    arch = registry.declared(plan.config.architecture)
    if arch.tied_only and not plan.config.tie_word_embeddings:
        raise ConversionError(
            f"GGUF writer: {arch.name} has no untied output head in llama.cpp (its converter drops lm_head); "
            "an untied model cannot be written faithfully"
        )
    for tensor in entries:
        name = tensor.name if isinstance(tensor, _ExpertStack) else registry.hf_to_gguf(arch, tensor.name)
        if name is None:
            raise ConversionError(f"GGUF writer: tensor {tensor.name!r} has no GGUF name")
        if tensor.encoding.ggml_type is None:
            raise ConversionError(f"GGUF writer: {tensor.name} is {tensor.encoding.name}, which GGUF cannot hold")
        names.append(name)
    if len(set(names)) != len(names):
        raise ConversionError("GGUF writer: duplicate tensor names in the plan")
    has_lm_head = "output.weight" in names
    if has_lm_head == plan.config.tie_word_embeddings:
        raise ConversionError(
            f"GGUF writer: tie_word_embeddings={plan.config.tie_word_embeddings} but the plan "
            f"{'has' if has_lm_head else 'lacks'} lm_head.weight; GGUF expresses tying only by omitting output.weight"
        )
    return names


def _add_general(writer: GGUFWriter, plan: WritePlan) -> None:
    writer.add_name(str(plan.metadata.get("name") or DEFAULT_NAME))
    weights_2d = [t.encoding.name for t in plan.tensors if len(t.shape) == 2]
    if weights_2d:
        dominant = Counter(weights_2d).most_common(1)[0][0]
        if dominant in FILE_TYPE_BY_ENCODING:
            writer.add_file_type(FILE_TYPE_BY_ENCODING[dominant])
    if any(t.encoding.is_quantized for t in plan.tensors):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    try:
        provenance = json.dumps(plan.metadata, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"GGUF writer: plan metadata is not JSON-safe: {exc}") from exc
    writer.add_key_value(PROVENANCE_KEY, provenance, GGUFValueType.STRING)


def _add_hyperparameters(writer: GGUFWriter, config: ModelConfig) -> None:
    # rope.freq_base is optional to llama.cpp, which then silently uses 10000: never leave it out.
    if config.rope_theta is None or not math.isfinite(config.rope_theta) or config.rope_theta <= 0:
        raise ConversionError(f"GGUF writer: rope_theta {config.rope_theta!r} is required and must be positive")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)  # llama.cpp checks it equals head_dim for llama
    writer.add_vocab_size(config.vocab_size)
    if config.head_dim * config.num_heads != config.hidden_size or registry.declared(config.architecture).norm_offset:
        # gemma: llama.cpp's converter always writes them (transformers' GGUF loader reads head_dim there)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    arch = registry.declared(config.architecture)
    for param in arch.params:
        if param.name not in config.params:
            raise ConversionError(f"GGUF writer: {arch.name} needs {param.name}, which the config lacks")
        key, value = param.gguf_key.format(arch=arch.gguf_name), config.params[param.name]
        if param.kind == "u32":
            writer.add_uint32(key, int(value))
        else:
            writer.add_float32(key, float(value))


def _add_tokenizer(writer: GGUFWriter, plan: WritePlan) -> None:
    spec = plan.tokenizer
    T = Keys.Tokenizer
    if spec is None:
        # llama.cpp refuses a file without tokenizer.ggml.model; "none" makes it create dummy tokens.
        writer.add_tokenizer_model("none")
        return
    n_rows = plan.config.vocab_size
    for tensor in plan.tensors:
        if tensor.name == "model.embed_tokens.weight":
            n_rows = tensor.shape[0]
    n_tokens = len(spec.tokens)
    if n_tokens > n_rows:
        raise ConversionError(f"GGUF writer: {n_tokens} tokens but only {n_rows} embedding rows")
    if len(spec.token_types) != n_tokens or (spec.scores is not None and len(spec.scores) != n_tokens):
        raise ConversionError("GGUF writer: token_types/scores do not have one entry per token")
    # llama.cpp takes n_vocab from len(tokens) and checks it against the embedding rows.
    padding = list(range(n_tokens, n_rows))
    tokens = list(spec.tokens) + [f"[PAD{i}]" for i in padding]
    token_types = [int(t) for t in spec.token_types] + [int(TokenType.UNUSED)] * len(padding)

    writer.add_tokenizer_model(spec.model)
    if spec.pre:
        writer.add_tokenizer_pre(spec.pre)
    writer.add_key_value(T.LIST, tokens, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    writer.add_key_value(T.TOKEN_TYPE, token_types, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    if padding:
        writer.add_uint32(TOKENIZER_PADDING_KEY, len(padding))
    if spec.merges:
        writer.add_key_value(T.MERGES, list(spec.merges), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    if spec.scores is not None:
        scores = [float(s) for s in spec.scores] + [0.0] * len(padding)
        writer.add_key_value(T.SCORES, scores, GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    for key, token_id in (
        (T.BOS_ID, spec.bos_token_id),
        (T.EOS_ID, spec.eos_token_id),
        (T.UNK_ID, spec.unk_token_id),
        (T.PAD_ID, spec.pad_token_id),
    ):
        if token_id is not None:
            if not 0 <= token_id < n_rows:
                raise ConversionError(f"GGUF writer: {key} {token_id} is outside the vocabulary of {n_rows}")
            writer.add_uint32(key, token_id)
    writer.add_add_bos_token(bool(spec.add_bos_token))
    writer.add_add_eos_token(bool(spec.add_eos_token))
    if spec.add_space_prefix is not None:
        writer.add_add_space_prefix(spec.add_space_prefix)
    if spec.chat_template:
        writer.add_chat_template(spec.chat_template)


def _add_tensor_info(writer: GGUFWriter, name: str, tensor: LazyTensor, plan: WritePlan) -> None:
    # gguf-py reverses the shape it is given into `ne`. The dims-not-reversed quirk hands it the
    # reversed shape so that `ne` comes out equal to the numpy shape (same bytes).
    shape = tensor.shape if plan.quirks.gguf_reverse_dims else tuple(reversed(tensor.shape))
    writer.add_tensor_info(name, shape, _ELEMENT_SHAPE_DTYPE, tensor.nbytes, raw_dtype=tensor.encoding.ggml_type)


def _stored_bytes(entry, plan: WritePlan) -> np.ndarray:
    if isinstance(entry, _ExpertStack):
        raw = transforms.stack_experts([t.raw for t in entry.experts])
        if raw.size != entry.nbytes:
            raise ConversionError(f"GGUF writer: {entry.name} has {raw.size} bytes, expected {entry.nbytes}")
        return raw
    return _stored_rows(entry, plan)


def _stored_rows(tensor: LazyTensor, plan: WritePlan) -> np.ndarray:
    """The bytes to store for `tensor` (uint8): llama's q/k rows permuted into GGUF order, gemma's
    norms + 1 (convqa.arch.transforms decides which)."""
    raw = tensor.raw()
    if raw.size != tensor.nbytes:
        raise ConversionError(
            f"GGUF writer: {tensor.name} has {raw.size} bytes, expected {tensor.nbytes} for {tensor.encoding.name} {list(tensor.shape)}"
        )
    config = plan.config
    offset = transforms.norm_offset(config, tensor.name) * plan.quirks.norm_offset_times
    if offset:
        if not transforms.can_offset(tensor.encoding):
            raise ConversionError(f"GGUF writer: cannot add {config.architecture}'s norm offset to the {tensor.encoding.name} {tensor.name}")
        return transforms.offset_raw(raw, tensor.encoding, tensor.shape, offset)
    is_q, is_k = transforms.is_qk_projection(tensor.name)
    if not (registry.declared(config.architecture).permute_qk and plan.quirks.llama_permute_qk and (is_q or is_k)):
        return raw
    n_head = config.num_heads if is_q else config.num_kv_heads
    if len(tensor.shape) == 1 and tensor.encoding.block_elems != 1:
        raise ConversionError(f"GGUF writer: cannot row-permute the 1-D {tensor.encoding.name} tensor {tensor.name}")
    if tensor.shape[0] % (2 * n_head):
        raise ConversionError(
            f"GGUF writer: {tensor.name} rows {tensor.shape[0]} do not split into {n_head} heads of rotary pairs"
        )
    # Whole rows move, so the uint8 row view is exact for quantized blocks too.
    return np.ascontiguousarray(permute_rows_for_gguf(raw.reshape(tensor.shape[0], -1), n_head))
