"""Differential qualification: gate rows for a second converter on an edge (F-XCONV-001).

A side converter's artifact is held to everything the primary's is: the per-artifact gates, the
edge gate against the input both converted, the contract gates. F-XCONV-001 then compares it
with the primary's artifact. What decides that gate, and what only explains it:

- failures: any tensor whose values differ beyond what the two quantizers may add (nothing, for
  a lossless edge), a tensor only one side has, a config field, a tokenizer field;
- informational: format metadata (GGUF key/value pairs outside the config and tokenizer, such as
  `general.name`, `general.size_label` or a converter's provenance key) and tensors whose stored
  encoding differs while their values agree. They are listed in the row's reason and details.

A side conversion that exited non-zero has no artifact: its edge gate and F-XCONV-001 are `fail`
rows whose reason is the converter's exit status and stderr tail.
"""

from __future__ import annotations

import json

from convqa.encodings import ENCODING_TOLERANCE, QUANT_TARGETS
from convqa.convert.converters import side_label
from convqa.gates.artifact import artifact_rows
from convqa.gates.contracts import contract_rows
from convqa.gates.edges import check_rows, comparison_row
from convqa.gates.rows import FAIL, GateRow, label
from convqa.workflow.plan import EDGE_GATE, Check, edge, is_first_hop, target_format

XCONV_GATE = "F-XCONV-001"
# Format-level bookkeeping that differs between any two writers and says nothing about the model.
LAYOUT_METADATA = {"data_offset", "alignment", "tensor_types", "kv_types", "provenance", "defaults_applied",
                   "unmapped_tensors"}
LISTED_KEYS = 8  # metadata keys named in a row's reason; all of them are in its details
REASON_TAIL_CHARS = 300  # of a failed converter's stderr, in the row's reason (the sidecar has more)
SLOT_FILES = ("sidecar", "manifest", "vs_primary", "vs_parent", "primary_manifest", "parent_manifest")


def side_by_side_rows(slots: list[dict], model: str, variant: str) -> list[GateRow]:
    """The rows of every side-by-side conversion of one (model, variant, tier): `slots` as
    side_rows takes them, each with the paths of its SLOT_FILES (JSON)."""
    rows = []
    for slot in slots:
        loaded = {}
        for key in SLOT_FILES:
            with open(slot[key]) as fh:
                loaded[key] = json.load(fh)
        rows += side_rows(slot, loaded, model, variant)
    return rows


def side_tolerance(chain: str, variant: str) -> float:
    """Two converters quantizing the same first hop may each add their encoding's error; after
    the first hop both convert the same input and must agree exactly."""
    if variant == "native" or not is_first_hop(chain):
        return 0.0
    encoding = QUANT_TARGETS.get(variant, {}).get(target_format(chain))
    return 2 * ENCODING_TOLERANCE.get(encoding, 0.0) if encoding else 0.0


def side_rows(slot: dict, loaded: dict, model: str, variant: str) -> list[GateRow]:
    """All rows of one side-by-side conversion. `slot`: chain, converter, primary_converter,
    parent; `loaded`: sidecar, manifest, vs_primary, vs_parent, primary_manifest,
    parent_manifest (the parsed JSON files)."""
    chain, converter, parent = slot["chain"], slot["converter"], slot["parent"]
    subject = side_label(chain, converter)
    edge_gate = EDGE_GATE[edge(chain)]
    sidecar = loaded["sidecar"]
    if sidecar.get("status") == "not_run":  # its input failed upstream: that edge's row fails, these wait
        rows = [GateRow(edge_gate, label(variant, subject), label(variant, parent), reason=sidecar["reason"]),
                GateRow(XCONV_GATE, label(variant, subject), label(variant, chain), reason=sidecar["reason"])]
        for row in rows:
            row.model, row.variant = model, variant
        return rows
    if sidecar.get("status") == "failed":
        reason = failure_reason(sidecar)
        rows = [GateRow(edge_gate, label(variant, subject), label(variant, parent), status=FAIL, reason=reason,
                        metric="converter exit status", value=str(sidecar["returncode"]), threshold="0"),
                GateRow(XCONV_GATE, label(variant, subject), label(variant, chain), status=FAIL, reason=reason,
                        metric="converter exit status", value=str(sidecar["returncode"]), threshold="0")]
        for row in rows:
            row.model, row.variant = model, variant
            row.details = json.dumps({"argv": sidecar.get("argv"), "stderr_tail": sidecar.get("stderr_tail")})
        return rows

    manifest = loaded["manifest"]
    rows = artifact_rows(manifest, subject, model, variant)
    # The edge gate, held to the same tolerance as the primary's (planned for `chain`).
    edge_rows = check_rows(Check(edge_gate, chain, parent), {"comparison": loaded["vs_parent"]}, model, variant)
    for row in edge_rows:
        row.subject = label(variant, subject)
    rows += edge_rows
    rows += contract_rows(subject, {"manifest": manifest, "parent_manifest": loaded["parent_manifest"],
                                    "sidecar": sidecar, "parent_chain": parent}, model, variant)
    rows.append(xconv_row(chain, converter, slot["primary_converter"], loaded, model, variant))
    return rows


