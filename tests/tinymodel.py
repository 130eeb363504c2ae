"""The tests' one builder of tiny models: config, tokenizer, tensors and write plan.

Imported as `from tinymodel import ...` (pytest's rootdir-relative import mode puts tests/ on
sys.path, as for workflow_copy). Every builder is deterministic: the same arguments give the same
plan and so the same written bytes, which the malformed-file tests rely on (they break fields at
offsets of a file written from one of these plans).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from convqa import encodings
from convqa.arch import expected_tensors
from convqa.model import LazyTensor, ModelConfig, TokenizerSpec, WritePlan, WriterQuirks

# --- config -----------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    # The smallest shapes with grouped-query attention (2 heads, 1 KV head, head_dim 4).
    "micro": dict(
        vocab_size=16, hidden_size=8, intermediate_size=12, num_heads=2, num_kv_heads=1, head_dim=4,
        max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
    # Every last dimension a multiple of 32, so Q8_0 can hold every weight; vocab 96 leaves room
    # for a shorter tokenizer. rope_theta is Qwen2's for qwen2 and SmolLM2's for llama.
    "q8": dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
        max_position_embeddings=256, rope_theta={"qwen2": 1000000.0, "llama": 100000.0}, rms_norm_eps=1e-6,
    ),
    # Q8_0-able too, one 32 wide.
    "q8-narrow": dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, head_dim=16,
        max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
}  # fmt: skip


def tiny_config(
    architecture: str = "llama", *, preset: str = "micro", tied: bool = False, layers: int = 2, **fields
) -> ModelConfig:
    """A ModelConfig of PRESETS[preset]; any ModelConfig field can be overridden by keyword."""
    values = dict(PRESETS[preset])
    if isinstance(values["rope_theta"], dict):
        values["rope_theta"] = values["rope_theta"][architecture]
    config = ModelConfig(architecture=architecture, num_layers=layers, tie_word_embeddings=tied, **values)
    return config.replace(**fields)


# --- tokenizer --------------------------------------------------------------------------------


def _bpe() -> TokenizerSpec:
    """A small byte-level BPE vocabulary (83 tokens), deliberately shorter than the q8 preset's 96 rows."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(ord("!"), ord("!") + 80)]
    merged = ["ab", "abc"]
    tokens = specials + chars + merged
    return TokenizerSpec(
        model="gpt2",
        pre="qwen2",
        tokens=tokens,
        token_types=[3] * len(specials) + [1] * (len(chars) + len(merged)),
        merges=["a b", "ab c"],
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        add_bos_token=False,
        chat_template="{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    )


def _json_escapes() -> TokenizerSpec:
    """16 tokens (the micro vocab) full of JSON-escape cases: non-ASCII, a quote, backslash, slash, newline."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "é", "Ġhello", '"q\\/', "\n"] + [
        f"t{i}" for i in range(7)
    ]
    return TokenizerSpec(
        model="gpt2",
        pre="smollm",
        tokens=tokens,
        token_types=[2, 3, 3, 3, 3] + [1] * (len(tokens) - 5),
        merges=["Ġ h", "h e", "é é"],
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
        pad_token_id=2,
        add_bos_token=True,
        add_eos_token=False,
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n\"{{ m.content }}\"<|im_end|>{% endfor %}",
    )


def _plain() -> TokenizerSpec:
    """<s>, </s> and t0..t13: exactly the micro vocab's 16 tokens, one merge, no template."""
    return TokenizerSpec(
        model="gpt2",
        pre="smollm",
        tokens=["<s>", "</s>"] + [f"t{i}" for i in range(14)],
        token_types=[3, 3] + [1] * 14,
        merges=["t 1"],
        bos_token_id=0,
        eos_token_id=1,
    )


def _merges() -> TokenizerSpec:
    """Six tokens built by two merges, a one-expression chat template."""
    return TokenizerSpec(
        model="gpt2",
        pre="smollm",
        tokens=["<s>", "a", "b", "ab", "c", "abc"],
        token_types=[3, 1, 1, 1, 1, 1],
        merges=["a b", "ab c"],
        bos_token_id=0,
        eos_token_id=0,
        chat_template="{{ messages }}",
    )


TOKENIZERS: dict[str, Callable[[], TokenizerSpec]] = {
    "bpe": _bpe,
    "json-escapes": _json_escapes,
    "plain": _plain,
    "merges": _merges,
}


def tiny_tokenizer(kind: str = "bpe") -> TokenizerSpec:
    """A fresh TokenizerSpec of one of the TOKENIZERS kinds."""
    return TOKENIZERS[kind]()


# --- tensors ----------------------------------------------------------------------------------


def raw_tensor(name: str, shape: tuple, encoding: encodings.Encoding, raw: np.ndarray) -> LazyTensor:
    """A tensor whose stored bytes are `raw` (any dtype, viewed as flat uint8), exactly as given."""
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    assert raw.size == encoding.nbytes(shape)
    return LazyTensor(name=name, shape=shape, encoding=encoding, load_raw=lambda: raw)


def const_tensor(name: str, values: np.ndarray, encoding: encodings.Encoding = encodings.F32) -> LazyTensor:
    """A tensor of float `values` stored in `encoding` (encoded once, here)."""
    stored = encoding.encode(values)
    return LazyTensor(name, values.shape, encoding, lambda: stored)


def random_tensor(name: str, shape: tuple, encoding: encodings.Encoding, rng: np.random.Generator) -> LazyTensor:
    """Random stored bytes: every bit pattern (NaN payloads included) must survive unchanged."""
    return raw_tensor(name, shape, encoding, rng.integers(0, 256, encoding.nbytes(shape), dtype=np.uint8))


def position_values(shape: tuple) -> np.ndarray:
    """W[i, j] = 1000 * i + j in F32 (exact): any transpose, reshape or row shuffle changes some value."""
    rows, cols = shape
    return (1000 * np.arange(rows)[:, None] + np.arange(cols)[None, :]).astype("<f4")


def position_tensor(name: str, rows: int, cols: int) -> LazyTensor:
    """An F32 tensor of position_values((rows, cols))."""
    return const_tensor(name, position_values((rows, cols)), encodings.F32)


def tiny_values(
    config: ModelConfig, rng: np.random.Generator, *, std: float | None = None, position: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """F32 values for every tensor of `config`, in expected_tensors order: position_values for the
    names in `position` (drawing nothing from rng), otherwise rng.standard_normal or, with `std`,
    rng.normal(0, std)."""
    position = set(position)
    values = {}
    for name, shape in expected_tensors(config).items():
        if name in position:
            values[name] = position_values(shape)
        elif std is None:
            values[name] = rng.standard_normal(shape).astype("<f4")
        else:
            values[name] = rng.normal(0, std, size=shape).astype(np.float32)
    return values


EncodingChoice = encodings.Encoding | Callable[[str, tuple], encodings.Encoding]


def weights_in(
    encoding: encodings.Encoding, *, keep_f32: Iterable[str] = ()
) -> Callable[[str, tuple], encodings.Encoding]:
    """2-D weights in `encoding`, norms and biases (and the names in keep_f32) F32, as llama.cpp's convert does."""
    keep_f32 = set(keep_f32)
    return lambda name, shape: encoding if len(shape) == 2 and name not in keep_f32 else encodings.F32


# --- plan -------------------------------------------------------------------------------------


def tiny_plan(
    config: ModelConfig,
    source: dict[str, np.ndarray] | np.random.Generator,
    encoding: EncodingChoice = encodings.F32,
    *,
    tokenizer: TokenizerSpec | None = None,
    metadata: dict | None = None,
    quirks: WriterQuirks | None = None,
) -> WritePlan:
    """A WritePlan of every tensor of `config`, in expected_tensors order.

    source: a dict of float values (tiny_values; encoded into `encoding`), or an rng (random
    stored bytes in `encoding`, drawn tensor by tensor). encoding: one for all tensors, or a
    function (name, shape) -> encoding such as weights_in(...). metadata defaults to
    {"converter": "test"}.
    """
    choose = encoding if callable(encoding) else (lambda name, shape: encoding)
    tensors = []
    for name, shape in expected_tensors(config).items():
        if isinstance(source, np.random.Generator):
            tensors.append(random_tensor(name, shape, choose(name, shape), rng=source))
        else:
            tensors.append(const_tensor(name, source[name], choose(name, shape)))
    return WritePlan(
        config=config,
        tokenizer=tokenizer,
        tensors=tensors,
        metadata={"converter": "test"} if metadata is None else metadata,
        quirks=WriterQuirks() if quirks is None else quirks,
    )


def rewrite_gguf(source, target, *, drop=frozenset(), retype=None, replace=None) -> None:
    """Copy a GGUF with gguf-py, to build bad files: `drop` keys, give a scalar another value
    type (`retype`: key -> GGUFValueType), or pass a key's contents through `replace[key]`."""
    import gguf
    from gguf.constants import GGUFValueType

    retype, replace = retype or {}, replace or {}
    reader = gguf.GGUFReader(source, "r")
    writer = gguf.GGUFWriter(target, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in drop or key == "general.architecture":
            continue
        contents = replace[key](field.contents()) if key in replace else field.contents()
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, contents, retype.get(key, field.types[0]), sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
