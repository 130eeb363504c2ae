"""Converters across every edge: bit-exact round trips, layout preserved, dequantization recorded."""

from __future__ import annotations

import numpy as np
import pytest

from convqa.compare.tensors import compare_models
from convqa.convert.builtin import convert
from convqa.errors import ConversionError
from convqa.formats import open_model

EXT = {"gguf": ".gguf", "apr": ".apr", "safetensors": ""}


def run_chain(src, tmp_path, hops: list[str], quant: str | None = None):
    """Convert src along `hops` (e.g. ["gguf", "st"]); returns the list of artifact paths."""
    paths, current = [], src
    for i, fmt in enumerate(hops):
        fmt = "safetensors" if fmt == "st" else fmt
        out = tmp_path / f"hop{i}-{fmt}{EXT[fmt]}"
        convert(current, out, fmt, quant=quant if i == 0 else None)
        paths.append(out)
        current = out
    return paths


def assert_bit_exact(a_path, b_path):
    with open_model(a_path) as a, open_model(b_path) as b:
        result = compare_models(a, b)
        assert list(a.tensors) == list(b.tensors) or set(a.tensors) == set(b.tensors)
        for row in result.tensors:
            assert row.status == "identical" and row.max_abs == 0, (row.name, row.status, row.diagnosis, row.max_abs)
            if not row.bit_exact:  # GGUF's lossless F32 upcast of a BF16/F16 model's 1-D tensors, nothing else
                assert len(row.ref_shape) == 1 and "F32" in (row.ref_encoding, row.cand_encoding), row
        assert result.config_differences == {}
        assert result.tokenizer_differences == {}
        assert a.config == b.config
        assert len(result.tensors) > 0


ROUND_TRIPS = [["gguf", "st"], ["apr", "st"], ["gguf", "apr", "gguf"], ["apr", "gguf", "apr"]]


