"""Tensor-level gates on real artifacts: correct conversions pass, known-bad ones fail, nothing passes empty."""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path

import yaml

from convqa.gates.artifact import artifact_rows
from convqa.gates.contracts import contract_rows
from convqa.gates.edges import COMPARISON_GATES, EDGE_GATES, check_rows
from convqa.gates.inference import INFERENCE_GATES, REFERENCE_GATES
from convqa.gates.registry import FAMILY_ORDER, REGISTRY, family_of
from convqa.gates.rows import FAIL, NOT_EVALUATED, PASS
from convqa.compare.tensors import compare_models
from convqa.convert.builtin import convert
from convqa.formats import open_model
from convqa.inspect.manifest import build_manifest
from convqa.workflow.plan import EDGE_GATE, HOP_FORMAT, Check, checks_for

REPO = Path(__file__).resolve().parents[1]


def comparison(a, b) -> dict:
    with open_model(a) as ra, open_model(b) as rb:
        return compare_models(ra, rb).as_dict()


def statuses(rows) -> dict:
    return {r.gate: r.status for r in rows}


def test_correct_artifacts_pass_every_artifact_gate(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    convert(src, tmp_path / "m.gguf", "gguf")
    convert(src, tmp_path / "m.apr", "apr")
    for chain, path in (("st", src), ("st-gguf", tmp_path / "m.gguf"), ("st-apr", tmp_path / "m.apr")):
        rows = artifact_rows(build_manifest(path), chain, "m", "native")
        assert all(r.status == PASS for r in rows), [(r.gate, r.reason) for r in rows]
        assert {"G0-INTEGRITY", "G0-VALIDATE"} <= set(statuses(rows))
    assert "F-LAYOUT-001" in statuses(artifact_rows(build_manifest(tmp_path / "m.gguf"), "st-gguf", "m", "native"))
    assert "F-LAYOUT-002" in statuses(artifact_rows(build_manifest(tmp_path / "m.apr"), "st-apr", "m", "native"))


def test_missing_inputs_are_not_evaluated_never_pass():
    rows = artifact_rows(None, "st-gguf", "m", "native")
    assert rows and all(r.status == NOT_EVALUATED and r.reason for r in rows)
    empty = {"format": "gguf", "config": {}, "tensors": []}
    assert all(r.status == NOT_EVALUATED for r in artifact_rows(empty, "st-gguf", "m", "native"))
    row = check_rows(Check("F-CONV-S-G", "st-gguf", "st"), {"comparison": None}, "m", "native")[0]
    assert row.status == NOT_EVALUATED
    row = check_rows(Check("F-CONV-S-G", "st-gguf", "st"), {"comparison": {"tensors": []}}, "m", "native")[0]
    assert row.status == NOT_EVALUATED and row.reason == "no tensors compared"
    row = check_rows(Check("F-CONV-IDEM-001", "st-gguf.run2", "st-gguf", "bytes"), {"subject_sha256": "ab"}, "m", "native")[0]
    assert row.status == NOT_EVALUATED
    rows = contract_rows("st-gguf", {}, "m", "native")
    assert all(r.status == NOT_EVALUATED for r in rows)


def test_dims_not_reversed_fails_layout_and_integrity(synthetic_dir, tmp_path):
    bad = tmp_path / "bad.gguf"
    convert(synthetic_dir("qwen2-tiny"), bad, "gguf", mutant="dims-not-reversed")
    rows = statuses(artifact_rows(build_manifest(bad), "st-gguf", "m", "native"))
    assert rows["F-LAYOUT-001"] == FAIL and rows["G0-INTEGRITY"] == FAIL


def test_edge_gate_fails_on_transposed_data_with_the_diagnosis(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    convert(src, tmp_path / "bad.apr", "apr", mutant="transpose-2d")
    row = check_rows(Check("F-CONV-S-A", "st-apr", "st"), {"comparison": comparison(src, tmp_path / "bad.apr")}, "m", "native")[0]
    assert row.status == FAIL and "LAYOUT-002" in row.reason and float(row.value) > 0.1


def test_quantized_checks_use_the_quantizers_tolerance(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    convert(src, tmp_path / "q.gguf", "gguf", quant="q8_0")
    convert(tmp_path / "q.gguf", tmp_path / "q-st", "safetensors")
    convert(src, tmp_path / "f.apr", "apr")  # q8_0 has no APR encoding: S->A keeps F32
    convert(tmp_path / "q.gguf", tmp_path / "qg.apr", "apr")
    edge = check_rows(Check("F-CONV-S-G", "st-gguf", "st"), {"comparison": comparison(src, tmp_path / "q.gguf")}, "m", "q8_0")[0]
    assert edge.status == PASS and 0 < float(edge.value) <= float(edge.threshold) == 0.005
    rt = check_rows(Check("F-CONV-RT-003", "st-gguf-st", "st"), {"comparison": comparison(src, tmp_path / "q-st")}, "m", "q8_0")[0]
    assert rt.status == PASS, rt.reason
    com = check_rows(Check("F-CONV-COM-001", "st-gguf-apr", "st-apr"), {"comparison": comparison(tmp_path / "f.apr", tmp_path / "qg.apr")}, "m", "q8_0")[0]
    assert com.status == PASS and float(com.threshold) == 0.005, com.reason
    # The same comparison under `native` (no quantizer anywhere) must be exact and fails.
    native = check_rows(Check("F-CONV-COM-001", "st-gguf-apr", "st-apr"), {"comparison": comparison(tmp_path / "f.apr", tmp_path / "qg.apr")}, "m", "native")[0]
    assert native.status == FAIL and native.threshold == "0"
    # Later hops of a quantized chain must be exact: G->A after Q8_0 only dequantizes.
    ga = check_rows(Check("F-CONV-G-A", "st-gguf-apr", "st-gguf"), {"comparison": comparison(tmp_path / "q.gguf", tmp_path / "qg.apr")}, "m", "q8_0")[0]
    assert ga.status == PASS and ga.threshold == "0" and float(ga.value) == 0.0


def test_contract_gates_catch_dropped_tokenizer_and_unrecorded_dtype_change(synthetic_dir, tmp_path):
    src = synthetic_dir("qwen2-tiny")
    convert(src, tmp_path / "good.gguf", "gguf")
    convert(src, tmp_path / "notok.gguf", "gguf", mutant="drop-tokenizer")
    parent = build_manifest(src)
    good = contract_rows("st-gguf", {"manifest": build_manifest(tmp_path / "good.gguf"), "parent_manifest": parent, "parent_chain": "st"}, "m", "native")
    assert all(r.status == PASS for r in good), [(r.gate, r.reason) for r in good]
    bad = statuses(contract_rows("st-gguf", {"manifest": build_manifest(tmp_path / "notok.gguf"), "parent_manifest": parent, "parent_chain": "st"}, "m", "native"))
    assert bad["F-CONTRACT-I5"] == FAIL
    # A quantized file with no converter record of the quantization is a silent fallback (I3).
    convert(src, tmp_path / "q.gguf", "gguf", quant="q8_0")
    rows = statuses(contract_rows("st-gguf", {"manifest": build_manifest(tmp_path / "q.gguf"), "parent_manifest": parent, "sidecar": {}}, "m", "q8_0"))
    assert rows["F-CONTRACT-I3"] == FAIL


def test_every_tier_check_names_a_registered_gate():
    for tier in ("smoke", "mvp", "full"):
        for check in checks_for(tier, "native"):
            assert check.gate in REGISTRY


def test_every_registered_gate_id_is_written_literally_where_it_is_evaluated():
    for gate in REGISTRY.values():
        source = Path(inspect.getsourcefile(gate.evaluating_function())).read_text()
        assert f'"{gate.id}"' in source, f"{gate.id} is not written in the module of {gate.evaluator}"
        assert family_of(gate.id) == gate.family and gate.family in FAMILY_ORDER


def test_every_planned_check_is_a_comparison_gate_and_every_edge_has_its_gate():
    assert set(EDGE_GATE.values()) == set(EDGE_GATES)
    for tier, variant in itertools.product(("smoke", "mvp", "full"), ("native", "q8_0")):
        for check in checks_for(tier, variant):
            assert check.gate in COMPARISON_GATES
            assert REGISTRY[check.gate].evaluating_function() is check_rows


def test_every_inference_cell_the_config_allows_has_a_registered_gate():
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    inference = schema["properties"]["inference"]["properties"]
    backends = inference["backends"]["items"]["enum"]
    modalities = [m for m in inference["modalities"]["items"]["enum"] if m != "serve"]
    assert set(INFERENCE_GATES) == set(itertools.product(HOP_FORMAT, backends, modalities))
    assert set(REFERENCE_GATES) == set(itertools.product(HOP_FORMAT, backends, modalities))
    assert set(INFERENCE_GATES.values()) | set(REFERENCE_GATES.values()) <= set(REGISTRY)
