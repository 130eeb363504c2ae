"""Hostile and broken APR files: every one must end in FormatError naming the field, nothing else.

Each case starts from a valid file written by write_apr, breaks one thing, and (where the point
is to reach a deeper check) recomputes both CRCs so the header and footer checksums still pass.
"""

from __future__ import annotations

import json
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convqa import encodings
from convqa.errors import FormatError
from convqa.formats import open_model
from convqa.formats.apr import AprWriter, read_apr, write_apr
from convqa.model import LazyTensor, ModelConfig, WritePlan
from tinymodel import random_tensor, tiny_config, tiny_plan, tiny_tokenizer, tiny_values

CONFIG = tiny_config(layers=1)


def _plan(config: ModelConfig = CONFIG) -> WritePlan:
    """Standard-normal F32 weights plus an extra Q4_K tensor of random bytes (one rng, seed 0).
    The tests below break fields of exactly this file."""
    rng = np.random.default_rng(0)
    plan = tiny_plan(config, tiny_values(config, rng), tokenizer=tiny_tokenizer("plain"))
    plan.tensors.append(random_tensor("extra.q4_k", (2, 256), encodings.Q4_K, rng))
    return plan


@pytest.fixture(scope="module")
def valid() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "valid.apr"
        write_apr(path, _plan())
        return path.read_bytes()


@pytest.fixture(scope="module")
def valid_tied() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tied.apr"
        write_apr(path, _plan(CONFIG.replace(tie_word_embeddings=True)))
        return path.read_bytes()


def layout(data: bytes) -> dict:
    """Absolute positions of every header and index field (test-side parser)."""
    (count,) = struct.unpack_from("<I", data, 8)
    (meta_size,) = struct.unpack_from("<I", data, 20)
    index_off, data_off = struct.unpack_from("<QQ", data, 24)
    entries = []
    pos = index_off
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", data, pos)
        entry = {"name_len_at": pos, "name_at": pos + 2, "name": data[pos + 2 : pos + 2 + name_len].decode()}
        pos += 2 + name_len
        entry["dtype_at"], entry["ndim_at"] = pos, pos + 1
        ndim = data[pos + 1]
        entry["dims_at"] = pos + 2
        pos += 2 + 8 * ndim
        entry["offset_at"], entry["size_at"] = pos, pos + 8
        entry["offset"], entry["size"] = struct.unpack_from("<QQ", data, pos)
        pos += 16
        entries.append(entry)
    return {"meta_size": meta_size, "index_off": index_off, "data_off": data_off, "entries": entries}


def refresh_crcs(buf: bytearray) -> bytes:
    """Recompute header and footer CRCs so a structural change reaches the structural checks."""
    buf[40:44] = struct.pack("<I", zlib.crc32(bytes(buf[:40]) + bytes(buf[44:64])))
    buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])))
    return bytes(buf)


def put(buf: bytearray, at: int, fmt: str, value) -> bytearray:
    struct.pack_into(fmt, buf, at, value)
    return buf


def replace_metadata_text(data: bytes, old: bytes, new: bytes) -> bytes:
    """Same-length edit of the metadata JSON (whitespace keeps lengths equal)."""
    assert len(old) == len(new)
    meta_end = 64 + layout(data)["meta_size"]
    at = data.index(old, 64, meta_end)
    buf = bytearray(data)
    buf[at : at + len(old)] = new
    return refresh_crcs(buf)


READERS = [read_apr, open_model]


def assert_format_error(tmp_path, data: bytes, field: str | None = None, match: str | None = None) -> FormatError:
    path = tmp_path / "bad.apr"
    path.write_bytes(data)
    error = None
    for reader in READERS:
        with pytest.raises(FormatError) as info:
            with reader(path) as artifact:
                for tensor in artifact:
                    tensor.raw()
        error = info.value
        assert error.path == str(path)
        if field is not None:
            assert error.field == field, (reader.__name__, str(error))
        if match is not None:
            assert match in str(error), str(error)
    return error


