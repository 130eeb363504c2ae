"""Malformed GGUF files: every one gives FormatError (naming field and offset), never another
exception, a huge allocation or a hang; whatever does open can have all its tensors read."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convqa import encodings
from convqa.errors import FormatError
from convqa.formats import open_model
from convqa.formats.gguf import read_gguf
from convqa.formats.gguf_writer import write_gguf
from tinymodel import tiny_config, tiny_plan, tiny_tokenizer, tiny_values

CONFIG = tiny_config(preset="q8-narrow", layers=1, tied=True, vocab_size=8, max_position_embeddings=64)
TOKENIZER = tiny_tokenizer("merges")


def _encoding_for(name: str, shape: tuple) -> encodings.Encoding:
    if len(shape) == 1:
        return encodings.F32
    return encodings.F16 if name == "model.embed_tokens.weight" else encodings.Q8_0


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory) -> bytes:
    """A small llama GGUF: F32 norms, F16 embedding, Q8_0 projections, padded tokenizer."""
    values = tiny_values(CONFIG, np.random.default_rng(0), std=0.5)
    path = tmp_path_factory.mktemp("valid") / "tiny.gguf"
    write_gguf(path, tiny_plan(CONFIG, values, _encoding_for, tokenizer=TOKENIZER, metadata={"test": True}))
    return path.read_bytes()


@pytest.fixture(scope="module")
def layout(valid_bytes, tmp_path_factory):
    """Offsets of every header/KV/tensor-info part, found with gguf-py's own reader."""
    path = tmp_path_factory.mktemp("layout") / "tiny.gguf"
    path.write_bytes(valid_bytes)
    reader = gguf.GGUFReader(path, "r")
    base = reader.data.__array_interface__["data"][0]

    def at(part) -> int:
        return part.__array_interface__["data"][0] - base

    parts = {}  # label -> (offset, nbytes)
    for key, field in reader.fields.items():
        for i, part in enumerate(field.parts):
            parts[f"{key}#{i}"] = (at(part), part.nbytes)
    for t in reader.tensors:
        for i, part in enumerate(t.field.parts):
            parts[f"{t.name}#{i}"] = (at(part), part.nbytes)
    tensors = {t.name: (at(t.field.parts[0]), t.data_offset, t.n_bytes) for t in reader.tensors}
    data_end = max(offset + n for _, offset, n in tensors.values())
    return {"parts": parts, "tensors": tensors, "data_offset": reader.data_offset, "data_end": data_end}


def load_everything(path: Path) -> None:
    """Open, then touch every tensor's bytes and values, the config and the tokenizer."""
    with open_model(path) as model:
        assert model.config.vocab_size >= 0
        if model.tokenizer is not None:
            model.tokenizer.fingerprint()
        for tensor in model.tensors.values():
            assert tensor.raw().size == tensor.nbytes
            assert tensor.to_float32().shape == tensor.shape


def expect_format_error(
    tmp_path: Path, data: bytes, *, field: str | None = None, offset: int | None = None, match: str | None = None
) -> FormatError:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(FormatError) as info:
        read_gguf(path)
    with pytest.raises(FormatError):
        load_everything(path)  # through open_model's dispatch too
    err = info.value
    assert err.path == str(path)
    if field is not None:
        assert err.field == field, str(err)
    if offset is not None:
        assert err.offset == offset, str(err)
    if match is not None:
        assert match in str(err), str(err)
    return err


def opens_or_format_error(tmp_path: Path, data: bytes, name: str = "mutant.gguf") -> bool:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        load_everything(path)
    except FormatError:
        return False
    return True


