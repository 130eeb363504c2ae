"""The evidence: one JSON document per model that every report is rendered from.

`build_evidence` gathers the gate rows (TSV tables written by the workflow), the per-artifact
manifests and sidecars, and the tensor comparisons into one dict; `load_evidence` reads it back
and checks it, so report.md, report.html and junit.xml can only show what qualification.json
holds. The summary is recomputed from the rows on load: a summary that disagrees with its own
rows is refused rather than rendered.

Numbers that JSON cannot hold (inf, nan) are stored as the strings "inf", "-inf", "nan"; JSON is
written with allow_nan=False so no non-standard `Infinity` token ever reaches a consumer.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import platform
import re
from pathlib import Path

from convqa.arch import layer_index
from convqa.errors import FormatError
from convqa.gates.registry import counts_toward_verdict, family_of, family_sort_key, is_inference_family, specificity
from convqa.versions import tool_versions

SCHEMA_VERSION = "convqa.qualification/1"

GATE_COLUMNS = ("gate", "subject", "reference", "metric", "value", "threshold", "status", "reason", "model", "variant")
OPTIONAL_GATE_COLUMNS = ("details",)
STATUSES = ("pass", "fail", "skipped", "not_evaluated")

QUALIFIED = "QUALIFIED"
NOT_QUALIFIED = "NOT QUALIFIED"
INCOMPLETE = "INCOMPLETE"


def row_key(row: dict) -> tuple[str, str, str]:
    """What makes a gate row unique: the JUnit test name and the matrix cell are built from it."""
    return (row["gate"], row["subject"], row["reference"] or "")


def row_name(row: dict) -> str:
    gate, subject, reference = row_key(row)
    return f"{gate} {subject}" + (f" vs {reference}" if reference else "")


def tensor_kind(name: str) -> str:
    """The role of a tensor, so per-layer plots can give each role its own marker."""
    if name.endswith(".bias"):
        return "bias"
    if "embed_tokens" in name:
        return "embed"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norm"
    for module, kind in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_o"),
                         ("gate_proj", "mlp_gate"), ("up_proj", "mlp_up"), ("down_proj", "mlp_down")):
        if f".{module}." in name:
            return kind
    return "other"


# --- reading the inputs ---------------------------------------------------------------------

def read_gate_table(path: str | os.PathLike) -> list[dict]:
    """Read one gate TSV; every malformed row is an error naming the file, line and column."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")  # csv and pandas quoting
        header = reader.fieldnames or []
        missing = [c for c in GATE_COLUMNS if c not in header]
        if missing:
            raise FormatError(path, f"gate table header lacks columns {missing} (has {header})", field="header")
        rows = []
        for line_no, raw in enumerate(reader, start=2):
            if None in raw:
                raise FormatError(path, f"line {line_no} has more fields than the header", field="row")
            rows.append(_gate_row(path, line_no, raw))
    return rows


def _gate_row(path: Path, line_no: int, raw: dict) -> dict:
    def text(column: str) -> str:
        return (raw.get(column) or "").strip()

    status = text("status")
    if status not in STATUSES:
        raise FormatError(path, f"line {line_no}: status {status!r} is not one of {STATUSES}", field="status")
    for column in ("gate", "subject"):
        if not text(column):
            raise FormatError(path, f"line {line_no}: empty {column}", field=column)
    if status in ("skipped", "not_evaluated") and not text("reason"):
        raise FormatError(path, f"line {line_no}: a {status} row must say why (empty reason)", field="reason")
    details = None
    if text("details"):
        try:
            details = json.loads(text("details"))
        except json.JSONDecodeError as exc:
            raise FormatError(path, f"line {line_no}: details is not JSON ({exc.msg})", field="details") from exc
    return {
        "gate": text("gate"),
        "family": family_of(text("gate")),
        "subject": text("subject"),
        "reference": text("reference") or None,
        "metric": text("metric") or None,
        "value": _number_or_text(text("value")),
        "threshold": _number_or_text(text("threshold")),
        "status": status,
        "reason": text("reason"),
        "model": text("model") or None,
        "variant": text("variant") or None,
        "details": details,
        "source_table": path.name,
        "source_line": line_no,
    }


def _number_or_text(text: str):
    if not text:
        return None
    try:
        return json_number(float(text))
    except ValueError:
        return text


def json_number(x: float | None):
    """A float as JSON can hold it: finite floats unchanged, inf/nan as strings."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return x
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def as_float(x) -> float | None:
    """Inverse of json_number for plotting and sorting: "inf" -> inf, None stays None."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _read_json(path: str | os.PathLike, what: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise FormatError(path, f"{what} is not valid JSON: {exc.msg}", offset=exc.pos) from exc