def test_the_base_file_is_valid(tmp_path, valid, valid_tied):
    for data in (valid, valid_tied):
        path = tmp_path / "ok.apr"
        path.write_bytes(data)
        with read_apr(path) as artifact:
            assert len(artifact.tensors) >= 10
            for tensor in artifact:
                assert tensor.raw().size == tensor.nbytes


# --- truncation -------------------------------------------------------------------------------


def truncation_points(data: bytes) -> list[int]:
    lay = layout(data)
    first = lay["entries"][0]
    points = {
        0, 1, 3, 4, 8, 39, 40, 44, 63, 64, 65,
        64 + lay["meta_size"] // 2, 64 + lay["meta_size"], lay["index_off"], lay["index_off"] + 1,
        first["name_at"] + 1, first["dims_at"] + 3, first["size_at"] + 7,
        lay["data_off"], lay["data_off"] + 1, lay["data_off"] + first["size"] // 2,
        len(data) // 2, len(data) - 5, len(data) - 4, len(data) - 3, len(data) - 1,
    }  # fmt: skip
    return sorted(p for p in points if p < len(data))


def test_truncated_anywhere(tmp_path, valid):
    for cut in truncation_points(valid):
        assert_format_error(tmp_path, valid[:cut])


def test_truncated_with_fixed_checksums_hits_a_bounds_check(tmp_path, valid):
    """Cut the data section and re-append a correct footer: only the bounds checks can notice."""
    lay = layout(valid)
    last = max(lay["entries"], key=lambda e: e["offset"])
    cut = lay["data_off"] + last["offset"] + last["size"] // 2
    error = assert_format_error(tmp_path, refresh_crcs(bytearray(valid[:cut] + bytes(4))), field="offset")
    assert "runs past" in str(error)


def test_empty_and_tiny_files(tmp_path):
    for data in (b"", b"APR", b"APR\x00", b"APR\x00" + bytes(60), b"APR\x00" + bytes(63)):
        assert_format_error(tmp_path, data)


# --- header fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"APRN", b"APR1"])
def test_v1_magic(tmp_path, valid, magic):
    assert_format_error(tmp_path, magic + valid[4:], field="magic", match="v1")


@pytest.mark.parametrize("magic", [b"GGUF", b"\x00\x00\x00\x00", b"APR\x01", b"apr\x00"])
def test_wrong_magic(tmp_path, valid, magic):
    assert_format_error(tmp_path, magic + valid[4:])


def test_legacy_apr2_magic_is_accepted(tmp_path, valid):
    path = tmp_path / "legacy.apr"
    path.write_bytes(refresh_crcs(bytearray(b"APR2" + valid[4:])))
    with open_model(path) as artifact:
        assert artifact.format == "apr" and artifact.metadata["apr_header"]["magic"] == "APR2"


@pytest.mark.parametrize("at", [4, 6, 8, 12, 20, 24, 32, 45, 63])
def test_header_byte_flip_without_crc_fix(tmp_path, valid, at):
    buf = bytearray(valid)
    buf[at] ^= 0x10
    assert_format_error(tmp_path, bytes(buf), field="checksum", match="header checksum")


