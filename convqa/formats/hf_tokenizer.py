"""HF tokenizer files (tokenizer.json + tokenizer_config.json) <-> TokenizerSpec.

Only byte-level BPE (`tokenizer.ggml.model = gpt2`) is carried: the tokenizer of Qwen2 and
SmolLM2. The pre-tokenizer is identified by llama.cpp's name (`tokenizer.ggml.pre`) by comparing
tokenizer.json's pre_tokenizer with the pipelines below, and written back as that pipeline, so a
file that goes S -> G -> S splits text the way llama.cpp does for that name
(llama.cpp `src/llama-vocab.cpp` `llama_vocab::impl::load` regexes; transformers 5.23
`integrations/gguf/gguf_tokenizer_mapping.py` GGUF_PRE_TOKENIZER_SPLITS):

- `qwen2`: Split(Qwen2 regex, isolated) then ByteLevel without its own regex.
- `llama-bpe`: Split(Llama 3 regex, isolated) then ByteLevel without regex, `ignore_merges`.
- `smollm`: Digits(individual) then ByteLevel with the GPT-2 regex (llama.cpp: `\\p{N}` then GPT-2).
- `gpt2`: ByteLevel with the GPT-2 regex.

Token types follow llama.cpp's convert_hf_to_gguf.py `get_vocab_base`: added special tokens are
CONTROL, other added tokens USER_DEFINED, ids missing from the vocabulary become `[PAD{id}]`
UNUSED (up to config.json's vocab_size when the directory has one), the rest NORMAL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from convqa.errors import ConversionError, FormatError
from convqa.files import write_json
from convqa.model import TokenizerSpec

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# llama.cpp token types (gguf.TokenType).
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5

# The regexes as the models' own tokenizer.json files spell them (Oniguruma syntax).
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Per llama.cpp pre-tokenizer: the pipeline steps as (type, options that change the split), and
# the BPE model's ignore_merges flag (llama.cpp sets it for llama-bpe only). trim_offsets is left
# out: it moves offsets, never ids.
_PRE_PIPELINES = {
    "qwen2": (
        (
            ("Split", (("behavior", "Isolated"), ("invert", False), ("pattern", QWEN2_SPLIT))),
            ("ByteLevel", (("add_prefix_space", False), ("use_regex", False))),
        ),
        False,
    ),
    "llama-bpe": (
        (
            ("Split", (("behavior", "Isolated"), ("invert", False), ("pattern", LLAMA3_SPLIT))),
            ("ByteLevel", (("add_prefix_space", False), ("use_regex", False))),
        ),
        True,
    ),
    "smollm": (
        (("Digits", (("individual_digits", True),)), ("ByteLevel", (("add_prefix_space", False), ("use_regex", True)))),
        False,
    ),
    "gpt-2": ((("ByteLevel", (("add_prefix_space", False), ("use_regex", True))),), False),
}
SUPPORTED_PRE = tuple(_PRE_PIPELINES)
# Normalizers llama.cpp does not run either; any other normalizer changes ids and is refused.
_IGNORED_NORMALIZERS = (None, "NFC")


def tokenizer_from_hf_dir(directory: str | os.PathLike) -> TokenizerSpec | None:
    """Read the tokenizer of an HF model directory; None when it has no tokenizer.json."""
    directory = Path(directory)
    tokenizer_path = directory / TOKENIZER_FILE
    from convqa.formats import spm_tokenizer

    if spm_tokenizer.is_spm_dir(directory):  # SentencePiece: tokenizer.model carries the vocabulary
        return spm_tokenizer.tokenizer_from_spm_dir(directory)
    if not tokenizer_path.is_file():
        return None
    tj = load_json_object(tokenizer_path)
    tokenizer_config = load_json_object(directory / TOKENIZER_CONFIG_FILE, missing_ok=True)
    model_config = load_json_object(directory / CONFIG_FILE, missing_ok=True)
    generation_config = load_json_object(directory / GENERATION_CONFIG_FILE, missing_ok=True)

    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise FormatError(tokenizer_path, "unsupported tokenizer model; only byte-level BPE is carried", field="model.type")
    pre = _identify_pre(tj, tokenizer_path)
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise FormatError(tokenizer_path, f"unsupported BPE option {key}={model[key]!r}", field=f"model.{key}")
    if model.get("byte_fallback"):
        raise FormatError(
            tokenizer_path, "byte_fallback BPE is a SentencePiece-style tokenizer, not byte-level", field="model.byte_fallback"
        )
    normalizer = tj.get("normalizer")
    normalizer_type = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
    if normalizer_type not in _IGNORED_NORMALIZERS:
        raise FormatError(tokenizer_path, f"unsupported normalizer {json.dumps(normalizer)[:200]}", field="normalizer")

    by_id, types_by_id = _vocabulary(tj, model, tokenizer_path)
    length = max(by_id, default=-1) + 1
    config_vocab = model_config.get("vocab_size")
    if isinstance(config_vocab, int) and not isinstance(config_vocab, bool):
        if length > config_vocab:
            raise FormatError(
                tokenizer_path, f"token id {length - 1} is outside the model's vocab_size {config_vocab}", field="model.vocab"
            )
        length = config_vocab
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(length)]
    token_types = [types_by_id.get(i, TOKEN_NORMAL) if i in by_id else TOKEN_UNUSED for i in range(length)]
    ids = {token: i for i, token in enumerate(tokens)}

    specials = {}
    for name in ("bos", "eos", "unk", "pad"):
        specials[name] = _special_token_id(name, tokenizer_config, ids, directory / TOKENIZER_CONFIG_FILE)
        if specials[name] is None:
            # gguf-py SpecialVocab: tokenizer files first, then config.json; generation_config last.
            specials[name] = _int_or_none(model_config.get(f"{name}_token_id"))
        if specials[name] is None:
            specials[name] = _int_or_none(generation_config.get(f"{name}_token_id"))
        if specials[name] is not None and not 0 <= specials[name] < length:
            raise FormatError(
                directory, f"{name}_token_id {specials[name]} is outside the vocabulary of {length}", field=f"{name}_token_id"
            )

    add_bos, add_eos = _adds_special_tokens(tj, tokenizer_config, specials, directory / TOKENIZER_CONFIG_FILE)
    return TokenizerSpec(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=token_types,
        merges=_merges(model, tokenizer_path),
        bos_token_id=specials["bos"],
        eos_token_id=specials["eos"],
        unk_token_id=specials["unk"],
        pad_token_id=specials["pad"],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=_chat_template(directory, tokenizer_config),
    )


def write_hf_tokenizer(
    directory: str | os.PathLike, spec: TokenizerSpec, *, model_max_length: int | None = None, architecture: str | None = None
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`.

    `AutoTokenizer.from_pretrained(directory)` then tokenizes as llama.cpp does for `spec.pre`,
    and `tokenizer_from_hf_dir(directory)` gives `spec` back. UNUSED `[PAD{id}]` placeholders are
    holes in the vocabulary, not tokens, so they are not written.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    directory = Path(directory)
    if spec.model == "llama" and architecture is not None:
        from convqa.formats.spm_tokenizer import write_spm_tokenizer

        return write_spm_tokenizer(directory, spec, architecture=architecture, model_max_length=model_max_length)
    if spec.model != "gpt2":
        raise ConversionError(f"cannot write tokenizer model {spec.model!r} as tokenizer.json; only byte-level BPE (gpt2)")
    if len(spec.token_types) != len(spec.tokens):
        raise ConversionError(f"{len(spec.tokens)} tokens but {len(spec.token_types)} token types")

    vocab, special, user_defined = {}, [], []
    for token_id, (token, token_type) in enumerate(zip(spec.tokens, spec.token_types)):
        if token_type == TOKEN_UNUSED and token == f"[PAD{token_id}]":
            continue
        if token_type not in (TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED):
            raise ConversionError(f"token {token_id} {token!r} has type {token_type}, which a byte-level tokenizer.json cannot express")
        if token in vocab:
            raise ConversionError(f"token {token!r} appears twice (ids {vocab[token]} and {token_id})")
        vocab[token] = token_id
        if token_type == TOKEN_CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TOKEN_USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))

    merges = []
    for rank, merge in enumerate(spec.merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ConversionError(f"merge {rank} {merge!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))

    pre_tokenizer, ignore_merges = build_pre_tokenizer(spec.pre)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    names = {key: _token_name(spec, key) for key in ("bos", "eos", "unk", "pad")}
    if spec.add_bos_token or spec.add_eos_token:
        tokenizer.post_processor = _template_processing(spec, names, processors)
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    write_tokenizer_config(directory, spec, names, model_max_length)


def write_tokenizer_config(directory: Path, spec: TokenizerSpec, names: dict, model_max_length: int | None) -> None:
    """tokenizer_config.json and special_tokens_map.json beside a written tokenizer.json (BPE
    here, SentencePiece in convqa.formats.spm_tokenizer). `names`: bos/eos/unk/pad -> token text
    or None."""
    tokenizer_config = {
        # The generic class loads tokenizer.json as written; model classes (GPT2Tokenizer,
        # Qwen2Tokenizer, GemmaTokenizer) rebuild their own pipeline in transformers 5.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": spec.add_bos_token,
        "add_eos_token": spec.add_eos_token,
        "clean_up_tokenization_spaces": False,
        **{f"{key}_token": name for key, name in names.items()},
        "model_max_length": model_max_length if model_max_length is not None else int(1e30),
    }
    if spec.chat_template is not None:
        tokenizer_config["chat_template"] = spec.chat_template
    write_json(directory / TOKENIZER_CONFIG_FILE, tokenizer_config, sort_keys=False, ensure_ascii=False)
    write_json(directory / SPECIAL_TOKENS_MAP_FILE, {f"{key}_token": name for key, name in names.items() if name is not None}, sort_keys=False, ensure_ascii=False)


def build_pre_tokenizer(pre: str):
    """(tokenizers pre-tokenizer, BPE ignore_merges) that split text as llama.cpp's `pre` does."""
    from tokenizers import Regex, pre_tokenizers

    if pre not in _PRE_PIPELINES:
        raise ConversionError(f"pre-tokenizer {pre!r} has no known tokenizer.json pipeline; supported: {SUPPORTED_PRE}")
    steps, ignore_merges = _PRE_PIPELINES[pre]
    built = []
    for kind, options in steps:
        options = dict(options)
        if kind == "Split":
            built.append(pre_tokenizers.Split(Regex(options["pattern"]), behavior=options["behavior"].lower(), invert=options["invert"]))
        elif kind == "Digits":
            built.append(pre_tokenizers.Digits(individual_digits=options["individual_digits"]))
        else:
            built.append(
                pre_tokenizers.ByteLevel(add_prefix_space=options["add_prefix_space"], use_regex=options["use_regex"], trim_offsets=False)
            )
    return (built[0] if len(built) == 1 else pre_tokenizers.Sequence(built)), ignore_merges