# --- assembling the evidence ----------------------------------------------------------------

def host_info() -> dict:
    return {"hostname": platform.node(), "system": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


def artifact_evidence(label: str, manifest: dict | None, sidecar: dict | None) -> dict:
    """One artifact: what it is (manifest) and who made it how (sidecar)."""
    manifest = manifest or {}
    sidecar = sidecar or {}
    record = sidecar.get("record") or {}
    manifest_sha, sidecar_sha = manifest.get("file_sha256"), sidecar.get("sha256")
    tokenizer = manifest.get("tokenizer") or {}
    return {
        "label": label,
        "path": manifest.get("path") or record.get("output"),
        "format": manifest.get("format") or record.get("target_format"),
        "file_sha256": manifest_sha or sidecar_sha,
        "file_size": manifest.get("file_size", sidecar.get("size")),
        # Both sides hash the file; a disagreement means the artifact changed after it was made.
        "sha256_consistent": None if not (manifest_sha and sidecar_sha) else manifest_sha == sidecar_sha,
        "tensor_count": manifest.get("tensor_count", len(manifest.get("tensors", [])) if manifest else None),
        "encodings": _encoding_counts(manifest.get("tensors", [])),
        "architecture": (manifest.get("config") or {}).get("architecture"),
        "tokenizer_fingerprint": tokenizer.get("fingerprint"),
        "producer": None if not sidecar else {
            "converter": sidecar.get("converter") or record.get("converter"),
            "fingerprint": sidecar.get("fingerprint"),
            "argv": sidecar.get("argv"),
            "wall_s": json_number(sidecar.get("wall_s", record.get("wall_s"))),
            "peak_rss_mb": json_number(sidecar.get("peak_rss_mb")),
            "tool_versions": sidecar.get("tool_versions"),
            "source": record.get("source"),
            "source_format": record.get("source_format"),
            "target_format": record.get("target_format"),
            "quant": record.get("quant"),
            "mutant": record.get("mutant"),
            "quantized_tensors": len(record.get("quantized") or []),
            "dequantized": record.get("dequantized") or [],
            "upcast": record.get("upcast") or [],
        },
    }


def _encoding_counts(tensors: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.get("encoding", "?")] = counts.get(t.get("encoding", "?"), 0) + 1
    return dict(sorted(counts.items()))


def reference_blocks_text(finding: dict | None) -> str:
    """A quantized tensor's blocks against the reference quantizer (F-QUANT-001), for the tensor
    table: empty when they are byte-identical or no quantization happened."""
    if not finding or not finding.get("byte_exact_demanded") or finding.get("differing_blocks") == 0:
        return ""
    if finding.get("differing_blocks") is None:
        return str(finding.get("reason", ""))
    first = finding.get("first") or {}
    cols = first.get("cols") or ["?", "?"]
    text = (f"{finding['differing_blocks']} of {finding['blocks']} {finding['encoding']} blocks differ from the reference "
            f"quantizer; first {first.get('index')} (row {first.get('row')}, cols {cols[0]}..{cols[1]})")
    if "stored_scale" in first:
        text += f", scale {first['stored_scale']:.6g} (expected {first['expected_scale']:.6g})"
    return text + f" [{finding.get('map', '')}]"


def tensor_check_evidence(label: str, comparison: dict) -> dict:
    """One tensor comparison reduced to what the plots and failure tables need."""
    tensors = []
    for t in comparison.get("tensors", []):
        tensors.append({
            "name": t["name"],
            "layer": layer_index(t["name"]),
            "kind": tensor_kind(t["name"]),
            "status": t.get("status"),
            "ok": t.get("status") in ("identical", "within_tolerance"),
            "normalized_max_abs": json_number(t.get("normalized_max_abs")),
            "max_abs": json_number(t.get("max_abs")),
            "tolerance": json_number(t.get("tolerance")),
            "ref_encoding": t.get("ref_encoding"),
            "cand_encoding": t.get("cand_encoding"),
            "diagnosis": t.get("diagnosis") or "",
            "blocks": reference_blocks_text(t.get("reference_blocks")),
        })
        tensors[-1]["flagged"] = not tensors[-1]["ok"] or bool(tensors[-1]["blocks"])
    return {
        "label": label,
        "ok": bool(comparison.get("ok")),
        "summary": comparison.get("summary") or {},
        "config_differences": comparison.get("config_differences") or {},
        "tokenizer_differences": comparison.get("tokenizer_differences") or {},
        "tensors": tensors,
    }


def summarize(rows: list[dict]) -> dict:
    """Counts, pass rate, coverage and the verdict. Nothing passes vacuously.

    pass_rate = pass / (pass + fail); coverage = (pass + fail) / (rows - skipped): a gate that
    could run but was not evaluated lowers coverage, an absent capability (skipped) does not.

    Rows of a gate that judges the machine, not the conversion (registry `verdict=False`:
    F-BACKEND-001, gpu against cpu) are counted apart under `outside_verdict`: a backend that
    disagrees with cpu cannot fail a perfect conversion, and a passing one cannot stand in for
    a conversion row (those compare runs of one backend).
    """
    outside = [r for r in rows if not counts_toward_verdict(r.get("gate", ""))]
    rows = [r for r in rows if counts_toward_verdict(r.get("gate", ""))]
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    decided = counts["pass"] + counts["fail"]
    applicable = len(rows) - counts["skipped"]
    if counts["fail"]:
        verdict, why = NOT_QUALIFIED, f"{counts['fail']} gate row(s) failed"
    elif counts["not_evaluated"]:
        verdict, why = INCOMPLETE, f"{counts['not_evaluated']} gate row(s) not evaluated"
    elif not counts["pass"]:
        verdict, why = INCOMPLETE, "no gate row passed (nothing was checked)"
    else:
        verdict, why = QUALIFIED, f"all {counts['pass']} evaluated gate row(s) passed"
    return {
        "rows": len(rows),
        **counts,
        "pass_rate": counts["pass"] / decided if decided else None,
        "coverage": decided / applicable if applicable else None,
        "verdict": verdict,
        "verdict_reason": why,
        "outside_verdict": {"rows": len(outside), **{s: sum(1 for r in outside if r["status"] == s) for s in STATUSES}},
    }


def build_evidence(model: str, gate_tsvs: list, manifests: dict, sidecars: dict, comparisons: dict,
                   extra: dict | None = None) -> dict:
    """Assemble the evidence dict from the workflow's outputs (paths)."""
    extra = dict(extra or {})
    rows: list[dict] = []
    seen: dict[tuple, dict] = {}
    for tsv in gate_tsvs:
        for row in read_gate_table(tsv):
            key = row_key(row)
            if key in seen:
                first = seen[key]
                raise FormatError(tsv, f"line {row['source_line']}: duplicate gate row {row_name(row)!r} "
                                       f"(first in {first['source_table']} line {first['source_line']})", field="gate")
            seen[key] = row
            rows.append(row)
    rows.sort(key=lambda r: (family_sort_key(r["family"]), r["gate"], r["subject"], r["reference"] or ""))

    labels = sorted(set(manifests) | set(sidecars))
    artifacts = [artifact_evidence(label,
                                   _read_json(manifests[label], "manifest") if label in manifests else None,
                                   _read_json(sidecars[label], "sidecar") if label in sidecars else None)
                 for label in labels]
    tensor_checks = [tensor_check_evidence(label, _read_json(path, "comparison"))
                     for label, path in sorted(comparisons.items())]

    details = extra.pop("inference_details", None) or {}
    inference = {
        "details": [{"label": label, "prompts": _prompt_records(_read_json(path, "inference details")
                                                                 if isinstance(path, (str, os.PathLike)) else path)}
                    for label, path in sorted(details.items())],
        "throughput": [{k: json_number(v) for k, v in t.items()} for t in extra.pop("throughput", None) or []],
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool_versions": tool_versions(),
        "host": host_info(),
        "summary": summarize(rows),
        "gates": rows,
        "artifacts": artifacts,
        "tensor_checks": tensor_checks,
        "inference": inference,
        "extra": extra,
    }


def _prompt_records(data) -> list[dict]:
    """Per-prompt inference details: a list of records, or {"prompts": [...]}."""
    records = data.get("prompts", []) if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("inference details must be a list of per-prompt objects or {'prompts': [...]}")
    return [_json_safe(r) for r in records]


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float):
        return json_number(obj)
    return obj


