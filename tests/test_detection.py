"""Detection power: the qualification catches each converter mutant and stays quiet on the
correct converter (convqa.detection.matrix, rules/detection.smk, config/detection.yaml).

The fast tests check the config expansion and the matrix logic on hand-made gate rows. The slow
test runs `snakemake detection` on a copy of the workflow with a representative subset of the
mutants (the special cases: a layout bug that also breaks inference, an unreadable artifact, a
non-deterministic converter, a converter writing beside its input and a quantizer that only the
reference-quantized model can tell from a correct one) and asserts the matrix's
key cells; `make detection` runs the full set (its numbers are in the README).
"""

from __future__ import annotations

import json

import pytest
import yaml
from workflow_copy import REPO, Workflow

from convqa.detection import matrix as detection
from convqa.convert.mutants import MUTANTS
from convqa.gates import output_contract



def full_section() -> dict:
    return yaml.safe_load((REPO / "config" / "detection.yaml").read_text())["detection"]


def test_the_detection_config_covers_every_mutant_of_the_registry():
    assert set(full_section()["mutants"]) == set(MUTANTS)


def test_expansion_adds_one_model_per_mutant_and_a_correct_model_per_preset():
    config = {"converter": "convqa", "converters": {}, "models": {}, "detection": full_section()}
    detection.expand_config(config)
    models = config["models"]
    assert models["det-skip-qk-permute"]["route"] == {"st-gguf": "mutant-skip-qk-permute"}
    assert models["det-q8_0-as-apr-dtype-8"]["variants"] == ["q8_0"]
    assert models["det-correct-qwen2-tiny"]["variants"] == ["native", "q8_0", "bf16", "q4_0"]
    assert models["det-correct-qwen2.5-tiny-bf16"]["variants"] == ["native", "q8_0"]
    assert models["det-correct-llama-tiny"]["variants"] == ["native"]
    # `correct`: architectures no mutant uses still get their false-alarm model
    assert models["det-correct-mistral-tiny"]["variants"] == models["det-correct-gemma2-tiny"]["variants"] == ["native"]
    assert "route" not in models["det-correct-gemma2-tiny"]
    assert "det-write-beside-input" not in models, "an output-path mutant fails its job by design: its own rule"
    entry = config["converters"]["mutant-bf16-truncate"]
    assert "--mutant bf16-truncate" in entry["command"] and entry["edges"] == ["st-gguf"]


@pytest.mark.parametrize("spec, message", [
    ({"no-such-bug": {"edge": "st-gguf", "preset": "qwen2-tiny"}}, "unknown mutant"),
    ({"q8_0-as-apr-dtype-8": {"edge": "st-gguf", "preset": "qwen2-tiny"}}, "not gguf"),
    ({"drop-tokenizer": {"edge": "apr-gguf", "preset": "qwen2-tiny"}}, "not built by the detection tier"),
])
def test_a_mutant_that_cannot_run_where_it_is_plugged_is_a_config_error(spec, message):
    with pytest.raises(detection.DetectionConfigError, match=message):
        detection.entries({"mutants": spec})


def row(gate, status, subject="native/st-gguf", value="0", threshold="0", reason=""):
    return {"gate": gate, "subject": subject, "reference": "", "metric": "m", "value": value,
            "threshold": threshold, "status": status, "reason": reason}


def test_a_mutant_is_caught_only_by_a_failing_row_and_named_by_its_most_specific_gate():
    entry = detection.Entry("dims-not-reversed", "st-gguf", "qwen2-tiny")
    rows = [row("F-CONV-S-G", "fail", value="1.5", threshold="0"), row("F-LAYOUT-001", "fail", value="7"),
            row("F-INF-gguf-cpu-run", "fail", value="inf"), row("G0-VALIDATE", "pass")]
    record = detection.mutant_record(entry, rows)
    assert record["verdict"] == detection.CAUGHT
    assert record["caught_by"][:2] == ["F-LAYOUT-001", "F-CONV-S-G"]
    assert record["first"]["gate"] == "F-LAYOUT-001" and record["first"]["value"] == "7"
    # Not evaluated is not caught; a function-changing bug needs an inference failure too.
    quiet = detection.mutant_record(entry, [row("G0-INTEGRITY", "not_evaluated"), row("F-CONV-S-G", "fail")])
    assert quiet["verdict"] == detection.MISSED
    assert quiet["missing"] == ["it changes the computed function but no inference gate failed"]
    unchanged = detection.mutant_record(detection.Entry("nondeterministic", "st-gguf", "qwen2-tiny"),
                                        [row("F-CONV-IDEM-001", "fail", value="differ", threshold="equal")])
    assert unchanged["verdict"] == detection.CAUGHT and not unchanged["inference_failed"]


def test_a_cell_shows_the_worst_row_and_how_loudly_it_failed():
    cells = detection.gate_cells([row("F-CONV-S-G", "pass", subject="native/st-apr"),
                                  row("F-CONV-S-G", "fail", value="0.0125", threshold="0.005")])
    cell = cells["F-CONV-S-G"]
    assert (cell["status"], cell["failed_rows"], cell["rows"]) == ("fail", 1, 2)
    assert detection.loudness(cell) == "m 0.0125 vs 0.005 (2.5x)"


# ---------------------------------------------------------------- a real detection run

SUBSET = ("dims-not-reversed", "q8_0-as-apr-dtype-8", "nondeterministic", "write-beside-input", "bf16-truncate",
          "q8_0-scale-off")


