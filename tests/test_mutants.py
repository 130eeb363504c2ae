"""Every known-bad converter writes a file that some reader opens, and `diff` names its bug."""

from __future__ import annotations

import pytest

from convqa.cli import main as cli
from convqa.compare.tensors import compare_models
from convqa.convert.builtin import convert
from convqa.errors import FormatError
from convqa.formats import open_model
from convqa.convert.mutants import MUTANTS


def mutant_vs_good(src, tmp_path, mutant, fmt, ext, quant=None, via=None):
    """Convert src (optionally via an intermediate format) correctly and with the mutant."""
    if via is not None:
        mid = tmp_path / f"mid.{via}"
        convert(src, mid, via, quant=quant)
        src, quant = mid, None
    good, bad = tmp_path / f"good{ext}", tmp_path / f"bad{ext}"
    convert(src, good, fmt, quant=quant)
    record = convert(src, bad, fmt, quant=quant, mutant=mutant)
    return good, bad, record


def diff(good, bad):
    with open_model(good) as a, open_model(bad) as b:
        return compare_models(a, b)


def rows_with(result, status):
    return [r for r in result.tensors if r.status == status]


def test_dims_not_reversed_is_a_reversed_dims_reshape(synthetic_dir, tmp_path):
    good, bad, _ = mutant_vs_good(synthetic_dir("qwen2-tiny"), tmp_path, "dims-not-reversed", "gguf", ".gguf")
    result = diff(good, bad)
    mismatched = rows_with(result, "shape_mismatch")
    assert mismatched, "non-square tensors must come back with swapped shapes"
    assert any("reversed-dims reshape" in r.diagnosis for r in mismatched)
    assert cli(["diff", str(good), str(bad)]) == 1


def test_transpose_2d_is_diagnosed_as_layout_002(synthetic_dir, tmp_path):
    for fmt, ext in (("gguf", ".gguf"), ("apr", ".apr")):
        good, bad, _ = mutant_vs_good(synthetic_dir("qwen2-tiny"), tmp_path / fmt, "transpose-2d", fmt, ext)
        result = diff(good, bad)
        differ = rows_with(result, "differ")
        assert differ and all(r.name.endswith(".weight") for r in differ)
        assert any("LAYOUT-002" in r.diagnosis for r in differ), [r.diagnosis for r in differ]


def test_skip_qk_permute_shows_permuted_rows(synthetic_dir, tmp_path):
    good, bad, _ = mutant_vs_good(synthetic_dir("llama-tiny"), tmp_path, "skip-qk-permute", "gguf", ".gguf")
    differ = rows_with(diff(good, bad), "differ")
    assert {r.name.split(".")[-2] for r in differ} == {"q_proj", "k_proj"}
    assert all("permut" in r.diagnosis for r in differ), [r.diagnosis for r in differ]


def test_drop_qkv_bias_loses_six_tensors(synthetic_dir, tmp_path):
    good, bad, _ = mutant_vs_good(synthetic_dir("qwen2-tiny"), tmp_path, "drop-qkv-bias", "gguf", ".gguf")
    missing = rows_with(diff(good, bad), "missing_in_candidate")
    assert sorted(r.name for r in missing) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"
    )


@pytest.mark.parametrize("fmt,ext", [("gguf", ".gguf"), ("apr", ".apr"), ("safetensors", "")])
def test_tokenizer_mutants(synthetic_dir, tmp_path, fmt, ext):
    src = synthetic_dir("qwen2-tiny")
    good, bad, _ = mutant_vs_good(src, tmp_path / "tok", "drop-tokenizer", fmt, ext)
    assert diff(good, bad).tokenizer_differences == {"tokenizer": ["present", "absent"]}
    good, bad, _ = mutant_vs_good(src, tmp_path / "tmpl", "drop-chat-template", fmt, ext)
    assert diff(good, bad).tokenizer_differences["chat_template"] == ["present", "absent"]
    good, bad, _ = mutant_vs_good(src, tmp_path / "eos", "shift-special-token", fmt, ext)
    a, b = diff(good, bad).tokenizer_differences["eos_token_id"]
    assert b == a + 1


@pytest.mark.parametrize("mutant,field", [("lose-rope-theta", "rope_theta"), ("change-rms-eps", "rms_norm_eps")])
def test_config_mutants(synthetic_dir, tmp_path, mutant, field):
    good, bad, _ = mutant_vs_good(synthetic_dir("qwen2-tiny", rope_theta=1000000.0), tmp_path, mutant, "gguf", ".gguf")
    result = diff(good, bad)
    assert field in result.config_differences
    assert all(r.ok for r in result.tensors)
    if mutant == "lose-rope-theta":
        assert result.config_differences[field] == [1000000.0, 10000.0]


def test_q8_0_as_apr_dtype_8_is_refused_by_the_strict_reader(synthetic_dir, tmp_path):
    good, bad, _ = mutant_vs_good(synthetic_dir("qwen2-tiny"), tmp_path, "q8_0-as-apr-dtype-8", "apr", ".apr", quant="q8_0", via="gguf")
    open_model(good).close()
    with pytest.raises(FormatError, match="dtype") as err:
        open_model(bad)
    assert str(bad) in str(err.value)


