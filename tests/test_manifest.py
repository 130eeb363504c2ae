"""Per-tensor statistics of the manifest (convqa.inspect.manifest.tensor_stats): the numbers the
tensor gates compare between an artifact and its parent, taken in float64 a slice at a time."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from convqa.inspect.manifest import STATS_SLICE_ELEMENTS, build_manifest, tensor_stats, values_sha256


def float64_reference(values: np.ndarray) -> dict:
    """The statistics as numpy gives them on a whole float64 copy: what a slice at a time must equal."""
    v = values.astype(np.float64).reshape(-1)
    fv = v[np.isfinite(v)]
    return {"mean": fv.mean(), "std": fv.std(), "min": fv.min(), "max": fv.max(),
            "l2": np.sqrt(np.dot(fv, fv)), "zero_fraction": np.count_nonzero(fv == 0) / fv.size,
            "nan": int(np.isnan(v).sum()), "inf": int(np.isinf(v).sum())}


@pytest.mark.parametrize("size", [1, 1000, STATS_SLICE_ELEMENTS, 3 * STATS_SLICE_ELEMENTS + 17])
def test_statistics_equal_numpys_on_a_float64_copy(size):
    rng = np.random.default_rng(size)
    # An offset mean and a small spread: the case where a float32 sum or sum(x^2) - n*mean^2 loses digits.
    values = (rng.standard_normal(size) * 0.02 + 3.0).astype(np.float32)
    values[:: 7] = 0.0
    got, want = tensor_stats(values.reshape(-1, 1) if size > 1 else values), float64_reference(values)
    assert got.keys() == want.keys()
    for key in ("min", "max", "zero_fraction", "nan", "inf"):
        assert got[key] == want[key], key
    for key in ("mean", "std", "l2"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_non_finite_values_are_counted_and_left_out():
    values = np.array([1.0, np.nan, np.inf, -np.inf, 0.0, -2.0], dtype=np.float32)
    stats = tensor_stats(values)
    assert (stats["nan"], stats["inf"]) == (1, 2)
    assert (stats["min"], stats["max"], stats["zero_fraction"]) == (-2.0, 1.0, 1 / 3)
    assert stats["mean"] == pytest.approx(-1 / 3)
    assert stats["l2"] == pytest.approx(np.sqrt(5.0))


@pytest.mark.parametrize("values", [np.zeros(0, np.float32), np.full(9, np.nan, np.float32)])
def test_no_finite_value_gives_no_statistics_not_zeros(values):
    stats = tensor_stats(values)
    assert all(stats[k] is None for k in ("mean", "std", "min", "max", "l2", "zero_fraction"))
    assert stats["nan"] == int(np.isnan(values).sum())


def test_statistics_hold_no_float64_copy_of_the_tensor():
    """A float64 copy of a tensor is 2x its float32 decode, and numpy's std over it makes more of
    the same size: for a 1.5B model's embedding that was 3.7 GB beside the decode."""
    values = np.random.default_rng(0).standard_normal(4_000_000).astype(np.float32)  # 16 MB
    peak = traced_peak(tensor_stats, values)
    assert peak < values.nbytes / 2, f"peak {peak} bytes while taking the statistics of {values.nbytes} bytes"


def test_values_sha256_hashes_the_decode_in_place():
    """The values' sha256 (convqa.compare.manifests decides exact comparisons with it) hashes a
    float32 decode where it lies: no copy of a 1.5B model's 0.9 GB embedding."""
    values = np.random.default_rng(0).standard_normal(4_000_000).astype(np.float32)  # 16 MB
    peak = traced_peak(values_sha256, values)
    assert peak < 1 << 20, f"peak {peak} bytes while hashing {values.nbytes} bytes"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # random K-quant scales
@pytest.mark.parametrize("encoding", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "APR_Q8"])
def test_an_entry_folds_a_slice_of_rows_at_a_time_into_the_numbers_of_the_whole_decode(encoding):
    """tensor_entry decodes a slice of rows at a time (Encoding.decoded_slices) and takes the
    statistics and the values' digest from each slice: the digest must be the whole decode's bit
    for bit (exact comparisons are decided with it), the statistics numpy's on a float64 copy."""
    from convqa.encodings import by_name
    from convqa.inspect.manifest import tensor_entry
    from tinymodel import const_tensor, random_tensor

    enc = by_name(encoding)
    rows, cols = 3 * (STATS_SLICE_ELEMENTS // 512) + 5, 512  # several slices and a short last one
    rng = np.random.default_rng(1)
    if enc.can_encode:
        tensor = const_tensor("w", (rng.standard_normal((rows, cols)) * 0.02 + 0.5).astype(np.float32), enc)
    else:  # gguf-py has no Q4_K quantizer: random blocks (NaN and Inf scales among them)
        tensor = random_tensor("w", (rows, cols), enc, rng)
    whole = enc.decode(tensor.raw(), (rows, cols))
    entry = tensor_entry(tensor)
    assert entry["values_sha256"] == values_sha256(whole)
    want = float64_reference(whole)
    for key in ("min", "max", "zero_fraction", "nan", "inf"):
        assert entry["stats"][key] == want[key], key
    for key in ("mean", "std", "l2"):
        assert entry["stats"][key] == pytest.approx(want[key], rel=1e-12), key


def test_an_entry_of_a_bf16_tensor_holds_no_float32_decode_of_it():
    """The decode of a 1.5B model's BF16 embedding is 0.9 GB; a manifest held it whole (and the
    inspection of a 1.5B model peaked at 2.3 GB RSS)."""
    from convqa.encodings import BF16
    from convqa.inspect.manifest import tensor_entry
    from tinymodel import const_tensor

    values = np.random.default_rng(0).standard_normal((4000, 1024)).astype(np.float32)  # 16 MB in F32
    tensor = const_tensor("w", values, BF16)
    tensor.raw()  # the stored bytes are the file's (mapped); only what the entry allocates counts
    peak = traced_peak(tensor_entry, tensor)
    assert peak < values.nbytes / 4, f"peak {peak} bytes for a tensor of {values.nbytes} bytes in F32"


def traced_peak(fn, *args) -> int:
    """Peak bytes Python allocates (numpy arrays included) while `fn(*args)` runs."""
    tracemalloc.start()
    try:
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_manifest_of_a_real_model_has_the_statistics_of_every_tensor(smollm2_gguf):
    manifest = build_manifest(smollm2_gguf)
    assert manifest["tensor_count"] == len(manifest["tensors"]) > 0
    for entry in manifest["tensors"]:
        stats = entry["stats"]
        assert stats["nan"] == stats["inf"] == 0, entry["name"]
        assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0 and stats["l2"] > 0, entry["name"]
