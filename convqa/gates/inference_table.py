"""The inference gate table of one (model, variant, tier): rule inference_gates
(scripts/inference_gates.py). Loads the recorded runs, served answers and reference runs, picks
the tolerances for the source's dtypes and evaluates them (convqa.gates.inference); the parity
records (rule parity) give the F-TOK-001 and F-CHAT-001 rows (convqa.gates.parity)."""

from __future__ import annotations

import json

from convqa.gates.backend import backend_rows
from convqa.gates.inference import evaluate, select_tolerances
from convqa.gates.parity import parity_rows
from convqa.gates.rows import GateRow
from convqa.infer.parity import load_parity
from convqa.infer.run import load_run


def _record(key: str, paths: dict) -> dict:
    """The run record of one cell: read from its files, or, for a cell no job ran (a gpu cell
    with no GPU to run it: convqa.workflow.gpu), `skipped` with the reason the planner gave."""
    if "skipped" in paths:
        return {"skipped": paths["skipped"], "error": None, "prompts": [], "logits": {}, "hidden": {},
                "backend": key.rsplit("|", 1)[-1]}
    return load_run(paths["json"], paths["npz"])


def inference_gate_rows(model: str, variant: str, inputs: dict, tolerances: dict, reference_tolerances: dict,
                        modalities: tuple, backend_tolerances: dict | None = None) -> tuple[str, list[GateRow], dict]:
    """(the config key of the tolerances used, gate rows, the report's extra: throughput and
    per-prompt details). inputs: `runs` ("chain|engine|backend" -> {json, npz}, or {skipped: reason}: a gpu cell no job ran), `serves`
    ("chain|engine" -> JSON path), `references` ("first hop|backend" -> {json, npz}),
    `judged_by_owner` (first hop -> the lossless variant whose runs of it judge it), `parities`
    (chain -> JSON path; absent: no parity rows), `source_manifest`. backend_tolerances (engine ->
    tolerance) decide the F-BACKEND-001 rows (convqa.gates.backend), which are outside the verdict."""
    runs = {tuple(key.split("|")): _record(key, paths) for key, paths in inputs["runs"].items()}
    serves = {}
    for key, path in inputs["serves"].items():
        with open(path) as fh:
            serves[tuple(key.split("|"))] = json.load(fh)
    references = {tuple(key.split("|")): _record(key, paths) for key, paths in inputs["references"].items()}
    with open(inputs["source_manifest"]) as fh:
        key, selected = select_tolerances(variant, tolerances, json.load(fh))
    rows, throughput, details = evaluate(
        model, variant, runs, serves, selected, modalities,
        references=references, reference_tolerances=reference_tolerances,
        judged_by_owner=inputs.get("judged_by_owner") or {},
    )
    rows += backend_rows(model, variant, runs, backend_tolerances or {})
    rows += parity_rows(model, variant, {chain: load_parity(path) for chain, path in inputs.get("parities", {}).items()})
    return key, rows, {"throughput": throughput, "inference_details": details}