def test_drop_lm_head_ties_the_head(synthetic_dir, tmp_path):
    good, bad, _ = mutant_vs_good(synthetic_dir("llama-tiny"), tmp_path, "drop-lm-head", "apr", ".apr")
    result = diff(good, bad)
    assert [r.name for r in rows_with(result, "missing_in_candidate")] == ["lm_head.weight"]
    assert result.config_differences["tie_word_embeddings"] == [False, True]


def test_write_beside_input_misses_the_requested_path(synthetic_dir, tmp_path):
    src = tmp_path / "in.gguf"
    convert(synthetic_dir("qwen2-tiny"), src, "gguf")
    record = convert(src, tmp_path / "out" / "model.apr", "apr", mutant="write-beside-input")
    assert not (tmp_path / "out" / "model.apr").exists()
    assert (tmp_path / "in.converted.apr").exists() and record.output.endswith("in.converted.apr")


def test_nondeterministic_converter_differs_run_to_run(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    for name in ("a", "b"):
        convert(src, tmp_path / f"good-{name}.gguf", "gguf")
        convert(src, tmp_path / f"bad-{name}.gguf", "gguf", mutant="nondeterministic")
    assert (tmp_path / "good-a.gguf").read_bytes() == (tmp_path / "good-b.gguf").read_bytes()
    assert (tmp_path / "bad-a.gguf").read_bytes() != (tmp_path / "bad-b.gguf").read_bytes()


def test_bf16_truncate_differs_from_rounding(synthetic_dir, tmp_path):
    good, bad, _ = mutant_vs_good(synthetic_dir("qwen2-tiny"), tmp_path, "bf16-truncate", "gguf", ".gguf", quant="bf16")
    result = diff(good, bad)
    differ = rows_with(result, "differ")
    assert differ, "truncation must change some BF16 values"
    assert all(r.normalized_max_abs < 0.01 for r in differ)  # off by one ulp, not a layout bug


def test_bf16_norms_in_gguf_keeps_the_values_and_breaks_the_storage_convention(synthetic_dir, tmp_path):
    good, bad, _ = mutant_vs_good(synthetic_dir("qwen2-tiny", "bfloat16"), tmp_path, "bf16-norms-in-gguf", "gguf", ".gguf")
    result = diff(good, bad)
    assert all(r.max_abs == 0 for r in result.tensors), "same values: only the encoding of the 1-D tensors changes"
    with open_model(good) as a, open_model(bad) as b:
        one_d = [n for n, t in a.tensors.items() if len(t.shape) == 1]
        assert one_d and all(a.tensors[n].encoding.name == "F32" and b.tensors[n].encoding.name == "BF16" for n in one_d)
    with pytest.raises(Exception, match="needs a source with BF16/F16 1-D tensors"):
        convert(synthetic_dir("qwen2-tiny"), tmp_path / "f32.gguf", mutant="bf16-norms-in-gguf")


@pytest.mark.parametrize("fmt,ext", [("gguf", ".gguf"), ("apr", ".apr"), ("safetensors", "")])
def test_nan_weight_poisons_one_value(synthetic_dir, tmp_path, fmt, ext):
    import numpy as np

    from convqa.convert.mutants import NAN_WEIGHT

    good, bad, _ = mutant_vs_good(synthetic_dir("qwen2-tiny"), tmp_path, "nan-weight", fmt, ext)
    with open_model(good) as a, open_model(bad) as b:
        for name, tensor in a.tensors.items():
            values = b.tensors[name].to_float32()
            if name == NAN_WEIGHT:
                original = tensor.to_float32()
                assert int(np.isnan(values).sum()) == 1 and np.array_equal(values[~np.isnan(values)], original[~np.isnan(values)])
            else:
                assert np.array_equal(values, tensor.to_float32()), name
    assert [r.name for r in diff(good, bad).tensors if r.status != "identical"] == [NAN_WEIGHT]


def test_every_mutant_is_documented_and_tested():
    tested = {"dims-not-reversed", "transpose-2d", "skip-qk-permute", "drop-qkv-bias", "drop-tokenizer", "drop-chat-template",
              "shift-special-token", "lose-rope-theta", "change-rms-eps", "q8_0-as-apr-dtype-8", "drop-lm-head",
              "write-beside-input", "nondeterministic", "bf16-truncate", "bf16-norms-in-gguf", "nan-weight",
              # tests/test_quantizer_gate.py
              "q8_0-scale-off", "q8_0-round-half-down", "q4_0-nibble-swap",
              # tests/test_arch_registry.py
              "gemma-norm-offset-twice", "drop-qk-norm", "fused-qkv-wrong-split", "moe-experts-string-sorted"}
    assert set(MUTANTS) == tested
    for m in MUTANTS.values():
        assert m.bug and m.origin and m.targets
