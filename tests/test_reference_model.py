"""The reference-quantized model and its gate, F-INF-REF, on real tiny models and real engines.

A correct lossy conversion is bit-identical, tensor by tensor and logit by logit under
transformers, to the source passed through the reference quantizer of each stored encoding; a
converter that rounds differently (BF16 truncated) is not, although its logits move less than the
quantization itself does and pass every honest ground-truth tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

from convqa.convert.builtin import convert
from convqa.encodings import Q2_K
from convqa.errors import ConversionError
from convqa.formats import open_model
from convqa.gates.rows import FAIL, NOT_EVALUATED, PASS, SKIPPED
from convqa.gates.inference import evaluate
from convqa.infer.run import run_prompts, run_reference
from convqa.model import LazyTensor
from convqa.infer.prompts import DEFAULT_PROMPTS
from convqa.infer.reference_model import reference_quantized

PROMPTS = list(DEFAULT_PROMPTS)
MAX_NEW_TOKENS = 8
EXACT = {"transformers": {"max_abs_dlogit": 0, "greedy_equal": True, "reason": "same decoder on both sides"}}
# What the ground-truth gate allows a BF16 artifact (config/detection.yaml): truncation passes it.
BF16_VS_GROUND_TRUTH = {"transformers": {"max_mean_kl": 1e-6, "min_top1": 0.9, "reason": "BF16 rounding noise"}}


def converted(source, tmp_path, fmt, quant, mutant=None):
    out = tmp_path / f"{quant}-{mutant or 'correct'}.{fmt}"
    convert(source, out, fmt, quant=quant, mutant=mutant)
    return out


def with_logits(pair):
    record, logits = pair
    record["logits"] = logits
    return record


@pytest.fixture(scope="module")
def qwen2(synthetic_dir):
    source = synthetic_dir("qwen2-tiny")
    return source, with_logits(run_prompts(source, source, "transformers", "cpu", PROMPTS, MAX_NEW_TOKENS, 2))


def ref_rows(source, truth, artifact, chain, variant):
    runs = {("st", "transformers", "cpu"): truth,
            (chain, "transformers", "cpu"): with_logits(run_prompts(artifact, source, "transformers", "cpu", PROMPTS,
                                                                    MAX_NEW_TOKENS, 2))}
    reference = with_logits(run_reference(source, artifact, PROMPTS, MAX_NEW_TOKENS, 2))
    rows, _, _ = evaluate("m", variant, runs, {}, BF16_VS_GROUND_TRUTH, ("run", "chat"),
                          references={chain.split(".")[0]: reference}, reference_tolerances=EXACT)
    return {r.gate: r for r in rows}, reference


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("fmt, quant", [("gguf", "bf16"), ("gguf", "q8_0"), ("gguf", "q4_1"), ("apr", "f16"),
                                        ("apr", "apr-int4")])
def test_the_reference_holds_exactly_the_bytes_a_correct_converter_writes(synthetic_dir, tmp_path, fmt, quant):
    source_dir = synthetic_dir("qwen2-tiny")
    artifact_path = converted(source_dir, tmp_path, fmt, quant)
    with open_model(source_dir) as source, open_model(artifact_path) as artifact:
        reference = reference_quantized(source, artifact)
        assert set(reference.tensors) == set(source.tensors)
        lossy = [n for n, t in artifact.tensors.items() if t.encoding != source.tensors[n].encoding]
        assert lossy, "the variant must quantize something for this test to mean anything"
        for name, tensor in artifact.tensors.items():
            assert reference.tensors[name].encoding == tensor.encoding
            assert np.array_equal(reference.tensors[name].raw(), tensor.raw()), name
        counts = reference.metadata["reference_encodings"]
        assert sum(counts.values()) == len(source.tensors)


def test_a_reference_tensor_is_read_from_the_source_file_a_slice_of_rows_at_a_time(synthetic_dir, tmp_path):
    """The reference job of a 1.5B BF16 model held the source's 445 MiB embedding whole while
    quantizing it, beside the model it was loading (4535 MB RSS against the 4417 MB target; 4179 MB
    once the source is read a slice of rows at a time, the converter's way)."""
    import tracemalloc

    source_dir = synthetic_dir("qwen2-tiny", dtype="bfloat16", vocab_size=65536, hidden_size=1024)  # a 128 MiB embedding
    artifact_path = converted(source_dir, tmp_path, "gguf", "q8_0")
    with open_model(source_dir) as source, open_model(artifact_path) as artifact:
        embedding = reference_quantized(source, artifact).tensors["model.embed_tokens.weight"]
        tracemalloc.start()
        try:
            out = embedding.raw()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert np.array_equal(out, artifact.tensors["model.embed_tokens.weight"].raw())
        source_bytes = source.tensors["model.embed_tokens.weight"].nbytes
    assert peak < out.nbytes + source_bytes // 2, f"peak {peak >> 20} MiB: output {out.nbytes >> 20}, source {source_bytes >> 20} MiB"


def test_a_truncating_converter_differs_from_the_reference_in_its_bf16_tensors(synthetic_dir, tmp_path):
    source_dir = synthetic_dir("qwen2-tiny")
    artifact_path = converted(source_dir, tmp_path, "gguf", "bf16", mutant="bf16-truncate")
    with open_model(source_dir) as source, open_model(artifact_path) as artifact:
        reference = reference_quantized(source, artifact)
        differing = [n for n, t in artifact.tensors.items() if not np.array_equal(reference.tensors[n].raw(), t.raw())]
        bf16 = [n for n, t in artifact.tensors.items() if t.encoding.name == "BF16"]
        assert differing and set(differing) <= set(bf16)


def test_an_encoding_without_a_reference_encoder_is_refused_naming_file_and_tensor(synthetic_dir, tmp_path):
    source_dir = synthetic_dir("qwen2-tiny")
    artifact_path = converted(source_dir, tmp_path, "gguf", "q8_0")
    with open_model(source_dir) as source, open_model(artifact_path) as artifact:
        name = next(n for n, t in artifact.tensors.items() if t.encoding.name == "Q8_0")
        original = artifact.tensors[name]
        artifact.tensors[name] = LazyTensor(name, original.shape, Q2_K, original.load_raw)
        with pytest.raises(ConversionError, match=f"{artifact_path.name}.*{name}.*Q2_K"):
            reference_quantized(source, artifact)


def test_an_unreadable_first_hop_gives_a_reference_error_not_a_crash(synthetic_dir, tmp_path):
    source_dir = synthetic_dir("qwen2-tiny")
    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 5)
    record, logits = run_reference(source_dir, broken, PROMPTS, MAX_NEW_TOKENS, 2)
    assert record["error"].startswith("no reference model:") and "model.gguf" in record["error"]
    assert logits == {}


