"""The architecture registry: every architecture convqa converts, declared once, as data.

An `Architecture` names its HF class, its llama.cpp (GGUF) architecture and the tensors a model
of that class holds, spelled as the real transformers model spells them (`tests/test_arch_registry`
builds each class and checks). GGUF names are not written here: they come from gguf-py's own
tables (`gguf.MODEL_TENSORS`, `gguf.TensorNameMap`, i.e. llama.cpp's), restricted to the one HF
spelling per GGUF name that the real model uses, so the HF<->GGUF map of every architecture is a
bijection checked when this module is imported (a raw `TensorNameMap` is not one: it accepts
every alias any checkpoint ever used).

The intentional transforms between HF and GGUF are declared per architecture as flags and applied
only at the format boundary (`convqa.arch.transforms`):
- `permute_qk`: q/k rows permuted per head (llama, mistral: llama.cpp runs adjacent-pair RoPE);
- `norm_offset`: every RMSNorm weight stored as `w + 1` in GGUF (gemma: HF computes x*(1+w),
  llama.cpp x*w);
- `tied_only`: llama.cpp's converter drops `lm_head` (gemma), so an untied model is refused;
- fused projections (phi3's `qkv_proj`, `gate_up_proj`) are one tensor on both sides, split by
  llama.cpp at the HF offsets, so they need no transform, only the names gguf-py gives them
  (`fused_qkv_rows` says where q, k and v start, for mutants and diagnoses).

Adding an architecture is one entry in `ARCHITECTURES` (and its HF config dialect in
`convqa.arch.hf_config`, its synthetic preset in `convqa.sources.synthetic`); docs/architecture.md
walks through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import gguf

# Symbolic dimensions of a tensor role: resolved against a ModelConfig by `convqa.arch.shape`.
H, V, FF, Q, KV, D = "hidden", "vocab", "ff", "q_rows", "kv_rows", "head_dim"
QKV, FF2 = "qkv_rows", "ff_gate_up"  # fused projections: q|k|v rows, gate|up rows
E, MFF = "num_experts", "moe_ff"  # MoE: expert count, one expert's intermediate size

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
GLOBAL_ROLES = {EMBEDDING: (V, H), FINAL_NORM: (H,), LM_HEAD: (V, H)}

# Layer roles (suffixes after `model.layers.N.`) shared by the llama family.
_LLAMA_LAYER = {
    "input_layernorm.weight": (H,),
    "self_attn.q_proj.weight": (Q, H),
    "self_attn.k_proj.weight": (KV, H),
    "self_attn.v_proj.weight": (KV, H),
    "self_attn.o_proj.weight": (H, Q),
    "post_attention_layernorm.weight": (H,),
    "mlp.gate_proj.weight": (FF, H),
    "mlp.up_proj.weight": (FF, H),
    "mlp.down_proj.weight": (H, FF),
}
_QKV_BIAS = {"self_attn.q_proj.bias": (Q,), "self_attn.k_proj.bias": (KV,), "self_attn.v_proj.bias": (KV,)}
_QK_NORM = {"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)}
# Gemma 2/3 wrap both sublayers in norms: post_attention_layernorm is *after* attention there
# (GGUF post_attention_norm), and the MLP's input norm is pre_feedforward_layernorm (GGUF ffn_norm).
_SANDWICH = {"pre_feedforward_layernorm.weight": (H,), "post_feedforward_layernorm.weight": (H,)}

# Phi-3 fuses q/k/v and gate/up into one weight each; GGUF keeps them fused (attn_qkv, ffn_up of
# 2 * n_ff rows) and llama.cpp splits them at the same offsets, so they need no transform.
_PHI3_LAYER = {
    "input_layernorm.weight": (H,),
    "self_attn.qkv_proj.weight": (QKV, H),
    "self_attn.o_proj.weight": (H, Q),
    "post_attention_layernorm.weight": (H,),
    "mlp.gate_up_proj.weight": (FF2, H),
    "mlp.down_proj.weight": (H, FF),
}

# Qwen3-MoE: the dense MLP is replaced by a router (`mlp.gate`, GGUF ffn_gate_inp) and per-expert
# 2-D projections, `mlp.experts.{e}.<proj>` as the Hub and transformers 5.23's save_pretrained
# spell them (measured: save_pretrained un-fuses its in-memory 3-D gate_up_proj again).
_MOE_ROUTER = {"mlp.gate.weight": (E, H)}
_MOE_EXPERTS = {"gate_proj.weight": (MFF, H), "up_proj.weight": (MFF, H), "down_proj.weight": (H, MFF)}
EXPERT_PREFIX = "mlp.experts."

ROPE_NORM, ROPE_NEOX = "norm", "neox"  # llama.cpp rope types: adjacent pairs / split halves


@dataclass(frozen=True)
class Param:
    """An architecture-specific hyperparameter, carried in `ModelConfig.params[name]`.

    `gguf_key` is gguf-py's key template (`{arch}` filled with the GGUF architecture name), `kind`
    its GGUF type; the HF config key of the same meaning is in `convqa.arch.hf_config`.
    """

    name: str
    gguf_key: str
    kind: str  # "u32" | "f32"


SLIDING_WINDOW = Param("sliding_window", gguf.Keys.Attention.SLIDING_WINDOW, "u32")
ROPE_LOCAL_THETA = Param("rope_local_theta", gguf.Keys.Rope.FREQ_BASE_SWA, "f32")
ATTN_SOFTCAP = Param("attn_logit_softcapping", gguf.Keys.LLM.ATTN_LOGIT_SOFTCAPPING, "f32")
FINAL_SOFTCAP = Param("final_logit_softcapping", gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING, "f32")
EXPERT_COUNT = Param("num_experts", gguf.Keys.LLM.EXPERT_COUNT, "u32")
EXPERT_USED_COUNT = Param("num_experts_per_tok", gguf.Keys.LLM.EXPERT_USED_COUNT, "u32")
EXPERT_FF = Param("moe_intermediate_size", gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, "u32")


@dataclass(frozen=True)
class Architecture:
    name: str  # convqa's and ModelConfig's name; equals the GGUF name unless `gguf_arch` differs
    hf_class: str  # `architectures[0]` in config.json
    model_type: str  # `model_type` in config.json
    gguf_arch: gguf.MODEL_ARCH  # what llama.cpp's convert_hf_to_gguf.py writes for this class
    layer_roles: dict  # suffix in `model.layers.N.` -> symbolic shape, as the HF model names them
    rope: str  # ROPE_NORM | ROPE_NEOX, as llama.cpp runs it
    permute_qk: bool = False
    norm_offset: bool = False
    tied_only: bool = False
    hidden_act: str = "silu"
    params: tuple = ()  # Param entries every model of this architecture carries
    # llama.cpp's fixed sliding-window layer pattern (every n-th layer attends globally), or 0
    swa_pattern: int = 0
    # Roles llama.cpp loads when present but the HF class never has (llama's optional q/k/v
    # biases): named in the bijection, not expected of a model.
    optional_roles: dict = field(default_factory=dict)
    # MoE: per-expert roles (suffix after `model.layers.N.mlp.experts.E.`) that GGUF stacks into
    # one [n_expert, rows, cols] tensor per layer (`convqa.arch.transforms.stack_experts`).
    expert_roles: dict = field(default_factory=dict)
    # hf -> gguf suffix maps, derived from gguf-py in __post_init__
    layer_to_gguf: dict = field(default_factory=dict, compare=False, repr=False)
    global_to_gguf: dict = field(default_factory=dict, compare=False, repr=False)
    # per-expert suffix -> stacked GGUF layer suffix ("gate_proj.weight" -> "ffn_gate_exps.weight")
    expert_to_gguf: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def __post_init__(self) -> None:
        tmap = gguf.get_tensor_name_map(self.gguf_arch, 1)
        for hf in GLOBAL_ROLES:
            if hf == LM_HEAD and self.tied_only:
                continue  # llama.cpp's converter never writes an output.weight for these
            self.global_to_gguf[hf] = _gguf_name(tmap, hf, self)
        for suffix in {**self.layer_roles, **self.optional_roles}:
            name = _gguf_name(tmap, f"model.layers.0.{suffix}", self)
            if not name.startswith("blk.0."):
                raise AssertionError(f"{self.name}: {suffix} maps to {name}, outside the layer stack")
            self.layer_to_gguf[suffix] = name[len("blk.0.") :]
        for suffix in self.expert_roles:
            # gguf-py names the stacked tensor by the fused HF spelling, without the expert index.
            fused = f"model.layers.0.{EXPERT_PREFIX}{suffix.removesuffix('.weight')}"
            name = tmap.get_name(fused)
            if name is None or not name.startswith("blk.0."):
                raise AssertionError(f"{self.name}: gguf-py's {self.gguf_name} tables have no stacked tensor for {fused}")
            self.expert_to_gguf[suffix] = name[len("blk.0.") :] + ".weight"
        for table in (self.global_to_gguf, {**self.layer_to_gguf, **self.expert_to_gguf}):
            if len(set(table.values())) != len(table):
                raise AssertionError(f"{self.name}: HF -> GGUF names are not one-to-one: {table}")


def _gguf_name(tmap: gguf.TensorNameMap, hf: str, arch: Architecture) -> str:
    name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise AssertionError(f"{arch.name}: gguf-py's {arch.gguf_name} tables have no tensor for {hf}")
    return name


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("qwen2", "Qwen2ForCausalLM", "qwen2", gguf.MODEL_ARCH.QWEN2, {**_LLAMA_LAYER, **_QKV_BIAS}, ROPE_NEOX),
        Architecture(
            "llama", "LlamaForCausalLM", "llama", gguf.MODEL_ARCH.LLAMA, _LLAMA_LAYER, ROPE_NORM, permute_qk=True,
            optional_roles=_QKV_BIAS,
        ),
        Architecture("qwen3", "Qwen3ForCausalLM", "qwen3", gguf.MODEL_ARCH.QWEN3, {**_LLAMA_LAYER, **_QK_NORM}, ROPE_NEOX),
        # convert_hf_to_gguf.py writes MistralForCausalLM as llama (LlamaModel); convqa marks it
        # with `convqa.architecture` so its own round trips keep the class.
        Architecture(
            "mistral", "MistralForCausalLM", "mistral", gguf.MODEL_ARCH.LLAMA, _LLAMA_LAYER, ROPE_NORM, permute_qk=True,
            optional_roles=_QKV_BIAS,
        ),
        Architecture(
            "gemma3", "Gemma3ForCausalLM", "gemma3_text", gguf.MODEL_ARCH.GEMMA3, {**_LLAMA_LAYER, **_QK_NORM, **_SANDWICH},
            ROPE_NEOX, norm_offset=True, tied_only=True, hidden_act="gelu_pytorch_tanh",
            params=(SLIDING_WINDOW, ROPE_LOCAL_THETA), swa_pattern=6,
        ),
        Architecture(
            "gemma2", "Gemma2ForCausalLM", "gemma2", gguf.MODEL_ARCH.GEMMA2, {**_LLAMA_LAYER, **_SANDWICH},
            ROPE_NEOX, norm_offset=True, tied_only=True, hidden_act="gelu_pytorch_tanh",
            params=(SLIDING_WINDOW, ATTN_SOFTCAP, FINAL_SOFTCAP), swa_pattern=2,
        ),
        Architecture("phi3", "Phi3ForCausalLM", "phi3", gguf.MODEL_ARCH.PHI3, _PHI3_LAYER, ROPE_NEOX),
        # transformers 5.23's GGUF loader ignores expert_feed_forward_length (moe_intermediate_size
        # stays at its default, 768) and forces norm_topk_prob=True, as llama.cpp's qwen3moe graph
        # does (measured): only such models run alike in both engines (convqa.arch.hf_config).
        Architecture(
            "qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", gguf.MODEL_ARCH.QWEN3MOE,
            {**{k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("mlp.")}, **_QK_NORM, **_MOE_ROUTER},
            ROPE_NEOX, expert_roles=_MOE_EXPERTS, params=(EXPERT_COUNT, EXPERT_USED_COUNT, EXPERT_FF),
        ),
    )
}  # fmt: skip
# Architectures declared at the GGUF boundary (writer, reader, transforms) but not yet supported
# end to end: `get` refuses them. Empty since qwen3_moe became SUPPORTED; kept for the next one.
EXPERIMENTAL: dict[str, Architecture] = {}
SUPPORTED = tuple(ARCHITECTURES)
BY_HF_CLASS = {a.hf_class: a for a in ARCHITECTURES.values()}
BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}
# GGUF architecture name -> the registry entry a plain file of that name reads as.
BY_GGUF_NAME = {a.gguf_name: a for a in reversed(ARCHITECTURES.values())}


def fused_qkv_rows(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[slice, slice, slice]:
    """Rows of q, k and v inside a fused qkv_proj (HF's and llama.cpp's order)."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    return slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)


