"""Files convqa writes work in the real consumers: transformers, llama.cpp, and convqa's APR loader.

Lossless (F32) conversions must reproduce the ground truth's logits bit for bit under the same
engine; llama.cpp computes in its own kernels, so it is held to 1e-5 relative with an F32 KV
cache (docs/formats.md GGUF 6).
"""

from __future__ import annotations

import numpy as np
import pytest

from convqa.convert.builtin import convert
from convqa.infer.engines import capability, engine_for

IDS = [1, 17, 42, 99, 123, 7, 300, 5, 64, 250, 11, 480]


def logits(engine_name: str, path) -> np.ndarray:
    with engine_for(engine_name, "cpu").load(path) as engine:
        return engine.teacher_forced_logits(IDS)


@pytest.fixture(scope="module")
def artifacts(synthetic_dir, tmp_path_factory):
    out = {}
    for preset in ("qwen2-tiny", "llama-tiny-tied"):
        src = synthetic_dir(preset)
        work = tmp_path_factory.mktemp(preset)
        convert(src, work / "m.gguf", "gguf")
        convert(src, work / "m.apr", "apr")
        convert(work / "m.gguf", work / "back", "safetensors")
        out[preset] = {"st": src, "gguf": work / "m.gguf", "apr": work / "m.apr", "st-gguf-st": work / "back"}
    return out


@pytest.mark.parametrize("preset", ["qwen2-tiny", "llama-tiny-tied"])
def test_transformers_logits_are_bit_identical_on_every_format(artifacts, preset):
    paths = artifacts[preset]
    reference = logits("transformers", paths["st"])
    assert reference.shape == (len(IDS), 512) and np.isfinite(reference).all()
    for fmt in ("gguf", "apr", "st-gguf-st"):
        got = logits("transformers", paths[fmt])
        assert np.array_equal(got, reference), f"{fmt}: max |d| {np.abs(got - reference).max()}"


@pytest.mark.parametrize("preset", ["qwen2-tiny", "llama-tiny-tied"])
def test_llama_cpp_agrees_within_1e5_relative(artifacts, preset):
    ok, reason = capability("llama.cpp", "cpu")
    if not ok:
        pytest.skip(reason)
    reference = logits("transformers", artifacts[preset]["st"])
    got = logits("llama.cpp", artifacts[preset]["gguf"])
    rel = np.abs(got - reference).max() / np.abs(reference).max()
    assert rel < 1e-5, rel
    assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_a_layout_bug_is_not_bit_identical(artifacts, synthetic_dir, tmp_path):
    """The parity check above can fail: a transposed-data GGUF loads in neither consumer faithfully."""
    bad = tmp_path / "bad.apr"
    convert(synthetic_dir("qwen2-tiny"), bad, "apr", mutant="transpose-2d")
    reference = logits("transformers", artifacts["qwen2-tiny"]["st"])
    got = logits("transformers", bad)
    assert np.abs(got - reference).max() > 1e-3
