"""Per-architecture knowledge: which tensors a model has, their shapes, and their names.

Everything comes from the registry (`convqa.arch.registry`): the architectures, their HF
classes, their tensor roles and the gguf-py-derived GGUF names; `convqa.arch.transforms` holds
the intentional HF<->GGUF transforms the format boundary applies.
"""

from __future__ import annotations

from convqa.arch.registry import (
    ARCHITECTURES, D, E, FF, FF2, GLOBAL_ROLES, H, KV, LM_HEAD, MFF, Q, QKV, SUPPORTED, V, Architecture, declared, expert_name,
    get,
)  # fmt: skip
from convqa.model import ModelConfig

HF_ARCHITECTURES = {name: a.hf_class for name, a in ARCHITECTURES.items()}


def dims(config: ModelConfig) -> dict[str, int]:
    """The symbolic dimensions of the registry's tensor roles, for `config`."""
    return {
        H: config.hidden_size,
        V: config.vocab_size,
        FF: config.intermediate_size,
        Q: config.num_heads * config.head_dim,
        KV: config.num_kv_heads * config.head_dim,
        D: config.head_dim,
        QKV: (config.num_heads + 2 * config.num_kv_heads) * config.head_dim,
        FF2: 2 * config.intermediate_size,
        # MoE (registry Params; 0 for dense architectures, which have no such roles)
        E: int(config.params.get("num_experts", 0)),
        MFF: int(config.params.get("moe_intermediate_size", 0)),
    }


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> canonical shape of every tensor a model with `config` must have."""
    arch = declared(config.architecture)
    size = dims(config)
    out = {name: tuple(size[d] for d in shape) for name, shape in GLOBAL_ROLES.items()}
    head = out.pop(LM_HEAD)
    for i in range(config.num_layers):
        for suffix, shape in arch.layer_roles.items():
            out[f"model.layers.{i}.{suffix}"] = tuple(size[d] for d in shape)
        for expert in range(size[E]):
            for suffix, shape in arch.expert_roles.items():
                out[expert_name(i, expert, suffix)] = tuple(size[d] for d in shape)
    if not config.tie_word_embeddings:
        out[LM_HEAD] = head
    return out


def layer_index(name: str) -> int | None:
    """`model.layers.7.mlp.up_proj.weight` -> 7; None for tensors outside the layer stack."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


__all__ = ["ARCHITECTURES", "Architecture", "HF_ARCHITECTURES", "SUPPORTED", "dims", "expected_tensors", "get", "layer_index"]
