"""The cross-model summary: one row per model's qualification.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from convqa.files import atomic_file
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


# `convqa verdict`: the verdict as an exit status, so CI can tell "the qualification ran and the
# conversion is NOT QUALIFIED" (1, 3) from "the tool itself failed" (snakemake non-zero, or 2 here).
VERDICT_EXIT = {QUALIFIED: 0, NOT_QUALIFIED: 1, INCOMPLETE: 3}


def read_verdicts(path: str | os.PathLike) -> tuple[str, list[tuple[str, str]]]:
    """(overall verdict, [(model, verdict)]) of a summary.json or one model's qualification.json."""
    from convqa.errors import FormatError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise FormatError(path, f"cannot read: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"not a JSON summary or qualification: {exc}") from exc
    if isinstance(data, dict) and data.get("schema_version") == SUMMARY_SCHEMA_VERSION:
        models = [(row["model"], row["verdict"]) for row in data.get("models", [])]
        return overall_verdict([{"verdict": v} for _, v in models]), models
    evidence = load_evidence(path)  # validates a qualification.json against its own rows
    return evidence["summary"]["verdict"], [(evidence["model"], evidence["summary"]["verdict"])]

