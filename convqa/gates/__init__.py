"""The gate registry and the evaluation of tensor-level gates.

Every gate has a stable ID and produces one row per (gate, subject[, reference]) with the
measured value, the threshold and a status: pass | fail | skipped | not_evaluated. A gate never
passes vacuously: when its inputs are missing or empty it says `not_evaluated` with the reason,
which counts against coverage. `skipped` is only for an absent capability (no CUDA device).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from convqa import arch

from convqa.formats import no_artifact
from convqa.encodings import ENCODING_TOLERANCE, QUANT_TARGETS
from convqa.model import ModelConfig
from convqa.convert.builtin import gguf_wants_f32
from convqa.workflow.plan import HOP_FORMAT, Check, hops
from convqa.workflow.plan import parent as plan_parent

PASS, FAIL, SKIPPED, NOT_EVALUATED = "pass", "fail", "skipped", "not_evaluated"


@dataclass(frozen=True)
class Gate:
    id: str
    subject: str
    passes_when: str


REGISTRY = {
    g.id: g
    for g in [
        Gate("G0-INTEGRITY", "each artifact", "config agrees with tensor shapes: layers, hidden, vocab, heads, kv heads, intermediate, head_dim"),
        Gate("G0-VALIDATE", "each artifact", "no NaN/Inf, no all-zero weight, embedding < 50% zeros, weights < 80% zeros, 2-D weights vary, norms non-degenerate"),
        Gate("F-LAYOUT-001", "each GGUF", "every ne is the reversed shape the config implies (transposed values are caught, with their diagnosis, by the F-CONV edge gates)"),
        Gate("F-LAYOUT-002", "each APR", "row-major flag set, column-major flag absent, embedding and lm_head are [vocab, hidden]"),
        Gate("F-LAYOUT-003", "each GGUF", "every 1-D tensor and norm is F32, as llama.cpp's converter writes them and its kernels need (a BF16/F16 norm aborts llama.cpp on the first forward pass)"),
        Gate("F-CONV-S-G", "edge", "names one-to-one, shapes equal, values equal (bit-exact when lossless, within tolerance when quantized), config and tokenizer carried"),
        Gate("F-CONV-S-A", "edge", "as F-CONV-S-G, for SafeTensors -> APR"),
        Gate("F-CONV-G-A", "edge", "as F-CONV-S-G, for GGUF -> APR"),
        Gate("F-CONV-A-G", "edge", "as F-CONV-S-G, for APR -> GGUF"),
        Gate("F-CONV-G-S", "edge", "as F-CONV-S-G, for GGUF -> SafeTensors"),
        Gate("F-CONV-A-S", "edge", "as F-CONV-S-G, for APR -> SafeTensors"),
        Gate("F-CONV-RT-001", "round trip", "S->A->G->A equals S->A"),
        Gate("F-CONV-RT-002", "round trip", "S->G->A->G equals S->G"),
        Gate("F-CONV-RT-003", "round trip", "S->G->S and S->A->S equal S"),
        Gate("F-CONV-IDEM-001", "repeated conversion", "two independent runs of the same conversion give byte-identical files"),
        Gate("F-CONV-IDEM-002", "fixpoint", "converting a round-tripped artifact again gives the same bytes as the first conversion"),
        Gate("F-CONV-COM-001", "commutativity", "S->A equals S->G->A; G->A equals G->S->A"),
        Gate("F-CONTRACT-OUTPUT", "each conversion", "the converter writes exactly the requested output path (in the workflow a violation fails the conversion job; the detection run records it as this gate)"),
        Gate("F-CONTRACT-I2", "each converted artifact", "tensor names are a bijection with the parent's"),
        Gate("F-CONTRACT-I3", "each converted artifact", "no silent dtype fallback: every encoding change is a recorded quantization, dequantization or lossless upcast"),
        Gate("F-CONTRACT-I4", "each converted artifact", "mean/std/min/max of every tensor preserved within its encoding's tolerance"),
        Gate("F-CONTRACT-I5", "each converted artifact", "tokenizer carried: same tokens, merges, special ids and chat template as the parent"),
        Gate("F-INF", "artifact x engine x backend x modality", "inference runs, output non-empty and not garbage, logits match the ground truth within tolerance"),
        Gate("F-INF-REF", "artifact x engine x modality, lossy variants, cpu", "logits equal the reference-quantized model's (the source through the reference quantizer of each tensor's stored encoding) within tolerance: bit for bit under transformers"),
        Gate("F-ENGINE-001", "each GGUF", "llama.cpp and transformers agree on the same file within tolerance"),
        Gate("F-SERVE-001", "each served artifact", "the HTTP answer equals the run answer token for token"),
        Gate("F-XCONV-001", "edge with two converters", "two converters' outputs for the same edge agree tensor by tensor"),
    ]
}


@dataclass
class GateRow:
    gate: str
    subject: str
    reference: str = ""
    metric: str = ""
    value: str = ""
    threshold: str = ""
    status: str = NOT_EVALUATED
    reason: str = ""
    model: str = ""
    variant: str = ""
    details: str = ""  # JSON, for the report

    def __post_init__(self) -> None:
        if self.gate not in REGISTRY and not self.gate.startswith("F-INF-"):
            raise ValueError(f"unknown gate {self.gate!r}")


COLUMNS = [f.name for f in fields(GateRow)]


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.6g}"
    return str(x)


def write_rows_tsv(rows: list[GateRow], path: str | Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def read_rows_tsv(path: str | Path) -> list[GateRow]:
    with open(path, newline="") as fh:
        return [GateRow(**{k: (v or "") for k, v in row.items() if k in COLUMNS}) for row in csv.DictReader(fh, delimiter="\t")]


def label(variant: str, chain: str) -> str:
    return f"{variant}/{chain}"


# ---------------------------------------------------------------- per-artifact gates


def artifact_rows(manifest: dict | None, chain: str, model: str, variant: str) -> list[GateRow]:
    subject = label(variant, chain)
    fmt = manifest.get("format") if manifest else None
    rows = [_integrity(manifest, subject), _validate(manifest, subject)]
    if fmt == "gguf" or (manifest is None and hops(chain)[-1] == "gguf"):
        rows.append(_layout_gguf(manifest, subject))
        rows.append(_gguf_f32_tensors(manifest, subject))
    if fmt == "apr" or (manifest is None and hops(chain)[-1] == "apr"):
        rows.append(_layout_apr(manifest, subject))
    for r in rows:
        r.model, r.variant = model, variant
    return rows


def _no_tensors(manifest: dict | None) -> str:
    if manifest is None:
        return "no manifest (artifact missing or unreadable)"
    if manifest.get("no_artifact"):  # a failed conversion: its edge's row fails, this one waits on it
        return no_artifact.describe(manifest["no_artifact"])
    if manifest.get("read_error"):
        return f"artifact unreadable: {manifest['read_error']}"
    if not manifest.get("tensors"):
        return "artifact has no tensors"
    return ""


def _config_of(manifest: dict) -> ModelConfig:
    return ModelConfig(**manifest["config"])


def _integrity(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("G0-INTEGRITY", subject, metric="tensors disagreeing with config", threshold="0")
    if manifest is not None and manifest.get("read_error") and not manifest.get("no_artifact"):
        # The strict reader refused the file: every reader and engine downstream will too.
        return _verdict(row, 1, [f"artifact unreadable: {manifest['read_error']}"])
    if reason := _no_tensors(manifest):
        row.reason = reason
        return row
    expected = arch.expected_tensors(_config_of(manifest))
    actual = {t["name"]: tuple(t["shape"]) for t in manifest["tensors"]}
    problems = [f"missing {n}" for n in expected if n not in actual]
    problems += [f"{n} is {list(actual[n])}, config implies {list(s)}" for n, s in expected.items() if n in actual and actual[n] != s]
    problems += [f"unexpected {n}" for n in actual if n not in expected]
    tok = manifest.get("tokenizer")
    if tok and tok["n_tokens"] > manifest["config"]["vocab_size"]:
        problems.append(f"tokenizer has {tok['n_tokens']} tokens, vocab_size is {manifest['config']['vocab_size']}")
    return _verdict(row, len(problems), problems)


def _validate(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("G0-VALIDATE", subject, metric="degenerate tensors", threshold="0")
    if reason := _no_tensors(manifest):
        row.reason = reason
        return row
    problems = []
    for t in manifest["tensors"]:
        s = t.get("stats")
        if not s:
            problems.append(f"{t['name']}: no statistics")
            continue
        name = t["name"]
        if s["nan"] or s["inf"]:
            problems.append(f"{name}: {s['nan']} NaN, {s['inf']} Inf")
            continue
        zero_limit = 0.5 if "embed_tokens" in name else 0.8
        if s["zero_fraction"] is not None and s["zero_fraction"] >= zero_limit:
            problems.append(f"{name}: {s['zero_fraction']:.0%} zeros (limit {zero_limit:.0%})")
        elif s["l2"] is not None and s["l2"] <= 1e-6:
            problems.append(f"{name}: L2 norm {s['l2']:.3g} <= 1e-6")
        elif len(t["shape"]) == 2 and s["std"] == 0:
            problems.append(f"{name}: all values equal")
    return _verdict(row, len(problems), problems)


def _layout_gguf(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("F-LAYOUT-001", subject, metric="tensors whose ne is not the reversed canonical shape", threshold="0")
    if reason := _no_tensors(manifest):
        row.reason = reason
        return row
    expected = arch.expected_tensors(_config_of(manifest))
    problems = []
    for t in manifest["tensors"]:
        want = expected.get(t["name"])
        if want is not None and list(t["stored_shape"]) != list(reversed(want)):
            problems.append(f"{t['name']}: ne {t['stored_shape']}, expected {list(reversed(want))}")
    return _verdict(row, len(problems), problems)


def _gguf_f32_tensors(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("F-LAYOUT-003", subject, metric="1-D tensors or norms not in F32", threshold="0")
    if reason := _no_tensors(manifest):
        row.reason = reason
        return row
    problems = [f"{t['name']} is {t['encoding']}" for t in manifest["tensors"]
                if gguf_wants_f32(t["name"], t["shape"]) and t["encoding"] != "F32"]
    return _verdict(row, len(problems), problems)


def _layout_apr(manifest: dict | None, subject: str) -> GateRow:
    row = GateRow("F-LAYOUT-002", subject, metric="layout violations", threshold="0")
    if reason := _no_tensors(manifest):
        row.reason = reason
        return row
    problems = []
    header = manifest.get("metadata", {}).get("apr_header", {})
    flags = header.get("flags")
    if flags is None:
        problems.append("APR header flags not recorded")
    else:
        if not flags & 0x0400:
            problems.append(f"flags 0x{flags:04x}: LAYOUT_ROW_MAJOR not set")
        if flags & 0x0800:
            problems.append(f"flags 0x{flags:04x}: LAYOUT_COLUMN_MAJOR set")
    cfg = manifest["config"]
    shapes = {t["name"]: t["shape"] for t in manifest["tensors"]}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in shapes and list(shapes[name]) != [cfg["vocab_size"], cfg["hidden_size"]]:
            problems.append(f"{name} is {shapes[name]}, expected [vocab={cfg['vocab_size']}, hidden={cfg['hidden_size']}]")
    return _verdict(row, len(problems), problems)


def _verdict(row: GateRow, count: int, problems: list[str]) -> GateRow:
    row.value = str(count)
    row.status = PASS if count == 0 else FAIL
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        row.reason = "; ".join(problems[:3]) + more
        row.details = json.dumps({"problems": problems[:200]})
    return row


# ---------------------------------------------------------------- comparison gates


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


def check_rows(check: Check, inputs: dict, model: str, variant: str) -> list[GateRow]:
    """Rows for one planned check. inputs: `comparison` (tensors mode) or `subject_sha256`/`reference_sha256`."""
    row = GateRow(check.gate, label(variant, check.subject), reference=label(variant, check.reference), model=model, variant=variant)
    if check.mode == "bytes":
        subject_failure, reference_failure = inputs.get("subject_failure"), inputs.get("reference_failure")
        row.metric, row.threshold = "sha256 equal", "equal"
        if subject_failure or reference_failure:
            own = bool(subject_failure) and not no_artifact.is_upstream(subject_failure)
            return [_no_artifact_verdict(row, subject_failure or reference_failure, own)]
        a, b = inputs.get("reference_sha256"), inputs.get("subject_sha256")
        row.metric, row.threshold = "sha256 equal", "equal"
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
    row.value, row.threshold = _fmt(worst), _fmt(tolerance)
    problems = []
    for t in tensors:
        err = t.get("normalized_max_abs")
        if t["status"] in ("missing_in_candidate", "extra_in_candidate", "shape_mismatch"):
            problems.append(f"{t['name']}: {t['status']} {t.get('diagnosis', '')}".strip())
        elif t.get("rounding_mismatches"):
            problems.append(f"{t['name']}: {t['diagnosis']}")
        elif err is None or not err <= tolerance:  # NaN and inf fail too
            problems.append(f"{t['name']}: {t.get('diagnosis') or 'values differ'} (normalized |d| {_fmt(err)})")
    for key, (a, b) in comparison.get("config_differences", {}).items():
        problems.append(f"config {key}: {a!r} -> {b!r}")
    for key, detail in comparison.get("tokenizer_differences", {}).items():
        problems.append(f"tokenizer {key}: {detail}")
    row.status = FAIL if problems else PASS
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        row.reason = "; ".join(problems[:3]) + more
    row.details = json.dumps({"problems": problems[:200], "summary": comparison.get("summary")})
    return row


# ---------------------------------------------------------------- contracts (each artifact vs its parent)


def contract_rows(chain: str, inputs: dict, model: str, variant: str) -> list[GateRow]:
    """inputs: `manifest`, `parent_manifest`, `sidecar`, `parent_chain` (the statistics the
    contracts compare are in the manifests: no tensor is read again)."""
    subject, ref = label(variant, chain), label(variant, inputs.get("parent_chain", ""))
    manifest, parent_manifest = inputs.get("manifest"), inputs.get("parent_manifest")
    sidecar = inputs.get("sidecar") or {}
    rows = [
        _i2(GateRow("F-CONTRACT-I2", subject, ref), manifest, parent_manifest),
        _i3(GateRow("F-CONTRACT-I3", subject, ref), manifest, parent_manifest, sidecar),
        _i4(GateRow("F-CONTRACT-I4", subject, ref), manifest, parent_manifest),
        _i5(GateRow("F-CONTRACT-I5", subject, ref), manifest, parent_manifest),
    ]
    for r in rows:
        r.model, r.variant = model, variant
    return rows


def conversion_failure_rows(chain: str, sidecar: dict | None, model: str, variant: str) -> list[GateRow]:
    """F-CONTRACT-OUTPUT for a conversion whose converter exited 0 without writing the requested
    path (the sidecar of its placeholder says so; convqa.formats.no_artifact). Other failures fail the
    edge's own check; a conversion that wrote its output has no row here."""
    failure = (sidecar or {}).get("conversion_failed")
    if not failure or failure.get("kind") != no_artifact.OUTPUT_PATH:
        return []
    row = GateRow("F-CONTRACT-OUTPUT", label(variant, chain), reference=label(variant, plan_parent(chain)),
                  metric="conversions not written to the requested path", threshold="0", model=model, variant=variant)
    stray = failure.get("stray") or []
    details = {"expected": failure.get("expected"), "stray": stray, "converter": failure.get("converter")}
    row.value, row.status, row.reason = "1", FAIL, failure.get("reason", "")
    row.details = json.dumps(details)
    return [row]