def declared(name: str) -> Architecture:
    """The entry of a supported or an EXPERIMENTAL architecture: what the GGUF boundary's
    transforms (writer, `convqa.arch.transforms`) look up; everything else uses `get`."""
    if name in EXPERIMENTAL:
        return EXPERIMENTAL[name]
    return get(name)


def get(name: str) -> Architecture:
    """The registry entry, or KeyError naming the supported ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unsupported architecture {name!r}; supported: {SUPPORTED}") from None


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")


def expert_of(arch: Architecture, name: str) -> tuple[int, int, str] | None:
    """(layer, expert, per-expert suffix) of a canonical per-expert tensor of `arch`, else None."""
    m = _HF_EXPERT.match(name)
    if m and m.group(3) in arch.expert_roles:
        return int(m.group(1)), int(m.group(2)), m.group(3)
    return None


def stacked_gguf_name(arch: Architecture, layer: int, suffix: str) -> str:
    """The GGUF tensor that stacks every expert's `suffix` of `layer` ("blk.0.ffn_up_exps.weight")."""
    return f"blk.{layer}.{arch.expert_to_gguf[suffix]}"


def stacked_to_hf(arch: Architecture, name: str) -> tuple[int, str] | None:
    """(layer, per-expert suffix) of a stacked GGUF expert tensor of `arch`, else None."""
    m = _GGUF_LAYER.match(name)
    if m:
        for suffix, g in arch.expert_to_gguf.items():
            if g == m.group(2):
                return int(m.group(1)), suffix
    return None


def expert_name(layer: int, expert: int | str, suffix: str) -> str:
    """A per-expert canonical name; `expert` "*" names the whole group of a layer and role."""
    return f"model.layers.{layer}.{EXPERT_PREFIX}{expert}.{suffix}"


def hf_to_gguf(arch: Architecture, name: str) -> str | None:
    """Canonical HF name -> GGUF name for `arch`, or None if it has no GGUF counterpart
    (a per-expert tensor has none of its own: see `stacked_gguf_name`)."""
    if name in arch.global_to_gguf:
        return arch.global_to_gguf[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in arch.layer_to_gguf:
        return f"blk.{m.group(1)}.{arch.layer_to_gguf[m.group(2)]}"
    return None


def gguf_to_hf(arch: Architecture, name: str) -> str | None:
    """GGUF name -> canonical HF name for `arch`, or None if unknown."""
    for hf, g in arch.global_to_gguf.items():
        if g == name:
            return hf
    m = _GGUF_LAYER.match(name)
    if m:
        for suffix, g in arch.layer_to_gguf.items():
            if g == m.group(2):
                return f"model.layers.{m.group(1)}.{suffix}"
    return None
