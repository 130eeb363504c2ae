"""HF `config.json` <-> ModelConfig, following transformers 5.23's Qwen2Config and LlamaConfig.

Reading applies the defaults transformers applies when a key is absent (so the ModelConfig
describes the computation `from_pretrained` would run), refuses what convqa cannot carry
faithfully into GGUF/APR (RoPE scaling, biases on llama, sliding windows in use, other
activations, pre-quantized checkpoints), and requires the geometry keys outright. Both dialects
are read: transformers 4.x (`rope_theta` at the top level, `rope_scaling`, `torch_dtype`) and
5.x (`rope_parameters`, `dtype`, `layer_types`). Writing produces the dict transformers 5.23 itself
saves for the same model: `rope_parameters` instead of the legacy top-level `rope_theta`.
"""

from __future__ import annotations

import math
import os

from convqa.arch import HF_ARCHITECTURES, SUPPORTED
from convqa.errors import FormatError
from convqa.model import ModelConfig, TokenizerSpec

CONFIG_FILE = "config.json"

# Keys without a default we would trust: a model without them is not a model we can describe.
_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

# Dataclass defaults of transformers 5.23 Qwen2Config / LlamaConfig for the optional keys we map.
# Note Qwen2Config's num_key_value_heads default is 32, not num_attention_heads: only an explicit
# null falls back to num_attention_heads (Qwen2Config.__post_init__).
_DEFAULTS = {
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": 32},
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_key_value_heads": None},
}
# transformers' RoPE default when a config names no theta (modeling_rope_utils).
DEFAULT_ROPE_THETA = 10000.0
# RoPE types that mean "plain RoPE with rope_theta" in transformers; anything else rescales frequencies.
_PLAIN_ROPE_TYPES = (None, "default")
_ARCH_BY_HF_CLASS = {cls: arch for arch, cls in HF_ARCHITECTURES.items()}


def config_from_hf(hf: dict, path: str | os.PathLike | None) -> ModelConfig:
    """Map an HF config dict to ModelConfig; `path` names the config.json in errors."""
    if not isinstance(hf, dict):
        raise FormatError(path, f"{CONFIG_FILE} must hold a JSON object, got {type(hf).__name__}")
    arch = _architecture(hf, path)
    defaults = _DEFAULTS[arch]
    hidden, ff, layers, heads, vocab = (_positive_int(hf, key, path) for key in _REQUIRED_INTS)

    kv_heads = hf.get("num_key_value_heads", defaults["num_key_value_heads"])
    kv_heads = heads if kv_heads is None else _positive_int({"num_key_value_heads": kv_heads}, "num_key_value_heads", path)
    if heads % kv_heads:
        raise FormatError(
            path, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}", field="num_key_value_heads"
        )

    head_dim = hf.get("head_dim")
    head_dim = hidden // heads if head_dim is None else _positive_int(hf, "head_dim", path)
    if head_dim % 2:
        raise FormatError(path, f"head_dim {head_dim} is odd; RoPE needs pairs", field="head_dim")

    _refuse_unsupported(hf, arch, path)
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ff,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_positive_int(
            {"max_position_embeddings": hf.get("max_position_embeddings", defaults["max_position_embeddings"])},
            "max_position_embeddings",
            path,
        ),
        rope_theta=_rope_theta(hf, path),
        rms_norm_eps=_positive_float(hf.get("rms_norm_eps", defaults["rms_norm_eps"]), "rms_norm_eps", path),
        tie_word_embeddings=_bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"]), "tie_word_embeddings", path),
    )


