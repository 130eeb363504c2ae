"""Known-bad converters: each reproduces one real bug class, selectable by name.

They exist so the qualification can prove it catches each bug (the detection matrix). Each is
a transformation of a correct WritePlan (or of where the output goes), so the correct path in
`convqa.convert.builtin` carries no bug switches; writer-level bugs use `WriterQuirks`, whose defaults
are the correct behaviour.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from convqa import encodings
from convqa.arch import registry
from convqa.errors import ConversionError
from convqa.model import LazyTensor, ModelArtifact, WritePlan


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # the real-world bug it reproduces, one sentence
    origin: str  # where the bug class was seen
    targets: tuple[str, ...]  # target formats where it applies
    changes_function: bool  # does it change what the model computes (must fail an inference gate)?
    apply: Callable[[WritePlan, ModelArtifact, Path, Path], tuple[WritePlan, Path]]


def _with_quirks(plan: WritePlan, **changes) -> WritePlan:
    return dataclasses.replace(plan, quirks=dataclasses.replace(plan.quirks, **changes))


def _map_tensors(plan: WritePlan, fn: Callable[[LazyTensor], LazyTensor | None]) -> WritePlan:
    tensors = [t2 for t in plan.tensors if (t2 := fn(t)) is not None]
    return dataclasses.replace(plan, tensors=tensors)


def _transposed_bytes(t: LazyTensor) -> LazyTensor:
    if len(t.shape) != 2 or t.encoding.is_quantized:
        return t

    def load() -> np.ndarray:
        width = t.encoding.block_bytes  # element size for plain float encodings
        values = t.raw().view(f"V{width}").reshape(t.shape)
        return np.ascontiguousarray(values.T).view(np.uint8).reshape(-1)

    return LazyTensor(t.name, t.shape, t.encoding, load)


def dims_not_reversed(plan, source, src, dst):
    return _with_quirks(plan, gguf_reverse_dims=False), dst


def transpose_2d(plan, source, src, dst):
    return _map_tensors(plan, _transposed_bytes), dst


def skip_qk_permute(plan, source, src, dst):
    if not registry.get(plan.config.architecture).permute_qk:
        raise ConversionError(f"skip-qk-permute only applies to architectures with a Q/K permutation (llama, mistral), not {plan.config.architecture}")
    return _with_quirks(plan, llama_permute_qk=False), dst


def drop_qkv_bias(plan, source, src, dst):
    if "self_attn.q_proj.bias" not in registry.get(plan.config.architecture).layer_roles:
        raise ConversionError(f"drop-qkv-bias only applies to architectures with q/k/v biases (qwen2), not {plan.config.architecture}")
    return _map_tensors(plan, lambda t: None if t.name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) else t), dst


def drop_tokenizer(plan, source, src, dst):
    return dataclasses.replace(plan, tokenizer=None), dst


def drop_chat_template(plan, source, src, dst):
    if plan.tokenizer is None:
        raise ConversionError("drop-chat-template needs a source with a tokenizer")
    return dataclasses.replace(plan, tokenizer=dataclasses.replace(plan.tokenizer, chat_template=None)), dst


def shift_special_token(plan, source, src, dst):
    tok = plan.tokenizer
    if tok is None or tok.eos_token_id is None:
        raise ConversionError("shift-special-token needs a tokenizer with an eos id")
    return dataclasses.replace(plan, tokenizer=dataclasses.replace(tok, eos_token_id=tok.eos_token_id + 1)), dst


def lose_rope_theta(plan, source, src, dst):
    # A writer that forgets rope.freq_base: llama.cpp (and any reader) falls back to 10000.
    return dataclasses.replace(plan, config=plan.config.replace(rope_theta=10000.0 if plan.config.rope_theta != 10000.0 else 500000.0)), dst


def change_rms_eps(plan, source, src, dst):
    eps = plan.config.rms_norm_eps
    return dataclasses.replace(plan, config=plan.config.replace(rms_norm_eps=1e-5 if eps != 1e-5 else 1e-6)), dst


def q8_0_as_apr_dtype_8(plan, source, src, dst):
    overrides = {}
    tensors = []
    for t in plan.tensors:
        original = source.tensors.get(t.name)
        if original is not None and original.encoding == encodings.Q8_0:
            tensors.append(original)  # the raw GGML Q8_0 blocks, not the dequantized F32
            overrides[t.name] = 8  # APR byte 8 is legacy APR Q4, never GGML Q8_0 (GH-191)
        else:
            tensors.append(t)
    if not overrides:
        raise ConversionError("q8_0-as-apr-dtype-8 needs a source with Q8_0 tensors (a q8_0 GGUF)")
    plan = dataclasses.replace(plan, tensors=tensors)
    return _with_quirks(plan, apr_dtype_override=overrides), dst


def drop_lm_head(plan, source, src, dst):
    if plan.config.tie_word_embeddings:
        raise ConversionError("drop-lm-head applies to untied models (a tied model has no separate lm_head)")
    plan = _map_tensors(plan, lambda t: None if t.name == "lm_head.weight" else t)
    return dataclasses.replace(plan, config=plan.config.replace(tie_word_embeddings=True)), dst


def write_beside_input(plan, source, src, dst):
    # The anchor's file-discovery failure: output lands next to the input, not where asked.
    base = src if src.is_file() else src / "model"
    return plan, base.with_name(base.stem + ".converted" + dst.suffix)


def nondeterministic(plan, source, src, dst):
    meta = dict(plan.metadata, converted_at_ns=time.time_ns(), pid=os.getpid())
    return dataclasses.replace(plan, metadata=meta), dst


def bf16_truncate(plan, source, src, dst):
    def truncated(t: LazyTensor) -> LazyTensor:
        if t.encoding != encodings.BF16 or len(t.shape) < 2:
            return t
        original = source.tensors[t.name]

        def load() -> np.ndarray:
            bits = np.ascontiguousarray(original.to_float32()).view(np.uint32)
            return (bits >> 16).astype("<u2").view(np.uint8).reshape(-1)

        return LazyTensor(t.name, t.shape, t.encoding, load)

    changed = _map_tensors(plan, truncated)
    if all(t.encoding != encodings.BF16 for t in plan.tensors):
        raise ConversionError("bf16-truncate needs a bf16 conversion (--quant bf16)")
    return changed, dst


def bf16_norms_in_gguf(plan, source, src, dst):
    # convqa's own GGUF writer before it followed llama.cpp's convention (convert.needs_f32):
    # a BF16 source's norms and biases were stored as BF16, and llama.cpp aborted on them.
    kept = {name for name, t in source.tensors.items() if t.encoding in (encodings.BF16, encodings.F16) and len(t.shape) <= 1}
    if not kept:
        raise ConversionError("bf16-norms-in-gguf needs a source with BF16/F16 1-D tensors (a BF16 checkpoint)")
    return _map_tensors(plan, lambda t: source.tensors[t.name] if t.name in kept else t), dst


# The weight that gets the NaN: the first layer's down projection, which every token passes.
NAN_WEIGHT = "model.layers.0.mlp.down_proj.weight"


def nan_weight(plan, source, src, dst):
    def poisoned(t: LazyTensor) -> LazyTensor:
        if t.name != NAN_WEIGHT:
            return t
        if t.encoding.is_quantized:
            raise ConversionError(f"nan-weight writes a NaN into a plain-float {NAN_WEIGHT}, not {t.encoding.name} blocks")

        def load() -> np.ndarray:
            values = np.array(t.to_float32(), dtype=np.float32)
            values.flat[values.size // 2] = np.nan
            return t.encoding.encode(values)

        return LazyTensor(t.name, t.shape, t.encoding, load)

    if NAN_WEIGHT not in {t.name for t in plan.tensors}:
        raise ConversionError(f"nan-weight needs a model with {NAN_WEIGHT}")
    return _map_tensors(plan, poisoned), dst


# The tensor whose block a scale mutant shifts: a real converter bug hits one tensor's blocks
# somewhere in the middle, which the worst-case Q8_0 error band (0.4% of the block maximum) hides.
SCALE_OFF_TENSOR = "model.layers.0.mlp.down_proj.weight"
SCALE_OFF_FACTOR = 1.01


def _restored(t: LazyTensor, transform: Callable[[np.ndarray], np.ndarray]) -> LazyTensor:
    """`t` with its stored bytes passed through `transform` (a copy of the uint8 array)."""
    def load() -> np.ndarray:
        return transform(np.array(t.raw(), dtype=np.uint8))

    return LazyTensor(t.name, t.shape, t.encoding, load)


def q8_0_scale_off(plan, source, src, dst):
    def shifted(raw: np.ndarray) -> np.ndarray:
        blocks = raw.reshape(-1, encodings.Q8_0.block_bytes)
        scales = blocks[:, :2].copy().view("<f2").reshape(-1)
        # The quietest block (smallest nonzero scale): its error, up to 1.4% of the block's
        # largest value, stays inside the tensor gates' band (0.5% of the tensor's largest value)
        # when that block is 3x quieter than the loudest, as the bug does in the field.
        magnitude = np.where(scales != 0, np.abs(scales.astype(np.float32)), np.inf)
        if not np.isfinite(magnitude).any():
            raise ConversionError(f"q8_0-scale-off: {SCALE_OFF_TENSOR} has no nonzero block scale")
        block = int(np.argmin(magnitude))
        blocks[block, :2] = np.array([scales[block] * SCALE_OFF_FACTOR], dtype="<f2").view(np.uint8)
        return blocks.reshape(-1)

    target = next((t for t in plan.tensors if t.name == SCALE_OFF_TENSOR), None)
    if target is None or target.encoding != encodings.Q8_0:
        raise ConversionError(f"q8_0-scale-off needs {SCALE_OFF_TENSOR} stored as Q8_0 (--quant q8_0)")
    return _map_tensors(plan, lambda t: _restored(t, shifted) if t.name == SCALE_OFF_TENSOR else t), dst


def q8_0_round_half_down(plan, source, src, dst):
    # The correct Q8_0 (gguf-py's, as llama.cpp's quantize_row_q8_0_ref) rounds half away from
    # zero; this one rounds exact ties down. Ties are rare in F32 data (1 in ~10^5 values) and
    # common in BF16 checkpoints (1 in ~500), whose 8-bit mantissas often land on k + 0.5.
    def rounded_down(t: LazyTensor) -> LazyTensor:
        if t.encoding != encodings.Q8_0:
            return t
        original = source.tensors[t.name]

        def fix(raw: np.ndarray) -> np.ndarray:
            blocks = raw.reshape(-1, encodings.Q8_0.block_bytes)
            values = original.to_float32().reshape(-1, encodings.Q8_0.block_elems).astype(np.float32)
            d = np.abs(values).max(axis=1, keepdims=True) / np.float32(127)
            with np.errstate(divide="ignore"):
                inverse = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
            scaled = (values * inverse).astype(np.float32)
            ties = (scaled > 0) & (scaled - np.floor(scaled) == np.float32(0.5))
            quants = blocks[:, 2:].view(np.int8)
            quants[ties] -= 1
            return blocks.reshape(-1)

        return _restored(t, fix)

    if not any(t.encoding == encodings.Q8_0 for t in plan.tensors):
        raise ConversionError("q8_0-round-half-down needs a q8_0 conversion (--quant q8_0)")
    return _map_tensors(plan, rounded_down), dst


def q4_0_nibble_swap(plan, source, src, dst):
    # ggml packs element j of a Q4_0 block in the low nibble of byte j and element j + 16 in its
    # high nibble; this writer swaps them (the packing-order bug class of hand-written kernels).
    def swapped(raw: np.ndarray) -> np.ndarray:
        blocks = raw.reshape(-1, encodings.Q4_0.block_bytes)
        packed = blocks[:, 2:]
        blocks[:, 2:] = (packed >> 4) | (packed << 4)
        return blocks.reshape(-1)

    if not any(t.encoding == encodings.Q4_0 for t in plan.tensors):
        raise ConversionError("q4_0-nibble-swap needs a q4_0 conversion (--quant q4_0)")
    return _map_tensors(plan, lambda t: _restored(t, swapped) if t.encoding == encodings.Q4_0 else t), dst


def gemma_norm_offset_twice(plan, source, src, dst):
    if not registry.get(plan.config.architecture).norm_offset:
        raise ConversionError(f"gemma-norm-offset-twice only applies to architectures with a GGUF norm offset (gemma2, gemma3), not {plan.config.architecture}")
    return _with_quirks(plan, norm_offset_times=2), dst


def drop_qk_norm(plan, source, src, dst):
    if "self_attn.q_norm.weight" not in registry.get(plan.config.architecture).layer_roles:
        raise ConversionError(f"drop-qk-norm only applies to architectures with q_norm/k_norm (qwen3, gemma3), not {plan.config.architecture}")
    return _map_tensors(plan, lambda t: None if t.name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) else t), dst


def fused_qkv_wrong_split(plan, source, src, dst):
    # A converter that splits phi3's fused qkv_proj to re-fuse it computes the k and v offsets
    # the wrong way round: q | v | k. Whole rows move (the uint8 row view holds for quantized rows).
    config = plan.config
    if "self_attn.qkv_proj.weight" not in registry.get(config.architecture).layer_roles:
        raise ConversionError(f"fused-qkv-wrong-split only applies to architectures with a fused qkv_proj (phi3), not {config.architecture}")
    q, k, v = registry.fused_qkv_rows(config.num_heads, config.num_kv_heads, config.head_dim)

    def swapped(t: LazyTensor) -> LazyTensor:
        if not t.name.endswith("self_attn.qkv_proj.weight"):
            return t

        def load() -> np.ndarray:
            rows = t.raw().reshape(t.shape[0], -1)
            return np.ascontiguousarray(np.concatenate([rows[q], rows[v], rows[k]])).reshape(-1)

        return LazyTensor(t.name, t.shape, t.encoding, load)

    return _map_tensors(plan, swapped), dst


def moe_experts_string_sorted(plan, source, src, dst):
    # A converter that collects `mlp.experts.N.*` names and sorts them as strings stacks expert 10
    # at index 2: 0, 1, 10, 11, 2, ... (visible from 11 experts on; below that the order is numeric).
    if not registry.declared(plan.config.architecture).expert_roles:
        raise ConversionError(f"moe-experts-string-sorted only applies to MoE architectures, not {plan.config.architecture}")
    return _with_quirks(plan, expert_order=lambda n: sorted(range(n), key=str)), dst


MUTANTS = {
    m.name: m
    for m in [
        Mutant("dims-not-reversed", "GGUF writer copies the numpy shape into ne instead of reversing it", "docs/formats.md GGUF 1 case 1", ("gguf",), True, dims_not_reversed),
        Mutant("transpose-2d", "2-D weights written transposed ('convert to column-major'): the LAYOUT-002 class", "aprender GH-202/GH-208, 58-90% output differences", ("gguf", "apr"), True, transpose_2d),
        Mutant("skip-qk-permute", "llama q/k rows not permuted for GGUF's adjacent-pair RoPE", "llama.cpp convert LlamaModel.permute", ("gguf",), True, skip_qk_permute),
        Mutant("drop-qkv-bias", "qwen2 q/k/v biases dropped; llama.cpp loads the file silently", "docs/formats.md GGUF 2 (llama.cpp 0.3.36 treats them as optional)", ("gguf", "apr", "safetensors"), True, drop_qkv_bias),
        Mutant("drop-tokenizer", "tokenizer not carried into the converted file", "aprender PMAT-172 (apr run needs the embedded vocabulary)", ("gguf", "apr", "safetensors"), False, drop_tokenizer),
        Mutant("drop-chat-template", "chat template not carried, chat prompts render differently", "anchor playbook: chat modality", ("gguf", "apr", "safetensors"), True, drop_chat_template),
        # The logits do not change; generation stops on another id (seen only when a run reaches EOS).
        Mutant("shift-special-token", "eos token id off by one", "tokenizer metadata mapping bugs", ("gguf", "apr", "safetensors"), False, shift_special_token),
        Mutant("lose-rope-theta", "rope.freq_base not written; readers fall back to 10000", "docs/formats.md GGUF 3 (Qwen 1e6, SmolLM2 1e5)", ("gguf", "apr", "safetensors"), True, lose_rope_theta),
        Mutant("change-rms-eps", "rms_norm_eps replaced by another default", "config mapping bugs", ("gguf", "apr", "safetensors"), True, change_rms_eps),
        Mutant("q8_0-as-apr-dtype-8", "GGML Q8_0 blocks stored under APR dtype byte 8 (legacy APR Q4)", "aprender GH-191", ("apr",), True, q8_0_as_apr_dtype_8),
        Mutant("drop-lm-head", "untied lm_head dropped and the embedding reused as the head", "tied-embedding resolution bugs", ("gguf", "apr", "safetensors"), True, drop_lm_head),
        Mutant("write-beside-input", "converter writes its output next to its input instead of the requested path", "anchor playbook: file discovery", ("gguf", "apr", "safetensors"), False, write_beside_input),
        Mutant("nondeterministic", "converter embeds a timestamp and pid, so two runs differ", "anchor idempotency gate", ("gguf", "apr", "safetensors"), False, nondeterministic),
        Mutant("bf16-truncate", "F32 -> BF16 by truncating the mantissa instead of rounding to nearest even", "ggml_compute_fp32_to_bf16 rounds", ("gguf", "apr", "safetensors"), True, bf16_truncate),
        # Same values, so transformers computes the same function; llama.cpp cannot run the file at all.
        Mutant("bf16-norms-in-gguf", "a BF16 checkpoint's norms and biases stored in BF16 in GGUF; llama.cpp aborts on the first forward pass (binary_op: unsupported types)", "convqa's GGUF writer before issue 10; convert_hf_to_gguf.py keeps 1-D tensors F32", ("gguf",), False, bf16_norms_in_gguf),
        Mutant("q8_0-scale-off", "one Q8_0 block scale of one ffn_down tensor 1% too large: inside the Q8_0 error band", "aprender Q3_K read 6-bit scales as 4-bit; scale bugs pass all-zero-block tests", ("gguf",), True, q8_0_scale_off),
        Mutant("q8_0-round-half-down", "Q8_0 rounds exact ties down instead of half away from zero (llama.cpp's roundf)", "quantizer rounding bugs; ties are common in BF16 checkpoints", ("gguf",), True, q8_0_round_half_down),
        Mutant("q4_0-nibble-swap", "Q4_0 nibbles packed in the wrong order within each block (element j+16 in the low nibble)", "aprender Q2_K: 185 of 256 elements wrong", ("gguf",), True, q4_0_nibble_swap),
        Mutant("gemma-norm-offset-twice", "gemma RMSNorm weights get GGUF's +1 twice (a checkpoint already in llama.cpp's x*w convention offset again): every norm scales by w+2", "convert_hf_to_gguf.py Gemma*Model adds 1 to every norm.weight; transformers' GGUF loader subtracts it (Gemma2TensorProcessor)", ("gguf",), True, gemma_norm_offset_twice),
        Mutant("drop-qk-norm", "qwen3 q_norm/k_norm dropped by a converter written for qwen2, which has no such tensors", "qwen2 -> qwen3 converter reuse; llama.cpp's qwen3 requires attn_q_norm/attn_k_norm", ("gguf", "apr", "safetensors"), True, drop_qk_norm),
        Mutant("fused-qkv-wrong-split", "phi3's fused qkv_proj split and re-fused at the wrong offsets: k rows where v belongs and v where k belongs", "fused-projection handling when converters unfuse/refuse Phi-3's qkv_proj (grouped-query: k and v are the same size, so shapes still match)", ("gguf", "apr", "safetensors"), True, fused_qkv_wrong_split),
        Mutant("moe-experts-string-sorted", "MoE experts stacked in string order (0, 1, 10, 11, 2, ...) because the converter sorted the expert tensor names as strings", "convert_hf_to_gguf.py stacks experts by `range(n_experts)` index precisely to avoid name order", ("gguf",), True, moe_experts_string_sorted),
        Mutant("nan-weight", "one weight value written as NaN (an F16 overflow, an uninitialised buffer)", "F16 export overflow (|x| > 65504 becomes inf, inf - inf NaN)", ("gguf", "apr", "safetensors"), True, nan_weight),
    ]
}




def apply_mutant(name: str, plan: WritePlan, source: ModelArtifact, target_format: str, src: Path, dst: Path) -> tuple[WritePlan, Path]:
    try:
        mutant = MUTANTS[name]
    except KeyError:
        raise ConversionError(f"unknown mutant {name!r}; known: {', '.join(MUTANTS)}") from None
    if target_format not in mutant.targets:
        raise ConversionError(f"mutant {name} applies to {', '.join(mutant.targets)} output, not {target_format}")
    return mutant.apply(plan, source, src, dst)