# ---------------------------------------------------------------- the gate


def test_correct_bf16_passes_bit_exact_and_truncation_fails_where_the_ground_truth_gate_cannot(qwen2, tmp_path):
    source, truth = qwen2
    rows, reference = ref_rows(source, truth, converted(source, tmp_path, "gguf", "bf16"), "st-gguf", "bf16")
    assert reference["reference"]["encodings"]["BF16"] > 0
    for modality in ("run", "chat"):
        row = rows[f"F-INF-REF-gguf-cpu-{modality}"]
        assert row.status == PASS and row.value == "0" and row.reference == "bf16/st-gguf/reference", row
    truncated = converted(source, tmp_path, "gguf", "bf16", mutant="bf16-truncate")
    rows, _ = ref_rows(source, truth, truncated, "st-gguf", "bf16")
    assert rows["F-INF-gguf-cpu-run"].status == PASS, "truncation hides inside the ground-truth tolerance"
    for modality in ("run", "chat"):
        row = rows[f"F-INF-REF-gguf-cpu-{modality}"]
        assert row.status == FAIL and 1e-4 < float(row.value) < 0.1 and "max |dlogit|" in row.reason, row


def test_a_tied_llama_in_q8_0_matches_its_reference_through_the_gguf_loader(synthetic_dir, tmp_path):
    source = synthetic_dir("llama-tiny-tied")  # Q/K permuted in GGUF, no lm_head: the loader's own paths
    truth = with_logits(run_prompts(source, source, "transformers", "cpu", PROMPTS, MAX_NEW_TOKENS, 2))
    rows, _ = ref_rows(source, truth, converted(source, tmp_path, "gguf", "q8_0"), "st-gguf", "q8_0")
    assert rows["F-INF-REF-gguf-cpu-run"].status == PASS and rows["F-INF-REF-gguf-cpu-run"].value == "0"


def test_reference_rows_fail_on_a_reference_error_and_wait_for_a_missing_reference(qwen2, tmp_path):
    source, truth = qwen2
    artifact = converted(source, tmp_path, "apr", "apr-int8")
    runs = {("st", "transformers", "cpu"): truth,
            ("st-apr", "transformers", "cpu"): with_logits(run_prompts(artifact, source, "transformers", "cpu",
                                                                       PROMPTS, MAX_NEW_TOKENS, 2)),
            ("st-apr", "transformers", "gpu"): {"skipped": "no CUDA device", "prompts": [], "logits": {}}}
    broken = {"error": "no reference model: x.apr: truncated", "prompts": [], "logits": {}}
    rows, _, _ = evaluate("m", "apr-int8", runs, {}, {}, ("run",), references={"st-apr": broken},
                          reference_tolerances=EXACT)
    row, gpu = [r for r in rows if r.gate.startswith("F-INF-REF")]
    assert row.gate == "F-INF-REF-apr-cpu-run" and row.status == FAIL and "truncated" in row.reason
    # The gpu run is judged against a gpu reference (convqa.workflow.references): skipped with it.
    assert gpu.gate == "F-INF-REF-apr-gpu-run" and gpu.status == SKIPPED and gpu.reason == "no CUDA device"
    rows, _, _ = evaluate("m", "apr-int8", runs, {}, {}, ("run",), references={}, reference_tolerances=EXACT)
    (row,) = [r for r in rows if r.gate == "F-INF-REF-apr-cpu-run"]
    assert row.status == NOT_EVALUATED and "no reference run" in row.reason
    rows, _, _ = evaluate("m", "apr-int8", runs, {}, {}, ("run",))
    assert not [r for r in rows if r.gate.startswith("F-INF-REF")], "no reference tolerances, no rows"
