"""convqa.compare.tensors: the error metrics of a tensor pair, taken in float64 a slice at a time,
equal the whole-tensor float64 numbers, keep a NaN, and hold no whole-tensor float64 temporary."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from tinymodel import const_tensor

from convqa.compare.tensors import ERROR_SLICE_ELEMENTS, compare_tensor
from convqa.encodings import BF16, F32, Q8_0

SHAPE = (64 * ERROR_SLICE_ELEMENTS // 1024 + 7, 1024)  # 64 slices and a short one: 64 MB in float32


def values(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(SHAPE) * 0.02 + 0.25).astype(np.float32)


def test_errors_equal_the_whole_tensor_numbers():
    ref = values()
    cand = ref + np.float32(1e-3) * np.sign(ref)
    row = compare_tensor(const_tensor("w", ref), const_tensor("w", cand))
    a, b = ref.astype(np.float64), cand.astype(np.float64)
    assert row.max_abs == np.max(np.abs(a - b))
    assert row.normalized_max_abs == row.max_abs / np.max(np.abs(a))
    assert row.rel_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-12)
    assert row.status == "differ"


def test_a_nan_in_a_later_slice_is_not_lost():
    ref = values()
    cand = ref.copy()
    cand.reshape(-1)[2 * ERROR_SLICE_ELEMENTS + 5] = np.nan
    row = compare_tensor(const_tensor("w", ref), const_tensor("w", cand))
    assert np.isnan(row.max_abs)
    assert row.status == "differ" and row.diagnosis == "candidate has NaN/Inf values"


@pytest.mark.parametrize("encoding", [BF16, Q8_0])
def test_a_lossy_pair_holds_no_float64_copy_of_the_tensor(encoding):
    """Whole-tensor float64 copies, their difference and the reference quantizer's temporaries
    were 5.6 GB for a 1.5B model's 0.9 GB embedding."""
    ref, cand = const_tensor("w", values()), const_tensor("w", values(), encoding)
    ref.raw(), cand.raw()  # the stored bytes are the files' (mapped); what the comparison allocates counts
    f32_bytes = np.prod(SHAPE) * 4
    tracemalloc.start()
    try:
        row = compare_tensor(ref, cand)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert row.status == "within_tolerance", row
    # The candidate's float32 decode, the reference encoder's output and fixed-size slice buffers
    # (about 50 MB, which a 0.9 GB embedding does not notice): 3.0x here, where the whole-tensor
    # float64 temporaries were 5.0x.
    assert peak < 3.5 * f32_bytes, f"peak {peak} bytes for a {f32_bytes}-byte float32 tensor"
    if encoding is Q8_0:
        assert row.reference_blocks["differing_blocks"] == 0
