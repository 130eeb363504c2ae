"""F-QUANT-001: every tensor the first hop out of SafeTensors quantized is the reference
quantizer's output for the source tensor, byte for byte (convqa.compare.blocks).

Read from the same comparison as the edge gate (first hop against the source), so it costs no
extra artifact read. Which tensors to quantize stays the converter's choice: a tensor kept in
F32/F16 is not judged here (the edge gate's tolerance and F-CONTRACT-I3 judge that choice).
Later hops (G->A, A->G, round trips, repeats) re-store these blocks and are held to exactness
against the first hop by the edge, round-trip and idempotency gates.
"""

from __future__ import annotations

import json

from convqa.compare.blocks import describe
from convqa.gates.rows import DETAILED_PROBLEMS, FAIL, PASS, SKIPPED, GateRow, fmt, label, problems_reason
from convqa.workflow.plan import Check, is_first_hop

GATE = "F-QUANT-001"
LATER_HOPS = ("later hops re-store these blocks and are held to exactness against this first hop "
              "(F-CONV-G-A/A-G, F-CONV-RT, F-CONV-IDEM)")


def applies(check: Check) -> bool:
    """The check of a first hop against the source: where all quantization happens."""
    return check.mode != "bytes" and check.reference == "st" and is_first_hop(check.subject)


def quantizer_rows(check: Check, comparison: dict | None, model: str, variant: str) -> list[GateRow]:
    row = GateRow(GATE, label(variant, check.subject), reference=label(variant, check.reference), model=model,
                  variant=variant, metric="quantized tensors whose blocks differ from the reference quantizer",
                  threshold="0")
    if comparison is None:
        row.reason = "comparison missing (an artifact could not be read)"
        return [row]
    if comparison.get("no_artifact") or comparison.get("read_error"):
        row.reason = f"no comparison: {comparison.get('read_error', 'no artifact')} (the edge gate has the verdict)"
        return [row]
    tensors = comparison.get("tensors") or []
    judged = [t for t in tensors if t.get("reference_blocks")]
    if not tensors:
        row.reason = "no tensors compared"
        return [row]
    if not judged:
        row.status = SKIPPED
        row.reason = "no tensor was quantized on this edge (every tensor keeps a plain-float encoding)"
        return [row]
    problems, fallbacks, blocks = [], [], 0
    for t in judged:
        finding = t["reference_blocks"]
        if not finding.get("byte_exact_demanded"):
            # No byte-reproducible reference: the tensor is held to its encoding's tolerance.
            err, tolerance = t.get("normalized_max_abs"), finding.get("fallback_tolerance", 0.0)
            fallbacks.append(t["name"])
            if err is None or not err <= tolerance:
                problems.append(f"{t['name']} ({finding['encoding']}): normalized |d| {fmt(err)} over its fallback "
                                f"tolerance {fmt(tolerance)}")
            continue
        blocks += finding.get("blocks") or 0
        if finding.get("differing_blocks") != 0:
            problems.append(describe(t["name"], finding))
    row.value = str(len(problems))
    row.status = FAIL if problems else PASS
    encodings = sorted({t["reference_blocks"]["encoding"] for t in judged})
    exact = len(judged) - len(fallbacks)
    summary = f"{exact} tensor(s) in {'/'.join(encodings)} byte for byte ({blocks} blocks)"
    if fallbacks:
        summary += f"; {len(fallbacks)} by tolerance: {describe(fallbacks[0], next(t['reference_blocks'] for t in judged if t['name'] == fallbacks[0])).split(': ', 1)[1]}"
    row.reason = (problems_reason(problems) + "; " if problems else "") + f"{summary}; {LATER_HOPS}"
    row.details = json.dumps({"problems": problems[:DETAILED_PROBLEMS],
                              "maps": {t["name"]: t["reference_blocks"].get("map") for t in judged
                                       if t["reference_blocks"].get("map")},
                              "tensors": len(judged), "by_tolerance": fallbacks})
    return [row]