def hf_config_from(config: ModelConfig, tokenizer: TokenizerSpec | None, *, dtype: str = "float32") -> dict:
    """The config.json transformers 5.23 loads into the same Qwen2ForCausalLM / LlamaForCausalLM.

    Special token ids come from the tokenizer and are written even when absent (as null), so
    LlamaConfig's bos=1/eos=2 defaults never sneak in.
    """
    if config.architecture not in SUPPORTED:
        raise FormatError(None, f"architecture {config.architecture!r} unsupported; expected one of {SUPPORTED}")
    hf = {
        "architectures": [HF_ARCHITECTURES[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
        **_special_token_ids(tokenizer),
    }
    if config.architecture == "llama":
        hf |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    else:
        hf |= {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": config.num_layers,
            "layer_types": ["full_attention"] * config.num_layers,
        }
    return dict(sorted(hf.items()))


def generation_config_from(tokenizer: TokenizerSpec | None) -> dict:
    """generation_config.json: the special ids generation stops and pads with (greedy by default)."""
    return {key: value for key, value in _special_token_ids(tokenizer).items() if value is not None}


def _special_token_ids(tokenizer: TokenizerSpec | None) -> dict:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _architecture(hf: dict, path) -> str:
    model_type = hf.get("model_type")
    classes = hf.get("architectures")
    if classes is not None:
        if not isinstance(classes, list) or len(classes) != 1 or not isinstance(classes[0], str):
            raise FormatError(path, f"architectures must be a list of one class name, got {classes!r}", field="architectures")
        from_class = _ARCH_BY_HF_CLASS.get(classes[0])
        if from_class is None:
            raise FormatError(
                path, f"unsupported architecture {classes[0]!r}; supported: {sorted(_ARCH_BY_HF_CLASS)}", field="architectures"
            )
        if model_type is not None and model_type != from_class:
            raise FormatError(path, f"model_type {model_type!r} contradicts architectures {classes!r}", field="model_type")
        model_type = from_class
    if model_type is None:
        raise FormatError(path, f"missing required key 'model_type' in {CONFIG_FILE}", field="model_type")
    if model_type not in SUPPORTED:
        raise FormatError(path, f"unsupported model_type {model_type!r}; supported: {SUPPORTED}", field="model_type")
    return model_type


def _rope_theta(hf: dict, path) -> float:
    """rope_theta from wherever transformers 4 or 5 put it; refuse every scaled RoPE.

    transformers 5 writes `rope_parameters: {rope_theta, rope_type}`; older configs have a
    top-level `rope_theta` and `rope_scaling: null | {type|rope_type, factor, ...}`.
    """
    thetas = {}
    if "rope_theta" in hf:
        thetas["rope_theta"] = hf["rope_theta"]
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise FormatError(path, f"{key} must be an object or null, got {params!r}", field=key)
        rope_type = params.get("rope_type", params.get("type"))
        if rope_type not in _PLAIN_ROPE_TYPES:
            raise FormatError(path, f"unsupported RoPE scaling {rope_type!r}; only plain RoPE converts faithfully", field=key)
        if set(params) - {"rope_type", "type", "rope_theta"}:
            raise FormatError(path, f"unsupported RoPE parameters {sorted(params)}", field=key)
        if "rope_theta" in params:
            thetas[f"{key}.rope_theta"] = params["rope_theta"]
    values = {_positive_float(v, k, path) for k, v in thetas.items()}
    if len(values) > 1:
        raise FormatError(path, f"conflicting RoPE theta values {thetas}", field="rope_theta")
    return values.pop() if values else DEFAULT_ROPE_THETA


def _refuse_unsupported(hf: dict, arch: str, path) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise FormatError(path, f"unsupported hidden_act {act!r}; llama.cpp's {arch} graph uses silu", field="hidden_act")
    if arch == "llama":
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key, False):
                raise FormatError(path, f"unsupported: {key} is true; the llama tensor set has no biases", field=key)
    if arch == "qwen2" and hf.get("use_sliding_window", False):
        raise FormatError(path, "unsupported: use_sliding_window is true; GGUF's qwen2 has no sliding window", field="use_sliding_window")
    if arch == "llama" and hf.get("sliding_window") is not None:
        raise FormatError(path, f"unsupported: sliding_window {hf['sliding_window']!r} on llama; GGUF's llama attends to the whole context",
                          field="sliding_window")
    # transformers 5 spells the attention pattern per layer; anything but full attention is a window.
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            raise FormatError(path, f"unsupported layer_types {layer_types!r}: only full attention converts faithfully", field="layer_types")
    if hf.get("quantization_config") is not None:
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
        raise FormatError(path, f"unsupported: a pre-quantized checkpoint (quantization_config, quant_method {method!r}); "
                                "its tensors are packed weights and scales, not the model's weights", field="quantization_config")
    _check_dtype(hf, path)


# What transformers 4 (`torch_dtype`) and 5 (`dtype`) write: the dtype the checkpoint is meant to
# load in. The tensors' own dtypes are what convqa reads; this is checked so that a config
# claiming what no reader can honour is refused rather than ignored.
_CONFIG_DTYPES = ("float32", "float16", "bfloat16", "auto")


def _check_dtype(hf: dict, path) -> None:
    named = {key: hf[key] for key in ("torch_dtype", "dtype") if hf.get(key) is not None}
    for key, value in named.items():
        if value not in _CONFIG_DTYPES:
            raise FormatError(path, f"unsupported {key} {value!r}; expected one of {_CONFIG_DTYPES}", field=key)
    if len(set(named.values())) > 1:
        raise FormatError(path, f"torch_dtype {named['torch_dtype']!r} contradicts dtype {named['dtype']!r}", field="dtype")


def _positive_int(hf: dict, key: str, path) -> int:
    if key not in hf:
        raise FormatError(path, f"missing required key {key!r} in {CONFIG_FILE}", field=key)
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FormatError(path, f"{key} must be a positive integer, got {value!r}", field=key)
    return value


def _positive_float(value, key: str, path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FormatError(path, f"{key} must be a positive finite number, got {value!r}", field=key)
    return float(value)


def _bool(value, key: str, path) -> bool:
    if not isinstance(value, bool):
        raise FormatError(path, f"{key} must be true or false, got {value!r}", field=key)
    return value
