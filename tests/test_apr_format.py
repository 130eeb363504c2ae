"""APR v2 writer and reader: byte layout against docs/formats.md (APR), and bit-exact round trips.

The layout checks parse the written bytes with their own struct code (not the module's parser),
so a writer bug and a matching reader bug cannot cancel out.
"""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from convqa import encodings
from convqa.arch import expected_tensors
from convqa.errors import ConversionError, FormatError
from convqa.formats import open_model
from convqa.formats.apr import (
    ALIAS_KEYS,
    AprHeader,
    AprWriter,
    LAYOUT_COLUMN_MAJOR,
    LAYOUT_ROW_MAJOR,
    encode_metadata,
    format_f32,
    read_apr,
    write_apr,
)
from convqa.model import LazyTensor, ModelConfig, WritePlan, WriterQuirks
from tinymodel import position_tensor, position_values, random_tensor, tiny_config, tiny_plan, tiny_tokenizer

# --- helpers ----------------------------------------------------------------------------------


def make_plan(config: ModelConfig, rng, encoding=encodings.F32, tokenizer="default") -> WritePlan:
    """Random stored bytes in `encoding`, the JSON-escapes tokenizer, the provenance of an S->A conversion."""
    return tiny_plan(
        config,
        rng,
        encoding,
        tokenizer=tiny_tokenizer("json-escapes") if tokenizer == "default" else tokenizer,
        metadata={"converter": "test", "source_format": "safetensors"},
    )


HEADER = struct.Struct("<4sBBHIQIQQI20s")


def parse_file(data: bytes) -> dict:
    """An independent parse of header, metadata and index (test-side code only)."""
    magic, major, minor, flags, count, meta_off, meta_size, index_off, data_off, crc, reserved = HEADER.unpack(
        data[:64]
    )
    entries = []
    pos = index_off
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", data, pos)
        name = data[pos + 2 : pos + 2 + name_len].decode()
        pos += 2 + name_len
        dtype, ndim = struct.unpack_from("<BB", data, pos)
        pos += 2
        dims = struct.unpack_from(f"<{ndim}Q", data, pos)
        pos += 8 * ndim
        offset, size = struct.unpack_from("<QQ", data, pos)
        pos += 16
        entries.append({"name": name, "dtype": dtype, "shape": list(dims), "offset": offset, "size": size})
    return {
        "magic": magic,
        "version": (major, minor),
        "flags": flags,
        "metadata_offset": meta_off,
        "metadata_size": meta_size,
        "metadata_json": data[meta_off : meta_off + meta_size],
        "tensor_index_offset": index_off,
        "index_end": pos,
        "data_offset": data_off,
        "checksum": crc,
        "reserved": reserved,
        "entries": entries,
    }


# --- the worked example (docs/formats.md APR 2) ----------------------------------------------

WORKED_EXAMPLE_HEADER = bytes.fromhex(
    "41 50 52 00 02 00 00 04 01 00 00 00 40 00 00 00 00 00 00 00 6a 00 00 00 c0 00 00 00 00 00 00 00"
    "00 01 00 00 00 00 00 00 6c 6a 85 61" + " 00" * 20
)


def test_worked_example_is_byte_exact(tmp_path):
    metadata = {
        "model_type": "test",
        "license": None,
        "data_source": None,
        "data_license": None,
        "total_size": 0,
        "param_count": 0,
    }
    meta_json = encode_metadata(metadata)
    assert meta_json == (
        b'{"model_type":"test","license":null,"data_source":null,"data_license":null,"total_size":0,"param_count":0}'
    )
    assert len(meta_json) == 106
    path = tmp_path / "example.apr"
    values = np.array([1.5, -2.0], dtype="<f4")
    with AprWriter(path, metadata, [("w", 0, (2,), 8)]) as writer:
        for name in writer.names:
            writer.write_tensor(name, values)
    data = path.read_bytes()
    assert data[:64] == WORKED_EXAMPLE_HEADER
    assert len(data) == 324
    parsed = parse_file(data)
    assert parsed["tensor_index_offset"] == 192 and parsed["data_offset"] == 256
    assert parsed["metadata_json"] == meta_json
    assert data[64 + 106 : 192] == bytes(192 - 64 - 106)  # metadata padding is zero
    assert parsed["entries"] == [{"name": "w", "dtype": 0, "shape": [2], "offset": 0, "size": 8}]
    assert data[256:264] == values.tobytes() and data[264:320] == bytes(56)
    assert data[320:] == struct.pack("<I", zlib.crc32(data[:320]))
    # The header dataclass reproduces the same bytes on its own.
    header = AprHeader(tensor_count=1, metadata_size=106, tensor_index_offset=192, data_offset=256)
    assert header.to_bytes() == WORKED_EXAMPLE_HEADER
    assert AprHeader.from_bytes(WORKED_EXAMPLE_HEADER).checksum == 0x61856A6C


