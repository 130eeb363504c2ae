"""The comparison gates: one planned check (convqa.workflow.plan.Check) of a subject chain against
a reference chain, decided on a tensor comparison (convqa.compare.tensors) or on file hashes.

- edges, F-CONV-S-G ... F-CONV-A-S: each conversion against its input (plan.EDGE_GATE names the
  edge of each);
- round trips, F-CONV-RT-001 ... 003: a chain that comes back to a format against the first
  artifact in it;
- idempotency, F-CONV-IDEM-001 (two runs of one conversion) and F-CONV-IDEM-002 (converting a
  round-tripped artifact again): byte-identical files;
- commutativity, F-CONV-COM-001: two routes to the same format agree.
"""

from __future__ import annotations

import json

from convqa.formats import no_artifact
from convqa.encodings import ENCODING_TOLERANCE, QUANT_TARGETS
from convqa.gates.rows import DETAILED_PROBLEMS, FAIL, PASS, GateRow, fmt, label, problems_reason
from convqa.workflow.plan import HOP_FORMAT, Check, hops

EDGE_GATES = ("F-CONV-S-G", "F-CONV-S-A", "F-CONV-G-A", "F-CONV-A-G", "F-CONV-G-S", "F-CONV-A-S")
ROUND_TRIP_GATES = ("F-CONV-RT-001", "F-CONV-RT-002", "F-CONV-RT-003")
IDEMPOTENCY_GATES = ("F-CONV-IDEM-001", "F-CONV-IDEM-002")
COMMUTATIVITY_GATES = ("F-CONV-COM-001",)
COMPARISON_GATES = EDGE_GATES + ROUND_TRIP_GATES + IDEMPOTENCY_GATES + COMMUTATIVITY_GATES


def must_be_exact(check: Check, variant: str) -> bool:
    """Lossless unless a quantizer sits on exactly one side of the comparison.

    Quantization happens only on the first hop out of SafeTensors, so two chains that share
    their first hop carry the same quantization error and must agree exactly; `native` keeps the
    source dtypes everywhere and must be bit-exact throughout.
    """
    if variant == "native":
        return True
    ref_hops, subj_hops = hops(check.reference), hops(check.subject)
    return len(ref_hops) > 1 and len(subj_hops) > 1 and ref_hops[1] == subj_hops[1]


def expected_exact(subject: str, reference: str, variant: str) -> bool:
    """Whether a correct converter makes the two chains' values equal (`must_be_exact`): such a
    comparison is decided from the manifests, so no artifact waits for it (the workflow's releases,
    convqa plan's prices)."""
    return must_be_exact(Check("", subject, reference), variant)


def check_rows(check: Check, inputs: dict, model: str, variant: str) -> list[GateRow]:
    """Rows for one planned check. inputs: `comparison` (tensors mode) or `subject_sha256`/`reference_sha256`."""
    if check.gate not in COMPARISON_GATES:
        raise ValueError(f"{check.gate} is not a comparison gate")
    row = GateRow(check.gate, label(variant, check.subject), reference=label(variant, check.reference), model=model, variant=variant)
    if check.mode == "bytes":
        subject_failure, reference_failure = inputs.get("subject_failure"), inputs.get("reference_failure")
        row.metric, row.threshold = "sha256 equal", "equal"
        if subject_failure or reference_failure:
            own = bool(subject_failure) and not no_artifact.is_upstream(subject_failure)
            return [_no_artifact_verdict(row, subject_failure or reference_failure, own)]
        a, b = inputs.get("reference_sha256"), inputs.get("subject_sha256")
        if not a or not b:
            row.reason = "hash of one side missing"
            return [row]
        row.value = "equal" if a == b else "differ"
        row.status = PASS if a == b else FAIL
        if a != b:
            row.reason = f"sha256 {b[:12]} != {a[:12]}"
        return [row]
    return [comparison_row(row, inputs.get("comparison"), check_tolerance(check, variant))]


def check_tolerance(check: Check, variant: str) -> float:
    """0 when the check must be exact; else the error the two sides' quantizers may add.

    Each side carries the error of the quantizer on its first hop (GGUF Q8_0 and APR int8 are
    different quantizers, so S->A versus S->G->A may differ by both errors at once).
    """
    if must_be_exact(check, variant):
        return 0.0
    total = 0.0
    for chain in (check.subject, check.reference):
        h = hops(chain)
        if len(h) > 1:
            encoding = QUANT_TARGETS.get(variant, {}).get(HOP_FORMAT[h[1]])
            total += ENCODING_TOLERANCE.get(encoding, 0.0) if encoding else 0.0
    return total


def _no_artifact_verdict(row: GateRow, failure: dict, own: bool) -> GateRow:
    """A check with a failed conversion's placeholder on one side. The subject's own converter
    failed (`own`): this check is where the edge fails. Anything else (its input failed upstream,
    or the reference did) waits on the failed edge's row."""
    if own:
        row.value, row.status = "no artifact", FAIL
    row.reason = no_artifact.describe(failure)
    return row


def comparison_row(row: GateRow, comparison: dict | None, tolerance: float) -> GateRow:
    row.metric = "max normalized |d|"
    if comparison is None:
        row.reason = "comparison missing (an artifact could not be read)"
        return row
    if failure := comparison.get("no_artifact"):
        own = comparison.get("read_error_side") == "subject" and not no_artifact.is_upstream(failure)
        return _no_artifact_verdict(row, failure, own)
    if comparison.get("read_error"):
        reason = f"{comparison.get('read_error_side', 'an artifact')} unreadable: {comparison['read_error']}"
        if comparison.get("read_error_side") == "subject":  # the converter's own output: the edge fails
            row.value, row.status, row.reason = "unreadable", FAIL, reason
            return row
        row.reason = reason  # the input was already bad: that edge's gates say so, not this one
        return row
    tensors = comparison.get("tensors") or []
    if not tensors:
        row.reason = "no tensors compared"
        return row
    worst = max((t.get("normalized_max_abs") or 0.0) for t in tensors)
    row.value, row.threshold = fmt(worst), fmt(tolerance)
    problems = []
    # A group of experts stacked in the wrong order is one problem, not one per moved expert.
    reordered = {name for group in comparison.get("expert_orders", []) for name in group["moved"]}
    for group in comparison.get("expert_orders", []):
        problems.append(f"{group['tensors']}: {group['diagnosis']}")
    for t in tensors:
        if t["name"] in reordered:
            continue
        err = t.get("normalized_max_abs")
        if t["status"] in ("missing_in_candidate", "extra_in_candidate", "shape_mismatch"):
            problems.append(f"{t['name']}: {t['status']} {t.get('diagnosis', '')}".strip())
        elif t.get("rounding_mismatches"):
            problems.append(f"{t['name']}: {t['diagnosis']}")
        elif err is None or not err <= tolerance:  # NaN and inf fail too
            problems.append(f"{t['name']}: {t.get('diagnosis') or 'values differ'} (normalized |d| {fmt(err)})")
    for key, (a, b) in comparison.get("config_differences", {}).items():
        problems.append(f"config {key}: {a!r} -> {b!r}")
    for key, detail in comparison.get("tokenizer_differences", {}).items():
        problems.append(f"tokenizer {key}: {detail}")
    row.status = FAIL if problems else PASS
    if problems:
        row.reason = problems_reason(problems)
    row.details = json.dumps({"problems": problems[:DETAILED_PROBLEMS], "summary": comparison.get("summary")})
    return row
