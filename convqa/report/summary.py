"""The cross-model summary: one row per model's qualification.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from convqa.atomic import atomic_file
from convqa.report.evidence import INCOMPLETE, NOT_QUALIFIED, QUALIFIED, display_percent, load_evidence
from convqa.report.markdown import table

SUMMARY_SCHEMA_VERSION = "convqa.summary/1"


def summary_rows(qualification_jsons: list) -> list[dict]:
    rows = []
    for path in qualification_jsons:
        evidence = load_evidence(path)
        s = evidence["summary"]
        rows.append({"model": evidence["model"], "verdict": s["verdict"], "pass": s["pass"], "fail": s["fail"],
                     "skipped": s["skipped"], "not_evaluated": s["not_evaluated"], "pass_rate": s["pass_rate"],
                     "coverage": s["coverage"], "generated_at": evidence["generated_at"], "evidence": os.fspath(path)})
    return rows


def overall_verdict(rows: list[dict]) -> str:
    """QUALIFIED only when every model is; no models at all is INCOMPLETE."""
    verdicts = {r["verdict"] for r in rows}
    if NOT_QUALIFIED in verdicts:
        return NOT_QUALIFIED
    if not rows or verdicts != {QUALIFIED}:
        return INCOMPLETE
    return QUALIFIED


def write_summary(qualification_jsons: list, out_json: str | os.PathLike, out_md: str | os.PathLike) -> dict:
    rows = summary_rows(qualification_jsons)
    summary = {"schema_version": SUMMARY_SCHEMA_VERSION, "verdict": overall_verdict(rows), "models": rows}
    with atomic_file(out_json) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    lines = [f"# Qualification summary: {summary['verdict']}", ""]
    lines += table(["model", "verdict", "pass", "fail", "skipped", "not evaluated", "pass rate", "coverage"],
                   [[r["model"], r["verdict"], r["pass"], r["fail"], r["skipped"], r["not_evaluated"],
                     display_percent(r["pass_rate"]), display_percent(r["coverage"])] for r in rows])
    if not rows:
        lines.append("No models were qualified.\n")
    with atomic_file(out_md) as tmp:
        Path(tmp).write_text("\n".join(lines), encoding="utf-8")
    return summary
