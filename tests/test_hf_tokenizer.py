"""HF tokenizer files <-> TokenizerSpec, checked against transformers and the real SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from convqa.errors import ConversionError, FormatError
from convqa.formats.hf_tokenizer import tokenizer_from_hf_dir, write_hf_tokenizer
from convqa.model import TokenizerSpec
from convqa.sources.synthetic import build_preset, smollm2_gguf_path

PROBES = [
    "def add(a, b):\n    return a + b  # sum\n",
    "3333 12345 3.14",
    "<|im_start|>user\nhi<|im_end|>",
    "naïve café résumé 日本語 Ελληνικά 😀",
    "I'm sure they'll say it's what we've done, isn't it? YOU'RE",
    "  leading spaces\n\n\ttabs and\r\nCRLF   trailing  ",
    "(paren) [x]{y} foo.bar_baz->qux != 0x1F;",
]


@pytest.fixture(scope="module")
def smollm2_spec():
    """The real SmolLM2 tokenizer, read from the bundled GGUF with gguf-py directly."""
    import gguf

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    fields = gguf.GGUFReader(path).fields

    def value(key, default=None):
        return fields[key].contents() if key in fields else default

    spec = TokenizerSpec(
        model=value("tokenizer.ggml.model"),
        pre=value("tokenizer.ggml.pre"),
        tokens=value("tokenizer.ggml.tokens"),
        token_types=value("tokenizer.ggml.token_type"),
        merges=value("tokenizer.ggml.merges"),
        bos_token_id=value("tokenizer.ggml.bos_token_id"),
        eos_token_id=value("tokenizer.ggml.eos_token_id"),
        unk_token_id=value("tokenizer.ggml.unknown_token_id"),
        pad_token_id=value("tokenizer.ggml.padding_token_id"),
        add_bos_token=value("tokenizer.ggml.add_bos_token", False),
        add_eos_token=value("tokenizer.ggml.add_eos_token", False),
        chat_template=value("tokenizer.chat_template"),
    )
    return path, spec


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_spec):
    """transformers' own tokenizer rebuilt from the GGUF (about 5-10 s on 2 cores: load it once)."""
    from transformers import AutoTokenizer

    gguf_path, _ = smollm2_spec
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def smollm2_written(smollm2_spec, tmp_path_factory):
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    write_hf_tokenizer(directory, smollm2_spec[1], model_max_length=8192)
    return directory


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_reference, smollm2_written):
    from transformers import AutoTokenizer

    reference = smollm2_reference
    ours = AutoTokenizer.from_pretrained(smollm2_written)
    for text in PROBES:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    assert ours("3333 12345 3.14")["input_ids"][:4] == [35, 35, 35, 35]  # digits one by one (smollm)
    assert ours("<|im_start|>user")["input_ids"][0] == 1  # control token kept whole
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours.decode(ours(PROBES[3])["input_ids"]) == PROBES[3]


def test_wrong_pre_tokenizer_changes_ids(smollm2_spec, smollm2_reference, tmp_path):
    """The parity test above can fail: the qwen2 split on SmolLM2's merges gives other ids."""
    from transformers import AutoTokenizer

    _, spec = smollm2_spec
    write_hf_tokenizer(tmp_path, dataclasses.replace(spec, pre="qwen2"))
    wrong = AutoTokenizer.from_pretrained(tmp_path)
    reference = smollm2_reference
    assert any(wrong(t)["input_ids"] != reference(t)["input_ids"] for t in PROBES)