def patched(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_the_valid_file_opens(tmp_path, valid_bytes):
    assert opens_or_format_error(tmp_path, valid_bytes)
    path = tmp_path / "mutant.gguf"
    with read_gguf(path) as model:
        assert model.config == CONFIG and model.tokenizer == TOKENIZER


# ----------------------------------------------------------------------------------------------
# Truncation


def test_truncation_anywhere_before_the_last_tensor_end_is_a_format_error(tmp_path, valid_bytes, layout):
    data_end = layout["data_end"]
    metadata_end = layout["data_offset"]
    boundaries = {0, 3, 4, 8, 16, 23, metadata_end, data_end - 1}
    for offset, nbytes in layout["parts"].values():
        boundaries |= {offset, offset + 1, offset + nbytes - 1}
    for _, data_offset, nbytes in layout["tensors"].values():
        boundaries |= {data_offset, data_offset + 1, data_offset + nbytes - 1}
    # Every byte of the metadata, the section boundaries, and random cuts into the data.
    rng = np.random.default_rng(1)
    cuts = set(range(metadata_end)) | boundaries | set(rng.integers(metadata_end, data_end, 100).tolist())
    for cut in sorted(c for c in cuts if c < data_end):
        path = tmp_path / "cut.gguf"
        path.write_bytes(valid_bytes[:cut])
        with pytest.raises(FormatError):
            read_gguf(path)
    # Only the zero padding after the last tensor may go.
    for cut in range(data_end, len(valid_bytes) + 1):
        assert opens_or_format_error(tmp_path, valid_bytes[:cut])


def test_truncated_data_names_the_tensor_and_its_info(tmp_path, valid_bytes, layout):
    name, (info_offset, data_offset, nbytes) = max(layout["tensors"].items(), key=lambda kv: kv[1][1])
    expect_format_error(
        tmp_path,
        valid_bytes[: data_offset + nbytes - 1],
        field=name + ".offset",
        offset=info_offset,
        match="past the end",
    )


# ----------------------------------------------------------------------------------------------
# Header


def test_bad_magic_version_and_endianness(tmp_path, valid_bytes):
    expect_format_error(tmp_path, b"GGUX" + valid_bytes[4:], field="magic", offset=0)
    expect_format_error(tmp_path, patched(valid_bytes, 4, "<I", 1), field="version", offset=4, match="version 1")
    expect_format_error(tmp_path, patched(valid_bytes, 4, "<I", 4), field="version", offset=4)
    expect_format_error(tmp_path, patched(valid_bytes, 4, ">I", 3), field="version", match="big-endian")


def test_absurd_counts(tmp_path, valid_bytes):
    expect_format_error(tmp_path, patched(valid_bytes, 8, "<Q", 2**60), field="tensor_count", offset=8)
    expect_format_error(tmp_path, patched(valid_bytes, 16, "<Q", 2**60), field="kv_count", offset=16)
    expect_format_error(tmp_path, patched(valid_bytes, 8, "<Q", 2**64 - 1), field="tensor_count")
    # One more key/value than there is: the parser reads the first tensor info as a KV and fails.
    count = struct.unpack_from("<Q", valid_bytes, 16)[0]
    expect_format_error(tmp_path, patched(valid_bytes, 16, "<Q", count + 1))


# ----------------------------------------------------------------------------------------------
# Key/values


def test_string_and_array_lengths(tmp_path, valid_bytes, layout):
    key_len_at = layout["parts"]["general.name#0"][0]
    expect_format_error(
        tmp_path, patched(valid_bytes, key_len_at, "<Q", 2**62), field="kv[1].key", offset=key_len_at + 8
    )
    value_len_at = layout["parts"]["general.name#3"][0]
    expect_format_error(
        tmp_path, patched(valid_bytes, value_len_at, "<Q", 2**62), field="general.name", match="truncated"
    )
    count_at = layout["parts"]["tokenizer.ggml.tokens#4"][0]
    expect_format_error(
        tmp_path, patched(valid_bytes, count_at, "<Q", 2**60), field="tokenizer.ggml.tokens", offset=count_at
    )
    token_len_at = layout["parts"]["tokenizer.ggml.tokens#5"][0]
    expect_format_error(tmp_path, patched(valid_bytes, token_len_at, "<Q", 2**62), field="tokenizer.ggml.tokens[0]")


def test_value_types(tmp_path, valid_bytes, layout):
    type_at = layout["parts"]["llama.block_count#2"][0]
    err = expect_format_error(
        tmp_path, patched(valid_bytes, type_at, "<I", GGUFValueType.INT32), field="llama.block_count"
    )
    assert "wrong type INT32 but expected type UINT32" in str(err)
    expect_format_error(
        tmp_path,
        patched(valid_bytes, type_at, "<I", 13),
        field="llama.block_count",
        offset=type_at,
        match="unknown value type",
    )
    elem_at = layout["parts"]["tokenizer.ggml.token_type#3"][0]
    expect_format_error(
        tmp_path,
        patched(valid_bytes, elem_at, "<I", GGUFValueType.UINT32),
        field="tokenizer.ggml.token_type",
        match="wrong type",
    )
    expect_format_error(
        tmp_path,
        patched(valid_bytes, elem_at, "<I", GGUFValueType.ARRAY),
        field="tokenizer.ggml.token_type",
        match="nested",
    )
    bool_at = layout["parts"]["tokenizer.ggml.add_bos_token#3"][0]
    expect_format_error(
        tmp_path, patched(valid_bytes, bool_at, "<B", 2), field="tokenizer.ggml.add_bos_token", offset=bool_at
    )
    eps_type_at = layout["parts"]["llama.attention.layer_norm_rms_epsilon#2"][0]
    expect_format_error(
        tmp_path,
        patched(valid_bytes, eps_type_at, "<I", GGUFValueType.INT32),
        field="llama.attention.layer_norm_rms_epsilon",
    )


def test_key_names(tmp_path, valid_bytes, layout):
    def rename(label: str, new: bytes) -> bytes:
        offset, nbytes = layout["parts"][label]
        assert len(new) == nbytes
        return valid_bytes[:offset] + new + valid_bytes[offset + nbytes :]

    expect_format_error(tmp_path, rename("llama.block_count#1", b"llama.block_coun\xff"), match="UTF-8")
    expect_format_error(
        tmp_path, rename("llama.block_count#1", b"llama.block_cnt_x"), field="llama.block_count", match="key not found"
    )
    expect_format_error(tmp_path, rename("llama.context_length#1", b"llama.rope.freq_base"), match="duplicate key")
    expect_format_error(
        tmp_path,
        rename("llama.attention.layer_norm_rms_epsilon#1", b"llama.attention.layer_norm_rms_epsilom"),
        match="key not found",
    )
    expect_format_error(
        tmp_path,
        rename("general.architecture#4", b"gpt2x"),
        field="general.architecture",
        match="unsupported architecture",
    )
    expect_format_error(
        tmp_path,
        rename("convqa.provenance#4", b"{" * layout["parts"]["convqa.provenance#4"][1]),
        field="convqa.provenance",
    )


def test_alignment(tmp_path):
    """general.alignment must be a UINT32 power of two; offsets must be multiples of it."""
    path = tmp_path / "aligned.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(64)
    writer.add_tensor("token_embd.weight", np.arange(32 * 8, dtype=np.float32).reshape(8, 32))
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    value_at = data.index(b"general.alignment") + len(b"general.alignment") + 4
    assert struct.unpack_from("<I", data, value_at)[0] == 64
    kv_at = value_at - 4 - len(b"general.alignment") - 8
    expect_format_error(
        tmp_path, patched(data, value_at, "<I", 48), field="general.alignment", offset=kv_at, match="power of two"
    )
    expect_format_error(tmp_path, patched(data, value_at, "<I", 0), field="general.alignment", match="power of two")
    expect_format_error(
        tmp_path, patched(data, value_at - 4, "<I", GGUFValueType.INT32), field="general.alignment", match="UINT32"
    )
    expect_format_error(
        tmp_path, patched(data, value_at, "<I", 2**31), field="output_norm.weight.offset", match="alignment 2147483648"
    )
    # The second tensor sits at relative offset 8*32*4 = 1024; 1056 is 32- but not 64-aligned.
    offset_at = data.index(b"output_norm.weight") + len(b"output_norm.weight") + 4 + 8 + 4
    assert struct.unpack_from("<Q", data, offset_at)[0] == 1024
    expect_format_error(
        tmp_path,
        patched(data, offset_at, "<Q", 1056),
        field="output_norm.weight.offset",
        offset=offset_at,
        match="alignment 64",
    )


# ----------------------------------------------------------------------------------------------
# Tensor infos


def test_tensor_infos(tmp_path, valid_bytes, layout):
    parts = layout["parts"]
    name = "blk.0.attn_q.weight"
    n_dims_at, ne_at, type_at, offset_at = (parts[f"{name}#{i}"][0] for i in (2, 3, 4, 5))
    expect_format_error(
        tmp_path, patched(valid_bytes, n_dims_at, "<I", 5), field=name + ".n_dims", offset=n_dims_at, match="1 to 4"
    )
    expect_format_error(tmp_path, patched(valid_bytes, n_dims_at, "<I", 0), field=name + ".n_dims")
    expect_format_error(tmp_path, patched(valid_bytes, n_dims_at, "<I", 2**32 - 1), field=name + ".n_dims")
    expect_format_error(
        tmp_path, patched(valid_bytes, type_at, "<I", 99), field=name + ".type", offset=type_at, match="unknown"
    )
    expect_format_error(
        tmp_path, patched(valid_bytes, type_at, "<I", int(gguf.GGMLQuantizationType.IQ2_XXS)), field=name + ".type"
    )
    expect_format_error(tmp_path, patched(valid_bytes, ne_at, "<Q", 48), field=name + ".ne[0]", match="block size")
    expect_format_error(tmp_path, patched(valid_bytes, ne_at, "<Q", 0), field=name + ".ne[0]", match="empty")
    expect_format_error(
        tmp_path, patched(valid_bytes, ne_at + 8, "<Q", 2**62), field=name + ".ne", match="more than the whole file"
    )
    expect_format_error(
        tmp_path, patched(valid_bytes, offset_at, "<Q", 3), field=name + ".offset", offset=offset_at, match="alignment"
    )
    expect_format_error(
        tmp_path, patched(valid_bytes, offset_at, "<Q", 2**40), field=name + ".offset", match="past the end"
    )
    expect_format_error(
        tmp_path, patched(valid_bytes, offset_at, "<Q", 2**64 - 32), field=name + ".offset", match="past the end"
    )
    # Point attn_q at the embedding's data: the two ranges overlap.
    embd_rel = layout["tensors"]["token_embd.weight"][1] - layout["data_offset"]
    expect_format_error(tmp_path, patched(valid_bytes, offset_at, "<Q", embd_rel), match="overlaps")


def test_tensor_names(tmp_path, valid_bytes, layout):
    offset, nbytes = layout["parts"]["blk.0.attn_k.weight#1"]
    duplicate = valid_bytes[:offset] + b"blk.0.attn_q.weight" + valid_bytes[offset + nbytes :]
    expect_format_error(tmp_path, duplicate, field="blk.0.attn_q.weight", match="duplicate tensor name")
    unknown = valid_bytes[:offset] + b"blk.0.attn_z.weight" + valid_bytes[offset + nbytes :]
    path = tmp_path / "unknown.gguf"
    path.write_bytes(unknown)
    with read_gguf(path) as model:  # kept under its GGUF name, and reported
        assert model.metadata["unmapped_tensors"] == ["blk.0.attn_z.weight"]
        assert "blk.0.attn_z.weight" in model.tensors
    len_at = layout["parts"]["blk.0.attn_k.weight#0"][0]
    expect_format_error(tmp_path, patched(valid_bytes, len_at, "<Q", 2**62), match="truncated")


def test_head_counts_that_cannot_unpermute(tmp_path, valid_bytes, layout):
    value_at = layout["parts"]["llama.attention.head_count#3"][0]
    expect_format_error(
        tmp_path, patched(valid_bytes, value_at, "<I", 0), field="llama.attention.head_count", match="is 0"
    )
    expect_format_error(tmp_path, patched(valid_bytes, value_at, "<I", 3), field="blk.0.attn_q.weight", match="heads")
    kv_at = layout["parts"]["llama.attention.head_count_kv#3"][0]
    expect_format_error(tmp_path, patched(valid_bytes, kv_at, "<I", 0), field="blk.0.attn_k.weight", match="heads")


# ----------------------------------------------------------------------------------------------
# Every part, every kind of damage; then random damage


@pytest.mark.parametrize("value", [0, 1, 0xFF, 0x7F, 0x80])
def test_every_part_overwritten(tmp_path, valid_bytes, layout, value):
    for label, (offset, nbytes) in layout["parts"].items():
        damaged = bytearray(valid_bytes)
        damaged[offset : offset + min(nbytes, 8)] = bytes([value]) * min(nbytes, 8)
        opens_or_format_error(tmp_path, bytes(damaged))


def test_every_metadata_byte_flipped(tmp_path, valid_bytes, layout):
    for offset in range(layout["data_offset"]):
        damaged = bytearray(valid_bytes)
        damaged[offset] ^= 0xFF
        opens_or_format_error(tmp_path, bytes(damaged))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_gives_format_error_or_a_readable_model(tmp_path, valid_bytes, layout, data):
    metadata_end = layout["data_offset"]
    mutated = bytearray(valid_bytes)
    # Mostly the metadata (where parsing decisions are made), sometimes anywhere.
    for _ in range(data.draw(st.integers(1, 8), label="n_mutations")):
        limit = data.draw(st.sampled_from([metadata_end - 1, len(valid_bytes) - 1]), label="region")
        offset = data.draw(st.integers(0, limit), label="offset")
        mutated[offset] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        mutated = mutated[: data.draw(st.integers(0, len(mutated)), label="length")]
    opens_or_format_error(tmp_path, bytes(mutated))
