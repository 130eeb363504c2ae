"""SentencePiece tokenizers (`tokenizer.ggml.model = llama`: Gemma, Llama 2) in an HF directory.

An HF SentencePiece model directory carries the vocabulary twice, as the Hub's Gemma-3 repos do:

- `tokenizer.model`, the SentencePiece ModelProto: every piece with its score and type, and the
  normalizer's `add_dummy_prefix`. This is what llama.cpp's `convert_hf_to_gguf.py` reads
  (`_create_vocab_sentencepiece`), so it is the lossless carrier of the GGUF's tokens, scores,
  token types and `add_space_prefix`. A GGUF holds no merges for these models, and tokenizer.json
  has no scores, so without it S -> G could not give the GGUF back.
- `tokenizer.json`, what transformers tokenizes with: built by transformers' own GGUF tokenizer
  converter (`transformers.integrations.gguf.gguf_tokenizer_mapping`, per architecture: Gemma's
  respelled space runs and merges in file order), i.e. exactly the tokenizer transformers makes
  from the same GGUF. F-TOK-001 then checks it against llama.cpp's.

Reading takes the pieces from tokenizer.model and, like llama.cpp's converter, marks the
tokenizer.json added tokens CONTROL (special) or USER_DEFINED (not special).

The ModelProto is read and written with a few lines of protobuf wire format (only the fields
above are written; any other field is skipped on reading), because the `protobuf` package is not
a dependency; tests load the written file with the `sentencepiece` library.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from convqa.errors import ConversionError, FormatError
from convqa.files import atomic_file
from convqa.model import TokenizerSpec

SPM_MODEL_FILE = "tokenizer.model"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# sentencepiece_model.proto field numbers.
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_VOCAB_SIZE, _TRAINER_BYTE_FALLBACK = 3, 4, 35
_TRAINER_UNK, _TRAINER_BOS, _TRAINER_EOS, _TRAINER_PAD = 40, 41, 42, 43
_NORM_NAME, _NORM_ADD_DUMMY_PREFIX, _NORM_REMOVE_EXTRA_WS, _NORM_ESCAPE_WS = 1, 3, 4, 5
_MODEL_TYPE_BPE = 2
# SentencePiece piece types use llama.cpp's (gguf.TokenType) numbers: 1 normal, 2 unknown,
# 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def is_spm_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / SPM_MODEL_FILE).is_file()


# ---------------------------------------------------------------------------------------- reading


def tokenizer_from_spm_dir(directory: str | os.PathLike) -> TokenizerSpec:
    from convqa.formats.hf_tokenizer import _chat_template, _special_token_id, load_json_object

    directory = Path(directory)
    path = directory / SPM_MODEL_FILE
    pieces, add_dummy_prefix, model_type = _read_model_proto(path)
    if model_type != _MODEL_TYPE_BPE:
        raise FormatError(path, f"SentencePiece model_type {model_type} is not BPE (2); only BPE vocabularies are carried", field="trainer_spec.model_type")
    tokens = [p[0] for p in pieces]
    scores = [p[1] for p in pieces]
    token_types = [p[2] for p in pieces]
    ids = {t: i for i, t in enumerate(tokens)}

    tj = load_json_object(directory / TOKENIZER_FILE, missing_ok=True)
    for added in tj.get("added_tokens") or []:
        token_id = added.get("id") if isinstance(added, dict) else None
        if isinstance(token_id, int) and 0 <= token_id < len(tokens) and tokens[token_id] == added.get("content"):
            token_types[token_id] = _CONTROL if added.get("special") else _USER_DEFINED

    tokenizer_config = load_json_object(directory / TOKENIZER_CONFIG_FILE, missing_ok=True)
    specials = {name: _special_token_id(name, tokenizer_config, ids, directory / TOKENIZER_CONFIG_FILE) for name in ("bos", "eos", "unk", "pad")}
    flags = {}
    for key in ("add_bos_token", "add_eos_token"):
        value = tokenizer_config.get(key, key == "add_bos_token")  # SentencePiece default: BOS on
        if not isinstance(value, bool):
            raise FormatError(directory / TOKENIZER_CONFIG_FILE, f"{key} must be true or false", field=key)
        flags[key] = value
    return TokenizerSpec(
        model="llama",
        pre="default",  # what llama.cpp's converter writes for every SentencePiece vocabulary
        tokens=tokens,
        token_types=token_types,
        merges=[],
        scores=scores,
        bos_token_id=specials["bos"],
        eos_token_id=specials["eos"],
        unk_token_id=specials["unk"],
        pad_token_id=specials["pad"],
        add_bos_token=flags["add_bos_token"],
        add_eos_token=flags["add_eos_token"],
        chat_template=_chat_template(directory, tokenizer_config),
        add_space_prefix=add_dummy_prefix,
    )


def _read_model_proto(path: Path) -> tuple[list[tuple[str, float, int]], bool, int]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror}") from exc
    pieces, add_dummy_prefix, model_type = [], True, 1  # proto defaults (UNIGRAM, dummy prefix on)
    try:
        for field, value in _fields(data):
            if field == _MODEL_PIECES:
                piece = {_PIECE_TEXT: b"", _PIECE_SCORE: 0.0, _PIECE_TYPE: _NORMAL}
                for f, v in _fields(value):
                    piece[f] = v
                score = struct.unpack("<f", piece[_PIECE_SCORE])[0] if isinstance(piece[_PIECE_SCORE], bytes) else 0.0
                pieces.append((piece[_PIECE_TEXT].decode("utf-8"), score, int(piece[_PIECE_TYPE])))
            elif field == _MODEL_TRAINER:
                model_type = dict(_fields(value)).get(_TRAINER_MODEL_TYPE, model_type)
            elif field == _MODEL_NORMALIZER:
                add_dummy_prefix = bool(dict(_fields(value)).get(_NORM_ADD_DUMMY_PREFIX, True))
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise FormatError(path, f"not a SentencePiece model: {exc}") from exc
    if not pieces:
        raise FormatError(path, "SentencePiece model has no pieces", field="pieces")
    return pieces, add_dummy_prefix, int(model_type)


def _fields(data: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire} at byte {pos}")
        if pos > end:
            raise ValueError("truncated message")
        yield field, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


# ---------------------------------------------------------------------------------------- writing


def write_spm_tokenizer(directory: str | os.PathLike, spec: TokenizerSpec, *, architecture: str, model_max_length: int | None = None) -> None:
    """tokenizer.model, tokenizer.json (transformers' converter), tokenizer_config.json and
    special_tokens_map.json; `tokenizer_from_spm_dir(directory)` gives `spec` back."""
    from convqa.formats.hf_tokenizer import _template_processing, _token_name, write_tokenizer_config

    if spec.model != "llama":
        raise ConversionError(f"write_spm_tokenizer: tokenizer model {spec.model!r} is not SentencePiece (llama)")
    if len(spec.token_types) != len(spec.tokens) or spec.scores is None or len(spec.scores) != len(spec.tokens):
        raise ConversionError("a SentencePiece tokenizer needs one score and one token type per token")
    if spec.merges:
        raise ConversionError("a SentencePiece (llama) tokenizer with merges cannot be written as tokenizer.model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / SPM_MODEL_FILE) as tmp:
        tmp.write_bytes(_model_proto(spec))

    from tokenizers import processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tokenizer_dict = {
        "tokenizer_type": "llama",
        "tokens": list(spec.tokens),
        "scores": list(spec.scores),
        "token_type": list(spec.token_types),
        **{f"{k}_token_id": getattr(spec, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad") if getattr(spec, f"{k}_token_id") is not None},
    }
    if spec.add_space_prefix is not None:
        tokenizer_dict["add_prefix_space"] = spec.add_space_prefix
    try:
        tokenizer, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError) as exc:
        raise ConversionError(f"transformers cannot build a {architecture} SentencePiece tokenizer.json: {exc}") from exc
    names = {key: _token_name(spec, key) for key in ("bos", "eos", "unk", "pad")}
    if spec.add_bos_token or spec.add_eos_token:
        tokenizer.post_processor = _template_processing(spec, names, processors)
    else:
        tokenizer.post_processor = None
    tokenizer.save(str(directory / TOKENIZER_FILE))
    write_tokenizer_config(directory, spec, names, model_max_length)


def _model_proto(spec: TokenizerSpec) -> bytes:
    out = bytearray()
    for token, score, token_type in zip(spec.tokens, spec.scores, spec.token_types):
        if token_type not in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE):
            raise ConversionError(f"token {token!r} has type {token_type}, which SentencePiece cannot express")
        piece = _bytes_field(_PIECE_TEXT, token.encode("utf-8")) + _key(_PIECE_SCORE, 5) + struct.pack("<f", score)
        piece += _varint_field(_PIECE_TYPE, token_type)
        out += _bytes_field(_MODEL_PIECES, piece)
    trainer = _varint_field(_TRAINER_MODEL_TYPE, _MODEL_TYPE_BPE) + _varint_field(_TRAINER_VOCAB_SIZE, len(spec.tokens))
    trainer += _varint_field(_TRAINER_BYTE_FALLBACK, int(_BYTE in spec.token_types))
    for field, token_id in ((_TRAINER_UNK, spec.unk_token_id), (_TRAINER_BOS, spec.bos_token_id), (_TRAINER_EOS, spec.eos_token_id), (_TRAINER_PAD, spec.pad_token_id)):
        # int32 fields: -1 (absent) is a 10-byte varint, as protobuf encodes negative int32s.
        _id = -1 if token_id is None else token_id
        trainer += _varint_field(field, _id & 0xFFFFFFFFFFFFFFFF)
    out += _bytes_field(_MODEL_TRAINER, trainer)
    add_dummy_prefix = True if spec.add_space_prefix is None else spec.add_space_prefix
    normalizer = _bytes_field(_NORM_NAME, b"identity") + _varint_field(_NORM_ADD_DUMMY_PREFIX, int(add_dummy_prefix))
    normalizer += _varint_field(_NORM_REMOVE_EXTRA_WS, 0) + _varint_field(_NORM_ESCAPE_WS, 1)
    out += _bytes_field(_MODEL_NORMALIZER, normalizer)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _encode_varint(field << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _encode_varint(value)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _encode_varint(len(value)) + value
