"""The first divergent layer on failing inference rows (convqa.compare.divergence does the numbers).

A failing F-INF or F-INF-REF row of a transformers run on cpu gets, in its details, the per-layer
curve of its hidden-state capture against a baseline and a `diagnosis` naming the first layer and
sub-layer beyond tolerance ("diverges at layer 0, self_attn output"). The baseline and tolerance
are the honest ones:
- F-INF-REF rows, and F-INF rows of a lossy variant whose first hop has a reference-quantized run:
  that reference, exactly (a correct artifact decodes the same encoding with the same code);
- F-INF rows of `native`: the ground truth, exactly (lossless under the same engine);
- a lossy variant without a reference capture: the ground truth, with no layer named (every layer
  moves under quantization; the curve is shown).
gpu runs are left alone: their kernels differ from the cpu baseline at every layer.
"""

from __future__ import annotations

import json

from convqa.compare.divergence import EXACT, locate
from convqa.gates.rows import FAIL, GateRow, label
from convqa.workflow.plan import first_hop

LOSSLESS_VARIANTS = ("native",)
ENGINE = "transformers"


def _baseline(row: GateRow, variant: str, chain: str, ground_truth: dict | None, references: dict):
    """(baseline record, its label, tolerance) for a failing row, or None when there is none."""
    hop = first_hop(chain)
    reference = references.get(hop)
    usable = reference is not None and not reference.get("error") and (reference.get("hidden_states") or {}).get("points")
    if row.gate.startswith("F-INF-REF-"):
        return (reference, f"{label(variant, hop)}/reference", EXACT) if usable else None
    if ground_truth is None:
        return None
    if variant in LOSSLESS_VARIANTS:
        return ground_truth, row.reference, EXACT
    if usable:
        return reference, f"{label(variant, hop)}/reference", EXACT
    return ground_truth, row.reference, None


def annotate_divergence(rows: list[GateRow], variant: str, runs: dict, references: dict, ground_truth_key) -> None:
    """Add the divergence evidence to every failing transformers-on-cpu F-INF / F-INF-REF row.

    runs: (chain, engine, backend) -> loaded record; references: first hop -> loaded reference
    record. The rows are changed in place: details gain `divergence` and `diagnosis`.
    """
    ground_truth = runs.get(ground_truth_key)
    by_subject = {f"{label(variant, chain)}/{engine}": (chain, record)
                  for (chain, engine, backend), record in runs.items()
                  if engine == ENGINE and backend == "cpu" and (chain, engine, backend) != ground_truth_key}
    cache: dict = {}
    for row in rows:
        if row.status != FAIL or not row.gate.startswith("F-INF-") or "-cpu-" not in row.gate:
            continue
        if row.subject not in by_subject:
            continue
        chain, record = by_subject[row.subject]
        if record.get("error") or record.get("skipped"):
            continue  # nothing ran: the row's reason already says why
        chosen = _baseline(row, variant, chain, ground_truth, references)
        if chosen is None:
            continue
        baseline, baseline_label, tolerance = chosen
        key = (row.subject, baseline_label, tolerance)
        if key not in cache:
            cache[key] = locate(baseline, record, baseline_label, tolerance)
        evidence = cache[key]
        details = json.loads(row.details) if row.details else {}
        details["divergence"] = evidence
        details["diagnosis"] = evidence["diagnosis"]
        row.details = json.dumps(details, default=_json_number)


def _json_number(value):
    return float(value)
