"""The contract gates: each converted artifact against its parent, from both manifests (the
statistics they compare are recorded there: no tensor is read again).

- F-CONTRACT-I2 (`names_preserved`): tensor names are a bijection with the parent's.
- F-CONTRACT-I3 (`dtype_changes_recorded`): no silent dtype fallback; every encoding change is
  one the converter recorded (quantization, dequantization, lossless upcast).
- F-CONTRACT-I4 (`statistics_preserved`): mean/std/min/max within the encodings' tolerance.
- F-CONTRACT-I5 (`tokenizer_preserved`): the tokenizer is carried unchanged.

F-CONTRACT-OUTPUT, the output-path contract, is in convqa.gates.output_contract.
"""

from __future__ import annotations

import json
import math

from convqa.formats import no_artifact
from convqa.encodings import ENCODING_TOLERANCE
from convqa.gates.artifact import no_tensors
from convqa.gates.rows import DETAILED_PROBLEMS, FAIL, PASS, GateRow, fmt, label, problems_reason, verdict


def contract_rows(chain: str, inputs: dict, model: str, variant: str) -> list[GateRow]:
    """inputs: `manifest`, `parent_manifest`, `sidecar`, `parent_chain` (the statistics the
    contracts compare are in the manifests: no tensor is read again)."""
    subject, ref = label(variant, chain), label(variant, inputs.get("parent_chain", ""))
    manifest, parent_manifest = inputs.get("manifest"), inputs.get("parent_manifest")
    sidecar = inputs.get("sidecar") or {}
    rows = [
        names_preserved(GateRow("F-CONTRACT-I2", subject, ref), manifest, parent_manifest),
        dtype_changes_recorded(GateRow("F-CONTRACT-I3", subject, ref), manifest, parent_manifest, sidecar),
        statistics_preserved(GateRow("F-CONTRACT-I4", subject, ref), manifest, parent_manifest),
        tokenizer_preserved(GateRow("F-CONTRACT-I5", subject, ref), manifest, parent_manifest),
    ]
    for r in rows:
        r.model, r.variant = model, variant
    return rows


def _both(row: GateRow, manifest, parent_manifest) -> bool:
    reason = no_tensors(manifest) or no_tensors(parent_manifest)
    if reason:
        row.reason = reason
        return False
    return True


def names_preserved(row: GateRow, manifest, parent_manifest) -> GateRow:
    """F-CONTRACT-I2: tensor names are a bijection with the parent's."""
    row.metric, row.threshold = "names missing or extra", "0"
    if not _both(row, manifest, parent_manifest):
        return row
    a = {t["name"] for t in parent_manifest["tensors"]}
    b = {t["name"] for t in manifest["tensors"]}
    problems = [f"missing {n}" for n in sorted(a - b)] + [f"extra {n}" for n in sorted(b - a)]
    return verdict(row, len(problems), problems)


def dtype_changes_recorded(row: GateRow, manifest, parent_manifest, sidecar) -> GateRow:
    """F-CONTRACT-I3: every encoding change is one the converter recorded (no silent dtype fallback)."""
    row.metric, row.threshold = "unrecorded encoding changes", "0"
    if not _both(row, manifest, parent_manifest):
        return row
    record = sidecar.get("record") or {}
    changes = record.get("quantized", []) + record.get("dequantized", []) + record.get("upcast", [])
    recorded = {r[0]: (r[1], r[2]) for r in changes}
    before = {t["name"]: t["encoding"] for t in parent_manifest["tensors"]}
    problems = []
    for t in manifest["tensors"]:
        old = before.get(t["name"])
        if old is not None and old != t["encoding"] and recorded.get(t["name"]) != (old, t["encoding"]):
            problems.append(f"{t['name']}: {old} -> {t['encoding']} not recorded by the converter")
    return verdict(row, len(problems), problems)


def statistics_preserved(row: GateRow, manifest, parent_manifest) -> GateRow:
    """F-CONTRACT-I4: mean/std/min/max of every tensor within its encodings' tolerance."""
    row.metric = "max stat deviation / tolerance"
    row.threshold = "1"
    if not _both(row, manifest, parent_manifest):
        return row
    before = {t["name"]: t for t in parent_manifest["tensors"]}
    worst, problems = 0.0, []
    for t in manifest["tensors"]:
        p = before.get(t["name"])
        if p is None or not p.get("stats") or not t.get("stats") or p["stats"]["max"] is None or t["stats"]["max"] is None:
            continue
        tol = max(ENCODING_TOLERANCE.get(p["encoding"], 0.0), ENCODING_TOLERANCE.get(t["encoding"], 0.0))
        scale = max(abs(p["stats"]["max"]), abs(p["stats"]["min"]), 1e-30)
        for key in ("mean", "std", "min", "max"):
            dev = abs(p["stats"][key] - t["stats"][key]) / scale
            ratio = dev / tol if tol > 0 else (0.0 if dev <= 1e-6 else math.inf)
            if not math.isfinite(dev):  # a NaN statistic compares false with everything: never a pass
                ratio = math.inf
            # F32 statistics are computed in float64 from identical values: exact; allow print noise only.
            worst = max(worst, ratio)
            if ratio > 1:
                problems.append(f"{t['name']}.{key}: {p['stats'][key]:.6g} -> {t['stats'][key]:.6g}")
                break
    row.value = fmt(worst)
    row.status = PASS if not problems else FAIL
    if problems:
        row.reason = problems_reason(problems)
        row.details = json.dumps({"problems": problems[:DETAILED_PROBLEMS]})
    return row


def tokenizer_preserved(row: GateRow, manifest, parent_manifest) -> GateRow:
    """F-CONTRACT-I5: same tokens, merges, special ids and chat template as the parent."""
    row.metric, row.threshold = "tokenizer fields changed", "0"
    if manifest is None or parent_manifest is None:
        row.reason = "manifest missing"
        return row
    if reason := next((no_artifact.describe(m["no_artifact"]) if m.get("no_artifact") else f"artifact unreadable: {m['read_error']}"
                       for m in (manifest, parent_manifest) if m.get("read_error")), ""):
        row.reason = reason
        return row
    a, b = parent_manifest.get("tokenizer"), manifest.get("tokenizer")
    if a is None:
        row.reason = "parent has no tokenizer to carry"
        return row
    if b is None:
        return verdict(row, 1, ["tokenizer dropped"])
    fields_ = ("model", "pre", "n_tokens", "n_merges", "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id",
               "add_bos_token", "add_eos_token", "chat_template_sha256", "fingerprint")
    problems = [f"{f}: {a.get(f)!r} -> {b.get(f)!r}" for f in fields_ if a.get(f) != b.get(f)]
    return verdict(row, len(problems), problems)