@pytest.mark.parametrize(
    "value, text",
    [
        (1e-6, "0.000001"),
        (1e6, "1000000.0"),
        (1e-5, "0.00001"),
        (1e-7, "1e-7"),
        (10000.0, "10000.0"),
        (12.34, "12.34"),
        (1.5e-7, "1.5e-7"),
        (1e16, "1e16"),
        (1e13, "1e13"),
        (1234567.0, "1234567.0"),
        (0.0, "0.0"),
        (-2.5, "-2.5"),
    ],
)
def test_format_f32_matches_ryu(value, text):
    assert format_f32(value) == text
    assert np.float32(float(text)) == np.float32(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e39])
def test_format_f32_refuses_what_f32_cannot_hold(value):
    with pytest.raises(ConversionError):
        format_f32(value)


# --- layout of a written model ----------------------------------------------------------------


@pytest.fixture
def written(tmp_path):
    """An 11-layer llama plan (so `layers.10.` and `layers.2.` both exist), written untied."""
    rng = np.random.default_rng(0)
    config = tiny_config(layers=11, rms_norm_eps=1e-6, rope_theta=1e6)
    plan = make_plan(config, rng)
    path = tmp_path / "model.apr"
    write_apr(path, plan)
    return plan, path, path.read_bytes()


def test_header_and_footer_checksums(written):
    _, _, data = written
    parsed = parse_file(data)
    assert parsed["magic"] == b"APR\x00" and parsed["version"] == (2, 0)
    assert parsed["checksum"] == zlib.crc32(data[:40] + data[44:64])
    assert parsed["reserved"] == bytes(20)
    assert data[-4:] == struct.pack("<I", zlib.crc32(data[:-4]))


def test_flags_are_row_major_only(written):
    flags = parse_file(written[2])["flags"]
    assert flags == LAYOUT_ROW_MAJOR == 0x0400
    assert not flags & LAYOUT_COLUMN_MAJOR