def _template_processing(spec: TokenizerSpec, names: dict, processors):
    """BOS/EOS added by the post-processor, as transformers' update_post_processor builds it."""
    single, pair, special_tokens = "$A:0", "$B:1", []
    if spec.add_bos_token:
        if names["bos"] is None:
            raise ConversionError("add_bos_token is set but the tokenizer has no bos token")
        single, pair = f"{names['bos']}:0 {single}", f"{names['bos']}:1 {pair}"
        special_tokens.append((names["bos"], spec.bos_token_id))
    if spec.add_eos_token:
        if names["eos"] is None:
            raise ConversionError("add_eos_token is set but the tokenizer has no eos token")
        single, pair = f"{single} {names['eos']}:0", f"{pair} {names['eos']}:1"
        special_tokens.append((names["eos"], spec.eos_token_id))
    return processors.TemplateProcessing(single=single, pair=f"{single} {pair}", special_tokens=list(dict.fromkeys(special_tokens)))


def _token_name(spec: TokenizerSpec, key: str) -> str | None:
    token_id = getattr(spec, f"{key}_token_id")
    if token_id is None:
        return None
    if not 0 <= token_id < len(spec.tokens):
        raise ConversionError(f"{key}_token_id {token_id} is outside the vocabulary of {len(spec.tokens)}")
    return spec.tokens[token_id]


