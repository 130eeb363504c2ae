"""The compute dtype (convqa.infer.compute_dtype): transformers runs a model and every artifact
converted from it in the ground truth's dtype, so a BF16 checkpoint is held in BF16 (no F32 copy)
and its lossless conversions still reproduce its logits bit for bit, through all three loaders
(from_pretrained, transformers' GGUF loader, convqa's APR loader) and the reference model.

Real synthetic checkpoints (qwen2.5-tiny-bf16: BF16, sharded, tied), converted by convqa's own
converter, run through the real engines.
"""

from __future__ import annotations

import numpy as np
import pytest

from convqa.convert.builtin import convert
from convqa.infer.compute_dtype import BFLOAT16, FLOAT32, compute_dtype_for
from convqa.infer.engines import engine_for
from convqa.infer.prompts import DEFAULT_PROMPTS
from convqa.infer.run import run_prompts, run_reference

PROMPTS = [p for p in DEFAULT_PROMPTS if p.modality == "run"][:2]
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def bf16_model(synthetic_dir, tmp_path_factory):
    """(source, {chain: artifact}) for a BF16 checkpoint: native GGUF and APR, and a Q8_0 GGUF."""
    src = synthetic_dir("qwen2.5-tiny-bf16", "bfloat16")
    out = tmp_path_factory.mktemp("bf16-conversions")
    artifacts = {"st-gguf": out / "native.gguf", "st-apr": out / "native.apr", "st-gguf-q8_0": out / "q8_0.gguf"}
    convert(src, artifacts["st-gguf"], "gguf")
    convert(src, artifacts["st-apr"], "apr")
    convert(src, artifacts["st-gguf-q8_0"], "gguf", quant="q8_0")
    return src, artifacts


def run(artifact, source):
    record, arrays = run_prompts(artifact, source, "transformers", "cpu", PROMPTS, MAX_NEW_TOKENS, 2)
    assert not record["error"] and not record["skipped"], record
    logits = {k: v for k, v in arrays.items() if not k.startswith("hidden.")}
    assert len(logits) == len(PROMPTS)
    return record, logits


def assert_same_run(a, b):
    (ra, la), (rb, lb) = a, b
    for prompt_id in la:
        assert np.array_equal(la[prompt_id], lb[prompt_id]), prompt_id
    assert [p["generated_ids"] for p in ra["prompts"]] == [p["generated_ids"] for p in rb["prompts"]]


def test_the_compute_dtype_is_the_one_most_weights_are_stored_in(synthetic_dir, bf16_model):
    source, artifacts = bf16_model
    assert compute_dtype_for(source) == BFLOAT16
    assert compute_dtype_for(artifacts["st-gguf"]) == compute_dtype_for(artifacts["st-apr"]) == BFLOAT16
    assert compute_dtype_for(synthetic_dir("qwen2-tiny")) == FLOAT32
    # F16 has no native CPU kernels here and overflows where BF16 does not: it computes in F32.
    assert compute_dtype_for(synthetic_dir("qwen2-tiny", "float16")) == FLOAT32
    # All-quantized matrices: the plain-float remainder (norms, biases) decides, F32 here.
    assert compute_dtype_for(artifacts["st-gguf-q8_0"]) == FLOAT32


def test_a_bf16_model_is_held_in_bf16_by_every_loader(bf16_model):
    source, artifacts = bf16_model
    for path in (source, artifacts["st-gguf"], artifacts["st-apr"]):
        with engine_for("transformers", "cpu") as engine:
            engine.load(path)
            dtypes = {p.dtype for p in engine.model.parameters()}
            assert engine.compute_dtype == BFLOAT16 and {str(d) for d in dtypes} == {"torch.bfloat16"}, (path, dtypes)


def test_lossless_conversions_of_a_bf16_model_are_bit_exact_in_bf16(bf16_model):
    source, artifacts = bf16_model
    truth = run(source, source)
    assert truth[0]["compute_dtype"] == BFLOAT16
    for chain in ("st-gguf", "st-apr"):
        converted = run(artifacts[chain], source)
        assert converted[0]["compute_dtype"] == BFLOAT16, chain
        assert_same_run(converted, truth)
    # The check can fail: the same model computed in F32 gives other logits.
    with engine_for("transformers", "cpu", compute_dtype=FLOAT32) as engine:
        ids = truth[0]["prompts"][0]["ids"]
        in_f32 = engine.load(source).teacher_forced_logits(ids)
    assert not np.array_equal(in_f32, truth[1][PROMPTS[0].id])
    assert np.abs(in_f32 - truth[1][PROMPTS[0].id]).max() < 0.5  # BF16 rounding, not a broken model


def test_a_q8_0_artifact_of_a_bf16_model_runs_in_bf16_and_matches_its_reference_exactly(bf16_model):
    """The artifact takes its source's dtype, not its own (its plain floats alone would say F32),
    and the reference model is built in the same dtype: each dequantized value rounded to BF16
    identically on both sides (F-QUANT-001 still judges the stored bytes themselves)."""
    source, artifacts = bf16_model
    q8 = run(artifacts["st-gguf-q8_0"], source)
    assert q8[0]["compute_dtype"] == BFLOAT16
    record, arrays = run_reference(source, artifacts["st-gguf-q8_0"], PROMPTS, MAX_NEW_TOKENS, 2)
    assert not record["error"] and record["compute_dtype"] == BFLOAT16
    reference = (record, {k: v for k, v in arrays.items() if not k.startswith("hidden.")})
    assert_same_run(q8, reference)


def test_an_f32_model_stays_in_f32(synthetic_dir):
    source = synthetic_dir("qwen2-tiny")
    record, _ = run(source, source)
    assert record["compute_dtype"] == FLOAT32


def test_llamacpp_records_what_it_computes_in(bf16_model):
    source, artifacts = bf16_model
    record, _ = run_prompts(artifacts["st-gguf"], source, "llama.cpp", "cpu", PROMPTS[:1], 2, 2)
    assert "ggml" in record["compute_dtype"]
