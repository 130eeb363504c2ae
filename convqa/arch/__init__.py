"""Per-architecture knowledge: which tensors a model has, their shapes, and their names.

Supported architectures use llama.cpp's names: `qwen2` (Qwen2ForCausalLM: q/k/v biases, NeoX
RoPE, no Q/K permutation) and `llama` (LlamaForCausalLM: no biases, Q/K permuted in GGUF).
"""

from __future__ import annotations

from convqa.model import ModelConfig

SUPPORTED = ("qwen2", "llama")
HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
HAS_QKV_BIAS = {"qwen2": True, "llama": False}
PERMUTES_QK_IN_GGUF = {"qwen2": False, "llama": True}


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> canonical shape of every tensor a model with `config` must have."""
    h, v, ff = config.hidden_size, config.vocab_size, config.intermediate_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q_rows, h)
        out[p + "self_attn.k_proj.weight"] = (kv_rows, h)
        out[p + "self_attn.v_proj.weight"] = (kv_rows, h)
        if HAS_QKV_BIAS[config.architecture]:
            out[p + "self_attn.q_proj.bias"] = (q_rows,)
            out[p + "self_attn.k_proj.bias"] = (kv_rows,)
            out[p + "self_attn.v_proj.bias"] = (kv_rows,)
        out[p + "self_attn.o_proj.weight"] = (h, q_rows)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (ff, h)
        out[p + "mlp.up_proj.weight"] = (ff, h)
        out[p + "mlp.down_proj.weight"] = (h, ff)
    out["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def layer_index(name: str) -> int | None:
    """`model.layers.7.mlp.up_proj.weight` -> 7; None for tensors outside the layer stack."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None
