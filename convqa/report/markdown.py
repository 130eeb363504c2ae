"""report.md: the qualification as a Markdown document, rendered from the evidence dict only."""

from __future__ import annotations

import html

from convqa.report.evidence import (attention_rows, display_hash, display_number, display_percent, display_size,
                                    inference_rows, outside_verdict_line, row_comparison, row_diagnosis)
from convqa.report import disk
from convqa.report.plots import STATUS_LETTERS, gate_matrix, worst_status

STATUS_ICONS = {"pass": "PASS", "fail": "**FAIL**", "skipped": "skip", "not_evaluated": "*not evaluated*"}
WORST_TENSORS_SHOWN = 5


def cell(text) -> str:
    """Inline text: markup characters as entities (a reason quoting `<b>` is shown, not applied),
    pipes escaped and newlines folded so a reason cannot break a table."""
    text = html.escape(str("" if text is None else text), quote=False)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return lines + [""]


def gate_row_cells(r: dict) -> list:
    return [r["gate"], r["subject"], r["reference"] or "", STATUS_ICONS[r["status"]], r["metric"] or "",
            display_number(r["value"]), display_number(r["threshold"]), r["reason"],
            row_diagnosis(r) + (f" (tensor check {row_comparison(r)})" if row_comparison(r) else "")]


GATE_ROW_HEADER = ["gate", "subject", "reference", "status", "metric", "value", "threshold", "reason", "diagnosis"]


def render_markdown(evidence: dict) -> str:
    s = evidence["summary"]
    out = [f"# Qualification of {cell(evidence['model'])}: {s['verdict']}", "",
           f"{s['verdict_reason']}. Generated {evidence['generated_at']} by convqa "
           f"{evidence['tool_versions'].get('convqa')} (evidence schema `{evidence['schema_version']}`).", "",
           "## Summary", ""]
    out += table(["rows", "pass", "fail", "skipped", "not evaluated", "pass rate", "coverage"],
                 [[s["rows"], s["pass"], s["fail"], s["skipped"], s["not_evaluated"], display_percent(s["pass_rate"]),
                   display_percent(s["coverage"])]])
    out.append("pass rate = pass / (pass + fail); coverage = (pass + fail) / (rows - skipped).\n")
    if outside := outside_verdict_line(s):
        out.append(outside + ".\n")

    attention = attention_rows(evidence)
    out += ["## Rows needing attention (failing first)", ""]
    out += table(GATE_ROW_HEADER, [gate_row_cells(r) for r in attention]) if attention else ["None.", ""]

    out += ["## Gate x subject matrix", ""]
    if evidence["gates"]:
        out += _matrix([r for r in evidence["gates"] if r not in inference_rows(evidence)] or evidence["gates"])
        out.append("P pass, F fail, S skipped, N not evaluated; a number counts the rows behind a cell "
                   "(one per reference), the letter is the worst of them.\n")
    else:
        out += ["No gate rows: nothing was evaluated.", ""]

    out += _tensor_checks(evidence)
    out += _inference(evidence)

    out += ["## Artifacts", ""]
    out += table(["artifact", "format", "sha256", "size", "tensors", "converter", "fingerprint", "wall s", "peak RSS MB",
                  "hash check"],
                 [[a["label"], a["format"] or "", display_hash(a["file_sha256"]), display_size(a["file_size"]),
                   display_number(a["tensor_count"]), (a["producer"] or {}).get("converter") or "source",
                   display_hash((a["producer"] or {}).get("fingerprint")),
                   display_number((a["producer"] or {}).get("wall_s")),
                   display_number((a["producer"] or {}).get("peak_rss_mb")),
                   {True: "manifest = sidecar", False: "**MISMATCH**", None: ""}[a["sha256_consistent"]]]
                  for a in evidence["artifacts"]])

    out += disk.markdown_section((evidence.get("extra") or {}).get("disk"), display_size)

    out += ["## All gate rows", ""]
    out += table(GATE_ROW_HEADER, [gate_row_cells(r) for r in evidence["gates"]])

    out += ["## Tool versions", ""]
    out += table(["tool", "version"], [[k, v or "not installed"] for k, v in evidence["tool_versions"].items()])
    host = evidence.get("host") or {}
    if host:
        out += [f"Host: {cell(host.get('hostname'))}, {cell(host.get('system'))}, {host.get('cpu_count')} CPUs.", ""]
    return "\n".join(out)


def _matrix(rows: list[dict]) -> list[str]:
    gates, subjects, cells = gate_matrix(rows)
    body = []
    for g in gates:
        line = [g]
        for s in subjects:
            here = cells.get((g, s))
            if not here:
                line.append("")
                continue
            letter = STATUS_LETTERS[worst_status([r["status"] for r in here])]
            line.append((f"**{letter}**" if letter == "F" else letter) + (f" ({len(here)})" if len(here) > 1 else ""))
        body.append(line)
    return table(["gate"] + subjects, body)


def _tensor_checks(evidence: dict) -> list[str]:
    checks = evidence["tensor_checks"]
    if not checks:
        return []
    out = ["## Tensor checks", ""]
    rows = []
    for c in checks:
        bad = [t for t in c["tensors"] if not t["ok"]]
        rows.append([c["label"], "ok" if c["ok"] else "**differs**", len(c["tensors"]), len(bad),
                     display_number(c["summary"].get("worst_normalized_max_abs")),
                     "; ".join(f"{k}: {v}" for k, v in c["config_differences"].items()),
                     "; ".join(sorted(c["tokenizer_differences"]))])
    out += table(["check", "result", "tensors", "out of tolerance", "worst normalised error", "config differences",
                  "tokenizer differences"], rows)
    for c in checks:
        bad = [t for t in c["tensors"] if not t["ok"] or t.get("blocks")]
        if bad:
            out += [f"### {cell(c['label'])}: tensors out of tolerance or off the reference quantizer ({len(bad)})", ""]
            out += table(["tensor", "layer", "kind", "status", "normalised max error", "tolerance", "diagnosis",
                          "blocks vs reference quantizer"],
                         [[t["name"], "" if t["layer"] is None else t["layer"], t["kind"], t["status"],
                           display_number(t["normalized_max_abs"]), display_number(t["tolerance"]), t["diagnosis"],
                           t.get("blocks", "")]
                          for t in bad])
    return out


def _inference(evidence: dict) -> list[str]:
    rows = inference_rows(evidence)
    throughput = evidence["inference"]["throughput"]
    if not rows and not throughput and not evidence["inference"]["details"]:
        return []
    out = ["## Inference", ""]
    if rows:
        out += _matrix(rows)
    for d in evidence["inference"]["details"]:
        if d["prompts"]:
            columns = prompt_columns(d["prompts"])
            out += [f"### {cell(d['label'])}: per-prompt results", ""]
            out += table(columns, [[display_number(p.get(c)) for c in columns] for p in d["prompts"]])
    if throughput:
        out += ["### Throughput", ""]
        columns = ["format", "engine", "backend", "prefill_tps", "decode_tps"]
        out += table(columns, [[display_number(t.get(c)) for c in columns] for t in throughput])
    return out


def prompt_columns(prompts: list[dict]) -> list[str]:
    """Scalar fields of the per-prompt records, in first-seen order (arrays go to the plots)."""
    columns: list[str] = []
    for p in prompts:
        for k, v in p.items():
            if k not in columns and not isinstance(v, (list, dict)):
                columns.append(k)
    return columns
