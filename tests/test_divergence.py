"""First divergent layer: the distance at each capture point on hand-made captures, and real
transformers runs on tiny models, where a perturbed weight in layer k (or a converter mutant) is
named at layer k and no earlier, and a correct artifact names nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convqa.compare.divergence import describe, distance, first_divergence, layer_curve, locate
from convqa.convert.builtin import convert
from convqa.gates.inference import evaluate
from convqa.gates.rows import FAIL, PASS
from convqa.infer.prompts import DEFAULT_PROMPTS
from convqa.infer.run import load_run, run_prompts, write_run

PROMPTS = list(DEFAULT_PROMPTS)
MAX_NEW_TOKENS = 4
EXACT = {"transformers": {"max_abs_dlogit": 0, "greedy_equal": True, "reason": "lossless"}}


def capture(values: list[np.ndarray], names: list[tuple[str, int | None, str]], prompt="p") -> dict:
    """A loaded run record holding a hand-made capture (what load_run gives)."""
    points = [{"key": f"{i:04d}.{m}", "module": m, "layer": layer, "sublayer": sub} for i, (m, layer, sub) in enumerate(names)]
    return {"hidden_states": {"prompt_id": prompt, "points": points},
            "hidden": {p["key"]: v for p, v in zip(points, values)}, "logits": {}}


NAMES = [("embed", None, "embedding"), ("layers.0.self_attn", 0, "self_attn"), ("layers.0.mlp", 0, "mlp"),
         ("layers.0", 0, "output"), ("layers.1.self_attn", 1, "self_attn"), ("layers.1", 1, "output")]
BASE = [np.arange(12, dtype=np.float32).reshape(3, 4) + i for i in range(len(NAMES))]


def test_distance_is_normalised_max_error_and_inf_for_broken_candidates():
    ref = np.array([[1.0, -4.0], [2.0, 0.0]])
    assert distance(ref, ref.copy()) == (0.0, "")
    assert distance(ref, ref + np.array([[0.0, 0.0], [0.5, 0.0]]))[0] == pytest.approx(0.5 / 4.0)
    assert distance(ref, np.full_like(ref, np.nan)) == (float("inf"), "holds NaN or Inf")
    assert distance(ref, ref[:1])[0] == float("inf")
    assert distance(ref, None) == (float("inf"), "missing from the candidate's capture")


def test_the_first_point_beyond_tolerance_is_named_and_later_ones_only_propagate():
    candidate = [v.copy() for v in BASE]
    for i in range(2, len(candidate)):  # broken from layer 0's mlp on
        candidate[i] = candidate[i] * 1.5
    curve = layer_curve(capture(BASE, NAMES), capture(candidate, NAMES))
    assert curve["values"][:2] == [0.0, 0.0] and all(v > 0 for v in curve["values"][2:])
    assert first_divergence(curve, 0.0) == 2
    assert describe(curve["points"][2]) == "layer 0, mlp output"
    # A tolerance above the damage names nothing; None (lossy against F32) never names a layer.
    assert first_divergence(curve, 1.0) is None and first_divergence(curve, None) is None
    found = locate(capture(BASE, NAMES), capture(candidate, NAMES), "gt", 0.0)
    assert found["first"] == 2 and found["diagnosis"].startswith("diverges at layer 0, mlp output")


def test_a_point_missing_from_the_candidate_or_a_capture_of_another_prompt_is_reported():
    candidate = capture(BASE[:4] + BASE[5:], NAMES[:4] + NAMES[5:])  # layers.1.self_attn never ran
    found = locate(capture(BASE, NAMES), candidate, "gt", 0.0)
    assert found["first"] == 4 and "missing from the candidate's capture" in found["diagnosis"]
    other = locate(capture(BASE, NAMES), capture(BASE, NAMES, prompt="q"), "gt", 0.0)
    assert other["first"] is None and "different prompts" in other["diagnosis"]
    none = locate(capture(BASE, NAMES), {"hidden_states": {"prompt_id": "p", "error": "boom"}}, "gt", 0.0)
    assert none["first"] is None and "no hidden-state capture (boom)" in none["diagnosis"]


# ---------------------------------------------------------------- real transformers runs


def run(artifact, source) -> dict:
    record, arrays = run_prompts(artifact, source, "transformers", "cpu", PROMPTS, MAX_NEW_TOKENS, 2)
    record["logits"] = arrays
    return record


@pytest.fixture(scope="module")
def deep(synthetic_dir):
    """qwen2-tiny with 4 layers, and its ground-truth run."""
    source = synthetic_dir("qwen2-tiny", num_layers=4)
    return source, run(source, source)


def perturbed(source, tmp_path, tensor: str, factor: float = 1.01):
    """A copy of the SafeTensors `source` with one tensor scaled by `factor`."""
    out = tmp_path / "perturbed"
    shutil.copytree(source, out)
    (path,) = out.glob("*.safetensors")
    tensors = load_file(path)
    tensors[tensor] = (tensors[tensor] * factor).astype(tensors[tensor].dtype)
    save_file(tensors, path, metadata={"format": "pt"})
    return out


def test_the_capture_covers_every_layer_and_sub_layer_in_forward_order(deep, tmp_path):
    source, truth = deep
    points = truth["hidden_states"]["points"]
    assert truth["hidden_states"]["prompt_id"] == PROMPTS[0].id
    assert points[0]["sublayer"] == "embedding" and points[-1]["sublayer"] == "final norm"
    per_layer = [p["sublayer"] for p in points if p["layer"] == 0]
    assert per_layer == ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "output"]
    assert sorted({p["layer"] for p in points if p["layer"] is not None}) == [0, 1, 2, 3]
    # Written into the run's .npz and read back as arrays (no pickle), apart from the logits.
    record = {k: v for k, v in truth.items() if k != "logits"}
    write_run(record, truth["logits"], tmp_path / "r.json", tmp_path / "r.npz")
    loaded = load_run(tmp_path / "r.json", tmp_path / "r.npz")
    assert set(loaded["logits"]) == {p["prompt_id"] for p in truth["prompts"] if p["ids"] is not None}
    assert len(loaded["hidden"]) == len(points)
    n_tokens = len(truth["prompts"][0]["ids"])
    assert loaded["hidden"][points[2]["key"]].shape == (n_tokens, 64)


@pytest.mark.parametrize("tensor, layer, sublayer", [
    ("model.layers.2.mlp.down_proj.weight", 2, "mlp"),
    ("model.layers.1.self_attn.o_proj.weight", 1, "self_attn"),
    ("model.layers.3.input_layernorm.weight", 3, "input_layernorm"),
])
def test_a_weight_perturbed_in_layer_k_is_named_at_layer_k_and_not_earlier(deep, tmp_path, tensor, layer, sublayer):
    source, truth = deep
    broken = run(perturbed(source, tmp_path, tensor), source)
    found = locate(truth, broken, "ground truth", 0.0)
    first = found["first"]
    assert first is not None
    assert (found["points"][first]["layer"], found["points"][first]["sublayer"]) == (layer, sublayer)
    assert all(v == 0.0 for v in found["values"][:first])  # bit-exact before it
    assert found["values"][-1] > 0  # and the logits moved
    assert f"diverges at layer {layer}, {sublayer} output" in found["diagnosis"]


def test_an_unchanged_copy_names_no_layer(deep, tmp_path):
    source, truth = deep
    same = run(perturbed(source, tmp_path, "model.layers.0.mlp.down_proj.weight", factor=1.0), source)
    found = locate(truth, same, "ground truth", 0.0)
    assert found["first"] is None and set(found["values"]) == {0.0}


# ---------------------------------------------------------------- through the gates


@pytest.mark.parametrize("preset, mutant, expected", [
    ("llama-tiny", "skip-qk-permute", "diverges at layer 0, self_attn output"),
    ("qwen2-tiny", "drop-qkv-bias", "diverges at layer 0, self_attn output"),
    ("qwen2-tiny", "change-rms-eps", "diverges at layer 0, input_layernorm output"),
    ("qwen2-tiny", "drop-lm-head", "diverges at the logits (lm_head)"),
])
def test_a_mutants_failing_row_names_where_it_first_diverges(synthetic_dir, tmp_path, preset, mutant, expected):
    source = synthetic_dir(preset)
    truth = run(source, source)
    convert(source, tmp_path / "model.gguf", "gguf", mutant=mutant)
    runs = {("st", "transformers", "cpu"): truth, ("st-gguf", "transformers", "cpu"): run(tmp_path / "model.gguf", source)}
    rows, _, _ = evaluate("m", "native", runs, {}, EXACT)
    row = next(r for r in rows if r.gate == "F-INF-gguf-cpu-run")
    assert row.status == FAIL
    details = json.loads(row.details)
    assert details["diagnosis"].startswith(expected)
    assert len(details["divergence"]["values"]) == len(details["divergence"]["points"])


def test_a_correct_conversion_passes_with_no_divergence(synthetic_dir, tmp_path):
    source = synthetic_dir("llama-tiny")
    truth = run(source, source)
    convert(source, tmp_path / "model.gguf", "gguf")
    runs = {("st", "transformers", "cpu"): truth, ("st-gguf", "transformers", "cpu"): run(tmp_path / "model.gguf", source)}
    rows, _, _ = evaluate("m", "native", runs, {}, EXACT)
    for row in rows:
        if row.gate.startswith("F-INF-"):
            assert row.status == PASS and "divergence" not in (row.details and json.loads(row.details) or {})


def test_a_lossy_artifact_is_held_to_the_reference_quantized_capture(synthetic_dir, tmp_path):
    """q8_0: the F32 ground truth moves at every layer, the reference-quantized model at none. A
    correct artifact failing a (deliberately too strict) F-INF tolerance is told the forward pass
    matches the reference; the q8_0-scale-off mutant (one block scale of layer 0's ffn_down) is
    named at layer 0's mlp by F-INF-REF, which the ground-truth band alone cannot show."""
    from convqa.infer.run import run_reference

    source = synthetic_dir("qwen2-tiny")
    truth = run(source, source)
    strict = {"transformers": {"max_abs_dlogit": 0, "reason": "too strict on purpose"}}
    exact = {"transformers": {"max_abs_dlogit": 0, "greedy_equal": True, "reason": "bit-exact reference"}}
    found = {}
    for name, mutant in (("correct", None), ("scale-off", "q8_0-scale-off")):
        gguf = tmp_path / name / "model.gguf"
        gguf.parent.mkdir()
        convert(source, gguf, "gguf", quant="q8_0", mutant=mutant)
        record, arrays = run_reference(source, gguf, PROMPTS, MAX_NEW_TOKENS, 2)
        record["logits"] = arrays
        runs = {("st", "transformers", "cpu"): truth, ("st-gguf", "transformers", "cpu"): run(gguf, source)}
        rows, _, _ = evaluate("m", "q8_0", runs, {}, strict, references={"st-gguf": record},
                              reference_tolerances=exact)
        found[name] = {r.gate: r for r in rows}
    correct = found["correct"]
    assert correct["F-INF-gguf-cpu-run"].status == FAIL and correct["F-INF-REF-gguf-cpu-run"].status == PASS
    diagnosis = json.loads(correct["F-INF-gguf-cpu-run"].details)["diagnosis"]
    assert diagnosis.startswith("every layer and the logits") and "q8_0/st-gguf/reference" in diagnosis
    broken = found["scale-off"]["F-INF-REF-gguf-cpu-run"]
    assert broken.status == FAIL
    assert json.loads(broken.details)["diagnosis"].startswith("diverges at layer 0, mlp output")