@pytest.mark.parametrize("preset", ["qwen2-tiny", "qwen2-tiny-tied", "llama-tiny", "llama-tiny-tied"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("chain", ROUND_TRIPS, ids=lambda c: "-".join(c))
def test_round_trips_are_bit_exact(synthetic_dir, tmp_path, preset, dtype, chain):
    src = synthetic_dir(preset, dtype)
    paths = run_chain(src, tmp_path, chain)
    # S->G->S and S->A->S reproduce S; S->G->A->G reproduces S->G; S->A->G->A reproduces S->A.
    reference = src if chain[-1] == "st" else paths[0]
    assert_bit_exact(reference, paths[-1])
    assert_bit_exact(src, paths[-1])


def test_position_encoded_tensors_stay_in_place_on_every_edge(position_model, tmp_path):
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.k_proj.weight"]
    with open_model(position_model) as src:
        expected = {n: src.tensors[n].to_float32() for n in names}
    for chain in (["gguf", "apr", "st"], ["apr", "gguf", "st"], ["gguf", "st", "apr"]):
        for path in run_chain(position_model, tmp_path / "-".join(chain), chain):
            with open_model(path) as m:
                for n in names:
                    t = m.tensors[n]
                    values = t.to_float32()
                    assert values.shape == expected[n].shape
                    # Spot-check the encoding itself: the value at [i, j] is 1000 i + j.
                    assert values[3, 5] == 3005.0 and values[-1, -1] == expected[n][-1, -1]
                    np.testing.assert_array_equal(values, expected[n])
                    if m.format == "gguf":
                        assert list(t.stored_shape) == list(reversed(t.shape))


def test_gguf_ne_is_reversed_shape_in_the_file(position_model, tmp_path):
    import gguf

    out = tmp_path / "m.gguf"
    convert(position_model, out, "gguf")
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors["token_embd.weight"]
    assert [int(x) for x in embd.shape] == [64, 512]  # ne = [hidden, vocab] for HF (vocab, hidden)
    assert embd.data[7, 9] == 7009.0


def test_quantized_variant_records_what_it_quantized(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    record = convert(src, tmp_path / "q.gguf", "gguf", quant="q8_0")
    assert record.quantized and all(enc == "Q8_0" for _, _, enc in record.quantized)
    with open_model(tmp_path / "q.gguf") as m:
        encs = {t.name: t.encoding.name for t in m}
    assert encs["model.layers.0.self_attn.q_proj.weight"] == "Q8_0"
    assert encs["model.layers.0.self_attn.q_proj.bias"] == "F32"  # biases stay F32 like llama.cpp
    assert encs["model.layers.0.input_layernorm.weight"] == "F32"
    # APR cannot hold GGML Q8_0: G->A dequantizes, and says so.
    record = convert(tmp_path / "q.gguf", tmp_path / "q.apr", "apr")
    assert record.dequantized and {r[1] for r in record.dequantized} == {"Q8_0"}
    with open_model(tmp_path / "q.gguf") as g, open_model(tmp_path / "q.apr") as a:
        result = compare_models(g, a)
        assert all(r.max_abs == 0.0 for r in result.tensors)  # dequantization itself is exact


def test_unknown_quant_and_incomplete_source_are_refused(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    with pytest.raises(ConversionError, match="unknown quantization"):
        convert(src, tmp_path / "x.gguf", "gguf", quant="q9_9")
    with pytest.raises(ConversionError, match="cannot hold"):
        convert(src, tmp_path / "x.apr", "apr", quant="q5_1")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.apr").exists()
    assert not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------- re-encoding a slice of rows at a time


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("source_name", ["BF16", "F16", "F32", "Q8_0"])
@pytest.mark.parametrize("target_name", ["Q8_0", "Q4_0", "Q5_1", "F16", "F32"])
def test_transcode_in_row_slices_writes_the_bytes_of_the_whole_tensor_path(source_name, target_name):
    from convqa import encodings

    source, target = encodings.by_name(source_name), encodings.by_name(target_name)
    if source.is_quantized and target.is_quantized:
        pytest.skip("the converter refuses to re-quantize (stacked errors)")
    rng = np.random.default_rng(0)
    # 5000 rows: several slices of 2048 rows (8 MB of float32 at 1024 columns) and a ragged last one;
    # exact halves and zero rows exercise the quantizers' rounding and empty-block paths.
    values = rng.standard_normal((5000, 1024)).astype(np.float32)
    values[7] = 0.0
    values[11, :64] = np.float32(0.5)
    raw = source.encode(values) if source.name != "BF16" else _bf16_bits(values).view(np.uint8)
    whole = target.encode(source.decode(raw, values.shape))
    sliced = encodings.transcode(raw, source, values.shape, target)
    assert sliced.dtype == np.uint8 and sliced.tobytes() == whole.tobytes()


def test_transcode_never_holds_the_whole_tensor_in_float32():
    """The 1.5B bench's Q8_0 conversion peaked at 2.28 GB RSS for a 467 MB BF16 embedding:
    the float32 upcast and gguf-py's quantizer temporaries, each the whole tensor's size."""
    import tracemalloc

    from convqa import encodings

    values = np.random.default_rng(1).standard_normal((16384, 1024)).astype(np.float32)
    raw = _bf16_bits(values).view(np.uint8).reshape(-1)
    del values
    float32_bytes = 16384 * 1024 * 4
    tracemalloc.start()
    try:
        out = encodings.transcode(raw, encodings.BF16, (16384, 1024), encodings.Q8_0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.nbytes == encodings.Q8_0.nbytes((16384, 1024))
    assert peak < out.nbytes + float32_bytes // 2, f"peak {peak / 2**20:.0f} MiB for a {float32_bytes / 2**20:.0f} MiB float32 tensor"


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("target", ["Q8_0", "F32"])
def test_a_reencoded_tensor_is_read_from_its_file_a_slice_of_rows_at_a_time(synthetic_dir, tmp_path, fmt, target):
    """Quantizing (S->G Q8_0) or dequantizing (G->S F32) a tensor read it whole first: at 1.5B
    the BF16 embedding's 445 MiB beside its output (S->G Q8_0 753 MiB RSS, now 323 MiB). Now only
    the output and one slice of rows are in memory, and the bytes are the whole-tensor path's."""
    import tracemalloc

    from convqa import encodings
    from convqa.convert.builtin import convert, reencoded
    from convqa.formats import open_model

    source = synthetic_dir("qwen2-tiny", dtype="bfloat16", vocab_size=65536, hidden_size=1024)  # a 128 MiB embedding
    path = source if fmt == "safetensors" else tmp_path / "model.gguf"
    if fmt == "gguf":
        convert(source, path, "gguf")
    encoding = encodings.by_name(target)
    with open_model(path) as model:
        tensor = model.tensors["model.embed_tokens.weight"]
        assert tensor.stored_in and tensor.encoding == encodings.BF16
        tracemalloc.start()
        try:
            out = reencoded(tensor, encoding).raw()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(out, encodings.transcode(tensor.raw(), tensor.encoding, tensor.shape, encoding))
    assert peak < out.nbytes + tensor.nbytes // 2, f"peak {peak >> 20} MiB: output {out.nbytes >> 20}, input {tensor.nbytes >> 20} MiB"