def _both(row: GateRow, manifest, parent_manifest) -> bool:
    reason = _no_tensors(manifest) or _no_tensors(parent_manifest)
    if reason:
        row.reason = reason
        return False
    return True


def _i2(row, manifest, parent_manifest) -> GateRow:
    row.metric, row.threshold = "names missing or extra", "0"
    if not _both(row, manifest, parent_manifest):
        return row
    a = {t["name"] for t in parent_manifest["tensors"]}
    b = {t["name"] for t in manifest["tensors"]}
    problems = [f"missing {n}" for n in sorted(a - b)] + [f"extra {n}" for n in sorted(b - a)]
    return _verdict(row, len(problems), problems)


def _i3(row, manifest, parent_manifest, sidecar) -> GateRow:
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
    return _verdict(row, len(problems), problems)


def _i4(row, manifest, parent_manifest) -> GateRow:
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
    row.value = _fmt(worst)
    row.status = PASS if not problems else FAIL
    if problems:
        row.reason = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        row.details = json.dumps({"problems": problems[:200]})
    return row


def _i5(row, manifest, parent_manifest) -> GateRow:
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
        return _verdict(row, 1, ["tokenizer dropped"])
    fields_ = ("model", "pre", "n_tokens", "n_merges", "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id",
               "add_bos_token", "add_eos_token", "chat_template_sha256", "fingerprint")
    problems = [f"{f}: {a.get(f)!r} -> {b.get(f)!r}" for f in fields_ if a.get(f) != b.get(f)]
    return _verdict(row, len(problems), problems)