def test_every_offset_is_aligned_and_padding_is_zero(written):
    _, _, data = written
    parsed = parse_file(data)
    assert parsed["metadata_offset"] == 64
    assert parsed["tensor_index_offset"] == 64 + -(-parsed["metadata_size"] // 64) * 64
    assert parsed["data_offset"] == -(-parsed["index_end"] // 64) * 64
    assert data[parsed["index_end"] : parsed["data_offset"]] == bytes(parsed["data_offset"] - parsed["index_end"])
    expected_offset = 0
    for entry in parsed["entries"]:
        assert entry["offset"] % 64 == 0 and (parsed["data_offset"] + entry["offset"]) % 64 == 0
        assert entry["offset"] == expected_offset  # sorted data order, no gaps beyond padding
        start = parsed["data_offset"] + entry["offset"]
        padded = -(-entry["size"] // 64) * 64
        assert data[start + entry["size"] : start + padded] == bytes(padded - entry["size"])
        expected_offset += padded
    assert len(data) == parsed["data_offset"] + expected_offset + 4


def test_index_sorted_by_utf8_bytes(written):
    names = [e["name"] for e in parse_file(written[2])["entries"]]
    assert names == sorted(names, key=lambda n: n.encode())
    assert names.index("model.layers.10.mlp.up_proj.weight") < names.index("model.layers.2.mlp.up_proj.weight")
    assert names[0] == "lm_head.weight"


def test_metadata_keys_order_f32_text_and_no_aliases(written):
    plan, _, data = written
    raw = parse_file(data)["metadata_json"]
    meta = json.loads(raw)
    keys = list(meta)
    assert keys[:4] == ["model_type", "license", "data_source", "data_license"]
    assert meta["license"] is None and meta["data_source"] is None and meta["data_license"] is None
    typed_order = [
        "total_size",
        "param_count",
        "chat_template",
        "special_tokens",
        "architecture",
        "hf_architecture",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "vocab_size",
        "intermediate_size",
        "max_position_embeddings",
        "rope_theta",
        "rope_type",
        "rms_norm_eps",
        "head_dim",
    ]
    assert [k for k in keys if k in typed_order] == typed_order
    assert keys.index("head_dim") < keys.index("tensor_shapes")  # custom keys after typed ones
    assert b'"rope_theta":1000000.0,' in raw and b'"rms_norm_eps":0.000001,' in raw
    assert b'": ' not in raw and b', "' not in raw and not raw.endswith(b"\n")  # compact serde_json style
    assert "é" in raw.decode("utf-8") and b"\\u00e9" not in raw  # non-ASCII written raw
    aliases = {a for group in ALIAS_KEYS.values() for a in group}
    assert not aliases & set(meta)
    assert meta["hf_architecture"] == "LlamaForCausalLM" and meta["rope_type"] == 0
    assert meta["original_format"] == "safetensors"
    assert meta["convqa.provenance"] == plan.metadata
    assert meta["tokenizer.vocabulary"] == plan.tokenizer.tokens
    assert meta["special_tokens"] == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "im_start_token": "<|im_start|>",
        "im_end_token": "<|im_end|>",
    }
    assert meta["param_count"] == sum(int(np.prod(t.shape)) for t in plan.tensors)
    assert "tied_embeddings" not in meta


def test_qwen2_gets_neox_rope_type(tmp_path):
    plan = make_plan(tiny_config("qwen2"), np.random.default_rng(1))
    write_apr(tmp_path / "q.apr", plan)
    meta = json.loads(parse_file((tmp_path / "q.apr").read_bytes())["metadata_json"])
    assert meta["rope_type"] == 2 and meta["hf_architecture"] == "Qwen2ForCausalLM"


def test_dtype_bytes(tmp_path):
    rng = np.random.default_rng(2)
    config = tiny_config()
    plan = make_plan(config, rng)
    cases = {
        "extra.f32": (encodings.F32, (2, 3), 0),
        "extra.f16": (encodings.F16, (2, 3), 1),
        "extra.bf16": (encodings.BF16, (2, 3), 30),
        "extra.q4_k": (encodings.Q4_K, (2, 256), 12),
        "extra.q6_k": (encodings.Q6_K, (2, 256), 14),
        "extra.apr_q4": (encodings.APR_Q4, (2, 32), 128),
        "extra.apr_q8": (encodings.APR_Q8, (2, 5), 129),
    }
    for name, (encoding, shape, _) in cases.items():
        plan.tensors.append(random_tensor(name, shape, encoding, rng))
    path = tmp_path / "dtypes.apr"
    write_apr(path, plan)
    entries = {e["name"]: e for e in parse_file(path.read_bytes())["entries"]}
    for name, (encoding, shape, byte) in cases.items():
        assert entries[name]["dtype"] == byte, name
        assert entries[name]["shape"] == list(shape) and entries[name]["size"] == encoding.nbytes(shape)
    with read_apr(path) as artifact:
        for name, (encoding, shape, _) in cases.items():
            tensor = artifact.tensors[name]
            assert tensor.encoding is encoding and tensor.shape == shape
            source = next(t for t in plan.tensors if t.name == name)
            assert tensor.raw().tobytes() == source.raw().tobytes()


def test_encoding_without_apr_dtype_is_refused(tmp_path):
    plan = make_plan(tiny_config(), np.random.default_rng(3))
    plan.tensors.append(random_tensor("extra.q8_0", (4, 32), encodings.Q8_0, np.random.default_rng(3)))
    with pytest.raises(ConversionError, match="Q8_0"):
        write_apr(tmp_path / "bad.apr", plan)
    assert list(tmp_path.iterdir()) == []  # atomic: no file, no temp sibling


def test_dtype_override_quirk_writes_byte_8_and_strict_reader_rejects_it(tmp_path):
    """The Q8_0-as-byte-8 mutant: bytes and size as given, which APR readers decode as APR Q4."""
    rng = np.random.default_rng(4)
    plan = make_plan(tiny_config(), rng)
    q8 = random_tensor("extra.q8_0", (4, 32), encodings.Q8_0, rng)
    plan.tensors.append(q8)
    plan.quirks = WriterQuirks(apr_dtype_override={"extra.q8_0": 8})
    path = tmp_path / "mutant.apr"
    write_apr(path, plan)
    data = path.read_bytes()
    parsed = parse_file(data)
    entry = next(e for e in parsed["entries"] if e["name"] == "extra.q8_0")
    assert entry["dtype"] == 8 and entry["size"] == 4 * 34
    start = parsed["data_offset"] + entry["offset"]
    assert data[start : start + entry["size"]] == q8.raw().tobytes()
    with pytest.raises(FormatError) as info:
        read_apr(path)
    assert info.value.field == "size" and "APR_Q4" in str(info.value)


def test_failed_write_leaves_nothing(tmp_path):
    plan = make_plan(tiny_config(), np.random.default_rng(5))

    def broken():
        raise RuntimeError("source vanished")

    plan.tensors[3] = LazyTensor(plan.tensors[3].name, plan.tensors[3].shape, encodings.F32, broken)
    with pytest.raises(RuntimeError, match="vanished"):
        write_apr(tmp_path / "out.apr", plan)
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_declared_sizes(tmp_path):
    with pytest.raises(ConversionError, match="declared"):
        with AprWriter(tmp_path / "x.apr", {"model_type": "t"}, [("w", 0, (2,), 8)]) as writer:
            writer.write_tensor("w", np.zeros(3, dtype="<f4"))
    with pytest.raises(ConversionError, match="before tensor"):
        with AprWriter(tmp_path / "x.apr", {"model_type": "t"}, [("a", 0, (1,), 4), ("b", 0, (1,), 4)]) as writer:
            writer.write_tensor("a", np.zeros(1, dtype="<f4"))
    assert list(tmp_path.iterdir()) == []


def test_writing_twice_is_byte_identical(tmp_path):
    plan = make_plan(tiny_config(tied=True), np.random.default_rng(6))
    write_apr(tmp_path / "a.apr", plan)
    write_apr(tmp_path / "b.apr", plan)
    assert (tmp_path / "a.apr").read_bytes() == (tmp_path / "b.apr").read_bytes()


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("encoding", [encodings.F32, encodings.F16, encodings.BF16], ids=lambda e: e.name)
def test_round_trip_is_bit_exact(tmp_path, tied, encoding):
    rng = np.random.default_rng(7)
    config = tiny_config("qwen2", tied=tied, rms_norm_eps=1e-6, rope_theta=1e6)
    plan = make_plan(config, rng, encoding=encoding)
    plan.tensors.append(position_tensor("extra.position", 3, 5))
    path = tmp_path / "rt.apr"
    write_apr(path, plan)
    with open_model(path) as artifact:
        assert artifact.format == "apr"
        assert artifact.config == config  # 1e-06 stays 1e-06 through the f32 field
        assert artifact.tokenizer == plan.tokenizer
        assert artifact.tokenizer.fingerprint() == plan.tokenizer.fingerprint()
        assert list(artifact.tensors) == sorted(t.name for t in plan.tensors)
        assert "lm_head.weight" not in artifact.tensors if tied else "lm_head.weight" in artifact.tensors
        for source in plan.tensors:
            tensor = artifact.tensors[source.name]
            assert tensor.shape == source.shape and tensor.encoding is source.encoding
            assert tensor.raw().tobytes() == source.raw().tobytes(), source.name
        position = artifact.tensors["extra.position"].to_float32()
        assert position.shape == (3, 5) and position[2, 4] == 2004 and position[1, 0] == 1000
        assert artifact.metadata["name_style"] == "hf"
        assert artifact.metadata["provenance"] == plan.metadata
        assert artifact.metadata["apr_header"]["row_major"] is True
        assert artifact.metadata["apr"]["tied_embeddings" if tied else "architecture"] in (True, "qwen2")


def test_tied_embedding_is_materialised_as_lm_head(tmp_path):
    plan = make_plan(tiny_config(tied=True), np.random.default_rng(8))
    path = tmp_path / "tied.apr"
    write_apr(path, plan)
    data = path.read_bytes()
    parsed = parse_file(data)
    entries = {e["name"]: e for e in parsed["entries"]}
    head, embed = entries["lm_head.weight"], entries["model.embed_tokens.weight"]
    assert head["shape"] == embed["shape"] == [16, 8] and head["dtype"] == embed["dtype"]
    base = parsed["data_offset"]
    head_bytes = data[base + head["offset"] : base + head["offset"] + head["size"]]
    assert head_bytes == data[base + embed["offset"] : base + embed["offset"] + embed["size"]]
    meta = json.loads(parsed["metadata_json"])
    assert meta["tied_embeddings"] is True and meta["tensor_shapes"]["lm_head.weight"] == [16, 8]
    with read_apr(path) as artifact:
        assert artifact.config.tie_word_embeddings is True
        assert "lm_head.weight" not in artifact.tensors


def test_untied_without_lm_head_is_not_invented(tmp_path):
    plan = make_plan(tiny_config(), np.random.default_rng(9))
    plan.tensors = [t for t in plan.tensors if t.name != "lm_head.weight"]
    write_apr(tmp_path / "nohead.apr", plan)
    with read_apr(tmp_path / "nohead.apr") as artifact:
        assert artifact.config.tie_word_embeddings is False
        assert "lm_head.weight" not in artifact.tensors


def test_no_tokenizer_round_trips_as_none(tmp_path):
    plan = make_plan(tiny_config(), np.random.default_rng(10), tokenizer=None)
    write_apr(tmp_path / "notok.apr", plan)
    with read_apr(tmp_path / "notok.apr") as artifact:
        assert artifact.tokenizer is None


# --- files in aprender's GGUF-import naming ---------------------------------------------------


def gguf_rows_from_hf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K permutation, spelled out row by row (independent of convqa.arch.permute).

    Within each head of `d` rows, HF keeps the two RoPE halves apart (row half*d/2 + i);
    llama.cpp interleaves them (row 2*i + half).
    """
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for i in range(d // 2):
                out[h * d + 2 * i + half] = w[h * d + half * (d // 2) + i]
    return out


def test_gguf_style_llama_names_are_mapped_and_qk_unpermuted(tmp_path):
    """What `apr import model.gguf` writes for llama: GGUF names, shapes reversed, Q/K rows permuted."""
    config = tiny_config("llama", tied=True, num_heads=2, num_kv_heads=1, head_dim=4)
    rng = np.random.default_rng(11)
    hf_tensors = {}
    for name, shape in expected_tensors(config).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            hf_tensors[name] = position_values(shape)
        else:
            hf_tensors[name] = rng.standard_normal(shape).astype("<f4")
    names_hf_to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer_suffixes = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for layer in range(config.num_layers):
        for hf, gg in layer_suffixes.items():
            names_hf_to_gguf[f"model.layers.{layer}.{hf}"] = f"blk.{layer}.{gg}"
    stored = {}
    for name, values in hf_tensors.items():
        if name.endswith("q_proj.weight"):
            values = gguf_rows_from_hf(values, config.num_heads)
        elif name.endswith("k_proj.weight"):
            values = gguf_rows_from_hf(values, config.num_kv_heads)
        stored[names_hf_to_gguf[name]] = values
    stored["lm_head.weight"] = stored["token_embd.weight"]  # aprender's tied materialisation keeps this HF name
    metadata = {
        "model_type": "llama",
        "license": None,
        "data_source": None,
        "data_license": None,
        "original_format": "gguf",
        "total_size": 0,
        "param_count": 0,
        "architecture": "llama",
        "hidden_size": 8,
        "num_layers": 2,
        "num_heads": 2,
        "num_kv_heads": 1,
        "vocab_size": 16,
        "intermediate_size": 12,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "rope_type": 0,
        "rms_norm_eps": 1e-5,
        "tied_embeddings": True,
        "model.rms_norm_eps": 9.999999747378752e-06,
    }
    path = tmp_path / "gguf_names.apr"
    layout = [(name, 0, values.shape, values.nbytes) for name, values in stored.items()]
    with AprWriter(path, metadata, layout) as writer:
        for name in writer.names:
            writer.write_tensor(name, stored[name])
    with read_apr(path) as artifact:
        assert artifact.metadata["name_style"] == "gguf"
        assert artifact.config.tie_word_embeddings is True
        assert artifact.config.head_dim == 4
        assert set(artifact.tensors) == set(expected_tensors(config))
        for name, values in hf_tensors.items():
            tensor = artifact.tensors[name]
            assert tensor.stored_name == names_hf_to_gguf[name]
            np.testing.assert_array_equal(tensor.to_float32(), values, err_msg=name)
        q = artifact.tensors["model.layers.0.self_attn.q_proj.weight"].to_float32()
        assert list(q[:, 0]) == [0, 1000, 2000, 3000, 4000, 5000, 6000, 7000]  # HF row order restored


def test_hf_named_llama_file_is_not_unpermuted(tmp_path):
    """HF names mean HF row order: a reader that always un-permuted llama would scramble these."""
    config = tiny_config("llama")
    plan = make_plan(config, np.random.default_rng(12))
    plan.tensors = [position_tensor(t.name, *t.shape) if t.name.endswith("q_proj.weight") else t for t in plan.tensors]
    write_apr(tmp_path / "hf.apr", plan)
    with read_apr(tmp_path / "hf.apr") as artifact:
        q = artifact.tensors["model.layers.1.self_attn.q_proj.weight"].to_float32()
        assert list(q[:, 0]) == [1000 * i for i in range(8)]


# --- a real model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_layer_in_apr_import_style_matches_transformers(tmp_path, smollm2_gguf):
    """Layer 0 of the real SmolLM2 GGUF, stored the way `apr import` stores a Q4_1 llama GGUF
    (dequantised to F32, GGUF names, shapes reversed, Q/K still permuted), must read back in the
    HF row order that transformers' own GGUF tensor processor produces."""
    gguf = pytest.importorskip("gguf")
    transformers_gguf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    reader = gguf.GGUFReader(smollm2_gguf)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("tokenizer.")}
    stored = {}
    for t in reader.tensors:
        if t.name.startswith("blk.0."):
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            shape = tuple(reversed([int(n) for n in t.shape]))  # GGUF ne -> row-major [out, in]
            stored[t.name] = np.ascontiguousarray(values.reshape(shape), dtype="<f4")
    n_head, n_kv_head = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    metadata = {
        "model_type": "llama",
        "license": None,
        "data_source": None,
        "data_license": None,
        "total_size": 0,
        "param_count": 0,
        "architecture": "llama",
        "hidden_size": fields["llama.embedding_length"],
        "num_layers": fields["llama.block_count"],
        "num_heads": n_head,
        "num_kv_heads": n_kv_head,
        "vocab_size": 49152,
        "intermediate_size": fields["llama.feed_forward_length"],
        "max_position_embeddings": fields["llama.context_length"],
        "rope_theta": fields["llama.rope.freq_base"],
        "rope_type": 0,
        "rms_norm_eps": fields["llama.attention.layer_norm_rms_epsilon"],
    }
    out = tmp_path / "smollm2_layer0.apr"
    with AprWriter(out, metadata, [(n, 0, v.shape, v.nbytes) for n, v in stored.items()]) as writer:
        for name in writer.names:
            writer.write_tensor(name, stored[name])
    processor = transformers_gguf.LlamaTensorProcessor(
        config={"num_attention_heads": n_head, "num_key_value_heads": n_kv_head}
    )
    with read_apr(out) as artifact:
        assert artifact.metadata["name_style"] == "gguf" and artifact.config.num_heads == 9
        assert len(artifact.tensors) == len(stored) == 9
        for gguf_name, hf_name in [
            ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
            ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
            ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ]:
            expected = processor.process(stored[gguf_name], gguf_name).weights
            got = artifact.tensors[hf_name].to_float32()
            np.testing.assert_array_equal(got, expected, err_msg=hf_name)
            if "attn_" in gguf_name:
                assert not np.array_equal(got, stored[gguf_name])  # the un-permutation did something


def test_opening_a_tied_apr_checks_the_lm_head_copy_a_slice_at_a_time(synthetic_dir, tmp_path):
    """APR stores a tied lm_head as a copy of the embedding, and every open checks that it is one.
    Loading both whole held twice the largest tensor: 1.9 GB for a 1.5B model's F32 embedding, the
    peak of every conversion and inspection of such a file. Now a 16 MB slice of each at a time."""
    import tracemalloc

    from convqa.convert.builtin import convert
    from convqa.formats import open_model

    source = synthetic_dir("qwen2-tiny-tied", vocab_size=65536, hidden_size=256)  # a 64 MB F32 embedding
    apr = tmp_path / "model.apr"
    convert(source, apr, "apr")
    tracemalloc.start()
    try:
        with open_model(apr) as model:
            embedding = model.tensors["model.embed_tokens.weight"]
            assert "lm_head.weight" not in model.tensors
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert embedding.nbytes == 64 << 20
    # Two slices and the 65536-token vocabulary's metadata, not the tensor twice (128 MB before).
    assert peak < embedding.nbytes, f"{peak >> 20} MB allocated to open a model whose largest tensor is 64 MB"