def xconv_row(chain: str, converter: str, primary: str, loaded: dict, model: str, variant: str) -> GateRow:
    row = GateRow(XCONV_GATE, label(variant, side_label(chain, converter)), reference=label(variant, chain),
                  model=model, variant=variant)
    comparison_row(row, loaded["vs_primary"], side_tolerance(chain, variant))
    explained = explain_differences(loaded["primary_manifest"], loaded["manifest"], loaded["vs_primary"], primary, converter)
    details = json.loads(row.details) if row.details else {}
    details.update(explained)
    row.details = json.dumps(details)
    notes = informational_summary(explained, primary, converter)
    if notes:
        row.reason = f"{row.reason}; informational: {notes}" if row.reason else f"informational: {notes}"
    return row


def explain_differences(primary_manifest: dict, side_manifest: dict, comparison: dict, primary: str, side: str) -> dict:
    """What differs between the two artifacts beyond the gate's verdict: format metadata keys
    and stored encodings of tensors whose values agree."""
    a, b = _metadata(primary_manifest), _metadata(side_manifest)
    changed = {k: [a[k], b[k]] for k in sorted(set(a) & set(b)) if a[k] != b[k]}
    encodings = [f"{t['name']}: {t['ref_encoding']} ({primary}) vs {t['cand_encoding']} ({side})"
                 for t in comparison.get("tensors", []) if t.get("ref_encoding") != t.get("cand_encoding")]
    return {
        "metadata_only_in_primary": sorted(set(a) - set(b)),
        "metadata_only_in_side": sorted(set(b) - set(a)),
        "metadata_changed": changed,
        "encoding_differences": encodings,
    }


def _metadata(manifest: dict) -> dict:
    """Comparable format metadata: a GGUF's key/value pairs, else the reader's metadata minus
    layout bookkeeping. Tokenizer arrays are summarised by the reader (count and sha256)."""
    metadata = manifest.get("metadata") or {}
    if isinstance(metadata.get("kv"), dict):
        return metadata["kv"]
    return {k: v for k, v in metadata.items() if k not in LAYOUT_METADATA}


def informational_summary(explained: dict, primary: str, side: str) -> str:
    parts = []
    for key, who in (("metadata_only_in_primary", primary), ("metadata_only_in_side", side)):
        if explained[key]:
            parts.append(f"metadata only in {who}: {_listed(explained[key])}")
    if explained["metadata_changed"]:
        parts.append(f"metadata differing: {_listed(list(explained['metadata_changed']))}")
    if explained["encoding_differences"]:
        parts.append(f"{len(explained['encoding_differences'])} tensors stored in another encoding with equal values")
    return "; ".join(parts)


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else ""
    return ", ".join(keys[:LISTED_KEYS]) + more


def failure_reason(sidecar: dict) -> str:
    if sidecar.get("output_path_error"):  # exited 0, wrote somewhere else
        return sidecar["output_path_error"]
    tail = (sidecar.get("stderr_tail") or "").strip().replace("\r", "\n").splitlines()
    last = " | ".join(line.strip() for line in tail[-3:] if line.strip())[-REASON_TAIL_CHARS:]
    return f"converter {sidecar['converter']!r} exited {sidecar['returncode']}: {last or 'no stderr'}"
