"""F-QUANT-001: quantized tensors judged bit for bit against the reference quantizer, with the
differing block named (convqa.compare.blocks, convqa.gates.quantizer), on real conversions of
synthetic checkpoints (F32 and BF16) by convqa's converter and its quantizer mutants."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from convqa import encodings
from convqa.compare.blocks import is_quantization, reference_blocks
from convqa.compare.tensors import compare_models
from convqa.convert.builtin import convert
from convqa.convert.mutants import SCALE_OFF_FACTOR, SCALE_OFF_TENSOR
from convqa.formats import open_model
from convqa.gates.quantizer import GATE, quantizer_rows
from convqa.gates.rows import FAIL, PASS, SKIPPED
from convqa.model import LazyTensor
from convqa.report.evidence import tensor_check_evidence
from convqa.report.markdown import _tensor_checks
from convqa.workflow.plan import Check

FIRST_HOP = {"gguf": Check("st-gguf", "st", "F-CONV-S-G"), "apr": Check("st-apr", "st", "F-CONV-S-A")}
EXT = {"gguf": ".gguf", "apr": ".apr"}


def comparison(source, artifact) -> dict:
    with open_model(source) as a, open_model(artifact) as b:
        return compare_models(a, b).as_dict()


def gate_row(source, artifact, fmt, variant):
    (row,) = quantizer_rows(FIRST_HOP[fmt], comparison(source, artifact), "m", variant)
    assert row.gate == GATE
    return row


def converted(src, tmp_path, fmt, quant, mutant=None):
    out = tmp_path / f"{quant}-{mutant or 'correct'}{EXT[fmt]}"
    convert(src, out, fmt, quant=quant, mutant=mutant)
    return out


# Every lossy encoding convqa writes, out of F32 and BF16 sources: zero false alarms.
LOSSY = [(variant, fmt) for variant, targets in encodings.QUANT_TARGETS.items() if variant != "f32"
         for fmt in targets if fmt in EXT]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant, fmt", LOSSY)
def test_the_correct_converter_is_byte_identical_to_the_reference_quantizer(synthetic_dir, tmp_path, variant, fmt, dtype):
    src = synthetic_dir("qwen2-tiny", dtype)
    out = converted(src, tmp_path, fmt, variant)
    row = gate_row(src, out, fmt, variant)
    if dtype == "bfloat16" and variant == "bf16":  # nothing to quantize: BF16 stays BF16
        assert row.status == SKIPPED and "no tensor was quantized" in row.reason
        return
    assert row.status == PASS, row.reason
    assert row.value == "0" and "byte for byte" in row.reason and "held to exactness" in row.reason
    tensors = json.loads(row.details)["tensors"]
    assert tensors >= 10, "the 2-D weights were judged, not an empty set"
    # The same artifact passes the edge gate's tolerance too (Q4_0/Q5_0 clip one end: <= 1/8, 1/16).
    assert all(t["status"] in ("identical", "within_tolerance") for t in comparison(src, out)["tensors"])


def test_a_block_scale_off_by_one_percent_hides_in_the_band_and_is_named(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    good, bad = converted(src, tmp_path, "gguf", "q8_0"), converted(src, tmp_path, "gguf", "q8_0", "q8_0-scale-off")
    result = comparison(src, bad)
    assert result["ok"], "every tensor is within the Q8_0 tolerance: the edge gate cannot see this bug"
    row = gate_row(src, bad, "gguf", "q8_0")
    assert row.status == FAIL and row.value == "1"
    (finding,) = [t["reference_blocks"] for t in result["tensors"] if t["name"] == SCALE_OFF_TENSOR]
    assert finding["differing_blocks"] == 1 and finding["blocks"] == 256
    first = finding["first"]
    assert first["expected_scale"] > 0
    assert first["stored_scale"] / first["expected_scale"] == pytest.approx(SCALE_OFF_FACTOR, rel=1e-3)
    assert f"{SCALE_OFF_TENSOR} (Q8_0): 1 of 256 blocks differ" in row.reason
    assert f"first block {first['index']}" in row.reason and "stored scale" in row.reason
    assert finding["map"].count("#") == 1
    assert gate_row(src, good, "gguf", "q8_0").status == PASS


def test_ties_rounded_down_are_caught_on_a_bf16_checkpoint(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2.5-tiny-bf16", "bfloat16")
    bad = converted(src, tmp_path, "gguf", "q8_0", "q8_0-round-half-down")
    result = comparison(src, bad)
    assert result["ok"], "one quantization step on a tie is inside every tolerance"
    row = gate_row(src, bad, "gguf", "q8_0")
    assert row.status == FAIL and int(row.value) >= 5
    findings = [t["reference_blocks"] for t in result["tensors"] if t.get("reference_blocks")]
    differing = [f for f in findings if f["differing_blocks"]]
    assert differing and all(f["first"]["differing_values"] >= 1 for f in differing)
    # A rounding bug keeps the scale: stored and expected scale are equal in the named block.
    assert all(f["first"]["stored_scale"] == f["first"]["expected_scale"] for f in differing)


def test_swapped_nibbles_are_caught_in_every_block(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    bad = converted(src, tmp_path, "gguf", "q4_0", "q4_0-nibble-swap")
    row = gate_row(src, bad, "gguf", "q4_0")
    assert row.status == FAIL and row.value == "16"
    first = [t for t in comparison(src, bad)["tensors"] if t.get("reference_blocks")][0]["reference_blocks"]
    assert first["differing_blocks"] > 0.9 * first["blocks"] and set(first["map"]) == {"#"}


def test_bf16_truncation_is_caught_by_the_reference_quantizer_too(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    bad = converted(src, tmp_path, "apr", "bf16", "bf16-truncate")
    assert gate_row(src, bad, "apr", "bf16").status == FAIL


def test_an_encoding_without_a_reproducible_reference_falls_back_to_its_tolerance():
    # Q4_K: gguf-py has no quantizer for it, and llama.cpp's C one is not byte-reproducible.
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=encodings.Q4_K.nbytes((4, 256)), dtype=np.uint8)
    stored = LazyTensor("w", (4, 256), encodings.Q4_K, lambda: raw)
    finding = reference_blocks(stored.to_float32(), stored)
    assert finding["byte_exact_demanded"] is False and "no byte-reproducible reference quantizer for Q4_K" in finding["reason"]
    assert finding["fallback_tolerance"] == encodings.ENCODING_TOLERANCE["Q4_K"]
    passing = {"tensors": [{"name": "w", "status": "identical", "normalized_max_abs": 0.0, "reference_blocks": finding}]}
    (row,) = quantizer_rows(FIRST_HOP["gguf"], passing, "m", "q4_k")
    assert row.status == PASS and "1 by tolerance" in row.reason and "Q4_K" in row.reason
    failing = {"tensors": [{"name": "w", "status": "differ", "normalized_max_abs": 0.5, "reference_blocks": finding}]}
    (row,) = quantizer_rows(FIRST_HOP["gguf"], failing, "m", "q4_k")
    assert row.status == FAIL and "over its fallback tolerance" in row.reason


def test_only_a_quantization_out_of_plain_floats_is_judged():
    assert is_quantization(encodings.F32, encodings.Q8_0) and is_quantization(encodings.BF16, encodings.F16)
    assert is_quantization(encodings.F32, encodings.BF16) and is_quantization(encodings.F32, encodings.APR_Q4)
    assert not is_quantization(encodings.BF16, encodings.F32), "an upcast loses nothing"
    assert not is_quantization(encodings.Q8_0, encodings.F32) and not is_quantization(encodings.Q8_0, encodings.APR_Q8)
    assert not is_quantization(encodings.F32, encodings.F32)


def test_a_missing_or_unreadable_comparison_is_not_evaluated():
    (row,) = quantizer_rows(FIRST_HOP["gguf"], None, "m", "q8_0")
    assert row.status == "not_evaluated" and "missing" in row.reason
    (row,) = quantizer_rows(FIRST_HOP["gguf"], {"read_error": "bad magic", "read_error_side": "subject"}, "m", "q8_0")
    assert row.status == "not_evaluated" and "bad magic" in row.reason
    (row,) = quantizer_rows(FIRST_HOP["gguf"], {"tensors": []}, "m", "q8_0")
    assert row.status == "not_evaluated"


def test_diff_names_the_block_and_says_different(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    good, bad = converted(src, tmp_path, "gguf", "q8_0"), converted(src, tmp_path, "gguf", "q8_0", "q8_0-scale-off")
    cli = [sys.executable, "-m", "convqa.cli", "diff", str(src)]
    same = subprocess.run([*cli, str(good)], capture_output=True, text=True)
    assert same.returncode == 0 and "0 of 16 quantized tensors differ" in same.stdout
    differ = subprocess.run([*cli, str(bad)], capture_output=True, text=True)
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert f"reference quantizer    {SCALE_OFF_TENSOR} (Q8_0): 1 of 256 blocks differ" in differ.stdout
    assert "blocks [" in differ.stdout and differ.stdout.strip().splitlines()[-1].startswith("DIFFERENT")


def test_the_report_tensor_table_shows_the_differing_blocks(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    bad = converted(src, tmp_path, "gguf", "q8_0", "q8_0-scale-off")
    check = tensor_check_evidence("q8_0/st-gguf~st", comparison(src, bad))
    (flagged,) = [t for t in check["tensors"] if t["flagged"]]
    assert flagged["name"] == SCALE_OFF_TENSOR and flagged["ok"]
    assert "1 of 256 Q8_0 blocks differ" in flagged["blocks"] and "expected" in flagged["blocks"]
    markdown = "\n".join(_tensor_checks({"tensor_checks": [check]}))
    assert "blocks vs reference quantizer" in markdown and "1 of 256 Q8_0 blocks differ" in markdown