def _identify_pre(tj: dict, path: Path) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer pipeline (see the module docstring)."""
    pre_tokenizer = tj.get("pre_tokenizer")
    if not isinstance(pre_tokenizer, dict):
        raise FormatError(path, "no pre_tokenizer; a byte-level BPE tokenizer needs ByteLevel", field="pre_tokenizer")
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if not isinstance(steps, list) or not all(isinstance(step, dict) for step in steps):
        raise FormatError(path, "malformed pre_tokenizer", field="pre_tokenizer")
    signature = tuple(_step_signature(step) for step in steps)
    ignore_merges = bool(tj.get("model", {}).get("ignore_merges", False))
    for name, (pipeline, wants_ignore_merges) in _PRE_PIPELINES.items():
        if signature == pipeline and ignore_merges == wants_ignore_merges:
            return name
    raise FormatError(
        path,
        f"unrecognised pre-tokenizer {json.dumps(pre_tokenizer)[:300]} (ignore_merges={ignore_merges}); "
        f"llama.cpp would tokenize it differently. Known: {', '.join(SUPPORTED_PRE)}",
        field="pre_tokenizer",
    )


def _step_signature(step: dict) -> tuple:
    kind = step.get("type")
    if kind == "Split":
        pattern = step.get("pattern") or {}
        return (
            kind,
            (("behavior", step.get("behavior")), ("invert", step.get("invert")), ("pattern", pattern.get("Regex", pattern.get("String")))),
        )
    if kind == "Digits":
        return (kind, (("individual_digits", step.get("individual_digits")),))
    if kind == "ByteLevel":
        # tokenizers' ByteLevel defaults: use_regex true when the key is absent (older files).
        return (kind, (("add_prefix_space", step.get("add_prefix_space")), ("use_regex", step.get("use_regex", True))))
    return (kind, tuple(sorted((k, json.dumps(v)) for k, v in step.items() if k != "type")))


def _vocabulary(tj: dict, model: dict, path: Path) -> tuple[dict[int, str], dict[int, int]]:
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise FormatError(path, "model.vocab must be an object of token -> id", field="model.vocab")
    by_id: dict[int, str] = {}
    for token, token_id in vocab.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise FormatError(path, f"token {token!r} has invalid id {token_id!r}", field="model.vocab")
        if token_id in by_id:
            raise FormatError(path, f"id {token_id} used by {by_id[token_id]!r} and {token!r}", field="model.vocab")
        by_id[token_id] = token
    types: dict[int, int] = {}
    added = tj.get("added_tokens") or []
    if not isinstance(added, list):
        raise FormatError(path, "added_tokens must be a list", field="added_tokens")
    for index, entry in enumerate(added):
        token_id, content = (entry.get("id"), entry.get("content")) if isinstance(entry, dict) else (None, None)
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0 or not isinstance(content, str):
            raise FormatError(path, f"added token {index} is malformed: {entry!r}", field=f"added_tokens[{index}]")
        if by_id.get(token_id, content) != content:
            raise FormatError(path, f"added token {content!r} reuses id {token_id} of {by_id[token_id]!r}", field=f"added_tokens[{index}]")
        if content in vocab and vocab[content] != token_id:
            raise FormatError(
                path, f"added token {content!r} has id {token_id} but the vocab says {vocab[content]}", field=f"added_tokens[{index}]"
            )
        by_id[token_id] = content
        types[token_id] = TOKEN_CONTROL if entry.get("special") else TOKEN_USER_DEFINED
    if len(set(by_id.values())) != len(by_id):
        raise FormatError(path, "the same token text has two ids", field="added_tokens")
    return by_id, types


def _merges(model: dict, path: Path) -> list[str]:
    merges = model.get("merges", [])
    if not isinstance(merges, list):
        raise FormatError(path, "model.merges must be a list", field="model.merges")
    out = []
    for rank, merge in enumerate(merges):
        # tokenizers < 0.20 wrote "a b" strings, newer versions write [a, b] pairs.
        if isinstance(merge, str):
            parts = merge.split(" ")
        elif isinstance(merge, list):
            parts = merge
        else:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, str) and p and " " not in p for p in parts):
            raise FormatError(path, f"merge {rank} is not a pair of tokens: {merge!r}", field=f"model.merges[{rank}]")
        out.append(f"{parts[0]} {parts[1]}")
    return out


def _special_token_id(name: str, tokenizer_config: dict, ids: dict[str, int], path: Path) -> int | None:
    value = tokenizer_config.get(f"{name}_token")
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str):
        raise FormatError(path, f"{name}_token must be a string, got {value!r}", field=f"{name}_token")
    if value not in ids:
        raise FormatError(path, f"{name}_token {value!r} is not in the vocabulary", field=f"{name}_token")
    return ids[value]


def _adds_special_tokens(tj: dict, tokenizer_config: dict, specials: dict, path: Path) -> tuple[bool, bool]:
    """add_bos/add_eos: tokenizer_config.json's flags, else what the post-processor template adds."""
    flags = []
    for key, position in (("add_bos_token", 0), ("add_eos_token", -1)):
        if key in tokenizer_config:
            if not isinstance(tokenizer_config[key], bool):
                raise FormatError(path, f"{key} must be true or false", field=key)
            flags.append(tokenizer_config[key])
            continue
        post = tj.get("post_processor") or {}
        template = post.get("single") if post.get("type") == "TemplateProcessing" else None
        flags.append(bool(template) and "SpecialToken" in template[position])
    return flags[0], flags[1]


def _chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    """chat_template.jinja (transformers 5 saves it there) wins over tokenizer_config.json's key."""
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(jinja, f"not UTF-8: {exc.reason}", offset=exc.start) from exc
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise FormatError(directory / TOKENIZER_CONFIG_FILE, "chat_template must be a string", field="chat_template")
    return template


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def load_json_object(path: Path, *, missing_ok: bool = False) -> dict:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"not UTF-8: {exc.reason}", offset=exc.start) from exc
    except json.JSONDecodeError as exc:
        raise FormatError(path, f"invalid JSON: {exc.msg}", offset=exc.pos) from exc
    if not isinstance(data, dict):
        raise FormatError(path, f"must hold a JSON object, got {type(data).__name__}", offset=0)
    return data