# --- writing and reading back ---------------------------------------------------------------

def dumps(evidence: dict) -> str:
    return json.dumps(_json_safe(evidence), indent=1, allow_nan=False, sort_keys=False) + "\n"


def load_evidence(path: str | os.PathLike) -> dict:
    evidence = _read_json(path, "qualification evidence")
    check_evidence(evidence, path)
    return evidence


def check_evidence(evidence: dict, path: str | os.PathLike | None = None) -> None:
    """Refuse evidence that a report could misrepresent: wrong schema, bad rows, stale summary."""
    if not isinstance(evidence, dict) or evidence.get("schema_version") != SCHEMA_VERSION:
        found = evidence.get("schema_version") if isinstance(evidence, dict) else type(evidence).__name__
        raise FormatError(path, f"schema_version {found!r}, expected {SCHEMA_VERSION!r}", field="schema_version")
    for field in ("model", "generated_at", "tool_versions", "summary", "gates", "artifacts", "tensor_checks", "inference"):
        if field not in evidence:
            raise FormatError(path, f"evidence lacks {field!r}", field=field)
    keys = set()
    for i, row in enumerate(evidence["gates"]):
        if row.get("status") not in STATUSES:
            raise FormatError(path, f"gate row {i} has status {row.get('status')!r}", field="gates")
        if row_key(row) in keys:
            raise FormatError(path, f"gate row {i} duplicates {row_name(row)!r}", field="gates")
        keys.add(row_key(row))
    if summarize(evidence["gates"]) != evidence["summary"]:
        raise FormatError(path, "summary does not match the gate rows", field="summary")