@pytest.fixture(scope="module")
def subset_matrix(tmp_path_factory) -> dict:
    config = yaml.safe_load((REPO / "config" / "detection.yaml").read_text())
    config["detection"]["mutants"] = {m: config["detection"]["mutants"][m] for m in SUBSET}
    wf = Workflow.create(tmp_path_factory.mktemp("detection"), config)
    wf.run("detection")
    return json.loads(wf.path("results/detection/matrix.json").read_text())


@pytest.mark.slow
def test_detection_run_catches_every_mutant_of_the_subset(subset_matrix):
    by_name = {m["mutant"]: m for m in subset_matrix["mutants"]}
    assert set(by_name) == set(SUBSET)
    assert subset_matrix["summary"]["missed"] == []
    dims = by_name["dims-not-reversed"]
    assert dims["first"]["gate"] == "F-LAYOUT-001"
    assert {"G0-INTEGRITY", "F-CONV-S-G"} <= set(dims["caught_by"])
    assert any(g.startswith("F-INF-gguf") for g in dims["inference_failed"])
    q8 = by_name["q8_0-as-apr-dtype-8"]
    assert q8["first"]["gate"] == "G0-INTEGRITY" and "unreadable" in q8["first"]["reason"]
    assert q8["cells"]["F-CONV-G-A"]["status"] == "fail"
    assert any(g.startswith("F-INF-apr") for g in q8["inference_failed"])
    nondet = by_name["nondeterministic"]
    assert nondet["caught_by"] == ["F-CONV-IDEM-001"] and not nondet["inference_failed"]
    assert nondet["first"]["reason"].count(detection.DIGEST_PLACEHOLDER) == 2, "digests vary run to run"
    truncate = by_name["bf16-truncate"]  # inside every ground-truth tolerance: only the reference sees it
    assert truncate["function_change"]["changed"] is True
    assert sorted(truncate["inference_failed"]) == ["F-INF-REF-gguf-cpu-chat", "F-INF-REF-gguf-cpu-run"]
    assert truncate["cells"]["F-INF-gguf-cpu-run"]["status"] == "pass"
    assert float(truncate["cells"]["F-INF-REF-gguf-cpu-run"]["value"]) > 0
    scale = by_name["q8_0-scale-off"]  # inside the tensor tolerance: the reference quantizer names the block
    assert scale["first"]["gate"] == "F-QUANT-001" and "stored scale" in scale["first"]["reason"]
    assert scale["cells"]["F-CONV-S-G"]["status"] == "pass"
    beside = by_name["write-beside-input"]
    assert beside["first"]["gate"] == output_contract.OUTPUT_CONTRACT_GATE
    assert "model.converted.gguf" in beside["first"]["reason"] and output_contract.SCRATCH in beside["first"]["reason"]


@pytest.mark.slow
def test_detection_run_has_no_false_alarm_on_the_correct_converter(subset_matrix):
    # qwen2-tiny in every variant the subset's mutants use, plus detection.correct's architectures
    # that no mutant uses (mistral, gemma2), converted correctly.
    by_preset = {c["preset"]: c for c in subset_matrix["correct"]}
    assert by_preset["qwen2-tiny"]["variants"] == ["native", "q8_0", "bf16"]
    assert {"qwen2-tiny", "mistral-tiny", "gemma2-tiny"} <= set(by_preset)
    for preset, correct in by_preset.items():
        assert correct["fail"] == 0 and correct["false_alarms"] == [], preset
        assert correct["not_evaluated"] == 0, f"every gate of the correct conversion of {preset} must be decided"
        assert correct["pass"] > 50, preset
    assert by_preset["qwen2-tiny"]["cells"][output_contract.OUTPUT_CONTRACT_GATE]["status"] == "pass"
    assert subset_matrix["summary"]["false_alarms"] == 0


def test_function_change_counts_nan_logits_as_a_change(tmp_path):
    """np.max passes NaN on and max(0.0, nan) is 0.0: a NaN-producing mutant once measured 'identical'."""
    import numpy as np

    from convqa.detection.matrix import function_change

    good = np.arange(12, dtype=np.float32).reshape(3, 4)
    poisoned = good.copy()
    poisoned[1, 1] = np.nan
    np.savez(tmp_path / "correct.npz", p=good)
    np.savez(tmp_path / "same.npz", p=good)
    np.savez(tmp_path / "nan.npz", p=poisoned)
    assert function_change(tmp_path / "same.npz", tmp_path / "correct.npz")["changed"] is False
    change = function_change(tmp_path / "nan.npz", tmp_path / "correct.npz")
    assert change["changed"] is True and "NaN" in change["reason"]


def test_function_change_measures_logits_not_the_hidden_state_capture(tmp_path):
    """A run's .npz also holds `hidden.*` activations; they once set "max |dlogit|" (5.68 for
    transpose-2d, whose logits differ by far less)."""
    import numpy as np

    from convqa.detection.matrix import function_change
    from convqa.infer.run import HIDDEN_PREFIX

    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    shifted = logits.copy()
    shifted[2, 3] += 0.25
    hidden = np.zeros((3, 8), dtype=np.float32)
    np.savez(tmp_path / "correct.npz", p=logits, **{HIDDEN_PREFIX + "0.embed": hidden})
    np.savez(tmp_path / "mutant.npz", p=shifted, **{HIDDEN_PREFIX + "0.embed": hidden + 100.0})
    np.savez(tmp_path / "same.npz", p=logits, **{HIDDEN_PREFIX + "0.embed": hidden + 100.0})
    assert function_change(tmp_path / "mutant.npz", tmp_path / "correct.npz")["max_abs_dlogit"] == 0.25
    assert function_change(tmp_path / "same.npz", tmp_path / "correct.npz")["changed"] is False