def test_smollm2_spec_round_trips(smollm2_spec, smollm2_written):
    _, spec = smollm2_spec
    back = tokenizer_from_hf_dir(smollm2_written)
    assert back.fingerprint() == spec.fingerprint()
    assert (back.bos_token_id, back.eos_token_id, back.unk_token_id, back.pad_token_id) == (1, 2, 0, 2)
    assert back.chat_template == spec.chat_template and "<|im_start|>" in back.chat_template
    config = json.loads((smollm2_written / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["add_bos_token"] is False


def test_synthetic_tokenizer_round_trip_with_padding_holes(tmp_path):
    from transformers import AutoTokenizer

    source = build_preset(tmp_path / "m", "qwen2-tiny", vocab_size=768)  # the trainer runs out of pairs at 694
    spec = tokenizer_from_hf_dir(source)
    assert spec.pre == "qwen2" and spec.model == "gpt2"
    assert len(spec.tokens) == 768 and spec.tokens[767] == "[PAD767]" and spec.token_types[767] == 5
    assert spec.token_types[:3] == [3, 3, 3]
    out = tmp_path / "out"
    write_hf_tokenizer(out, spec)
    shutil.copy(source / "config.json", out / "config.json")  # the vocab size the holes pad up to
    assert tokenizer_from_hf_dir(out).fingerprint() == spec.fingerprint()
    a, b = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(out)
    for text in PROBES:
        assert a(text)["input_ids"] == b(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(messages, tokenize=False) == b.apply_chat_template(messages, tokenize=False)


def test_user_defined_tokens_and_add_bos_round_trip(tmp_path):
    from transformers import AutoTokenizer

    source = build_preset(tmp_path / "m", "llama-tiny")
    spec = tokenizer_from_hf_dir(source)
    assert spec.pre == "smollm"
    spec.tokens[300] = "<think>"
    spec.token_types[300] = 4
    spec = dataclasses.replace(spec, add_bos_token=True)
    # token 300 was a merge result: drop merges that produce or use it so the BPE stays consistent.
    old = tokenizer_from_hf_dir(source).tokens[300]
    spec.merges = [m for m in spec.merges if old not in m.split(" ") and "".join(m.split(" ")) != old]
    out = tmp_path / "out"
    write_hf_tokenizer(out, spec)
    shutil.copy(source / "config.json", out / "config.json")
    back = tokenizer_from_hf_dir(out)
    assert back.token_types[300] == 4 and back.add_bos_token is True
    assert back.fingerprint() == spec.fingerprint()
    ids = AutoTokenizer.from_pretrained(out)("a<think>b")["input_ids"]
    assert ids[0] == spec.bos_token_id and 300 in ids


def test_no_tokenizer_json_means_no_tokenizer(tmp_path):
    assert tokenizer_from_hf_dir(tmp_path) is None


def test_unsupported_tokenizers_are_refused(tmp_path):
    source = build_preset(tmp_path / "m", "qwen2-tiny")
    tj = json.loads((source / "tokenizer.json").read_text())
    for change, field in [
        ({"pre_tokenizer": {"type": "Whitespace"}}, "pre_tokenizer"),
        ({"model": {**tj["model"], "type": "WordPiece"}}, "model.type"),
        ({"normalizer": {"type": "Lowercase"}}, "normalizer"),
        ({"model": {**tj["model"], "merges": [["a", "b", "c"]]}}, "model.merges[0]"),
        ({"added_tokens": [{"id": 5, "content": "<|im_end|>", "special": True}]}, "added_tokens[0]"),
    ]:
        (source / "tokenizer.json").write_text(json.dumps({**tj, **change}))
        with pytest.raises(FormatError) as err:
            tokenizer_from_hf_dir(source)
        assert err.value.field == field
    (source / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError, match="invalid JSON"):
        tokenizer_from_hf_dir(source)


def test_writer_refuses_what_tokenizer_json_cannot_express(tmp_path, smollm2_spec):
    _, spec = smollm2_spec
    with pytest.raises(ConversionError, match="pre-tokenizer"):
        write_hf_tokenizer(tmp_path, dataclasses.replace(spec, pre="deepseek-llm"))
    with pytest.raises(ConversionError, match="byte-level"):
        write_hf_tokenizer(tmp_path, dataclasses.replace(spec, model="llama"))
    with pytest.raises(ConversionError, match="appears twice"):
        write_hf_tokenizer(tmp_path, dataclasses.replace(spec, tokens=spec.tokens[:-1] + [spec.tokens[0]]))
