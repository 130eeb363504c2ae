"""HF <-> GGUF tensor names for qwen2 and llama (gguf-py's TENSOR_NAMES, written out).

The table is explicit rather than taken from `gguf.get_tensor_name_map`, whose many aliases map
several HF spellings onto one GGUF name; a converter needs a bijection it can check.
"""

from __future__ import annotations

import re

# Names outside the layer stack.
GLOBAL_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Suffixes inside `model.layers.N.` <-> `blk.N.`.
LAYER_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_GGUF_TO_HF = {v: k for k, v in GLOBAL_HF_TO_GGUF.items()}
LAYER_GGUF_TO_HF = {v: k for k, v in LAYER_HF_TO_GGUF.items()}

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_to_gguf(name: str) -> str | None:
    """Canonical HF name -> GGUF name, or None if the name has no GGUF counterpart."""
    if name in GLOBAL_HF_TO_GGUF:
        return GLOBAL_HF_TO_GGUF[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in LAYER_HF_TO_GGUF:
        return f"blk.{m.group(1)}.{LAYER_HF_TO_GGUF[m.group(2)]}"
    return None


def gguf_to_hf(name: str) -> str | None:
    """GGUF name -> canonical HF name, or None if unknown."""
    if name in GLOBAL_GGUF_TO_HF:
        return GLOBAL_GGUF_TO_HF[name]
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in LAYER_GGUF_TO_HF:
        return f"model.layers.{m.group(1)}.{LAYER_GGUF_TO_HF[m.group(2)]}"
    return None


def is_qk_projection(name: str) -> tuple[bool, bool]:
    """(is a q_proj tensor, is a k_proj tensor) for a canonical name."""
    return ".self_attn.q_proj." in name, ".self_attn.k_proj." in name
