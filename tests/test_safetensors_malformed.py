"""Property test: any mutation of a valid model directory's .safetensors file gives FormatError or a clean read."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from convqa.errors import FormatError
from convqa.formats import open_model


@pytest.fixture(scope="module")
def valid_dir(synthetic_dir):
    return synthetic_dir("llama-tiny-tied")


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4095), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 4095), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 4095), st.integers(0, 255)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
@example(mutations=[("truncate", 0, 0), ("flip", 0, 1)])  # an empty file, then more damage (found by CI)
def test_mutated_safetensors_never_raise_anything_but_format_error(valid_dir, tmp_path_factory, mutations):
    work = tmp_path_factory.mktemp("mut") / "model"
    shutil.copytree(valid_dir, work)
    target = work / "model.safetensors"
    blob = bytearray(target.read_bytes())
    header_len = int.from_bytes(blob[:8], "little") + 8
    for kind, pos, value in mutations:
        if not blob:
            break  # truncated to nothing: the empty file itself is the case under test
        # Aim most mutations at the 8-byte length and the JSON header, where parsing happens.
        pos = pos % min(len(blob), header_len + 64)
        if kind == "flip":
            blob[pos] ^= value
        elif kind == "truncate":
            del blob[pos:]
        else:
            blob.insert(pos, value)
    target.write_bytes(bytes(blob))
    try:
        with open_model(work) as model:
            for tensor in model:
                tensor.raw()
    except FormatError as exc:
        assert str(work) in str(exc) or "model.safetensors" in str(exc)