# --- how the renderers read the evidence ----------------------------------------------------

def attention_rows(evidence: dict) -> list[dict]:
    """Rows a reader must look at, worst first: fail, then not_evaluated, then skipped."""
    order = {"fail": 0, "not_evaluated": 1, "skipped": 2}
    return sorted((r for r in evidence["gates"] if r["status"] in order), key=lambda r: order[r["status"]])


def inference_rows(evidence: dict) -> list[dict]:
    return [r for r in evidence["gates"] if is_inference_family(r["family"])]


def row_diagnosis(row: dict) -> str:
    details = row.get("details")
    return str(details.get("diagnosis", "")) if isinstance(details, dict) else ""


def row_comparison(row: dict) -> str | None:
    """The tensor check a gate row was decided on, when the row's details name one."""
    details = row.get("details")
    return details.get("comparison") if isinstance(details, dict) else None


def display_number(x) -> str:
    """Numbers as a reader wants them: 4 significant digits, empty for None."""
    if x is None:
        return ""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def display_percent(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def display_size(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def display_hash(h: str | None, n: int = 12) -> str:
    return (h or "")[:n]


def outside_verdict_line(summary: dict) -> str:
    """One sentence on the rows that do not count toward the verdict ('' when there are none)."""
    outside = summary.get("outside_verdict") or {}
    if not outside.get("rows"):
        return ""
    counts = ", ".join(f"{outside[s]} {s.replace('_', ' ')}" for s in STATUSES if outside.get(s))
    return (f"Outside the verdict: {outside['rows']} F-BACKEND-001 row(s) ({counts}): they judge the gpu backend "
            f"against cpu, not the conversion, and every conversion row compares runs of one backend")


def blocking_rows(evidence: dict) -> list[dict]:
    """What keeps a run from QUALIFIED: failed rows, then not-evaluated ones, each most specific
    gate first (registry specificity), so the row that names the bug class leads."""
    order = {"fail": 0, "not_evaluated": 1}
    return sorted((r for r in evidence["gates"] if r["status"] in order and counts_toward_verdict(r["gate"])),
                  key=lambda r: (order[r["status"]], specificity(r["gate"]), r["subject"], r["reference"] or ""))


_CAPABILITY = re.compile(r"-(cpu|gpu)-")


def skip_capability(row: dict) -> str:
    """The absent capability a skipped row stands for: the backend of an inference gate
    (`F-INF-gguf-gpu-run` -> gpu), else the gate's family."""
    # F-BACKEND-001's subject ends in the backend it compares (`native/st/transformers-gpu`).
    found = _CAPABILITY.search(row["gate"]) or re.search(r"-(gpu)$", row["subject"])
    return found.group(1) if found else row["family"]


def skip_groups(evidence: dict) -> list[dict]:
    """Skipped rows collapsed by absent capability: one line each, most rows first, with the
    reasons given (most frequent first) and their counts."""
    groups: dict[str, list[dict]] = {}
    for r in evidence["gates"]:
        if r["status"] == "skipped":
            groups.setdefault(skip_capability(r), []).append(r)
    out = []
    for cap, rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        reasons: dict[str, int] = {}
        for r in rows:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        reasons = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        text = ", ".join(reason if len(reasons) == 1 else f"{reason} ({n})" for reason, n in reasons.items())
        out.append({"capability": cap, "rows": rows, "reasons": reasons, "line": f"{cap}: {len(rows)} row"
                    f"{'s' if len(rows) != 1 else ''} skipped, {text}", "gates": sorted({r["gate"] for r in rows})})
    return out