HEADER_CASES = {
    # name: (field offset, struct format, value, expected field)
    "version_major": (4, "<B", 3, "version_major"),
    "column_major": (6, "<H", 0x0800, "flags"),
    "both_layouts": (6, "<H", 0x0C00, "flags"),
    "lz4": (6, "<H", 0x0401, "flags"),
    "zstd": (6, "<H", 0x0402, "flags"),
    "encrypted": (6, "<H", 0x0404, "flags"),
    "sharded": (6, "<H", 0x0410, "flags"),
    "undefined_flag": (6, "<H", 0x8400, "flags"),
    "absurd_tensor_count": (8, "<I", 0xFFFFFFFF, "tensor_count"),
    "metadata_offset": (12, "<Q", 128, "metadata_offset"),
    "metadata_size_past_eof": (20, "<I", 0xFFFFFFF0, "metadata_size"),
    "index_offset_misaligned": (24, "<Q", 0, "tensor_index_offset"),
    "index_offset_past_eof": (24, "<Q", 1 << 60, "tensor_index_offset"),
    "data_offset_past_eof": (32, "<Q", 1 << 40, "data_offset"),
    "data_offset_misaligned": (32, "<Q", None, "data_offset"),
    "data_before_index": (32, "<Q", 64, "data_offset"),
    "reserved_nonzero": (50, "<B", 1, "reserved"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_field_with_crc_fixed(tmp_path, valid, case):
    at, fmt, value, field = HEADER_CASES[case]
    if value is None:  # data_offset misaligned by one byte
        value = layout(valid)["data_off"] + 1
    data = refresh_crcs(put(bytearray(valid), at, fmt, value))
    assert_format_error(tmp_path, data, field=field)


def test_tensor_count_one_too_many(tmp_path, valid):
    (count,) = struct.unpack_from("<I", valid, 8)
    data = refresh_crcs(put(bytearray(valid), 8, "<I", count + 1))
    error = assert_format_error(tmp_path, data)
    assert error.offset is not None and error.offset >= layout(valid)["index_off"]


def test_tensor_count_too_small_leaves_tensors_out_but_footer_catches_nothing(tmp_path, valid):
    """A smaller count is structurally valid (fewer entries); the file still opens, with fewer tensors.
    This documents the limit of structural checks: the CRCs were recomputed by the attacker."""
    (count,) = struct.unpack_from("<I", valid, 8)
    path = tmp_path / "fewer.apr"
    path.write_bytes(refresh_crcs(put(bytearray(valid), 8, "<I", count - 1)))
    with read_apr(path) as artifact:
        assert len(artifact.tensors) == count - 1


# --- index entries ----------------------------------------------------------------------------


def entry_case(valid: bytes, which: int, key: str, fmt: str, value) -> bytes:
    entry = layout(valid)["entries"][which]
    return refresh_crcs(put(bytearray(valid), entry[key], fmt, value))


INDEX_CASES = {
    "name_len_huge": (0, "name_len_at", "<H", 0xFFFF, "name_len"),
    "name_len_zero": (0, "name_len_at", "<H", 0, "name_len"),
    "name_len_longer": (0, "name_len_at", "<H", 40, None),
    "ndim_absurd": (0, "ndim_at", "<B", 200, "ndim"),
    "ndim_nine": (0, "ndim_at", "<B", 9, "ndim"),
    "ndim_more": (0, "ndim_at", "<B", 3, None),
    "dim_absurd": (0, "dims_at", "<Q", 1 << 62, "dims"),
    "dim_max": (0, "dims_at", "<Q", (1 << 64) - 1, "dims"),
    "dim_changed": (0, "dims_at", "<Q", 17, "size"),
    "dtype_2": (0, "dtype_at", "<B", 2, "dtype"),
    "dtype_255": (0, "dtype_at", "<B", 255, "dtype"),
    "dtype_f16_size_mismatch": (0, "dtype_at", "<B", 1, "size"),
    "size_changed": (0, "size_at", "<Q", 4, "size"),
    "size_huge": (0, "size_at", "<Q", 1 << 63, "size"),
    "offset_misaligned": (1, "offset_at", "<Q", 65, "offset"),
    "offset_past_eof": (1, "offset_at", "<Q", 1 << 50, "offset"),
    "offset_max": (1, "offset_at", "<Q", (1 << 64) - 64, "offset"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_index_entry_field(tmp_path, valid, case):
    which, key, fmt, value, field = INDEX_CASES[case]
    assert_format_error(tmp_path, entry_case(valid, which, key, fmt, value), field=field)


def test_overlapping_tensors(tmp_path, valid):
    entries = layout(valid)["entries"]
    data = entry_case(valid, 2, "offset_at", "<Q", entries[1]["offset"])
    assert_format_error(tmp_path, data, field="offset", match="overlap")


def test_unsorted_index(tmp_path, valid):
    first = layout(valid)["entries"][0]
    assert first["name"] == "extra.q4_k"
    buf = bytearray(valid)
    buf[first["name_at"]] = ord("z")  # "zxtra.q4_k" now sorts after its successor
    assert_format_error(tmp_path, refresh_crcs(buf), field="name", match="not sorted")


def test_duplicate_name(tmp_path, valid):
    entries = {e["name"]: e for e in layout(valid)["entries"]}
    # k_proj and o_proj are neighbours in sorted order with names of equal length.
    o_proj = entries["model.layers.0.self_attn.o_proj.weight"]
    buf = bytearray(valid)
    buf[o_proj["name_at"] + len("model.layers.0.self_attn.")] = ord("k")
    assert_format_error(tmp_path, refresh_crcs(buf), field="name", match="duplicate")


def test_name_not_utf8(tmp_path, valid):
    entry = layout(valid)["entries"][3]
    buf = bytearray(valid)
    buf[entry["name_at"] + 2] = 0xFF
    assert_format_error(tmp_path, refresh_crcs(buf), field="name", match="UTF-8")


def test_gguf_and_hf_name_for_the_same_tensor(tmp_path, valid):
    """`model.norm.weight` renamed to `output_norm.weight` would be fine; here both spellings exist."""
    path = tmp_path / "both.apr"
    plan = _plan()
    norm = next(t for t in plan.tensors if t.name == "model.norm.weight")
    plan.tensors.append(LazyTensor("output_norm.weight", norm.shape, norm.encoding, norm.load_raw))
    write_apr(path, plan)
    assert_format_error(tmp_path, path.read_bytes(), field="name", match="both map to")


def test_data_byte_flip_fails_footer_crc(tmp_path, valid):
    buf = bytearray(valid)
    buf[layout(valid)["data_off"] + 5] ^= 1
    assert_format_error(tmp_path, bytes(buf), field="footer", match="footer checksum")


# --- metadata ---------------------------------------------------------------------------------


def test_bad_json(tmp_path, valid):
    assert_format_error(tmp_path, replace_metadata_text(valid, b'{"model_type"', b'{"model_type '), field="metadata")


def test_metadata_not_an_object(tmp_path, valid):
    buf = bytearray(valid)
    meta_size = layout(valid)["meta_size"]
    buf[64 : 64 + meta_size] = b"[" + b" " * (meta_size - 2) + b"]"
    assert_format_error(tmp_path, refresh_crcs(buf), field="metadata", match="JSON object")


def test_metadata_not_utf8(tmp_path, valid):
    buf = bytearray(valid)
    buf[64 + 3] = 0xC3  # inside "model_type", a lead byte without its continuation
    assert_format_error(tmp_path, refresh_crcs(buf), field="metadata", match="UTF-8")


def test_metadata_deeply_nested(tmp_path, valid):
    buf = bytearray(valid)
    meta_size = layout(valid)["meta_size"]
    depth = (meta_size - 2) // 2
    buf[64 : 64 + meta_size] = (b"[" * depth + b"]" * depth).ljust(meta_size, b" ")
    assert_format_error(tmp_path, refresh_crcs(buf), field="metadata")


def test_nan_in_metadata(tmp_path, valid):
    assert_format_error(
        tmp_path, replace_metadata_text(valid, b'"rope_theta":10000.0', b'"rope_theta":NaN    '), field="metadata"
    )


def test_f32_field_out_of_f32_range(tmp_path, valid):
    data = replace_metadata_text(valid, b'"rope_theta":10000.0', b'"rope_theta":1e300  ')
    assert_format_error(tmp_path, data, field="rope_theta")


@pytest.mark.parametrize(
    "key",
    [
        "architecture",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "vocab_size",
        "intermediate_size",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
    ],
)
def test_missing_required_metadata(tmp_path, valid, key):
    quoted = f'"{key}":'.encode()
    renamed = f'"{key[:-1]}X":'.encode()
    error = assert_format_error(tmp_path, replace_metadata_text(valid, quoted, renamed), field=key)
    assert key in str(error)


def with_metadata(tmp_path, data: bytes, changes: dict) -> bytes:
    """Rewrite `data` with some metadata keys changed (offsets move, so the file is re-laid out)."""
    lay = layout(data)
    metadata = json.loads(data[64 : 64 + lay["meta_size"]]) | changes
    entries = lay["entries"]
    tensors = []
    for e in entries:
        dtype, ndim = data[e["dtype_at"]], data[e["ndim_at"]]
        tensors.append((e["name"], dtype, struct.unpack_from(f"<{ndim}Q", data, e["dims_at"]), e["size"]))
    path = tmp_path / "rewritten.apr"
    with AprWriter(path, metadata, tensors) as writer:
        for e in entries:
            start = lay["data_off"] + e["offset"]
            writer.write_tensor(e["name"], data[start : start + e["size"]])
    return path.read_bytes()


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("num_layers", 0, "num_layers"),
        ("num_layers", "1", "num_layers"),
        ("num_layers", 1.0, "num_layers"),
        ("hidden_size", True, "hidden_size"),
        ("vocab_size", None, "vocab_size"),
        ("rms_norm_eps", -1e-5, "rms_norm_eps"),
        ("rope_theta", "1e4", "rope_theta"),
        ("architecture", "gpt2", "architecture"),
        ("architecture", ["llama"], "architecture"),
        ("rope_type", 2, "rope_type"),
        ("head_dim", 0, "head_dim"),
        ("tokenizer.vocabulary", "abc", "tokenizer.vocabulary"),
        ("tokenizer.vocabulary", ["a", 1], "tokenizer.vocabulary"),
        ("tokenizer.bos_token_id", 99, "tokenizer.bos_token_id"),
        ("tokenizer.eos_token_id", -1, "tokenizer.eos_token_id"),
        ("tokenizer.vocab_size", 17, "tokenizer.vocab_size"),
        ("tokenizer.merges", [1, "t"], "tokenizer.merges"),
        ("tokenizer.token_type", [1, 1], "tokenizer.token_type"),
        ("tokenizer.scores", ["x"] * 16, "tokenizer.scores"),
        ("tokenizer.add_bos_token", 0, "tokenizer.add_bos_token"),
        ("chat_template", 5, "chat_template"),
        ("tied_embeddings", "yes", "tied_embeddings"),
        # an alias next to its canonical key makes aprender-serve drop all metadata
        ("n_vocab", 16, "n_vocab"),
        ("num_hidden_layers", 1, "num_hidden_layers"),
    ],
)
def test_bad_metadata_values(tmp_path, valid, key, value, field):
    assert_format_error(tmp_path, with_metadata(tmp_path, valid, {key: value}), field=field)


def test_metadata_rewrite_helper_keeps_a_valid_file_valid(tmp_path, valid):
    path = tmp_path / "same.apr"
    path.write_bytes(with_metadata(tmp_path, valid, {"note": "harmless custom key"}))
    with read_apr(path) as artifact:
        assert artifact.metadata["apr"]["note"] == "harmless custom key"


def test_tied_flag_with_lm_head_that_is_not_the_embedding(tmp_path, valid_tied):
    head = next(e for e in layout(valid_tied)["entries"] if e["name"] == "lm_head.weight")
    buf = bytearray(valid_tied)
    buf[layout(valid_tied)["data_off"] + head["offset"]] ^= 0x01
    assert_format_error(tmp_path, refresh_crcs(buf), field="tied_embeddings", match="byte copy")


# --- property test: random damage never escapes as anything but FormatError --------------------

_damage = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("header"), st.integers(4, 39), st.integers(0, 255)),  # aim at header fields
)


def damage(data: bytes, edits, fix_crcs: bool) -> bytes:
    buf = bytearray(data)
    for kind, at, value in edits:
        if not buf:
            break
        at %= len(buf)
        if kind == "flip":
            buf[at] ^= 1 << value
        elif kind in ("set", "header"):
            buf[at] = value
        elif kind == "truncate":
            del buf[at:]
        else:
            buf[at:at] = bytes([value]) * (1 + value % 64)
    if fix_crcs and len(buf) >= 68:
        refresh_crcs(buf)
    return bytes(buf)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(_damage, min_size=1, max_size=4), fix_crcs=st.booleans())
def test_random_damage_only_raises_format_error(valid, edits, fix_crcs):
    data = damage(valid, edits, fix_crcs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.apr"
        path.write_bytes(data)
        try:
            with read_apr(path) as artifact:
                for tensor in artifact:
                    assert tensor.raw().size == tensor.nbytes
        except FormatError:
            pass
