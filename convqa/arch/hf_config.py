"""HF `config.json` <-> ModelConfig, following transformers 5.23's config classes of every
registry architecture (Qwen2/Qwen3/Llama/Mistral/Gemma2/Gemma3TextConfig).

Reading applies the defaults transformers applies when a key is absent (so the ModelConfig
describes the computation `from_pretrained` would run), refuses what convqa cannot carry
faithfully into GGUF/APR (RoPE scaling, biases on llama, sliding windows in use, other
activations, pre-quantized checkpoints; for gemma: a layer pattern, query scaling or soft-capping
llama.cpp does not run), and requires the geometry keys outright. Both dialects
are read: transformers 4.x (`rope_theta` at the top level, `rope_scaling`, `torch_dtype`) and
5.x (`rope_parameters`, `dtype`, `layer_types`). Writing produces the dict transformers 5.23 itself
saves for the same model: `rope_parameters` instead of the legacy top-level `rope_theta`.
"""

from __future__ import annotations

import math
import os

from convqa.arch import SUPPORTED, registry
from convqa.errors import FormatError
from convqa.model import ModelConfig, TokenizerSpec

CONFIG_FILE = "config.json"

# Keys without a default we would trust: a model without them is not a model we can describe.
_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

# Dataclass defaults of transformers 5.23's config classes for the optional keys we map.
# Note Qwen2Config's num_key_value_heads default is 32, not num_attention_heads: only an explicit
# null falls back to num_attention_heads (Qwen2Config.__post_init__). head_dim None: hidden/heads.
_COMMON = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": None}
_GEMMA = {"tie_word_embeddings": True, "num_key_value_heads": 4, "head_dim": 256, "sliding_window": 4096}
_DEFAULTS = {
    "qwen2": _COMMON | {"max_position_embeddings": 32768, "num_key_value_heads": 32},
    "llama": _COMMON | {"max_position_embeddings": 2048, "num_key_value_heads": None},
    "qwen3": _COMMON | {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
    "mistral": _COMMON | {"max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
    "gemma3": _COMMON | _GEMMA | {"max_position_embeddings": 131072, "rope_local_base_freq": 10000.0},
    "phi3": _COMMON | {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "num_key_value_heads": None, "sliding_window": None},
    "gemma2": _COMMON | _GEMMA | {"max_position_embeddings": 8192, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "qwen3_moe": _COMMON | {"max_position_embeddings": 32768, "num_key_value_heads": 4, "head_dim": None,
                            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
}
# transformers 5.23's GGUF loader: moe_intermediate_size is never read from GGUF (stays 768)
TRANSFORMERS_GGUF_MOE_FF = 768
GEMMA_ACTIVATION = "gelu_pytorch_tanh"
# transformers' RoPE default when a config names no theta (modeling_rope_utils).
DEFAULT_ROPE_THETA = 10000.0
# RoPE types that mean "plain RoPE with rope_theta" in transformers; anything else rescales frequencies.
_PLAIN_ROPE_TYPES = (None, "default")
_ARCH_BY_HF_CLASS = {cls: arch.name for cls, arch in registry.BY_HF_CLASS.items()}
_ARCH_BY_MODEL_TYPE = {mt: arch.name for mt, arch in registry.BY_MODEL_TYPE.items()}


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

    head_dim = hf.get("head_dim", defaults["head_dim"])
    head_dim = hidden // heads if head_dim is None else _positive_int({"head_dim": head_dim}, "head_dim", path)
    if head_dim % 2:
        raise FormatError(path, f"head_dim {head_dim} is odd; RoPE needs pairs", field="head_dim")

    _refuse_unsupported(hf, arch, path)
    if arch == "gemma3":
        rope_theta, local_theta = _gemma3_rope(hf, path)
        params = {"rope_local_theta": local_theta}
    else:
        rope_theta, params = _rope_theta(hf, path), {}
    if arch in ("gemma2", "gemma3"):
        params |= _gemma_params(hf, arch, layers, head_dim, path)
    if registry.get(arch).expert_roles:
        params |= _moe_params(hf, arch, path)
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
        rope_theta=rope_theta,
        rms_norm_eps=_positive_float(hf.get("rms_norm_eps", defaults["rms_norm_eps"]), "rms_norm_eps", path),
        tie_word_embeddings=_bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"]), "tie_word_embeddings", path),
        params=params,
    )


def _moe_params(hf: dict, arch: str, path) -> dict:
    """Qwen3-MoE's expert geometry; refuses what llama.cpp's qwen3moe graph cannot run as written."""
    d = _DEFAULTS[arch]
    if "num_local_experts" in hf:  # transformers 5.23 saves num_experts under this name; the Hub's configs: num_experts
        hf = {**hf, "num_experts": hf["num_local_experts"]}
    params = {k: _positive_int({k: hf.get(k, d[k])}, k, path) for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size")}
    if params["num_experts_per_tok"] > params["num_experts"]:
        raise FormatError(path, f"num_experts_per_tok {params['num_experts_per_tok']} exceeds num_experts {params['num_experts']}",
                          field="num_experts_per_tok")
    if not hf.get("norm_topk_prob", False):
        raise FormatError(path, "unsupported: norm_topk_prob is false; llama.cpp's qwen3moe always renormalises the top-k "
                                "router weights (and transformers' GGUF loader sets it true)", field="norm_topk_prob")
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise FormatError(path, "unsupported: dense MLP layers (decoder_sparse_step != 1 or mlp_only_layers); "
                                "GGUF's qwen3moe has experts in every layer", field="mlp_only_layers")
    return params


def _gemma_params(hf: dict, arch: str, layers: int, head_dim: int, path) -> dict:
    """Gemma 2/3: what llama.cpp runs is fixed (pattern, query scale); refuse any other value."""
    defaults = _DEFAULTS[arch]
    act = hf.get("hidden_activation", GEMMA_ACTIVATION)
    if act != GEMMA_ACTIVATION:
        raise FormatError(path, f"unsupported hidden_activation {act!r}; llama.cpp's {arch} graph uses {GEMMA_ACTIVATION}",
                          field="hidden_activation")
    # llama.cpp scales queries by 1/sqrt(head_dim) for every gemma 2/3 but the 27B.
    scalar = hf.get("query_pre_attn_scalar", 256)
    if scalar != head_dim:
        raise FormatError(path, f"unsupported query_pre_attn_scalar {scalar!r}: llama.cpp's {arch} scales queries by "
                                f"head_dim ({head_dim})", field="query_pre_attn_scalar")
    pattern = gemma_layer_types(arch, layers)
    layer_types = hf.get("layer_types")
    if layer_types is not None and list(layer_types) != pattern:
        raise FormatError(path, f"unsupported layer_types {layer_types!r}: llama.cpp's {arch} runs {pattern}", field="layer_types")
    if hf.get("use_bidirectional_attention"):
        raise FormatError(path, "unsupported: use_bidirectional_attention (an encoder) on a causal LM", field="use_bidirectional_attention")
    window = hf.get("sliding_window", defaults["sliding_window"])
    params = {"sliding_window": _positive_int({"sliding_window": window}, "sliding_window", path)}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = hf.get(key, defaults.get(key))
        if arch == "gemma3":
            if value is not None:
                raise FormatError(path, f"unsupported {key} {value!r}: llama.cpp's gemma3 does not soft-cap", field=key)
        else:
            if value is None:
                raise FormatError(path, f"unsupported: {key} null; llama.cpp's gemma2 always soft-caps", field=key)
            params[key] = _positive_float(value, key, path)
    return params


def gemma_layer_types(arch: str, layers: int) -> list[str]:
    """llama.cpp's fixed gemma pattern (`set_swa_pattern`): every n-th layer attends globally."""
    n = registry.get(arch).swa_pattern
    return ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(layers)]


def _gemma3_rope(hf: dict, path) -> tuple[float, float]:
    """(global theta, sliding-layer theta): transformers 5 nests them by layer type; 4.x has
    rope_theta, rope_local_base_freq and rope_scaling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):
        thetas = []
        for kind, default in (("full_attention", 1000000.0), ("sliding_attention", 10000.0)):
            one = params.get(kind, {})
            thetas.append(_rope_theta({"rope_parameters": one}, path) if "rope_theta" in one else default)
        return thetas[0], thetas[1]
    theta = _rope_theta(hf, path) if ("rope_theta" in hf or params or hf.get("rope_scaling")) else 1000000.0
    local = _positive_float(hf.get("rope_local_base_freq", 10000.0), "rope_local_base_freq", path)
    return theta, local


def hf_config_from(config: ModelConfig, tokenizer: TokenizerSpec | None, *, dtype: str = "float32") -> dict:
    """The config.json transformers 5.23 loads into the same Qwen2ForCausalLM / LlamaForCausalLM.

    Special token ids come from the tokenizer and are written even when absent (as null), so
    LlamaConfig's bos=1/eos=2 defaults never sneak in.
    """
    if config.architecture not in SUPPORTED:
        raise FormatError(None, f"architecture {config.architecture!r} unsupported; expected one of {SUPPORTED}")
    arch = registry.get(config.architecture)
    hf = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
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
    if arch.name in ("llama", "mistral"):
        hf |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
        if arch.name == "mistral":
            hf = {k: v for k, v in hf.items() if k not in ("mlp_bias", "pretraining_tp")} | {"sliding_window": None}
    elif arch.name in ("gemma2", "gemma3"):
        del hf["hidden_act"]
        p = config.params
        hf |= {
            "hidden_activation": GEMMA_ACTIVATION,
            "query_pre_attn_scalar": config.head_dim,
            "sliding_window": p["sliding_window"],
            "layer_types": gemma_layer_types(arch.name, config.num_layers),
            "attention_bias": False,
            "use_bidirectional_attention": False,
            "attn_logit_softcapping": p.get("attn_logit_softcapping"),
            "final_logit_softcapping": p.get("final_logit_softcapping"),
        }
        if arch.name == "gemma3":
            hf["rope_parameters"] = {
                "full_attention": {"rope_theta": config.rope_theta, "rope_type": "default"},
                "sliding_attention": {"rope_theta": p["rope_local_theta"], "rope_type": "default"},
            }
    elif arch.name == "phi3":
        hf |= {"sliding_window": None, "original_max_position_embeddings": config.max_position_embeddings}
        del hf["head_dim"]  # Phi3Config derives it (hidden / heads); it has no such key
    else:
        if arch.name in ("qwen3", "qwen3_moe"):
            hf["attention_bias"] = False
        if arch.expert_roles:
            p = config.params
            hf |= {
                "num_experts": p["num_experts"],
                "num_experts_per_tok": p["num_experts_per_tok"],
                "moe_intermediate_size": p["moe_intermediate_size"],
                "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            }
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
        if model_type is not None and _ARCH_BY_MODEL_TYPE.get(model_type) != from_class:
            raise FormatError(path, f"model_type {model_type!r} contradicts architectures {classes!r}", field="model_type")
        return from_class
    if model_type is None:
        raise FormatError(path, f"missing required key 'model_type' in {CONFIG_FILE}", field="model_type")
    if model_type not in _ARCH_BY_MODEL_TYPE:
        raise FormatError(path, f"unsupported model_type {model_type!r}; supported: {tuple(_ARCH_BY_MODEL_TYPE)}", field="model_type")
    return _ARCH_BY_MODEL_TYPE[model_type]


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
        # partial_rotary_factor 1.0 (phi3 writes it) rotates whole heads: plain RoPE
        if set(params) - {"rope_type", "type", "rope_theta"} - ({"partial_rotary_factor"} if params.get("partial_rotary_factor") == 1.0 else set()):
            raise FormatError(path, f"unsupported RoPE parameters {sorted(params)}", field=key)
        if "rope_theta" in params:
            thetas[f"{key}.rope_theta"] = params["rope_theta"]
    values = {_positive_float(v, k, path) for k, v in thetas.items()}
    if len(values) > 1:
        raise FormatError(path, f"conflicting RoPE theta values {thetas}", field="rope_theta")
    return values.pop() if values else DEFAULT_ROPE_THETA


def _refuse_unsupported(hf: dict, arch: str, path) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu" and not registry.get(arch).norm_offset:  # gemma: hidden_activation, checked with its params
        raise FormatError(path, f"unsupported hidden_act {act!r}; llama.cpp's {arch} graph uses silu", field="hidden_act")
    if arch in ("llama", "mistral", "qwen3", "qwen3_moe", "gemma2", "gemma3"):
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key, False):
                raise FormatError(path, f"unsupported: {key} is true; the llama tensor set has no biases", field=key)
    if arch in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window", False):
        raise FormatError(path, f"unsupported: use_sliding_window is true; GGUF's {arch} has no sliding window", field="use_sliding_window")
    if arch in ("mistral", "phi3"):
        # transformers' GGUF loader reads no sliding window for either: only one that never
        # binds (no shorter than the context) converts to a GGUF both engines run alike.
        window = hf.get("sliding_window", _DEFAULTS[arch]["sliding_window"])
        context = hf.get("max_position_embeddings", _DEFAULTS[arch]["max_position_embeddings"])
        if window is not None and (not isinstance(context, int) or window < context):
            raise FormatError(path, f"unsupported: sliding_window {window!r} on {arch} with a {context!r}-token context; "
                                    "convqa carries only a window that never binds", field="sliding_window")
    if arch == "phi3":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 1.0
        if factor != 1.0:
            raise FormatError(path, f"unsupported partial_rotary_factor {factor!r}; GGUF's phi3 rotates whole heads",
                              field="partial_rotary_factor")
    if arch == "llama" and hf.get("sliding_window") is not None:
        raise FormatError(path, f"unsupported: sliding_window {hf['sliding_window']!r} on llama; GGUF's llama attends to the whole context",
                          field="sliding_window")
    # transformers 5 spells the attention pattern per layer; anything but full attention is a window.
    layer_types = hf.get("layer_types")
    if layer_types is not None and not registry.get(arch).swa_pattern:  # gemma: its fixed pattern, checked with its params
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
